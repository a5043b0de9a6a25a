//! Offset-based views of Ethernet/ARP/IPv4/IPv6/TCP/UDP/SCTP/ICMP headers and checksum
//! arithmetic (the Internet checksum, and SCTP's CRC32c).
//!
//! Hand-written rather than etherparse or smoltcp views: the hot path rewrites headers in
//! place at known offsets and updates checksums incrementally (RFC 1624), which the crates'
//! read-only slices do not offer. Every accessor is bounds-checked: after [`parse`] succeeds
//! the offsets it returns are inside the frame, and the helpers below never panic anyway.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::DropReason;

/// Ethernet header length.
pub(crate) const ETH_LEN: usize = 14;
/// EtherType IPv4.
pub(crate) const ETH_IPV4: u16 = 0x0800;
/// EtherType IPv6.
pub(crate) const ETH_IPV6: u16 = 0x86dd;
/// EtherType ARP.
pub(crate) const ETH_ARP: u16 = 0x0806;
/// EtherType of an IEEE 802.1Q VLAN tag.
pub(crate) const ETH_VLAN: u16 = 0x8100;
/// EtherType of an IEEE 802.1ad (QinQ) service tag.
pub(crate) const ETH_QINQ: u16 = 0x88a8;
/// IP protocol numbers.
pub(crate) const PROTO_ICMP: u8 = 1;
pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;
pub(crate) const PROTO_ICMPV6: u8 = 58;
pub(crate) const PROTO_SCTP: u8 = 132;

/// TCP flag bits.
pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;
/// TCP URG flag.
pub(crate) const TCP_URG: u8 = 0x20;

/// SCTP chunks that move an association's tracked state, as bits of [`sctp_chunks`].
pub(crate) const SCTP_INIT: u8 = 0x01;
pub(crate) const SCTP_INIT_ACK: u8 = 0x02;
pub(crate) const SCTP_ABORT: u8 = 0x04;
pub(crate) const SCTP_SHUTDOWN_COMPLETE: u8 = 0x08;
/// Any other chunk (DATA, SACK, HEARTBEAT, COOKIE ECHO...).
pub(crate) const SCTP_OTHER: u8 = 0x10;

/// Length of the SCTP common header (ports, verification tag, checksum).
pub(crate) const SCTP_HEADER_LEN: usize = 12;

/// The chunks of an SCTP packet (`seg` starts at the common header), as a set of the bits
/// above; `None` when a chunk length is impossible (below 4, or past the packet).
pub(crate) fn sctp_chunks(seg: &[u8]) -> Option<u8> {
    let mut bits = 0;
    let mut off = SCTP_HEADER_LEN;
    // RFC 9260 3.2: chunks are padded to 4 octets; a packet holds at least one.
    while off + 4 <= seg.len() {
        let len = usize::from(rd16(seg, off + 2));
        if len < 4 || off + len > seg.len() {
            return None;
        }
        bits |= match rd8(seg, off) {
            1 => SCTP_INIT,
            2 => SCTP_INIT_ACK,
            6 => SCTP_ABORT,
            14 => SCTP_SHUTDOWN_COMPLETE,
            _ => SCTP_OTHER,
        };
        off += len.div_ceil(4) * 4;
    }
    (bits != 0).then_some(bits)
}

/// CRC32c (Castagnoli, reflected polynomial 0x82f63b78), SCTP's checksum (RFC 9260
/// Appendix A), of the concatenated `parts`; one table lookup per byte.
pub(crate) fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for &b in parts.iter().flat_map(|p| p.iter()) {
        crc = CRC32C_TABLE[usize::from((crc as u8) ^ b)] ^ (crc >> 8);
    }
    !crc
}

const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// The CRC32c of an SCTP packet, computed with its checksum field as zero; the field
/// carries it least significant byte first (RFC 9260 Appendix A).
fn sctp_crc(seg: &[u8]) -> Option<u32> {
    let head = seg.get(..8)?;
    let rest = seg.get(SCTP_HEADER_LEN..)?;
    Some(crc32c(&[head, &[0; 4], rest]))
}

