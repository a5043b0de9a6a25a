//! `svcnat-lab`: replays the lab "Load Balancing and Service Discovery with Services" in
//! network namespaces with svcnat-proxy, svcnat-dns and real traffic, printing each step and
//! what it observed. Exits 0 when every observation matches the lab, 1 when one does not,
//! 2 when the machine cannot run it (needs root, iproute2, iptables, getent), 130 on Ctrl-C.
//! Cleans up after itself in every case.
//!
//! ```text
//! svcnat-lab [--api] [--backend iptables|nftables]
//! ```
//!
//! With `--api` the proxies and svcnat-dns follow fake Kubernetes API servers
//! (`--kubeconfig`) that the lab writes every manifest edit to, as API objects, instead of
//! watching the manifest directory; every observation is the same.

use std::process::ExitCode;

use clap::Parser;
use svcnat_examples::lab::{Feed, Lab, LabBackend, LabError, Programs};

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
}

/// `--backend`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum BackendArg {
    /// iptables (kube-proxy's iptables layout).
    Iptables,
    /// nftables (kube-proxy's nftables layout).
    Nftables,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let feed = if args.api { Feed::Api } else { Feed::Manifests };
    // The first Ctrl-C stops the replay and cleans up; a second one exits at once.
    let stop = match svcnat_examples::cli::stop_on_signals() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("svcnat-lab: cannot handle SIGINT/SIGTERM: {e}");
            return ExitCode::from(2);
        }
    };
    let result = Programs::discover()
        .and_then(|p| {
            let backend = match args.backend {
                BackendArg::Iptables => LabBackend::Iptables,
                BackendArg::Nftables => LabBackend::Nftables,
            };
            Lab::start_on(p, stop, feed, backend)
        })
        .and_then(|mut lab| lab.replay());
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
