//! iptables backend benchmark: 10,000 Services x 5 endpoints in a fresh network namespace,
//! for each flavour (legacy and nft):
//! - render time (plan -> iptables-restore text),
//! - the kernel's own cost: `iptables-restore --noflush` of that text, timed alone,
//! - a full sync through the driver,
//! - one endpoint changing, end to end: incremental plan update, partial render, restore.
//!
//! Prints each as a ratio of the restore measured in the same run. Needs root and the
//! iptables tools; without them it says why and exits. Run with
//! `cargo bench -p svcnat-iptables --bench sync`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use svcnat_core::model::ObjectName;
use svcnat_core::plan::{Dataplane, NodeContext, Plan};
use svcnat_core::synthetic;
use svcnat_iptables::driver::{Flavour, Iptables, IptablesConfig, Runner};
use svcnat_iptables::render::Ruleset;

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("svbench-{}-{tag}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "ip netns add {name} failed");
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn restore_alone(ns: &str, program: &str, text: &str) -> Duration {
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program, "--noflush", "--wait", "5"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn restore");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{program} failed");
    t.elapsed()
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let have = |p: &str| Command::new(p).arg("--version").output().is_ok();
    if !root || !have("iptables-legacy-restore") || !have("iptables-nft-restore") {
        eprintln!(
            "SKIP: the iptables benchmark needs root, iproute2 and iptables (legacy and nft)"
        );
        return;
    }
    let (services, endpoints, runs) = if quick { (500, 5, 1) } else { (10_000, 5, 3) };
    let mut cluster = synthetic::cluster(&synthetic::Shape::new(services, endpoints));
    let node = NodeContext::new(
        "node-1",
        vec![IpAddr::from([192, 168, 50, 11])],
        vec!["10.244.0.0/14".parse().unwrap()],
    );
    let plan = Plan::compile(&cluster, &node);
    let render = median(
        (0..runs.max(3))
            .map(|_| {
                let t = Instant::now();
                let rules = Ruleset::new(&plan);
                black_box(rules.full_restore());
                t.elapsed()
            })
            .collect(),
    );
    let rules = Ruleset::new(&plan);
    let text = rules.full_restore();
    println!(
        "{services} services x {endpoints} endpoints: {} rules, {} lines of iptables-restore input",
        rules.rule_count(),
        text.lines().count()
    );
    println!("render (plan -> text):                  {render:>10.3?}");
    for flavour in [Flavour::Legacy, Flavour::Nft] {
        let tag = match flavour {
            Flavour::Legacy => "legacy",
            Flavour::Nft => "nft",
        };
        // The kernel's own cost: a restore into an empty namespace, timed alone, of the text
        // the driver writes for this flavour (nft: blocks of 500 chains, because
        // iptables-nft-restore is quadratic in the chains of one transaction).
        let flavour_text = match flavour {
            Flavour::Legacy => text.clone(),
            Flavour::Nft => rules.full_restore_batched(500),
        };
        let restore = median(
            (0..runs)
                .map(|_| {
                    let ns = Netns::new(tag);
                    restore_alone(&ns.0, &format!("iptables-{tag}-restore"), &flavour_text)
                })
                .collect(),
        );
        let ns = Netns::new(tag);
        let mut dp = Iptables::new(IptablesConfig {
            runner: Runner::netns(ns.0.clone()),
            flavour: Some(flavour),
            canary_interval: Duration::from_secs(3600),
            ..IptablesConfig::default()
        })
        .unwrap();
        let t = Instant::now();
        dp.resync(&plan).unwrap();
        let full = t.elapsed();
        // One endpoint changes readiness, back and forth.
        let target = ObjectName::new("ns7", format!("svc-{}-3", services / 2 + 7));
        let mut p = plan.clone();
        let partial = median(
            (0..runs.max(5))
                .map(|i| {
                    let mut pod = cluster.pod(&target).cloned().expect("pod");
                    pod.ready = i % 2 == 1;
                    let t = Instant::now();
                    let _ = cluster.upsert_pod(pod);
                    let diff = p.update(&cluster);
                    assert!(!diff.is_empty());
                    let report = dp.sync(&p, &diff).unwrap();
                    assert!(!report.full);
                    t.elapsed()
                })
                .collect(),
        );
        println!("--- {tag}");
        println!("iptables-restore of the full set:       {restore:>10.3?}  (reference)");
        println!(
            "render / restore:                       {:>10.2}%  (target < 10%)",
            100.0 * render.as_secs_f64() / restore.as_secs_f64()
        );
        println!(
            "full sync through the driver:           {full:>10.3?}  = {:.2}x the restore",
            full.as_secs_f64() / restore.as_secs_f64()
        );
        println!(
            "one-endpoint change, end to end:        {partial:>10.3?}  = {:.2}% of the full sync (target < 5%)",
            100.0 * partial.as_secs_f64() / full.as_secs_f64()
        );
        dp.cleanup().unwrap();
    }
}
