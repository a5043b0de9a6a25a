//! Golden tests of the nftables dialect's renderer: every plan of the iptables golden tests
//! (the core scenarios and `support/local_plans.rs`) renders to
//! `tests/golden-nft/<scenario>.nft`, the whole table as `Ruleset::full_text` writes it
//! (`<name>.v6.nft` for the `ip6` table). After a deliberate change, regenerate with
//! `SVCNAT_BLESS=1 cargo test -p svcnat-iptables --test nft_render` and review the diff.
//!
//! The update tests check that `Ruleset::update` patches a ruleset into exactly
//! `Ruleset::new_for` of the new plan and writes only what changed; `nft_kernel.rs` applies
//! the same transactions to the real kernel.

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
use svcnat_iptables::nftables::render::{Listing, Ruleset};

#[test]
fn golden_tables() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden-nft");
    let bless = std::env::var_os("SVCNAT_BLESS").is_some();
    if bless {
        fs::create_dir_all(&root).unwrap();
    }
    let mut failures = Vec::new();
    let mut written = BTreeSet::new();
    for (name, plan) in all_plans() {
        let mut outputs = vec![(format!("{name}.nft"), Ruleset::new(&plan).full_text())];
        if has_family(&plan, IpFamily::V6) {
            outputs.push((
                format!("{name}.v6.nft"),
                Ruleset::new_for(&plan, IpFamily::V6).full_text(),
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
    for e in fs::read_dir(&root).unwrap() {
        let f = e.unwrap().file_name().to_string_lossy().into_owned();
        if f.ends_with(".nft") && !written.contains(&f) {
            failures.push(format!("stale golden file {f}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The rules of one chain in a transaction text (`add rule ip svcnat CHAIN ...`).
fn chain<'a>(text: &'a str, table: &str, name: &str) -> Vec<&'a str> {
    let prefix = format!("add rule {table} {name} ");
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

#[test]
fn lab_vote_dispatches_through_maps_and_chooses_exactly() {
    let (_, _, _, plan) = load::load(&load::scenario_dir("lab-vote"));
    let rules = Ruleset::new(&plan);
    let text = rules.full_text();
    let svc = "service-4KA5RRG2-instavote/vote/tcp/";
    assert!(
        text.contains(&format!("\t10.99.113.112 . tcp . 80 : goto {svc}")),
        "{text}"
    );
    let ext = "external-4KA5RRG2-instavote/vote/tcp/";
    assert!(
        text.contains(&format!("\ttcp . 30000 : goto {ext}")),
        "{text}"
    );
    assert!(text.contains("add element ip svcnat nodeport-ips {\n\t192.168.50.12\n}"));
    let rules_of = chain(&text, "ip svcnat", svc);
    assert_eq!(rules_of.len(), 6, "{rules_of:#?}");
    assert_eq!(
        rules_of[0],
        "ip daddr 10.99.113.112 tcp dport 80 ip saddr != 10.32.0.0/12 jump mark-for-masquerade"
    );
    // 1/5, 1/4, 1/3, 1/2, then the last one: exactly uniform.
    for (i, r) in rules_of[1..].iter().enumerate() {
        let m = 5 - i;
        if m > 1 {
            assert!(
                r.starts_with(&format!(
                    "meta l4proto tcp numgen random mod {m} < 1 dnat ip to 10."
                )),
                "{r}"
            );
        } else {
            assert!(r.starts_with("meta l4proto tcp dnat ip to 10."), "{r}");
        }
    }
    assert_eq!(
        chain(&text, "ip svcnat", ext),
        ["jump mark-for-masquerade", &format!("goto {svc}")]
    );
    // Every endpoint address is a hairpin pair.
    assert_eq!(text.matches(" . 10.3").count(), 5, "{text}");
}

#[test]
fn weights_are_exact_element_free_cascades_and_affinity_has_sets() {
    let (_, _, plan) = local_scenario("weights-sctp-affinity");
    let text = Ruleset::new(&plan).full_text();
    // Weights 3 and 1 (the weight-0 endpoint gets nothing): 3 in 4, then the rest.
    assert!(
        text.contains("meta l4proto sctp numgen random mod 4 < 3 update @affinity-"),
        "{text}"
    );
    assert!(!text.contains("10.244.2.7"), "drained endpoint: {text}");
    assert_eq!(
        text.matches("flags dynamic,timeout; timeout 300s;").count(),
        2,
        "{text}"
    );
    // Clients found in an affinity set go back to its endpoint.
    assert!(text.contains(" ip saddr @affinity-"), "{text}");
}

#[test]
fn no_endpoints_and_source_ranges() {
    let (_, _, plan) = local_scenario("lb-cluster-policy");
    let text = Ruleset::new(&plan).full_text();
    // The empty Service rejects on its external IP, LB IP and node ports.
    assert!(
        text.contains("\t198.51.100.30 . tcp . 8443 : goto reject-chain"),
        "{text}"
    );
    assert!(text.contains("\ttcp . 30444 : goto reject-chain"), "{text}");
    // The firewalled LB IP goes through its firewall chain, which allows the ranges (and
    // the LB IP itself, since a range holds the node IP) and drops the rest.
    assert!(
        text.contains("\t203.0.113.20 . tcp . 443 : goto firewall-"),
        "{text}"
    );
    let fw: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("add rule ip svcnat firewall-") && !l.contains("firewall-check"))
        .map(|l| l.split_once(' ').unwrap().1)
        .collect();
    assert_eq!(fw.len(), 4, "{fw:#?}");
    assert!(fw[0].ends_with("ip saddr 192.168.0.0/24 return"));
    assert!(fw[2].ends_with("ip saddr 203.0.113.20 return"));
    assert!(fw[3].ends_with(" drop"));
    // masquerade-all: every cluster IP masquerades.
    assert!(
        text.contains("ip daddr 10.101.149.201 tcp dport 443 jump mark-for-masquerade"),
        "{text}"
    );
}

#[test]
fn families_are_separate() {
    let (_, _, plan) = local_scenario("dual-stack");
    let v4 = Ruleset::new_for(&plan, IpFamily::V4).full_text();
    let v6 = Ruleset::new_for(&plan, IpFamily::V6).full_text();
    assert!(!v4.contains("fd00:"), "{v4}");
    assert!(v4.starts_with("add table ip svcnat"));
    assert!(v6.starts_with("add table ip6 svcnat"));
    assert!(!v6.contains("10.96."), "{v6}");
    assert!(v6.contains("dnat ip6 to [fd00:244::5]:8080"), "{v6}");
    assert!(v6.contains("type ipv6_addr . inet_proto . inet_service : verdict"));
    assert!(
        v6.contains("\tfd00:10:96::7 . udp . 53 : goto reject-chain"),
        "{v6}"
    );
}

#[test]
fn cold_start_blocks_hold_each_map_element_with_its_chain() {
    for (name, plan) in all_plans() {
        for family in [IpFamily::V4, IpFamily::V6] {
            let rules = Ruleset::new_for(&plan, family);
            let whole = rules.cold_start_transactions(usize::MAX);
            for n in [1, 2, 3] {
                let blocks = rules.cold_start_transactions(n);
                // Every `goto X` of an element is in a block that creates X or an earlier one.
                let mut created: BTreeSet<String> = BTreeSet::new();
                for b in &blocks {
                    for l in b.text.lines() {
                        if let Some(rest) = l.strip_prefix("add chain ") {
                            let c = rest.split_whitespace().nth(2).unwrap();
                            created.insert(c.to_string());
                        }
                    }
                    for l in b.text.lines().filter(|l| l.starts_with('\t')) {
                        if let Some((_, target)) = l.split_once(" : goto ") {
                            let target = target.trim_end_matches(',');
                            assert!(created.contains(target), "{name} {n}: {target} used first");
                        }
                    }
                }
                let total: usize = blocks.iter().map(|b| b.rules).sum();
                assert_eq!(total, rules.rule_count(), "{name}");
                let elements: usize = blocks.iter().map(|b| b.elements).sum();
                assert_eq!(elements, rules.element_count(), "{name}");
            }
            let parts = if rules.chains().count() > 14 { 2 } else { 1 };
            assert!(
                whole.len() <= 2 && whole.len() >= parts,
                "{name}: the fixed part, then everything"
            );
        }
    }
}

#[test]
fn full_transaction_replaces_and_names_what_is_gone() {
    let (_, _, _, plan) = load::load(&load::scenario_dir("lab-vote"));
    let rules = Ruleset::new(&plan);
    let mut listing = Listing::new();
    listing
        .chains
        .insert("service-OLD00000-instavote/gone/tcp/".into());
    listing.chains.insert("services".into());
    listing
        .sets
        .insert("affinity-OLD00000-instavote/gone/tcp/__10.0.0.1/80".into());
    listing.sets.insert("service-ips".into());
    let tx = rules.full_transaction(&listing);
    assert!(tx.text.contains("flush table ip svcnat\n"));
    assert!(tx.text.contains("flush map ip svcnat service-ips\n"));
    assert!(
        tx.text
            .ends_with("delete set ip svcnat affinity-OLD00000-instavote/gone/tcp/__10.0.0.1/80\n"),
        "{}",
        tx.text
    );
    assert_eq!(tx.gone_chains, ["service-OLD00000-instavote/gone/tcp/"]);
    assert_eq!(tx.rules, rules.rule_count());
    // The same in blocks: the fixed part replaced first, then the Service ports as a cold
    // start writes them; the same rules and elements in all.
    let (_, _, _, plan) = load::load(&load::scenario_dir("local-policy"));
    let rules = Ruleset::new(&plan);
    let tx = rules.full_transaction(&listing);
    let txs = rules.full_transactions(&listing, 1);
    assert!(rules.unit_count() >= 2);
    assert_eq!(txs.len(), 1 + rules.unit_count());
    assert!(txs[0].text.contains("flush table ip svcnat\n"));
    assert!(
        txs[0]
            .text
            .contains("delete set ip svcnat affinity-OLD00000")
    );
    assert_eq!(txs[0].gone_chains, tx.gone_chains);
    assert!(txs[1..].iter().all(|t| !t.text.contains("flush table")
        && !t.text.contains("add table")
        && t.gone_chains.is_empty()));
    assert_eq!(txs.iter().map(|t| t.rules).sum::<usize>(), tx.rules);
    assert_eq!(txs.iter().map(|t| t.elements).sum::<usize>(), tx.elements);
}

// ---- update ----

fn check_update(old: &Plan, new: &Plan, diff: &PlanDiff, family: IpFamily) -> Option<String> {
    let mut rules = Ruleset::new_for(old, family);
    let update = rules.update(new, diff);
    let full = Ruleset::new_for(new, family);
    assert_eq!(rules, full, "patched ruleset differs from a full render");
    assert_eq!(rules.full_text(), full.full_text());
    assert_eq!(
        update.is_none(),
        Ruleset::new_for(old, family).full_text() == full.full_text(),
        "None exactly when nothing changed"
    );
    update.map(|u| u.text)
}

#[test]
fn update_from_and_to_empty_equals_full_render() {
    for (name, plan) in all_plans() {
        let empty = Plan::empty(plan.node().clone());
        for family in [IpFamily::V4, IpFamily::V6] {
            check_update(&empty, &plan, &Plan::diff(&empty, &plan), family);
            check_update(&plan, &empty, &Plan::diff(&plan, &empty), family);
            assert!(
                check_update(&plan, &plan, &Plan::diff(&plan, &plan), family).is_none(),
                "{name}"
            );
        }
    }
}

#[test]
fn endpoint_change_rewrites_one_chain_and_one_pair() {
    let dir = load::scenario_dir("lab-vote");
    let (mut cluster, _, _, mut plan) = load::load(&dir);
    let old = plan.clone();
    let _ = cluster.remove_pod(&ObjectName::new("instavote", "vote-dx8f4"));
    let diff = plan.update(&cluster);
    let text = check_update(&old, &plan, &diff, IpFamily::V4).unwrap();
    let svc = "service-4KA5RRG2-instavote/vote/tcp/";
    assert_eq!(
        text,
        format!(
            "flush chain ip svcnat {svc}\n\
             add rule ip svcnat {svc} ip daddr 10.99.113.112 tcp dport 80 ip saddr != 10.32.0.0/12 jump mark-for-masquerade\n\
             add rule ip svcnat {svc} meta l4proto tcp numgen random mod 4 < 1 dnat ip to 10.32.0.5:80\n\
             add rule ip svcnat {svc} meta l4proto tcp numgen random mod 3 < 1 dnat ip to 10.32.0.6:80\n\
             add rule ip svcnat {svc} meta l4proto tcp numgen random mod 2 < 1 dnat ip to 10.38.0.4:80\n\
             add rule ip svcnat {svc} meta l4proto tcp dnat ip to 10.38.0.5:80\n\
             delete element ip svcnat hairpin {{\n\t10.32.0.4 . 10.32.0.4\n}}\n"
        )
    );
}

#[test]
fn selector_change_to_nothing_moves_the_service_to_the_no_endpoint_maps() {
    let (_, _, _, good) = load::load(&load::scenario_dir("lab-vote"));
    let (_, _, _, bad) = load::load(&load::scenario_dir("lab-vote-bad-selector"));
    let diff = Plan::diff(&good, &bad);
    let text = check_update(&good, &bad, &diff, IpFamily::V4).unwrap();
    assert!(
        text.contains("delete element ip svcnat service-ips {\n\t10.99.113.112 . tcp . 80\n}\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "add element ip svcnat no-endpoint-services {\n\t10.99.113.112 . tcp . 80 : goto reject-chain\n}\n"
        ),
        "{text}"
    );
    assert!(text.contains("flush chain ip svcnat service-4KA5RRG2-instavote/vote/tcp/\n"));
    assert!(!text.contains("delete chain"), "deleted later: {text}");
}

#[path = "../../core/tests/support/random_cluster.rs"]
mod random_cluster;
use random_cluster::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// After every incremental plan update, `Ruleset::update` gives exactly the full render
    /// of the new plan.
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
        for ch in &steps {
            let _ = apply_change(&mut c, ch);
            let diff = plan.update(&c);
            for (rules, family) in [(&mut v4, IpFamily::V4), (&mut v6, IpFamily::V6)] {
                let _ = rules.update(&plan, &diff);
                let full = Ruleset::new_for(&plan, family);
                prop_assert_eq!(&*rules, &full);
            }
        }
    }
}

/// Replies captured from Linux 6.18 for `lb-cluster-policy.nft` loaded in a namespace (the
/// fuzz target's seeds): the chain and set dumps name the table's objects, the rule dump of
/// `services` has its two rules, a missing table is ENOENT.
#[test]
fn parses_replies_captured_from_the_kernel() {
    use svcnat_iptables::nftables::kernel::{Reply, parse_replies};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/nft_netlink");
    let Ok(chains) = fs::read(dir.join("dump_chains")) else {
        eprintln!("SKIP: no fuzz corpus next to the crate (packaged build)");
        return;
    };
    let got = parse_replies(&chains, 3).unwrap();
    let names: BTreeSet<String> = got
        .iter()
        .filter_map(|r| match r {
            Reply::Chain { table, name } if table == "svcnat" => Some(name.clone()),
            _ => None,
        })
        .collect();
    assert!(names.contains("services"), "{got:?}");
    assert!(
        names.contains("firewall-EMNFMILR-default/shop/tcp/"),
        "{names:?}"
    );
    assert_eq!(names.len(), 17, "{names:?}");
    let sets = parse_replies(&fs::read(dir.join("dump_sets")).unwrap(), 4).unwrap();
    let sets: BTreeSet<String> = sets
        .iter()
        .filter_map(|r| match r {
            Reply::Set { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(sets.len(), 7, "{sets:?}");
    let rules = parse_replies(&fs::read(dir.join("dump_rules_services")).unwrap(), 2).unwrap();
    assert_eq!(rules.iter().filter(|r| **r == Reply::Rule).count(), 2);
    assert_eq!(rules.last(), Some(&Reply::Done));
    let table = parse_replies(&fs::read(dir.join("get_table")).unwrap(), 1).unwrap();
    assert!(matches!(&table[0], Reply::Table { name, handle: Some(_) } if name == "svcnat"));
    let missing = parse_replies(&fs::read(dir.join("get_missing_table")).unwrap(), 5).unwrap();
    assert_eq!(missing, [Reply::Error(2)]);
}
