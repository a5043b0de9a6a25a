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

/// This machine's kernel has no SCTP (the `sctp` scenarios above print `SKIP`): the SCTP
/// scenario (nft flavour over both families, legacy over IPv4; both write the same
/// `-p sctp` rules) runs in the
/// qemu VM whose kernel has it (`backend-ipvs/vm/run.sh`, as the IPVS suite does). Every
/// test named must run there, none may skip.
#[test]
fn sctp_in_a_vm() {
    let (podserver, probe, proxy) = svcnat_examples::vm_programs!();
    let tests = ["nft::sctp", "nft::ipv6::sctp", "legacy::sctp"];
    let Some(console) = svcnat_examples::vm::run_in_vm(&svcnat_examples::vm::VmRun {
        label: "iptables SCTP".into(),
        exe: std::env::current_exe().unwrap(),
        podserver,
        probe,
        proxy,
        env: Vec::new(),
        args: ["--exact", "--test-threads=2"]
            .into_iter()
            .chain(tests)
            .map(String::from)
            .collect(),
    }) else {
        return;
    };
    for t in tests {
        assert!(
            console.contains(&format!("test {t} ... ok")),
            "{t} did not pass in the VM"
        );
    }
    assert!(
        !console.contains("SKIP:"),
        "a scenario was skipped in the VM"
    );
}
