//! `svcnat-ctl`: kubectl-style views of a manifest directory, and the NAT plan a node
//! would program from it.
//!
//! ```text
//! svcnat-ctl --manifests DIR [--default-namespace NS] get svc [NAME] [-A | -n NS] [-o wide]
//! svcnat-ctl --manifests DIR get endpoints [NAME] [-A | -n NS]
//! svcnat-ctl --manifests DIR get pods [NAME] [-A | -n NS] [-o wide]
//! svcnat-ctl --manifests DIR describe service [NAME] [-A | -n NS]
//! svcnat-ctl --manifests DIR plan --node-name N --node-ip IP --cluster-cidr CIDR
//! svcnat-ctl --manifests DIR graph svc NAME [-n NS] [--format svg|dot] [--node-name N ...]
//! ```
//!
//! As with kubectl, `-n/--namespace`, `-A/--all-namespaces` and `-o` go anywhere on the
//! command line (`svcnat-ctl -n kube-system get svc` or `svcnat-ctl get svc -n
//! kube-system`), and so do `--manifests` and the cluster flags. `get svc -o wide` adds
//! kubectl's SELECTOR column, `get pods -o wide` IP and NODE. A NAME shows that one object;
//! when it does not exist, kubectl's `Error from server (NotFound): services "x" not found`
//! goes to stderr and the exit code is 1. `describe service` without a NAME describes every
//! Service in scope. `graph svc NAME` draws the Service's path through a node's dataplane
//! (frontends, the Service chain, each endpoint chain with its rule probability and share,
//! the pods by node) as a self-contained SVG, or Graphviz DOT with `--format dot`; the node
//! defaults to the first Node of the manifests (by name), else the first pod's node.
//!
//! The directory is read as `svcnat-proxy` reads it: a file with any error contributes
//! nothing. Such errors are printed on stderr (`error: file:line: ...`) after the view,
//! and the exit code is then 1. Documents of kinds svcnat does not read (ConfigMap,
//! Ingress, ClusterRole...) are skipped without changing the exit code; one stderr line
//! counts them per kind (`skipped: 3 ConfigMap, 1 ClusterRole (kinds svcnat does not
//! read)`). Other warnings (a deprecated apiVersion read as the current one) are printed
//! as `warning: file:line: ...`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use svcnat_core::describe::{self, ViewOptions};
use svcnat_core::graph::ServiceGraph;
use svcnat_core::manifest::{LoadError, ValidateError};
use svcnat_core::model::{Cluster, ObjectName};
use svcnat_core::plan::{ChainIdStyle, Plan};
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
    /// Directory of manifests (*.yaml, *.yml, *.json); required.
    #[arg(long, value_name = "DIR", global = true)]
    manifests: Option<PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// This namespace [default: --default-namespace].
    #[arg(short, long, value_name = "NS", global = true)]
    namespace: Option<String>,
    /// All namespaces.
    #[arg(
        short = 'A',
        long = "all-namespaces",
        global = true,
        conflicts_with = "namespace"
    )]
    all_namespaces: bool,
    /// Output format of `get` (svc: wide adds SELECTOR; pods: IP and NODE).
    #[arg(short, long, value_enum, global = true)]
    output: Option<Output>,
    #[command(subcommand)]
    command: Command,
}

