//! The connection table: both directions of each translated connection, TCP state,
//! timeouts, and a hard size bound with eviction of unassured entries.
//!
//! Layout, chosen for memory (1M IPv4 connections well under 128 MiB): shards, each one
//! `Mutex` holding a slab of entries per address family and an open-addressing index (linear
//! probing, backward-shift deletion, load at most 1/2) of 8-byte slots `hash32 | entry<<1 |
//! direction`. An entry stores the original and the reply tuple (40 bytes for IPv4).
//!
//! A connection lives in one shard, chosen from the client end `(src, sport)` of the
//! original direction; the reply direction's key must hash to the same shard through its
//! destination `(dst, dport)`, which is the client again, or the masquerade address and a
//! source port the allocator picks to land in the shard. A packet is looked up in the shard
//! of its source and, failing that, of its destination.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard, RwLock};
use std::sync::Arc;

use super::wire::{
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, SCTP_ABORT, SCTP_INIT, SCTP_SHUTDOWN_COMPLETE, TCP_ACK,
    TCP_FIN, TCP_RST, TCP_SYN,
};

/// What a packet tells the table: its TCP flags (SCTP: its chunk set; 0 for other
/// protocols) and, for TCP, the sequence space it covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Seg {
    /// TCP flags, or SCTP chunks.
    pub(crate) flags: u8,
    /// Sequence number.
    pub(crate) seq: u32,
    /// Acknowledgement number.
    pub(crate) ack: u32,
    /// Window field (unscaled).
    pub(crate) win: u16,
    /// Payload length.
    pub(crate) len: u32,
    /// Window scale option (SYN only).
    pub(crate) wscale: Option<u8>,
}

impl Seg {
    /// A packet with flags (or chunks) only.
    pub(crate) fn flags(flags: u8) -> Seg {
        Seg {
            flags,
            ..Seg::default()
        }
    }

    /// The sequence number after this segment (SYN and FIN count one).
    fn end(&self) -> u32 {
        self.seq
            .wrapping_add(self.len)
            .wrapping_add(u32::from(self.flags & TCP_SYN != 0))
            .wrapping_add(u32::from(self.flags & TCP_FIN != 0))
    }
}

/// Per-direction sequence tracking of a TCP connection (nf_conntrack's `tcp_in_window`,
/// simplified): the end of what each side sent, the largest window it advertised, its
/// window scale, and the last acknowledgement it sent.
#[derive(Clone, Copy, Debug, Default)]
struct Track {
    end: [u32; 2],
    maxwin: [u32; 2],
    /// Window scale per direction; [`NO_WSCALE`] when the SYN had none.
    wscale: [u8; 2],
    /// The acknowledgement number of the last segment with ACK per direction (what that
    /// side expects next: its RCV.NXT); valid where `acked` has the direction's bit.
    ack: [u32; 2],
    acked: u8,
}

const NO_WSCALE: u8 = 0xff;
use super::{DropReason, Timeouts};

/// One direction of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Tuple {
    /// Source address.
    pub(crate) src: IpAddr,
    /// Destination address.
    pub(crate) dst: IpAddr,
    /// Source port (ICMP: identifier).
    pub(crate) sport: u16,
    /// Destination port (ICMP: identifier).
    pub(crate) dport: u16,
}

impl Tuple {
    /// The tuple of a packet going the other way.
    pub(crate) fn reversed(&self) -> Tuple {
        Tuple {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

/// TCP states, as nf_conntrack names them. SCTP associations use three of them, kept
/// simple: `SynSent` (INIT seen), `Established` (a reply seen) and `Close` (ABORT or
/// SHUTDOWN COMPLETE seen).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TcpState {
    /// Not TCP (UDP, ICMP).
    None = 0,
    /// SYN seen from the client.
    SynSent = 1,
    /// SYN+ACK seen from the server.
    SynRecv = 2,
    /// Handshake completed (or picked up mid-stream).
    Established = 3,
    /// FIN seen from one side.
    FinWait = 4,
    /// FIN acknowledged by the other side.
    CloseWait = 5,
    /// FIN seen from both sides.
    LastAck = 6,
    /// Last FIN acknowledged.
    TimeWait = 7,
    /// RST seen.
    Close = 8,
}

impl TcpState {
    fn from_u8(v: u8) -> TcpState {
        match v {
            1 => TcpState::SynSent,
            2 => TcpState::SynRecv,
            3 => TcpState::Established,
            4 => TcpState::FinWait,
            5 => TcpState::CloseWait,
            6 => TcpState::LastAck,
            7 => TcpState::TimeWait,
            8 => TcpState::Close,
            _ => TcpState::None,
        }
    }
}

const F_LIVE: u8 = 1;
const F_REPLIED: u8 = 2;
const F_ASSURED: u8 = 4;
const F_FIN0: u8 = 8;
const F_FIN1: u8 = 16;
/// Direction 0 (1) has sent a segment whose sequence numbers are tracked.
const F_SEEN0: u8 = 32;
const F_SEEN1: u8 = 64;
/// Picked up mid-stream: windows unknown, so no window checks (the kernel marks such
/// connections "be liberal" too).
const F_LIBERAL: u8 = 128;

/// An address stored compactly per family.
trait Addr: Copy + Eq + std::hash::Hash + std::fmt::Debug {
    fn from_ip(ip: IpAddr) -> Option<Self>;
    fn to_ip(self) -> IpAddr;
    fn hash_word(self) -> u64;
    /// The shard's table of this family.
    fn table(s: &mut Shard) -> &mut Table<Self>;
}

impl Addr for Ipv4Addr {
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V4(self)
    }
    fn hash_word(self) -> u64 {
        u64::from(u32::from(self))
    }
    fn table(s: &mut Shard) -> &mut Table<Self> {
        &mut s.v4
    }
}

impl Addr for Ipv6Addr {
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V6(self)
    }
    fn hash_word(self) -> u64 {
        let v = u128::from(self);
        fmix64((v >> 64) as u64) ^ (v as u64)
    }
    fn table(s: &mut Shard) -> &mut Table<Self> {
        &mut s.v6
    }
}

/// murmur3's 64-bit finalizer.
pub(crate) fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The shard of one end (address, port) under a secret key.
fn keyed_shard(key: u64, shards: usize, ip: IpAddr, port: u16) -> usize {
    (fmix64(end_hash(ip, port) ^ key) >> 40) as usize & (shards - 1)
}

/// Hash of one end (address, port).
pub(crate) fn end_hash(ip: IpAddr, port: u16) -> u64 {
    let w = match ip {
        IpAddr::V4(a) => a.hash_word(),
        IpAddr::V6(a) => a.hash_word(),
    };
    fmix64(w ^ (u64::from(port) << 48) ^ 0x5bd1_e995)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Tup<A> {
    src: A,
    dst: A,
    sport: u16,
    dport: u16,
}

impl<A: Addr> Tup<A> {
    fn from_tuple(t: &Tuple) -> Option<Self> {
        Some(Tup {
            src: A::from_ip(t.src)?,
            dst: A::from_ip(t.dst)?,
            sport: t.sport,
            dport: t.dport,
        })
    }
    fn to_tuple(self) -> Tuple {
        Tuple {
            src: self.src.to_ip(),
            dst: self.dst.to_ip(),
            sport: self.sport,
            dport: self.dport,
        }
    }
    /// Hash under the table's secret `seed`: a sender who cannot learn it cannot pick
    /// tuples that collide in a shard's index (linear probing degrades to a scan).
    fn hash(&self, proto: u8, seed: u64) -> u64 {
        let a = fmix64(self.src.hash_word() ^ seed ^ 0x9e37_79b9_7f4a_7c15);
        let b = fmix64(a ^ self.dst.hash_word());
        fmix64(b ^ (u64::from(self.sport) << 32) ^ (u64::from(self.dport) << 16) ^ u64::from(proto))
    }
}

/// One connection.
#[derive(Clone, Copy, Debug)]
struct Entry<A> {
    /// Original and reply tuples.
    t: [Tup<A>; 2],
    /// Expiry, in milliseconds on the caller's clock.
    expires: u64,
    /// Reuse generation, to recognise stale eviction-queue items.
    generation: u32,
    proto: u8,
    state: u8,
    flags: u8,
    /// The original came in on the host port (the node's own connection).
    host: bool,
    /// The reply key lives in another shard's table (its port came from that shard's
    /// share of the range): removing the entry unlinks it there.
    foreign: bool,
    /// TCP sequence tracking.
    track: Track,
}

/// A reply key kept in the table of the shard it hashes to while its connection lives in
/// another (`home`): the masquerade port came from this shard's share of the range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Foreign {
    home: u32,
    idx: u32,
    generation: u32,
}

/// A removed connection's foreign reply key, to be unlinked from its shard once the home
/// shard's lock is released (locks are never taken against the shard order).
#[derive(Clone, Copy, Debug)]
struct Unlink {
    proto: u8,
    reply: Tuple,
    idx: u32,
    generation: u32,
    /// The endpoint may still hold the tuple half open: (RST sequence number, now, until)
    /// for that shard's stale list.
    stale: Option<(u32, u64, u64)>,
}

/// What a lookup found.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hit {
    /// Direction of the packet: 0 original (client to frontend), 1 reply.
    pub(crate) dir: u8,
    /// Original and reply tuples.
    pub(crate) t: [Tuple; 2],
    /// The packet is conntrack's INVALID for this connection (a RST or FIN outside the
    /// window): drop it; the connection was left as it was.
    pub(crate) invalid: bool,
    /// The connection's original came in on the host port: its replies go back there.
    pub(crate) host: bool,
}

