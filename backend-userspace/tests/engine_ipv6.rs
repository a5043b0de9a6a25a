//! The engine over IPv6: neighbour discovery (answers for the pods' gateway, learning,
//! resolution with retries, RFC 4861's validity checks), IPv6 Services (DNAT, masquerade
//! to a global address, REJECT with ICMPv6), ICMPv6 errors generated and translated back.
//! Expected frames are built independently with etherparse and compared byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use common::*;
use etherparse::Icmpv6Type;
use etherparse::icmpv6::{DestUnreachableCode, TimeExceededCode};
use svcnat_userspace::engine::testing::*;
use svcnat_userspace::engine::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn config() -> EngineConfig {
    EngineConfig {
        shards: 1,
        snat_ports: 61000..=61000,
        ..EngineConfig::default()
    }
}

fn feed(e: &Engine, at: Duration, port: PortId, frame: &[u8]) -> (Verdict, Vec<u8>, Vec<TxFrame>) {
    let mut f = frame.to_vec();
    let mut tx = Vec::new();
    let v = e.handle_frame(
        at,
        RxMeta {
            port,
            csum: Csum::Complete,
        },
        &mut f,
        &mut tx,
    );
    for t in &tx {
        verify_checksums(&t.data);
    }
    (v, f, tx)
}

fn tx_of(tx: &[TxFrame]) -> Vec<(PortId, Vec<u8>)> {
    tx.iter().map(|t| (t.port, t.data.clone())).collect()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// A pod's own link-local address.
const POD1_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x55);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);

// ---------------------------------------------------------------------------------------------
// Neighbour discovery: answers and learning
// ---------------------------------------------------------------------------------------------

#[test]
fn solicitation_for_the_pod_gateway_is_answered_and_the_solicitor_learnt() {
    let e = engine_with(config(), false);
    let (sn, sn_mac) = solicited(POD_GATEWAY6);
    let (v, _, tx) = feed(
        &e,
        secs(1),
        POD1_PORT,
        &ns(
            POD1_MAC,
            sn_mac,
            POD1_LL,
            sn,
            255,
            POD_GATEWAY6,
            Some(POD1_MAC),
        ),
    );
    assert_eq!(v, Verdict::Consumed);
    // RFC 4861 7.2.4: unicast to the solicitor, Solicited and Override set (and Router:
    // the engine routes for the pod), the target link-layer address option is the port's.
    let want = na(
        POD1_PORT_MAC,
        POD1_MAC,
        POD_GATEWAY6,
        POD1_LL,
        255,
        (true, true, true),
        POD_GATEWAY6,
        Some(POD1_PORT_MAC),
    );
    assert_eq!(tx_of(&tx), vec![(POD1_PORT, want)]);
    assert_eq!(e.counters().neighbours, 1, "the solicitor is learnt");
    // Learnt: a packet to the pod's link-local address is not forwarded (link-local), but
    // a packet to POD1_IP6 still needs resolution (a different address): the learnt entry
    // is keyed by the solicitor's address only.
    let (v, _, tx) = feed(
        &e,
        secs(2),
        UPLINK,
        &tcp6(
            ROUTER_MAC,
            UPLINK_MAC,
            CLIENT6,
            POD1_IP6,
            64,
            5555,
            8080,
            F::Syn,
        ),
    );
    assert_eq!(v, Verdict::Consumed, "queued while resolving");
    assert_eq!(tx.len(), 1);
}

#[test]
fn a_learnt_neighbour_is_used_without_resolution() {
    let e = engine_with(config(), false);
    let (sn, sn_mac) = solicited(POD_GATEWAY6);
    let (v, _, _) = feed(
        &e,
        secs(1),
        POD1_PORT,
        &ns(
            POD1_MAC,
            sn_mac,
            POD1_IP6,
            sn,
            255,
            POD_GATEWAY6,
            Some(POD1_MAC),
        ),
    );
    assert_eq!(v, Verdict::Consumed);
    let syn = tcp6(
        ROUTER_MAC,
        UPLINK_MAC,
        CLIENT6,
        POD1_IP6,
        64,
        5555,
        8080,
        F::Syn,
    );
    let (v, out, tx) = feed(&e, secs(2), UPLINK, &syn);
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    assert!(tx.is_empty(), "no solicitation: {tx:?}");
    assert_eq!(
        out,
        tcp6(
            POD1_PORT_MAC,
            POD1_MAC,
            CLIENT6,
            POD1_IP6,
            63,
            5555,
            8080,
            F::Syn
        )
    );
}

