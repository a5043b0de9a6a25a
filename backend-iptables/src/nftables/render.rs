//! Renders a [`Plan`] as `nft -f` transactions in kube-proxy's nftables layout.
//!
//! A [`Ruleset`] is everything svcnat owns in one address family: the table `ip svcnat` (or
//! `ip6 svcnat`) with its base chains, dispatch chains, verdict maps and sets, and per
//! Service port its own chains, map elements and affinity sets. As in the iptables dialect
//! it is kept as one **unit** per Service port, so [`Ruleset::update`] re-renders only the
//! Service ports a [`PlanDiff`] touches and returns a transaction that changes only their
//! chains and the map elements whose verdict changed.
//!
//! The layout follows kube-proxy's nftables proxier (`pkg/proxy/nftables/proxier.go`):
//!
//! - `services` (jumped to from `nat-prerouting` and `nat-output`) dispatches every
//!   Service with one lookup: `ip daddr . meta l4proto . th dport vmap @service-ips` for
//!   cluster, external and load balancer IPs, and for the node's NodePort addresses
//!   (`@nodeport-ips`) `meta l4proto . th dport vmap @service-nodeports`. An element jumps
//!   (`goto`) to the Service port's `service-` chain (or `local-` for
//!   `internalTrafficPolicy: Local`) or, for external destinations, its `external-` chain.
//! - `external-` masquerades (`externalTrafficPolicy: Cluster`), or for `Local` sends pod
//!   and node traffic to the cluster-wide chain and the rest to the local one.
//! - A `service-`/`local-` chain marks off-cluster traffic to its cluster IP for
//!   masquerading, then chooses an endpoint and DNATs to it.
//! - Services without usable endpoints are in `no-endpoint-services` /
//!   `no-endpoint-nodeports`, looked up from `endpoints-check` in the filter hooks, whose
//!   verdict is `goto reject-chain` (no endpoints at all) or `drop` (a `Local` policy with
//!   endpoints elsewhere only).
//! - `loadBalancerSourceRanges`: `firewall-check` (filter prerouting, before DNAT) looks the
//!   load balancer IP up in `firewall-ips` and goes to the Service port's `firewall-` chain,
//!   which returns for the allowed ranges and drops the rest.
//! - Masquerading: `mark-for-masquerade` sets mark 0x4000; `masquerading` (nat postrouting)
//!   masquerades marked packets (`fully-random`) and clears the bit.
//! - ClientIP affinity: one set per endpoint (`affinity-`), `flags dynamic,timeout`, holding
//!   the client addresses sent there; a client found in one goes to that endpoint again,
//!   and each choice refreshes its entry.
//!
//! Where svcnat departs from kube-proxy's rendering, for speed at scale, with the same
//! semantics:
//!
//! - **No anonymous sets.** kube-proxy chooses an endpoint with `numgen random mod N vmap
//!   { 0 : goto endpoint-a, ... }`: one anonymous set per Service port. The kernel looks an
//!   anonymous set up by its transaction id, walking the whole transaction, and names it by
//!   scanning every set of the table, so a transaction that creates many is quadratic
//!   (measured on Linux 6.18: 10,000 Services x 5 endpoints took 60 s in one transaction,
//!   and 5.8 s with the choice below). svcnat writes the choice as an exact integer
//!   cascade: endpoint i (of those with a nonzero weight) is taken when `numgen random mod
//!   R_i < w_i`, R_i being the sum of the weights from i on, the last one unconditionally;
//!   P(i) = w_i / R_0 exactly, weights included (iptables' `--probability` can only
//!   approximate it). Firewall ranges are rules too, never anonymous sets.
//! - **No per-endpoint chains.** The DNAT is in the rule that chooses the endpoint, so a
//!   Service port is one chain instead of 1 + N, which halves the transaction (10,000 x 5:
//!   50,000 fewer chains). Hairpin traffic (an endpoint reaching itself through its Service)
//!   is masqueraded in `masquerading` instead: `ct status dnat ip saddr . ip daddr
//!   @hairpin`, where `hairpin` holds `ip . ip` for every endpoint address, which is the
//!   same condition as kube-proxy's `ip saddr <endpoint> jump mark-for-masquerade` in the
//!   endpoint chain once the DNAT is done.
//!
//! Names are kube-proxy's: `service-ULMVA6XW-ns1/svc1/tcp/p80` (the first 8 characters of
//! base32(sha256) of `namespace/name/protocol/port`, then that string), `local-`,
//! `external-`, `firewall-`, and `affinity-` over `...__ip/port` (IPv6 colons as dots).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::owned::owned_after;
use ipnet::IpNet;
use svcnat_core::model::IpFamily;
use svcnat_core::plan::{
    BackendSet, BackendSetId, EmptyAction, Frontend, FrontendKey, FrontendKind, Locality,
    Masquerade, NodeContext, Op, Plan, PlanDiff, PlanEndpoint, ServicePortName, chain_hash,
};

/// The name of svcnat's table in each family (`ip svcnat`, `ip6 svcnat`).
pub const TABLE: &str = "svcnat";
/// The packet mark bit that asks `masquerading` to masquerade.
pub const MASQ_MARK: u32 = 0x4000;
/// The chain every Service lookup starts in.
pub const SERVICES_CHAIN: &str = "services";
/// Longest name the kernel takes for a chain or set (`NFT_NAME_MAXLEN` - 1).
const NAME_MAX: usize = 255;

/// A map or set that units fill with elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Map {
    /// `service-ips`: address . protocol . port -> the Service port's chain.
    ServiceIps,
    /// `service-nodeports`: protocol . port -> the Service port's `external-` chain.
    ServiceNodePorts,
    /// `no-endpoint-services`: address . protocol . port -> reject or drop.
    NoEndpointServices,
    /// `no-endpoint-nodeports`: protocol . port -> reject or drop.
    NoEndpointNodePorts,
    /// `firewall-ips`: load balancer address . protocol . port -> its `firewall-` chain.
    FirewallIps,
}

impl Map {
    /// Every map, in the order transactions write them.
    pub const ALL: [Map; 5] = [
        Map::ServiceIps,
        Map::ServiceNodePorts,
        Map::NoEndpointServices,
        Map::NoEndpointNodePorts,
        Map::FirewallIps,
    ];

