//! The engine against hostile input, as strict as the kernel: TCP flag combinations the
//! kernel calls INVALID create no state, an ARP flood from distinct senders leaves the
//! neighbour table bounded, ICMP errors are rate-limited as `icmp_ratelimit` and
//! `icmp_msgs_per_sec` say, and what the kernel's input path refuses (martian sources,
//! reverse-path failures, prefixes routed elsewhere, VLAN tags) is never forwarded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use etherparse::PacketBuilder;
use svcnat_userspace::engine::testing::*;
use svcnat_userspace::engine::*;

fn feed(e: &Engine, at: Duration, port: PortId, frame: &[u8]) -> (Verdict, Vec<TxFrame>) {
    let mut f = frame.to_vec();
    let mut tx = Vec::new();
    let meta = RxMeta {
        port,
        csum: Csum::Complete,
    };
    (e.handle_frame(at, meta, &mut f, &mut tx), tx)
}

/// A TCP segment from a client to the NodePort 30080 with raw flags.
fn segment(src: [u8; 4], sport: u16, flags: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
        .ipv4(src, NODE, 64)
        .tcp(sport, 30080, 1000, 64240);
    let mut out = Vec::new();
    b.write(&mut out, &[]).unwrap();
    // Flags byte: Ethernet 14 + IPv4 20 + 13; the TCP checksum covers it.
    let old = u16::from(out[47]);
    out[47] = flags;
    let mut c = u32::from(!u16::from_be_bytes([out[50], out[51]]));
    c += u32::from(!old) & 0xffff;
    c += u32::from(flags);
    while c > 0xffff {
        c = (c & 0xffff) + (c >> 16);
    }
    out[50..52].copy_from_slice(&(!(c as u16)).to_be_bytes());
    out
}

#[test]
fn tcp_flag_combinations_the_kernel_calls_invalid_create_nothing() {
    let e = engine();
    let now = Duration::from_secs(1);
    // No flags, SYN+FIN, FIN+PSH+URG ("Xmas"), FIN alone, SYN+RST, and those that may
    // not open a connection (FIN+ACK, SYN+ACK, RST).
    for (i, flags) in [0x00, 0x03, 0x29, 0x01, 0x06, 0x11, 0x12, 0x04, 0x3f]
        .into_iter()
        .enumerate()
    {
        let (v, tx) = feed(&e, now, UPLINK, &segment(CLIENT, 40000 + i as u16, flags));
        assert_eq!(v, Verdict::Drop(DropReason::Invalid), "flags {flags:#04x}");
        assert!(tx.is_empty(), "flags {flags:#04x}");
    }
    assert_eq!(e.counters().connections, 0);
    assert_eq!(e.counters().connections_created, 0);
    // A SYN (with PSH or ECE/CWR too) and a mid-stream ACK still open connections.
    for (i, flags) in [0x02, 0xc2, 0x10, 0x18].into_iter().enumerate() {
        let (v, _) = feed(&e, now, UPLINK, &segment(CLIENT, 41000 + i as u16, flags));
        assert!(
            matches!(v, Verdict::Forward { .. }),
            "flags {flags:#04x}: {v:?}"
        );
    }
    assert_eq!(e.counters().connections, 4);
}

#[test]
fn a_blind_rst_cannot_remove_a_tracked_connection() {
    let e = engine();
    let now = Duration::from_secs(1);
    let c = SocketAddr::from((CLIENT, 40000));
    let s = SocketAddr::from((NODE, 30080));
    let syn = segment(CLIENT, 40000, 0x02);
    assert!(matches!(
        feed(&e, now, UPLINK, &syn).0,
        Verdict::Forward { .. }
    ));
    assert_eq!(e.connection_state(TCP, c, s), Some(TcpState::SynSent));
    // A spoofed RST with the client's addresses and a sequence number far from the
    // connection's: INVALID, dropped, the connection stays.
    let mut rst = segment(CLIENT, 40000, 0x04);
    let seq_off = 14 + 20 + 4;
    rst[seq_off..seq_off + 4].copy_from_slice(&0x8000_0000u32.to_be_bytes());
    fix_tcp_checksum(&mut rst);
    assert_eq!(
        feed(&e, now, UPLINK, &rst).0,
        Verdict::Drop(DropReason::Invalid)
    );
    assert_eq!(e.connection_state(TCP, c, s), Some(TcpState::SynSent));
    // The client's own RST (its next sequence number, 1001) closes it.
    let mut rst = segment(CLIENT, 40000, 0x04);
    rst[seq_off..seq_off + 4].copy_from_slice(&1001u32.to_be_bytes());
    fix_tcp_checksum(&mut rst);
    assert!(matches!(
        feed(&e, now, UPLINK, &rst).0,
        Verdict::Forward { .. }
    ));
    assert_eq!(e.connection_state(TCP, c, s), Some(TcpState::Close));
}

