//! The neutral NAT plan: what every backend must program, and the difference between two
//! plans.
//!
//! A [`Plan`] is compiled for one node from a [`Cluster`] and a [`NodeContext`]. It holds
//! **frontends** keyed by (address, protocol, port, kind) and **backend sets** of weighted
//! endpoints. A frontend points at a backend set and carries what the datapath must do
//! around the translation: source ranges, ClientIP affinity, masquerading, and the verdict
//! when the set is empty (REJECT, or DROP for `Local` policies with endpoints elsewhere).
//! These are kube-proxy's semantics; the iptables, IPVS and userspace backends express them
//! in their own terms.
//!
//! [`Plan::diff`] gives the ordered, minimal list of operations from one plan to another
//! (create before reference, unlink before delete), and [`Plan::update`] recompiles only the
//! Services that changed and returns that same diff without comparing whole plans. Shared
//! entries are `Arc`s, so a diff after an incremental update skips unchanged Services by
//! pointer comparison.
//!
//! Identifiers are kube-proxy's: `KUBE-SVC-` + the first 16 characters of the base32 of
//! SHA-256 over the service port name and protocol, `KUBE-SEP-` over the same plus the
//! endpoint, so that rules rendered by svcnat can be compared with kube-proxy's.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::cluster::Generation;
use crate::model::*;
use crate::select;

/// How service port names are spelled in chain hashes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChainIdStyle {
    /// Current kube-proxy: `namespace/name` for an unnamed port, `namespace/name:port`
    /// otherwise.
    #[default]
    Current,
    /// kube-proxy before the port name became optional in the string: always
    /// `namespace/name:port`, so an unnamed port hashes `namespace/name:`. The lab's chain
    /// names (`KUBE-SVC-VIQHAVHDK4QE7NA4` for `instavote/vote`) come from this style.
    Legacy,
}

/// The node a plan is compiled for, and the proxy's settings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct NodeContext {
    /// This node's name (`--hostname-override`): decides which endpoints are local.
    pub node_name: String,
    /// This node's addresses.
    pub node_ips: Vec<IpAddr>,
    /// `--nodeport-addresses`: node addresses in these CIDRs serve NodePorts; empty means
    /// every address of the node (`node_ips` and `local_addresses`).
    pub nodeport_addresses: Vec<IpNet>,
    /// `--nodeport-addresses primary`: NodePorts only on `node_ips` (kube-proxy's
    /// recommended setting); `nodeport_addresses` and `local_addresses` are then ignored.
    pub nodeport_primary: bool,
    /// Every address of the node's interfaces, as the proxy reads them; with the default
    /// `nodeport_addresses`, NodePorts are served on all of them (IPv6 link-local ones
    /// excepted), as kube-proxy does.
    pub local_addresses: Vec<IpAddr>,
    /// `--iptables-localhost-nodeports`: NodePorts also answer on IPv4 loopback addresses
    /// in `local_addresses` (the node's `127.0.0.1`; the kernel needs `route_localnet`).
    /// IPv6 loopback never serves NodePorts, as in kube-proxy.
    pub localhost_nodeports: bool,
    /// `--cluster-cidr`: traffic from outside these ranges to a ClusterIP is masqueraded.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--masquerade-all`: masquerade all traffic to ClusterIPs.
    pub masquerade_all: bool,
    /// Spelling of chain hash inputs.
    pub chain_ids: ChainIdStyle,
}

impl NodeContext {
    /// A node with one address and the given cluster CIDR.
    pub fn new(
        node_name: impl Into<String>,
        node_ips: Vec<IpAddr>,
        cluster_cidrs: Vec<IpNet>,
    ) -> Self {
        NodeContext {
            node_name: node_name.into(),
            node_ips,
            nodeport_addresses: Vec::new(),
            nodeport_primary: false,
            local_addresses: Vec::new(),
            localhost_nodeports: false,
            cluster_cidrs,
            masquerade_all: false,
            chain_ids: ChainIdStyle::Current,
        }
    }

    /// The node addresses that serve NodePorts, each once: with `nodeport_primary` the
    /// `node_ips`; otherwise the `node_ips` and `local_addresses` inside
    /// `nodeport_addresses` (all of them when it is empty), the local addresses without
    /// IPv6 link-local ones, IPv6 loopback, and IPv4 loopback unless
    /// `localhost_nodeports`.
    pub fn nodeport_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let local: &[IpAddr] = if self.nodeport_primary {
            &[]
        } else {
            &self.local_addresses
        };
        let mut seen = std::collections::BTreeSet::new();
        let given = self.node_ips.iter().map(|ip| (*ip, true));
        given
            .chain(local.iter().map(|ip| (*ip, false)))
            .filter(move |&(ip, given)| {
                let allowed = given
                    || match ip {
                        IpAddr::V4(v4) => !v4.is_loopback() || self.localhost_nodeports,
                        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
                    };
                let in_range = self.nodeport_primary
                    || self.nodeport_addresses.is_empty()
                    || self.nodeport_addresses.iter().any(|n| n.contains(&ip));
                allowed && in_range && seen.insert(ip)
            })
            .map(|(ip, _)| ip)
    }
}

/// A Service port: the unit kube-proxy builds chains for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    /// The Service.
    pub service: ServiceName,
    /// The port's name (empty for a single unnamed port).
    pub port: String,
    /// The port's protocol.
    pub protocol: Protocol,
}

impl ServicePortName {
    /// The name as kube-proxy hashes and comments it.
    pub fn spelled(&self, style: ChainIdStyle) -> String {
        match (style, self.port.is_empty()) {
            (ChainIdStyle::Current, true) => self.service.to_string(),
            _ => format!("{}:{}", self.service, self.port),
        }
    }

    /// The 16-character hash of `KUBE-SVC-`, `KUBE-SVL-`, `KUBE-EXT-` and `KUBE-FW-` chains:
    /// base32(sha256(name + protocol)).
    pub fn chain_hash(&self, style: ChainIdStyle) -> String {
        chain_hash(&format!(
            "{}{}",
            self.spelled(style),
            self.protocol.as_lower()
        ))
    }

    /// The hash of an endpoint's `KUBE-SEP-` chain: base32(sha256(name + protocol + "ip:port")).
    pub fn endpoint_hash(&self, style: ChainIdStyle, ep: SocketAddr) -> String {
        chain_hash(&format!(
            "{}{}{}",
            self.spelled(style),
            self.protocol.as_lower(),
            ep
        ))
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spelled(ChainIdStyle::Current))
    }
}

/// kube-proxy's chain hash: the first 16 characters of the base32 of SHA-256.
pub fn chain_hash(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut s = data_encoding::BASE32.encode(&digest);
    s.truncate(16);
    s
}

/// Which endpoints a backend set holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Locality {
    /// Every usable endpoint in the cluster (`KUBE-SVC-*`).
    Cluster,
    /// Only endpoints on this node (`KUBE-SVL-*`).
    Local,
}

/// Identifies a backend set: a Service port, a locality and an address family.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSetId {
    /// The Service port.
    pub service_port: ServicePortName,
    /// Cluster-wide or node-local.
    pub locality: Locality,
    /// Address family of the endpoints (a dual-stack Service has one set per family).
    pub family: IpFamily,
}

/// An endpoint in a backend set.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PlanEndpoint {
    /// Address and target port.
    pub addr: SocketAddr,
    /// Selection weight; 0 means drained (kept for existing connections, never chosen).
    pub weight: u32,
    /// On this node.
    pub local: bool,
    /// Terminating but still serving: used only because no ready endpoint exists.
    pub terminating: bool,
    /// The node it runs on.
    pub node: Option<String>,
}

/// Weighted endpoints of one Service port, in address order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BackendSet {
    /// Identity.
    pub id: BackendSetId,
    /// The 16-character kube-proxy hash naming its chain.
    pub chain: String,
    /// Endpoints, sorted by address.
    pub endpoints: Vec<PlanEndpoint>,
}

impl BackendSet {
    /// Whether no endpoint can take a new connection.
    pub fn is_empty(&self) -> bool {
        self.endpoints.iter().all(|e| e.weight == 0)
    }

    /// The weights, in endpoint order.
    pub fn weights(&self) -> Vec<u32> {
        self.endpoints.iter().map(|e| e.weight).collect()
    }

    /// Per-rule probabilities of the iptables cascade, in endpoint order.
    pub fn probabilities(&self) -> Vec<select::Probability> {
        select::cascade(&self.weights())
    }