    /// The map's name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Map::ServiceIps => "service-ips",
            Map::ServiceNodePorts => "service-nodeports",
            Map::NoEndpointServices => "no-endpoint-services",
            Map::NoEndpointNodePorts => "no-endpoint-nodeports",
            Map::FirewallIps => "firewall-ips",
        }
    }

    /// Whether the key starts with the destination address (else protocol . port).
    fn keyed_by_address(self) -> bool {
        !matches!(self, Map::ServiceNodePorts | Map::NoEndpointNodePorts)
    }

    fn comment(self) -> &'static str {
        match self {
            Map::ServiceIps => "ClusterIP, ExternalIP and LoadBalancer IP traffic",
            Map::ServiceNodePorts => "NodePort traffic",
            Map::NoEndpointServices => {
                "vmap to drop or reject packets to services with no endpoints"
            }
            Map::NoEndpointNodePorts => {
                "vmap to drop or reject packets to service nodeports with no endpoints"
            }
            Map::FirewallIps => "destinations that are subject to LoadBalancerSourceRanges",
        }
    }
}

/// The set of node addresses that serve NodePorts.
pub const NODEPORT_IPS_SET: &str = "nodeport-ips";
/// The set of `endpoint . endpoint` address pairs: hairpin traffic, masqueraded.
pub const HAIRPIN_SET: &str = "hairpin";

/// The base chains: (name, type, hook, priority). Priorities are numbers: `nft` accepts
/// the names `dstnat` (-100) and `srcnat` (100) only on some hooks.
const BASE_CHAINS: [(&str, &str, &str, &str); 8] = [
    // "We want our filtering rules to operate on pre-DNAT dest IPs, so our filter chains
    // have to run before DNAT": dstnat - 10.
    ("filter-prerouting", "filter", "prerouting", "-110"),
    ("filter-input", "filter", "input", "-110"),
    ("filter-forward", "filter", "forward", "-110"),
    ("filter-output", "filter", "output", "-110"),
    // The no-endpoints check of the node's own traffic runs after DNAT (dstnat + 10), as in
    // kube-proxy: the node reaching an external address of a `Local` Service without local
    // endpoints is short-circuited to the cluster-wide endpoints, not dropped.
    ("filter-output-post-dnat", "filter", "output", "-90"),
    ("nat-prerouting", "nat", "prerouting", "-100"),
    ("nat-output", "nat", "output", "-100"),
    ("nat-postrouting", "nat", "postrouting", "100"),
];

/// The regular chains every ruleset has, in declaration order.
const FIXED_CHAINS: [&str; 6] = [
    "endpoints-check",
    "firewall-check",
    "reject-chain",
    SERVICES_CHAIN,
    "mark-for-masquerade",
    "masquerading",
];

/// What one Service port renders in one address family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Unit {
    /// The frontends of this family that belong to the Service port, in key order.
    frontends: Vec<FrontendKey>,
    /// Its backend sets of this family, in id order.
    sets: Vec<BackendSetId>,
    /// Its own chains with their rules.
    chains: Vec<(String, Vec<String>)>,
    /// Its map elements: (map, key, verdict), one per (map, key).
    elements: Vec<(Map, String, String)>,
    /// Its affinity sets: (name, timeout in seconds).
    affinity: Vec<(String, u32)>,
    /// Addresses of the endpoints its chains DNAT to (hairpin pairs).
    endpoints: BTreeSet<IpAddr>,
}

impl Unit {
    fn chain(&self, name: &str) -> Option<&Vec<String>> {
        self.chains.iter().find(|(n, _)| n == name).map(|(_, r)| r)
    }
}

/// The complete svcnat-owned nftables state of one plan in one address family.
///
/// Two rulesets are equal when they render the same table; [`Ruleset::update`] keeps a
/// ruleset equal to [`Ruleset::new_for`] of the new plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    family: IpFamily,
    node: NodeContext,
    units: BTreeMap<ServicePortName, Unit>,
    /// Which unit holds a frontend key (to find the old owner when a key moves).
    owners: BTreeMap<FrontendKey, ServicePortName>,
    /// Per map and key, the units claiming it and their verdicts; the first one wins.
    claims: BTreeMap<(Map, String), BTreeMap<ServicePortName, String>>,
    /// Per endpoint address, how many units DNAT to it.
    hairpin: BTreeMap<IpAddr, usize>,
}

/// What a partial update changes, as an `nft -f` transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Update {
    /// The transaction text.
    pub text: String,
    /// Chains the transaction emptied and unreferenced; they are deleted by a later
    /// transaction (kernels before 6.2 notice a chain is unreferenced only some time after
    /// the map element pointing at it was deleted, as kube-proxy observed).
    pub gone_chains: Vec<String>,
    /// Rules written.
    pub rules: usize,
    /// Map and set elements added or deleted.
    pub elements: usize,
}

/// Commands of one transaction, in the order the kernel needs them: objects created,
/// chains flushed, rules, elements deleted then added, objects deleted.
#[derive(Default)]
struct Tx {
    create: Vec<String>,
    flush: Vec<String>,
    rules: Vec<String>,
    del_elements: BTreeMap<&'static str, Vec<String>>,
    add_elements: BTreeMap<&'static str, Vec<String>>,
    delete: Vec<String>,
    rule_count: usize,
}

impl Tx {
    fn rule(&mut self, t: &str, chain: &str, rule: &str) {
        self.rules.push(format!("add rule {t} {chain} {rule}"));
        self.rule_count += 1;
    }

    fn chain_rules(&mut self, t: &str, chain: &str, rules: &[String]) {
        for r in rules {
            self.rule(t, chain, r);
        }
    }

    fn element_count(&self) -> usize {
        self.del_elements.values().map(Vec::len).sum::<usize>()
            + self.add_elements.values().map(Vec::len).sum::<usize>()
    }

    fn is_empty(&self) -> bool {
        self.create.is_empty()
            && self.flush.is_empty()
            && self.rules.is_empty()
            && self.del_elements.is_empty()
            && self.add_elements.is_empty()
            && self.delete.is_empty()
    }

    fn text(&self, t: &str) -> String {
        let size: usize = [&self.create, &self.flush, &self.rules, &self.delete]
            .iter()
            .flat_map(|v| v.iter())
            .map(|l| l.len() + 1)
            .sum::<usize>()
            + self
                .add_elements
                .values()
                .chain(self.del_elements.values())
                .flatten()
                .map(|e| e.len() + 3)
                .sum::<usize>();
        let mut out = String::with_capacity(size + 256);
        for l in self.create.iter().chain(&self.flush).chain(&self.rules) {
            out.push_str(l);
            out.push('\n');
        }
        for (verb, groups) in [("delete", &self.del_elements), ("add", &self.add_elements)] {
            for (map, elements) in groups {
                // Element lists are written a few hundred per command, one per line, so an
                // error names the element's line.
                for chunk in elements.chunks(512) {
                    out.push_str(verb);
                    out.push_str(" element ");
                    out.push_str(t);
                    out.push(' ');
                    out.push_str(map);
                    out.push_str(" {\n");
                    for (i, e) in chunk.iter().enumerate() {
                        out.push('\t');
                        out.push_str(e);
                        if i + 1 < chunk.len() {
                            out.push(',');
                        }
                        out.push('\n');
                    }
                    out.push_str("}\n");
                }
            }
        }
        for l in &self.delete {
            out.push_str(l);
            out.push('\n');
        }
        out
    }
}

