//! The driver: AF_PACKET rings feeding the [`Engine`], and the kernel taken out of the
//! forwarding path for what the engine handles.
//!
//! ```text
//!   owned interfaces (eth0, vp*) ──► TPACKET_V2 rings, PACKET_FANOUT hash ──► worker 0..N
//!        ▲                                                                 │ Engine::handle_frame
//!        └──── TPACKET_V2 transmit ring (sendmmsg for GSO frames) ◄────────┘ (shared, Sync)
//!
//!   kernel: net.ipv4.ip_forward=0, and `table netdev svcnat` drops at ingress what the
//!   engine forwards (transit traffic, node-address frontends, SNAT'd replies)
//! ```
//!
//! AF_PACKET is a tap: the kernel receives its own copy of every frame. The driver turns
//! IPv4 forwarding off and installs an nftables `netdev` ingress chain on each owned
//! interface that drops, before the IP stack sees them, the frames the engine handles: any
//! IPv4 or IPv6 packet not addressed to one of the node's addresses (the engine routes it),
//! packets to a frontend on a node address (NodePorts, externalIPs that are node IPs), and
//! packets to a node address in the engine's SNAT port range (replies of masqueraded
//! connections). Everything else addressed to the node (ARP, neighbour discovery and other
//! multicast, SSH, the node's own connections) still reaches the kernel, so nothing is
//! forwarded twice and nothing is lost.
//!
//! IPv6 forwarding (`net.ipv6.conf.*.forwarding`) is left as it is: it also decides whether
//! the kernel accepts router advertisements and sets the Router flag in its neighbour
//! advertisements, and the ingress drops already keep the kernel from forwarding what
//! arrives on an owned interface. The engine answers neighbour discovery for the pods'
//! IPv6 gateway ([`UserspaceConfig::pod_gateway6`]) only on interfaces where the kernel does
//! not own that address; where it does (an address configured on the veth), the kernel
//! answers with the same MAC.
//!
//! Interfaces, addresses and routes are read with `ip -json` at start and on every sync, so
//! pods that come and go (new veths) are picked up; each worker's socket is narrowed to the
//! owned interfaces with a BPF filter. Plan updates swap the engine's tables; workers never
//! stop. Dropping [`Userspace`] stops the workers and gives forwarding back to the kernel.
//! The node's original `net.ipv4.ip_forward` is recorded in the table's comment, so that a
//! process started after a killed one, and [`cleanup`], restore that value rather than
//! the killed process's 0. The ingress table is checked against its listing after each
//! apply ([`Dataplane::drifted`]): deleted, flushed or edited, it is put back.
//!
//! The node's own traffic ([`UserspaceConfig::node_traffic`]): what the node itself sends
//! to a Service (kubelet probes, hostNetwork pods, `curl` on the node) is routed by the
//! kernel and never arrives on an owned interface; kube-proxy's iptables mode translates it
//! in the OUTPUT hook. Here the driver makes the node one more pod:
//!
//! ```text
//!   node's stack ── route table local 10.96.0.10/32 via 169.254.1.1 dev svcnat-host onlink
//!        │                                   src NODE_IP (one per ClusterIP)
//!   svcnat-host ══ veth ══ svcnat-eng (owned, no address: the engine answers ARP/ND for
//!        ▲                     │           the pods' gateway, as on a pod veth)
//!        │                     ▼ Engine: DNAT, masquerade NODE_IP:eph → NODE_IP:61000+
//!        │                 eth0 / vp* ──► endpoint ──► reply to NODE_IP:61000+ (dropped at
//!        └──── un-NATted reply (from the ClusterIP) ◄── ingress, the engine's SNAT range)
//! ```
//!
//! The routes go into the `local` table (consulted first, by rule 0), not `main`: the driver
//! reads `main` on every sync to build the engine's FIB, and 10,000 ClusterIP routes there
//! made each partial sync list and parse a megabyte of routes (userspace programming
//! latency p50 74 -> 441 ms at 10,000 Services); the node's `ip route` stays readable too.
//! kube-proxy's IPVS mode fills the same table with every ClusterIP (as local addresses).
//!
//! The engine serves only frontends and tracked connections on the host port, admits only
//! node addresses as sources there, always masquerades (replies must come back through the
//! engine's SNAT range) and sends a connection's replies back out the host port to
//! `svcnat-host`'s MAC (its conntrack entry remembers where the original came in). The
//! pair is made at start (a leftover one replaced), made again by the next sync when
//! deleted, and removed (routes and all) on drop and by [`cleanup`]; the routes follow the
//! plan on every sync, and [`Dataplane::drifted`] notices a missing end or a route added or
//! deleted behind its back.
//!
//! NodePorts on the node's own addresses from the node itself cannot be routed in: the
//! kernel's `local` routing table delivers them before any route to a device is looked
//! at. They are taken on `lo` instead ([`LOOPBACK`], owned with `node_traffic`):
//!
//! ```text
//!   curl NODE_IP:30000 ── lo (out, ignored by the rings) ── netif_rx ── lo (in)
//!        │   packet taps: the rings see it first ──► Engine: as from the host port
//!        │   netdev ingress `in_lo`: the kernel's copy dropped (node address → NodePort)
//!        ▼
//!   reply NODE_IP:30000 → NODE_IP:eph ── out svcnat-eng ── svcnat-host (accept_local=1)
//! ```
//!
//! A locally sent packet to a local address goes out `lo` and comes back in through
//! `netif_rx`, where packet taps see it before the netdev ingress hook, the same order the
//! NodePort path on a NIC relies on. The chain `in_lo` drops exactly the node's TCP, UDP
//! and SCTP from a node address to a NodePort on a node address (everything else on `lo`,
//! 127.0.0.1 NodePorts included, stays the kernel's: kube-proxy's IPVS mode does not serve
//! localhost NodePorts either), and the engine takes exactly those
//! ([`PortConfig::loopback`](crate::engine::PortConfig::loopback)): masqueraded, their
//! replies and REJECTs sent out the host pair. Those come from a node address, a martian on
//! `svcnat-host` unless `accept_local=1` there, which the driver sets on that interface only,
//! with `rp_filter=0`: `accept_local` passes only without reverse-path filtering (the
//! interface has no IPv4 address, which fails even the loose check), and
//! `net.ipv4.conf.all.rp_filter` raises every interface's, so while it is set `lo` is left to
//! the kernel (IPv6 has no such check). The reply the node's stack receives on
//! `svcnat-host` is delivered there, never looped over `lo` again. TCP hands `lo` (MTU
//! 65,536) GSO aggregates of MSS-sized segments, which leave whole for the kernel to
//! segment. The rings' BPF filter takes from `lo` only TCP, UDP and SCTP to a port between
//! the plan's lowest and highest NodePort (widened before `in_lo` changes, narrowed after),
//! so the node's other loopback traffic (databases, sidecars) never reaches them. `in_lo`
//! is in the driver's table: a flushed chain is noticed by [`Dataplane::drifted`], and the
//! chain goes with the table.
//!
//! Nor are externalIPs and load balancer IPs served: a route takes every port of its
//! address, and such an address may be another node's or a host's on the network (kube-proxy
//! matches address, protocol and port in OUTPUT); routing one here once cut a node off from
//! the pods behind the other node, whose address was an externalIP.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use svcnat_core::conntrack::stale_flows;
use svcnat_core::model::Protocol;
use svcnat_core::plan::{Dataplane, FrontendKind, Plan, PlanDiff, SyncReport};

use crate::engine::{
    Admission, Counters, Csum, Engine, EngineConfig, FibEntry, PortConfig, Route, RpFilter, RxMeta,
    TxFrame, Verdict,
};
use crate::sys::{
    self, LoopbackFilter, PacketSocket, RingConfig, SocketControl, TxRing, TxSocket, VNET_HDR_LEN,
    VNET_NEEDS_CSUM,
};

/// The nftables table the driver owns.
pub const NFT_TABLE: &str = "svcnat";

/// Settings of the userspace backend.
#[derive(Clone, Debug)]
pub struct UserspaceConfig {
    /// Run in this named network namespace (`/run/netns/NAME`); `None` is the current one.
    pub netns: Option<String>,
    /// Interfaces the datapath owns: exact names, or prefixes ending in `*` (`vp*`).
    pub interfaces: Vec<String>,
    /// Worker threads (one socket and ring each, in one fanout group); 0 means one per CPU.
    pub workers: usize,
    /// The pods' default gateway, answered by ARP on owned interfaces that have no IPv4
    /// address of their own (Calico-style pod veths).
    pub pod_gateway: Option<Ipv4Addr>,
    /// The pods' IPv6 default gateway, answered by neighbour discovery on owned interfaces
    /// that have no address of their own beyond IPv6 link-local ones (where the interface
    /// has it configured, the kernel answers for it).
    pub pod_gateway6: Option<Ipv6Addr>,
    /// The engine's settings.
    pub engine: EngineConfig,
    /// Shape of each worker's receive ring.
    pub ring: RingConfig,
    /// Transmit frames that fit a 2 KiB slot through a mapped ring (`PACKET_TX_RING`,
    /// one `sendto` per batch and interface) instead of `sendmmsg` (default on; the
    /// benchmark compares both).
    pub tx_ring: bool,
    /// How long an idle worker keeps looking at its ring before it sleeps in `poll(2)`
    /// (busy polling; default zero). Waking a sleeping worker takes tens of microseconds
    /// on a virtual machine, twice per request and answer; spinning saves that at the
    /// cost of the CPU it burns while traffic is sparse.
    pub busy_poll: Duration,
    /// Route the node's own traffic to ClusterIPs through the datapath: a veth pair
    /// [`HOST_VETH`]/[`HOST_PORT`] and a host route per ClusterIP into it, and take its
    /// connections to NodePorts on its own addresses on [`LOOPBACK`] (see the
    /// [module](self) docs). 127.0.0.1 NodePorts, externalIPs and load balancer IPs are
    /// not covered (a route would take every port of the address).
    pub node_traffic: bool,
}

/// The node's side of the host veth pair: it stays with the node's IP stack, which routes
/// Service addresses into it.
pub const HOST_VETH: &str = "svcnat-host";

/// The node's loopback device, owned with [`UserspaceConfig::node_traffic`]: the node's
/// connections to NodePorts on its own addresses go out and come back in there.
pub const LOOPBACK: &str = "lo";

/// The engine's side of the host veth pair: an owned port without an address, answering
/// ARP and neighbour discovery for the pods' gateway as a pod veth does.
pub const HOST_PORT: &str = "svcnat-eng";

