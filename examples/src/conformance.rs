//! The backend conformance suite: one set of scenarios, written once, run with real
//! packets against every backend.
//!
//! Each scenario builds its own [`Testbed`] (two nodes, two clients, pods on both nodes),
//! a [`Cluster`] whose Pods are the testbed's pods, and one [`NodeAgent`] per node driving
//! the backend under test in that node's namespace. It then changes the cluster, syncs, and
//! checks what real clients see. A backend's test file mounts the whole suite with
//! [`conformance_suite!`](crate::conformance_suite); scenarios a backend cannot express are
//! declared by [`Backend::unsupported`] and reported as skipped with the reason.
//!
//! Two feeds carry the cluster to the agents ([`Feed`]): directly, or through the API.
//! Through the API, every change a scenario makes is written to a fake API server
//! ([`crate::fakeapi::Publisher`]: Services, the EndpointSlices the simulated controller
//! made of the Pods, Nodes; only what changed), each node follows it with its own
//! [`crate::api::ApiSource`] (the kube-rs watchers of `svcnat-proxy --kubeconfig`), and a
//! sync waits until every node's API-fed view compiles to the plan the cluster compiles
//! before it programs the node from that view. The scenarios are the same code for both;
//! [`conformance_suite_api!`](crate::conformance_suite_api) mounts them through the API.
//!
//! Counts are checked against statistical bounds: with `n` tries and probability `p` an
//! endpoint's count must lie within five standard deviations of `n·p`, which a correct
//! datapath misses about once in three million runs.

// This module is a test harness: a failed check is an assertion, and assertions panic.
#![allow(clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use svcnat_core::model::IpFamily;
use svcnat_core::model::*;
use svcnat_core::plan::{Dataplane, NodeContext};

use crate::agent::NodeAgent;
use crate::proxy::Metrics;
use crate::svchealth::ServiceHealth;
use through_api::ApiFeed;

mod through_api;
use crate::testbed::{Attempt, NodeSpec, PodSpec, ProbeArgs, ProbeResult, Testbed, TestbedSpec};
pub use through_api::AGREE_WITHIN;

/// The port every test pod serves HTTP (and the line protocol) on.
pub const POD_TCP: u16 = 8080;
/// The port every test pod answers UDP on.
pub const POD_UDP: u16 = 5353;
/// The port every test pod listens on for SCTP, when the kernel has SCTP.
pub const POD_SCTP: u16 = 7070;
/// The address range of test Services.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The pods' IPv6 range (the nodes' `fd00:10:244:<i>::/64` pod CIDRs).
pub const CLUSTER_CIDR6: &str = "fd00:10:244::/48";
/// The load balancer address routed from the clients to node 0.
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);
/// The IPv6 load balancer address routed from the clients to node 0.
pub const LB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x60, 0, 0, 0, 0, 0, 0x10);

/// A backend under test.
pub trait Backend {
    /// Its dataplane.
    type Dp: Dataplane;
    /// A short name for messages.
    fn name(&self) -> String;
    /// A dataplane that programs the node whose network namespace is `node_ns`.
    fn dataplane(&self, node_ns: &str) -> Result<Self::Dp, String>;
    /// Why the backend cannot run a scenario, if it cannot.
    fn unsupported(&self, _scenario: Scenario) -> Option<&'static str> {
        None
    }
    /// Why the backend cannot run a scenario over IPv6, if it cannot (asked in addition
    /// to [`Backend::unsupported`]).
    fn unsupported_v6(&self, _scenario: Scenario) -> Option<&'static str> {
        None
    }
}

/// The scenarios of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scenario {
    /// A ClusterIP spreads new connections over every endpoint.
    ClusterIpSpread,
    /// A NodePort answers on every node's address.
    NodePortOnEveryNode,
    /// externalIPs (the nodes' addresses) answer on the service port.
    ExternalIps,
    /// A LoadBalancer IP admits clients in loadBalancerSourceRanges and drops the rest.
    LoadBalancerSourceRanges,
    /// A Service without endpoints refuses connections (REJECT), it does not hang.
    NoEndpointsRefused,
    /// The lab's exercise: the selector changed to a missing label, then back.
    SelectorToMissingLabel,
    /// Scaling endpoints down and up changes the spread.
    Scaling,
    /// ClientIP affinity keeps a client on one endpoint.
    ClientIpAffinity,
    /// externalTrafficPolicy Local: local endpoints only, the client's address kept, and
    /// nothing (DROP) on a node without local endpoints.
    ExternalTrafficLocal,
    /// internalTrafficPolicy Local: a ClusterIP reached from a pod goes only to endpoints
    /// on the pod's own node, and nowhere (DROP) when its node has none, even while other
    /// nodes do; the NodePort of the same Service keeps spreading over every endpoint.
    InternalTrafficLocal,
    /// Terminating endpoints take traffic only when no endpoint is ready.
    TerminatingFallback,
    /// A pod reaching its own Service lands on itself (hairpin masquerade).
    Hairpin,
    /// A UDP Service.
    Udp,
    /// Weighted endpoints (3:1) split about 3:1.
    Weighted,
    /// An established TCP connection survives unrelated endpoints coming and going.
    EstablishedSurvives,
    /// Two zones and `trafficDistribution: PreferClose`: traffic stays in the client
    /// node's zone while the zone has endpoints, and spreads over the others when not.
    TopologyZones,
    /// A load balancer ingress IP with `ipMode: Proxy` gets no rule (the load balancer
    /// delivers to the node itself); with `ipMode: VIP` it is translated.
    LoadBalancerIpModeProxy,
    /// A UDP client sending steadily from one port follows its Service's endpoint when it
    /// is replaced, and is answered as soon as a Service that had no endpoints (or did not
    /// exist yet) gets one: stale conntrack entries are deleted, and only those.
    UdpEndpointReplaced,
    /// A dual-stack Service (`RequireDualStack`, a cluster IP per family) reached over
    /// both families, its ClusterIPs and its NodePort; endpoints leave both families at
    /// once. Always runs on a dual-stack testbed.
    DualStack,
    /// NodePorts answer on every address of the node, not only its node IP (a second
    /// address added to node 0), and no longer on it with `--nodeport-addresses primary`.
    NodePortOnEveryAddress,
    /// NodePorts answer on 127.0.0.1 from the node itself (`--localhost-nodeports`,
    /// `route_localnet`); IPv4 only, as in kube-proxy.
    NodePortOnLocalhost,
    /// SCTP: a ClusterIP and a NodePort of protocol SCTP spread associations over the
    /// pods, and a Service without endpoints refuses them. Skipped, with the reason, on a
    /// kernel without SCTP ([`crate::sctp::available`]).
    Sctp,
    /// `healthCheckNodePort` of an `externalTrafficPolicy: Local` LoadBalancer: each node
    /// serves it (svcnat's [`crate::svchealth::ServiceHealth`], bound in the node's
    /// namespace and fed the node's plan), a LAN client sees 200 with the node's number of
    /// local endpoints, 503 on a node without any, the answer follows endpoints as they
    /// move, and the port closes with the Service.
    HealthCheckNodePort,
    /// The node's own traffic (kubelet probes, hostNetwork pods) to a ClusterIP, TCP and
    /// UDP, from node 0's namespace: endpoints on the same node and on the other node are
    /// all reached, and the replies come from the ClusterIP (the probe's sockets are
    /// connected to it).
    ClusterIpFromNode,
    /// The node's own traffic to a NodePort on its own address (`curl NODE_IP:30093` on
    /// the node), TCP and UDP, from node 0's namespace: endpoints on both nodes are all
    /// reached, the replies come from the node's address and NodePort (the probe's
    /// sockets are connected to it), and the node is refused once there is no endpoint.
    NodePortFromNode,
    /// [`MANY`] TCP connections open at once from one LAN client to a NodePort whose one
    /// endpoint is behind the masquerade (policy Cluster): every one opens, and every one
    /// is answered afterwards through its own translation. The kernel's NAT gives each any
    /// free port of its range; a datapath that splits its range among connection-table
    /// shards must too (the userspace datapath's masquerade range is 4,536 ports).
    ManyConnectionsAtOnce,
}

