//! What the userspace datapath admits for forwarding, against the kernel on the same
//! topology: the same frames are injected at a node twice, once with the kernel forwarding
//! (`ip_forward=1`, no datapath) and once with the datapath owning the node's interfaces,
//! and nftables counters in the pod and at the node's default gateway count what each
//! path let through. `rp_filter=1` on the node.
//!
//! ```text
//!  client c0 ──LAN── node n0 (rp_filter=1, default via n1, mgmt0 10.99.0.1/24 not owned)
//!                     │ vp0        │ vp1                 node n1: the default gateway
//!                    web-0        web-1                  (counts what arrives)
//!                 10.244.0.10   10.244.0.11
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use etherparse::PacketBuilder;
use svcnat_examples::skip_unless_root;
use svcnat_examples::testbed::{PodSpec, Testbed, TestbedSpec};
use svcnat_userspace::inject::Injector;
use svcnat_userspace::{Userspace, UserspaceConfig};

const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);

/// One frame the client injects at node 0, and where the kernel lets it arrive.
struct Case {
    name: &'static str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    /// 802.1Q VLAN id of a tag, if any.
    vlan: Option<u16>,
    /// Copies arriving in the pod (of 3 sent), and at the gateway.
    kernel: (u64, u64),
}

fn cases() -> Vec<Case> {
    let c = |name, src: [u8; 4], dst: [u8; 4], kernel| Case {
        name,
        src: Ipv4Addr::from(src),
        dst: Ipv4Addr::from(dst),
        vlan: None,
        kernel,
    };
    let client = CLIENT.octets();
    let pod = POD.octets();
    vec![
        // Controls: what the kernel forwards, the datapath must forward too.
        c("client to pod", client, pod, (3, 0)),
        c(
            "client to a remote network (default route)",
            client,
            [198, 51, 100, 7],
            (0, 3),
        ),
        // rp_filter=1: the route back to 10.244.0.11 is vp1, not eth0.
        c(
            "LAN packet spoofing a pod source",
            [10, 244, 0, 11],
            pod,
            (0, 0),
        ),
        c("loopback source", [127, 0, 0, 1], pod, (0, 0)),
        c("unspecified source", [0, 0, 0, 0], pod, (0, 0)),
        // Linux 5.3 made the rest of 0.0.0.0/8 routable.
        c("0.0.0.7 source", [0, 0, 0, 7], pod, (3, 0)),
        c("multicast source", [224, 0, 0, 9], pod, (0, 0)),
        c(
            "limited broadcast source",
            [255, 255, 255, 255],
            pod,
            (0, 0),
        ),
        c("subnet broadcast source", [192, 168, 50, 255], pod, (0, 0)),
        c(
            "the node's own address as source",
            [192, 168, 50, 11],
            pod,
            (0, 0),
        ),
        c(
            "the node's address on an interface it does not own",
            client,
            [10, 99, 0, 1],
            (0, 0),
        ),
        c(
            "the management subnet (not owned)",
            client,
            [10, 99, 0, 5],
            (0, 0),
        ),
        c(
            "a ClusterIP nobody serves (routed to svc0)",
            client,
            [10, 96, 5, 5],
            (0, 0),
        ),
        c("loopback destination", client, [127, 0, 0, 5], (0, 0)),
        c("0.1.2.3 destination", client, [0, 1, 2, 3], (0, 3)),
        c(
            "subnet broadcast destination",
            client,
            [192, 168, 50, 255],
            (0, 0),
        ),
        Case {
            vlan: Some(10),
            ..c(
                "tagged for VLAN 10, which the node lacks",
                client,
                pod,
                (0, 0),
            )
        },
    ]
}

/// A UDP frame to port 9999 from source port `sport` (the case's mark), tagged if asked.
fn frame(src_mac: [u8; 6], dst_mac: [u8; 6], case: &Case, sport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(case.src.octets(), case.dst.octets(), 64)
        .udp(sport, 9999);
    let payload = b"svcnat admission";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    if let Some(vid) = case.vlan {
        let mut tag = vec![0x81, 0x00];
        tag.extend_from_slice(&vid.to_be_bytes());
        out.splice(12..12, tag);
    }
    out
}

