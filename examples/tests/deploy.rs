//! The deployment manifests under `examples/deploy/` load cleanly with svcnat's own loader
//! (as the API server would validate them, strict fields included), expand as their
//! controllers would, and pass only flags the programs have.
//!
//! No real cluster can run on these machines; what this proves is that the manifests are
//! valid and consistent with the binaries, not that a cluster runs them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::process::Command;

use svcnat_core::discovery::{DiscoveryConfig, QueryType, Resolver};
use svcnat_core::manifest::{ClusterConfig, Manifests, ValidateError};
use svcnat_core::model::ObjectName;

const NODES: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {kubernetes.io/os: linux}}
status: {addresses: [{type: InternalIP, address: 192.168.50.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2, labels: {kubernetes.io/os: linux}}
status: {addresses: [{type: InternalIP, address: 192.168.50.12}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-3, labels: {kubernetes.io/os: linux}}
status: {addresses: [{type: InternalIP, address: 192.168.50.13}]}
";

fn deploy_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy"))
}

fn load() -> (Manifests, svcnat_core::model::Cluster) {
    let mut files: Vec<(String, String)> = fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| (p.display().to_string(), fs::read_to_string(&p).unwrap()))
        .collect();
    files.sort();
    files.push(("nodes.yaml".into(), NODES.into()));
    let config = ClusterConfig::default();
    let mut m = Manifests::from_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str())), &config);
    let cluster = m.build(&config);
    (m, cluster)
}

#[test]
fn the_deployment_manifests_are_valid_and_expand() {
    let (m, cluster) = load();
    assert!(m.errors.is_empty(), "{:#?}", m.errors);
    // Only the RBAC kinds are skipped (svcnat does not read them).
    for w in &m.warnings {
        match &w.error {
            ValidateError::UnsupportedKind(k) => {
                assert!(
                    ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"].contains(&k.as_str()),
                    "{w}"
                );
                // Cluster-scoped kinds are named without a namespace.
                let ns = &w.object.as_ref().expect("object").namespace;
                assert_eq!(ns.is_empty(), k.starts_with("Cluster"), "{w}");
            }
            _ => panic!("unexpected warning: {w}"),
        }
    }
    // The proxy DaemonSet: one Pod per Node, in kube-system.
    let proxies: Vec<_> = cluster
        .pods()
        .filter(|p| p.name.namespace == "kube-system" && p.name.name.starts_with("svcnat-proxy"))
        .collect();
    assert_eq!(proxies.len(), 3, "{proxies:#?}");
    let mut nodes: Vec<_> = proxies.iter().filter_map(|p| p.node_name.clone()).collect();
    nodes.sort();
    assert_eq!(nodes, ["node-1", "node-2", "node-3"]);
    // The DNS Deployment behind the kube-dns ClusterIP: two endpoints on 53/UDP and 53/TCP.
    let dns = cluster
        .service(&ObjectName::new("kube-system", "kube-dns"))
        .expect("kube-dns");
    assert_eq!(dns.cluster_ip(), Some("10.96.0.10".parse().unwrap()));
    let eps = cluster.endpoints(dns);
    assert_eq!(eps["dns"].1.len(), 2, "{eps:?}");
    assert_eq!(eps["dns-tcp"].1.len(), 2, "{eps:?}");
    let resolver = Resolver::new(&cluster, DiscoveryConfig::default());
    assert_eq!(
        resolver
            .query("kube-dns.kube-system.svc.cluster.local", QueryType::A)
            .addresses(),
        ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
}

/// Every `--flag` the manifests pass exists in the binary's `--help`.
#[test]
fn the_manifests_pass_only_flags_the_programs_have() {
    for (file, bin) in [
        ("svcnat-proxy.yaml", env!("CARGO_BIN_EXE_svcnat-proxy")),
        ("svcnat-dns.yaml", env!("CARGO_BIN_EXE_svcnat-dns")),
    ] {
        let help = Command::new(bin).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let text = fs::read_to_string(deploy_dir().join(file)).unwrap();
        let flags: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- --"))
            .map(|f| f.split('=').next().unwrap_or(f))
            .collect();
        assert!(!flags.is_empty(), "{file} passes no flags?");
        for f in flags {
            assert!(
                help.contains(&format!("--{f}")),
                "{file} passes --{f}, which {bin} does not have"
            );
        }
    }
}
