//! Frame builders (etherparse) and independent checksum checks shared by the engine tests.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use etherparse::{Icmpv4Type, PacketBuilder, SlicedPacket, TransportSlice};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const CLIENT: [u8; 4] = [203, 0, 113, 9];
pub const NODE: [u8; 4] = [192, 168, 1, 10];
pub const POD1: [u8; 4] = [10, 244, 0, 5];
pub const POD2: [u8; 4] = [10, 244, 0, 6];
pub const LB_CIP: [u8; 4] = [10, 96, 0, 40];
pub const BCAST: [u8; 6] = [0xff; 6];

/// TCP flags for the frame builders.
#[derive(Clone, Copy, Debug)]
pub enum F {
    Syn,
    SynAck,
    Ack,
    Fin,
    Rst,
}

#[allow(clippy::too_many_arguments)]
pub fn tcp(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    sport: u16,
    dport: u16,
    f: F,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src, dst, ttl)
        .tcp(sport, dport, 1000, 64240);
    let b = match f {
        F::Syn => b.syn(),
        F::SynAck => b.syn().ack(1001),
        F::Ack => b.ack(1001),
        F::Fin => b.fin().ack(1001),
        F::Rst => b.rst(),
    };
    let payload: &[u8] = if matches!(f, F::Ack) { b"hello" } else { &[] };
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

#[allow(clippy::too_many_arguments)]
pub fn udp(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src, dst, ttl)
        .udp(sport, dport)
        .write(&mut out, b"query")
        .unwrap();
    out
}

pub fn icmp4(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    ty: Icmpv4Type,
    quote: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src, dst, ttl)
        .icmpv4(ty)
        .write(&mut out, quote)
        .unwrap();
    out
}

pub fn arp(
    op: u16,
    smac: [u8; 6],
    dmac: [u8; 6],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dmac);
    f.extend_from_slice(&smac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f
}

/// The IP packet inside an Ethernet frame (for ICMP quotes).
pub fn ip_of(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

/// Sets fragment fields of an IPv4 frame and fixes its header checksum.
pub fn fragment(mut frame: Vec<u8>, more: bool, offset8: u16) -> Vec<u8> {
    let mut h = etherparse::Ipv4Header::from_slice(&frame[14..]).unwrap().0;
    h.more_fragments = more;
    h.dont_fragment = false;
    h.fragment_offset = etherparse::IpFragOffset::try_new(offset8).unwrap();
    h.header_checksum = h.calc_header_checksum();
    let mut w = Vec::new();
    h.write(&mut w).unwrap();
    frame[14..14 + w.len()].copy_from_slice(&w);
    frame
}

/// Independent checksum verification of an output frame by re-parsing.
pub fn verify_checksums(frame: &[u8]) {
    if frame.len() >= 14 && frame[12..14] == [0x08, 0x06] {
        return;
    }
    let p = SlicedPacket::from_ethernet(frame).unwrap_or_else(|e| panic!("reparse: {e:?}"));
    if let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net {
        verify_checksums6(ip, &p.transport);
        return;
    }
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        return;
    };
    let h = ip.header().to_header();
    assert_eq!(
        h.header_checksum,
        h.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let (src, dst) = (ip.header().source(), ip.header().destination());
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t
                .to_header()
                .calc_checksum_ipv4_raw(src, dst, t.payload())
                .unwrap();
            assert_eq!(t.checksum(), want, "TCP checksum");
        }
        Some(TransportSlice::Udp(u)) => {
            let want = u
                .to_header()
                .calc_checksum_ipv4_raw(src, dst, u.payload())
                .unwrap();
            assert_eq!(u.checksum(), want, "UDP checksum");
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let want = i.header().icmp_type.calc_checksum(i.payload());
            assert_eq!(i.checksum(), want, "ICMP checksum");
        }
        _ => {}
    }
}

fn verify_checksums6(ip: &etherparse::Ipv6Slice<'_>, transport: &Option<TransportSlice<'_>>) {
    let (src, dst) = (ip.header().source(), ip.header().destination());
    match transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t
                .to_header()
                .calc_checksum_ipv6_raw(src, dst, t.payload())
                .unwrap();
            assert_eq!(t.checksum(), want, "TCP/IPv6 checksum");
        }
        Some(TransportSlice::Udp(u)) => {
            let want = u
                .to_header()
                .calc_checksum_ipv6_raw(src, dst, u.payload())
                .unwrap();
            assert_eq!(u.checksum(), want, "UDP/IPv6 checksum");
        }
        Some(TransportSlice::Icmpv6(i)) => {
            assert!(i.is_checksum_valid(src, dst), "ICMPv6 checksum");
        }
        _ => {}
    }
}

/// An IPv6 TCP frame (payload "hello" with an ACK, as `tcp`).
#[allow(clippy::too_many_arguments)]
pub fn tcp6(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    hop: u8,
    sport: u16,
    dport: u16,
    f: F,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(smac, dmac)
        .ipv6(src.octets(), dst.octets(), hop)
        .tcp(sport, dport, 1000, 64240);
    let b = match f {
        F::Syn => b.syn(),
        F::SynAck => b.syn().ack(1001),
        F::Ack => b.ack(1001),
        F::Fin => b.fin().ack(1001),
        F::Rst => b.rst(),
    };
    let payload: &[u8] = if matches!(f, F::Ack) { b"hello" } else { &[] };
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// An ICMPv6 frame of type `ty` whose body (after the 8-byte header) is `body`.
pub fn icmp6(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    hop: u8,
    ty: etherparse::Icmpv6Type,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv6(src.octets(), dst.octets(), hop)
        .icmpv6(ty)
        .write(&mut out, body)
        .unwrap();
    out
}

/// A Neighbor Solicitation for `target`, with a source link-layer address option when
/// `slla` is given.
pub fn ns(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    hop: u8,
    target: std::net::Ipv6Addr,
    slla: Option<[u8; 6]>,
) -> Vec<u8> {
    let mut body = target.octets().to_vec();
    if let Some(mac) = slla {
        body.extend_from_slice(&[1, 1]);
        body.extend_from_slice(&mac);
    }
    icmp6(
        smac,
        dmac,
        src,
        dst,
        hop,
        etherparse::Icmpv6Type::NeighborSolicitation,
        &body,
    )
}

/// A Neighbor Advertisement for `target` with flags (router, solicited, override), with a
/// target link-layer address option when `tlla` is given.
#[allow(clippy::too_many_arguments)]
pub fn na(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    hop: u8,
    (router, solicited, r#override): (bool, bool, bool),
    target: std::net::Ipv6Addr,
    tlla: Option<[u8; 6]>,
) -> Vec<u8> {
    let mut body = target.octets().to_vec();
    if let Some(mac) = tlla {
        body.extend_from_slice(&[2, 1]);
        body.extend_from_slice(&mac);
    }
    icmp6(
        smac,
        dmac,
        src,
        dst,
        hop,
        etherparse::Icmpv6Type::NeighborAdvertisement(
            etherparse::icmpv6::NeighborAdvertisementHeader {
                router,
                solicited,
                r#override,
            },
        ),
        &body,
    )
}

/// The solicited-node multicast address of `a` and its Ethernet address, computed here
/// independently of the engine.
pub fn solicited(a: std::net::Ipv6Addr) -> (std::net::Ipv6Addr, [u8; 6]) {
    let o = a.octets();
    let ip = std::net::Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    );
    (ip, [0x33, 0x33, 0xff, o[13], o[14], o[15]])
}
