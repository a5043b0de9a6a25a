//! Command-line pieces the programs share, so that `svcnat-proxy`, `svcnat-dns` and
//! `svcnat-ctl` read one manifest directory the same way and allocate the same cluster IPs,
//! and pick a manifest directory or an API server the same way ([`ApiArgs`], [`input`]).

use ipnet::IpNet;
use svcnat_core::manifest::ClusterConfig;
use svcnat_core::plan::NodeContext;

/// How manifests become a cluster: the flags behind [`ClusterConfig`]. They are global: a
/// program with subcommands takes them before or after the subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct ClusterArgs {
    /// Namespace of objects that name none (and of views without -n or -A).
    #[arg(long, value_name = "NS", default_value = "default", global = true)]
    pub default_namespace: String,
    /// Range for cluster IPs that manifests leave unset (one per family).
    #[arg(
        long = "service-cidr",
        value_name = "CIDR",
        default_value = "10.96.0.0/12",
        value_delimiter = ',',
        global = true
    )]
    pub service_cidrs: Vec<IpNet>,
    /// Range for pod IPs of workloads and Nodes without podCIDR (one per family).
    #[arg(
        long = "pod-cidr",
        value_name = "CIDR",
        default_value = "10.244.0.0/16",
        value_delimiter = ',',
        global = true
    )]
    pub pod_cidrs: Vec<IpNet>,
    /// Ports reserved for NodePort Services, inclusive (kube-apiserver's flag; `MIN-MAX`).
    #[arg(
        long = "service-node-port-range",
        value_name = "MIN-MAX",
        default_value = "30000-32767",
        value_parser = parse_port_range,
        global = true
    )]
    pub node_port_range: (u16, u16),
}

impl ClusterArgs {
    /// The flags' defaults (as if none was given).
    pub fn defaults() -> ClusterArgs {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            cluster: ClusterArgs,
        }
        <Only as clap::Parser>::parse_from(["defaults"]).cluster
    }

    /// The flags that differ from their defaults, by name (`--service-cidr`, ...): a
    /// program for which they mean nothing says it ignores them.
    pub fn changed(&self) -> Vec<&'static str> {
        let d = ClusterArgs::defaults();
        let mut out = Vec::new();
        if self.default_namespace != d.default_namespace {
            out.push("--default-namespace");
        }
        if self.service_cidrs != d.service_cidrs {
            out.push("--service-cidr");
        }
        if self.pod_cidrs != d.pod_cidrs {
            out.push("--pod-cidr");
        }
        if self.node_port_range != d.node_port_range {
            out.push("--service-node-port-range");
        }
        out
    }

    /// The cluster configuration these flags describe.
    pub fn config(&self) -> ClusterConfig {
        {
            let mut cfg = ClusterConfig::default();
            cfg.default_namespace = self.default_namespace.clone();
            cfg.service_cidrs = self.service_cidrs.clone();
            cfg.pod_cidrs = self.pod_cidrs.clone();
            cfg.node_port_range = self.node_port_range;
            cfg
        }
    }
}

/// Reads a port range as kube-apiserver reads `--service-node-port-range` (Go's
/// `utilnet.ParsePortRange`, hyphen and single-port forms): `30000-32767`, or `30000` for
/// one port.
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let text = text.trim();
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let port = |s: &str| -> Result<u16, String> {
        match s.trim().parse::<u32>() {
            Ok(0) => Err(format!("port 0 is not a valid node port: {text}")),
            // ParsePortRange: "the port range cannot be greater than 65535".
            Ok(p) => u16::try_from(p)
                .map_err(|_| format!("the port range cannot be greater than 65535: {text}")),
            Err(_) => Err(format!(
                "{s:?} is not a port number (want MIN-MAX, e.g. 30000-32767)"
            )),
        }
    };
    let (low, high) = (port(low)?, port(high)?);
    // ParsePortRange: "end port cannot be less than start port".
    if high < low {
        return Err(format!("end port cannot be less than start port: {text}"));
    }
    Ok((low, high))
}

/// Logs to stderr, quiet by default: warnings and errors; `-v` info, `-vv` debug, `-vvv`
/// trace. kube-rs's client logs each failed request as an error; those are shown from
/// `-vv` on (the API source reports an outage once, and how long it lasted).
pub fn init_logging(verbose: u8) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let level = match verbose {
        0 => LevelFilter::WARN,
        1 => LevelFilter::INFO,
        2 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    let kube = if verbose >= 2 {
        level
    } else {
        LevelFilter::OFF
    };
    let filter = Targets::new()
        .with_default(level)
        .with_target("kube_client", kube);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry().with(fmt).with(filter).init();
}

