//! Golden scenarios: every directory under `tests/scenarios/` holds manifests (`*.yaml`,
//! loaded in name order like `kubectl apply -f DIR`) and a `node.conf`; the test compares
//! the compiled plan (`plan.txt`), the load errors and warnings (`errors.txt`) and the
//! kubectl-style views (`views.txt`), the DNS records and lookups (`dns.txt`) and each
//! proxied Service's path through the node (`graph.dot`) with the files in the directory.
//!
//! After a deliberate change, regenerate with `SVCNAT_BLESS=1 cargo test -p svcnat-core
//! --test scenarios` and review the diff.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/scenario.rs"]
mod load;

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use svcnat_core::describe::{self, ViewOptions};
use svcnat_core::discovery::{DiscoveryConfig, QueryType, Resolver, SearchConfig};
use svcnat_core::graph::{self, ServiceGraph};
use svcnat_core::manifest::Manifests;
use svcnat_core::plan::Plan;

fn run(dir: &Path) -> Vec<(&'static str, String)> {
    let (node, cfg) = load::node_conf(dir);
    let texts = load::manifests(dir);
    let mut m = Manifests::from_files(texts.iter().map(|(n, t)| (n.as_str(), t.as_str())), &cfg);
    let cluster = m.build(&cfg);
    let mut errors = String::new();
    for e in &m.errors {
        let _ = writeln!(errors, "error: {e}");
    }
    for w in &m.warnings {
        let _ = writeln!(errors, "warning: {w}");
    }
    let plan = Plan::compile(&cluster, &node);
    let opts = ViewOptions::default();
    let mut views = String::new();
    let _ = writeln!(
        views,
        "$ kubectl get svc -A\n{}",
        describe::get_services(&cluster, None, &opts)
    );
    let _ = writeln!(
        views,
        "$ kubectl get endpoints -A\n{}",
        describe::get_endpoints(&cluster, None, &opts)
    );
    let _ = writeln!(
        views,
        "$ kubectl get pods -A -o wide\n{}",
        describe::get_pods_wide(&cluster, None, &opts)
    );
    for svc in cluster.services() {
        let _ = writeln!(
            views,
            "$ kubectl describe service -n {} {}\n{}",
            svc.name.namespace,
            svc.name.name,
            describe::describe_service(&cluster, &svc.name, &opts).unwrap_or_default()
        );
    }
    // Cluster DNS: every record the resolver serves, then each Service's short name looked
    // up from a Pod in the default namespace, as `nslookup NAME` there would.
    let resolver = Resolver::new(&cluster, DiscoveryConfig::default());
    let mut dns = String::new();
    for r in resolver.records() {
        let _ = writeln!(dns, "{r}");
    }
    let search = SearchConfig::for_pod(&cfg.default_namespace, "cluster.local");
    for svc in cluster.services() {
        let res = resolver.resolve(&svc.name.name, QueryType::A, &search);
        let _ = writeln!(
            dns,
            "\n$ nslookup {} (from namespace {}): {} via {}",
            svc.name.name,
            cfg.default_namespace,
            res.answer.rcode,
            res.fqdn.as_deref().unwrap_or("-")
        );
        for r in res.answer.records.iter().chain(&res.answer.authority) {
            let _ = writeln!(dns, "{r}");
        }
    }
    let mut dot = String::new();
    for name in graph::services(&plan) {
        if let Some(g) = ServiceGraph::build(&cluster, &plan, &name) {
            dot.push_str(&g.to_dot());
        }
    }
    vec![
        ("graph.dot", dot),
        ("plan.txt", plan.render()),
        ("errors.txt", errors),
        ("views.txt", views),
        ("dns.txt", dns),
    ]
}

#[test]
fn golden_scenarios() {
    let bless = std::env::var_os("SVCNAT_BLESS").is_some();
    let dirs = load::scenario_dirs();
    let mut failures = Vec::new();
    for dir in &dirs {
        for (name, got) in run(dir) {
            let path = dir.join(name);
            if bless {
                fs::write(&path, &got).expect("write golden");
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
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