/// Reads a big-endian u16 (0 when out of range).
pub(crate) fn rd16(b: &[u8], off: usize) -> u16 {
    match b.get(off..off.wrapping_add(2)) {
        Some(&[x, y]) => u16::from_be_bytes([x, y]),
        _ => 0,
    }
}

/// Writes a big-endian u16 (ignored when out of range).
pub(crate) fn wr16(b: &mut [u8], off: usize, v: u16) {
    if let Some(s) = b.get_mut(off..off.wrapping_add(2)) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Reads one byte (0 when out of range).
/// Reads a big-endian u32 (0 past the end).
pub(crate) fn rd32(b: &[u8], off: usize) -> u32 {
    (u32::from(rd16(b, off)) << 16) | u32::from(rd16(b, off + 2))
}

/// nf_conntrack_proto_tcp's `tcp_valid_flags`: the combinations of FIN, SYN, RST, ACK and
/// URG a TCP segment may carry (PSH, ECE and CWR ignored); anything else (no flags,
/// SYN+FIN, FIN without ACK, the "Xmas" FIN+PSH+URG) is INVALID.
pub(crate) fn tcp_flags_valid(flags: u8) -> bool {
    const SYN: u8 = TCP_SYN;
    const ACK: u8 = TCP_ACK;
    matches!(
        flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK | TCP_URG),
        SYN | 0x22 /* SYN|URG */ | 0x12 /* SYN|ACK */ | TCP_RST | 0x14 /* RST|ACK */
            | 0x11 /* FIN|ACK */ | 0x31 /* FIN|ACK|URG */ | ACK | 0x30 /* ACK|URG */
    )
}

/// The window scale option (RFC 7323) of a TCP header `seg` whose options end at `doff`.
pub(crate) fn tcp_wscale(seg: &[u8], doff: usize) -> Option<u8> {
    let mut i = 20;
    while i < doff {
        match rd8(seg, i) {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(rd8(seg, i + 1));
                if len < 2 || i + len > doff {
                    return None;
                }
                if kind == 3 && len == 3 {
                    // RFC 7323 2.3: a shift above 14 is taken as 14.
                    return Some(rd8(seg, i + 2).min(14));
                }
                i += len;
            }
        }
    }
    None
}

pub(crate) fn rd8(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

/// Writes one byte (ignored when out of range).
pub(crate) fn wr8(b: &mut [u8], off: usize, v: u8) {
    if let Some(x) = b.get_mut(off) {
        *x = v;
    }
}

/// Copies `src` to `off` (ignored when out of range).
pub(crate) fn wr(b: &mut [u8], off: usize, src: &[u8]) {
    if let Some(s) = b.get_mut(off..off.wrapping_add(src.len())) {
        s.copy_from_slice(src);
    }
}

/// Reads an address of the given family at `off`.
pub(crate) fn rd_ip(b: &[u8], off: usize, v6: bool) -> IpAddr {
    if v6 {
        let mut a = [0u8; 16];
        if let Some(s) = b.get(off..off.wrapping_add(16)) {
            a.copy_from_slice(s);
        }
        IpAddr::V6(Ipv6Addr::from(a))
    } else {
        let mut a = [0u8; 4];
        if let Some(s) = b.get(off..off.wrapping_add(4)) {
            a.copy_from_slice(s);
        }
        IpAddr::V4(Ipv4Addr::from(a))
    }
}

/// Writes an address at `off`.
pub(crate) fn wr_ip(b: &mut [u8], off: usize, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => wr(b, off, &a.octets()),
        IpAddr::V6(a) => wr(b, off, &a.octets()),
    }
}

/// Ones' complement sum of `data` (odd length padded with zero) added to `acc`, unfolded.
pub(crate) fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_be_bytes(w);
        // Sum 32-bit halves into 64 bits: no overflow for any realistic length.
        acc += (v >> 32) + (v & 0xffff_ffff);
    }
    let mut rest = chunks.remainder().chunks(2);
    for p in &mut rest {
        let hi = u64::from(p.first().copied().unwrap_or(0));
        let lo = u64::from(p.get(1).copied().unwrap_or(0));
        acc += (hi << 8) | lo;
    }
    acc
}

