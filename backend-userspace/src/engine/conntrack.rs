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

use parking_lot::Mutex;

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
trait Addr: Copy + Eq + std::fmt::Debug {
    fn from_ip(ip: IpAddr) -> Option<Self>;
    fn to_ip(self) -> IpAddr;
    fn hash_word(self) -> u64;
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

#[derive(Clone, Copy, Debug)]
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
    fn eq(&self, o: &Self) -> bool {
        self.src == o.src && self.dst == o.dst && self.sport == o.sport && self.dport == o.dport
    }
    fn hash(&self, proto: u8) -> u64 {
        let a = fmix64(self.src.hash_word() ^ 0x9e37_79b9_7f4a_7c15);
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
    /// TCP sequence tracking.
    track: Track,
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
}

/// Stale half-open tuples remembered per table, at most.
const STALE_MAX: usize = 4096;

impl<A: Addr> Table<A> {
    fn new() -> Self {
        Table {
            entries: Vec::new(),
            free: Vec::new(),
            index: Vec::new(),
            keys: 0,
            live: 0,
            unassured: VecDeque::new(),
            cursor: 0,
            stale: HashMap::new(),
        }
    }

    fn mask(&self) -> usize {
        self.index.len().wrapping_sub(1)
    }

    fn find(&self, proto: u8, k: &Tup<A>) -> Option<(usize, u32, u8)> {
        if self.index.is_empty() {
            return None;
        }
        let h = k.hash(proto) as u32;
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
                    && e.t.get(usize::from(dir)).is_some_and(|t| t.eq(k))
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
        let h = k.hash(proto) as u32;
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
        for t in &e.t {
            if let Some((pos, _, _)) = self.find(e.proto, t) {
                self.remove_slot(pos);
            }
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
                if e.proto == PROTO_TCP
                    && TcpState::from_u8(e.state) == TcpState::SynRecv
                    && e.track.acked & 2 != 0
                {
                    self.remember_stale(e.t[1].to_tuple(), e.track.ack[1], now_ms, syn_recv_until);
                }
                self.remove_entry(idx);
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

/// Whether the reply key `r` can be used for a new connection: unused or expired, or held
/// by a connection `take` allows, which is removed here.
fn take_port<A: Addr>(t: &mut Table<A>, proto: u8, r: &Tuple, now_ms: u64, take: Take) -> bool {
    let Some(kr) = Tup::<A>::from_tuple(r) else {
        return false;
    };
    let Some((_, idx, _)) = t.find(proto, &kr) else {
        return true;
    };
    let Some(e) = t.entries.get(idx as usize) else {
        return false;
    };
    let state = TcpState::from_u8(e.state);
    let closed = e.proto == PROTO_TCP && matches!(state, TcpState::TimeWait | TcpState::Close);
    let reusable = e.expires <= now_ms
        || (take != Take::Free && closed)
        || (take == Take::HalfOpen && e.flags & F_REPLIED == 0);
    if reusable {
        t.remove_entry(idx);
    }
    reusable
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
                        v4: Table::new(),
                        v6: Table::new(),
                    })
                })
                .collect(),
            key,
            per_shard,
            timeouts,
            created: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            expired: AtomicU64::new(0),
        }
    }

    fn shard_of(&self, ip: IpAddr, port: u16) -> usize {
        keyed_shard(self.key, self.shards.len(), ip, port)
    }

    /// Finds the connection of a packet with this tuple and, when `update` is given (TCP:
    /// flags and sequence numbers; SCTP: its chunk set; flags 0 for other protocols),
    /// checks a TCP RST or FIN against the window, advances the state and refreshes the
    /// timeout. A RST or FIN outside the window comes back as an invalid [`Hit`], the
    /// connection untouched.
    pub(crate) fn lookup(
        &self,
        now: Duration,
        proto: u8,
        tuple: &Tuple,
        update: Option<Seg>,
    ) -> Option<Hit> {
        let a = self.shard_of(tuple.src, tuple.sport);
        let b = self.shard_of(tuple.dst, tuple.dport);
        if let Some(h) = self.lookup_in(a, now, proto, tuple, update) {
            return Some(h);
        }
        if b != a {
            return self.lookup_in(b, now, proto, tuple, update);
        }
        None
    }

    fn lookup_in(
        &self,
        shard: usize,
        now: Duration,
        proto: u8,
        tuple: &Tuple,
        update: Option<Seg>,
    ) -> Option<Hit> {
        let mut s = self.shards.get(shard)?.lock();
        let now_ms = ms(now);
        let timeouts = &self.timeouts;
        let expired = &self.expired;
        with_table!(
            s,
            tuple,
            |t, k| {
                let (_, idx, dir) = t.find(proto, &k)?;
                let e = *t.entries.get(idx as usize)?;
                if e.expires <= now_ms {
                    t.remove_entry(idx);
                    expired.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                let hit = Hit {
                    dir,
                    t: [e.t[0].to_tuple(), e.t[1].to_tuple()],
                    invalid: false,
                    host: e.host,
                };
                let mut state = TcpState::from_u8(e.state);
                if let Some(seg) = update {
                    let mut flags = e.flags;
                    let mut track = e.track;
                    if proto == PROTO_TCP {
                        // A new SYN on a closed connection starts over; anything else
                        // that would end it must be in the window.
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
                            return Some(Hit {
                                invalid: true,
                                ..hit
                            });
                        }
                        if dir == 1
                            && state == TcpState::SynSent
                            && seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
                            && seg.ack == track.end[0]
                            && !t.stale.is_empty()
                        {
                            // The endpoint answered this connection's own SYN: whatever
                            // it held on the tuple before is gone.
                            t.stale.remove(&e.t[1].to_tuple());
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
                        now_ms.saturating_add(ms(timeout_of(proto, state, flags, timeouts)));
                    if let Some(x) = t.entries.get_mut(idx as usize) {
                        x.state = state as u8;
                        x.flags = flags;
                        x.expires = expires;
                        x.track = track;
                    }
                }
                Some(hit)
            },
            None
        )
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
        let tcp = seg.flags;
        let shard = self.shard_of(orig.src, orig.sport);
        let mut s = self
            .shards
            .get(shard)
            .ok_or(DropReason::ConntrackFull)?
            .lock();
        let now_ms = ms(now);
        let per_shard = self.per_shard;
        let timeouts = &self.timeouts;
        let (nshards, key) = (self.shards.len(), self.key);
        let shard_of = |ip: IpAddr, port: u16| keyed_shard(key, nshards, ip, port);
        let mut track = Track::default();
        let (state, flags) = if proto == PROTO_TCP {
            let mut f = F_LIVE;
            track_segment(&mut track, &mut f, 0, &seg);
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
        let mut evicted = 0;
        let syn_recv_until = now_ms.saturating_add(ms(timeouts.tcp_syn_recv));
        let res = with_table!(
            s,
            orig,
            |t, ko| {
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
                while t.live >= per_shard {
                    if !t.evict_one(now_ms, syn_recv_until) {
                        return Err(DropReason::ConntrackFull);
                    }
                    evicted += 1;
                }
                let reply_dst = snat.unwrap_or(orig.src);
                let mut reply = Tuple {
                    src: endpoint.0,
                    dst: reply_dst,
                    sport: endpoint.1,
                    dport: orig.sport,
                };
                let keep_port = snat.is_none() && take_port(t, proto, &reply, now_ms, Take::Closed);
                if !keep_port {
                    // Port allocation: start at a flow-dependent offset and take the first
                    // port whose reply key lands in this shard and is unused; failing
                    // that, one held by a connection in TIME_WAIT or CLOSE (the kernel
                    // reuses those for a new SYN; the endpoint's side of the old
                    // connection may still be in TIME_WAIT, so a free port is better);
                    // failing that, the port of a half-open connection, which is evicted
                    // (a SYN flood must not lock new clients out).
                    let (lo, hi) = (*ports.start(), *ports.end());
                    if lo > hi {
                        return Err(DropReason::SnatExhausted);
                    }
                    let span = u32::from(hi - lo) + 1;
                    let start = (ko.hash(proto) % u64::from(span)) as u32;
                    let mut found = false;
                    'passes: for take in [Take::Free, Take::Closed, Take::HalfOpen] {
                        for i in 0..span {
                            let p = lo.wrapping_add(((start + i) % span) as u16);
                            if shard_of(reply_dst, p) != shard {
                                continue;
                            }
                            reply.dport = p;
                            if take_port(t, proto, &reply, now_ms, take) {
                                found = true;
                                if take == Take::HalfOpen {
                                    evicted += 1;
                                }
                                break 'passes;
                            }
                        }
                    }
                    if !found {
                        return Err(DropReason::SnatExhausted);
                    }
                }
                let Some(kr) = Tup::from_tuple(&reply) else {
                    return Err(DropReason::Malformed);
                };
                let expires = now_ms.saturating_add(ms(timeout_of(proto, state, flags, timeouts)));
                let e = Entry {
                    t: [ko, kr],
                    expires,
                    generation: 0,
                    proto,
                    state: state as u8,
                    flags,
                    host,
                    track,
                };
                let idx = t.alloc(e).ok_or(DropReason::ConntrackFull)?;
                let generation = t.entries.get(idx as usize).map_or(0, |e| e.generation);
                t.insert_key(proto, &ko, idx, 0);
                t.insert_key(proto, &kr, idx, 1);
                t.live += 1;
                t.unassured.push_back((idx, generation));
                if t.unassured.len() > 2 * per_shard + 64 {
                    t.compact_queue();
                }
                // A SYN on a tuple the endpoint may still hold half open from an evicted
                // connection: the endpoint must be reset first.
                let stale = if proto == PROTO_TCP && tcp & TCP_SYN != 0 {
                    t.stale_seq(&reply, now_ms)
                } else {
                    None
                };
                Ok(Created::New([*orig, reply], stale))
            },
            Err(DropReason::Malformed)
        );
        if evicted > 0 {
            self.evicted.fetch_add(evicted, Ordering::Relaxed);
        }
        if matches!(res, Ok(Created::New(..))) {
            self.created.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    /// Removes expired entries.
    pub(crate) fn expire(&self, now: Duration) {
        let now_ms = ms(now);
        let mut n = 0;
        for s in self.shards.iter() {
            let mut s = s.lock();
            n += sweep(&mut s.v4, now_ms);
            n += sweep(&mut s.v6, now_ms);
        }
        self.expired.fetch_add(n, Ordering::Relaxed);
    }

    /// Removes every connection for which `stale(proto, original, reply)` holds; returns
    /// how many.
    pub(crate) fn remove_where(&self, stale: impl Fn(u8, &Tuple, &Tuple) -> bool) -> usize {
        let mut n = 0;
        for s in self.shards.iter() {
            let mut s = s.lock();
            n += remove_in(&mut s.v4, &stale);
            n += remove_in(&mut s.v6, &stale);
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
