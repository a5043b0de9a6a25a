//! The Kubernetes service model: Services, ports, Pods, Nodes, EndpointSlices and label
//! selectors, reduced to what a node proxy and a cluster DNS need.
//!
//! These are svcnat's own types, not the API types: the typed input ([`crate::input`]) and
//! the manifest loader ([`crate::manifest`]) turn `k8s-openapi` objects into them after
//! validating them, so that everything downstream (the plan compiler, discovery, describe)
//! works on values that are known to be valid. [`Cluster`] (in [`crate::cluster`]) holds
//! them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// Annotation on a Pod giving its endpoint weight (a svcnat extension; Kubernetes has none).
pub const WEIGHT_ANNOTATION: &str = "svcnat.io/weight";
/// Annotation on an Endpoints or EndpointSlice object: `ip=weight,ip=weight`.
pub const WEIGHTS_ANNOTATION: &str = "svcnat.io/weights";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Default weight of an endpoint.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Default ClientIP affinity timeout: "sessionAffinityConfig.clientIP.timeoutSeconds ...
/// Default value is 10800 (for 3 hours)".
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
/// Largest ClientIP affinity timeout the API server accepts (one day).
pub const MAX_AFFINITY_TIMEOUT: u32 = 86400;

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectName {
    /// A name in a namespace.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The name of a Service.
pub type ServiceName = ObjectName;

/// A transport protocol a Service port can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The API spelling: `TCP`, `UDP`, `SCTP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Lower case, as kube-proxy hashes it and iptables spells it: `tcp`, `udp`, `sctp`.
    pub fn as_lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Parses the API spelling (case-sensitive, as the API server is).
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// The API spelling: `IPv4`, `IPv6`.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

/// `spec.ipFamilyPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamilyPolicy {
    /// One family (the default).
    SingleStack,
    /// Two families when the cluster has them.
    PreferDualStack,
    /// Two families or fail.
    RequireDualStack,
}

/// `spec.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceType {
    /// A virtual IP inside the cluster (the default); headless when `clusterIP: None`.
    ClusterIp,
    /// ClusterIP plus a port on every node.
    NodePort,
    /// NodePort plus an external load balancer address.
    LoadBalancer,
    /// A DNS alias (CNAME); no proxying at all.
    ExternalName,
}

impl ServiceType {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        }
    }

    /// Whether the type allocates node ports.
    pub fn has_node_ports(self) -> bool {
        matches!(self, ServiceType::NodePort | ServiceType::LoadBalancer)
    }
}

/// `targetPort`: a number, or the name of a container port resolved per Pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A named container port.
    Name(String),
}

impl fmt::Display for TargetPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetPort::Number(n) => write!(f, "{n}"),
            TargetPort::Name(s) => f.write_str(s),
        }
    }
}

/// One entry of `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ServicePort {
    /// Port name (empty when the Service has a single unnamed port).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// The port on the ClusterIP, externalIPs and load balancer IPs.
    pub port: u16,
    /// Where traffic goes on the endpoints.
    pub target_port: TargetPort,
    /// The node port, for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
    /// `appProtocol`, kept for display.
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// A port: `protocol` `port` on the Service's addresses, `target_port` on the
    /// endpoints; no node port, no appProtocol.
    pub fn new(
        name: impl Into<String>,
        protocol: Protocol,
        port: u16,
        target_port: TargetPort,
    ) -> ServicePort {
        ServicePort {
            name: name.into(),
            protocol,
            port,
            target_port,
            node_port: None,
            app_protocol: None,
        }
    }
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster (the default).
    Cluster,
    /// Only endpoints on the node that received the traffic.
    Local,
}

impl TrafficPolicy {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }
    }
}

/// `sessionAffinity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SessionAffinity {
    /// No affinity (the default).
    None,
    /// Connections from one client IP go to the same endpoint until the timeout.
    ClientIp {
        /// Seconds of inactivity after which affinity is forgotten.
        timeout_seconds: u32,
    },
}

