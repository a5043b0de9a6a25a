//! The conformance suite against the userspace AF_PACKET datapath, with real traffic
//! between network namespaces: each node's datapath owns the node's LAN interface and its
//! pod veths, and the node's kernel forwards nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use svcnat_examples::conformance::{Backend, Scenario};
use svcnat_userspace::{Userspace, UserspaceConfig};

struct UserspaceBackend;

impl Backend for UserspaceBackend {
    type Dp = Userspace;

    fn name(&self) -> String {
        "userspace".into()
    }

    fn dataplane(&self, node_ns: &str) -> Result<Userspace, String> {
        Userspace::start(UserspaceConfig {
            netns: Some(node_ns.to_string()),
            interfaces: vec!["eth0".into(), "vp*".into()],
            workers: 2,
            node_traffic: true,
            ..UserspaceConfig::default()
        })
        .map_err(|e| e.to_string())
    }

    fn unsupported(&self, scenario: Scenario) -> Option<&'static str> {
        (scenario == Scenario::NodePortOnLocalhost).then_some(
            "the node's local routing table delivers 127.0.0.1 to the node itself, never \
                 to a device the datapath owns",
        )
    }
}

svcnat_examples::conformance_suite!(UserspaceBackend);

/// The same scenarios with every cluster change written to a fake API server and each
/// node's datapath following it through its own kube-rs watchers.
mod api {
    use super::*;
    svcnat_examples::conformance_suite_api!(UserspaceBackend);
}

/// This machine's kernel has no SCTP (the `sctp` scenarios above print `SKIP`): the SCTP
/// scenario over both families runs in the qemu VM whose kernel
/// has it (`backend-ipvs/vm/run.sh`, as the IPVS suite does; `nft` is in its initramfs).
/// Every test named must run there, none may skip.
#[test]
fn sctp_in_a_vm() {
    let (podserver, probe, proxy) = svcnat_examples::vm_programs!();
    let tests = ["sctp", "ipv6::sctp"];
    let Some(console) = svcnat_examples::vm::run_in_vm(&svcnat_examples::vm::VmRun {
        label: "userspace SCTP".into(),
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
