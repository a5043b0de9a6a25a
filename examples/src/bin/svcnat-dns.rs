//! `svcnat-dns`: the cluster DNS server (what CoreDNS's `kubernetes` plugin does), serving
//! `svcnat_core::discovery` on UDP and TCP from a directory of manifests or an API server.
//!
//! ```text
//! svcnat-dns (--manifests DIR | --kubeconfig FILE | in-cluster) [--listen ADDR:PORT]... [--cluster-domain cluster.local]
//!            [--default-namespace default] [--service-cidr 10.96.0.0/12]
//!            [--pod-cidr 10.244.0.0/16] [--ttl 5] [--udp-workers N] [-v|-vv]
//!            [--upstream ADDR[:PORT]|RESOLV_CONF]... [--upstream-timeout 2s]
//!            [--upstream-max-in-flight 256] [--allow-recursion CIDR]...
//!            [--rrl-responses-per-second 100] [--rrl-burst N] [--rrl-slip 2]
//!            [--rrl-exempt CIDR]...
//! ```
//!
//! The manifests are read exactly as `svcnat-proxy` reads them (the same
//! [`ManifestDir`]): every `*.yaml`/`*.yml`/`*.json` file in name order, polled every 250 ms,
//! an invalid object reported on stderr with file, line and field while its last good
//! version stays in force. Give both programs the same directory, `--default-namespace`,
//! `--service-cidr` and `--pod-cidr`, and they allocate the same cluster IPs (explicit
//! `clusterIP`s make it certain).
//!
//! With `--kubeconfig FILE` (or, with neither flag, the in-cluster service account when
//! `KUBERNETES_SERVICE_HOST`/`PORT` and the token are there) it follows the API server as
//! CoreDNS does: every Service (headless and ExternalName included, whatever proxy serves
//! them), every EndpointSlice (hostnames of headless endpoints), and every Pod unless
//! `--no-pod-records`; it waits up to 5 s for the first lists before serving, and swaps
//! the zone as watch events arrive. An unreachable API server leaves the last zone in
//! force; the watchers retry with backoff and re-list after `410 Gone`.
//!
//! Each `--listen` address (default `0.0.0.0:53`, repeatable) gets a UDP socket served by
//! `--udp-workers` threads (default: one per CPU, at most 4) and a TCP listener (a thread per
//! connection, at most 256, closed after 10 s idle). A socket bound to `0.0.0.0` replies
//! from the address the route to the client picks, which on a host with several addresses
//! is not always the one the query went to: there, listen on each address. `ready` is
//! printed on stdout once every socket is bound. SIGTERM or SIGINT stops the server with
//! status 0 (a second signal exits at once). Logs go to stderr: warnings by default, `-v`
//! info, `-vv` debug (one line per query).
//!
//! Forwarding (CoreDNS's `forward . /etc/resolv.conf`) is off unless `--upstream` names a
//! server (`192.0.2.53`, `192.0.2.53:5353`, `[2001:db8::53]:53`) or a `resolv.conf` to read
//! the `nameserver`s from (`--upstream /etc/resolv.conf`); it is not on by default because
//! the host's resolv.conf often names a stub that is unreachable from where svcnat-dns runs
//! (systemd-resolved's 127.0.0.53 seen from another network namespace) or svcnat-dns
//! itself (a forwarding loop). With upstreams, names outside the cluster domain, reverse
//! names the cluster does not have, and the targets of ExternalName Services outside the
//! cluster are forwarded for clients inside `--allow-recursion` (repeatable; default: the
//! `--pod-cidr` and `--service-cidr` ranges), who also see RA. Everyone else keeps getting
//! REFUSED for them: not an open resolver. No answer within `--upstream-timeout`: SERVFAIL.
//!
//! Every UDP response is charged to the client's network (/24, /56) against a token bucket
//! of `--rrl-responses-per-second` (0: no limit) with a burst of `--rrl-burst` (default: one
//! second's worth); over it, responses are dropped except every `--rrl-slip`-th, sent
//! truncated so that real clients retry over TCP (BIND's RRL). TCP is not limited (its
//! clients cannot spoof their address). A Kubernetes node's pods usually share one /24:
//! raise the rate, or `--rrl-exempt` the pod CIDR, on busy nodes.
//!
//! Exit codes: 0 after a signal, 1 when the server cannot start (manifest directory,
//! listen address), 2 for invalid flags.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::{ArgAction, Parser};
use ipnet::IpNet;
use svcnat_core::discovery::{DEFAULT_CLUSTER_DOMAIN, DEFAULT_TTL, DiscoveryConfig, Resolver};
use svcnat_examples::api::{ApiConfig, ApiRole, ApiSource, in_cluster_available};
use svcnat_examples::cli::ClusterArgs;
use svcnat_examples::cli::{ApiArgs, Input, input};
use svcnat_examples::dns::forward::{self, ForwardConfig, Forwarder};
use svcnat_examples::dns::rrl::{self, RrlConfig};
use svcnat_examples::dns::{Server, wake_tcp};
use svcnat_examples::proxy::{self, ManifestDir, Source};
use tracing::{error, info, warn};

