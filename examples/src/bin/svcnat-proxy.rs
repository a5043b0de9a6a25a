//! `svcnat-proxy`: the node proxy. It does on one node what kube-proxy does, following an
//! API server (`--kubeconfig`, or in-cluster) or a directory of manifests.
//!
//! ```text
//! svcnat-proxy --kubeconfig FILE --node-name NODE --node-ip 192.168.50.11 [--service-proxy-name NAME]
//! svcnat-proxy                    # in a Pod: the in-cluster configuration (service account)
//! svcnat-proxy --manifests DIR --node-ip 192.168.50.11 --cluster-cidr 10.244.0.0/16 [-v]
//! svcnat-proxy --backend ipvs --ipvs-scheduler wrr --manifests DIR --node-ip 192.168.50.11
//! svcnat-proxy --backend userspace --interfaces eth0,vp* --manifests DIR --node-ip ...
//! svcnat-proxy --cleanup [--backend ipvs|userspace]
//! ```
//!
//! From an API server it watches Services and EndpointSlices (kube-proxy's label selector:
//! none labelled `service.kubernetes.io/service-proxy-name` unless it equals
//! `--service-proxy-name`, no headless ones) and this node's Node; nothing is synced before
//! Services and EndpointSlices have been listed, and nothing is removed because the API
//! server is unreachable (a re-list removes what was deleted meanwhile). `/healthz` turns
//! 503 once the last successful sync is older than `--healthz-stale-after` (default: twice
//! `--sync-period`), and says why.
//!
//! The directory's `*.yaml`, `*.yml` and `*.json` files are polled every 200 ms; a file
//! added, edited or removed is applied within a second (changes within `--min-sync-period`
//! of the last sync are batched into one). An invalid object is reported on stderr with
//! file, line and field, and its last good version stays in force (per object). Everything is rewritten every
//! `--sync-period` to repair drift. `ready` is printed on stdout after the first successful
//! sync. SIGTERM or SIGINT stops the proxy and leaves its rules in place, as kube-proxy
//! does (the userspace datapath, which forwards in the process, hands forwarding back to
//! the kernel); a second SIGTERM or SIGINT exits at once, the userspace datapath's
//! forwarding handed back first. SIGHUP reloads (the source re-read, every rule
//! rewritten). The handlers are in place before the backend changes anything.
//! `--cleanup` removes the rules (with both iptables flavours unless one is named; for
//! the userspace datapath it also restores the `net.ipv4.ip_forward` it recorded).
//!
//! NodePorts are served on the `--node-ip` addresses (those inside `--nodeport-addresses`
//! when given): without `--node-ip` no NodePort is served.
//!
//! `/metrics` and `/healthz` are served on `--metrics-bind-address` (loopback by default);
//! `/healthz` and `/livez` alone on `--healthz-bind-address` (`0.0.0.0:10256`, kube-proxy's
//! health port), each server with its own connection budget.
//!
//! Exit codes: 0 after a signal or a successful `--cleanup`, 1 when the proxy cannot start
//! (manifest directory, kubeconfig, dataplane, metrics or health address), 2 for invalid flags
//! (also: neither `--manifests` nor `--kubeconfig` outside a cluster).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use svcnat_core::dualstack::DualStack;
use svcnat_core::model::IpFamily;
use svcnat_core::plan::Dataplane;
use svcnat_examples::api::{self, ApiConfig, ApiSource};
use svcnat_examples::cli::{self, ApiArgs, ClusterArgs, Input, NodeArgs};
use svcnat_examples::proxy::{
    self, AddressReader, Metrics, Proxy, ProxyConfig, Routes, Source, SyncConfig,
};
use svcnat_examples::svchealth::ServiceHealth;
use svcnat_iptables::driver::{Flavour, Iptables, IptablesConfig, Runner};
use svcnat_iptables::nftables::driver::{Nftables, NftablesConfig};
use svcnat_ipvs::driver::{Ipvs, IpvsConfig, Scheduler};
use svcnat_userspace::{Userspace, UserspaceConfig};
use tracing::{error, info, warn};

