//! The conformance suite against the iptables backend (iptables and ip6tables, both
//! families every time), once per flavour (legacy and nft), with real traffic between network namespaces; then again with the agents fed through a
//! fake API server (`nft_api`, `legacy_api`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use svcnat_core::dualstack::DualStack;
use svcnat_core::model::IpFamily;
use svcnat_examples::conformance::Backend;
use svcnat_iptables::driver::{Flavour, Iptables, IptablesConfig, Runner};

struct IptablesBackend(Flavour);

impl Backend for IptablesBackend {
    /// iptables and ip6tables, as svcnat-proxy runs them on a dual-stack node.
    type Dp = DualStack<Iptables>;

    fn name(&self) -> String {
        format!("iptables ({:?})", self.0)
    }

    fn dataplane(&self, node_ns: &str) -> Result<DualStack<Iptables>, String> {
        let one = |family| {
            Iptables::new(IptablesConfig {
                runner: Runner::netns(node_ns),
                flavour: Some(self.0),
                family,
                // Tests check the canary before every sync.
                canary_interval: Duration::ZERO,
                ..IptablesConfig::default()
            })
            .map_err(|e| e.to_string())
        };
        Ok(DualStack::new(one(IpFamily::V4)?, one(IpFamily::V6)?))
    }
}

mod legacy {
    use super::*;
    svcnat_examples::conformance_suite!(IptablesBackend(Flavour::Legacy));
}

mod nft {
    use super::*;
    svcnat_examples::conformance_suite!(IptablesBackend(Flavour::Nft));
}

/// The same scenarios with every cluster change written to a fake API server and each
/// node's agent following it through its own kube-rs watchers.
mod nft_api {
    use super::*;
    svcnat_examples::conformance_suite_api!(IptablesBackend(Flavour::Nft));
}

mod legacy_api {
    use super::*;
    svcnat_examples::conformance_suite_api!(IptablesBackend(Flavour::Legacy));
}