impl Hit {
    /// The packet's new (source, destination, sport, dport) after translation: the
    /// reverse of the other direction's tuple.
    pub(crate) fn target(&self) -> Tuple {
        let other = if self.dir == 0 { self.t[1] } else { self.t[0] };
        other.reversed()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Per-family table inside a shard.
#[derive(Debug)]
struct Table<A> {
    entries: Vec<Entry<A>>,
    free: Vec<u32>,
    /// Slots: 0 empty, else `hash32 << 32 | (entry << 1 | dir) + 1`.
    index: Vec<u64>,
    keys: usize,
    live: usize,
    /// Creation order of entries not yet assured: eviction candidates.
    unassured: VecDeque<(u32, u32)>,
    /// Where the next early-drop sample starts.
    cursor: usize,
    /// Reply tuples of connections evicted while the endpoint held them half open (it
    /// answered the SYN, the client never completed the handshake): the endpoint keeps
    /// its SYN_RECV for a while and would take a new SYN on that tuple for a duplicate
    /// and answer it with the old SYN-ACK, or not at all. Per tuple, the sequence number
    /// a RST must carry to end that state (the endpoint's acknowledgement) and until when
    /// (ms) the state may live.
    stale: HashMap<Tuple, (u32, u64)>,
    /// Secret seed of the index hash.
    seed: u64,
    /// Reply keys of connections living in other shards.
    foreign: HashMap<(u8, Tup<A>), Foreign>,
    /// Foreign reply keys of connections removed here, not yet unlinked.
    unlink: Vec<Unlink>,
}

/// Stale half-open tuples remembered per table, at most.
const STALE_MAX: usize = 4096;

impl<A: Addr> Table<A> {
    fn new(seed: u64) -> Self {
        Table {
            entries: Vec::new(),
            free: Vec::new(),
            index: Vec::new(),
            keys: 0,
            live: 0,
            unassured: VecDeque::new(),
            cursor: 0,
            stale: HashMap::new(),
            seed,
            foreign: HashMap::new(),
            unlink: Vec::new(),
        }
    }

    fn mask(&self) -> usize {
        self.index.len().wrapping_sub(1)
    }

    fn find(&self, proto: u8, k: &Tup<A>) -> Option<(usize, u32, u8)> {
        if self.index.is_empty() {
            return None;
        }
        let h = k.hash(proto, self.seed) as u32;
        let mask = self.mask();
        let mut i = h as usize & mask;
        for _ in 0..self.index.len() {
            let s = *self.index.get(i)?;
            if s == 0 {
                return None;
            }
            if (s >> 32) as u32 == h {
                let r = (s as u32).wrapping_sub(1);
                let (idx, dir) = (r >> 1, (r & 1) as u8);
                if let Some(e) = self.entries.get(idx as usize)
                    && e.proto == proto
                    && e.t.get(usize::from(dir)).is_some_and(|t| t == k)
                {
                    return Some((i, idx, dir));
                }
            }
            i = (i + 1) & mask;
        }
        None
    }

    fn insert_key(&mut self, proto: u8, k: &Tup<A>, idx: u32, dir: u8) {
        if (self.keys + 1) * 2 > self.index.len() {
            self.grow();
        }
        let h = k.hash(proto, self.seed) as u32;
        let slot = (u64::from(h) << 32) | u64::from(((idx << 1) | u32::from(dir)) + 1);
        let mask = self.mask();
        let mut i = h as usize & mask;
        for _ in 0..self.index.len() {
            match self.index.get_mut(i) {
                Some(s) if *s == 0 => {
                    *s = slot;
                    self.keys += 1;
                    return;
                }
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn grow(&mut self) {
        let n = (self.index.len() * 2).max(64);
        let old = std::mem::replace(&mut self.index, vec![0; n]);
        let mask = n - 1;
        for s in old.into_iter().filter(|&s| s != 0) {
            let mut i = (s >> 32) as usize & mask;
            while let Some(x) = self.index.get_mut(i) {
                if *x == 0 {
                    *x = s;
                    break;
                }
                i = (i + 1) & mask;
            }
        }
    }

    /// Removes the slot at `pos` with backward-shift deletion.
    fn remove_slot(&mut self, pos: usize) {
        let mask = self.mask();
        let mut i = pos;
        if let Some(s) = self.index.get_mut(i) {
            *s = 0;
        }
        self.keys = self.keys.saturating_sub(1);
        let mut j = i;
        for _ in 0..self.index.len() {
            j = (j + 1) & mask;
            let s = self.index.get(j).copied().unwrap_or(0);
            if s == 0 {
                return;
            }
            let home = (s >> 32) as usize & mask;
            // Leave it if its home lies cyclically in (i, j].
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                if let Some(x) = self.index.get_mut(i) {
                    *x = s;
                }
                if let Some(x) = self.index.get_mut(j) {
                    *x = 0;
                }
                i = j;
            }
        }
    }

    fn remove_entry(&mut self, idx: u32) {
        let Some(e) = self.entries.get(idx as usize).copied() else {
            return;
        };
        if e.flags & F_LIVE == 0 {
            return;
        }
        if let Some((pos, _, _)) = self.find(e.proto, &e.t[0]) {
            self.remove_slot(pos);
        }
        if e.foreign {
            self.unlink.push(Unlink {
                proto: e.proto,
                reply: e.t[1].to_tuple(),
                idx,
                generation: e.generation,
                stale: None,
            });
        } else if let Some((pos, _, _)) = self.find(e.proto, &e.t[1]) {
            self.remove_slot(pos);
        }
        if let Some(x) = self.entries.get_mut(idx as usize) {
            x.flags = 0;
            x.generation = x.generation.wrapping_add(1);
        }
        self.free.push(idx);
        self.live = self.live.saturating_sub(1);
    }

    /// Evicts the oldest unassured entry or, when every entry is assured, the entry
    /// closest to expiry among a sample of those the kernel's `early_drop` may take
    /// (UDP, ICMP and other datagram flows, TCP past ESTABLISHED, closed SCTP): answered
    /// but idle flows must not hold a full table against new ones. False when there is
    /// none to evict (established TCP and SCTP are never evicted).
    /// A half-open TCP connection the endpoint answered is remembered as stale until
    /// `syn_recv_until` (ms).
    fn evict_one(&mut self, now_ms: u64, syn_recv_until: u64) -> bool {
        while let Some((idx, generation)) = self.unassured.pop_front() {
            if let Some(e) = self.entries.get(idx as usize).copied()
                && e.flags & F_LIVE != 0
                && e.generation == generation
                && e.flags & F_ASSURED == 0
            {
                let half_open = e.proto == PROTO_TCP
                    && TcpState::from_u8(e.state) == TcpState::SynRecv
                    && e.track.acked & 2 != 0;
                self.remove_entry(idx);
                if half_open {
                    let seq = e.track.ack[1];
                    if e.foreign {
                        // The stale list of the shard the reply key hashes to, where the
                        // next connection given this port looks.
                        if let Some(u) = self.unlink.last_mut() {
                            u.stale = Some((seq, now_ms, syn_recv_until));
                        }
                    } else {
                        self.remember_stale(e.t[1].to_tuple(), seq, now_ms, syn_recv_until);
                    }
                }
                return true;
            }
        }
        self.early_drop()
    }

    fn remember_stale(&mut self, reply: Tuple, seq: u32, now_ms: u64, until: u64) {
        if self.stale.len() >= STALE_MAX && !self.stale.contains_key(&reply) {
            self.stale.retain(|_, (_, u)| *u > now_ms);
            if self.stale.len() >= STALE_MAX {
                return;
            }
        }
        self.stale.insert(reply, (seq, until));
    }

    /// The sequence number of a RST that ends the endpoint's stale half-open state on
    /// this reply tuple, if it may still hold one. Kept until the endpoint answers a new
    /// SYN on the tuple as its own (the RST may be lost, or the new connection evicted
    /// unanswered) or the state would have expired.
    fn stale_seq(&mut self, reply: &Tuple, now_ms: u64) -> Option<u32> {
        match self.stale.get(reply) {
            Some(&(seq, until)) if until > now_ms => Some(seq),
            Some(_) => {
                self.stale.remove(reply);
                None
            }
            None => None,
        }
    }

    /// Entries sampled per early drop (the kernel samples a few hash buckets).
    const EARLY_DROP_SAMPLE: usize = 256;

    fn early_drop(&mut self) -> bool {
        let n = self.entries.len();
        if n == 0 {
            return false;
        }
        let mut best: Option<(u64, u32)> = None;
        for k in 0..Self::EARLY_DROP_SAMPLE.min(n) {
            let idx = (self.cursor + k) % n;
            let Some(e) = self.entries.get(idx) else {
                continue;
            };
            let state = TcpState::from_u8(e.state);
            let droppable = e.flags & F_LIVE != 0
                && match e.proto {
                    PROTO_TCP => matches!(
                        state,
                        TcpState::FinWait
                            | TcpState::CloseWait
                            | TcpState::LastAck
                            | TcpState::TimeWait
                            | TcpState::Close
                    ),
                    PROTO_SCTP => state == TcpState::Close,
                    _ => true,
                };
            if droppable && best.is_none_or(|(exp, _)| e.expires < exp) {
                best = Some((e.expires, idx as u32));
            }
        }
        self.cursor = (self.cursor + Self::EARLY_DROP_SAMPLE) % n;
        match best {
            Some((_, idx)) => {
                self.remove_entry(idx);
                true
            }
            None => false,
        }
    }

    fn compact_queue(&mut self) {
        let entries = &self.entries;
        self.unassured.retain(|&(idx, generation)| {
            entries.get(idx as usize).is_some_and(|e| {
                e.flags & F_LIVE != 0 && e.generation == generation && e.flags & F_ASSURED == 0
            })
        });
    }

    fn alloc(&mut self, e: Entry<A>) -> Option<u32> {
        if let Some(idx) = self.free.pop() {
            let generation = self.entries.get(idx as usize)?.generation;
            let slot = self.entries.get_mut(idx as usize)?;
            *slot = Entry { generation, ..e };
            Some(idx)
        } else {
            let idx = u32::try_from(self.entries.len())
                .ok()
                .filter(|&i| i < (1 << 30))?;
            self.entries.push(e);
            Some(idx)
        }
    }
}

/// Whether a RST or FIN of direction `dir` lies in the tracked window: a blind attacker
/// must guess a sequence number within the receiver's window (RFC 5961's concern), not
/// merely the addresses and ports. `handshake`: the connection is not yet established.
fn in_window(track: &Track, flags: u8, dir: u8, seg: &Seg, handshake: bool) -> bool {
    let d = usize::from(dir & 1);
    let r = 1 - d;
    let seen = |x: usize| flags & if x == 0 { F_SEEN0 } else { F_SEEN1 } != 0;
    if !seen(d) {
        // The first segment of this side (a server refusing the SYN with RST+ACK) must
        // acknowledge exactly what the other side sent; without ACK the kernel takes it
        // as acknowledging everything (tcp_in_window), and so does this.
        return !seen(r) || seg.flags & TCP_ACK == 0 || seg.ack == track.end[r];
    }
    // During the handshake, a RST carrying exactly the sequence number the receiver last
    // acknowledged is the one RFC 5961 accepts outright (nf_conntrack lets a RST with
    // `seq == td_maxack` through before ESTABLISHED too). It is how an endpoint resets
    // state the other side holds from an earlier use of these ports: a client answering
    // the SYN-ACK of the server's stale SYN_RECV (which acknowledges some other SYN)
    // resets with that acknowledgement, not with its own sequence numbers, and must get
    // through or the server keeps the stale half-open state and ignores the new SYN.
    // Past the handshake only the window counts (acknowledgements are not validated, so
    // a spoofed segment could have set the one recorded).
    if handshake
        && seg.flags & TCP_RST != 0
        && track.acked & (1 << r) != 0
        && seg.seq == track.ack[r]
    {
        return true;
    }
    let win = match track.maxwin[r] {
        0 => 65_535,
        w => w.min(1 << 30),
    };
    // seq within [end - win, end + win], modulo 2^32.
    seg.seq.wrapping_sub(track.end[d].wrapping_sub(win)) <= win.saturating_mul(2)
}

/// Records what a valid segment of direction `dir` covers.
fn track_segment(track: &mut Track, flags: &mut u8, dir: u8, seg: &Seg) {
    let d = usize::from(dir & 1);
    let seen_bit = if d == 0 { F_SEEN0 } else { F_SEEN1 };
    let end = seg.end();
    if *flags & seen_bit == 0 || (end.wrapping_sub(track.end[d]) as i32) > 0 {
        track.end[d] = end;
    }
    *flags |= seen_bit;
    if seg.flags & TCP_ACK != 0 {
        track.ack[d] = seg.ack;
        track.acked |= 1 << d;
    }
    let win = if seg.flags & TCP_SYN != 0 {
        track.wscale[d] = seg.wscale.unwrap_or(NO_WSCALE);
        u32::from(seg.win)
    } else {
        let scale = if track.wscale.contains(&NO_WSCALE) {
            0
        } else {
            track.wscale[d]
        };
        u32::from(seg.win) << scale.min(14)
    };
    track.maxwin[d] = track.maxwin[d].max(win);
}

/// Kernel-like TCP state transition; returns the new state and flag bits.
fn tcp_transition(state: TcpState, flags: u8, dir: u8, tcp: u8) -> (TcpState, u8) {
    use TcpState::*;
    let mut f = flags;
    if tcp & TCP_RST != 0 {
        return (Close, f);
    }
    let syn = tcp & TCP_SYN != 0;
    let ack = tcp & TCP_ACK != 0;
    let fin = tcp & TCP_FIN != 0;
    if syn {
        return match (state, dir, ack) {
            // A new SYN after the connection closed reopens it (kernel: "reopened").
            (TimeWait | Close, 0, false) => (
                SynSent,
                f & !(F_FIN0 | F_FIN1 | F_ASSURED | F_SEEN0 | F_SEEN1 | F_LIBERAL),
            ),
            (SynSent, 1, true) => (SynRecv, f),
            (s, _, _) => (s, f),
        };
    }
    if fin {
        f |= if dir == 0 { F_FIN0 } else { F_FIN1 };
        let next = if f & F_FIN0 != 0 && f & F_FIN1 != 0 {
            LastAck
        } else {
            match state {
                SynSent | SynRecv | Established => FinWait,
                s => s,
            }
        };
        return (next, f);
    }
    if ack {
        let fin_from_other = if dir == 0 { F_FIN1 } else { F_FIN0 };
        return match state {
            SynRecv if dir == 0 => (Established, f),
            FinWait if f & fin_from_other != 0 => (CloseWait, f),
            LastAck => (TimeWait, f),
            s => (s, f),
        };
    }
    (state, f)
}

/// SCTP, kept simple: an INIT (re)opens, any packet of the other direction establishes, an
/// ABORT or SHUTDOWN COMPLETE closes. `chunks` is [`super::wire::sctp_chunks`]'s set.
fn sctp_transition(state: TcpState, dir: u8, chunks: u8) -> TcpState {
    use TcpState::*;
    if chunks & (SCTP_ABORT | SCTP_SHUTDOWN_COMPLETE) != 0 {
        return Close;
    }
    match (state, dir) {
        (Close, 0) if chunks & SCTP_INIT != 0 => SynSent,
        (SynSent, 1) => Established,
        (s, _) => s,
    }
}

/// Which holders of a reply key a new connection may take it from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Take {
    /// None: only an unused (or expired) key.
    Free,
    /// TCP connections in TIME_WAIT or CLOSE too.
    Closed,
    /// Connections never answered too.
    HalfOpen,
}

/// Whether a connection holding a reply key may give it to a new one.
fn reusable<A>(e: &Entry<A>, now_ms: u64, take: Take) -> bool {
    let state = TcpState::from_u8(e.state);
    let closed = e.proto == PROTO_TCP && matches!(state, TcpState::TimeWait | TcpState::Close);
    e.expires <= now_ms
        || (take != Take::Free && closed)
        || (take == Take::HalfOpen && e.flags & F_REPLIED == 0)
}

/// Whether the reply key `r` can be used for a new connection: unused or expired, or held
/// by a connection `take` allows, which is removed here. `rt` is the table of the shard
/// the key hashes to; `home` the new connection's shard and, when that is another shard,
/// `ht` its table (locked by the caller): a foreign key held by one of `ht`'s connections
/// can be inspected and taken, one held by a third shard's cannot (its lock is not held)
/// and counts as used.
fn take_port<A: Addr>(
    rt: &mut Table<A>,
    ht: Option<&mut Table<A>>,
    home: usize,
    proto: u8,
    r: &Tuple,
    now_ms: u64,
    take: Take,
) -> bool {
    let Some(kr) = Tup::<A>::from_tuple(r) else {
        return false;
    };
    if let Some((_, idx, _)) = rt.find(proto, &kr) {
        let Some(e) = rt.entries.get(idx as usize) else {
            return false;
        };
        let ok = reusable(e, now_ms, take);
        if ok {
            rt.remove_entry(idx);
        }
        return ok;
    }
    if rt.foreign.is_empty() {
        return true;
    }
    let Some(f) = rt.foreign.get(&(proto, kr)).copied() else {
        return true;
    };
    let Some(ht) = ht.filter(|_| f.home as usize == home) else {
        return false;
    };
    let holder = ht.entries.get(f.idx as usize).filter(|e| {
        e.flags & F_LIVE != 0 && e.generation == f.generation && e.foreign && e.t[1] == kr
    });
    let ok = holder.is_none_or(|e| reusable(e, now_ms, take));
    if ok {
        if holder.is_some() {
            ht.remove_entry(f.idx);
        }
        rt.foreign.remove(&(proto, kr));
    }
    ok
}

fn timeout_of(proto: u8, state: TcpState, flags: u8, t: &Timeouts) -> Duration {
    match proto {
        PROTO_TCP => match state {
            TcpState::SynSent | TcpState::None => t.tcp_syn_sent,
            TcpState::SynRecv => t.tcp_syn_recv,
            TcpState::Established => t.tcp_established,
            TcpState::FinWait => t.tcp_fin_wait,
            TcpState::CloseWait => t.tcp_close_wait,
            TcpState::LastAck => t.tcp_last_ack,
            TcpState::TimeWait => t.tcp_time_wait,
            TcpState::Close => t.tcp_close,
        },
        PROTO_UDP if flags & F_REPLIED != 0 => t.udp_stream,
        PROTO_UDP => t.udp_unreplied,
        PROTO_SCTP => match state {
            TcpState::Established => t.sctp_established,
            TcpState::Close => t.sctp_closed,
            _ => t.sctp_init,
        },
        _ => t.icmp,
    }
}

#[derive(Debug)]
struct Shard {
    v4: Table<Ipv4Addr>,
    v6: Table<Ipv6Addr>,
}

impl Shard {
    /// The foreign reply keys its tables removed, to unlink once its lock is released.
    fn take_unlink(&mut self) -> Vec<Unlink> {
        if self.v4.unlink.is_empty() && self.v6.unlink.is_empty() {
            return Vec::new();
        }
        let mut v = std::mem::take(&mut self.v4.unlink);
        v.append(&mut self.v6.unlink);
        v
    }
}

/// A port range grouped by the shard each port's reply key lands in (for one masquerade
/// address): each shard's share, so that a port search walks shares instead of hashing
/// the whole range per connection.
#[derive(Debug)]
struct Slices(Vec<Vec<u16>>);

impl Slices {
    fn of(&self, shard: usize) -> &[u16] {
        self.0.get(shard).map_or(&[], Vec::as_slice)
    }
}

/// Ports of other shards' shares a port search may try per pass.
const PROBES_AWAY: usize = 512;
/// Ports a port search tries in each other shard's share it visits.
const PROBES_PER_SHARE: usize = 8;

/// Masquerade addresses whose port shares are kept (they come from configuration; past
/// this the cache starts over).
const SLICES_MAX: usize = 64;

/// Where a lookup found a key.
#[derive(Clone, Copy, Debug)]
enum Look {
    Hit(Hit),
    /// A foreign reply key: the connection lives in another shard.
    Away(Foreign),
    Miss,
}

/// What [`Conntrack::create`] was asked for.
#[derive(Clone, Copy, Debug)]
struct New<'a> {
    now_ms: u64,
    proto: u8,
    orig: &'a Tuple,
    endpoint: (IpAddr, u16),
    snat: Option<IpAddr>,
    ports: &'a RangeInclusive<u16>,
    seg: Seg,
    host: bool,
}

/// Result of [`Conntrack::create`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Created {
    /// A new entry with these tuples and, when the endpoint may still hold a half-open
    /// connection on the reply tuple (from a connection evicted before it completed), the
    /// sequence number of the RST that ends it (the endpoint's acknowledgement).
    New([Tuple; 2], Option<u32>),
    /// Another worker created it first: the packet is part of that connection.
    Existing(Hit),
}

/// The sharded connection table.
#[derive(Debug)]
pub(crate) struct Conntrack {
    shards: Box<[Mutex<Shard>]>,
    /// Secret key of the shard hash, so that no sender can aim at one shard.
    key: u64,
    per_shard: usize,
    timeouts: Timeouts,
    /// Port shares per (masquerade address, range).
    slices: RwLock<HashMap<(IpAddr, u16, u16), Arc<Slices>>>,
    pub(crate) created: AtomicU64,
    pub(crate) evicted: AtomicU64,
    pub(crate) expired: AtomicU64,
}

/// Runs `$body` with `$t` bound to the table of the tuple's family and `$k` to the
/// compact key.
macro_rules! with_table {
    ($shard:expr, $tuple:expr, |$t:ident, $k:ident| $body:expr, $none:expr) => {
        match $tuple.src {
            IpAddr::V4(_) => match Tup::<Ipv4Addr>::from_tuple($tuple) {
                Some($k) => {
                    let $t = &mut $shard.v4;
                    $body
                }
                None => $none,
            },
            IpAddr::V6(_) => match Tup::<Ipv6Addr>::from_tuple($tuple) {
                Some($k) => {
                    let $t = &mut $shard.v6;
                    $body
                }
                None => $none,
            },
        }
    };
}

impl Conntrack {
    /// A table bounded to `max` connections over about `shards` shards, its shard hash
    /// keyed with `key`.
    pub(crate) fn new(max: usize, shards: usize, timeouts: Timeouts, key: u64) -> Conntrack {
        let n = shards.clamp(1, 4096).next_power_of_two();
        let per_shard = max.div_ceil(n).max(1);
        Conntrack {
            shards: (0..n)
                .map(|_| {
                    Mutex::new(Shard {
                        v4: Table::new(fmix64(key ^ 4)),
                        v6: Table::new(fmix64(key ^ 6)),
                    })
                })
                .collect(),
            key,
            per_shard,
            timeouts,
            slices: RwLock::new(HashMap::new()),
            created: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            expired: AtomicU64::new(0),
        }
    }

