//! The conformance suite against the iptables backend, once per flavour (legacy and nft),
//! with real traffic between network namespaces; then again with the agents fed through a
//! fake API server (`nft_api`, `legacy_api`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use svcnat_examples::conformance::Backend;
use svcnat_iptables::driver::{Flavour, Iptables, IptablesConfig, Runner};

struct IptablesBackend(Flavour);

impl Backend for IptablesBackend {
    type Dp = Iptables;

    fn name(&self) -> String {
        format!("iptables ({:?})", self.0)
    }

    fn dataplane(&self, node_ns: &str) -> Result<Iptables, String> {
        Iptables::new(IptablesConfig {
            runner: Runner::netns(node_ns),
            flavour: Some(self.0),
            // Tests check the canary before every sync.
            canary_interval: Duration::ZERO,
            ..IptablesConfig::default()
        })
        .map_err(|e| e.to_string())
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