impl Default for UserspaceConfig {
    fn default() -> Self {
        UserspaceConfig {
            netns: None,
            interfaces: vec!["eth0".into()],
            workers: 0,
            pod_gateway: Some(Ipv4Addr::new(169, 254, 1, 1)),
            pod_gateway6: Some(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
            engine: EngineConfig::default(),
            ring: RingConfig::default(),
            tx_ring: true,
            busy_poll: Duration::ZERO,
            node_traffic: false,
        }
    }
}

/// What went wrong in the userspace backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// A system call on the packet sockets failed.
    #[error("{what}: {source}")]
    Socket {
        /// The operation.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A helper program (`ip`, `nft`, `sysctl`) could not run or failed.
    #[error("`{command}` failed: {message}")]
    Command {
        /// The command line.
        command: String,
        /// Its error output or the spawn error.
        message: String,
    },
    /// `ip -json` printed something unexpected.
    #[error("cannot read `{command}` output: {message}")]
    Parse {
        /// The command line.
        command: String,
        /// What was wrong.
        message: String,
    },
    /// No interface matched the configured names.
    #[error("no interface matches {patterns:?} in {netns}")]
    NoInterfaces {
        /// The configured patterns.
        patterns: Vec<String>,
        /// The namespace searched.
        netns: String,
    },
}

/// Counters of the driver itself (the engine keeps its own).
#[derive(Debug, Default)]
struct DriverCounters {
    rx_frames: AtomicU64,
    rx_truncated: AtomicU64,
    rx_vlan: AtomicU64,
    rx_queued: AtomicU64,
    tx_frames: AtomicU64,
    tx_errors: AtomicU64,
    ring_drops: AtomicU64,
}

/// A snapshot of every counter, for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames taken from the rings.
    pub rx_frames: u64,
    /// Frames not received whole (dropped): too big for the read buffer, or too big for a
    /// ring slot while the socket's receive buffer was full.
    pub rx_truncated: u64,
    /// Frames that arrived with an 802.1Q/802.1ad tag (left to the kernel).
    pub rx_vlan: u64,
    /// Frames too big for a ring slot (GSO aggregates, jumbo frames), read whole from the
    /// socket in their turn.
    pub rx_queued: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Frames the transmit socket refused.
    pub tx_errors: u64,
    /// Frames the kernel dropped because a ring was full.
    pub ring_drops: u64,
    /// The engine's counters.
    pub engine: Counters,
}

/// The userspace datapath of one node.
pub struct Userspace {
    cfg: UserspaceConfig,
    engine: Arc<Engine>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    filters: Arc<Vec<SocketControl>>,
    counters: Arc<DriverCounters>,
    owned: Vec<u32>,
    /// Whether `lo` is owned: the node's own NodePort connections are served (see
    /// [`serves_lo`]).
    serve_lo: bool,
    /// The destination ports the rings take on `lo` (the plan's NodePorts on node
    /// addresses, lowest to highest).
    lo_ports: (u16, u16),
    nft_applied: Option<String>,
    /// `nft list table` of what was applied, counters left out: what [`Dataplane::drifted`]
    /// compares with.
    nft_listing: Option<String>,
    forwarding_before: Option<String>,
    links: Links,
    last_drift_check: Option<Instant>,
    /// When [`Dataplane::drifted`] last compared the owned interfaces with the kernel's.
    last_link_check: Option<Instant>,
    /// The host routes the last sync wanted through [`HOST_VETH`] (with
    /// [`UserspaceConfig::node_traffic`]): what the next partial sync diffs against, and
    /// what [`Dataplane::drifted`] compares with.
    host_routes: BTreeMap<IpNet, HostRoute>,
    /// Whether [`Userspace::host_routes`] is what the kernel has (false after a failed
    /// apply and at a resync: the next sync reads the kernel's listing instead).
    host_routes_known: bool,
}

impl std::fmt::Debug for Userspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Userspace")
            .field("netns", &self.cfg.netns)
            .field("workers", &self.workers.len())
            .field("owned", &self.owned)
            .finish_non_exhaustive()
    }
}

impl Userspace {
    /// Opens the rings, starts the workers and takes over forwarding on the owned
    /// interfaces. Traffic flows (plain routing) before the first plan arrives.
    pub fn start(mut cfg: UserspaceConfig) -> Result<Userspace, SyncError> {
        if cfg.engine.hash_key == 0 {
            // A secret per process: no sender can aim at one connection-table shard.
            cfg.engine.hash_key = random_key()?;
        }
        let engine = Arc::new(Engine::new(cfg.engine.clone()));
        if cfg.node_traffic {
            // A pair left by a killed predecessor is replaced (with its routes).
            remove_host_veth(cfg.netns.as_deref())?;
            ensure_host_veth(&cfg, &read_links(&cfg)?)?;
        }
        let links = read_links(&cfg)?;
        let (adm, rp_filter_all) = admission(&cfg, &links, &owned_ports(&cfg, &links, false))?;
        let serve_lo = serves_lo(&cfg, rp_filter_all);
        let owned = owned_ports(&cfg, &links, serve_lo);
        if owned.is_empty() {
            return Err(SyncError::NoInterfaces {
                patterns: cfg.interfaces.clone(),
                netns: cfg.netns.clone().unwrap_or_else(|| "this namespace".into()),
            });
        }
        engine.set_ports(port_configs(&cfg, &links, &owned));
        engine.set_fib(read_routes(&cfg, &links, &owned)?);
        engine.set_admission(adm);

        let workers = match cfg.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (rx, tx) = open_sockets(&cfg, workers)?;
        let ifindexes: Vec<u32> = owned.iter().copied().collect();
        let group = (std::process::id() as u16) ^ 0x5a5a;
        let mut filters = Vec::new();
        for sock in &rx {
            let sock = sock
                .control()
                .map_err(|source| socket_error("duplicate a socket", source))?;
            apply_filters(std::slice::from_ref(&sock), &links, &ifindexes, NO_PORTS)?;
            if workers > 1 {
                sock.join_fanout(group)
                    .map_err(|source| socket_error("join the fanout group", source))?;
            }
            filters.push(sock);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(DriverCounters::default());
        let epoch = Instant::now();
        let mut handles = Vec::new();
        for (i, (rx, tx)) in rx.into_iter().zip(tx).enumerate() {
            let ctx = Worker {
                engine: Arc::clone(&engine),
                stop: Arc::clone(&stop),
                counters: Arc::clone(&counters),
                epoch,
                busy_poll: cfg.busy_poll,
            };
            let handle = std::thread::Builder::new()
                .name(format!("svcnat-dp{i}"))
                .spawn(move || ctx.run(rx, tx))
                .map_err(|source| socket_error("spawn a worker", source))?;
            handles.push(handle);
        }
        let mut dp = Userspace {
            cfg,
            engine,
            stop,
            workers: handles,
            filters: Arc::new(filters),
            counters,
            owned: ifindexes,
            serve_lo,
            lo_ports: NO_PORTS,
            nft_applied: None,
            nft_listing: None,
            forwarding_before: None,
            links,
            last_drift_check: None,
            last_link_check: None,
            host_routes: BTreeMap::new(),
            host_routes_known: false,
        };
        // The original setting is the one a killed predecessor recorded in its table, if
        // one is left: then the sysctl holds that process's own change, not the node's.
        let original = match recorded_forwarding(dp.cfg.netns.as_deref())? {
            Some(v) => v,
            None => dp.sysctl_read("net.ipv4.ip_forward")?,
        };
        dp.forwarding_before = Some(original);
        // The table (and with it the record) goes in before forwarding is turned off, so
        // a process killed between the two leaves the original where a restart finds it.
        dp.apply_nft(None)?;
        dp.sysctl_write("net.ipv4.ip_forward", "0")?;
        Ok(dp)
    }

    /// The engine (for tests and metrics).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Every counter.
    pub fn stats(&self) -> Stats {
        collect_stats(&self.engine, &self.counters, &self.filters)
    }

    /// A function that reads every counter, for a metrics server on another thread.
    pub fn stats_source(&self) -> impl Fn() -> Stats + Send + Sync + 'static {
        let (engine, counters, filters) = (
            Arc::clone(&self.engine),
            Arc::clone(&self.counters),
            Arc::clone(&self.filters),
        );
        move || collect_stats(&engine, &counters, &filters)
    }