/// Folds an unfolded sum to 16 bits (end-around carry).
pub(crate) fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The Internet checksum of `data` with an initial unfolded sum.
pub(crate) fn checksum(data: &[u8], acc: u64) -> u16 {
    !fold(sum(data, acc))
}

/// The difference `new - old` of some 16-bit-aligned header words, as an unfolded sum to add.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Delta(u64);

impl Delta {
    /// Records that the bytes `old` (even length) became `new`.
    #[cfg(test)]
    pub(crate) fn bytes(&mut self, old: &[u8], new: &[u8]) {
        // ~m + m' per word (RFC 1624 eqn. 3).
        for (o, n) in old.chunks(2).zip(new.chunks(2)) {
            let o = (u16::from(o.first().copied().unwrap_or(0)) << 8)
                | u16::from(o.get(1).copied().unwrap_or(0));
            let n = (u16::from(n.first().copied().unwrap_or(0)) << 8)
                | u16::from(n.get(1).copied().unwrap_or(0));
            self.0 += u64::from(!o) + u64::from(n);
        }
    }

    /// Records an address change (word by word, as [`Delta::word`]).
    pub(crate) fn ip(&mut self, old: IpAddr, new: IpAddr) {
        match (old, new) {
            (IpAddr::V4(o), IpAddr::V4(n)) => {
                let (o, n) = (o.to_bits(), n.to_bits());
                self.word((o >> 16) as u16, (n >> 16) as u16);
                self.word(o as u16, n as u16);
            }
            (IpAddr::V6(o), IpAddr::V6(n)) => {
                for (o, n) in o.segments().into_iter().zip(n.segments()) {
                    self.word(o, n);
                }
            }
            _ => {}
        }
    }

    /// Records a 16-bit word change.
    pub(crate) fn word(&mut self, old: u16, new: u16) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    /// Whether nothing was recorded.
    pub(crate) fn is_zero(&self) -> bool {
        self.0 == 0
    }

    /// Applies to a complete checksum field: `HC' = ~(~HC + ~m + m')`.
    pub(crate) fn apply_complete(&self, hc: u16) -> u16 {
        !fold(u64::from(!hc) + self.0)
    }

    /// Applies to a partial (pseudo-header sum, not complemented) field: `F' = F + ~m + m'`.
    pub(crate) fn apply_partial(&self, f: u16) -> u16 {
        fold(u64::from(f) + self.0)
    }
}

/// Fragment position of an IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frag {
    /// Not a fragment.
    No,
    /// The first fragment (offset 0, more fragments): L4 header present.
    First,
    /// A later fragment: no L4 header.
    Later,
}

/// A parsed IP packet inside a frame: offsets and the fields the engine needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ip {
    /// IPv6.
    pub(crate) v6: bool,
    /// Offset of the IP header.
    pub(crate) l3: usize,
    /// Source address.
    pub(crate) src: IpAddr,
    /// Destination address.
    pub(crate) dst: IpAddr,
    /// Upper-layer protocol (after IPv6 extension headers).
    pub(crate) proto: u8,
    /// Offset of the upper-layer header.
    pub(crate) l4: usize,
    /// End of the IP packet (exclusive) inside the frame.
    pub(crate) end: usize,
    /// TTL or hop limit.
    pub(crate) ttl: u8,
    /// Fragment position.
    pub(crate) frag: Frag,
}

impl Ip {
    /// Offset of the source address.
    pub(crate) fn src_off(&self) -> usize {
        self.l3 + if self.v6 { 8 } else { 12 }
    }
    /// Offset of the destination address.
    pub(crate) fn dst_off(&self) -> usize {
        self.l3 + if self.v6 { 24 } else { 16 }
    }
    /// Offset of the TTL / hop limit.
    pub(crate) fn ttl_off(&self) -> usize {
        self.l3 + if self.v6 { 7 } else { 8 }
    }
    /// Length of the upper-layer part.
    pub(crate) fn l4_len(&self) -> usize {
        self.end.saturating_sub(self.l4)
    }
}