    /// The `KUBE-SEP-` hash of an endpoint of this set.
    pub fn endpoint_chain(&self, style: ChainIdStyle, ep: &PlanEndpoint) -> String {
        self.id.service_port.endpoint_hash(style, ep.addr)
    }
}

/// How a frontend's address is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    /// The Service's cluster IP.
    ClusterIp,
    /// A node address and node port.
    NodePort,
    /// One of `spec.externalIPs`.
    ExternalIp,
    /// A load balancer ingress IP.
    LoadBalancer,
}

impl FrontendKind {
    /// Whether traffic to it counts as external (externalTrafficPolicy applies).
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIp
    }

    /// A short name for renderings.
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Where traffic arrives: address, protocol, port and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    /// Destination address.
    pub addr: IpAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
    /// Kind.
    pub kind: FrontendKind,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} {}",
            SocketAddr::new(self.addr, self.port),
            self.protocol,
            self.kind.as_str()
        )
    }
}

/// When a frontend's traffic gets its source address rewritten to the node's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Masquerade {
    /// Never (the endpoint sees the client's address).
    Never,
    /// When the source is outside the cluster CIDRs.
    OffCluster,
    /// Always.
    Always,
}

/// What happens to a new connection when the target set is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EmptyAction {
    /// Refuse it (ICMP port unreachable / TCP RST): the Service has no endpoints at all.
    Reject,
    /// Drop it silently: `Local` policy, and the endpoints are on other nodes.
    Drop,
}

/// A frontend: where traffic arrives and what to do with it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frontend {
    /// The Service port it belongs to.
    pub service_port: ServicePortName,
    /// The backend set new connections go to.
    pub backends: BackendSetId,
    /// For `externalTrafficPolicy: Local`: traffic from pods or from the node itself goes
    /// to this cluster-wide set instead (kube-proxy's `KUBE-EXT-` short circuit).
    pub local_shortcut: Option<BackendSetId>,
    /// Source rewriting.
    pub masquerade: Masquerade,
    /// Allowed client ranges (`loadBalancerSourceRanges`); empty allows everyone.
    pub source_ranges: Vec<IpNet>,
    /// ClientIP affinity timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// Verdict when `backends` is empty.
    pub on_empty: EmptyAction,
}

/// A `healthCheckNodePort` to serve: load balancers probe it to find nodes with local
/// endpoints.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HealthCheck {
    /// The node port.
    pub port: u16,
    /// Ready local endpoint addresses (over all ports); the check passes when above zero.
    pub local_endpoints: usize,
}

/// Two Services claim one frontend key: the first by name wins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Conflict {
    /// The contested frontend.
    pub key: FrontendKey,
    /// The Service that has it.
    pub winner: ServiceName,
    /// The Service that was left out.
    pub loser: ServiceName,
}

#[derive(Clone, Debug, Default)]
struct Owned {
    frontends: Vec<FrontendKey>,
    sets: Vec<BackendSetId>,
}

/// What one Service contributes to a plan.
#[derive(Clone, Debug, Default)]
struct ServiceEntries {
    frontends: Vec<(FrontendKey, Frontend)>,
    sets: Vec<BackendSet>,
    health: Option<HealthCheck>,
}

/// The NAT plan of one node.
#[derive(Clone, Debug)]
pub struct Plan {
    node: NodeContext,
    frontends: BTreeMap<FrontendKey, Arc<Frontend>>,
    backend_sets: BTreeMap<BackendSetId, Arc<BackendSet>>,
    health_checks: BTreeMap<ServiceName, HealthCheck>,
    owned: BTreeMap<ServiceName, Owned>,
    conflicts: BTreeSet<Conflict>,
    /// The cluster history this plan reflects, for [`Plan::update`].
    basis: Option<Generation>,
}

impl PartialEq for Plan {
    fn eq(&self, other: &Self) -> bool {
        self.node == other.node
            && self.frontends == other.frontends
            && self.backend_sets == other.backend_sets
            && self.health_checks == other.health_checks
    }
}

impl Eq for Plan {}

impl Plan {
    /// A plan with nothing in it.
    pub fn empty(node: NodeContext) -> Plan {
        Plan {
            node,
            frontends: BTreeMap::new(),
            backend_sets: BTreeMap::new(),
            health_checks: BTreeMap::new(),
            owned: BTreeMap::new(),
            conflicts: BTreeSet::new(),
            basis: None,
        }
    }

    /// Compiles the plan of a node from the whole cluster.
    pub fn compile(cluster: &Cluster, node: &NodeContext) -> Plan {
        let mut plan = Plan::empty(node.clone());
        for svc in cluster.services() {
            let entries = compile_service(cluster, svc, node);
            plan.insert_entries(&svc.name, entries);
        }
        plan.basis = Some(cluster.generation());
        plan
    }

    /// The node context.
    pub fn node(&self) -> &NodeContext {
        &self.node
    }

    /// Frontends in key order.
    pub fn frontends(&self) -> impl Iterator<Item = (&FrontendKey, &Arc<Frontend>)> {
        self.frontends.iter()
    }

    /// A frontend by key.
    pub fn frontend(&self, key: &FrontendKey) -> Option<&Arc<Frontend>> {
        self.frontends.get(key)
    }

    /// Backend sets in id order.
    pub fn backend_sets(&self) -> impl Iterator<Item = (&BackendSetId, &Arc<BackendSet>)> {
        self.backend_sets.iter()
    }

    /// A backend set by id.
    pub fn backend_set(&self, id: &BackendSetId) -> Option<&Arc<BackendSet>> {
        self.backend_sets.get(id)
    }

    /// Health check ports by Service.
    pub fn health_checks(&self) -> impl Iterator<Item = (&ServiceName, &HealthCheck)> {
        self.health_checks.iter()
    }

    /// Frontend keys claimed by two Services (the later one by name was left out).
    pub fn conflicts(&self) -> impl Iterator<Item = &Conflict> {
        self.conflicts.iter()
    }