fn fix_tcp_checksum(f: &mut [u8]) {
    f[50] = 0;
    f[51] = 0;
    let mut sum: u32 = 0;
    for w in f[26..34].chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    sum += 6 + (f.len() - 34) as u32;
    for w in f[34..].chunks(2) {
        let hi = w[0];
        let lo = w.get(1).copied().unwrap_or(0);
        sum += u32::from(u16::from_be_bytes([hi, lo]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[50..52].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

#[test]
fn an_arp_flood_from_distinct_senders_leaves_the_neighbour_table_bounded() {
    let e = engine();
    let before = e.counters().neighbours;
    for i in 0..200_000u32 {
        let mac = [2, 0xaa, (i >> 16) as u8, (i >> 8) as u8, i as u8, 1];
        let spa = [192, 168, (i >> 8) as u8 | 0x80, i as u8];
        let req = arp(1, mac, BCAST, mac, spa, [0; 6], NODE);
        let _ = feed(&e, Duration::from_secs(1), UPLINK, &req);
    }
    let n = e.counters().neighbours;
    assert!(n <= 8192 + before, "{n} neighbours after 200,000 senders");
    // A neighbour the engine needs is still resolved and used.
    let (v, _) = feed(
        &e,
        Duration::from_secs(2),
        UPLINK,
        &segment(CLIENT, 40000, 0x02),
    );
    assert!(
        matches!(v, Verdict::Forward { .. } | Verdict::Consumed),
        "{v:?}"
    );
}

#[test]
fn icmp_errors_are_rate_limited_like_the_kernel() {
    // 10.96.0.99:80 has no endpoints: every SYN gets a port unreachable, until the
    // destination's bucket (six tokens, one per second) is empty.
    let e = engine();
    let syn = |sport: u16| {
        let b = PacketBuilder::ethernet2(POD1_MAC, POD1_PORT_MAC)
            .ipv4(POD1, [10, 96, 0, 99], 64)
            .tcp(sport, 80, 1, 64240)
            .syn();
        let mut out = Vec::new();
        b.write(&mut out, &[]).unwrap();
        out
    };
    let t0 = Duration::from_secs(10);
    let sent: usize = (0..100u16)
        .map(|i| feed(&e, t0, POD1_PORT, &syn(30000 + i)).1.len())
        .sum();
    assert_eq!(sent, 6, "a burst of six, as XRLIM_BURST_FACTOR");
    assert_eq!(e.counters().icmp_limited, 94);
    // One more token a second later.
    let later: usize = (0..10u16)
        .map(|i| {
            feed(
                &e,
                t0 + Duration::from_millis(1000),
                POD1_PORT,
                &syn(31000 + i),
            )
            .1
            .len()
        })
        .sum();
    assert_eq!(later, 1);

    // The global limit: 50 at once over many destinations, then 1000 a second.
    let e = engine_with(
        EngineConfig {
            icmp_limits: IcmpLimits {
                per_destination: Duration::ZERO,
                ..IcmpLimits::default()
            },
            ..EngineConfig::default()
        },
        true,
    );
    let sent: usize = (0..500u16)
        .map(|i| feed(&e, t0, POD1_PORT, &syn(30000 + i)).1.len())
        .sum();
    assert_eq!(sent, 50, "icmp_msgs_burst");
    let sent: usize = (0..500u16)
        .map(|i| {
            feed(
                &e,
                t0 + Duration::from_millis(100),
                POD1_PORT,
                &syn(31000 + i),
            )
            .1
            .len()
        })
        .sum();
    assert_eq!(
        sent, 50,
        "100 ms of icmp_msgs_per_sec=1000 (capped at the burst)"
    );
}

#[test]
fn the_kernels_input_checks_apply_before_forwarding() {
    let e = engine();
    let now = Duration::from_secs(1);
    let pkt = |src: [u8; 4], dst: [u8; 4]| {
        let b = PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
            .ipv4(src, dst, 64)
            .udp(5000, 9999);
        let mut out = Vec::new();
        b.write(&mut out, b"x").unwrap();
        out
    };
    // Plain routing to a local pod works from a LAN client.
    let (v, _) = feed(&e, now, UPLINK, &pkt(CLIENT, POD1));
    assert!(matches!(v, Verdict::Forward { port: POD1_PORT }), "{v:?}");
    for (src, dst) in [
        ([127, 0, 0, 1], POD1),
        ([224, 0, 0, 5], POD1),
        ([255, 255, 255, 255], POD1),
        ([0, 0, 0, 0], POD1),
        (CLIENT, [127, 0, 0, 1]),
    ] {
        let (v, _) = feed(&e, now, UPLINK, &pkt(src, dst));
        assert_eq!(v, Verdict::Drop(DropReason::Martian), "{src:?} -> {dst:?}");
    }
    // With the node's addresses and rp_filter known (as the driver reads them).
    let mut adm = Admission::default();
    adm.node_addrs.insert(IpAddr::V4(Ipv4Addr::from(NODE)));
    adm.node_addrs.insert("10.99.0.1".parse().unwrap());
    adm.broadcasts.insert(Ipv4Addr::new(192, 168, 1, 255));
    adm.rp_filter.insert(UPLINK, RpFilter::Strict);
    adm.rp_filter.insert(POD1_PORT, RpFilter::Strict);
    e.set_admission(adm.clone());
    // Strict: a pod's address arriving on the uplink fails; from its own veth it passes.
    let (v, _) = feed(&e, now, UPLINK, &pkt(POD2, POD1));
    assert_eq!(v, Verdict::Drop(DropReason::ReversePath));
    let (v, _) = feed(&e, now, UPLINK, &pkt(NODE, POD1));
    assert_eq!(v, Verdict::Drop(DropReason::Martian), "our own address");
    let (v, _) = feed(&e, now, UPLINK, &pkt([192, 168, 1, 255], POD1));
    assert_eq!(v, Verdict::Drop(DropReason::Martian), "subnet broadcast");
    // Loose: any route back will do (the default route through the router).
    adm.rp_filter.insert(UPLINK, RpFilter::Loose);
    e.set_admission(adm);
    let (v, _) = feed(&e, now, UPLINK, &pkt(POD2, POD1));
    assert!(matches!(v, Verdict::Forward { .. }), "loose: {v:?}");
    // The node's address on another interface is the kernel's, not routed to the
    // default gateway.
    let (v, _) = feed(&e, now, UPLINK, &pkt(CLIENT, [10, 99, 0, 1]));
    assert_eq!(v, Verdict::Kernel);
    // A prefix the kernel routes elsewhere is never reached through the default route.
    let mut fib: Vec<FibEntry> = routes().into_iter().map(FibEntry::Port).collect();
    let (v, _) = feed(&e, now, UPLINK, &pkt(CLIENT, [10, 99, 1, 5]));
    assert!(matches!(v, Verdict::Forward { port: UPLINK }), "{v:?}");
    fib.insert(0, FibEntry::NotOurs("10.99.0.0/16".parse().unwrap()));
    e.set_fib(fib);
    let (v, _) = feed(&e, now, UPLINK, &pkt(CLIENT, [10, 99, 1, 5]));
    assert_eq!(v, Verdict::Kernel);
    // A VLAN-tagged frame is never forwarded as if untagged.
    let mut tagged = pkt(CLIENT, POD1);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x0a]);
    let (v, _) = feed(&e, now, UPLINK, &tagged);
    assert_eq!(v, Verdict::Drop(DropReason::Vlan));
}