/// How often the manifest directory is looked at.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long to wait for the API server's first lists before serving (CoreDNS waits 5 s).
const API_WAIT: Duration = Duration::from_secs(5);

/// The cluster DNS server: Service and Pod names from a manifest directory.
#[derive(Debug, Parser)]
#[command(
    name = "svcnat-dns",
    version,
    about = "The svcnat cluster DNS server: Service and Pod names from a manifest directory or an API server"
)]
struct Args {
    /// Directory of manifests (*.yaml, *.yml, *.json), watched for changes.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Follow the API server of this kubeconfig file (its current context) instead of a
    /// manifest directory: every Service and EndpointSlice, and Pods unless
    /// --no-pod-records. Without --kubeconfig and --manifests, the in-cluster configuration
    /// (service account) is used when there is one.
    #[arg(long, value_name = "FILE", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Where to serve UDP and TCP (repeatable).
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:53")]
    listen: Vec<SocketAddr>,
    /// The cluster domain (kubelet's --cluster-domain).
    #[arg(long, value_name = "DOMAIN", default_value = DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// TTL of every record, and of negative answers.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_TTL)]
    ttl: u32,
    /// Do not answer `<a-b-c-d>.<ns>.pod.<domain>` names.
    #[arg(long)]
    no_pod_records: bool,
    /// Threads per UDP socket [default: one per CPU, at most 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    udp_workers: Option<u16>,
    /// Forward names outside the cluster to this server (an address, with a port or 53),
    /// or to the nameservers of this resolv.conf file (repeatable) [default: forwarding
    /// off].
    #[arg(long, value_name = "ADDR[:PORT]|FILE")]
    upstream: Vec<String>,
    /// How long a forwarded query may wait for the upstreams before SERVFAIL.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = proxy::parse_duration)]
    upstream_timeout: Duration,
    /// How many forwarded queries may wait at once; more are REFUSED.
    #[arg(long, value_name = "N", default_value = "256",
          value_parser = clap::value_parser!(u16).range(1..))]
    upstream_max_in_flight: u16,
    /// Clients that get forwarding (repeatable, or comma-separated) [default: the pod and
    /// service CIDRs].
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    allow_recursion: Vec<IpNet>,
    /// UDP responses per second each client network (/24, /56) gets; 0 turns the limit
    /// off.
    #[arg(long, value_name = "N", default_value_t = rrl::DEFAULT_RESPONSES_PER_SECOND)]
    rrl_responses_per_second: u32,
    /// Responses a quiet client network may get at once [default: one second's worth].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rrl_burst: Option<u32>,
    /// Send every N-th response over the limit truncated (TC) instead of dropping it, so
    /// that real clients retry over TCP; 0 drops them all.
    #[arg(long, value_name = "N", default_value_t = rrl::DEFAULT_SLIP)]
    rrl_slip: u32,
    /// Clients the rate limit never applies to (repeatable, or comma-separated).
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    rrl_exempt: Vec<IpNet>,
    /// More logs on stderr: -v for info, -vv for debug, one line per query (default:
    /// warnings and errors).
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let args = Args::parse();
    svcnat_examples::cli::init_logging(args.verbose);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    // The first SIGTERM or SIGINT asks for a clean stop; a second one exits at once.
    let stop = svcnat_examples::cli::stop_on_signals()
        .map_err(|e| format!("cannot handle SIGTERM/SIGINT: {e}"))?;

    let cluster = args.cluster.config();
    let discovery = {
        let mut dc = DiscoveryConfig::default();
        dc.cluster_domain = args.cluster_domain;
        dc.ttl = args.ttl;
        dc.pod_records = !args.no_pod_records;
        dc
    };
    let api_args = ApiArgs {
        kubeconfig: args.kubeconfig.clone(),
        service_proxy_name: None,
    };
    let mut dir: Box<dyn Source> = match input(
        args.manifests.as_deref(),
        &api_args,
        in_cluster_available(),
    )? {
        Input::Manifests(path) => {
            Box::new(ManifestDir::open(&path, cluster).map_err(|e| {
                format!("cannot read the manifest directory {}: {e}", path.display())
            })?)
        }
        Input::Api(client) => {
            let mut source = ApiSource::start(ApiConfig {
                client,
                node_name: String::new(),
                service_proxy_name: None,
                role: ApiRole::Dns {
                    pods: !args.no_pod_records,
                },
            })
            .map_err(|e| e.to_string())?;
            // As CoreDNS's kubernetes plugin: wait for the first lists (at most
            // API_WAIT) before serving, so that cluster names do not start as NXDOMAIN.
            let deadline = Instant::now() + API_WAIT;
            while !source.is_ready() && Instant::now() < deadline {
                if let Err(e) = source.poll() {
                    return Err(format!("the API source stopped: {e}"));
                }
                thread::sleep(Duration::from_millis(20));
            }
            if !source.is_ready() {
                warn!(
                    "the API server has not listed Services and EndpointSlices within {API_WAIT:?}; serving what is known and reloading as it arrives"
                );
            }
            Box::new(source)
        }
    };
    let dir_name = dir.describe();
    let resolver = |dir: &dyn Source| {
        let r = Resolver::new(dir.cluster(), discovery.clone());
        info!(
            services = dir.cluster().services().count(),
            serial = r.serial(),
            source = %dir.describe(),
            "zone loaded"
        );
        r
    };
    let mut server = Server::new(resolver(dir.as_ref()));
    if let Some(forwarder) = forwarder(
        &args.upstream,
        args.upstream_timeout,
        usize::from(args.upstream_max_in_flight),
        &args.listen,
    )? {
        let allow = if args.allow_recursion.is_empty() {
            let mut allow = args.cluster.pod_cidrs.clone();
            allow.extend(args.cluster.service_cidrs.iter().copied());
            allow
        } else {
            args.allow_recursion.clone()
        };
        info!(
            upstreams = ?forwarder.config().upstreams,
            allow_recursion = ?allow,
            "forwarding names outside the cluster"
        );
        server = server.with_forwarder(forwarder, allow);
    }
    if args.rrl_responses_per_second > 0 {
        let rate = args.rrl_responses_per_second;
        let mut config = RrlConfig::new(rate, args.rrl_burst.unwrap_or(rate));
        config.slip = args.rrl_slip;
        config.exempt = args.rrl_exempt.clone();
        server = server.with_rate_limit(config);
    }
    let server = Arc::new(server);

    // Bind everything before serving anything, so a bad address fails the start.
    let mut sockets = Vec::new();
    for addr in &args.listen {
        let udp = UdpSocket::bind(addr).map_err(|e| format!("cannot bind udp {addr}: {e}"))?;
        let tcp = TcpListener::bind(addr).map_err(|e| format!("cannot bind tcp {addr}: {e}"))?;
        sockets.push((udp, tcp));
    }
    let workers_per_socket = args.udp_workers.map_or_else(
        || thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        usize::from,
    );
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let mut acceptors: Vec<JoinHandle<()>> = Vec::new();
    let mut tcp_addrs = Vec::new();
    for (udp, tcp) in sockets {
        let local = udp.local_addr().map_err(|e| e.to_string())?;
        for i in 0..workers_per_socket {
            let socket = udp.try_clone().map_err(|e| e.to_string())?;
            let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
            let handle = thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || {
                    if let Err(e) = server.serve_udp(&socket, &stop) {
                        error!("udp {local}: {e}");
                    }
                })
                .map_err(|e| e.to_string())?;
            workers.push(handle);
        }
        tcp_addrs.push(tcp.local_addr().map_err(|e| e.to_string())?);
        let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
        let handle = thread::Builder::new()
            .name("dns-tcp-accept".into())
            .spawn(move || {
                if let Err(e) = server.serve_tcp(&tcp, &stop) {
                    error!("tcp {local}: {e}");
                }
            })
            .map_err(|e| e.to_string())?;
        acceptors.push(handle);
        info!(address = %local, udp_workers = workers_per_socket, "serving DNS over UDP and TCP");
    }
    {
        let mut out = std::io::stdout().lock();
        // Nobody reading stdout is no reason to stop serving.
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }

    // SIGHUP reloads the zone from the source (a daemon must not die of it).
    let hup = svcnat_examples::cli::reload_on_sighup()
        .map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
    let mut dir_failing = false;
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(POLL_INTERVAL);
        let reload = hup.swap(false, Ordering::SeqCst);
        if reload {
            info!("reload asked (SIGHUP)");
        }
        match dir.poll() {
            Ok(changed) => {
                dir_failing = false;
                if changed || reload {
                    server.set_resolver(resolver(dir.as_ref()));
                }
            }
            Err(e) => {
                // Keep serving what we have; say so once.
                if !dir_failing {
                    warn!("cannot read {dir_name}: {e}; serving the last load");
                }
                dir_failing = true;
            }
        }
    }

    info!("stopping");
    for addr in tcp_addrs {
        wake_tcp(addr);
    }
    // UDP workers see the flag within 250 ms. An acceptor sees it once woken; one that
    // cannot be woken is left to the process exit rather than hang the shutdown.
    for w in workers {
        let _ = w.join();
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while acceptors.iter().any(|a| !a.is_finished()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The forwarder the `--upstream` flags ask for, if any.
fn forwarder(
    values: &[String],
    timeout: Duration,
    max_in_flight: usize,
    listen: &[SocketAddr],
) -> Result<Option<Forwarder>, String> {
    let mut upstreams = Vec::new();
    for value in values {
        for addr in forward::parse_upstream(value)? {
            // Forwarding to ourselves would loop until the timeout.
            if listen.contains(&addr) {
                return Err(format!(
                    "--upstream {value}: {addr} is one of our --listen addresses (a forwarding loop)"
                ));
            }
            if !upstreams.contains(&addr) {
                upstreams.push(addr);
            }
        }
    }
    if upstreams.is_empty() {
        return Ok(None);
    }
    let mut config = ForwardConfig::new(upstreams);
    config.timeout = timeout;
    config.max_in_flight = max_in_flight;
    Forwarder::new(config)
        .map(Some)
        .map_err(|e| format!("cannot start the forwarder: {e}"))
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
    fn defaults_and_repeated_listen() {
        let a = Args::try_parse_from(["svcnat-dns", "--manifests", "/m"]).unwrap();
        assert_eq!(a.listen, vec!["0.0.0.0:53".parse::<SocketAddr>().unwrap()]);
        assert_eq!(a.cluster_domain, "cluster.local");
        assert_eq!(
            a.cluster.service_cidrs,
            vec!["10.96.0.0/12".parse::<ipnet::IpNet>().unwrap()]
        );
        let a = Args::try_parse_from([
            "svcnat-dns",
            "--manifests=/m",
            "--listen",
            "10.96.0.10:53",
            "--listen",
            "[::1]:5353",
            "--service-cidr",
            "10.96.0.0/12,fd00:10:96::/108",
            "-vv",
        ])
        .unwrap();
        assert_eq!(a.listen.len(), 2);
        assert_eq!(a.cluster.service_cidrs.len(), 2);
        assert_eq!(a.verbose, 2);
        assert!(a.upstream.is_empty(), "forwarding is off by default");
        assert!(
            Args::try_parse_from(["svcnat-dns", "--manifests", "/m", "--kubeconfig", "/k"])
                .is_err(),
            "one input"
        );
        assert!(
            Args::try_parse_from(["svcnat-dns", "--manifests", "/m", "--udp-workers", "0"])
                .is_err()
        );
    }

    #[test]
    fn forwarding_and_rate_limit_flags() {
        let a = Args::try_parse_from(["svcnat-dns", "--manifests", "/m"]).unwrap();
        assert_eq!(a.upstream_timeout, Duration::from_secs(2));
        assert_eq!(a.rrl_responses_per_second, 100);
        assert_eq!((a.rrl_burst, a.rrl_slip), (None, 2));
        assert_eq!(
            usize::from(a.upstream_max_in_flight),
            forward::DEFAULT_MAX_IN_FLIGHT
        );
        assert!(a.allow_recursion.is_empty());
        let a = Args::try_parse_from([
            "svcnat-dns",
            "--manifests=/m",
            "--upstream",
            "192.0.2.53",
            "--upstream=[2001:db8::53]:5353",
            "--upstream-timeout",
            "500ms",
            "--allow-recursion",
            "10.244.0.0/16,fd00::/64",
            "--rrl-responses-per-second",
            "0",
        ])
        .unwrap();
        assert_eq!(a.upstream_timeout, Duration::from_millis(500));
        assert_eq!(a.allow_recursion.len(), 2);
        let f = forwarder(&a.upstream, a.upstream_timeout, 8, &a.listen)
            .unwrap()
            .unwrap();
        assert_eq!(
            f.config().upstreams,
            [
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:5353".parse().unwrap()
            ]
        );
        assert!(
            forwarder(&[], a.upstream_timeout, 8, &a.listen)
                .unwrap()
                .is_none()
        );
        let looped = forwarder(
            &["127.0.0.1".to_string()],
            a.upstream_timeout,
            8,
            &["127.0.0.1:53".parse().unwrap()],
        )
        .unwrap_err();
        assert!(looped.contains("forwarding loop"), "{looped}");
        assert!(
            Args::try_parse_from(["svcnat-dns", "--manifests", "/m", "--rrl-burst", "0"]).is_err()
        );
    }
}
