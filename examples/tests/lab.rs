//! The lab replay as an end-to-end test: runs `svcnat-lab` and checks that every step was
//! observed as the lab describes it, with the proxies and svcnat-dns watching the manifest
//! directory, and again (`--api`) following fake API servers the lab writes every edit to.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::Mutex;

/// One replay at a time: each runs two proxies, the DNS server and a dozen pods.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn replay(args: &[&str]) -> String {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = Command::new(env!("CARGO_BIN_EXE_svcnat-lab"))
        .args(args)
        .output()
        .expect("run svcnat-lab");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "svcnat-lab {args:?} failed ({:?})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    for step in 1..=8 {
        assert!(
            stdout.contains(&format!("== STEP {step}:")),
            "step {step} missing:\n{stdout}"
        );
    }
    for seen in [
        "OK: all five vote pods answer on 192.168.50.11:30000",
        "OK: all five vote pods answer on 192.168.50.12:30000",
        "OK: connections to :30000 are refused",
        "OK: exactly 2 pods answer",
        "OK: EXTERNAL-IP lists both node addresses",
        "OK: redis does not resolve",
        "OK: the FQDN redis.instavote.svc.cluster.local",
        "OK: redis pods answer the vote pod",
        "All steps of the lab observed",
    ] {
        assert!(stdout.contains(seen), "missing {seen:?}:\n{stdout}");
    }
    stdout
}

#[test]
fn the_lab_replays_with_real_traffic() {
    svcnat_examples::skip_unless_root!();
    let dir = std::env::temp_dir().join(format!("svcnat-lab-report-{}", std::process::id()));
    let stdout = replay(&["--report", dir.to_str().unwrap()]);
    assert!(!stdout.contains("(API)"), "{stdout}");
    // The report: every step, what was run and seen, the drawings, the outcome.
    let page = std::fs::read_to_string(dir.join("index.html")).expect("the report");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("id=\"outcome\">PASSED"), "{page}");
    assert_eq!(page.matches("<h2>STEP ").count(), 8, "{page}");
    assert!(page.contains("<span class=\"cmd\">$ kubectl apply -f vote-svc.yaml</span>"));
    assert!(page.contains("<span class=\"ok\">  OK: all five vote pods answer"));
    assert_eq!(
        page.matches("<figure><svg").count(),
        2,
        "vote and redis drawn"
    );
    for seen in [
        "instavote/vote: its path through node-0",
        "instavote/redis: its path through node-0",
        "node node-0",
        "node node-1",
        "KUBE-SVC-",
        "p 0.2000 → 20%",
    ] {
        assert!(page.contains(seen), "the report lacks {seen:?}");
    }
    // A drawing sits inside the step that took it: the vote drawing in step 2.
    let step2 = page.find("<h2>STEP 2:").unwrap();
    let step3 = page.find("<h2>STEP 3:").unwrap();
    let vote = page.find("instavote/vote: its path").unwrap();
    assert!(step2 < vote && vote < step3);
}

#[test]
fn the_lab_replays_through_the_api() {
    svcnat_examples::skip_unless_root!();
    let stdout = replay(&["--api"]);
    // Every edit reached the programs as API writes.
    for write in [
        "(control plane) API server https://127.0.0.1:",
        "(API) applied Node node-0",
        "(API) applied Service kube-system/kube-dns",
        "(API) applied Service instavote/vote",
        "(API) applied EndpointSlice instavote/vote-",
        "(API) applied Service instavote/redis",
        "(API) applied EndpointSlice instavote/redis-",
    ] {
        assert!(stdout.contains(write), "missing {write:?}:\n{stdout}");
    }
}

#[test]
fn the_lab_replays_on_nftables() {
    svcnat_examples::skip_unless_root!();
    let stdout = replay(&["--backend", "nftables"]);
    assert!(
        stdout.contains("$ nft list chain ip svcnat service-"),
        "{stdout}"
    );
    assert!(
        stdout.contains("OK: five DNAT rules, one per pod"),
        "{stdout}"
    );
}