/// Parses the IP header at `l3` (`v6` from the EtherType). Verifies the IPv4 header checksum
/// when `verify` is set.
pub(crate) fn parse_ip(b: &[u8], l3: usize, v6: bool, verify: bool) -> Result<Ip, DropReason> {
    if v6 {
        parse_ipv6(b, l3)
    } else {
        parse_ipv4(b, l3, verify)
    }
}

fn parse_ipv4(b: &[u8], l3: usize, verify: bool) -> Result<Ip, DropReason> {
    let avail = b.len().saturating_sub(l3);
    if avail < 20 {
        return Err(DropReason::Truncated);
    }
    let vihl = rd8(b, l3);
    if vihl >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(DropReason::Malformed);
    }
    if avail < ihl {
        return Err(DropReason::Truncated);
    }
    let mut total = usize::from(rd16(b, l3 + 2));
    if total == 0 && avail > 65535 {
        // BIG TCP super-frames carry 0: the frame length is the packet length.
        total = avail;
    }
    if total < ihl {
        return Err(DropReason::Malformed);
    }
    if total > avail {
        return Err(DropReason::Truncated);
    }
    if verify {
        let hdr = b.get(l3..l3 + ihl).ok_or(DropReason::Truncated)?;
        if fold(sum(hdr, 0)) != 0xffff {
            return Err(DropReason::BadIpChecksum);
        }
    }
    let fragw = rd16(b, l3 + 6);
    let offset = fragw & 0x1fff;
    let more = fragw & 0x2000 != 0;
    let frag = match (offset, more) {
        (0, false) => Frag::No,
        (0, true) => Frag::First,
        _ => Frag::Later,
    };
    Ok(Ip {
        v6: false,
        l3,
        src: rd_ip(b, l3 + 12, false),
        dst: rd_ip(b, l3 + 16, false),
        proto: rd8(b, l3 + 9),
        l4: l3 + ihl,
        end: l3 + total,
        ttl: rd8(b, l3 + 8),
        frag,
    })
}

fn parse_ipv6(b: &[u8], l3: usize) -> Result<Ip, DropReason> {
    let avail = b.len().saturating_sub(l3);
    if avail < 40 {
        return Err(DropReason::Truncated);
    }
    if rd8(b, l3) >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    let mut plen = usize::from(rd16(b, l3 + 4));
    if plen == 0 {
        // Jumbogram or BIG TCP super-frame: the frame length is the packet length.
        plen = avail - 40;
    }
    if 40 + plen > avail {
        return Err(DropReason::Truncated);
    }
    let end = l3 + 40 + plen;
    let mut next = rd8(b, l3 + 6);
    let mut off = l3 + 40;
    let mut frag = Frag::No;
    // Walk the extension headers the engine knows; at most a few, bounded by the length.
    for _ in 0..8 {
        match next {
            // Hop-by-hop, routing, destination options: (next, len in 8-octet units - 1).
            0 | 43 | 60 => {
                if off + 8 > end {
                    return Err(DropReason::Truncated);
                }
                let len = (usize::from(rd8(b, off + 1)) + 1) * 8;
                if off + len > end {
                    return Err(DropReason::Truncated);
                }
                next = rd8(b, off);
                off += len;
            }
            // Fragment header: 8 octets.
            44 => {
                if off + 8 > end {
                    return Err(DropReason::Truncated);
                }
                let w = rd16(b, off + 2);
                let offset = w >> 3;
                let more = w & 1 != 0;
                frag = match (offset, more) {
                    (0, false) => frag,
                    (0, true) => Frag::First,
                    _ => Frag::Later,
                };
                next = rd8(b, off);
                off += 8;
            }
            _ => break,
        }
    }
    Ok(Ip {
        v6: true,
        l3,
        src: rd_ip(b, l3 + 8, true),
        dst: rd_ip(b, l3 + 24, true),
        proto: next,
        l4: off,
        end,
        ttl: rd8(b, l3 + 7),
        frag,
    })
}

