//! The userspace datapath under hostile traffic on a real kernel: a SYN flood from spoofed
//! sources (the connection table stays within its bound, established connections keep
//! working, new ones are still admitted), malformed frames as fast as the injector can
//! write them (no crash, every one counted as a drop), and traffic for addresses the node
//! neither serves nor routes (never forwarded: no open relay).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use etherparse::PacketBuilder;
use svcnat_core::model::*;
use svcnat_core::plan::NodeContext;
use svcnat_examples::agent::NodeAgent;
use svcnat_examples::skip_unless_root;
use svcnat_examples::testbed::{PodSpec, ProbeArgs, Testbed, TestbedSpec, wait_until};
use svcnat_userspace::engine::{DropReason, EngineConfig};
use svcnat_userspace::inject::Injector;
use svcnat_userspace::{Userspace, UserspaceConfig};

const NODE_PORT: u16 = 30080;
const MAX_CONNECTIONS: usize = 1024;

struct Setup {
    tb: Testbed,
    agent: NodeAgent<Userspace>,
    node_mac: [u8; 6],
    client_mac: [u8; 6],
    node_ip: Ipv4Addr,
}

fn setup() -> Setup {
    let pod_ip = Ipv4Addr::new(10, 244, 0, 10);
    let tb = Testbed::new(
        TestbedSpec::new(1, 1).pod(PodSpec::new("web-0", 0, IpAddr::V4(pod_ip)).tcp(8080)),
    )
    .unwrap();
    let n = tb.node(0).clone();
    let mut cluster = Cluster::simulated();
    cluster.upsert_node({
        let mut node = Node::new(n.name.clone());
        node.addresses = vec![IpAddr::V4(n.ip)];
        node.pod_cidrs = n.pod_cidrs.clone();
        node
    });
    let mut pod = Pod::new(ObjectName::new("default", "web-0"), IpAddr::V4(pod_ip));
    pod.labels.insert("app".into(), "web".into());
    pod.node_name = Some(n.name.clone());
    cluster.upsert_pod(pod);
    let mut svc = Service::new(ObjectName::new("default", "web"));
    svc.cluster_ips = vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 80))];
    svc.ip_families = vec![IpFamily::V4];
    svc.service_type = ServiceType::NodePort;
    let mut sel = BTreeMap::new();
    sel.insert("app".to_string(), "web".to_string());
    svc.selector = Some(LabelSelector::from_labels(sel));
    svc.ports.push({
        let mut sp = ServicePort::new("", Protocol::Tcp, 80, TargetPort::Number(8080));
        sp.node_port = Some(NODE_PORT);
        sp
    });
    cluster.upsert_service(svc);
    let dp = Userspace::start(UserspaceConfig {
        netns: Some(tb.ns_of_node(0).to_string()),
        interfaces: vec!["eth0".into(), "vp*".into()],
        workers: 2,
        engine: EngineConfig {
            max_connections: MAX_CONNECTIONS,
            ..EngineConfig::default()
        },
        ..UserspaceConfig::default()
    })
    .unwrap();
    let ctx = NodeContext::new(
        n.name.clone(),
        vec![IpAddr::V4(n.ip)],
        vec!["10.244.0.0/16".parse().unwrap()],
    );
    let mut agent = NodeAgent::new(ctx, dp);
    agent.sync(&cluster).unwrap();
    let node_mac = tb.mac(tb.ns_of_node(0), "eth0").unwrap();
    let client_mac = tb.mac(tb.ns_of_client(0), "eth0").unwrap();
    Setup {
        node_ip: n.ip,
        tb,
        agent,
        node_mac,
        client_mac,
    }
}

impl Setup {
    fn service(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.node_ip), NODE_PORT)
    }

    fn injector(&self) -> Injector {
        Injector::open(Some(self.tb.ns_of_client(0)), "eth0").unwrap()
    }

    fn drops(&mut self, reasons: &[DropReason]) -> u64 {
        let st = self.agent.dataplane().stats();
        st.engine
            .drops
            .iter()
            .filter(|(r, _)| reasons.is_empty() || reasons.contains(r))
            .map(|(_, n)| n)
            .sum()
    }
}

