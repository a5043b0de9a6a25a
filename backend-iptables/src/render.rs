//! Renders a [`Plan`] into `iptables-restore` input in kube-proxy's chain layout.
//!
//! A [`Ruleset`] is the complete state svcnat owns in one address family's `nat` and
//! `filter` tables: fixed chains (`KUBE-SERVICES`, `KUBE-NODEPORTS`, `KUBE-POSTROUTING`,
//! `KUBE-MARK-MASQ`, `KUBE-FORWARD`, `KUBE-EXTERNAL-SERVICES`, `KUBE-PROXY-FIREWALL`, the
//! `KUBE-PROXY-CANARY`) and per Service port chains (`KUBE-SVC-`, `KUBE-SVL-`, `KUBE-EXT-`,
//! `KUBE-FW-`, `KUBE-SEP-`). It is kept as one **unit** per Service port (the unit's own
//! chains and its rules in the shared chains), so [`Ruleset::update`] re-renders only the
//! Service ports a [`PlanDiff`] touches and returns a restore text for just the chains whose
//! rules changed. The shared chains are assembled from the units in Service port order.
//!
//! Rules are spelled as `iptables-save` prints them (`-d 10.96.0.10/32 -p tcp -m comment
//! --comment "..." -m tcp --dport 53 -j ...`, `-j MARK --set-xmark 0x4000/0x4000`), so the
//! saved state can be compared with the rendering. The one value `iptables-save` prints
//! differently is the statistic probability, which the kernel stores as a 31-bit integer:
//! `--probability 0.2000000000` is saved as `0.20000000019`.
//!
//! The layout follows kube-proxy's iptables proxier (`pkg/proxy/iptables/proxier.go`):
//!
//! - `nat KUBE-SERVICES` jumps per cluster IP to the `KUBE-SVC-` (or, for
//!   `internalTrafficPolicy: Local`, `KUBE-SVL-`) chain of the target backend set, whose
//!   first rule marks off-cluster sources for masquerading; external IPs and load balancer
//!   IPs jump to `KUBE-EXT-`, node ports (one rule per node address the plan lists) sit in
//!   `nat KUBE-NODEPORTS`, reached by the last rule of `KUBE-SERVICES` for local
//!   destinations.
//! - `KUBE-EXT-` masquerades (`externalTrafficPolicy: Cluster`) or, for `Local`, sends pod
//!   and node traffic to the cluster-wide chain and everything else to the local one.
//! - A backend set chain holds the ClientIP affinity checks (`-m recent --rcheck`) and then
//!   the probability cascade over the endpoints with a nonzero weight (`p_i = w_i / sum of
//!   the remaining weights`, printed with ten decimals like kube-proxy's `%0.10f`); each
//!   `KUBE-SEP-` chain marks hairpin traffic and DNATs (recording affinity with `--set`).
//!   Zero-weight (drained) endpoints get no rule and no chain.
//! - A backend set with no usable endpoint gets no chain: its frontends REJECT ("has no
//!   endpoints") or DROP ("has no local endpoints") in `filter KUBE-SERVICES` (cluster IPs)
//!   or `filter KUBE-EXTERNAL-SERVICES` (the rest). As in kube-proxy, `KUBE-EXT-` still
//!   exists for `externalTrafficPolicy: Local` when only the local set is empty, so pods and
//!   the node keep reaching the Service through the cluster-wide set while outside traffic
//!   falls through to the DROP.
//! - Load balancer source ranges use kube-proxy's current firewall: `KUBE-FW-` sends the
//!   allowed ranges on to `KUBE-EXT-`, and what it did not DNAT is dropped by
//!   `filter KUBE-PROXY-FIREWALL` (hooked from INPUT, FORWARD and OUTPUT). This needs no
//!   second mark bit and leaves `KUBE-FIREWALL` and `KUBE-MARK-DROP` to the kubelet, which
//!   owns them on real nodes.
//! - Health check node ports are accepted in `filter KUBE-NODEPORTS`, once per Service, in
//!   each family where the Service has rules.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::owned::owned_after;
use ipnet::IpNet;
use svcnat_core::model::{IpFamily, Protocol, ServiceName};
use svcnat_core::plan::{
    BackendSet, BackendSetId, EmptyAction, Frontend, FrontendKey, FrontendKind, HealthCheck,
    Locality, Masquerade, NodeContext, Op, Plan, PlanDiff, PlanEndpoint, ServicePortName,
};
use svcnat_core::select::Probability;

/// The chain whose absence tells the driver that someone flushed the tables.
pub const CANARY_CHAIN: &str = "KUBE-PROXY-CANARY";
/// The packet mark bit that asks `KUBE-POSTROUTING` to masquerade.
pub const MASQ_MARK: u32 = 0x4000;
/// Entry chain of Service traffic (`nat`), and of REJECT/DROP for cluster IPs (`filter`).
pub const SERVICES_CHAIN: &str = "KUBE-SERVICES";
/// `filter` chain of REJECT/DROP rules for external addresses without endpoints.
pub const EXTERNAL_SERVICES_CHAIN: &str = "KUBE-EXTERNAL-SERVICES";
/// Node ports (`nat`) and health check node ports (`filter`).
pub const NODEPORTS_CHAIN: &str = "KUBE-NODEPORTS";
/// `nat` chain that masquerades marked packets.
pub const POSTROUTING_CHAIN: &str = "KUBE-POSTROUTING";
/// `nat` chain that marks a packet for masquerading.
pub const MARK_MASQ_CHAIN: &str = "KUBE-MARK-MASQ";
/// `filter` chain that accepts forwarded Service traffic.
pub const FORWARD_CHAIN: &str = "KUBE-FORWARD";
/// `filter` chain that drops load balancer traffic from sources outside the allowed ranges.
pub const PROXY_FIREWALL_CHAIN: &str = "KUBE-PROXY-FIREWALL";