    /// Re-reads interfaces and routes; new owned interfaces join the filters. A host veth
    /// pair someone deleted is created again.
    fn refresh(&mut self) -> Result<(), SyncError> {
        let mut links = read_links(&self.cfg)?;
        if self.cfg.node_traffic && ensure_host_veth(&self.cfg, &links)? {
            // A new pair has no routes: the next route sync starts from the kernel's.
            self.host_routes_known = false;
            links = read_links(&self.cfg)?;
        }
        let (adm, rp_filter_all) =
            admission(&self.cfg, &links, &owned_ports(&self.cfg, &links, false))?;
        self.serve_lo = serves_lo(&self.cfg, rp_filter_all);
        let owned = owned_ports(&self.cfg, &links, self.serve_lo);
        let ifindexes: Vec<u32> = owned.iter().copied().collect();
        if ifindexes != self.owned {
            apply_filters(&self.filters, &links, &ifindexes, self.lo_ports)?;
            self.owned = ifindexes;
        }
        self.engine
            .set_ports(port_configs(&self.cfg, &links, &owned));
        self.engine.set_fib(read_routes(&self.cfg, &links, &owned)?);
        self.engine.set_admission(adm);
        self.links = links;
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        match &self.cfg.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    fn sysctl_read(&self, key: &str) -> Result<String, SyncError> {
        let mut c = self.command("sysctl");
        c.args(["-n", key]);
        Ok(run(c, None)?.trim().to_string())
    }

    fn sysctl_write(&self, key: &str, value: &str) -> Result<(), SyncError> {
        let mut c = self.command("sysctl");
        c.args(["-q", "-w", &format!("{key}={value}")]);
        run(c, None).map(drop)
    }

    /// Installs the ingress drops for what the engine handles; skips `nft` when unchanged.
    fn apply_nft(&mut self, plan: Option<&Plan>) -> Result<(), SyncError> {
        let original = self.forwarding_before.as_deref().unwrap_or("1");
        let text = render_nft(&self.links, &self.owned, plan, &self.cfg.engine, original);
        if self.nft_applied.as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        let mut c = self.command("nft");
        c.args(["-f", "-"]);
        run(c, Some(&text))?;
        self.nft_applied = Some(text);
        self.nft_listing = Some(self.nft_list()?);
        Ok(())
    }

    /// Applies the ingress table for `plan`, and points the rings' `lo` filter at its
    /// NodePorts: widened before the table (the engine must see what `in_lo` starts to
    /// drop), narrowed after it (and keep seeing what it still drops until then).
    fn apply_nft_and_lo_ports(&mut self, plan: &Plan) -> Result<(), SyncError> {
        let want = if self.serve_lo {
            lo_port_range(&self.links, plan)
        } else {
            NO_PORTS
        };
        self.set_lo_ports(port_union(self.lo_ports, want))?;
        self.apply_nft(Some(plan))?;
        self.set_lo_ports(want)
    }

    fn set_lo_ports(&mut self, ports: (u16, u16)) -> Result<(), SyncError> {
        if ports != self.lo_ports {
            apply_filters(&self.filters, &self.links, &self.owned, ports)?;
            self.lo_ports = ports;
        }
        Ok(())
    }

    /// The ingress table as `nft list table` prints it now, counters left out.
    fn nft_list(&self) -> Result<String, SyncError> {
        let mut c = self.command("nft");
        c.args(["list", "table", "netdev", NFT_TABLE]);
        run(c, None).map(|t| without_counters(&t))
    }

    fn report(&self, plan: &Plan, full: bool) -> SyncReport {
        SyncReport::of_plan(plan, full, plan.frontends().count())
    }

    /// Makes the host routes through [`HOST_VETH`] those of `plan`'s ClusterIPs: the
    /// missing ones added, the others deleted. A partial sync diffs against what the last
    /// sync applied (listing 10,000 routes costs ~50 ms, and the listing is what a partial
    /// sync must not pay for); a resync, and the sync after a failed apply, diff against
    /// the kernel's listing, so a failed or partial apply is repaired. Someone else's
    /// change is noticed by [`Dataplane::drifted`].
    fn sync_host_routes(&mut self, plan: &Plan) -> Result<(), SyncError> {
        if !self.cfg.node_traffic {
            return Ok(());
        }
        let want = host_routes(&self.cfg, &self.links, plan);
        if !self.host_routes_known {
            self.host_routes = read_host_routes(&self.cfg)?;
        }
        let script = host_route_script(&want, &self.host_routes);
        if script.is_empty() {
            self.host_routes_known = true;
            return Ok(());
        }
        let mut c = Command::new("ip");
        if let Some(ns) = &self.cfg.netns {
            c.args(["-n", ns]);
        }
        // `-force`: a route the kernel refuses does not keep the others out; the error
        // still fails the sync, and the next one tries again from the kernel's listing.
        c.args(["-force", "-batch", "-"]);
        let applied = run(c, Some(&script)).map(drop);
        self.host_routes_known = applied.is_ok();
        self.host_routes = want;
        applied
    }

    /// Stops the workers and hands forwarding back to the kernel.
    fn shutdown(&mut self) -> Result<(), SyncError> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
        let mut first_err = None;
        // The node's Service traffic first: with the pair gone (its routes with it), the
        // kernel routes it as it did before the datapath started.
        if self.cfg.node_traffic
            && let Err(e) = remove_host_veth(self.cfg.netns.as_deref())
        {
            first_err.get_or_insert(e);
        }
        self.host_routes.clear();
        self.host_routes_known = false;
        // Forwarding first, the table (which records the original) last: a process killed
        // in between leaves the record for the next start or `cleanup`.
        if let Some(v) = self.forwarding_before.take()
            && let Err(e) = self.sysctl_write("net.ipv4.ip_forward", &v)
        {
            first_err.get_or_insert(e);
        }
        if self.nft_applied.take().is_some() {
            self.nft_listing = None;
            let mut c = self.command("nft");
            c.args(["delete", "table", "netdev", NFT_TABLE]);
            if let Err(e) = run(c, None) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Dataplane for Userspace {
    type Error = SyncError;

    fn sync(&mut self, plan: &Plan, diff: &PlanDiff) -> Result<SyncReport, SyncError> {
        // The engine compiles a whole plan into lookup tables in one swap; that costs about
        // what the core's compile does, far below the ip/nft calls around it.
        self.refresh()?;
        self.engine.set_plan(plan);
        // The engine's own connection table remembers NAT decisions as kernel conntrack
        // does: UDP flows to departed endpoints are forgotten once the new plan is in.
        let forgotten = self.engine.forget_stale(&stale_flows(diff, plan));
        self.apply_nft_and_lo_ports(plan)?;
        self.sync_host_routes(plan)?;
        let mut report = self.report(plan, false);
        report.conntrack_deleted = forgotten;
        Ok(report)
    }

    fn resync(&mut self, plan: &Plan) -> Result<SyncReport, SyncError> {
        self.refresh()?;
        self.engine.set_plan(plan);
        self.nft_applied = None;
        self.apply_nft_and_lo_ports(plan)?;
        self.host_routes_known = false;
        self.sync_host_routes(plan)?;
        Ok(self.report(plan, true))
    }

    fn cleanup(&mut self) -> Result<(), SyncError> {
        self.shutdown()
    }

    /// Whether someone removed, flushed or edited the ingress table (`nft flush ruleset`,
    /// `nft flush chain netdev svcnat in_2`, a rule added or deleted): then the kernel
    /// delivers NodePort traffic locally or forwards nothing, and a resync must restore
    /// it. The table is compared with its listing right after it was applied, counters
    /// left out. Checked at most every [`DRIFT_CHECK_INTERVAL`].
    fn drifted(&mut self) -> Result<bool, SyncError> {
        // An owned interface appeared or went (a pod started after the last sync, its
        // EndpointSlice already applied): the filters, ports and routes must follow at once,
        // not at the next periodic resync.
        if self
            .last_link_check
            .is_none_or(|t| t.elapsed() >= LINK_CHECK_INTERVAL)
        {
            self.last_link_check = Some(Instant::now());
            let links = read_links(&self.cfg)?;
            let owned: Vec<u32> = owned_ports(&self.cfg, &links, self.serve_lo)
                .into_iter()
                .collect();
            if owned != self.owned {
                return Ok(true);
            }
            // The host veth pair deleted (its routes go with it).
            if self.cfg.node_traffic && host_veth_missing(&links) {
                return Ok(true);
            }
        }
        if self.nft_applied.is_none()
            || self
                .last_drift_check
                .is_some_and(|t| t.elapsed() < DRIFT_CHECK_INTERVAL)
        {
            return Ok(false);
        }
        self.last_drift_check = Some(Instant::now());
        // Host routes deleted or added by someone else.
        if self.cfg.node_traffic
            && read_host_routes(&self.cfg).map_or(true, |have| have != self.host_routes)
        {
            return Ok(true);
        }
        Ok(match self.nft_list() {
            Ok(now) => self.nft_listing.as_deref() != Some(now.as_str()),
            Err(_) => true,
        })
    }
}

/// How often [`Dataplane::drifted`] looks for the ingress table.
pub const DRIFT_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// How often [`Dataplane::drifted`] compares the owned interfaces with the kernel's.
pub const LINK_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl Drop for Userspace {
    fn drop(&mut self) {
        // Without workers the ingress drops would black-hole the node: give it back.
        let _ = self.shutdown();
    }
}

fn collect_stats(engine: &Engine, counters: &DriverCounters, filters: &[SocketControl]) -> Stats {
    // PACKET_STATISTICS resets on read: fold each read into the running total.
    for s in filters {
        if let Ok((_, drops)) = s.stats() {
            counters.ring_drops.fetch_add(drops, Ordering::Relaxed);
        }
    }
    Stats {
        rx_frames: counters.rx_frames.load(Ordering::Relaxed),
        rx_truncated: counters.rx_truncated.load(Ordering::Relaxed),
        rx_vlan: counters.rx_vlan.load(Ordering::Relaxed),
        rx_queued: counters.rx_queued.load(Ordering::Relaxed),
        tx_frames: counters.tx_frames.load(Ordering::Relaxed),
        tx_errors: counters.tx_errors.load(Ordering::Relaxed),
        ring_drops: counters.ring_drops.load(Ordering::Relaxed),
        engine: engine.counters(),
    }
}

impl Stats {
    /// The counters in the Prometheus text format, `svcnat_userspace_*`.
    pub fn prometheus(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP svcnat_userspace_{name} {help}");
            let _ = writeln!(out, "# TYPE svcnat_userspace_{name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(out, "svcnat_userspace_{name}{labels} {v}");
            }
        };
        let one = |v: u64| [(String::new(), v)];
        let e = &self.engine;
        metric(
            "rx_frames_total",
            "counter",
            "Frames taken from the receive rings.",
            &one(self.rx_frames),
        );
        metric(
            "rx_bytes_total",
            "counter",
            "Bytes the engine handled.",
            &one(e.rx_bytes),
        );
        metric(
            "tx_frames_total",
            "counter",
            "Frames sent.",
            &one(self.tx_frames),
        );
        metric(
            "tx_errors_total",
            "counter",
            "Frames the transmit socket refused.",
            &one(self.tx_errors),
        );
        metric(
            "ring_drops_total",
            "counter",
            "Frames the kernel dropped on a full ring.",
            &one(self.ring_drops),
        );
        metric(
            "truncated_total",
            "counter",
            "Frames not received whole (too big for a slot and the socket buffer full, or for the read buffer).",
            &one(self.rx_truncated),
        );
        metric(
            "vlan_frames_total",
            "counter",
            "Frames with a VLAN tag, left to the kernel.",
            &one(self.rx_vlan),
        );
        metric(
            "queued_frames_total",
            "counter",
            "Frames too big for a ring slot, read whole from the socket.",
            &one(self.rx_queued),
        );
        metric(
            "verdicts_total",
            "counter",
            "Engine verdicts.",
            &[
                ("{verdict=\"forward\"}".to_string(), e.forwarded),
                ("{verdict=\"kernel\"}".to_string(), e.kernel),
                ("{verdict=\"consumed\"}".to_string(), e.consumed),
            ],
        );
        metric(
            "reassembled_total",
            "counter",
            "Datagrams reassembled from fragments.",
            &one(e.reassembled),
        );
        metric(
            "fragments_sent_total",
            "counter",
            "Fragments sent (split for the egress MTU or to their original size).",
            &one(e.fragments_sent),
        );
        metric(
            "reassembly_pending",
            "gauge",
            "Incomplete datagrams held for reassembly.",
            &one(e.reassembly_pending),
        );
        metric(
            "reassembly_memory_bytes",
            "gauge",
            "Bytes accounted to held fragments (bounded by the reassembly budget).",
            &one(e.reassembly_memory),
        );
        let drops: Vec<(String, u64)> = e
            .drops
            .iter()
            .map(|(r, n)| (format!("{{reason=\"{}\"}}", r.as_str()), *n))
            .collect();
        metric(
            "drops_total",
            "counter",
            "Frames dropped, by reason.",
            &drops,
        );
        metric(
            "generated_total",
            "counter",
            "Frames generated (ARP, ICMP errors).",
            &one(e.generated),
        );
        metric(
            "connections",
            "gauge",
            "Connections tracked.",
            &one(e.connections),
        );
        metric(
            "connections_created_total",
            "counter",
            "Connections created.",
            &one(e.connections_created),
        );
        metric(
            "connections_evicted_total",
            "counter",
            "Connections evicted to admit new ones.",
            &one(e.connections_evicted),
        );
        metric(
            "connections_expired_total",
            "counter",
            "Connections timed out.",
            &one(e.connections_expired),
        );
        metric(
            "neighbours",
            "gauge",
            "Neighbour table entries.",
            &one(e.neighbours),
        );
        out
    }
}

/// Removes what a datapath left behind, for `--cleanup` after a crash and for a second
/// SIGTERM during shutdown: `net.ipv4.ip_forward` goes back to the value the ingress
/// table records as the node's original, then the table is deleted. Without a table
/// there is nothing to undo (forwarding is left as it is).
pub fn cleanup(netns: Option<&str>) -> Result<(), SyncError> {
    remove_host_veth(netns)?;
    let Some(original) = recorded_forwarding(netns)? else {
        return Ok(());
    };
    let mut c = in_netns(netns, "sysctl");
    c.args(["-q", "-w", &format!("net.ipv4.ip_forward={original}")]);
    run(c, None)?;
    let mut c = in_netns(netns, "nft");
    c.args(["delete", "table", "netdev", NFT_TABLE]);
    run(c, None).map(drop)
}

/// `program` run in the named network namespace, or here.
fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

/// The comment of the ingress table that records the node's own `net.ipv4.ip_forward`.
const FORWARDING_MARK: &str = "svcnat: original net.ipv4.ip_forward=";

/// The original `net.ipv4.ip_forward` a datapath recorded in its ingress table: `None`
/// when there is no table, `Some("1")` for a table without the record (an older
/// version's: a node that ran a proxy forwarded).
fn recorded_forwarding(netns: Option<&str>) -> Result<Option<String>, SyncError> {
    let mut c = in_netns(netns, "nft");
    c.args(["list", "tables", "netdev"]);
    let tables = run(c, None)?;
    if !tables
        .lines()
        .any(|l| l.trim() == format!("table netdev {NFT_TABLE}"))
    {
        return Ok(None);
    }
    let mut c = in_netns(netns, "nft");
    c.args(["list", "table", "netdev", NFT_TABLE]);
    let text = run(c, None)?;
    Ok(Some(
        parse_forwarding_mark(&text).unwrap_or_else(|| "1".into()),
    ))
}

/// The value in the table's `comment "svcnat: original net.ipv4.ip_forward=N"` line.
fn parse_forwarding_mark(listing: &str) -> Option<String> {
    listing.lines().find_map(|l| {
        let v = l
            .trim()
            .strip_prefix("comment \"")?
            .strip_suffix('"')?
            .strip_prefix(FORWARDING_MARK)?;
        (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())).then(|| v.to_string())
    })
}

/// A table listing without the values of its counters (`counter packets 3 bytes 180`
/// becomes `counter`), which change with traffic.
fn without_counters(listing: &str) -> String {
    let mut out = String::with_capacity(listing.len());
    for line in listing.lines() {
        let mut words = line.split_whitespace();
        let mut kept = Vec::new();
        while let Some(w) = words.next() {
            if w == "packets" || w == "bytes" {
                words.next();
                continue;
            }
            kept.push(w);
        }
        out.push_str(&kept.join(" "));
        out.push('\n');
    }
    out
}

/// Eight random bytes from the kernel.
fn random_key() -> Result<u64, SyncError> {
    use std::io::Read as _;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|source| socket_error("read /dev/urandom for the shard hash key", source))?;
    Ok(u64::from_ne_bytes(b))
}

