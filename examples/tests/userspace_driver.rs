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

/// The transmit ring copies each frame whole into the kernel's buffer: a pod that has
/// not read its datagrams yet keeps exactly what was sent, in order, while the ring's
/// 512 slots are reused several times over (were the slots' pages attached to the
/// buffers, as the kernel does for the part of a frame beyond the `virtio_net_hdr`'s
/// `hdr_len`, a queued datagram could be rewritten by a later frame and show up twice).
/// The first datagrams wait in the engine while it resolves the pod's address; they too
/// arrive first (they once left after those forwarded in the same ring block as the ARP
/// reply, and the engine held 3 where the kernel holds about 101).
#[test]
fn transmit_ring_never_rewrites_queued_datagrams() {
    use std::net::UdpSocket;
    use svcnat_core::model::Protocol;
    use svcnat_examples::netns::run_in;

    skip_unless_root!();
    const SENT: usize = 3000;
    let (tb, dp, pod_ip) =
        one_pod_behind_a_node_port("sink", Protocol::Udp, 5300, 30300, Duration::ZERO);
    let node_ip = tb.node_ip(0);

    // A sink that reads nothing until everything is sent, with room for all of it.
    let sink = run_in(tb.ns_of_pod("sink").unwrap(), || {
        let s = UdpSocket::bind((pod_ip, 5300))?;
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &(32 << 20))
            .map_err(std::io::Error::from)?;
        Ok(s)
    })
    .unwrap();
    let payload = |i: usize| format!("datagram {i:05} {}", "x".repeat(i % 200));
    let client = run_in(tb.ns_of_client(0), || UdpSocket::bind("0.0.0.0:0")).unwrap();
    let target = SocketAddr::new(node_ip, 30300);
    // No warm-up: the first datagrams wait in the engine while it resolves the pod's
    // address, and must still leave before those that came after them.
    sink.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    for i in 0..SENT {
        client.send_to(payload(i).as_bytes(), target).unwrap();
        if i % 64 == 63 {
            // Paced a little, so that the datapath's batches are many and small.
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let sent = dp.stats().tx_frames;
    // In order and each once: a slot's later frame written over a queued datagram would
    // show up as a repeat (the later datagram itself is queued too).
    let (mut got, mut last, mut wrong) = (0usize, None::<usize>, Vec::new());
    while let Ok(n) = sink.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        let index = text.get(9..14).and_then(|i| i.parse::<usize>().ok());
        let ok = index.is_some_and(|i| text == payload(i) && last.is_none_or(|l| i > l));
        if ok {
            last = index;
        } else {
            wrong.push(text);
        }
        got += 1;
    }
    assert!(
        wrong.is_empty(),
        "{} of {got} out of order or rewritten: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    // Several times the ring's 512 slots went by while the sink held its datagrams (some
    // of the first may be dropped: the engine holds 101 while it resolves the pod, and a
    // loaded machine resolves slowly).
    assert!(
        got >= 1600,
        "the sink got {got} of {SENT} (datapath sent {sent})"
    );
}

/// Frames too big for a receive-ring slot (a 2 KiB slot; the client's TCP sends 64 KiB GSO
/// aggregates over its veth) are read whole from the socket in their turn: 16 MiB through
/// a NodePort arrive byte for byte, and the datapath counted frames taken that way and
/// none truncated. The worker busy-polls (`UserspaceConfig::busy_poll`), so that path is
/// exercised too.
#[test]
fn frames_bigger_than_a_ring_slot_arrive_whole_and_in_order() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use svcnat_core::model::Protocol;
    use svcnat_examples::netns::run_in;

    skip_unless_root!();
    const BYTES: usize = 16 << 20;
    // The worker busy-polls before it sleeps: that path takes frames too.
    let (tb, dp, pod_ip) = one_pod_behind_a_node_port(
        "bulk",
        Protocol::Tcp,
        5400,
        30400,
        Duration::from_micros(50),
    );
    let node_ip = tb.node_ip(0);

    // FNV-1a over the stream, and its length.
    fn digest(acc: (u64, usize), bytes: &[u8]) -> (u64, usize) {
        let h = bytes.iter().fold(acc.0, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        (h, acc.1 + bytes.len())
    }
    const FNV_START: (u64, usize) = (0xcbf2_9ce4_8422_2325, 0);
    let listener = run_in(tb.ns_of_pod("bulk").unwrap(), || {
        TcpListener::bind((pod_ip, 5400))
    })
    .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut acc = FNV_START;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return acc,
                Ok(n) => acc = digest(acc, &buf[..n]),
                Err(e) => panic!("pod read after {} bytes: {e}", acc.1),
            }
        }
    });
    let before = dp.stats();
    let mut stream = run_in(tb.ns_of_client(0), || {
        TcpStream::connect_timeout(&SocketAddr::new(node_ip, 30400), Duration::from_secs(5))
    })
    .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Deterministic bytes no TCP offload could mistake for repeats (xorshift).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut sent = FNV_START;
    let mut chunk = vec![0u8; 1 << 16];
    // A broken path stalls TCP rather than failing it: bound the whole transfer.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while sent.1 < BYTES {
        assert!(
            std::time::Instant::now() < deadline,
            "stalled after {} of {BYTES} bytes: {:?}",
            sent.1,
            dp.stats()
        );
        for w in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        stream.write_all(&chunk).unwrap();
        sent = digest(sent, &chunk);
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let got = server.join().unwrap();
    assert_eq!(
        got, sent,
        "(digest, bytes) at the pod against what was sent"
    );
    let after = dp.stats();
    assert!(
        after.rx_queued > before.rx_queued,
        "no frame was too big for a slot: the test did not reach the socket path ({after:?})"
    );
    assert_eq!(after.rx_truncated, before.rx_truncated, "{after:?}");
}