/// An iptables table svcnat writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// The `filter` table.
    Filter,
    /// The `nat` table.
    Nat,
}

impl Table {
    /// The table's name as iptables spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }

    /// Both tables, in the order restore texts list them.
    pub const ALL: [Table; 2] = [Table::Filter, Table::Nat];
}

/// The jump rules from the built-in chains into svcnat's chains, as `(table, built-in
/// chain, rule arguments)`; the arguments are separate argv words (no shell quoting).
///
/// kube-proxy installs them outside of `iptables-restore`, each with `iptables -C` and
/// `iptables -I CHAIN` (insert at the head) in this order, so within one built-in chain the
/// last one listed ends up first: `KUBE-PROXY-FIREWALL` before `KUBE-FORWARD` before
/// `KUBE-SERVICES` before `KUBE-EXTERNAL-SERVICES` in `FORWARD`, as on kube-proxy's nodes.
/// [`base_jump_order`] gives the resulting order.
pub fn base_jumps() -> Vec<(Table, &'static str, Vec<String>)> {
    let new = ["-m", "conntrack", "--ctstate", "NEW"];
    let jump = |extra: &[&str], comment: &str, chain: &str| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(
            ["-m", "comment", "--comment", comment, "-j", chain]
                .iter()
                .map(|s| s.to_string()),
        );
        v
    };
    let ext = "kubernetes externally-visible service portals";
    let portals = "kubernetes service portals";
    let firewall = "kubernetes load balancer firewall";
    vec![
        (
            Table::Filter,
            "INPUT",
            jump(&new, ext, EXTERNAL_SERVICES_CHAIN),
        ),
        (
            Table::Filter,
            "FORWARD",
            jump(&new, ext, EXTERNAL_SERVICES_CHAIN),
        ),
        (
            Table::Filter,
            "INPUT",
            jump(
                &[],
                "kubernetes health check service ports",
                NODEPORTS_CHAIN,
            ),
        ),
        (
            Table::Filter,
            "FORWARD",
            jump(&new, portals, SERVICES_CHAIN),
        ),
        (Table::Filter, "OUTPUT", jump(&new, portals, SERVICES_CHAIN)),
        (
            Table::Filter,
            "FORWARD",
            jump(&[], "kubernetes forwarding rules", FORWARD_CHAIN),
        ),
        (
            Table::Filter,
            "INPUT",
            jump(&new, firewall, PROXY_FIREWALL_CHAIN),
        ),
        (
            Table::Filter,
            "OUTPUT",
            jump(&new, firewall, PROXY_FIREWALL_CHAIN),
        ),
        (
            Table::Filter,
            "FORWARD",
            jump(&new, firewall, PROXY_FIREWALL_CHAIN),
        ),
        (Table::Nat, "OUTPUT", jump(&[], portals, SERVICES_CHAIN)),
        (Table::Nat, "PREROUTING", jump(&[], portals, SERVICES_CHAIN)),
        (
            Table::Nat,
            "POSTROUTING",
            jump(&[], "kubernetes postrouting rules", POSTROUTING_CHAIN),
        ),
    ]
}

/// The jump rules of one built-in chain in the order they end up in after
/// [`base_jumps`] were inserted at the head one by one.
pub fn base_jump_order(table: Table, builtin: &str) -> Vec<Vec<String>> {
    let mut v: Vec<Vec<String>> = base_jumps()
        .into_iter()
        .filter(|(t, c, _)| *t == table && *c == builtin)
        .map(|(_, _, r)| r)
        .collect();
    v.reverse();
    v
}

/// The fixed chains, in declaration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fixed {
    FilterServices,
    FilterExternalServices,
    FilterForward,
    FilterNodePorts,
    FilterProxyFirewall,
    FilterCanary,
    NatServices,
    NatNodePorts,
    NatPostrouting,
    NatMarkMasq,
    NatCanary,
}

const FIXED: [Fixed; 11] = [
    Fixed::FilterServices,
    Fixed::FilterExternalServices,
    Fixed::FilterForward,
    Fixed::FilterNodePorts,
    Fixed::FilterProxyFirewall,
    Fixed::FilterCanary,
    Fixed::NatServices,
    Fixed::NatNodePorts,
    Fixed::NatPostrouting,
    Fixed::NatMarkMasq,
    Fixed::NatCanary,
];

/// Shared chains that units contribute rules to; the index into [`Unit::shared`].
const NAT_SERVICES: usize = 0;
const NAT_NODEPORTS: usize = 1;
const FILTER_SERVICES: usize = 2;
const FILTER_EXTERNAL: usize = 3;
const FILTER_FIREWALL: usize = 4;
const SHARED: usize = 5;

impl Fixed {
    fn table(self) -> Table {
        match self {
            Fixed::FilterServices
            | Fixed::FilterExternalServices
            | Fixed::FilterForward
            | Fixed::FilterNodePorts
            | Fixed::FilterProxyFirewall
            | Fixed::FilterCanary => Table::Filter,
            Fixed::NatServices
            | Fixed::NatNodePorts
            | Fixed::NatPostrouting
            | Fixed::NatMarkMasq
            | Fixed::NatCanary => Table::Nat,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fixed::FilterServices | Fixed::NatServices => SERVICES_CHAIN,
            Fixed::FilterExternalServices => EXTERNAL_SERVICES_CHAIN,
            Fixed::FilterForward => FORWARD_CHAIN,
            Fixed::FilterNodePorts | Fixed::NatNodePorts => NODEPORTS_CHAIN,
            Fixed::FilterProxyFirewall => PROXY_FIREWALL_CHAIN,
            Fixed::FilterCanary | Fixed::NatCanary => CANARY_CHAIN,
            Fixed::NatPostrouting => POSTROUTING_CHAIN,
            Fixed::NatMarkMasq => MARK_MASQ_CHAIN,
        }
    }