/// Connections [`Scenario::ManyConnectionsAtOnce`] holds open together: 97% of the
/// userspace datapath's masquerade range (61000-65535).
pub const MANY: u32 = 4_400;

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 22] = [
        Scenario::ClusterIpSpread,
        Scenario::NodePortOnEveryNode,
        Scenario::ExternalIps,
        Scenario::LoadBalancerSourceRanges,
        Scenario::NoEndpointsRefused,
        Scenario::SelectorToMissingLabel,
        Scenario::Scaling,
        Scenario::ClientIpAffinity,
        Scenario::ExternalTrafficLocal,
        Scenario::InternalTrafficLocal,
        Scenario::TerminatingFallback,
        Scenario::Hairpin,
        Scenario::Udp,
        Scenario::Weighted,
        Scenario::EstablishedSurvives,
        Scenario::TopologyZones,
        Scenario::LoadBalancerIpModeProxy,
        Scenario::UdpEndpointReplaced,
        Scenario::Sctp,
        Scenario::HealthCheckNodePort,
        Scenario::ClusterIpFromNode,
        Scenario::NodePortFromNode,
    ];
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A test pod: where it runs, its address and labels.
#[derive(Clone, Debug)]
pub struct TestPod {
    /// Name (also the name its server answers with).
    pub name: String,
    /// Node index.
    pub node: usize,
    /// IPv4 address.
    pub ip: IpAddr,
    /// IPv6 address.
    pub ip6: IpAddr,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// The standard pods: `web-0`..`web-4` (three on node 0, two on node 1) labelled
/// `app=web` and `pod=<name>`, and `tester` on node 0 with no app label, the in-cluster
/// client. Each has an IPv4 address (`10.244.<node>.<n>`) and an IPv6 one
/// (`fd00:10:244:<node>::<n>`, used when the scenario runs over IPv6).
pub fn standard_pods() -> Vec<TestPod> {
    let mut pods = Vec::new();
    for (i, node) in [0usize, 0, 0, 1, 1].into_iter().enumerate() {
        let name = format!("web-{i}");
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), "web".to_string());
        labels.insert("pod".to_string(), name.clone());
        pods.push(TestPod {
            ip: IpAddr::from([10, 244, node as u8, 10 + i as u8]),
            ip6: pod_ip6(node, 10 + i as u16),
            name,
            node,
            labels,
        });
    }
    let mut labels = BTreeMap::new();
    labels.insert("pod".to_string(), "tester".to_string());
    pods.push(TestPod {
        name: "tester".into(),
        node: 0,
        ip: IpAddr::from([10, 244, 0, 99]),
        ip6: pod_ip6(0, 99),
        labels,
    });
    pods
}

fn pod_ip6(node: usize, n: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, node as u16, 0, 0, 0, n))
}

/// How the agents hear of the fixture's cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Feed {
    /// Each agent syncs from the cluster itself.
    #[default]
    Direct,
    /// The cluster is published to a fake API server, and each agent syncs from the
    /// cluster its own API watchers built (see the [module](self) docs).
    Api,
}

/// A running scenario: testbed, cluster, and one agent per node.
pub struct Fixture<B: Backend> {
    /// The namespaces.
    pub tb: Testbed,
    /// The cluster the scenario changes (and, fed directly, the agents compile).
    pub cluster: Cluster,
    /// One agent per node, in node order.
    pub agents: Vec<NodeAgent<B::Dp>>,
    pods: Vec<TestPod>,
    api: Option<ApiFeed>,
    family: IpFamily,
    /// Each node's service health server and the metrics that tell it the node's proxy is
    /// healthy, once [`Fixture::serve_service_health`] was called.
    health: Vec<(ServiceHealth, Arc<Metrics>)>,
}

impl<B: Backend> Fixture<B> {
    /// Builds the testbed (two nodes, two clients, the standard pods) and one agent per
    /// node, fed directly; nothing is synced yet.
    pub fn new(backend: &B) -> Fixture<B> {
        Fixture::with_feed(backend, Feed::Direct)
    }

    /// Builds the testbed and one agent per node, fed as `feed` says; nothing is synced
    /// yet.
    pub fn with_feed(backend: &B, feed: Feed) -> Fixture<B> {
        Fixture::with_family(backend, feed, IpFamily::V4)
    }

    /// Builds the testbed and one agent per node, fed as `feed` says, for scenarios over
    /// `family`. For IPv6 the testbed is dual-stack (nodes, clients and pods have both
    /// families' addresses, the nodes' contexts and Node objects too), and the fixture's
    /// Service addresses ([`Fixture::vip`]), node, client and load balancer addresses are
    /// IPv6 ones; nothing is synced yet.
    pub fn with_family(backend: &B, feed: Feed, family: IpFamily) -> Fixture<B> {
        let pods = standard_pods();
        let v6 = family == IpFamily::V6;
        let mut spec = TestbedSpec::new(2, 2).lb_route(IpAddr::V4(LB_IP));
        if v6 {
            spec = spec.with_ipv6().lb_route(IpAddr::V6(LB_IP6));
        }
        for p in &pods {
            let mut pod = PodSpec::new(p.name.clone(), p.node, p.ip);
            if v6 {
                pod = pod.with_ip(p.ip6);
            }
            spec = spec.pod(pod.tcp(POD_TCP).udp(POD_UDP));
        }
        // The pods serve SCTP too where the kernel has it.
        let sctp = crate::sctp::available().is_ok();
        if sctp {
            spec.pods = spec.pods.into_iter().map(|p| p.sctp(POD_SCTP)).collect();
        }
        let tb = match Testbed::new(spec) {
            Ok(tb) => tb,
            Err(e) => panic!("testbed: {e}"),
        };
        let mut cluster = Cluster::simulated();
        for (i, n) in tb.nodes().iter().enumerate() {
            cluster.upsert_node(node_object(n, i));
        }
        for p in &pods {
            cluster.upsert_pod(pod_object(p, v6));
        }
        let mut cidr = CLUSTER_CIDR.parse().ok().into_iter().collect::<Vec<_>>();
        if v6 {
            cidr.extend(CLUSTER_CIDR6.parse::<ipnet::IpNet>().ok());
        }
        let agents = (0..tb.nodes().len())
            .map(|i| {
                let n = tb.node(i);
                let ctx = NodeContext::new(n.name.clone(), node_addresses(n), cidr.clone());
                let dp = match backend.dataplane(tb.ns_of_node(i)) {
                    Ok(dp) => dp,
                    Err(e) => panic!("{}: dataplane for node {i}: {e}", backend.name()),
                };
                NodeAgent::new(ctx, dp)
            })
            .collect::<Vec<NodeAgent<B::Dp>>>();
        let api = match feed {
            Feed::Direct => None,
            Feed::Api => {
                let nodes: Vec<NodeContext> =
                    agents.iter().map(|a| a.plan().node().clone()).collect();
                match ApiFeed::start(&nodes) {
                    Ok(feed) => Some(feed),
                    Err(e) => panic!("{}: {e}", backend.name()),
                }
            }
        };
        Fixture {
            tb,
            cluster,
            agents,
            pods,
            api,
            family,
            health: Vec::new(),
        }
    }

    /// Serves every node's health check node ports from now on, as `svcnat-proxy` does: a
    /// [`ServiceHealth`] per node, bound on every address inside the node's namespace and
    /// fed the node's plan after each sync (the node's proxy counts as healthy: each sync
    /// is recorded as successful).
    pub fn serve_service_health(&mut self) {
        for i in 0..self.agents.len() {
            let metrics = Arc::new(Metrics::new(Duration::from_secs(3600)));
            let health = match ServiceHealth::new(Vec::new(), metrics.clone()) {
                Ok(h) => h.in_netns(self.tb.ns_of_node(i)),
                Err(e) => panic!("service health server for node {i}: {e}"),
            };
            self.health.push((health, metrics));
        }
        self.sync();
    }

