//! What the userspace datapath admits for forwarding over IPv6, against the kernel on the
//! same dual-stack topology: the same frames are injected at a node twice, once with the
//! kernel forwarding (`net.ipv6.conf.all.forwarding=1`, which the testbed sets on nodes, no
//! datapath) and once with the datapath owning the node's interfaces, and nftables counters
//! in the pod and at the node's default gateway count what each path let through. IPv6 has
//! no `rp_filter`: what the kernel drops is `ip6_rcv_core`'s and `ip6_forward`'s.
//!
//! ```text
//!  client c0 ──LAN fd00:50::/64── node n0 (default via n1, mgmt0 fd00:99::1/64 not owned)
//!                                  │ vp0         │ vp1        node n1 fd00:50::12: the
//!                               web-0          web-1          default gateway (counts what
//!                          fd00:10:244::10  fd00:10:244::11   arrives)
//! ```
//!
//! The pods' gateway is fe80::1 on the node side of each veth: a link-local address of the
//! node that is not on the LAN.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use etherparse::PacketBuilder;
use svcnat_examples::skip_unless_root;
use svcnat_examples::testbed::{PodSpec, Testbed, TestbedSpec};
use svcnat_userspace::inject::Injector;
use svcnat_userspace::{Userspace, UserspaceConfig};

const POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0x10);
const POD1: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0x11);
/// The testbed's IPv6 LAN: node `i` at `fd00:50::<11+i>`, client `i` at `fd00:50::<100+i>`.
const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x100);
const NODE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x11);
const GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x12);
/// Beyond the LAN: routed to the default gateway.
const REMOTE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 7);
/// A link-local source from the LAN.
const LL_SRC: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x99);

/// One frame the client injects at node 0, and where the kernel lets it arrive.
struct Case {
    name: &'static str,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    /// 802.1Q VLAN id of a tag, if any.
    vlan: Option<u16>,
    /// Copies arriving in the pod (of 3 sent), and at the gateway.
    kernel: (u64, u64),
    /// What the datapath lets through where it is stricter than the kernel (the case says
    /// why); otherwise it must match the kernel.
    stricter: Option<(u64, u64)>,
}

/// The cases; `pod_ll` and `gw_ll` are the link-local addresses of web-0's `eth0` (on the
/// veth, not the LAN) and of the gateway's `eth0` (on the LAN).
fn cases(pod_ll: Ipv6Addr, gw_ll: Ipv6Addr) -> Vec<Case> {
    let c = |name, src, dst, kernel| Case {
        name,
        src,
        dst,
        hop_limit: 64,
        vlan: None,
        kernel,
        stricter: None,
    };
    let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    vec![
        // Controls: what the kernel forwards, the datapath must forward too.
        c("client to pod", CLIENT, POD, (3, 0)),
        // ip6_forward: hop limit 1 is answered with time exceeded, not forwarded. (Early
        // in the batch: the kernel's ICMPv6 rate limit per destination shares its tokens
        // with the redirects it sends the client for the cases routed back out the LAN.)
        Case {
            hop_limit: 1,
            ..c("hop limit 1 to pod", CLIENT, POD, (0, 0))
        },
        c(
            "client to a remote network (default route)",
            CLIENT,
            REMOTE,
            (0, 3),
        ),
        // No reverse-path check in IPv6 forwarding: the spoofed source goes through.
        c("LAN packet spoofing a pod source", POD1, POD, (3, 0)),
        // Sources. ip6_rcv_core: loopback, multicast and IPv4-mapped sources.
        c("loopback source ::1", Ipv6Addr::LOCALHOST, POD, (0, 0)),
        c("multicast source ff02::1", v6("ff02::1"), POD, (0, 0)),
        // Forwarded by the kernel (dropped in ip6_rcv_core from Linux 5.3 to 5.12 only;
        // since then refused only by TCP and DCCP for local sockets). The datapath keeps
        // dropping IPv4-mapped addresses on the wire (RFC 4942 2.2: a way around filters
        // that match the IPv4 form).
        Case {
            stricter: Some((0, 0)),
            ..c(
                "IPv4-mapped source ::ffff:10.0.0.1",
                v6("::ffff:10.0.0.1"),
                POD,
                (3, 0),
            )
        },
        // ip6_forward: an unspecified or link-local source leaving by another interface.
        c("unspecified source ::", Ipv6Addr::UNSPECIFIED, POD, (0, 0)),
        c("link-local source to pod", LL_SRC, POD, (0, 0)),
        // ip6_forward checks the source only for packets leaving by another interface:
        // back out of the LAN (with a redirect) they go. The datapath refuses `::` as a
        // source anywhere (RFC 4291 2.5.2: never forwarded by a router) and never routes
        // link-local traffic (RFC 4291 2.5.6); matching the kernel would take admission
        // that knows the egress interface, for hairpinned garbage.
        Case {
            stricter: Some((0, 0)),
            ..c(
                "unspecified source to the default route (back out the LAN)",
                Ipv6Addr::UNSPECIFIED,
                REMOTE,
                (0, 3),
            )
        },
        Case {
            stricter: Some((0, 0)),
            ..c(
                "link-local source to the default route (back out the LAN)",
                LL_SRC,
                REMOTE,
                (0, 3),
            )
        },
        // IPv6 forwarding does not check the source against the node's addresses.
        c("the node's own address as source", NODE, POD, (3, 0)),
        // Destinations.
        c(
            "fe80::1, the node's address on the pod veths",
            CLIENT,
            v6("fe80::1"),
            (0, 0),
        ),
        c("the pod's link-local address", CLIENT, pod_ll, (0, 0)),
        // On the LAN itself: the kernel's lookup (bound to the arriving interface for a
        // link-local destination) sends it back out of the LAN. The datapath leaves
        // link-local destinations to the kernel, and its ingress table drops them before
        // the kernel sees them when they are not the node's (RFC 4291 2.5.6).
        Case {
            stricter: Some((0, 0)),
            ..c("the gateway's link-local address", CLIENT, gw_ll, (0, 3))
        },
        c(
            "loopback destination ::1",
            CLIENT,
            Ipv6Addr::LOCALHOST,
            (0, 0),
        ),
        // The kernel routes `::` by the default route; RFC 4291 2.5.2: never a
        // destination, and the datapath drops it as a martian.
        Case {
            stricter: Some((0, 0)),
            ..c(
                "unspecified destination ::",
                CLIENT,
                Ipv6Addr::UNSPECIFIED,
                (0, 3),
            )
        },
        c(
            "multicast destination ff02::1",
            CLIENT,
            v6("ff02::1"),
            (0, 0),
        ),
        c(
            "multicast destination ff0e::1",
            CLIENT,
            v6("ff0e::1"),
            (0, 0),
        ),
        Case {
            stricter: Some((0, 0)),
            ..c(
                "IPv4-mapped destination ::ffff:10.0.0.1 (default route)",
                CLIENT,
                v6("::ffff:10.0.0.1"),
                (0, 3),
            )
        },
        c(
            "the node's address on an interface it does not own",
            CLIENT,
            v6("fd00:99::1"),
            (0, 0),
        ),
        c(
            "the management subnet (not owned)",
            CLIENT,
            v6("fd00:99::5"),
            (0, 0),
        ),
        c(
            "a ClusterIP nobody serves (routed to svc0)",
            CLIENT,
            v6("fd00:10:96::5"),
            (0, 0),
        ),
        Case {
            vlan: Some(10),
            ..c(
                "tagged for VLAN 10, which the node lacks",
                CLIENT,
                POD,
                (0, 0),
            )
        },
    ]
}