fn socket_error(what: &str, source: std::io::Error) -> SyncError {
    SyncError::Socket {
        what: what.to_string(),
        source,
    }
}

/// Opens `n` receive rings and `n` transmit sides inside the configured namespace (a
/// packet socket belongs to the namespace it was created in; a short-lived thread enters
/// it so the caller's thread stays where it is).
fn open_sockets(
    cfg: &UserspaceConfig,
    n: usize,
) -> Result<(Vec<PacketSocket>, Vec<Tx>), SyncError> {
    let netns = cfg.netns.clone();
    let ring = cfg.ring;
    let tx_ring = cfg.tx_ring;
    let opened = std::thread::scope(|s| {
        s.spawn(move || -> Result<(Vec<PacketSocket>, Vec<Tx>), SyncError> {
            if let Some(ns) = &netns {
                sys::enter_netns(ns)
                    .map_err(|source| socket_error(&format!("enter netns {ns}"), source))?;
            }
            let mut rx = Vec::new();
            let mut tx = Vec::new();
            for _ in 0..n {
                rx.push(
                    PacketSocket::open(ring)
                        .map_err(|source| socket_error("open an AF_PACKET ring", source))?,
                );
                let sock = TxSocket::open()
                    .map_err(|source| socket_error("open an AF_PACKET sender", source))?;
                let ring = if tx_ring {
                    Some(TxRing::open(TX_RING_SLOTS).map_err(|source| {
                        socket_error("open an AF_PACKET transmit ring", source)
                    })?)
                } else {
                    None
                };
                tx.push(Tx { sock, ring });
            }
            Ok((rx, tx))
        })
        .join()
    });
    match opened {
        Ok(r) => r,
        Err(_) => Err(socket_error(
            "open sockets",
            std::io::Error::other("the socket thread panicked"),
        )),
    }
}

/// Slots in each worker's transmit ring (2 KiB each: 1 MiB per worker).
const TX_RING_SLOTS: u32 = 512;

/// A worker's transmit side: the ring for frames that fit a slot, the socket for GSO
/// aggregates, jumbo frames and whatever the ring cannot take at the moment.
struct Tx {
    sock: TxSocket,
    ring: Option<TxRing>,
}

/// Sends a batch through the ring, one `sendto` per outgoing interface, and the rest with
/// `sendmmsg`; returns how many frames the kernel took. Frames are grouped by interface in
/// their order within each (a flow leaves by one interface, so no flow is reordered).
fn send_by_ring(ring: &mut TxRing, sock: &TxSocket, out: &[(u32, &[u8])]) -> usize {
    let mut sorted = out.to_vec();
    // Stable: each interface's frames keep their order.
    sorted.sort_by_key(|(port, _)| *port);
    let mut sent = 0;
    for group in sorted.chunk_by(|a, b| a.0 == b.0) {
        let port = group[0].0;
        let mut k = 0;
        while k < group.len() {
            if TxRing::fits(group[k].1) {
                let n = ring.send(port, &group[k..]).unwrap_or(0);
                if n > 0 {
                    k += n;
                    sent += n;
                    continue;
                }
                // The ring is full (or the kernel refused): the socket takes the rest.
                sent += sock.send_batch(&group[k..]).unwrap_or(0);
                break;
            }
            let end = group[k..]
                .iter()
                .position(|(_, f)| TxRing::fits(f))
                .map_or(group.len(), |p| k + p);
            sent += sock.send_batch(&group[k..end]).unwrap_or(0);
            k = end;
        }
    }
    sent
}

/// A frame the engine made, behind an all-zero `virtio_net_hdr` (no offloads).
fn with_vnet_header(data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(VNET_HDR_LEN + data.len());
    b.resize(VNET_HDR_LEN, 0);
    b.extend_from_slice(data);
    b
}

struct Worker {
    engine: Arc<Engine>,
    stop: Arc<AtomicBool>,
    counters: Arc<DriverCounters>,
    epoch: Instant,
    busy_poll: Duration,
}

impl Worker {
    fn run(self, mut rx: PacketSocket, mut tx: Tx) {
        let mut generated: Vec<TxFrame> = Vec::new();
        let mut next_timeout = Duration::ZERO;
        while !self.stop.load(Ordering::Relaxed) {
            let mut got = false;
            while let Some(mut block) = rx.next_block() {
                got = true;
                let now = self.epoch.elapsed();
                let mut out: Vec<(u32, &[u8])> = Vec::with_capacity(64);
                // Frames the engine made while handling this batch (ARP/ND, ICMP errors,
                // packets released by a resolved neighbour), each with the number of
                // forwarded frames before it: they leave in that place, so that packets
                // held for a neighbour go out before those that came after them.
                let mut made: Vec<(usize, u32, Vec<u8>)> = Vec::new();
                let (mut frames, mut truncated, mut vlan, mut queued) = (0u64, 0u64, 0u64, 0u64);
                for frame in block.frames() {
                    frames += 1;
                    queued += u64::from(frame.queued);
                    if frame.pkttype == libc::PACKET_OTHERHOST {
                        // Only seen in promiscuous mode: not addressed to this node.
                        continue;
                    }
                    if !frame.complete {
                        truncated += 1;
                        continue;
                    }
                    if frame.vlan {
                        // The kernel took the 802.1Q tag off into the ring's header: the
                        // frame belongs to a VLAN device (the kernel's) or to nobody,
                        // and is never forwarded as if untagged.
                        vlan += 1;
                        continue;
                    }
                    let buf = frame.buf;
                    let verdict = {
                        let (vnet, eth) = buf.split_at_mut(VNET_HDR_LEN);
                        let csum = if vnet[0] & VNET_NEEDS_CSUM != 0 {
                            Csum::Partial
                        } else {
                            Csum::Complete
                        };
                        let meta = RxMeta {
                            port: frame.ifindex,
                            csum,
                        };
                        self.engine.handle_frame(now, meta, eth, &mut generated)
                    };
                    made.extend(
                        generated
                            .drain(..)
                            .map(|f| (out.len(), f.port, with_vnet_header(&f.data))),
                    );
                    if let Verdict::Forward { port } = verdict {
                        out.push((port, &*buf));
                    }
                }
                // Shared counters are touched once per batch, not per frame.
                self.counters.rx_frames.fetch_add(frames, Ordering::Relaxed);
                if truncated > 0 {
                    self.counters
                        .rx_truncated
                        .fetch_add(truncated, Ordering::Relaxed);
                }
                if vlan > 0 {
                    self.counters.rx_vlan.fetch_add(vlan, Ordering::Relaxed);
                }
                if queued > 0 {
                    self.counters.rx_queued.fetch_add(queued, Ordering::Relaxed);
                }
                if made.is_empty() {
                    self.send(&mut tx, &out);
                } else {
                    let mut merged = Vec::with_capacity(out.len() + made.len());
                    let mut made_iter = made.iter().peekable();
                    for (i, fwd) in out.iter().enumerate() {
                        while let Some((_, port, buf)) = made_iter.next_if(|m| m.0 <= i) {
                            merged.push((*port, buf.as_slice()));
                        }
                        merged.push(*fwd);
                    }
                    merged.extend(made_iter.map(|(_, port, buf)| (*port, buf.as_slice())));
                    self.send(&mut tx, &merged);
                }
                drop(out);
                drop(block);
            }
            let now = self.epoch.elapsed();
            if now >= next_timeout {
                self.engine.handle_timeout(now, &mut generated);
                self.flush_generated(&mut tx, &mut generated);
                next_timeout = self
                    .engine
                    .poll_timeout()
                    .unwrap_or(now + Duration::from_secs(1))
                    .min(now + Duration::from_secs(1));
            }
            if !got && !self.busy_poll.is_zero() {
                let spin = Instant::now();
                while !rx.ready() && spin.elapsed() < self.busy_poll {
                    std::hint::spin_loop();
                }
                got = rx.ready();
            }
            if !got {
                let wait = next_timeout
                    .saturating_sub(now)
                    .clamp(Duration::from_millis(1), Duration::from_millis(100));
                let _ = rx.wait(wait);
            }
        }
    }