    /// The family the scenario runs over.
    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// Service address number `n` of the scenario's family: `10.96.0.<n>`, or
    /// `fd00:10:96::<n>` (the same digits, read as hexadecimal).
    pub fn vip(&self, n: u16) -> IpAddr {
        match self.family {
            IpFamily::V4 => IpAddr::from([10, 96, (n >> 8) as u8, n as u8]),
            IpFamily::V6 => IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                0x10,
                0x96,
                0,
                0,
                0,
                0,
                u16::from_str_radix(&n.to_string(), 16).unwrap_or(n),
            )),
        }
    }

    /// The load balancer address of the scenario's family (routed to node 0).
    pub fn lb_ip(&self) -> IpAddr {
        match self.family {
            IpFamily::V4 => IpAddr::V4(LB_IP),
            IpFamily::V6 => IpAddr::V6(LB_IP6),
        }
    }

    /// Client `i`'s address in the scenario's family.
    pub fn client_ip(&self, i: usize) -> IpAddr {
        match self.family {
            IpFamily::V4 => self.tb.client_ip(i),
            IpFamily::V6 => match self.tb.client_ip6(i) {
                Some(ip) => ip,
                None => panic!("client {i} has no IPv6 address"),
            },
        }
    }

    /// A Service in `default` selecting `key=value` at [`Fixture::vip`] `n`, with one port
    /// `port` -> the pods' port of that protocol.
    pub fn service(
        &self,
        name: &str,
        key: &str,
        value: &str,
        n: u16,
        port: u16,
        protocol: Protocol,
    ) -> Service {
        service(name, key, value, self.vip(n), port, protocol)
    }

    /// Syncs every node: from the cluster, or (fed through the API) once every node's
    /// API view agrees with it, from that view.
    pub fn sync(&mut self) {
        if let Some(api) = &mut self.api {
            let nodes: Vec<NodeContext> = self
                .agents
                .iter()
                .map(|a| a.plan().node().clone())
                .collect();
            if let Err(e) = api.publish_and_agree(&self.cluster, &nodes) {
                panic!("through the API: {e}");
            }
        }
        for (i, a) in self.agents.iter_mut().enumerate() {
            let cluster = match &self.api {
                Some(api) => match api.cluster(i) {
                    Some(c) => c,
                    None => panic!("no API view for node {i}"),
                },
                None => &self.cluster,
            };
            let report = match a.sync(cluster) {
                Err(e) => panic!("sync of node {i} failed: {e}"),
                Ok(r) => r,
            };
            assert!(
                report.conntrack_errors.is_empty(),
                "sync of node {i}: {:?}",
                report.conntrack_errors
            );
            if let Some((health, metrics)) = self.health.get_mut(i) {
                metrics.sync_ok(Instant::now(), Duration::ZERO, &report, 0);
                health.update(a.plan());
            }
        }
    }

    /// Removes a Service of `default` and syncs.
    pub fn remove_service(&mut self, name: &str) {
        self.cluster
            .remove_service(&ServiceName::new("default", name));
        self.sync();
    }

    /// Adds or replaces a Service and syncs.
    pub fn set_service(&mut self, svc: Service) {
        self.cluster.upsert_service(svc);
        self.sync();
    }

    /// Changes a pod object (labels, readiness, weight) and syncs.
    pub fn update_pod(&mut self, name: &str, f: impl FnOnce(&mut Pod)) {
        let Some(tp) = self.pods.iter().find(|p| p.name == name) else {
            panic!("no pod {name}");
        };
        let mut pod = self
            .cluster
            .pod(&ObjectName::new("default", tp.name.clone()))
            .cloned()
            .unwrap_or_else(|| pod_object(tp, self.family == IpFamily::V6));
        f(&mut pod);
        self.cluster.upsert_pod(pod);
        self.sync();
    }

    /// Removes pods from the cluster (their servers keep running: only the endpoints go).
    pub fn remove_pods(&mut self, names: &[&str]) {
        for n in names {
            self.cluster.remove_pod(&ObjectName::new("default", *n));
        }
        self.sync();
    }

    /// Adds the standard pod objects back.
    pub fn restore_pods(&mut self, names: &[&str]) {
        for p in self
            .pods
            .iter()
            .filter(|p| names.contains(&p.name.as_str()))
        {
            self.cluster
                .upsert_pod(pod_object(p, self.family == IpFamily::V6));
        }
        self.sync();
    }

    /// Probes from a pod's namespace.
    pub fn from_pod(&self, pod: &str, args: ProbeArgs) -> ProbeResult {
        let Some(ns) = self.tb.ns_of_pod(pod) else {
            panic!("no pod {pod}");
        };
        match self.tb.probe(ns, args) {
            Ok(r) => r,
            Err(e) => panic!("probe from {pod}: {e}"),
        }
    }

    /// Probes from client `i`.
    pub fn from_client(&self, i: usize, args: ProbeArgs) -> ProbeResult {
        match self.tb.probe(self.tb.ns_of_client(i), args) {
            Ok(r) => r,
            Err(e) => panic!("probe from client {i}: {e}"),
        }
    }

    /// The address of node `i` in the scenario's family.
    pub fn node_ip(&self, i: usize) -> IpAddr {
        match self.family {
            IpFamily::V4 => self.tb.node_ip(i),
            IpFamily::V6 => match self.tb.node_ip6(i) {
                Some(ip) => ip,
                None => panic!("node {i} has no IPv6 address"),
            },
        }
    }
}

impl<B: Backend> Drop for Fixture<B> {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.cleanup();
        }
    }
}

fn node_addresses(n: &NodeSpec) -> Vec<IpAddr> {
    let mut ips = vec![IpAddr::V4(n.ip)];
    ips.extend(n.ip6.map(IpAddr::V6));
    ips
}

fn node_object(n: &NodeSpec, _i: usize) -> Node {
    let mut node = Node::new(n.name.clone());
    node.addresses = node_addresses(n);
    node.pod_cidrs = n.pod_cidrs.clone();
    node
}

fn pod_object(p: &TestPod, v6: bool) -> Pod {
    let mut pod = Pod::new(ObjectName::new("default", p.name.clone()), p.ip);
    if v6 {
        pod.ips.push(p.ip6);
    }
    pod.labels = p.labels.clone();
    pod.node_name = Some(format!("node-{}", p.node));
    pod.ports.push(ContainerPort {
        name: "http".into(),
        port: POD_TCP,
        protocol: Protocol::Tcp,
    });
    pod
}

/// A Service in `default` selecting `key=value` at cluster IP `ip` (single stack, of
/// `ip`'s family), with one port `port` -> the pods' port of that protocol.
pub fn service(
    name: &str,
    key: &str,
    value: &str,
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
) -> Service {
    let mut svc = Service::new(ObjectName::new("default", name));
    svc.cluster_ips = vec![ip];
    svc.ip_families = vec![IpFamily::of(&ip)];
    let mut sel = BTreeMap::new();
    sel.insert(key.to_string(), value.to_string());
    svc.selector = Some(LabelSelector::from_labels(sel));
    svc.ports.push(ServicePort::new(
        String::new(),
        protocol,
        port,
        TargetPort::Number(match protocol {
            Protocol::Udp => POD_UDP,
            Protocol::Sctp => POD_SCTP,
            _ => POD_TCP,
        }),
    ));
    svc
}

fn sock(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// Checks that `count` lies within five standard deviations of `n·p`.
pub fn assert_binomial(what: &str, count: usize, n: usize, p: f64) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    let (lo, hi) = (mean - 5.0 * sd, mean + 5.0 * sd);
    assert!(
        (count as f64) >= lo && (count as f64) <= hi,
        "{what}: {count} of {n}, expected {mean:.0} (allowed {lo:.0}..={hi:.0})"
    );
}

fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Runs one scenario against a backend, fed directly (skips it, loudly, when the backend
/// declares it unsupported).
pub fn run<B: Backend>(backend: &B, scenario: Scenario) {
    run_with(backend, scenario, Feed::Direct);
}

/// Runs one scenario against a backend with the agents fed as `feed` says, over IPv4.
pub fn run_with<B: Backend>(backend: &B, scenario: Scenario, feed: Feed) {
    run_over(backend, scenario, feed, IpFamily::V4);
}

/// Runs one scenario against a backend with the agents fed as `feed` says, its Services,
/// clients and targets of `family` ([`Fixture::with_family`]; [`Scenario::DualStack`]
/// always uses both).
pub fn run_over<B: Backend>(backend: &B, scenario: Scenario, feed: Feed, family: IpFamily) {
    let family = if scenario == Scenario::DualStack {
        IpFamily::V6
    } else {
        family
    };
    let unsupported = backend
        .unsupported(scenario)
        .or(match family {
            IpFamily::V6 => backend.unsupported_v6(scenario),
            IpFamily::V4 => None,
        })
        .map(str::to_string)
        .or_else(|| match scenario {
            Scenario::Sctp => crate::sctp::available().err(),
            _ => None,
        });
    if let Some(why) = unsupported {
        eprintln!(
            "SKIP: {} cannot express {scenario} over {family:?}: {why}",
            backend.name()
        );
        return;
    }
    let mut f = Fixture::with_family(backend, feed, family);
    match scenario {
        Scenario::ClusterIpSpread => cluster_ip_spread(&mut f),
        Scenario::NodePortOnEveryNode => node_port_on_every_node(&mut f),
        Scenario::ExternalIps => external_ips(&mut f),
        Scenario::LoadBalancerSourceRanges => load_balancer_source_ranges(&mut f),
        Scenario::NoEndpointsRefused => no_endpoints_refused(&mut f),
        Scenario::SelectorToMissingLabel => selector_to_missing_label(&mut f),
        Scenario::Scaling => scaling(&mut f),
        Scenario::ClientIpAffinity => client_ip_affinity(&mut f),
        Scenario::ExternalTrafficLocal => external_traffic_local(&mut f),
        Scenario::InternalTrafficLocal => internal_traffic_local(&mut f),
        Scenario::TerminatingFallback => terminating_fallback(&mut f),
        Scenario::Hairpin => hairpin(&mut f),
        Scenario::Udp => udp(&mut f),
        Scenario::Weighted => weighted(&mut f),
        Scenario::EstablishedSurvives => established_survives(&mut f),
        Scenario::TopologyZones => topology_zones(&mut f),
        Scenario::LoadBalancerIpModeProxy => load_balancer_ip_mode_proxy(&mut f),
        Scenario::UdpEndpointReplaced => udp_endpoint_replaced(&mut f),
        Scenario::DualStack => dual_stack(&mut f),
        Scenario::NodePortOnEveryAddress => node_port_on_every_address(&mut f),
        Scenario::NodePortOnLocalhost => node_port_on_localhost(&mut f),
        Scenario::Sctp => sctp(&mut f),
        Scenario::HealthCheckNodePort => health_check_node_port(&mut f),
        Scenario::ClusterIpFromNode => cluster_ip_from_node(&mut f),
        Scenario::NodePortFromNode => node_port_from_node(&mut f),
        Scenario::ManyConnectionsAtOnce => many_connections_at_once(&mut f),
    }
}

const WEB: [&str; 5] = ["web-0", "web-1", "web-2", "web-3", "web-4"];

fn cluster_ip_spread<B: Backend>(f: &mut Fixture<B>) {
    f.set_service(f.service("web", "app", "web", 50, 80, Protocol::Tcp));
    let n = 250;
    let r = f.from_pod("tester", ProbeArgs::tcp(sock(f.vip(50), 80)).count(n));
    assert!(r.all_ok(), "ClusterIP: {r}");
    let per = r.per_pod();
    assert_eq!(
        per.keys().cloned().collect::<BTreeSet<_>>(),
        names(&WEB),
        "{r}"
    );
    for (pod, count) in per {
        assert_binomial(&pod, count, n as usize, 0.2);
    }
}

fn node_port_on_every_node<B: Backend>(f: &mut Fixture<B>) {
    let mut svc = f.service("web", "app", "web", 51, 80, Protocol::Tcp);
    svc.service_type = ServiceType::NodePort;
    svc.ports[0].node_port = Some(30080);
    f.set_service(svc);
    for node in 0..2 {
        let r = f.from_client(0, ProbeArgs::tcp(sock(f.node_ip(node), 30080)).count(100));
        assert!(r.all_ok(), "NodePort on node {node}: {r}");
        assert_eq!(
            r.pods(),
            names(&WEB),
            "NodePort on node {node} spreads: {r}"
        );
        // externalTrafficPolicy Cluster masquerades: pods never see the client.
        assert!(
            !r.client_ips().contains(&f.client_ip(0)),
            "NodePort with policy Cluster must masquerade: {r}"
        );
    }
}

fn external_ips<B: Backend>(f: &mut Fixture<B>) {
    let mut svc = f.service("web", "app", "web", 52, 80, Protocol::Tcp);
    svc.external_ips = vec![f.node_ip(0), f.node_ip(1)];
    f.set_service(svc);
    for node in 0..2 {
        let r = f.from_client(0, ProbeArgs::tcp(sock(f.node_ip(node), 80)).count(50));
        assert!(r.all_ok(), "externalIP {}: {r}", f.node_ip(node));
        assert!(r.pods().len() >= 3, "externalIP spreads: {r}");
    }
}

fn load_balancer_source_ranges<B: Backend>(f: &mut Fixture<B>) {
    let mut svc = f.service("web", "app", "web", 53, 80, Protocol::Tcp);
    svc.service_type = ServiceType::LoadBalancer;
    svc.ports[0].node_port = Some(30083);
    svc.load_balancer_ips = vec![f.lb_ip()];
    let allowed = f.client_ip(0);
    svc.load_balancer_source_ranges = vec![ipnet::IpNet::from(allowed)];
    f.set_service(svc.clone());
    let target = sock(f.lb_ip(), 80);
    let ok = f.from_client(0, ProbeArgs::tcp(target).count(20));
    assert!(ok.all_ok(), "client in loadBalancerSourceRanges: {ok}");
    let denied = f.from_client(1, ProbeArgs::tcp(target).count(3).timeout_ms(800));
    assert_eq!(
        denied.ok(),
        0,
        "client outside loadBalancerSourceRanges got through: {denied}"
    );
    assert_eq!(
        denied.timeouts(),
        3,
        "denied clients are dropped, not refused: {denied}"
    );
    // The range moves to the other client: enforced after an update, both ways.
    svc.load_balancer_source_ranges = vec![ipnet::IpNet::from(f.client_ip(1))];
    f.set_service(svc);
    let ok = f.from_client(1, ProbeArgs::tcp(target).count(10));
    assert!(
        ok.all_ok(),
        "client newly in loadBalancerSourceRanges: {ok}"
    );
    let denied = f.from_client(0, ProbeArgs::tcp(target).count(3).timeout_ms(800));
    assert_eq!(
        denied.ok(),
        0,
        "client no longer in the ranges got through: {denied}"
    );
}

fn topology_zones<B: Backend>(f: &mut Fixture<B>) {
    // node-0 (web-0, web-1, web-2 and the tester) in zone-a, node-1 (web-3, web-4) in
    // zone-b: the EndpointSlice controller hints each endpoint for its own zone.
    for (i, zone) in [(0, "zone-a"), (1, "zone-b")] {
        let mut node = node_object(f.tb.node(i), i);
        node.zone = Some(zone.into());
        f.cluster.upsert_node(node);
    }
    let mut svc = f.service("web", "app", "web", 63, 80, Protocol::Tcp);
    svc.traffic_distribution = Some(TrafficDistribution::PreferClose);
    f.set_service(svc);
    let target = sock(f.vip(63), 80);
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(60));
    assert!(r.all_ok(), "{r}");
    assert_eq!(
        r.pods(),
        names(&WEB[..3]),
        "zone-a's client left its zone: {r}"
    );
    // zone-a loses its endpoints: its node falls back to every endpoint (zone-b's).
    f.remove_pods(&WEB[..3]);
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(30));
    assert!(r.all_ok(), "{r}");
    assert_eq!(r.pods(), names(&WEB[3..]), "{r}");
    // Back: in-zone again.
    f.restore_pods(&WEB[..3]);
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(30));
    assert_eq!(r.pods(), names(&WEB[..3]), "{r}");
}

fn load_balancer_ip_mode_proxy<B: Backend>(f: &mut Fixture<B>) {
    let mut svc = f.service("web", "app", "web", 64, 80, Protocol::Tcp);
    svc.service_type = ServiceType::LoadBalancer;
    svc.ports[0].node_port = Some(30084);
    svc.load_balancer_ips = vec![f.lb_ip()];
    f.set_service(svc.clone());
    let lb = sock(f.lb_ip(), 80);
    let r = f.from_client(0, ProbeArgs::tcp(lb).count(10));
    assert!(r.all_ok(), "ipMode VIP: {r}");
    // The load balancer now proxies (ipMode Proxy): nothing on the node translates its
    // address any more, while the NodePort it would use keeps working.
    svc.load_balancer_ips.clear();
    svc.load_balancer_proxy_ips = vec![f.lb_ip()];
    f.set_service(svc);
    let r = f.from_client(0, ProbeArgs::tcp(lb).count(3).timeout_ms(800));
    assert_eq!(r.ok(), 0, "ipMode Proxy was translated: {r}");
    let np = sock(f.node_ip(0), 30084);
    let r = f.from_client(0, ProbeArgs::tcp(np).count(10));
    assert!(r.all_ok(), "NodePort: {r}");
}

fn no_endpoints_refused<B: Backend>(f: &mut Fixture<B>) {
    let mut svc = f.service("empty", "app", "nothing", 54, 80, Protocol::Tcp);
    svc.service_type = ServiceType::NodePort;
    svc.ports[0].node_port = Some(30084);
    f.set_service(svc);
    let r = f.from_pod(
        "tester",
        ProbeArgs::tcp(sock(f.vip(54), 80))
            .count(3)
            .timeout_ms(2000),
    );
    assert_eq!(
        r.refused(),
        3,
        "ClusterIP without endpoints must refuse: {r}"
    );
    let r = f.from_client(
        0,
        ProbeArgs::tcp(sock(f.node_ip(1), 30084))
            .count(3)
            .timeout_ms(2000),
    );
    assert_eq!(
        r.refused(),
        3,
        "NodePort without endpoints must refuse: {r}"
    );
}