    fn shard_of(&self, ip: IpAddr, port: u16) -> usize {
        keyed_shard(self.key, self.shards.len(), ip, port)
    }

    /// Runs `f` on a shard under its lock, then unlinks the foreign reply keys of the
    /// connections it removed (after the lock is released). None if there is no such shard.
    fn locked<R>(&self, shard: usize, f: impl FnOnce(&mut Shard) -> R) -> Option<R> {
        let m = self.shards.get(shard)?;
        let (r, unlink) = {
            let mut s = m.lock();
            let r = f(&mut s);
            (r, s.take_unlink())
        };
        self.unlink(shard, unlink);
        Some(r)
    }

    /// Removes the foreign reply keys of connections `home` removed from the shards they
    /// live in (each lock taken alone), and hands those shards the half-open tuples.
    fn unlink(&self, home: usize, list: Vec<Unlink>) {
        for u in list {
            let r = self.shard_of(u.reply.dst, u.reply.dport);
            let Some(m) = self.shards.get(r) else {
                continue;
            };
            let mut s = m.lock();
            let want = Foreign {
                home: home as u32,
                idx: u.idx,
                generation: u.generation,
            };
            with_table!(
                s,
                &u.reply,
                |t, k| {
                    if t.foreign.get(&(u.proto, k)) == Some(&want) {
                        t.foreign.remove(&(u.proto, k));
                    }
                    if let Some((seq, now_ms, until)) = u.stale {
                        t.remember_stale(u.reply, seq, now_ms, until);
                    }
                },
                ()
            );
        }
    }