    /// The shared slot units contribute to, if any.
    fn shared(self) -> Option<usize> {
        match self {
            Fixed::NatServices => Some(NAT_SERVICES),
            Fixed::NatNodePorts => Some(NAT_NODEPORTS),
            Fixed::FilterServices => Some(FILTER_SERVICES),
            Fixed::FilterExternalServices => Some(FILTER_EXTERNAL),
            Fixed::FilterProxyFirewall => Some(FILTER_FIREWALL),
            _ => None,
        }
    }

    /// Rules that never change.
    fn static_rules(self) -> &'static [&'static str] {
        match self {
            // "kubernetes service traffic requiring SNAT": only packets marked 0x4000; the
            // mark is cleared so that a packet re-entering the stack is not masqueraded twice.
            Fixed::NatPostrouting => &[
                "-m mark ! --mark 0x4000/0x4000 -j RETURN",
                "-j MARK --set-xmark 0x4000/0x0",
                "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
            ],
            // iptables-save spells `--or-mark 0x4000` as `--set-xmark 0x4000/0x4000`.
            Fixed::NatMarkMasq => &["-j MARK --set-xmark 0x4000/0x4000"],
            Fixed::FilterForward => &[
                "-m conntrack --ctstate INVALID -j DROP",
                "-m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT",
                "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            ],
            _ => &[],
        }
    }
}

/// The last rule of `nat KUBE-SERVICES`: node ports on local addresses.
const NODEPORTS_JUMP: &str = "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS";

/// What one Service port renders in one address family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Unit {
    /// The frontends of this family that belong to the Service port, in key order.
    frontends: Vec<FrontendKey>,
    /// Its backend sets of this family, in id order.
    sets: Vec<BackendSetId>,
    /// Its own `nat` chains with their rules (arguments after `-A CHAIN`).
    chains: Vec<(String, Vec<String>)>,
    /// Its rules in the shared chains, by slot.
    shared: [Vec<String>; SHARED],
}

impl Unit {
    fn chain(&self, name: &str) -> Option<&Vec<String>> {
        self.chains.iter().find(|(n, _)| n == name).map(|(_, r)| r)
    }
}

/// The complete svcnat-owned iptables state of one plan in one address family.
///
/// Two rulesets are equal when they render the same rules; [`Ruleset::update`] keeps a
/// ruleset equal to [`Ruleset::new_for`] of the new plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    family: IpFamily,
    node: NodeContext,
    units: BTreeMap<ServicePortName, Unit>,
    /// Which unit holds a frontend key (to find the old owner when a key moves).
    owners: BTreeMap<FrontendKey, ServicePortName>,
    /// Every health check of the plan.
    health: BTreeMap<ServiceName, HealthCheck>,
    /// The `filter KUBE-NODEPORTS` rules of the checks of Services with a unit here.
    health_rules: BTreeMap<ServiceName, String>,
}

/// A chain that changed between two rulesets: its new rules, or `None` when it is gone.
type Change = (Table, String, Option<Vec<String>>);

/// A chain to write: its rules, or `None` to delete it.
type Item<'a> = (Table, &'a str, Option<Vec<&'a str>>);

impl Ruleset {
    /// Renders the IPv4 rules of a plan.
    pub fn new(plan: &Plan) -> Ruleset {
        Ruleset::new_for(plan, IpFamily::V4)
    }

    /// Renders the rules of one address family (`iptables` for IPv4, `ip6tables` for IPv6).
    pub fn new_for(plan: &Plan, family: IpFamily) -> Ruleset {
        let mut keys: BTreeMap<&ServicePortName, Vec<FrontendKey>> = BTreeMap::new();
        for (k, f) in plan.frontends() {
            if IpFamily::of(&k.addr) == family {
                keys.entry(&f.service_port).or_default().push(*k);
            }
        }
        let mut sets: BTreeMap<&ServicePortName, Vec<BackendSetId>> = BTreeMap::new();
        for (id, _) in plan.backend_sets() {
            if id.family == family {
                sets.entry(&id.service_port).or_default().push(id.clone());
            }
        }
        let names: BTreeSet<&ServicePortName> = keys.keys().chain(sets.keys()).copied().collect();
        let mut units = BTreeMap::new();
        let mut owners = BTreeMap::new();
        for spn in names {
            let k = keys.remove(spn).unwrap_or_default();
            let s = sets.remove(spn).unwrap_or_default();
            for key in &k {
                owners.insert(*key, spn.clone());
            }
            units.insert(spn.clone(), render_unit(plan, family, spn, k, s));
        }
        let mut rules = Ruleset {
            family,
            node: plan.node().clone(),
            units,
            owners,
            health: plan
                .health_checks()
                .map(|(s, h)| (s.clone(), h.clone()))
                .collect(),
            health_rules: BTreeMap::new(),
        };
        let services: Vec<ServiceName> = rules.health.keys().cloned().collect();
        for s in services {
            rules.refresh_health_rule(&s);
        }
        rules
    }

    /// The address family these rules are for.
    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// Every chain svcnat owns in this state, fixed chains first.
    pub fn chains(&self) -> impl Iterator<Item = (Table, &str)> {
        FIXED.iter().map(|f| (f.table(), f.name())).chain(
            self.units
                .values()
                .flat_map(|u| u.chains.iter().map(|(n, _)| (Table::Nat, n.as_str()))),
        )
    }

    /// The rules of every chain, as (table, chain, arguments after `-A CHAIN`).
    pub fn rules(&self) -> impl Iterator<Item = (Table, &str, Vec<&str>)> {
        FIXED
            .iter()
            .map(|f| (f.table(), f.name(), self.fixed_rules(*f)))
            .chain(self.units.values().flat_map(|u| {
                u.chains.iter().map(|(n, r)| {
                    (
                        Table::Nat,
                        n.as_str(),
                        r.iter().map(String::as_str).collect(),
                    )
                })
            }))
    }