/// What to show.
#[derive(Debug, Subcommand)]
enum Command {
    /// List objects, or show one, as `kubectl get`.
    Get {
        /// svc, endpoints or pods.
        resource: Resource,
        /// Show only this object.
        name: Option<String>,
    },
    /// Show objects in detail, as `kubectl describe`.
    Describe {
        /// service.
        resource: DescribeResource,
        /// Its name [default: every Service in scope].
        name: Option<String>,
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
    /// Draw a Service's path through a node's dataplane (SVG, or Graphviz DOT).
    Graph {
        /// svc.
        resource: DescribeResource,
        /// The Service.
        name: String,
        /// The node whose dataplane is drawn [default: the first Node, else the first
        /// pod's node].
        #[arg(long, value_name = "NAME")]
        node_name: Option<String>,
        #[command(flatten)]
        node: NodeArgs,
        /// Spelling of chain hashes: current kube-proxy, or the legacy spelling.
        #[arg(long, value_enum, default_value_t = ChainIds::Current)]
        chain_ids: ChainIds,
        /// svg (self-contained) or dot (Graphviz).
        #[arg(long, value_enum, default_value_t = GraphFormat::Svg)]
        format: GraphFormat,
    },
}

/// Drawing formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum GraphFormat {
    /// A self-contained SVG.
    Svg,
    /// Graphviz DOT (`dot -Tpng`).
    Dot,
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

impl Resource {
    /// The plural kubectl names in a NotFound error.
    fn plural(self) -> &'static str {
        match self {
            Resource::Services => "services",
            Resource::Endpoints => "endpoints",
            Resource::Pods => "pods",
        }
    }
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

/// Which namespaces a command looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Scope {
    /// `-A`.
    All,
    /// `-n NS`, or the default namespace.
    Namespace(String),
}

/// What a command prints: the view on stdout, errors on stderr.
#[derive(Debug, Default)]
struct Shown {
    /// The view.
    out: String,
    /// kubectl-style error lines; any of them makes the exit code 1.
    errors: Vec<String>,
    /// Lines for stderr that are not errors.
    notes: Vec<String>,
}

impl Shown {
    fn view(out: String) -> Shown {
        Shown {
            out,
            ..Shown::default()
        }
    }

    fn error(line: String) -> Shown {
        Shown {
            errors: vec![line],
            ..Shown::default()
        }
    }
}

/// `graph svc NAME`: the Service's path through one node's dataplane.
fn graph(
    cluster: &Cluster,
    scope: &Scope,
    name: &str,
    node_name: Option<String>,
    node: &NodeArgs,
    chain_ids: ChainIds,
    format: GraphFormat,
) -> Shown {
    let Scope::Namespace(ns) = scope else {
        return Shown::error(NAME_ACROSS_NAMESPACES.into());
    };
    let service = ObjectName::new(ns.as_str(), name);
    if cluster.service(&service).is_none() {
        return Shown::error(format!(
            "Error from server (NotFound): services \"{name}\" not found"
        ));
    }
    let node_name = node_name
        .or_else(|| cluster.nodes().map(|n| n.name.clone()).min())
        .or_else(|| cluster.pods().find_map(|p| p.node_name.clone()))
        .unwrap_or_else(|| "node".into());
    let mut ctx = node.context(node_name.clone());
    ctx.chain_ids = match chain_ids {
        ChainIds::Current => ChainIdStyle::Current,
        ChainIds::Legacy => ChainIdStyle::Legacy,
    };
    let plan = Plan::compile(cluster, &ctx);
    match ServiceGraph::build(cluster, &plan, &service) {
        Some(g) => Shown::view(match format {
            GraphFormat::Svg => g.to_svg(),
            GraphFormat::Dot => g.to_dot(),
        }),
        None => Shown::error(format!(
            "error: service \"{name}\" has nothing in node {node_name}'s dataplane (headless or ExternalName)"
        )),
    }
}

/// kubectl: "a resource cannot be retrieved by name across all namespaces".
const NAME_ACROSS_NAMESPACES: &str =
    "error: a resource cannot be retrieved by name across all namespaces";

fn get(
    cluster: &Cluster,
    resource: Resource,
    name: Option<&str>,
    scope: &Scope,
    opts: &ViewOptions,
) -> Shown {
    let Some(name) = name else {
        let ns = match scope {
            Scope::All => None,
            Scope::Namespace(ns) => Some(ns.as_str()),
        };
        return Shown::view(match resource {
            Resource::Services => describe::get_services(cluster, ns, opts),
            Resource::Endpoints => describe::get_endpoints(cluster, ns, opts),
            Resource::Pods => describe::get_pods(cluster, ns, opts),
        });
    };
    let Scope::Namespace(ns) = scope else {
        return Shown::error(NAME_ACROSS_NAMESPACES.to_string());
    };
    let object = ObjectName::new(ns.clone(), name);
    let found = match resource {
        Resource::Services => describe::get_service(cluster, &object, opts),
        Resource::Endpoints => describe::get_endpoints_of(cluster, &object, opts),
        Resource::Pods => describe::get_pod(cluster, &object, opts),
    };
    match found {
        Some(table) => Shown::view(table),
        None => Shown::error(not_found(resource.plural(), name)),
    }
}