    /// The frontend that matches a packet's destination, any kind.
    pub fn lookup(
        &self,
        addr: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> Option<(&FrontendKey, &Arc<Frontend>)> {
        let lo = FrontendKey {
            addr,
            protocol,
            port,
            kind: FrontendKind::ClusterIp,
        };
        self.frontends
            .range(lo..)
            .next()
            .filter(|(k, _)| k.addr == addr && k.protocol == protocol && k.port == port)
    }

    /// The frontends of one Service (those it won), in key order.
    pub(crate) fn frontends_of_service(
        &self,
        service: &ServiceName,
    ) -> impl Iterator<Item = (&FrontendKey, &Arc<Frontend>)> {
        self.owned
            .get(service)
            .into_iter()
            .flat_map(|o| o.frontends.iter())
            .filter_map(|k| self.frontends.get_key_value(k))
    }

    /// Number of endpoints over all backend sets.
    pub fn endpoint_count(&self) -> usize {
        self.backend_sets.values().map(|s| s.endpoints.len()).sum()
    }

    fn insert_entries(&mut self, service: &ServiceName, entries: ServiceEntries) {
        let mut owned = Owned::default();
        for (key, fe) in entries.frontends {
            match self.frontends.get(&key) {
                Some(existing) if &existing.service_port.service != service => {
                    self.conflicts.insert(Conflict {
                        key,
                        winner: existing.service_port.service.clone(),
                        loser: service.clone(),
                    });
                }
                _ => {
                    owned.frontends.push(key);
                    self.frontends.insert(key, Arc::new(fe));
                }
            }
        }
        for set in entries.sets {
            owned.sets.push(set.id.clone());
            self.backend_sets.insert(set.id.clone(), Arc::new(set));
        }
        if let Some(h) = entries.health {
            self.health_checks.insert(service.clone(), h);
        }
        if !owned.frontends.is_empty() || !owned.sets.is_empty() {
            self.owned.insert(service.clone(), owned);
        }
    }

    fn remove_entries(&mut self, service: &ServiceName) {
        if let Some(owned) = self.owned.remove(service) {
            for k in owned.frontends {
                self.frontends.remove(&k);
            }
            for s in owned.sets {
                self.backend_sets.remove(&s);
            }
        }
        self.health_checks.remove(service);
        self.conflicts
            .retain(|c| &c.loser != service && &c.winner != service);
    }

    /// Brings the plan up to date with `cluster` and returns the diff from the previous
    /// plan: equals `Plan::diff(&old, &Plan::compile(cluster, node))`.
    ///
    /// When the plan was compiled from (or last updated with) the same cluster, only the
    /// Services its journal names as changed since then are recompiled, so the cost is in
    /// proportion to what changed, not to the cluster; otherwise (another cluster value, or
    /// a journal that forgot that far back) the whole plan is recompiled.
    #[must_use = "the diff is what a dataplane must apply"]
    pub fn update(&mut self, cluster: &Cluster) -> PlanDiff {
        let changed = self.basis.and_then(|basis| cluster.changed_since(basis));
        let diff = match changed {
            Some(changed) => self.update_services(cluster, changed),
            None => {
                let new = Plan::compile(cluster, &self.node);
                let diff = Plan::diff(self, &new);
                *self = new;
                diff
            }
        };
        self.basis = Some(cluster.generation());
        diff
    }

    /// Recompiles the named Services in place and returns the diff.
    fn update_services(&mut self, cluster: &Cluster, changed: BTreeSet<&ServiceName>) -> PlanDiff {
        let mut fresh: BTreeMap<&ServiceName, ServiceEntries> = BTreeMap::new();
        for name in &changed {
            let entries = cluster
                .service(name)
                .map(|svc| compile_service(cluster, svc, &self.node))
                .unwrap_or_default();
            fresh.insert(name, entries);
        }
        // Frontend keys contested between Services make the winner depend on every
        // claimant; that is rare, and then a full compile keeps the result exact.
        let contested = self
            .conflicts
            .iter()
            .any(|c| changed.contains(&c.winner) || changed.contains(&c.loser))
            || fresh.iter().any(|(name, e)| {
                e.frontends.iter().any(|(k, _)| {
                    self.frontends
                        .get(k)
                        .is_some_and(|f| &&f.service_port.service != name)
                })
            });
        if contested {
            let new = Plan::compile(cluster, &self.node);
            let diff = Plan::diff(self, &new);
            *self = new;
            return diff;
        }
        if changed.is_empty() {
            return PlanDiff::default();
        }
        let mut old_fe = BTreeMap::new();
        let mut old_sets = BTreeMap::new();
        let mut old_hc = BTreeMap::new();
        for name in &changed {
            if let Some(owned) = self.owned.get(*name) {
                for k in &owned.frontends {
                    if let Some(f) = self.frontends.get(k) {
                        old_fe.insert(*k, f.clone());
                    }
                }
                for s in &owned.sets {
                    if let Some(b) = self.backend_sets.get(s) {
                        old_sets.insert(s.clone(), b.clone());
                    }
                }
            }
            if let Some(h) = self.health_checks.get(*name) {
                old_hc.insert((*name).clone(), h.clone());
            }
            self.remove_entries(name);
        }
        let mut new_fe = BTreeMap::new();
        let mut new_sets = BTreeMap::new();
        let mut new_hc = BTreeMap::new();
        for (name, entries) in fresh {
            // Keep the old Arc where nothing changed, so later diffs can skip by pointer.
            let mut kept = ServiceEntries {
                frontends: Vec::new(),
                sets: Vec::new(),
                health: entries.health,
            };
            kept.frontends = entries.frontends;
            kept.sets = entries.sets;
            self.insert_entries(name, kept);
            if let Some(owned) = self.owned.get(name) {
                for k in &owned.frontends {
                    if let Some(f) = self.frontends.get_mut(k) {
                        if let Some(old) = old_fe.get(k)
                            && old == f
                        {
                            *f = old.clone();
                        }
                        new_fe.insert(*k, f.clone());
                    }
                }
                for s in &owned.sets {
                    if let Some(b) = self.backend_sets.get_mut(s) {
                        if let Some(old) = old_sets.get(s)
                            && old == b
                        {
                            *b = old.clone();
                        }
                        new_sets.insert(s.clone(), b.clone());
                    }
                }
            }
            if let Some(h) = self.health_checks.get(name) {
                new_hc.insert(name.clone(), h.clone());
            }
        }
        diff_parts(
            None, &old_fe, &new_fe, &old_sets, &new_sets, &old_hc, &new_hc,
        )
    }

    /// The ordered operations that turn `old` into `new`.
    #[must_use = "the diff is what a dataplane must apply"]
    pub fn diff(old: &Plan, new: &Plan) -> PlanDiff {
        let node = (old.node != new.node).then(|| new.node.clone());
        diff_parts(
            node,
            &old.frontends,
            &new.frontends,
            &old.backend_sets,
            &new.backend_sets,
            &old.health_checks,
            &new.health_checks,
        )
    }

    /// Renders the plan as stable text, for golden files and debugging.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let style = self.node.chain_ids;
        let list = |v: &[IpNet]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        let _ = writeln!(
            out,
            "node {} ips {} cluster-cidrs {} masquerade-all {}",
            self.node.node_name,
            self.node
                .node_ips
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(","),
            list(&self.node.cluster_cidrs),
            self.node.masquerade_all
        );
        for (k, f) in &self.frontends {
            let _ = write!(
                out,
                "frontend {k} -> {} {:?}/{:?}",
                f.service_port.spelled(style),
                f.backends.locality,
                f.backends.family
            );
            if let Some(s) = &f.local_shortcut {
                let _ = write!(out, " shortcut {:?}", s.locality);
            }
            let _ = write!(out, " masq {:?} empty {:?}", f.masquerade, f.on_empty);
            if let Some(t) = f.affinity_timeout {
                let _ = write!(out, " affinity {t}s");
            }
            if !f.source_ranges.is_empty() {
                let _ = write!(out, " ranges {}", list(&f.source_ranges));
            }
            out.push('\n');
        }
        for (id, set) in &self.backend_sets {
            let prefix = match id.locality {
                Locality::Cluster => "KUBE-SVC-",
                Locality::Local => "KUBE-SVL-",
            };
            let _ = writeln!(
                out,
                "backends {} {:?} {:?} {prefix}{} ({} endpoints)",
                id.service_port.spelled(style),
                id.locality,
                id.family,
                set.chain,
                set.endpoints.len()
            );
            for (ep, p) in set.endpoints.iter().zip(set.probabilities()) {
                let _ = write!(
                    out,
                    "  {} weight {} p {} KUBE-SEP-{}",
                    ep.addr,
                    ep.weight,
                    p.to_decimal(10),
                    set.endpoint_chain(style, ep)
                );
                if ep.local {
                    out.push_str(" local");
                }
                if ep.terminating {
                    out.push_str(" terminating");
                }
                out.push('\n');
            }
        }
        for (svc, h) in &self.health_checks {
            let _ = writeln!(
                out,
                "healthcheck {svc} port {} local-endpoints {}",
                h.port, h.local_endpoints
            );
        }
        for c in &self.conflicts {
            let _ = writeln!(
                out,
                "conflict {} kept {} dropped {}",
                c.key, c.winner, c.loser
            );
        }
        out
    }
}

/// Endpoint-level changes inside a backend set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointChanges {
    /// New endpoints.
    pub added: Vec<PlanEndpoint>,
    /// Endpoints whose weight or conditions changed (new values).
    pub updated: Vec<PlanEndpoint>,
    /// Endpoints gone.
    pub removed: Vec<PlanEndpoint>,
}

impl EndpointChanges {
    fn between(old: &[PlanEndpoint], new: &[PlanEndpoint]) -> EndpointChanges {
        let o: BTreeMap<SocketAddr, &PlanEndpoint> = old.iter().map(|e| (e.addr, e)).collect();
        let n: BTreeMap<SocketAddr, &PlanEndpoint> = new.iter().map(|e| (e.addr, e)).collect();
        let mut c = EndpointChanges::default();
        for (a, e) in &n {
            match o.get(a) {
                None => c.added.push((*e).clone()),
                Some(old) if old != e => c.updated.push((*e).clone()),
                _ => {}
            }
        }
        for (a, e) in &o {
            if !n.contains_key(a) {
                c.removed.push((*e).clone());
            }
        }
        c
    }
}