/// A Service.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Service {
    /// Namespace and name.
    pub name: ServiceName,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// `spec.type`.
    pub service_type: ServiceType,
    /// `spec.clusterIPs` (primary first); empty for headless and ExternalName Services.
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`.
    pub headless: bool,
    /// `spec.selector`; `None` when the Service has no selector (endpoints come from
    /// Endpoints or EndpointSlice objects written by someone else).
    pub selector: Option<LabelSelector>,
    /// `spec.ports`.
    pub ports: Vec<ServicePort>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`; the loader grants a requested
    /// `spec.loadBalancerIP` here when the status names none (it acts as the cloud's
    /// load balancer controller).
    pub load_balancer_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` with `ipMode: Proxy`: the load balancer
    /// delivers that traffic to the node itself (with the node's address as destination),
    /// so no rule is written for these addresses, as kube-proxy does. Not in
    /// `load_balancer_ips`.
    pub load_balancer_proxy_ips: Vec<IpAddr>,
    /// `spec.loadBalancerIP` (deprecated in Kubernetes, still common).
    pub requested_load_balancer_ip: Option<IpAddr>,
    /// `spec.loadBalancerSourceRanges`.
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// `spec.sessionAffinity` and its timeout.
    pub session_affinity: SessionAffinity,
    /// `spec.externalTrafficPolicy`.
    pub external_traffic_policy: TrafficPolicy,
    /// `spec.internalTrafficPolicy`.
    pub internal_traffic_policy: TrafficPolicy,
    /// `spec.healthCheckNodePort`.
    pub health_check_node_port: Option<u16>,
    /// `spec.ipFamilies`.
    pub ip_families: Vec<IpFamily>,
    /// `spec.ipFamilyPolicy`.
    pub ip_family_policy: IpFamilyPolicy,
    /// `spec.externalName`.
    pub external_name: Option<String>,
    /// `spec.publishNotReadyAddresses`.
    pub publish_not_ready_addresses: bool,
    /// `spec.trafficDistribution`: read by the EndpointSlice controller, which writes the
    /// hints the proxy follows (the proxy itself reads only hints).
    pub traffic_distribution: Option<TrafficDistribution>,
    /// `metadata.creationTimestamp`, seconds since the epoch, when given.
    pub created: Option<i64>,
}

/// `spec.trafficDistribution`: where the EndpointSlice controller asks proxies to send a
/// Service's traffic (as hints on each endpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrafficDistribution {
    /// `PreferClose` (GA in 1.33): the same zone, the older name of `PreferSameZone`.
    PreferClose,
    /// `PreferSameZone`: endpoints in the client node's zone when it has some.
    PreferSameZone,
    /// `PreferSameNode`: endpoints on the client's node when it has some, else the zone's.
    PreferSameNode,
}

impl TrafficDistribution {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficDistribution::PreferClose => "PreferClose",
            TrafficDistribution::PreferSameZone => "PreferSameZone",
            TrafficDistribution::PreferSameNode => "PreferSameNode",
        }
    }

    /// Reads the API spelling.
    pub fn parse(s: &str) -> Option<TrafficDistribution> {
        match s {
            "PreferClose" => Some(TrafficDistribution::PreferClose),
            "PreferSameZone" => Some(TrafficDistribution::PreferSameZone),
            "PreferSameNode" => Some(TrafficDistribution::PreferSameNode),
            _ => None,
        }
    }
}

impl Service {
    /// A ClusterIP Service with defaults everywhere; a starting point for tests and tools.
    pub fn new(name: ServiceName) -> Service {
        Service {
            name,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            service_type: ServiceType::ClusterIp,
            cluster_ips: Vec::new(),
            headless: false,
            selector: None,
            ports: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            load_balancer_proxy_ips: Vec::new(),
            requested_load_balancer_ip: None,
            load_balancer_source_ranges: Vec::new(),
            session_affinity: SessionAffinity::None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            ip_families: Vec::new(),
            ip_family_policy: IpFamilyPolicy::SingleStack,
            external_name: None,
            publish_not_ready_addresses: false,
            traffic_distribution: None,
            created: None,
        }
    }

    /// Whether kube-proxy programs anything for this Service: not headless, not ExternalName.
    pub fn is_proxied(&self) -> bool {
        !self.headless && self.service_type != ServiceType::ExternalName
    }

    /// `spec.ipFamilies`; when it is empty, the families of the cluster IPs (the API server
    /// defaults `ipFamilies` from `clusterIPs`), so a Service built by hand with addresses
    /// only is not silently left out.
    pub fn families(&self) -> Vec<IpFamily> {
        if !self.ip_families.is_empty() {
            return self.ip_families.clone();
        }
        let mut out: Vec<IpFamily> = Vec::new();
        for ip in self.cluster_ips.iter().chain(&self.external_ips) {
            let f = IpFamily::of(ip);
            if !out.contains(&f) {
                out.push(f);
            }
        }
        out
    }

    /// The primary cluster IP.
    pub fn cluster_ip(&self) -> Option<IpAddr> {
        self.cluster_ips.first().copied()
    }

    /// Whether external traffic (NodePort, externalIPs, LB) uses only node-local endpoints.
    pub fn external_policy_local(&self) -> bool {
        self.external_traffic_policy == TrafficPolicy::Local
            && (self.service_type.has_node_ports() || !self.external_ips.is_empty())
    }
}

/// An operator of a `matchExpressions` requirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SelectorOperator {
    /// The label's value is one of the values.
    In,
    /// The label is absent or its value is none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One `matchExpressions` requirement.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// Operator.
    pub operator: SelectorOperator,
    /// Values (empty for Exists and DoesNotExist).
    pub values: BTreeSet<String>,
}

impl Requirement {
    /// Whether a label set satisfies this requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.contains(v)),
            SelectorOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector: `matchLabels` AND every `matchExpressions` requirement.
///
/// An empty selector matches everything (as in Deployments); a Service without a selector
/// is represented by `Service::selector == None`, not by an empty selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSelector {
    /// `matchLabels`: every key must have exactly this value.
    pub match_labels: BTreeMap<String, String>,
    /// `matchExpressions`.
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// A selector of `matchLabels` only, as Services and ReplicationControllers use.
    pub fn from_labels(labels: BTreeMap<String, String>) -> Self {
        LabelSelector {
            match_labels: labels,
            match_expressions: Vec::new(),
        }
    }

    /// Whether a label set matches.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector has no terms (and so matches everything).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

impl fmt::Display for LabelSelector {
    /// kubectl's spelling: `app=vote,tier in (front,back),!legacy`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| -> fmt::Result {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            Ok(())
        };
        for (k, v) in &self.match_labels {
            sep(f)?;
            write!(f, "{k}={v}")?;
        }
        for r in &self.match_expressions {
            sep(f)?;
            let values = r.values.iter().cloned().collect::<Vec<_>>().join(",");
            match r.operator {
                SelectorOperator::In => write!(f, "{} in ({values})", r.key)?,
                SelectorOperator::NotIn => write!(f, "{} notin ({values})", r.key)?,
                SelectorOperator::Exists => write!(f, "{}", r.key)?,
                SelectorOperator::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

/// A named container port, used to resolve named `targetPort`s.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    /// Port name (may be empty).
    pub name: String,
    /// Port number.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// `status.phase` of a Pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PodPhase {
    /// Accepted, not running yet.
    Pending,
    /// Running.
    Running,
    /// All containers exited successfully.
    Succeeded,
    /// All containers exited, one failed.
    Failed,
}

/// A Pod, as far as endpoints and DNS care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Namespace and name.
    pub name: ObjectName,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// The endpoint weight from the `svcnat.io/weight` annotation.
    pub weight: u32,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// `status.podIPs` (primary first).
    pub ips: Vec<IpAddr>,
    /// Container ports, for named target ports.
    pub ports: Vec<ContainerPort>,
    /// `status.phase`.
    pub phase: PodPhase,
    /// The Ready condition.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// `spec.hostname`.
    pub hostname: Option<String>,
    /// `spec.subdomain`.
    pub subdomain: Option<String>,
    /// The workload that owns it, as `Kind/name`.
    pub owner: Option<String>,
    /// `metadata.creationTimestamp`, seconds since the epoch, when given.
    pub created: Option<i64>,
}

impl Pod {
    /// A running, ready Pod with one IP and no ports; a starting point for tests and tools.
    pub fn new(name: ObjectName, ip: IpAddr) -> Pod {
        Pod {
            name,
            labels: BTreeMap::new(),
            weight: DEFAULT_WEIGHT,
            node_name: None,
            ips: vec![ip],
            ports: Vec::new(),
            phase: PodPhase::Running,
            ready: true,
            terminating: false,
            hostname: None,
            subdomain: None,
            owner: None,
            created: None,
        }
    }
}

/// A Node.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Node {
    /// Node name.
    pub name: String,
    /// `status.addresses` of type InternalIP and ExternalIP.
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs`.
    pub pod_cidrs: Vec<IpNet>,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// The Node is going away: `metadata.deletionTimestamp` is set, or the cluster
    /// autoscaler tainted it `ToBeDeletedByClusterAutoscaler`. kube-proxy then fails its
    /// `/healthz` so that load balancers drain the node (KEP-3836).
    pub terminating: bool,
}