/// Which dataplane programs the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// iptables rules in kube-proxy's layout, applied with iptables-restore.
    Iptables,
    /// nftables in kube-proxy's nftables layout (tables `ip svcnat`, `ip6 svcnat`: verdict
    /// maps, partial syncs touching only changed chains and map elements), applied with nft.
    Nftables,
    /// IPVS virtual servers over generic netlink, VIPs on kube-ipvs0, masquerade by iptables.
    Ipvs,
    /// The userspace AF_PACKET datapath: NAT, connection tracking and forwarding in this
    /// process, on the interfaces named by --interfaces.
    Userspace,
}

/// Which iptables implementation to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FlavourArg {
    /// Whatever `iptables --version` reports.
    Auto,
    /// iptables-legacy.
    Legacy,
    /// iptables-nft.
    Nft,
}

/// The node proxy: programs Kubernetes Service load balancing from an API server or a
/// manifest directory.
#[derive(Debug, Parser)]
#[command(
    name = "svcnat-proxy",
    version,
    about = "The svcnat node proxy: Kubernetes Service load balancing from an API server or a manifest directory"
)]
struct Args {
    /// The dataplane.
    #[arg(long, value_enum, default_value_t = Backend::Iptables)]
    backend: Backend,
    /// Directory of manifests (*.yaml, *.yml, *.json), watched for changes, instead of an
    /// API server.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    #[command(flatten)]
    api: ApiArgs,
    /// This node's name, which decides which endpoints are local [default: the hostname].
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    #[command(flatten)]
    node: NodeArgs,
    /// The iptables implementation.
    #[arg(long, value_enum, value_name = "FLAVOUR", default_value_t = FlavourArg::Auto)]
    iptables_flavour: FlavourArg,
    /// How many of its chains one sync may keep (flushed) because a rule svcnat does not
    /// own still jumps to them, before the sync fails; 0 fails on the first.
    #[arg(long, value_name = "N", default_value_t = svcnat_iptables::driver::DEFAULT_MAX_KEPT_CHAINS)]
    iptables_max_kept_chains: usize,
    /// The IPVS scheduler with --backend ipvs: rr, wrr, lc, sh or mh (with rr, services
    /// whose endpoint weights differ get wrr).
    #[arg(long, value_name = "NAME", default_value = "rr")]
    ipvs_scheduler: Scheduler,
    /// Userspace backend: the interfaces it owns (names, or prefixes ending in `*`).
    #[arg(
        long,
        value_name = "IF,..",
        value_delimiter = ',',
        default_value = "eth0"
    )]
    interfaces: Vec<String>,
    /// Userspace backend: worker threads (0: one per CPU).
    #[arg(long, value_name = "N", default_value_t = 0)]
    workers: usize,
    /// Userspace backend: route the node's own traffic to ClusterIPs (kubelet probes,
    /// hostNetwork pods) through the datapath, over a veth pair `svcnat-host`/`svcnat-eng`
    /// and a host route per ClusterIP, and take its connections to NodePorts on its own
    /// addresses on `lo`. 127.0.0.1 NodePorts, externalIPs and load balancer IPs from the
    /// node itself stay unserved. On by default, as kube-proxy always serves the node's
    /// own traffic; `=false` leaves it to the kernel.
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    userspace_node_traffic: bool,
    /// How long an idle userspace worker keeps polling its ring before it sleeps (e.g.
    /// `50us`; at most 1ms). Lowers the latency it adds to each packet at light load
    /// (waking a sleeping thread is the largest part) for the CPU it spins; 0 never spins.
    #[arg(long, value_name = "DUR", default_value = "0", value_parser = parse_busy_poll)]
    userspace_busy_poll: Duration,
    /// Changes within this period after a sync are batched into the next sync.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = proxy::parse_duration)]
    min_sync_period: Duration,
    /// Everything is rewritten this often, to repair drift.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = proxy::parse_duration)]
    sync_period: Duration,
    /// /healthz answers 503 once the last successful sync is older than this [default:
    /// twice --sync-period]; it must exceed --sync-period.
    #[arg(long, value_name = "DUR", value_parser = proxy::parse_duration)]
    healthz_stale_after: Option<Duration>,
    /// Where /metrics and /healthz are served; empty disables the server.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:10249", value_parser = parse_bind)]
    metrics_bind_address: Bind,
    /// Where /healthz and /livez alone are served (kube-proxy's health port, which load
    /// balancers probe on every node), with a connection budget of its own; empty
    /// disables it.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:10256", value_parser = parse_bind)]
    healthz_bind_address: Bind,
    /// Remove everything this backend installed (iptables: with both flavours unless
    /// --iptables-flavour names one), and exit.
    #[arg(long)]
    cleanup: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// More logs on stderr: -v for info, -vv for debug (default: warnings and errors).
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
}

