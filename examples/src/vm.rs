//! Conformance tests run on another kernel: a test binary booted in the qemu VM of
//! `backend-ipvs/vm/run.sh` (Debian's cloud kernel, which has IPVS and SCTP; this
//! machine's kernel has neither).
//!
//! [`run_in_vm`] copies the test binary and the testbed's programs into the VM's initramfs,
//! runs the named tests there as root, echoes the serial console and fails (panics, this is
//! a test harness) when they fail or the VM reports nothing. Without qemu it prints `SKIP:`
//! (and fails under `CI=true`).

// This module is a test harness: a failed run is an assertion, and assertions panic.
#![allow(clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

/// A test binary's run inside the VM.
#[derive(Debug, Clone)]
pub struct VmRun {
    /// A name for messages (`IPVS conformance`).
    pub label: String,
    /// The test binary (the running test's own executable).
    pub exe: PathBuf,
    /// `svcnat-podserver`, `svcnat-probe` and `svcnat-proxy`, put in the VM's `/bin`.
    pub podserver: PathBuf,
    /// See [`VmRun::podserver`].
    pub probe: PathBuf,
    /// See [`VmRun::podserver`].
    pub proxy: PathBuf,
    /// `NAME=VALUE` settings for the run, besides where the programs are.
    pub env: Vec<String>,
    /// The test harness's arguments: filters, `--exact`, `--test-threads`.
    pub args: Vec<String>,
}

/// The testbed's programs as Cargo built them for this integration test, for [`VmRun`]:
/// `(podserver, probe, proxy)`.
#[macro_export]
macro_rules! vm_programs {
    () => {
        (
            ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_svcnat-podserver")),
            ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_svcnat-probe")),
            ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_svcnat-proxy")),
        )
    };
}

/// Whether qemu is there to boot the VM; prints `SKIP: reason` (and panics under
/// `CI=true`) when not.
pub fn qemu_or_skip() -> bool {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    let why = "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86 busybox-static ipvsadm kmod)";
    if crate::testbed::in_ci() {
        panic!("CI=true but {why}");
    }
    eprintln!("SKIP: {why}");
    false
}

/// Boots the VM, runs the tests `run` names in it, and checks they passed; returns the
/// console. Skips (returns `None`) without qemu.
pub fn run_in_vm(run: &VmRun) -> Option<String> {
    if !qemu_or_skip() {
        return None;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../backend-ipvs/vm/run.sh");
    let start = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(&script);
    for (src, dest) in [
        (&run.exe, "/bin/suite"),
        (&run.podserver, "/bin/svcnat-podserver"),
        (&run.probe, "/bin/svcnat-probe"),
        (&run.proxy, "/bin/svcnat-proxy"),
    ] {
        cmd.arg("--file").arg(format!("{}:{dest}", src.display()));
    }
    for env in [
        "SVCNAT_PODSERVER=/bin/svcnat-podserver",
        "SVCNAT_PROBE=/bin/svcnat-probe",
        "SVCNAT_PROXY=/bin/svcnat-proxy",
    ]
    .into_iter()
    .map(str::to_string)
    .chain(run.env.iter().cloned())
    {
        cmd.arg("--env").arg(env);
    }
    cmd.args(["--", "/bin/suite"]).args(&run.args);
    let out = match cmd.stderr(Stdio::inherit()).output() {
        Ok(out) => out,
        Err(e) => panic!("{}: {}: {e}", run.label, script.display()),
    };
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{console}");
    let passed = console
        .lines()
        .filter(|l| l.starts_with("test ") && l.ends_with(" ok"))
        .count();
    eprintln!(
        "{} in the VM: {passed} tests passed, VM run {:.0} s",
        run.label,
        start.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "{} failed in the VM ({}); console above",
        run.label,
        out.status
    );
    assert!(
        console.contains("test result: ok."),
        "{}: no test summary from the VM",
        run.label
    );
    Some(console)
}
