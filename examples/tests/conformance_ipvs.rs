//! The conformance suite against the IPVS backend, with real traffic between network
//! namespaces, on a real IPVS kernel.
//!
//! This machine's kernel has no IPVS, so `suite_in_a_vm` boots Debian's cloud kernel under
//! qemu (`backend-ipvs/vm/run.sh`) with this test binary, `svcnat-podserver`,
//! `svcnat-probe`, `ip`, `sysctl` and iptables inside, and runs the `in_vm::` tests there
//! (`SVCNAT_IPVS_VM=1`). Outside the VM those tests print `SKIP` and return: the VM run is
//! what checks them, and it fails when any of them fails. Without qemu, `suite_in_a_vm`
//! prints `SKIP:` (and fails under `CI=true`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use svcnat_examples::conformance::{Backend, Scenario};
use svcnat_ipvs::driver::{Ipvs, IpvsConfig, Scheduler};

struct IpvsBackend;

fn in_vm() -> bool {
    std::env::var("SVCNAT_IPVS_VM").as_deref() == Ok("1")
}

impl Backend for IpvsBackend {
    type Dp = Ipvs;

    fn name(&self) -> String {
        "ipvs".into()
    }

    fn dataplane(&self, node_ns: &str) -> Result<Ipvs, String> {
        Ipvs::new(IpvsConfig {
            scheduler: Scheduler::Rr,
            netns: Some(node_ns.to_string()),
            ..IpvsConfig::default()
        })
        .map_err(|e| e.to_string())
    }

    fn unsupported(&self, scenario: Scenario) -> Option<&'static str> {
        if !in_vm() {
            return Some(
                "this kernel has no IPVS; the scenario runs inside the qemu VM of \
                 conformance_ipvs::suite_in_a_vm",
            );
        }
        match scenario {
            _ => None,
        }
    }
}

mod in_vm {
    use super::*;
    svcnat_examples::conformance_suite!(IpvsBackend);
}

#[test]
fn suite_in_a_vm() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        let why = "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86 busybox-static ipvsadm kmod)";
        if svcnat_examples::testbed::in_ci() {
            panic!("CI=true but {why}");
        }
        eprintln!("SKIP: {why}");
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../backend-ipvs/vm/run.sh");
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg("--file")
        .arg(format!("{}:/bin/conformance-ipvs", exe.display()))
        .arg("--file")
        .arg(format!(
            "{}:/bin/svcnat-podserver",
            env!("CARGO_BIN_EXE_svcnat-podserver")
        ))
        .arg("--file")
        .arg(format!(
            "{}:/bin/svcnat-probe",
            env!("CARGO_BIN_EXE_svcnat-probe")
        ))
        .args(["--env", "SVCNAT_IPVS_VM=1"])
        .args(["--env", "SVCNAT_PODSERVER=/bin/svcnat-podserver"])
        .args(["--env", "SVCNAT_PROBE=/bin/svcnat-probe"])
        .args(["--", "/bin/conformance-ipvs", "--test-threads=2"])
        // SVCNAT_IPVS_VM_FILTER narrows the run to matching scenarios while debugging.
        .arg(std::env::var("SVCNAT_IPVS_VM_FILTER").unwrap_or_else(|_| "in_vm::".into()))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    println!("{console}");
    let passed: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("test in_vm::") && l.ends_with(" ok"))
        .collect();
    eprintln!(
        "IPVS conformance in the VM: {} scenarios passed, VM run {:.0} s",
        passed.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "the conformance suite failed in the VM ({}); console above",
        out.status
    );
    assert!(
        console.contains("test result: ok."),
        "no test summary from the VM"
    );
}