/// One step of a [`PlanDiff`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// The node context changed (backends usually resync fully).
    SetNode(NodeContext),
    /// A new backend set, with its endpoints.
    AddBackendSet(Arc<BackendSet>),
    /// A backend set's endpoints changed; `set` is the new content.
    UpdateBackendSet {
        /// The new set.
        set: Arc<BackendSet>,
        /// What changed.
        changes: EndpointChanges,
    },
    /// A frontend goes away.
    RemoveFrontend {
        /// Its key.
        key: FrontendKey,
        /// What it was.
        old: Arc<Frontend>,
    },
    /// A new frontend.
    AddFrontend {
        /// Its key.
        key: FrontendKey,
        /// What it is.
        frontend: Arc<Frontend>,
    },
    /// A frontend's attributes changed.
    UpdateFrontend {
        /// Its key.
        key: FrontendKey,
        /// The new value.
        frontend: Arc<Frontend>,
        /// The value it replaces (which backend sets it served until now).
        old: Arc<Frontend>,
    },
    /// A backend set goes away (after every frontend stopped pointing at it).
    RemoveBackendSet(Arc<BackendSet>),
    /// A health check port is served (new or changed).
    SetHealthCheck {
        /// The Service.
        service: ServiceName,
        /// The check.
        check: HealthCheck,
    },
    /// A health check port is no longer served.
    RemoveHealthCheck {
        /// The Service.
        service: ServiceName,
    },
}

/// The ordered operations between two plans: node change, then backend sets created and
/// updated, frontends removed, added and updated, backend sets removed, health checks.
/// Applying them in order never leaves a frontend pointing at a missing set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use = "a diff does nothing until a dataplane applies it"]
pub struct PlanDiff {
    /// The operations, in the order to apply them.
    pub ops: Vec<Op>,
}

impl PlanDiff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Applies the operations to `plan`, giving the new plan.
    pub fn apply(&self, plan: &Plan) -> Plan {
        let mut p = plan.clone();
        for op in &self.ops {
            match op {
                Op::SetNode(n) => p.node = n.clone(),
                Op::AddBackendSet(s) | Op::UpdateBackendSet { set: s, .. } => {
                    p.backend_sets.insert(s.id.clone(), s.clone());
                }
                Op::RemoveFrontend { key, .. } => {
                    p.frontends.remove(key);
                }
                Op::AddFrontend { key, frontend } | Op::UpdateFrontend { key, frontend, .. } => {
                    p.frontends.insert(*key, frontend.clone());
                }
                Op::RemoveBackendSet(s) => {
                    p.backend_sets.remove(&s.id);
                }
                Op::SetHealthCheck { service, check } => {
                    p.health_checks.insert(service.clone(), check.clone());
                }
                Op::RemoveHealthCheck { service } => {
                    p.health_checks.remove(service);
                }
            }
        }
        // Ownership follows the entries' Service names; conflicts are not carried.
        p.owned.clear();
        p.conflicts.clear();
        for (k, f) in &p.frontends {
            p.owned
                .entry(f.service_port.service.clone())
                .or_default()
                .frontends
                .push(*k);
        }
        for id in p.backend_sets.keys() {
            p.owned
                .entry(id.service_port.service.clone())
                .or_default()
                .sets
                .push(id.clone());
        }
        p
    }

    /// The Services the diff touches.
    pub fn services(&self) -> BTreeSet<ServiceName> {
        let mut s = BTreeSet::new();
        for op in &self.ops {
            let name = match op {
                Op::SetNode(_) => continue,
                Op::AddBackendSet(b)
                | Op::UpdateBackendSet { set: b, .. }
                | Op::RemoveBackendSet(b) => &b.id.service_port.service,
                Op::RemoveFrontend { old: f, .. }
                | Op::AddFrontend { frontend: f, .. }
                | Op::UpdateFrontend { frontend: f, .. } => &f.service_port.service,
                Op::SetHealthCheck { service, .. } | Op::RemoveHealthCheck { service } => service,
            };
            s.insert(name.clone());
        }
        s
    }
}

/// Walks two sorted maps in lockstep: `(key, old, new)` for every key in either.
fn merge<'a, K: Ord, V>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = (&'a K, Option<&'a V>, Option<&'a V>)> {
    let mut o = old.iter().peekable();
    let mut n = new.iter().peekable();
    std::iter::from_fn(move || match (o.peek(), n.peek()) {
        (None, None) => None,
        (Some(_), None) => o.next().map(|(k, v)| (k, Some(v), None)),
        (None, Some(_)) => n.next().map(|(k, v)| (k, None, Some(v))),
        (Some((ko, _)), Some((kn, _))) => match ko.cmp(kn) {
            std::cmp::Ordering::Less => o.next().map(|(k, v)| (k, Some(v), None)),
            std::cmp::Ordering::Greater => n.next().map(|(k, v)| (k, None, Some(v))),
            std::cmp::Ordering::Equal => {
                let (k, vo) = o.next()?;
                let (_, vn) = n.next()?;
                Some((k, Some(vo), Some(vn)))
            }
        },
    })
}

fn diff_parts(
    node: Option<NodeContext>,
    old_fe: &BTreeMap<FrontendKey, Arc<Frontend>>,
    new_fe: &BTreeMap<FrontendKey, Arc<Frontend>>,
    old_sets: &BTreeMap<BackendSetId, Arc<BackendSet>>,
    new_sets: &BTreeMap<BackendSetId, Arc<BackendSet>>,
    old_hc: &BTreeMap<ServiceName, HealthCheck>,
    new_hc: &BTreeMap<ServiceName, HealthCheck>,
) -> PlanDiff {
    // One merged walk per map; the phases are then concatenated in dependency order.
    let mut add_sets = Vec::new();
    let mut update_sets = Vec::new();
    let mut remove_sets = Vec::new();
    for (_, o, n) in merge(old_sets, new_sets) {
        match (o, n) {
            (None, Some(n)) => add_sets.push(Op::AddBackendSet(n.clone())),
            (Some(o), None) => remove_sets.push(Op::RemoveBackendSet(o.clone())),
            (Some(o), Some(n)) if !Arc::ptr_eq(o, n) && o != n => {
                update_sets.push(Op::UpdateBackendSet {
                    set: n.clone(),
                    changes: EndpointChanges::between(&o.endpoints, &n.endpoints),
                })
            }
            _ => {}
        }
    }
    let mut remove_fe = Vec::new();
    let mut add_fe = Vec::new();
    let mut update_fe = Vec::new();
    for (k, o, n) in merge(old_fe, new_fe) {
        match (o, n) {
            (None, Some(n)) => add_fe.push(Op::AddFrontend {
                key: *k,
                frontend: n.clone(),
            }),
            (Some(o), None) => remove_fe.push(Op::RemoveFrontend {
                key: *k,
                old: o.clone(),
            }),
            (Some(o), Some(n)) if !Arc::ptr_eq(o, n) && o != n => {
                update_fe.push(Op::UpdateFrontend {
                    key: *k,
                    frontend: n.clone(),
                    old: o.clone(),
                })
            }
            _ => {}
        }
    }
    let mut set_hc = Vec::new();
    let mut remove_hc = Vec::new();
    for (svc, o, n) in merge(old_hc, new_hc) {
        match (o, n) {
            (_, Some(n)) if o != Some(n) => set_hc.push(Op::SetHealthCheck {
                service: svc.clone(),
                check: n.clone(),
            }),
            (Some(_), None) => remove_hc.push(Op::RemoveHealthCheck {
                service: svc.clone(),
            }),
            _ => {}
        }
    }
    let mut ops = Vec::new();
    if let Some(n) = node {
        ops.push(Op::SetNode(n));
    }
    for phase in [
        add_sets,
        update_sets,
        remove_fe,
        add_fe,
        update_fe,
        remove_sets,
        set_hc,
        remove_hc,
    ] {
        ops.extend(phase);
    }
    PlanDiff { ops }
}

/// Splits endpoints the way kube-proxy's `CategorizeEndpoints` does: ready endpoints when
/// there are any; otherwise serving-and-terminating ones ("if there are no ready
/// endpoints, use terminating endpoints that are still serving").
fn usable<'a>(
    eps: impl Iterator<Item = &'a PortEndpoint> + Clone,
) -> Vec<(&'a PortEndpoint, bool)> {
    let ready: Vec<_> = eps
        .clone()
        .filter(|e| e.endpoint.ready)
        .map(|e| (e, false))
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    eps.filter(|e| e.endpoint.serving && e.endpoint.terminating)
        .map(|e| (e, true))
        .collect()
}

/// Which hints a node follows for one Service port (kube-proxy's `topologyModeFromHints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// Every endpoint: hints missing on some ready endpoint, or none for this node/zone.
    All,
    /// Endpoints hinted for this node: every ready endpoint has a node hint and one is
    /// for this node.
    SameNode,
    /// Endpoints hinted for this node's zone: every ready endpoint has a zone hint and one
    /// is for this zone.
    SameZone,
}

