//! Properties of the plan compiler and its diff over random clusters and random changes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use svcnat_core::plan::Plan;

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