/// kubectl's NotFound line: `Error from server (NotFound): services "x" not found`.
fn not_found(plural: &str, name: &str) -> String {
    format!("Error from server (NotFound): {plural} \"{name}\" not found")
}

fn describe_services(
    cluster: &Cluster,
    name: Option<&str>,
    scope: &Scope,
    opts: &ViewOptions,
) -> Shown {
    let ns = match scope {
        Scope::All => None,
        Scope::Namespace(ns) => Some(ns.as_str()),
    };
    if let Some(name) = name {
        let Some(ns) = ns else {
            return Shown::error(NAME_ACROSS_NAMESPACES.to_string());
        };
        return match describe::describe_service(cluster, &ObjectName::new(ns, name), opts) {
            Some(text) => Shown::view(text),
            None => Shown::error(not_found("services", name)),
        };
    }
    let texts: Vec<String> = cluster
        .services()
        .filter(|s| ns.is_none_or(|ns| s.name.namespace == ns))
        .filter_map(|s| describe::describe_service(cluster, &s.name, opts))
        .collect();
    if texts.is_empty() {
        // kubectl describe prints this on stderr and exits 0.
        return Shown {
            notes: vec![match ns {
                Some(ns) => format!("No resources found in {ns} namespace."),
                None => "No resources found".to_string(),
            }],
            ..Shown::default()
        };
    }
    // kubectl describe separates objects with a blank line after each description's last
    // line ("\n\n" before every description but the first).
    Shown::view(texts.join("\n\n"))
}

