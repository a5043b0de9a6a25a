//! A small cluster in network namespaces, for end-to-end tests with real packets.
//!
//! ```text
//!            client c0 (192.168.50.100)   client c1 (.101) ...
//!                  │ eth0                      │ eth0
//!   ┌──────────────┴───────────────────────────┴────────────── switch <prefix>sw, br0
//!   │ eth0 192.168.50.11                  │ eth0 192.168.50.12           LAN 192.168.50.0/24
//!  node n0 (ip_forward, svc0 sink,      node n1
//!   10.96.0.0/12 dev svc0,                10.244.0.0/24 via .11
//!   10.244.1.0/24 via .12)                │ vp<k>
//!   │ vp0        │ vp1                    pod p<k>
//!  pod p0       pod p1                    eth0 10.244.1.10/32
//!  eth0 10.244.0.10/32, default via 169.254.1.1 (proxy ARP on vp0, Calico style)
//! ```
//!
//! - Every namespace name starts with a per-testbed prefix (`sv` and four hex digits), claimed
//!   by creating the switch namespace `<prefix>sw` exclusively, so testbeds built in parallel
//!   threads or processes never collide.
//! - Nothing is created in the root namespace: every veth pair is created inside a test
//!   namespace with its peer placed directly in another one, and no test namespace has a path
//!   out. Clients reach nodes over the LAN and LoadBalancer addresses through
//!   [`TestbedSpec::lb_routes`] (a route via the first node, as a cloud load balancer
//!   delivers to a node); they have no route to pods or ClusterIPs.
//! - Each pod runs `svcnat-podserver`, which answers with its pod name and the client
//!   address it sees; [`Testbed::probe`] runs `svcnat-probe` in any namespace and parses
//!   its report into a [`ProbeResult`].
//! - Dropping the [`Testbed`] (also while unwinding from a panic) stops the servers and
//!   deletes every namespace it created. A server whose test process died exits by itself
//!   (its stdin closes).
//!
//! A test starts with [`skip_unless_root!`](crate::skip_unless_root), which returns early
//! with `SKIP: reason` on stderr when the machine cannot run the testbed, and panics instead
//! when `CI=true`:
//!
//! ```no_run
//! use svcnat_examples::testbed::{PodSpec, ProbeArgs, Testbed, TestbedSpec};
//!
//! # fn main() -> std::io::Result<()> {
//! let spec = TestbedSpec::new(2, 1)
//!     .pod(PodSpec::new("web-0", 0, "10.244.0.10".parse().unwrap()).tcp(80))
//!     .pod(PodSpec::new("web-1", 1, "10.244.1.10".parse().unwrap()).tcp(80));
//! let tb = Testbed::new(spec)?;
//! let seen = tb.probe(tb.ns_of_node(0), ProbeArgs::tcp("10.244.1.10:80".parse().unwrap()))?;
//! assert_eq!(seen.per_pod().get("web-1"), Some(&1));
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// How long a pod server may take to bind its ports.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The pods' default gateway, answered by proxy ARP on the node side of their veth.
const POD_GATEWAY4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The pods' IPv6 default gateway: a link-local address on the node side of their veth.
const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

/// Whether this runs under CI (`CI=true` or `CI=1`), where a test must not skip.
pub fn in_ci() -> bool {
    matches!(
        std::env::var("CI")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("true" | "1")
    )
}

/// A long-running program a test starts (`svcnat-proxy`, `svcnat-dns`): its stderr is echoed
/// with a label (so a failing test shows it) and kept for assertions, a `ready` line on its
/// stdout is noticed, and it is killed when dropped, also on panic.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    label: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    ready: Receiver<()>,
}

impl Daemon {
    /// Starts `cmd` with piped stdout and stderr.
    pub fn spawn(mut cmd: Command, label: &str) -> io::Result<Daemon> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (tx, ready) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line.trim() == "ready" {
                        let _ = tx.send(());
                    }
                }
            });
        }
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(pipe) = child.stderr.take() {
            let (sink, label) = (stderr.clone(), label.to_string());
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    eprintln!("[{label}] {line}");
                    let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        Ok(Daemon {
            child,
            label: label.to_string(),
            stderr,
            ready,
        })
    }

    /// Waits for `ready` on stdout; the error carries the program's stderr so far.
    pub fn wait_ready(&self, timeout: std::time::Duration) -> Result<(), String> {
        self.ready.recv_timeout(timeout).map_err(|_| {
            format!(
                "{} never printed ready within {timeout:?}; stderr:\n{}",
                self.label,
                self.stderr()
            )
        })
    }

    /// Everything it wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `what` appears on its stderr within `timeout`.
    pub fn logged(&self, what: &str, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.stderr().contains(what) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The process.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Checks that this machine can build a testbed: root (effective uid 0), `ip` from iproute2
/// and `sysctl`. `Err` carries the reason to print.
pub fn require_root() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| "no Uid line in /proc/self/status".to_string())?;
    if euid != "0" {
        return Err(format!(
            "the testbed needs root (effective uid is {euid}) to create network namespaces"
        ));
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Err("the kernel has no network namespaces".to_string());
    }
    for (tool, arg) in [("ip", "-V"), ("sysctl", "-V")] {
        match Command::new(tool).arg(arg).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => return Err(format!("`{tool} {arg}` failed: {}", o.status)),
            Err(e) => return Err(format!("`{tool}` is not usable: {e}")),
        }
    }
    Ok(())
}

/// Returns from the calling test with `SKIP: reason` on stderr when
/// [`require_root`](crate::testbed::require_root) fails, and panics instead under CI
/// (`CI=true`), where a missing capability must fail the run.
#[macro_export]
macro_rules! skip_unless_root {
    () => {
        if let Err(reason) = $crate::testbed::require_root() {
            if $crate::testbed::in_ci() {
                panic!("CI=true but the namespace testbed cannot run: {reason}");
            }
            eprintln!("SKIP: {reason}");
            return;
        }
    };
}

/// Where the testbed finds its two helper programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    /// `svcnat-podserver`.
    pub podserver: PathBuf,
    /// `svcnat-probe`.
    pub probe: PathBuf,
}

/// The helper programs as Cargo built them for this integration test
/// (`CARGO_BIN_EXE_*`); use it in tests under `examples/tests/`.
///
/// ```ignore
/// let spec = TestbedSpec::new(1, 1).binaries(svcnat_examples::testbed_binaries!());
/// ```
#[macro_export]
macro_rules! testbed_binaries {
    () => {
        $crate::testbed::Binaries {
            podserver: ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_svcnat-podserver")),
            probe: ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_svcnat-probe")),
        }
    };
}