    fn send(&self, tx: &mut Tx, out: &[(u32, &[u8])]) {
        if out.is_empty() {
            return;
        }
        let sent = match tx.ring.as_mut() {
            None => tx.sock.send_batch(out).unwrap_or(0),
            Some(ring) => send_by_ring(ring, &tx.sock, out),
        };
        self.counters
            .tx_frames
            .fetch_add(sent as u64, Ordering::Relaxed);
        let lost = out.len().saturating_sub(sent) as u64;
        if lost > 0 {
            self.counters.tx_errors.fetch_add(lost, Ordering::Relaxed);
        }
    }

    fn flush_generated(&self, tx: &mut Tx, generated: &mut Vec<TxFrame>) {
        if generated.is_empty() {
            return;
        }
        let bufs: Vec<(u32, Vec<u8>)> = generated
            .drain(..)
            .map(|f| (f.port, with_vnet_header(&f.data)))
            .collect();
        let refs: Vec<(u32, &[u8])> = bufs.iter().map(|(p, b)| (*p, b.as_slice())).collect();
        self.send(tx, &refs);
    }
}

// ---------------------------------------------------------------------------------------------
// Interfaces, addresses, routes
// ---------------------------------------------------------------------------------------------

/// One interface as `ip -json addr` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Link {
    ifindex: u32,
    name: String,
    mac: Option<[u8; 6]>,
    addrs: Vec<IpNet>,
    /// The MTU (`ip link set mtu` changes it; read again on every sync).
    mtu: u32,
}

type Links = BTreeMap<u32, Link>;

fn ip_json(cfg: &UserspaceConfig, args: &[&str]) -> Result<serde_json::Value, SyncError> {
    let mut c = Command::new("ip");
    if let Some(ns) = &cfg.netns {
        c.args(["-n", ns]);
    }
    c.arg("-json").args(args);
    let line = format!("ip -json {}", args.join(" "));
    let out = run(c, None)?;
    serde_json::from_str(&out).map_err(|e| SyncError::Parse {
        command: line,
        message: e.to_string(),
    })
}

fn read_links(cfg: &UserspaceConfig) -> Result<Links, SyncError> {
    let v = ip_json(cfg, &["addr", "show"])?;
    parse_links(&v).map_err(|message| SyncError::Parse {
        command: "ip -json addr show".into(),
        message,
    })
}

fn parse_links(v: &serde_json::Value) -> Result<Links, String> {
    let list = v.as_array().ok_or("not a list")?;
    let mut links = Links::new();
    for l in list {
        let ifindex = l["ifindex"].as_u64().ok_or("link without ifindex")? as u32;
        let name = l["ifname"]
            .as_str()
            .ok_or("link without ifname")?
            .to_string();
        let mac = l["address"].as_str().and_then(parse_mac);
        let mtu = l["mtu"]
            .as_u64()
            .and_then(|m| u32::try_from(m).ok())
            .unwrap_or(0);
        let mut addrs = Vec::new();
        for a in l["addr_info"].as_array().into_iter().flatten() {
            let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) else {
                continue;
            };
            if let Ok(ip) = local.parse::<IpAddr>()
                && let Ok(net) = IpNet::new(ip, len as u8)
            {
                addrs.push(net);
            }
        }
        links.insert(
            ifindex,
            Link {
                ifindex,
                name,
                mac,
                addrs,
                mtu,
            },
        );
    }
    Ok(links)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    })
}

/// An empty port range: the rings take nothing from `lo`.
const NO_PORTS: (u16, u16) = (1, 0);

/// The smallest range holding both `a` and `b`.
fn port_union(a: (u16, u16), b: (u16, u16)) -> (u16, u16) {
    match (a.0 > a.1, b.0 > b.1) {
        (true, _) => b,
        (_, true) => a,
        _ => (a.0.min(b.0), a.1.max(b.1)),
    }
}

/// The lowest and highest NodePort of `plan` on a node address other than 127.0.0.1 and
/// ::1 (what `in_lo` drops), or [`NO_PORTS`].
fn lo_port_range(links: &Links, plan: &Plan) -> (u16, u16) {
    let locals: BTreeSet<IpAddr> = links
        .values()
        .flat_map(|l| l.addrs.iter())
        .map(IpNet::addr)
        .collect();
    plan.frontends()
        .map(|(k, _)| k)
        .filter(|k| {
            k.kind == FrontendKind::NodePort && !k.addr.is_loopback() && locals.contains(&k.addr)
        })
        .fold(NO_PORTS, |r, k| port_union(r, (k.port, k.port)))
}

/// Narrows every ring to the owned interfaces, and on `lo` (when owned) to the node's
/// traffic to destination ports in `lo_ports` ([`LoopbackFilter`]).
fn apply_filters(
    filters: &[SocketControl],
    links: &Links,
    owned: &[u32],
    lo_ports: (u16, u16),
) -> Result<(), SyncError> {
    let is_lo = |i: &u32| links.get(i).is_some_and(|l| l.name == LOOPBACK);
    let lo = owned
        .iter()
        .find(|i| is_lo(i))
        .map(|&ifindex| LoopbackFilter {
            ifindex,
            ports: lo_ports,
        });
    let others: Vec<u32> = owned.iter().copied().filter(|i| !is_lo(i)).collect();
    for s in filters {
        s.filter_interfaces(&others, lo)
            .map_err(|source| socket_error("set the interface filter", source))?;
    }
    Ok(())
}

/// Whether the node's own connections to its NodePorts can be served: their replies come
/// back through [`HOST_VETH`] from a node address, which the kernel accepts there
/// (`accept_local`) only without reverse-path filtering, and `net.ipv4.conf.all.rp_filter`
/// raises every interface's (the larger of the two applies). It is 0 by default, and
/// systemd's defaults leave it alone; with it set, `lo` is left to the kernel.
fn serves_lo(cfg: &UserspaceConfig, rp_filter_all: u32) -> bool {
    cfg.node_traffic && rp_filter_all == 0
}

/// The interfaces the datapath owns: the configured ones, and with
/// [`UserspaceConfig::node_traffic`] the host port, and `lo` when `serve_lo`.
fn owned_ports(cfg: &UserspaceConfig, links: &Links, serve_lo: bool) -> BTreeSet<u32> {
    links
        .values()
        .filter(|l| {
            l.mac.is_some()
                && (matches(&cfg.interfaces, &l.name)
                    || (cfg.node_traffic && l.name == HOST_PORT)
                    || (serve_lo && l.name == LOOPBACK))
        })
        .map(|l| l.ifindex)
        .collect()
}

fn port_configs(cfg: &UserspaceConfig, links: &Links, owned: &BTreeSet<u32>) -> Vec<PortConfig> {
    let host_peer = links
        .values()
        .find(|l| l.name == HOST_VETH)
        .and_then(|l| l.mac);
    owned
        .iter()
        .filter_map(|i| links.get(i))
        .filter_map(|l| {
            let mac = l.mac?;
            let has_v4 = l.addrs.iter().any(|a| a.addr().is_ipv4());
            let has_v6 = l
                .addrs
                .iter()
                .any(|a| matches!(a.addr(), IpAddr::V6(v6) if !v6.is_unicast_link_local()));
            Some(PortConfig {
                id: l.ifindex,
                name: l.name.clone(),
                mac,
                addrs: l.addrs.clone(),
                proxy_arp: match (has_v4, cfg.pod_gateway) {
                    (false, Some(gw)) => vec![gw],
                    _ => Vec::new(),
                },
                // Every interface has IPv6 link-local addresses; one with an address of
                // its own in either family is no pod veth (an uplink's LAN may have a
                // router at fe80::1).
                proxy_ndp: match (has_v4 || has_v6, cfg.pod_gateway6) {
                    (false, Some(gw)) => vec![gw],
                    _ => Vec::new(),
                },
                mtu: l.mtu,
                host_peer: if cfg.node_traffic && l.name == HOST_PORT {
                    host_peer
                } else {
                    None
                },
                loopback: cfg.node_traffic && l.name == LOOPBACK,
            })
        })
        .collect()
}

fn read_routes(
    cfg: &UserspaceConfig,
    links: &Links,
    owned: &BTreeSet<u32>,
) -> Result<Vec<FibEntry>, SyncError> {
    // `lo` is owned for the node's own NodePort connections only: nothing is routed out it.
    let owned: &BTreeSet<u32> = &owned
        .iter()
        .copied()
        .filter(|i| links.get(i).is_none_or(|l| l.name != LOOPBACK))
        .collect();
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        let v = ip_json(cfg, &[family, "route", "show", "table", "main"])?;
        routes.extend(
            parse_routes(&v, links, owned, family == "-6").map_err(|message| SyncError::Parse {
                command: format!("ip -json {family} route show table main"),
                message,
            })?,
        );
    }
    Ok(routes)
}

/// The main table of one family: routes through owned interfaces, and the prefixes the
/// kernel routes elsewhere (other interfaces, blackhole, unreachable, prohibit), which the
/// engine must not reach through a shorter prefix such as the default route. IPv6
/// link-local and multicast prefixes are left out: the engine never forwards to them
/// (the kernel has its own).
fn parse_routes(
    v: &serde_json::Value,
    links: &Links,
    owned: &BTreeSet<u32>,
    v6: bool,
) -> Result<Vec<FibEntry>, String> {
    let unspecified = if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let by_name: BTreeMap<&str, u32> = links
        .values()
        .map(|l| (l.name.as_str(), l.ifindex))
        .collect();
    let mut routes = Vec::new();
    for r in v.as_array().ok_or("not a list")? {
        let dst = match r["dst"].as_str() {
            Some("default") => IpNet::new(unspecified, 0).ok(),
            Some(d) if d.contains('/') => d.parse().ok(),
            Some(d) => d.parse::<IpAddr>().ok().map(IpNet::from),
            None => None,
        };
        let Some(dst) = dst else {
            continue;
        };
        if let IpNet::V6(n) = dst
            && (n.network().is_unicast_link_local() || n.network().is_multicast())
        {
            continue;
        }
        let port = r["dev"].as_str().and_then(|d| by_name.get(d)).copied();
        let unicast = r["type"].as_str().is_none_or(|t| t == "unicast");
        match port {
            Some(port) if unicast && owned.contains(&port) => {
                let gateway = r["gateway"].as_str().and_then(|g| g.parse().ok());
                routes.push(FibEntry::Port(Route { dst, port, gateway }));
            }
            _ => routes.push(FibEntry::NotOurs(dst)),
        }
    }
    Ok(routes)
}

