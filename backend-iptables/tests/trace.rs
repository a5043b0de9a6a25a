//! Behaviour of the rendered rules, checked with the packet tracer (no kernel): each test
//! compiles a plan (mostly from the core scenarios), renders it, and traces new
//! connections through `nat` and `filter` as the kernel would walk them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../core/tests/support/scenario.rs"]
mod load;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use svcnat_core::model::*;
use svcnat_core::plan::{NodeContext, Plan};
use svcnat_iptables::render::Ruleset;
use svcnat_iptables::trace::{
    Hook, Packet, RecentTable, RestoreModel, Trace, TraceError, Tracer, Verdict, distribution,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn tcp(src: &str, dst: &str, port: u16) -> Packet {
    Packet {
        src: ip(src),
        src_port: 40000,
        dst: ip(dst),
        dst_port: port,
        protocol: Protocol::Tcp,
    }
}

fn udp(src: &str, dst: &str, port: u16) -> Packet {
    Packet {
        protocol: Protocol::Udp,
        ..tcp(src, dst, port)
    }
}

fn tracer(plan: &Plan) -> Tracer {
    Tracer::new(&Ruleset::new(plan), plan.node().node_ips.clone()).unwrap()
}

fn scenario(name: &str) -> (Cluster, NodeContext, Plan) {
    let (c, n, _, p) = load::load(&load::scenario_dir(name));
    (c, n, p)
}

/// The scenario's cluster compiled for another node.
fn on_node(name: &str, node: &str, ips: &[&str]) -> Plan {
    let (c, mut n, _) = scenario(name);
    n.node_name = node.to_string();
    n.node_ips = ips.iter().map(|s| ip(s)).collect();
    Plan::compile(&c, &n)
}

fn trace_with(t: &Tracer, pkt: &Packet, hook: Hook, r: f64) -> Trace {
    let mut recent = RecentTable::new();
    t.trace(pkt, hook, &mut || r, &mut recent, 0).unwrap()
}

/// The exact verdict distribution, with the probabilities rounded to 1e-9.
fn dist(t: &Tracer, pkt: &Packet, hook: Hook) -> BTreeMap<Verdict, f64> {
    let d = distribution(t, pkt, hook, &RecentTable::new(), 0).unwrap();
    let total: f64 = d.values().sum();
    assert!((total - 1.0).abs() < 1e-9, "shares sum to {total}: {d:?}");
    d
}

fn assert_shares(d: &BTreeMap<Verdict, f64>, want: &[(&str, f64)]) {
    let got: BTreeMap<Verdict, f64> = d.clone();
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (addr, share) in want {
        let v = Verdict::Dnat(sa(addr));
        let g = got.get(&v).copied().unwrap_or(0.0);
        assert!(
            (g - share).abs() < 1e-9,
            "{addr}: share {g}, want {share}; all: {got:#?}"
        );
    }
}

const VOTE_CIP: &str = "10.99.113.112";
const VOTE_EPS: [&str; 5] = [
    "10.32.0.4:80",
    "10.32.0.5:80",
    "10.32.0.6:80",
    "10.38.0.4:80",
    "10.38.0.5:80",
];

#[test]
fn cluster_ip_spreads_over_all_endpoints_equally() {
    let (_, _, plan) = scenario("lab-vote");
    let t = tracer(&plan);
    let want: Vec<(&str, f64)> = VOTE_EPS.iter().map(|e| (*e, 0.2)).collect();
    // From a pod: no masquerade.
    let pkt = tcp("10.32.0.77", VOTE_CIP, 80);
    assert_shares(&dist(&t, &pkt, Hook::Prerouting), &want);
    let tr = trace_with(&t, &pkt, Hook::Prerouting, 0.5);
    assert!(!tr.masquerade);
    assert!(tr.visited("KUBE-SVC-VIQHAVHDK4QE7NA4"));
    // From off the cluster (a routed client): masqueraded.
    let pkt = tcp("192.168.50.200", VOTE_CIP, 80);
    assert_shares(&dist(&t, &pkt, Hook::Prerouting), &want);
    assert!(trace_with(&t, &pkt, Hook::Prerouting, 0.5).masquerade);
    // From a process on the node: its source is the node address, masqueraded.
    let pkt = tcp("192.168.50.12", VOTE_CIP, 80);
    assert_shares(&dist(&t, &pkt, Hook::Output), &want);
    assert!(trace_with(&t, &pkt, Hook::Output, 0.5).masquerade);
    // Another port of the cluster IP is not the Service.
    let tr = trace_with(&t, &tcp("10.32.0.77", VOTE_CIP, 81), Hook::Prerouting, 0.5);
    assert_eq!(tr.verdict, Verdict::Accept);
    assert_eq!(tr.dnat, None);
}

#[test]
fn random_values_pick_endpoints_in_cascade_order() {
    let (_, _, plan) = scenario("lab-vote");
    let t = tracer(&plan);
    // The first rule takes r < 0.2; a constant r >= 0.5 falls through to the last.
    let pkt = tcp("10.32.0.77", VOTE_CIP, 80);
    assert_eq!(
        trace_with(&t, &pkt, Hook::Prerouting, 0.1).verdict,
        Verdict::Dnat(sa(VOTE_EPS[0]))
    );
    assert_eq!(
        trace_with(&t, &pkt, Hook::Prerouting, 0.9).verdict,
        Verdict::Dnat(sa(VOTE_EPS[4]))
    );
}

#[test]
fn node_port_works_on_each_node_address() {
    let plan = on_node("lab-vote", "k-02", &["192.168.50.12", "172.16.0.12"]);
    let t = tracer(&plan);
    let want: Vec<(&str, f64)> = VOTE_EPS.iter().map(|e| (*e, 0.2)).collect();
    for addr in ["192.168.50.12", "172.16.0.12"] {
        let pkt = tcp("198.51.100.7", addr, 30000);
        assert_shares(&dist(&t, &pkt, Hook::Prerouting), &want);
        let tr = trace_with(&t, &pkt, Hook::Prerouting, 0.0);
        assert!(tr.masquerade, "externalTrafficPolicy Cluster masquerades");
        assert!(tr.visited("KUBE-NODEPORTS"));
        assert!(tr.visited("KUBE-EXT-VIQHAVHDK4QE7NA4"));
        // From the node itself.
        let pkt = tcp(addr, addr, 30000);
        assert_shares(&dist(&t, &pkt, Hook::Output), &want);
    }
    // Not a node address: untouched.
    let tr = trace_with(
        &t,
        &tcp("198.51.100.7", "192.168.50.13", 30000),
        Hook::Prerouting,
        0.0,
    );
    assert_eq!(tr.verdict, Verdict::Accept);
}

#[test]
fn external_ips_are_served() {
    let (_, _, plan) = scenario("lab-vote-externalips");
    let t = tracer(&plan);
    let want: Vec<(&str, f64)> = VOTE_EPS.iter().map(|e| (*e, 0.2)).collect();
    // One external IP is this node's, the other another node's (routed here).
    for addr in ["192.168.50.12", "192.168.50.13"] {
        let pkt = tcp("192.168.50.1", addr, 80);
        assert_shares(&dist(&t, &pkt, Hook::Prerouting), &want);
        let tr = trace_with(&t, &pkt, Hook::Prerouting, 0.3);
        assert!(tr.masquerade);
        assert!(tr.visited("KUBE-EXT-VIQHAVHDK4QE7NA4"));
    }
    let tr = trace_with(
        &t,
        &tcp("192.168.50.1", "192.168.50.13", 81),
        Hook::Prerouting,
        0.3,
    );
    assert_eq!(tr.verdict, Verdict::Accept);
}

#[test]
fn load_balancer_source_ranges_allow_and_drop() {
    // externalTrafficPolicy Local: the allowed source reaches the local endpoints only.
    let (_, _, plan) = scenario("local-policy");
    let t = tracer(&plan);
    let pkt = tcp("198.51.100.7", "203.0.113.10", 80);
    assert_shares(
        &dist(&t, &pkt, Hook::Prerouting),
        &[("10.244.0.160:8080", 0.5), ("10.244.0.180:8080", 0.5)],
    );
    let tr = trace_with(&t, &pkt, Hook::Prerouting, 0.0);
    assert!(!tr.masquerade, "the client address is kept");
    assert!(tr.visited("KUBE-FW-67NZLRHBNDSAWJRO"));
    let pkt = tcp("203.0.113.200", "203.0.113.10", 443);
    assert!(matches!(
        trace_with(&t, &pkt, Hook::Prerouting, 0.0).verdict,
        Verdict::Dnat(_)
    ));
    // A source outside the ranges is dropped by KUBE-PROXY-FIREWALL.
    for src in ["192.0.2.99", "203.0.113.1", "10.244.1.5"] {
        let tr = trace_with(&t, &tcp(src, "203.0.113.10", 80), Hook::Prerouting, 0.0);
        assert_eq!(tr.verdict, Verdict::Drop, "{src}");
        assert!(tr.visited("KUBE-PROXY-FIREWALL"));
    }
    // externalTrafficPolicy Cluster: masqueraded, all endpoints; the node itself is in a
    // range, so it may use the load balancer IP too.
    let (_, _, plan) = local_scenario_lb();
    let t = tracer(&plan);
    let tr = trace_with(
        &t,
        &tcp("198.51.100.5", "203.0.113.20", 443),
        Hook::Prerouting,
        0.0,
    );
    assert_eq!(tr.verdict, Verdict::Dnat(sa("10.244.2.20:443")));
    assert!(tr.masquerade);
    let tr = trace_with(
        &t,
        &tcp("8.8.8.8", "203.0.113.20", 443),
        Hook::Prerouting,
        0.0,
    );
    assert_eq!(tr.verdict, Verdict::Drop);
    let tr = trace_with(
        &t,
        &tcp("192.168.0.1", "203.0.113.20", 443),
        Hook::Output,
        0.0,
    );
    assert_eq!(tr.verdict, Verdict::Dnat(sa("10.244.2.20:443")));
}

/// A LoadBalancer with externalTrafficPolicy Cluster and source ranges covering the node.
fn local_scenario_lb() -> (Cluster, NodeContext, Plan) {
    let yaml = "---
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: default}
spec:
  type: LoadBalancer
  selector: {app: shop}
  loadBalancerSourceRanges: [192.168.0.0/24, 198.51.100.0/24]
  ports: [{port: 443, nodePort: 30443}]
status:
  loadBalancer: {ingress: [{ip: 203.0.113.20}]}
---
apiVersion: v1
kind: Pod
metadata: {name: shop-1, namespace: default, labels: {app: shop}}
spec: {nodeName: node-2, containers: [{name: a, image: x}]}
status: {podIP: 10.244.2.20}
";
    let (node, cfg) = load::parse_node_conf(
        "node node-1\nips 192.168.0.1\ncluster-cidrs 10.244.0.0/16\n",
        "lb",
    );
    let (c, errors) = load::build_checked(&[("lb.yaml".into(), yaml.into())], &cfg);
    assert!(errors.is_empty(), "{errors:?}");
    let p = Plan::compile(&c, &node);
    (c, node, p)
}

