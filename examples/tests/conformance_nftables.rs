//! The conformance suite against the nftables dialect (`ip svcnat` and `ip6 svcnat`, one
//! `nft` driver per family as svcnat-proxy runs them on a dual-stack node), with real
//! traffic between network namespaces; then again with the agents fed through a fake API
//! server (`api`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use svcnat_core::dualstack::DualStack;
use svcnat_core::model::IpFamily;
use svcnat_examples::conformance::Backend;
use svcnat_iptables::nftables::driver::{Nftables, NftablesConfig};

struct NftablesBackend;

impl Backend for NftablesBackend {
    type Dp = DualStack<Nftables>;

    fn name(&self) -> String {
        "nftables".into()
    }

    fn dataplane(&self, node_ns: &str) -> Result<DualStack<Nftables>, String> {
        let one = |family| {
            let mut c = NftablesConfig::new(Some(node_ns.to_string()), family);
            // Tests check the table before every sync.
            c.drift_interval = Duration::ZERO;
            Nftables::new(c)
        };
        Ok(DualStack::new(one(IpFamily::V4), one(IpFamily::V6)))
    }
}

svcnat_examples::conformance_suite!(NftablesBackend);

/// The same scenarios with every cluster change written to a fake API server and each
/// node's agent following it through its own kube-rs watchers.
mod api {
    use super::*;
    svcnat_examples::conformance_suite_api!(NftablesBackend);
}
