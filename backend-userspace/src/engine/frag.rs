//! IP fragments: reassembly in front of connection tracking (the kernel's `nf_defrag_ipv4`
//! and `nf_defrag_ipv6`, which defragment every packet conntrack sees) and fragmentation on
//! egress (`ip_do_fragment`, `ip6_fragment`).
//!
//! Reassembly follows `ip_frag_queue`/`nf_ct_frag6_queue` and `inet_frag_queue_insert`:
//! fragments are keyed by (source, destination, identification, protocol); a fragment that
//! partly overlaps one already held drops the whole datagram (RFC 5722 for IPv6, and Linux
//! does the same for IPv4), one wholly inside held data is a duplicate and is dropped alone;
//! an empty fragment, a last fragment that disagrees with the known length, or data past a
//! received last fragment drops the datagram; an IPv4 fragment not a multiple of 8 is
//! trimmed, an IPv6 one drops the datagram; an IPv6 first fragment must hold the upper-layer
//! header (RFC 7112, `ipv6_frag_thdr_truncated`). Held fragments are bounded by a memory
//! budget (`ipfrag_high_thresh`: above it every fragment is dropped until timeouts free
//! memory), a timeout from the first fragment (`ipfrag_time`), 65,535 bytes per datagram and
//! a cap on fragments per datagram. The reassembled datagram keeps the largest fragment's
//! size (`frag_max_size`) so that forwarding can split it again no larger than it arrived.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use parking_lot::Mutex;

use super::DropReason;
use super::wire::*;

/// Reassembly bounds; the defaults are the kernel's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reassembly {
    /// Bytes held for incomplete datagrams (`net.ipv4.ipfrag_high_thresh`, 4 MiB); above
    /// it every fragment is dropped. Zero disables reassembly (every fragment is dropped).
    pub memory: usize,
    /// How long an incomplete datagram is kept after its first fragment arrived
    /// (`net.ipv4.ipfrag_time`, 30 s).
    pub timeout: Duration,
    /// Fragments per datagram; one more drops the datagram (the kernel bounds only the
    /// memory; 64 KiB in 1,280-byte IPv6 fragments is 52).
    pub max_fragments: usize,
}

impl Default for Reassembly {
    fn default() -> Self {
        Reassembly {
            memory: 4 << 20,
            timeout: Duration::from_secs(30),
            max_fragments: 128,
        }
    }
}

/// Accounted cost of a held fragment beyond its bytes (the kernel counts an skb's
/// `truesize`, a few hundred bytes more than the data).
const FRAGMENT_OVERHEAD: usize = 256;

/// Largest IP datagram (IPv4 total length, IPv6 payload length).
const MAX_DATAGRAM: usize = 65_535;

/// The IPv6 minimum link MTU (RFC 8200 5).
pub(crate) const IPV6_MIN_MTU: usize = 1280;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: IpAddr,
    dst: IpAddr,
    id: u32,
    /// The IPv4 protocol (IPv6 keys have none: 0).
    proto: u8,
}

#[derive(Debug)]
struct Piece {
    start: usize,
    data: Vec<u8>,
}

impl Piece {
    fn end(&self) -> usize {
        self.start + self.data.len()
    }
}

#[derive(Debug)]
struct Queue {
    /// Generation, to match the expiry list's entry.
    generation: u64,
    /// When it is dropped if still incomplete.
    deadline: Duration,
    /// Held pieces, sorted by offset, never overlapping.
    pieces: Vec<Piece>,
    /// Length of the fragmentable part as far as known (the last fragment's end once seen).
    len: usize,
    last_seen: bool,
    /// The first fragment's frame up to its data (Ethernet, IP header; IPv6: up to the
    /// Fragment header), and the offset of the next-header byte that names the Fragment
    /// header, with the header that follows it.
    head: Option<(Vec<u8>, usize, u8)>,
    /// Largest fragment (IP packet length), and largest with DF set (IPv4).
    max_size: usize,
    max_df_size: usize,
    /// Accounted bytes.
    mem: usize,
}

/// A reassembled datagram.
#[derive(Debug)]
pub(crate) struct Reassembled {
    /// The whole frame (Ethernet header of the first fragment).
    pub(crate) frame: Vec<u8>,
    /// The largest fragment's IP packet length (`frag_max_size`).
    pub(crate) max_size: usize,
    /// The identification, for splitting it again.
    pub(crate) id: u32,
}

/// The outcome of offering a fragment.
#[derive(Debug)]
pub(crate) enum Offer {
    /// Held (or a duplicate): the datagram is not complete yet.
    Held,
    /// The last missing fragment: here is the datagram.
    Complete(Reassembled),
    /// Refused, with the held fragments that were dropped with it.
    Refused(DropReason, u64),
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<Key, Queue>,
    /// (deadline, key, generation) in creation order: deadlines only grow.
    order: VecDeque<(Duration, Key, u64)>,
    mem: usize,
    generation: u64,
}

