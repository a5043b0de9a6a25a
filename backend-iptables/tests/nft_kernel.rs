//! The nftables dialect against the real kernel and `nft`, in throwaway network namespaces:
//! every golden table passes `nft -c -f` and loads; partial updates applied on top of a
//! loaded table leave the kernel holding exactly what a fresh load of the new plan holds;
//! a refused transaction names its line and changes nothing; a deleted or flushed table is
//! noticed and rebuilt; other tables are never touched; cleanup removes only svcnat's.
//!
//! Needs root, `ip` and `nft`. Without them the tests print `SKIP: ...` and pass, except
//! under CI (`CI=true`), where a missing tool fails them. Each test creates its own
//! namespace (`svn-nk-` PID counter) and a guard deletes it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../core/tests/support/scenario.rs"]
mod load;
#[path = "support/local_plans.rs"]
mod plans;
use plans::{all_plans, has_family};

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use svcnat_core::model::*;
use svcnat_core::plan::{Dataplane, Plan};
use svcnat_iptables::nftables::batch::translate;
use svcnat_iptables::nftables::driver::{Nftables, NftablesConfig, SyncError};
use svcnat_iptables::nftables::kernel::Kernel;
use svcnat_iptables::nftables::render::{Ruleset, TABLE};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace that is deleted when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!(
            "svn-nk-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(out.status.success(), "ip netns add {name}");
        Netns(name)
    }

    fn nft(&self, args: &[&str], stdin: &str) -> (bool, String, String) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
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

    fn load(&self, text: &str) {
        let (ok, _, err) = self.nft(&["-f", "-"], text);
        assert!(ok, "nft -f failed: {err}\ninput:\n{text}");
    }

    /// `nft list table`, normalised: blocks sorted by header, map and set elements sorted,
    /// chain rules in order. `None` when the table does not exist.
    fn listing(&self, family: IpFamily) -> Option<String> {
        let t = match family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        };
        let (ok, out, _) = self.nft(&["list", "table", t, "svcnat"], "");
        ok.then(|| normalise(&out))
    }

    fn driver(&self, family: IpFamily) -> Nftables {
        let mut c = NftablesConfig::new(Some(self.0.clone()), family);
        c.drift_interval = Duration::ZERO;
        c.cold_start_block = 2;
        Nftables::new(c)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Sorts the blocks of an `nft list table` and the elements of its sets and maps.
fn normalise(listing: &str) -> String {
    let mut blocks: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut elements: Option<String> = None;
    for line in listing.lines() {
        let l = line.trim();
        if line.starts_with("\t") && !line.starts_with("\t\t") && l.ends_with('{') {
            current = Some(l.to_string());
            blocks.entry(l.to_string()).or_default();
            continue;
        }
        let Some(head) = &current else { continue };
        if line == "\t}" {
            current = None;
            continue;
        }
        if let Some(rest) = l.strip_prefix("elements = {") {
            elements = Some(rest.to_string());
        } else if let Some(e) = &mut elements {
            e.push(' ');
            e.push_str(l);
        } else {
            blocks.entry(head.clone()).or_default().push(l.to_string());
        }
        if let Some(e) = &elements
            && e.trim_end().ends_with('}')
        {
            let inner = e.trim().trim_end_matches('}');
            let mut v: Vec<String> = inner
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            v.sort();
            blocks
                .entry(head.clone())
                .or_default()
                .push(format!("elements {}", v.join(", ")));
            elements = None;
        }
    }
    blocks
        .into_iter()
        .map(|(h, v)| format!("{h}\n  {}\n", v.join("\n  ")))
        .collect()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

fn have(p: &str) -> bool {
    Command::new(p).arg("--version").output().is_ok()
}

/// Whether the environment can run these tests; prints why not, and fails under CI.
fn ready(test: &str) -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root");
    }
    for p in ["ip", "nft"] {
        if !have(p) {
            missing.push(p);
        }
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: CI=true and this test needs: {}",
        missing.join(", ")
    );
    eprintln!(
        "SKIP: {test}: needs {} (not failing outside CI)",
        missing.join(", ")
    );
    false
}

