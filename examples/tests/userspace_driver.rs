//! The userspace datapath's driver on a real kernel: it takes the node's forwarding over
//! (forwarding off, the nftables ingress table installed), leaves the node's own traffic
//! to the kernel, counts what its rings see, and gives everything back when dropped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use svcnat_examples::skip_unless_root;
use svcnat_examples::testbed::{ProbeArgs, Testbed, TestbedSpec, wait_until};
use svcnat_userspace::{Userspace, UserspaceConfig};

fn sysctl(tb: &Testbed, ns: &str, key: &str) -> String {
    tb.exec_ok(ns, ["sysctl", "-n", key])
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn takes_over_forwarding_and_gives_it_back() {
    skip_unless_root!();
    let tb = Testbed::new(TestbedSpec::new(1, 1)).unwrap();
    let node = tb.ns_of_node(0).to_string();
    let client = tb.ns_of_client(0).to_string();
    assert_eq!(sysctl(&tb, &node, "net.ipv4.ip_forward"), "1");
    let dp = Userspace::start(UserspaceConfig {
        netns: Some(node.clone()),
        interfaces: vec!["eth0".into(), "vp*".into()],
        workers: 2,
        ..UserspaceConfig::default()
    })
    .unwrap();
    assert_eq!(sysctl(&tb, &node, "net.ipv4.ip_forward"), "0");
    let tables = tb
        .exec_ok(&node, ["nft", "list", "table", "netdev", "svcnat"])
        .unwrap();
    assert!(tables.contains("hook ingress device \"eth0\""), "{tables}");

    // The node's own address still answers through the kernel (a closed port refuses,
    // it does not time out), and the rings saw those packets too.
    let before = dp.stats().rx_frames;
    let seen = tb
        .probe(
            &client,
            ProbeArgs::tcp(SocketAddr::new(tb.node_ip(0), 9)).count(3),
        )
        .unwrap();
    assert_eq!(seen.refused(), 3, "{seen:?}");
    // A worker counts a block's frames after handling them: give it a moment.
    let counted = wait_until(Duration::from_secs(5), || {
        dp.stats().rx_frames >= before + 3
    });
    assert!(counted, "rings saw {before} -> {:?}", dp.stats());

    drop(dp);
    assert_eq!(sysctl(&tb, &node, "net.ipv4.ip_forward"), "1");
    let out = tb
        .exec(&node, ["nft", "list", "table", "netdev", "svcnat"])
        .unwrap();
    assert!(
        !out.status.success(),
        "the ingress table outlived the datapath"
    );
}