impl Binaries {
    /// Finds the helper programs: the paths in `SVCNAT_PODSERVER` and `SVCNAT_PROBE` when
    /// set, else next to the running executable (for a test, `target/<profile>/`, the parent
    /// of its `deps/` directory, where Cargo puts the binaries of `svcnat-examples`).
    ///
    /// Cargo builds those binaries for the tests of `svcnat-examples` itself; another
    /// package's tests need a `cargo build -p svcnat-examples --bins` first.
    pub fn discover() -> io::Result<Binaries> {
        let from_env = |var: &str| std::env::var_os(var).map(PathBuf::from);
        if let (Some(podserver), Some(probe)) =
            (from_env("SVCNAT_PODSERVER"), from_env("SVCNAT_PROBE"))
        {
            return Ok(Binaries { podserver, probe });
        }
        let exe = std::env::current_exe()?;
        let mut dirs = Vec::new();
        if let Some(dir) = exe.parent() {
            if dir.file_name() == Some(OsStr::new("deps"))
                && let Some(parent) = dir.parent()
            {
                dirs.push(parent.to_path_buf());
            }
            dirs.push(dir.to_path_buf());
        }
        for dir in &dirs {
            let found = Binaries {
                podserver: dir.join("svcnat-podserver"),
                probe: dir.join("svcnat-probe"),
            };
            if found.podserver.is_file() && found.probe.is_file() {
                return Ok(found);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "svcnat-podserver and svcnat-probe not found in {dirs:?}: run \
                 `cargo build -p svcnat-examples --bins`, or set SVCNAT_PODSERVER and SVCNAT_PROBE"
            ),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Specification
// ---------------------------------------------------------------------------------------------

/// One node: a namespace `<prefix>n<i>` on the LAN that forwards for its pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// The Kubernetes node name (what `NodeContext::node_name` and pods' `nodeName` use).
    pub name: String,
    /// The node's LAN address (`eth0`).
    pub ip: Ipv4Addr,
    /// The node's IPv6 LAN address, when the LAN has IPv6.
    pub ip6: Option<Ipv6Addr>,
    /// The node's pod CIDRs; the other nodes route them via this node (host-gw style).
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeSpec {
    /// Node `i` of the standard layout: `node-<i>`, `192.168.50.<11+i>`, pod CIDR
    /// `10.244.<i>.0/24`.
    pub fn standard(i: usize) -> NodeSpec {
        NodeSpec {
            name: format!("node-{i}"),
            ip: nth_v4(Ipv4Addr::new(192, 168, 50, 0), 11 + i),
            ip6: None,
            pod_cidrs: vec![IpNet::V4(v4_net(
                Ipv4Addr::new(10, 244, (i % 256) as u8, 0),
                24,
            ))],
        }
    }
}

/// One client: a namespace `<prefix>c<i>` on the LAN, outside the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSpec {
    /// A name for messages.
    pub name: String,
    /// The client's LAN address.
    pub ip: Ipv4Addr,
    /// The client's IPv6 LAN address, when the LAN has IPv6.
    pub ip6: Option<Ipv6Addr>,
}

impl ClientSpec {
    /// Client `i` of the standard layout: `client-<i>`, `192.168.50.<100+i>`.
    pub fn standard(i: usize) -> ClientSpec {
        ClientSpec {
            name: format!("client-{i}"),
            ip: nth_v4(Ipv4Addr::new(192, 168, 50, 0), 100 + i),
            ip6: None,
        }
    }
}

/// One pod: a namespace `<prefix>p<k>` behind its node, running `svcnat-podserver`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod name; the server answers with it.
    pub name: String,
    /// Index of the node in [`TestbedSpec::nodes`].
    pub node: usize,
    /// The pod's addresses (one, or one per family); each must lie in one of the node's
    /// pod CIDRs when the node has any.
    pub ips: Vec<IpAddr>,
    /// TCP ports the server listens on.
    pub tcp_ports: Vec<u16>,
    /// UDP ports the server answers on.
    pub udp_ports: Vec<u16>,
    /// SCTP ports the server listens on (the kernel must have SCTP).
    pub sctp_ports: Vec<u16>,
    /// Serve the lab's vote page to browsers, storing votes in this redis (`host:port`):
    /// `svcnat-podserver --vote-app` ([`crate::voteapp`]).
    pub vote_app: Option<String>,
    /// The pod's `/etc/resolv.conf`, in place before its server starts (a process reads
    /// it through `ip netns exec` only when it starts).
    pub resolv_conf: Option<String>,
}

impl PodSpec {
    /// A pod with one address and no ports yet.
    pub fn new(name: impl Into<String>, node: usize, ip: IpAddr) -> PodSpec {
        PodSpec {
            name: name.into(),
            node,
            ips: vec![ip],
            tcp_ports: Vec::new(),
            udp_ports: Vec::new(),
            sctp_ports: Vec::new(),
            vote_app: None,
            resolv_conf: None,
        }
    }

    /// The pod's `/etc/resolv.conf` (see [`Testbed::set_resolv_conf`]).
    pub fn resolv_conf(mut self, contents: impl Into<String>) -> PodSpec {
        self.resolv_conf = Some(contents.into());
        self
    }

    /// Serves the lab's vote page to browsers, votes stored in the redis at `redis`.
    pub fn vote_app(mut self, redis: impl Into<String>) -> PodSpec {
        self.vote_app = Some(redis.into());
        self
    }

    /// Adds an address (the second family of a dual-stack pod).
    pub fn with_ip(mut self, ip: IpAddr) -> PodSpec {
        self.ips.push(ip);
        self
    }

    /// Adds a TCP port.
    pub fn tcp(mut self, port: u16) -> PodSpec {
        self.tcp_ports.push(port);
        self
    }

    /// Adds a UDP port.
    pub fn udp(mut self, port: u16) -> PodSpec {
        self.udp_ports.push(port);
        self
    }

    /// Adds an SCTP port (see [`crate::sctp::available`]).
    pub fn sctp(mut self, port: u16) -> PodSpec {
        self.sctp_ports.push(port);
        self
    }
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestbedSpec {
    /// The LAN joining nodes and clients (default `192.168.50.0/24`); its prefix length is
    /// the one given to the `eth0` addresses.
    pub lan: Ipv4Net,
    /// The IPv6 LAN, if any (see [`TestbedSpec::with_ipv6`]).
    pub lan6: Option<Ipv6Net>,
    /// The nodes.
    pub nodes: Vec<NodeSpec>,
    /// The clients.
    pub clients: Vec<ClientSpec>,
    /// The pods, started in order.
    pub pods: Vec<PodSpec>,
    /// Service ranges routed to the `svc0` dummy of every node (default `10.96.0.0/12`), so
    /// service traffic is routable and a REJECT in the filter table sees it.
    pub service_cidrs: Vec<IpNet>,
    /// Addresses (LoadBalancer ingress, externalIPs) every client routes via the first node;
    /// every node routes them to its `svc0` sink.
    pub lb_routes: Vec<IpAddr>,
    /// The helper programs; `None` means [`Binaries::discover`].
    pub binaries: Option<Binaries>,
}

impl Default for TestbedSpec {
    /// One node and one client.
    fn default() -> Self {
        TestbedSpec::new(1, 1)
    }
}

impl TestbedSpec {
    /// `nodes` standard nodes ([`NodeSpec::standard`]), `clients` standard clients and no
    /// pods, IPv4 only.
    pub fn new(nodes: usize, clients: usize) -> TestbedSpec {
        TestbedSpec {
            lan: v4_net(Ipv4Addr::new(192, 168, 50, 0), 24),
            lan6: None,
            nodes: (0..nodes).map(NodeSpec::standard).collect(),
            clients: (0..clients).map(ClientSpec::standard).collect(),
            pods: Vec::new(),
            service_cidrs: vec![IpNet::V4(v4_net(Ipv4Addr::new(10, 96, 0, 0), 12))],
            lb_routes: Vec::new(),
            binaries: None,
        }
    }