    /// Number of rules over all chains.
    pub fn rule_count(&self) -> usize {
        let unit_rules: usize = self
            .units
            .values()
            .map(|u| {
                u.chains.iter().map(|(_, r)| r.len()).sum::<usize>()
                    + u.shared.iter().map(Vec::len).sum::<usize>()
            })
            .sum();
        let fixed: usize = FIXED.iter().map(|f| f.static_rules().len()).sum();
        // The last rule of `nat KUBE-SERVICES` (the node port jump) is always there.
        unit_rules + fixed + self.health_rules.len() + 1
    }

    /// Number of lines of [`Ruleset::full_restore`], without building it.
    pub fn line_count_full(&self) -> usize {
        // `*table` and `COMMIT` per table, one declaration per chain, one line per rule.
        2 * Table::ALL.len() + self.chains().count() + self.rule_count()
    }

    /// `iptables-restore --noflush` input that (re)writes every owned chain: per table the
    /// declarations (which flush the chains under `--noflush`), all rules, `COMMIT`.
    pub fn full_restore(&self) -> String {
        let items: Vec<Item<'_>> = self.rules().map(|(t, c, r)| (t, c, Some(r))).collect();
        restore_text(&items)
    }

    /// Like [`Ruleset::full_restore`], but each table is written in blocks of at most
    /// `max_chains` chains, each its own `*table ... COMMIT`, in dependency order (the chains
    /// a rule jumps to come in an earlier block or the same one): `KUBE-MARK-*`, then
    /// `KUBE-SEP-*`, `KUBE-SVC-*`, `KUBE-SVL-*`, `KUBE-EXT-*`, `KUBE-FW-*`, `KUBE-NODEPORTS`,
    /// then the other shared chains. Every commit leaves a consistent ruleset.
    ///
    /// This exists for `iptables-nft-restore --noflush`, whose cost grows with the square of
    /// the chains declared in one transaction (measured: 12,500 chains take 4.1 s in one
    /// block and 0.64 s in blocks of 500); with the legacy flavour every commit rewrites
    /// the whole table, so there one block is best.
    pub fn full_restore_batched(&self, max_chains: usize) -> String {
        let max_chains = max_chains.max(1);
        let mut items: Vec<Item<'_>> = self.rules().map(|(t, c, r)| (t, c, Some(r))).collect();
        items.sort_by_key(|(t, c, _)| (*t, dependency_rank(c)));
        let mut out = String::new();
        for table in Table::ALL {
            let of_table: Vec<Item<'_>> = items
                .iter()
                .filter(|(t, _, _)| *t == table)
                .cloned()
                .collect();
            for chunk in of_table.chunks(max_chains) {
                out.push_str(&restore_text(chunk));
            }
        }
        out
    }

    /// Re-renders what `diff` (from the plan this ruleset was built from to `plan`) touches,
    /// patches `self`, and returns the restore text for only the chains whose rules changed
    /// (declared and rewritten), plus a declaration and `-X` for chains that are gone;
    /// `None` when nothing changed in this family. A changed node context re-renders
    /// everything (and still writes only the chains that differ).
    pub fn update(&mut self, plan: &Plan, diff: &PlanDiff) -> Option<String> {
        if self.node != *plan.node() || diff.ops.iter().any(|op| matches!(op, Op::SetNode(_))) {
            let new = Ruleset::new_for(plan, self.family);
            let changes = self.changes_to(&new);
            *self = new;
            return (!changes.is_empty()).then(|| restore_text(&borrow(&changes)));
        }
        let family = self.family;
        // Which units to re-render, and the frontends and sets the diff names for each.
        let mut touched: BTreeMap<
            ServicePortName,
            (BTreeSet<FrontendKey>, BTreeSet<BackendSetId>),
        > = BTreeMap::new();
        let mut health_ops: Vec<(&ServiceName, Option<&HealthCheck>)> = Vec::new();
        for op in &diff.ops {
            match op {
                Op::SetNode(_) => {}
                Op::AddBackendSet(s)
                | Op::UpdateBackendSet { set: s, .. }
                | Op::RemoveBackendSet(s) => {
                    if s.id.family == family {
                        touched
                            .entry(s.id.service_port.clone())
                            .or_default()
                            .1
                            .insert(s.id.clone());
                    }
                }
                Op::RemoveFrontend { key, old: f }
                | Op::AddFrontend { key, frontend: f }
                | Op::UpdateFrontend {
                    key, frontend: f, ..
                } => {
                    if IpFamily::of(&key.addr) == family {
                        touched
                            .entry(f.service_port.clone())
                            .or_default()
                            .0
                            .insert(*key);
                        if let Some(owner) = self.owners.get(key) {
                            touched.entry(owner.clone()).or_default();
                        }
                    }
                }
                Op::SetHealthCheck { service, check } => health_ops.push((service, Some(check))),
                Op::RemoveHealthCheck { service } => health_ops.push((service, None)),
            }
        }
        // Health check rules depend on the check and on whether the Service has units here.
        let health_services: BTreeSet<ServiceName> = health_ops
            .iter()
            .map(|(s, _)| (*s).clone())
            .chain(touched.keys().map(|spn| spn.service.clone()))
            .collect();

        for (service, check) in health_ops {
            match check {
                Some(c) => self.health.insert(service.clone(), c.clone()),
                None => self.health.remove(service),
            };
        }

        let mut changes: Vec<Change> = Vec::new();
        let mut dirty = [false; SHARED];
        for (spn, (keys, sets)) in touched {
            let old = self.units.remove(&spn).unwrap_or_default();
            let (keys, sets) = owned_after(
                plan,
                &spn,
                &old.frontends,
                &old.sets,
                &keys,
                &sets,
                &mut self.owners,
            );
            let new = if keys.is_empty() && sets.is_empty() {
                Unit::default()
            } else {
                render_unit(plan, family, &spn, keys, sets)
            };
            for (name, rules) in &new.chains {
                if old.chain(name) != Some(rules) {
                    changes.push((Table::Nat, name.clone(), Some(rules.clone())));
                }
            }
            for (name, _) in &old.chains {
                if new.chain(name).is_none() {
                    changes.push((Table::Nat, name.clone(), None));
                }
            }
            for (slot, d) in dirty.iter_mut().enumerate() {
                *d |= old.shared[slot] != new.shared[slot];
            }
            if !new.frontends.is_empty() || !new.sets.is_empty() {
                self.units.insert(spn, new);
            }
        }
        let mut health_dirty = false;
        for s in &health_services {
            health_dirty |= self.refresh_health_rule(s);
        }
        for f in FIXED {
            let rewrite = match f.shared() {
                Some(slot) => dirty[slot],
                None => f == Fixed::FilterNodePorts && health_dirty,
            };
            if rewrite {
                let rules = self
                    .fixed_rules(f)
                    .into_iter()
                    .map(str::to_string)
                    .collect();
                changes.push((f.table(), f.name().to_string(), Some(rules)));
            }
        }
        (!changes.is_empty()).then(|| restore_text(&borrow(&changes)))
    }

