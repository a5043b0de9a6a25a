//! Random bytes and random mutations of valid frames never panic the engine, and a
//! forwarded frame keeps its length.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use etherparse::{Icmpv4Type, PacketBuilder, icmpv4};
use proptest::prelude::*;
use svcnat_userspace::engine::testing::*;
use svcnat_userspace::engine::*;

/// Valid frames of every kind the engine parses, with the port they arrive on.
fn seeds() -> Vec<(PortId, Vec<u8>)> {
    let syn = tcp(
        POD1_MAC,
        POD1_PORT_MAC,
        POD1,
        LB_CIP,
        64,
        40000,
        443,
        F::Syn,
    );
    let np = tcp(
        ROUTER_MAC,
        UPLINK_MAC,
        CLIENT,
        NODE,
        64,
        5555,
        30443,
        F::Syn,
    );
    let np_out = tcp(POD2_PORT_MAC, POD2_MAC, NODE, POD2, 63, 61000, 8443, F::Syn);
    let mut v6 = Vec::new();
    PacketBuilder::ethernet2(POD1_MAC, POD1_PORT_MAC)
        .ipv6(
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10],
            64,
        )
        .tcp(7000, 80, 1, 100)
        .syn()
        .write(&mut v6, b"x")
        .unwrap();
    vec![
        (POD1_PORT, syn.clone()),
        (UPLINK, np),
        (
            POD2_PORT,
            tcp(
                POD2_MAC,
                POD2_PORT_MAC,
                POD2,
                NODE,
                64,
                8443,
                61000,
                F::SynAck,
            ),
        ),
        (
            POD2_PORT,
            udp(POD2_MAC, POD2_PORT_MAC, POD2, [10, 96, 0, 53], 64, 5353, 53),
        ),
        (
            UPLINK,
            tcp(ROUTER_MAC, UPLINK_MAC, CLIENT, POD1, 1, 5555, 8080, F::Ack),
        ),
        (
            POD1_PORT,
            arp(
                1,
                POD1_MAC,
                [0xff; 6],
                POD1_MAC,
                POD1,
                [0; 6],
                [169, 254, 1, 1],
            ),
        ),
        (
            POD2_PORT,
            arp(
                2,
                POD2_MAC,
                POD2_PORT_MAC,
                POD2_MAC,
                POD2,
                POD2_PORT_MAC,
                NODE,
            ),
        ),
        (
            POD2_PORT,
            icmp4(
                POD2_MAC,
                POD2_PORT_MAC,
                POD2,
                NODE,
                64,
                Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
                &np_out[14..],
            ),
        ),
        (POD1_PORT, fragment(syn, true, 0)),
        (POD1_PORT, v6),
        (
            POD1_PORT,
            ns(
                POD1_MAC,
                solicited(POD_GATEWAY6).1,
                POD1_IP6,
                solicited(POD_GATEWAY6).0,
                255,
                POD_GATEWAY6,
                Some(POD1_MAC),
            ),
        ),
        (
            UPLINK,
            na(
                ROUTER_MAC,
                UPLINK_MAC,
                ROUTER_IP6,
                NODE_IP6,
                255,
                (true, true, true),
                ROUTER_IP6,
                Some(ROUTER_MAC),
            ),
        ),
        (
            POD2_PORT,
            tcp6(
                POD2_MAC,
                POD2_PORT_MAC,
                POD2_IP6,
                WEB6_CIP,
                64,
                40000,
                80,
                F::Syn,
            ),
        ),
        (POD2_PORT, {
            // An SCTP INIT (no SCTP frontend in the fixture: the chunk walk still runs).
            let mut sctp = vec![0x13, 0x88, 0x27, 0x0f, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 20];
            sctp.extend_from_slice(&[0; 16]);
            let mut out = Vec::new();
            PacketBuilder::ethernet2(POD2_MAC, POD2_PORT_MAC)
                .ipv4(POD2, [10, 96, 0, 10], 64)
                .write(&mut out, etherparse::IpNumber::SCTP, &sctp)
                .unwrap();
            out
        }),
    ]
}

/// An engine that already has connections, so mutations hit the conntrack paths too.
fn warmed(resolved: bool) -> Engine {
    let e = engine_with(
        EngineConfig {
            max_connections: 256,
            shards: 2,
            ..EngineConfig::default()
        },
        resolved,
    );
    let mut tx = Vec::new();
    for (port, f) in seeds() {
        let mut f = f;
        let _ = e.handle_frame(
            Duration::from_secs(1),
            RxMeta {
                port,
                csum: Csum::Complete,
            },
            &mut f,
            &mut tx,
        );
    }
    e
}

