//! [`Ipvs`]: the IPVS [`Dataplane`], laid out as kube-proxy's IPVS mode lays it out.
//!
//! - Every plan frontend (address, protocol, port) is one IPVS virtual service; the
//!   endpoints of its backend set are destinations with NAT (`masq`) forwarding and the
//!   endpoint's weight (0 for a terminating endpoint not in use: drained, existing
//!   connections keep flowing). ClientIP affinity is the service's persistence flag with the
//!   affinity timeout. The scheduler is configurable (rr, wrr, lc, sh, mh); with `rr`, a
//!   service whose endpoint weights differ gets `wrr`, since IPVS's `rr` ignores weights.
//! - ClusterIPs, externalIPs and load-balancer IPs are bound to the dummy device
//!   `kube-ipvs0` (kept down, as kube-proxy does: an IPv4 address on a down device still
//!   gets its local route), so the node accepts packets for them and IPVS picks them up in
//!   `LOCAL_IN`. Node addresses (NodePorts) are already local and are never bound.
//! - iptables does what IPVS cannot: masquerade (the `KUBE-MARK-MASQ` mark set in nat
//!   `KUBE-SERVICES`, applied in `KUBE-POSTROUTING`, plus hairpin: an endpoint reaching
//!   itself), `loadBalancerSourceRanges` and the verdict for a service with no usable
//!   endpoint (REJECT or DROP) in filter `KUBE-IPVS-FILTER`, which `INPUT` reaches before
//!   IPVS (filter has priority 0, IPVS's `LOCAL_IN` hook comes after NAT's).
//! - Reconciliation reads the kernel (`GET_SERVICE`/`GET_DEST` dumps, the device's
//!   addresses) on [`Dataplane::resync`], so a restarted proxy converges and removes stale
//!   services; [`Dataplane::sync`] compares against what it last programmed and sends only
//!   the differences. A failed operation makes the next sync a full resync.
//!
//! The driver programs the network namespace it is created in, or a named one
//! ([`IpvsConfig::netns`]): its netlink sockets are opened from a thread that entered
//! `/run/netns/<name>`, and iptables runs under `ip netns exec`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NetlinkMessage};
use netlink_packet_generic::GenlMessage;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_sys::constants::{NETLINK_GENERIC, NETLINK_ROUTE};
use svcnat_core::conntrack::{StaleFlow, stale_flows};
use svcnat_core::model::{IpFamily, Protocol};
use svcnat_core::plan::{
    Dataplane, EmptyAction, FrontendKind, Masquerade, Op, Plan, PlanDiff, SyncReport,
};
use svcnat_iptables::conntrack::Conntrack;
use svcnat_iptables::driver::{Flavour, Iptables, IptablesConfig, Runner};
use svcnat_iptables::render::Table;

use crate::message::{
    Destination, IP_VS_CONN_F_MASQ, IP_VS_SVC_F_ONEPACKET, IP_VS_SVC_F_PERSISTENT,
    IP_VS_SVC_F_SCHED1, IP_VS_SVC_F_SCHED2, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IpvsAttr,
    IpvsCmd, IpvsMessage, Service, ServiceKey, family_of,
};
use crate::nl::{NlError, NlSocket, in_netns, resolve_family};

/// The dummy device kube-proxy binds service addresses to.
pub const DEFAULT_DEVICE: &str = "kube-ipvs0";

/// The masquerade mark bit (kube-proxy's default `--iptables-masquerade-bit` 14).
const MASQ_MARK: &str = "0x4000";

/// The service flag bits the driver sets and compares (the kernel adds `HASHED`).
const FLAG_MASK: u32 =
    IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_ONEPACKET | IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2;

/// An IPVS scheduler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scheduler {
    /// Round robin (kube-proxy's default). Weights other than 0 are ignored by the kernel, so
    /// services with unequal weights are given `wrr`.
    #[default]
    Rr,
    /// Weighted round robin.
    Wrr,
    /// Least connection.
    Lc,
    /// Source hashing.
    Sh,
    /// Maglev hashing.
    Mh,
}

impl Scheduler {
    /// The kernel's name (`ip_vs_<name>` module).
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Lc => "lc",
            Scheduler::Sh => "sh",
            Scheduler::Mh => "mh",
        }
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scheduler {
    type Err = String;

    fn from_str(s: &str) -> Result<Scheduler, String> {
        Ok(match s {
            "rr" => Scheduler::Rr,
            "wrr" => Scheduler::Wrr,
            "lc" => Scheduler::Lc,
            "sh" => Scheduler::Sh,
            "mh" => Scheduler::Mh,
            other => {
                return Err(format!(
                    "unknown IPVS scheduler {other:?} (rr, wrr, lc, sh, mh)"
                ));
            }
        })
    }
}