/// A flag the first SIGTERM or SIGINT sets (a clean stop); a second signal exits at once.
pub fn stop_on_signals() -> std::io::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use signal_hook::consts::signal::{SIGINT, SIGTERM};
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, stop.clone())?;
        signal_hook::flag::register(signal, stop.clone())?;
    }
    Ok(stop)
}

/// A flag the first SIGTERM or SIGINT sets (a clean stop); a second signal runs
/// `on_second` (which must leave the node usable without the clean stop, such as giving
/// forwarding back to the kernel) on a signal thread, then exits with status 1.
pub fn stop_on_signals_or(
    on_second: impl Fn() + Send + 'static,
) -> std::io::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use signal_hook::consts::signal::{SIGINT, SIGTERM};
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    on_second();
                    std::process::exit(1);
                }
            }
        })?;
    Ok(stop)
}

/// A flag SIGHUP sets: a daemon reloads on it (re-reads its source and, for the proxy,
/// rewrites every rule) instead of dying, SIGHUP's default.
pub fn reload_on_sighup() -> std::io::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let hup = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::signal::SIGHUP, hup.clone())?;
    Ok(hup)
}

/// The node a plan is compiled for: the flags behind [`NodeContext`] besides its name.
#[derive(Clone, Debug, clap::Args)]
pub struct NodeArgs {
    /// An address of this node (repeatable); NodePorts are served only on these.
    #[arg(long = "node-ip", value_name = "IP", value_delimiter = ',')]
    pub node_ips: Vec<std::net::IpAddr>,
    /// The pod network (repeatable): traffic from outside it to a ClusterIP is masqueraded.
    #[arg(long = "cluster-cidr", value_name = "CIDR", value_delimiter = ',')]
    pub cluster_cidrs: Vec<IpNet>,
    /// Serve NodePorts only on the node's addresses inside these ranges (repeatable), or,
    /// with `primary`, only on the --node-ip addresses. Default: every address of every
    /// interface of the node, as kube-proxy.
    #[arg(
        long = "nodeport-addresses",
        value_name = "CIDR|primary",
        value_delimiter = ',',
        value_parser = parse_nodeport_address
    )]
    pub nodeport_addresses: Vec<NodePortAddress>,
    /// Also serve NodePorts on 127.0.0.1 (IPv4 only; sets net.ipv4.conf.all.route_localnet=1;
    /// iptables and nftables backends), as kube-proxy's --iptables-localhost-nodeports.
    #[arg(
        long = "localhost-nodeports",
        alias = "iptables-localhost-nodeports",
        value_name = "BOOL",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub localhost_nodeports: bool,
    /// Masquerade all traffic to ClusterIPs.
    #[arg(long)]
    pub masquerade_all: bool,
}

impl NodeArgs {
    /// The node context of node `name` these flags describe.
    pub fn context(&self, name: String) -> NodeContext {
        {
            let mut ctx = NodeContext::new(name, self.node_ips.clone(), self.cluster_cidrs.clone());
            ctx.nodeport_primary = self.nodeport_addresses.contains(&NodePortAddress::Primary);
            ctx.nodeport_addresses = self
                .nodeport_addresses
                .iter()
                .filter_map(|a| match a {
                    NodePortAddress::Cidr(c) => Some(*c),
                    NodePortAddress::Primary => None,
                })
                .collect();
            ctx.localhost_nodeports = self.localhost_nodeports;
            ctx.masquerade_all = self.masquerade_all;
            ctx
        }
    }
}

/// One value of `--nodeport-addresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePortAddress {
    /// `primary`: the node's primary addresses (`--node-ip`) only.
    Primary,
    /// Addresses inside this range.
    Cidr(IpNet),
}

fn parse_nodeport_address(text: &str) -> Result<NodePortAddress, String> {
    if text == "primary" {
        return Ok(NodePortAddress::Primary);
    }
    text.parse()
        .map(NodePortAddress::Cidr)
        .map_err(|_| format!("{text:?} is neither a CIDR (like 192.168.50.0/24) nor \"primary\""))
}

/// Every address of every interface of this network namespace (`getifaddrs`), as
/// kube-proxy reads them to serve NodePorts.
pub fn local_addresses() -> std::io::Result<Vec<std::net::IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push(std::net::IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.push(std::net::IpAddr::V6(v6.ip()));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// How a program follows an API server instead of a manifest directory.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ApiArgs {
    /// Follow the API server of this kubeconfig file (its current context) instead of a
    /// manifest directory. Without --kubeconfig and --manifests, the in-cluster
    /// configuration (service account) is used when there is one.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Take only Services labelled service.kubernetes.io/service-proxy-name=NAME (default:
    /// only those without that label, as kube-proxy).
    #[arg(long, value_name = "NAME", value_parser = parse_label_value)]
    pub service_proxy_name: Option<String>,
}

/// Where a program's cluster comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A manifest directory.
    Manifests(std::path::PathBuf),
    /// An API server.
    Api(crate::api::ClientSource),
}

