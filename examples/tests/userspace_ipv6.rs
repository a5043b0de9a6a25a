//! The userspace datapath over IPv6 with real packets: a dual-stack testbed (two nodes, one
//! client, pods on both nodes whose IPv6 default gateway is fe80::1 on the node side of
//! their veth), each node's datapath owning `eth0` and the pod veths. Neighbour discovery
//! runs for real (the engine resolves pods and the other node itself), and the node kernels
//! forward nothing: a v6 ClusterIP spreads over pods on both nodes, a v6 NodePort answers a
//! client on the IPv6 LAN through either node, a dual-stack Service answers on both of its
//! ClusterIPs, and a v6 Service without endpoints refuses (ICMPv6 port unreachable).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use svcnat_core::model::*;
use svcnat_core::plan::NodeContext;
use svcnat_examples::agent::NodeAgent;
use svcnat_examples::skip_unless_root;
use svcnat_examples::testbed::{PodSpec, ProbeArgs, Testbed, TestbedSpec};
use svcnat_userspace::engine::DropReason;
use svcnat_userspace::{Userspace, UserspaceConfig};

const NODE_PORT: u16 = 30080;
/// The testbed's IPv6 service range is fd00:10:96::/108.
const WEB6_CIP: &str = "fd00:10:96::10";
const DUAL_CIP4: &str = "10.96.0.20";
const DUAL_CIP6: &str = "fd00:10:96::20";
const EMPTY6_CIP: &str = "fd00:10:96::99";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// (name, node, IPv4, IPv6, app label)
const PODS: [(&str, usize, &str, &str, &str); 4] = [
    ("web-0", 0, "10.244.0.10", "fd00:10:244:0::10", "web"),
    ("web-1", 0, "10.244.0.11", "fd00:10:244:0::11", "web"),
    ("web-2", 1, "10.244.1.12", "fd00:10:244:1::12", "web"),
    ("tester", 0, "10.244.0.99", "fd00:10:244:0::99", "tester"),
];

fn service(name: &str, cips: &[&str], app: &str, node_port: Option<u16>) -> Service {
    let mut svc = Service::new(ObjectName::new("default", name));
    svc.cluster_ips = cips.iter().map(|c| ip(c)).collect();
    svc.ip_families = svc
        .cluster_ips
        .iter()
        .map(|a| {
            if a.is_ipv6() {
                IpFamily::V6
            } else {
                IpFamily::V4
            }
        })
        .collect();
    if node_port.is_some() {
        svc.service_type = ServiceType::NodePort;
    }
    svc.selector = Some(LabelSelector::from_labels(BTreeMap::from([(
        "app".to_string(),
        app.to_string(),
    )])));
    let mut sp = ServicePort::new("", Protocol::Tcp, 80, TargetPort::Number(8080));
    sp.node_port = node_port;
    svc.ports.push(sp);
    svc
}

