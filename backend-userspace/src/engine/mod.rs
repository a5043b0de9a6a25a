//! The sans-IO datapath engine: frames in, verdicts and frames out.
//!
//! [`Engine::handle_frame`] takes one Ethernet frame (and the time, on the caller's
//! monotonic clock) and decides: rewrite it in place and send it out a port
//! ([`Verdict::Forward`]), leave it to the kernel, drop it (counted by [`DropReason`]), or
//! keep it (queued for a neighbour, or an ARP or neighbour discovery packet handled).
//! Frames it generates (ARP requests and replies, Neighbor Solicitations and
//! Advertisements, ICMP and ICMPv6 errors, released queued packets) are appended to a
//! caller's `Vec`. [`Engine::poll_timeout`] / [`Engine::handle_timeout`] drive expiry and
//! ARP/NDP retries. The
//! engine reads no clock and does no I/O, so tests drive whole scenarios in microseconds;
//! the AF_PACKET driver owns sockets, rings and time.
//!
//! Per IPv4/IPv6 packet, in order (kube-proxy's semantics as the [`Plan`] states them):
//! 1. connection tracking, either direction: apply the connection's translation and route;
//! 2. frontend lookup: source ranges, backend set (or the `externalTrafficPolicy: Local`
//!    shortcut for pods and the node), empty set (REJECT with ICMP port unreachable, or
//!    DROP), Maglev selection with ClientIP affinity, DNAT, masquerade (with hairpin), a new
//!    connection entry, route;
//! 3. plain routing between owned ports for non-local destinations (TTL decrement, ICMP
//!    time exceeded);
//! 4. everything else goes to the kernel, or is dropped, as [`EngineConfig::unmatched`]
//!    says.
//!
//! Before that, IPv6 Neighbor Solicitations and Advertisements (module `ndp`) are answered
//! and learnt from, as ARP is.
//!
//! Headers are parsed and rewritten by hand at fixed offsets (module `wire`) with RFC 1624
//! incremental checksum updates, because etherparse's and smoltcp's views are read-only or
//! re-serialise whole headers. With [`Csum::Partial`] only the pseudo-header part of the L4
//! checksum is updated (addresses; the ports are summed later by the kernel). SCTP's
//! CRC32c cannot be updated incrementally: it is computed again over the rewritten packet
//! (with [`Csum::Partial`] it is left to whoever completes it). Neighbour discovery, which
//! the engine answers and originates rather than rewrites, is parsed and emitted with
//! smoltcp's wire representations.
//!
//! Before connection tracking, a packet passes the kernel's input checks (martians,
//! `rp_filter`, the node's own addresses; see [`Admission`]); tagged frames are never
//! forwarded; ICMP errors are rate-limited as the kernel's are ([`IcmpLimits`]).
//!
//! The host port ([`PortConfig::host_peer`]) brings the node's own traffic to Services: its
//! sources must be node addresses (a martian anywhere else), only frontends and tracked
//! connections are served there (nothing is routed on), the node's connections are always
//! masqueraded, and their replies, whose destination is a node address, leave through the
//! host port to its peer (the connection remembers where its original came in). The
//! loopback port ([`PortConfig::loopback`]) brings the node's connections to NodePorts on
//! its own addresses, served the same way (replies and ICMP errors out the host port);
//! every other frame on `lo` is the kernel's.
//!
//! Fragments (module `frag`): every IPv4 or IPv6 fragment that passes the input checks
//! is reassembled first, as conntrack's defragmentation does for all it sees (fragments to
//! a frontend, replies of translated connections, transit), bounded as the kernel bounds
//! it ([`Reassembly`]: a 4 MiB budget, 30 s, 65,535 bytes, fragments per datagram; an
//! overlap drops the datagram); the datagram then takes the same path as any packet.
//! Fragments addressed to the node itself stay the kernel's as well. A packet larger than
//! its egress port's MTU ([`PortConfig::mtu`]) is fragmented when IPv4 without DF, and
//! otherwise answered with ICMP "fragmentation needed" or ICMPv6 "packet too big" carrying
//! the MTU; a reassembled datagram leaves in fragments no larger than it arrived in
//! (`frag_max_size`), as the kernel refragments after conntrack.
//!
//! Not implemented: ICMPv6 errors quoting a packet with extension headers (not
//! translated), Router Advertisements and Redirects (left to the kernel), SCTP
//! multi-homing (each address pair is its own association), IPv4 options copied to every
//! fragment (the first fragment's header, options and all, is repeated).
#![forbid(unsafe_code)]

mod conntrack;
mod frag;
mod ndp;
mod neigh;
mod tables;
pub mod testing;
mod wire;

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use svcnat_core::conntrack::StaleFlow;
use svcnat_core::model::Protocol;
use svcnat_core::plan::{EmptyAction, Masquerade, Plan};

use conntrack::{Conntrack, Created, Hit, Seg, Tuple};
use neigh::{CachedNeighbour, Fib, NEIGHBOUR_CACHE, Neigh, Neighbours, Queued};
use tables::{Compiled, Registry};
use wire::*;

/// A map for the per-frame lookups in tables the engine builds from its configuration (the
/// plan's frontends, the FIB, the ports, the node's addresses): foldhash, seeded per
/// process, instead of SipHash (the engine bench: established forwards and replies about
/// 15% faster).
/// Packets choose what is looked up but never what is inserted, so flooding cannot grow a
/// probe sequence; tables that packets fill (neighbours, ICMP rate limits, conntrack with
/// its own keyed hash) keep their hashers.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Bytes of frames queued per unresolved neighbour at most (with at most 1,024 neighbours
/// being resolved at once, 64 MiB in all). The kernel's `unres_qlen_bytes` is 212,992
/// bytes of buffer (about 101 small packets) per neighbour, with up to `gc_thresh3` of
/// them.
pub const NEIGHBOUR_QUEUE_BYTES: usize = 64 * 1024;
/// The set form of [`FastMap`].
pub(crate) type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

pub use conntrack::TcpState;
pub use frag::Reassembly;

/// Identifies a port (an interface the datapath owns); the driver uses the interface index.
pub type PortId = u32;

/// An interface the datapath owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Port identifier (interface index).
    pub id: PortId,
    /// Interface name, for logs and errors.
    pub name: String,
    /// The interface's MAC address.
    pub mac: [u8; 6],
    /// Addresses configured on the interface (may be empty: Calico-style pod veths).
    pub addrs: Vec<ipnet::IpNet>,
    /// Extra addresses the engine answers ARP for on this port (a pods' gateway such as
    /// 169.254.1.1).
    pub proxy_arp: Vec<Ipv4Addr>,
    /// Extra addresses the engine answers IPv6 neighbour discovery for on this port (a
    /// pods' IPv6 gateway such as fe80::1).
    pub proxy_ndp: Vec<Ipv6Addr>,
    /// The interface's MTU (largest IP packet it sends); 0 when unknown: no limit.
    pub mtu: u32,
    /// `Some(peer MAC)` makes this the host port: the engine side of a veth pair whose
    /// other end stays with the node's IP stack, which routes the node's own traffic to
    /// Services into it. What arrives here must come from a node address; only
    /// frontends and tracked connections are served (nothing is routed on), the node's
    /// connections are always masqueraded into [`EngineConfig::snat_ports`], and their
    /// replies leave here for this MAC.
    pub host_peer: Option<[u8; 6]>,
    /// The node's loopback device (`lo`): the node's own packets to NodePorts on its own
    /// addresses arrive here (a local destination is sent out `lo`), and only those are
    /// served (as on the host port: masqueraded, replies out the host port); everything
    /// else on `lo` is the kernel's.
    pub loopback: bool,
}

/// A FIB entry: the longest matching prefix wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix.
    pub dst: ipnet::IpNet,
    /// Egress port.
    pub port: PortId,
    /// Next hop; `None` means on-link (the destination itself is the next hop).
    pub gateway: Option<IpAddr>,
}

/// One entry of the node's routing table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FibEntry {
    /// A route through a port the engine owns.
    Port(Route),
    /// A prefix the kernel routes through an interface the engine does not own, or
    /// drops (blackhole, unreachable, prohibit): the engine never forwards to it, and
    /// never falls through to a shorter prefix (a default route) for it.
    NotOurs(ipnet::IpNet),
}

/// IPv4 reverse-path filtering of one port, as `net.ipv4.conf.{all,IF}.rp_filter` (the
/// larger of the two) sets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RpFilter {
    /// 0: no source validation.
    #[default]
    Off,
    /// 1 (RFC 3704 strict): the route back to the source must leave through the port the
    /// packet arrived on.
    Strict,
    /// 2 (RFC 3704 loose): some route back to the source must exist.
    Loose,
}

impl RpFilter {
    /// The mode of a sysctl value (above 2 counts as loose, as in the kernel).
    pub fn from_sysctl(v: u32) -> RpFilter {
        match v {
            0 => RpFilter::Off,
            1 => RpFilter::Strict,
            _ => RpFilter::Loose,
        }
    }
}

/// What the kernel's input path checks before it forwards (`ip_route_input_slow`,
/// `fib_validate_source`, `ip6_forward`), given the node's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Admission {
    /// Reverse-path filtering per port (IPv4); a port not listed has none.
    pub rp_filter: HashMap<PortId, RpFilter>,
    /// Every address of the node, on any interface (owned or not): never forwarded to,
    /// and no IPv4 packet from outside may claim one as its source.
    pub node_addrs: HashSet<IpAddr>,
    /// Broadcast addresses of the node's IPv4 subnets: never forwarded to, never a
    /// source.
    pub broadcasts: HashSet<Ipv4Addr>,
}

/// [`Admission`] as the engine holds it: looked up on every frame.
#[derive(Debug, Default)]
struct Adm {
    rp_filter: FastMap<PortId, RpFilter>,
    node_addrs: FastSet<IpAddr>,
    broadcasts: FastSet<Ipv4Addr>,
}

/// What to do with packets the engine does not handle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unmatched {
    /// Leave them to the kernel (verdict [`Verdict::Kernel`]).
    #[default]
    Kernel,
    /// Drop them (verdict [`Verdict::Drop`] with [`DropReason::Unmatched`]).
    Drop,
}

/// Connection timeouts; the defaults are the kernel's nf_conntrack defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP SYN_SENT (`nf_conntrack_tcp_timeout_syn_sent`, 120 s).
    pub tcp_syn_sent: Duration,
    /// TCP SYN_RECV (60 s).
    pub tcp_syn_recv: Duration,
    /// TCP ESTABLISHED (432000 s, five days).
    pub tcp_established: Duration,
    /// TCP FIN_WAIT (120 s).
    pub tcp_fin_wait: Duration,
    /// TCP CLOSE_WAIT (60 s).
    pub tcp_close_wait: Duration,
    /// TCP LAST_ACK (30 s).
    pub tcp_last_ack: Duration,
    /// TCP TIME_WAIT (120 s).
    pub tcp_time_wait: Duration,
    /// TCP CLOSE, after a RST (10 s).
    pub tcp_close: Duration,
    /// UDP before a reply was seen (30 s).
    pub udp_unreplied: Duration,
    /// UDP after a reply was seen (`nf_conntrack_udp_timeout_stream`, 120 s).
    pub udp_stream: Duration,
    /// ICMP (30 s).
    pub icmp: Duration,
    /// SCTP after an INIT, before any reply (`nf_conntrack_sctp_timeout_cookie_wait`, 3 s).
    pub sctp_init: Duration,
    /// SCTP after a reply (`nf_conntrack_sctp_timeout_established`, 210 s).
    pub sctp_established: Duration,
    /// SCTP after an ABORT or SHUTDOWN COMPLETE (`nf_conntrack_sctp_timeout_closed`, 10 s).
    pub sctp_closed: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = Duration::from_secs;
        Timeouts {
            tcp_syn_sent: s(120),
            tcp_syn_recv: s(60),
            tcp_established: s(432_000),
            tcp_fin_wait: s(120),
            tcp_close_wait: s(60),
            tcp_last_ack: s(30),
            tcp_time_wait: s(120),
            tcp_close: s(10),
            udp_unreplied: s(30),
            udp_stream: s(120),
            icmp: s(30),
            sctp_init: s(3),
            sctp_established: s(210),
            sctp_closed: s(10),
        }
    }
}