/// Settings of the driver.
#[derive(Clone, Debug)]
pub struct IpvsConfig {
    /// The scheduler of every virtual service.
    pub scheduler: Scheduler,
    /// Program this named network namespace (`/run/netns/<name>`) instead of the current one.
    pub netns: Option<String>,
    /// The dummy device for service addresses.
    pub device: String,
    /// The iptables implementation for masquerade and filtering; `None` detects it.
    pub iptables: Option<Flavour>,
    /// Set the sysctls IPVS needs in the namespace (`net.ipv4.vs.conntrack=1` so
    /// iptables can masquerade IPVS traffic, `expire_nodest_conn`,
    /// `expire_quiescent_template`, `ip_forward`, and `arp_ignore=1`/`arp_announce=2` so
    /// addresses bound to the dummy device are not answered for in ARP), as kube-proxy does.
    pub sysctls: bool,
}

impl Default for IpvsConfig {
    fn default() -> IpvsConfig {
        IpvsConfig {
            scheduler: Scheduler::Rr,
            netns: None,
            device: DEFAULT_DEVICE.to_string(),
            iptables: None,
            sysctls: true,
        }
    }
}

/// What went wrong while programming IPVS.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The kernel refused an operation on a service, destination, device or address.
    #[error("{op} {object}: {} (errno {errno})", strerror(*.errno))]
    Kernel {
        /// The netlink command (`IPVS_CMD_NEW_DEST`, `RTM_NEWADDR`, ...).
        op: &'static str,
        /// What it was about: the service (its Service port name and virtual address),
        /// destination, device or address.
        object: String,
        /// The kernel's errno.
        errno: i32,
    },
    /// IPVS is not available: no `IPVS` generic-netlink family (the `ip_vs` module is not
    /// loaded, or the kernel has no IPVS).
    #[error("IPVS is not available in this kernel or namespace: {0}")]
    Unavailable(String),
    /// A netlink socket failed, or a reply could not be decoded.
    #[error("{op} {object}: {detail}")]
    Netlink {
        /// The operation.
        op: &'static str,
        /// What it was about.
        object: String,
        /// What failed.
        detail: String,
    },
    /// Entering the namespace or opening the sockets failed.
    #[error("cannot open netlink sockets{}: {source}", ns_text(.netns.as_deref()))]
    Open {
        /// The namespace.
        netns: Option<String>,
        /// The OS error.
        source: io::Error,
    },
    /// iptables failed (masquerade and filter rules).
    #[error("iptables: {0}")]
    Iptables(#[from] svcnat_iptables::driver::SyncError),
}

