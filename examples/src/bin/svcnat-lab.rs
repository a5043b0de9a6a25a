//! `svcnat-lab`: replays the lab "Load Balancing and Service Discovery with Services" in
//! network namespaces with svcnat-proxy, svcnat-dns and real traffic, printing each step and
//! what it observed. Exits 0 when every observation matches the lab, 1 when one does not,
//! 2 when the machine cannot run it (needs root, iproute2, iptables, getent), 130 on Ctrl-C.
//! Cleans up after itself in every case.
//!
//! ```text
//! svcnat-lab [--api] [--backend iptables|nftables|userspace|ipvs] [--report DIR]
//! svcnat-lab up --manifests DIR [--nodes N] [--backend iptables|nftables] [--default-namespace NS]
//! svcnat-lab exec POD|NAMESPACE/POD|client|node-N -- CMD [ARGS...]
//! ```
//!
//! `up` brings any manifest set up in network namespaces ([`svcnat_examples::sandbox`]),
//! prints how to reach each NodePort, and stays up until Ctrl-C, then removes everything;
//! `exec` runs a command inside one of its pods, its client or a node.
//!
//! `--report DIR` also writes `DIR/index.html`: each step with its commands and what was
//! observed, the browser's screenshots (`DIR/*.png`), the drawings of the vote and redis
//! Services' paths through node-0, and the outcome (written whether the replay passed or
//! failed).
//!
//! With `--api` the proxies and svcnat-dns follow fake Kubernetes API servers
//! (`--kubeconfig`) that the lab writes every manifest edit to, as API objects, instead of
//! watching the manifest directory; every observation is the same.

use std::process::ExitCode;

use clap::Parser;
use svcnat_examples::lab::{Feed, Lab, LabBackend, LabError, Programs, write_report};
use svcnat_examples::sandbox::{self, Sandbox, SandboxSpec};

/// Replays the lab "Load Balancing and Service Discovery with Services" in network
/// namespaces with real traffic.
#[derive(Parser, Debug)]
#[command(name = "svcnat-lab", version)]
struct Args {
    /// Feed the proxies and svcnat-dns through fake API servers (one on each namespace's
    /// loopback) instead of the manifest directory.
    #[arg(long)]
    api: bool,
    /// The proxies' dataplane (`svcnat-proxy --backend`); step 2 shows its chain.
    #[arg(long, value_enum, default_value_t = BackendArg::Iptables)]
    backend: BackendArg,
    /// Also write the replay as a web page, DIR/index.html.
    #[arg(long, value_name = "DIR")]
    report: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Instead of the replay.
#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Bring a manifest set up in network namespaces until Ctrl-C.
    Up {
        /// The manifest directory (`*.yaml`, `*.yml`, `*.json`).
        #[arg(long, value_name = "DIR")]
        manifests: std::path::PathBuf,
        /// How many nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// The proxies' dataplane.
        #[arg(long, value_enum, default_value_t = BackendArg::Iptables)]
        backend: BackendArg,
        /// The namespace of objects that name none.
        #[arg(long, default_value = "default")]
        default_namespace: String,
    },
    /// Run a command in the running sandbox: in a pod, the client or a node.
    Exec {
        /// A pod (`NAME` or `NAMESPACE/NAME`), `client`, or a node (`node-0`).
        target: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// `--backend`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum BackendArg {
    /// iptables (kube-proxy's iptables layout).
    Iptables,
    /// nftables (kube-proxy's nftables layout).
    Nftables,
    /// The userspace AF_PACKET datapath.
    Userspace,
    /// IPVS (needs a kernel with IPVS; says so otherwise).
    Ipvs,
}

impl BackendArg {
    fn lab(self) -> LabBackend {
        match self {
            BackendArg::Iptables => LabBackend::Iptables,
            BackendArg::Nftables => LabBackend::Nftables,
            BackendArg::Userspace => LabBackend::Userspace,
            BackendArg::Ipvs => LabBackend::Ipvs,
        }
    }
}

/// `svcnat-lab up`: until Ctrl-C.
fn up(
    manifests: std::path::PathBuf,
    nodes: usize,
    backend: LabBackend,
    default_namespace: String,
) -> ExitCode {
    let stop = match svcnat_examples::cli::stop_on_signals() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("svcnat-lab: cannot handle SIGINT/SIGTERM: {e}");
            return ExitCode::from(2);
        }
    };
    let spec = SandboxSpec {
        manifests,
        nodes,
        backend,
        default_namespace,
    };
    // A closed stdout (the reader went away) never stops the sandbox from cleaning up.
    let say = |line: &str| {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    };
    let result = Programs::discover_svcnat().and_then(|p| {
        let mut sb = Sandbox::up(&spec, &p, &stop, say)?;
        for (name, addr) in &sb.frontends {
            say(&format!(
                "frontend {name}: http://{addr}/   (svcnat-lab exec client -- curl http://{addr}/)"
            ));
        }
        say(&format!(
            "pods: {}",
            sb.pods.keys().cloned().collect::<Vec<_>>().join(" ")
        ));
        say("ready: Ctrl-C removes everything");
        sb.wait(&stop)
    });
    match result {
        Ok(()) => {
            say("svcnat-lab: stopped; everything it made is removed");
            ExitCode::SUCCESS
        }
        Err(e @ LabError::Unsupported(_)) => {
            eprintln!("svcnat-lab: {e}");
            ExitCode::from(2)
        }
        Err(LabError::Interrupted) => {
            eprintln!("svcnat-lab: interrupted; everything it made is removed");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("svcnat-lab: {e}; everything it made is removed");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Some(Command::Up {
            manifests,
            nodes,
            backend,
            default_namespace,
        }) => {
            let backend = backend.lab();
            return up(manifests, nodes, backend, default_namespace);
        }
        Some(Command::Exec { target, command }) => {
            return match sandbox::exec(&target, &command) {
                Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                Err(e) => {
                    eprintln!("svcnat-lab exec: {e}");
                    ExitCode::from(1)
                }
            };
        }
        None => {}
    }
    let feed = if args.api { Feed::Api } else { Feed::Manifests };
    // The first Ctrl-C stops the replay and cleans up; a second one exits at once.
    let stop = match svcnat_examples::cli::stop_on_signals() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("svcnat-lab: cannot handle SIGINT/SIGTERM: {e}");
            return ExitCode::from(2);
        }
    };
    let backend = args.backend.lab();
    let result = Programs::discover()
        .and_then(|p| Lab::start_on(p, stop, feed, backend))
        .and_then(|mut lab| {
            lab.screenshot_dir.clone_from(&args.report);
            let result = lab.replay();
            if let Some(dir) = &args.report {
                let title = format!(
                    "svcnat lab replay: Load Balancing and Service Discovery with Services ({} backend{})",
                    backend.as_str(),
                    if args.api { ", fed through the API" } else { "" }
                );
                let outcome = result.as_ref().map(|_| ()).map_err(ToString::to_string);
                match write_report(dir, &title, &lab, &outcome) {
                    Ok(path) => println!("report: {}", path.display()),
                    Err(e) => eprintln!("svcnat-lab: cannot write the report in {}: {e}", dir.display()),
                }
            }
            result
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(LabError::Interrupted) => {
            eprintln!("svcnat-lab: interrupted; everything it made is removed");
            ExitCode::from(130)
        }
        Err(e @ LabError::Unsupported(_)) => {
            eprintln!("svcnat-lab: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("svcnat-lab: FAILED: {e}");
            ExitCode::from(1)
        }
    }
}