#[test]
fn duplicate_address_probe_for_the_gateway_is_defended_to_all_nodes() {
    let e = engine_with(config(), false);
    let (sn, sn_mac) = solicited(POD_GATEWAY6);
    let (v, _, tx) = feed(
        &e,
        secs(1),
        POD1_PORT,
        &ns(
            POD1_MAC,
            sn_mac,
            Ipv6Addr::UNSPECIFIED,
            sn,
            255,
            POD_GATEWAY6,
            None,
        ),
    );
    assert_eq!(v, Verdict::Consumed);
    let want = na(
        POD1_PORT_MAC,
        [0x33, 0x33, 0, 0, 0, 1],
        POD_GATEWAY6,
        v6("ff02::1"),
        255,
        (true, false, true),
        POD_GATEWAY6,
        Some(POD1_PORT_MAC),
    );
    assert_eq!(tx_of(&tx), vec![(POD1_PORT, want)]);
    assert_eq!(e.counters().neighbours, 0, "nothing to learn from ::");
}

#[test]
fn solicitation_for_a_kernel_address_is_learnt_and_left_to_the_kernel() {
    let e = engine_with(config(), false);
    let (sn, sn_mac) = solicited(NODE_IP6);
    let (v, _, tx) = feed(
        &e,
        secs(1),
        UPLINK,
        &ns(
            ROUTER_MAC,
            sn_mac,
            ROUTER_IP6,
            sn,
            255,
            NODE_IP6,
            Some(ROUTER_MAC),
        ),
    );
    assert_eq!(v, Verdict::Kernel, "the kernel answers for its own address");
    assert!(tx.is_empty());
    assert_eq!(e.counters().neighbours, 1, "the router is learnt");
    // Someone else's address: neither answered nor learnt.
    let other = v6("fd00:1::77");
    let (sn, sn_mac) = solicited(other);
    let (v, _, tx) = feed(
        &e,
        secs(1),
        UPLINK,
        &ns(
            NODE_B_MAC,
            sn_mac,
            NODE_B_IP6,
            sn,
            255,
            other,
            Some(NODE_B_MAC),
        ),
    );
    assert_eq!(v, Verdict::Kernel);
    assert!(tx.is_empty());
    assert_eq!(e.counters().neighbours, 1);
    // The gateway is only answered on the pod ports.
    let (sn, sn_mac) = solicited(POD_GATEWAY6);
    let (v, _, tx) = feed(
        &e,
        secs(1),
        UPLINK,
        &ns(
            ROUTER_MAC,
            sn_mac,
            ROUTER_IP6,
            sn,
            255,
            POD_GATEWAY6,
            Some(ROUTER_MAC),
        ),
    );
    assert_eq!(v, Verdict::Kernel);
    assert!(tx.is_empty());
}

