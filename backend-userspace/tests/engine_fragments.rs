//! Fragments and MTU in the engine: reassembly of IPv4 and IPv6 fragments addressed to a
//! frontend or belonging to a translated connection (bounded as the kernel's defrag is:
//! overlaps, duplicates, timeout, memory budget, fragments per datagram, 65,535 bytes, RFC
//! 7112 first fragments), the datagram translated and split again no larger than it came;
//! packets larger than the egress MTU fragmented (IPv4 without DF) or answered with ICMP
//! "fragmentation needed" / ICMPv6 "packet too big". Fragments are built and reassembled
//! here independently of the engine (etherparse headers, byte slicing).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use svcnat_userspace::engine::testing::*;
use svcnat_userspace::engine::*;

const DNS_CIP: [u8; 4] = [10, 96, 0, 53];
const WEB6_CIP: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
const CLIENT6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
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
    (v, f, tx)
}

/// An engine whose uplink has MTU `uplink` and pod veths `pods`.
fn engine_mtu(cfg: EngineConfig, uplink: u32, pods: u32) -> Engine {
    let e = engine_with(cfg, true);
    let ports = ports()
        .into_iter()
        .map(|mut p| {
            p.mtu = if p.id == UPLINK { uplink } else { pods };
            p
        })
        .collect();
    e.set_ports(ports);
    e
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 256) as u8).collect()
}

/// A whole UDP/IPv4 frame (DF as asked, identification 0x4242).
fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, data: &[u8], df: bool) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, data)
        .unwrap();
    let mut h = etherparse::Ipv4Header::from_slice(&out[14..]).unwrap().0;
    h.identification = 0x4242;
    h.dont_fragment = df;
    h.header_checksum = h.calc_header_checksum();
    let mut w = Vec::new();
    h.write(&mut w).unwrap();
    out[14..34].copy_from_slice(&w);
    out
}

/// Splits an IPv4 frame (20-byte header) into fragments of `size`-byte IP packets.
fn split4(frame: &[u8], size: usize) -> Vec<Vec<u8>> {
    let data = &frame[34..];
    let per = (size - 20) & !7;
    let mut out = Vec::new();
    for (i, chunk) in data.chunks(per).enumerate() {
        let mut f = frame[..34].to_vec();
        f.extend_from_slice(chunk);
        let mut h = etherparse::Ipv4Header::from_slice(&f[14..]).unwrap().0;
        h.more_fragments = (i + 1) * per < data.len();
        h.dont_fragment = false;
        h.fragment_offset = etherparse::IpFragOffset::try_new((i * per / 8) as u16).unwrap();
        h.set_payload_len(chunk.len()).unwrap();
        h.header_checksum = h.calc_header_checksum();
        let mut w = Vec::new();
        h.write(&mut w).unwrap();
        f[14..34].copy_from_slice(&w);
        out.push(f);
    }
    out
}

/// An IPv4 fragment with arbitrary offset (bytes, a multiple of 8) and data.
fn frag4(base: &[u8], offset: usize, data: &[u8], more: bool) -> Vec<u8> {
    let mut f = base[..34].to_vec();
    f.extend_from_slice(data);
    let mut h = etherparse::Ipv4Header::from_slice(&f[14..]).unwrap().0;
    h.more_fragments = more;
    h.dont_fragment = false;
    h.fragment_offset = etherparse::IpFragOffset::try_new((offset / 8) as u16).unwrap();
    h.set_payload_len(data.len()).unwrap();
    h.header_checksum = h.calc_header_checksum();
    let mut w = Vec::new();
    h.write(&mut w).unwrap();
    f[14..34].copy_from_slice(&w);
    f
}

