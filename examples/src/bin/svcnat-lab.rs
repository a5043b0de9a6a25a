//! `svcnat-lab`: replays the lab "Load Balancing and Service Discovery with Services" in
//! network namespaces with svcnat-proxy, svcnat-dns and real traffic, printing each step and
//! what it observed. Exits 0 when every observation matches the lab, 1 when one does not,
//! 2 when the machine cannot run it (needs root, iproute2, iptables, getent), 130 on Ctrl-C.
//! Cleans up after itself in every case.
//!
//! ```text
//! svcnat-lab [--api] [--backend iptables|nftables] [--report DIR]
//! ```
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
    let backend = match args.backend {
        BackendArg::Iptables => LabBackend::Iptables,
        BackendArg::Nftables => LabBackend::Nftables,
    };
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