/// Picks the input: `--manifests DIR`, `--kubeconfig FILE`, else the in-cluster
/// configuration when `in_cluster` (see [`crate::api::in_cluster_available`]), else an
/// error that says what to give.
pub fn input(
    manifests: Option<&std::path::Path>,
    api: &ApiArgs,
    in_cluster: bool,
) -> Result<Input, String> {
    match (manifests, &api.kubeconfig) {
        (Some(_), Some(_)) => Err("give --manifests or --kubeconfig, not both".into()),
        (Some(dir), None) => Ok(Input::Manifests(dir.to_path_buf())),
        (None, Some(file)) => Ok(Input::Api(crate::api::ClientSource::Kubeconfig(
            file.clone(),
        ))),
        (None, None) if in_cluster => Ok(Input::Api(crate::api::ClientSource::InCluster)),
        (None, None) => Err(format!(
            "give --manifests DIR or --kubeconfig FILE (no in-cluster configuration: it needs \
             KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT and {})",
            crate::api::SERVICE_ACCOUNT_TOKEN
        )),
    }
}

/// A label value as the API server accepts it: at most 63 characters, alphanumerics, `-`,
/// `_` and `.`, beginning and ending with an alphanumeric (empty is not useful here).
pub fn parse_label_value(s: &str) -> Result<String, String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if s.is_empty()
        || s.len() > 63
        || !s.chars().all(ok_char)
        || !edge(s.chars().next())
        || !edge(s.chars().last())
    {
        return Err(format!(
            "{s:?} is not a label value (at most 63 characters: alphanumerics, '-', '_', '.', \
             beginning and ending with an alphanumeric)"
        ));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn picks_manifests_a_kubeconfig_or_the_cluster() {
        use crate::api::ClientSource;
        use std::path::{Path, PathBuf};
        let none = ApiArgs::default();
        let kc = ApiArgs {
            kubeconfig: Some(PathBuf::from("/k")),
            ..ApiArgs::default()
        };
        assert_eq!(
            input(Some(Path::new("/m")), &none, true),
            Ok(Input::Manifests(PathBuf::from("/m")))
        );
        assert_eq!(
            input(None, &kc, true),
            Ok(Input::Api(ClientSource::Kubeconfig(PathBuf::from("/k"))))
        );
        assert_eq!(
            input(None, &none, true),
            Ok(Input::Api(ClientSource::InCluster))
        );
        let e = input(None, &none, false).unwrap_err();
        assert!(
            e.starts_with("give --manifests DIR or --kubeconfig FILE"),
            "{e}"
        );
        assert!(e.contains("KUBERNETES_SERVICE_HOST"), "{e}");
        assert!(input(Some(Path::new("/m")), &kc, true).is_err());
    }

    #[test]
    fn names_the_cluster_flags_that_were_changed() {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            c: ClusterArgs,
        }
        use clap::Parser as _;
        assert!(P::parse_from(["p"]).c.changed().is_empty());
        // The default spelled out is not a change.
        assert!(
            P::parse_from(["p", "--service-cidr", "10.96.0.0/12"])
                .c
                .changed()
                .is_empty()
        );
        let c = P::parse_from([
            "p",
            "--pod-cidr",
            "10.1.0.0/16",
            "--service-node-port-range",
            "31000",
        ])
        .c;
        assert_eq!(c.changed(), ["--pod-cidr", "--service-node-port-range"]);
    }

    #[test]
    fn label_values_as_the_api_server_takes_them() {
        assert_eq!(parse_label_value("svcnat"), Ok("svcnat".into()));
        assert!(parse_label_value("a.b-c_d9").is_ok());
        assert!(parse_label_value("-a").is_err());
        assert!(parse_label_value("a b").is_err());
        assert!(parse_label_value("").is_err());
        assert!(parse_label_value(&"a".repeat(64)).is_err());
    }

    #[test]
    fn reads_port_ranges_as_kube_apiserver() {
        assert_eq!(parse_port_range("30000-32767"), Ok((30000, 32767)));
        assert_eq!(parse_port_range(" 8000-8100 "), Ok((8000, 8100)));
        assert_eq!(parse_port_range("31000"), Ok((31000, 31000)));
        assert_eq!(
            parse_port_range("32767-30000"),
            Err("end port cannot be less than start port: 32767-30000".into())
        );
        assert_eq!(
            parse_port_range("30000-70000"),
            Err("the port range cannot be greater than 65535: 30000-70000".into())
        );
        assert_eq!(
            parse_port_range("0-100"),
            Err("port 0 is not a valid node port: 0-100".into())
        );
        assert!(parse_port_range("30000:32767").is_err());
        assert!(parse_port_range("-5").is_err());
        assert!(parse_port_range("").is_err());
    }
}