/// Reassembles IPv4 fragment frames (any order) into one frame.
fn join4(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut parts: Vec<(usize, bool, &[u8])> = frags
        .iter()
        .map(|f| {
            let h = etherparse::Ipv4Header::from_slice(&f[14..]).unwrap().0;
            let ihl = usize::from(h.ihl()) * 4;
            let end = 14 + usize::from(h.total_len);
            (
                usize::from(h.fragment_offset.value()) * 8,
                h.more_fragments,
                &f[14 + ihl..end],
            )
        })
        .collect();
    parts.sort_by_key(|p| p.0);
    let mut data = Vec::new();
    for (off, _, d) in &parts {
        assert_eq!(*off, data.len(), "fragments leave a hole or overlap");
        data.extend_from_slice(d);
    }
    assert!(!parts.last().unwrap().1, "the last fragment has MF set");
    let first = frags
        .iter()
        .find(|f| f[20] & 0x1f == 0 && f[21] == 0)
        .unwrap();
    let mut out = first[..34].to_vec();
    out.extend_from_slice(&data);
    let mut h = etherparse::Ipv4Header::from_slice(&out[14..]).unwrap().0;
    h.more_fragments = false;
    h.fragment_offset = etherparse::IpFragOffset::ZERO;
    h.set_payload_len(data.len()).unwrap();
    h.header_checksum = h.calc_header_checksum();
    let mut w = Vec::new();
    h.write(&mut w).unwrap();
    out[14..34].copy_from_slice(&w);
    out
}

fn udp_of(frame: &[u8]) -> (u16, u16, Vec<u8>) {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(TransportSlice::Udp(u)) = p.transport else {
        panic!("not UDP: {frame:?}");
    };
    (u.source_port(), u.destination_port(), u.payload().to_vec())
}

fn ip_len(frame: &[u8]) -> usize {
    frame.len() - 14
}

#[test]
fn fragmented_udp_to_a_cluster_ip_is_reassembled_translated_and_split_again() {
    let e = engine_mtu(EngineConfig::default(), 1500, 1500);
    let data = payload(3000);
    let whole = udp4(CLIENT, DNS_CIP, 40000, 53, &data, false);
    let mut frags = split4(&whole, 1500);
    assert_eq!(frags.len(), 3);
    // Out of order: the last one first.
    frags.rotate_right(1);
    let mut out = Vec::new();
    for (i, f) in frags.iter().enumerate() {
        let (v, _, tx) = feed(&e, ms(i as u64), UPLINK, f);
        assert_eq!(v, Verdict::Consumed, "fragment {i}");
        out.extend(tx);
    }
    assert_eq!(out.len(), 3, "split again into three: {out:?}");
    assert!(
        out.iter()
            .all(|t| t.port == POD1_PORT && ip_len(&t.data) <= 1500)
    );
    let frames: Vec<Vec<u8>> = out.iter().map(|t| t.data.clone()).collect();
    let joined = join4(&frames);
    verify_checksums(&joined);
    let (_, dport, got) = udp_of(&joined);
    assert_eq!(dport, 53);
    assert_eq!(got, data, "payload intact");
    assert_eq!(&joined[30..34], &POD1, "DNAT to the endpoint");
    assert_eq!(&joined[0..6], &POD1_MAC);
    let c = e.counters();
    assert_eq!((c.reassembled, c.fragments_sent), (1, 3));
    assert_eq!((c.reassembly_pending, c.reassembly_memory), (0, 0));

    // The reply, fragmented by the pod, goes back un-translated, as fragments too.
    let src = [joined[26], joined[27], joined[28], joined[29]];
    let (sport, _, _) = udp_of(&joined);
    let mut reply = udp4(POD1, src, 53, sport, &payload(2000), false);
    reply[0..6].copy_from_slice(&POD1_PORT_MAC);
    reply[6..12].copy_from_slice(&POD1_MAC);
    let mut back = Vec::new();
    for f in split4(&reply, 1200) {
        let (v, _, tx) = feed(&e, ms(10), POD1_PORT, &f);
        // To the node's own address (masqueraded), fragments are the kernel's too.
        let want = if src == NODE {
            Verdict::Kernel
        } else {
            Verdict::Consumed
        };
        assert_eq!(v, want);
        back.extend(tx);
    }
    assert_eq!(
        back.len(),
        2,
        "split to the largest fragment received (1200)"
    );
    assert!(
        back.iter()
            .all(|t| t.port == UPLINK && ip_len(&t.data) <= 1200)
    );
    let frames: Vec<Vec<u8>> = back.iter().map(|t| t.data.clone()).collect();
    let joined = join4(&frames);
    verify_checksums(&joined);
    assert_eq!(
        &joined[26..30],
        &DNS_CIP,
        "the reply comes from the ClusterIP"
    );
    assert_eq!(&joined[30..34], &CLIENT);
    assert_eq!(udp_of(&joined), (53, 40000, payload(2000)));
}