    /// Adds IPv6 to the layout: LAN `fd00:50::/64` (node `i` at `fd00:50::<11+i>`, client `i`
    /// at `fd00:50::<100+i>`, in hex digits as written), pod CIDR `fd00:10:244:<i>::/64` per
    /// node and service range `fd00:10:96::/108`. Call it after the nodes and clients exist.
    pub fn with_ipv6(mut self) -> TestbedSpec {
        let lan6 = v6_net(Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0), 64);
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.ip6 = Some(nth_v6(lan6.network(), 0x11 + i as u128));
            node.pod_cidrs.push(IpNet::V6(v6_net(
                Ipv6Addr::new(0xfd00, 0x10, 0x244, i as u16, 0, 0, 0, 0),
                64,
            )));
        }
        for (i, client) in self.clients.iter_mut().enumerate() {
            client.ip6 = Some(nth_v6(lan6.network(), 0x100 + i as u128));
        }
        self.service_cidrs.push(IpNet::V6(v6_net(
            Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0),
            108,
        )));
        self.lan6 = Some(lan6);
        self
    }

    /// Adds a pod.
    pub fn pod(mut self, pod: PodSpec) -> TestbedSpec {
        self.pods.push(pod);
        self
    }

    /// Adds a route for `ip` in every client via the first node.
    pub fn lb_route(mut self, ip: IpAddr) -> TestbedSpec {
        self.lb_routes.push(ip);
        self
    }

    /// Uses these helper programs instead of discovering them.
    pub fn binaries(mut self, binaries: Binaries) -> TestbedSpec {
        self.binaries = Some(binaries);
        self
    }
}

fn v4_net(addr: Ipv4Addr, len: u8) -> Ipv4Net {
    Ipv4Net::new(addr, len.min(32)).unwrap_or_default()
}

fn v6_net(addr: Ipv6Addr, len: u8) -> Ipv6Net {
    Ipv6Net::new(addr, len.min(128)).unwrap_or_default()
}

fn nth_v4(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(n as u32))
}

fn nth_v6(base: Ipv6Addr, n: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(base).wrapping_add(n))
}

// ---------------------------------------------------------------------------------------------
// Probing
// ---------------------------------------------------------------------------------------------

/// The transport a probe uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTP GETs, a new connection each.
    Tcp,
    /// Datagrams, a new socket (source port) each.
    Udp,
    /// SCTP associations, a new one each, one line exchanged on it.
    Sctp,
}

/// What [`Testbed::probe`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeArgs {
    /// The transport.
    pub proto: Proto,
    /// Where to.
    pub target: SocketAddr,
    /// How many attempts, one after the other.
    pub count: u32,
    /// Per attempt (connect, and reply).
    pub timeout: Duration,
    /// Source address to bind (UDP only: std cannot bind a TCP client).
    pub source: Option<IpAddr>,
    /// Source port to bind (UDP only): every datagram, in this call and later ones, is one
    /// flow.
    pub source_port: Option<u16>,
}

impl ProbeArgs {
    /// One HTTP GET to `target`, 1 s timeout.
    pub fn tcp(target: SocketAddr) -> ProbeArgs {
        ProbeArgs {
            proto: Proto::Tcp,
            target,
            count: 1,
            timeout: Duration::from_millis(1000),
            source: None,
            source_port: None,
        }
    }

    /// One datagram to `target`, 1 s timeout.
    pub fn udp(target: SocketAddr) -> ProbeArgs {
        ProbeArgs {
            proto: Proto::Udp,
            ..ProbeArgs::tcp(target)
        }
    }

    /// Sets the number of attempts.
    pub fn count(mut self, count: u32) -> ProbeArgs {
        self.count = count;
        self
    }

    /// Sets the per-attempt timeout in milliseconds.
    pub fn timeout_ms(mut self, ms: u64) -> ProbeArgs {
        self.timeout = Duration::from_millis(ms);
        self
    }

    /// One SCTP association to `target` (a line and its reply), 1 s timeout.
    pub fn sctp(target: SocketAddr) -> ProbeArgs {
        ProbeArgs {
            proto: Proto::Sctp,
            ..ProbeArgs::tcp(target)
        }
    }

    /// Binds a source address (UDP only).
    pub fn source(mut self, ip: IpAddr) -> ProbeArgs {
        self.source = Some(ip);
        self
    }

    /// Sends every datagram from this UDP port (as a resolver's connected socket does).
    pub fn source_port(mut self, port: u16) -> ProbeArgs {
        self.source_port = Some(port);
        self
    }

    fn to_args(self) -> Vec<String> {
        let mut args = vec![
            match self.proto {
                Proto::Tcp => "tcp".to_string(),
                Proto::Udp => "udp".to_string(),
                Proto::Sctp => "sctp".to_string(),
            },
            self.target.to_string(),
            "--count".to_string(),
            self.count.to_string(),
            "--timeout-ms".to_string(),
            self.timeout.as_millis().max(1).to_string(),
        ];
        if let Some(source) = self.source {
            args.extend(["--source".to_string(), source.to_string()]);
        }
        if let Some(port) = self.source_port {
            args.extend(["--source-port".to_string(), port.to_string()]);
        }
        args
    }
}

/// What [`Testbed::hold_many`] saw: connections held open at once, then answered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Many {
    /// Connections that opened (all of them stay open until every one was answered).
    pub connected: usize,
    /// Connections answered by a pod afterwards.
    pub answered: usize,
    /// The pods that answered.
    pub pods: Vec<String>,
    /// Failures by kind (`refused`, `timeout`, ...), with their counts.
    pub failures: Vec<(usize, String)>,
}

