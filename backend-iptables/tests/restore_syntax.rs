//! The rendered text against the real `iptables-restore` (1.8, nft and legacy flavours) in
//! throwaway network namespaces: every golden ruleset loads, `iptables-save` prints every
//! rule back exactly as rendered (except the statistic probability, which the kernel
//! stores as a 31-bit integer and prints re-encoded), partial updates apply on top of a
//! full restore, and the base jumps install with `iptables -I` and are found by `-C`.
//!
//! Needs root, `ip` and the iptables tools. Without them the tests print `SKIP: ...` and
//! pass, except under CI (`CI=true`), where a missing tool fails them. The root
//! namespace's rules are never touched: each test creates its own namespace (`svn-rs-`
//! PID counter) and a guard deletes it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../core/tests/support/scenario.rs"]
mod load;

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use svcnat_core::model::{IpFamily, ObjectName};
use svcnat_core::plan::Plan;
use svcnat_iptables::render::{Ruleset, Table, base_jumps};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace that is deleted when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!(
            "svn-rs-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns(name)
    }

    /// Runs a program inside the namespace, feeding `stdin`; returns (success, stdout,
    /// stderr).
    fn run(&self, program: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn restore(&self, program: &str, text: &str) {
        let (ok, _, err) = self.run(program, &["--noflush"], text);
        assert!(ok, "{program} --noflush failed: {err}\ninput:\n{text}");
    }

    fn save(&self, program: &str) -> String {
        let (ok, out, err) = self.run(program, &[], "");
        assert!(ok, "{program}: {err}");
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Whether an executable named `program` is on the PATH.
fn have(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|d| {
            fs::metadata(d.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Whether the environment can run these tests; prints why not, and fails under CI.
fn ready(test: &str) -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root".to_string());
    }
    for p in [
        "ip",
        "iptables-restore",
        "iptables-save",
        "ip6tables-restore",
    ] {
        if !have(p) {
            missing.push(p.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        !in_ci(),
        "{test}: CI=true and this test needs: {}",
        missing.join(", ")
    );
    eprintln!(
        "SKIP: {test}: needs {} (not failing outside CI)",
        missing.join(", ")
    );
    false
}

/// The flavours present: the default `iptables` and, when installed, explicit nft and
/// legacy binaries.
fn flavours() -> Vec<&'static str> {
    let mut v = Vec::new();
    for f in ["nft", "legacy"] {
        if have(&format!("iptables-{f}-restore")) && have(&format!("ip6tables-{f}-restore")) {
            v.push(f);
        } else {
            eprintln!("SKIP: flavour {f}: iptables-{f}-restore not installed");
        }
    }
    if v.is_empty() {
        v.push("");
    }
    v
}

fn program(family: IpFamily, flavour: &str, tool: &str) -> String {
    let base = match family {
        IpFamily::V4 => "iptables",
        IpFamily::V6 => "ip6tables",
    };
    match (flavour, tool) {
        ("", "") => base.to_string(),
        ("", t) => format!("{base}-{t}"),
        (f, "") => format!("{base}-{f}"),
        (f, t) => format!("{base}-{f}-{t}"),
    }
}

/// The `-A` lines of the chains in `chains` (a restore or save text), with the
/// probability split off so that it can be compared numerically.
fn rules_of(text: &str, chains: &[String]) -> Vec<(String, Option<f64>)> {
    text.lines()
        .filter(|l| l.starts_with("-A "))
        .filter(|l| {
            let c = l.split(' ').nth(1).unwrap_or("");
            chains.iter().any(|x| x == c)
        })
        .map(|l| match l.split_once("--probability ") {
            Some((a, b)) => {
                let (p, rest) = b.split_once(' ').unwrap_or((b, ""));
                (
                    format!("{a}--probability P {rest}"),
                    Some(p.parse().unwrap()),
                )
            }
            None => (l.to_string(), None),
        })
        .collect()
}

/// Checks that the kernel holds exactly `rules` (all of its chains, rule by rule).
fn assert_saved(ns: &Netns, family: IpFamily, flavour: &str, rules: &Ruleset, what: &str) {
    let want_text = rules.full_restore();
    let mut chains: Vec<String> = rules.chains().map(|(_, c)| c.to_string()).collect();
    chains.sort();
    chains.dedup();
    let mut saved = String::new();
    for t in Table::ALL {
        let (ok, out, err) = ns.run(&program(family, flavour, "save"), &["-t", t.as_str()], "");
        assert!(ok, "save: {err}");
        saved.push_str(&out);
    }
    // Every owned chain exists, and no other KUBE-SVC/SEP/... chain is left over.
    for (_, c) in rules.chains() {
        assert!(
            saved.contains(&format!(":{c} - [0:0]")),
            "{what}: chain {c} missing after restore"
        );
    }
    for l in saved.lines().filter_map(|l| l.strip_prefix(':')) {
        let c = l.split(' ').next().unwrap();
        if c.starts_with("KUBE-") {
            assert!(chains.iter().any(|x| x == c), "{what}: stale chain {c}");
        }
    }
    let mut want = rules_of(&want_text, &chains);
    let mut got = rules_of(&saved, &chains);
    want.sort_by(|a, b| a.0.cmp(&b.0));
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        want.iter().map(|r| &r.0).collect::<Vec<_>>(),
        got.iter().map(|r| &r.0).collect::<Vec<_>>(),
        "{what} ({flavour}): iptables-save does not print the rules as rendered"
    );
    for (w, g) in want.iter().zip(&got) {
        if let (Some(a), Some(b)) = (w.1, g.1) {
            // The kernel keeps lround(p * 2^31) / 2^31.
            assert!((a - b).abs() < 1e-9, "{what}: probability {a} saved as {b}");
        }
    }
}

/// (name, family, rendered rules) of every golden ruleset's plan.
fn golden_rulesets() -> Vec<(String, IpFamily, Ruleset)> {
    let mut v = Vec::new();
    for dir in load::scenario_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let (_, _, _, plan) = load::load(&dir);
        v.push((name, IpFamily::V4, Ruleset::new(&plan)));
    }
    v
}

#[test]
fn golden_files_load_and_save_back_unchanged() {
    if !ready("golden_files_load_and_save_back_unchanged") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut files: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rules"))
        .collect();
    files.sort();
    assert!(files.len() >= 8);
    for flavour in flavours() {
        for f in &files {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let family = if name.ends_with(".v6.rules") {
                IpFamily::V6
            } else {
                IpFamily::V4
            };
            let text = fs::read_to_string(f).unwrap();
            let ns = Netns::new();
            ns.restore(&program(family, flavour, "restore"), &text);
            // A second full restore over the same state is accepted too (declarations
            // flush under --noflush).
            ns.restore(&program(family, flavour, "restore"), &text);
            let saved = ns.save(&program(family, flavour, "save"));
            let chains: Vec<String> = text
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .map(|l| l.split(' ').next().unwrap().to_string())
                .collect();
            let mut want = rules_of(&text, &chains);
            let mut got = rules_of(&saved, &chains);
            want.sort_by(|a, b| a.0.cmp(&b.0));
            got.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(
                want.iter().map(|r| &r.0).collect::<Vec<_>>(),
                got.iter().map(|r| &r.0).collect::<Vec<_>>(),
                "{name} ({flavour}): iptables-save does not print the rules as rendered"
            );
        }
    }
}

#[test]
fn partial_updates_apply_on_top_of_a_full_restore() {
    if !ready("partial_updates_apply_on_top_of_a_full_restore") {
        return;
    }
    for flavour in flavours() {
        let dir = load::scenario_dir("lab-vote");
        let (mut cluster, node, cfg, mut plan) = load::load(&dir);
        let ns = Netns::new();
        let restore = program(IpFamily::V4, flavour, "restore");
        let mut rules = Ruleset::new(&plan);
        ns.restore(&restore, &rules.full_restore());
        // An endpoint goes away: one KUBE-SVC chain rewritten, one KUBE-SEP deleted.
        let _ = cluster.remove_pod(&ObjectName::new("instavote", "vote-dx8f4"));
        let diff = plan.update(&cluster);
        let text = rules.update(&plan, &diff).unwrap();
        assert!(text.contains("-X KUBE-SEP-"));
        ns.restore(&restore, &text);
        assert_saved(&ns, IpFamily::V4, flavour, &rules, "endpoint removed");
        // The selector matches nothing: every vote chain goes, REJECTs appear.
        let (_, _, _, bad) = load::load(&load::scenario_dir("lab-vote-bad-selector"));
        let diff = Plan::diff(&plan, &bad);
        let text = rules.update(&bad, &diff).unwrap();
        ns.restore(&restore, &text);
        assert_saved(&ns, IpFamily::V4, flavour, &rules, "selector changed");
        // And back, with externalIPs.
        let (_, _, _, ext) = load::load(&load::scenario_dir("lab-vote-externalips"));
        let diff = Plan::diff(&bad, &ext);
        let text = rules.update(&ext, &diff).unwrap();
        ns.restore(&restore, &text);
        assert_saved(&ns, IpFamily::V4, flavour, &rules, "external IPs added");
        let _ = (node, cfg);
    }
}

#[test]
fn every_scenario_restores_over_every_other() {
    if !ready("every_scenario_restores_over_every_other") {
        return;
    }
    // Moving between unrelated plans with partial updates only (chains created, rewritten
    // and deleted in one transaction) must always be accepted and leave the exact state.
    let sets = golden_rulesets();
    for flavour in flavours() {
        let ns = Netns::new();
        let restore = program(IpFamily::V4, flavour, "restore");
        let dirs = load::scenario_dirs();
        let plans: Vec<Plan> = dirs.iter().map(|d| load::load(d).3).collect();
        let mut current = Ruleset::new(&plans[0]);
        ns.restore(&restore, &current.full_restore());
        let mut prev = 0;
        for i in (1..plans.len()).chain([0]) {
            let diff = Plan::diff(&plans[prev], &plans[i]);
            if let Some(text) = current.update(&plans[i], &diff) {
                ns.restore(&restore, &text);
            }
            assert_eq!(current, sets[i].2);
            assert_saved(&ns, IpFamily::V4, flavour, &current, &sets[i].0);
            prev = i;
        }
    }
}

#[test]
fn base_jumps_install_and_are_found() {
    if !ready("base_jumps_install_and_are_found") {
        return;
    }
    for flavour in flavours() {
        for family in [IpFamily::V4, IpFamily::V6] {
            let ns = Netns::new();
            let empty = Plan::empty(svcnat_core::plan::NodeContext::new(
                "n",
                Vec::new(),
                Vec::new(),
            ));
            ns.restore(
                &program(family, flavour, "restore"),
                &Ruleset::new_for(&empty, family).full_restore(),
            );
            let tool = program(family, flavour, "");
            for (table, chain, rule) in base_jumps() {
                let mut args = vec!["-w", "5", "-t", table.as_str(), "-C", chain];
                args.extend(rule.iter().map(String::as_str));
                assert!(!ns.run(&tool, &args, "").0, "{chain} present before insert");
                args[4] = "-I";
                let (ok, _, err) = ns.run(&tool, &args, "");
                assert!(ok, "{tool} -I {chain} {rule:?}: {err}");
                args[4] = "-C";
                assert!(ns.run(&tool, &args, "").0, "{chain}: -C after -I");
            }
        }
    }
}