#[test]
fn overlapping_fragments_drop_the_datagram_and_duplicates_are_absorbed() {
    let e = engine_mtu(EngineConfig::default(), 1500, 1500);
    let whole = udp4(CLIENT, DNS_CIP, 40001, 53, &payload(3000), false);
    let body = &whole[34..];
    // A duplicate of a held fragment changes nothing.
    let f0 = frag4(&whole, 0, &body[..1480], true);
    assert_eq!(feed(&e, ms(0), UPLINK, &f0).0, Verdict::Consumed);
    assert_eq!(feed(&e, ms(1), UPLINK, &f0).0, Verdict::Consumed);
    assert_eq!(e.counters().reassembly_pending, 1);
    // Partial overlap (1472..2952 over 0..1480): the whole datagram goes.
    let f1 = frag4(&whole, 1472, &body[1472..2952], true);
    assert_eq!(
        feed(&e, ms(2), UPLINK, &f1).0,
        Verdict::Drop(DropReason::FragmentOverlap)
    );
    let c = e.counters();
    assert_eq!((c.reassembly_pending, c.reassembly_memory), (0, 0));
    assert_eq!(
        c.dropped(DropReason::FragmentOverlap),
        2,
        "held one and the overlapping one"
    );
    // The rest cannot complete it: nothing is forwarded.
    let last = frag4(&whole, 2960, &body[2960..], false);
    let (v, _, tx) = feed(&e, ms(3), UPLINK, &last);
    assert_eq!(v, Verdict::Consumed);
    assert!(tx.is_empty());
}

#[test]
fn incomplete_datagrams_time_out_after_thirty_seconds() {
    let e = engine_mtu(EngineConfig::default(), 1500, 1500);
    let whole = udp4(CLIENT, DNS_CIP, 40002, 53, &payload(3000), false);
    let f0 = frag4(&whole, 0, &whole[34..34 + 1480], true);
    let t0 = Duration::from_secs(100);
    assert_eq!(feed(&e, t0, UPLINK, &f0).0, Verdict::Consumed);
    assert!(e.poll_timeout().unwrap() <= t0 + Duration::from_secs(30));
    let mut tx = Vec::new();
    e.handle_timeout(t0 + Duration::from_secs(29), &mut tx);
    assert_eq!(e.counters().reassembly_pending, 1);
    e.handle_timeout(t0 + Duration::from_secs(30), &mut tx);
    let c = e.counters();
    assert_eq!((c.reassembly_pending, c.reassembly_memory), (0, 0));
    assert_eq!(c.dropped(DropReason::FragmentTimeout), 1);
    assert!(tx.is_empty(), "conntrack's defrag sends no time exceeded");
}