/// Engine settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Hard bound on tracked connections.
    pub max_connections: usize,
    /// Source ports used for masquerading (default 61000..=65535, outside Linux's
    /// ephemeral range 32768..=60999).
    pub snat_ports: RangeInclusive<u16>,
    /// What to do with packets that match nothing.
    pub unmatched: Unmatched,
    /// Connection timeouts.
    pub timeouts: Timeouts,
    /// How long a resolved neighbour stays reachable before it is re-resolved.
    pub neighbour_reachable: Duration,
    /// Packets queued per unresolved neighbour (default 101, the kernel's `unres_qlen`),
    /// and at most [`NEIGHBOUR_QUEUE_BYTES`] of them.
    pub neighbour_queue: usize,
    /// Number of connection-table shards (rounded up to a power of two).
    pub shards: usize,
    /// Secret key of the connection table's shard hash: the driver draws a random one
    /// per process, so that no sender can aim its packets at one shard.
    pub hash_key: u64,
    /// ICMP error rate limits (the kernel's `icmp_ratelimit`, `icmp_msgs_per_sec`).
    pub icmp_limits: IcmpLimits,
    /// Bounds of IP reassembly (the kernel's `ipfrag_*` sysctls).
    pub reassembly: Reassembly,
}

/// ICMP error rate limits, with the kernel's defaults and meaning: per destination one
/// token every `per_destination` (`net.ipv4.icmp_ratelimit`, 1000 ms; a bucket holds six,
/// `XRLIM_BURST_FACTOR`), and for the whole engine `per_second` errors with bursts of
/// `burst` (`icmp_msgs_per_sec` 1000, `icmp_msgs_burst` 50).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpLimits {
    /// Time per token of a destination's bucket; zero disables the limit.
    pub per_destination: Duration,
    /// Errors per second for all destinations together; zero disables the limit.
    pub per_second: u32,
    /// Burst of the global bucket.
    pub burst: u32,
}

impl Default for IcmpLimits {
    fn default() -> Self {
        IcmpLimits {
            per_destination: Duration::from_millis(1000),
            per_second: 1000,
            burst: 50,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_connections: 262_144,
            snat_ports: 61000..=65535,
            unmatched: Unmatched::Kernel,
            timeouts: Timeouts::default(),
            neighbour_reachable: Duration::from_secs(30),
            neighbour_queue: 101,
            shards: 64,
            hash_key: 0,
            icmp_limits: IcmpLimits::default(),
            reassembly: Reassembly::default(),
        }
    }
}

/// State of the L4 checksum of a received frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Csum {
    /// The checksum is complete (and can be verified).
    #[default]
    Complete,
    /// The L4 checksum field holds only the pseudo-header sum (`CHECKSUM_PARTIAL`,
    /// virtio_net_hdr `NEEDS_CSUM`): the kernel completes it on transmit.
    Partial,
}

/// Metadata of a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxMeta {
    /// The port it arrived on.
    pub port: PortId,
    /// Its L4 checksum state.
    pub csum: Csum,
}

/// A frame the engine generated (ARP, neighbour discovery, ICMP errors, released queued
/// packets); its checksums are always complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxFrame {
    /// Port to send it out of.
    pub port: PortId,
    /// The Ethernet frame.
    pub data: Vec<u8>,
}

/// Why a frame was dropped.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Too short for the headers it claims, or inconsistent lengths.
    Truncated,
    /// A header field has an impossible value (IP version, header length).
    Malformed,
    /// The IPv4 header checksum is wrong.
    BadIpChecksum,
    /// The TCP/UDP checksum (SCTP: CRC32c) of a connection-creating packet, or the ICMPv6
    /// checksum of a neighbour discovery message, is wrong.
    BadL4Checksum,
    /// A fragment reassembly refuses, dropping its datagram (an empty fragment, an IPv6
    /// one not a multiple of 8 bytes, lengths that disagree, more than 65,535 bytes, too
    /// many fragments, an IPv6 first fragment without the upper-layer header).
    Fragment,
    /// A fragment that partly overlaps one held: its datagram is dropped (RFC 5722).
    FragmentOverlap,
    /// The reassembly memory budget is spent (`ipfrag_high_thresh`): fragments are dropped.
    FragmentMemory,
    /// Held fragments of a datagram not completed in time (`ipfrag_time`).
    FragmentTimeout,
    /// Larger than the egress MTU and not to be fragmented (IPv4 DF, or IPv6): an ICMP
    /// "fragmentation needed" or ICMPv6 "packet too big" was sent.
    TooBig,
    /// The client is outside the frontend's `loadBalancerSourceRanges`.
    SourceRange,
    /// The Service has no endpoints and rejects: an ICMP port unreachable was sent.
    Rejected,
    /// The Service has no endpoints here and drops (`externalTrafficPolicy: Local`).
    NoEndpoints,
    /// TTL or hop limit expired: an ICMP time exceeded was sent.
    TtlExceeded,
    /// The connection table is full of established connections.
    ConntrackFull,
    /// No masquerade source port is free for this endpoint.
    SnatExhausted,
    /// No route to the destination through a port the engine owns.
    NoRoute,
    /// The neighbour is unresolved and its queue is full, or resolution failed.
    NoNeighbour,
    /// Matched nothing and the configuration says drop.
    Unmatched,
    /// A frame arrived on a port the engine does not know.
    UnknownPort,
    /// A TCP packet that can neither start nor continue a connection (a RST without one):
    /// conntrack's INVALID, which kube-proxy drops.
    Invalid,
    /// A Neighbor Solicitation or Advertisement that fails RFC 4861's checks (hop limit
    /// not 255, a bad code, length or option, a multicast target).
    InvalidNdp,
    /// A source or destination the kernel never routes (RFC 1812 5.3.7, RFC 4291): a
    /// multicast, broadcast, unspecified, loopback or IPv4-mapped source, one of the
    /// node's own IPv4 addresses as source from outside, a loopback or unspecified
    /// destination.
    Martian,
    /// The source fails reverse-path filtering (`rp_filter`) on the arriving port.
    ReversePath,
    /// A frame with an IEEE 802.1Q/802.1ad tag: the kernel's (a VLAN device's) or
    /// nobody's, never forwarded as if untagged.
    Vlan,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 24] = [
        DropReason::Truncated,
        DropReason::Malformed,
        DropReason::BadIpChecksum,
        DropReason::BadL4Checksum,
        DropReason::Fragment,
        DropReason::FragmentOverlap,
        DropReason::FragmentMemory,
        DropReason::FragmentTimeout,
        DropReason::TooBig,
        DropReason::SourceRange,
        DropReason::Rejected,
        DropReason::NoEndpoints,
        DropReason::TtlExceeded,
        DropReason::ConntrackFull,
        DropReason::SnatExhausted,
        DropReason::NoRoute,
        DropReason::NoNeighbour,
        DropReason::Unmatched,
        DropReason::UnknownPort,
        DropReason::Invalid,
        DropReason::InvalidNdp,
        DropReason::Martian,
        DropReason::ReversePath,
        DropReason::Vlan,
    ];

    /// A short snake_case name for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Malformed => "malformed",
            DropReason::BadIpChecksum => "bad_ip_checksum",
            DropReason::BadL4Checksum => "bad_l4_checksum",
            DropReason::Martian => "martian",
            DropReason::ReversePath => "reverse_path",
            DropReason::Vlan => "vlan",
            DropReason::Fragment => "fragment",
            DropReason::FragmentOverlap => "fragment_overlap",
            DropReason::FragmentMemory => "fragment_memory",
            DropReason::FragmentTimeout => "fragment_timeout",
            DropReason::TooBig => "too_big",
            DropReason::SourceRange => "source_range",
            DropReason::Rejected => "rejected",
            DropReason::NoEndpoints => "no_endpoints",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::ConntrackFull => "conntrack_full",
            DropReason::SnatExhausted => "snat_exhausted",
            DropReason::NoRoute => "no_route",
            DropReason::NoNeighbour => "no_neighbour",
            DropReason::Unmatched => "unmatched",
            DropReason::UnknownPort => "unknown_port",
            DropReason::Invalid => "invalid",
            DropReason::InvalidNdp => "invalid_ndp",
        }
    }
}

/// What the driver must do with a received frame.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The frame was rewritten in place (same length): send it out `port`, with the same
    /// checksum state it came with.
    Forward {
        /// Egress port.
        port: PortId,
    },
    /// Not ours: do nothing (the kernel has its own copy).
    Kernel,
    /// Dropped, for this reason (counted).
    Drop(DropReason),
    /// Queued awaiting neighbour resolution, or an ARP or neighbour discovery packet the
    /// engine handled.
    Consumed,
}

/// A snapshot of the engine's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames forwarded (verdict `Forward`, plus released queued frames).
    pub forwarded: u64,
    /// Frames left to the kernel.
    pub kernel: u64,
    /// Frames consumed (queued, or ARP or neighbour discovery handled).
    pub consumed: u64,
    /// Drops by reason, in [`DropReason::ALL`] order.
    pub drops: Vec<(DropReason, u64)>,
    /// Frames generated (ARP, neighbour discovery, ICMP errors).
    pub generated: u64,
    /// ICMP errors not sent because of the rate limits.
    pub icmp_limited: u64,
    /// Connections currently tracked.
    pub connections: u64,
    /// Connections created since start.
    pub connections_created: u64,
    /// Connections evicted to make room.
    pub connections_evicted: u64,
    /// Connections expired by timeout.
    pub connections_expired: u64,
    /// Neighbour entries.
    pub neighbours: u64,
    /// Datagrams reassembled from fragments.
    pub reassembled: u64,
    /// Fragments sent (datagrams split for a smaller MTU or to their original size).
    pub fragments_sent: u64,
    /// Incomplete datagrams held for reassembly.
    pub reassembly_pending: u64,
    /// Bytes accounted to held fragments.
    pub reassembly_memory: u64,
}

/// The owned ports and the addresses that are the node's own.
#[derive(Debug, Default)]
struct Ports {
    by_id: FastMap<PortId, PortConfig>,
    /// Addresses configured on owned ports and answered by proxy ARP or NDP.
    local: FastSet<IpAddr>,
    /// The host port ([`PortConfig::host_peer`]), if there is one.
    host: Option<PortId>,
    /// The loopback port ([`PortConfig::loopback`]), if there is one.
    lo: Option<PortId>,
}

impl Ports {
    /// The port's first address of a family that can be used beyond the link (IPv6
    /// link-local addresses cannot: they are no source for masquerading or ICMP errors).
    fn addr_of(&self, id: PortId, v6: bool) -> Option<IpAddr> {
        self.by_id
            .get(&id)?
            .addrs
            .iter()
            .map(|n| n.addr())
            .find(|a| a.is_ipv6() == v6 && !is_link_local(*a))
    }

    /// Whether what arrives on `id` is the node's own traffic (the host port or `lo`).
    fn node_origin(&self, id: PortId) -> bool {
        self.host == Some(id) || self.lo == Some(id)
    }
}

/// An IPv6 link-local address (fe80::/10): never forwarded, never translated.
fn is_link_local(a: IpAddr) -> bool {
    matches!(a, IpAddr::V6(a) if a.is_unicast_link_local())
}

/// Counter stripes owned by one thread each (see [`CounterSlot`]), so that workers on
/// different cores never write the same cache line; reading the counters sums them.
const STRIPES: usize = 16;

/// Slot numbers of threads that ended, for the next threads to take.
static FREE_SLOTS: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());
/// The next slot number never taken.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

