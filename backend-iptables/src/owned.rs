//! A step both dialects' partial updates share (`render::Ruleset::update` and
//! `nftables::render::Ruleset::update`): which frontends and backend sets a Service port
//! touched by a diff owns afterwards. Pure.

use std::collections::{BTreeMap, BTreeSet};

use svcnat_core::plan::{BackendSetId, FrontendKey, Plan, ServicePortName};

/// The frontends and backend sets `spn` owns after a diff: those its unit had (`old_*`)
/// and those the diff names for it, kept only where the new plan still has them (a
/// frontend only while it still belongs to `spn`). `owners` (frontend key -> Service
/// port) moves with them: keys `spn` held are released, the kept ones claimed.
pub(crate) fn owned_after(
    plan: &Plan,
    spn: &ServicePortName,
    old_frontends: &[FrontendKey],
    old_sets: &[BackendSetId],
    diff_keys: &BTreeSet<FrontendKey>,
    diff_sets: &BTreeSet<BackendSetId>,
    owners: &mut BTreeMap<FrontendKey, ServicePortName>,
) -> (Vec<FrontendKey>, Vec<BackendSetId>) {
    let keys: Vec<FrontendKey> = old_frontends
        .iter()
        .chain(diff_keys)
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| plan.frontend(k).is_some_and(|f| &f.service_port == spn))
        .collect();
    let sets: Vec<BackendSetId> = old_sets
        .iter()
        .chain(diff_sets)
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|id| plan.backend_set(id).is_some())
        .collect();
    for k in old_frontends {
        if owners.get(k) == Some(spn) {
            owners.remove(k);
        }
    }
    for k in &keys {
        owners.insert(*k, spn.clone());
    }
    (keys, sets)
}
