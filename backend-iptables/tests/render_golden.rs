//! Golden renderer tests: every core scenario (`core/tests/scenarios/*`, loaded as
//! `core/tests/scenarios.rs` loads it) renders to `tests/golden/<scenario>.rules`, the full
//! `iptables-restore` input of `Ruleset::new(&plan)`; scenarios defined here add IPv6 and
//! the rarer paths (`<name>.v6.rules` is the IPv6 ruleset). After a deliberate change,
//! regenerate with `SVCNAT_BLESS=1 cargo test -p svcnat-iptables --test render_golden` and
//! review the diff.
//!
//! The update tests check that `Ruleset::update` patches a ruleset into exactly
//! `Ruleset::new_for` of the new plan, and that its partial restore text, applied with
//! `--noflush` semantics to the previous full state, gives the new full state.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../core/tests/support/scenario.rs"]
mod load;
#[path = "support/local_plans.rs"]
mod plans;
use plans::{all_plans, has_family, local_scenario};

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use proptest::prelude::*;
use svcnat_core::model::*;
use svcnat_core::plan::{Plan, PlanDiff};
use svcnat_iptables::render::{Ruleset, Table, base_jump_order, base_jumps};
use svcnat_iptables::trace::RestoreModel;

#[test]
fn golden_rules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("SVCNAT_BLESS").is_some();
    let mut failures = Vec::new();
    let mut written = BTreeSet::new();
    for (name, plan) in all_plans() {
        let mut outputs = vec![(format!("{name}.rules"), Ruleset::new(&plan).full_restore())];
        if has_family(&plan, IpFamily::V6) {
            outputs.push((
                format!("{name}.v6.rules"),
                Ruleset::new_for(&plan, IpFamily::V6).full_restore(),
            ));
        }
        for (file, got) in outputs {
            let path = root.join(&file);
            written.insert(file);
            if bless {
                fs::write(&path, &got).unwrap();
                continue;
            }
            let want = fs::read_to_string(&path).unwrap_or_default();
            if want != got {
                failures.push(format!(
                    "{} differs; expected:\n{want}\ngot:\n{got}",
                    path.display()
                ));
            }
        }
    }
    // No stale golden files.
    for e in fs::read_dir(&root).unwrap() {
        let f = e.unwrap().file_name().to_string_lossy().into_owned();
        if f.ends_with(".rules") && !written.contains(&f) {
            failures.push(format!("stale golden file {f}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn chain<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("-A {name} ");
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

#[test]
fn batched_full_restore_gives_the_same_state_and_every_block_is_consistent() {
    for (name, plan) in all_plans() {
        for family in [IpFamily::V4, IpFamily::V6] {
            let rules = Ruleset::new_for(&plan, family);
            let want = RestoreModel::of(&rules).unwrap();
            for batch in [1, 2, 3, 7, 500] {
                // The model refuses a jump to a chain that does not exist yet, so applying
                // the blocks one commit at a time proves the dependency order.
                let mut got = RestoreModel::new();
                got.apply(&rules.full_restore_batched(batch))
                    .unwrap_or_else(|e| panic!("{name} {family:?} batch {batch}: {e}"));
                assert_eq!(got, want, "{name} {family:?} batch {batch}");
            }
        }
    }
}

#[test]
fn lab_vote_has_the_labs_chains_and_probabilities() {
    let (_, _, _, plan) = load::load(&load::scenario_dir("lab-vote"));
    let text = Ruleset::new(&plan).full_restore();
    let svc = chain(&text, "KUBE-SVC-VIQHAVHDK4QE7NA4");
    let seps = [
        "RFJGHFMXUDJXIEW6",
        "GBR5YQCVRYY3BA6U",
        "BAI3HQ7SV7RZ2CI6",
        "2EQSLPEP3WDOTI5J",
        "2CJQISP4W7F2HCRW",
    ];
    let probs = [
        "0.2000000000",
        "0.2500000000",
        "0.3333333333",
        "0.5000000000",
    ];
    // The masquerade rule for off-cluster sources comes first, then the cascade.
    assert_eq!(svc.len(), 6, "{svc:#?}");
    assert!(svc[0].starts_with("! -s 10.32.0.0/12 -d 10.99.113.112/32 -p tcp"));
    assert!(svc[0].ends_with("-j KUBE-MARK-MASQ"));
    for (i, sep) in seps.iter().enumerate() {
        let rule = svc[i + 1];
        assert!(rule.ends_with(&format!("-j KUBE-SEP-{sep}")), "{rule}");
        match probs.get(i) {
            Some(p) => assert!(
                rule.contains(&format!("-m statistic --mode random --probability {p} ")),
                "{rule}"
            ),
            None => assert!(!rule.contains("statistic"), "{rule}"),
        }
        let dnat = chain(&text, &format!("KUBE-SEP-{sep}"));
        assert_eq!(dnat.len(), 2);
        assert!(dnat[1].contains("-j DNAT --to-destination 10."));
    }
    assert!(text.contains(
        "-A KUBE-SERVICES -d 10.99.113.112/32 -p tcp -m comment --comment \"instavote/vote: cluster IP\" -m tcp --dport 80 -j KUBE-SVC-VIQHAVHDK4QE7NA4\n"
    ));
    assert!(text.contains(
        "-A KUBE-NODEPORTS -d 192.168.50.12/32 -p tcp -m comment --comment \"instavote/vote:\" -m tcp --dport 30000 -j KUBE-EXT-VIQHAVHDK4QE7NA4\n"
    ));
}

#[test]
fn counts_and_chains_agree_with_the_text() {
    for (name, plan) in all_plans() {
        for family in [IpFamily::V4, IpFamily::V6] {
            let rules = Ruleset::new_for(&plan, family);
            let text = rules.full_restore();
            assert_eq!(rules.line_count_full(), text.lines().count(), "{name}");
            assert_eq!(
                rules.rule_count(),
                text.lines().filter(|l| l.starts_with("-A ")).count(),
                "{name}"
            );
            let declared: BTreeSet<String> = text
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .map(|l| l.split(' ').next().unwrap().to_string())
                .collect();
            let chains: Vec<(Table, &str)> = rules.chains().collect();
            let unique: BTreeSet<(Table, &str)> = chains.iter().copied().collect();
            assert_eq!(unique.len(), chains.len(), "{name}: duplicate chains");
            let names: BTreeSet<String> = chains.iter().map(|(_, c)| c.to_string()).collect();
            assert_eq!(names, declared, "{name}");
            // Every chain is either fixed or a per Service port chain.
            for (_, c) in &chains {
                assert!(c.starts_with("KUBE-"), "{c}");
            }
        }
    }
}

#[test]
fn families_are_separate() {
    let name = "dual-stack";
    let (_, _, plan) = local_scenario(name);
    let v4 = Ruleset::new_for(&plan, IpFamily::V4).full_restore();
    let v6 = Ruleset::new_for(&plan, IpFamily::V6).full_restore();
    assert!(!v4.contains("fd00:"), "{name}: {v4}");
    assert!(!v6.contains("10.96."), "{name}: {v6}");
    assert!(!v6.contains("192.168."), "{name}: {v6}");
    assert!(v6.contains("-j DNAT --to-destination [fd00:244::5]:8080"));
    assert!(v6.contains("-d fd00:10:96::5/128 -p tcp"));
    assert!(
        v6.contains("icmp6-port-unreachable"),
        "the v6-only Service has no endpoints"
    );
    assert_eq!(Ruleset::new(&plan), Ruleset::new_for(&plan, IpFamily::V4));
}

#[test]
fn base_jumps_hook_every_fixed_entry_chain() {
    let jumps = base_jumps();
    let targets: BTreeSet<(Table, String)> = jumps
        .iter()
        .map(|(t, _, r)| (*t, r.last().unwrap().clone()))
        .collect();
    for (t, c) in [
        (Table::Nat, "KUBE-SERVICES"),
        (Table::Nat, "KUBE-POSTROUTING"),
        (Table::Filter, "KUBE-SERVICES"),
        (Table::Filter, "KUBE-EXTERNAL-SERVICES"),
        (Table::Filter, "KUBE-NODEPORTS"),
        (Table::Filter, "KUBE-FORWARD"),
        (Table::Filter, "KUBE-PROXY-FIREWALL"),
    ] {
        assert!(targets.contains(&(t, c.to_string())), "{c}");
    }
    // Comments are single argv words, never shell-quoted.
    assert!(
        jumps
            .iter()
            .all(|(_, _, r)| r.iter().all(|w| !w.contains('"')))
    );
    // As on kube-proxy's nodes, the firewall comes first in FORWARD.
    let fwd: Vec<String> = base_jump_order(Table::Filter, "FORWARD")
        .into_iter()
        .map(|r| r.last().unwrap().clone())
        .collect();
    assert_eq!(
        fwd,
        [
            "KUBE-PROXY-FIREWALL",
            "KUBE-FORWARD",
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES"
        ]
    );
}

// ---- update ----

/// Applies `diff` (old -> new) to `Ruleset::new_for(old)` and checks both properties.
fn check_update(old: &Plan, new: &Plan, diff: &PlanDiff, family: IpFamily) -> Option<String> {
    let mut rules = Ruleset::new_for(old, family);
    let before = RestoreModel::of(&rules).unwrap();
    let text = rules.update(new, diff);
    let full = Ruleset::new_for(new, family);
    assert_eq!(rules, full, "patched ruleset differs from a full render");
    assert_eq!(rules.full_restore(), full.full_restore());
    let mut model = before.clone();
    if let Some(t) = &text {
        model
            .apply(t)
            .unwrap_or_else(|e| panic!("partial text does not apply: {e}\n{t}"));
    }
    let want = RestoreModel::of(&full).unwrap();
    assert_eq!(
        model,
        want,
        "applying the partial text to the old state does not give the new state; text:\n{}",
        text.as_deref().unwrap_or("(none)")
    );
    assert_eq!(
        text.is_none(),
        before == want,
        "None exactly when nothing changed"
    );
    text
}

#[test]
fn update_from_and_to_empty_equals_full_render() {
    for (name, plan) in all_plans() {
        let empty = Plan::empty(plan.node().clone());
        for family in [IpFamily::V4, IpFamily::V6] {
            let up = Plan::diff(&empty, &plan);
            check_update(&empty, &plan, &up, family);
            let down = Plan::diff(&plan, &empty);
            check_update(&plan, &empty, &down, family);
            assert!(
                check_update(&plan, &plan, &Plan::diff(&plan, &plan), family).is_none(),
                "{name}"
            );
        }
    }
}

#[test]
fn endpoint_change_rewrites_one_service_chain_only() {
    let dir = load::scenario_dir("lab-vote");
    let (mut cluster, node, _, mut plan) = load::load(&dir);
    let old = plan.clone();
    let _ = cluster.remove_pod(&ObjectName::new("instavote", "vote-dx8f4"));
    let diff = plan.update(&cluster);
    let text = check_update(&old, &plan, &diff, IpFamily::V4).unwrap();
    let declared: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    let deleted: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("-X ")).collect();
    assert_eq!(deleted.len(), 1, "{text}");
    assert!(deleted[0].starts_with("KUBE-SEP-"));
    assert_eq!(
        declared,
        ["KUBE-SVC-VIQHAVHDK4QE7NA4", deleted[0]],
        "only the service chain and the gone endpoint: {text}"
    );
    assert!(!text.contains("*filter"));
    let _ = node;
    // The new endpoint chain appears when a pod comes back.
    let old = plan.clone();
    let mut pod = Pod::new(
        ObjectName::new("instavote", "vote-new"),
        "10.32.0.9".parse().unwrap(),
    );
    pod.labels.insert("role".into(), "vote".into());
    pod.node_name = Some("k-02".into());
    let _ = cluster.upsert_pod(pod);
    let diff = plan.update(&cluster);
    let text = check_update(&old, &plan, &diff, IpFamily::V4).unwrap();
    assert_eq!(
        text.lines().filter(|l| l.starts_with(':')).count(),
        2,
        "{text}"
    );
    assert!(!text.contains("-X "));
}

#[test]
fn selector_change_to_nothing_moves_rules_to_the_filter_table() {
    let (_, _, _, good) = load::load(&load::scenario_dir("lab-vote"));
    let (_, _, _, bad) = load::load(&load::scenario_dir("lab-vote-bad-selector"));
    let diff = Plan::diff(&good, &bad);
    let text = check_update(&good, &bad, &diff, IpFamily::V4).unwrap();
    assert!(text.contains("*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n"));
    assert!(text.contains("has no endpoints\" -m tcp --dport 80 -j REJECT"));
    assert!(text.contains("-X KUBE-SVC-VIQHAVHDK4QE7NA4\n"));
    assert!(text.contains("-X KUBE-EXT-VIQHAVHDK4QE7NA4\n"));
}

#[test]
fn node_change_rerenders_everything_but_writes_only_differences() {
    let (_, _, _, plan) = load::load(&load::scenario_dir("lab-vote"));
    let dir = load::scenario_dir("lab-vote");
    let (node, cfg) = load::node_conf(&dir);
    let cluster = load::build(&load::manifests(&dir), &cfg);
    let mut node2 = node.clone();
    node2.cluster_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    let plan2 = Plan::compile(&cluster, &node2);
    let diff = Plan::diff(&plan, &plan2);
    let text = check_update(&plan, &plan2, &diff, IpFamily::V4).unwrap();
    assert_eq!(
        text.lines().filter(|l| l.starts_with(':')).count(),
        1,
        "only the service chain holds the cluster CIDR: {text}"
    );
}

#[path = "../../core/tests/support/random_cluster.rs"]
mod random_cluster;
use random_cluster::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// After every incremental plan update, `Ruleset::update` gives exactly the full render
    /// of the new plan, and its partial text turns the old restored state into the new one.
    #[test]
    fn update_equals_full_render(
        base in proptest::collection::vec(change(), 0..20),
        steps in proptest::collection::vec(change(), 1..15),
    ) {
        let mut c = Cluster::simulated();
        for ch in &base {
            apply_change(&mut c, ch);
        }
        let node = node_ctx();
        let mut plan = Plan::compile(&c, &node);
        let mut v4 = Ruleset::new_for(&plan, IpFamily::V4);
        let mut v6 = Ruleset::new_for(&plan, IpFamily::V6);
        let mut m4 = RestoreModel::of(&v4).unwrap();
        let mut m6 = RestoreModel::of(&v6).unwrap();
        for ch in &steps {
            let _ = apply_change(&mut c, ch);
            let diff = plan.update(&c);
            for (rules, model, family) in [(&mut v4, &mut m4, IpFamily::V4), (&mut v6, &mut m6, IpFamily::V6)] {
                let text = rules.update(&plan, &diff);
                let full = Ruleset::new_for(&plan, family);
                prop_assert_eq!(&*rules, &full);
                if let Some(t) = &text {
                    model.apply(t).unwrap();
                }
                prop_assert_eq!(&*model, &RestoreModel::of(&full).unwrap());
            }
        }
    }
}
