//! Properties of the plan compiler and its diff over random clusters and random changes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use std::collections::BTreeSet;
use std::net::SocketAddr;

use svcnat_core::conntrack::{StaleFlow, needs_cleanup, stale_flows};
use svcnat_core::model::Protocol;
use svcnat_core::plan::{BackendSetId, Frontend, Op, Plan};

#[path = "support/random_cluster.rs"]
mod random_cluster;
use random_cluster::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Compiling the same cluster twice gives equal plans and identical renderings.
    #[test]
    fn compile_is_deterministic(changes in proptest::collection::vec(change(), 0..30)) {
        let c = cluster_from(&changes);
        let a = Plan::compile(&c, &node_ctx());
        let b = Plan::compile(&c.clone(), &node_ctx());
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(a.render(), b.render());
    }

    /// diff(a, a) is empty and diff(a, b) applied to a gives b.
    #[test]
    fn diff_applies(before in proptest::collection::vec(change(), 0..30),
                    after in proptest::collection::vec(change(), 0..30)) {
        let ca = cluster_from(&before);
        let mut cb = ca.clone();
        for ch in &after {
            apply_change(&mut cb, ch);
        }
        let a = Plan::compile(&ca, &node_ctx());
        let b = Plan::compile(&cb, &node_ctx());
        prop_assert!(Plan::diff(&a, &a).is_empty());
        prop_assert!(Plan::diff(&b, &b).is_empty());
        prop_assert_eq!(Plan::diff(&a, &b).apply(&a), b.clone());
        prop_assert_eq!(Plan::diff(&b, &a).apply(&b), a);
    }

    /// Incremental updates, change after change, equal a full compile, and their diff is
    /// the full diff.
    #[test]
    fn incremental_update_equals_full_compile(
        base in proptest::collection::vec(change(), 0..20),
        steps in proptest::collection::vec(change(), 1..20),
    ) {
        let mut c = cluster_from(&base);
        let node = node_ctx();
        let mut plan = Plan::compile(&c, &node);
        for ch in &steps {
            let before = plan.clone();
            let _ = apply_change(&mut c, ch);
            let diff = plan.update(&c);
            let full = Plan::compile(&c, &node);
            prop_assert_eq!(&plan, &full);
            prop_assert_eq!(plan.render(), full.render());
            prop_assert_eq!(&diff, &Plan::diff(&before, &full));
            prop_assert_eq!(diff.apply(&before), full);
        }
    }
}

/// The stale flows of a change, computed naively from the whole old and new plans: what
/// [`stale_flows`] must find from the diff alone.
fn reference_stale_flows(old: &Plan, new: &Plan) -> BTreeSet<StaleFlow> {
    let eps = |p: &Plan, id: &BackendSetId| -> BTreeSet<SocketAddr> {
        p.backend_set(id)
            .map(|s| s.endpoints.iter().map(|e| e.addr).collect())
            .unwrap_or_default()
    };
    let sets_of = |f: &Frontend| -> Vec<BackendSetId> {
        std::iter::once(f.backends.clone())
            .chain(f.local_shortcut.clone())
            .collect()
    };
    let mut out = BTreeSet::new();
    for (key, f) in old.frontends() {
        if !needs_cleanup(key.protocol) {
            continue;
        }
        let frontend = SocketAddr::new(key.addr, key.port);
        let still: BTreeSet<SocketAddr> = new
            .frontend(key)
            .map(|nf| sets_of(nf).iter().flat_map(|id| eps(new, id)).collect())
            .unwrap_or_default();
        for id in sets_of(f) {
            let left = eps(old, &id)
                .into_iter()
                .filter(|e| !eps(new, &id).contains(e));
            for endpoint in left.filter(|e| !still.contains(e)) {
                out.insert(StaleFlow::EndpointGone {
                    protocol: key.protocol,
                    frontend,
                    endpoint,
                });
            }
        }
    }
    for (key, f) in new.frontends() {
        if !needs_cleanup(key.protocol) {
            continue;
        }
        for id in sets_of(f) {
            let was_empty = eps(old, &id).is_empty();
            let usable = new.backend_set(&id).is_some_and(|s| !s.is_empty());
            if was_empty && usable {
                out.insert(StaleFlow::FrontendActivated {
                    protocol: key.protocol,
                    frontend: SocketAddr::new(key.addr, key.port),
                });
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The stale conntrack flows found from each incremental diff equal those found from
    /// the whole old and new plans; none is TCP; a change that only adds endpoints to sets
    /// that had some, or changes no UDP set, finds none.
    #[test]
    fn stale_flows_are_exactly_those_of_the_change(
        base in proptest::collection::vec(change(), 0..20),
        steps in proptest::collection::vec(change(), 1..20),
    ) {
        let mut c = cluster_from(&base);
        let mut plan = Plan::compile(&c, &node_ctx());
        for ch in &steps {
            let before = plan.clone();
            let _ = apply_change(&mut c, ch);
            let diff = plan.update(&c);
            let flows = stale_flows(&diff, &plan);
            prop_assert_eq!(&flows, &reference_stale_flows(&before, &plan));
            prop_assert!(flows.iter().all(|f| f.protocol() != Protocol::Tcp));
            let only_gains = before.backend_sets().all(|(id, old)| {
                plan.backend_set(id).is_some_and(|new| {
                    old.endpoints.iter().all(|e| new.endpoints.iter().any(|n| n.addr == e.addr))
                        && (old.endpoints.len() == new.endpoints.len() || !old.endpoints.is_empty())
                })
            }) && plan.backend_sets().all(|(id, _)| before.backend_set(id).is_some())
                && before.frontends().count() == plan.frontends().count();
            if only_gains {
                prop_assert!(flows.is_empty(), "{:?}", flows);
            }
            let udp_changed = diff.ops.iter().any(|op| match op {
                Op::AddBackendSet(s) | Op::RemoveBackendSet(s) | Op::UpdateBackendSet { set: s, .. } => {
                    needs_cleanup(s.id.service_port.protocol)
                }
                _ => false,
            });
            if !udp_changed {
                prop_assert!(flows.is_empty(), "{:?}", flows);
            }
        }
    }
}