    /// The chains that differ from `self` to `new`, fixed chains included.
    fn changes_to(&self, new: &Ruleset) -> Vec<Change> {
        let old: BTreeMap<(Table, &str), Vec<&str>> =
            self.rules().map(|(t, c, r)| ((t, c), r)).collect();
        let mut seen = BTreeSet::new();
        let mut changes = Vec::new();
        for (t, c, r) in new.rules() {
            seen.insert((t, c));
            if old.get(&(t, c)) != Some(&r) {
                changes.push((
                    t,
                    c.to_string(),
                    Some(r.into_iter().map(str::to_string).collect()),
                ));
            }
        }
        for (t, c) in old.keys() {
            if !seen.contains(&(*t, *c)) {
                changes.push((*t, c.to_string(), None));
            }
        }
        changes
    }

    /// Whether a Service has any unit (frontend or backend set) in this family.
    fn has_units(&self, service: &ServiceName) -> bool {
        let lo = ServicePortName {
            service: service.clone(),
            port: String::new(),
            protocol: Protocol::Tcp,
        };
        self.units
            .range(lo..)
            .next()
            .is_some_and(|(k, _)| &k.service == service)
    }

    /// Re-renders the `filter KUBE-NODEPORTS` rule of a Service's health check node port;
    /// returns whether it changed.
    fn refresh_health_rule(&mut self, service: &ServiceName) -> bool {
        // "no matter if node has local endpoints, healthCheckNodePorts need add a rule to
        // accept the incoming connection"
        let rule = self
            .health
            .get(service)
            .filter(|_| self.has_units(service))
            .map(|h| {
                Rule::new()
                    .proto(Protocol::Tcp)
                    .comment(&format!("{service} health check node port"))
                    .dport(Protocol::Tcp, h.port)
                    .jump("ACCEPT")
            });
        let old = match &rule {
            Some(r) => self.health_rules.insert(service.clone(), r.clone()),
            None => self.health_rules.remove(service),
        };
        old != rule
    }

    fn fixed_rules(&self, f: Fixed) -> Vec<&str> {
        if let Some(slot) = f.shared() {
            let mut v: Vec<&str> = self
                .units
                .values()
                .flat_map(|u| u.shared[slot].iter().map(String::as_str))
                .collect();
            if f == Fixed::NatServices {
                v.push(NODEPORTS_JUMP);
            }
            return v;
        }
        if f == Fixed::FilterNodePorts {
            return self.health_rules.values().map(String::as_str).collect();
        }
        f.static_rules().to_vec()
    }
}

/// Escapes a comment for double quotes.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// An address as a host network: `/32` or `/128`.
fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

/// A rule's arguments in `iptables-save` order: addresses, protocol, matches, target.
struct Rule(String);

impl Rule {
    fn new() -> Rule {
        Rule(String::with_capacity(160))
    }

    fn part(mut self, a: &str, b: &str) -> Rule {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        self.0.push_str(a);
        self.0.push_str(b);
        self
    }

    fn src(self, negate: bool, net: &str) -> Rule {
        let r = if negate { self.part("!", "") } else { self };
        r.part("-s ", net)
    }

    fn dst(self, net: &str) -> Rule {
        self.part("-d ", net)
    }

    fn proto(self, p: Protocol) -> Rule {
        self.part("-p ", p.as_lower())
    }

    fn comment(self, c: &str) -> Rule {
        self.part("-m comment --comment ", &quote(c))
    }

    fn dport(self, p: Protocol, port: u16) -> Rule {
        self.part("-m ", p.as_lower())
            .part("--dport ", &port.to_string())
    }

    fn raw(self, s: &str) -> Rule {
        self.part(s, "")
    }

    fn jump(self, target: &str) -> String {
        self.part("-j ", target).0
    }

    fn end(self) -> String {
        self.0
    }
}

fn chain_prefix(l: Locality) -> &'static str {
    match l {
        Locality::Cluster => "KUBE-SVC-",
        Locality::Local => "KUBE-SVL-",
    }
}

fn set_chain(s: &BackendSet) -> String {
    format!("{}{}", chain_prefix(s.id.locality), s.chain)
}

fn recent_mask(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "255.255.255.255",
        IpFamily::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    }
}

fn reject_target(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "REJECT --reject-with icmp-port-unreachable",
        IpFamily::V6 => "REJECT --reject-with icmp6-port-unreachable",
    }
}