fn topology<'a>(
    eps: impl Iterator<Item = &'a PortEndpoint>,
    node: &str,
    zone: Option<&str>,
) -> Topology {
    let (mut any, mut all_node, mut for_node, mut all_zone, mut for_zone) =
        (false, true, false, true, false);
    for e in eps.filter(|e| e.endpoint.ready) {
        any = true;
        let ep = &e.endpoint;
        all_node &= !ep.node_hints.is_empty();
        for_node |= ep.node_hints.iter().any(|n| n == node);
        all_zone &= !ep.zone_hints.is_empty();
        for_zone |= zone.is_some_and(|z| ep.zone_hints.iter().any(|h| h == z));
    }
    if !any {
        Topology::All
    } else if all_node && for_node {
        Topology::SameNode
    } else if all_zone && for_zone {
        Topology::SameZone
    } else {
        Topology::All
    }
}

fn available(e: &PortEndpoint, mode: Topology, node: &str, zone: Option<&str>) -> bool {
    match mode {
        Topology::All => true,
        Topology::SameNode => e.endpoint.node_hints.iter().any(|n| n == node),
        Topology::SameZone => zone.is_some_and(|z| e.endpoint.zone_hints.iter().any(|h| h == z)),
    }
}

fn compile_service(cluster: &Cluster, svc: &Service, node: &NodeContext) -> ServiceEntries {
    let mut out = ServiceEntries::default();
    if !svc.is_proxied() {
        return out;
    }
    let endpoints = cluster.endpoints(svc);
    let style = node.chain_ids;
    let affinity = match svc.session_affinity {
        SessionAffinity::None => None,
        SessionAffinity::ClientIp { timeout_seconds } => Some(timeout_seconds),
    };
    let ext_local = svc.external_policy_local();
    let int_local = svc.internal_traffic_policy == TrafficPolicy::Local;
    let mut local_ready: BTreeSet<IpAddr> = BTreeSet::new();
    let zone = cluster
        .node(&node.node_name)
        .and_then(|n| n.zone.as_deref());
    for sp in &svc.ports {
        let spn = ServicePortName {
            service: svc.name.clone(),
            port: sp.name.clone(),
            protocol: sp.protocol,
        };
        let chain = spn.chain_hash(style);
        let eps: &[PortEndpoint] = endpoints
            .get(&sp.name)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[]);
        for family in &svc.families() {
            let fam_eps = eps
                .iter()
                .filter(|e| IpFamily::of(&e.endpoint.ip) == *family);
            let is_local =
                |e: &PortEndpoint| e.endpoint.node_name.as_deref() == Some(node.node_name.as_str());
            let to_plan = |(e, terminating): (&PortEndpoint, bool)| PlanEndpoint {
                addr: SocketAddr::new(e.endpoint.ip, e.port),
                weight: e.endpoint.weight,
                local: is_local(e),
                terminating,
                node: e.endpoint.node_name.clone(),
            };
            // Topology applies to the Cluster set only, and only to ready endpoints: when it
            // applies, some ready endpoint is available, so the terminating fallback never
            // sees it.
            let mode = topology(fam_eps.clone(), &node.node_name, zone);
            let cluster_set =
                BackendSet {
                    id: BackendSetId {
                        service_port: spn.clone(),
                        locality: Locality::Cluster,
                        family: *family,
                    },
                    chain: chain.clone(),
                    endpoints: usable(fam_eps.clone().filter(|e| {
                        !e.endpoint.ready || available(e, mode, &node.node_name, zone)
                    }))
                    .into_iter()
                    .map(to_plan)
                    .collect(),
                };
            let local_set = (ext_local || int_local).then(|| BackendSet {
                id: BackendSetId {
                    service_port: spn.clone(),
                    locality: Locality::Local,
                    family: *family,
                },
                chain: chain.clone(),
                endpoints: usable(fam_eps.clone().filter(|e| is_local(e)))
                    .into_iter()
                    .map(to_plan)
                    .collect(),
            });
            if let Some(l) = &local_set {
                local_ready.extend(
                    l.endpoints
                        .iter()
                        .filter(|e| !e.terminating)
                        .map(|e| e.addr.ip()),
                );
            }
            let cluster_empty = cluster_set.is_empty();
            let on_empty_for = |local: bool| {
                if local && !cluster_empty {
                    EmptyAction::Drop
                } else {
                    EmptyAction::Reject
                }
            };
            let pick = |local: bool| match (&local_set, local) {
                (Some(l), true) => l.id.clone(),
                _ => cluster_set.id.clone(),
            };
            // Cluster IPs: internal traffic.
            let internal_masq = if node.masquerade_all {
                Masquerade::Always
            } else if !node.cluster_cidrs.is_empty() {
                Masquerade::OffCluster
            } else {
                Masquerade::Never
            };
            for ip in svc
                .cluster_ips
                .iter()
                .filter(|ip| IpFamily::of(ip) == *family)
            {
                out.frontends.push((
                    FrontendKey {
                        addr: *ip,
                        protocol: sp.protocol,
                        port: sp.port,
                        kind: FrontendKind::ClusterIp,
                    },
                    Frontend {
                        service_port: spn.clone(),
                        backends: pick(int_local),
                        local_shortcut: None,
                        masquerade: internal_masq,
                        source_ranges: Vec::new(),
                        affinity_timeout: affinity,
                        on_empty: on_empty_for(int_local),
                    },
                ));
            }
            // External traffic: node ports, external IPs, load balancer IPs.
            // "externalTrafficPolicy: Cluster ... obscures the client source IP"
            // (masquerade); Local preserves it and uses only local endpoints.
            let external = |kind: FrontendKind, addr: IpAddr, port: u16| {
                (
                    FrontendKey {
                        addr,
                        protocol: sp.protocol,
                        port,
                        kind,
                    },
                    Frontend {
                        service_port: spn.clone(),
                        backends: pick(ext_local),
                        local_shortcut: ext_local.then(|| cluster_set.id.clone()),
                        masquerade: if ext_local {
                            Masquerade::Never
                        } else {
                            Masquerade::Always
                        },
                        source_ranges: if kind == FrontendKind::LoadBalancer {
                            svc.load_balancer_source_ranges
                                .iter()
                                .filter(|n| same_family(n, *family))
                                .copied()
                                .collect()
                        } else {
                            Vec::new()
                        },
                        affinity_timeout: affinity,
                        on_empty: on_empty_for(ext_local),
                    },
                )
            };
            if let Some(np) = sp.node_port
                && svc.service_type.has_node_ports()
            {
                for ip in node.nodeport_ips().filter(|ip| IpFamily::of(ip) == *family) {
                    out.frontends.push(external(FrontendKind::NodePort, ip, np));
                }
            }
            for ip in svc
                .external_ips
                .iter()
                .filter(|ip| IpFamily::of(ip) == *family)
            {
                out.frontends
                    .push(external(FrontendKind::ExternalIp, *ip, sp.port));
            }
            if svc.service_type == ServiceType::LoadBalancer {
                for ip in svc
                    .load_balancer_ips
                    .iter()
                    .filter(|ip| IpFamily::of(ip) == *family)
                {
                    out.frontends
                        .push(external(FrontendKind::LoadBalancer, *ip, sp.port));
                }
            }
            out.sets.push(cluster_set);
            if let Some(l) = local_set {
                out.sets.push(l);
            }
        }
    }
    if let Some(port) = svc.health_check_node_port
        && ext_local
    {
        out.health = Some(HealthCheck {
            port,
            local_endpoints: local_ready.len(),
        });
    }
    out
}

fn same_family(n: &IpNet, f: IpFamily) -> bool {
    matches!(
        (n, f),
        (IpNet::V4(_), IpFamily::V4) | (IpNet::V6(_), IpFamily::V6)
    )
}

/// What a backend reports after programming a plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncReport {
    /// Whether everything was rewritten (as opposed to only what the diff touched).
    pub full: bool,
    /// Backend-specific count of objects written (rules, services, destinations...).
    pub written: usize,
    /// Frontends now programmed.
    pub frontends: usize,
    /// Endpoints now programmed.
    pub endpoints: usize,
    /// Stale connection-tracking entries deleted after the change
    /// ([`crate::conntrack::stale_flows`]).
    pub conntrack_deleted: usize,
    /// Stale entries that could not be deleted, each naming the flow and the error (the
    /// sync itself still succeeded: the rules are in place).
    pub conntrack_errors: Vec<String>,
    /// What the backend worked around and an operator should hear of (say, a chain it
    /// could not delete because a rule it does not own refers to it); the sync succeeded.
    pub warnings: Vec<String>,
}