/// The stderr line counting skipped documents per kind, in order of first appearance;
/// `None` when nothing was skipped. Only kinds and counts are shown: the loader files a
/// cluster-scoped kind it does not know (ClusterRole) under the default namespace.
fn skipped_summary(warnings: &[LoadError]) -> Option<String> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for w in warnings {
        if let ValidateError::UnsupportedKind(kind) = &w.error {
            match counts.iter_mut().find(|(k, _)| k == kind) {
                Some((_, n)) => *n += 1,
                None => counts.push((kind, 1)),
            }
        }
    }
    if counts.is_empty() {
        return None;
    }
    let list: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    Some(format!(
        "skipped: {} (kinds svcnat does not read)",
        list.join(", ")
    ))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(manifests) = cli.manifests.clone() else {
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "the following required argument was not provided: --manifests <DIR>",
            )
            .exit()
    };
    // `conflicts_with` does not see a global flag given at another level (`-A get svc -n x`).
    if cli.all_namespaces && cli.namespace.is_some() {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "the argument '--all-namespaces' cannot be used with '--namespace <NS>'",
            )
            .exit()
    }
    if cli.output.is_some() && !matches!(cli.command, Command::Get { .. }) {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "-o/--output is only for `get`",
            )
            .exit()
    }
    let config = cli.cluster.config();
    let dir = match ManifestDir::open(&manifests, config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", manifests.display());
            return ExitCode::from(1);
        }
    };
    let cluster = dir.cluster();
    let opts = {
        let mut opts = ViewOptions::default();
        opts.now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok());
        opts.wide = cli.output == Some(Output::Wide);
        opts
    };
    let scope = if cli.all_namespaces {
        Scope::All
    } else {
        Scope::Namespace(
            cli.namespace
                .clone()
                .unwrap_or_else(|| cli.cluster.default_namespace.clone()),
        )
    };
    let shown = match cli.command {
        Command::Get { resource, name } => get(cluster, resource, name.as_deref(), &scope, &opts),
        Command::Describe {
            resource: DescribeResource::Service,
            name,
        } => describe_services(cluster, name.as_deref(), &scope, &opts),
        Command::Graph {
            resource: DescribeResource::Service,
            name,
            node_name,
            node,
            chain_ids,
            format,
        } => graph(cluster, &scope, &name, node_name, &node, chain_ids, format),
        Command::Plan {
            node_name,
            node,
            chain_ids,
        } => {
            let node = {
                let mut ctx = node.context(node_name);
                ctx.chain_ids = match chain_ids {
                    ChainIds::Current => ChainIdStyle::Current,
                    ChainIds::Legacy => ChainIdStyle::Legacy,
                };
                ctx
            };
            Shown::view(Plan::compile(cluster, &node).render())
        }
    };
    let mut out = std::io::stdout().lock();
    if out
        .write_all(shown.out.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::from(1);
    }
    let mut failed = !shown.errors.is_empty();
    for line in shown.notes.iter().chain(&shown.errors) {
        eprintln!("{line}");
    }
    let warnings = dir.warnings();
    for w in &warnings {
        if !matches!(w.error, ValidateError::UnsupportedKind(_)) {
            eprintln!("warning: {w}");
        }
    }
    if let Some(line) = skipped_summary(&warnings) {
        eprintln!("{line}");
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

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn namespace_flags_go_anywhere() {
        for args in [
            &[
                "svcnat-ctl",
                "-n",
                "kube-system",
                "get",
                "svc",
                "-o",
                "wide",
            ][..],
            &[
                "svcnat-ctl",
                "get",
                "-n",
                "kube-system",
                "svc",
                "-o",
                "wide",
            ][..],
            &[
                "svcnat-ctl",
                "get",
                "svc",
                "-o",
                "wide",
                "-n",
                "kube-system",
            ][..],
            &[
                "svcnat-ctl",
                "-owide",
                "get",
                "svc",
                "--namespace=kube-system",
            ][..],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert_eq!(cli.namespace.as_deref(), Some("kube-system"), "{args:?}");
            assert_eq!(cli.output, Some(Output::Wide), "{args:?}");
        }
        let cli = Cli::try_parse_from(["svcnat-ctl", "get", "pods", "-A"]).unwrap();
        assert!(cli.all_namespaces);
        // Same level: clap refuses -A with -n (across levels, main does).
        assert!(Cli::try_parse_from(["svcnat-ctl", "get", "pods", "-A", "-n", "x"]).is_err());
    }

    #[test]
    fn node_port_range_is_checked_by_clap() {
        let cli = Cli::try_parse_from([
            "svcnat-ctl",
            "get",
            "svc",
            "--service-node-port-range",
            "8000-8100",
        ])
        .unwrap();
        assert_eq!(cli.cluster.config().node_port_range, (8000, 8100));
        let err = Cli::try_parse_from([
            "svcnat-ctl",
            "--service-node-port-range",
            "32767-30000",
            "get",
            "svc",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("end port cannot be less than start port: 32767-30000"),
            "{err}"
        );
    }

    #[test]
    fn counts_skipped_kinds_in_order_of_appearance() {
        let skipped = |kind: &str, ns: &str| LoadError {
            file: "a.yaml".into(),
            line: 1,
            document: 0,
            object: Some(svcnat_core::manifest::ObjectRef {
                kind: kind.into(),
                namespace: ns.into(),
                name: "x".into(),
            }),
            field: String::new(),
            error: ValidateError::UnsupportedKind(kind.into()),
        };
        let deprecated = LoadError {
            error: ValidateError::Required,
            ..skipped("Deployment", "default")
        };
        let warnings = [
            skipped("ConfigMap", "default"),
            deprecated,
            skipped("ClusterRole", "default"),
            skipped("ConfigMap", "default"),
            skipped("ConfigMap", "other"),
        ];
        assert_eq!(
            skipped_summary(&warnings).as_deref(),
            Some("skipped: 3 ConfigMap, 1 ClusterRole (kinds svcnat does not read)")
        );
        assert_eq!(skipped_summary(&[]), None);
    }
}