#[test]
fn every_golden_table_checks_and_loads() {
    if !ready("every_golden_table_checks_and_loads") {
        return;
    }
    for (name, plan) in all_plans() {
        let mut families = vec![IpFamily::V4];
        if has_family(&plan, IpFamily::V6) {
            families.push(IpFamily::V6);
        }
        for family in families {
            let ns = Netns::new();
            let text = Ruleset::new_for(&plan, family).full_text();
            let (ok, _, err) = ns.nft(&["-c", "-f", "-"], &text);
            assert!(ok, "{name} {family:?}: nft -c: {err}\n{text}");
            ns.load(&text);
            // The driver's cold start in blocks of 2 Service ports, and its full sync over
            // the loaded table, give the same table.
            let want = ns.listing(family).unwrap();
            assert!(
                want.contains("chain services {\n  ") && want.contains("vmap @service-ips"),
                "{want}"
            );
            if text.contains("dnat ip") {
                assert!(
                    want.contains("dnat ip") && want.contains("elements "),
                    "{name}: {want}"
                );
            }
            let ns2 = Netns::new();
            let mut dp = ns2.driver(family);
            dp.resync(&plan).unwrap();
            assert_eq!(ns2.listing(family).unwrap(), want, "{name} cold start");
            // Every block of the cold start went as a netlink batch, the first included.
            let blocks = Ruleset::new_for(&plan, family)
                .cold_start_transactions(2)
                .len() as u64;
            assert_eq!(dp.netlink_batches(), blocks, "{name}");
            dp.resync(&plan).unwrap();
            assert_eq!(
                ns2.listing(family).unwrap(),
                want,
                "{name} full over itself"
            );
            // The full sync too, as one batch.
            assert_eq!(dp.netlink_batches(), blocks + 1, "{name}");
        }
    }
}

#[test]
fn partial_syncs_match_a_fresh_load_and_gone_chains_are_deleted_later() {
    if !ready("partial_syncs_match_a_fresh_load") {
        return;
    }
    let dir = load::scenario_dir("lab-vote");
    let (mut cluster, _, _, mut plan) = load::load(&dir);
    let ns = Netns::new();
    let mut dp = ns.driver(IpFamily::V4);
    dp.resync(&plan).unwrap();
    // Endpoints go, the Service loses its selector's pods, then comes back.
    type Step = Box<dyn Fn(&mut Cluster)>;
    let steps: Vec<Step> = vec![
        Box::new(|c| {
            let _ = c.remove_pod(&ObjectName::new("instavote", "vote-dx8f4"));
        }),
        Box::new(|c| {
            for p in ["vote-58bpv", "vote-986cl", "vote-9rrfz", "vote-qxmfl"] {
                let _ = c.remove_pod(&ObjectName::new("instavote", p));
            }
        }),
        Box::new(|c| {
            let mut pod = Pod::new(
                ObjectName::new("instavote", "vote-new"),
                "10.32.0.9".parse().unwrap(),
            );
            pod.labels.insert("role".into(), "vote".into());
            pod.node_name = Some("k-02".into());
            let _ = c.upsert_pod(pod);
        }),
    ];
    for step in steps {
        step(&mut cluster);
        let diff = plan.update(&cluster);
        let report = dp.sync(&plan, &diff).unwrap();
        assert!(!report.full);
        let fresh = Netns::new();
        fresh.load(&Ruleset::new(&plan).full_text());
        let mut got = ns.listing(IpFamily::V4).unwrap();
        // Chains emptied by a partial sync wait a second before their deletion.
        if got != fresh.listing(IpFamily::V4).unwrap() {
            std::thread::sleep(Duration::from_millis(1100));
            let diff = plan.update(&cluster);
            dp.sync(&plan, &diff).unwrap();
            got = ns.listing(IpFamily::V4).unwrap();
        }
        assert_eq!(got, fresh.listing(IpFamily::V4).unwrap());
    }
    // The partial syncs went as netlink batches.
    assert!(dp.netlink_batches() >= 3, "{}", dp.netlink_batches());
}