#[test]
fn no_endpoints_reject() {
    let (_, _, plan) = scenario("lab-vote-bad-selector");
    let t = tracer(&plan);
    let tr = trace_with(&t, &tcp("10.32.0.77", VOTE_CIP, 80), Hook::Prerouting, 0.0);
    assert_eq!(tr.verdict, Verdict::Reject);
    assert!(tr.visited("KUBE-SERVICES"));
    let tr = trace_with(&t, &tcp("192.168.50.12", VOTE_CIP, 80), Hook::Output, 0.0);
    assert_eq!(tr.verdict, Verdict::Reject);
    // The node port is refused too (filter INPUT -> KUBE-EXTERNAL-SERVICES).
    let tr = trace_with(
        &t,
        &tcp("198.51.100.7", "192.168.50.12", 30000),
        Hook::Prerouting,
        0.0,
    );
    assert_eq!(tr.verdict, Verdict::Reject);
    assert!(tr.visited("KUBE-EXTERNAL-SERVICES"));
}

#[test]
fn selector_changed_to_a_missing_label_rejects_after_a_partial_update() {
    let (_, _, good) = scenario("lab-vote");
    let (_, _, bad) = scenario("lab-vote-bad-selector");
    let mut rules = Ruleset::new(&good);
    let mut model = RestoreModel::of(&rules).unwrap();
    let text = rules.update(&bad, &Plan::diff(&good, &bad)).unwrap();
    model.apply(&text).unwrap();
    // Trace the state the partial text produced, not a fresh render.
    let t = Tracer::from_model(&model, good.node().node_ips.clone()).unwrap();
    let tr = trace_with(&t, &tcp("10.32.0.77", VOTE_CIP, 80), Hook::Prerouting, 0.0);
    assert_eq!(tr.verdict, Verdict::Reject);
    // And back.
    let text = rules.update(&good, &Plan::diff(&bad, &good)).unwrap();
    model.apply(&text).unwrap();
    let t = Tracer::from_model(&model, good.node().node_ips.clone()).unwrap();
    let want: Vec<(&str, f64)> = VOTE_EPS.iter().map(|e| (*e, 0.2)).collect();
    assert_shares(
        &dist(&t, &tcp("10.32.0.77", VOTE_CIP, 80), Hook::Prerouting),
        &want,
    );
}