/// What every part of one Service port's rendering needs: its names, frontends, sets and
/// the node facts, gathered once.
struct UnitCx<'a> {
    node: &'a NodeContext,
    family: IpFamily,
    spn: &'a ServicePortName,
    /// The Service port as comments spell it (`ns/name:port`).
    name: String,
    ext_chain: String,
    fw_chain: String,
    fes: Vec<(FrontendKey, &'a Frontend)>,
    sets: BTreeMap<&'a BackendSetId, &'a BackendSet>,
    /// kube-proxy's local detector: the first cluster CIDR of the family.
    cluster_cidr: Option<String>,
    affinity: Option<u32>,
    /// The first external frontend: it decides the `KUBE-EXT-` chain.
    ext_fe: Option<&'a Frontend>,
    /// "usesExternalTrafficChain := hasEndpoints && svcInfo.ExternallyAccessible()"
    uses_ext: bool,
    /// The source ranges of the first firewalled load balancer frontend.
    fw_ranges: Vec<IpNet>,
    /// Whether a `KUBE-FW-` chain is rendered.
    uses_fw: bool,
}

impl<'a> UnitCx<'a> {
    fn new(
        plan: &'a Plan,
        family: IpFamily,
        spn: &'a ServicePortName,
        keys: &[FrontendKey],
        set_ids: &'a [BackendSetId],
    ) -> UnitCx<'a> {
        let node = plan.node();
        let style = node.chain_ids;
        let hash = spn.chain_hash(style);
        let fes: Vec<(FrontendKey, &Frontend)> = keys
            .iter()
            .filter_map(|k| plan.frontend(k).map(|f| (*k, f.as_ref())))
            .collect();
        let sets = set_ids
            .iter()
            .filter_map(|id| plan.backend_set(id).map(|s| (id, s.as_ref())))
            .collect();
        let cluster_cidr = node
            .cluster_cidrs
            .iter()
            .find(|n| {
                matches!(
                    (n, family),
                    (IpNet::V4(_), IpFamily::V4) | (IpNet::V6(_), IpFamily::V6)
                )
            })
            .map(|n| n.trunc().to_string());
        let affinity = fes.iter().find_map(|(_, f)| f.affinity_timeout);
        let ext_fe = fes
            .iter()
            .find(|(k, _)| k.kind.is_external())
            .map(|(_, f)| *f);
        let fw_ranges: Vec<IpNet> = fes
            .iter()
            .find(|(k, f)| k.kind == FrontendKind::LoadBalancer && !f.source_ranges.is_empty())
            .map(|(_, f)| f.source_ranges.clone())
            .unwrap_or_default();
        let mut cx = UnitCx {
            node,
            family,
            spn,
            name: spn.spelled(style),
            ext_chain: format!("KUBE-EXT-{hash}"),
            fw_chain: format!("KUBE-FW-{hash}"),
            fes,
            sets,
            cluster_cidr,
            affinity,
            ext_fe,
            uses_ext: false,
            fw_ranges,
            uses_fw: false,
        };
        cx.uses_ext = ext_fe.is_some_and(|f| {
            cx.usable(&f.backends).is_some()
                || f.local_shortcut
                    .as_ref()
                    .is_some_and(|s| cx.usable(s).is_some())
        });
        cx.uses_fw = cx.uses_ext && !cx.fw_ranges.is_empty();
        cx
    }

    /// A set with no endpoint that can take a new connection gets no chain; its frontends
    /// REJECT or DROP in the filter table instead.
    fn usable(&self, id: &BackendSetId) -> Option<&'a BackendSet> {
        self.sets.get(id).copied().filter(|s| !s.is_empty())
    }
}

/// Renders one Service port's chains and shared rules from its frontends and sets.
///
/// The plan gives all external frontends of a Service port the same backend set, shortcut
/// and masquerading, and all its load balancer frontends the same source ranges, so the
/// first such frontend decides the `KUBE-EXT-` and `KUBE-FW-` chains (one each per Service
/// port, as in kube-proxy).
fn render_unit(
    plan: &Plan,
    family: IpFamily,
    spn: &ServicePortName,
    keys: Vec<FrontendKey>,
    set_ids: Vec<BackendSetId>,
) -> Unit {
    let cx = UnitCx::new(plan, family, spn, &keys, &set_ids);
    let mut shared: [Vec<String>; SHARED] = Default::default();
    // Chains of the referenced, usable sets, in id order; first the cluster IP masquerade
    // rules that the frontends put there.
    let mut set_rules: BTreeMap<&BackendSetId, Vec<String>> = BTreeMap::new();
    for (_, f) in &cx.fes {
        for id in std::iter::once(&f.backends).chain(f.local_shortcut.as_ref()) {
            if cx.usable(id).is_some() {
                set_rules.entry(id).or_default();
            }
        }
    }
    for (k, f) in &cx.fes {
        frontend_rules(&cx, k, f, &mut shared, &mut set_rules);
    }
    let mut chains: Vec<(String, Vec<String>)> = Vec::new();
    let mut seps: Vec<(String, &PlanEndpoint)> = Vec::new();
    let mut sep_names: BTreeSet<String> = BTreeSet::new();
    for (id, rules) in set_rules {
        let Some(set) = cx.usable(id) else { continue };
        let (rules, live) = service_chain(&cx, set, rules);
        for (sep, ep) in live {
            if sep_names.insert(sep.clone()) {
                seps.push((sep, ep));
            }
        }
        chains.push((set_chain(set), rules));
    }
    if cx.uses_ext
        && let Some(f) = cx.ext_fe
    {
        chains.push((cx.ext_chain.clone(), external_chain(&cx, f)));
    }
    if cx.uses_fw {
        chains.push((cx.fw_chain.clone(), firewall_chain(&cx)));
    }
    for (sep, ep) in seps {
        let rules = endpoint_chain(&cx, &sep, ep);
        chains.push((sep, rules));
    }
    Unit {
        frontends: keys,
        sets: set_ids,
        chains,
        shared,
    }
}