/// A UDP frame to port 9999 from source port `sport` (the case's mark), tagged if asked.
fn frame(src_mac: [u8; 6], dst_mac: [u8; 6], case: &Case, sport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(case.src.octets(), case.dst.octets(), case.hop_limit)
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

/// The rule counting ICMPv6 time exceeded messages.
const TIME_EXCEEDED: &str = "icmpv6 type time-exceeded";

/// Injects every case (three copies each, source port `base + i`) and returns what
/// arrived in the pod and at the gateway per case, and how many ICMPv6 time exceeded
/// messages came back to the client.
fn run_cases(tb: &Testbed, cases: &[Case], base: u16) -> (Vec<(u64, u64)>, u64) {
    let node_mac = tb.mac(tb.ns_of_node(0), "eth0").unwrap();
    let client_mac = tb.mac(tb.ns_of_client(0), "eth0").unwrap();
    let client_ns = tb.ns_of_client(0).to_string();
    let inj = Injector::open(Some(&client_ns), "eth0").unwrap();
    let pod_ns = tb.ns_of_pod("web-0").unwrap().to_string();
    let gw_ns = tb.ns_of_node(1).to_string();
    let ports: Vec<u16> = (0..cases.len() as u16).map(|i| base + i).collect();
    let rules: Vec<String> = ports.iter().map(|p| case_rule(*p)).collect();
    tb.install_ingress_counters(&pod_ns, &rules).unwrap();
    tb.install_ingress_counters(&gw_ns, &rules).unwrap();
    tb.install_ingress_counters(&client_ns, &[TIME_EXCEEDED.to_string()])
        .unwrap();
    for round in 0..3 {
        let frames: Vec<Vec<u8>> = cases
            .iter()
            .zip(&ports)
            .map(|(c, p)| frame(client_mac, node_mac, c, *p))
            .collect();
        inj.send(&frames).unwrap();
        // The first round waits for the next hops' neighbour discovery.
        std::thread::sleep(Duration::from_millis(if round == 0 { 400 } else { 50 }));
    }
    std::thread::sleep(Duration::from_millis(300));
    let seen = rules
        .iter()
        .map(|r| {
            (
                tb.ingress_counter(&pod_ns, r).unwrap(),
                tb.ingress_counter(&gw_ns, r).unwrap(),
            )
        })
        .collect();
    let time_exceeded = tb.ingress_counter(&client_ns, TIME_EXCEEDED).unwrap();
    for ns in [&pod_ns, &gw_ns, &client_ns] {
        tb.exec_ok(ns, ["nft", "delete", "table", "netdev", "obs"])
            .unwrap();
    }
    (seen, time_exceeded)
}

/// The link-local address of `dev` in `ns`.
fn link_local(tb: &Testbed, ns: &str, dev: &str) -> Ipv6Addr {
    let out = tb
        .exec_ok(
            ns,
            [
                "ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link",
            ],
        )
        .unwrap();
    out.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no link-local address on {dev} in {ns}: {out}"))
}

#[test]
fn userspace_admits_for_ipv6_forwarding_exactly_what_the_kernel_does() {
    skip_unless_root!();
    let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
    let tb = Testbed::new(
        TestbedSpec::new(2, 1)
            .with_ipv6()
            .pod(
                PodSpec::new("web-0", 0, v4("10.244.0.10"))
                    .with_ip(IpAddr::V6(POD))
                    .udp(9999),
            )
            .pod(
                PodSpec::new("web-1", 0, v4("10.244.0.11"))
                    .with_ip(IpAddr::V6(POD1))
                    .udp(9999),
            ),
    )
    .unwrap();
    let node = tb.ns_of_node(0).to_string();
    let gateway = GATEWAY.to_string();
    for cmd in [
        // The kernel run forwards IPv6 (the testbed sets it on nodes; checked below).
        &["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"][..],
        // A management interface the datapath does not own.
        &["ip", "link", "add", "mgmt0", "type", "bridge"],
        &[
            "ip",
            "addr",
            "add",
            "fd00:99::1/64",
            "dev",
            "mgmt0",
            "nodad",
        ],
        &["ip", "link", "set", "mgmt0", "up"],
        &["ip", "-6", "route", "add", "default", "via", &gateway],
    ] {
        tb.exec_ok(&node, cmd.iter().copied()).unwrap();
    }
    let forwarding = tb
        .exec_ok(&node, ["sysctl", "-n", "net.ipv6.conf.eth0.forwarding"])
        .unwrap();
    assert_eq!(forwarding.trim(), "1");
    let pod_ll = link_local(&tb, tb.ns_of_pod("web-0").unwrap(), "eth0");
    let gw_ll = link_local(&tb, tb.ns_of_node(1), "eth0");
    let cases = cases(pod_ll, gw_ll);

    let (kernel, kernel_te) = run_cases(&tb, &cases, 43000);
    let dp = Userspace::start(UserspaceConfig {
        netns: Some(node.clone()),
        interfaces: vec!["eth0".into(), "vp*".into()],
        workers: 1,
        ..UserspaceConfig::default()
    })
    .unwrap();
    let (userspace, userspace_te) = run_cases(&tb, &cases, 44000);
    let stats = dp.stats();
    drop(dp);

    println!(
        "{:<62} {:>12} {:>12}",
        "case (3 sent)", "kernel", "userspace"
    );
    println!("{:<62} {:>12} {:>12}", "", "pod/gw", "pod/gw");
    let mut wrong = Vec::new();
    for ((c, k), u) in cases.iter().zip(&kernel).zip(&userspace) {
        println!(
            "{:<62} {:>12} {:>12}{}",
            c.name,
            format!("{}/{}", k.0, k.1),
            format!("{}/{}", u.0, u.1),
            match (u == k, c.stricter.is_some()) {
                (true, _) => "",
                (false, true) => "  stricter (see the case)",
                (false, false) => "  DIFFERS",
            }
        );
        if *k != c.kernel {
            wrong.push(format!(
                "{}: kernel let {k:?} through, the test expected {:?}",
                c.name, c.kernel
            ));
        }
        if *u != c.stricter.unwrap_or(*k) {
            wrong.push(format!(
                "{}: userspace let {u:?} (pod, gateway) through, the kernel {k:?}, the test \
                 expected {:?}",
                c.name,
                c.stricter.unwrap_or(*k)
            ));
        }
    }
    println!(
        "{:<62} {:>12} {:>12}",
        "ICMPv6 time exceeded at the client", kernel_te, userspace_te
    );
    // Hop limit 1: both answer. The kernel's count depends on its per-destination ICMPv6
    // token bucket, which the redirects it sends the client drain (the datapath sends no
    // redirects), so only the answer is compared, not the number.
    if kernel_te == 0 || userspace_te == 0 {
        wrong.push(format!(
            "time exceeded: the kernel answered {kernel_te} of 3, userspace {userspace_te}"
        ));
    }
    assert!(
        wrong.is_empty(),
        "{}\n{:?}",
        wrong.join("\n"),
        stats.engine.drops
    );
    assert!(stats.rx_vlan >= 3, "tagged frames not counted: {stats:?}");
}