/// A userspace datapath with one worker in a one-node testbed whose pod `name` (at
/// 10.244.0.10) is the endpoint of a NodePort Service: `protocol` port `port` on
/// `node_port`. Returns the testbed, the datapath and the pod's address.
fn one_pod_behind_a_node_port(
    name: &str,
    protocol: svcnat_core::model::Protocol,
    port: u16,
    node_port: u16,
    busy_poll: Duration,
) -> (Testbed, Userspace, std::net::IpAddr) {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};
    use svcnat_core::model::*;
    use svcnat_core::plan::{Dataplane, NodeContext, Plan};
    use svcnat_examples::testbed::PodSpec;

    let pod_ip = IpAddr::V4(Ipv4Addr::new(10, 244, 0, 10));
    let tb = Testbed::new(TestbedSpec::new(1, 1).pod(PodSpec::new(name, 0, pod_ip))).unwrap();
    let node_ip = tb.node_ip(0);
    let mut dp = Userspace::start(UserspaceConfig {
        netns: Some(tb.ns_of_node(0).to_string()),
        interfaces: vec!["eth0".into(), "vp*".into()],
        workers: 1,
        busy_poll,
        ..UserspaceConfig::default()
    })
    .unwrap();
    let mut c = Cluster::simulated();
    c.upsert_node({
        let mut n = Node::new(tb.node(0).name.clone());
        n.addresses = vec![node_ip];
        n.pod_cidrs = tb.node(0).pod_cidrs.clone();
        n
    });
    let mut pod = Pod::new(ObjectName::new("default", name), pod_ip);
    pod.labels.insert("app".into(), name.into());
    pod.node_name = Some(tb.node(0).name.clone());
    c.upsert_pod(pod);
    let mut svc = Service::new(ObjectName::new("default", name));
    svc.service_type = ServiceType::NodePort;
    svc.cluster_ips = vec!["10.96.0.11".parse().unwrap()];
    let mut sp = ServicePort::new("", protocol, port, TargetPort::Number(port));
    sp.node_port = Some(node_port);
    svc.ports.push(sp);
    svc.selector = Some(LabelSelector::from_labels(BTreeMap::from([(
        "app".to_string(),
        name.to_string(),
    )])));
    c.upsert_service(svc);
    dp.resync(&Plan::compile(
        &c,
        &NodeContext::new(tb.node(0).name.clone(), vec![node_ip], Vec::new()),
    ))
    .unwrap();
    (tb, dp, pod_ip)
}
