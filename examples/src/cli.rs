//! Command-line pieces the programs share, so that `svcnat-proxy`, `svcnat-dns` and
//! `svcnat-ctl` read one manifest directory the same way and allocate the same cluster IPs.

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
        {
            let mut ctx = NodeContext::new(name, self.node_ips.clone(), self.cluster_cidrs.clone());
            ctx.nodeport_addresses = self.nodeport_addresses.clone();
            ctx.masquerade_all = self.masquerade_all;
            ctx
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
