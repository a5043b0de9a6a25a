//! The lab replay as an end-to-end test: runs `svcnat-lab` and checks that every step was
//! observed as the lab describes it, with the proxies and svcnat-dns watching the manifest
//! directory, and again (`--api`) following fake API servers the lab writes every edit to.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::Mutex;

/// One replay at a time: each runs two proxies, the DNS server and a dozen pods.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn replay(args: &[&str]) -> Option<String> {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = Command::new(env!("CARGO_BIN_EXE_svcnat-lab"))
        .args(args)
        .output()
        .expect("run svcnat-lab");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(2) && !svcnat_examples::testbed::in_ci() {
        // The machine cannot run the lab (a tool is missing): say so loudly.
        eprintln!("SKIP: {}", stderr.trim());
        return None;
    }
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
        "OK: the vote page, processed by a vote pod",
        "OK: a reload is processed by another pod",
        "OK: the vote does not go through: the vote pod cannot resolve redis",
        "OK: the vote goes through",
        "OK: the votes for Cats and Dogs are stored in redis",
        "OK: ping redis resolves to the ClusterIP, and nothing answers",
        "All steps of the lab observed",
    ] {
        assert!(stdout.contains(seen), "missing {seen:?}:\n{stdout}");
    }
    Some(stdout)
}

#[test]
fn the_lab_replays_with_real_traffic() {
    svcnat_examples::skip_unless_root!();
    let dir = std::env::temp_dir().join(format!("svcnat-lab-report-{}", std::process::id()));
    let Some(stdout) = replay(&["--report", dir.to_str().unwrap()]) else {
        return;
    };
    assert!(!stdout.contains("(API)"), "{stdout}");
    // The report: every step, what was run and seen, the drawings, the outcome.
    let page = std::fs::read_to_string(dir.join("index.html")).expect("the report");
    let shown = show_in_chromium(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    // What a reader's browser shows: the page's text, and a screenshot of it.
    let (text, png) = shown;
    assert!(text.contains("PASSED"), "{text}");
    assert!(
        text.contains("Cats vs Dogs") || text.contains("STEP 1"),
        "{text}"
    );
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    for shot in [
        "step1-vote-page.png",
        "step6-vote-fails.png",
        "step8-vote-recorded.png",
    ] {
        assert!(
            page.contains(&format!("<img src=\"{shot}\"")),
            "{shot} not in the report"
        );
    }
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
    let Some(stdout) = replay(&["--api"]) else {
        return;
    };
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
    let Some(stdout) = replay(&["--backend", "nftables"]) else {
        return;
    };
    assert!(
        stdout.contains("$ nft list chain ip svcnat service-"),
        "{stdout}"
    );
    assert!(
        stdout.contains("OK: five DNAT rules, one per pod"),
        "{stdout}"
    );
}

/// Opens the report `DIR/index.html` in headless Chromium, in a network namespace of its own
/// holding only a loopback (the page needs no network; the browser gets none): the text it
/// renders (`--dump-dom`) and a screenshot.
fn show_in_chromium(dir: &std::path::Path) -> (String, Vec<u8>) {
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let ns = Ns(format!("svcnat-report-{}", std::process::id()));
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );
    let url = format!("file://{}", dir.join("index.html").display());
    let profile = dir.join("chromium-profile");
    let chromium = |extra: &[&str]| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.0,
                "chromium",
                "--headless",
                "--no-sandbox",
            ])
            .args(["--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("run chromium")
    };
    let text = String::from_utf8_lossy(&chromium(&["--dump-dom"]).stdout).into_owned();
    let shot = dir.join("report.png");
    chromium(&[
        "--window-size=1200,2000",
        &format!("--screenshot={}", shot.display()),
    ]);
    (text, std::fs::read(&shot).unwrap_or_default())
}

#[test]
fn the_lab_replays_on_the_userspace_datapath() {
    svcnat_examples::skip_unless_root!();
    let Some(stdout) = replay(&["--backend", "userspace"]) else {
        return;
    };
    assert!(
        stdout.contains("OK: the datapath forwarded the browser's frames"),
        "{stdout}"
    );
    assert!(stdout.contains("== STEP 2: the node's plan spreads over the five pods"));
}

#[test]
fn the_lab_says_why_ipvs_cannot_run_here() {
    svcnat_examples::skip_unless_root!();
    if std::path::Path::new("/proc/net/ip_vs").exists() {
        // Nothing to refuse: the lab runs on IPVS there.
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_svcnat-lab"))
        .args(["--backend", "ipvs"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("this kernel has no IPVS"), "{stderr}");
    assert!(stderr.contains("backend-ipvs/vm/run.sh"), "{stderr}");
}