fn selector_to_missing_label<B: Backend>(f: &mut Fixture<B>) {
    let mut svc = f.service("vote", "app", "web", 55, 80, Protocol::Tcp);
    f.set_service(svc.clone());
    let target = sock(f.vip(55), 80);
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(20));
    assert!(r.all_ok(), "before: {r}");
    let good = svc.selector.clone();
    let mut missing = BTreeMap::new();
    missing.insert("app".to_string(), "doesnotexist".to_string());
    svc.selector = Some(LabelSelector::from_labels(missing));
    f.set_service(svc.clone());
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(3).timeout_ms(2000));
    assert_eq!(r.refused(), 3, "selector on a missing label: {r}");
    svc.selector = good;
    f.set_service(svc);
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(50));
    assert!(r.all_ok(), "selector restored: {r}");
    assert_eq!(r.pods(), names(&WEB), "{r}");
}

fn scaling<B: Backend>(f: &mut Fixture<B>) {
    f.remove_pods(&["web-1", "web-2", "web-4"]);
    f.set_service(f.service("web", "app", "web", 56, 80, Protocol::Tcp));
    let target = sock(f.vip(56), 80);
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(60));
    assert!(r.all_ok(), "{r}");
    assert_eq!(r.pods(), names(&["web-0", "web-3"]), "scaled to 2: {r}");
    f.restore_pods(&["web-1", "web-2", "web-4"]);
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(150));
    assert!(r.all_ok(), "{r}");
    assert_eq!(r.pods(), names(&WEB), "scaled back to 5: {r}");
    f.remove_pods(&["web-0", "web-1", "web-2", "web-3"]);
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(20));
    assert_eq!(r.pods(), names(&["web-4"]), "scaled to 1: {r}");
}

fn client_ip_affinity<B: Backend>(f: &mut Fixture<B>) {
    let mut svc = f.service("sticky", "app", "web", 57, 80, Protocol::Tcp);
    svc.session_affinity = SessionAffinity::ClientIp {
        timeout_seconds: 300,
    };
    svc.service_type = ServiceType::NodePort;
    svc.ports[0].node_port = Some(30087);
    f.set_service(svc);
    let r = f.from_pod("tester", ProbeArgs::tcp(sock(f.vip(57), 80)).count(40));
    assert!(r.all_ok(), "{r}");
    assert_eq!(r.pods().len(), 1, "ClientIP affinity keeps one pod: {r}");
    let r = f.from_client(0, ProbeArgs::tcp(sock(f.node_ip(0), 30087)).count(40));
    assert!(r.all_ok(), "{r}");
    assert_eq!(r.pods().len(), 1, "ClientIP affinity via NodePort: {r}");
}

fn external_traffic_local<B: Backend>(f: &mut Fixture<B>) {
    let mut svc = f.service("local", "app", "web", 58, 80, Protocol::Tcp);
    svc.service_type = ServiceType::NodePort;
    svc.ports[0].node_port = Some(30088);
    svc.external_traffic_policy = TrafficPolicy::Local;
    f.set_service(svc);
    let client = f.client_ip(0);
    let r = f.from_client(0, ProbeArgs::tcp(sock(f.node_ip(0), 30088)).count(60));
    assert!(r.all_ok(), "{r}");
    assert_eq!(
        r.pods(),
        names(&["web-0", "web-1", "web-2"]),
        "node 0 uses its own pods: {r}"
    );
    assert_eq!(
        r.client_ips(),
        [client].into(),
        "the client's address is kept: {r}"
    );
    let r = f.from_client(0, ProbeArgs::tcp(sock(f.node_ip(1), 30088)).count(40));
    assert_eq!(
        r.pods(),
        names(&["web-3", "web-4"]),
        "node 1 uses its own pods: {r}"
    );
    f.remove_pods(&["web-3", "web-4"]);
    let r = f.from_client(
        0,
        ProbeArgs::tcp(sock(f.node_ip(1), 30088))
            .count(3)
            .timeout_ms(800),
    );
    assert_eq!(r.timeouts(), 3, "no local endpoints: dropped: {r}");
    // ClusterIP traffic is not affected by the external policy.
    let r = f.from_pod("tester", ProbeArgs::tcp(sock(f.vip(58), 80)).count(40));
    assert!(r.all_ok(), "{r}");
}

fn internal_traffic_local<B: Backend>(f: &mut Fixture<B>) {
    let mut svc = f.service("internal", "app", "web", 67, 80, Protocol::Tcp);
    svc.service_type = ServiceType::NodePort;
    svc.ports[0].node_port = Some(30089);
    svc.internal_traffic_policy = TrafficPolicy::Local;
    f.set_service(svc);
    let target = sock(f.vip(67), 80);
    // The tester lives on node 0 with web-0..2; web-3 and web-4 on node 1.
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(60));
    assert!(r.all_ok(), "{r}");
    assert_eq!(r.pods(), names(&WEB[..3]), "node 0's endpoints only: {r}");
    let r = f.from_pod("web-3", ProbeArgs::tcp(target).count(40));
    assert!(r.all_ok(), "{r}");
    assert_eq!(r.pods(), names(&WEB[3..]), "node 1's endpoints only: {r}");
    // externalTrafficPolicy (Cluster) governs the NodePort: every endpoint.
    let r = f.from_client(0, ProbeArgs::tcp(sock(f.node_ip(0), 30089)).count(100));
    assert!(r.all_ok(), "{r}");
    assert_eq!(
        r.pods(),
        names(&WEB),
        "the NodePort spreads over both nodes: {r}"
    );
    // Node 0 loses its endpoints: its pods' traffic is dropped, never sent to node 1.
    f.remove_pods(&WEB[..3]);
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(3).timeout_ms(800));
    assert_eq!(r.timeouts(), 3, "no local endpoint: dropped: {r}");
    let r = f.from_pod("web-3", ProbeArgs::tcp(target).count(20));
    assert!(r.all_ok(), "{r}");
    assert_eq!(r.pods(), names(&WEB[3..]), "{r}");
    // Back on node 0.
    f.restore_pods(&WEB[..3]);
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(30));
    assert!(r.all_ok(), "{r}");
    assert_eq!(r.pods(), names(&WEB[..3]), "{r}");
}

fn terminating_fallback<B: Backend>(f: &mut Fixture<B>) {
    f.remove_pods(&["web-2", "web-4"]);
    f.update_pod("web-1", |p| p.terminating = true);
    f.set_service(f.service("web", "app", "web", 59, 80, Protocol::Tcp));
    let target = sock(f.vip(59), 80);
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(60));
    assert!(r.all_ok(), "{r}");
    assert_eq!(
        r.pods(),
        names(&["web-0", "web-3"]),
        "ready endpoints only: {r}"
    );
    f.update_pod("web-0", |p| p.ready = false);
    f.update_pod("web-3", |p| p.ready = false);
    let r = f.from_pod("tester", ProbeArgs::tcp(target).count(20));
    assert!(r.all_ok(), "{r}");
    assert_eq!(
        r.pods(),
        names(&["web-1"]),
        "only the terminating endpoint is left: {r}"
    );
}

fn hairpin<B: Backend>(f: &mut Fixture<B>) {
    f.set_service(f.service("self", "pod", "web-0", 60, 80, Protocol::Tcp));
    let r = f.from_pod("web-0", ProbeArgs::tcp(sock(f.vip(60), 80)).count(10));
    assert!(r.all_ok(), "hairpin: {r}");
    assert_eq!(r.pods(), names(&["web-0"]), "{r}");
}

fn udp<B: Backend>(f: &mut Fixture<B>) {
    f.set_service(f.service("dns", "app", "web", 61, 53, Protocol::Udp));
    let r = f.from_pod("tester", ProbeArgs::udp(sock(f.vip(61), 53)).count(100));
    assert!(r.all_ok(), "UDP: {r}");
    assert_eq!(r.pods(), names(&WEB), "UDP spreads: {r}");
}