impl State {
    /// Whether an expiry entry still names a held datagram.
    fn live(&self, key: &Key, generation: u64) -> bool {
        self.queues
            .get(key)
            .is_some_and(|q| q.generation == generation)
    }

    /// Forgets expiry entries of datagrams completed or dropped: those at the front, and
    /// all of them when they outnumber the held datagrams (so the list stays bounded by
    /// the table, whatever the traffic).
    fn prune(&mut self) {
        while let Some((_, k, g)) = self.order.front() {
            if self.live(k, *g) {
                break;
            }
            self.order.pop_front();
        }
        if self.order.len() > 2 * self.queues.len() + 64 {
            let queues = &self.queues;
            self.order
                .retain(|(_, k, g)| queues.get(k).is_some_and(|q| q.generation == *g));
        }
    }

    fn kill(&mut self, key: &Key) -> u64 {
        match self.queues.remove(key) {
            Some(q) => {
                self.mem = self.mem.saturating_sub(q.mem);
                q.pieces.len() as u64
            }
            None => 0,
        }
    }
}

/// Where a fragment's parts are in its frame.
struct Parsed {
    key: Key,
    /// Offset of the fragment's data in the datagram's fragmentable part.
    offset: usize,
    more: bool,
    df: bool,
    /// The fragment's data in the frame.
    data: std::ops::Range<usize>,
    /// End of the head (where the data or the Fragment header starts).
    head_end: usize,
    /// IPv6: the offset of the byte naming the Fragment header, and what follows it.
    next: (usize, u8),
    /// The fragment's IP packet length.
    size: usize,
}

fn parse(frame: &[u8], ip: &Ip) -> Result<Parsed, DropReason> {
    let size = ip.end - ip.l3;
    if !ip.v6 {
        let w = rd16(frame, ip.l3 + 6);
        return Ok(Parsed {
            key: Key {
                src: ip.src,
                dst: ip.dst,
                id: u32::from(rd16(frame, ip.l3 + 4)),
                proto: ip.proto,
            },
            offset: usize::from(w & 0x1fff) * 8,
            more: w & 0x2000 != 0,
            df: w & 0x4000 != 0,
            data: ip.l4..ip.end,
            head_end: ip.l4,
            next: (0, 0),
            size,
        });
    }
    // The unfragmentable part: the extension headers before the Fragment header.
    let mut nh_off = ip.l3 + 6;
    let mut off = ip.l3 + 40;
    for _ in 0..8 {
        match rd8(frame, nh_off) {
            0 | 43 | 60 => {
                if off + 8 > ip.end {
                    return Err(DropReason::Truncated);
                }
                nh_off = off;
                off += (usize::from(rd8(frame, off + 1)) + 1) * 8;
            }
            44 => {
                if off + 8 > ip.end {
                    return Err(DropReason::Truncated);
                }
                let w = rd16(frame, off + 2);
                return Ok(Parsed {
                    key: Key {
                        src: ip.src,
                        dst: ip.dst,
                        id: rd32(frame, off + 4),
                        proto: 0,
                    },
                    offset: usize::from(w & 0xfff8),
                    more: w & 1 != 0,
                    df: false,
                    data: off + 8..ip.end,
                    head_end: off,
                    next: (nh_off, rd8(frame, off)),
                    size,
                });
            }
            _ => break,
        }
    }
    Err(DropReason::Malformed)
}

/// RFC 7112: an IPv6 first fragment holds the whole header chain and the upper-layer
/// header (`ipv6_frag_thdr_truncated`: TCP 20, UDP 8, ICMPv6 8 bytes).
fn v6_first_complete(data: &[u8], mut next: u8) -> bool {
    let mut off = 0;
    for _ in 0..8 {
        match next {
            0 | 43 | 60 => {
                if off + 8 > data.len() {
                    return false;
                }
                next = rd8(data, off);
                off += (usize::from(rd8(data, off + 1)) + 1) * 8;
            }
            _ => break,
        }
    }
    let need = match next {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMPV6 => 8,
        _ => 0,
    };
    off + need <= data.len()
}

/// The reassembly table; one lock (fragments are rare, and a datagram's fragments hash to
/// one fanout worker anyway).
#[derive(Debug)]
pub(crate) struct Defrag {
    limits: Reassembly,
    state: Mutex<State>,
}

impl Defrag {
    pub(crate) fn new(limits: Reassembly) -> Defrag {
        Defrag {
            limits,
            state: Mutex::new(State::default()),
        }
    }

    /// Bytes accounted to held fragments.
    pub(crate) fn memory(&self) -> usize {
        self.state.lock().mem
    }

    /// Incomplete datagrams held.
    pub(crate) fn len(&self) -> usize {
        self.state.lock().queues.len()
    }

