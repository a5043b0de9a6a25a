//! The userspace datapath's driver on a real kernel: it takes the node's forwarding over
//! (forwarding off, the nftables ingress table installed), leaves the node's own traffic
//! to the kernel, counts what its rings see, and gives everything back when dropped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use svcnat_examples::skip_unless_root;
use svcnat_examples::testbed::{ProbeArgs, Testbed, TestbedSpec, wait_until};
use svcnat_userspace::{Userspace, UserspaceConfig};

fn sysctl(tb: &Testbed, ns: &str, key: &str) -> String {
    tb.exec_ok(ns, ["sysctl", "-n", key])
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn takes_over_forwarding_and_gives_it_back() {
    skip_unless_root!();
    let tb = Testbed::new(TestbedSpec::new(1, 1)).unwrap();
    let node = tb.ns_of_node(0).to_string();
    let client = tb.ns_of_client(0).to_string();
    assert_eq!(sysctl(&tb, &node, "net.ipv4.ip_forward"), "1");
    let dp = Userspace::start(UserspaceConfig {
        netns: Some(node.clone()),
        interfaces: vec!["eth0".into(), "vp*".into()],
        workers: 2,
        ..UserspaceConfig::default()
    })
    .unwrap();
    assert_eq!(sysctl(&tb, &node, "net.ipv4.ip_forward"), "0");
    let tables = tb
        .exec_ok(&node, ["nft", "list", "table", "netdev", "svcnat"])
        .unwrap();
    assert!(tables.contains("hook ingress device \"eth0\""), "{tables}");

    // The node's own address still answers through the kernel (a closed port refuses,
    // it does not time out), and the rings saw those packets too.
    let before = dp.stats().rx_frames;
    let seen = tb
        .probe(
            &client,
            ProbeArgs::tcp(SocketAddr::new(tb.node_ip(0), 9)).count(3),
        )
        .unwrap();
    assert_eq!(seen.refused(), 3, "{seen:?}");
    // A worker counts a block's frames after handling them: give it a moment.
    let counted = wait_until(Duration::from_secs(5), || {
        dp.stats().rx_frames >= before + 3
    });
    assert!(counted, "rings saw {before} -> {:?}", dp.stats());

    drop(dp);
    assert_eq!(sysctl(&tb, &node, "net.ipv4.ip_forward"), "1");
    let out = tb
        .exec(&node, ["nft", "list", "table", "netdev", "svcnat"])
        .unwrap();
    assert!(
        !out.status.success(),
        "the ingress table outlived the datapath"
    );
}

/// `node_traffic`: the veth pair and one host route per Service address follow the plan;
/// a route or the pair deleted behind the datapath's back is noticed and put back; the
/// pair goes with the datapath, and `cleanup` removes one a killed process left.
#[test]
fn node_traffic_pair_follows_the_plan_and_is_removed() {
    use std::collections::BTreeMap;
    use svcnat_core::model::*;
    use svcnat_core::plan::{Dataplane, NodeContext, Plan};
    use svcnat_userspace::driver::{HOST_PORT, HOST_VETH, cleanup};

    skip_unless_root!();
    let tb = Testbed::new(TestbedSpec::new(1, 1)).unwrap();
    let node = tb.ns_of_node(0).to_string();
    let node_ip = tb.node_ip(0);
    let routes = || {
        tb.exec_ok(
            &node,
            ["ip", "route", "show", "table", "local", "dev", HOST_VETH],
        )
        .unwrap_or_default()
    };
    let has_link = |name: &str| {
        tb.exec(&node, ["ip", "link", "show", name])
            .unwrap()
            .status
            .success()
    };
    let mut dp = Userspace::start(UserspaceConfig {
        netns: Some(node.clone()),
        interfaces: vec!["eth0".into(), "vp*".into()],
        workers: 1,
        node_traffic: true,
        ..UserspaceConfig::default()
    })
    .unwrap();
    assert!(has_link(HOST_VETH) && has_link(HOST_PORT));

    let mut c = Cluster::simulated();
    let mut svc = Service::new(ObjectName::new("default", "web"));
    svc.cluster_ips = vec!["10.96.0.10".parse().unwrap()];
    // ClusterIPs only: an externalIP that is the node's own address gets no route (the
    // kernel delivers it locally), and neither does another one (a route would take every
    // port of that address, and it may be another node's).
    svc.external_ips = vec![node_ip, "198.51.100.7".parse().unwrap()];
    svc.ports.push(ServicePort::new(
        "",
        Protocol::Tcp,
        80,
        TargetPort::Number(8080),
    ));
    svc.selector = Some(LabelSelector::from_labels(BTreeMap::from([(
        "app".to_string(),
        "web".to_string(),
    )])));
    c.upsert_service(svc);
    let mut pod = Pod::new(
        ObjectName::new("default", "web-0"),
        "10.244.0.10".parse().unwrap(),
    );
    pod.labels.insert("app".into(), "web".into());
    c.upsert_pod(pod);
    let plan = Plan::compile(&c, &NodeContext::new("node-0", vec![node_ip], Vec::new()));
    dp.resync(&plan).unwrap();
    let shown = routes();
    // In the `local` table: `main`, which the driver reads on every sync and the node's
    // admin reads with `ip route`, holds none of them.
    let main = tb
        .exec_ok(&node, ["ip", "route", "show", "table", "main"])
        .unwrap_or_default();
    assert!(!main.contains(HOST_VETH), "{main}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("10.96.0.10 via 169.254.1.1 ")
                && l.contains(&format!(" src {node_ip}"))
                && l.contains("onlink")),
        "10.96.0.10 in {shown}"
    );
    for not_routed in [node_ip.to_string(), "198.51.100.7".to_string()] {
        assert!(
            !shown
                .lines()
                .any(|l| l.starts_with(&format!("{not_routed} "))),
            "{shown}"
        );
    }
    assert!(!dp.drifted().unwrap(), "just applied");

    // A route deleted: noticed at the next drift check, put back by the resync.
    tb.exec_ok(
        &node,
        [
            "ip",
            "route",
            "del",
            "table",
            "local",
            "10.96.0.10",
            "dev",
            HOST_VETH,
        ],
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(8), || dp.drifted().unwrap()));
    dp.resync(&plan).unwrap();
    assert!(routes().contains("10.96.0.10 via"), "{}", routes());

    // The pair deleted (its routes with it): noticed within the link check, made again.
    tb.exec_ok(&node, ["ip", "link", "del", HOST_VETH]).unwrap();
    assert!(wait_until(Duration::from_secs(3), || dp.drifted().unwrap()));
    dp.resync(&plan).unwrap();
    assert!(has_link(HOST_VETH) && has_link(HOST_PORT));
    assert!(routes().contains("10.96.0.10 via"), "{}", routes());

    // Gone with the datapath.
    drop(dp);
    assert!(!has_link(HOST_VETH) && !has_link(HOST_PORT));

    // A pair a killed process left: `cleanup` removes it.
    tb.exec_ok(
        &node,
        [
            "ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", HOST_PORT,
        ],
    )
    .unwrap();
    cleanup(Some(&node)).unwrap();
    assert!(!has_link(HOST_VETH) && !has_link(HOST_PORT));
}