fn weighted<B: Backend>(f: &mut Fixture<B>) {
    f.remove_pods(&["web-1", "web-2", "web-4"]);
    f.update_pod("web-0", |p| p.weight = 3);
    f.update_pod("web-3", |p| p.weight = 1);
    f.set_service(f.service("web", "app", "web", 62, 80, Protocol::Tcp));
    let n = 400;
    let r = f.from_pod("tester", ProbeArgs::tcp(sock(f.vip(62), 80)).count(n));
    assert!(r.all_ok(), "{r}");
    let per = r.per_pod();
    assert_binomial(
        "web-0 (weight 3)",
        per.get("web-0").copied().unwrap_or(0),
        n as usize,
        0.75,
    );
    assert_binomial(
        "web-3 (weight 1)",
        per.get("web-3").copied().unwrap_or(0),
        n as usize,
        0.25,
    );
}

fn established_survives<B: Backend>(f: &mut Fixture<B>) {
    f.remove_pods(&["web-1", "web-2", "web-4"]);
    f.set_service(f.service("web", "app", "web", 63, 80, Protocol::Tcp));
    let Some(ns) = f.tb.ns_of_pod("tester").map(str::to_string) else {
        panic!("no tester pod");
    };
    let mut held = match f.tb.hold(&ns, sock(f.vip(63), 80)) {
        Ok(h) => h,
        Err(e) => panic!("hold: {e}"),
    };
    let first = held.ping("one").unwrap_or_else(|e| panic!("ping: {e}"));
    let pod = crate::testbed::reply_field(&first, "pod")
        .unwrap_or_default()
        .to_string();
    assert!(pod == "web-0" || pod == "web-3", "{first}");
    f.restore_pods(&["web-1"]);
    let again = held
        .ping("two")
        .unwrap_or_else(|e| panic!("ping after an endpoint was added: {e}"));
    assert_eq!(
        crate::testbed::reply_field(&again, "pod"),
        Some(pod.as_str()),
        "{again}"
    );
    let other = if pod == "web-0" { "web-3" } else { "web-0" };
    f.remove_pods(&[other]);
    let last = held
        .ping("three")
        .unwrap_or_else(|e| panic!("ping after an endpoint was removed: {e}"));
    assert_eq!(
        crate::testbed::reply_field(&last, "pod"),
        Some(pod.as_str()),
        "{last}"
    );
}

/// One datagram from `port` of the tester pod to `target`, a few times: the pods that
/// answered (or the failures), all of it one conntrack flow.
fn steady_udp<B: Backend>(f: &Fixture<B>, target: SocketAddr, port: u16, n: u32) -> ProbeResult {
    f.from_pod(
        "tester",
        ProbeArgs::udp(target)
            .source_port(port)
            .count(n)
            .timeout_ms(700),
    )
}

fn udp_endpoint_replaced<B: Backend>(f: &mut Fixture<B>) {
    // 1. The only endpoint is replaced: the flow moves with it right after the sync (the
    //    old pod's server still runs, so a stale entry would keep answering from it).
    f.remove_pods(&["web-1", "web-2", "web-3", "web-4"]);
    let dns = sock(f.vip(64), 53);
    f.set_service(f.service("dns", "app", "web", 64, 53, Protocol::Udp));
    let r = steady_udp(f, dns, 40053, 5);
    assert!(r.all_ok(), "before: {r}");
    assert_eq!(r.pods(), names(&["web-0"]), "{r}");
    // A new endpoint alone changes nothing for the flow (nothing else is deleted).
    f.restore_pods(&["web-3"]);
    let r = steady_udp(f, dns, 40053, 5);
    assert_eq!(
        r.pods(),
        names(&["web-0"]),
        "an added endpoint moved the flow: {r}"
    );
    f.remove_pods(&["web-0"]);
    let r = steady_udp(f, dns, 40053, 5);
    assert!(r.all_ok(), "after the endpoint left: {r}");
    assert_eq!(
        r.pods(),
        names(&["web-3"]),
        "the flow must follow the endpoint within one sync: {r}"
    );

    // 2. No endpoints: refused, and answered right after the first one appears.
    let late = sock(f.vip(65), 53);
    f.set_service(f.service("late", "pod", "web-1", 65, 53, Protocol::Udp));
    let r = steady_udp(f, late, 40054, 3);
    assert_eq!(r.ok(), 0, "no endpoints: {r}");
    f.restore_pods(&["web-1"]);
    let r = steady_udp(f, late, 40054, 3);
    assert!(r.all_ok(), "first endpoint: {r}");
    assert_eq!(r.pods(), names(&["web-1"]), "{r}");

    // 3. The client sent before the Service existed (untranslated, the node routed it
    //    to its sink and conntrack remembered that); the Service appears with an endpoint.
    let early = sock(f.vip(66), 53);
    let r = steady_udp(f, early, 40055, 2);
    assert_eq!(r.ok(), 0, "no Service yet: {r}");
    f.set_service(f.service("early", "pod", "web-1", 66, 53, Protocol::Udp));
    let r = steady_udp(f, early, 40055, 3);
    assert!(
        r.all_ok(),
        "a new Service must answer a client that was already sending: {r}"
    );
}

fn dual_stack<B: Backend>(f: &mut Fixture<B>) {
    let (v4, v6) = (IpAddr::from([10, 96, 0, 70]), f.vip(70));
    let mut svc = service("both", "app", "web", v4, 80, Protocol::Tcp);
    svc.cluster_ips = vec![v4, v6];
    svc.ip_families = vec![IpFamily::V4, IpFamily::V6];
    svc.ip_family_policy = IpFamilyPolicy::RequireDualStack;
    svc.service_type = ServiceType::NodePort;
    svc.ports[0].node_port = Some(30090);
    f.set_service(svc);
    let (node4, node6) = (f.tb.node_ip(1), f.node_ip(1));
    for (what, target) in [("IPv4", v4), ("IPv6", v6)] {
        let r = f.from_pod("tester", ProbeArgs::tcp(sock(target, 80)).count(60));
        assert!(r.all_ok(), "{what} ClusterIP {target}: {r}");
        assert_eq!(r.pods(), names(&WEB), "{what} ClusterIP spreads: {r}");
    }
    for (what, target) in [("IPv4", node4), ("IPv6", node6)] {
        let r = f.from_client(0, ProbeArgs::tcp(sock(target, 30090)).count(40));
        assert!(r.all_ok(), "{what} NodePort on {target}: {r}");
        assert_eq!(r.pods(), names(&WEB), "{what} NodePort spreads: {r}");
    }
    // Endpoints leave: both families' backends follow in the same sync.
    f.remove_pods(&["web-3", "web-4"]);
    for (what, target) in [("IPv4", v4), ("IPv6", v6)] {
        let r = f.from_pod("tester", ProbeArgs::tcp(sock(target, 80)).count(40));
        assert!(r.all_ok(), "{what} after scale-down: {r}");
        assert_eq!(r.pods(), names(&WEB[..3]), "{what} after scale-down: {r}");
    }
}

/// Changes what node `i`'s agent knows of its node (as svcnat-proxy does when it reads
/// the node's addresses or flags).
fn set_node<B: Backend>(f: &mut Fixture<B>, i: usize, change: impl FnOnce(&mut NodeContext)) {
    let mut ctx = f.agents[i].plan().node().clone();
    change(&mut ctx);
    f.agents[i].set_node(ctx);
}

fn node_port_on_every_address<B: Backend>(f: &mut Fixture<B>) {
    // A second address on node 0's LAN interface, as svcnat-proxy would read it.
    let (extra, len) = match f.family {
        IpFamily::V4 => (IpAddr::from([192, 168, 50, 111]), 24),
        IpFamily::V6 => (
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x111)),
            64,
        ),
    };
    let ns = f.tb.ns_of_node(0).to_string();
    let cidr = format!("{extra}/{len}");
    if let Err(e) =
        f.tb.exec_ok(&ns, ["ip", "addr", "add", &cidr, "dev", "eth0", "nodad"])
    {
        panic!("adding {cidr} to node 0: {e}");
    }
    let node_ip = f.node_ip(0);
    set_node(f, 0, |n| n.local_addresses = vec![node_ip, extra]);
    let mut svc = f.service("web", "app", "web", 71, 80, Protocol::Tcp);
    svc.service_type = ServiceType::NodePort;
    svc.ports[0].node_port = Some(30091);
    f.set_service(svc);
    let target = sock(extra, 30091);
    let r = f.from_client(0, ProbeArgs::tcp(target).count(50));
    assert!(
        r.all_ok(),
        "NodePort on the node's second address {extra}: {r}"
    );
    assert_eq!(r.pods(), names(&WEB), "{r}");
    // --nodeport-addresses primary: only the node IP serves it.
    set_node(f, 0, |n| n.nodeport_primary = true);
    f.sync();
    let r = f.from_client(0, ProbeArgs::tcp(target).count(3).timeout_ms(800));
    assert_eq!(r.ok(), 0, "primary only, yet {extra} answered: {r}");
    let r = f.from_client(0, ProbeArgs::tcp(sock(node_ip, 30091)).count(10));
    assert!(r.all_ok(), "primary node IP: {r}");
}