/// The pseudo-header sum (unfolded) for an upper-layer length.
pub(crate) fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    let mut acc = 0u64;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum(&s.octets(), acc);
            acc = sum(&d.octets(), acc);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum(&s.octets(), acc);
            acc = sum(&d.octets(), acc);
        }
        _ => {}
    }
    acc + u64::from(proto) + (len as u64 & 0xffff) + ((len as u64) >> 16)
}

/// Offset of the checksum field inside an upper-layer header, if the protocol has one the
/// engine maintains.
pub(crate) fn l4_csum_off(proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        PROTO_ICMP | PROTO_ICMPV6 => Some(2),
        _ => None,
    }
}

/// Verifies the complete L4 checksum of a packet (UDP over IPv4 with checksum 0 passes;
/// SCTP's is a CRC32c). Fuzz builds skip the check (mutated frames would never pass it).
#[cfg_attr(fuzzing, allow(dead_code))]
pub(crate) fn l4_checksum_ok(b: &[u8], ip: &Ip) -> bool {
    let Some(seg) = b.get(ip.l4..ip.end) else {
        return false;
    };
    if ip.proto == PROTO_SCTP {
        let field = seg
            .get(8..SCTP_HEADER_LEN)
            .and_then(|f| <[u8; 4]>::try_from(f).ok());
        return field.is_some_and(|f| sctp_crc(seg) == Some(u32::from_le_bytes(f)));
    }
    let acc = match ip.proto {
        PROTO_ICMP => 0,
        PROTO_UDP if !ip.v6 && rd16(seg, 6) == 0 => return true,
        p => pseudo_sum(ip.src, ip.dst, p, seg.len()),
    };
    fold(sum(seg, acc)) == 0xffff
}

/// Computes and stores an SCTP packet's CRC32c (not incrementally updatable: after any
/// change, the whole packet is summed again).
pub(crate) fn fill_sctp_checksum(b: &mut [u8], ip: &Ip) {
    let Some(seg) = b.get_mut(ip.l4..ip.end) else {
        return;
    };
    if let Some(crc) = sctp_crc(seg) {
        wr(seg, 8, &crc.to_le_bytes());
    }
}

/// Computes and stores the complete L4 checksum of a packet (for generated frames and for
/// completing a `Csum::Partial` frame the engine sends itself).
pub(crate) fn fill_l4_checksum(b: &mut [u8], ip: &Ip) {
    if ip.proto == PROTO_SCTP {
        return fill_sctp_checksum(b, ip);
    }
    let Some(off) = l4_csum_off(ip.proto) else {
        return;
    };
    let Some(seg) = b.get_mut(ip.l4..ip.end) else {
        return;
    };
    wr16(seg, off, 0);
    let acc = match ip.proto {
        PROTO_ICMP => 0,
        p => pseudo_sum(ip.src, ip.dst, p, seg.len()),
    };
    let mut c = checksum(seg, acc);
    if c == 0 && ip.proto == PROTO_UDP {
        c = 0xffff;
    }
    wr16(seg, off, c);
}

/// Completes a `CHECKSUM_PARTIAL` L4 checksum: the field holds the pseudo-header sum, so
/// the checksum is the complement of the sum over the segment including that field (SCTP's
/// CRC32c has no pseudo-header: it is computed whole).
pub(crate) fn complete_partial(b: &mut [u8], ip: &Ip) {
    if ip.proto == PROTO_SCTP {
        return fill_sctp_checksum(b, ip);
    }
    let Some(off) = l4_csum_off(ip.proto) else {
        return;
    };
    let Some(seg) = b.get_mut(ip.l4..ip.end) else {
        return;
    };
    let mut c = checksum(seg, 0);
    if c == 0 && ip.proto == PROTO_UDP {
        c = 0xffff;
    }
    wr16(seg, off, c);
}

