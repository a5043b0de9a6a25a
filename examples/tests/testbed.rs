//! The namespace testbed itself, with real packets: topology, routing, servers, probes,
//! isolation from the root namespace, and cleanup.
//!
//! Each test returns early with `SKIP: reason` when not root (and fails under `CI=true`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Mutex;
use std::thread;

use svcnat_examples::skip_unless_root;
use svcnat_examples::testbed::{
    Attempt, PodSpec, ProbeArgs, ProbeResult, Testbed, TestbedSpec, reply_field,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// Two nodes; pods a, b, c on node 0 and d on node 1, each serving TCP 80 and UDP 5353;
/// one client.
fn standard_spec() -> TestbedSpec {
    TestbedSpec::new(2, 1)
        .binaries(svcnat_examples::testbed_binaries!())
        .pod(
            PodSpec::new("pod-a", 0, ip("10.244.0.10"))
                .tcp(80)
                .udp(5353),
        )
        .pod(
            PodSpec::new("pod-b", 0, ip("10.244.0.11"))
                .tcp(80)
                .udp(5353),
        )
        .pod(
            PodSpec::new("pod-c", 0, ip("10.244.0.12"))
                .tcp(80)
                .tcp(8080)
                .udp(5353),
        )
        .pod(
            PodSpec::new("pod-d", 1, ip("10.244.1.10"))
                .tcp(80)
                .udp(5353),
        )
}

fn netns_list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success(), "ip netns list: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    netns_list()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// `ip ARGS` in the root namespace (read-only commands only).
fn root_ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn root_state() -> Vec<String> {
    [
        &["-o", "link"][..],
        &["-o", "addr"],
        &["route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
        &["rule"],
        &["-6", "rule"],
    ]
    .iter()
    .map(|args| format!("ip {args:?}\n{}", root_ip(args)))
    .collect()
}

#[test]
fn node_reaches_every_pod_over_tcp_and_udp() {
    skip_unless_root!();
    let tb = Testbed::new(standard_spec()).unwrap();
    let node0 = tb.ns_of_node(0);
    for (pod, addr) in [
        ("pod-a", "10.244.0.10"),
        ("pod-b", "10.244.0.11"),
        ("pod-c", "10.244.0.12"),
        ("pod-d", "10.244.1.10"),
    ] {
        let tcp = tb
            .probe(node0, ProbeArgs::tcp(sa(ip(addr), 80)).count(3))
            .unwrap();
        assert!(tcp.all_ok(), "tcp {pod}: {tcp}");
        assert_eq!(tcp.pods(), BTreeSet::from([pod.to_string()]), "{tcp}");
        // The node's only address is its LAN address: the pod sees that, unchanged.
        assert_eq!(tcp.client_ips(), BTreeSet::from([tb.node_ip(0)]), "{tcp}");

        let udp = tb
            .probe(node0, ProbeArgs::udp(sa(ip(addr), 5353)).count(3))
            .unwrap();
        assert!(udp.all_ok(), "udp {pod}: {udp}");
        assert_eq!(udp.pods(), BTreeSet::from([pod.to_string()]), "{udp}");
        // Each datagram comes from a new socket, hence a new source port.
        let ports: BTreeSet<u16> = udp.clients().iter().map(SocketAddr::port).collect();
        assert_eq!(ports.len(), 3, "{udp}: {:?}", udp.clients());
    }
    // A second port of the same pod, and a closed port (the pod's kernel resets).
    let second = tb
        .probe(node0, ProbeArgs::tcp(sa(ip("10.244.0.12"), 8080)))
        .unwrap();
    assert_eq!(second.per_pod().get("pod-c"), Some(&1), "{second}");
    let closed = tb
        .probe(node0, ProbeArgs::tcp(sa(ip("10.244.0.10"), 81)))
        .unwrap();
    assert_eq!(closed.refused(), 1, "{closed}");
    let closed_udp = tb
        .probe(node0, ProbeArgs::udp(sa(ip("10.244.0.10"), 9)))
        .unwrap();
    assert_eq!(closed_udp.refused(), 1, "{closed_udp}");
    // Node 1 reaches node 0's pods through the host-gw route as well.
    let back = tb
        .probe(tb.ns_of_node(1), ProbeArgs::tcp(sa(ip("10.244.0.11"), 80)))
        .unwrap();
    assert_eq!(back.per_pod().get("pod-b"), Some(&1), "{back}");
}

#[test]
fn pod_to_pod_across_nodes_keeps_the_source() {
    skip_unless_root!();
    let tb = Testbed::new(standard_spec()).unwrap();
    let a = tb.ns_of_pod("pod-a").unwrap();
    let d = tb.ns_of_pod("pod-d").unwrap();

    let to_d = tb
        .probe(a, ProbeArgs::tcp(sa(ip("10.244.1.10"), 80)).count(2))
        .unwrap();
    assert!(to_d.all_ok(), "{to_d}");
    assert_eq!(to_d.pods(), BTreeSet::from(["pod-d".to_string()]));
    assert_eq!(
        to_d.client_ips(),
        BTreeSet::from([ip("10.244.0.10")]),
        "{to_d}"
    );

    let to_a = tb
        .probe(d, ProbeArgs::udp(sa(ip("10.244.0.10"), 5353)).count(2))
        .unwrap();
    assert!(to_a.all_ok(), "{to_a}");
    assert_eq!(
        to_a.client_ips(),
        BTreeSet::from([ip("10.244.1.10")]),
        "{to_a}"
    );

    // Same node, pod to pod.
    let to_b = tb
        .probe(a, ProbeArgs::tcp(sa(ip("10.244.0.11"), 80)))
        .unwrap();
    assert_eq!(to_b.per_pod().get("pod-b"), Some(&1), "{to_b}");
    assert_eq!(
        to_b.client_ips(),
        BTreeSet::from([ip("10.244.0.10")]),
        "{to_b}"
    );
}

#[test]
fn clients_reach_nodes_but_not_pods() {
    skip_unless_root!();
    let tb = Testbed::new(standard_spec()).unwrap();
    let client = tb.ns_of_client(0);
    for i in 0..2 {
        // Nothing listens on the nodes: a refusal proves the path.
        let r = tb
            .probe(
                client,
                ProbeArgs::tcp(sa(tb.node_ip(i), 80)).timeout_ms(500),
            )
            .unwrap();
        assert_eq!(r.refused(), 1, "node {i}: {r}");
    }
    // No route to pods, ClusterIPs or the outside world.
    for target in ["10.244.0.10", "10.96.0.1", "8.8.8.8"] {
        let r = tb
            .probe(client, ProbeArgs::tcp(sa(ip(target), 80)).timeout_ms(500))
            .unwrap();
        assert_eq!(r.unreachable(), 1, "{target}: {r}");
    }
    let routes = tb.exec_ok(client, ["ip", "route"]).unwrap();
    assert!(!routes.contains("default"), "{routes}");
}

#[test]
fn service_range_is_routed_so_filter_rejects_and_lb_routes_lead_to_node_0() {
    skip_unless_root!();
    if Command::new("iptables").arg("-V").output().is_err() {
        assert!(
            !svcnat_examples::testbed::in_ci(),
            "CI=true but iptables is missing"
        );
        eprintln!("SKIP: iptables is not installed");
        return;
    }
    let lb = ip("203.0.113.10");
    let tb = Testbed::new(standard_spec().lb_route(lb)).unwrap();
    let node0 = tb.ns_of_node(0);
    let a = tb.ns_of_pod("pod-a").unwrap();

    // Without rules a ClusterIP goes to svc0 and vanishes: a timeout, not unreachable.
    let silent = tb
        .probe(a, ProbeArgs::tcp(sa(ip("10.96.0.1"), 80)).timeout_ms(300))
        .unwrap();
    assert_eq!(silent.timeouts(), 1, "{silent}");
    // A filter REJECT (as for a Service without endpoints) sees the forwarded packet.
    tb.exec_ok(
        node0,
        [
            "iptables",
            "-A",
            "FORWARD",
            "-d",
            "10.96.0.1/32",
            "-p",
            "tcp",
            "-j",
            "REJECT",
        ],
    )
    .unwrap();
    let rejected = tb
        .probe(a, ProbeArgs::tcp(sa(ip("10.96.0.1"), 80)).timeout_ms(500))
        .unwrap();
    assert_eq!(rejected.refused(), 1, "{rejected}");

    // A DNAT on node 0 (what a proxy programs) turns the routed LB address into pod-a;
    // the source address is kept.
    tb.exec_ok(
        node0,
        [
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "203.0.113.10/32",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            "10.244.0.10:80",
        ],
    )
    .unwrap();
    let via_lb = tb
        .probe(tb.ns_of_client(0), ProbeArgs::tcp(sa(lb, 80)).count(2))
        .unwrap();
    assert!(via_lb.all_ok(), "{via_lb}");
    assert_eq!(via_lb.pods(), BTreeSet::from(["pod-a".to_string()]));
    assert_eq!(
        via_lb.client_ips(),
        BTreeSet::from([tb.client_ip(0)]),
        "{via_lb}"
    );
}

#[test]
fn held_connection_answers_line_by_line() {
    skip_unless_root!();
    let tb = Testbed::new(standard_spec()).unwrap();
    let mut held = tb
        .hold(tb.ns_of_node(0), sa(ip("10.244.1.10"), 80))
        .unwrap();
    assert_eq!(held.local_addr().ip(), tb.node_ip(0));
    for text in ["one", "two words", "three"] {
        let reply = held.ping(text).unwrap();
        assert_eq!(reply_field(&reply, "pod"), Some("pod-d"), "{reply}");
        assert!(reply.ends_with(&format!("line={text}")), "{reply}");
        assert_eq!(
            reply_field(&reply, "client"),
            Some(held.local_addr().to_string().as_str()),
            "{reply}"
        );
    }
    // A refused hold is an error, not a hang.
    let refused = tb.hold(tb.ns_of_node(0), sa(ip("10.244.1.10"), 81));
    assert!(refused.is_err());
    assert!(format!("{}", refused.unwrap_err()).contains("refused"));
}

#[test]
fn pods_come_and_go() {
    skip_unless_root!();
    let mut tb = Testbed::new(standard_spec()).unwrap();
    let node0 = tb.ns_of_node(0).to_string();
    let target = sa(ip("10.244.0.20"), 80);

    tb.add_pod(PodSpec::new("pod-e", 0, ip("10.244.0.20")).tcp(80))
        .unwrap();
    let e_ns = tb.ns_of_pod("pod-e").unwrap().to_string();
    assert!(netns_list().contains(&e_ns));
    let r = tb.probe(&node0, ProbeArgs::tcp(target)).unwrap();
    assert_eq!(r.per_pod().get("pod-e"), Some(&1), "{r}");
    // Names are unique, and addresses must lie in the node's pod CIDR.
    assert!(
        tb.add_pod(PodSpec::new("pod-e", 0, ip("10.244.0.21")))
            .is_err()
    );
    assert!(
        tb.add_pod(PodSpec::new("pod-f", 0, ip("10.244.1.21")))
            .is_err()
    );

    tb.remove_pod("pod-e").unwrap();
    assert!(tb.ns_of_pod("pod-e").is_none());
    assert!(!netns_list().contains(&e_ns));
    let gone = tb
        .probe(&node0, ProbeArgs::tcp(target).timeout_ms(300))
        .unwrap();
    assert_eq!(gone.ok(), 0, "{gone}");
    assert!(tb.remove_pod("pod-e").is_err());

    // The name can come back, on the other node this time, in a fresh namespace.
    tb.add_pod(PodSpec::new("pod-e", 1, ip("10.244.1.20")).udp(53))
        .unwrap();
    assert_ne!(tb.ns_of_pod("pod-e").unwrap(), e_ns);
    let r = tb
        .probe(&node0, ProbeArgs::udp(sa(ip("10.244.1.20"), 53)))
        .unwrap();
    assert_eq!(r.per_pod().get("pod-e"), Some(&1), "{r}");
}

#[test]
fn dual_stack_pods_answer_on_both_families() {
    skip_unless_root!();
    let spec = TestbedSpec::new(2, 1)
        .with_ipv6()
        .binaries(svcnat_examples::testbed_binaries!())
        .pod(
            PodSpec::new("v6-a", 0, ip("10.244.0.10"))
                .with_ip(ip("fd00:10:244:0::10"))
                .tcp(80)
                .udp(53),
        )
        .pod(
            PodSpec::new("v6-d", 1, ip("10.244.1.10"))
                .with_ip(ip("fd00:10:244:1::10"))
                .tcp(80)
                .udp(53),
        );
    let tb = Testbed::new(spec).unwrap();
    let node0 = tb.ns_of_node(0);
    for (pod, v4, v6) in [
        ("v6-a", "10.244.0.10", "fd00:10:244:0::10"),
        ("v6-d", "10.244.1.10", "fd00:10:244:1::10"),
    ] {
        for addr in [v4, v6] {
            let tcp = tb.probe(node0, ProbeArgs::tcp(sa(ip(addr), 80))).unwrap();
            assert_eq!(tcp.per_pod().get(pod), Some(&1), "{addr}: {tcp}");
            let udp = tb.probe(node0, ProbeArgs::udp(sa(ip(addr), 53))).unwrap();
            assert_eq!(udp.per_pod().get(pod), Some(&1), "{addr}: {udp}");
        }
    }
    // v4 clients show as v4, v6 as v6 (the server unmaps IPv4-mapped addresses).
    let v4 = tb
        .probe(node0, ProbeArgs::tcp(sa(ip("10.244.1.10"), 80)))
        .unwrap();
    assert_eq!(v4.client_ips(), BTreeSet::from([tb.node_ip(0)]), "{v4}");
    let v6 = tb
        .probe(
            tb.ns_of_pod("v6-a").unwrap(),
            ProbeArgs::tcp(sa(ip("fd00:10:244:1::10"), 80)),
        )
        .unwrap();
    assert_eq!(
        v6.client_ips(),
        BTreeSet::from([ip("fd00:10:244:0::10")]),
        "{v6}"
    );
    // The client reaches the nodes over the IPv6 LAN.
    let lan6 = tb
        .probe(
            tb.ns_of_client(0),
            ProbeArgs::tcp(sa(tb.node_ip6(1).unwrap(), 80)),
        )
        .unwrap();
    assert_eq!(lan6.refused(), 1, "{lan6}");
}

#[test]
fn parallel_testbeds_do_not_collide() {
    skip_unless_root!();
    let prefixes = Mutex::new(Vec::new());
    thread::scope(|s| {
        for t in 0..3 {
            let prefixes = &prefixes;
            s.spawn(move || {
                let tb = Testbed::new(standard_spec()).unwrap();
                prefixes.lock().unwrap().push(tb.prefix().to_string());
                // Same addresses in every testbed, yet each answers with its own pods.
                for _ in 0..3 {
                    let r = tb
                        .probe(tb.ns_of_node(0), ProbeArgs::tcp(sa(ip("10.244.1.10"), 80)))
                        .unwrap();
                    assert_eq!(r.per_pod().get("pod-d"), Some(&1), "thread {t}: {r}");
                }
                let mut names = tb.namespaces().to_vec();
                names.sort();
                let listed = namespaces_with_prefix(tb.prefix());
                let listed: BTreeSet<_> = listed.into_iter().collect();
                assert_eq!(names.into_iter().collect::<BTreeSet<_>>(), listed);
            });
        }
    });
    let prefixes = prefixes.into_inner().unwrap();
    let distinct: BTreeSet<_> = prefixes.iter().collect();
    assert_eq!(distinct.len(), 3, "{prefixes:?}");
    for p in &prefixes {
        assert!(namespaces_with_prefix(p).is_empty(), "{p} left behind");
    }
}

#[test]
fn drop_deletes_every_namespace() {
    skip_unless_root!();
    let tb = Testbed::new(standard_spec()).unwrap();
    let prefix = tb.prefix().to_string();
    // Switch, 2 nodes, 1 client, 4 pods.
    assert_eq!(namespaces_with_prefix(&prefix).len(), 8);
    assert_eq!(tb.namespaces().len(), 8);
    let server_ns = tb.ns_of_pod("pod-a").unwrap().to_string();
    drop(tb);
    assert!(namespaces_with_prefix(&prefix).is_empty());
    assert!(!netns_list().contains(&server_ns));
}

#[test]
fn drop_deletes_every_namespace_when_a_test_panics() {
    skip_unless_root!();
    let prefix = Mutex::new(String::new());
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let tb = Testbed::new(standard_spec()).unwrap();
        *prefix.lock().unwrap() = tb.prefix().to_string();
        assert!(!namespaces_with_prefix(tb.prefix()).is_empty());
        panic!("deliberate panic inside a testbed");
    }));
    assert!(outcome.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(prefix.starts_with("sv"), "{prefix:?}");
    assert!(namespaces_with_prefix(&prefix).is_empty());
}