    /// The earliest reassembly deadline.
    pub(crate) fn next_deadline(&self) -> Option<Duration> {
        let mut s = self.state.lock();
        s.prune();
        s.order.front().map(|(d, _, _)| *d)
    }

    /// Drops the datagrams whose time is up; returns how many fragments they held.
    pub(crate) fn expire(&self, now: Duration) -> u64 {
        let mut s = self.state.lock();
        let mut dropped = 0;
        while let Some(&(deadline, key, generation)) = s.order.front() {
            if deadline > now {
                break;
            }
            s.order.pop_front();
            if s.live(&key, generation) {
                dropped += s.kill(&key);
            }
        }
        dropped
    }

    /// Offers the fragment `ip` in `frame`.
    pub(crate) fn offer(&self, now: Duration, frame: &[u8], ip: &Ip) -> Offer {
        let p = match parse(frame, ip) {
            Ok(p) => p,
            Err(r) => return Offer::Refused(r, 0),
        };
        let mut s = self.state.lock();
        self.offer_parsed(&mut s, now, frame, p)
    }

    fn offer_parsed(&self, s: &mut State, now: Duration, frame: &[u8], p: Parsed) -> Offer {
        // inet_frag_find: above the high threshold nothing is queued, not even for a
        // datagram already under way.
        if s.mem > self.limits.memory || self.limits.memory == 0 {
            return Offer::Refused(DropReason::FragmentMemory, 0);
        }
        let v6 = p.key.proto == 0 && matches!(p.key.src, IpAddr::V6(_));
        let mut data = frame.get(p.data.clone()).unwrap_or(&[]);
        let start = p.offset;
        let mut end = start + data.len();
        let invalid = |s: &mut State| Offer::Refused(DropReason::Fragment, s.kill(&p.key));
        if !p.more {
            // Not the last fragment's business to be odd-sized.
        } else if end & 7 != 0 {
            if v6 {
                // nf_ct_frag6_queue: "end of fragment not rounded to 8 bytes".
                return invalid(s);
            }
            // ip_frag_queue trims an odd-sized IPv4 fragment.
            end &= !7;
            data = data.get(..end - start).unwrap_or(&[]);
        }
        let head_len = p.head_end.saturating_sub(ETH_LEN);
        let header = if v6 { head_len - 40 } else { head_len };
        if header + end > MAX_DATAGRAM {
            return invalid(s);
        }
        if v6 && start == 0 && !v6_first_complete(data, p.next.1) {
            return invalid(s);
        }
        // Expire a queue whose time is up before reusing its key.
        if s.queues.get(&p.key).is_some_and(|q| q.deadline <= now) {
            s.kill(&p.key);
        }
        if !s.queues.contains_key(&p.key) {
            s.generation += 1;
            let generation = s.generation;
            s.prune();
            let deadline = now.saturating_add(self.limits.timeout);
            s.order.push_back((deadline, p.key, generation));
            s.queues.insert(
                p.key,
                Queue {
                    generation,
                    deadline,
                    pieces: Vec::new(),
                    len: 0,
                    last_seen: false,
                    head: None,
                    max_size: 0,
                    max_df_size: 0,
                    mem: 0,
                },
            );
        }
        let Some(q) = s.queues.get_mut(&p.key) else {
            return Offer::Refused(DropReason::Fragment, 0);
        };
        if !p.more {
            // The last fragment: its end is the length, once.
            if end < q.len || (q.last_seen && end != q.len) {
                return invalid(s);
            }
            q.last_seen = true;
            q.len = end;
        } else if end > q.len {
            if q.last_seen {
                return invalid(s);
            }
            q.len = end;
        }
        if end == start {
            return invalid(s);
        }
        // inet_frag_queue_insert: wholly inside held data is a duplicate (dropped alone),
        // any other overlap drops the datagram.
        let at = q.pieces.partition_point(|x| x.start < start);
        let prev = at.checked_sub(1).and_then(|i| q.pieces.get(i));
        let next = q.pieces.get(at);
        if let Some(prev) = prev
            && prev.start <= start
            && end <= prev.end()
        {
            return Offer::Held;
        }
        if let Some(next) = next
            && next.start == start
            && end <= next.end()
        {
            return Offer::Held;
        }
        if prev.is_some_and(|x| x.end() > start) || next.is_some_and(|x| x.start < end) {
            let n = s.kill(&p.key);
            return Offer::Refused(DropReason::FragmentOverlap, n);
        }
        if q.pieces.len() >= self.limits.max_fragments {
            return invalid(s);
        }
        let cost = data.len() + FRAGMENT_OVERHEAD + if start == 0 { p.head_end } else { 0 };
        q.pieces.insert(
            at,
            Piece {
                start,
                data: data.to_vec(),
            },
        );
        if start == 0 {
            let head = frame.get(..p.head_end).unwrap_or(&[]).to_vec();
            q.head = Some((head, p.next.0, p.next.1));
        }
        q.max_size = q.max_size.max(p.size);
        if p.df {
            q.max_df_size = q.max_df_size.max(p.size);
        }
        q.mem += cost;
        s.mem += cost;
        let Some(q) = s.queues.get(&p.key) else {
            return Offer::Held;
        };
        let held: usize = q.pieces.iter().map(|x| x.data.len()).sum();
        if !q.last_seen || q.head.is_none() || held != q.len {
            return Offer::Held;
        }
        let Some(q) = s.queues.remove(&p.key) else {
            return Offer::Held;
        };
        s.mem = s.mem.saturating_sub(q.mem);
        match join(q, v6, p.key.id) {
            Some(r) => Offer::Complete(r),
            None => Offer::Refused(DropReason::Fragment, 0),
        }
    }
}