fn node_port_on_localhost<B: Backend>(f: &mut Fixture<B>) {
    let ns = f.tb.ns_of_node(0).to_string();
    if let Err(e) =
        f.tb.exec_ok(&ns, ["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])
    {
        panic!("route_localnet in node 0: {e}");
    }
    let node_ip = f.tb.node_ip(0);
    let localhost = IpAddr::from([127, 0, 0, 1]);
    set_node(f, 0, |n| {
        n.local_addresses = vec![node_ip, localhost];
        n.localhost_nodeports = true;
    });
    let mut svc = service(
        "web",
        "app",
        "web",
        IpAddr::from([10, 96, 0, 72]),
        80,
        Protocol::Tcp,
    );
    svc.service_type = ServiceType::NodePort;
    svc.ports[0].node_port = Some(30092);
    f.set_service(svc.clone());
    let target = sock(localhost, 30092);
    let probe = |f: &Fixture<B>, count| match f
        .tb
        .probe(&ns, ProbeArgs::tcp(target).count(count).timeout_ms(800))
    {
        Ok(r) => r,
        Err(e) => panic!("probe from node 0: {e}"),
    };
    let r = probe(f, 50);
    assert!(r.all_ok(), "NodePort on 127.0.0.1 from the node: {r}");
    assert_eq!(r.pods(), names(&WEB), "{r}");
    // externalTrafficPolicy: Local: the node's own traffic still reaches every endpoint
    // (masqueraded), as kube-proxy routes LOCAL-sourced traffic.
    svc.external_traffic_policy = TrafficPolicy::Local;
    f.set_service(svc);
    let r = probe(f, 50);
    assert!(r.all_ok(), "Local policy, from the node: {r}");
    assert_eq!(r.pods(), names(&WEB), "{r}");
    // Off: 127.0.0.1 serves nothing.
    set_node(f, 0, |n| n.localhost_nodeports = false);
    f.sync();
    let r = probe(f, 3);
    assert_eq!(r.ok(), 0, "localhost NodePorts off, yet answered: {r}");
}

fn cluster_ip_from_node<B: Backend>(f: &mut Fixture<B>) {
    // One endpoint beside the probe on node 0, one on node 1.
    f.remove_pods(&["web-1", "web-2", "web-4"]);
    f.set_service(f.service("web", "app", "web", 76, 80, Protocol::Tcp));
    f.set_service(f.service("dns", "app", "web", 77, 53, Protocol::Udp));
    let ns = f.tb.ns_of_node(0).to_string();
    let both = names(&["web-0", "web-3"]);
    for (what, args) in [
        ("TCP", ProbeArgs::tcp(sock(f.vip(76), 80))),
        ("UDP", ProbeArgs::udp(sock(f.vip(77), 53))),
    ] {
        let r = match f.tb.probe(&ns, args.count(60).timeout_ms(1000)) {
            Ok(r) => r,
            Err(e) => panic!("probe from node 0: {e}"),
        };
        assert!(r.all_ok(), "{what} ClusterIP from node 0: {r}");
        assert_eq!(r.pods(), both, "{what} ClusterIP from node 0 spreads: {r}");
    }
    // Without endpoints the node is refused at once, as a pod is.
    f.remove_pods(&["web-0", "web-3"]);
    f.sync();
    let r = match f.tb.probe(
        &ns,
        ProbeArgs::tcp(sock(f.vip(76), 80))
            .count(3)
            .timeout_ms(2000),
    ) {
        Ok(r) => r,
        Err(e) => panic!("probe from node 0: {e}"),
    };
    assert_eq!(
        r.refused(),
        3,
        "ClusterIP without endpoints must refuse the node: {r}"
    );
}

fn node_port_from_node<B: Backend>(f: &mut Fixture<B>) {
    // One endpoint beside the probe on node 0, one on node 1.
    f.remove_pods(&["web-1", "web-2", "web-4"]);
    let mut web = f.service("web", "app", "web", 78, 80, Protocol::Tcp);
    web.service_type = ServiceType::NodePort;
    web.ports[0].node_port = Some(30093);
    f.set_service(web);
    let mut dns = f.service("dns", "app", "web", 79, 53, Protocol::Udp);
    dns.service_type = ServiceType::NodePort;
    dns.ports[0].node_port = Some(30094);
    f.set_service(dns);
    let ns = f.tb.ns_of_node(0).to_string();
    let node_ip = f.node_ip(0);
    let both = names(&["web-0", "web-3"]);
    for (what, args) in [
        ("TCP", ProbeArgs::tcp(sock(node_ip, 30093))),
        ("UDP", ProbeArgs::udp(sock(node_ip, 30094))),
    ] {
        let r = match f.tb.probe(&ns, args.count(60).timeout_ms(1000)) {
            Ok(r) => r,
            Err(e) => panic!("probe from node 0: {e}"),
        };
        assert!(r.all_ok(), "{what} NodePort {node_ip} from node 0: {r}");
        assert_eq!(r.pods(), both, "{what} NodePort from node 0 spreads: {r}");
    }
    // A long line each way: lo's MTU is 65,536, and the node's TCP hands it aggregates
    // (GSO) that must reach the endpoint as segments its link carries.
    let mut held = match f.tb.hold(&ns, sock(node_ip, 30093)) {
        Ok(h) => h,
        Err(e) => panic!("connection from node 0 to {node_ip}:30093: {e}"),
    };
    let long = "0123456789abcdef".repeat(16 * 1024);
    let reply = match held.ping(&long) {
        Ok(r) => r,
        Err(e) => panic!("a 256 KiB line over the NodePort from node 0: {e}"),
    };
    assert_eq!(
        crate::testbed::reply_field(&reply, "line").map(str::len),
        Some(long.len()),
        "the long line comes back whole"
    );
    drop(held);
    // Without endpoints the node is refused at once (REJECT), as a client is.
    f.remove_pods(&["web-0", "web-3"]);
    f.sync();
    let r = match f.tb.probe(
        &ns,
        ProbeArgs::tcp(sock(node_ip, 30093))
            .count(3)
            .timeout_ms(2000),
    ) {
        Ok(r) => r,
        Err(e) => panic!("probe from node 0: {e}"),
    };
    assert_eq!(
        r.refused(),
        3,
        "NodePort without endpoints must refuse the node: {r}"
    );
}

/// Per SCTP attempt: an association takes two round trips before the first data.
const SCTP_TIMEOUT_MS: u64 = 3000;

fn sctp<B: Backend>(f: &mut Fixture<B>) {
    // The clients retransmit an INIT after 300 ms instead of 3 s. Linux keeps an ICMP error
    // that arrives while connect() still holds the socket (here, the first INIT's, since
    // the REJECT answers within the send) as a soft error; the retransmitted INIT's error
    // then ends the attempt (ECONNREFUSED) within the probe's timeout.
    for ns in [
        f.tb.ns_of_client(0).to_string(),
        f.tb.ns_of_pod("tester").unwrap_or_default().to_string(),
    ] {
        if let Err(e) = f.tb.exec_ok(
            &ns,
            [
                "sysctl",
                "-qw",
                "net.sctp.rto_min=100",
                "net.sctp.rto_initial=300",
            ],
        ) {
            panic!("SCTP retransmission timers in {ns}: {e}");
        }
    }
    let sctp = |target| ProbeArgs::sctp(target).timeout_ms(SCTP_TIMEOUT_MS);
    let mut svc = f.service("assoc", "app", "web", 73, 3868, Protocol::Sctp);
    svc.service_type = ServiceType::NodePort;
    svc.ports[0].node_port = Some(30095);
    f.set_service(svc);
    let r = f.from_pod("tester", sctp(sock(f.vip(73), 3868)).count(60));
    assert!(r.all_ok(), "SCTP ClusterIP: {r}");
    assert_eq!(r.pods(), names(&WEB), "SCTP ClusterIP spreads: {r}");
    for node in 0..2 {
        let r = f.from_client(0, sctp(sock(f.node_ip(node), 30095)).count(20));
        assert!(r.all_ok(), "SCTP NodePort on node {node}: {r}");
        assert!(r.pods().len() >= 3, "SCTP NodePort spreads: {r}");
        assert!(
            !r.client_ips().contains(&f.client_ip(0)),
            "an SCTP NodePort with policy Cluster must masquerade: {r}"
        );
    }
    // Endpoints leave: new associations go to the rest only.
    f.remove_pods(&["web-0", "web-3"]);
    let r = f.from_pod("tester", sctp(sock(f.vip(73), 3868)).count(20));
    assert!(r.all_ok(), "{r}");
    assert!(
        r.pods().is_subset(&names(&["web-1", "web-2", "web-4"])) && r.pods().len() >= 2,
        "after web-0 and web-3 left: {r}"
    );
    // No endpoints: refused (ICMP port unreachable, which ends the INIT with
    // ECONNREFUSED), not left to time out.
    let mut empty = f.service("assoc-empty", "app", "nothing", 74, 3868, Protocol::Sctp);
    empty.service_type = ServiceType::NodePort;
    empty.ports[0].node_port = Some(30096);
    f.set_service(empty);
    let r = f.from_pod("tester", sctp(sock(f.vip(74), 3868)).count(3));
    assert_eq!(r.refused(), 3, "SCTP ClusterIP without endpoints: {r}");
    let r = f.from_client(0, sctp(sock(f.node_ip(1), 30096)).count(3));
    assert_eq!(r.refused(), 3, "SCTP NodePort without endpoints: {r}");
}

/// The health check of node `i` as a LAN client sees it: status and `localEndpoints`.
fn health_of<B: Backend>(f: &Fixture<B>, node: usize, port: u16) -> (u16, u64) {
    let target = sock(f.node_ip(node), port);
    let reply = match f
        .tb
        .http_get(f.tb.ns_of_client(0), target, Duration::from_secs(3))
    {
        Ok(Ok(reply)) => reply,
        Ok(Err(failed)) => panic!("health check {target}: {failed:?}"),
        Err(e) => panic!("health check {target}: {e}"),
    };
    let body: serde_json::Value = match serde_json::from_str(&reply.body) {
        Ok(v) => v,
        Err(e) => panic!("health check {target}: {e}: {reply:?}"),
    };
    assert_eq!(
        body["service"],
        serde_json::json!({"namespace": "default", "name": "hc"}),
        "{target}: {reply:?}"
    );
    let Some(local) = body["localEndpoints"].as_u64() else {
        panic!("health check {target}: no localEndpoints: {reply:?}");
    };
    (reply.status, local)
}

fn health_check_node_port<B: Backend>(f: &mut Fixture<B>) {
    const HCNP: u16 = 30097;
    f.serve_service_health();
    let mut svc = f.service("hc", "app", "web", 75, 80, Protocol::Tcp);
    svc.service_type = ServiceType::LoadBalancer;
    svc.ports[0].node_port = Some(30098);
    svc.load_balancer_ips = vec![f.lb_ip()];
    svc.external_traffic_policy = TrafficPolicy::Local;
    svc.health_check_node_port = Some(HCNP);
    f.set_service(svc);
    assert_eq!(
        health_of(f, 0, HCNP),
        (200, 3),
        "node 0: web-0, web-1, web-2"
    );
    assert_eq!(health_of(f, 1, HCNP), (200, 2), "node 1: web-3, web-4");
    // The Service itself still works next to its health check.
    let r = f.from_client(0, ProbeArgs::tcp(sock(f.node_ip(1), 30098)).count(20));
    assert!(r.all_ok(), "{r}");
    assert_eq!(r.pods(), names(&["web-3", "web-4"]), "{r}");
    // Node 1 loses its endpoints: a load balancer must stop sending there.
    f.remove_pods(&["web-3", "web-4"]);
    assert_eq!(
        health_of(f, 1, HCNP),
        (503, 0),
        "node 1 has no endpoint left"
    );
    assert_eq!(health_of(f, 0, HCNP), (200, 3), "node 0 is unchanged");
    // One comes back; node 0 loses one.
    f.restore_pods(&["web-4"]);
    f.remove_pods(&["web-0"]);
    assert_eq!(health_of(f, 1, HCNP), (200, 1), "web-4 is back on node 1");
    assert_eq!(health_of(f, 0, HCNP), (200, 2), "web-0 left node 0");
    // The Service goes: so does its health check port.
    f.remove_service("hc");
    for node in 0..2 {
        let target = sock(f.node_ip(node), HCNP);
        let got =
            f.tb.http_get(f.tb.ns_of_client(0), target, Duration::from_secs(2));
        assert!(
            matches!(got, Ok(Err(Attempt::Refused))),
            "health check port {target} after the Service was deleted: {got:?}"
        );
    }
}

fn many_connections_at_once<B: Backend>(f: &mut Fixture<B>) {
    let mut svc = f.service("one", "pod", "web-0", 70, 80, Protocol::Tcp);
    svc.service_type = ServiceType::NodePort;
    svc.ports[0].node_port = Some(30099);
    f.set_service(svc);
    let target = sock(f.node_ip(0), 30099);
    let got =
        f.tb.hold_many(f.tb.ns_of_client(0), target, MANY)
            .unwrap_or_else(|e| panic!("{MANY} connections to {target}: {e}"));
    let n = MANY as usize;
    assert_eq!(
        (got.connected, got.answered),
        (n, n),
        "{MANY} connections held at once through the masquerade: {got:?}"
    );
    assert_eq!(got.pods, ["web-0"], "{got:?}");
}

/// Mounts the whole suite as `#[test]` functions for a backend expression, the agents fed
/// directly: every scenario over IPv4, again over IPv6 (in a module `ipv6`), and the
/// dual-stack scenario: `svcnat_examples::conformance_suite!(MyBackend::new());`
#[macro_export]
macro_rules! conformance_suite {
    ($backend:expr) => {
        $crate::conformance_suite!(@feed $backend, Direct, V4);
        $crate::conformance_suite!(@tests $backend, Direct, V4;
            dual_stack: DualStack,
            node_port_on_localhost: NodePortOnLocalhost,
            many_connections_at_once: ManyConnectionsAtOnce,
        );
        /// Every scenario again over IPv6 (dual-stack testbed, IPv6 Services and targets).
        mod ipv6 {
            use super::*;
            $crate::conformance_suite!(@feed $backend, Direct, V6);
        }
    };
    (@feed $backend:expr, $feed:ident, $family:ident) => {
        $crate::conformance_suite!(@tests $backend, $feed, $family;
            cluster_ip_spread: ClusterIpSpread,
            node_port_on_every_node: NodePortOnEveryNode,
            external_ips: ExternalIps,
            load_balancer_source_ranges: LoadBalancerSourceRanges,
            no_endpoints_refused: NoEndpointsRefused,
            selector_to_missing_label: SelectorToMissingLabel,
            scaling: Scaling,
            client_ip_affinity: ClientIpAffinity,
            external_traffic_local: ExternalTrafficLocal,
            internal_traffic_local: InternalTrafficLocal,
            terminating_fallback: TerminatingFallback,
            hairpin: Hairpin,
            udp: Udp,
            weighted: Weighted,
            established_survives: EstablishedSurvives,
            topology_zones: TopologyZones,
            load_balancer_ip_mode_proxy: LoadBalancerIpModeProxy,
            udp_endpoint_replaced: UdpEndpointReplaced,
            node_port_on_every_address: NodePortOnEveryAddress,
            sctp: Sctp,
            health_check_node_port: HealthCheckNodePort,
            cluster_ip_from_node: ClusterIpFromNode,
            node_port_from_node: NodePortFromNode,
        );
    };
    (@tests $backend:expr, $feed:ident, $family:ident; $($name:ident: $scenario:ident,)*) => {
        $(
            #[test]
            fn $name() {
                $crate::skip_unless_root!();
                $crate::conformance::run_over(
                    &$backend,
                    $crate::conformance::Scenario::$scenario,
                    $crate::conformance::Feed::$feed,
                    $crate::conformance::IpFamily::$family,
                );
            }
        )*
    };
}

/// Mounts the whole suite for a backend expression with every cluster change written to a
/// fake API server and each node's agent following it through its own API watchers
/// ([`Feed::Api`]), over IPv4, and the dual-stack scenario:
/// `svcnat_examples::conformance_suite_api!(MyBackend::new());`
#[macro_export]
macro_rules! conformance_suite_api {
    ($backend:expr) => {
        $crate::conformance_suite!(@feed $backend, Api, V4);
        #[test]
        fn dual_stack() {
            $crate::skip_unless_root!();
            $crate::conformance::run_over(
                &$backend,
                $crate::conformance::Scenario::DualStack,
                $crate::conformance::Feed::Api,
                $crate::conformance::IpFamily::V6,
            );
        }
    };
}