impl Many {
    fn parse(stdout: &str) -> Many {
        let mut m = Many::default();
        for line in stdout.lines() {
            if let Some(rest) = line.strip_prefix("many ") {
                for field in rest.split_whitespace() {
                    match field.split_once('=') {
                        Some(("connected", v)) => m.connected = v.parse().unwrap_or(0),
                        Some(("answered", v)) => m.answered = v.parse().unwrap_or(0),
                        Some(("pods", v)) => {
                            m.pods = v
                                .split(',')
                                .filter(|p| !p.is_empty())
                                .map(str::to_string)
                                .collect();
                        }
                        _ => {}
                    }
                }
            } else if let Some((n, word)) = line
                .strip_prefix("failure ")
                .and_then(|rest| rest.split_once(' '))
            {
                m.failures.push((n.parse().unwrap_or(0), word.to_string()));
            }
        }
        m
    }
}

/// An HTTP answer seen by [`Testbed::http_get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// The body, its lines joined by single spaces.
    pub body: String,
}

/// The outcome of one probe attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// A pod answered.
    Ok {
        /// The pod's name.
        pod: String,
        /// The client address the pod saw (source kept, or masqueraded).
        client: Option<SocketAddr>,
    },
    /// Connection refused: a TCP RST or an ICMP port unreachable (what a REJECT sends).
    Refused,
    /// No answer in time (a DROP, or nobody there).
    Timeout,
    /// ICMP host or network unreachable.
    Unreachable,
    /// Anything else, with the probe's text.
    Error(String),
}

/// Looks up `key=value` in a reply line such as `pod=web-0 client=10.0.0.1:4242`.
pub fn reply_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

impl Attempt {
    fn parse(line: &str) -> Attempt {
        let line = line.trim();
        match line {
            "refused" => Attempt::Refused,
            "timeout" => Attempt::Timeout,
            "unreachable" => Attempt::Unreachable,
            _ => match line.strip_prefix("ok ") {
                Some(rest) => match reply_field(rest, "pod") {
                    Some(pod) => Attempt::Ok {
                        pod: pod.to_string(),
                        client: reply_field(rest, "client").and_then(|c| c.parse().ok()),
                    },
                    None => Attempt::Error(line.to_string()),
                },
                None => Attempt::Error(line.strip_prefix("error ").unwrap_or(line).to_string()),
            },
        }
    }
}

/// What a probe saw, attempt by attempt.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbeResult {
    /// One entry per attempt, in order.
    pub attempts: Vec<Attempt>,
}

impl ProbeResult {
    /// Parses `svcnat-probe tcp|udp` output.
    pub fn parse(stdout: &str) -> ProbeResult {
        ProbeResult {
            attempts: stdout
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(Attempt::parse)
                .collect(),
        }
    }