/// What the kernel would check on input: `rp_filter` per owned interface (the larger of
/// `all` and the interface's own, as `IN_DEV_RPFILTER`), the node's addresses on every
/// interface, and the broadcast addresses of its IPv4 subnets; and
/// `net.ipv4.conf.all.rp_filter` itself.
fn admission(
    cfg: &UserspaceConfig,
    links: &Links,
    owned: &BTreeSet<u32>,
) -> Result<(Admission, u32), SyncError> {
    let names: Vec<(u32, &str)> = owned
        .iter()
        .filter_map(|i| links.get(i).map(|l| (*i, l.name.as_str())))
        .collect();
    // Slashes: interface names may hold dots (eth0.10).
    let mut keys = vec!["net/ipv4/conf/all/rp_filter".to_string()];
    keys.extend(
        names
            .iter()
            .map(|(_, n)| format!("net/ipv4/conf/{n}/rp_filter")),
    );
    let mut c = match &cfg.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "sysctl"]);
            c
        }
        None => Command::new("sysctl"),
    };
    c.arg("-n").args(&keys);
    let out = run(c, None)?;
    let values: Vec<u32> = out
        .lines()
        .map(|l| l.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|e| SyncError::Parse {
            command: format!("sysctl -n {}", keys.join(" ")),
            message: e.to_string(),
        })?;
    let all = values.first().copied().unwrap_or(0);
    let mut adm = Admission::default();
    for ((port, _), v) in names.iter().zip(values.iter().skip(1)) {
        adm.rp_filter
            .insert(*port, RpFilter::from_sysctl(all.max(*v)));
    }
    for l in links.values() {
        for a in &l.addrs {
            adm.node_addrs.insert(a.addr());
            if let IpNet::V4(n) = a
                && n.prefix_len() <= 30
            {
                adm.broadcasts.insert(n.broadcast());
            }
        }
    }
    Ok((adm, all))
}

// ---------------------------------------------------------------------------------------------
// The host veth pair: the node's own traffic to Services
// ---------------------------------------------------------------------------------------------

/// Whether either end of the host veth pair is gone.
fn host_veth_missing(links: &Links) -> bool {
    ![HOST_VETH, HOST_PORT]
        .iter()
        .all(|n| links.values().any(|l| l.name == *n))
}

/// Creates the host veth pair unless both ends exist; true when it did. Duplicate address
/// detection is off on both ends, so the node's side can solicit the pods' IPv6 gateway
/// from its link-local address at once.
fn ensure_host_veth(cfg: &UserspaceConfig, links: &Links) -> Result<bool, SyncError> {
    if !host_veth_missing(links) {
        return Ok(false);
    }
    let netns = cfg.netns.as_deref();
    // One end alone cannot be: remove what is left of a pair before making it again.
    remove_host_veth(netns)?;
    let ip = |args: &[&str]| {
        let mut c = in_netns(netns, "ip");
        c.args(args);
        run(c, None).map(drop)
    };
    ip(&[
        "link", "add", HOST_VETH, "type", "veth", "peer", "name", HOST_PORT,
    ])?;
    for dev in [HOST_VETH, HOST_PORT] {
        // Without IPv6 on the node (`disable_ipv6`, no `/proc/sys/net/ipv6`) there is
        // nothing to turn off.
        let mut c = in_netns(netns, "sysctl");
        c.args(["-q", "-w", &format!("net/ipv6/conf/{dev}/accept_dad=0")]);
        let _ = run(c, None);
    }
    // Replies of the node's NodePort connections (taken on `lo`) come back through the
    // pair from a node address: a martian on any interface without accept_local, and
    // reverse-path filtering would refuse them too (the route back to a local address is
    // `lo`). Only our own interface is changed; with `net.ipv4.conf.all.rp_filter` set,
    // the larger value still applies and IPv4 NodePorts from the node are not served.
    let mut c = in_netns(netns, "sysctl");
    c.args([
        "-q",
        "-w",
        &format!("net/ipv4/conf/{HOST_VETH}/accept_local=1"),
        &format!("net/ipv4/conf/{HOST_VETH}/rp_filter=0"),
    ]);
    run(c, None)?;
    ip(&["link", "set", HOST_PORT, "up"])?;
    ip(&["link", "set", HOST_VETH, "up"])?;
    Ok(true)
}

/// Deletes the host veth pair (both ends, and the routes through it) if it exists.
fn remove_host_veth(netns: Option<&str>) -> Result<(), SyncError> {
    for dev in [HOST_VETH, HOST_PORT] {
        let mut c = in_netns(netns, "ip");
        c.args(["link", "show", dev]);
        if run(c, None).is_ok() {
            let mut c = in_netns(netns, "ip");
            c.args(["link", "delete", dev]);
            run(c, None)?;
        }
    }
    Ok(())
}

/// One host route through [`HOST_VETH`]: its gateway (the pods' gateway, which the engine
/// answers for on [`HOST_PORT`]) and source (the node's address of the family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HostRoute {
    gateway: IpAddr,
    src: Option<IpAddr>,
}

/// The host routes `plan` needs: one per ClusterIP, in the families that have a pods'
/// gateway and a node address configured here: the source, which the engine requires on
/// the host port (without one the node has no address to reach that family's Services
/// from anyway).
fn host_routes(cfg: &UserspaceConfig, links: &Links, plan: &Plan) -> BTreeMap<IpNet, HostRoute> {
    let locals: BTreeSet<IpAddr> = links
        .values()
        .flat_map(|l| l.addrs.iter())
        .map(IpNet::addr)
        .collect();
    let src = |v6: bool| {
        plan.node()
            .node_ips
            .iter()
            .copied()
            .find(|a| a.is_ipv6() == v6 && locals.contains(a))
    };
    let mut out = BTreeMap::new();
    for (k, _) in plan.frontends() {
        // ClusterIPs only: a route captures every port of its address, and a ClusterIP is
        // nothing but its Service. An externalIP or load balancer IP may be another node's
        // address or a host on the network: routing it here took all of the node's
        // traffic to it, the pod routes through it included (the lab's externalIPs step
        // cut node-0 off from node-1's pods so).
        if k.kind != FrontendKind::ClusterIp || locals.contains(&k.addr) || k.addr.is_loopback() {
            continue;
        }
        let gateway = match k.addr {
            IpAddr::V4(_) => cfg.pod_gateway.map(IpAddr::V4),
            IpAddr::V6(_) => cfg.pod_gateway6.map(IpAddr::V6),
        };
        if let (Some(gateway), Some(src)) = (gateway, src(k.addr.is_ipv6())) {
            out.insert(
                IpNet::from(k.addr),
                HostRoute {
                    gateway,
                    src: Some(src),
                },
            );
        }
    }
    out
}

/// The routes through [`HOST_VETH`] in the `local` table now, both families (the kernel's
/// own local, broadcast, link-local and multicast entries left out).
fn read_host_routes(cfg: &UserspaceConfig) -> Result<BTreeMap<IpNet, HostRoute>, SyncError> {
    let mut out = BTreeMap::new();
    for family in ["-4", "-6"] {
        let v = ip_json(
            cfg,
            &[family, "route", "show", "table", "local", "dev", HOST_VETH],
        )?;
        out.extend(parse_host_routes(&v).map_err(|message| SyncError::Parse {
            command: format!("ip -json {family} route show table local dev {HOST_VETH}"),
            message,
        })?);
    }
    Ok(out)
}

/// Host routes from `ip -json route show table local dev svcnat-host` (which omits the
/// device).
fn parse_host_routes(v: &serde_json::Value) -> Result<BTreeMap<IpNet, HostRoute>, String> {
    let mut out = BTreeMap::new();
    for r in v.as_array().ok_or("not a list")? {
        let dst = match r["dst"].as_str() {
            Some(d) if d.contains('/') => d.parse().ok(),
            Some(d) => d.parse::<IpAddr>().ok().map(IpNet::from),
            None => None,
        };
        let Some(dst) = dst else { continue };
        if dst.addr().is_multicast()
            || is_link_local_net(&dst)
            || r["protocol"].as_str() == Some("kernel")
            || r["type"].as_str().is_some_and(|t| t != "unicast")
        {
            continue;
        }
        let Some(gateway) = r["gateway"].as_str().and_then(|g| g.parse().ok()) else {
            continue;
        };
        let src = r["prefsrc"].as_str().and_then(|g| g.parse().ok());
        out.insert(dst, HostRoute { gateway, src });
    }
    Ok(out)
}

fn is_link_local_net(n: &IpNet) -> bool {
    matches!(n, IpNet::V6(n) if n.network().is_unicast_link_local())
}

/// The `ip -batch` script that turns the routes `have` into `want` (empty when equal).
fn host_route_script(
    want: &BTreeMap<IpNet, HostRoute>,
    have: &BTreeMap<IpNet, HostRoute>,
) -> String {
    let mut s = String::new();
    // `ip -batch` takes no family option per line: each address says its own.
    for dst in have.keys() {
        if !want.contains_key(dst) {
            s.push_str(&format!("route del table local {dst} dev {HOST_VETH}\n"));
        }
    }
    for (dst, r) in want {
        if have.get(dst) == Some(r) {
            continue;
        }
        s.push_str(&format!(
            "route replace table local {dst} via {} dev {HOST_VETH}",
            r.gateway
        ));
        // The IPv4 gateway is on no subnet of the device (it has no address): `onlink`.
        // An IPv6 link-local gateway needs nothing.
        if r.gateway.is_ipv4() {
            s.push_str(" onlink");
        }
        if let Some(src) = r.src {
            s.push_str(&format!(" src {src}"));
        }
        s.push('\n');
    }
    s
}