#[derive(Clone, Debug)]
enum Mutation {
    Set(usize, u8),
    Flip(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Mutation::Extend),
    ]
}

fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    let n = frame.len().max(1);
    match m {
        Mutation::Set(i, b) => {
            if let Some(x) = frame.get_mut(i % n) {
                *x = *b;
            }
        }
        Mutation::Flip(i, b) => {
            if let Some(x) = frame.get_mut(i % n) {
                *x ^= 1 << b;
            }
        }
        Mutation::Truncate(i) => frame.truncate(i % n),
        Mutation::Extend(v) => frame.extend_from_slice(v),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let e = warmed(true);
        fuzz_one(&e, &data);
        // Random bytes behind a valid Ethernet header for our MAC, both IP EtherTypes.
        for ty in [[0x08, 0x00], [0x86, 0xdd], [0x08, 0x06]] {
            let mut f = Vec::new();
            f.extend_from_slice(&POD1_PORT_MAC);
            f.extend_from_slice(&POD1_MAC);
            f.extend_from_slice(&ty);
            f.extend_from_slice(&data);
            let len = f.len();
            let mut tx = Vec::new();
            let _ = e.handle_frame(Duration::from_secs(2), RxMeta { port: POD1_PORT, csum: Csum::Complete }, &mut f, &mut tx);
            prop_assert_eq!(f.len(), len);
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        which in 0usize..14,
        muts in proptest::collection::vec(mutation(), 1..6),
        partial in any::<bool>(),
        resolved in any::<bool>(),
        later in 0u64..400_000,
    ) {
        let e = warmed(resolved);
        let (port, mut f) = seeds().swap_remove(which);
        for m in &muts {
            apply(&mut f, m);
        }
        let len = f.len();
        let mut tx = Vec::new();
        let csum = if partial { Csum::Partial } else { Csum::Complete };
        let v = e.handle_frame(Duration::from_secs(2), RxMeta { port, csum }, &mut f, &mut tx);
        prop_assert_eq!(f.len(), len);
        if let Verdict::Forward { port } = v {
            prop_assert!([UPLINK, POD1_PORT, POD2_PORT].contains(&port));
        }
        e.handle_timeout(Duration::from_secs(2 + later), &mut tx);
        let _ = e.poll_timeout();
        let _ = e.counters();
    }

    /// Neighbour discovery with a valid checksum and hop limit but any body: smoltcp's
    /// option parsing sees it all.
    #[test]
    fn any_ndp_body_never_panics(
        body in proptest::collection::vec(any::<u8>(), 0..120),
        advert in any::<bool>(),
        multicast in any::<bool>(),
    ) {
        let e = warmed(false);
        let ty = if advert {
            etherparse::Icmpv6Type::NeighborAdvertisement(
                etherparse::icmpv6::NeighborAdvertisementHeader {
                    router: false,
                    solicited: !multicast,
                    r#override: true,
                },
            )
        } else {
            etherparse::Icmpv6Type::NeighborSolicitation
        };
        let (sn, sn_mac) = solicited(POD_GATEWAY6);
        let (dst, dmac) = if multicast { (sn, sn_mac) } else { (POD_GATEWAY6, POD1_PORT_MAC) };
        let mut f = icmp6(POD1_MAC, dmac, POD1_IP6, dst, 255, ty, &body);
        let len = f.len();
        let mut tx = Vec::new();
        let v = e.handle_frame(Duration::from_secs(2), RxMeta { port: POD1_PORT, csum: Csum::Complete }, &mut f, &mut tx);
        prop_assert_eq!(f.len(), len);
        prop_assert!(!matches!(v, Verdict::Drop(DropReason::BadL4Checksum)), "{:?}", v);
        for t in &tx {
            verify_checksums(&t.data);
        }
    }
}

#[test]
fn extreme_times_never_panic() {
    let e = warmed(false);
    let mut tx = Vec::new();
    for (port, f) in seeds() {
        let mut f = f;
        let _ = e.handle_frame(
            Duration::MAX,
            RxMeta {
                port,
                csum: Csum::Complete,
            },
            &mut f,
            &mut tx,
        );
    }
    e.handle_timeout(Duration::MAX, &mut tx);
    let _ = e.poll_timeout();
}