impl Ruleset {
    /// Renders the IPv4 table of a plan.
    pub fn new(plan: &Plan) -> Ruleset {
        Ruleset::new_for(plan, IpFamily::V4)
    }

    /// Renders the table of one address family (`ip svcnat` or `ip6 svcnat`).
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
        let mut rules = Ruleset {
            family,
            node: plan.node().clone(),
            units: BTreeMap::new(),
            owners: BTreeMap::new(),
            claims: BTreeMap::new(),
            hairpin: BTreeMap::new(),
        };
        for spn in names {
            let k = keys.remove(spn).unwrap_or_default();
            let s = sets.remove(spn).unwrap_or_default();
            for key in &k {
                rules.owners.insert(*key, spn.clone());
            }
            let unit = render_unit(plan, family, spn, k, s);
            rules.claim(spn, &unit);
            rules.units.insert(spn.clone(), unit);
        }
        rules
    }

    /// The address family of this table.
    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// The table as nft names it: `ip svcnat` or `ip6 svcnat`.
    pub fn table(&self) -> String {
        table_of(self.family)
    }

    /// Every chain of the table: base chains, fixed chains, then the units' chains.
    pub fn chains(&self) -> impl Iterator<Item = &str> {
        BASE_CHAINS
            .iter()
            .map(|(n, ..)| *n)
            .chain(FIXED_CHAINS)
            .chain(
                self.units
                    .values()
                    .flat_map(|u| u.chains.iter().map(|(n, _)| n.as_str())),
            )
    }

    /// Every affinity set of the table.
    pub fn affinity_sets(&self) -> impl Iterator<Item = &str> {
        self.units
            .values()
            .flat_map(|u| u.affinity.iter().map(|(n, _)| n.as_str()))
    }

    /// Service ports (units) in the table.
    pub fn unit_count(&self) -> usize {
        self.units.len()
    }

    /// Number of rules in the table.
    pub fn rule_count(&self) -> usize {
        self.fixed_rules()
            .iter()
            .map(|(_, r)| r.len())
            .sum::<usize>()
            + self
                .units
                .values()
                .flat_map(|u| u.chains.iter())
                .map(|(_, r)| r.len())
                .sum::<usize>()
    }

    /// Number of map and set elements in the table.
    pub fn element_count(&self) -> usize {
        self.claims.len() + self.hairpin.len() + self.nodeport_ips().len()
    }

    /// The whole table as one transaction that replaces whatever svcnat's table holds:
    /// creates what is missing, flushes every rule (`flush table`) and every map and set
    /// except the affinity sets (their entries are the clients' affinity), and writes
    /// everything. Chains and affinity sets of the table that this ruleset does not have
    /// (from `existing`, as listed from the kernel) are deleted too: affinity sets at once,
    /// chains (emptied by the flush) returned in [`Update::gone_chains`] to be deleted by a
    /// later transaction.
    pub fn full_transaction(&self, existing: &Listing) -> Update {
        let t = self.table();
        let mut tx = Tx::default();
        let gone_chains = self.replace_fixed(existing, &mut tx);
        for u in self.units.values() {
            unit_objects(&mut tx, &t, addr_type(self.family), u, true);
        }
        for u in self.units.values() {
            for (c, r) in &u.chains {
                tx.chain_rules(&t, c, r);
            }
        }
        self.all_elements(&mut tx);
        Update {
            text: tx.text(&t),
            gone_chains,
            rules: tx.rule_count,
            elements: tx.element_count(),
        }
    }

    /// What a full sync writes before the Service ports: the fixed objects, `flush table`,
    /// the maps and sets flushed, the fixed rules, the affinity sets of `existing` the plan
    /// no longer has deleted; returns the chains of `existing` the plan no longer has.
    fn replace_fixed(&self, existing: &Listing, tx: &mut Tx) -> Vec<String> {
        let t = self.table();
        self.fixed_objects(tx);
        tx.flush.push(format!("flush table {t}"));
        for m in Map::ALL {
            tx.flush.push(format!("flush map {t} {}", m.name()));
        }
        for s in [NODEPORT_IPS_SET, HAIRPIN_SET] {
            tx.flush.push(format!("flush set {t} {s}"));
        }
        self.fixed_contents(tx);
        let wanted_sets: BTreeSet<&str> = self.affinity_sets().collect();
        for s in &existing.sets {
            if is_affinity_set(s) && !wanted_sets.contains(s.as_str()) {
                tx.delete.push(format!("delete set {t} {s}"));
            }
        }
        let wanted: BTreeSet<&str> = self.chains().collect();
        existing
            .chains
            .iter()
            .filter(|c| !wanted.contains(c.as_str()))
            .cloned()
            .collect()
    }

    /// A full sync in several transactions, for a table too large for one batch: the first
    /// replaces the fixed part ([`Ruleset::full_transaction`]'s `flush table`, maps and
    /// sets flushed, fixed rules, node port addresses, affinity sets the plan no longer has
    /// deleted, gone chains named), then come [`Ruleset::cold_start_transactions`]'s blocks
    /// of at most about `max_units` Service ports. Each leaves a consistent table, but
    /// between the first and the last the Service ports not written yet are missing: one
    /// transaction ([`Ruleset::full_transaction`]) is the atomic form.
    pub fn full_transactions(&self, existing: &Listing, max_units: usize) -> Vec<Update> {
        let t = self.table();
        let mut tx = Tx::default();
        let gone_chains = self.replace_fixed(existing, &mut tx);
        let nodeports: Vec<String> = self
            .nodeport_ips()
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        if !nodeports.is_empty() {
            tx.add_elements.insert(NODEPORT_IPS_SET, nodeports);
        }
        let mut out = vec![Update {
            text: tx.text(&t),
            gone_chains,
            rules: tx.rule_count,
            elements: tx.element_count(),
        }];
        out.extend(self.cold_start_transactions(max_units).into_iter().skip(1));
        out
    }

    /// The whole table for a table that does not exist yet, as transactions of at most
    /// about `max_units` Service ports each, in dependency order: first the table, its
    /// fixed chains, maps and sets; then per block of Service ports their chains, rules,
    /// affinity sets and map elements. Every transaction leaves a consistent table (a map
    /// element is added with the chain it points at), and the Services not written yet
    /// simply are not there yet. A cold start thus never hands `nft` (and the kernel) one
    /// huge transaction, which keeps both time and `nft`'s memory in proportion to a block.
    pub fn cold_start_transactions(&self, max_units: usize) -> Vec<Update> {
        let t = self.table();
        let mut out = Vec::new();
        let mut tx = Tx::default();
        self.fixed_objects(&mut tx);
        self.fixed_contents(&mut tx);
        let nodeports: Vec<String> = self
            .nodeport_ips()
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        if !nodeports.is_empty() {
            tx.add_elements.insert(NODEPORT_IPS_SET, nodeports);
        }
        out.push(Update {
            text: tx.text(&t),
            gone_chains: Vec::new(),
            rules: tx.rule_count,
            elements: tx.element_count(),
        });
        let units: Vec<(&ServicePortName, &Unit)> = self.units.iter().collect();
        let mut seen_hairpin: BTreeSet<IpAddr> = BTreeSet::new();
        for block in units.chunks(max_units.max(1)) {
            let mut tx = Tx::default();
            for (_, u) in block {
                unit_objects(&mut tx, &t, addr_type(self.family), u, false);
                for (c, r) in &u.chains {
                    tx.chain_rules(&t, c, r);
                }
            }
            for (spn, u) in block {
                for (map, key, _) in &u.elements {
                    if let Some(v) = self.effective(*map, key)
                        && self.winner(*map, key) == Some(*spn)
                    {
                        tx.add_elements
                            .entry(map.name())
                            .or_default()
                            .push(format!("{key} : {v}"));
                    }
                }
                for ip in &u.endpoints {
                    if seen_hairpin.insert(*ip) {
                        tx.add_elements
                            .entry(HAIRPIN_SET)
                            .or_default()
                            .push(hairpin_element(*ip));
                    }
                }
            }
            out.push(Update {
                text: tx.text(&t),
                gone_chains: Vec::new(),
                rules: tx.rule_count,
                elements: tx.element_count(),
            });
        }
        out
    }

    /// The whole table as one text (what [`Ruleset::cold_start_transactions`] writes, in
    /// one piece): golden files, and `nft -c -f` checks.
    pub fn full_text(&self) -> String {
        self.cold_start_transactions(usize::MAX)
            .into_iter()
            .map(|u| u.text)
            .collect()
    }

    /// A transaction that deletes the table (it must exist).
    pub fn delete_transaction(family: IpFamily) -> String {
        let t = table_of(family);
        format!("delete table {t}\n")
    }

    /// Re-renders what `diff` (from the plan this ruleset was built from to `plan`)
    /// touches, patches `self`, and returns the transaction that changes only the chains
    /// whose rules changed, the affinity sets that came or went, and the map and set
    /// elements whose verdict changed; `None` when nothing changed in this family. A
    /// changed node context re-renders everything (and still writes only what differs).
    pub fn update(&mut self, plan: &Plan, diff: &PlanDiff) -> Option<Update> {
        if self.node != *plan.node() || diff.ops.iter().any(|op| matches!(op, Op::SetNode(_))) {
            let new = Ruleset::new_for(plan, self.family);
            let mut tx = Tx::default();
            let mut gone = Vec::new();
            let spns: BTreeSet<ServicePortName> =
                self.units.keys().chain(new.units.keys()).cloned().collect();
            let t = self.table();
            for spn in &spns {
                let empty = Unit::default();
                let old = self.units.get(spn).unwrap_or(&empty);
                let newu = new.units.get(spn).unwrap_or(&empty);
                unit_changes(&mut tx, &t, addr_type(self.family), old, newu, &mut gone);
            }
            self.element_changes(&new, &mut tx);
            *self = new;
            return finish(tx, &t, gone);
        }
        let family = self.family;
        let mut touched: BTreeMap<
            ServicePortName,
            (BTreeSet<FrontendKey>, BTreeSet<BackendSetId>),
        > = BTreeMap::new();
        for op in &diff.ops {
            match op {
                Op::SetNode(_) | Op::SetHealthCheck { .. } | Op::RemoveHealthCheck { .. } => {}
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
            }
        }
        if touched.is_empty() {
            return None;
        }
        let t = self.table();
        let mut tx = Tx::default();
        let mut gone = Vec::new();
        // Re-render the touched units first, then note the verdicts and hairpin pairs their
        // elements had before any claim moves (only those: the maps are not copied).
        let mut work: Vec<(ServicePortName, Unit, Unit)> = Vec::with_capacity(touched.len());
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
            work.push((spn, old, new));
        }
        let mut before: BTreeMap<(Map, String), Option<String>> = BTreeMap::new();
        let mut paired: BTreeMap<IpAddr, bool> = BTreeMap::new();
        for (_, old, new) in &work {
            for (m, k, _) in old.elements.iter().chain(&new.elements) {
                if let std::collections::btree_map::Entry::Vacant(e) = before.entry((*m, k.clone()))
                {
                    e.insert(self.effective(*m, k).map(str::to_string));
                }
            }
            for ip in old.endpoints.iter().chain(&new.endpoints) {
                paired
                    .entry(*ip)
                    .or_insert_with(|| self.hairpin.contains_key(ip));
            }
        }
        for (spn, old, new) in work {
            unit_changes(&mut tx, &t, addr_type(family), &old, &new, &mut gone);
            self.unclaim(&spn, &old);
            self.claim(&spn, &new);
            if !new.frontends.is_empty() || !new.sets.is_empty() {
                self.units.insert(spn, new);
            }
        }
        // Elements whose winning verdict changed.
        for ((m, k), was) in &before {
            let after = self.effective(*m, k);
            element_change(&mut tx, *m, k, was.as_deref(), after);
        }
        for (ip, was) in paired {
            let now = self.hairpin.contains_key(&ip);
            if was && !now {
                tx.del_elements
                    .entry(HAIRPIN_SET)
                    .or_default()
                    .push(hairpin_element(ip));
            } else if now && !was {
                tx.add_elements
                    .entry(HAIRPIN_SET)
                    .or_default()
                    .push(hairpin_element(ip));
            }
        }
        finish(tx, &t, gone)
    }

    /// The element changes from `self` to `new` (all maps and sets), for a re-render.
    fn element_changes(&self, new: &Ruleset, tx: &mut Tx) {
        let keys: BTreeSet<&(Map, String)> = self.claims.keys().chain(new.claims.keys()).collect();
        for (m, k) in keys {
            element_change(tx, *m, k, self.effective(*m, k), new.effective(*m, k));
        }
        let ips: BTreeSet<&IpAddr> = self.hairpin.keys().chain(new.hairpin.keys()).collect();
        for ip in ips {
            match (self.hairpin.contains_key(ip), new.hairpin.contains_key(ip)) {
                (true, false) => tx
                    .del_elements
                    .entry(HAIRPIN_SET)
                    .or_default()
                    .push(hairpin_element(*ip)),
                (false, true) => tx
                    .add_elements
                    .entry(HAIRPIN_SET)
                    .or_default()
                    .push(hairpin_element(*ip)),
                _ => {}
            }
        }
        let old_np: BTreeSet<IpAddr> = self.nodeport_ips().into_iter().collect();
        let new_np: BTreeSet<IpAddr> = new.nodeport_ips().into_iter().collect();
        for ip in old_np.difference(&new_np) {
            tx.del_elements
                .entry(NODEPORT_IPS_SET)
                .or_default()
                .push(ip.to_string());
        }
        for ip in new_np.difference(&old_np) {
            tx.add_elements
                .entry(NODEPORT_IPS_SET)
                .or_default()
                .push(ip.to_string());
        }
    }

    fn claim(&mut self, spn: &ServicePortName, u: &Unit) {
        for (m, k, v) in &u.elements {
            self.claims
                .entry((*m, k.clone()))
                .or_default()
                .insert(spn.clone(), v.clone());
        }
        for ip in &u.endpoints {
            *self.hairpin.entry(*ip).or_default() += 1;
        }
    }

    fn unclaim(&mut self, spn: &ServicePortName, u: &Unit) {
        for (m, k, _) in &u.elements {
            let key = (*m, k.clone());
            if let Some(c) = self.claims.get_mut(&key) {
                c.remove(spn);
                if c.is_empty() {
                    self.claims.remove(&key);
                }
            }
        }
        for ip in &u.endpoints {
            if let Some(n) = self.hairpin.get_mut(ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.hairpin.remove(ip);
                }
            }
        }
    }

    /// The verdict a map element has: the first claimant's (units in Service port order).
    fn effective(&self, m: Map, key: &str) -> Option<&str> {
        self.claims
            .get(&(m, key.to_string()))
            .and_then(|c| c.values().next())
            .map(String::as_str)
    }

    fn winner(&self, m: Map, key: &str) -> Option<&ServicePortName> {
        self.claims
            .get(&(m, key.to_string()))
            .and_then(|c| c.keys().next())
    }

    /// The node addresses of this family that serve NodePorts.
    fn nodeport_ips(&self) -> Vec<IpAddr> {
        self.node
            .nodeport_ips()
            .filter(|ip| IpFamily::of(ip) == self.family)
            .collect()
    }

    fn all_elements(&self, tx: &mut Tx) {
        for ((m, k), c) in &self.claims {
            if let Some(v) = c.values().next() {
                tx.add_elements
                    .entry(m.name())
                    .or_default()
                    .push(format!("{k} : {v}"));
            }
        }
        let hairpin: Vec<String> = self.hairpin.keys().map(|ip| hairpin_element(*ip)).collect();
        if !hairpin.is_empty() {
            tx.add_elements.insert(HAIRPIN_SET, hairpin);
        }
        let nodeports: Vec<String> = self
            .nodeport_ips()
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        if !nodeports.is_empty() {
            tx.add_elements.insert(NODEPORT_IPS_SET, nodeports);
        }
    }

    /// `add` commands for the table, its base and fixed chains, maps and sets (each a
    /// no-op when it exists).
    fn fixed_objects(&self, tx: &mut Tx) {
        let t = self.table();
        let addr = addr_type(self.family);
        tx.create.push(format!(
            "add table {t} {{ comment \"rules for svcnat, kube-proxy's nftables layout\"; }}"
        ));
        for (name, kind, hook, prio) in BASE_CHAINS {
            tx.create.push(format!(
                "add chain {t} {name} {{ type {kind} hook {hook} priority {prio}; }}"
            ));
        }
        for c in FIXED_CHAINS {
            tx.create.push(format!("add chain {t} {c}"));
        }
        tx.create.push(format!(
            "add set {t} {NODEPORT_IPS_SET} {{ type {addr}; comment \"IPs that accept NodePort traffic\"; }}"
        ));
        tx.create.push(format!(
            "add set {t} {HAIRPIN_SET} {{ type {addr} . {addr}; comment \"endpoint . endpoint: hairpin traffic, masqueraded\"; }}"
        ));
        for m in Map::ALL {
            let key = if m.keyed_by_address() {
                format!("{addr} . inet_proto . inet_service")
            } else {
                "inet_proto . inet_service".to_string()
            };
            tx.create.push(format!(
                "add map {t} {} {{ type {key} : verdict; comment \"{}\"; }}",
                m.name(),
                m.comment()
            ));
        }
    }

    /// The rules of the base and fixed chains.
    fn fixed_rules(&self) -> Vec<(&'static str, Vec<String>)> {
        let ip = ipx(self.family);
        let mark = format!("{MASQ_MARK:#x}");
        vec![
            (
                "filter-prerouting",
                vec!["ct state new jump firewall-check".into()],
            ),
            (
                "filter-input",
                vec!["ct state new jump endpoints-check".into()],
            ),
            (
                "filter-forward",
                vec![
                    // As the iptables dialect's KUBE-FORWARD: packets conntrack cannot
                    // place would otherwise leave un-NATed.
                    "ct state invalid drop".into(),
                    "ct state new jump endpoints-check".into(),
                ],
            ),
            (
                "filter-output",
                vec!["ct state new jump firewall-check".into()],
            ),
            (
                "filter-output-post-dnat",
                vec!["ct state new jump endpoints-check".into()],
            ),
            ("nat-prerouting", vec![format!("jump {SERVICES_CHAIN}")]),
            ("nat-output", vec![format!("jump {SERVICES_CHAIN}")]),
            ("nat-postrouting", vec!["jump masquerading".into()]),
            (
                "endpoints-check",
                vec![
                    format!(
                        "{ip} daddr . meta l4proto . th dport vmap @{}",
                        Map::NoEndpointServices.name()
                    ),
                    format!(
                        "{ip} daddr @{NODEPORT_IPS_SET} meta l4proto . th dport vmap @{}",
                        Map::NoEndpointNodePorts.name()
                    ),
                ],
            ),
            (
                "firewall-check",
                vec![format!(
                    "{ip} daddr . meta l4proto . th dport vmap @{}",
                    Map::FirewallIps.name()
                )],
            ),
            ("reject-chain", vec!["reject".into()]),
            (
                SERVICES_CHAIN,
                vec![
                    format!(
                        "{ip} daddr . meta l4proto . th dport vmap @{}",
                        Map::ServiceIps.name()
                    ),
                    format!(
                        "{ip} daddr @{NODEPORT_IPS_SET} meta l4proto . th dport vmap @{}",
                        Map::ServiceNodePorts.name()
                    ),
                ],
            ),
            (
                "mark-for-masquerade",
                vec![format!("meta mark set meta mark or {mark}")],
            ),
            (
                "masquerading",
                vec![
                    // Hairpin: the endpoint chosen is the client itself (see the module
                    // docs); kube-proxy marks this in the endpoint's chain.
                    format!(
                        "ct status dnat {ip} saddr . {ip} daddr @{HAIRPIN_SET} meta mark set meta mark or {mark}"
                    ),
                    format!("meta mark & {mark} == 0 return"),
                    format!("meta mark set meta mark xor {mark}"),
                    "masquerade fully-random".into(),
                ],
            ),
        ]
    }

    fn fixed_contents(&self, tx: &mut Tx) {
        let t = self.table();
        for (c, r) in self.fixed_rules() {
            tx.chain_rules(&t, c, &r);
        }
    }
}