/// RFC 4861 7.1: what a node must silently discard.
#[test]
fn invalid_neighbour_discovery_is_dropped() {
    let (sn, sn_mac) = solicited(POD_GATEWAY6);
    let good = ns(
        POD1_MAC,
        sn_mac,
        POD1_IP6,
        sn,
        255,
        POD_GATEWAY6,
        Some(POD1_MAC),
    );
    let mut bad_csum = good.clone();
    let n = bad_csum.len();
    bad_csum[n - 1] ^= 0x40;
    let mut bad_code = good.clone();
    bad_code[14 + 40 + 1] = 1;
    // (The code is covered by the checksum: fix it up by the same amount.)
    let c = u16::from_be_bytes([bad_code[56], bad_code[57]]);
    let fixed = ones_add(c, !1u16);
    bad_code[56..58].copy_from_slice(&fixed.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
        (
            "NS with hop limit 254 (crossed a router)",
            ns(
                POD1_MAC,
                sn_mac,
                POD1_IP6,
                sn,
                254,
                POD_GATEWAY6,
                Some(POD1_MAC),
            ),
            DropReason::InvalidNdp,
        ),
        (
            "NA with hop limit 64",
            na(
                POD1_MAC,
                POD1_PORT_MAC,
                POD1_IP6,
                POD_GATEWAY6,
                64,
                (false, true, true),
                POD1_IP6,
                Some(POD1_MAC),
            ),
            DropReason::InvalidNdp,
        ),
        (
            "NS with a bad checksum",
            bad_csum,
            DropReason::BadL4Checksum,
        ),
        ("NS with code 1", bad_code, DropReason::InvalidNdp),
        (
            "NS from :: with a source link-layer option",
            ns(
                POD1_MAC,
                sn_mac,
                Ipv6Addr::UNSPECIFIED,
                sn,
                255,
                POD_GATEWAY6,
                Some(POD1_MAC),
            ),
            DropReason::InvalidNdp,
        ),
        (
            "NS from :: not to the solicited-node address",
            ns(
                POD1_MAC,
                [0x33, 0x33, 0, 0, 0, 1],
                Ipv6Addr::UNSPECIFIED,
                v6("ff02::1"),
                255,
                POD_GATEWAY6,
                None,
            ),
            DropReason::InvalidNdp,
        ),
        (
            "NS for a multicast target",
            ns(
                POD1_MAC,
                sn_mac,
                POD1_IP6,
                sn,
                255,
                v6("ff02::1"),
                Some(POD1_MAC),
            ),
            DropReason::InvalidNdp,
        ),
        (
            "multicast NA with the Solicited flag",
            na(
                POD1_MAC,
                [0x33, 0x33, 0, 0, 0, 1],
                POD1_IP6,
                v6("ff02::1"),
                255,
                (false, true, true),
                POD1_IP6,
                Some(POD1_MAC),
            ),
            DropReason::InvalidNdp,
        ),
        (
            "NS cut short (no target address)",
            icmp6(
                POD1_MAC,
                sn_mac,
                POD1_IP6,
                sn,
                255,
                Icmpv6Type::NeighborSolicitation,
                &[0xfe, 0x80],
            ),
            DropReason::InvalidNdp,
        ),
    ];
    for (name, frame, want) in cases {
        let e = engine_with(config(), false);
        let (v, _, tx) = feed(&e, secs(1), POD1_PORT, &frame);
        assert_eq!(v, Verdict::Drop(want), "{name}");
        assert!(tx.is_empty(), "{name}: answered {tx:?}");
        assert_eq!(e.counters().neighbours, 0, "{name}: learnt");
        assert_eq!(e.counters().dropped(want), 1, "{name}: counted");
    }
}

fn ones_add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    ((s & 0xffff) + (s >> 16)) as u16
}

// ---------------------------------------------------------------------------------------------
// Neighbour discovery: resolution
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_next_hop_is_solicited_and_queued_packets_released_on_advertisement() {
    let e = engine_with(config(), false);
    let syn = tcp6(
        ROUTER_MAC,
        UPLINK_MAC,
        CLIENT6,
        POD1_IP6,
        64,
        5555,
        8080,
        F::Syn,
    );
    let (v, _, tx) = feed(&e, secs(1), UPLINK, &syn);
    assert_eq!(v, Verdict::Consumed, "queued");
    // A multicast NS to the solicited-node address, from the port's link-local address
    // (the pod gateway: the veth has no other), with our link-layer address.
    let (sn, sn_mac) = solicited(POD1_IP6);
    let want = ns(
        POD1_PORT_MAC,
        sn_mac,
        POD_GATEWAY6,
        sn,
        255,
        POD1_IP6,
        Some(POD1_PORT_MAC),
    );
    assert_eq!(tx_of(&tx), vec![(POD1_PORT, want)]);
    // An unsolicited advertisement for someone else is not learnt.
    let (v, _, _) = feed(
        &e,
        secs(1),
        POD1_PORT,
        &na(
            POD2_MAC,
            [0x33, 0x33, 0, 0, 0, 1],
            POD2_IP6,
            v6("ff02::1"),
            255,
            (false, false, true),
            POD2_IP6,
            Some(POD2_MAC),
        ),
    );
    assert_eq!(v, Verdict::Kernel);
    // The answer releases the queued SYN, translated for the pod.
    let (v, _, tx) = feed(
        &e,
        secs(1),
        POD1_PORT,
        &na(
            POD1_MAC,
            POD1_PORT_MAC,
            POD1_IP6,
            POD_GATEWAY6,
            255,
            (false, true, true),
            POD1_IP6,
            Some(POD1_MAC),
        ),
    );
    assert_eq!(v, Verdict::Consumed);
    let fwd = tcp6(
        POD1_PORT_MAC,
        POD1_MAC,
        CLIENT6,
        POD1_IP6,
        63,
        5555,
        8080,
        F::Syn,
    );
    assert_eq!(tx_of(&tx), vec![(POD1_PORT, fwd.clone())]);
    assert_eq!(e.counters().neighbours, 1);
    // From now on, forwarded directly.
    let (v, out, tx) = feed(&e, secs(2), UPLINK, &syn);
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    assert!(tx.is_empty());
    assert_eq!(out, fwd);
}