    /// Answers per pod name.
    pub fn per_pod(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for a in &self.attempts {
            if let Attempt::Ok { pod, .. } = a {
                *counts.entry(pod.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The pods that answered.
    pub fn pods(&self) -> BTreeSet<String> {
        self.per_pod().into_keys().collect()
    }

    /// Attempts a pod answered.
    pub fn ok(&self) -> usize {
        self.count(|a| matches!(a, Attempt::Ok { .. }))
    }

    /// Attempts refused.
    pub fn refused(&self) -> usize {
        self.count(|a| matches!(a, Attempt::Refused))
    }

    /// Attempts that timed out.
    pub fn timeouts(&self) -> usize {
        self.count(|a| matches!(a, Attempt::Timeout))
    }

    /// Attempts answered with ICMP unreachable.
    pub fn unreachable(&self) -> usize {
        self.count(|a| matches!(a, Attempt::Unreachable))
    }

    /// The other errors' texts.
    pub fn errors(&self) -> Vec<&str> {
        self.attempts
            .iter()
            .filter_map(|a| match a {
                Attempt::Error(e) => Some(e.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Whether there was at least one attempt and every one got an answer.
    pub fn all_ok(&self) -> bool {
        !self.attempts.is_empty() && self.ok() == self.attempts.len()
    }

    /// The client addresses the pods saw, in order.
    pub fn clients(&self) -> Vec<SocketAddr> {
        self.attempts
            .iter()
            .filter_map(|a| match a {
                Attempt::Ok { client, .. } => *client,
                _ => None,
            })
            .collect()
    }

    /// The distinct client IPs the pods saw.
    pub fn client_ips(&self) -> BTreeSet<IpAddr> {
        self.clients().iter().map(SocketAddr::ip).collect()
    }

    fn count(&self, f: impl Fn(&Attempt) -> bool) -> usize {
        self.attempts.iter().filter(|a| f(a)).count()
    }
}

impl fmt::Display for ProbeResult {
    /// A one-line summary for assertion messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} attempts: ok {} {:?}, refused {}, timeout {}, unreachable {}, clients {:?}",
            self.attempts.len(),
            self.ok(),
            self.per_pod(),
            self.refused(),
            self.timeouts(),
            self.unreachable(),
            self.client_ips()
        )?;
        let errors = self.errors();
        if !errors.is_empty() {
            write!(f, ", errors {errors:?}")?;
        }
        Ok(())
    }
}

/// One long-lived TCP connection in line mode, opened by [`Testbed::hold`].
///
/// The connection lives in a `svcnat-probe hold` process; dropping the value ends it.
#[derive(Debug)]
pub struct Held {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    timeout: Duration,
    local: SocketAddr,
}

impl Held {
    /// The connection's local (client side) address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends one line and returns the pod's reply, `pod=NAME client=IP:PORT line=TEXT`
    /// ([`reply_field`] reads it). An error carries the probe's report (`error closed`,
    /// `timeout`, ...).
    pub fn ping(&mut self, text: &str) -> io::Result<String> {
        if text.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a ping is one line",
            ));
        }
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("the held connection is closed"))?;
        writeln!(stdin, "{text}")?;
        stdin.flush()?;
        let wait = self.timeout + Duration::from_secs(5);
        match self.lines.recv_timeout(wait) {
            Ok(line) => match line.strip_prefix("ok ") {
                Some(reply) => Ok(reply.to_string()),
                None => Err(io::Error::other(format!("held connection: {line}"))),
            },
            Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "svcnat-probe hold did not answer",
            )),
            Err(RecvTimeoutError::Disconnected) => {
                Err(io::Error::other("svcnat-probe hold exited"))
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns a thread sending each stdout line of `child` to the returned channel.
fn line_channel(stdout: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(line) => {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    rx
}

// ---------------------------------------------------------------------------------------------
// The testbed
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Pod {
    spec: PodSpec,
    ns: String,
    server: Child,
    /// Held open: the server exits when it closes.
    server_stdin: Option<ChildStdin>,
}

/// A running testbed; see the [module documentation](self).
#[derive(Debug)]
pub struct Testbed {
    prefix: String,
    switch_ns: String,
    node_ns: Vec<String>,
    client_ns: Vec<String>,
    lan: Ipv4Net,
    lan6: Option<Ipv6Net>,
    nodes: Vec<NodeSpec>,
    clients: Vec<ClientSpec>,
    binaries: Binaries,
    /// Pods by name.
    pods: BTreeMap<String, Pod>,
    /// Next pod namespace and veth index; never reused.
    next_pod: usize,
    /// Namespaces this testbed created, in creation order (the switch first).
    created: Vec<String>,
    /// `/etc/netns/<ns>` directories written by [`Testbed::set_resolv_conf`].
    etc_dirs: Vec<PathBuf>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Four hex digits from the pid, a process-wide counter and the clock.
fn candidate_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let counter = u64::from(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut x = (u64::from(std::process::id()) << 32) ^ counter.wrapping_mul(0x9e37_79b9) ^ nanos;
    // splitmix64 finaliser: every input bit moves the four digits.
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    format!("sv{:04x}", x & 0xffff)
}

fn command_text(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd`; an error names the command and carries its stderr.
fn run(cmd: &mut Command) -> io::Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", command_text(cmd))))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "`{}` failed ({}): {}",
            command_text(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// `ip -n NS ARGS...`.
fn ip_in(ns: &str, args: &[&str]) -> io::Result<String> {
    run(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// Sets sysctls inside `ns`.
fn sysctl_in(ns: &str, settings: &[String]) -> io::Result<()> {
    run(Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw"])
        .args(settings))
    .map(drop)
}

/// Adds `name`, a device that silently drops what is routed to it, and brings it up: a
/// `dummy`, or where the kernel has none an `ifb` (also no ARP, drops what it is sent), or
/// as a last resort a bridge without ports and with ARP off.
fn add_sink_device(ns: &str, name: &str) -> io::Result<()> {
    let mut failures = Vec::new();
    for kind in ["dummy", "ifb", "bridge"] {
        match ip_in(ns, &["link", "add", name, "type", kind]) {
            Ok(_) => {
                ip_in(ns, &["link", "set", name, "arp", "off", "up"])?;
                return Ok(());
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    Err(io::Error::other(failures.join("; ")))
}

fn prefix_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

impl Testbed {
    /// Builds the testbed: switch, nodes, clients, then pods (each server ready before this
    /// returns). On any failure everything already created is torn down and the error
    /// returned.
    pub fn new(spec: TestbedSpec) -> io::Result<Testbed> {
        validate(&spec)?;
        let binaries = match spec.binaries.clone() {
            Some(b) => b,
            None => Binaries::discover()?,
        };
        for path in [&binaries.podserver, &binaries.probe] {
            if !path.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} does not exist", path.display()),
                ));
            }
        }
        let prefix = Testbed::claim_prefix()?;
        // From here on, dropping `tb` deletes what exists.
        let mut tb = Testbed {
            created: vec![format!("{prefix}sw")],
            switch_ns: format!("{prefix}sw"),
            node_ns: (0..spec.nodes.len())
                .map(|i| format!("{prefix}n{i}"))
                .collect(),
            client_ns: (0..spec.clients.len())
                .map(|i| format!("{prefix}c{i}"))
                .collect(),
            prefix,
            lan: spec.lan,
            lan6: spec.lan6,
            nodes: spec.nodes.clone(),
            clients: spec.clients.clone(),
            binaries,
            pods: BTreeMap::new(),
            next_pod: 0,
            etc_dirs: Vec::new(),
        };
        if let Err(e) = tb.build(&spec) {
            let e = io::Error::new(e.kind(), format!("testbed {}: {e}", tb.prefix));
            drop(tb);
            return Err(e);
        }
        Ok(tb)
    }

    /// Creates `<prefix>sw` for a fresh prefix; that namespace existing is the claim.
    fn claim_prefix() -> io::Result<String> {
        let mut last = None;
        for _ in 0..64 {
            let prefix = candidate_prefix();
            match run(Command::new("ip").args(["netns", "add", &format!("{prefix}sw")])) {
                Ok(_) => return Ok(prefix),
                Err(e) if e.to_string().contains("exists") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free testbed prefix")))
    }

    fn build(&mut self, spec: &TestbedSpec) -> io::Result<()> {
        let sw = self.ns_of_switch().to_string();
        ip_in(&sw, &["link", "set", "lo", "up"])?;
        ip_in(
            &sw,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
                "mcast_snooping",
                "0",
                // A switch forwards frames; it does not validate IP headers (with
                // br_netfilter built in, the bridge would otherwise drop malformed IPv4
                // before it reaches a node, hiding it from the datapath under test, and
                // defragment what it forwards).
                "nf_call_iptables",
                "0",
                "nf_call_ip6tables",
                "0",
                "nf_call_arptables",
                "0",
            ],
        )?;
        // br_netfilter ORs the bridge's options with these per-namespace switches; where
        // it is not built in, the keys do not exist and there is nothing to turn off.
        let _ = sysctl_in(
            &sw,
            &[
                "net.bridge.bridge-nf-call-iptables=0".to_string(),
                "net.bridge.bridge-nf-call-ip6tables=0".to_string(),
                "net.bridge.bridge-nf-call-arptables=0".to_string(),
            ],
        );
        ip_in(&sw, &["link", "set", "br0", "up"])?;

        for i in 0..self.nodes.len() {
            self.build_node(i)?;
        }
        self.route_pod_cidrs()?;
        for i in 0..self.clients.len() {
            self.build_client(i, &spec.lb_routes)?;
        }
        for i in 0..self.nodes.len() {
            let node = self.ns_of_node(i).to_string();
            for cidr in &spec.service_cidrs {
                ip_in(&node, &["route", "add", &cidr.to_string(), "dev", "svc0"])?;
            }
            // A node routes load balancer addresses too (on a real node the default route
            // does), so traffic that no rule translates reaches the filter FORWARD chain
            // (where loadBalancerSourceRanges drop it) instead of failing routing.
            for ip in &spec.lb_routes {
                let host = IpNet::from(*ip).to_string();
                ip_in(&node, &["route", "add", &host, "dev", "svc0"])?;
            }
        }
        for pod in &spec.pods {
            self.add_pod(pod.clone())?;
        }
        Ok(())
    }

    fn add_namespace(&mut self, ns: &str) -> io::Result<()> {
        run(Command::new("ip").args(["netns", "add", ns]))?;
        self.created.push(ns.to_string());
        // Interfaces created from now on inherit the `default` values.
        let mut settings: Vec<String> = [
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.default.disable_ipv6=0",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ]
        .map(String::from)
        .to_vec();
        if self.node_ns.iter().any(|n| n == ns) {
            settings.push("net.ipv4.ip_forward=1".to_string());
            settings.push("net.ipv6.conf.all.forwarding=1".to_string());
        }
        sysctl_in(ns, &settings)?;
        ip_in(ns, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Connects `ns` to the switch with `eth0` (switch side `port`) and brings it up.
    fn plug_into_lan(
        &self,
        ns: &str,
        port: &str,
        ip: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
    ) -> io::Result<()> {
        let sw = self.ns_of_switch();
        ip_in(
            sw,
            &[
                "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        ip_in(sw, &["link", "set", port, "master", "br0", "up"])?;
        let addr = format!("{ip}/{}", self.lan.prefix_len());
        ip_in(ns, &["addr", "add", &addr, "dev", "eth0"])?;
        if let (Some(ip6), Some(lan6)) = (ip6, self.lan6) {
            let addr6 = format!("{ip6}/{}", lan6.prefix_len());
            ip_in(ns, &["addr", "add", &addr6, "dev", "eth0", "nodad"])?;
        }
        ip_in(ns, &["link", "set", "eth0", "up"])?;
        Ok(())
    }

    fn build_node(&mut self, i: usize) -> io::Result<()> {
        let ns = self.ns_of_node(i).to_string();
        self.add_namespace(&ns)?;
        let node = self.nodes[i].clone();
        self.plug_into_lan(&ns, &format!("n{i}"), node.ip, node.ip6)?;
        add_sink_device(&ns, "svc0")?;
        // Proxy ARP answers for the pods' gateway only when the node routes it elsewhere.
        let gw = format!("{POD_GATEWAY4}/32");
        ip_in(&ns, &["route", "add", &gw, "dev", "svc0"])?;
        Ok(())
    }

    /// Host-gw: every node routes the other nodes' pod CIDRs via their LAN addresses.
    fn route_pod_cidrs(&self) -> io::Result<()> {
        for (i, _) in self.nodes.iter().enumerate() {
            let ns = self.ns_of_node(i);
            for (j, other) in self.nodes.iter().enumerate() {
                if i == j {
                    continue;
                }
                for cidr in &other.pod_cidrs {
                    let via = match cidr {
                        IpNet::V4(_) => IpAddr::V4(other.ip),
                        IpNet::V6(_) => match other.ip6 {
                            Some(ip6) => IpAddr::V6(ip6),
                            None => continue,
                        },
                    };
                    ip_in(
                        ns,
                        &[
                            "route",
                            "add",
                            &cidr.to_string(),
                            "via",
                            &via.to_string(),
                            "dev",
                            "eth0",
                        ],
                    )?;
                }
            }
        }
        Ok(())
    }

    fn build_client(&mut self, i: usize, lb_routes: &[IpAddr]) -> io::Result<()> {
        let ns = self.ns_of_client(i).to_string();
        self.add_namespace(&ns)?;
        let client = self.clients[i].clone();
        self.plug_into_lan(&ns, &format!("c{i}"), client.ip, client.ip6)?;
        for ip in lb_routes {
            let via = match ip {
                IpAddr::V4(_) => self.nodes.first().map(|n| IpAddr::V4(n.ip)),
                IpAddr::V6(_) => self.nodes.first().and_then(|n| n.ip6).map(IpAddr::V6),
            };
            let Some(via) = via else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("no first node address of {ip}'s family to route it via"),
                ));
            };
            let dst = format!("{ip}/{}", prefix_len(*ip));
            ip_in(
                &ns,
                &["route", "add", &dst, "via", &via.to_string(), "dev", "eth0"],
            )?;
        }
        Ok(())
    }

    /// Creates a pod (namespace, veth, routes) and starts its server; returns once the
    /// server listens.
    pub fn add_pod(&mut self, pod: PodSpec) -> io::Result<()> {
        validate_pod(&self.nodes, &pod)?;
        if self.pods.contains_key(&pod.name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("pod {} exists", pod.name),
            ));
        }
        let k = self.next_pod;
        self.next_pod += 1;
        let ns = format!("{}p{k}", self.prefix);
        let node = self.ns_of_node(pod.node).to_string();
        let vp = format!("vp{k}");
        self.add_namespace(&ns)?;
        let resolv = match &pod.resolv_conf {
            Some(text) => self.set_resolv_conf(&ns, text),
            None => Ok(()),
        };
        let built = resolv
            .and_then(|()| self.wire_pod(&ns, &node, &vp, &pod))
            .and_then(|()| self.start_server(&ns, &pod));
        match built {
            Ok((server, server_stdin)) => {
                self.pods.insert(
                    pod.name.clone(),
                    Pod {
                        spec: pod,
                        ns,
                        server,
                        server_stdin: Some(server_stdin),
                    },
                );
                Ok(())
            }
            Err(e) => {
                self.delete_namespace(&ns);
                Err(e)
            }
        }
    }

    fn wire_pod(&self, ns: &str, node: &str, vp: &str, pod: &PodSpec) -> io::Result<()> {
        ip_in(
            node,
            &[
                "link", "add", vp, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        sysctl_in(
            node,
            &[
                format!("net.ipv4.conf.{vp}.proxy_arp=1"),
                format!("net.ipv4.conf.{vp}.rp_filter=0"),
                format!("net.ipv4.neigh.{vp}.proxy_delay=0"),
            ],
        )?;
        let has_v6 = pod.ips.iter().any(IpAddr::is_ipv6);
        if has_v6 {
            let gw6 = format!("{POD_GATEWAY6}/64");
            ip_in(node, &["addr", "add", &gw6, "dev", vp, "nodad"])?;
        }
        ip_in(node, &["link", "set", vp, "up"])?;
        for ip in &pod.ips {
            let addr = format!("{ip}/{}", prefix_len(*ip));
            let mut args = vec!["addr", "add", &addr, "dev", "eth0"];
            if ip.is_ipv6() {
                args.push("nodad");
            }
            ip_in(ns, &args)?;
        }
        ip_in(ns, &["link", "set", "eth0", "up"])?;
        if pod.ips.iter().any(IpAddr::is_ipv4) {
            let gw = POD_GATEWAY4.to_string();
            ip_in(ns, &["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
            ip_in(ns, &["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        }
        if has_v6 {
            let gw6 = POD_GATEWAY6.to_string();
            ip_in(
                ns,
                &["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"],
            )?;
        }
        for ip in &pod.ips {
            let dst = format!("{ip}/{}", prefix_len(*ip));
            ip_in(node, &["route", "add", &dst, "dev", vp])?;
        }
        Ok(())
    }

    fn start_server(&self, ns: &str, pod: &PodSpec) -> io::Result<(Child, ChildStdin)> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(&self.binaries.podserver)
            .args(["--name", &pod.name, "--watch-stdin"]);
        if !pod.tcp_ports.is_empty() {
            cmd.arg("--tcp")
                .args(pod.tcp_ports.iter().map(u16::to_string));
        }
        if !pod.udp_ports.is_empty() {
            cmd.arg("--udp")
                .args(pod.udp_ports.iter().map(u16::to_string));
        }
        if !pod.sctp_ports.is_empty() {
            cmd.arg("--sctp")
                .args(pod.sctp_ports.iter().map(u16::to_string));
        }
        if let Some(redis) = &pod.vote_app {
            cmd.args(["--vote-app", redis]);
        }
        let what = command_text(&cmd);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))?;
        let ready = match (child.stdin.take(), child.stdout.take()) {
            (Some(stdin), Some(stdout)) => {
                let lines = line_channel(stdout);
                match lines.recv_timeout(SERVER_READY_TIMEOUT) {
                    Ok(line) if line.trim() == "ready" => Ok(stdin),
                    Ok(line) => Err(io::Error::other(format!("{what}: printed {line:?}"))),
                    Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{what}: not ready after {SERVER_READY_TIMEOUT:?}"),
                    )),
                    Err(RecvTimeoutError::Disconnected) => {
                        let status = child.wait()?;
                        Err(io::Error::other(format!("{what}: exited ({status})")))
                    }
                }
            }
            _ => Err(io::Error::other(format!("{what}: no pipes"))),
        };
        match ready {
            Ok(stdin) => Ok((child, stdin)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Stops a pod's server and deletes its namespace (with its veth and node route).
    pub fn remove_pod(&mut self, name: &str) -> io::Result<()> {
        let mut pod = self
            .pods
            .remove(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no pod {name}")))?;
        stop_server(&mut pod);
        let node = self.ns_of_node(pod.spec.node).to_string();
        let result = run(Command::new("ip").args(["netns", "del", &pod.ns])).map(drop);
        self.created.retain(|ns| ns != &pod.ns);
        // The veth and its /32 route go with the namespace; remove leftovers if any.
        for ip in &pod.spec.ips {
            let dst = format!("{ip}/{}", prefix_len(*ip));
            let _ = ip_in(&node, &["route", "del", &dst]);
        }
        result
    }

    fn delete_namespace(&mut self, ns: &str) {
        let _ = run(Command::new("ip").args(["netns", "del", ns]));
        self.created.retain(|n| n != ns);
    }

    /// The prefix every namespace of this testbed starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every namespace of this testbed, the switch first.
    pub fn namespaces(&self) -> &[String] {
        &self.created
    }

    /// The switch namespace.
    pub fn ns_of_switch(&self) -> &str {
        &self.switch_ns
    }

    /// Node `i`'s namespace, `<prefix>n<i>`.
    ///
    /// # Panics
    ///
    /// When `i` is not a node index.
    pub fn ns_of_node(&self, i: usize) -> &str {
        &self.node_ns[i]
    }

    /// Client `i`'s namespace, `<prefix>c<i>`.
    ///
    /// # Panics
    ///
    /// When `i` is not a client index.
    pub fn ns_of_client(&self, i: usize) -> &str {
        &self.client_ns[i]
    }

    /// A pod's namespace.
    pub fn ns_of_pod(&self, name: &str) -> Option<&str> {
        self.pods.get(name).map(|p| p.ns.as_str())
    }

    /// Node `i`'s spec.
    pub fn node(&self, i: usize) -> &NodeSpec {
        &self.nodes[i]
    }

    /// The nodes.
    pub fn nodes(&self) -> &[NodeSpec] {
        &self.nodes
    }

    /// Node `i`'s LAN address.
    pub fn node_ip(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.nodes[i].ip)
    }

    /// Node `i`'s IPv6 LAN address, if any.
    pub fn node_ip6(&self, i: usize) -> Option<IpAddr> {
        self.nodes[i].ip6.map(IpAddr::V6)
    }

    /// Client `i`'s LAN address.
    pub fn client_ip(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.clients[i].ip)
    }

    /// Client `i`'s IPv6 LAN address, if any.
    pub fn client_ip6(&self, i: usize) -> Option<IpAddr> {
        self.clients[i].ip6.map(IpAddr::V6)
    }

    /// The pods now running, by name.
    pub fn pods(&self) -> impl Iterator<Item = &PodSpec> {
        self.pods.values().map(|p| &p.spec)
    }

    /// A pod's first address.
    pub fn pod_ip(&self, name: &str) -> Option<IpAddr> {
        self.pods
            .get(name)
            .and_then(|p| p.spec.ips.first().copied())
    }

    /// The helper programs in use.
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// A command running `program` inside `ns` (`ip netns exec ns program`); add arguments
    /// and run it as usual. A process left running keeps the namespace's network alive
    /// after the testbed is dropped, so wait for it.
    pub fn command(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }

    /// Runs `args` (program first) inside `ns` and returns its output, whatever its status.
    pub fn exec<I, S>(&self, ns: &str, args: I) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut args = args.into_iter();
        let program = args
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no program"))?;
        let mut cmd = self.command(ns, program);
        cmd.args(args).stdin(Stdio::null()).output()
    }

    /// An observation table in `ns`: `table netdev obs`, an ingress chain on `eth0` ahead
    /// of everything else (priority -600), one counting rule per nftables match in
    /// `rules`; read with [`Testbed::ingress_counter`].
    pub fn install_ingress_counters(&self, ns: &str, rules: &[String]) -> io::Result<()> {
        let mut s = String::from(
            "table netdev obs {\n chain c {\n  type filter hook ingress device \"eth0\" priority -600; policy accept;\n",
        );
        for r in rules {
            s.push_str(&format!("  {r} counter\n"));
        }
        s.push_str(" }\n}\n");
        let path = std::env::temp_dir().join(format!("svcnat-obs-{}-{ns}.nft", std::process::id()));
        std::fs::write(&path, s)?;
        let r = self.exec_ok(ns, ["nft", "-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        r.map(|_| ())
    }

    /// The packets counted by the rule of [`Testbed::install_ingress_counters`] whose
    /// match is `rule` (as nftables lists it back).
    pub fn ingress_counter(&self, ns: &str, rule: &str) -> io::Result<u64> {
        let listing = self.exec_ok(ns, ["nft", "list", "table", "netdev", "obs"])?;
        let line = listing
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{rule} ")))
            .ok_or_else(|| io::Error::other(format!("no rule {rule} in {listing}")))?;
        let mut words = line.split_whitespace();
        words.find(|w| *w == "packets");
        words
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no packet count in {line}")))
    }

    /// Like [`Testbed::exec`] but fails on a non-zero status (the error carries stderr), and
    /// returns stdout.
    pub fn exec_ok<I, S>(&self, ns: &str, args: I) -> io::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut args = args.into_iter();
        let program = args
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no program"))?;
        run(self.command(ns, program).args(args))
    }

    /// The MAC address of `dev` in `ns`.
    pub fn mac(&self, ns: &str, dev: &str) -> io::Result<[u8; 6]> {
        let v = self.link_json(ns, dev)?;
        let text = v["address"].as_str().unwrap_or_default();
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for b in &mut mac {
            *b = parts
                .next()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| io::Error::other(format!("{ns} {dev}: no MAC in {text:?}")))?;
        }
        Ok(mac)
    }

    /// Frames `dev` in `ns` has received, as the kernel counts them.
    pub fn rx_packets(&self, ns: &str, dev: &str) -> io::Result<u64> {
        let v = self.link_json(ns, dev)?;
        v["stats64"]["rx"]["packets"]
            .as_u64()
            .ok_or_else(|| io::Error::other(format!("{ns} {dev}: no rx packet count")))
    }

    fn link_json(&self, ns: &str, dev: &str) -> io::Result<serde_json::Value> {
        let out = self.exec_ok(ns, ["ip", "-s", "-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(io::Error::other)?;
        Ok(v.get(0).cloned().unwrap_or_default())
    }

    /// Runs `svcnat-probe` in `ns` (a client, node or pod namespace) and parses its report.
    pub fn probe(&self, ns: &str, args: ProbeArgs) -> io::Result<ProbeResult> {
        let stdout = run(self.command(ns, &self.binaries.probe).args(args.to_args()))?;
        Ok(ProbeResult::parse(&stdout))
    }

    /// One HTTP GET of `http://target/` from `ns` (`svcnat-probe get`): the status and
    /// body, or how the attempt failed.
    pub fn http_get(
        &self,
        ns: &str,
        target: SocketAddr,
        timeout: Duration,
    ) -> io::Result<Result<HttpReply, Attempt>> {
        let stdout = run(self.command(ns, &self.binaries.probe).args([
            "get".to_string(),
            target.to_string(),
            "--timeout-ms".to_string(),
            timeout.as_millis().max(1).to_string(),
        ]))?;
        let line = stdout.lines().next().unwrap_or_default().trim();
        let Some(rest) = line.strip_prefix("http ") else {
            return Ok(Err(Attempt::parse(line)));
        };
        let (status, body) = rest.split_once(' ').unwrap_or((rest, ""));
        match status.parse() {
            Ok(status) => Ok(Ok(HttpReply {
                status,
                body: body.to_string(),
            })),
            Err(_) => Ok(Err(Attempt::Error(line.to_string()))),
        }
    }

    /// Opens `count` TCP connections from `ns` to `target` one after the other, keeps
    /// them all open, then has each answered (`svcnat-probe many`).
    pub fn hold_many(&self, ns: &str, target: SocketAddr, count: u32) -> io::Result<Many> {
        let stdout = run(self.command(ns, &self.binaries.probe).args([
            "many".to_string(),
            target.to_string(),
            "--count".to_string(),
            count.to_string(),
            "--timeout-ms".to_string(),
            "3000".to_string(),
        ]))?;
        Ok(Many::parse(&stdout))
    }

    /// Opens one TCP connection in line mode from `ns` to `target` (through whatever NAT is
    /// in place) and keeps it open for [`Held::ping`].
    pub fn hold(&self, ns: &str, target: SocketAddr) -> io::Result<Held> {
        let timeout = Duration::from_millis(2000);
        let mut cmd = self.command(ns, &self.binaries.probe);
        cmd.args([
            "hold".to_string(),
            target.to_string(),
            "--timeout-ms".to_string(),
            timeout.as_millis().to_string(),
        ]);
        let what = command_text(&cmd);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))?;
        let (stdin, lines) = match (child.stdin.take(), child.stdout.take()) {
            (Some(stdin), Some(stdout)) => (stdin, line_channel(stdout)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::other(format!("{what}: no pipes")));
            }
        };
        let mut held = Held {
            child,
            stdin: Some(stdin),
            lines,
            timeout,
            local: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        };
        let first = held.lines.recv_timeout(timeout + Duration::from_secs(5));
        match first {
            Ok(line) => match line
                .strip_prefix("connected local=")
                .and_then(|l| l.trim().parse().ok())
            {
                Some(local) => {
                    held.local = local;
                    Ok(held)
                }
                None => Err(io::Error::other(format!("{what}: {line}"))),
            },
            Err(_) => {
                let mut stderr = String::new();
                if let Some(mut e) = held.child.stderr.take() {
                    let _ = held.child.kill();
                    let _ = e.read_to_string(&mut stderr);
                }
                Err(io::Error::other(format!(
                    "{what}: no answer {}",
                    stderr.trim()
                )))
            }
        }
    }

    /// Writes `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` bind-mounts over
    /// `/etc/resolv.conf` for processes it starts in `ns`; removed on drop.
    pub fn set_resolv_conf(&mut self, ns: &str, contents: &str) -> io::Result<()> {
        if !self.created.iter().any(|n| n == ns) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{ns} is not a namespace of this testbed"),
            ));
        }
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir)?;
        if !self.etc_dirs.contains(&dir) {
            self.etc_dirs.push(dir.clone());
        }
        std::fs::write(dir.join("resolv.conf"), contents)
    }
}