// ---------------------------------------------------------------------------------------------
// nftables
// ---------------------------------------------------------------------------------------------

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// The `nft -f` script that takes the kernel out of the forwarding path for the owned
/// interfaces, in both families. It replaces the whole table in one transaction.
fn render_nft(
    links: &Links,
    owned: &[u32],
    plan: Option<&Plan>,
    engine: &EngineConfig,
    original_forwarding: &str,
) -> String {
    let locals: BTreeSet<IpAddr> = links
        .values()
        .flat_map(|l| l.addrs.iter())
        .map(IpNet::addr)
        .collect();
    let mut frontends = BTreeSet::new();
    // The node's own NodePorts on its addresses (not 127.0.0.1 or ::1), taken on `lo`.
    let mut node_ports = BTreeSet::new();
    if let Some(plan) = plan {
        for (k, _) in plan.frontends() {
            if locals.contains(&k.addr) {
                frontends.insert((k.addr, proto_name(k.protocol), k.port));
                if k.kind == FrontendKind::NodePort && !k.addr.is_loopback() {
                    node_ports.insert((k.addr, proto_name(k.protocol), k.port));
                }
            }
        }
    }
    let lo_link = owned
        .iter()
        .filter_map(|i| links.get(i))
        .find(|l| l.name == LOOPBACK);
    let mut s = String::new();
    s.push_str(&format!(
        "table netdev {NFT_TABLE}\ndelete table netdev {NFT_TABLE}\ntable netdev {NFT_TABLE} {{\n"
    ));
    // The node's own setting, where a restarted process (or `cleanup`) finds it.
    s.push_str(&format!(
        "  comment \"{FORWARDING_MARK}{original_forwarding}\"\n"
    ));
    for (v6, suffix, addr_type) in [(false, "4", "ipv4_addr"), (true, "6", "ipv6_addr")] {
        let elements = |v: Vec<String>| {
            if v.is_empty() {
                String::new()
            } else {
                format!("    elements = {{ {} }}\n", v.join(", "))
            }
        };
        let addrs = locals
            .iter()
            .filter(|a| a.is_ipv6() == v6)
            .map(ToString::to_string)
            .collect();
        s.push_str(&format!(
            "  set local{suffix} {{\n    type {addr_type}\n{}  }}\n",
            elements(addrs)
        ));
        let fes = frontends
            .iter()
            .filter(|(a, _, _)| a.is_ipv6() == v6)
            .map(|(a, p, port)| format!("{a} . {p} . {port}"))
            .collect();
        s.push_str(&format!(
            "  set frontends{suffix} {{\n    type {addr_type} . inet_proto . inet_service\n{}  }}\n",
            elements(fes)
        ));
        if lo_link.is_some() {
            let nps = node_ports
                .iter()
                .filter(|(a, _, _)| a.is_ipv6() == v6)
                .map(|(a, p, port)| format!("{a} . {p} . {port}"))
                .collect();
            s.push_str(&format!(
                "  set nodeports{suffix} {{\n    type {addr_type} . inet_proto . inet_service\n{}  }}\n",
                elements(nps)
            ));
        }
    }
    let (lo, hi) = (engine.snat_ports.start(), engine.snat_ports.end());
    if let Some(l) = lo_link {
        // The node's own connections to its NodePorts: `lo` hands them to packet taps
        // (the engine) before this hook, as a NIC's ingress does; the rest of `lo` is left
        // alone.
        s.push_str(&format!(
            "  chain in_lo {{\n    type filter hook ingress device \"{}\" priority -500; policy accept;\n",
            l.name
        ));
        for (ip, suffix) in [("ip", "4"), ("ip6", "6")] {
            s.push_str(&format!(
                "    {ip} saddr @local{suffix} {ip} daddr . meta l4proto . th dport @nodeports{suffix} counter drop comment \"svcnat NodePort from the node\"\n"
            ));
        }
        s.push_str("  }\n");
    }
    for i in owned {
        let Some(l) = links.get(i) else { continue };
        if l.name == LOOPBACK {
            continue;
        }
        s.push_str(&format!(
            "  chain in_{i} {{\n    type filter hook ingress device \"{}\" priority -500; policy accept;\n",
            l.name
        ));
        s.push_str("    meta protocol != { ip, ip6 } accept\n");
        // ARP-like traffic of IPv6 (neighbour discovery to solicited-node addresses) and
        // every other multicast stays the kernel's.
        s.push_str("    meta pkttype { broadcast, multicast } accept\n");
        s.push_str("    ip daddr != @local4 counter drop comment \"forwarded by svcnat\"\n");
        s.push_str("    ip6 daddr != @local6 counter drop comment \"forwarded by svcnat\"\n");
        s.push_str(
            "    ip daddr . meta l4proto . th dport @frontends4 counter drop comment \"svcnat frontend\"\n",
        );
        s.push_str(
            "    ip6 daddr . meta l4proto . th dport @frontends6 counter drop comment \"svcnat frontend\"\n",
        );
        s.push_str(&format!(
            "    meta l4proto {{ tcp, udp, sctp }} th dport {lo}-{hi} counter drop comment \"svcnat SNAT replies\"\n"
        ));
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

/// Runs a command (with `stdin` if given), returning its standard output.
fn run(mut c: Command, stdin: Option<&str>) -> Result<String, SyncError> {
    let line = format!("{c:?}").replace('"', "");
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| SyncError::Command {
        command: line.clone(),
        message: e.to_string(),
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| SyncError::Command {
                command: line.clone(),
                message: e.to_string(),
            })?;
    }
    let out = child.wait_with_output().map_err(|e| SyncError::Command {
        command: line.clone(),
        message: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(SyncError::Command {
            command: line,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Links {
        let v: serde_json::Value = serde_json::from_str(
            r#"[{"ifindex":1,"ifname":"lo","address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
                {"ifindex":2,"ifname":"eth0","mtu":1500,"address":"02:00:00:00:00:0b","addr_info":[{"family":"inet","local":"192.168.50.11","prefixlen":24},{"family":"inet6","local":"fe80::1","prefixlen":64}]},
                {"ifindex":5,"ifname":"vp0","address":"02:00:00:00:01:00","addr_info":[]},
                {"ifindex":6,"ifname":"svc0","addr_info":[]}]"#,
        )
        .unwrap();
        parse_links(&v).unwrap()
    }

    fn show_entry(e: &FibEntry) -> String {
        match e {
            FibEntry::Port(r) => format!("{} {} {:?}", r.dst, r.port, r.gateway),
            FibEntry::NotOurs(n) => format!("{n} elsewhere"),
        }
    }

    #[test]
    fn reads_links_and_routes() {
        let l = links();
        assert_eq!(l[&2].mac, Some([2, 0, 0, 0, 0, 0x0b]));
        assert_eq!(l[&2].addrs.len(), 2);
        let cfg = UserspaceConfig {
            interfaces: vec!["eth0".into(), "vp*".into()],
            ..UserspaceConfig::default()
        };
        let owned = owned_ports(&cfg, &l, serves_lo(&cfg, 0));
        assert_eq!(owned.iter().copied().collect::<Vec<_>>(), vec![2, 5]);
        let ports = port_configs(&cfg, &l, &owned);
        assert_eq!(ports[0].proxy_arp, Vec::<Ipv4Addr>::new());
        assert_eq!(ports[1].proxy_arp, vec![Ipv4Addr::new(169, 254, 1, 1)]);
        // The MTU as `ip` shows it; 0 (no limit) when it does not.
        assert_eq!((ports[0].mtu, ports[1].mtu), (1500, 0));
        let v: serde_json::Value = serde_json::from_str(
            r#"[{"dst":"default","gateway":"192.168.50.1","dev":"eth0"},
                {"dst":"10.244.0.10","dev":"vp0","scope":"link"},
                {"dst":"10.244.1.0/24","gateway":"192.168.50.12","dev":"eth0"},
                {"dst":"10.96.0.0/12","dev":"svc0"},
                {"type":"blackhole","dst":"10.9.0.0/16"}]"#,
        )
        .unwrap();
        let r = parse_routes(&v, &l, &owned, false).unwrap();
        let shown: Vec<String> = r.iter().map(show_entry).collect();
        // Routes through interfaces the engine does not own, and blackholes, are kept as
        // prefixes it must not reach through the default route.
        assert_eq!(
            shown,
            [
                "0.0.0.0/0 2 Some(192.168.50.1)",
                "10.244.0.10/32 5 None",
                "10.244.1.0/24 2 Some(192.168.50.12)",
                "10.96.0.0/12 elsewhere",
                "10.9.0.0/16 elsewhere",
            ]
        );
        // As `ip -json -6 route` prints them: link-local and multicast prefixes are not
        // the engine's to forward.
        let v: serde_json::Value = serde_json::from_str(
            r#"[{"dst":"fd00:50::/64","dev":"eth0","protocol":"kernel","metric":256,"flags":[],"pref":"medium"},
                {"dst":"fd00:10:244:1::/64","gateway":"fd00:50::12","dev":"eth0","metric":1024,"flags":[],"pref":"medium"},
                {"dst":"fd00:10:244::a","dev":"vp0","metric":1024,"flags":[],"pref":"medium"},
                {"dst":"fe80::/64","dev":"eth0","protocol":"kernel","metric":256,"flags":[],"pref":"medium"},
                {"dst":"fe80::/64","dev":"vp0","protocol":"kernel","metric":256,"flags":[],"pref":"medium"},
                {"dst":"ff00::/8","dev":"eth0","metric":256,"flags":[],"pref":"medium"},
                {"dst":"default","gateway":"fe80::1","dev":"eth0","metric":1024,"flags":[],"pref":"medium"}]"#,
        )
        .unwrap();
        let r = parse_routes(&v, &l, &owned, true).unwrap();
        let shown: Vec<String> = r.iter().map(show_entry).collect();
        assert_eq!(
            shown,
            [
                "fd00:50::/64 2 None",
                "fd00:10:244:1::/64 2 Some(fd00:50::12)",
                "fd00:10:244::a/128 5 None",
                "::/0 2 Some(fe80::1)",
            ]
        );
        // The pods' IPv6 gateway is answered on veths without a global IPv6 address.
        assert_eq!(ports[0].proxy_ndp, Vec::<Ipv6Addr>::new(), "eth0");
        assert_eq!(
            ports[1].proxy_ndp,
            vec!["fe80::1".parse::<Ipv6Addr>().unwrap()]
        );
    }

    #[test]
    fn nft_script_drops_what_the_engine_handles() {
        let l = links();
        let s = render_nft(&l, &[2, 5], None, &EngineConfig::default(), "1");
        assert!(
            s.starts_with("table netdev svcnat\ndelete table netdev svcnat\n"),
            "{s}"
        );
        assert!(s.contains("elements = { 127.0.0.1, 192.168.50.11 }"), "{s}");
        assert!(s.contains("device \"eth0\""), "{s}");
        assert!(s.contains("device \"vp0\""), "{s}");
        assert!(!s.contains("svc0"), "{s}");
        assert!(s.contains("th dport 61000-65535"), "{s}");
        // IPv6: the node's addresses (link-local ones too) are the kernel's; the rest is
        // forwarded by the engine.
        assert!(
            s.contains("type ipv6_addr\n    elements = { fe80::1 }"),
            "{s}"
        );
        assert!(s.contains("ip6 daddr != @local6 counter drop"), "{s}");
        assert!(s.contains("meta protocol != { ip, ip6 } accept"), "{s}");
    }

    #[test]
    fn nft_script_drops_ipv6_frontends_on_node_addresses() {
        use svcnat_core::model::*;
        use svcnat_core::plan::NodeContext;
        // A global address: NodePorts are not served on link-local ones.
        let mut l = links();
        if let Some(eth0) = l.get_mut(&2) {
            eth0.addrs.push("fd00:50::11/64".parse().unwrap());
        }
        let mut c = Cluster::simulated();
        let mut svc = Service::new(ObjectName::new("default", "web6"));
        svc.service_type = ServiceType::NodePort;
        svc.cluster_ips = vec!["fd00:10:96::10".parse().unwrap()];
        svc.ip_families = vec![IpFamily::V6];
        let mut sp = ServicePort::new("", Protocol::Tcp, 80, TargetPort::Number(8080));
        sp.node_port = Some(30080);
        svc.ports.push(sp);
        svc.selector = Some(LabelSelector::from_labels(BTreeMap::from([(
            "app".to_string(),
            "web6".to_string(),
        )])));
        c.upsert_service(svc);
        let mut pod = Pod::new(
            ObjectName::new("default", "web6-0"),
            "fd00:10:244::a".parse().unwrap(),
        );
        pod.labels.insert("app".into(), "web6".into());
        c.upsert_pod(pod);
        let node = NodeContext::new(
            "n",
            vec![
                "192.168.50.11".parse().unwrap(),
                "fd00:50::11".parse().unwrap(),
            ],
            Vec::new(),
        );
        let plan = Plan::compile(&c, &node);
        let s = render_nft(&l, &[2, 5], Some(&plan), &EngineConfig::default(), "1");
        assert!(
            s.contains("elements = { fd00:50::11 . tcp . 30080 }"),
            "{s}"
        );
    }

    #[test]
    fn the_table_records_the_original_forwarding_setting() {
        let s = render_nft(&links(), &[2], None, &EngineConfig::default(), "1");
        assert!(
            s.contains("comment \"svcnat: original net.ipv4.ip_forward=1\"\n"),
            "{s}"
        );
        // As `nft list table` prints it back.
        let listing = "table netdev svcnat {\n\tcomment \"svcnat: original net.ipv4.ip_forward=1\"\n\tchain in_2 {\n\t}\n}\n";
        assert_eq!(parse_forwarding_mark(listing).as_deref(), Some("1"));
        assert_eq!(
            parse_forwarding_mark(&listing.replace("=1", "=0")).as_deref(),
            Some("0")
        );
        assert_eq!(parse_forwarding_mark(&listing.replace("=1", "=1; x")), None);
        assert_eq!(parse_forwarding_mark("table netdev svcnat {\n}\n"), None);
    }

    #[test]
    fn drift_comparison_ignores_counters_only() {
        let a = "\tip daddr != @local4 counter packets 12 bytes 840 drop comment \"x\"\n";
        let b = "\tip daddr != @local4 counter packets 0 bytes 0 drop comment \"x\"\n";
        assert_eq!(without_counters(a), without_counters(b));
        assert_eq!(
            without_counters(a),
            "ip daddr != @local4 counter drop comment \"x\"\n"
        );
        assert_ne!(without_counters(a), without_counters(""));
    }

    #[test]
    fn host_routes_follow_the_plan_s_service_addresses() {
        use svcnat_core::model::*;
        use svcnat_core::plan::NodeContext;
        let mut l = links();
        for (ifindex, name, mac) in [
            (7, HOST_VETH, "02:00:00:00:09:09"),
            (8, HOST_PORT, "02:00:00:00:00:09"),
        ] {
            l.insert(
                ifindex,
                Link {
                    ifindex,
                    name: name.into(),
                    mac: parse_mac(mac),
                    addrs: Vec::new(),
                    mtu: 1500,
                },
            );
        }
        let cfg = UserspaceConfig {
            interfaces: vec!["eth0".into(), "vp*".into()],
            node_traffic: true,
            ..UserspaceConfig::default()
        };
        // The engine's end is owned, and is the host port with the node's end as peer.
        // `lo` too (ifindex 1), for the node's own NodePort connections, unless
        // `net.ipv4.conf.all.rp_filter` would refuse their replies.
        let owned = owned_ports(&cfg, &l, serves_lo(&cfg, 0));
        assert_eq!(owned.iter().copied().collect::<Vec<_>>(), vec![1, 2, 5, 8]);
        let no_lo = owned_ports(&cfg, &l, serves_lo(&cfg, 2));
        assert_eq!(no_lo.iter().copied().collect::<Vec<_>>(), vec![2, 5, 8]);
        let ports = port_configs(&cfg, &l, &owned);
        let lo: Vec<_> = ports.iter().filter(|p| p.loopback).collect();
        assert_eq!((lo.len(), lo[0].id), (1, 1), "{lo:?}");
        let host: Vec<_> = ports.iter().filter(|p| p.host_peer.is_some()).collect();
        assert_eq!(host.len(), 1);
        assert_eq!(host[0].id, 8);
        assert_eq!(host[0].host_peer, parse_mac("02:00:00:00:09:09"));
        assert_eq!(host[0].proxy_arp, vec![Ipv4Addr::new(169, 254, 1, 1)]);
        // Off: neither owned nor a host port.
        let off = UserspaceConfig {
            node_traffic: false,
            ..cfg.clone()
        };
        assert!(!owned_ports(&off, &l, false).contains(&8));

        let mut c = Cluster::simulated();
        let mut svc = Service::new(ObjectName::new("default", "web"));
        svc.service_type = ServiceType::NodePort;
        svc.cluster_ips = vec!["10.96.0.10".parse().unwrap()];
        svc.external_ips = vec![
            "192.168.50.11".parse().unwrap(),
            "198.51.100.7".parse().unwrap(),
        ];
        let mut sp = ServicePort::new("", Protocol::Tcp, 80, TargetPort::Number(8080));
        sp.node_port = Some(30080);
        svc.ports.push(sp);
        svc.selector = Some(LabelSelector::from_labels(BTreeMap::from([(
            "app".to_string(),
            "web".to_string(),
        )])));
        c.upsert_service(svc);
        let mut pod = Pod::new(
            ObjectName::new("default", "web-0"),
            "10.244.0.10".parse().unwrap(),
        );
        pod.labels.insert("app".into(), "web".into());
        c.upsert_pod(pod);
        let node = NodeContext::new("n", vec!["192.168.50.11".parse().unwrap()], Vec::new());
        let plan = Plan::compile(&c, &node);
        // The ingress chain on `lo` drops the node's own connections to its NodePorts
        // (not the externalIP that is its address: a NodePort only), from its addresses;
        // `lo` gets no chain of an owned port (which would drop what is not local).
        let nft = render_nft(
            &l,
            &[1, 2, 5, 8],
            Some(&plan),
            &EngineConfig::default(),
            "1",
        );
        assert!(
            nft.contains("chain in_lo {\n    type filter hook ingress device \"lo\""),
            "{nft}"
        );
        assert!(!nft.contains("chain in_1 "), "{nft}");
        assert!(
            nft.contains("set nodeports4 {\n    type ipv4_addr . inet_proto . inet_service\n    elements = { 192.168.50.11 . tcp . 30080 }\n  }"),
            "{nft}"
        );
        assert!(
            nft.contains(
                "ip saddr @local4 ip daddr . meta l4proto . th dport @nodeports4 counter drop"
            ),
            "{nft}"
        );
        assert!(
            nft.contains(
                "ip6 saddr @local6 ip6 daddr . meta l4proto . th dport @nodeports6 counter drop"
            ),
            "{nft}"
        );
        let without_lo = render_nft(&l, &[2, 5, 8], Some(&plan), &EngineConfig::default(), "1");
        assert!(
            !without_lo.contains("in_lo") && !without_lo.contains("nodeports"),
            "{without_lo}"
        );
        let want = host_routes(&cfg, &l, &plan);
        // The ClusterIP alone: no NodePort, no node address, and no external IP, not even
        // one that is not the node's (a route would take every port of 198.51.100.7).
        let dsts: Vec<String> = want.keys().map(ToString::to_string).collect();
        assert_eq!(dsts, ["10.96.0.10/32"]);
        let script = host_route_script(&want, &BTreeMap::new());
        assert_eq!(
            script,
            "route replace table local 10.96.0.10/32 via 169.254.1.1 dev svcnat-host onlink src 192.168.50.11\n"
        );
        // As `ip -json route show table local dev svcnat-host` prints them back (the kernel's
        // own local and broadcast entries among them): nothing to do for the route there,
        // one no longer wanted deleted (one gone is added again: the script from nothing
        // above).
        let v: serde_json::Value = serde_json::from_str(
            r#"[{"dst":"10.96.0.10","gateway":"169.254.1.1","flags":["onlink"],"prefsrc":"192.168.50.11"},
                {"dst":"10.96.0.99","gateway":"169.254.1.1","flags":["onlink"],"prefsrc":"192.168.50.11"},
                {"type":"local","dst":"192.168.50.11","protocol":"kernel","scope":"host","prefsrc":"192.168.50.11","flags":[]},
                {"type":"local","dst":"fe80::ff:fe00:9","protocol":"kernel","metric":0,"flags":[],"pref":"medium"},
                {"dst":"fe80::/64","protocol":"kernel","metric":256,"flags":[],"pref":"medium"}]"#,
        )
        .unwrap();
        let have = parse_host_routes(&v).unwrap();
        assert_eq!(have.len(), 2);
        assert_eq!(
            host_route_script(&want, &have),
            "route del table local 10.96.0.99/32 dev svcnat-host\n"
        );
        let mut all = have.clone();
        all.remove(&"10.96.0.99/32".parse().unwrap());
        assert_eq!(host_route_script(&want, &all), "");
        // IPv6: the link-local gateway needs no `onlink`.
        let v6: BTreeMap<IpNet, HostRoute> = [(
            "fd00:10:96::10/128".parse().unwrap(),
            HostRoute {
                gateway: "fe80::1".parse().unwrap(),
                src: Some("fd00:50::11".parse().unwrap()),
            },
        )]
        .into();
        assert_eq!(
            host_route_script(&v6, &BTreeMap::new()),
            "route replace table local fd00:10:96::10/128 via fe80::1 dev svcnat-host src fd00:50::11\n"
        );
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("aa:bb:cc:dd:ee:ff"),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])
        );
        assert_eq!(parse_mac("aa:bb"), None);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:ff:00"), None);
        assert!(matches(&["vp*".into()], "vp12"));
        assert!(!matches(&["eth0".into()], "eth01"));
    }
}