#[test]
fn a_failed_build_leaves_nothing_behind() {
    skip_unless_root!();
    let mut bins = svcnat_examples::testbed_binaries!();
    // A "server" that exits at once fails the first pod, after the switch, nodes and
    // client exist.
    bins.podserver = "/bin/false".into();
    let before: BTreeSet<String> = netns_list().into_iter().collect();
    let err = Testbed::new(standard_spec().binaries(bins)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("exited"), "{text}");
    let prefix = text
        .split_whitespace()
        .find(|w| w.starts_with("sv"))
        .map(|w| w.trim_end_matches(':').to_string())
        .unwrap_or_else(|| panic!("no testbed prefix in {text:?}"));
    assert!(namespaces_with_prefix(&prefix).is_empty(), "{prefix}");
    // Whatever else appeared belongs to tests running in parallel, not to this prefix.
    let after: BTreeSet<String> = netns_list().into_iter().collect();
    assert!(after.difference(&before).all(|n| !n.starts_with(&prefix)));

    // A bad spec is refused before anything is created.
    let bad = standard_spec().pod(PodSpec::new("stray", 5, ip("10.244.5.1")));
    assert_eq!(
        Testbed::new(bad).unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
}

#[test]
fn the_root_namespace_gains_nothing() {
    skip_unless_root!();
    let before = root_state();
    {
        let mut tb = Testbed::new(standard_spec().lb_route(ip("203.0.113.10"))).unwrap();
        let r = tb
            .probe(tb.ns_of_node(0), ProbeArgs::tcp(sa(ip("10.244.1.10"), 80)))
            .unwrap();
        assert!(r.all_ok(), "{r}");
        tb.add_pod(PodSpec::new("pod-e", 1, ip("10.244.1.20")).tcp(80))
            .unwrap();
        tb.remove_pod("pod-e").unwrap();
        // While the testbed exists the root namespace is already unchanged.
        assert_eq!(root_state(), before);
    }
    assert_eq!(root_state(), before);
}

#[test]
fn probe_output_parses() {
    // No root needed.
    let r = ProbeResult::parse(
        "ok pod=web-0 client=10.244.0.1:40000\n\
         ok pod=web-1 client=[fd00::1]:40001\n\
         refused\ntimeout\nunreachable\nerror Connection reset by peer\n\
         ok pod=web-0 client=10.244.0.1:40002\n",
    );
    assert_eq!(r.attempts.len(), 7);
    assert_eq!(r.ok(), 3);
    assert_eq!(r.refused(), 1);
    assert_eq!(r.timeouts(), 1);
    assert_eq!(r.unreachable(), 1);
    assert_eq!(r.errors(), vec!["Connection reset by peer"]);
    assert_eq!(r.per_pod().get("web-0"), Some(&2));
    assert_eq!(
        r.client_ips(),
        BTreeSet::from([ip("10.244.0.1"), ip("fd00::1")])
    );
    assert!(!r.all_ok());
    assert_eq!(
        r.attempts[1],
        Attempt::Ok {
            pod: "web-1".to_string(),
            client: Some("[fd00::1]:40001".parse().unwrap())
        }
    );
    assert_eq!(reply_field("pod=a client=b line=x y", "line"), Some("x"));
}

#[test]
fn resolv_conf_is_per_namespace_and_removed_on_drop() {
    skip_unless_root!();
    let mut tb =
        Testbed::new(TestbedSpec::new(1, 1).binaries(svcnat_examples::testbed_binaries!()))
            .unwrap();
    let client = tb.ns_of_client(0).to_string();
    let text = "nameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:5\n";
    tb.set_resolv_conf(&client, text).unwrap();
    assert_eq!(
        tb.exec_ok(&client, ["cat", "/etc/resolv.conf"]).unwrap(),
        text
    );
    assert_ne!(
        tb.exec_ok(tb.ns_of_node(0), ["cat", "/etc/resolv.conf"])
            .unwrap(),
        text
    );
    // Only this testbed's namespaces.
    assert!(tb.set_resolv_conf("elsewhere", text).is_err());
    let dir = std::path::Path::new("/etc/netns").join(&client);
    assert!(dir.exists());
    drop(tb);
    assert!(!dir.exists());
}
