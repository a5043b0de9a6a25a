//! `svcnat-lab`: replays the lab "Load Balancing and Service Discovery with Services" in
//! network namespaces with svcnat-proxy, svcnat-dns and real traffic, printing each step and
//! what it observed. Exits 0 when every observation matches the lab, 1 when one does not,
//! 2 when the machine cannot run it (needs root, iproute2, iptables, getent). Cleans up
//! after itself, also on Ctrl-C.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use svcnat_examples::lab::{Lab, LabError, Programs};

fn main() -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&stop)) {
            eprintln!("svcnat-lab: cannot handle signal {sig}: {e}");
            return ExitCode::from(2);
        }
    }
    let result = Programs::discover()
        .and_then(|p| Lab::start(p, stop))
        .and_then(|mut lab| lab.replay());
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
