//! The conformance suite against the IPVS backend, with real traffic between network
//! namespaces, on a real IPVS kernel.
//!
//! This machine's kernel has no IPVS, so `suite_in_a_vm` boots Debian's cloud kernel under
//! qemu (`backend-ipvs/vm/run.sh`) with this test binary, `svcnat-podserver`,
//! `svcnat-probe`, `svcnat-proxy`, `ip`, `sysctl` and iptables inside, and runs the `in_vm::` tests there
//! (`SVCNAT_IPVS_VM=1`). Outside the VM those tests print `SKIP` and return: the VM run is
//! what checks them, and it fails when any of them fails. Without qemu, `suite_in_a_vm`
//! prints `SKIP:` (and fails under `CI=true`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};

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
        (scenario == Scenario::NodePortOnLocalhost).then_some(
            "IPVS does not serve NodePorts on 127.0.0.1 (nor does kube-proxy's IPVS mode)",
        )
    }
}

mod in_vm {
    use super::*;
    svcnat_examples::conformance_suite!(IpvsBackend);

    /// `svcnat-proxy --backend ipvs` in a fresh namespace: programs IPVS from a manifest
    /// directory, and `--cleanup` removes it.
    #[test]
    fn proxy_backend_ipvs() {
        if !in_vm() {
            eprintln!("SKIP: runs inside the qemu VM of conformance_ipvs::suite_in_a_vm");
            return;
        }
        use std::io::{BufRead, BufReader};
        let ns = format!("svpx{}", std::process::id());
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        run(&["netns", "add", &ns]);
        // IPVS refuses NAT destinations (EINVAL) in a namespace whose loopback is down, and
        // a node has routes to its pods: set both up as on a node.
        run(&["-n", &ns, "link", "set", "lo", "up"]);
        run(&["-n", &ns, "link", "add", "pods", "type", "dummy"]);
        run(&["-n", &ns, "link", "set", "pods", "up"]);
        run(&["-n", &ns, "route", "add", "10.244.0.0/16", "dev", "pods"]);
        let dir = std::env::temp_dir().join(format!("{ns}-manifests"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("web.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
             spec: {clusterIP: 10.96.7.7, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: default, labels: {app: web}}\n\
             spec: {nodeName: n, containers: [{name: app, image: x}]}\n\
             status: {podIP: 10.244.0.10, phase: Running, conditions: [{type: Ready, status: 'True'}]}\n",
        )
        .unwrap();
        let proxy = std::env::var("SVCNAT_PROXY")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_svcnat-proxy").to_string());
        let proxy = proxy.as_str();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns, proxy, "--backend", "ipvs"])
            .args(["--ipvs-scheduler", "lc", "--node-name", "n"])
            .args(["--metrics-bind-address", "", "--manifests"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // The first line is `ready` after the first successful sync; a sync that keeps
        // failing would never print it, so the wait is bounded (a guard, not a speed check).
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap_or_default();
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        assert_eq!(line.trim(), "ready");
        let table = run(&["netns", "exec", &ns, "ipvsadm", "-Ln"]);
        let _ = child.kill();
        let _ = child.wait();
        println!("{table}");
        assert!(table.contains("TCP  10.96.7.7:80 lc"), "{table}");
        assert!(table.contains("-> 10.244.0.10:8080"), "{table}");
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                proxy,
                "--backend",
                "ipvs",
                "--cleanup",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let table = run(&["netns", "exec", &ns, "ipvsadm", "-Ln"]);
        run(&["netns", "del", &ns]);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!table.contains("10.96.7.7"), "{table}");
    }
}

#[test]
fn suite_in_a_vm() {
    let (podserver, probe, proxy) = svcnat_examples::vm_programs!();
    svcnat_examples::vm::run_in_vm(&svcnat_examples::vm::VmRun {
        label: "IPVS conformance".into(),
        exe: std::env::current_exe().unwrap(),
        podserver,
        probe,
        proxy,
        env: vec!["SVCNAT_IPVS_VM=1".into()],
        // SVCNAT_IPVS_VM_FILTER (test name filters, separated by spaces) narrows the run to
        // matching scenarios while debugging.
        args: std::iter::once("--test-threads=2".to_string())
            .chain(
                std::env::var("SVCNAT_IPVS_VM_FILTER")
                    .unwrap_or_else(|_| "in_vm::".into())
                    .split_whitespace()
                    .map(String::from),
            )
            .collect(),
    });
}