/// Chains and affinity sets a table holds, as listed from the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Listing {
    /// Chain names.
    pub chains: BTreeSet<String>,
    /// Set and map names.
    pub sets: BTreeSet<String>,
}

impl Listing {
    /// An empty listing (nothing in the kernel, or nothing known).
    pub fn new() -> Listing {
        Listing::default()
    }
}

/// Whether a set name is one of the per-endpoint affinity sets.
pub fn is_affinity_set(name: &str) -> bool {
    name.starts_with("affinity-")
}

fn finish(tx: Tx, t: &str, gone: Vec<String>) -> Option<Update> {
    if tx.is_empty() {
        return None;
    }
    Some(Update {
        text: tx.text(t),
        gone_chains: gone,
        rules: tx.rule_count,
        elements: tx.element_count(),
    })
}

/// The commands that create a unit's chains and affinity sets; with `existing`, chains are
/// left for `flush table` to empty, else each is flushed after creation (a chain of that
/// name may be left from an earlier transaction, emptied but not yet deleted).
fn unit_objects(tx: &mut Tx, t: &str, addr: &str, u: &Unit, existing: bool) {
    for (c, _) in &u.chains {
        tx.create.push(format!("add chain {t} {c}"));
        if !existing {
            tx.flush.push(format!("flush chain {t} {c}"));
        }
    }
    for (s, timeout) in &u.affinity {
        tx.create.push(affinity_set(t, addr, s, *timeout));
    }
}