fn stop_server(pod: &mut Pod) {
    drop(pod.server_stdin.take());
    let _ = pod.server.kill();
    let _ = pod.server.wait();
}

fn validate(spec: &TestbedSpec) -> io::Result<()> {
    let invalid = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    if spec.nodes.len() > 1000 || spec.clients.len() > 1000 {
        return invalid("at most 1000 nodes and 1000 clients".to_string());
    }
    let mut lan_ips = BTreeSet::new();
    for ip in spec
        .nodes
        .iter()
        .map(|n| n.ip)
        .chain(spec.clients.iter().map(|c| c.ip))
    {
        if !spec.lan.contains(&ip) {
            return invalid(format!("{ip} is not in the LAN {}", spec.lan));
        }
        if !lan_ips.insert(ip) {
            return invalid(format!("{ip} is used twice on the LAN"));
        }
    }
    let mut names = BTreeSet::new();
    for pod in &spec.pods {
        validate_pod(&spec.nodes, pod)?;
        if !names.insert(pod.name.as_str()) {
            return invalid(format!("pod {} is listed twice", pod.name));
        }
    }
    Ok(())
}

fn validate_pod(nodes: &[NodeSpec], pod: &PodSpec) -> io::Result<()> {
    let invalid = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    if pod.name.is_empty() || pod.name.contains(char::is_whitespace) {
        return invalid(format!("pod name {:?} must be one word", pod.name));
    }
    let Some(node) = nodes.get(pod.node) else {
        return invalid(format!("pod {}: no node {}", pod.name, pod.node));
    };
    if pod.ips.is_empty() {
        return invalid(format!("pod {} has no address", pod.name));
    }
    for ip in &pod.ips {
        if !node.pod_cidrs.is_empty() && !node.pod_cidrs.iter().any(|c| c.contains(ip)) {
            return invalid(format!(
                "pod {}: {ip} is outside node {}'s pod CIDRs {:?}",
                pod.name, node.name, node.pod_cidrs
            ));
        }
    }
    Ok(())
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for pod in self.pods.values_mut() {
            stop_server(pod);
        }
        // Newest first, so the switch (the prefix claim) goes last.
        for ns in self.created.iter().rev() {
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
        for dir in &self.etc_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Waits until `f` returns true or `timeout` passes; returns the last result. Handy for
/// waiting on a proxy to program its rules.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}