    /// The ports of `ports` grouped by the shard a reply key to `ip` lands in.
    fn compute_slices(&self, ip: IpAddr, ports: &RangeInclusive<u16>) -> Slices {
        let mut v = vec![Vec::new(); self.shards.len()];
        for p in ports.clone() {
            if let Some(s) = v.get_mut(self.shard_of(ip, p)) {
                s.push(p);
            }
        }
        Slices(v)
    }

    /// [`Conntrack::compute_slices`] for a masquerade address, cached.
    fn slices(&self, ip: IpAddr, ports: &RangeInclusive<u16>) -> Arc<Slices> {
        let k = (ip, *ports.start(), *ports.end());
        if let Some(s) = self.slices.read().get(&k) {
            return Arc::clone(s);
        }
        let s = Arc::new(self.compute_slices(ip, ports));
        let mut c = self.slices.write();
        if c.len() >= SLICES_MAX {
            c.clear();
        }
        c.insert(k, Arc::clone(&s));
        s
    }

    /// Finds the connection of a packet with this tuple and, when `update` is given (TCP:
    /// flags and sequence numbers; SCTP: its chunk set; flags 0 for other protocols),
    /// checks a TCP RST or FIN against the window, advances the state and refreshes the
    /// timeout. A RST or FIN outside the window comes back as an invalid [`Hit`], the
    /// connection untouched.
    ///
    /// An original key lives in the shard of the packet's source end, a reply key in the
    /// shard of its destination end: in that shard's index when the connection lives
    /// there too, else among its foreign keys, which name the connection's shard.
    pub(crate) fn lookup(
        &self,
        now: Duration,
        proto: u8,
        tuple: &Tuple,
        update: Option<Seg>,
    ) -> Option<Hit> {
        let a = self.shard_of(tuple.src, tuple.sport);
        let b = self.shard_of(tuple.dst, tuple.dport);
        let found = match self.lookup_in(a, now, proto, tuple, update, a == b) {
            Look::Miss if b != a => self.lookup_in(b, now, proto, tuple, update, true),
            l => l,
        };
        match found {
            Look::Hit(h) => Some(h),
            Look::Away(f) => self.lookup_away(f, b, now, proto, tuple, update),
            Look::Miss => None,
        }
    }

    fn lookup_in(
        &self,
        shard: usize,
        now: Duration,
        proto: u8,
        tuple: &Tuple,
        update: Option<Seg>,
        foreign: bool,
    ) -> Look {
        let now_ms = ms(now);
        self.locked(shard, |s| {
            with_table!(
                s,
                tuple,
                |t, k| {
                    if let Some((_, idx, dir)) = t.find(proto, &k) {
                        return match self.touch(t, idx, dir, now_ms, proto, update) {
                            Some((hit, _)) => Look::Hit(hit),
                            None => Look::Miss,
                        };
                    }
                    if foreign
                        && !t.foreign.is_empty()
                        && let Some(f) = t.foreign.get(&(proto, k))
                    {
                        return Look::Away(*f);
                    }
                    Look::Miss
                },
                Look::Miss
            )
        })
        .unwrap_or(Look::Miss)
    }

    /// A reply whose key `f` (in shard `at`) names the connection's shard.
    fn lookup_away(
        &self,
        f: Foreign,
        at: usize,
        now: Duration,
        proto: u8,
        tuple: &Tuple,
        update: Option<Seg>,
    ) -> Option<Hit> {
        let now_ms = ms(now);
        let (hit, clear) = self
            .locked(f.home as usize, |s| {
                with_table!(
                    s,
                    tuple,
                    |t, k| {
                        // The connection may have gone (its key is being unlinked) and
                        // its slot been reused: then this is a miss.
                        let e = t.entries.get(f.idx as usize)?;
                        if e.flags & F_LIVE == 0
                            || e.generation != f.generation
                            || e.proto != proto
                            || !e.foreign
                            || e.t[1] != k
                        {
                            return None;
                        }
                        self.touch(t, f.idx, 1, now_ms, proto, update)
                    },
                    None
                )
            })
            .flatten()?;
        if clear {
            self.locked(at, |s| {
                with_table!(
                    s,
                    tuple,
                    |t, _k| {
                        t.stale.remove(tuple);
                    },
                    ()
                )
            });
        }
        Some(hit)
    }