#[test]
fn scaling_changes_the_distribution() {
    let (mut cluster, _, mut plan) = scenario("lab-vote");
    let mut rules = Ruleset::new(&plan);
    let mut model = RestoreModel::of(&rules).unwrap();
    let pkt = tcp("10.32.0.77", VOTE_CIP, 80);
    // Scale down to three.
    for pod in ["vote-dx8f4", "vote-986cl"] {
        let _ = cluster.remove_pod(&ObjectName::new("instavote", pod));
        let diff = plan.update(&cluster);
        model.apply(&rules.update(&plan, &diff).unwrap()).unwrap();
    }
    let t = Tracer::from_model(&model, plan.node().node_ips.clone()).unwrap();
    let third = 1.0 / 3.0;
    // The rendered 0.3333333333 leaves the shares within 1e-10 of a third.
    let d = dist(&t, &pkt, Hook::Prerouting);
    assert_eq!(d.len(), 3);
    for e in ["10.32.0.5:80", "10.32.0.6:80", "10.38.0.4:80"] {
        assert!((d[&Verdict::Dnat(sa(e))] - third).abs() < 1e-9, "{d:?}");
    }
    // Scale up to six.
    for i in 0..3 {
        let mut p = Pod::new(
            ObjectName::new("instavote", format!("vote-new{i}")),
            ip(&format!("10.32.1.{}", 10 + i)),
        );
        p.labels.insert("role".into(), "vote".into());
        p.node_name = Some("k-03".into());
        let _ = cluster.upsert_pod(p);
        let diff = plan.update(&cluster);
        model.apply(&rules.update(&plan, &diff).unwrap()).unwrap();
    }
    let t = Tracer::from_model(&model, plan.node().node_ips.clone()).unwrap();
    let d = dist(&t, &pkt, Hook::Prerouting);
    assert_eq!(d.len(), 6);
    for v in d.values() {
        assert!((v - 1.0 / 6.0).abs() < 1e-9, "{d:?}");
    }
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_endpoint() {
    let (_, _, plan) = scenario("local-policy");
    let t = tracer(&plan);
    let pkt = tcp("10.244.0.50", "10.111.254.149", 80);
    let mut recent = RecentTable::new();
    let first = t
        .trace(&pkt, Hook::Prerouting, &mut || 0.99, &mut recent, 1000)
        .unwrap();
    assert_eq!(first.verdict, Verdict::Dnat(sa("10.244.2.246:8080")));
    assert_eq!(recent.len(), 1);
    // A random value that would pick the first endpoint: affinity wins.
    let second = t
        .trace(&pkt, Hook::Prerouting, &mut || 0.0, &mut recent, 2000)
        .unwrap();
    assert_eq!(second.verdict, first.verdict);
    let d = distribution(&t, &pkt, Hook::Prerouting, &recent, 2001).unwrap();
    assert_eq!(d.len(), 1);
    assert!((d[&first.verdict] - 1.0).abs() < 1e-12);
    // Another client is spread normally.
    let other = tcp("10.244.0.51", "10.111.254.149", 80);
    assert_eq!(
        distribution(&t, &other, Hook::Prerouting, &recent, 2001)
            .unwrap()
            .len(),
        4
    );
    // After the timeout (10800 s since the last hit at 2000) the choice is free again.
    let later = t
        .trace(
            &pkt,
            Hook::Prerouting,
            &mut || 0.0,
            &mut recent,
            2000 + 10_801,
        )
        .unwrap();
    assert_eq!(later.verdict, Verdict::Dnat(sa("10.244.0.160:8080")));
}

#[test]
fn external_traffic_policy_local() {
    // node-a has two of the four web pods.
    let (_, _, plan) = scenario("local-policy");
    let t = tracer(&plan);
    let ext = tcp("198.51.100.7", "192.168.0.10", 31080);
    assert_shares(
        &dist(&t, &ext, Hook::Prerouting),
        &[("10.244.0.160:8080", 0.5), ("10.244.0.180:8080", 0.5)],
    );
    assert!(!trace_with(&t, &ext, Hook::Prerouting, 0.0).masquerade);
    // Pod traffic to the node port takes the cluster-wide set.
    let pod = tcp("10.244.0.77", "192.168.0.10", 31080);
    assert_eq!(dist(&t, &pod, Hook::Prerouting).len(), 4);
    // A node with no web pod: external traffic is dropped, pods still get through.
    let plan = on_node("local-policy", "node-x", &["192.168.0.13"]);
    let t = tracer(&plan);
    let ext = tcp("198.51.100.7", "192.168.0.13", 31080);
    assert_eq!(
        trace_with(&t, &ext, Hook::Prerouting, 0.0).verdict,
        Verdict::Drop
    );
    let lb = tcp("198.51.100.7", "203.0.113.10", 80);
    assert_eq!(
        trace_with(&t, &lb, Hook::Prerouting, 0.0).verdict,
        Verdict::Drop
    );
    let pod = tcp("10.244.0.77", "192.168.0.13", 31080);
    let want: Vec<(&str, f64)> = [
        "10.244.0.160:8080",
        "10.244.0.180:8080",
        "10.244.1.224:8080",
        "10.244.2.246:8080",
    ]
    .iter()
    .map(|e| (*e, 0.25))
    .collect();
    assert_shares(&dist(&t, &pod, Hook::Prerouting), &want);
    assert!(!trace_with(&t, &pod, Hook::Prerouting, 0.0).masquerade);
    // The node itself: cluster-wide and masqueraded (its own address is the source).
    let own = tcp("192.168.0.13", "192.168.0.13", 31080);
    assert_shares(&dist(&t, &own, Hook::Output), &want);
    assert!(trace_with(&t, &own, Hook::Output, 0.0).masquerade);
    // The health check port is open.
    let hc = tcp("198.51.100.7", "192.168.0.13", 31298);
    let tr = trace_with(&t, &hc, Hook::Prerouting, 0.0);
    assert_eq!(tr.verdict, Verdict::Accept);
    assert!(tr.visited("KUBE-NODEPORTS"));
}

/// A cluster with one Service and the given pods (name, ip, node, ready, terminating,
/// weight).
fn small_cluster(pods: &[(&str, &str, &str, bool, bool, u32)]) -> Cluster {
    let mut c = Cluster::simulated();
    let mut svc = Service::new(ObjectName::new("default", "app"));
    svc.cluster_ips = vec![ip("10.96.0.50")];
    svc.ip_families = vec![IpFamily::V4];
    let mut l = BTreeMap::new();
    l.insert("app".to_string(), "app".to_string());
    svc.selector = Some(LabelSelector::from_labels(l));
    svc.ports.push(ServicePort::new(
        String::new(),
        Protocol::Tcp,
        80,
        TargetPort::Number(8080),
    ));
    c.upsert_service(svc);
    for (name, addr, node, ready, terminating, weight) in pods {
        let mut p = Pod::new(ObjectName::new("default", *name), ip(addr));
        p.labels.insert("app".into(), "app".into());
        p.node_name = Some(node.to_string());
        p.ready = *ready;
        p.terminating = *terminating;
        p.weight = *weight;
        c.upsert_pod(p);
    }
    c
}

fn node_1() -> NodeContext {
    NodeContext::new(
        "node-1",
        vec![ip("192.168.0.1")],
        vec!["10.244.0.0/16".parse().unwrap()],
    )
}

#[test]
fn terminating_endpoints_only_when_nothing_else() {
    let pkt = tcp("10.244.9.9", "10.96.0.50", 80);
    // Only a terminating (still serving) pod: it takes the traffic.
    let c = small_cluster(&[("old", "10.244.1.1", "node-2", true, true, 1)]);
    let t = tracer(&Plan::compile(&c, &node_1()));
    assert_shares(
        &dist(&t, &pkt, Hook::Prerouting),
        &[("10.244.1.1:8080", 1.0)],
    );
    // With a ready pod next to it, the terminating one gets nothing.
    let c = small_cluster(&[
        ("old", "10.244.1.1", "node-2", true, true, 1),
        ("new", "10.244.1.2", "node-2", true, false, 1),
    ]);
    let t = tracer(&Plan::compile(&c, &node_1()));
    assert_shares(
        &dist(&t, &pkt, Hook::Prerouting),
        &[("10.244.1.2:8080", 1.0)],
    );
    // Neither ready nor serving: REJECT.
    let c = small_cluster(&[("old", "10.244.1.1", "node-2", false, true, 1)]);
    let t = tracer(&Plan::compile(&c, &node_1()));
    assert_eq!(
        trace_with(&t, &pkt, Hook::Prerouting, 0.0).verdict,
        Verdict::Reject
    );
}

#[test]
fn hairpin_traffic_is_masqueraded() {
    let (_, _, plan) = scenario("lab-vote");
    let t = tracer(&plan);
    // 10.32.0.4 is the first endpoint; r = 0 picks it.
    let pkt = tcp("10.32.0.4", VOTE_CIP, 80);
    let tr = trace_with(&t, &pkt, Hook::Prerouting, 0.0);
    assert_eq!(tr.verdict, Verdict::Dnat(sa("10.32.0.4:80")));
    assert!(tr.masquerade, "a pod reaching itself must be masqueraded");
    assert!(tr.visited("KUBE-SEP-RFJGHFMXUDJXIEW6"));
    // Landing on another endpoint: no masquerade.
    let tr = trace_with(&t, &pkt, Hook::Prerouting, 0.99);
    assert_eq!(tr.verdict, Verdict::Dnat(sa("10.38.0.5:80")));
    assert!(!tr.masquerade);
}

#[test]
fn udp_service() {
    let (_, _, plan) = scenario("lab-redis");
    let t = tracer(&plan);
    let tr = trace_with(
        &t,
        &udp("10.32.0.77", "10.96.0.10", 53),
        Hook::Prerouting,
        0.0,
    );
    assert_eq!(tr.verdict, Verdict::Dnat(sa("10.32.0.2:53")));
    assert!(tr.visited("KUBE-SVC-TCOU7JCQXEZGVUNU"));
    let tr = trace_with(
        &t,
        &tcp("10.32.0.77", "10.96.0.10", 53),
        Hook::Prerouting,
        0.0,
    );
    assert!(
        tr.visited("KUBE-SVC-ERIFXISQEP7F7OF4"),
        "TCP has its own chain"
    );
    // UDP to the TCP-only redis port is not a Service.
    let tr = trace_with(
        &t,
        &udp("10.32.0.77", "10.111.194.178", 6379),
        Hook::Prerouting,
        0.0,
    );
    assert_eq!(tr.verdict, Verdict::Accept);
    assert_eq!(tr.dnat, None);
}

#[test]
fn weighted_endpoints_split_three_to_one() {
    let (_, _, plan) = scenario("endpoints-objects");
    let t = tracer(&plan);
    let pkt = tcp("10.244.0.9", "10.99.184.79", 3306);
    assert_shares(
        &dist(&t, &pkt, Hook::Prerouting),
        &[("192.0.2.10:3306", 0.75), ("192.0.2.11:3306", 0.25)],
    );
    // masquerade-all: even pod traffic is masqueraded.
    assert!(trace_with(&t, &pkt, Hook::Prerouting, 0.0).masquerade);
    // A zero weight drains an endpoint.
    let c = small_cluster(&[
        ("a", "10.244.1.1", "node-2", true, false, 3),
        ("b", "10.244.1.2", "node-2", true, false, 0),
        ("c", "10.244.1.3", "node-2", true, false, 1),
    ]);
    let t = tracer(&Plan::compile(&c, &node_1()));
    assert_shares(
        &dist(&t, &tcp("10.244.9.9", "10.96.0.50", 80), Hook::Prerouting),
        &[("10.244.1.1:8080", 0.75), ("10.244.1.3:8080", 0.25)],
    );
}

#[test]
fn internal_traffic_policy_local() {
    // node-a has no cache pod: DROP (there are endpoints, just not here).
    let (_, _, plan) = scenario("local-policy");
    let t = tracer(&plan);
    let pkt = udp("10.244.0.9", "10.96.51.128", 11211);
    let tr = trace_with(&t, &pkt, Hook::Prerouting, 0.0);
    assert_eq!(tr.verdict, Verdict::Drop);
    // node-b runs it: the local endpoint.
    let plan = on_node("local-policy", "node-b", &["192.168.0.11"]);
    let t = tracer(&plan);
    let pkt = udp("10.244.1.9", "10.96.51.128", 11211);
    assert_shares(
        &dist(&t, &pkt, Hook::Prerouting),
        &[("10.244.1.4:11211", 1.0)],
    );
    assert!(trace_with(&t, &pkt, Hook::Prerouting, 0.0).visited("KUBE-SVL-QIFOLHMJHVYWKTSR"));
}

#[test]
fn ipv6_rules_trace_too() {
    let yaml = "---
apiVersion: v1
kind: Service
metadata: {name: ds, namespace: default}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: [10.96.5.5, \"fd00:10:96::5\"]
  selector: {app: ds}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: ds-1, namespace: default, labels: {app: ds}}
spec: {nodeName: node-1, containers: [{name: a, image: x}]}
status:
  podIPs: [{ip: 10.244.1.5}, {ip: \"fd00:244::5\"}]
";
    let (node, mut cfg) = load::parse_node_conf(
        "node node-1\nips 192.168.0.1,fd00:192:168::1\ncluster-cidrs 10.244.0.0/16,fd00:244::/56\n",
        "ds",
    );
    cfg.service_cidrs.push("fd00:10:96::/108".parse().unwrap());
    cfg.pod_cidrs.push("fd00:244::/56".parse().unwrap());
    let (c, errors) = load::build_checked(&[("ds.yaml".into(), yaml.into())], &cfg);
    assert!(errors.is_empty(), "{errors:?}");
    let plan = Plan::compile(&c, &node);
    let v6 = Ruleset::new_for(&plan, IpFamily::V6);
    let t = Tracer::new(&v6, node.node_ips.clone()).unwrap();
    let pkt = Packet {
        src: ip("2001:db8::1"),
        src_port: 1,
        dst: ip("fd00:10:96::5"),
        dst_port: 80,
        protocol: Protocol::Tcp,
    };
    let tr = trace_with(&t, &pkt, Hook::Prerouting, 0.0);
    assert_eq!(tr.verdict, Verdict::Dnat(sa("[fd00:244::5]:8080")));
    assert!(tr.masquerade, "off-cluster IPv6 source");
    let v4 = Tracer::new(&Ruleset::new(&plan), node.node_ips.clone()).unwrap();
    assert_eq!(trace_with(&v4, &pkt, Hook::Prerouting, 0.0).dnat, None);
}

#[test]
fn unknown_matches_and_targets_are_errors() {
    let base = Ruleset::new(&Plan::empty(node_1())).full_restore();
    for (rule, what) in [
        ("-m owner --uid-owner 0 -j ACCEPT", "unknown match"),
        ("-m tcp --sport 5 -j ACCEPT", "unknown option"),
        ("-j SNAT --to-source 1.2.3.4", "unsupported target"),
        ("-m statistic --mode nth --every 2 -j ACCEPT", "statistic"),
        ("-j ACCEPT --bogus", "unexpected"),
    ] {
        let mut m = RestoreModel::new();
        m.apply(&base).unwrap();
        m.apply(&format!(
            "*nat\n:KUBE-X - [0:0]\n-A KUBE-X {rule}\nCOMMIT\n"
        ))
        .unwrap();
        match Tracer::from_model(&m, vec![]) {
            Err(TraceError::Parse { reason, .. }) => {
                assert!(reason.contains(what), "{rule}: {reason}")
            }
            other => panic!("{rule}: {other:?}"),
        }
    }
    // A jump to a missing chain is refused by the restore model, as by the kernel.
    let mut m = RestoreModel::new();
    m.apply(&base).unwrap();
    assert!(
        m.apply("*nat\n:KUBE-X - [0:0]\n-A KUBE-X -j KUBE-NOWHERE\nCOMMIT\n")
            .is_err()
    );
    // So is deleting a chain that is still referenced.
    assert!(m.apply("*nat\n-X KUBE-MARK-MASQ\nCOMMIT\n").is_err());
}

#[test]
fn every_scenario_traces_every_frontend_without_errors() {
    for dir in load::scenario_dirs() {
        let (_, _, _, plan) = load::load(&dir);
        let t = tracer(&plan);
        for (k, f) in plan.frontends() {
            let pkt = Packet {
                src: ip("198.51.100.7"),
                src_port: 1,
                dst: k.addr,
                dst_port: k.port,
                protocol: k.protocol,
            };
            let d = distribution(&t, &pkt, Hook::Prerouting, &RecentTable::new(), 0).unwrap();
            let set = plan.backend_set(&f.backends).unwrap();
            if set.is_empty() {
                let want = match f.on_empty {
                    svcnat_core::plan::EmptyAction::Reject => Verdict::Reject,
                    svcnat_core::plan::EmptyAction::Drop => Verdict::Drop,
                };
                // Sources outside the load balancer ranges are dropped before.
                if f.source_ranges.is_empty() {
                    assert_eq!(d.keys().collect::<Vec<_>>(), [&want], "{k}");
                }
            } else if f.source_ranges.is_empty() {
                let live: BTreeSet<Verdict> = set
                    .endpoints
                    .iter()
                    .filter(|e| e.weight > 0)
                    .map(|e| Verdict::Dnat(e.addr))
                    .collect();
                assert_eq!(d.keys().copied().collect::<BTreeSet<_>>(), live, "{k}");
            }
        }
    }
}