#[test]
fn a_refused_transaction_names_its_line_and_changes_nothing() {
    if !ready("a_refused_transaction_names_its_line") {
        return;
    }
    let (_, _, _, plan) = load::load(&load::scenario_dir("lab-vote"));
    let ns = Netns::new();
    let mut dp = ns.driver(IpFamily::V4);
    dp.resync(&plan).unwrap();
    let before = ns.listing(IpFamily::V4).unwrap();
    let text = "flush chain ip svcnat services\nadd rule ip svcnat services jump no-such-chain\n";
    let err = dp.apply(text).unwrap_err();
    match &err {
        SyncError::Transaction { line, text, .. } => {
            assert_eq!(*line, Some(2), "{err}");
            assert_eq!(
                text.as_deref(),
                Some("add rule ip svcnat services jump no-such-chain")
            );
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("at input line 2"), "{err}");
    assert_eq!(ns.listing(IpFamily::V4).unwrap(), before);
}

/// The lines of `nft list table` at the table's own level (its comment and flags).
fn table_head(ns: &Netns, family: IpFamily) -> String {
    let t = match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    };
    let (_, out, _) = ns.nft(&["list", "table", t, "svcnat"], "");
    let mut depth = 0usize;
    let mut head = String::new();
    for line in out.lines() {
        let l = line.trim();
        if depth == 1 && !l.is_empty() && !l.ends_with('{') && l != "}" {
            head.push_str(l);
            head.push('\n');
        }
        depth += line.matches('{').count();
        depth = depth.saturating_sub(line.matches('}').count());
    }
    head
}

/// Loads `text` into a namespace as one netlink batch; every command must translate.
fn load_batch(ns: &Netns, text: &str) -> usize {
    let batch = translate(text).unwrap_or_else(|e| panic!("{e}"));
    Kernel::new(Some(ns.0.clone()))
        .apply_batch(&batch)
        .unwrap()
        .unwrap_or_else(|e| panic!("{e:?}"));
    batch.commands().len()
}

#[test]
fn every_golden_table_written_through_netlink_lists_as_nft_loads_it() {
    if !ready("every_golden_table_written_through_netlink") {
        return;
    }
    let mut translated = 0;
    for (name, plan) in all_plans() {
        let mut families = vec![IpFamily::V4];
        if has_family(&plan, IpFamily::V6) {
            families.push(IpFamily::V6);
        }
        for family in families {
            let text = Ruleset::new_for(&plan, family).full_text();
            let want_ns = Netns::new();
            want_ns.load(&text);
            let want = want_ns.listing(family).unwrap();
            // The whole table, its fixed part included, as one batch.
            let ns = Netns::new();
            translated += load_batch(&ns, &text);
            assert_eq!(
                ns.listing(family).unwrap(),
                want,
                "{name} {family:?}: through netlink:\n{text}"
            );
            assert_eq!(table_head(&ns, family), table_head(&want_ns, family));
        }
    }
    // Every command of every golden table went through netlink, not just a few.
    assert!(translated > 600, "{translated} commands translated");
}