    /// The connection at `idx` of `t`, found by its direction-`dir` key: expires it, or
    /// checks and applies `update` (see [`Conntrack::lookup`]). The flag asks the caller
    /// to forget the reply tuple's stale half-open state in the reply key's shard (when
    /// that is another one).
    #[allow(clippy::too_many_arguments)]
    fn touch<A: Addr>(
        &self,
        t: &mut Table<A>,
        idx: u32,
        dir: u8,
        now_ms: u64,
        proto: u8,
        update: Option<Seg>,
    ) -> Option<(Hit, bool)> {
        let e = *t.entries.get(idx as usize)?;
        if e.expires <= now_ms {
            t.remove_entry(idx);
            self.expired.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let hit = Hit {
            dir,
            t: [e.t[0].to_tuple(), e.t[1].to_tuple()],
            invalid: false,
            host: e.host,
        };
        let mut clear = false;
        let mut state = TcpState::from_u8(e.state);
        if let Some(seg) = update {
            let mut flags = e.flags;
            let mut track = e.track;
            if proto == PROTO_TCP {
                // A new SYN on a closed connection starts over; anything else that would
                // end it must be in the window.
                let reopening = seg.flags & TCP_SYN != 0
                    && dir == 0
                    && matches!(state, TcpState::TimeWait | TcpState::Close);
                if !reopening
                    && seg.flags & (TCP_RST | TCP_FIN) != 0
                    && flags & F_LIBERAL == 0
                    && !in_window(
                        &track,
                        flags,
                        dir,
                        &seg,
                        matches!(state, TcpState::SynSent | TcpState::SynRecv),
                    )
                {
                    return Some((
                        Hit {
                            invalid: true,
                            ..hit
                        },
                        false,
                    ));
                }
                if dir == 1
                    && state == TcpState::SynSent
                    && seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
                    && seg.ack == track.end[0]
                {
                    // The endpoint answered this connection's own SYN: whatever it held
                    // on the tuple before is gone.
                    if e.foreign {
                        clear = true;
                    } else if !t.stale.is_empty() {
                        t.stale.remove(&e.t[1].to_tuple());
                    }
                }
                let (ns, nf) = tcp_transition(state, flags, dir, seg.flags);
                state = ns;
                flags = nf;
                if reopening {
                    track = Track::default();
                }
                track_segment(&mut track, &mut flags, dir, &seg);
            }
            if dir == 1 {
                flags |= F_REPLIED;
            }
            if proto == PROTO_TCP {
                if flags & F_REPLIED != 0 && matches!(state, TcpState::Established) {
                    flags |= F_ASSURED;
                }
            } else if proto == PROTO_SCTP {
                state = sctp_transition(state, dir, seg.flags);
                if matches!(state, TcpState::Established) {
                    flags |= F_ASSURED;
                }
            } else if flags & F_REPLIED != 0 {
                flags |= F_ASSURED;
            }
            let expires =
                now_ms.saturating_add(ms(timeout_of(proto, state, flags, &self.timeouts)));
            if let Some(x) = t.entries.get_mut(idx as usize) {
                x.state = state as u8;
                x.flags = flags;
                x.expires = expires;
                x.track = track;
            }
        }
        Some((hit, clear))
    }

    /// Creates a connection for a packet `orig` (client to frontend) translated to
    /// `endpoint`. With `snat`, the reply goes to that address and a port from `ports`;
    /// without, to the client (its port remapped from `ports` only if the reply tuple is
    /// taken). `host` marks the node's own connection (its original came in on the host
    /// port).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create(
        &self,
        now: Duration,
        proto: u8,
        orig: &Tuple,
        endpoint: (IpAddr, u16),
        snat: Option<IpAddr>,
        ports: &RangeInclusive<u16>,
        seg: Seg,
        host: bool,
    ) -> Result<Created, DropReason> {
        let shard = self.shard_of(orig.src, orig.sport);
        let mut evicted = 0;
        let mut pending = Vec::new();
        let new = New {
            now_ms: ms(now),
            proto,
            orig,
            endpoint,
            snat,
            ports,
            seg,
            host,
        };
        let res = self
            .locked(shard, |s| {
                with_table!(
                    s,
                    orig,
                    |t, ko| self.create_in(t, shard, ko, &new, &mut evicted, &mut pending),
                    Err(DropReason::Malformed)
                )
            })
            .unwrap_or(Err(DropReason::ConntrackFull));
        for (r, list) in pending {
            self.unlink(r, list);
        }
        if evicted > 0 {
            self.evicted.fetch_add(evicted, Ordering::Relaxed);
        }
        if matches!(res, Ok(Created::New(..))) {
            self.created.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    /// [`Conntrack::create`] in the connection's shard `shard` (locked), its table `t`.
    fn create_in<A: Addr>(
        &self,
        t: &mut Table<A>,
        shard: usize,
        ko: Tup<A>,
        new: &New<'_>,
        evicted: &mut u64,
        pending: &mut Vec<(usize, Vec<Unlink>)>,
    ) -> Result<Created, DropReason> {
        let (now_ms, proto, orig, tcp) = (new.now_ms, new.proto, new.orig, new.seg.flags);
        let timeouts = &self.timeouts;
        if let Some((_, idx, dir)) = t.find(proto, &ko)
            && let Some(e) = t.entries.get(idx as usize).copied()
        {
            if e.expires > now_ms {
                return Ok(Created::Existing(Hit {
                    dir,
                    t: [e.t[0].to_tuple(), e.t[1].to_tuple()],
                    invalid: false,
                    host: e.host,
                }));
            }
            t.remove_entry(idx);
        }
        let syn_recv_until = now_ms.saturating_add(ms(timeouts.tcp_syn_recv));
        while t.live >= self.per_shard {
            if !t.evict_one(now_ms, syn_recv_until) {
                return Err(DropReason::ConntrackFull);
            }
            *evicted += 1;
        }
        let mut track = Track::default();
        let (state, flags) = if proto == PROTO_TCP {
            let mut f = F_LIVE;
            track_segment(&mut track, &mut f, 0, &new.seg);
            if tcp & TCP_SYN != 0 && tcp & TCP_ACK == 0 {
                (TcpState::SynSent, f)
            } else {
                // nf_conntrack_tcp_loose: pick up an established connection mid-stream,
                // its windows unknown (the kernel is liberal with such connections too).
                (TcpState::Established, f | F_LIBERAL)
            }
        } else if proto == PROTO_SCTP {
            if tcp & SCTP_INIT != 0 {
                (TcpState::SynSent, F_LIVE)
            } else {
                // Picked up mid-association (after a restart), as TCP's loose pickup.
                (TcpState::Established, F_LIVE)
            }
        } else {
            (TcpState::None, F_LIVE)
        };
        let reply_dst = new.snat.unwrap_or(orig.src);
        let mut reply = Tuple {
            src: new.endpoint.0,
            dst: reply_dst,
            sport: new.endpoint.1,
            dport: orig.sport,
        };
        if Tup::<A>::from_tuple(&reply).is_none() {
            return Err(DropReason::Malformed);
        }
        let keep_port =
            new.snat.is_none() && take_port(t, None, shard, proto, &reply, now_ms, Take::Closed);
        let away = if keep_port {
            None
        } else {
            if new.ports.is_empty() {
                return Err(DropReason::SnatExhausted);
            }
            let slices = match new.snat {
                Some(ip) => self.slices(ip, new.ports),
                None => Arc::new(self.compute_slices(reply_dst, new.ports)),
            };
            let h = ko.hash(proto, t.seed);
            self.pick_port(
                t, shard, proto, &mut reply, &slices, h, now_ms, evicted, pending,
            )?
        };
        let kr = Tup::<A>::from_tuple(&reply);
        let expires = now_ms.saturating_add(ms(timeout_of(proto, state, flags, timeouts)));
        let slot = kr.and_then(|kr| {
            let e = Entry {
                t: [ko, kr],
                expires,
                generation: 0,
                proto,
                state: state as u8,
                flags,
                host: new.host,
                foreign: away.is_some(),
                track,
            };
            Some((kr, t.alloc(e)?))
        });
        let Some((kr, idx)) = slot else {
            if let Some((r, mut g)) = away {
                pending.push((r, g.take_unlink()));
            }
            return Err(DropReason::ConntrackFull);
        };
        let generation = t.entries.get(idx as usize).map_or(0, |e| e.generation);
        t.insert_key(proto, &ko, idx, 0);
        t.live += 1;
        t.unassured.push_back((idx, generation));
        if t.unassured.len() > 2 * self.per_shard + 64 {
            t.compact_queue();
        }
        // A SYN on a tuple the endpoint may still hold half open from an evicted
        // connection: the endpoint must be reset first. The reply key's shard knows.
        let syn = proto == PROTO_TCP && tcp & TCP_SYN != 0;
        let stale = match away {
            None => {
                t.insert_key(proto, &kr, idx, 1);
                if syn {
                    t.stale_seq(&reply, now_ms)
                } else {
                    None
                }
            }
            Some((r, mut g)) => {
                let rt = A::table(&mut g);
                rt.foreign.insert(
                    (proto, kr),
                    Foreign {
                        home: shard as u32,
                        idx,
                        generation,
                    },
                );
                let stale = if syn {
                    rt.stale_seq(&reply, now_ms)
                } else {
                    None
                };
                pending.push((r, g.take_unlink()));
                stale
            }
        };
        Ok(Created::New([*orig, reply], stale))
    }

    /// Picks the reply port of a new connection from shard `shard` (table `t`, locked)
    /// and sets it in `reply`: None when the reply key lands in this shard, else the
    /// shard it lands in, still locked, for its foreign key.
    ///
    /// The kernel's NAT may give a connection any port of the range whose reply tuple is
    /// unused. Here each reply key lands in a shard by its hash, so a shard's own share
    /// is about 1/64 of the range per endpoint; a connection takes a port from another
    /// shard's share when its own is used up, so every port of the range serves every
    /// client. The others' shares are sampled, not walked: at most [`PROBES_AWAY`] ports
    /// per pass, [`PROBES_PER_SHARE`] from each share visited (the kernel's NAT likewise
    /// gives up after a bounded number of random tries, 128 then halving), so a search in
    /// a full range costs a few hundred key lookups, not the range's size in each pass.
    /// Passes, each over this shard's share and then the others': an unused port;
    /// one held by a connection in TIME_WAIT or CLOSE (the kernel reuses those for a new
    /// SYN; the endpoint's side of the old connection may still be in TIME_WAIT, so a free
    /// port is better); the port of a half-open connection, which is evicted (a SYN flood
    /// must not lock new clients out). Other shards are locked one at a time, blocking
    /// only for shards after this one (every holder of two shard locks took them in
    /// increasing order) and tried for those before it: a busy one is skipped, its ports
    /// left for the next connection.
    #[allow(clippy::too_many_arguments)]
    fn pick_port<A: Addr>(
        &self,
        t: &mut Table<A>,
        shard: usize,
        proto: u8,
        reply: &mut Tuple,
        slices: &Slices,
        h: u64,
        now_ms: u64,
        evicted: &mut u64,
        pending: &mut Vec<(usize, Vec<Unlink>)>,
    ) -> Result<Option<(usize, MutexGuard<'_, Shard>)>, DropReason> {
        let n = self.shards.len();
        let start = |len: usize| (h as usize) % len.max(1);
        for take in [Take::Free, Take::Closed, Take::HalfOpen] {
            let mine = slices.of(shard);
            let s0 = start(mine.len());
            for i in 0..mine.len() {
                let Some(&p) = mine.get((s0 + i) % mine.len()) else {
                    continue;
                };
                reply.dport = p;
                if take_port(t, None, shard, proto, reply, now_ms, take) {
                    if take == Take::HalfOpen {
                        *evicted += 1;
                    }
                    return Ok(None);
                }
            }
            let off = (h >> 32) as usize;
            let mut budget = PROBES_AWAY;
            for j in 0..n {
                let r = (off + j) % n;
                let theirs = slices.of(r);
                if r == shard || theirs.is_empty() {
                    continue;
                }
                if budget == 0 {
                    break;
                }
                let Some(m) = self.shards.get(r) else {
                    continue;
                };
                let mut g = if r > shard {
                    m.lock()
                } else {
                    match m.try_lock() {
                        Some(g) => g,
                        None => continue,
                    }
                };
                let rt = A::table(&mut g);
                let s0 = start(theirs.len());
                let mut got = false;
                let tries = theirs.len().min(PROBES_PER_SHARE).min(budget);
                budget -= tries;
                for i in 0..tries {
                    let Some(&p) = theirs.get((s0 + i) % theirs.len()) else {
                        continue;
                    };
                    reply.dport = p;
                    if take_port(rt, Some(&mut *t), shard, proto, reply, now_ms, take) {
                        got = true;
                        break;
                    }
                }
                if got {
                    if take == Take::HalfOpen {
                        *evicted += 1;
                    }
                    return Ok(Some((r, g)));
                }
                let l = g.take_unlink();
                drop(g);
                if !l.is_empty() {
                    pending.push((r, l));
                }
            }
        }
        Err(DropReason::SnatExhausted)
    }

    /// Removes expired entries.
    pub(crate) fn expire(&self, now: Duration) {
        let now_ms = ms(now);
        let mut n = 0;
        for i in 0..self.shards.len() {
            n += self
                .locked(i, |s| sweep(&mut s.v4, now_ms) + sweep(&mut s.v6, now_ms))
                .unwrap_or(0);
        }
        self.expired.fetch_add(n, Ordering::Relaxed);
    }

    /// Removes every connection for which `stale(proto, original, reply)` holds; returns
    /// how many.
    pub(crate) fn remove_where(&self, stale: impl Fn(u8, &Tuple, &Tuple) -> bool) -> usize {
        let mut n = 0;
        for i in 0..self.shards.len() {
            n += self
                .locked(i, |s| {
                    remove_in(&mut s.v4, &stale) + remove_in(&mut s.v6, &stale)
                })
                .unwrap_or(0);
        }
        n
    }

    /// Number of live connections.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock();
                s.v4.live + s.v6.live
            })
            .sum()
    }