impl SyncReport {
    /// A report with explicit counts.
    pub fn new(full: bool, written: usize, frontends: usize, endpoints: usize) -> SyncReport {
        SyncReport {
            full,
            written,
            frontends,
            endpoints,
            conntrack_deleted: 0,
            conntrack_errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// A report of having programmed all of `plan`: its frontends and endpoints counted.
    pub fn of_plan(plan: &Plan, full: bool, written: usize) -> SyncReport {
        SyncReport::new(
            full,
            written,
            plan.frontends().count(),
            plan.endpoint_count(),
        )
    }
}

/// A datapath that programs plans: implemented by each backend.
pub trait Dataplane {
    /// The backend's error type; it names the object and the system call or line that
    /// failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Applies `diff`, which leads from the previously synced plan to `plan`. A backend
    /// may fall back to a full resync when it cannot apply a diff partially.
    fn sync(&mut self, plan: &Plan, diff: &PlanDiff) -> Result<SyncReport, Self::Error>;

    /// Rewrites everything from `plan`, removing whatever the backend owns that the plan
    /// does not hold (repairs drift).
    fn resync(&mut self, plan: &Plan) -> Result<SyncReport, Self::Error>;

    /// Removes everything the backend installed.
    fn cleanup(&mut self) -> Result<(), Self::Error>;

    /// Whether what the backend installed was changed behind its back since the last sync
    /// (for iptables: someone flushed the tables and the canary chain is gone), so that a
    /// full resync is due now. The proxy asks between syncs; a backend may rate-limit the
    /// check and answer `false` until it is due. Backends that cannot tell keep this
    /// default.
    fn drifted(&mut self) -> Result<bool, Self::Error> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ClusterConfig, Manifests};

    fn load(text: &str) -> Cluster {
        let cfg = ClusterConfig {
            default_namespace: "instavote".into(),
            ..ClusterConfig::default()
        };
        let mut m = Manifests::from_files([("t.yaml", text)], &cfg);
        let c = m.build(&cfg);
        assert!(m.errors.is_empty(), "{:#?}", m.errors);
        c
    }

    fn node(name: &str, ip: [u8; 4]) -> NodeContext {
        NodeContext::new(
            name,
            vec![IpAddr::from(ip)],
            vec!["10.32.0.0/12".parse().expect("cidr")],
        )
    }

    fn pod(name: &str, ip: &str, node: &str, labels: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: app, image: x}}]\nstatus:\n  podIP: {ip}\n"
        )
    }

    fn lab_vote_pods() -> String {
        [
            ("vote-58bpv", "10.32.0.6", "k-02"),
            ("vote-986cl", "10.38.0.5", "k-03"),
            ("vote-9rrfz", "10.38.0.4", "k-03"),
            ("vote-dx8f4", "10.32.0.4", "k-02"),
            ("vote-qxmfl", "10.32.0.5", "k-02"),
        ]
        .iter()
        .map(|(n, ip, nd)| pod(n, ip, nd, "role: vote"))
        .collect()
    }

    const VOTE: &str = "---
apiVersion: v1
kind: Service
metadata: {name: vote}
spec:
  type: NodePort
  selector: {role: vote}
  ports: [{port: 80, targetPort: 80, nodePort: 30000}]