fn affinity_set(t: &str, addr: &str, name: &str, timeout: u32) -> String {
    format!("add set {t} {name} {{ type {addr}; flags dynamic,timeout; timeout {timeout}s; }}")
}

/// The chain and affinity set commands from one rendering of a unit to the next.
fn unit_changes(tx: &mut Tx, t: &str, addr: &str, old: &Unit, new: &Unit, gone: &mut Vec<String>) {
    for (name, rules) in &new.chains {
        match old.chain(name) {
            Some(r) if r == rules => {}
            Some(_) => {
                tx.flush.push(format!("flush chain {t} {name}"));
                tx.chain_rules(t, name, rules);
            }
            None => {
                tx.create.push(format!("add chain {t} {name}"));
                tx.flush.push(format!("flush chain {t} {name}"));
                tx.chain_rules(t, name, rules);
            }
        }
    }
    for (name, _) in &old.chains {
        if new.chain(name).is_none() {
            tx.flush.push(format!("flush chain {t} {name}"));
            gone.push(name.clone());
        }
    }
    let old_sets: BTreeMap<&str, u32> =
        old.affinity.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let new_sets: BTreeMap<&str, u32> =
        new.affinity.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    for (name, timeout) in &new_sets {
        match old_sets.get(name) {
            Some(o) if o == timeout => {}
            Some(_) => {
                // A set's timeout cannot be changed in place: a new set (and affinity
                // starts over, as it does when kube-proxy's timeout changes).
                tx.create.push(format!("delete set {t} {name}"));
                tx.create.push(affinity_set(t, addr, name, *timeout));
            }
            None => tx.create.push(affinity_set(t, addr, name, *timeout)),
        }
    }
    for name in old_sets.keys() {
        if !new_sets.contains_key(name) {
            tx.delete.push(format!("delete set {t} {name}"));
        }
    }
}

