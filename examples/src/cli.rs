//! Command-line pieces the programs share, so that `svcnat-proxy`, `svcnat-dns` and
//! `svcnat-ctl` read one manifest directory the same way and allocate the same cluster IPs.

use ipnet::IpNet;
use svcnat_core::manifest::ClusterConfig;
use svcnat_core::plan::NodeContext;

/// How manifests become a cluster: the flags behind [`ClusterConfig`].
#[derive(Clone, Debug, clap::Args)]
pub struct ClusterArgs {
    /// Namespace of objects that name none (and of views without -n or -A).
    #[arg(long, value_name = "NS", default_value = "default")]
    pub default_namespace: String,
    /// Range for cluster IPs that manifests leave unset (one per family).
    #[arg(
        long = "service-cidr",
        value_name = "CIDR",
        default_value = "10.96.0.0/12",
        value_delimiter = ','
    )]
    pub service_cidrs: Vec<IpNet>,
    /// Range for pod IPs of workloads and Nodes without podCIDR (one per family).
    #[arg(
        long = "pod-cidr",
        value_name = "CIDR",
        default_value = "10.244.0.0/16",
        value_delimiter = ','
    )]
    pub pod_cidrs: Vec<IpNet>,
}

impl ClusterArgs {
    /// The cluster configuration these flags describe.
    pub fn config(&self) -> ClusterConfig {
        ClusterConfig {
            default_namespace: self.default_namespace.clone(),
            service_cidrs: self.service_cidrs.clone(),
            pod_cidrs: self.pod_cidrs.clone(),
            ..ClusterConfig::default()
        }
    }
}

/// Logs to stderr, quiet by default: warnings and errors; `-v` info, `-vv` debug, `-vvv`
/// trace.
pub fn init_logging(verbose: u8) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::filter::LevelFilter;
    let level = match verbose {
        0 => LevelFilter::WARN,
        1 => LevelFilter::INFO,
        2 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_max_level(level)
        .init();
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

/// The node a plan is compiled for: the flags behind [`NodeContext`] besides its name.
#[derive(Clone, Debug, clap::Args)]
pub struct NodeArgs {
    /// An address of this node (repeatable); NodePorts are served only on these.
    #[arg(long = "node-ip", value_name = "IP", value_delimiter = ',')]
    pub node_ips: Vec<std::net::IpAddr>,
    /// The pod network (repeatable): traffic from outside it to a ClusterIP is masqueraded.
    #[arg(long = "cluster-cidr", value_name = "CIDR", value_delimiter = ',')]
    pub cluster_cidrs: Vec<IpNet>,
    /// Serve NodePorts only on node addresses inside these ranges (repeatable).
    #[arg(
        long = "nodeport-addresses",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub nodeport_addresses: Vec<IpNet>,
    /// Masquerade all traffic to ClusterIPs.
    #[arg(long)]
    pub masquerade_all: bool,
}

impl NodeArgs {
    /// The node context of node `name` these flags describe.
    pub fn context(&self, name: String) -> NodeContext {
        NodeContext {
            nodeport_addresses: self.nodeport_addresses.clone(),
            masquerade_all: self.masquerade_all,
            ..NodeContext::new(name, self.node_ips.clone(), self.cluster_cidrs.clone())
        }
    }
}