/// A thread's counter slot: a number no other live thread holds, taken when the thread
/// first counts and given back when it ends. Below [`STRIPES`], the thread is the only
/// writer of that stripe of every engine's counters (it counts with a load and a store, no
/// read-modify-write); threads beyond share the last stripe with atomic additions.
struct CounterSlot(usize);

impl CounterSlot {
    fn take() -> CounterSlot {
        let free = FREE_SLOTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        CounterSlot(free.unwrap_or_else(|| NEXT_SLOT.fetch_add(1, Ordering::Relaxed)))
    }
}

impl Drop for CounterSlot {
    fn drop(&mut self) {
        // The lock orders this thread's last counts before the next holder's first.
        FREE_SLOTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(self.0);
    }
}

thread_local! {
    static COUNTER_SLOT: CounterSlot = CounterSlot::take();
}

/// One stripe of the counters (kept on cache lines of its own by [`CachePadded`]: 128
/// bytes on x86-64, whose adjacent-line prefetcher moves lines in pairs).
#[derive(Debug, Default)]
struct Stripe {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    forwarded: AtomicU64,
    kernel: AtomicU64,
    consumed: AtomicU64,
    generated: AtomicU64,
    icmp_limited: AtomicU64,
    reassembled: AtomicU64,
    fragments_sent: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

/// The calling thread's stripe of an engine's counters.
#[derive(Clone, Copy)]
struct Local<'a> {
    stripe: &'a Stripe,
    /// This thread is the stripe's only writer.
    owned: bool,
}

impl Local<'_> {
    fn add(self, counter: impl Fn(&Stripe) -> &AtomicU64, n: u64) {
        self.add_to(counter(self.stripe), n);
    }

    fn add_to(self, c: &AtomicU64, n: u64) {
        if self.owned {
            // Single writer: readers see either value, and no addition is lost.
            c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        } else {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn drop(self, r: DropReason) {
        self.drop_n(r, 1);
    }

    fn drop_n(self, r: DropReason, n: u64) {
        let i = DropReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        if let Some(c) = self.stripe.drops.get(i)
            && n > 0
        {
            self.add_to(c, n);
        }
    }
}

/// The engine's frame counters: one stripe per counting thread, plus one shared by the
/// threads beyond [`STRIPES`] (and by a thread counting while it ends).
#[derive(Debug, Default)]
struct Stats {
    stripes: Box<[CachePadded<Stripe>; STRIPES + 1]>,
}

impl Stats {
    /// The calling thread's stripe, to count into.
    fn local(&self) -> Local<'_> {
        match COUNTER_SLOT.try_with(|s| s.0) {
            Ok(i) if i < STRIPES => Local {
                stripe: &self.stripes[i],
                owned: true,
            },
            _ => Local {
                stripe: &self.stripes[STRIPES],
                owned: false,
            },
        }
    }

    /// The total of one counter over all stripes.
    fn total(&self, counter: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes.iter().fold(0, |sum, s| {
            sum.wrapping_add(counter(s).load(Ordering::Relaxed))
        })
    }
}

/// Layer-4 facts of a packet.
#[derive(Clone, Copy, Debug)]
struct L4 {
    sport: u16,
    dport: u16,
    /// TCP flags; for SCTP the set of its chunks (`wire::sctp_chunks`); 0 for UDP.
    flags: u8,
    /// What connection tracking needs (TCP: sequence numbers too).
    seg: Seg,
}

/// ICMP types that carry a quoted packet.
fn is_icmp_error(v6: bool, ty: u8) -> bool {
    if v6 {
        matches!(ty, 1..=4)
    } else {
        matches!(ty, 3 | 4 | 5 | 11 | 12)
    }
}

/// The kernel's ICMP error rate limits: a token bucket per destination
/// (`inet_peer_xrlim_allow`) and one for the whole engine (`icmp_global_allow`).
#[derive(Debug)]
struct IcmpLimiter {
    limits: IcmpLimits,
    /// (credit, last refill) of the global bucket.
    global: Mutex<(u32, Duration)>,
    /// (tokens in ms, last refill) per destination.
    per_dst: Mutex<HashMap<IpAddr, (u64, Duration)>>,
}

/// Destinations whose buckets are remembered (the kernel's inet_peer cache is bounded too).
const ICMP_DESTINATIONS: usize = 4096;
/// XRLIM_BURST_FACTOR: a destination's bucket holds this many tokens.
const XRLIM_BURST_FACTOR: u64 = 6;

impl IcmpLimiter {
    fn new(limits: IcmpLimits) -> IcmpLimiter {
        IcmpLimiter {
            global: Mutex::new((limits.burst, Duration::ZERO)),
            per_dst: Mutex::new(HashMap::new()),
            limits,
        }
    }

    /// Whether an error to `dst` may be sent now (and takes its tokens if so).
    fn allow(&self, now: Duration, dst: IpAddr) -> bool {
        let l = &self.limits;
        if l.per_second > 0 {
            let mut g = self.global.lock();
            let elapsed = now.saturating_sub(g.1);
            let refill = (elapsed.as_millis() * u128::from(l.per_second) / 1000) as u64;
            if refill > 0 {
                g.0 = u64::from(g.0)
                    .saturating_add(refill)
                    .min(u64::from(l.burst)) as u32;
                g.1 = now;
            }
            if g.0 == 0 {
                return false;
            }
            g.0 -= 1;
        }
        let timeout = u64::try_from(l.per_destination.as_millis()).unwrap_or(u64::MAX);
        if timeout == 0 {
            return true;
        }
        let cap = timeout.saturating_mul(XRLIM_BURST_FACTOR);
        let mut m = self.per_dst.lock();
        if m.len() >= ICMP_DESTINATIONS && !m.contains_key(&dst) {
            // Forget the destinations whose buckets are full again (idle ones).
            m.retain(|_, (tokens, last)| {
                let t = tokens.saturating_add(now.saturating_sub(*last).as_millis() as u64);
                t < cap
            });
            if m.len() >= ICMP_DESTINATIONS {
                return false;
            }
        }
        let (tokens, last) = m.entry(dst).or_insert((cap, now));
        let t = tokens
            .saturating_add(now.saturating_sub(*last).as_millis() as u64)
            .min(cap);
        *last = now;
        if t >= timeout {
            *tokens = t - timeout;
            true
        } else {
            *tokens = t;
            false
        }
    }
}

/// Which ICMP error to generate.
#[derive(Clone, Copy, Debug)]
enum IcmpKind {
    PortUnreachable,
    TimeExceeded,
    /// IPv4 fragmentation needed / IPv6 packet too big, with the next-hop MTU.
    TooBig(u32),
}

/// How a packet leaves through its egress port.
#[derive(Clone, Copy, Debug)]
enum Fit {
    /// As it is.
    Whole,
    /// Split into fragments of at most this many bytes (IP packet), IPv6 ones with this
    /// identification.
    Split(usize, u32),
}

/// What reassembly tells forwarding about a reassembled datagram.
#[derive(Clone, Copy, Debug)]
struct Reasm {
    /// The largest fragment it arrived in (`frag_max_size`).
    max_size: usize,
    /// Its identification.
    id: u32,
}

/// The tables a frame is processed with, built from the engine's configuration: taken
/// once per frame (see [`CachedSnapshot`]) and passed down by reference. A setter replaces
/// the one table it changes and stores a new snapshot.
#[derive(Clone, Debug, Default)]
struct Snapshot {
    ports: Arc<Ports>,
    fib: Arc<Fib>,
    plan: Arc<Compiled>,
    adm: Arc<Adm>,
    /// Permanent neighbours (never expire).
    static_neigh: Arc<FastMap<(PortId, IpAddr), [u8; 6]>>,
}

/// A thread's copy of the last snapshot it used, reused while its engine's generation is
/// unchanged: a frame then costs no `ArcSwap` load (whose read-modify-writes were most of
/// what remained of configuration access). A thread keeps the one snapshot until its next
/// frame (an idle worker holds the tables it last used, as of before a later update) or
/// until it ends.
struct CachedSnapshot {
    /// [`Engine::id`].
    engine: u64,
    /// [`Engine::generation`] when `snap` was loaded (or older: never newer).
    generation: u64,
    snap: Arc<Snapshot>,
}

thread_local! {
    static SNAPSHOT_CACHE: Cell<Option<CachedSnapshot>> = const { Cell::new(None) };
}

/// The neighbour table locked for writing ([`Engine::neigh_write`]).
struct NeighWrite<'a> {
    map: RwLockWriteGuard<'a, Neighbours>,
    generation: &'a AtomicU64,
}

impl std::ops::Deref for NeighWrite<'_> {
    type Target = Neighbours;
    fn deref(&self) -> &Neighbours {
        &self.map
    }
}

impl std::ops::DerefMut for NeighWrite<'_> {
    fn deref_mut(&mut self) -> &mut Neighbours {
        &mut self.map
    }
}

impl Drop for NeighWrite<'_> {
    fn drop(&mut self) {
        // Runs before `map` unlocks: a reader that sees the table as this writer left it
        // sees this generation, or a later one, thereafter.
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// Numbers engines, for [`CachedSnapshot::engine`].
static NEXT_ENGINE: AtomicU64 = AtomicU64::new(0);

/// The sans-IO engine. `Send + Sync`: workers on several cores share one engine.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    /// The configuration tables, loaded once per frame.
    snap: ArcSwap<Snapshot>,
    /// Serialises the setters' read-modify-store of `snap`.
    update: Mutex<()>,
    /// This engine's number (unique in the process).
    id: u64,
    /// Incremented after each store of `snap`.
    generation: AtomicU64,
    registry: Mutex<Registry>,
    ct: Conntrack,
    neigh: RwLock<Neighbours>,
    /// Incremented by every writer of `neigh` before it unlocks (see [`NeighWrite`]).
    neigh_generation: AtomicU64,
    next_sweep: Mutex<Duration>,
    icmp_limit: IcmpLimiter,
    defrag: frag::Defrag,
    stats: Stats,
}

impl Engine {
    /// An engine with no ports, routes or plan.
    pub fn new(cfg: EngineConfig) -> Engine {
        let ct = Conntrack::new(
            cfg.max_connections,
            cfg.shards,
            cfg.timeouts.clone(),
            cfg.hash_key,
        );
        Engine {
            ct,
            snap: ArcSwap::from_pointee(Snapshot::default()),
            update: Mutex::new(()),
            id: NEXT_ENGINE.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            registry: Mutex::new(Registry::default()),
            neigh: RwLock::new(HashMap::new()),
            neigh_generation: AtomicU64::new(0),
            next_sweep: Mutex::new(Duration::ZERO),
            icmp_limit: IcmpLimiter::new(cfg.icmp_limits.clone()),
            defrag: frag::Defrag::new(cfg.reassembly.clone()),
            stats: Stats::default(),
            cfg,
        }
    }