#[test]
fn uplink_solicitation_comes_from_the_global_address_and_link_local_targets_from_link_local() {
    let e = engine_with(config(), false);
    // To the internet: next hop the router, a global target.
    let (v, _, tx) = feed(
        &e,
        secs(1),
        POD1_PORT,
        &tcp6(
            POD1_MAC,
            POD1_PORT_MAC,
            POD1_IP6,
            CLIENT6,
            64,
            40000,
            443,
            F::Syn,
        ),
    );
    assert_eq!(v, Verdict::Consumed);
    let (sn, sn_mac) = solicited(ROUTER_IP6);
    assert_eq!(
        tx_of(&tx),
        vec![(
            UPLINK,
            ns(
                UPLINK_MAC,
                sn_mac,
                NODE_IP6,
                sn,
                255,
                ROUTER_IP6,
                Some(UPLINK_MAC)
            )
        )]
    );
    // A route via a link-local router: solicited from the port's link-local address.
    let mut routes = routes();
    let ll_router = v6("fe80::1:1");
    routes.insert(
        0,
        Route {
            dst: "2001:db8::/32".parse().unwrap(),
            port: UPLINK,
            gateway: Some(IpAddr::V6(ll_router)),
        },
    );
    e.set_routes(routes);
    let (_, _, tx) = feed(
        &e,
        secs(1),
        POD1_PORT,
        &tcp6(
            POD1_MAC,
            POD1_PORT_MAC,
            POD1_IP6,
            CLIENT6,
            64,
            40001,
            443,
            F::Syn,
        ),
    );
    let (sn, sn_mac) = solicited(ll_router);
    assert_eq!(
        tx_of(&tx),
        vec![(
            UPLINK,
            ns(
                UPLINK_MAC,
                sn_mac,
                UPLINK_LL6,
                sn,
                255,
                ll_router,
                Some(UPLINK_MAC)
            )
        )]
    );
}

#[test]
fn unanswered_solicitations_are_retried_then_given_up() {
    let e = engine_with(config(), false);
    let syn = tcp6(
        ROUTER_MAC,
        UPLINK_MAC,
        CLIENT6,
        POD1_IP6,
        64,
        5555,
        8080,
        F::Syn,
    );
    let (v, _, tx) = feed(&e, secs(10), UPLINK, &syn);
    assert_eq!(v, Verdict::Consumed);
    let first = tx[0].data.clone();
    let mut tx = Vec::new();
    for ms in (10_100..=13_000).step_by(100) {
        e.handle_timeout(Duration::from_millis(ms), &mut tx);
    }
    // Three solicitations in all (the kernel's mcast_solicit), one a second, the same frame.
    assert_eq!(tx.len(), 2, "{tx:?}");
    assert!(tx.iter().all(|t| t.data == first && t.port == POD1_PORT));
    assert_eq!(e.counters().neighbours, 0, "forgotten");
    assert_eq!(
        e.counters().dropped(DropReason::NoNeighbour),
        1,
        "queue dropped"
    );
}

#[test]
fn advertisement_without_override_does_not_replace_a_known_address() {
    let e = engine_with(config(), false);
    let (sn, sn_mac) = solicited(POD_GATEWAY6);
    let _ = feed(
        &e,
        secs(1),
        POD1_PORT,
        &ns(
            POD1_MAC,
            sn_mac,
            POD1_IP6,
            sn,
            255,
            POD_GATEWAY6,
            Some(POD1_MAC),
        ),
    );
    let other_mac = [2, 0, 0, 0, 9, 9];
    let (v, _, _) = feed(
        &e,
        secs(2),
        POD1_PORT,
        &na(
            other_mac,
            POD1_PORT_MAC,
            POD1_IP6,
            POD_GATEWAY6,
            255,
            (false, false, false),
            POD1_IP6,
            Some(other_mac),
        ),
    );
    assert_eq!(v, Verdict::Kernel);
    let (v, out, _) = feed(
        &e,
        secs(3),
        UPLINK,
        &tcp6(
            ROUTER_MAC,
            UPLINK_MAC,
            CLIENT6,
            POD1_IP6,
            64,
            5555,
            8080,
            F::Syn,
        ),
    );
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    assert_eq!(&out[0..6], &POD1_MAC, "kept the first address");
    // With Override, it is replaced.
    let _ = feed(
        &e,
        secs(4),
        POD1_PORT,
        &na(
            other_mac,
            POD1_PORT_MAC,
            POD1_IP6,
            POD_GATEWAY6,
            255,
            (false, false, true),
            POD1_IP6,
            Some(other_mac),
        ),
    );
    let (_, out, _) = feed(
        &e,
        secs(5),
        UPLINK,
        &tcp6(
            ROUTER_MAC,
            UPLINK_MAC,
            CLIENT6,
            POD1_IP6,
            64,
            5556,
            8080,
            F::Syn,
        ),
    );
    assert_eq!(&out[0..6], &other_mac);
}