    /// The state of the connection whose original tuple is `orig`, for tests and
    /// introspection.
    pub(crate) fn state_of(&self, proto: u8, orig: &Tuple) -> Option<TcpState> {
        let shard = self.shard_of(orig.src, orig.sport);
        let mut s = self.shards.get(shard)?.lock();
        with_table!(
            s,
            orig,
            |t, k| {
                let (_, idx, _) = t.find(proto, &k)?;
                t.entries
                    .get(idx as usize)
                    .map(|e| TcpState::from_u8(e.state))
            },
            None
        )
    }

    /// Heap bytes held by the table (entries, index, queues), for memory accounting.
    pub(crate) fn heap_bytes(&self) -> usize {
        fn tb<A>(t: &Table<A>) -> usize {
            t.entries.capacity() * std::mem::size_of::<Entry<A>>()
                + t.free.capacity() * 4
                + t.index.capacity() * 8
                + t.unassured.capacity() * 8
                + t.foreign.capacity() * (std::mem::size_of::<((u8, Tup<A>), Foreign)>() + 8)
        }
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock();
                tb(&s.v4) + tb(&s.v6)
            })
            .sum()
    }
}

fn remove_in<A: Addr>(t: &mut Table<A>, stale: &impl Fn(u8, &Tuple, &Tuple) -> bool) -> usize {
    let mut n = 0;
    for idx in 0..t.entries.len() {
        let Some(e) = t.entries.get(idx).copied() else {
            break;
        };
        if e.flags & F_LIVE != 0 && stale(e.proto, &e.t[0].to_tuple(), &e.t[1].to_tuple()) {
            t.remove_entry(idx as u32);
            n += 1;
        }
    }
    n
}