/// One frontend's rules in the shared chains: the jump from `KUBE-SERVICES` or
/// `KUBE-NODEPORTS` to its chain, and its REJECT or DROP in the filter table when it has
/// no usable endpoint; a cluster IP's masquerade rule goes first in its set's chain.
fn frontend_rules<'a>(
    cx: &UnitCx<'a>,
    k: &FrontendKey,
    f: &'a Frontend,
    shared: &mut [Vec<String>; SHARED],
    set_rules: &mut BTreeMap<&'a BackendSetId, Vec<String>>,
) {
    let name = &cx.name;
    let target = cx.usable(&f.backends);
    let (empty_comment, empty_target) = match f.on_empty {
        EmptyAction::Reject => (format!("{name} has no endpoints"), reject_target(cx.family)),
        EmptyAction::Drop => (format!("{name} has no local endpoints"), "DROP"),
    };
    let addr = host(k.addr);
    let to_frontend = || Rule::new().dst(&addr).proto(k.protocol);
    let empty_rule = || {
        to_frontend()
            .comment(&empty_comment)
            .dport(k.protocol, k.port)
            .jump(empty_target)
    };
    let nat_rule = |comment: &str, chain: &str| {
        to_frontend()
            .comment(comment)
            .dport(k.protocol, k.port)
            .jump(chain)
    };
    match k.kind {
        FrontendKind::ClusterIp => match target {
            Some(s) => {
                let comment = format!("{name} cluster IP");
                let masq = match (f.masquerade, &cx.cluster_cidr) {
                    (Masquerade::Always, _) => Some(Rule::new()),
                    // Off-cluster traffic to a cluster IP "might bounce off-node, we
                    // masquerade here".
                    (Masquerade::OffCluster, Some(cidr)) => Some(Rule::new().src(true, cidr)),
                    _ => None,
                };
                if let Some(r) = masq {
                    let rule = r
                        .dst(&addr)
                        .proto(k.protocol)
                        .comment(&comment)
                        .dport(k.protocol, k.port)
                        .jump(MARK_MASQ_CHAIN);
                    set_rules.entry(&f.backends).or_default().push(rule);
                }
                shared[NAT_SERVICES].push(nat_rule(&comment, &set_chain(s)));
            }
            None => shared[FILTER_SERVICES].push(empty_rule()),
        },
        FrontendKind::ExternalIp => {
            if cx.uses_ext {
                shared[NAT_SERVICES].push(nat_rule(&format!("{name} external IP"), &cx.ext_chain));
            }
            if target.is_none() {
                shared[FILTER_EXTERNAL].push(empty_rule());
            }
        }
        FrontendKind::LoadBalancer => {
            if cx.uses_ext {
                let firewalled = cx.uses_fw && !f.source_ranges.is_empty();
                let chain = if firewalled {
                    &cx.fw_chain
                } else {
                    &cx.ext_chain
                };
                shared[NAT_SERVICES].push(nat_rule(&format!("{name} loadbalancer IP"), chain));
                if firewalled {
                    // "If the packet was able to reach the end of firewall chain, then it
                    // did not get DNATed, so it will match the KUBE-PROXY-FIREWALL rule."
                    shared[FILTER_FIREWALL].push(
                        to_frontend()
                            .comment(&format!("{name} traffic not accepted by {}", cx.fw_chain))
                            .dport(k.protocol, k.port)
                            .jump("DROP"),
                    );
                }
            }
            if target.is_none() {
                shared[FILTER_EXTERNAL].push(empty_rule());
            }
        }
        FrontendKind::NodePort => {
            if cx.uses_ext {
                shared[NAT_NODEPORTS].push(nat_rule(name, &cx.ext_chain));
            }
            if target.is_none() {
                shared[FILTER_EXTERNAL].push(empty_rule());
            }
        }
    }
}