/// Recomputes the IPv4 header checksum.
pub(crate) fn fill_ipv4_checksum(b: &mut [u8], l3: usize) {
    let ihl = usize::from(rd8(b, l3) & 0x0f) * 4;
    wr16(b, l3 + 10, 0);
    if let Some(h) = b.get(l3..l3 + ihl) {
        let c = checksum(h, 0);
        wr16(b, l3 + 10, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_matches_full_recompute() {
        // An IPv4 header from RFC 1071's style of example; change the destination.
        let mut h = [
            0x45u8, 0, 0, 0x54, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 96, 0, 10,
        ];
        fill_ipv4_checksum(&mut h, 0);
        let old = rd16(&h, 10);
        let mut d = Delta::default();
        d.bytes(&[10, 96, 0, 10], &[10, 244, 1, 5]);
        wr(&mut h, 16, &[10, 244, 1, 5]);
        let inc = d.apply_complete(old);
        fill_ipv4_checksum(&mut h, 0);
        assert_eq!(inc, rd16(&h, 10));
    }

    #[test]
    fn address_delta_matches_bytes() {
        let pairs: [(IpAddr, IpAddr); 3] = [
            ([10, 96, 0, 10].into(), [10, 244, 1, 5].into()),
            ([255, 255, 0, 1].into(), [0, 0, 255, 254].into()),
            (
                "fd00:96::10"
                    .parse()
                    .unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                "fe80::ffff:1:2"
                    .parse()
                    .unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            ),
        ];
        for (o, n) in pairs {
            let mut by_ip = Delta::default();
            by_ip.ip(o, n);
            let mut by_bytes = Delta::default();
            match (o, n) {
                (IpAddr::V4(o), IpAddr::V4(n)) => by_bytes.bytes(&o.octets(), &n.octets()),
                (IpAddr::V6(o), IpAddr::V6(n)) => by_bytes.bytes(&o.octets(), &n.octets()),
                _ => {}
            }
            assert_eq!(by_ip.0, by_bytes.0, "{o} -> {n}");
        }
    }

    /// RFC 3720 B.4's CRC32c vectors, and the catalogue's check value of "123456789".
    #[test]
    fn crc32c_reference_vectors() {
        assert_eq!(crc32c(&[&[0u8; 32]]), 0x8a91_36aa);
        assert_eq!(crc32c(&[&[0xffu8; 32]]), 0x62a8_ab43);
        let up: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&[&up]), 0x46dd_794e);
        let down: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(&[&down]), 0x113f_db5c);
        assert_eq!(crc32c(&[b"1234", b"56789"]), 0xe306_9283);
    }

    #[test]
    fn sctp_chunk_walk() {
        // Common header, then INIT (20 octets), then a padded 5-octet unknown chunk.
        let mut p = vec![0u8; 12];
        p.extend_from_slice(&[1, 0, 0, 20]);
        p.extend_from_slice(&[0; 16]);
        p.extend_from_slice(&[0x80, 0, 0, 5, 9, 0, 0, 0]);
        assert_eq!(sctp_chunks(&p), Some(SCTP_INIT | SCTP_OTHER));
        p.truncate(12 + 20 + 4);
        assert_eq!(sctp_chunks(&p), None, "chunk past the end");
        assert_eq!(sctp_chunks(&p[..12]), None, "no chunk");
        let mut zero = vec![0u8; 12];
        zero.extend_from_slice(&[6, 0, 0, 0]);
        assert_eq!(sctp_chunks(&zero), None, "length below 4");
    }

    #[test]
    fn partial_update_tracks_pseudo_sum() {
        let a = IpAddr::from([10, 0, 0, 1]);
        let b = IpAddr::from([10, 96, 0, 10]);
        let c = IpAddr::from([10, 244, 1, 5]);
        let before = fold(pseudo_sum(a, b, PROTO_TCP, 40));
        let mut d = Delta::default();
        d.ip(b, c);
        let after = d.apply_partial(before);
        assert_eq!(after, fold(pseudo_sum(a, c, PROTO_TCP, 40)));
    }
}
