//! The iptables driver against a real kernel, in a node namespace of the testbed: it never
//! touches chains it does not own, removes stale chains it owns, repairs a flushed table
//! (the canary), and a failed restore keeps the previous rules and names the failing line.
//! Both flavours.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::time::Duration;

use svcnat_core::model::{Cluster, ObjectName, Pod, Protocol};
use svcnat_core::plan::{Dataplane, NodeContext, Plan};
use svcnat_examples::conformance::service;
use svcnat_examples::testbed::{Testbed, TestbedSpec};
use svcnat_iptables::driver::{Flavour, Iptables, IptablesConfig, Runner};

fn cluster(services: &[&str]) -> Cluster {
    let mut c = Cluster::simulated();
    for (i, name) in services.iter().enumerate() {
        c.upsert_service(service(
            name,
            "app",
            name,
            IpAddr::from([10, 96, 1, 10 + i as u8]),
            80,
            Protocol::Tcp,
        ));
        let mut p = Pod::new(
            ObjectName::new("default", format!("{name}-0")),
            IpAddr::from([10, 244, 0, 20 + i as u8]),
        );
        p.labels.insert("app".into(), name.to_string());
        p.node_name = Some("node-0".into());
        c.upsert_pod(p);
    }
    c
}

fn save(tb: &Testbed, ns: &str, flavour: &str) -> String {
    tb.exec_ok(ns, [format!("iptables-{flavour}-save")])
        .unwrap()
}

fn run(tb: &Testbed, ns: &str, flavour: &str, args: &[&str]) {
    let mut v = vec![format!("iptables-{flavour}")];
    v.extend(args.iter().map(|s| s.to_string()));
    tb.exec_ok(ns, v).unwrap();
}