/// A `KUBE-SVC-`/`KUBE-SVL-` chain after the rules already in it: with ClientIP affinity,
/// first a `recent` check per endpoint; then the probability cascade
/// p_i = w_i / sum_{j >= i} w_j, the last live endpoint taking the rest. Drained (zero
/// weight) endpoints get no rule at all. Also returns the live endpoints' `KUBE-SEP-`
/// chains.
fn service_chain<'a>(
    cx: &UnitCx<'_>,
    set: &'a BackendSet,
    mut rules: Vec<String>,
) -> (Vec<String>, Vec<(String, &'a PlanEndpoint)>) {
    let name = &cx.name;
    let style = cx.node.chain_ids;
    let live: Vec<(&PlanEndpoint, String, Probability)> = set
        .endpoints
        .iter()
        .zip(set.probabilities())
        .filter(|(e, _)| e.weight > 0)
        .map(|(e, p)| (e, format!("KUBE-SEP-{}", set.endpoint_chain(style, e)), p))
        .collect();
    if let Some(t) = cx.affinity {
        for (ep, sep, _) in &live {
            rules.push(
                Rule::new()
                    .comment(&format!("{name} -> {}", ep.addr))
                    .raw(&format!(
                        "-m recent --rcheck --seconds {t} --reap --name {sep} --mask {} --rsource",
                        recent_mask(cx.family)
                    ))
                    .jump(sep),
            );
        }
    }
    for (ep, sep, p) in &live {
        let r = Rule::new().comment(&format!("{name} -> {}", ep.addr));
        let r = if p.is_one() {
            r
        } else {
            r.raw(&format!(
                "-m statistic --mode random --probability {}",
                p.to_decimal(10)
            ))
        };
        rules.push(r.jump(sep));
    }
    let seps = live.into_iter().map(|(ep, sep, _)| (sep, ep)).collect();
    (rules, seps)
}

/// The `KUBE-EXT-` chain: masquerade external traffic as the frontend says, send pods' and
/// the node's own traffic to the local shortcut when there is one, then the rest to the
/// frontend's set.
fn external_chain(cx: &UnitCx<'_>, f: &Frontend) -> Vec<String> {
    let name = &cx.name;
    let mut rules = Vec::new();
    let masq_comment = format!("masquerade traffic for {name} external destinations");
    match (f.masquerade, &cx.cluster_cidr) {
        (Masquerade::Always, _) => {
            rules.push(Rule::new().comment(&masq_comment).jump(MARK_MASQ_CHAIN));
        }
        (Masquerade::OffCluster, Some(cidr)) => rules.push(
            Rule::new()
                .src(true, cidr)
                .comment(&masq_comment)
                .jump(MARK_MASQ_CHAIN),
        ),
        _ => {}
    }
    if let Some(s) = f.local_shortcut.as_ref().and_then(|id| cx.usable(id)) {
        let short = set_chain(s);
        // "Treat all locally-originated pod -> external destination traffic as a
        // special-case. It is subject to neither form of traffic policy."
        if let Some(cidr) = &cx.cluster_cidr {
            rules.push(
                Rule::new()
                    .src(false, cidr)
                    .comment(&format!("pod traffic for {name} external destinations"))
                    .jump(&short),
            );
        }
        // "Locally originated traffic (not a pod, but the host node) still needs
        // masquerade because the LBIP itself is a local address."
        rules.push(
            Rule::new()
                .comment(&format!(
                    "masquerade LOCAL traffic for {name} external destinations"
                ))
                .raw("-m addrtype --src-type LOCAL")
                .jump(MARK_MASQ_CHAIN),
        );
        rules.push(
            Rule::new()
                .comment(&format!(
                    "route LOCAL traffic for {name} external destinations"
                ))
                .raw("-m addrtype --src-type LOCAL")
                .jump(&short),
        );
    }
    if let Some(t) = cx.usable(&f.backends) {
        rules.push(Rule::new().jump(&set_chain(t)));
    }
    rules
}

/// The `KUBE-FW-` chain: `loadBalancerSourceRanges` (and the node's own load balancer
/// addresses, when a range holds a node IP) go on to `KUBE-EXT-`; the rest falls through
/// to `KUBE-PROXY-FIREWALL`'s DROP.
fn firewall_chain(cx: &UnitCx<'_>) -> Vec<String> {
    let name = &cx.name;
    let mut rules = Vec::new();
    let comment = format!("{name} loadbalancer IP");
    for range in &cx.fw_ranges {
        rules.push(
            Rule::new()
                .src(false, &range.trunc().to_string())
                .comment(&comment)
                .jump(&cx.ext_chain),
        );
    }
    // "For VIP-like LBs, the VIP is often added as a local address ... a request from
    // a node to the VIP will ... loop back with the source IP set to the VIP."
    let allow_from_node = cx
        .fw_ranges
        .iter()
        .any(|n| cx.node.node_ips.iter().any(|ip| n.contains(ip)));
    if allow_from_node {
        for (k, f) in &cx.fes {
            if k.kind == FrontendKind::LoadBalancer && !f.source_ranges.is_empty() {
                rules.push(
                    Rule::new()
                        .src(false, &host(k.addr))
                        .comment(&comment)
                        .jump(&cx.ext_chain),
                );
            }
        }
    }
    rules.push(
        Rule::new()
            .comment(&format!(
                "other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"
            ))
            .end(),
    );
    rules
}

/// A `KUBE-SEP-` chain: hairpin masquerade, the affinity mark, and the DNAT.
fn endpoint_chain(cx: &UnitCx<'_>, sep: &str, ep: &PlanEndpoint) -> Vec<String> {
    let name = &cx.name;
    let protocol = cx.spn.protocol;
    // Hairpin: an endpoint reaching itself through the Service is masqueraded, or it
    // would answer itself directly.
    let hairpin = Rule::new()
        .src(false, &host(ep.addr.ip()))
        .comment(name)
        .jump(MARK_MASQ_CHAIN);
    let mut r = Rule::new().proto(protocol).comment(name);
    if cx.affinity.is_some() {
        r = r.raw(&format!(
            "-m recent --set --name {sep} --mask {} --rsource",
            recent_mask(cx.family)
        ));
    }
    let dnat = r
        .raw(&format!("-m {}", protocol.as_lower()))
        .jump(&format!("DNAT --to-destination {}", ep.addr));
    vec![hairpin, dnat]
}

fn borrow(changes: &[Change]) -> Vec<Item<'_>> {
    changes
        .iter()
        .map(|(t, c, r)| {
            (
                *t,
                c.as_str(),
                r.as_ref().map(|r| r.iter().map(String::as_str).collect()),
            )
        })
        .collect()
}

/// Builds restore text: per table, declarations, rules, deletions, `COMMIT`.
/// Where a chain goes in [`Ruleset::full_restore_batched`]: after every chain it jumps to.
fn dependency_rank(chain: &str) -> u8 {
    const ORDER: [&str; 7] = [
        "KUBE-MARK-",
        "KUBE-SEP-",
        "KUBE-SVC-",
        "KUBE-SVL-",
        "KUBE-EXT-",
        "KUBE-FW-",
        "KUBE-NODEPORTS",
    ];
    ORDER
        .iter()
        .position(|p| chain.starts_with(p))
        .map_or(u8::MAX, |i| i as u8)
}

fn restore_text(items: &[Item<'_>]) -> String {
    let size: usize = items
        .iter()
        .map(|(_, c, r)| {
            2 * c.len()
                + 16
                + r.iter()
                    .flatten()
                    .map(|l| l.len() + c.len() + 5)
                    .sum::<usize>()
        })
        .sum();
    let mut out = String::with_capacity(size + 32);
    for table in Table::ALL {
        let items: Vec<&Item<'_>> = items.iter().filter(|(t, _, _)| *t == table).collect();
        if items.is_empty() {
            continue;
        }
        out.push('*');
        out.push_str(table.as_str());
        out.push('\n');
        for (_, name, _) in &items {
            out.push(':');
            out.push_str(name);
            out.push_str(" - [0:0]\n");
        }
        for (_, name, rules) in &items {
            for r in rules.iter().flatten() {
                out.push_str("-A ");
                out.push_str(name);
                out.push(' ');
                out.push_str(r);
                out.push('\n');
            }
        }
        for (_, name, rules) in &items {
            if rules.is_none() {
                out.push_str("-X ");
                out.push_str(name);
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}