/// A listening address, or none (the flag given as empty).
#[derive(Clone, Copy, Debug)]
struct Bind(Option<SocketAddr>);

/// `ADDR:PORT`, or empty for none.
/// A busy-poll period: a duration of at most 1 ms (a longer spin only burns CPU; a worker
/// that sleeps wakes within tens of microseconds).
fn parse_busy_poll(s: &str) -> Result<Duration, String> {
    let d = proxy::parse_duration(s)?;
    if d > Duration::from_millis(1) {
        return Err(format!("{s:?}: at most 1ms"));
    }
    Ok(d)
}

fn parse_bind(s: &str) -> Result<Bind, String> {
    if s.trim().is_empty() {
        return Ok(Bind(None));
    }
    s.parse()
        .map(|a| Bind(Some(a)))
        .map_err(|e| format!("{s:?} is not ADDR:PORT: {e}"))
}

/// The kernel's hostname, lower-cased as kube-proxy does.
fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())?;
    let name = name.trim().to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

/// `--cleanup --backend userspace`: removes the ingress table a killed datapath left.
fn cleanup_userspace() -> ExitCode {
    match svcnat_userspace::driver::cleanup(None) {
        Ok(()) => {
            info!("removed the userspace datapath's nftables table");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("cleanup failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// At start, as kube-proxy does: rules a previous proxy left in KUBE-* chains of the other
/// iptables flavour would still capture Service traffic next to ours (both flavours'
/// hooks run), so they are removed, with a log line. A missing other flavour is fine.
fn clean_other_flavour(used: Flavour) {
    use svcnat_iptables::render::Table;
    let other = match used {
        Flavour::Legacy => Flavour::Nft,
        Flavour::Nft => Flavour::Legacy,
    };
    for family in [IpFamily::V4, IpFamily::V6] {
        let Ok(mut d) = Iptables::new(IptablesConfig {
            runner: Runner::local(),
            flavour: Some(other),
            family,
            ..IptablesConfig::default()
        }) else {
            continue;
        };
        let stale = [Table::Nat, Table::Filter].into_iter().any(|t| {
            d.save(t)
                .is_ok_and(|text| text.lines().any(|l| l.starts_with(":KUBE-")))
        });
        if !stale {
            continue;
        }
        match d.cleanup() {
            Ok(()) => warn!(
                flavour = ?other,
                ?family,
                "removed stale KUBE-* rules and chains of the other iptables flavour (a previous proxy's)"
            ),
            Err(e) => warn!(
                flavour = ?other,
                ?family,
                "cannot remove the other iptables flavour's KUBE-* rules: {e}"
            ),
        }
    }
}

/// The nftables dataplane of both families (`ip svcnat`, `ip6 svcnat`).
fn nftables_dual() -> DualStack<Nftables> {
    let one = |family| Nftables::new(NftablesConfig::new(None, family));
    DualStack::new(one(IpFamily::V4), one(IpFamily::V6))
}

/// Switching modes, as kube-proxy does at start: the other dialect's leftovers (svcnat's
/// nftables tables under iptables, KUBE-* chains of either iptables flavour under
/// nftables) would capture Service traffic next to ours, so they go, with a log line.
fn clean_other_dialect(backend: Backend) {
    match backend {
        Backend::Nftables => {
            clean_other_flavour(Flavour::Legacy);
            clean_other_flavour(Flavour::Nft);
        }
        _ => {
            for family in [IpFamily::V4, IpFamily::V6] {
                let mut d = Nftables::new(NftablesConfig::new(None, family));
                if d.present().unwrap_or(false) {
                    match d.cleanup() {
                        Ok(()) => warn!(
                            ?family,
                            "removed svcnat's nftables table (a previous proxy's)"
                        ),
                        Err(e) => warn!(?family, "cannot remove svcnat's nftables table: {e}"),
                    }
                }
            }
        }
    }
}

/// The iptables dataplane of every family the node's iptables can program: iptables, and
/// ip6tables when it works (as kube-proxy, which runs dual-stack whenever both families'
/// iptables are usable). IPv6 missing is a warning, not an error.
fn iptables_dual(
    flavour: Option<Flavour>,
    max_kept_chains: usize,
) -> Result<DualStack<Iptables>, String> {
    use svcnat_iptables::render::Table;
    let one = |flavour, family| {
        Iptables::new(IptablesConfig {
            runner: Runner::local(),
            flavour,
            family,
            max_kept_chains,
            ..IptablesConfig::default()
        })
    };
    let v4 = one(flavour, IpFamily::V4).map_err(|e| e.to_string())?;
    let v6 = one(Some(v4.flavour()), IpFamily::V6).and_then(|d| d.save(Table::Nat).map(|_| d));
    Ok(match v6 {
        Ok(v6) => DualStack::new(v4, v6),
        Err(e) => {
            warn!("IPv6 is not programmed: ip6tables does not work here ({e})");
            DualStack::single(IpFamily::V4, v4)
        }
    })
}

/// `--cleanup`: removes what svcnat installed with the given flavour or, when none is
/// given, with the detected one and then with the other one too (rules written through
/// the other flavour would otherwise stay behind; failing to reach it is only a warning).
fn cleanup(flavour: Option<Flavour>) -> ExitCode {
    let iptables = |f: Option<Flavour>, family| {
        Iptables::new(IptablesConfig {
            runner: Runner::local(),
            flavour: f,
            family,
            ..IptablesConfig::default()
        })
    };
    let mut main = match iptables(flavour, IpFamily::V4) {
        Ok(d) => d,
        Err(e) => {
            error!("cannot use iptables: {e}");
            return ExitCode::from(1);
        }
    };
    let used = main.flavour();
    if let Err(e) = main.cleanup() {
        error!(flavour = ?used, "cleanup failed: {e}");
        return ExitCode::from(1);
    }
    info!(flavour = ?used, "removed every rule and chain svcnat installed (IPv4)");
    let mut rest = vec![(used, IpFamily::V6)];
    if flavour.is_none() {
        let other = match used {
            Flavour::Legacy => Flavour::Nft,
            Flavour::Nft => Flavour::Legacy,
        };
        rest.extend([(other, IpFamily::V4), (other, IpFamily::V6)]);
    }
    // The other family and flavour: failing to reach them (no ip6tables, no other
    // flavour) is only a warning.
    for (f, family) in rest {
        match iptables(Some(f), family).and_then(|mut d| d.cleanup()) {
            Ok(()) => info!(flavour = ?f, ?family, "removed every rule and chain svcnat installed"),
            Err(e) => warn!(flavour = ?f, ?family, "cleanup failed: {e}"),
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = Args::parse();
    svcnat_examples::cli::init_logging(args.verbose);
    if args.sync_period.is_zero() {
        eprintln!("svcnat-proxy: --sync-period must be above zero");
        return ExitCode::from(2);
    }
    let stale_after = args.healthz_stale_after.unwrap_or(args.sync_period * 2);
    if stale_after <= args.sync_period {
        // The periodic resync is what refreshes /healthz when nothing changes.
        eprintln!(
            "svcnat-proxy: --healthz-stale-after ({stale_after:?}) must exceed --sync-period ({:?})",
            args.sync_period
        );
        return ExitCode::from(2);
    }
    let input = if args.cleanup {
        None
    } else {
        match svcnat_examples::cli::input(
            args.manifests.as_deref(),
            &args.api,
            api::in_cluster_available(),
        ) {
            Ok(i) => Some(i),
            Err(e) => {
                eprintln!("svcnat-proxy: {e}");
                return ExitCode::from(2);
            }
        }
    };
    // Signals are taken before any backend changes the node, so that no signal kills the
    // proxy between a change and the code that undoes it. The first SIGTERM or SIGINT
    // asks the loop to stop; a second one exits at once, after handing forwarding back to
    // the kernel if the userspace datapath had taken it. SIGHUP reloads.
    let signals = if args.cleanup {
        None
    } else {
        let userspace = args.backend == Backend::Userspace;
        let stop = svcnat_examples::cli::stop_on_signals_or(move || {
            if userspace {
                match svcnat_userspace::driver::cleanup(None) {
                    Ok(()) => warn!("second signal: forwarding handed back to the kernel"),
                    Err(e) => error!("second signal: cannot hand forwarding back: {e}"),
                }
            }
        });
        let hup = svcnat_examples::cli::reload_on_sighup();
        match (stop, hup) {
            (Ok(stop), Ok(hup)) => Some(Signals { stop, hup }),
            (Err(e), _) | (_, Err(e)) => {
                error!("cannot handle SIGTERM/SIGINT/SIGHUP: {e}");
                return ExitCode::from(1);
            }
        }
    };
    let metrics = || Arc::new(Metrics::with_stale_after(stale_after));
    let flavour = match args.iptables_flavour {
        FlavourArg::Auto => None,
        FlavourArg::Legacy => Some(Flavour::Legacy),
        FlavourArg::Nft => Some(Flavour::Nft),
    };
    let ipvs = || {
        Ipvs::new(IpvsConfig {
            scheduler: args.ipvs_scheduler,
            iptables: flavour,
            ..IpvsConfig::default()
        })
    };
    match (args.backend, args.cleanup) {
        (Backend::Iptables, true) => cleanup(flavour),
        (Backend::Nftables, true) => {
            let mut code = ExitCode::SUCCESS;
            for family in [IpFamily::V4, IpFamily::V6] {
                match Nftables::new(NftablesConfig::new(None, family)).cleanup() {
                    Ok(()) => info!(?family, "removed svcnat's nftables table"),
                    Err(e) => {
                        error!(?family, "nftables cleanup failed: {e}");
                        code = ExitCode::from(1);
                    }
                }
            }
            code
        }
        (Backend::Nftables, false) => {
            info!("nftables backend (tables ip svcnat, ip6 svcnat)");
            clean_other_dialect(Backend::Nftables);
            run(
                args,
                input,
                signals,
                nftables_dual(),
                metrics(),
                Localhost::Iptables,
            )
        }
        (Backend::Userspace, true) => cleanup_userspace(),
        (Backend::Ipvs, true) => match ipvs().and_then(|mut d| d.cleanup()) {
            Ok(()) => {
                info!("removed every IPVS service, kube-ipvs0 and the chains svcnat installed");
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!("ipvs cleanup failed: {e}");
                ExitCode::from(1)
            }
        },
        (Backend::Ipvs, false) => match ipvs() {
            Ok(d) => {
                info!(family_id = d.family_id(), scheduler = %args.ipvs_scheduler, "IPVS backend");
                run(
                    args,
                    input,
                    signals,
                    d,
                    metrics(),
                    Localhost::Unsupported("IPVS"),
                )
            }
            Err(e) => {
                error!("cannot use IPVS: {e}");
                ExitCode::from(1)
            }
        },
        (Backend::Iptables, false) => {
            let dataplane = match iptables_dual(flavour, args.iptables_max_kept_chains) {
                Ok(d) => d,
                Err(e) => {
                    error!("cannot use iptables: {e}");
                    return ExitCode::from(1);
                }
            };
            let Some(used) = dataplane.member(IpFamily::V4).map(Iptables::flavour) else {
                error!("cannot use iptables: no IPv4 dataplane");
                return ExitCode::from(1);
            };
            info!(flavour = ?used, families = ?dataplane.families(), "iptables backend");
            clean_other_flavour(used);
            clean_other_dialect(Backend::Iptables);
            run(
                args,
                input,
                signals,
                dataplane,
                metrics(),
                Localhost::Iptables,
            )
        }
        (Backend::Userspace, false) => {
            let dataplane = match Userspace::start(UserspaceConfig {
                interfaces: args.interfaces.clone(),
                workers: args.workers,
                node_traffic: args.userspace_node_traffic,
                busy_poll: args.userspace_busy_poll,
                ..UserspaceConfig::default()
            }) {
                Ok(d) => d,
                Err(e) => {
                    error!("cannot start the userspace datapath: {e}");
                    return ExitCode::from(1);
                }
            };
            info!(interfaces = ?args.interfaces, "userspace backend");

            let metrics = metrics();
            let stats = dataplane.stats_source();
            metrics.set_dataplane(Box::new(move || stats().prometheus()));
            // Dropping the datapath on exit hands forwarding back to the kernel: without
            // its workers the ingress drops would black-hole the node.
            run(
                args,
                input,
                signals,
                dataplane,
                metrics,
                Localhost::Unsupported(
                    "the userspace datapath (the node's local routing table delivers 127.0.0.1 to the node itself, never to a device the datapath owns)",
                ),
            )
        }
    }
}

/// The flags the signal handlers set.
struct Signals {
    /// SIGTERM or SIGINT: stop.
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// SIGHUP: reload.
    hup: Arc<std::sync::atomic::AtomicBool>,
}

/// Whether a backend can serve NodePorts on 127.0.0.1.
enum Localhost {
    /// Yes, with `route_localnet` (iptables and nftables).
    Iptables,
    /// No: the backend named cannot.
    Unsupported(&'static str),
}

/// `--localhost-nodeports`: kube-proxy's iptables mode sets `route_localnet` so that the
/// kernel routes packets from 127.0.0.1 DNATed to a pod (and masqueraded on the way out).
fn enable_route_localnet() -> std::io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/conf/all/route_localnet", "1")
}

/// Runs the proxy loop over `dataplane` until a signal.
fn run<D: Dataplane>(
    mut args: Args,
    input: Option<Input>,
    signals: Option<Signals>,
    dataplane: D,
    metrics: Arc<Metrics>,
    localhost: Localhost,
) -> ExitCode {
    if args.node.localhost_nodeports {
        match localhost {
            Localhost::Iptables => match enable_route_localnet() {
                Ok(()) => info!("NodePorts on 127.0.0.1 (net.ipv4.conf.all.route_localnet=1)"),
                Err(e) => {
                    warn!(
                        "cannot set route_localnet, so NodePorts are not served on 127.0.0.1: {e}"
                    );
                    args.node.localhost_nodeports = false;
                }
            },
            Localhost::Unsupported(backend) => {
                info!("NodePorts are not served on 127.0.0.1 with {backend}");
                args.node.localhost_nodeports = false;
            }
        }
    }
    let Some(input) = input else {
        eprintln!("svcnat-proxy: give --manifests DIR or --kubeconfig FILE");
        return ExitCode::from(2);
    };
    let Some(node_name) = args.node_name.clone().or_else(hostname) else {
        eprintln!("svcnat-proxy: cannot tell the hostname; give --node-name");
        return ExitCode::from(2);
    };
    if args.node.node_ips.is_empty() {
        warn!("no --node-ip given: NodePort services are served on no address");
    }
    let node = args.node.context(node_name.clone());
    let config = ProxyConfig {
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        ..ProxyConfig::new(PathBuf::new(), args.cluster.config(), node)
    };
    info!(
        node = %config.node.node_name,
        node_ips = ?config.node.node_ips,
        input = ?input,
        "starting"
    );

    let Some(signals) = signals else {
        return ExitCode::from(2);
    };

    for (bind, routes, flag) in [
        (
            args.metrics_bind_address,
            Routes::Metrics,
            "--metrics-bind-address",
        ),
        (
            args.healthz_bind_address,
            Routes::Health,
            "--healthz-bind-address",
        ),
    ] {
        let Bind(Some(addr)) = bind else { continue };
        match proxy::serve_routes(addr, metrics.clone(), routes) {
            Ok(bound) => info!(address = %bound, ?routes, "serving"),
            Err(e) => {
                error!("cannot serve {flag} {addr}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    // kube-proxy's service health server: the healthCheckNodePort of every
    // externalTrafficPolicy: Local Service, on the --nodeport-addresses when given, else on
    // every address.
    let health_addresses = if config.node.nodeport_addresses.is_empty() {
        Vec::new()
    } else {
        config.node.nodeport_ips().collect()
    };
    let service_health = match ServiceHealth::new(health_addresses, metrics.clone()) {
        Ok(h) => h,
        Err(e) => {
            error!("cannot start the service health server: {e}");
            return ExitCode::from(1);
        }
    };
    match input {
        Input::Manifests(dir) => {
            if args.api.service_proxy_name.is_some() {
                warn!("--service-proxy-name applies to an API server only; ignored");
            }
            let config = ProxyConfig {
                manifests: dir,
                ..config
            };
            let shown = config.manifests.display().to_string();
            match Proxy::new(config, dataplane, metrics) {
                Ok(mut p) => {
                    p.serve_service_health(service_health);
                    p.follow_local_addresses(AddressReader(Box::new(cli::local_addresses)));
                    drive(&mut p, &signals)
                }
                Err(e) => {
                    error!("cannot read the manifest directory {shown}: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Input::Api(client) => {
            let ignored = args.cluster.changed();
            if !ignored.is_empty() {
                // The API server allocates addresses and ports; these describe how a
                // manifest directory is turned into a cluster.
                warn!(
                    "{} apply to a manifest directory only; ignored with an API server",
                    ignored.join(", ")
                );
            }
            let source = match ApiSource::start(ApiConfig {
                role: svcnat_examples::api::ApiRole::Proxy,
                client,
                node_name,
                service_proxy_name: args.api.service_proxy_name.clone(),
            }) {
                Ok(s) => s,
                Err(e) => {
                    error!("cannot follow the API server: {e}");
                    return ExitCode::from(1);
                }
            };
            let sync = SyncConfig {
                poll_interval: svcnat_examples::api::API_POLL_INTERVAL,
                ..config.sync_config()
            };
            let mut p = Proxy::with_source(source, sync, dataplane, metrics);
            p.serve_service_health(service_health);
            p.follow_local_addresses(AddressReader(Box::new(cli::local_addresses)));
            drive(&mut p, &signals)
        }
    }
}

/// Runs the loop until a signal, printing `ready` after the first successful sync.
fn drive<D: Dataplane, S: Source>(proxy: &mut Proxy<D, S>, signals: &Signals) -> ExitCode {
    // SIGHUP reloads (a daemon must not die of it).
    proxy.reload_on(signals.hup.clone());
    proxy.run(&signals.stop, || {
        let mut out = std::io::stdout().lock();
        // Nobody reading stdout is no reason to stop proxying.
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    });
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn parses_kube_proxy_style_flags() {
        let a = Args::try_parse_from([
            "svcnat-proxy",
            "--manifests",
            "/m",
            "--node-ip",
            "192.168.50.11",
            "--node-ip",
            "fd00::11",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/56",
            "--min-sync-period",
            "250ms",
            "--metrics-bind-address",
            "",
            "-vv",
        ])
        .map_err(|e| e.to_string());
        let Ok(a) = a else {
            return assert!(a.is_ok(), "{a:?}");
        };
        assert_eq!(a.node.node_ips.len(), 2);
        assert_eq!(a.node.cluster_cidrs.len(), 2);
        assert_eq!(a.min_sync_period, Duration::from_millis(250));
        assert_eq!(a.sync_period, Duration::from_secs(30));
        assert!(a.metrics_bind_address.0.is_none());
        assert_eq!(a.verbose, 2);
        assert_eq!(a.iptables_flavour, FlavourArg::Auto);
        let d =
            Args::try_parse_from(["svcnat-proxy", "--manifests", "/m"]).map_err(|e| e.to_string());
        assert!(
            matches!(&d, Ok(d) if d.metrics_bind_address.0 == "127.0.0.1:10249".parse().ok()),
            "{d:?}"
        );
        assert!(Args::try_parse_from(["svcnat-proxy", "--cleanup"]).is_ok());
        let busy = |v: &str| {
            Args::try_parse_from(["svcnat-proxy", "--userspace-busy-poll", v])
                .map(|a| a.userspace_busy_poll)
                .map_err(|e| e.to_string())
        };
        assert_eq!(busy("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(busy("0"), Ok(Duration::ZERO));
        assert!(matches!(busy("2ms"), Err(e) if e.contains("at most 1ms")));
        // Neither --manifests nor --kubeconfig: decided at run time (in-cluster or not).
        assert!(Args::try_parse_from(["svcnat-proxy"]).is_ok());
        let k = Args::try_parse_from([
            "svcnat-proxy",
            "--kubeconfig",
            "/k",
            "--service-proxy-name",
            "svcnat",
            "--healthz-stale-after",
            "2m",
        ])
        .map_err(|e| e.to_string());
        assert!(
            matches!(&k, Ok(k) if k.api.kubeconfig.is_some()
                && k.api.service_proxy_name.as_deref() == Some("svcnat")
                && k.healthz_stale_after == Some(Duration::from_secs(120))),
            "{k:?}"
        );
        assert!(Args::try_parse_from(["svcnat-proxy", "--service-proxy-name", "a b"]).is_err());
    }
}