#[test]
fn a_fragment_flood_stays_inside_the_memory_budget() {
    let budget = 64 * 1024;
    let cfg = EngineConfig {
        reassembly: Reassembly {
            memory: budget,
            ..Reassembly::default()
        },
        ..EngineConfig::default()
    };
    let e = engine_mtu(cfg, 1500, 1500);
    let whole = udp4(CLIENT, DNS_CIP, 40003, 53, &payload(3000), false);
    let mut refused = 0;
    for id in 0..1000u16 {
        let mut f = frag4(&whole, 0, &whole[34..34 + 1480], true);
        f[18..20].copy_from_slice(&id.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = etherparse::Ipv4Header::from_slice(&f[14..])
            .unwrap()
            .0
            .calc_header_checksum();
        f[24..26].copy_from_slice(&c.to_be_bytes());
        if feed(&e, ms(1), UPLINK, &f).0 == Verdict::Drop(DropReason::FragmentMemory) {
            refused += 1;
        }
        assert!(e.counters().reassembly_memory as usize <= budget + 2048);
    }
    assert!(refused > 900, "{refused}");
    // Timeouts give the memory back, and reassembly works again.
    let mut tx = Vec::new();
    e.handle_timeout(Duration::from_secs(31), &mut tx);
    assert_eq!(e.counters().reassembly_memory, 0);
    let mut out = Vec::new();
    for f in split4(&whole, 1500) {
        out.extend(feed(&e, Duration::from_secs(32), UPLINK, &f).2);
    }
    assert_eq!(out.len(), 3);
}

#[test]
fn too_many_fragments_too_long_and_empty_fragments_are_refused() {
    let cfg = EngineConfig {
        reassembly: Reassembly {
            max_fragments: 4,
            ..Reassembly::default()
        },
        ..EngineConfig::default()
    };
    let e = engine_mtu(cfg, 1500, 1500);
    let whole = udp4(CLIENT, DNS_CIP, 40004, 53, &payload(3000), false);
    let body = &whole[34..];
    for i in 0..4 {
        let f = frag4(&whole, i * 8, &body[i * 8..i * 8 + 8], true);
        assert_eq!(feed(&e, ms(0), UPLINK, &f).0, Verdict::Consumed);
    }
    let f = frag4(&whole, 32, &body[32..40], true);
    assert_eq!(
        feed(&e, ms(0), UPLINK, &f).0,
        Verdict::Drop(DropReason::Fragment)
    );
    assert_eq!(e.counters().reassembly_pending, 0);
    // Past 65,535 bytes.
    let f = frag4(&whole, 65_512, &body[..100], false);
    assert_eq!(
        feed(&e, ms(0), UPLINK, &f).0,
        Verdict::Drop(DropReason::Fragment)
    );
    // A last fragment shorter than data already held.
    let f = frag4(&whole, 1480, &body[1480..2960], true);
    assert_eq!(feed(&e, ms(0), UPLINK, &f).0, Verdict::Consumed);
    let f = frag4(&whole, 8, &body[8..16], false);
    assert_eq!(
        feed(&e, ms(0), UPLINK, &f).0,
        Verdict::Drop(DropReason::Fragment)
    );
    assert_eq!(e.counters().reassembly_pending, 0);
}

#[test]
fn an_oversized_df_packet_gets_fragmentation_needed_and_one_without_df_is_fragmented() {
    // A jumbo uplink (9000) and 1500-byte pod links.
    let e = engine_mtu(EngineConfig::default(), 9000, 1500);
    let data = payload(4000);
    let df = udp4(CLIENT, DNS_CIP, 40005, 53, &data, true);
    let (v, _, tx) = feed(&e, ms(0), UPLINK, &df);
    assert_eq!(v, Verdict::Drop(DropReason::TooBig));
    assert_eq!(tx.len(), 1);
    let icmp = &tx[0];
    assert_eq!(icmp.port, UPLINK);
    verify_checksums(&icmp.data);
    let l4 = 34;
    assert_eq!(
        (icmp.data[l4], icmp.data[l4 + 1]),
        (3, 4),
        "fragmentation needed"
    );
    assert_eq!(
        u16::from_be_bytes([icmp.data[l4 + 6], icmp.data[l4 + 7]]),
        1500
    );
    assert_eq!(&icmp.data[30..34], &CLIENT);
    // The quote is the packet as the client sent it (to the ClusterIP).
    assert_eq!(&icmp.data[l4 + 8 + 16..l4 + 8 + 20], &DNS_CIP);
    assert_eq!(
        e.counters().connections,
        0,
        "no connection for a refused packet"
    );

    let no_df = udp4(CLIENT, DNS_CIP, 40006, 53, &data, false);
    let (v, _, tx) = feed(&e, ms(1), UPLINK, &no_df);
    assert_eq!(v, Verdict::Consumed);
    assert_eq!(tx.len(), 3);
    assert!(
        tx.iter()
            .all(|t| t.port == POD1_PORT && ip_len(&t.data) <= 1500)
    );
    let frames: Vec<Vec<u8>> = tx.iter().map(|t| t.data.clone()).collect();
    let joined = join4(&frames);
    verify_checksums(&joined);
    assert_eq!(udp_of(&joined).2, data);
    assert_eq!(&joined[30..34], &POD1);

    // Frames longer than their ingress link's MTU are offload aggregates: whole.
    let e = engine_mtu(EngineConfig::default(), 1500, 1000);
    let big = udp4(CLIENT, DNS_CIP, 40007, 53, &payload(3000), true);
    let (v, _, _) = feed(&e, ms(0), UPLINK, &big);
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
}

// ---------------------------------------------------------------------------------------------
// IPv6
// ---------------------------------------------------------------------------------------------

/// A whole TCP/IPv6 frame (an ACK with data) from the client to web6's ClusterIP.
fn tcp6_data(sport: u16, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
        .ipv6(CLIENT6, WEB6_CIP, 64)
        .tcp(sport, 80, 1000, 64240)
        .syn()
        .write(&mut out, data)
        .unwrap();
    out
}

/// Splits an IPv6 frame (no extension headers) into fragments of `size`-byte packets.
fn split6(frame: &[u8], size: usize, id: u32) -> Vec<Vec<u8>> {
    let next = frame[20];
    let data = &frame[54..];
    let per = (size - 48) & !7;
    let mut out = Vec::new();
    for (i, chunk) in data.chunks(per).enumerate() {
        let more = (i + 1) * per < data.len();
        out.push(frag6(frame, next, i * per, chunk, more, id));
    }
    out
}

fn frag6(frame: &[u8], next: u8, offset: usize, chunk: &[u8], more: bool, id: u32) -> Vec<u8> {
    let mut f = frame[..54].to_vec();
    f[20] = 44;
    f.extend_from_slice(&[next, 0]);
    f.extend_from_slice(&((offset as u16) | u16::from(more)).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(chunk);
    let plen = (f.len() - 54) as u16;
    f[18..20].copy_from_slice(&plen.to_be_bytes());
    f
}

#[test]
fn fragmented_ipv6_is_reassembled_translated_and_split_to_its_original_size() {
    let e = engine_mtu(EngineConfig::default(), 1500, 1500);
    let data = payload(2500);
    let whole = tcp6_data(41000, &data);
    let frags = split6(&whole, 1280, 7);
    assert_eq!(frags.len(), 3);
    let mut out = Vec::new();
    for f in frags.iter().rev() {
        let (v, _, tx) = feed(&e, ms(0), UPLINK, f);
        assert_eq!(v, Verdict::Consumed);
        out.extend(tx);
    }
    assert_eq!(out.len(), 3, "{out:?}");
    let mut parts: Vec<(usize, Vec<u8>)> = Vec::new();
    for t in &out {
        assert!(ip_len(&t.data) <= 1280, "no larger than it came");
        assert_eq!(t.data[20], 44, "a Fragment header");
        assert_eq!(
            &t.data[58..62],
            &7u32.to_be_bytes(),
            "the original identification"
        );
        let w = u16::from_be_bytes([t.data[56], t.data[57]]);
        parts.push((usize::from(w & 0xfff8), t.data[62..].to_vec()));
    }
    parts.sort();
    let mut joined = out[0].data[..54].to_vec();
    joined[20] = out[0].data[54];
    for (off, d) in &parts {
        assert_eq!(*off, joined.len() - 54);
        joined.extend_from_slice(d);
    }
    let plen = (joined.len() - 54) as u16;
    joined[18..20].copy_from_slice(&plen.to_be_bytes());
    verify_checksums(&joined);
    let p = SlicedPacket::from_ethernet(&joined).unwrap();
    let Some(TransportSlice::Tcp(t)) = p.transport else {
        panic!("not TCP");
    };
    assert_eq!(t.destination_port(), 8080);
    assert_eq!(t.payload(), &data[..]);
}

#[test]
fn ipv6_fragments_follow_rfc_7112_and_8200() {
    let e = engine_mtu(EngineConfig::default(), 1500, 1500);
    let whole = tcp6_data(41001, &payload(2500));
    // A first fragment that does not hold the TCP header (8 of its 20 bytes).
    let f = frag6(&whole, 6, 0, &whole[54..62], true, 9);
    assert_eq!(
        feed(&e, ms(0), UPLINK, &f).0,
        Verdict::Drop(DropReason::Fragment)
    );
    // A middle fragment not a multiple of 8 bytes.
    let f = frag6(&whole, 6, 1232, &whole[54..54 + 100], true, 10);
    assert_eq!(
        feed(&e, ms(0), UPLINK, &f).0,
        Verdict::Drop(DropReason::Fragment)
    );
    // An atomic fragment (offset 0, no more) is a whole packet (RFC 6946).
    let small = tcp6_data(41002, b"hi");
    let f = frag6(&small, 6, 0, &small[54..], false, 11);
    assert!(matches!(
        feed(&e, ms(0), UPLINK, &f).0,
        Verdict::Forward { .. }
    ));
    // Overlap drops the datagram.
    let f0 = frag6(&whole, 6, 0, &whole[54..54 + 1232], true, 12);
    let f1 = frag6(&whole, 6, 1224, &whole[54 + 1224..54 + 2456], true, 12);
    assert_eq!(feed(&e, ms(0), UPLINK, &f0).0, Verdict::Consumed);
    assert_eq!(
        feed(&e, ms(0), UPLINK, &f1).0,
        Verdict::Drop(DropReason::FragmentOverlap)
    );
    assert_eq!(e.counters().reassembly_pending, 0);
}

#[test]
fn ipv6_larger_than_the_egress_mtu_gets_packet_too_big() {
    let e = engine_mtu(EngineConfig::default(), 9000, 1500);
    // A connection the ClusterIP sends to a local pod (1500-byte link).
    let sport = (41003..41100)
        .find(|p| {
            let (v, _, _) = feed(&e, ms(0), UPLINK, &tcp6_data(*p, b"hi"));
            matches!(v, Verdict::Forward { port } if port != UPLINK)
        })
        .unwrap();
    let whole = tcp6_data(sport, &payload(4000));
    let (v, _, tx) = feed(&e, ms(0), UPLINK, &whole);
    assert_eq!(v, Verdict::Drop(DropReason::TooBig));
    assert_eq!(tx.len(), 1);
    let t = &tx[0].data;
    verify_checksums(t);
    assert_eq!((t[54], t[55]), (2, 0), "packet too big");
    assert_eq!(&t[58..62], &1500u32.to_be_bytes());
    assert_eq!(&t[38..54], &CLIENT6);
    assert!(t.len() - 14 <= 1280, "quoted within the minimum MTU");
    // A reassembled datagram whose fragments exceed the egress MTU: packet too big too.
    let frags = split6(&tcp6_data(sport, &payload(4000)), 2000, 13);
    let mut last = None;
    for f in &frags {
        last = Some(feed(&e, ms(1), UPLINK, f));
    }
    let (v, _, tx) = last.unwrap();
    assert_eq!(v, Verdict::Drop(DropReason::TooBig));
    assert_eq!(&tx[0].data[58..62], &1500u32.to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

use proptest::prelude::*;

/// Fragments of `frame` cut at the given 8-byte-aligned points.
fn cut4(frame: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let body = &frame[34..];
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| (c % body.len()) & !7)
        .filter(|c| *c > 0)
        .collect();
    points.push(0);
    points.push(body.len());
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| frag4(frame, w[0], &body[w[0]..w[1]], w[1] < body.len()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// However a datagram is cut, ordered and repeated, it arrives once, whole and
    /// translated, in fragments no larger than the largest it came in.
    #[test]
    fn any_cut_order_and_duplicates_reassemble_once(
        len in 100usize..6000,
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        order in proptest::collection::vec(any::<u16>(), 0..40),
        dups in proptest::collection::vec(any::<u16>(), 0..4),
    ) {
        let e = engine_mtu(EngineConfig::default(), 9000, 9000);
        let data = payload(len);
        let whole = udp4(CLIENT, DNS_CIP, 40100, 53, &data, false);
        let mut frags = cut4(&whole, &cuts);
        prop_assume!(frags.len() > 1);
        let largest = frags.iter().map(|f| ip_len(f)).max().unwrap();
        for (i, o) in order.iter().enumerate() {
            let n = frags.len();
            frags.swap(i % n, usize::from(*o) % n);
        }
        // Duplicates anywhere before the fragment that completes the datagram.
        let last = frags.pop().unwrap();
        for d in &dups {
            let n = frags.len();
            let f = frags[usize::from(*d) % n].clone();
            frags.insert(usize::from(*d / 3) % (n + 1), f);
        }
        frags.push(last);
        let mut out = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            let (v, _, tx) = feed(&e, ms(0), UPLINK, f);
            prop_assert_eq!(v, Verdict::Consumed);
            prop_assert!(tx.is_empty() || i + 1 == frags.len());
            out.extend(tx);
        }
        prop_assert_eq!(e.counters().reassembled, 1);
        prop_assert!(out.iter().all(|t| ip_len(&t.data) <= largest));
        let frames: Vec<Vec<u8>> = out.iter().map(|t| t.data.clone()).collect();
        let joined = join4(&frames);
        verify_checksums(&joined);
        prop_assert_eq!(udp_of(&joined).2, data);
        prop_assert_eq!(&joined[30..34], &POD1);
        let c = e.counters();
        prop_assert_eq!((c.reassembly_pending, c.reassembly_memory), (0, 0));
    }

    /// Arbitrary fragments (any offset, length, identification, flags) never hold more
    /// than the budget, and everything held is gone after the timeout.
    #[test]
    fn hostile_fragments_stay_bounded(
        frags in proptest::collection::vec(
            (any::<u16>(), 0u16..0x2000, any::<bool>(), 0usize..1480, any::<bool>()),
            1..200,
        ),
    ) {
        let budget = 32 * 1024;
        let cfg = EngineConfig {
            reassembly: Reassembly { memory: budget, max_fragments: 16, ..Reassembly::default() },
            ..EngineConfig::default()
        };
        let e = engine_mtu(cfg, 1500, 1500);
        let base = udp4(CLIENT, DNS_CIP, 40200, 53, &payload(1480), false);
        for (id, off8, more, len, df) in frags {
            let mut f = frag4(&base, usize::from(off8) * 8, &base[34..34 + len], more);
            f[18..20].copy_from_slice(&(id % 8).to_be_bytes());
            if df {
                f[20] |= 0x40;
            }
            f[24..26].copy_from_slice(&[0, 0]);
            let c = etherparse::Ipv4Header::from_slice(&f[14..]).unwrap().0.calc_header_checksum();
            f[24..26].copy_from_slice(&c.to_be_bytes());
            let _ = feed(&e, ms(0), UPLINK, &f);
            prop_assert!(e.counters().reassembly_memory as usize <= budget + 1480 + 512);
        }
        let mut tx = Vec::new();
        e.handle_timeout(Duration::from_secs(30), &mut tx);
        let c = e.counters();
        prop_assert_eq!((c.reassembly_pending, c.reassembly_memory), (0, 0));
    }
}