fn element_change(tx: &mut Tx, m: Map, key: &str, before: Option<&str>, after: Option<&str>) {
    if before == after {
        return;
    }
    if before.is_some() {
        tx.del_elements
            .entry(m.name())
            .or_default()
            .push(key.to_string());
    }
    if let Some(v) = after {
        tx.add_elements
            .entry(m.name())
            .or_default()
            .push(format!("{key} : {v}"));
    }
}

fn table_of(family: IpFamily) -> String {
    format!("{} {TABLE}", ipx(family))
}

fn ipx(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

fn addr_type(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4_addr",
        IpFamily::V6 => "ipv6_addr",
    }
}

fn hairpin_element(ip: IpAddr) -> String {
    format!("{ip} . {ip}")
}

/// kube-proxy's `hashAndTruncate`: the first 8 characters of base32(sha256(name)), a dash,
/// and the name, cut to fit behind a 16-character prefix.
fn hash_and_truncate(name: &str) -> String {
    let mut h = chain_hash(name);
    h.truncate(8);
    let mut s = format!("{h}-{name}");
    let max = NAME_MAX + 1 - 16;
    if s.len() > max {
        s.truncate(max - 3);
        s.push_str("...");
    }
    s
}

/// `namespace/name/protocol/port`, kube-proxy's base of a Service port's chain names.
fn service_port_base(spn: &ServicePortName) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{}/{}",
        spn.service.namespace,
        spn.service.name,
        spn.protocol.as_lower(),
        spn.port
    ))
}

fn endpoint_base(spn: &ServicePortName, ep: &PlanEndpoint) -> String {
    let ip = ep.addr.ip().to_string().replace(':', ".");
    hash_and_truncate(&format!(
        "{}/{}/{}/{}__{}/{}",
        spn.service.namespace,
        spn.service.name,
        spn.protocol.as_lower(),
        spn.port,
        ip,
        ep.addr.port()
    ))
}