/// `node_traffic` and NodePorts from the node itself: the ingress chain on `lo` drops the
/// node's connections to its NodePorts (the engine takes them from its ring), the node's
/// end of the pair accepts the replies' local source, a flushed `lo` chain is noticed and
/// put back, `lo` is left to the kernel while `net.ipv4.conf.all.rp_filter` would refuse
/// the replies, and the chain goes with the datapath.
#[test]
fn node_port_chain_on_lo_follows_the_plan_and_is_removed() {
    use std::collections::BTreeMap;
    use svcnat_core::model::*;
    use svcnat_core::plan::{Dataplane, NodeContext, Plan};
    use svcnat_userspace::driver::HOST_VETH;

    skip_unless_root!();
    let tb = Testbed::new(TestbedSpec::new(1, 1)).unwrap();
    let node = tb.ns_of_node(0).to_string();
    let node_ip = tb.node_ip(0);
    let table = || {
        tb.exec_ok(&node, ["nft", "list", "table", "netdev", "svcnat"])
            .unwrap_or_default()
    };
    let mut dp = Userspace::start(UserspaceConfig {
        netns: Some(node.clone()),
        interfaces: vec!["eth0".into(), "vp*".into()],
        workers: 1,
        node_traffic: true,
        ..UserspaceConfig::default()
    })
    .unwrap();
    assert_eq!(
        sysctl(
            &tb,
            &node,
            &format!("net.ipv4.conf.{HOST_VETH}.accept_local")
        ),
        "1"
    );
    assert_eq!(
        sysctl(&tb, &node, &format!("net.ipv4.conf.{HOST_VETH}.rp_filter")),
        "0"
    );

    let mut c = Cluster::simulated();
    let mut svc = Service::new(ObjectName::new("default", "web"));
    svc.service_type = ServiceType::NodePort;
    svc.cluster_ips = vec!["10.96.0.10".parse().unwrap()];
    let mut sp = ServicePort::new("", Protocol::Tcp, 80, TargetPort::Number(8080));
    sp.node_port = Some(30080);
    svc.ports.push(sp);
    svc.selector = Some(LabelSelector::from_labels(BTreeMap::from([(
        "app".to_string(),
        "web".to_string(),
    )])));
    c.upsert_service(svc);
    let plan = Plan::compile(&c, &NodeContext::new("node-0", vec![node_ip], Vec::new()));
    dp.resync(&plan).unwrap();
    let element = format!("{node_ip} . tcp . 30080");
    let t = table();
    assert!(t.contains("hook ingress device \"lo\""), "{t}");
    assert!(t.contains(&element), "{t}");
    assert!(!dp.drifted().unwrap(), "just applied");

    // The rings take from lo only the node's traffic to its NodePorts: loopback traffic
    // to other ports (300 datagrams and as many ICMP errors) never reaches them (a few
    // frames of the pair's own neighbour discovery may); a connection to the NodePort
    // (refused: no endpoints) does.
    let frames = || dp.stats().rx_frames;
    let before = frames();
    for target in [
        "127.0.0.1:9",
        &format!("{node_ip}:9"),
        &format!("{node_ip}:30081"),
    ] {
        let r = tb
            .probe(&node, ProbeArgs::udp(target.parse().unwrap()).count(100))
            .unwrap();
        assert_eq!(r.ok(), 0, "{r:?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        frames() < before + 20,
        "loopback traffic reached the rings: {before} -> {}",
        frames()
    );
    let r = tb
        .probe(
            &node,
            ProbeArgs::tcp(SocketAddr::new(node_ip, 30080)).count(3),
        )
        .unwrap();
    assert_eq!(r.refused(), 3, "{r:?}");
    assert!(
        wait_until(Duration::from_secs(5), || frames() >= before + 3),
        "the node's SYNs to its NodePort: {before} -> {}",
        frames()
    );

    // The lo chain flushed: noticed at the next drift check, put back by the resync.
    tb.exec_ok(
        &node,
        ["nft", "flush", "chain", "netdev", "svcnat", "in_lo"],
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(8), || dp.drifted().unwrap()));
    dp.resync(&plan).unwrap();
    assert!(table().contains("@nodeports4 counter"), "{}", table());

    // Reverse-path filtering for every interface: the replies would be refused, so `lo`
    // stays the kernel's until it is off again.
    tb.exec_ok(&node, ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2"])
        .unwrap();
    dp.resync(&plan).unwrap();
    assert!(!table().contains("device \"lo\""), "{}", table());
    tb.exec_ok(&node, ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"])
        .unwrap();
    dp.resync(&plan).unwrap();
    assert!(table().contains("device \"lo\""), "{}", table());

    drop(dp);
    let out = tb
        .exec(&node, ["nft", "list", "table", "netdev", "svcnat"])
        .unwrap();
    assert!(!out.status.success(), "the lo chain outlived the datapath");
}