";

    #[test]
    fn reproduces_the_lab_chain_names_and_probabilities() {
        let c = load(&format!("{VOTE}{}", lab_vote_pods()));
        let mut n = node("k-02", [192, 168, 50, 12]);
        n.chain_ids = ChainIdStyle::Legacy;
        let plan = Plan::compile(&c, &n);
        let (_, set) = plan
            .backend_sets()
            .find(|(id, _)| id.locality == Locality::Cluster)
            .expect("set");
        assert_eq!(set.chain, "VIQHAVHDK4QE7NA4");
        let seps: Vec<String> = set
            .endpoints
            .iter()
            .map(|e| set.endpoint_chain(ChainIdStyle::Legacy, e))
            .collect();
        // The lab's `iptables -nvL -t nat` order: endpoints sorted by address.
        assert_eq!(
            seps,
            [
                "RFJGHFMXUDJXIEW6",
                "GBR5YQCVRYY3BA6U",
                "BAI3HQ7SV7RZ2CI6",
                "2EQSLPEP3WDOTI5J",
                "2CJQISP4W7F2HCRW"
            ]
        );
        let shown: Vec<String> = set
            .probabilities()
            .iter()
            .take(4)
            .map(|p| {
                let old_kube_proxy = p.to_decimal(5).parse::<f64>().expect("decimal");
                select::iptables_display(select::statistic_u32(old_kube_proxy))
            })
            .collect();
        assert_eq!(
            shown,
            [
                "0.20000000019",
                "0.25000000000",
                "0.33332999982",
                "0.50000000000"
            ]
        );
        assert!(set.probabilities()[4].is_one());
        // Current kube-proxy spells an unnamed port without the colon.
        let cur = Plan::compile(&c, &node("k-02", [192, 168, 50, 12]));
        assert!(
            cur.backend_sets()
                .all(|(_, s)| s.chain == "A7CETQ67OOPEGB6O")
        );
    }

    #[test]
    fn node_port_frontends_on_each_node_address_masquerade() {
        let c = load(&format!("{VOTE}{}", lab_vote_pods()));
        let mut n = node("k-02", [192, 168, 50, 12]);
        n.node_ips.push(IpAddr::from([172, 16, 0, 12]));
        let plan = Plan::compile(&c, &n);
        let np: Vec<_> = plan
            .frontends()
            .filter(|(k, _)| k.kind == FrontendKind::NodePort)
            .collect();
        assert_eq!(np.len(), 2);
        for (k, f) in np {
            assert_eq!(k.port, 30000);
            assert_eq!(f.masquerade, Masquerade::Always);
            assert_eq!(f.backends.locality, Locality::Cluster);
        }
        let (_, ci) = plan
            .frontends()
            .find(|(k, _)| k.kind == FrontendKind::ClusterIp)
            .expect("cluster ip");
        assert_eq!(ci.masquerade, Masquerade::OffCluster);
        assert_eq!(ci.on_empty, EmptyAction::Reject);
        n.nodeport_addresses = vec!["172.16.0.0/16".parse().expect("cidr")];
        let plan = Plan::compile(&c, &n);
        let np: Vec<_> = plan
            .frontends()
            .filter(|(k, _)| k.kind == FrontendKind::NodePort)
            .map(|(k, _)| k.addr)
            .collect();
        assert_eq!(np, [IpAddr::from([172, 16, 0, 12])]);
    }

    #[test]
    fn nodeports_follow_kube_proxys_nodeport_addresses() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("address") };
        let mut n = NodeContext::new("n", vec![ip("192.168.50.11")], Vec::new());
        n.local_addresses = [
            "127.0.0.1",
            "192.168.50.11",
            "10.0.0.5",
            "::1",
            "fe80::1",
            "fd00::5",
        ]
        .map(ip)
        .to_vec();
        let all = |n: &NodeContext| n.nodeport_ips().collect::<Vec<_>>();
        // Default: every local address, each once, no loopback, no IPv6 link-local.
        assert_eq!(all(&n), ["192.168.50.11", "10.0.0.5", "fd00::5"].map(ip));
        // Localhost NodePorts: IPv4 loopback only.
        n.localhost_nodeports = true;
        assert_eq!(
            all(&n),
            ["192.168.50.11", "127.0.0.1", "10.0.0.5", "fd00::5"].map(ip)
        );
        // CIDRs select among all of them (loopback too, when asked for and allowed).
        n.nodeport_addresses = vec!["10.0.0.0/8".parse().expect("cidr")];
        assert_eq!(all(&n), [ip("10.0.0.5")]);
        n.nodeport_addresses
            .push("127.0.0.0/8".parse().expect("cidr"));
        assert_eq!(all(&n), ["127.0.0.1", "10.0.0.5"].map(ip));
        // primary: the node IPs only.
        n.nodeport_primary = true;
        assert_eq!(all(&n), [ip("192.168.50.11")]);
    }

    #[test]
    fn external_local_policy_uses_local_endpoints_and_drops_without_them() {
        let text = format!(
            "{}  externalTrafficPolicy: Local\n{}",
            VOTE.trim_end_matches('\n').to_string() + "\n",
            lab_vote_pods()
        );
        let c = load(&text);
        let plan = Plan::compile(&c, &node("k-02", [192, 168, 50, 12]));
        let (_, f) = plan
            .frontends()
            .find(|(k, _)| k.kind == FrontendKind::NodePort)
            .expect("np");
        assert_eq!(f.backends.locality, Locality::Local);
        assert_eq!(f.masquerade, Masquerade::Never);
        assert_eq!(f.on_empty, EmptyAction::Drop);
        assert_eq!(
            f.local_shortcut.as_ref().map(|s| s.locality),
            Some(Locality::Cluster)
        );
        let local = plan.backend_set(&f.backends).expect("local set");
        assert_eq!(local.endpoints.len(), 3, "three vote pods run on k-02");
        assert!(local.endpoints.iter().all(|e| e.local));
        // A node with no vote pod: the local set is empty, the cluster set is not -> DROP.
        let plan = Plan::compile(&c, &node("k-09", [192, 168, 50, 19]));
        let (_, f) = plan
            .frontends()
            .find(|(k, _)| k.kind == FrontendKind::NodePort)
            .expect("np");
        assert!(plan.backend_set(&f.backends).expect("set").is_empty());
        assert_eq!(f.on_empty, EmptyAction::Drop);
        // ClusterIP traffic still uses every endpoint.
        let (_, ci) = plan
            .frontends()
            .find(|(k, _)| k.kind == FrontendKind::ClusterIp)
            .expect("ci");
        assert_eq!(ci.backends.locality, Locality::Cluster);
    }

    #[test]
    fn no_endpoints_rejects_and_terminating_endpoints_are_a_fallback() {
        let c = load(VOTE);
        let plan = Plan::compile(&c, &node("k-02", [192, 168, 50, 12]));
        assert!(
            plan.frontends()
                .all(|(_, f)| f.on_empty == EmptyAction::Reject)
        );
        assert!(plan.backend_sets().all(|(_, s)| s.is_empty()));
        let terminating = "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: old\n  labels: {role: vote}\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"\nspec:\n  nodeName: k-02\n  containers: [{name: app, image: x}]\nstatus:\n  podIP: 10.32.0.9\n  conditions: [{type: Ready, status: \"True\"}]\n";
        let c = load(&format!("{VOTE}{terminating}"));
        let plan = Plan::compile(&c, &node("k-02", [192, 168, 50, 12]));
        let (_, s) = plan.backend_sets().next().expect("set");
        assert_eq!(s.endpoints.len(), 1);
        assert!(
            s.endpoints[0].terminating,
            "used only because nothing is ready"
        );
        let c = load(&format!("{VOTE}{terminating}{}", lab_vote_pods()));
        let plan = Plan::compile(&c, &node("k-02", [192, 168, 50, 12]));
        let (_, s) = plan.backend_sets().next().expect("set");
        assert_eq!(s.endpoints.len(), 5);
        assert!(s.endpoints.iter().all(|e| !e.terminating));
    }

    #[test]
    fn load_balancer_ranges_affinity_and_health_check() {
        let text = "---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  selector: {role: vote}
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerIP: 203.0.113.7
  loadBalancerSourceRanges: [198.51.100.0/24]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{port: 80, nodePort: 30080}]
";
        let c = load(&format!("{text}{}", lab_vote_pods()));
        let plan = Plan::compile(&c, &node("k-03", [192, 168, 50, 13]));
        let (_, lb) = plan
            .frontends()
            .find(|(k, _)| k.kind == FrontendKind::LoadBalancer)
            .expect("lb");
        assert_eq!(
            lb.source_ranges,
            vec!["198.51.100.0/24".parse::<IpNet>().expect("net")]
        );
        assert_eq!(lb.affinity_timeout, Some(60));
        let hc: Vec<_> = plan.health_checks().collect();
        assert_eq!(hc.len(), 1);
        assert_eq!(hc[0].1.port, 32000);
        assert_eq!(hc[0].1.local_endpoints, 2, "two vote pods on k-03");
    }

    #[test]
    fn internal_local_policy_drops_without_local_endpoints() {
        let text = "---
apiVersion: v1
kind: Service
metadata: {name: redis}
spec:
  selector: {app: redis}
  internalTrafficPolicy: Local
  ports: [{port: 6379}]
";
        let pods = pod("redis-1", "10.32.0.6", "k-02", "app: redis");
        let c = load(&format!("{text}{pods}"));
        let plan = Plan::compile(&c, &node("k-03", [192, 168, 50, 13]));
        let (_, f) = plan.frontends().next().expect("frontend");
        assert_eq!(f.backends.locality, Locality::Local);
        assert_eq!(f.on_empty, EmptyAction::Drop);
    }

    #[test]
    fn dual_stack_service_has_a_set_per_family() {
        let text = "---
apiVersion: v1
kind: Service
metadata: {name: ds}
spec:
  ipFamilyPolicy: RequireDualStack
  clusterIPs: [10.96.5.5, \"fd00:10:96::5\"]
  selector: {app: ds}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: ds-1, labels: {app: ds}}
spec: {containers: [{name: a, image: x}]}
status:
  podIPs: [{ip: 10.244.1.5}, {ip: \"fd00:244::5\"}]
";
        let cfg = ClusterConfig {
            service_cidrs: vec![
                "10.96.0.0/12".parse().expect("net"),
                "fd00:10:96::/108".parse().expect("net"),
            ],
            ..ClusterConfig::default()
        };
        let mut m = Manifests::from_files([("ds.yaml", text)], &cfg);
        let c = m.build(&cfg);
        assert!(m.errors.is_empty(), "{:#?}", m.errors);
        let plan = Plan::compile(&c, &node("n", [192, 168, 1, 1]));
        let sets: Vec<_> = plan
            .backend_sets()
            .map(|(id, s)| (id.family, s.endpoints.len()))
            .collect();
        assert_eq!(sets, [(IpFamily::V4, 1), (IpFamily::V6, 1)]);
        let fams: Vec<_> = plan
            .frontends()
            .map(|(k, f)| (IpFamily::of(&k.addr), f.backends.family))
            .collect();
        assert_eq!(
            fams,
            [(IpFamily::V4, IpFamily::V4), (IpFamily::V6, IpFamily::V6)]
        );
    }

    #[test]
    fn contested_external_ip_goes_to_the_first_service_by_name() {
        let text = "---
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {externalIPs: [192.0.2.1], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {externalIPs: [192.0.2.1], ports: [{port: 80}]}
";
        let mut c = load(text);
        let n = node("n", [192, 168, 1, 1]);
        let mut plan = Plan::compile(&c, &n);
        assert_eq!(plan.conflicts().count(), 1);
        let key = FrontendKey {
            addr: IpAddr::from([192, 0, 2, 1]),
            protocol: Protocol::Tcp,
            port: 80,
            kind: FrontendKind::ExternalIp,
        };
        assert_eq!(
            plan.frontend(&key).expect("fe").service_port.service.name,
            "a"
        );
        // Removing `a` hands the address to `b`, incrementally as in a full compile.
        let a = ObjectName::new("instavote", "a");
        c.remove_service(&a);
        let old = plan.clone();
        let diff = plan.update(&c);
        assert_eq!(plan, Plan::compile(&c, &n));
        assert_eq!(diff, Plan::diff(&old, &plan));
        assert_eq!(
            plan.frontend(&key).expect("fe").service_port.service.name,
            "b"
        );
    }

    #[test]
    fn incremental_update_matches_full_compile_and_keeps_arcs() {
        let mut c = load(&format!("{VOTE}{}", lab_vote_pods()));
        let n = node("k-02", [192, 168, 50, 12]);
        let mut plan = Plan::compile(&c, &n);
        let old = plan.clone();
        let affected = c.remove_pod(&ObjectName::new("instavote", "vote-dx8f4"));
        assert_eq!(affected.len(), 1);
        let diff = plan.update(&c);
        assert_eq!(plan, Plan::compile(&c, &n));
        assert_eq!(diff, Plan::diff(&old, &plan));
        assert_eq!(diff.apply(&old), plan);
        let updates: Vec<_> = diff
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::UpdateBackendSet { changes, .. } => Some(changes.removed.len()),
                _ => None,
            })
            .collect();
        assert_eq!(updates, [1]);
        // Frontends did not change, so they are the same allocations as before.
        for (k, f) in plan.frontends() {
            assert!(Arc::ptr_eq(f, old.frontend(k).expect("same key")));
        }
        assert!(Plan::diff(&plan, &plan).is_empty());
    }

    #[test]
    fn diff_orders_create_before_reference_and_unlink_before_delete() {
        let c0 = load(VOTE);
        let c1 = load(&format!("{VOTE}{}", lab_vote_pods()));
        let n = node("k-02", [192, 168, 50, 12]);
        let empty = Plan::empty(n.clone());
        let p1 = Plan::compile(&c1, &n);
        let d = Plan::diff(&empty, &p1);
        let first_fe = d
            .ops
            .iter()
            .position(|o| matches!(o, Op::AddFrontend { .. }));
        let last_set = d
            .ops
            .iter()
            .rposition(|o| matches!(o, Op::AddBackendSet(_)));
        assert!(last_set < first_fe);
        let d = Plan::diff(&p1, &empty);
        let last_fe = d
            .ops
            .iter()
            .rposition(|o| matches!(o, Op::RemoveFrontend { .. }));
        let first_set = d
            .ops
            .iter()
            .position(|o| matches!(o, Op::RemoveBackendSet(_)));
        assert!(last_fe < first_set);
        let p0 = Plan::compile(&c0, &n);
        assert_eq!(Plan::diff(&p0, &p1).apply(&p0), p1);
    }

    /// Three nodes in two zones, web pods on each, a Service with `distribution` (a
    /// `trafficDistribution` value or none). The controller writes hints; the plan follows
    /// them as kube-proxy's topology logic does.
    fn zoned(distribution: &str, extra_pod: &str) -> Cluster {
        let td = if distribution.is_empty() {
            String::new()
        } else {
            format!("  trafficDistribution: {distribution}\n")
        };
        let mut text = String::new();
        for (n, zone, ip) in [("n1", "a", 1), ("n2", "a", 2), ("n3", "b", 3)] {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {n}\n  labels: {{topology.kubernetes.io/zone: {zone}}}\nstatus:\n  addresses: [{{type: InternalIP, address: 192.168.0.{ip}}}]\n"
            ));
        }
        for (i, n) in ["n1", "n2", "n3", "n3"].iter().enumerate() {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}, labels: {{app: web}}}}\nspec: {{nodeName: {n}, containers: [{{name: a, image: x}}]}}\nstatus: {{podIP: 10.244.0.{}}}\n",
                10 + i
            ));
        }
        text.push_str(extra_pod);
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: 10.96.0.70\n  selector: {{app: web}}\n  ports: [{{port: 80, targetPort: 8080}}]\n{td}"
        ));
        load(&text)
    }

    fn cluster_endpoints(c: &Cluster, node_name: &str) -> Vec<String> {
        let n = NodeContext::new(node_name, vec![], vec![]);
        let p = Plan::compile(c, &n);
        let (_, set) = p
            .backend_sets()
            .find(|(id, _)| id.locality == Locality::Cluster)
            .expect("a cluster set");
        set.endpoints.iter().map(|e| e.addr.to_string()).collect()
    }

    #[test]
    fn topology_follows_zone_hints() {
        let c = zoned("PreferClose", "");
        // Zone a (n1, n2) has web-0 and web-1; zone b (n3) has web-2 and web-3.
        assert_eq!(
            cluster_endpoints(&c, "n1"),
            ["10.244.0.10:8080", "10.244.0.11:8080"]
        );
        assert_eq!(
            cluster_endpoints(&c, "n3"),
            ["10.244.0.12:8080", "10.244.0.13:8080"]
        );
        // A node without a zone, or in a zone no endpoint is hinted for: everything.
        assert_eq!(cluster_endpoints(&c, "elsewhere").len(), 4);
        // PreferSameZone is the same; no distribution, no hints: everything everywhere.
        let c = zoned("PreferSameZone", "");
        assert_eq!(cluster_endpoints(&c, "n1").len(), 2);
        let c = zoned("", "");
        assert_eq!(cluster_endpoints(&c, "n1").len(), 4);
    }

    #[test]
    fn topology_prefers_the_same_node_then_the_zone() {
        let c = zoned("PreferSameNode", "");
        assert_eq!(cluster_endpoints(&c, "n2"), ["10.244.0.11:8080"]);
        assert_eq!(
            cluster_endpoints(&c, "n3"),
            ["10.244.0.12:8080", "10.244.0.13:8080"]
        );
        // A node with no endpoint of its own falls back to its zone's hints.
        let extra = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: n4\n  labels: {topology.kubernetes.io/zone: b}\n";
        let c = zoned("PreferSameNode", extra);
        assert_eq!(
            cluster_endpoints(&c, "n4"),
            ["10.244.0.12:8080", "10.244.0.13:8080"]
        );
    }

    #[test]
    fn topology_is_ignored_when_a_ready_endpoint_has_no_hint() {
        // A pod on a node without a zone label: its endpoint gets no zone hint, so no
        // node uses zone hints for this Service.
        let extra = "---\napiVersion: v1\nkind: Node\nmetadata: {name: n5}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-9, labels: {app: web}}\nspec: {nodeName: n5, containers: [{name: a, image: x}]}\nstatus: {podIP: 10.244.0.19}\n";
        let c = zoned("PreferClose", extra);
        assert_eq!(cluster_endpoints(&c, "n1").len(), 5);
    }

    #[test]
    fn a_zone_change_of_this_node_recompiles_through_the_journal() {
        let mut c = zoned("PreferClose", "");
        let n = NodeContext::new("n1", vec![], vec![]);
        let mut p = Plan::compile(&c, &n);
        let mut node = c.node("n1").cloned().expect("n1");
        node.zone = Some("b".into());
        c.upsert_node(node);
        let _ = p.update(&c);
        let fresh = Plan::compile(&c, &n);
        assert_eq!(Plan::diff(&p, &fresh), PlanDiff::default());
        // Zone b now: the controller rewrote n1's endpoint hints too, so web-0 (on n1, now
        // in zone b) joins zone b's endpoints.
        assert_eq!(
            cluster_endpoints(&c, "n1"),
            ["10.244.0.10:8080", "10.244.0.12:8080", "10.244.0.13:8080"]
        );
    }

    #[test]
    fn load_balancer_ips_in_proxy_mode_get_no_rule() {
        let c = load(
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.71\n  ports: [{port: 80, nodePort: 30071}]\nstatus:\n  loadBalancer:\n    ingress: [{ip: 203.0.113.7, ipMode: Proxy}, {ip: 203.0.113.8, ipMode: VIP}, {ip: 203.0.113.9}]\n",
        );
        let p = Plan::compile(&c, &node("n1", [192, 168, 0, 1]));
        let lb: BTreeSet<IpAddr> = p
            .frontends()
            .filter(|(k, _)| k.kind == FrontendKind::LoadBalancer)
            .map(|(k, _)| k.addr)
            .collect();
        assert_eq!(
            lb,
            ["203.0.113.8", "203.0.113.9"]
                .iter()
                .map(|s| s.parse().expect("ip"))
                .collect()
        );
    }

    /// In a proxy-only cluster nothing rewrites the slices when this node's zone changes:
    /// the journal alone must make `update` recompile.
    #[test]
    fn a_proxy_follows_its_own_zone_change() {
        let mut c = Cluster::new();
        let mut me = Node::new("n1");
        me.zone = Some("a".into());
        c.upsert_node(me.clone());
        let mut svc = Service::new(ServiceName::new("ns", "web"));
        svc.cluster_ips = vec![IpAddr::from([10, 96, 0, 72])];
        svc.ports.push(ServicePort::new(
            "",
            Protocol::Tcp,
            80,
            TargetPort::Number(8080),
        ));
        c.upsert_service(svc);
        let eps = [("10.244.0.1", "a"), ("10.244.0.2", "b")]
            .iter()
            .map(|(ip, zone)| {
                let mut e = Endpoint::new(ip.parse().expect("ip"));
                e.zone_hints = vec![zone.to_string()];
                e
            })
            .collect();
        c.upsert_slice(EndpointSlice {
            service: ServiceName::new("ns", "web"),
            name: "web-1".into(),
            endpoints: eps,
            ports: vec![EndpointPort {
                name: String::new(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        });
        let n = NodeContext::new("n1", vec![], vec![]);
        let mut p = Plan::compile(&c, &n);
        assert_eq!(cluster_endpoints(&c, "n1"), ["10.244.0.1:8080"]);
        me.zone = Some("b".into());
        c.upsert_node(me);
        let diff = p.update(&c);
        assert!(!diff.ops.is_empty(), "the zone change recompiled nothing");
        assert_eq!(Plan::diff(&p, &Plan::compile(&c, &n)), PlanDiff::default());
        assert_eq!(cluster_endpoints(&c, "n1"), ["10.244.0.2:8080"]);
    }
}
