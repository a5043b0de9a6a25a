//! `svcnat-ctl`: kubectl-style views of a manifest directory, and the NAT plan a node
//! would program from it.
//!
//! ```text
//! svcnat-ctl --manifests DIR [--default-namespace NS] get svc [-A | -n NS]
//! svcnat-ctl --manifests DIR get endpoints [-A | -n NS]
//! svcnat-ctl --manifests DIR get pods [-A | -n NS] [-o wide]
//! svcnat-ctl --manifests DIR describe service NAME [-n NS]
//! svcnat-ctl --manifests DIR plan --node-name N --node-ip IP --cluster-cidr CIDR
//! ```
//!
//! The directory is read as `svcnat-proxy` reads it: a file with any error contributes
//! nothing. Such errors are printed on stderr (`error: file:line: ...`) after the view,
//! and the exit code is then 1; a Service that does not exist also gives 1.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use svcnat_core::describe::{self, ViewOptions};
use svcnat_core::model::ObjectName;
use svcnat_core::plan::{ChainIdStyle, NodeContext, Plan};
use svcnat_examples::cli::{ClusterArgs, NodeArgs};
use svcnat_examples::proxy::ManifestDir;

/// kubectl-style views of a manifest directory, and the NAT plan of a node.
#[derive(Debug, Parser)]
#[command(
    name = "svcnat-ctl",
    version,
    about = "kubectl-style views of a manifest directory, and the NAT plan of a node"
)]
struct Cli {
    /// Directory of manifests (*.yaml, *.yml, *.json).
    #[arg(long, value_name = "DIR")]
    manifests: PathBuf,
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: Command,
}

/// What to show.
#[derive(Debug, Subcommand)]
enum Command {
    /// List objects, as `kubectl get`.
    Get {
        /// svc, endpoints or pods.
        resource: Resource,
        /// All namespaces.
        #[arg(short = 'A', long = "all-namespaces")]
        all_namespaces: bool,
        /// This namespace [default: --default-namespace].
        #[arg(short, long, value_name = "NS", conflicts_with = "all_namespaces")]
        namespace: Option<String>,
        /// Output format (pods: wide adds IP and NODE).
        #[arg(short, long, value_enum)]
        output: Option<Output>,
    },
    /// Show one object in detail, as `kubectl describe`.
    Describe {
        /// service.
        resource: DescribeResource,
        /// Its name.
        name: String,
        /// Its namespace [default: --default-namespace].
        #[arg(short, long, value_name = "NS")]
        namespace: Option<String>,
    },
    /// Print the NAT plan a node compiles from the manifests.
    Plan {
        /// The node's name (decides which endpoints are local).
        #[arg(long, value_name = "NAME")]
        node_name: String,
        #[command(flatten)]
        node: NodeArgs,
        /// Spelling of chain hashes: current kube-proxy, or the legacy spelling.
        #[arg(long, value_enum, default_value_t = ChainIds::Current)]
        chain_ids: ChainIds,
    },
}

/// Listable resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Resource {
    /// Services.
    #[value(name = "svc", aliases = ["service", "services"])]
    Services,
    /// Endpoints.
    #[value(name = "endpoints", aliases = ["ep", "endpoint"])]
    Endpoints,
    /// Pods.
    #[value(name = "pods", aliases = ["po", "pod"])]
    Pods,
}

/// Describable resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DescribeResource {
    /// A Service.
    #[value(name = "service", aliases = ["svc", "services"])]
    Service,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Extra columns.
    Wide,
}

/// Chain hash spellings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ChainIds {
    /// Current kube-proxy.
    Current,
    /// kube-proxy before port names became optional in the hash input.
    Legacy,
}

/// Cuts a `kubectl get pods -o wide` table before its IP column.
fn narrow(table: &str) -> String {
    let Some(at) = table.lines().next().and_then(|h| h.find("   IP ")) else {
        return table.to_string();
    };
    let mut out = String::new();
    for line in table.lines() {
        out.push_str(line.get(..at).unwrap_or(line).trim_end());
        out.push('\n');
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.cluster.config();
    let dir = match ManifestDir::open(&cli.manifests, config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", cli.manifests.display());
            return ExitCode::from(1);
        }
    };
    let cluster = dir.cluster();
    let opts = ViewOptions {
        now: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok()),
    };
    let mut failed = false;
    let text = match cli.command {
        Command::Get {
            resource,
            all_namespaces,
            namespace,
            output,
        } => {
            let ns = if all_namespaces {
                None
            } else {
                Some(namespace.unwrap_or_else(|| cli.cluster.default_namespace.clone()))
            };
            let ns = ns.as_deref();
            match resource {
                Resource::Services => describe::get_services(cluster, ns, &opts),
                Resource::Endpoints => describe::get_endpoints(cluster, ns, &opts),
                Resource::Pods => {
                    let wide = describe::get_pods_wide(cluster, ns, &opts);
                    match output {
                        Some(Output::Wide) => wide,
                        None => narrow(&wide),
                    }
                }
            }
        }
        Command::Describe {
            resource: DescribeResource::Service,
            name,
            namespace,
        } => {
            let ns = namespace.unwrap_or_else(|| cli.cluster.default_namespace.clone());
            match describe::describe_service(cluster, &ObjectName::new(ns, name.clone()), &opts) {
                Some(t) => t,
                None => {
                    failed = true;
                    eprintln!("Error from server (NotFound): services \"{name}\" not found");
                    String::new()
                }
            }
        }
        Command::Plan {
            node_name,
            node,
            chain_ids,
        } => {
            let node = NodeContext {
                chain_ids: match chain_ids {
                    ChainIds::Current => ChainIdStyle::Current,
                    ChainIds::Legacy => ChainIdStyle::Legacy,
                },
                ..node.context(node_name)
            };
            Plan::compile(cluster, &node).render()
        }
    };
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::from(1);
    }
    for lines in dir.problems().values() {
        failed = true;
        for l in lines {
            eprintln!("error: {l}");
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn narrows_the_wide_pod_table() {
        let wide = "NAME    READY   STATUS    RESTARTS   AGE   IP          NODE\nweb-0   1/1     Running   0          5m    10.0.0.1    n1\n";
        assert_eq!(
            narrow(wide),
            "NAME    READY   STATUS    RESTARTS   AGE\nweb-0   1/1     Running   0          5m\n"
        );
        assert_eq!(narrow("No resources found\n"), "No resources found\n");
    }
}