    /// Stores a new snapshot: the current one with `change` applied.
    fn update(&self, change: impl FnOnce(&mut Snapshot)) {
        let _serial = self.update.lock();
        let mut s = Snapshot::clone(&self.snap.load());
        change(&mut s);
        self.snap.store(Arc::new(s));
        // After the store: a thread that sees the new generation loads this snapshot or a
        // newer one.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Runs `f` with the current snapshot: the calling thread's cached copy when no setter
    /// stored one since it was loaded, else a fresh load (then cached).
    fn with_snapshot<R>(&self, f: impl FnOnce(&Snapshot) -> R) -> R {
        let generation = self.generation.load(Ordering::Acquire);
        let cached = SNAPSHOT_CACHE
            .try_with(Cell::take)
            .ok()
            .flatten()
            .filter(|c| c.engine == self.id && c.generation == generation);
        let c = cached.unwrap_or_else(|| CachedSnapshot {
            engine: self.id,
            generation,
            snap: self.snap.load_full(),
        });
        let r = f(&c.snap);
        // While the thread ends, nothing is cached.
        let _ = SNAPSHOT_CACHE.try_with(|cell| cell.set(Some(c)));
        r
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Replaces the set of owned ports.
    pub fn set_ports(&self, ports: Vec<PortConfig>) {
        let mut p = Ports::default();
        for port in ports {
            p.local.extend(port.addrs.iter().map(|n| n.addr()));
            p.local
                .extend(port.proxy_arp.iter().map(|a| IpAddr::V4(*a)));
            p.local
                .extend(port.proxy_ndp.iter().map(|a| IpAddr::V6(*a)));
            if port.host_peer.is_some() {
                p.host = Some(port.id);
            }
            if port.loopback {
                p.lo = Some(port.id);
            }
            p.by_id.insert(port.id, port);
        }
        let p = Arc::new(p);
        self.update(|s| s.ports = p);
    }

    /// Replaces the FIB with routes through owned ports only.
    pub fn set_routes(&self, routes: Vec<Route>) {
        self.set_fib(routes.into_iter().map(FibEntry::Port).collect());
    }

    /// Replaces the FIB with the node's routing table (among equal prefixes the first
    /// entry wins, as the lowest metric in `ip route`'s order).
    pub fn set_fib(&self, entries: Vec<FibEntry>) {
        let fib = Arc::new(Fib::new(entries));
        self.update(|s| s.fib = fib);
    }

    /// Replaces what the kernel's input path would check (reverse-path filtering, the
    /// node's addresses and broadcasts).
    pub fn set_admission(&self, admission: Admission) {
        // Destructured, so that a new field cannot be forgotten here.
        let Admission {
            rp_filter,
            node_addrs,
            broadcasts,
        } = admission;
        let adm = Arc::new(Adm {
            rp_filter: rp_filter.into_iter().collect(),
            node_addrs: node_addrs.into_iter().collect(),
            broadcasts: broadcasts.into_iter().collect(),
        });
        self.update(|s| s.adm = adm);
    }

    /// Compiles and swaps the plan's lookup tables; existing connections keep their endpoint.
    pub fn set_plan(&self, plan: &Plan) {
        // The registry stays locked until the plan is stored: two concurrent calls store
        // in the order they compiled.
        let mut registry = self.registry.lock();
        let compiled = Arc::new(registry.compile(plan));
        self.update(|s| s.plan = compiled);
    }

    /// Forgets the connections that `flows` made stale (UDP flows to a departed endpoint,
    /// flows to a frontend that just got its first endpoints), so that their next packet
    /// is translated by the current plan; returns how many. Nothing else is touched: TCP
    /// connections keep their endpoint, as with kernel conntrack.
    pub fn forget_stale(&self, flows: &BTreeSet<StaleFlow>) -> usize {
        if flows.is_empty() {
            return 0;
        }
        self.ct.remove_where(|proto, orig, reply| {
            let protocol = match proto {
                wire::PROTO_UDP => Protocol::Udp,
                wire::PROTO_TCP => Protocol::Tcp,
                wire::PROTO_SCTP => Protocol::Sctp,
                _ => return false,
            };
            let orig_dst = SocketAddr::new(orig.dst, orig.dport);
            let reply_src = SocketAddr::new(reply.src, reply.sport);
            flows
                .iter()
                .any(|f| f.matches(protocol, orig_dst, reply_src))
        })
    }

    /// Adds a permanent neighbour (never resolved, never expired: entries the driver
    /// copies from the kernel's table, or fixed next hops). Permanent neighbours are part
    /// of the configuration snapshot frames read without a lock: each call copies them.
    pub fn add_neighbour(&self, port: PortId, ip: IpAddr, mac: [u8; 6]) {
        self.update(|s| {
            Arc::make_mut(&mut s.static_neigh).insert((port, ip), mac);
        });
    }

    /// The TCP state of the connection whose original direction is `src:sport -> dst:dport`
    /// (protocol number `proto`), if tracked; for tests and introspection.
    pub fn connection_state(
        &self,
        proto: u8,
        src: std::net::SocketAddr,
        dst: std::net::SocketAddr,
    ) -> Option<TcpState> {
        self.ct.state_of(
            proto,
            &Tuple {
                src: src.ip(),
                dst: dst.ip(),
                sport: src.port(),
                dport: dst.port(),
            },
        )
    }

    /// Heap bytes held by the connection table (for memory accounting).
    pub fn conntrack_heap_bytes(&self) -> usize {
        self.ct.heap_bytes()
    }

    /// Handles one received frame; generated frames are appended to `tx`.
    pub fn handle_frame(
        &self,
        now: Duration,
        meta: RxMeta,
        frame: &mut [u8],
        tx: &mut Vec<TxFrame>,
    ) -> Verdict {
        let st = self.stats.local();
        st.add(|s| &s.rx_packets, 1);
        st.add(|s| &s.rx_bytes, frame.len() as u64);
        let before = tx.len();
        let v = self.with_snapshot(|snap| self.process(now, meta, snap, frame, tx));
        let generated = tx.len().saturating_sub(before) as u64;
        if generated > 0 {
            st.add(|s| &s.generated, generated);
        }
        match v {
            Verdict::Forward { .. } => st.add(|s| &s.forwarded, 1),
            Verdict::Kernel => st.add(|s| &s.kernel, 1),
            Verdict::Consumed => st.add(|s| &s.consumed, 1),
            Verdict::Drop(r) => st.drop(r),
        }
        v
    }

    fn unmatched(&self) -> Verdict {
        match self.cfg.unmatched {
            Unmatched::Kernel => Verdict::Kernel,
            Unmatched::Drop => Verdict::Drop(DropReason::Unmatched),
        }
    }

    fn process(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &mut [u8],
        tx: &mut Vec<TxFrame>,
    ) -> Verdict {
        let Some(port) = snap.ports.by_id.get(&meta.port) else {
            return Verdict::Drop(DropReason::UnknownPort);
        };
        if frame.len() < ETH_LEN {
            return Verdict::Drop(DropReason::Truncated);
        }
        if port.loopback {
            return self.handle_loopback(now, meta, snap, frame, tx);
        }
        let dst_mac = frame.get(0..6).unwrap_or(&[]);
        let to_us = dst_mac == port.mac;
        match rd16(frame, 12) {
            ETH_ARP => {
                if !to_us && dst_mac != [0xff; 6] {
                    return Verdict::Kernel;
                }
                self.handle_arp(now, port, frame, tx)
            }
            t @ (ETH_IPV4 | ETH_IPV6) => {
                // Neighbor Solicitations go to a multicast MAC (solicited-node), or to
                // ours when they check reachability.
                let multicast = dst_mac.first().is_some_and(|b| b & 1 != 0);
                if t == ETH_IPV6
                    && (to_us || multicast)
                    && let Some(v) = self.handle_ndp(now, port, frame, tx)
                {
                    return v;
                }
                if !to_us {
                    return Verdict::Kernel;
                }
                match self.handle_ip(now, meta, snap, frame, t == ETH_IPV6, tx) {
                    Ok(v) => v,
                    Err(r) => Verdict::Drop(r),
                }
            }
            // 802.1Q, 802.1ad, QinQ: the tagged VLAN's device is the kernel's; a VLAN the
            // node does not have is dropped by the kernel. Never forwarded untagged.
            ETH_VLAN | ETH_QINQ | 0x9100 => Verdict::Drop(DropReason::Vlan),
            _ => self.unmatched(),
        }
    }

    /// A frame on `lo`: the node talking to itself. Only its connections to a NodePort on
    /// one of its own addresses (not 127.0.0.1 or ::1, which are not served) are the
    /// engine's, as kube-proxy's OUTPUT rules translate them; the driver's ingress chain on
    /// `lo` drops exactly these (by address, protocol and NodePort), so the two must agree:
    /// everything else is the kernel's, whatever it is.
    fn handle_loopback(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &mut [u8],
        tx: &mut Vec<TxFrame>,
    ) -> Verdict {
        let v6 = match rd16(frame, 12) {
            ETH_IPV4 => false,
            ETH_IPV6 => true,
            _ => return Verdict::Kernel,
        };
        let Ok(ip) = parse_ip(frame, ETH_LEN, v6, true) else {
            return Verdict::Kernel;
        };
        let adm = &snap.adm;
        // What `lo` carries was sent by the node, from and to its own addresses.
        if ip.frag != Frag::No
            || !matches!(ip.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
            || ip.dst.is_loopback()
            || !adm.node_addrs.contains(&ip.src)
            || !adm.node_addrs.contains(&ip.dst)
        {
            return Verdict::Kernel;
        }
        let Some(dport) = frame.get(ip.l4 + 2..ip.l4 + 4).map(|b| rd16(b, 0)) else {
            return Verdict::Kernel;
        };
        let node_port = snap
            .plan
            .frontends
            .get(&(ip.dst, ip.proto, dport))
            .is_some_and(|fe| fe.node_port);
        if !node_port {
            return Verdict::Kernel;
        }
        match self.route_ip(now, meta, snap, frame, &ip, None, tx) {
            Ok(v) => v,
            Err(r) => Verdict::Drop(r),
        }
    }

    fn handle_ip(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &mut [u8],
        v6: bool,
        tx: &mut Vec<TxFrame>,
    ) -> Result<Verdict, DropReason> {
        let ip = parse_ip(frame, ETH_LEN, v6, true)?;
        let adm = &snap.adm;
        let from_host = snap.ports.host == Some(meta.port);
        admit(meta.port, from_host, &ip, adm, &snap.fib)?;
        if ip.frag != Frag::No {
            return self.handle_fragment(now, meta, snap, frame, &ip, tx);
        }
        self.route_ip(now, meta, snap, frame, &ip, None, tx)
    }

    /// A fragment: into reassembly (as conntrack's defragmentation takes every fragment
    /// it sees); the completed datagram goes through the same path as any packet.
    /// Fragments addressed to the node itself stay the kernel's too (it has its own copy,
    /// and decides for itself what is not a frontend's).
    #[allow(clippy::too_many_arguments)]
    fn handle_fragment(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &mut [u8],
        ip: &Ip,
        tx: &mut Vec<TxFrame>,
    ) -> Result<Verdict, DropReason> {
        let (plan, adm) = (&snap.plan, &snap.adm);
        let local = snap.ports.local.contains(&ip.dst)
            || plan.node_ips.contains(&ip.dst)
            || adm.node_addrs.contains(&ip.dst)
            || matches!(ip.dst, IpAddr::V4(d) if adm.broadcasts.contains(&d))
            || ip.dst.is_multicast()
            || is_link_local(ip.dst);
        let held = if local {
            Ok(Verdict::Kernel)
        } else {
            Ok(Verdict::Consumed)
        };
        let done = match self.defrag.offer(now, frame, ip) {
            frag::Offer::Held => return held,
            frag::Offer::Refused(r, n) => {
                self.stats.local().drop_n(r, n);
                if local {
                    self.stats.local().drop(r);
                    return held;
                }
                return Err(r);
            }
            frag::Offer::Complete(r) => r,
        };
        self.stats.local().add(|s| &s.reassembled, 1);
        let mut data = done.frame;
        let Ok(dip) = parse_ip(&data, ETH_LEN, ip.v6, false) else {
            return Err(DropReason::Malformed);
        };
        let m = RxMeta {
            csum: Csum::Complete,
            ..meta
        };
        let reasm = Reasm {
            max_size: done.max_size,
            id: done.id,
        };
        match self.route_ip(now, m, snap, &mut data, &dip, Some(reasm), tx)? {
            Verdict::Forward { port } => {
                tx.push(TxFrame { port, data });
                self.stats.local().add(|s| &s.forwarded, 1);
                held
            }
            Verdict::Consumed => held,
            // What nobody takes is the kernel's (it had its copies of what was local).
            v => {
                if local {
                    held
                } else {
                    Ok(v)
                }
            }
        }
    }

    /// Connection tracking, frontends and routing of a whole (never fragmented, or
    /// reassembled) packet.
    #[allow(clippy::too_many_arguments)]
    fn route_ip(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &mut [u8],
        ip: &Ip,
        reasm: Option<Reasm>,
        tx: &mut Vec<TxFrame>,
    ) -> Result<Verdict, DropReason> {
        let v6 = ip.v6;
        let (plan, adm) = (&snap.plan, &snap.adm);
        let l4 = match (ip.proto, ip.frag) {
            (PROTO_TCP, _) => {
                let seg = frame.get(ip.l4..ip.end).ok_or(DropReason::Truncated)?;
                if seg.len() < 20 {
                    return Err(DropReason::Truncated);
                }
                let doff = usize::from(rd8(seg, 12) >> 4) * 4;
                if doff < 20 {
                    return Err(DropReason::Malformed);
                }
                if doff > seg.len() {
                    return Err(DropReason::Truncated);
                }
                let flags = rd8(seg, 13);
                // nf_conntrack's tcp_error: an impossible flag combination is INVALID,
                // whatever connection it claims.
                if !tcp_flags_valid(flags) {
                    return Err(DropReason::Invalid);
                }
                Some(L4 {
                    sport: rd16(seg, 0),
                    dport: rd16(seg, 2),
                    flags,
                    seg: Seg {
                        flags,
                        seq: rd32(seg, 4),
                        ack: rd32(seg, 8),
                        win: rd16(seg, 14),
                        len: (seg.len() - doff) as u32,
                        wscale: if flags & TCP_SYN != 0 {
                            tcp_wscale(seg, doff)
                        } else {
                            None
                        },
                    },
                })
            }
            (PROTO_UDP, _) => {
                let seg = frame.get(ip.l4..ip.end).ok_or(DropReason::Truncated)?;
                if seg.len() < 8 {
                    return Err(DropReason::Truncated);
                }
                let ulen = usize::from(rd16(seg, 4));
                // A GSO super-frame's UDP length may describe one segment; only reject a
                // length shorter than the header.
                if ulen < 8 && !(ulen == 0 && v6) {
                    return Err(DropReason::Malformed);
                }
                Some(L4 {
                    sport: rd16(seg, 0),
                    dport: rd16(seg, 2),
                    flags: 0,
                    seg: Seg::flags(0),
                })
            }
            (PROTO_SCTP, _) => {
                let seg = frame.get(ip.l4..ip.end).ok_or(DropReason::Truncated)?;
                if seg.len() < SCTP_HEADER_LEN + 4 {
                    return Err(DropReason::Truncated);
                }
                // The first fragment may not hold every chunk: its ports suffice (it is
                // dropped as a fragment below when it matters).
                let chunks = if ip.frag == Frag::No {
                    sctp_chunks(seg).ok_or(DropReason::Malformed)?
                } else {
                    0
                };
                Some(L4 {
                    sport: rd16(seg, 0),
                    dport: rd16(seg, 2),
                    flags: chunks,
                    seg: Seg::flags(chunks),
                })
            }
            _ => None,
        };
        if let Some(l4) = l4 {
            let tuple = Tuple {
                src: ip.src,
                dst: ip.dst,
                sport: l4.sport,
                dport: l4.dport,
            };
            if let Some(hit) = self.ct.lookup(now, ip.proto, &tuple, Some(l4.seg)) {
                if hit.invalid {
                    // A RST or FIN outside the window: conntrack's INVALID, which
                    // kube-proxy drops; the connection is untouched.
                    return Err(DropReason::Invalid);
                }
                return self.translate_and_forward(now, meta, snap, frame, ip, &hit, reasm, tx);
            }
            if plan.frontends.contains_key(&(ip.dst, ip.proto, l4.dport)) {
                return self.new_connection(now, meta, snap, frame, ip, l4, reasm, tx);
            }
        } else if ip.frag == Frag::No
            && ip.proto == if v6 { PROTO_ICMPV6 } else { PROTO_ICMP }
            && ip.l4_len() >= 8
            && is_icmp_error(v6, rd8(frame, ip.l4))
            && let Some(v) = self.icmp_error_reply(now, meta, snap, frame, ip, tx)?
        {
            return Ok(v);
        }
        // The node routes only Service addresses to the host port, and routes the rest
        // itself: nothing it sends there (or on `lo`) is routed on.
        if snap.ports.node_origin(meta.port) {
            return Err(DropReason::NoRoute);
        }
        // Plain routing between owned ports. RFC 4291 2.5.6: a link-local source or
        // destination is never forwarded (the kernel answers for its own).
        if snap.ports.local.contains(&ip.dst)
            || plan.node_ips.contains(&ip.dst)
            || adm.node_addrs.contains(&ip.dst)
            || matches!(ip.dst, IpAddr::V4(d) if adm.broadcasts.contains(&d))
            || is_link_local(ip.dst)
            || is_link_local(ip.src)
            || ip.dst.is_multicast()
        {
            return Ok(self.unmatched());
        }
        let Some(route) = snap.fib.lookup(ip.dst) else {
            return Ok(self.unmatched());
        };
        if ip.ttl <= 1 {
            return self.forward(now, meta, snap, frame, ip, route, tx);
        }
        let fit = self.fit(now, meta, snap, frame, ip, route.0, reasm, tx)?;
        self.forward_fit(now, meta, snap, frame, ip, route, fit, tx)
    }

    /// How the packet `ip` leaves through `out` (`ip_forward`'s `ip_exceeds_mtu` and
    /// `ip_fragment`, `ip6_forward`'s `ip6_pkt_too_big` and `ip6_fragment`): whole when it
    /// fits, split when it may be, or an ICMP error back to its source (the packet as it
    /// arrived is quoted) and [`DropReason::TooBig`]. A reassembled datagram (`reasm`)
    /// leaves in fragments no larger than it arrived in (`frag_max_size`), or, when those
    /// exceed the MTU and IPv4 DF or IPv6 forbids fragmenting them, an ICMP error. A frame
    /// longer than its ingress port's MTU is an offload aggregate (GRO/GSO super-frame)
    /// the kernel segments on transmit: whole.
    #[allow(clippy::too_many_arguments)]
    fn fit(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &[u8],
        ip: &Ip,
        out: PortId,
        reasm: Option<Reasm>,
        tx: &mut Vec<TxFrame>,
    ) -> Result<Fit, DropReason> {
        // An unknown MTU (0) limits nothing.
        let mtu = match snap.ports.by_id.get(&out).map_or(0, |p| p.mtu as usize) {
            0 => usize::MAX,
            m => m,
        };
        let len = ip.end.saturating_sub(ip.l3);
        // What fits and was not reassembled leaves whole, whatever follows says (the
        // common case: no second port lookup).
        if reasm.is_none() && len <= mtu {
            return Ok(Fit::Whole);
        }
        let in_mtu = snap
            .ports
            .by_id
            .get(&meta.port)
            .map_or(0, |p| p.mtu as usize);
        if reasm.is_none() && in_mtu > 0 && len > in_mtu {
            return Ok(Fit::Whole);
        }
        // `lo`'s MTU is 65,536, and TCP sends it aggregates (GSO) of segments no larger
        // than the endpoint's MSS: the kernel segments them on transmit.
        if snap.ports.lo == Some(meta.port) && ip.proto == PROTO_TCP {
            return Ok(Fit::Whole);
        }
        let too_big = |tx: &mut Vec<TxFrame>| {
            self.send_icmp_error(
                now,
                snap,
                meta,
                frame,
                ip,
                IcmpKind::TooBig(u32::try_from(mtu).unwrap_or(u32::MAX)),
                None,
                tx,
            );
            Err(DropReason::TooBig)
        };
        let df = !ip.v6 && rd16(frame, ip.l3 + 6) & 0x4000 != 0;
        match reasm {
            None if len <= mtu => Ok(Fit::Whole),
            // IPv4 routers fragment what has no DF; IPv6 routers never fragment.
            None if df || ip.v6 => too_big(tx),
            None => Ok(Fit::Split(mtu, 0)),
            Some(r) if len <= mtu && len <= r.max_size => Ok(Fit::Whole),
            // ip_exceeds_mtu / ip6_pkt_too_big: "original fragment exceeds mtu".
            Some(r) if r.max_size > mtu && (df || ip.v6) => too_big(tx),
            // ip_do_fragment and ip6_fragment: "don't send fragments larger than what we
            // received" (IPv6 never below its minimum MTU).
            Some(r) if ip.v6 => Ok(Fit::Split(r.max_size.max(frag::IPV6_MIN_MTU), r.id)),
            Some(r) => Ok(Fit::Split(r.max_size.min(mtu), r.id)),
        }
    }

    /// Forwards the (translated) packet whole or split, as [`Engine::fit`] decided.
    #[allow(clippy::too_many_arguments)]
    fn forward_fit(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &mut [u8],
        ip: &Ip,
        route: (PortId, IpAddr),
        fit: Fit,
        tx: &mut Vec<TxFrame>,
    ) -> Result<Verdict, DropReason> {
        match fit {
            Fit::Whole => self.forward(now, meta, snap, frame, ip, route, tx),
            Fit::Split(size, id) => {
                self.forward_split(now, meta, snap, frame, ip, route, size, id, tx)
            }
        }
    }

    /// Splits the (translated) packet into fragments of at most `size` bytes and forwards
    /// each; they go out as generated frames.
    #[allow(clippy::too_many_arguments)]
    fn forward_split(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &mut [u8],
        ip: &Ip,
        route: (PortId, IpAddr),
        size: usize,
        id: u32,
        tx: &mut Vec<TxFrame>,
    ) -> Result<Verdict, DropReason> {
        if meta.csum == Csum::Partial {
            complete_partial(frame, ip);
        }
        let Some(pieces) = frag::split(frame, ip, size, id) else {
            return Err(DropReason::TooBig);
        };
        let m = RxMeta {
            csum: Csum::Complete,
            ..meta
        };
        let mut sent = 0;
        for mut piece in pieces {
            let pip = parse_ip(&piece, ETH_LEN, ip.v6, false)?;
            match self.forward(now, m, snap, &mut piece, &pip, route, tx)? {
                Verdict::Forward { port } => {
                    tx.push(TxFrame { port, data: piece });
                    sent += 1;
                }
                _ => sent += 1,
            }
        }
        self.stats.local().add(|s| &s.fragments_sent, sent);
        Ok(Verdict::Consumed)
    }

    /// Sends an ICMP error about the packet `ip` in `frame` back where it came from.
    #[allow(clippy::too_many_arguments)]
    fn send_icmp_error(
        &self,
        now: Duration,
        snap: &Snapshot,
        meta: RxMeta,
        frame: &[u8],
        ip: &Ip,
        kind: IcmpKind,
        src: Option<IpAddr>,
        tx: &mut Vec<TxFrame>,
    ) {
        // Never about an ICMP error, a non-first fragment, or a multicast destination.
        if ip.frag == Frag::Later
            || ip.dst.is_multicast()
            || ip.src.is_multicast()
            || ip.src.is_unspecified()
            || (ip.proto == PROTO_ICMP && is_icmp_error(false, rd8(frame, ip.l4)))
            || (ip.proto == PROTO_ICMPV6 && is_icmp_error(true, rd8(frame, ip.l4)))
        {
            return;
        }
        // An error about the node's own packet on `lo` goes back through the host port:
        // from a node address, it would be a martian coming in on `lo` (no accept_local
        // there), while the node's side of the host pair accepts local sources.
        let out_id = match snap.ports.host {
            Some(h) if snap.ports.lo == Some(meta.port) => h,
            _ => meta.port,
        };
        let Some(port) = snap.ports.by_id.get(&out_id) else {
            return;
        };
        // icmp_ratemask: destination unreachable and time exceeded are rate-limited;
        // ICMPv6 "packet too big" never is (icmpv6_mask_allow: it would break PMTU
        // discovery).
        let limited = !(ip.v6 && matches!(kind, IcmpKind::TooBig(_)));
        if limited && !self.icmp_limit.allow(now, ip.src) {
            self.stats.local().add(|s| &s.icmp_limited, 1);
            return;
        }
        let plan = &snap.plan;
        // On `lo` the packet's destination is a node address (lo's own is 127.0.0.1).
        let on_lo = out_id != meta.port;
        let Some(src) = src
            .or(if on_lo { Some(ip.dst) } else { None })
            .or_else(|| snap.ports.addr_of(meta.port, ip.v6))
            .or_else(|| plan.node_ips.iter().copied().find(|a| a.is_ipv6() == ip.v6))
        else {
            return;
        };
        let (ty, code, rest) = match (kind, ip.v6) {
            (IcmpKind::PortUnreachable, false) => (3, 3, 0),
            (IcmpKind::TimeExceeded, false) => (11, 0, 0),
            // RFC 1191: the next-hop MTU in the low 16 bits.
            (IcmpKind::TooBig(mtu), false) => (3, 4, mtu & 0xffff),
            (IcmpKind::PortUnreachable, true) => (1, 4, 0),
            (IcmpKind::TimeExceeded, true) => (3, 0, 0),
            (IcmpKind::TooBig(mtu), true) => (2, 0, mtu),
        };
        // RFC 1812: quote as much as fits in 576 bytes; RFC 4443: in the minimum MTU 1280.
        let max_quote = if ip.v6 { 1280 - 48 } else { 576 - 28 };
        let qend = ip.end.min(ip.l3 + max_quote);
        let Some(quote) = frame.get(ip.l3..qend) else {
            return;
        };
        let mut out = Vec::with_capacity(ETH_LEN + 48 + quote.len());
        match port.host_peer {
            Some(peer) if on_lo => out.extend_from_slice(&peer),
            _ => out.extend_from_slice(frame.get(6..12).unwrap_or(&[0; 6])),
        }
        out.extend_from_slice(&port.mac);
        let l3 = ETH_LEN;
        let icmp_len = 8 + quote.len();
        if ip.v6 {
            out.extend_from_slice(&ETH_IPV6.to_be_bytes());
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(icmp_len as u16).to_be_bytes());
            out.extend_from_slice(&[PROTO_ICMPV6, 64]);
            out.extend_from_slice(&[0; 32]);
        } else {
            out.extend_from_slice(&ETH_IPV4.to_be_bytes());
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&((20 + icmp_len) as u16).to_be_bytes());
            out.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_ICMP, 0, 0]);
            out.extend_from_slice(&[0; 8]);
        }
        let l4 = out.len();
        out.extend_from_slice(&[ty, code, 0, 0]);
        out.extend_from_slice(&rest.to_be_bytes());
        out.extend_from_slice(quote);
        let gen_ip = Ip {
            v6: ip.v6,
            l3,
            src,
            dst: ip.src,
            proto: if ip.v6 { PROTO_ICMPV6 } else { PROTO_ICMP },
            l4,
            end: out.len(),
            ttl: 64,
            frag: Frag::No,
        };
        wr_ip(&mut out, gen_ip.src_off(), src);
        wr_ip(&mut out, gen_ip.dst_off(), ip.src);
        if !ip.v6 {
            fill_ipv4_checksum(&mut out, l3);
        }
        fill_l4_checksum(&mut out, &gen_ip);
        tx.push(TxFrame {
            port: out_id,
            data: out,
        });
    }

    /// Where a packet of connection `hit` (travelling in direction `hit.dir`) to `dst`
    /// goes: replies of the node's own connections back out of the host port (their
    /// destination is a node address, which the FIB would send elsewhere or not at all),
    /// everything else by the FIB.
    fn route_of(&self, snap: &Snapshot, hit: &Hit, dst: IpAddr) -> Option<(PortId, IpAddr)> {
        if hit.host && hit.dir == 1 {
            return snap.ports.host.map(|port| (port, dst));
        }
        snap.fib.lookup(dst)
    }

    /// Rewrites addresses and ports of the packet to `target`, with checksum updates.
    fn rewrite(frame: &mut [u8], ip: &Ip, target: &Tuple, csum: Csum) {
        let mut d_ip = Delta::default();
        d_ip.ip(ip.src, target.src);
        d_ip.ip(ip.dst, target.dst);
        wr_ip(frame, ip.src_off(), target.src);
        wr_ip(frame, ip.dst_off(), target.dst);
        if !ip.v6 && !d_ip.is_zero() {
            let c = rd16(frame, ip.l3 + 10);
            wr16(frame, ip.l3 + 10, d_ip.apply_complete(c));
        }
        let (sport, dport) = (rd16(frame, ip.l4), rd16(frame, ip.l4 + 2));
        let mut d_all = d_ip;
        d_all.word(sport, target.sport);
        d_all.word(dport, target.dport);
        wr16(frame, ip.l4, target.sport);
        wr16(frame, ip.l4 + 2, target.dport);
        if ip.proto == PROTO_SCTP {
            // CRC32c covers no pseudo-header and cannot be updated incrementally: sum the
            // packet again. A partial one is completed by whoever completes it (the
            // kernel or the NIC), over the rewritten packet.
            if csum == Csum::Complete {
                fill_sctp_checksum(frame, ip);
            }
            return;
        }
        let Some(off) = l4_csum_off(ip.proto) else {
            return;
        };
        let at = ip.l4 + off;
        let c = rd16(frame, at);
        let new = match csum {
            Csum::Partial => d_ip.apply_partial(c),
            Csum::Complete => {
                if ip.proto == PROTO_UDP && c == 0 && !ip.v6 {
                    // RFC 768: no checksum.
                    return;
                }
                let n = d_all.apply_complete(c);
                if n == 0 && ip.proto == PROTO_UDP {
                    0xffff
                } else {
                    n
                }
            }
        };
        wr16(frame, at, new);
    }

    #[allow(clippy::too_many_arguments)]
    fn translate_and_forward(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &mut [u8],
        ip: &Ip,
        hit: &Hit,
        reasm: Option<Reasm>,
        tx: &mut Vec<TxFrame>,
    ) -> Result<Verdict, DropReason> {
        let target = hit.target();
        let Some(route) = self.route_of(snap, hit, target.dst) else {
            return Err(DropReason::NoRoute);
        };
        if ip.ttl <= 1 {
            self.send_icmp_error(now, snap, meta, frame, ip, IcmpKind::TimeExceeded, None, tx);
            return Err(DropReason::TtlExceeded);
        }
        let fit = self.fit(now, meta, snap, frame, ip, route.0, reasm, tx)?;
        Self::rewrite(frame, ip, &target, meta.csum);
        let ip2 = Ip {
            src: target.src,
            dst: target.dst,
            ..*ip
        };
        self.forward_fit(now, meta, snap, frame, &ip2, route, fit, tx)
    }

    #[allow(clippy::too_many_arguments)]
    fn new_connection(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &mut [u8],
        ip: &Ip,
        l4: L4,
        reasm: Option<Reasm>,
        tx: &mut Vec<TxFrame>,
    ) -> Result<Verdict, DropReason> {
        let plan = &snap.plan;
        let Some(fe) = plan.frontends.get(&(ip.dst, ip.proto, l4.dport)) else {
            return Ok(self.unmatched());
        };
        // loadBalancerSourceRanges: "traffic from other sources is dropped".
        if !fe.source_ranges.is_empty() && !fe.source_ranges.iter().any(|n| n.contains(&ip.src)) {
            return Err(DropReason::SourceRange);
        }
        // Only a SYN, or an ACK picked up mid-stream (nf_conntrack_tcp_loose), opens a TCP
        // connection: tcp_new calls anything else (RST, FIN, SYN+ACK) INVALID. Nor can an
        // SCTP ABORT or SHUTDOWN COMPLETE open one (nf_conntrack_proto_sctp's sctp_new).
        let opening = l4.flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST);
        if (ip.proto == PROTO_TCP && opening != TCP_SYN && opening != TCP_ACK)
            || (ip.proto == PROTO_SCTP && l4.flags & (SCTP_ABORT | SCTP_SHUTDOWN_COMPLETE) != 0)
        {
            return Err(DropReason::Invalid);
        }
        let from_cluster = plan.cluster_cidrs.iter().any(|n| n.contains(&ip.src));
        // kube-proxy's KUBE-EXT short circuit: pods and the node itself use the
        // cluster-wide set even under externalTrafficPolicy: Local.
        let local_source = from_cluster || plan.node_ips.contains(&ip.src);
        let set = match (&fe.shortcut, local_source) {
            (Some(s), true) => Some(s),
            _ => fe.backends.as_ref(),
        };
        let reject = |this: &Self, frame: &[u8], tx: &mut Vec<TxFrame>| match fe.on_empty {
            EmptyAction::Reject => {
                this.send_icmp_error(
                    now,
                    snap,
                    meta,
                    frame,
                    ip,
                    IcmpKind::PortUnreachable,
                    Some(ip.dst),
                    tx,
                );
                Err(DropReason::Rejected)
            }
            EmptyAction::Drop => Err(DropReason::NoEndpoints),
        };
        let Some(set) = set.filter(|s| !s.is_empty()) else {
            return reject(self, frame, tx);
        };
        #[cfg(not(fuzzing))]
        if meta.csum == Csum::Complete && !l4_checksum_ok(frame, ip) {
            return Err(DropReason::BadL4Checksum);
        }
        let hash = conntrack::fmix64(
            conntrack::end_hash(ip.src, l4.sport)
                ^ conntrack::end_hash(ip.dst, l4.dport).rotate_left(17)
                ^ u64::from(ip.proto),
        );
        let Some(ep) = set.select(now.as_secs(), ip.src, hash, fe.affinity) else {
            return reject(self, frame, tx);
        };
        let Some(route) = snap.fib.lookup(ep.ip()) else {
            return Err(DropReason::NoRoute);
        };
        let from_host = snap.ports.node_origin(meta.port);
        if ip.ttl <= 1 {
            self.send_icmp_error(now, snap, meta, frame, ip, IcmpKind::TimeExceeded, None, tx);
            return Err(DropReason::TtlExceeded);
        }
        // The MTU check comes before the connection exists: a packet too big for the
        // endpoint's link creates nothing (the kernel drops it before conntrack confirms).
        let fit = self.fit(now, meta, snap, frame, ip, route.0, reasm, tx)?;
        // Hairpin: a pod reaching itself through its Service must be masqueraded, or it
        // would answer itself directly. The node's own connections always are (kube-proxy
        // masquerades them too, coming from outside the cluster CIDR): their replies then
        // come to a port of the SNAT range, which the kernel leaves to the engine, and the
        // engine sends them back through the host port.
        let masquerade = ep.ip() == ip.src
            || from_host
            || match fe.masquerade {
                Masquerade::Never => false,
                Masquerade::Always => true,
                Masquerade::OffCluster => !from_cluster,
            };
        let snat = if masquerade {
            let a = snap
                .ports
                .addr_of(route.0, ip.v6)
                .or_else(|| plan.node_ips.iter().copied().find(|a| a.is_ipv6() == ip.v6))
                .ok_or(DropReason::SnatExhausted)?;
            Some(a)
        } else {
            None
        };
        let orig = Tuple {
            src: ip.src,
            dst: ip.dst,
            sport: l4.sport,
            dport: l4.dport,
        };
        let (target, stale) = match self.ct.create(
            now,
            ip.proto,
            &orig,
            (ep.ip(), ep.port()),
            snat,
            &self.cfg.snat_ports,
            l4.seg,
            from_host,
        )? {
            Created::New(t, stale) => (t[1].reversed(), stale),
            Created::Existing(hit) => (hit.target(), None),
        };
        let route = if target.dst == ep.ip() {
            route
        } else {
            snap.fib.lookup(target.dst).ok_or(DropReason::NoRoute)?
        };
        Self::rewrite(frame, ip, &target, meta.csum);
        let ip2 = Ip {
            src: target.src,
            dst: target.dst,
            ..*ip
        };
        if let Some(seq) = stale {
            return self.reset_then_forward(now, meta, snap, frame, &ip2, route, seq, tx);
        }
        self.forward_fit(now, meta, snap, frame, &ip2, route, fit, tx)
    }

    /// Sends the endpoint, ahead of the translated SYN `frame`, the RST (sequence number
    /// `seq`) that ends the half-open state it may still hold on this tuple from an
    /// evicted connection. The kernel's node would send that RST too, when the endpoint
    /// retransmits the old SYN-ACK to a port with no connection behind it; sent only then,
    /// the new SYN meets the stale state first and is ignored or answered with the old
    /// SYN-ACK, and the client waits for its retransmission. Both frames go out in order
    /// as generated frames.
    #[allow(clippy::too_many_arguments)]
    fn reset_then_forward(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &mut [u8],
        ip: &Ip,
        route: (PortId, IpAddr),
        seq: u32,
        tx: &mut Vec<TxFrame>,
    ) -> Result<Verdict, DropReason> {
        let rst_end = ip.l4 + 20;
        if let Some(head) = frame.get(..rst_end) {
            let mut rst = head.to_vec();
            if ip.v6 {
                wr16(&mut rst, ip.l3 + 4, (rst_end - ip.l3 - 40) as u16);
            } else {
                wr16(&mut rst, ip.l3 + 2, (rst_end - ip.l3) as u16);
                fill_ipv4_checksum(&mut rst, ip.l3);
            }
            let l4 = ip.l4;
            wr(&mut rst, l4 + 4, &seq.to_be_bytes());
            wr(&mut rst, l4 + 8, &[0; 4]);
            wr8(&mut rst, l4 + 12, 5 << 4);
            wr8(&mut rst, l4 + 13, TCP_RST);
            wr16(&mut rst, l4 + 14, 0);
            wr16(&mut rst, l4 + 18, 0);
            let rip = Ip {
                end: rst_end,
                ..*ip
            };
            fill_l4_checksum(&mut rst, &rip);
            let m = RxMeta {
                csum: Csum::Complete,
                ..meta
            };
            if let Ok(Verdict::Forward { port }) =
                self.forward(now, m, snap, &mut rst, &rip, route, tx)
            {
                tx.push(TxFrame { port, data: rst });
            }
        }
        match self.forward(now, meta, snap, frame, ip, route, tx)? {
            Verdict::Forward { port } => {
                let mut data = frame.to_vec();
                if meta.csum == Csum::Partial {
                    complete_partial(&mut data, ip);
                }
                tx.push(TxFrame { port, data });
                Ok(Verdict::Consumed)
            }
            v => Ok(v),
        }
    }

    /// Translates an ICMP error whose quoted packet belongs to a tracked connection;
    /// `Ok(None)` when it does not.
    fn icmp_error_reply(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &mut [u8],
        ip: &Ip,
        tx: &mut Vec<TxFrame>,
    ) -> Result<Option<Verdict>, DropReason> {
        let il3 = ip.l4 + 8;
        // The quoted packet is usually cut short: parse its header from what is there.
        let Some(quoted) = frame.get(..ip.end) else {
            return Ok(None);
        };
        let Some(inner) = parse_quoted(quoted, il3, ip.v6) else {
            return Ok(None);
        };
        if !matches!(inner.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
            return Ok(None);
        }
        if inner.l4 + 4 > ip.end {
            return Ok(None);
        }
        let q = Tuple {
            src: inner.src,
            dst: inner.dst,
            sport: rd16(frame, inner.l4),
            dport: rd16(frame, inner.l4 + 2),
        };
        let Some(hit) = self.ct.lookup(now, inner.proto, &q.reversed(), None) else {
            return Ok(None);
        };
        let d = usize::from(hit.dir);
        let (this, other) = if d == 0 {
            (hit.t[0], hit.t[1])
        } else {
            (hit.t[1], hit.t[0])
        };
        let outer = Tuple {
            src: if ip.src == this.src {
                other.dst
            } else {
                ip.src
            },
            dst: other.src,
            sport: 0,
            dport: 0,
        };
        // The error travels the way packets of direction `hit.dir` do.
        let Some(route) = self.route_of(snap, &hit, outer.dst) else {
            return Err(DropReason::NoRoute);
        };
        if ip.ttl <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        // Inner header: back to the untranslated packet of the other direction.
        let mut d_in = Delta::default();
        d_in.ip(inner.src, other.src);
        d_in.ip(inner.dst, other.dst);
        wr_ip(frame, inner.src_off(), other.src);
        wr_ip(frame, inner.dst_off(), other.dst);
        if !inner.v6 && inner.l3 + 12 <= ip.end {
            let c = rd16(frame, inner.l3 + 10);
            wr16(frame, inner.l3 + 10, d_in.apply_complete(c));
        }
        let mut d_l4 = d_in;
        d_l4.word(q.sport, other.sport);
        d_l4.word(q.dport, other.dport);
        wr16(frame, inner.l4, other.sport);
        wr16(frame, inner.l4 + 2, other.dport);
        if let Some(off) = l4_csum_off(inner.proto)
            && inner.l4 + off + 2 <= ip.end
        {
            let at = inner.l4 + off;
            let c = rd16(frame, at);
            if !(inner.proto == PROTO_UDP && c == 0) {
                let n = d_l4.apply_complete(c);
                wr16(
                    frame,
                    at,
                    if n == 0 && inner.proto == PROTO_UDP {
                        0xffff
                    } else {
                        n
                    },
                );
            }
        }
        // Outer header and ICMP checksum (recomputed: errors are rare and short).
        let mut d_out = Delta::default();
        d_out.ip(ip.src, outer.src);
        d_out.ip(ip.dst, outer.dst);
        wr_ip(frame, ip.src_off(), outer.src);
        wr_ip(frame, ip.dst_off(), outer.dst);
        if !ip.v6 {
            let c = rd16(frame, ip.l3 + 10);
            wr16(frame, ip.l3 + 10, d_out.apply_complete(c));
        }
        let ip2 = Ip {
            src: outer.src,
            dst: outer.dst,
            ..*ip
        };
        match meta.csum {
            Csum::Complete => fill_l4_checksum(frame, &ip2),
            Csum::Partial => {
                let acc = if ip.v6 {
                    pseudo_sum(outer.src, outer.dst, PROTO_ICMPV6, ip.l4_len())
                } else {
                    0
                };
                wr16(frame, ip.l4 + 2, fold(acc));
            }
        }
        self.forward(now, meta, snap, frame, &ip2, route, tx)
            .map(Some)
    }

    /// Decrements the TTL, sets MACs and resolves the next hop.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        now: Duration,
        meta: RxMeta,
        snap: &Snapshot,
        frame: &mut [u8],
        ip: &Ip,
        (out, nh): (PortId, IpAddr),
        tx: &mut Vec<TxFrame>,
    ) -> Result<Verdict, DropReason> {
        let Some(out_port) = snap.ports.by_id.get(&out) else {
            return Err(DropReason::NoRoute);
        };
        if ip.ttl <= 1 {
            self.send_icmp_error(now, snap, meta, frame, ip, IcmpKind::TimeExceeded, None, tx);
            return Err(DropReason::TtlExceeded);
        }
        let ttl_off = ip.ttl_off();
        wr8(frame, ttl_off, ip.ttl - 1);
        if !ip.v6 {
            // TTL is the high byte of the word at offset 8.
            let mut d = Delta::default();
            d.word(u16::from(ip.ttl) << 8, u16::from(ip.ttl - 1) << 8);
            let c = rd16(frame, ip.l3 + 10);
            wr16(frame, ip.l3 + 10, d.apply_complete(c));
        }
        wr(frame, 6, &out_port.mac);
        // The host port is a point-to-point link to the node's stack: every next hop
        // there is its peer.
        if let Some(mac) = out_port.host_peer {
            wr(frame, 0, &mac);
            return Ok(Verdict::Forward { port: out });
        }
        if let Some(mac) = snap.static_neigh.get(&(out, nh)) {
            wr(frame, 0, mac);
            return Ok(Verdict::Forward { port: out });
        }
        if let Some(mac) = self.usable_neighbour(now, out, nh) {
            wr(frame, 0, &mac);
            return Ok(Verdict::Forward { port: out });
        }
        let mut map = self.neigh_write();
        let incomplete = map.values().filter(|n| n.mac.is_none()).count();
        let fresh = !map.contains_key(&(out, nh));
        if fresh && incomplete >= neigh::MAX_INCOMPLETE {
            return Err(DropReason::NoNeighbour);
        }
        if fresh && map.len() >= neigh::MAX_NEIGHBOURS {
            // Full: make room by forgetting neighbours past their reachable time and
            // not being resolved (they would be re-resolved on use).
            map.retain(|_, n| n.tries > 0 || now < n.reachable_until);
            if map.len() >= neigh::MAX_NEIGHBOURS {
                return Err(DropReason::NoNeighbour);
            }
        }
        let n = map.entry((out, nh)).or_insert(Neigh {
            mac: None,
            reachable_until: Duration::ZERO,
            tries: 0,
            next_try: now,
            queue: Vec::new(),
        });
        if n.tries == 0 {
            n.tries = 1;
            n.next_try = now.saturating_add(neigh::ARP_RETRY);
            tx.push(self.solicit(snap, out_port, nh));
        }
        if let Some(mac) = n.mac {
            // Stale: keep using it while re-resolving.
            wr(frame, 0, &mac);
            return Ok(Verdict::Forward { port: out });
        }
        let held: usize = n.queue.iter().map(|q| q.frame.len()).sum();
        if n.queue.len() >= self.cfg.neighbour_queue || held + frame.len() > NEIGHBOUR_QUEUE_BYTES {
            return Err(DropReason::NoNeighbour);
        }
        n.queue.push(Queued {
            frame: frame.to_vec(),
            csum: meta.csum,
        });
        Ok(Verdict::Consumed)
    }

    /// The neighbour table locked for writing; the neighbour generation moves on before
    /// the lock is released.
    fn neigh_write(&self) -> NeighWrite<'_> {
        NeighWrite {
            map: self.neigh.write(),
            generation: &self.neigh_generation,
        }
    }

    /// The MAC of the resolved neighbour `nh` on `out` if it may be used now (reachable,
    /// or stale while being re-resolved). A thread remembers the entries it read in
    /// [`NEIGHBOUR_CACHE`] with the neighbour generation they were read at; while the
    /// generation is unchanged (no writer since), the table holds the same entry, and
    /// the frame takes no lock.
    fn usable_neighbour(&self, now: Duration, out: PortId, nh: IpAddr) -> Option<[u8; 6]> {
        let usable =
            |c: &CachedNeighbour| (now < c.reachable_until || c.resolving).then_some(c.mac);
        let generation = self.neigh_generation.load(Ordering::Acquire);
        let slot = CachedNeighbour::slot(out, nh);
        let cached = NEIGHBOUR_CACHE
            .try_with(|c| c.get(slot).and_then(Cell::get))
            .ok()
            .flatten()
            .filter(|c| {
                c.engine == self.id && c.generation == generation && c.port == out && c.ip == nh
            });
        if let Some(c) = cached {
            return usable(&c);
        }
        let map = self.neigh.read();
        let n = map.get(&(out, nh))?;
        let c = CachedNeighbour {
            engine: self.id,
            generation,
            port: out,
            ip: nh,
            mac: n.mac?,
            reachable_until: n.reachable_until,
            resolving: n.tries > 0,
        };
        drop(map);
        let _ = NEIGHBOUR_CACHE.try_with(|cache| {
            if let Some(e) = cache.get(slot) {
                e.set(Some(c));
            }
        });
        usable(&c)
    }

    /// A request for `target`'s link-layer address out of `port`: ARP or NDP.
    fn solicit(&self, snap: &Snapshot, port: &PortConfig, target: IpAddr) -> TxFrame {
        match target {
            IpAddr::V4(t) => self.arp_request(snap, port, t),
            IpAddr::V6(t) => self.ndp_solicit(snap, port, t),
        }
    }

    fn arp_request(&self, snap: &Snapshot, port: &PortConfig, target: Ipv4Addr) -> TxFrame {
        let plan = &snap.plan;
        let spa = snap
            .ports
            .addr_of(port.id, false)
            .or_else(|| plan.node_ips.iter().copied().find(|a| a.is_ipv4()));
        let spa = match spa {
            Some(IpAddr::V4(a)) => a,
            // An ARP probe (sender 0.0.0.0, RFC 5227) still gets an answer.
            _ => Ipv4Addr::UNSPECIFIED,
        };
        TxFrame {
            port: port.id,
            data: arp_frame(1, port.mac, [0xff; 6], spa, [0; 6], target),
        }
    }

    fn handle_arp(
        &self,
        now: Duration,
        port: &PortConfig,
        frame: &[u8],
        tx: &mut Vec<TxFrame>,
    ) -> Verdict {
        let a = ETH_LEN;
        if frame.len() < a + 28 {
            return Verdict::Drop(DropReason::Truncated);
        }
        if rd16(frame, a) != 1
            || rd16(frame, a + 2) != ETH_IPV4
            || rd8(frame, a + 4) != 6
            || rd8(frame, a + 5) != 4
        {
            return Verdict::Drop(DropReason::Malformed);
        }
        let op = rd16(frame, a + 6);
        let mut sha = [0u8; 6];
        sha.copy_from_slice(frame.get(a + 8..a + 14).unwrap_or(&[0; 6]));
        let IpAddr::V4(spa) = rd_ip(frame, a + 14, false) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let IpAddr::V4(tpa) = rd_ip(frame, a + 24, false) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let proxied = port.proxy_arp.contains(&tpa);
        let kernel_own = port.addrs.iter().any(|n| n.addr() == IpAddr::V4(tpa));
        match op {
            1 => {
                if proxied || kernel_own {
                    self.learn(now, port.id, IpAddr::V4(spa), sha, false, tx);
                }
                if proxied && !kernel_own {
                    tx.push(TxFrame {
                        port: port.id,
                        data: arp_frame(2, port.mac, sha, tpa, sha, spa),
                    });
                    Verdict::Consumed
                } else {
                    Verdict::Kernel
                }
            }
            2 => {
                if self.learn(now, port.id, IpAddr::V4(spa), sha, true, tx) {
                    Verdict::Consumed
                } else {
                    Verdict::Kernel
                }
            }
            _ => Verdict::Drop(DropReason::Malformed),
        }
    }

    /// Records `ip -> mac` on `port` (from ARP or NDP) and releases queued packets; true
    /// when the engine was resolving it. Replies (ARP replies, Neighbor Advertisements)
    /// create entries only for addresses being resolved; requests addressed to us refresh
    /// or create them.
    fn learn(
        &self,
        now: Duration,
        port: PortId,
        spa: IpAddr,
        sha: [u8; 6],
        reply: bool,
        tx: &mut Vec<TxFrame>,
    ) -> bool {
        if spa.is_unspecified() || spa.is_multicast() || sha == [0; 6] || sha[0] & 1 != 0 {
            return false;
        }
        let key = (port, spa);
        let mut map = self.neigh_write();
        let had = map.contains_key(&key);
        // A reply creates nothing the engine did not ask for; a request from a new
        // sender is learnt from only while the table has room (an ARP flood from
        // distinct senders must not grow it without bound).
        if !had && (reply || map.len() >= neigh::MAX_NEIGHBOURS) {
            return false;
        }
        let n = map.entry(key).or_insert(Neigh {
            mac: None,
            reachable_until: Duration::ZERO,
            tries: 0,
            next_try: now,
            queue: Vec::new(),
        });
        let resolving = n.tries > 0;
        n.mac = Some(sha);
        n.reachable_until = now.saturating_add(self.cfg.neighbour_reachable);
        n.tries = 0;
        let queue = std::mem::take(&mut n.queue);
        drop(map);
        let released = queue.len() as u64;
        for mut q in queue {
            wr(&mut q.frame, 0, &sha);
            if q.csum == Csum::Partial
                && let Some(v6) = match rd16(&q.frame, 12) {
                    ETH_IPV4 => Some(false),
                    ETH_IPV6 => Some(true),
                    _ => None,
                }
                && let Ok(ip) = parse_ip(&q.frame, ETH_LEN, v6, false)
            {
                complete_partial(&mut q.frame, &ip);
            }
            tx.push(TxFrame {
                port,
                data: q.frame,
            });
        }
        if released > 0 {
            self.stats.local().add(|s| &s.forwarded, released);
        }
        // A reply for a neighbour the engine knows or was resolving is handled here (a
        // reply for an unknown one returned early, left to the kernel).
        reply && (had || resolving)
    }

    /// When [`Engine::handle_timeout`] should next be called, on the caller's clock.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let mut next: Option<Duration> = None;
        let mut at = |t: Duration| next = Some(next.map_or(t, |n| n.min(t)));
        if self.ct.len() > 0 {
            at(*self.next_sweep.lock());
        }
        if let Some(d) = self.defrag.next_deadline() {
            at(d);
        }
        for n in self.neigh.read().values() {
            if n.tries > 0 {
                at(n.next_try);
            } else if n.mac.is_some() {
                at(n.reachable_until.saturating_add(neigh::STALE_GC));
            }
        }
        next
    }

    /// Expires connections and neighbours and retries ARP and NDP; frames go to `tx`.
    pub fn handle_timeout(&self, now: Duration, tx: &mut Vec<TxFrame>) {
        {
            let mut next = self.next_sweep.lock();
            if now >= *next {
                self.ct.expire(now);
                *next = now.saturating_add(Duration::from_secs(1));
            }
        }
        let expired = self.defrag.expire(now);
        self.stats
            .local()
            .drop_n(DropReason::FragmentTimeout, expired);
        let snap = self.snap.load();
        let snap: &Snapshot = &snap;
        let mut failed = 0u64;
        let before = tx.len();
        {
            let mut map = self.neigh_write();
            map.retain(|(port, ip), n| {
                if n.tries > 0 && now >= n.next_try {
                    if n.tries < neigh::ARP_TRIES {
                        n.tries += 1;
                        n.next_try = now.saturating_add(neigh::ARP_RETRY);
                        if let Some(p) = snap.ports.by_id.get(port) {
                            tx.push(self.solicit(snap, p, *ip));
                        }
                        return true;
                    }
                    // Resolution failed: drop what waited, forget the neighbour.
                    failed += n.queue.len() as u64;
                    return false;
                }
                !(n.tries == 0
                    && n.mac.is_some()
                    && now >= n.reachable_until.saturating_add(neigh::STALE_GC))
            });
        }
        for _ in 0..failed {
            self.stats.local().drop(DropReason::NoNeighbour);
        }
        let generated = tx.len().saturating_sub(before) as u64;
        self.stats.local().add(|s| &s.generated, generated);
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut drops = [0u64; DropReason::ALL.len()];
        for stripe in s.stripes.iter() {
            for (d, c) in drops.iter_mut().zip(&stripe.drops) {
                *d = d.wrapping_add(l(c));
            }
        }
        Counters {
            rx_packets: s.total(|s| &s.rx_packets),
            rx_bytes: s.total(|s| &s.rx_bytes),
            forwarded: s.total(|s| &s.forwarded),
            kernel: s.total(|s| &s.kernel),
            consumed: s.total(|s| &s.consumed),
            drops: DropReason::ALL.into_iter().zip(drops).collect(),
            generated: s.total(|s| &s.generated),
            icmp_limited: s.total(|s| &s.icmp_limited),
            connections: self.ct.len() as u64,
            connections_created: l(&self.ct.created),
            connections_evicted: l(&self.ct.evicted),
            connections_expired: l(&self.ct.expired),
            neighbours: self.neigh.read().len() as u64,
            reassembled: s.total(|s| &s.reassembled),
            fragments_sent: s.total(|s| &s.fragments_sent),
            reassembly_pending: self.defrag.len() as u64,
            reassembly_memory: self.defrag.memory() as u64,
        }
    }
}

