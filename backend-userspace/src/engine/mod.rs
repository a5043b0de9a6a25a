//! The sans-IO datapath engine: frames in, verdicts and frames out.
//!
//! Skeleton: types and signatures are final, bodies are being filled in.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;
use std::time::Duration;

use svcnat_core::plan::Plan;

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
    /// Packets queued per unresolved neighbour.
    pub neighbour_queue: usize,
    /// Number of connection-table shards (rounded up to a power of two).
    pub shards: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_connections: 262_144,
            snat_ports: 61000..=65535,
            unmatched: Unmatched::Kernel,
            timeouts: Timeouts::default(),
            neighbour_reachable: Duration::from_secs(30),
            neighbour_queue: 3,
            shards: 64,
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

/// A frame the engine generated (ARP, ICMP errors, released queued packets); its checksums
/// are always complete.
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
    /// The TCP/UDP checksum of a connection-creating packet is wrong.
    BadL4Checksum,
    /// A fragment addressed to a frontend or a translated connection.
    Fragment,
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
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 15] = [
        DropReason::Truncated,
        DropReason::Malformed,
        DropReason::BadIpChecksum,
        DropReason::BadL4Checksum,
        DropReason::Fragment,
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
    ];

    /// A short snake_case name for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Malformed => "malformed",
            DropReason::BadIpChecksum => "bad_ip_checksum",
            DropReason::BadL4Checksum => "bad_l4_checksum",
            DropReason::Fragment => "fragment",
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
    /// Queued awaiting neighbour resolution, or an ARP packet the engine handled.
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
    /// Frames consumed (queued or ARP handled).
    pub consumed: u64,
    /// Drops by reason, in [`DropReason::ALL`] order.
    pub drops: Vec<(DropReason, u64)>,
    /// Frames generated (ARP, ICMP errors).
    pub generated: u64,
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
}

/// The sans-IO engine. `Send + Sync`: workers on several cores share one engine.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
}

impl Engine {
    /// An engine with no ports, routes or plan.
    pub fn new(cfg: EngineConfig) -> Engine {
        Engine { cfg }
    }

    /// Replaces the set of owned ports.
    pub fn set_ports(&self, ports: Vec<PortConfig>) {
        let _ = ports;
    }

    /// Replaces the FIB.
    pub fn set_routes(&self, routes: Vec<Route>) {
        let _ = routes;
    }

    /// Compiles and swaps the plan's lookup tables; existing connections keep their endpoint.
    pub fn set_plan(&self, plan: &Plan) {
        let _ = plan;
    }

    /// Handles one received frame; generated frames are appended to `tx`.
    pub fn handle_frame(
        &self,
        now: Duration,
        meta: RxMeta,
        frame: &mut [u8],
        tx: &mut Vec<TxFrame>,
    ) -> Verdict {
        let _ = (now, meta, frame, tx, &self.cfg);
        Verdict::Kernel
    }

    /// When [`Engine::handle_timeout`] should next be called, on the caller's clock.
    pub fn poll_timeout(&self) -> Option<Duration> {
        None
    }

    /// Expires connections and neighbours and retries ARP; frames go to `tx`.
    pub fn handle_timeout(&self, now: Duration, tx: &mut Vec<TxFrame>) {
        let _ = (now, tx);
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        Counters::default()
    }
}