#[test]
fn ipv6_services_through_the_userspace_datapath() {
    skip_unless_root!();
    let mut spec = TestbedSpec::new(2, 1)
        .with_ipv6()
        .binaries(svcnat_examples::testbed_binaries!());
    for (name, node, v4, v6, _) in PODS {
        spec = spec.pod(PodSpec::new(name, node, ip(v4)).with_ip(ip(v6)).tcp(8080));
    }
    let tb = Testbed::new(spec).unwrap();

    let mut cluster = Cluster::simulated();
    for n in tb.nodes() {
        let mut node = Node::new(n.name.clone());
        node.addresses = vec![IpAddr::V4(n.ip), IpAddr::V6(n.ip6.unwrap())];
        node.pod_cidrs = n.pod_cidrs.clone();
        cluster.upsert_node(node);
    }
    for (name, node, v4, v6, app) in PODS {
        let mut pod = Pod::new(ObjectName::new("default", name), ip(v4));
        pod.ips.push(ip(v6));
        pod.labels.insert("app".into(), app.into());
        pod.node_name = Some(tb.node(node).name.clone());
        cluster.upsert_pod(pod);
    }
    cluster.upsert_service(service("web6", &[WEB6_CIP], "web", Some(NODE_PORT)));
    cluster.upsert_service(service("dual", &[DUAL_CIP4, DUAL_CIP6], "web", None));
    cluster.upsert_service(service("empty6", &[EMPTY6_CIP], "nothing", None));

    let cidrs = vec![
        "10.244.0.0/16".parse().unwrap(),
        "fd00:10:244::/56".parse().unwrap(),
    ];
    let mut agents: Vec<NodeAgent<Userspace>> = tb
        .nodes()
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let dp = Userspace::start(UserspaceConfig {
                netns: Some(tb.ns_of_node(i).to_string()),
                interfaces: vec!["eth0".into(), "vp*".into()],
                workers: 2,
                ..UserspaceConfig::default()
            })
            .unwrap();
            let ctx = NodeContext::new(
                n.name.clone(),
                vec![IpAddr::V4(n.ip), IpAddr::V6(n.ip6.unwrap())],
                cidrs.clone(),
            );
            NodeAgent::new(ctx, dp)
        })
        .collect();
    for a in &mut agents {
        a.sync(&cluster).unwrap();
    }
    let tester = tb.ns_of_pod("tester").unwrap().to_string();
    let all_web: BTreeSet<String> = ["web-0", "web-1", "web-2"].map(String::from).into();

    // A pod reaches the v6 ClusterIP; new connections spread over the pods of both nodes.
    let cip = SocketAddr::new(ip(WEB6_CIP), 80);
    let r = tb.probe(&tester, ProbeArgs::tcp(cip).count(45)).unwrap();
    assert_eq!(r.ok(), 45, "{r}");
    assert_eq!(
        r.per_pod().keys().cloned().collect::<BTreeSet<_>>(),
        all_web,
        "{r}"
    );
    // Pod to Service: no masquerade, the pods see the tester's own address.
    assert_eq!(r.client_ips(), BTreeSet::from([ip(PODS[3].3)]), "{r}");

    // A client on the IPv6 LAN reaches the NodePort through either node, and every
    // endpoint (externalTrafficPolicy: Cluster) behind it.
    for i in 0..2 {
        let np = SocketAddr::new(tb.node_ip6(i).unwrap(), NODE_PORT);
        let r = tb
            .probe(tb.ns_of_client(0), ProbeArgs::tcp(np).count(45))
            .unwrap();
        assert_eq!(r.ok(), 45, "node {i}: {r}");
        assert_eq!(
            r.per_pod().keys().cloned().collect::<BTreeSet<_>>(),
            all_web,
            "node {i}: {r}"
        );
    }

    // A dual-stack Service answers on both of its ClusterIPs.
    for cip in [DUAL_CIP4, DUAL_CIP6] {
        let r = tb
            .probe(
                &tester,
                ProbeArgs::tcp(SocketAddr::new(ip(cip), 80)).count(6),
            )
            .unwrap();
        assert_eq!(r.ok(), 6, "{cip}: {r}");
    }

    // A v6 Service without endpoints refuses at once: ICMPv6 port unreachable.
    let r = tb
        .probe(
            &tester,
            ProbeArgs::tcp(SocketAddr::new(ip(EMPTY6_CIP), 80))
                .count(3)
                .timeout_ms(2000),
        )
        .unwrap();
    assert_eq!(r.refused(), 3, "{r}");

    // The engines did the work: node 0's translated and rejected, and neighbour discovery
    // met nothing it had to drop.
    let st = agents[0].dataplane().stats();
    assert!(st.engine.connections_created >= 45 + 45, "{:?}", st.engine);
    assert!(
        st.engine.dropped(DropReason::Rejected) >= 3,
        "{:?}",
        st.engine
    );
    for a in &mut agents {
        let e = a.dataplane().stats().engine;
        assert_eq!(e.dropped(DropReason::InvalidNdp), 0, "{e:?}");
    }
    for a in &mut agents {
        a.cleanup().unwrap();
    }
}