/// The name of a Service port's cluster-wide chain: `service-` and kube-proxy's
/// `HASH-namespace/name/protocol/port`.
pub fn cluster_chain_name(spn: &ServicePortName) -> String {
    set_chain(&service_port_base(spn), Locality::Cluster)
}

fn set_chain(base: &str, locality: Locality) -> String {
    match locality {
        Locality::Cluster => format!("service-{base}"),
        Locality::Local => format!("local-{base}"),
    }
}

/// What every part of one Service port's rendering needs, gathered once.
struct UnitCx<'a> {
    node: &'a NodeContext,
    family: IpFamily,
    spn: &'a ServicePortName,
    base: String,
    fes: Vec<(FrontendKey, &'a Frontend)>,
    sets: BTreeMap<&'a BackendSetId, &'a BackendSet>,
    /// kube-proxy's local detector: the first cluster CIDR of the family.
    cluster_cidr: Option<String>,
    affinity: Option<u32>,
    /// The first external frontend: it decides the `external-` chain.
    ext_fe: Option<&'a Frontend>,
    /// "usesExternalTrafficChain := hasEndpoints && svcInfo.ExternallyAccessible()"
    uses_ext: bool,
    /// The source ranges of the first firewalled load balancer frontend.
    fw_ranges: Vec<IpNet>,
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
            base: service_port_base(spn),
            fes,
            sets,
            cluster_cidr,
            affinity,
            ext_fe,
            uses_ext: false,
            fw_ranges,
        };
        cx.uses_ext = ext_fe.is_some_and(|f| {
            cx.usable(&f.backends).is_some()
                || f.local_shortcut
                    .as_ref()
                    .is_some_and(|s| cx.usable(s).is_some())
        });
        cx
    }

    /// A set with no endpoint that can take a new connection gets no chain; its frontends
    /// are in the no-endpoint maps instead.
    fn usable(&self, id: &BackendSetId) -> Option<&'a BackendSet> {
        self.sets.get(id).copied().filter(|s| !s.is_empty())
    }

    fn chain_of(&self, s: &BackendSet) -> String {
        set_chain(&self.base, s.id.locality)
    }

    fn ext_chain(&self) -> String {
        format!("external-{}", self.base)
    }

    fn fw_chain(&self) -> String {
        format!("firewall-{}", self.base)
    }
}

/// Renders one Service port's chains, elements and affinity sets.
fn render_unit(
    plan: &Plan,
    family: IpFamily,
    spn: &ServicePortName,
    keys: Vec<FrontendKey>,
    set_ids: Vec<BackendSetId>,
) -> Unit {
    let cx = UnitCx::new(plan, family, spn, &keys, &set_ids);
    let ip = ipx(family);
    let mut elements: BTreeMap<(Map, String), String> = BTreeMap::new();
    // The chains of referenced, usable sets, first with the cluster IP masquerade rules.
    let mut set_rules: BTreeMap<&BackendSetId, Vec<String>> = BTreeMap::new();
    for (_, f) in &cx.fes {
        for id in std::iter::once(&f.backends).chain(f.local_shortcut.as_ref()) {
            if cx.usable(id).is_some() {
                set_rules.entry(id).or_default();
            }
        }
    }
    let uses_fw = cx.uses_ext && !cx.fw_ranges.is_empty();
    let proto = spn.protocol.as_lower();
    for (k, f) in &cx.fes {
        let target = cx.usable(&f.backends);
        let empty_verdict = match f.on_empty {
            EmptyAction::Reject => "goto reject-chain",
            EmptyAction::Drop => "drop",
        };
        let addr_key = format!("{} . {proto} . {}", k.addr, k.port);
        let port_key = format!("{proto} . {}", k.port);
        match k.kind {
            FrontendKind::ClusterIp => match target {
                Some(s) => {
                    let masq = match (f.masquerade, &cx.cluster_cidr) {
                        (Masquerade::Always, _) => Some(String::new()),
                        // Off-cluster traffic to a cluster IP "might bounce off-node, we
                        // masquerade here".
                        (Masquerade::OffCluster, Some(cidr)) => {
                            Some(format!(" {ip} saddr != {cidr}"))
                        }
                        _ => None,
                    };
                    if let Some(m) = masq {
                        set_rules.entry(&f.backends).or_default().push(format!(
                            "{ip} daddr {} {proto} dport {}{m} jump mark-for-masquerade",
                            k.addr, k.port
                        ));
                    }
                    elements.insert(
                        (Map::ServiceIps, addr_key),
                        format!("goto {}", cx.chain_of(s)),
                    );
                }
                None => {
                    elements.insert((Map::NoEndpointServices, addr_key), empty_verdict.into());
                }
            },
            FrontendKind::ExternalIp | FrontendKind::LoadBalancer => {
                if cx.uses_ext {
                    elements.insert(
                        (Map::ServiceIps, addr_key.clone()),
                        format!("goto {}", cx.ext_chain()),
                    );
                }
                if k.kind == FrontendKind::LoadBalancer && uses_fw && !f.source_ranges.is_empty() {
                    elements.insert(
                        (Map::FirewallIps, addr_key.clone()),
                        format!("goto {}", cx.fw_chain()),
                    );
                }
                if target.is_none() {
                    elements.insert((Map::NoEndpointServices, addr_key), empty_verdict.into());
                }
            }
            FrontendKind::NodePort => {
                // "For better or for worse, nodeports are not subject to
                // loadBalancerSourceRanges, and we can't change that."
                if cx.uses_ext {
                    elements.insert(
                        (Map::ServiceNodePorts, port_key.clone()),
                        format!("goto {}", cx.ext_chain()),
                    );
                }
                if target.is_none() {
                    elements.insert((Map::NoEndpointNodePorts, port_key), empty_verdict.into());
                }
            }
        }
    }
    let mut chains: Vec<(String, Vec<String>)> = Vec::new();
    let mut affinity: Vec<(String, u32)> = Vec::new();
    let mut endpoints: BTreeSet<IpAddr> = BTreeSet::new();
    for (id, rules) in set_rules {
        let Some(set) = cx.usable(id) else { continue };
        let rules = service_chain(&cx, set, rules, &mut affinity, &mut endpoints);
        chains.push((cx.chain_of(set), rules));
    }
    if cx.uses_ext
        && let Some(f) = cx.ext_fe
    {
        chains.push((cx.ext_chain(), external_chain(&cx, f)));
    }
    if uses_fw {
        chains.push((cx.fw_chain(), firewall_chain(&cx)));
    }
    affinity.sort();
    affinity.dedup();
    Unit {
        frontends: keys,
        sets: set_ids,
        chains,
        elements: elements.into_iter().map(|((m, k), v)| (m, k, v)).collect(),
        affinity,
        endpoints,
    }
}