impl Counters {
    /// Drops for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

/// The kernel's checks before it routes a packet arriving on `port`; `Err` when it would
/// drop it. IPv4: `ip_route_input_slow` (martian sources and destinations) and
/// `fib_validate_source` (a local source; `rp_filter`). IPv6: `ip6_rcv_core` and
/// `ip6_forward` (multicast, loopback, IPv4-mapped, unspecified sources).
fn admit(port: PortId, from_host: bool, ip: &Ip, adm: &Adm, fib: &Fib) -> Result<(), DropReason> {
    if from_host {
        // The host port carries the node's own packets: their source is one of its
        // addresses (the routes' `src`), which on any other port is a martian; any other
        // source did not come from the node's stack.
        return if adm.node_addrs.contains(&ip.src) {
            Ok(())
        } else {
            Err(DropReason::Martian)
        };
    }
    match (ip.src, ip.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            // "martian source": multicast, limited broadcast, 0.0.0.0, loopback (the rest
            // of 0.0.0.0/8 is routable since Linux 5.3, and the kernel forwards it).
            if s.is_multicast()
                || s.is_broadcast()
                || s.is_unspecified()
                || s.is_loopback()
                || adm.broadcasts.contains(&s)
            {
                return Err(DropReason::Martian);
            }
            // "martian destination": 0.0.0.0, loopback.
            if d.is_unspecified() || d.is_loopback() {
                return Err(DropReason::Martian);
            }
            // fib_validate_source: a source that is one of our own addresses (RTN_LOCAL)
            // is refused without accept_local.
            if adm.node_addrs.contains(&ip.src) {
                return Err(DropReason::Martian);
            }
            match adm.rp_filter.get(&port).copied().unwrap_or_default() {
                RpFilter::Off => Ok(()),
                // The route back to the source must use the arriving interface.
                RpFilter::Strict => match fib.lookup(ip.src) {
                    Some((out, _)) if out == port => Ok(()),
                    _ => Err(DropReason::ReversePath),
                },
                // Any route back to the source will do.
                RpFilter::Loose => match fib.best(ip.src) {
                    Some(_) => Ok(()),
                    None => Err(DropReason::ReversePath),
                },
            }
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            // RFC 4291 2.5.2/2.5.3/2.5.5.2 and 2.7: never a source, never routed.
            if s.is_multicast()
                || s.is_unspecified()
                || s.is_loopback()
                || d.is_loopback()
                || d.is_unspecified()
                || s.to_ipv4_mapped().is_some()
                || d.to_ipv4_mapped().is_some()
            {
                return Err(DropReason::Martian);
            }
            Ok(())
        }
        _ => Err(DropReason::Malformed),
    }
}