fn check(flavour: Flavour) {
    let tag = match flavour {
        Flavour::Legacy => "legacy",
        Flavour::Nft => "nft",
    };
    let tb = Testbed::new(TestbedSpec::new(1, 0)).unwrap();
    let ns = tb.ns_of_node(0).to_string();
    let node = NodeContext::new(
        "node-0",
        vec![tb.node_ip(0)],
        vec!["10.244.0.0/16".parse().unwrap()],
    );
    let mut dp = Iptables::new(IptablesConfig {
        runner: Runner::netns(ns.clone()),
        flavour: Some(flavour),
        canary_interval: Duration::ZERO,
        ..IptablesConfig::default()
    })
    .unwrap();

    // Someone else's rules: a chain of their own and a rule in a built-in chain.
    run(&tb, &ns, tag, &["-t", "filter", "-N", "THEIRS"]);
    run(
        &tb,
        &ns,
        tag,
        &[
            "-t",
            "filter",
            "-A",
            "THEIRS",
            "-s",
            "192.0.2.1",
            "-j",
            "DROP",
        ],
    );
    run(
        &tb,
        &ns,
        tag,
        &["-t", "filter", "-A", "FORWARD", "-j", "THEIRS"],
    );
    // A stale chain of ours, left by an earlier run.
    run(
        &tb,
        &ns,
        tag,
        &["-t", "nat", "-N", "KUBE-SVC-STALESTALESTALE"],
    );

    let a = cluster(&["alpha", "beta"]);
    let plan_a = Plan::compile(&a, &node);
    let report = dp.resync(&plan_a).unwrap();
    assert!(report.full);
    let saved = save(&tb, &ns, tag);
    assert!(
        !saved.contains("KUBE-SVC-STALESTALESTALE"),
        "stale chain removed:\n{saved}"
    );
    assert!(saved.contains(":THEIRS"), "foreign chain kept:\n{saved}");
    assert!(
        saved.contains("-A THEIRS -s 192.0.2.1/32 -j DROP"),
        "foreign rule kept:\n{saved}"
    );
    assert!(
        saved.contains("-A FORWARD -j THEIRS"),
        "foreign jump kept:\n{saved}"
    );
    assert!(saved.contains("alpha cluster IP") && saved.contains("beta cluster IP"));
    // Jumps from the built-in chains are installed once, also after another full sync.
    dp.resync(&plan_a).unwrap();
    let saved = save(&tb, &ns, tag);
    let jumps = saved
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING") && l.ends_with("-j KUBE-SERVICES"))
        .count();
    assert_eq!(jumps, 1, "one PREROUTING jump:\n{saved}");

    // Someone flushes and deletes the nat table's chains: the canary is gone, and the next
    // (partial) sync turns into a full resync that repairs everything.
    run(&tb, &ns, tag, &["-t", "nat", "-F"]);
    run(&tb, &ns, tag, &["-t", "nat", "-X"]);
    let b = cluster(&["alpha", "beta", "gamma"]);
    let plan_b = Plan::compile(&b, &node);
    let report = dp.sync(&plan_b, &Plan::diff(&plan_a, &plan_b)).unwrap();
    assert!(report.full, "a missing canary forces a full resync");
    let saved = save(&tb, &ns, tag);
    for name in ["alpha", "beta", "gamma"] {
        assert!(
            saved.contains(&format!("{name} cluster IP")),
            "{name} back:\n{saved}"
        );
    }
    assert!(saved.contains(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    ));

    // A foreign rule now refers to gamma's endpoint chain, so deleting gamma cannot delete
    // that chain. The chain is kept (flushed, with a warning) and every other update of
    // the same sync applies: gamma's rules go, delta arrives.
    let sep = saved
        .lines()
        .filter_map(|l| l.strip_prefix(":"))
        .filter_map(|l| l.split_whitespace().next())
        .find(|c| {
            c.starts_with("KUBE-SEP-") && saved.contains(&format!("-A {c} -s 10.244.0.22/32"))
        })
        .expect("gamma's endpoint chain")
        .to_string();
    run(
        &tb,
        &ns,
        tag,
        &["-t", "nat", "-I", "OUTPUT", "-d", "192.0.2.99", "-j", &sep],
    );
    let c = cluster(&["alpha", "beta", "delta"]);
    let plan_c = Plan::compile(&c, &node);
    let report = dp.sync(&plan_c, &Plan::diff(&plan_b, &plan_c)).unwrap();
    assert!(
        report.warnings.iter().any(|w| w.contains(&sep)),
        "the kept chain is reported: {:?}",
        report.warnings
    );
    let after = save(&tb, &ns, tag);
    assert!(!after.contains("gamma"), "gamma's rules removed:\n{after}");
    assert!(after.contains("delta cluster IP"), "delta added:\n{after}");
    assert!(
        after.contains(&format!(":{sep} ")),
        "the referenced chain is kept:\n{after}"
    );
    assert!(
        !after.contains(&format!("-A {sep} ")),
        "the kept chain is flushed:\n{after}"
    );
    // A later update applies too, while the reference stays.
    let d = cluster(&["alpha", "beta", "delta", "epsilon"]);
    let plan_d = Plan::compile(&d, &node);
    let report = dp.resync(&plan_d).unwrap();
    assert!(report.warnings.iter().any(|w| w.contains(&sep)));
    assert!(save(&tb, &ns, tag).contains("epsilon cluster IP"));
    // Once the reference is gone, the next full sync deletes the chain.
    run(
        &tb,
        &ns,
        tag,
        &["-t", "nat", "-D", "OUTPUT", "-d", "192.0.2.99", "-j", &sep],
    );
    let report = dp.resync(&plan_d).unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let saved = save(&tb, &ns, tag);
    assert!(!saved.contains(&sep), "its chain removed:\n{saved}");

    // Cleanup removes everything svcnat installed and nothing else.
    dp.cleanup().unwrap();
    let saved = save(&tb, &ns, tag);
    assert!(!saved.contains("KUBE-"), "cleanup left:\n{saved}");
    assert!(
        saved.contains("-A FORWARD -j THEIRS"),
        "foreign rules kept:\n{saved}"
    );
}

#[test]
fn legacy_driver_owns_only_its_chains_and_recovers() {
    svcnat_examples::skip_unless_root!();
    check(Flavour::Legacy);
}

#[test]
fn nft_driver_owns_only_its_chains_and_recovers() {
    svcnat_examples::skip_unless_root!();
    check(Flavour::Nft);
}
