//! SCTP through the engine: frontends translated like TCP and UDP (ports at the same
//! offsets), the CRC32c recomputed after every rewrite (checked against a bit-by-bit
//! reference here, itself checked against RFC 3720's vectors), and the association kept
//! simply: new on INIT, established on any reply, closed on ABORT or SHUTDOWN COMPLETE.
//! This machine's kernel has no SCTP, so these hand-built packets are the proof.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::*;
use etherparse::{IpNumber, PacketBuilder};
use svcnat_core::model::*;
use svcnat_core::plan::Plan;
use svcnat_userspace::engine::testing::*;
use svcnat_userspace::engine::*;

const SCTP: u8 = 132;
const CIP: [u8; 4] = [10, 96, 0, 60];
const CIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x60);

const INIT: u8 = 1;
const INIT_ACK: u8 = 2;
const DATA: u8 = 0;
const SACK: u8 = 3;
const ABORT: u8 = 6;
const SHUTDOWN_COMPLETE: u8 = 14;

/// CRC32c bit by bit (no table), the reference the engine's table-driven one is checked
/// against.
fn crc32c_ref(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn reference_crc32c_matches_rfc_3720() {
    assert_eq!(crc32c_ref(&[0; 32]), 0x8a91_36aa);
    assert_eq!(crc32c_ref(&[0xff; 32]), 0x62a8_ab43);
    assert_eq!(crc32c_ref(&(0u8..32).collect::<Vec<_>>()), 0x46dd_794e);
}

/// An SCTP packet: common header, then the chunks (type, value) padded to 4 octets, with
/// its CRC32c (least significant byte first, RFC 9260 Appendix A).
fn sctp(sport: u16, dport: u16, vtag: u32, chunks: &[(u8, &[u8])]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    for (ty, value) in chunks {
        p.extend_from_slice(&[*ty, 0]);
        p.extend_from_slice(&(4 + value.len() as u16).to_be_bytes());
        p.extend_from_slice(value);
        while p.len() % 4 != 0 {
            p.push(0);
        }
    }
    let crc = crc32c_ref(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// An INIT chunk's value: initiate tag, a_rwnd, streams, initial TSN.
const INIT_VALUE: [u8; 16] = [
    0x11, 0x22, 0x33, 0x44, 0, 1, 0, 0, 0, 10, 0, 10, 0x55, 0x66, 0x77, 0x88,
];

fn frame4(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src, dst, ttl)
        .write(&mut out, IpNumber::SCTP, payload)
        .unwrap();
    out
}

fn frame6(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv6(src.octets(), dst.octets(), hop)
        .write(&mut out, IpNumber::SCTP, payload)
        .unwrap();
    out
}

/// The fixture plus `default/sctp`, ClusterIP 10.96.0.60 and fd00:96::60 (dual-stack),
/// SCTP port 9999 -> pod 1 (both families) on 7777.
fn engine_with_sctp() -> Engine {
    let mut c = cluster();
    let mut s = Service::new(ObjectName::new("default", "sctp"));
    s.cluster_ips = vec![IpAddr::from(CIP), IpAddr::V6(CIP6)];
    s.ip_families = vec![IpFamily::V4, IpFamily::V6];
    s.selector = Some(LabelSelector::from_labels(BTreeMap::from([(
        "app".to_string(),
        "sctp".to_string(),
    )])));
    s.ports.push(ServicePort::new(
        String::new(),
        Protocol::Sctp,
        9999,
        TargetPort::Number(7777),
    ));
    c.upsert_service(s);
    let mut p = Pod::new(ObjectName::new("default", "sctp-1"), IpAddr::from(POD1));
    p.ips.push(IpAddr::V6(POD1_IP6));
    p.labels.insert("app".into(), "sctp".into());
    p.node_name = Some("node-a".into());
    c.upsert_pod(p);
    let e = engine_with(
        EngineConfig {
            shards: 1,
            ..EngineConfig::default()
        },
        true,
    );
    e.set_plan(&Plan::compile(&c, &node()));
    e
}

fn feed(e: &Engine, at: Duration, port: PortId, csum: Csum, frame: &[u8]) -> (Verdict, Vec<u8>) {
    let mut f = frame.to_vec();
    let mut tx = Vec::new();
    let v = e.handle_frame(at, RxMeta { port, csum }, &mut f, &mut tx);
    assert!(tx.is_empty(), "{tx:?}");
    (v, f)
}

fn state(e: &Engine, src: SocketAddr) -> Option<TcpState> {
    e.connection_state(SCTP, src, SocketAddr::new(IpAddr::from(CIP), 9999))
}

#[test]
fn association_is_translated_both_ways_with_a_fresh_crc32c() {
    let e = engine_with_sctp();
    let t = Duration::from_secs(1);
    let client = SocketAddr::new(IpAddr::from(POD2), 5000);
    // INIT from pod 2 to the ClusterIP: DNAT to pod 1, verification tag 0.
    let init = sctp(5000, 9999, 0, &[(INIT, &INIT_VALUE)]);
    let (v, out) = feed(
        &e,
        t,
        POD2_PORT,
        Csum::Complete,
        &frame4(POD2_MAC, POD2_PORT_MAC, POD2, CIP, 64, &init),
    );
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    let want = frame4(
        POD1_PORT_MAC,
        POD1_MAC,
        POD2,
        POD1,
        63,
        &sctp(5000, 7777, 0, &[(INIT, &INIT_VALUE)]),
    );
    assert_eq!(out, want);
    assert_eq!(state(&e, client), Some(TcpState::SynSent));

    // INIT ACK back: source restored to the ClusterIP and port; established.
    let init_ack = sctp(7777, 5000, 0x1122_3344, &[(INIT_ACK, &INIT_VALUE)]);
    let (v, out) = feed(
        &e,
        t,
        POD1_PORT,
        Csum::Complete,
        &frame4(POD1_MAC, POD1_PORT_MAC, POD1, POD2, 64, &init_ack),
    );
    assert_eq!(v, Verdict::Forward { port: POD2_PORT });
    assert_eq!(
        out,
        frame4(
            POD2_PORT_MAC,
            POD2_MAC,
            CIP,
            POD2,
            63,
            &sctp(9999, 5000, 0x1122_3344, &[(INIT_ACK, &INIT_VALUE)]),
        )
    );
    assert_eq!(state(&e, client), Some(TcpState::Established));

    // DATA bundled with a SACK keeps it established and translated.
    let data = sctp(
        5000,
        9999,
        0x1122_3344,
        &[(SACK, &[0; 12]), (DATA, b"\0\0\0\x01\0\0\0\0\0\0\0\0hello")],
    );
    let (v, out) = feed(
        &e,
        t,
        POD2_PORT,
        Csum::Complete,
        &frame4(POD2_MAC, POD2_PORT_MAC, POD2, CIP, 64, &data),
    );
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    let mut want_payload = data.clone();
    want_payload[2..4].copy_from_slice(&7777u16.to_be_bytes());
    want_payload[8..12].fill(0);
    let crc = crc32c_ref(&want_payload);
    want_payload[8..12].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        out,
        frame4(POD1_PORT_MAC, POD1_MAC, POD2, POD1, 63, &want_payload)
    );

    // ABORT closes it (and is still translated).
    let abort = sctp(5000, 9999, 0x1122_3344, &[(ABORT, &[])]);
    let (v, _) = feed(
        &e,
        t,
        POD2_PORT,
        Csum::Complete,
        &frame4(POD2_MAC, POD2_PORT_MAC, POD2, CIP, 64, &abort),
    );
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    assert_eq!(state(&e, client), Some(TcpState::Close));
    // A new INIT from the same ports reopens it.
    let (v, _) = feed(
        &e,
        t,
        POD2_PORT,
        Csum::Complete,
        &frame4(POD2_MAC, POD2_PORT_MAC, POD2, CIP, 64, &init),
    );
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    assert_eq!(state(&e, client), Some(TcpState::SynSent));
}

#[test]
fn shutdown_complete_closes_and_closed_associations_expire() {
    let e = engine_with_sctp();
    let client = SocketAddr::new(IpAddr::from(POD2), 5001);
    let init = sctp(5001, 9999, 0, &[(INIT, &INIT_VALUE)]);
    let f = frame4(POD2_MAC, POD2_PORT_MAC, POD2, CIP, 64, &init);
    assert!(matches!(
        feed(&e, Duration::from_secs(1), POD2_PORT, Csum::Complete, &f).0,
        Verdict::Forward { .. }
    ));
    let reply = sctp(7777, 5001, 1, &[(SHUTDOWN_COMPLETE, &[])]);
    let f = frame4(POD1_MAC, POD1_PORT_MAC, POD1, POD2, 64, &reply);
    let (v, _) = feed(&e, Duration::from_secs(1), POD1_PORT, Csum::Complete, &f);
    assert_eq!(v, Verdict::Forward { port: POD2_PORT });
    assert_eq!(state(&e, client), Some(TcpState::Close));
    // nf_conntrack's CLOSED timeout: 10 s.
    let mut tx = Vec::new();
    e.handle_timeout(Duration::from_secs(10), &mut tx);
    assert_eq!(state(&e, client), Some(TcpState::Close));
    e.handle_timeout(Duration::from_secs(12), &mut tx);
    assert_eq!(state(&e, client), None);
}

#[test]
fn unanswered_init_expires_after_the_cookie_wait_timeout() {
    let e = engine_with_sctp();
    let client = SocketAddr::new(IpAddr::from(POD2), 5002);
    let init = sctp(5002, 9999, 0, &[(INIT, &INIT_VALUE)]);
    let f = frame4(POD2_MAC, POD2_PORT_MAC, POD2, CIP, 64, &init);
    let _ = feed(&e, Duration::from_secs(1), POD2_PORT, Csum::Complete, &f);
    let mut tx = Vec::new();
    e.handle_timeout(Duration::from_secs(3), &mut tx);
    assert_eq!(state(&e, client), Some(TcpState::SynSent));
    e.handle_timeout(Duration::from_secs(5), &mut tx);
    assert_eq!(state(&e, client), None);
}

#[test]
fn bad_crc_abort_without_association_and_bad_chunks_are_dropped() {
    let e = engine_with_sctp();
    let t = Duration::from_secs(1);
    let mut bad = sctp(5003, 9999, 0, &[(INIT, &INIT_VALUE)]);
    bad[8] ^= 1;
    let cases = [
        ("bad CRC32c", bad, DropReason::BadL4Checksum),
        (
            "ABORT opens nothing",
            sctp(5004, 9999, 7, &[(ABORT, &[])]),
            DropReason::Invalid,
        ),
        (
            "SHUTDOWN COMPLETE opens nothing",
            sctp(5005, 9999, 7, &[(SHUTDOWN_COMPLETE, &[])]),
            DropReason::Invalid,
        ),
        (
            "chunk length past the packet",
            {
                let mut p = sctp(5006, 9999, 0, &[(INIT, &INIT_VALUE)]);
                p[14..16].copy_from_slice(&200u16.to_be_bytes());
                p
            },
            DropReason::Malformed,
        ),
        (
            "no chunk at all",
            sctp(5007, 9999, 0, &[]),
            DropReason::Truncated,
        ),
    ];
    for (name, payload, want) in cases {
        let f = frame4(POD2_MAC, POD2_PORT_MAC, POD2, CIP, 64, &payload);
        let (v, _) = feed(&e, t, POD2_PORT, Csum::Complete, &f);
        assert_eq!(v, Verdict::Drop(want), "{name}");
    }
    assert_eq!(e.counters().connections, 0);
}

#[test]
fn partial_checksum_is_left_for_whoever_completes_it() {
    let e = engine_with_sctp();
    let mut init = sctp(5008, 9999, 0, &[(INIT, &INIT_VALUE)]);
    // CHECKSUM_PARTIAL: the field is not filled in yet.
    init[8..12].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    let (v, out) = feed(
        &e,
        Duration::from_secs(1),
        POD2_PORT,
        Csum::Partial,
        &frame4(POD2_MAC, POD2_PORT_MAC, POD2, CIP, 64, &init),
    );
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    let sctp_off = 14 + 20;
    assert_eq!(
        &out[sctp_off..sctp_off + 4],
        &[5008u16.to_be_bytes(), 7777u16.to_be_bytes()].concat()[..]
    );
    assert_eq!(&out[sctp_off + 8..sctp_off + 12], &[0xde, 0xad, 0xbe, 0xef]);
}

#[test]
fn sctp_over_ipv6_is_translated_too() {
    let e = engine_with_sctp();
    let client6 = POD2_IP6;
    let init = sctp(5009, 9999, 0, &[(INIT, &INIT_VALUE)]);
    let (v, out) = feed(
        &e,
        Duration::from_secs(1),
        POD2_PORT,
        Csum::Complete,
        &frame6(POD2_MAC, POD2_PORT_MAC, client6, CIP6, 64, &init),
    );
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    assert_eq!(
        out,
        frame6(
            POD1_PORT_MAC,
            POD1_MAC,
            client6,
            POD1_IP6,
            63,
            &sctp(5009, 7777, 0, &[(INIT, &INIT_VALUE)]),
        )
    );
}