#[test]
fn link_local_traffic_is_never_forwarded() {
    let e = engine();
    for (src, dst) in [
        (POD1_LL, v6("fe80::99")),
        (POD1_LL, CLIENT6),
        (POD1_IP6, POD_GATEWAY6),
    ] {
        let (v, _, tx) = feed(
            &e,
            secs(1),
            POD1_PORT,
            &tcp6(POD1_MAC, POD1_PORT_MAC, src, dst, 64, 40000, 22, F::Syn),
        );
        assert_eq!(v, Verdict::Kernel, "{src} -> {dst}");
        assert!(tx.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// IPv6 Services and ICMPv6
// ---------------------------------------------------------------------------------------------

/// Opens a connection from pod 1 to web6's ClusterIP; returns the endpoint chosen, the
/// port it is behind and the translated SYN.
fn open_web6(e: &Engine, sport: u16) -> (Ipv6Addr, PortId, Vec<u8>) {
    let syn = tcp6(
        POD1_MAC,
        POD1_PORT_MAC,
        POD1_IP6,
        WEB6_CIP,
        64,
        sport,
        80,
        F::Syn,
    );
    let (v, out, tx) = feed(e, secs(1), POD1_PORT, &syn);
    assert!(tx.is_empty());
    let Verdict::Forward { port } = v else {
        panic!("{v:?}")
    };
    let ep = Ipv6Addr::from(<[u8; 16]>::try_from(&out[14 + 24..14 + 40]).unwrap());
    let (mac, want_port) = match ep {
        a if a == POD1_IP6 => (POD1_MAC, POD1_PORT),
        a if a == POD2_IP6 => (POD2_MAC, POD2_PORT),
        a if a == POD3_IP6 => (NODE_B_MAC, UPLINK),
        a => panic!("endpoint {a}"),
    };
    assert_eq!(port, want_port);
    let my_mac = match port {
        POD1_PORT => POD1_PORT_MAC,
        POD2_PORT => POD2_PORT_MAC,
        _ => UPLINK_MAC,
    };
    // Pod to ClusterIP: DNAT only (the pod is in the cluster CIDR), hop limit decremented.
    // Hairpin (pod 1 to itself) is masqueraded to the node's global address.
    let src = if ep == POD1_IP6 { NODE_IP6 } else { POD1_IP6 };
    let sp = if ep == POD1_IP6 {
        let sp = u16::from_be_bytes([out[54], out[55]]);
        assert!(e.config().snat_ports.contains(&sp), "masquerade port {sp}");
        sp
    } else {
        sport
    };
    assert_eq!(out, tcp6(my_mac, mac, src, ep, 63, sp, 8080, F::Syn));
    (ep, port, out)
}

#[test]
fn clusterip_spreads_over_the_ipv6_endpoints() {
    let e = engine();
    let mut seen = std::collections::BTreeSet::new();
    for sport in 40000..40060 {
        seen.insert(open_web6(&e, sport).0);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec![POD1_IP6, POD2_IP6, POD3_IP6]
    );
}

#[test]
fn nodeport_over_ipv6_masquerades_to_the_nodes_global_address() {
    let e = engine_with(config(), true);
    // As the driver reads a real veth: link-local addresses only, one of them the pods'
    // gateway. The masquerade source must not be one of those.
    let mut ports = ports();
    for p in ports.iter_mut().filter(|p| p.id != UPLINK) {
        p.addrs = vec![
            "fe80::1/64".parse().unwrap(),
            "fe80::aa:bbff:fecc:1/64".parse().unwrap(),
        ];
    }
    e.set_ports(ports);
    // Some client source port lands on a local pod (the others go to node-b).
    let (port, out) = (5555..5600)
        .find_map(|sport| {
            let syn = tcp6(
                ROUTER_MAC,
                UPLINK_MAC,
                CLIENT6,
                NODE_IP6,
                64,
                sport,
                30081,
                F::Syn,
            );
            match feed(&e, secs(1), UPLINK, &syn) {
                (Verdict::Forward { port }, out, _) if port != UPLINK => Some((port, out)),
                _ => None,
            }
        })
        .expect("some connection lands on a local pod");
    let (mac, pod_port_mac, ep) = if port == POD1_PORT {
        (POD1_MAC, POD1_PORT_MAC, POD1_IP6)
    } else {
        (POD2_MAC, POD2_PORT_MAC, POD2_IP6)
    };
    // externalTrafficPolicy: Cluster from outside the cluster: masqueraded to the node's
    // global address (the only masquerade port in this configuration is 61000).
    assert_eq!(
        out,
        tcp6(pod_port_mac, mac, NODE_IP6, ep, 63, 61000, 8080, F::Syn)
    );
}

#[test]
fn ipv6_service_without_endpoints_is_rejected_with_icmpv6_port_unreachable() {
    let e = engine();
    let syn = tcp6(
        POD1_MAC,
        POD1_PORT_MAC,
        POD1_IP6,
        EMPTY6_CIP,
        64,
        40000,
        80,
        F::Syn,
    );
    let (v, _, tx) = feed(&e, secs(1), POD1_PORT, &syn);
    assert_eq!(v, Verdict::Drop(DropReason::Rejected));
    // From the Service's address, quoting the whole packet, back where it came from.
    let want = icmp6(
        POD1_PORT_MAC,
        POD1_MAC,
        EMPTY6_CIP,
        POD1_IP6,
        64,
        Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port),
        ip_of(&syn),
    );
    assert_eq!(tx_of(&tx), vec![(POD1_PORT, want)]);
}

#[test]
fn hop_limit_exceeded_is_answered_from_a_global_address() {
    let e = engine();
    let syn = tcp6(
        ROUTER_MAC,
        UPLINK_MAC,
        CLIENT6,
        POD1_IP6,
        1,
        5555,
        8080,
        F::Syn,
    );
    let (v, _, tx) = feed(&e, secs(1), UPLINK, &syn);
    assert_eq!(v, Verdict::Drop(DropReason::TtlExceeded));
    let want = icmp6(
        UPLINK_MAC,
        ROUTER_MAC,
        NODE_IP6,
        CLIENT6,
        64,
        Icmpv6Type::TimeExceeded(TimeExceededCode::HopLimitExceeded),
        ip_of(&syn),
    );
    assert_eq!(tx_of(&tx), vec![(UPLINK, want)]);
}

#[test]
fn icmpv6_errors_about_a_translated_connection_are_translated_back() {
    let e = engine();
    // A connection that is not hairpinned, so that only the destination is translated.
    let (ep, ep_port, fwd) = (40000..40100)
        .map(|sp| open_web6(&e, sp))
        .find(|(ep, _, _)| *ep != POD1_IP6)
        .unwrap();
    let sport = u16::from_be_bytes([fwd[54], fwd[55]]);
    let (ep_mac, my_mac) = match ep_port {
        POD2_PORT => (POD2_MAC, POD2_PORT_MAC),
        _ => (NODE_B_MAC, UPLINK_MAC),
    };
    // What pod 1 sent, as it must see it quoted (hop limit as the endpoint got it).
    let orig = tcp6(
        POD1_MAC,
        POD1_PORT_MAC,
        POD1_IP6,
        WEB6_CIP,
        63,
        sport,
        80,
        F::Syn,
    );
    let cases = [
        (
            "Packet Too Big from the endpoint",
            ep,
            Icmpv6Type::PacketTooBig { mtu: 1280 },
            WEB6_CIP,
        ),
        (
            "Destination Unreachable (port) from the endpoint",
            ep,
            Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port),
            WEB6_CIP,
        ),
        (
            "Time Exceeded from a router on the way",
            NODE_B_IP6,
            Icmpv6Type::TimeExceeded(TimeExceededCode::HopLimitExceeded),
            NODE_B_IP6,
        ),
    ];
    for (name, from, ty, want_src) in cases {
        let err = icmp6(ep_mac, my_mac, from, POD1_IP6, 64, ty, ip_of(&fwd));
        let (v, out, tx) = feed(&e, secs(2), ep_port, &err);
        assert_eq!(v, Verdict::Forward { port: POD1_PORT }, "{name}");
        assert!(tx.is_empty(), "{name}");
        let want = icmp6(
            POD1_PORT_MAC,
            POD1_MAC,
            want_src,
            POD1_IP6,
            63,
            ty,
            ip_of(&orig),
        );
        assert_eq!(out, want, "{name}");
        verify_checksums(&out);
    }
}