/// Recomputes the IPv4 header checksum of an Ethernet frame after an edit.
fn fix_ipv4_checksum(f: &mut [u8]) {
    f[24] = 0;
    f[25] = 0;
    let mut sum: u32 = f[14..34]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Deterministic pseudo-random numbers (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn syn(s: &Setup, src: [u8; 4], sport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(s.client_mac, s.node_mac)
        .ipv4(src, s.node_ip.octets(), 64)
        .tcp(sport, NODE_PORT, 1, 64240)
        .syn();
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).unwrap();
    out
}

#[test]
fn syn_flood_is_bounded_and_established_connections_survive() {
    skip_unless_root!();
    let mut s = setup();
    let client = s.tb.ns_of_client(0).to_string();
    let mut held = s.tb.hold(&client, s.service()).unwrap();
    let before = held.ping("before").unwrap();
    assert!(before.contains("web-0"), "{before}");

    // 200,000 SYNs from spoofed sources in 198.18.0.0/15 (no route back: the SYN-ACKs die,
    // every connection stays half open, as in a real flood).
    let inj = s.injector();
    let mut rng = Rng(0x5eed);
    let mut sent = 0;
    for _ in 0..8 {
        let frames: Vec<Vec<u8>> = (0..25_000)
            .map(|_| {
                let r = rng.next();
                let src = [198, 18 + (r & 1) as u8, (r >> 8) as u8, (r >> 16) as u8];
                syn(&s, src, 1024 + (r >> 32) as u16 % 60000)
            })
            .collect();
        sent += inj.send(&frames).unwrap();
    }
    assert!(sent > 100_000, "the injector sent only {sent} SYNs");
    std::thread::sleep(Duration::from_millis(500));
    let st = s.agent.dataplane().stats();
    eprintln!("after {sent} SYNs: {st:?}");
    assert!(
        st.engine.connections <= MAX_CONNECTIONS as u64,
        "the table grew past its bound: {}",
        st.engine.connections
    );
    assert!(
        st.engine.connections_evicted > 0 || s.drops(&[DropReason::ConntrackFull]) > 0,
        "a flood of {sent} SYNs into {MAX_CONNECTIONS} slots must evict or refuse: {st:?}"
    );

    // The established connection kept its entry and still works; new clients get in.
    let after = held.ping("after").unwrap();
    assert!(after.contains("web-0"), "{after}");
    let fresh =
        s.tb.probe(&client, ProbeArgs::tcp(s.service()).count(20))
            .unwrap();
    assert!(fresh.all_ok(), "new connections after the flood: {fresh}");
}

#[test]
fn malformed_frames_at_rate_are_dropped_and_counted() {
    skip_unless_root!();
    let mut s = setup();
    let client = s.tb.ns_of_client(0).to_string();
    let good = syn(&s, [192, 168, 50, 100], 40000);
    let mut bad: Vec<Vec<u8>> = Vec::new();
    // Every truncation of a valid SYN below the end of its TCP header.
    for len in 15..good.len() {
        bad.push(good[..len].to_vec());
    }
    // IHL below 5, and IHL pointing past the end.
    for ihl in [0u8, 1, 4, 15] {
        let mut f = good.clone();
        f[14] = 0x40 | ihl;
        bad.push(f);
    }
    // Wrong IPv4 header checksum.
    let mut f = good.clone();
    f[24] ^= 0xff;
    bad.push(f);
    // Total length larger than the frame.
    let mut f = good.clone();
    f[16] = 0x05;
    f[17] = 0xdc;
    bad.push(f);
    // Wrong TCP checksum on a connection-opening SYN.
    let mut f = good.clone();
    let n = f.len();
    f[n - 3] ^= 0x5a;
    bad.push(f);
    // Fragments reassembly refuses outright (well-formed ones are held, not dropped): an
    // empty one, and one ending past 65,535 bytes.
    let mut f = good[..34].to_vec();
    f[16] = 0;
    f[17] = 20;
    f[20] = 0x20;
    f[21] = 0x01;
    fix_ipv4_checksum(&mut f);
    bad.push(f);
    let mut f = good.clone();
    f[20] = 0x1f;
    f[21] = 0xff;
    fix_ipv4_checksum(&mut f);
    bad.push(f);
    let frames: Vec<Vec<u8>> = bad.iter().cycle().take(100_000).cloned().collect();
    let count_before = s.drops(&[]);
    let rx_before = s.tb.rx_packets(s.tb.ns_of_node(0), "eth0").unwrap();
    let inj = s.injector();
    let mut sent = 0;
    for _ in 0..3 {
        sent += inj.send(&frames).unwrap();
    }
    assert!(sent > 100_000, "the injector sent only {sent} frames");
    // Wait until the counters stop moving.
    let mut last = u64::MAX;
    wait_until(Duration::from_secs(10), || {
        let now = s.drops(&[]);
        let settled = now == last;
        last = now;
        std::thread::sleep(Duration::from_millis(200));
        settled
    });
    let st = s.agent.dataplane().stats();
    let dropped = s.drops(&[]) - count_before;
    let arrived = s.tb.rx_packets(s.tb.ns_of_node(0), "eth0").unwrap() - rx_before;
    eprintln!(
        "sent {sent} malformed frames, {arrived} reached the node, the engine dropped {dropped}; {st:?}"
    );
    // At this rate the sender's and the bridge's backlogs overflow, so fewer frames reach
    // the node than were sent; every frame that did is a counted drop (in the engine, or
    // at a full ring), but for a few ARP exchanges of the probes.
    assert!(arrived >= 10_000, "only {arrived} frames reached the node");
    assert!(
        dropped + st.ring_drops + 50 >= arrived,
        "{arrived} malformed frames arrived, {dropped} counted as drops: {st:?}"
    );
    // Each kind of damage has its own counter.
    for reason in [
        DropReason::Truncated,
        DropReason::Malformed,
        DropReason::BadIpChecksum,
        DropReason::BadL4Checksum,
        DropReason::Fragment,
    ] {
        assert!(s.drops(&[reason]) > 0, "no {reason:?} drops: {st:?}");
    }
    // Nothing crashed: the workers still forward.
    let r =
        s.tb.probe(&client, ProbeArgs::tcp(s.service()).count(10))
            .unwrap();
    assert!(r.all_ok(), "after the malformed frames: {r}");
}

#[test]
fn traffic_for_unserved_unrouted_addresses_is_not_forwarded() {
    skip_unless_root!();
    let mut s = setup();
    let client = s.tb.ns_of_client(0).to_string();
    // The client points a foreign prefix at the node, as an attacker using it as a relay.
    let node_ip = s.node_ip.to_string();
    s.tb.exec_ok(
        &client,
        ["ip", "route", "add", "203.0.113.0/24", "via", &node_ip],
    )
    .unwrap();
    let before = s.agent.dataplane().stats().engine.forwarded;
    let r =
        s.tb.probe(
            &client,
            ProbeArgs::tcp("203.0.113.5:80".parse().unwrap())
                .count(3)
                .timeout_ms(300),
        )
        .unwrap();
    assert_eq!(r.ok(), 0, "{r}");
    let u =
        s.tb.probe(
            &client,
            ProbeArgs::udp("203.0.113.5:53".parse().unwrap())
                .count(3)
                .timeout_ms(300),
        )
        .unwrap();
    assert_eq!(u.ok(), 0, "{u}");
    let after = s.agent.dataplane().stats().engine.forwarded;
    assert_eq!(
        after, before,
        "the datapath forwarded traffic it does not own"
    );
    // The kernel did not forward it either (forwarding is off, the ingress drop saw it).
    let nft =
        s.tb.exec_ok(
            s.tb.ns_of_node(0),
            ["nft", "list", "table", "netdev", "svcnat"],
        )
        .unwrap();
    assert!(nft.contains("counter packets"), "{nft}");
    // The service itself still answers.
    let ok =
        s.tb.probe(&client, ProbeArgs::tcp(s.service()).count(5))
            .unwrap();
    assert!(ok.all_ok(), "{ok}");
}