fn sweep<A: Addr>(t: &mut Table<A>, now_ms: u64) -> u64 {
    let mut n = 0;
    for idx in 0..t.entries.len() {
        let Some(e) = t.entries.get(idx) else {
            break;
        };
        if e.flags & F_LIVE != 0 && e.expires <= now_ms {
            t.remove_entry(idx as u32);
            n += 1;
        }
    }
    if t.unassured.len() > t.live * 2 + 64 {
        t.compact_queue();
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tup(a: [u8; 4], sp: u16, b: [u8; 4], dp: u16) -> Tuple {
        Tuple {
            src: IpAddr::from(a),
            dst: IpAddr::from(b),
            sport: sp,
            dport: dp,
        }
    }

    #[test]
    fn remove_where_drops_only_the_matching_connections() {
        let ct = Conntrack::new(1_000, 4, Timeouts::default(), 7);
        let ports = 61000..=65535;
        let fe = tup([10, 244, 0, 99], 40053, [10, 96, 0, 10], 53);
        let add = |proto: u8, o: &Tuple, ep: [u8; 4]| {
            ct.create(
                Duration::ZERO,
                proto,
                o,
                (IpAddr::from(ep), 5353),
                None,
                &ports,
                Seg::flags(0),
                false,
            )
            .unwrap()
        };
        add(PROTO_UDP, &fe, [10, 244, 0, 5]);
        add(PROTO_TCP, &fe, [10, 244, 0, 5]);
        let other = tup([10, 244, 0, 98], 40053, [10, 96, 0, 10], 53);
        add(PROTO_UDP, &other, [10, 244, 0, 6]);
        let gone = IpAddr::from([10, 244, 0, 5]);
        let n = ct.remove_where(|proto, orig, reply| {
            proto == PROTO_UDP && orig.dst == fe.dst && orig.dport == 53 && reply.src == gone
        });
        assert_eq!(n, 1);
        assert_eq!(ct.len(), 2);
        assert!(ct.lookup(Duration::ZERO, PROTO_UDP, &fe, None).is_none());
        assert!(ct.lookup(Duration::ZERO, PROTO_TCP, &fe, None).is_some());
        assert!(ct.lookup(Duration::ZERO, PROTO_UDP, &other, None).is_some());
        // The freed entry is reusable: the flow gets a new decision.
        assert!(matches!(
            add(PROTO_UDP, &fe, [10, 244, 0, 6]),
            Created::New(..)
        ));
    }

    #[test]
    fn index_survives_many_inserts_and_removals() {
        let ct = Conntrack::new(10_000, 4, Timeouts::default(), 7);
        let ports = 61000..=65535;
        let mut origs = Vec::new();
        for i in 0..5000u32 {
            let c = [10, 0, (i >> 8) as u8, i as u8];
            let o = tup(c, 1000 + (i % 7) as u16, [10, 96, 0, 1], 80);
            let r = ct
                .create(
                    Duration::ZERO,
                    PROTO_UDP,
                    &o,
                    (IpAddr::from([10, 244, 0, 5]), 8080),
                    None,
                    &ports,
                    Seg::flags(0),
                    false,
                )
                .unwrap();
            assert!(matches!(r, Created::New(..)));
            origs.push(o);
        }
        assert_eq!(ct.len(), 5000);
        for o in &origs {
            let h = ct.lookup(Duration::ZERO, PROTO_UDP, o, None).unwrap();
            assert_eq!(h.dir, 0);
            let back = h.t[1];
            let h2 = ct.lookup(Duration::ZERO, PROTO_UDP, &back, None).unwrap();
            assert_eq!(h2.dir, 1);
            assert_eq!(h2.target(), o.reversed());
        }
        // Expire everything and make sure the index is empty again.
        ct.expire(Duration::from_secs(31));
        assert_eq!(ct.len(), 0);
        for o in &origs {
            assert!(
                ct.lookup(Duration::from_secs(31), PROTO_UDP, o, None)
                    .is_none()
            );
        }
    }

    #[test]
    fn tcp_handshake_and_close() {
        use TcpState::*;
        let mut f = 0;
        let mut s = SynSent;
        for (dir, flags, want) in [
            (1, TCP_SYN | TCP_ACK, SynRecv),
            (0, TCP_ACK, Established),
            (0, TCP_FIN | TCP_ACK, FinWait),
            (1, TCP_ACK, CloseWait),
            (1, TCP_FIN | TCP_ACK, LastAck),
            (0, TCP_ACK, TimeWait),
            (0, TCP_SYN, SynSent),
        ] {
            (s, f) = tcp_transition(s, f, dir, flags);
            assert_eq!(s, want);
        }
        assert_eq!(tcp_transition(Established, 0, 1, TCP_RST).0, Close);
    }

    fn tcp(flags: u8, seq: u32, ack: u32, len: u32) -> Seg {
        Seg {
            flags,
            seq,
            ack,
            win: 502,
            len,
            wscale: (flags & TCP_SYN != 0).then_some(7),
        }
    }

    const CLIENT: [u8; 4] = [192, 168, 50, 100];
    const NODE: [u8; 4] = [192, 168, 50, 11];
    const POD: [u8; 4] = [10, 244, 0, 10];

    /// A masqueraded TCP connection from the client's `sport` through its handshake; the
    /// reply tuple comes back.
    fn handshake(ct: &Conntrack, now: Duration, sport: u16) -> Result<Tuple, DropReason> {
        let o = tup(CLIENT, sport, NODE, 30080);
        let c = ct.create(
            now,
            PROTO_TCP,
            &o,
            (IpAddr::from(POD), 8080),
            Some(IpAddr::from(NODE)),
            &(61000..=65535),
            tcp(TCP_SYN, 1000, 0, 0),
            false,
        )?;
        let Created::New([_, reply], _) = c else {
            panic!("{c:?}");
        };
        let h = ct
            .lookup(
                now,
                PROTO_TCP,
                &reply,
                Some(tcp(TCP_SYN | TCP_ACK, 5000, 1001, 0)),
            )
            .unwrap();
        assert!(!h.invalid);
        let h = ct
            .lookup(now, PROTO_TCP, &o, Some(tcp(TCP_ACK, 1001, 5001, 0)))
            .unwrap();
        assert!(!h.invalid);
        Ok(reply)
    }

    #[test]
    fn a_blind_rst_or_fin_outside_the_window_leaves_the_connection() {
        let ct = Conntrack::new(1_000, 4, Timeouts::default(), 7);
        let now = Duration::ZERO;
        let o = tup(CLIENT, 40000, NODE, 30080);
        let reply = handshake(&ct, now, 40000).unwrap();
        ct.lookup(now, PROTO_TCP, &o, Some(tcp(TCP_ACK, 1001, 5001, 100)))
            .unwrap();
        assert_eq!(ct.state_of(PROTO_TCP, &o), Some(TcpState::Established));
        // A spoofed RST (or FIN) with the client's addresses and a guessed sequence
        // number, from either side, is INVALID and changes nothing.
        for (t, seq) in [
            (&o, 1_000_000_000),
            (&o, 1101 + 200_000),
            (&reply, 5001 + 2_000_000),
        ] {
            for f in [TCP_RST, TCP_RST | TCP_ACK, TCP_FIN | TCP_ACK] {
                let h = ct
                    .lookup(now, PROTO_TCP, t, Some(tcp(f, seq, 0, 0)))
                    .unwrap();
                assert!(h.invalid, "{f:#x} at {seq}");
            }
        }
        assert_eq!(ct.state_of(PROTO_TCP, &o), Some(TcpState::Established));
        // The peers' own RST, at the next sequence number, closes it.
        let h = ct
            .lookup(now, PROTO_TCP, &o, Some(tcp(TCP_RST, 1101, 0, 0)))
            .unwrap();
        assert!(!h.invalid);
        assert_eq!(ct.state_of(PROTO_TCP, &o), Some(TcpState::Close));
    }

    /// The masquerade port of a new connection was last used by a connection the endpoint
    /// still holds in SYN_RECV (a SYN flood's): the endpoint answers with the SYN-ACK of
    /// that old SYN, the client resets it with the acknowledgement it carried (its own
    /// sequence numbers are far off), and that RST must reach the endpoint, or the stale
    /// SYN_RECV ignores the client's retransmitted SYN until it expires. Sequence numbers
    /// as captured in the namespace test.
    #[test]
    fn the_reset_of_a_stale_syn_ack_reaches_the_endpoint() {
        let ct = Conntrack::new(1_000, 1, Timeouts::default(), 7);
        let now = Duration::ZERO;
        let o = tup(CLIENT, 48416, NODE, 30080);
        let Created::New([_, reply], _) = ct
            .create(
                now,
                PROTO_TCP,
                &o,
                (IpAddr::from(POD), 8080),
                Some(IpAddr::from(NODE)),
                &(61000..=65535),
                tcp(TCP_SYN, 2_525_871_177, 0, 0),
                false,
            )
            .unwrap()
        else {
            panic!()
        };
        // A blind RST with that sequence number is refused before the endpoint spoke.
        assert!(
            ct.lookup(now, PROTO_TCP, &o, Some(tcp(TCP_RST, 2, 0, 0)))
                .unwrap()
                .invalid
        );
        // The stale SYN-ACK acknowledges the flood's SYN (sequence 1), not this one.
        let h = ct
            .lookup(
                now,
                PROTO_TCP,
                &reply,
                Some(tcp(TCP_SYN | TCP_ACK, 3_506_644_918, 2, 0)),
            )
            .unwrap();
        assert!(!h.invalid);
        // Any other sequence number far from the client's stays refused ...
        for seq in [3, 1, 1_000_000] {
            assert!(
                ct.lookup(now, PROTO_TCP, &o, Some(tcp(TCP_RST, seq, 0, 0)))
                    .unwrap()
                    .invalid,
                "{seq}"
            );
        }
        // ... but the client's RST answering it goes through and closes the entry.
        let h = ct
            .lookup(now, PROTO_TCP, &o, Some(tcp(TCP_RST, 2, 0, 0)))
            .unwrap();
        assert!(!h.invalid);
        assert_eq!(ct.state_of(PROTO_TCP, &o), Some(TcpState::Close));
        // The client's retransmitted SYN reopens it on the same masquerade port.
        let h = ct
            .lookup(now, PROTO_TCP, &o, Some(tcp(TCP_SYN, 2_525_871_177, 0, 0)))
            .unwrap();
        assert!(!h.invalid);
        assert_eq!(h.target(), reply.reversed());
        assert_eq!(ct.state_of(PROTO_TCP, &o), Some(TcpState::SynSent));
    }

    /// Once established, an acknowledgement (which nothing validates) does not make a RST
    /// acceptable: only the window does.
    #[test]
    fn past_the_handshake_an_acknowledged_sequence_number_is_not_enough() {
        let ct = Conntrack::new(1_000, 1, Timeouts::default(), 7);
        let now = Duration::ZERO;
        let o = tup(CLIENT, 40002, NODE, 30080);
        let reply = handshake(&ct, now, 40002).unwrap();
        assert_eq!(ct.state_of(PROTO_TCP, &o), Some(TcpState::Established));
        // A spoofed ACK from the endpoint's side claims an acknowledgement ...
        let h = ct
            .lookup(
                now,
                PROTO_TCP,
                &reply,
                Some(tcp(TCP_ACK, 5001, 900_000_000, 0)),
            )
            .unwrap();
        assert!(!h.invalid);
        // ... and a RST from the client's side with that sequence number stays INVALID.
        assert!(
            ct.lookup(now, PROTO_TCP, &o, Some(tcp(TCP_RST, 900_000_000, 0, 0)))
                .unwrap()
                .invalid
        );
        assert_eq!(ct.state_of(PROTO_TCP, &o), Some(TcpState::Established));
    }

    /// A connection evicted half open after the endpoint answered leaves the endpoint in
    /// SYN_RECV: connections given its masquerade port learn the RST that ends that state
    /// until the endpoint answers one of them as its own; one never answered adds nothing.
    #[test]
    fn a_port_taken_from_an_answered_half_open_connection_comes_with_its_reset() {
        let ct = Conntrack::new(1, 1, Timeouts::default(), 7);
        let now = Duration::ZERO;
        let syn = |sport: u16| {
            ct.create(
                now,
                PROTO_TCP,
                &tup([198, 18, 0, 1], sport, NODE, 30080),
                (IpAddr::from(POD), 8080),
                Some(IpAddr::from(NODE)),
                &(61000..=61000),
                tcp(TCP_SYN, 1, 0, 0),
                false,
            )
        };
        let Ok(Created::New([_, reply], None)) = syn(1000) else {
            panic!("the first connection has a fresh port")
        };
        ct.lookup(
            now,
            PROTO_TCP,
            &reply,
            Some(tcp(TCP_SYN | TCP_ACK, 777, 2, 0)),
        )
        .unwrap();
        let Ok(Created::New([_, r2], stale)) = syn(1001) else {
            panic!("the second connection evicts the first")
        };
        assert_eq!(r2, reply);
        assert_eq!(stale, Some(2));
        // Evicted unanswered (its RST and SYN may have been lost): the endpoint may still
        // hold the first connection's state.
        let Ok(Created::New(_, stale)) = syn(1002) else {
            panic!("the third connection evicts the second")
        };
        assert_eq!(stale, Some(2));
        // The endpoint answers the third connection's own SYN: the stale state is gone.
        // The client resets it; the next connection comes without a reset.
        let third = tup([198, 18, 0, 1], 1002, NODE, 30080);
        ct.lookup(
            now,
            PROTO_TCP,
            &reply,
            Some(tcp(TCP_SYN | TCP_ACK, 999, 2, 0)),
        )
        .unwrap();
        assert!(
            !ct.lookup(now, PROTO_TCP, &third, Some(tcp(TCP_RST, 2, 0, 0)))
                .unwrap()
                .invalid
        );
        let Ok(Created::New(_, stale)) = syn(1003) else {
            panic!("the fourth connection takes the port")
        };
        assert_eq!(stale, None);
        // Answered and evicted again: stale until the endpoint's SYN_RECV would be gone.
        ct.lookup(
            now,
            PROTO_TCP,
            &reply,
            Some(tcp(TCP_SYN | TCP_ACK, 555, 2, 0)),
        )
        .unwrap();
        let Ok(Created::New(_, stale)) = syn(1004) else {
            panic!()
        };
        assert_eq!(stale, Some(2));
        let later = Timeouts::default().tcp_syn_recv + Duration::from_secs(1);
        let Ok(Created::New(_, stale)) = ct.create(
            later,
            PROTO_TCP,
            &tup([198, 18, 0, 1], 1005, NODE, 30080),
            (IpAddr::from(POD), 8080),
            Some(IpAddr::from(NODE)),
            &(61000..=61000),
            tcp(TCP_SYN, 1, 0, 0),
            false,
        ) else {
            panic!()
        };
        assert_eq!(stale, None);
    }

    #[test]
    fn a_refusing_server_must_acknowledge_the_syn() {
        let ct = Conntrack::new(1_000, 1, Timeouts::default(), 7);
        let now = Duration::ZERO;
        let o = tup(CLIENT, 40001, NODE, 30080);
        let Created::New([_, reply], _) = ct
            .create(
                now,
                PROTO_TCP,
                &o,
                (IpAddr::from(POD), 8080),
                None,
                &(61000..=65535),
                tcp(TCP_SYN, 77, 0, 0),
                false,
            )
            .unwrap()
        else {
            panic!()
        };
        let rst = |ack| tcp(TCP_RST | TCP_ACK, 0, ack, 0);
        assert!(
            ct.lookup(now, PROTO_TCP, &reply, Some(rst(12345)))
                .unwrap()
                .invalid
        );
        assert!(
            !ct.lookup(now, PROTO_TCP, &reply, Some(rst(78)))
                .unwrap()
                .invalid
        );
        assert_eq!(ct.state_of(PROTO_TCP, &o), Some(TcpState::Close));
    }

    #[test]
    fn sequential_connections_from_one_client_reuse_time_wait_ports() {
        // 12,000 short connections, one after the other, from one client to one
        // endpoint: more than the 4,536 masquerade ports, so ports held in TIME_WAIT must
        // be reused, in every shard.
        let ct = Conntrack::new(262_144, 64, Timeouts::default(), 0x5eed);
        let mut failed = 0;
        for i in 0..12_000u32 {
            let now = Duration::from_millis(u64::from(i));
            let sport = 10_000 + (i % 50_000) as u16;
            let o = tup(CLIENT, sport, NODE, 30080);
            let Ok(reply) = handshake(&ct, now, sport) else {
                failed += 1;
                continue;
            };
            for (t, f, seq, ack) in [
                (&o, TCP_FIN | TCP_ACK, 1001, 5001),
                (&reply, TCP_ACK, 5001, 1002),
                (&reply, TCP_FIN | TCP_ACK, 5001, 1002),
                (&o, TCP_ACK, 1002, 5002),
            ] {
                let h = ct
                    .lookup(now, PROTO_TCP, t, Some(tcp(f, seq, ack, 0)))
                    .unwrap();
                assert!(!h.invalid, "{i}: {f:#x}");
            }
            assert_eq!(ct.state_of(PROTO_TCP, &o), Some(TcpState::TimeWait));
        }
        assert_eq!(failed, 0, "connections refused for want of a port");
    }

    #[test]
    fn a_syn_flood_cannot_take_every_masquerade_port_from_new_clients() {
        let ct = Conntrack::new(262_144, 64, Timeouts::default(), 0x5eed);
        let now = Duration::ZERO;
        let syn = |src: [u8; 4], sport: u16| {
            ct.create(
                now,
                PROTO_TCP,
                &tup(src, sport, NODE, 30080),
                (IpAddr::from(POD), 8080),
                Some(IpAddr::from(NODE)),
                &(61000..=65535),
                tcp(TCP_SYN, 1, 0, 0),
                false,
            )
        };
        for i in 0..10_000u32 {
            let src = [100, 64, (i >> 8) as u8, i as u8];
            assert!(syn(src, 1024 + (i % 7) as u16).is_ok(), "spoofed SYN {i}");
        }
        for i in 0..100u16 {
            assert!(
                syn(CLIENT, 20_000 + i).is_ok(),
                "client {i} locked out by half-open connections"
            );
        }
    }

    #[test]
    fn answered_idle_udp_flows_yield_to_new_flows_when_the_table_is_full() {
        let ct = Conntrack::new(64, 1, Timeouts::default(), 0);
        let now = Duration::ZERO;
        let flow = |i: u16| tup([10, 244, 0, (i % 200) as u8], 2000 + i, [10, 96, 0, 10], 53);
        let create = |o: &Tuple| {
            ct.create(
                now,
                PROTO_UDP,
                o,
                (IpAddr::from([10, 244, 0, 250]), 53),
                None,
                &(61000..=65535),
                Seg::flags(0),
                false,
            )
        };
        for i in 0..64 {
            let Created::New([_, reply], _) = create(&flow(i)).unwrap() else {
                panic!()
            };
            // Answered: assured.
            ct.lookup(now, PROTO_UDP, &reply, Some(Seg::flags(0)))
                .unwrap();
        }
        assert_eq!(ct.len(), 64);
        for i in 64..128 {
            assert!(create(&flow(i)).is_ok(), "flow {i} refused");
        }
        assert_eq!(ct.len(), 64);
    }

    impl Conntrack {
        /// Foreign reply keys held, over all shards.
        fn foreign_keys(&self) -> usize {
            self.shards
                .iter()
                .map(|s| {
                    let s = s.lock();
                    s.v4.foreign.len() + s.v6.foreign.len()
                })
                .sum()
        }
    }

    #[test]
    fn one_endpoint_gets_nearly_the_whole_range_whatever_the_shards() {
        // 4,400 connections open at once from one client to one endpoint through the
        // masquerade: 97% of the 4,536 ports. Each shard's own share is 1/64 of the
        // range, so the ports of every share must serve every shard's clients (the kernel
        // gives any connection any free port).
        let ct = Conntrack::new(262_144, 64, Timeouts::default(), 0x5eed);
        let now = Duration::ZERO;
        let mut ports = std::collections::HashSet::new();
        for i in 0..4_400u16 {
            let sport = 10_000 + i;
            let reply = handshake(&ct, now, sport)
                .unwrap_or_else(|e| panic!("connection {i} refused: {e:?}"));
            assert!(
                ports.insert(reply.dport),
                "port {} given twice",
                reply.dport
            );
            let h = ct.lookup(now, PROTO_TCP, &reply, None).unwrap();
            assert_eq!(h.dir, 1);
            assert_eq!(h.target(), tup(CLIENT, sport, NODE, 30080).reversed());
        }
        assert!(ct.foreign_keys() > 100, "{}", ct.foreign_keys());
        // Every reply still finds its connection, then all of them expire and leave no
        // key behind; the range serves again.
        for i in 0..4_400u16 {
            let o = tup(CLIENT, 10_000 + i, NODE, 30080);
            let h = ct.lookup(now, PROTO_TCP, &o, None).unwrap();
            let back = ct.lookup(now, PROTO_TCP, &h.t[1], None).unwrap();
            assert_eq!(back.dir, 1);
        }
        let later = Duration::from_secs(6 * 86_400);
        ct.expire(later);
        assert_eq!((ct.len(), ct.foreign_keys()), (0, 0));
        for i in 0..4_400u16 {
            assert!(
                handshake(&ct, later, 20_000 + i).is_ok(),
                "after expiry: {i}"
            );
        }
    }

    #[test]
    fn a_connection_with_a_port_from_another_share_lives_and_ends_like_any() {
        // Two shards and one port per share: the second connection of a shard must take
        // the other share's port. Its replies, its close and its removal go through the
        // foreign key.
        let ports = 61000..=61001;
        let node = IpAddr::from(NODE);
        // A key under which the two ports land in different shards.
        let ct = (0..64)
            .map(|key| Conntrack::new(1_000, 2, Timeouts::default(), key))
            .find(|ct| ct.compute_slices(node, &ports).of(0).len() == 1)
            .unwrap();
        let now = Duration::ZERO;
        let p0 = ct.compute_slices(node, &ports).of(0)[0];
        // Two client ports of shard 0.
        let ip = IpAddr::from(CLIENT);
        let mut mine = (1024..u16::MAX).filter(|p| ct.shard_of(ip, *p) == 0);
        let (a, b) = (mine.next().unwrap(), mine.next().unwrap());
        let open = |sport: u16| {
            ct.create(
                now,
                PROTO_TCP,
                &tup(CLIENT, sport, NODE, 30080),
                (IpAddr::from(POD), 8080),
                Some(IpAddr::from(NODE)),
                &ports,
                tcp(TCP_SYN, 1000, 0, 0),
                false,
            )
        };
        let Ok(Created::New([_, ra], _)) = open(a) else {
            panic!()
        };
        let Ok(Created::New([_, rb], _)) = open(b) else {
            panic!()
        };
        assert_eq!(ra.dport, p0);
        assert_ne!(rb.dport, p0);
        assert_eq!(ct.foreign_keys(), 1);
        // Both ports taken and answered: a third connection has none.
        for r in [ra, rb] {
            let h = ct
                .lookup(
                    now,
                    PROTO_TCP,
                    &r,
                    Some(tcp(TCP_SYN | TCP_ACK, 5000, 1001, 0)),
                )
                .unwrap();
            assert_eq!(h.dir, 1);
        }
        let c = mine.next().unwrap();
        assert!(matches!(open(c), Err(DropReason::SnatExhausted)));
        // The foreign connection establishes and closes by its replies.
        let ob = tup(CLIENT, b, NODE, 30080);
        for (t, f, seq, ack) in [
            (&ob, TCP_ACK, 1001, 5001),
            (&ob, TCP_FIN | TCP_ACK, 1001, 5001),
            (&rb, TCP_FIN | TCP_ACK, 5001, 1002),
            (&ob, TCP_ACK, 1002, 5002),
        ] {
            let h = ct
                .lookup(now, PROTO_TCP, t, Some(tcp(f, seq, ack, 0)))
                .unwrap();
            assert!(!h.invalid);
        }
        assert_eq!(ct.state_of(PROTO_TCP, &ob), Some(TcpState::TimeWait));
        // A blind RST on the foreign reply key is checked against the window too.
        let h = ct
            .lookup(now, PROTO_TCP, &ra, Some(tcp(TCP_RST, 900_000, 0, 0)))
            .unwrap();
        assert!(h.invalid);
        // A new SYN takes the port in TIME_WAIT from the other share; the old key goes.
        let Ok(Created::New([_, rc], _)) = open(c) else {
            panic!()
        };
        assert_eq!(rc.dport, rb.dport);
        assert_eq!(ct.state_of(PROTO_TCP, &ob), None);
        assert_eq!(ct.foreign_keys(), 1);
        let h = ct.lookup(now, PROTO_TCP, &rc, None).unwrap();
        assert_eq!(h.target(), tup(CLIENT, c, NODE, 30080).reversed());
        ct.remove_where(|_, _, _| true);
        assert_eq!((ct.len(), ct.foreign_keys()), (0, 0));
    }

    #[test]
    fn workers_sharing_ports_across_shards_never_deadlock_or_lose_a_key() {
        // Four threads open, answer and remove connections whose ports come from each
        // other's shares (8 shards, 320 ports, 240 connections open at once), with
        // sweeps walking every shard alongside. A lock taken against the shard order
        // would hang this test; a lost or stale key would fail a lookup.
        let ct = Conntrack::new(100_000, 8, Timeouts::default(), 3);
        let ports = 61000..=61319;
        let now = Duration::ZERO;
        let away = AtomicU64::new(0);
        std::thread::scope(|sc| {
            for w in 0..4u8 {
                let (ct, ports, away) = (&ct, &ports, &away);
                sc.spawn(move || {
                    let client = IpAddr::from([10, 1, w, 0]);
                    let mine = move |o: &Tuple| o.src == client;
                    // Client ports whose connections all live in shard `w`: its own share
                    // (40 ports) cannot hold them.
                    let mut sports = (1024..=u16::MAX)
                        .filter(|p| ct.shard_of(client, *p) == usize::from(w))
                        .cycle();
                    for round in 0..200u16 {
                        let mut open = Vec::new();
                        for _ in 0..60 {
                            let sport = sports.next().unwrap_or(0);
                            let o = tup([10, 1, w, 0], sport, NODE, 30080);
                            let c = ct.create(
                                now,
                                PROTO_UDP,
                                &o,
                                (IpAddr::from(POD), 8080),
                                Some(IpAddr::from(NODE)),
                                ports,
                                Seg::flags(0),
                                false,
                            );
                            match c {
                                Ok(Created::New([_, r], _)) => {
                                    if ct.shard_of(r.dst, r.dport) != usize::from(w) {
                                        away.fetch_add(1, Ordering::Relaxed);
                                    }
                                    open.push((o, r));
                                }
                                other => panic!("worker {w} round {round}: {other:?}"),
                            }
                        }
                        for (o, r) in &open {
                            let h = ct.lookup(now, PROTO_UDP, r, Some(Seg::flags(0)));
                            assert_eq!(h.map(|h| h.target()), Some(o.reversed()));
                        }
                        if w == 0 {
                            ct.expire(now);
                        }
                        let n = ct.remove_where(|_, o, _| mine(o));
                        assert_eq!(n, 60, "worker {w} round {round}");
                    }
                });
            }
        });
        assert_eq!((ct.len(), ct.foreign_keys()), (0, 0));
        // At least 20 of each worker's 60 per round.
        assert!(away.into_inner() >= 4 * 200 * 20);
    }

    #[test]
    fn the_shard_hash_is_keyed() {
        // Under different keys the same ends land in different shards: a sender cannot
        // aim at one shard without knowing the process's key.
        let a = Conntrack::new(1_000, 64, Timeouts::default(), 1);
        let b = Conntrack::new(1_000, 64, Timeouts::default(), 2);
        let ip = IpAddr::from(CLIENT);
        let same = (0..1000u16)
            .filter(|p| a.shard_of(ip, *p) == b.shard_of(ip, *p))
            .count();
        assert!(same < 100, "{same} of 1000 ends in the same shard");
    }
}