/// Every feature the renderer has, in both families: a dual-stack LoadBalancer with
/// `externalTrafficPolicy: Local`, ClientIP affinity, source ranges, external IPs and node
/// ports; a Service without endpoints; an `internalTrafficPolicy: Local` one.
const EVERY_FEATURE: &str = "---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: [10.96.5.5, \"fd00:10:96::5\"]
  selector: {app: web}
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  externalIPs: [198.51.100.9, \"2001:db8::9\"]
  loadBalancerSourceRanges: [198.51.100.0/24, 203.0.113.128/25, \"2001:db8:1::/48\"]
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
status:
  loadBalancer: {ingress: [{ip: 203.0.113.20}, {ip: \"2001:db8:2::20\"}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: [10.96.5.6, \"fd00:10:96::6\"]
  selector: {app: nothing}
  externalIPs: [198.51.100.30]
  ports: [{port: 8443, nodePort: 30444}]
status:
  loadBalancer: {ingress: [{ip: 203.0.113.30}]}
---
apiVersion: v1
kind: Service
metadata: {name: cache, namespace: default}
spec:
  ipFamilyPolicy: PreferDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIPs: [\"fd00:10:96::7\", 10.96.5.7]
  selector: {app: web}
  internalTrafficPolicy: Local
  ports: [{port: 11211, protocol: UDP, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: a, image: x}]}
status:
  podIPs: [{ip: 10.244.1.5}, {ip: \"fd00:244::5\"}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: default, labels: {app: web}}
spec: {nodeName: node-2, containers: [{name: a, image: x}]}
status:
  podIPs: [{ip: 10.244.2.5}, {ip: \"fd00:244:0:2::5\"}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: default, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: a, image: x}]}
status:
  podIPs: [{ip: 10.244.1.6}, {ip: \"fd00:244::6\"}]
";

fn every_feature_plan() -> Plan {
    let (node, mut cfg) = load::parse_node_conf(
        "node node-1\nips 192.168.0.1,fd00:192:168::1\ncluster-cidrs 10.244.0.0/16,fd00:244::/56\n",
        "every-feature",
    );
    cfg.service_cidrs.push("fd00:10:96::/108".parse().unwrap());
    cfg.pod_cidrs.push("fd00:244::/56".parse().unwrap());
    let (cluster, errors) = load::build_checked(
        &[("every-feature.yaml".to_string(), EVERY_FEATURE.to_string())],
        &cfg,
    );
    assert!(errors.is_empty(), "{errors:#?}");
    Plan::compile(&cluster, &node)
}

/// The whole ruleset loaded once through `nft -f` and once as one netlink batch into two
/// fresh namespaces lists the same, both families, with every feature; and so does a full
/// sync's transaction (`flush table`, maps and sets flushed, affinity sets and chains
/// deleted) applied both ways over a table holding another plan.
#[test]
fn the_whole_table_and_a_full_sync_as_one_batch_list_as_through_nft() {
    if !ready("the_whole_table_and_a_full_sync_as_one_batch") {
        return;
    }
    let plan = every_feature_plan();
    let other = plans::local_scenario("dual-stack").2;
    for family in [IpFamily::V4, IpFamily::V6] {
        let text = Ruleset::new_for(&plan, family).full_text();
        let by_nft = Netns::new();
        by_nft.load(&text);
        let want = by_nft.listing(family).unwrap();
        for feature in [
            "affinity-",
            "chain firewall-",
            "chain external-",
            "chain local-",
            "no-endpoint-services",
            "elements",
            "fib saddr type local",
            "reject",
            "masquerade fully-random",
            "ct state new",
            "timeout 3h",
        ] {
            assert!(want.contains(feature), "{family:?}: no {feature}:\n{want}");
        }
        let by_batch = Netns::new();
        load_batch(&by_batch, &text);
        assert_eq!(by_batch.listing(family).unwrap(), want, "{family:?}");
        let head = table_head(&by_batch, family);
        assert_eq!(head, table_head(&by_nft, family));
        assert!(
            head.contains("comment \"rules for svcnat, kube-proxy's nftables layout\""),
            "{head}"
        );
        // Full syncs from one plan to the other, both ways.
        for (from, to) in [(&other, &plan), (&plan, &other)] {
            let from_text = Ruleset::new_for(from, family).full_text();
            let a = Netns::new();
            let b = Netns::new();
            a.load(&from_text);
            b.load(&from_text);
            let listing = Kernel::new(Some(a.0.clone()))
                .listing(family, TABLE)
                .unwrap();
            let tx = Ruleset::new_for(to, family).full_transaction(&listing);
            assert!(tx.text.contains("flush table"));
            a.load(&tx.text);
            load_batch(&b, &tx.text);
            assert_eq!(b.listing(family), a.listing(family), "{family:?}");
            assert_eq!(table_head(&b, family), table_head(&a, family));
            // The same full sync in blocks (the form of one too large for a batch) ends
            // in the same table.
            let c = Netns::new();
            c.load(&from_text);
            let to_rules = Ruleset::new_for(to, family);
            let parts = to_rules.full_transactions(&listing, 1);
            assert_eq!(parts.len(), 1 + to_rules.unit_count());
            for p in &parts {
                load_batch(&c, &p.text);
            }
            assert_eq!(c.listing(family), a.listing(family), "{family:?} in blocks");
        }
    }
}

#[test]
fn a_refused_netlink_batch_names_its_command_and_changes_nothing() {
    if !ready("a_refused_netlink_batch_names_its_command") {
        return;
    }
    let (_, _, _, plan) = load::load(&load::scenario_dir("lab-vote"));
    let ns = Netns::new();
    let mut dp = ns.driver(IpFamily::V4);
    dp.resync(&plan).unwrap();
    // The cold start's blocks after the first went as batches.
    let batches = dp.netlink_batches();
    assert!(batches >= 1);
    let before = ns.listing(IpFamily::V4).unwrap();
    let text = "flush chain ip svcnat services\nadd rule ip svcnat services jump no-such-chain\nadd element ip svcnat hairpin { 10.9.9.9 . 10.9.9.9 }\n";
    let err = dp.apply_small(text).unwrap_err();
    match &err {
        SyncError::Refused { source, .. } => {
            assert_eq!(
                source.command,
                "add rule ip svcnat services jump no-such-chain"
            );
            assert_eq!(source.errno, nix::libc::ENOENT);
        }
        other => panic!("{other}"),
    }
    assert!(
        err.to_string()
            .contains("refused `add rule ip svcnat services jump no-such-chain`"),
        "{err}"
    );
    assert_eq!(ns.listing(IpFamily::V4).unwrap(), before);
    // An element deleted twice: the first deletion is undone with the refused second.
    let text = "delete element ip svcnat hairpin {\n\t10.32.0.4 . 10.32.0.4,\n\t10.32.0.4 . 10.32.0.4\n}\n";
    let err = dp.apply_small(text).unwrap_err();
    match &err {
        SyncError::Refused { source, .. } => assert_eq!(
            (source.command.as_str(), source.errno),
            (
                "delete element ip svcnat hairpin { 10.32.0.4 . 10.32.0.4 }",
                nix::libc::ENOENT
            )
        ),
        other => panic!("{other}"),
    }
    assert_eq!(ns.listing(IpFamily::V4).unwrap(), before);
    assert_eq!(dp.netlink_batches(), batches);
}

#[test]
fn a_deleted_or_flushed_table_is_noticed_and_rebuilt_and_other_tables_are_untouched() {
    if !ready("a_deleted_table_is_noticed") {
        return;
    }
    let (_, _, _, plan) = load::load(&load::scenario_dir("lab-vote"));
    let ns = Netns::new();
    // Someone else's tables, one of them with our table's name in another family.
    let foreign = "table ip kube-proxy {\n\tchain services {\n\t\tip daddr 10.0.0.1 drop\n\t}\n}\ntable inet svcnat {\n\tchain x {\n\t\tip daddr 10.0.0.2 drop\n\t}\n}\n";
    ns.load(foreign);
    let foreign_list = |ns: &Netns| {
        let (_, a, _) = ns.nft(&["list", "table", "ip", "kube-proxy"], "");
        let (_, b, _) = ns.nft(&["list", "table", "inet", "svcnat"], "");
        a + &b
    };
    let before_foreign = foreign_list(&ns);
    let mut dp = ns.driver(IpFamily::V4);
    dp.resync(&plan).unwrap();
    let want = ns.listing(IpFamily::V4).unwrap();
    assert!(!dp.drifted().unwrap());
    ns.nft(&["delete", "table", "ip", "svcnat"], "");
    assert!(dp.drifted().unwrap(), "deleted table not noticed");
    dp.resync(&plan).unwrap();
    assert_eq!(ns.listing(IpFamily::V4).unwrap(), want);
    ns.nft(&["flush", "table", "ip", "svcnat"], "");
    assert!(dp.drifted().unwrap(), "flushed table not noticed");
    // A partial sync notices too, and rebuilds.
    let report = dp.sync(&plan, &Plan::diff(&plan, &plan)).unwrap();
    assert!(report.full);
    assert_eq!(ns.listing(IpFamily::V4).unwrap(), want);
    dp.cleanup().unwrap();
    assert_eq!(ns.listing(IpFamily::V4), None);
    dp.cleanup().unwrap();
    assert_eq!(foreign_list(&ns), before_foreign);
}

#[path = "../../core/tests/support/random_cluster.rs"]
mod random_cluster;
use random_cluster::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random changes synced partially leave the kernel with exactly the table a fresh load
    /// of the new plan gives, both families.
    #[test]
    fn random_partial_syncs_match_a_fresh_load(
        base in proptest::collection::vec(change(), 0..16),
        steps in proptest::collection::vec(change(), 1..6),
    ) {
        if !ready("random_partial_syncs_match_a_fresh_load") {
            return Ok(());
        }
        let mut c = Cluster::simulated();
        for ch in &base {
            apply_change(&mut c, ch);
        }
        let mut plan = Plan::compile(&c, &node_ctx());
        let ns = Netns::new();
        let mut v4 = ns.driver(IpFamily::V4);
        let mut v6 = ns.driver(IpFamily::V6);
        v4.resync(&plan).unwrap();
        v6.resync(&plan).unwrap();
        for ch in &steps {
            let _ = apply_change(&mut c, ch);
            let diff = plan.update(&c);
            v4.sync(&plan, &diff).unwrap();
            v6.sync(&plan, &diff).unwrap();
        }
        // Let emptied chains go (they wait a second), with one more sync.
        std::thread::sleep(Duration::from_millis(1100));
        let diff = plan.update(&c);
        v4.sync(&plan, &diff).unwrap();
        v6.sync(&plan, &diff).unwrap();
        let fresh = Netns::new();
        for family in [IpFamily::V4, IpFamily::V6] {
            fresh.load(&Ruleset::new_for(&plan, family).full_text());
            prop_assert_eq!(ns.listing(family), fresh.listing(family));
        }
    }
}