/// Parses the header of a quoted packet (which may be cut short after its L4 ports).
fn parse_quoted(b: &[u8], l3: usize, v6: bool) -> Option<Ip> {
    let (hlen, proto, src_off) = if v6 {
        (40, rd8(b, l3 + 6), 8)
    } else {
        let vihl = rd8(b, l3);
        if vihl >> 4 != 4 {
            return None;
        }
        (usize::from(vihl & 0x0f) * 4, rd8(b, l3 + 9), 12)
    };
    if hlen < 20 || l3 + hlen + 4 > b.len() {
        return None;
    }
    if v6 && rd8(b, l3) >> 4 != 6 {
        return None;
    }
    if !v6 && rd16(b, l3 + 6) & 0x1fff != 0 {
        return None;
    }
    let alen = if v6 { 16 } else { 4 };
    Some(Ip {
        v6,
        l3,
        src: rd_ip(b, l3 + src_off, v6),
        dst: rd_ip(b, l3 + src_off + alen, v6),
        proto,
        l4: l3 + hlen,
        end: b.len(),
        ttl: 0,
        frag: Frag::No,
    })
}

/// An Ethernet ARP frame.
fn arp_frame(
    op: u16,
    sha: [u8; 6],
    eth_dst: [u8; 6],
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&ETH_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f
}