/// A `service-`/`local-` chain after the rules already in it: with ClientIP affinity, first
/// one rule per endpoint for clients already in its affinity set; then the exact integer
/// cascade over the endpoints with a nonzero weight (see the module docs), each rule
/// recording affinity (when the Service has it) and DNATing. Drained (zero weight)
/// endpoints get no rule.
fn service_chain(
    cx: &UnitCx<'_>,
    set: &BackendSet,
    mut rules: Vec<String>,
    affinity: &mut Vec<(String, u32)>,
    endpoints: &mut BTreeSet<IpAddr>,
) -> Vec<String> {
    let ip = ipx(cx.family);
    let proto = cx.spn.protocol.as_lower();
    let live: Vec<&PlanEndpoint> = set.endpoints.iter().filter(|e| e.weight > 0).collect();
    let weights = exact_weights(&live.iter().map(|e| e.weight).collect::<Vec<_>>());
    let dnat = |ep: &PlanEndpoint| match ep.addr.ip() {
        IpAddr::V4(a) => format!("dnat ip to {a}:{}", ep.addr.port()),
        IpAddr::V6(a) => format!("dnat ip6 to [{a}]:{}", ep.addr.port()),
    };
    let sets: Vec<Option<String>> = live
        .iter()
        .map(|ep| {
            cx.affinity
                .map(|_| format!("affinity-{}", endpoint_base(cx.spn, ep)))
        })
        .collect();
    if let Some(t) = cx.affinity {
        for (ep, name) in live.iter().zip(&sets) {
            if let Some(name) = name {
                affinity.push((name.clone(), t));
                rules.push(format!(
                    "{ip} saddr @{name} meta l4proto {proto} update @{name} {{ {ip} saddr }} {}",
                    dnat(ep)
                ));
            }
        }
    }
    let mut rest: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    for ((ep, w), name) in live.iter().zip(&weights).zip(&sets) {
        endpoints.insert(ep.addr.ip());
        let mut r = format!("meta l4proto {proto}");
        if u64::from(*w) < rest {
            r.push_str(&format!(" numgen random mod {rest} < {w}"));
        }
        if let Some(name) = name {
            r.push_str(&format!(" update @{name} {{ {ip} saddr }}"));
        }
        r.push(' ');
        r.push_str(&dnat(ep));
        rules.push(r);
        rest -= u64::from(*w);
    }
    rules
}

/// Weights for `numgen random mod`, whose modulus is 32 bits: the weights themselves when
/// their sum fits, else scaled down (each nonzero weight stays at least 1).
fn exact_weights(w: &[u32]) -> Vec<u32> {
    let total: u64 = w.iter().map(|x| u64::from(*x)).sum();
    if total <= u64::from(u32::MAX) {
        return w.to_vec();
    }
    let k = total.div_ceil(u64::from(u32::MAX)).max(1);
    w.iter()
        .map(|x| u32::try_from((u64::from(*x) / k).max(1)).unwrap_or(u32::MAX))
        .collect()
}

/// The `external-` chain: masquerade external traffic as the frontend says, send pods' and
/// the node's own traffic to the cluster-wide set when there is a local shortcut, then the
/// rest to the frontend's set.
fn external_chain(cx: &UnitCx<'_>, f: &Frontend) -> Vec<String> {
    let ip = ipx(cx.family);
    let mut rules = Vec::new();
    match (f.masquerade, &cx.cluster_cidr) {
        (Masquerade::Always, _) => rules.push("jump mark-for-masquerade".to_string()),
        (Masquerade::OffCluster, Some(cidr)) => {
            rules.push(format!("{ip} saddr != {cidr} jump mark-for-masquerade"))
        }
        _ => {}
    }
    if let Some(s) = f.local_shortcut.as_ref().and_then(|id| cx.usable(id)) {
        let short = cx.chain_of(s);
        // "Treat all locally-originated pod -> external destination traffic as a
        // special-case. It is subject to neither form of traffic policy."
        if let Some(cidr) = &cx.cluster_cidr {
            rules.push(format!("{ip} saddr {cidr} goto {short}"));
        }
        // "Locally originated traffic (not a pod, but the host node) still needs
        // masquerade because the LBIP itself is a local address."
        rules.push("fib saddr type local jump mark-for-masquerade".to_string());
        rules.push(format!("fib saddr type local goto {short}"));
    }
    if let Some(t) = cx.usable(&f.backends) {
        rules.push(format!("goto {}", cx.chain_of(t)));
    }
    rules
}

/// The `firewall-` chain: `loadBalancerSourceRanges` (and the Service's load balancer
/// addresses when a range holds a node IP) return to the hook; the rest is dropped.
fn firewall_chain(cx: &UnitCx<'_>) -> Vec<String> {
    let ip = ipx(cx.family);
    let mut sources: Vec<String> = cx.fw_ranges.iter().map(|r| r.trunc().to_string()).collect();
    // "For VIP-like LBs, the VIP is often added as a local address ... a request from a
    // node to the VIP will ... loop back with the source IP set to the VIP."
    let allow_from_node = cx
        .fw_ranges
        .iter()
        .any(|n| cx.node.node_ips.iter().any(|a| n.contains(a)));
    if allow_from_node {
        for (k, f) in &cx.fes {
            if k.kind == FrontendKind::LoadBalancer && !f.source_ranges.is_empty() {
                sources.push(k.addr.to_string());
            }
        }
    }
    let mut rules: Vec<String> = sources
        .iter()
        .map(|s| format!("{ip} saddr {s} return"))
        .collect();
    rules.push("drop".to_string());
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kube_proxys() {
        // kube-proxy's proxier_test: "ns1/svc1/tcp/p80" hashes to ULMVA6XW.
        assert_eq!(
            hash_and_truncate("ns1/svc1/tcp/p80"),
            "ULMVA6XW-ns1/svc1/tcp/p80"
        );
    }

    #[test]
    fn cascade_weights_fit_in_32_bits() {
        assert_eq!(exact_weights(&[3, 1]), vec![3, 1]);
        let w = exact_weights(&[u32::MAX, u32::MAX, 1]);
        assert!(w.iter().map(|x| u64::from(*x)).sum::<u64>() <= u64::from(u32::MAX));
        assert_eq!(w[2], 1);
    }
}