/// Builds the datagram of a complete queue (`ip_frag_reasm`, `nf_ct_frag6_reasm`).
fn join(q: Queue, v6: bool, id: u32) -> Option<Reassembled> {
    let (head, nh_off, next) = q.head?;
    let mut frame = head;
    frame.reserve(q.len);
    for piece in &q.pieces {
        frame.extend_from_slice(&piece.data);
    }
    let l3 = ETH_LEN;
    if v6 {
        // The Fragment header is gone: the header before it names what followed it.
        wr8(&mut frame, nh_off, next);
        let plen = frame.len().checked_sub(l3 + 40)?;
        wr16(&mut frame, l3 + 4, u16::try_from(plen).ok()?);
    } else {
        let total = u16::try_from(frame.len() - l3).ok()?;
        wr16(&mut frame, l3 + 2, total);
        // ip_frag_reasm: DF stays when the largest fragment carried it.
        let df = q.max_df_size == q.max_size && q.max_df_size > 0;
        wr16(&mut frame, l3 + 6, if df { 0x4000 } else { 0 });
        fill_ipv4_checksum(&mut frame, l3);
    }
    Some(Reassembled {
        frame,
        max_size: q.max_size,
        id,
    })
}

/// Splits the datagram `ip` in `frame` (checksums complete) into fragments whose IP
/// packets are at most `size` bytes (`ip_do_fragment`, `ip6_fragment`: data in multiples
/// of 8 but the last). IPv6 fragments carry `id`; IPv4 ones keep the header's. `None` when
/// `size` leaves no room for data.
pub(crate) fn split(frame: &[u8], ip: &Ip, size: usize, id: u32) -> Option<Vec<Vec<u8>>> {
    let (unfrag_end, nh_off) = if ip.v6 {
        // Hop-by-hop and Routing headers are unfragmentable (RFC 8200 4.5).
        let mut nh_off = ip.l3 + 6;
        let mut off = ip.l3 + 40;
        while matches!(rd8(frame, nh_off), 0 | 43) && off + 8 <= ip.end {
            nh_off = off;
            off += (usize::from(rd8(frame, off + 1)) + 1) * 8;
        }
        (off, nh_off)
    } else {
        (ip.l4, 0)
    };
    let hlen = unfrag_end.checked_sub(ip.l3)? + if ip.v6 { 8 } else { 0 };
    let per = size.checked_sub(hlen)? & !7;
    let payload = frame.get(unfrag_end..ip.end)?;
    if per == 0 || payload.is_empty() {
        return None;
    }
    let head = frame.get(..unfrag_end)?;
    let next = rd8(frame, nh_off);
    let base = rd16(frame, ip.l3 + 6);
    let mut out = Vec::with_capacity(payload.len().div_ceil(per));
    let mut off = 0;
    while off < payload.len() {
        let chunk = payload.get(off..(off + per).min(payload.len()))?;
        let more = off + chunk.len() < payload.len();
        let mut f = Vec::with_capacity(head.len() + 8 + chunk.len());
        f.extend_from_slice(head);
        if ip.v6 {
            wr8(&mut f, nh_off, 44);
            let w = u16::try_from(off).ok()? | u16::from(more);
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&w.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(chunk);
            let plen = u16::try_from(f.len() - ip.l3 - 40).ok()?;
            wr16(&mut f, ip.l3 + 4, plen);
        } else {
            f.extend_from_slice(chunk);
            let total = u16::try_from(f.len() - ip.l3).ok()?;
            wr16(&mut f, ip.l3 + 2, total);
            let w =
                (base & 0x4000) | if more { 0x2000 } else { 0 } | u16::try_from(off / 8).ok()?;
            wr16(&mut f, ip.l3 + 6, w);
            fill_ipv4_checksum(&mut f, ip.l3);
        }
        out.push(f);
        off += chunk.len();
    }
    Some(out)
}