/// The rule counting, per case, the UDP packets from its source port.
fn case_rule(port: u16) -> String {
    format!("udp sport {port} udp dport 9999")
}

/// Injects every case (three copies each, source port `base + i`) and returns what
/// arrived in the pod and at the gateway per case.
fn run_cases(tb: &Testbed, cases: &[Case], base: u16) -> Vec<(u64, u64)> {
    let node_mac = tb.mac(tb.ns_of_node(0), "eth0").unwrap();
    let client_mac = tb.mac(tb.ns_of_client(0), "eth0").unwrap();
    let inj = Injector::open(Some(tb.ns_of_client(0)), "eth0").unwrap();
    let pod_ns = tb.ns_of_pod("web-0").unwrap().to_string();
    let gw_ns = tb.ns_of_node(1).to_string();
    let ports: Vec<u16> = (0..cases.len() as u16).map(|i| base + i).collect();
    let rules: Vec<String> = ports.iter().map(|&p| case_rule(p)).collect();
    tb.install_ingress_counters(&pod_ns, &rules).unwrap();
    tb.install_ingress_counters(&gw_ns, &rules).unwrap();
    for round in 0..3 {
        let frames: Vec<Vec<u8>> = cases
            .iter()
            .zip(&ports)
            .map(|(c, p)| frame(client_mac, node_mac, c, *p))
            .collect();
        inj.send(&frames).unwrap();
        // The first round waits for the next hops' ARP.
        std::thread::sleep(Duration::from_millis(if round == 0 { 400 } else { 50 }));
    }
    std::thread::sleep(Duration::from_millis(300));
    let seen = ports
        .iter()
        .map(|p| {
            let rule = case_rule(*p);
            (
                tb.ingress_counter(&pod_ns, &rule).unwrap(),
                tb.ingress_counter(&gw_ns, &rule).unwrap(),
            )
        })
        .collect();
    for ns in [&pod_ns, &gw_ns] {
        tb.exec_ok(ns, ["nft", "delete", "table", "netdev", "obs"])
            .unwrap();
    }
    seen
}

#[test]
fn userspace_admits_for_forwarding_exactly_what_the_kernel_does() {
    skip_unless_root!();
    let tb = Testbed::new(
        TestbedSpec::new(2, 1)
            .pod(PodSpec::new("web-0", 0, IpAddr::V4(POD)).udp(9999))
            .pod(PodSpec::new("web-1", 0, IpAddr::from([10, 244, 0, 11])).udp(9999)),
    )
    .unwrap();
    let node = tb.ns_of_node(0).to_string();
    for cmd in [
        &["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=1"][..],
        // A management interface the datapath does not own .
        &["ip", "link", "add", "mgmt0", "type", "bridge"],
        &["ip", "addr", "add", "10.99.0.1/24", "dev", "mgmt0"],
        &["ip", "link", "set", "mgmt0", "up"],
        &["ip", "route", "add", "default", "via", "192.168.50.12"],
    ] {
        tb.exec_ok(&node, cmd.iter().copied()).unwrap();
    }
    let cases = cases();

    let kernel = run_cases(&tb, &cases, 41000);
    let dp = Userspace::start(UserspaceConfig {
        netns: Some(node.clone()),
        interfaces: vec!["eth0".into(), "vp*".into()],
        workers: 1,
        ..UserspaceConfig::default()
    })
    .unwrap();
    let userspace = run_cases(&tb, &cases, 42000);
    let stats = dp.stats();
    drop(dp);

    let mut wrong = Vec::new();
    for ((c, k), u) in cases.iter().zip(&kernel).zip(&userspace) {
        if *k != c.kernel {
            wrong.push(format!(
                "{}: kernel let {k:?} through, the test expected {:?}",
                c.name, c.kernel
            ));
        }
        if u != k {
            wrong.push(format!(
                "{}: userspace let {u:?} (pod, gateway) through, the kernel {k:?}",
                c.name
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{}\n{:?}",
        wrong.join("\n"),
        stats.engine.drops
    );
    assert!(stats.rx_vlan >= 3, "tagged frames not counted: {stats:?}");
}
