//! The lab replay as an end-to-end test: runs `svcnat-lab` and checks that every step was
//! observed as the lab describes it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn the_lab_replays_with_real_traffic() {
    svcnat_examples::skip_unless_root!();
    let out = Command::new(env!("CARGO_BIN_EXE_svcnat-lab"))
        .output()
        .expect("run svcnat-lab");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "svcnat-lab failed ({:?})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
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
}