/// The C library's text for an errno, without Rust's " (os error N)" suffix.
fn strerror(errno: i32) -> String {
    let s = io::Error::from_raw_os_error(errno).to_string();
    match s.rfind(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn ns_text(ns: Option<&str>) -> String {
    ns.map(|n| format!(" in netns {n}")).unwrap_or_default()
}

impl SyncError {
    fn from_nl(op: &'static str, object: impl Into<String>, e: NlError) -> SyncError {
        let object = object.into();
        match e {
            NlError::Errno(errno) => SyncError::Kernel { op, object, errno },
            NlError::Io(e) => SyncError::Netlink {
                op,
                object,
                detail: e.to_string(),
            },
            NlError::Decode(detail) => SyncError::Netlink { op, object, detail },
        }
    }

    /// The kernel's errno, when the kernel refused an operation.
    pub fn errno(&self) -> Option<i32> {
        match self {
            SyncError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EEXIST: i32 = 17;
const ENODEV: i32 = 19;
const EADDRNOTAVAIL: i32 = 99;

/// One virtual service as the plan wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Want {
    svc: Service,
    dests: BTreeMap<(IpAddr, u16), u32>,
    /// The Service port and frontend, for messages.
    name: String,
}

/// One virtual service as the kernel has it (or as the driver left it).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Have {
    svc: Service,
    dests: BTreeMap<(IpAddr, u16), Destination>,
}

/// Everything the plan wants, computed without touching the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Desired {
    services: BTreeMap<ServiceKey, Want>,
    vips: BTreeSet<IpAddr>,
    node_ips: BTreeSet<IpAddr>,
    rules: [String; 2],
}

/// The IPVS backend.
#[derive(Debug)]
pub struct Ipvs {
    config: IpvsConfig,
    genl: NlSocket,
    family: u16,
    route: NlSocket,
    iptables: [Iptables; 2],
    /// Services as last programmed; `None` forces a resync from the kernel.
    have: Option<BTreeMap<ServiceKey, Have>>,
    /// Addresses on the device as last programmed.
    bound: BTreeSet<IpAddr>,
    /// Node addresses of the last plan (services on them are ours).
    node_ips: BTreeSet<IpAddr>,
    /// iptables text last applied, per family.
    rules: [Option<String>; 2],
    /// The conntrack table of the same namespace.
    conntrack: Conntrack,
    /// Stale flows of diffs not yet applied (kept across a failed sync).
    stale: BTreeSet<StaleFlow>,
}

fn proto_number(p: Protocol) -> u16 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

fn proto_name(p: u16) -> &'static str {
    match p {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        _ => "sctp",
    }
}

fn fam_index(ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(_) => 0,
        IpAddr::V6(_) => 1,
    }
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

impl Ipvs {
    /// Connects to IPVS (resolving the `IPVS` generic-netlink family) and rtnetlink in the
    /// configured namespace, sets the sysctls, and detects iptables.
    pub fn new(config: IpvsConfig) -> Result<Ipvs, SyncError> {
        let ns = config.netns.clone();
        let sysctls = config.sysctls;
        // Sockets and sysctls belong to the namespace of the thread that opens them. The
        // sysctls are written only once IPVS is known to be there: a kernel without it
        // is left untouched.
        let (genl, route, family, sysctl_errors) = in_netns(ns.as_deref(), move || {
            let mut genl = NlSocket::open(NETLINK_GENERIC)?;
            let route = NlSocket::open(NETLINK_ROUTE)?;
            let family = resolve_family(&mut genl, crate::message::IPVS_GENL_NAME);
            let mut errors = Vec::new();
            if sysctls && family.is_ok() {
                for (key, value) in [
                    ("net/ipv4/ip_forward", "1"),
                    ("net/ipv4/vs/conntrack", "1"),
                    ("net/ipv4/vs/expire_nodest_conn", "1"),
                    ("net/ipv4/vs/expire_quiescent_template", "1"),
                    // Service addresses on kube-ipvs0 must not be answered for in ARP on
                    // other links (another node has the same externalIP bound).
                    ("net/ipv4/conf/all/arp_ignore", "1"),
                    ("net/ipv4/conf/all/arp_announce", "2"),
                ] {
                    if let Err(e) = std::fs::write(format!("/proc/sys/{key}"), value) {
                        errors.push(format!("{}={value}: {e}", key.replace('/', ".")));
                    }
                }
            }
            Ok((genl, route, family, errors))
        })
        .map_err(|source| SyncError::Open {
            netns: ns.clone(),
            source,
        })?;
        let family = match family {
            Ok(id) => id,
            Err(NlError::Errno(ENOENT)) => {
                return Err(SyncError::Unavailable(
                    "no generic-netlink family \"IPVS\" (is the ip_vs module loaded?)".into(),
                ));
            }
            Err(e) => return Err(SyncError::from_nl("CTRL_CMD_GETFAMILY", "IPVS", e)),
        };
        if let Some(e) = sysctl_errors.first() {
            return Err(SyncError::Netlink {
                op: "sysctl",
                object: e.clone(),
                detail: "cannot be set".into(),
            });
        }
        let runner = match &config.netns {
            Some(ns) => Runner::netns(ns.clone()),
            None => Runner::local(),
        };
        let mk = |family| {
            Iptables::new(IptablesConfig {
                runner: runner.clone(),
                flavour: config.iptables,
                family,
                ..IptablesConfig::default()
            })
        };
        let iptables = [mk(IpFamily::V4)?, mk(IpFamily::V6)?];
        Ok(Ipvs {
            conntrack: Conntrack::new(config.netns.clone()),
            config,
            genl,
            family,
            route,
            iptables,
            have: None,
            bound: BTreeSet::new(),
            node_ips: BTreeSet::new(),
            rules: [None, None],
            stale: BTreeSet::new(),
        })
    }

    /// The generic-netlink family id the kernel gave IPVS.
    pub fn family_id(&self) -> u16 {
        self.family
    }

    fn ipvs(
        &mut self,
        op: &'static str,
        object: impl FnOnce() -> String,
        cmd: IpvsCmd,
        attrs: Vec<IpvsAttr>,
        flags: u16,
    ) -> Result<Vec<IpvsMessage>, SyncError> {
        let mut msg = GenlMessage::from_payload(IpvsMessage::new(cmd, attrs));
        msg.set_resolved_family_id(self.family);
        self.genl
            .request(msg, flags)
            .map(|v| v.into_iter().map(|m| m.payload).collect())
            .map_err(|e| SyncError::from_nl(op, object(), e))
    }

    /// Reads the kernel's IPVS table: every address/port service with its destinations.
    pub fn dump(&mut self) -> Result<BTreeMap<ServiceKey, (Service, Vec<Destination>)>, SyncError> {
        Ok(self
            .read_kernel()?
            .into_iter()
            .map(|(k, h)| (k, (h.svc, h.dests.into_values().collect())))
            .collect())
    }

    fn read_kernel(&mut self) -> Result<BTreeMap<ServiceKey, Have>, SyncError> {
        let replies = self.ipvs(
            "IPVS_CMD_GET_SERVICE",
            || "(dump)".into(),
            IpvsCmd::GetService,
            vec![],
            NLM_F_DUMP,
        )?;
        let mut out = BTreeMap::new();
        for m in replies {
            for attrs in m.services() {
                // Firewall-mark services are not ours; `from_attrs` skips them.
                if let Some(svc) = Service::from_attrs(attrs) {
                    out.insert(
                        svc.key,
                        Have {
                            svc,
                            dests: BTreeMap::new(),
                        },
                    );
                }
            }
        }
        let keys: Vec<ServiceKey> = out.keys().copied().collect();
        for key in keys {
            let replies = self.ipvs(
                "IPVS_CMD_GET_DEST",
                || format!("of {key}"),
                IpvsCmd::GetDest,
                vec![IpvsAttr::Service(key.attrs())],
                NLM_F_DUMP,
            )?;
            if let Some(have) = out.get_mut(&key) {
                for m in replies {
                    for attrs in m.dests() {
                        if let Some(d) = Destination::from_attrs(attrs, family_of(key.addr)) {
                            have.dests.insert((d.addr, d.port), d);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    // ----- desired state ---------------------------------------------------------------------

    fn desired(&self, plan: &Plan) -> Desired {
        let mut d = Desired {
            node_ips: plan.node().node_ips.iter().copied().collect(),
            ..Desired::default()
        };
        d.node_ips.extend(plan.node().nodeport_ips());
        let mut nat = [Vec::new(), Vec::new()];
        let mut post = [Vec::new(), Vec::new()];
        let mut filter = [Vec::new(), Vec::new()];
        for (key, fe) in plan.frontends() {
            let set = plan.backend_set(&fe.backends);
            let endpoints = set.map(|s| s.endpoints.as_slice()).unwrap_or_default();
            let protocol = proto_number(key.protocol);
            let skey = ServiceKey {
                addr: key.addr,
                protocol,
                port: key.port,
            };
            let mut dests = BTreeMap::new();
            for ep in endpoints {
                // IPVS weights are a C int.
                let w = ep.weight.min(i32::MAX as u32);
                dests.insert((ep.addr.ip(), ep.addr.port()), w);
            }
            let mut scheduler = self.config.scheduler;
            if scheduler == Scheduler::Rr {
                let mut nonzero = dests.values().filter(|w| **w > 0);
                if let Some(first) = nonzero.next()
                    && nonzero.any(|w| w != first)
                {
                    scheduler = Scheduler::Wrr;
                }
            }
            let (flags, timeout) = match fe.affinity_timeout {
                Some(t) => (IP_VS_SVC_F_PERSISTENT, t),
                None => (0, 0),
            };
            // The attribute is a big-endian mask for IPv4, but for IPv6 the kernel takes
            // its raw bits as a prefix length in host order (`(__force __u32)` in
            // ip_vs_ctl.c; ipvsadm sends 128 unconverted): 128 sent big-endian reads as
            // 0x80000000 on a little-endian host and is refused with EINVAL.
            let netmask = match key.addr {
                IpAddr::V4(_) => u32::MAX,
                IpAddr::V6(_) => u32::from_be_bytes(128u32.to_ne_bytes()),
            };
            let name = format!("{} ({key})", fe.service_port);
            d.services.insert(
                skey,
                Want {
                    svc: Service {
                        key: skey,
                        scheduler: scheduler.as_str().to_string(),
                        flags,
                        timeout,
                        netmask,
                    },
                    dests,
                    name: name.clone(),
                },
            );
            if key.kind != FrontendKind::NodePort {
                d.vips.insert(key.addr);
            }

            // iptables: what IPVS cannot do.
            let f = fam_index(key.addr);
            let m = format!(
                "-d {} -p {} -m {} --dport {}",
                host(key.addr),
                proto_name(protocol),
                proto_name(protocol),
                key.port
            );
            let comment = format!("-m comment --comment \"{}\"", fe.service_port);
            match fe.masquerade {
                Masquerade::Never => {}
                Masquerade::Always => {
                    nat[f].push(format!("-A KUBE-SERVICES {m} {comment} -j KUBE-MARK-MASQ"));
                }
                Masquerade::OffCluster => {
                    let cidrs: Vec<_> = plan
                        .node()
                        .cluster_cidrs
                        .iter()
                        .filter(|c| fam_index(c.addr()) == f)
                        .collect();
                    for c in &cidrs {
                        nat[f].push(format!("-A KUBE-SERVICES -s {c} {m} {comment} -j RETURN"));
                    }
                    nat[f].push(format!("-A KUBE-SERVICES {m} {comment} -j KUBE-MARK-MASQ"));
                }
            }
            // Hairpin: an endpoint reaching itself through the service must see another
            // source, or its reply would bypass IPVS (kube-proxy's KUBE-LOOP-BACK set).
            for ep in endpoints {
                let ip = ep.addr.ip();
                if fam_index(ip) == f {
                    let line = format!(
                        "-A KUBE-POSTROUTING -s {} -d {} -p {} -m {} --dport {} -j MASQUERADE",
                        host(ip),
                        host(ip),
                        proto_name(protocol),
                        proto_name(protocol),
                        ep.addr.port()
                    );
                    if !post[f].contains(&line) {
                        post[f].push(line);
                    }
                }
            }
            let empty = set.is_none_or(|s| s.is_empty());
            if !fe.source_ranges.is_empty() {
                for r in fe.source_ranges.iter().filter(|r| fam_index(r.addr()) == f) {
                    filter[f].push(format!(
                        "-A KUBE-IPVS-FILTER -s {r} {m} {comment} -j RETURN"
                    ));
                }
                filter[f].push(format!("-A KUBE-IPVS-FILTER {m} {comment} -j DROP"));
            }
            if empty {
                let verdict = match (fe.on_empty, key.protocol) {
                    (EmptyAction::Drop, _) => "DROP".to_string(),
                    (EmptyAction::Reject, Protocol::Tcp) if f == 0 => {
                        "REJECT --reject-with tcp-reset".to_string()
                    }
                    (EmptyAction::Reject, _) if f == 0 => {
                        "REJECT --reject-with icmp-port-unreachable".to_string()
                    }
                    (EmptyAction::Reject, _) => {
                        "REJECT --reject-with icmp6-port-unreachable".to_string()
                    }
                };
                filter[f].push(format!("-A KUBE-IPVS-FILTER {m} {comment} -j {verdict}"));
            }
        }
        for f in 0..2 {
            let mut t = String::new();
            t.push_str("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
            t.push_str(&format!(
                "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}\n"
            ));
            for l in &post[f] {
                t.push_str(l);
                t.push('\n');
            }
            t.push_str(&format!(
                "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
                 -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
                 -A KUBE-POSTROUTING -m comment --comment \"svcnat ipvs masquerade\" -j MASQUERADE\n"
            ));
            for l in &nat[f] {
                t.push_str(l);
                t.push('\n');
            }
            t.push_str("COMMIT\n*filter\n:KUBE-IPVS-FILTER - [0:0]\n");
            for l in &filter[f] {
                t.push_str(l);
                t.push('\n');
            }
            t.push_str("COMMIT\n");
            d.rules[f] = t;
        }
        d
    }

    // ----- applying --------------------------------------------------------------------------

    /// Brings `have` to `want` for every key in `want`, and deletes the services of `have`
    /// that `want` lacks and `owned` accepts. Updates `have` as each operation succeeds.
    fn reconcile(
        &mut self,
        want: &BTreeMap<ServiceKey, Want>,
        have: &mut BTreeMap<ServiceKey, Have>,
        owned: impl Fn(&ServiceKey) -> bool,
    ) -> Result<usize, SyncError> {
        let mut written = 0;
        let stale: Vec<ServiceKey> = have
            .keys()
            .filter(|k| !want.contains_key(k) && owned(k))
            .copied()
            .collect();
        for key in stale {
            self.ipvs(
                "IPVS_CMD_DEL_SERVICE",
                || format!("stale service {key}"),
                IpvsCmd::DelService,
                vec![IpvsAttr::Service(key.attrs())],
                0,
            )
            .or_else(|e| ignore(e, &[ENOENT, ESRCH]))?;
            have.remove(&key);
            written += 1;
        }
        for (key, w) in want {
            let current = have.get(key);
            match current {
                None => {
                    self.ipvs(
                        "IPVS_CMD_NEW_SERVICE",
                        || format!("service {}", w.name),
                        IpvsCmd::NewService,
                        vec![IpvsAttr::Service(w.svc.attrs())],
                        0,
                    )?;
                    have.insert(
                        *key,
                        Have {
                            svc: w.svc.clone(),
                            dests: BTreeMap::new(),
                        },
                    );
                    written += 1;
                }
                Some(h) => {
                    let s = &h.svc;
                    if s.scheduler != w.svc.scheduler
                        || s.flags & FLAG_MASK != w.svc.flags
                        || s.timeout != w.svc.timeout
                        || (w.svc.flags & IP_VS_SVC_F_PERSISTENT != 0 && s.netmask != w.svc.netmask)
                    {
                        self.ipvs(
                            "IPVS_CMD_SET_SERVICE",
                            || format!("service {}", w.name),
                            IpvsCmd::SetService,
                            vec![IpvsAttr::Service(w.svc.attrs())],
                            0,
                        )?;
                        if let Some(h) = have.get_mut(key) {
                            h.svc = w.svc.clone();
                        }
                        written += 1;
                    }
                }
            }
            let Some(h) = have.get(key) else { continue };
            let mut ops = Vec::new();
            for (addr, d) in &h.dests {
                if !w.dests.contains_key(addr) {
                    ops.push((IpvsCmd::DelDest, d.clone()));
                }
            }
            for ((ip, port), weight) in &w.dests {
                let dest = Destination {
                    addr: *ip,
                    port: *port,
                    fwd_method: IP_VS_CONN_F_MASQ,
                    weight: *weight,
                    active_conns: 0,
                    inactive_conns: 0,
                };
                match h.dests.get(&(*ip, *port)) {
                    None => ops.push((IpvsCmd::NewDest, dest)),
                    Some(d) if d.weight != *weight || d.fwd_method != IP_VS_CONN_F_MASQ => {
                        ops.push((IpvsCmd::SetDest, dest))
                    }
                    Some(_) => {}
                }
            }
            for (cmd, dest) in ops {
                let (op, attrs) = match cmd {
                    IpvsCmd::DelDest => ("IPVS_CMD_DEL_DEST", dest.key_attrs()),
                    IpvsCmd::NewDest => ("IPVS_CMD_NEW_DEST", dest.attrs()),
                    _ => ("IPVS_CMD_SET_DEST", dest.attrs()),
                };
                let object = || {
                    format!(
                        "destination {} of service {}",
                        std::net::SocketAddr::new(dest.addr, dest.port),
                        w.name
                    )
                };
                let r = self.ipvs(
                    op,
                    object,
                    cmd,
                    vec![IpvsAttr::Service(key.attrs()), IpvsAttr::Dest(attrs)],
                    0,
                );
                if cmd == IpvsCmd::DelDest {
                    r.or_else(|e| ignore(e, &[ENOENT]))?;
                } else {
                    r?;
                }
                if let Some(h) = have.get_mut(key) {
                    if cmd == IpvsCmd::DelDest {
                        h.dests.remove(&(dest.addr, dest.port));
                    } else {
                        h.dests.insert((dest.addr, dest.port), dest);
                    }
                }
                written += 1;
            }
        }
        Ok(written)
    }

    // ----- the dummy device and its addresses ------------------------------------------------

    fn route(
        &mut self,
        op: &'static str,
        object: impl FnOnce() -> String,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, SyncError> {
        self.route
            .request(msg, flags)
            .map_err(|e| SyncError::from_nl(op, object(), e))
    }

    fn device_index(&mut self) -> Result<Option<u32>, SyncError> {
        let mut req = LinkMessage::default();
        req.attributes
            .push(LinkAttribute::IfName(self.config.device.clone()));
        let dev = self.config.device.clone();
        match self.route(
            "RTM_GETLINK",
            || format!("device {dev}"),
            RouteNetlinkMessage::GetLink(req),
            0,
        ) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })),
            Err(e) if matches!(e.errno(), Some(ENODEV)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn ensure_device(&mut self) -> Result<u32, SyncError> {
        if let Some(i) = self.device_index()? {
            return Ok(i);
        }
        let mut req = LinkMessage::default();
        req.attributes
            .push(LinkAttribute::IfName(self.config.device.clone()));
        req.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Dummy,
            )]));
        let dev = self.config.device.clone();
        self.route(
            "RTM_NEWLINK",
            || format!("dummy device {dev}"),
            RouteNetlinkMessage::NewLink(req),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .or_else(|e| ignore(e, &[EEXIST]))?;
        self.device_index()?.ok_or_else(|| SyncError::Netlink {
            op: "RTM_GETLINK",
            object: format!("device {}", self.config.device),
            detail: "created but not found".into(),
        })
    }

    /// Every address in the namespace, with its interface index and prefix length.
    fn addresses(&mut self) -> Result<Vec<(u32, IpAddr, u8)>, SyncError> {
        let replies = self.route(
            "RTM_GETADDR",
            || "(dump)".into(),
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for m in replies {
            if let RouteNetlinkMessage::NewAddress(a) = m {
                let local = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let ip = local.or_else(|| {
                    a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                });
                if let Some(ip) = ip {
                    out.push((a.header.index, ip, a.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    fn addr_msg(index: u32, ip: IpAddr) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = match ip {
            IpAddr::V4(_) => netlink_packet_route::AddressFamily::Inet,
            IpAddr::V6(_) => netlink_packet_route::AddressFamily::Inet6,
        };
        m.header.prefix_len = match ip {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(ip));
        m.attributes.push(AddressAttribute::Address(ip));
        m
    }

    /// Binds `vips` to the device and unbinds every other address on it.
    ///
    /// An address that another interface has (a node address used as an externalIP), or
    /// that lies inside a subnet another interface is attached to, is not bound: it belongs
    /// to this node already or to a neighbour on that link (often another node, whose
    /// address is an externalIP of the same Service), and binding it would swallow the
    /// neighbour's traffic here, replies to it included. kube-proxy sets `arp_ignore` for a
    /// related reason.
    fn sync_vips(
        &mut self,
        vips: &BTreeSet<IpAddr>,
        from_kernel: bool,
    ) -> Result<usize, SyncError> {
        let index = self.ensure_device()?;
        let need_dump = from_kernel || vips.iter().any(|v| !self.bound.contains(v));
        let (on_dev, elsewhere): (BTreeSet<IpAddr>, Vec<IpNet>) = if need_dump {
            let all = self.addresses()?;
            (
                all.iter()
                    .filter(|(i, _, _)| *i == index)
                    .map(|(_, a, _)| *a)
                    .collect(),
                all.iter()
                    .filter(|(i, _, _)| *i != index)
                    .filter_map(|(_, a, p)| IpNet::new(*a, *p).ok())
                    .collect(),
            )
        } else {
            (self.bound.clone(), Vec::new())
        };
        let foreign = |ip: &IpAddr| elsewhere.iter().any(|n| n.contains(ip));
        let mut written = 0;
        for ip in on_dev.iter().filter(|ip| !vips.contains(ip) || foreign(ip)) {
            self.route(
                "RTM_DELADDR",
                || format!("{ip} on {}", DEFAULT_DEVICE),
                RouteNetlinkMessage::DelAddress(Self::addr_msg(index, *ip)),
                0,
            )
            .or_else(|e| ignore(e, &[EADDRNOTAVAIL, ENOENT]))?;
            written += 1;
        }
        let mut bound = BTreeSet::new();
        for ip in vips {
            if foreign(ip) {
                continue;
            }
            if !on_dev.contains(ip) {
                self.route(
                    "RTM_NEWADDR",
                    || format!("{ip} on {}", DEFAULT_DEVICE),
                    RouteNetlinkMessage::NewAddress(Self::addr_msg(index, *ip)),
                    NLM_F_CREATE | NLM_F_EXCL,
                )
                .or_else(|e| ignore(e, &[EEXIST]))?;
                written += 1;
            }
            bound.insert(*ip);
        }
        self.bound = bound;
        Ok(written)
    }

    // ----- iptables --------------------------------------------------------------------------

    fn sync_rules(&mut self, rules: &[String; 2], force: bool) -> Result<usize, SyncError> {
        let mut written = 0;
        #[allow(clippy::needless_range_loop)] // `f` indexes three arrays.
        for f in 0..2 {
            if !force && self.rules[f].as_deref() == Some(rules[f].as_str()) {
                continue;
            }
            // A family with nothing to do and nothing applied before is left untouched
            // (no ip6tables call on an IPv4-only node).
            let trivial = !rules[f].contains("-A KUBE-SERVICES")
                && !rules[f].contains("-A KUBE-IPVS-FILTER")
                && !rules[f].contains("-s ");
            if trivial && self.rules[f].is_none() && f == 1 {
                continue;
            }
            let ipt = &self.iptables[f];
            let mut text = String::new();
            let nat = ipt.save(Table::Nat)?;
            let filter = ipt.save(Table::Filter)?;
            let mut jumps = String::new();
            for (chain, target) in [
                ("PREROUTING", "KUBE-SERVICES"),
                ("OUTPUT", "KUBE-SERVICES"),
                ("POSTROUTING", "KUBE-POSTROUTING"),
            ] {
                if !nat.contains(&format!("-A {chain} -j {target}")) {
                    jumps.push_str(&format!("-I {chain} 1 -j {target}\n"));
                }
            }
            let body = &rules[f];
            // Put the jumps after the chain declarations of the nat section.
            let (nat_part, filter_part) =
                body.split_once("COMMIT\n*filter\n").unwrap_or((body, ""));
            text.push_str(nat_part);
            text.push_str(&jumps);
            text.push_str("COMMIT\n*filter\n");
            let filter_body = filter_part.strip_suffix("COMMIT\n").unwrap_or(filter_part);
            text.push_str(filter_body);
            if !filter.contains("-A INPUT -j KUBE-IPVS-FILTER") {
                text.push_str("-I INPUT 1 -j KUBE-IPVS-FILTER\n");
            }
            text.push_str("COMMIT\n");
            ipt.restore(&text)?;
            self.rules[f] = Some(rules[f].clone());
            written += 1;
        }
        Ok(written)
    }

    fn remove_rules(&mut self) -> Result<(), SyncError> {
        for f in 0..2 {
            if f == 1 && self.rules[1].is_none() {
                // Only touch ip6tables when this driver used it, or when it has our chains.
                let Ok(nat) = self.iptables[1].save(Table::Nat) else {
                    continue;
                };
                if !nat.contains(":KUBE-POSTROUTING") {
                    continue;
                }
            }
            let ipt = &self.iptables[f];
            let nat = ipt.save(Table::Nat)?;
            let filter = ipt.save(Table::Filter)?;
            let mut text = String::from("*nat\n");
            for (chain, target) in [
                ("PREROUTING", "KUBE-SERVICES"),
                ("OUTPUT", "KUBE-SERVICES"),
                ("POSTROUTING", "KUBE-POSTROUTING"),
            ] {
                let rule = format!("-A {chain} -j {target}");
                for _ in nat.lines().filter(|l| *l == rule) {
                    text.push_str(&format!("-D {chain} -j {target}\n"));
                }
            }
            for chain in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
                if nat.contains(&format!(":{chain} ")) {
                    text.push_str(&format!("-F {chain}\n-X {chain}\n"));
                }
            }
            text.push_str("COMMIT\n*filter\n");
            for _ in filter
                .lines()
                .filter(|l| *l == "-A INPUT -j KUBE-IPVS-FILTER")
            {
                text.push_str("-D INPUT -j KUBE-IPVS-FILTER\n");
            }
            if filter.contains(":KUBE-IPVS-FILTER ") {
                text.push_str("-F KUBE-IPVS-FILTER\n-X KUBE-IPVS-FILTER\n");
            }
            text.push_str("COMMIT\n");
            ipt.restore(&text)?;
            self.rules[f] = None;
        }
        Ok(())
    }

    /// Applies `diff` (a full resync when nothing is cached or the node changed).
    fn apply(&mut self, plan: &Plan, diff: &PlanDiff) -> Result<SyncReport, SyncError> {
        let node_changed = diff.ops.iter().any(|op| matches!(op, Op::SetNode(_)));
        if self.have.is_none() || node_changed {
            return self.full(plan);
        }
        if diff.is_empty() {
            return Ok(self.report(false, 0));
        }
        let want = self.desired(plan);
        let mut have = self.have.take().unwrap_or_default();
        // Everything in the cache was programmed by this driver: all of it is ours.
        let r = self.reconcile(&want.services, &mut have, |_| true);
        match r {
            Ok(mut written) => {
                self.have = Some(have);
                let vips = self.sync_vips(&want.vips, false);
                let rules = vips.and_then(|v| {
                    written += v;
                    self.sync_rules(&want.rules, false)
                });
                match rules {
                    Ok(n) => {
                        self.node_ips = want.node_ips;
                        Ok(self.report(false, written + n))
                    }
                    Err(e) => {
                        self.have = None;
                        Err(e)
                    }
                }
            }
            // `have` stays `None`: the next sync reads the kernel again.
            Err(e) => Err(e),
        }
    }

    /// Reads the kernel and rewrites everything of ours from `plan`.
    fn full(&mut self, plan: &Plan) -> Result<SyncReport, SyncError> {
        self.have = None;
        let want = self.desired(plan);
        let mut have = self.read_kernel()?;
        let index = self.ensure_device()?;
        let on_dev: BTreeSet<IpAddr> = self
            .addresses()?
            .into_iter()
            .filter(|(i, _, _)| *i == index)
            .map(|(_, a, _)| a)
            .collect();
        let node_ips: BTreeSet<IpAddr> = want.node_ips.union(&self.node_ips).copied().collect();
        // Ours: services on addresses of our device, or on node addresses (NodePorts).
        let owned = |k: &ServiceKey| on_dev.contains(&k.addr) || node_ips.contains(&k.addr);
        let mut written = self.reconcile(&want.services, &mut have, owned)?;
        // Keep only what is ours: the cache is what later syncs may change or delete.
        have.retain(|k, _| want.services.contains_key(k));
        self.have = Some(have);
        written += self.sync_vips(&want.vips, true)?;
        written += self.sync_rules(&want.rules, true)?;
        self.node_ips = want.node_ips;
        Ok(self.report(true, written))
    }

    /// After the services and rules are in place, deletes the stale conntrack entries of
    /// the synced diffs (with `net.ipv4.vs.conntrack=1`, IPVS flows have conntrack entries
    /// too, and kube-proxy's IPVS mode deletes them as its iptables mode does).
    fn clean_conntrack(&mut self, report: SyncReport) -> SyncReport {
        self.conntrack.clean_into(&mut self.stale, report)
    }

    fn report(&self, full: bool, written: usize) -> SyncReport {
        let have = self.have.as_ref();
        SyncReport::new(
            full,
            written,
            have.map_or(0, BTreeMap::len),
            have.map_or(0, |h| h.values().map(|s| s.dests.len()).sum()),
        )
    }
}

fn ignore<T: Default>(e: SyncError, errnos: &[i32]) -> Result<T, SyncError> {
    match e.errno() {
        Some(n) if errnos.contains(&n) => Ok(T::default()),
        _ => Err(e),
    }
}

impl Dataplane for Ipvs {
    type Error = SyncError;

    fn sync(&mut self, plan: &Plan, diff: &PlanDiff) -> Result<SyncReport, SyncError> {
        self.stale.extend(stale_flows(diff, plan));
        let report = self.apply(plan, diff)?;
        Ok(self.clean_conntrack(report))
    }

    fn resync(&mut self, plan: &Plan) -> Result<SyncReport, SyncError> {
        let report = self.full(plan)?;
        Ok(self.clean_conntrack(report))
    }

    fn cleanup(&mut self) -> Result<(), SyncError> {
        let mut have = self.read_kernel()?;
        let index = self.device_index()?;
        let on_dev: BTreeSet<IpAddr> = match index {
            Some(i) => self
                .addresses()?
                .into_iter()
                .filter(|(x, _, _)| *x == i)
                .map(|(_, a, _)| a)
                .collect(),
            None => BTreeSet::new(),
        };
        let cached: BTreeSet<ServiceKey> = self
            .have
            .as_ref()
            .map(|h| h.keys().copied().collect())
            .unwrap_or_default();
        let node_ips = self.node_ips.clone();
        let owned = |k: &ServiceKey| {
            on_dev.contains(&k.addr) || node_ips.contains(&k.addr) || cached.contains(k)
        };
        self.reconcile(&BTreeMap::new(), &mut have, owned)?;
        self.have = None;
        if let Some(i) = index {
            let mut req = LinkMessage::default();
            req.header.index = i;
            let dev = self.config.device.clone();
            self.route(
                "RTM_DELLINK",
                || format!("device {dev}"),
                RouteNetlinkMessage::DelLink(req),
                0,
            )
            .or_else(|e| ignore(e, &[ENODEV]))?;
        }
        self.bound.clear();
        self.remove_rules()
    }
}

// Keep the message type in scope for docs and the netlink generic bound.
#[allow(dead_code)]
type IpvsNetlinkMessage = NetlinkMessage<GenlMessage<IpvsMessage>>;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn scheduler_names_round_trip() {
        for s in [
            Scheduler::Rr,
            Scheduler::Wrr,
            Scheduler::Lc,
            Scheduler::Sh,
            Scheduler::Mh,
        ] {
            assert_eq!(s.as_str().parse::<Scheduler>().unwrap(), s);
        }
        assert!("dh".parse::<Scheduler>().unwrap_err().contains("dh"));
    }

    #[test]
    fn kernel_error_names_service_and_errno() {
        let e = SyncError::from_nl(
            "IPVS_CMD_NEW_DEST",
            "destination 10.244.0.10:8080 of service default/web:http (10.96.0.10:80/TCP ClusterIP)",
            NlError::Errno(EEXIST),
        );
        let s = e.to_string();
        assert!(s.contains("default/web:http"), "{s}");
        assert!(s.contains("errno 17"), "{s}");
        assert!(s.contains("File exists"), "{s}");
        assert_eq!(e.errno(), Some(EEXIST));
    }
}