impl Node {
    /// A Node named `name` with no addresses, pod CIDRs or zone, not terminating.
    pub fn new(name: impl Into<String>) -> Node {
        Node {
            name: name.into(),
            addresses: Vec::new(),
            pod_cidrs: Vec::new(),
            zone: None,
            terminating: false,
        }
    }
}

/// The taint the cluster autoscaler puts on a Node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// An endpoint of an EndpointSlice: one address with its conditions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub struct Endpoint {
    /// The address.
    pub ip: IpAddr,
    /// `conditions.ready`: serving and not terminating.
    pub ready: bool,
    /// `conditions.serving`: passing readiness, terminating or not.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// `nodeName`.
    pub node_name: Option<String>,
    /// `zone`.
    pub zone: Option<String>,
    /// `hostname` (headless DNS).
    pub hostname: Option<String>,
    /// `targetRef.name` when it refers to a Pod.
    pub pod: Option<String>,
    /// Weight (svcnat extension).
    pub weight: u32,
    /// `hints.forZones[].name`: the zones whose proxies should use this endpoint.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`: the nodes whose proxies should use this endpoint.
    pub node_hints: Vec<String>,
}

impl Endpoint {
    /// A ready, serving endpoint at `ip` with the default weight and nothing else set.
    pub fn new(ip: IpAddr) -> Endpoint {
        Endpoint {
            ip,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone: None,
            hostname: None,
            pod: None,
            weight: DEFAULT_WEIGHT,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointPort {
    /// The Service port name this port serves.
    pub name: String,
    /// Port number on the endpoints.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// An EndpointSlice: endpoints that share one port mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    /// The Service it belongs to.
    pub service: ServiceName,
    /// The slice's own name.
    pub name: String,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Ports.
    pub ports: Vec<EndpointPort>,
}

/// A resolved endpoint of one Service port: address, port and conditions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortEndpoint {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The port on the endpoint.
    pub port: u16,
}

/// The cluster state lives in [`crate::cluster`]; re-exported here for existing paths.
pub use crate::cluster::Cluster;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A label map from pairs (shared by the crate's tests).
    pub(crate) fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: SelectorOperator, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator: op,
            values: values.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn selector_operators() {
        let l = labels(&[("app", "vote"), ("tier", "front")]);
        let sel = |r| LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![r],
        };
        use SelectorOperator::*;
        assert!(sel(req("tier", In, &["front", "back"])).matches(&l));
        assert!(!sel(req("tier", In, &["back"])).matches(&l));
        assert!(sel(req("tier", NotIn, &["back"])).matches(&l));
        assert!(!sel(req("tier", NotIn, &["front"])).matches(&l));
        assert!(sel(req("missing", NotIn, &["x"])).matches(&l));
        assert!(sel(req("app", Exists, &[])).matches(&l));
        assert!(!sel(req("missing", Exists, &[])).matches(&l));
        assert!(sel(req("missing", DoesNotExist, &[])).matches(&l));
        assert!(!sel(req("app", DoesNotExist, &[])).matches(&l));
        assert!(LabelSelector::default().matches(&l));
        let both = LabelSelector {
            match_labels: labels(&[("app", "vote")]),
            match_expressions: vec![req("tier", In, &["back"])],
        };
        assert!(!both.matches(&l));
        assert_eq!(
            LabelSelector {
                match_labels: labels(&[("app", "vote")]),
                match_expressions: vec![
                    req("tier", In, &["back", "front"]),
                    req("x", DoesNotExist, &[])
                ],
            }
            .to_string(),
            "app=vote,tier in (back,front),!x"
        );
    }
}
