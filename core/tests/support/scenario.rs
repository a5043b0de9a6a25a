//! Loads the golden scenarios of `core/tests/scenarios/`: the `*.yaml` files in name order
//! and `node.conf`. The one loader of the core tests and of every backend's golden tests,
//! which include it with `#[path]`.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use svcnat_core::manifest::{ClusterConfig, Manifests};
use svcnat_core::model::Cluster;
use svcnat_core::plan::{ChainIdStyle, NodeContext, Plan};

/// The scenario directories, sorted.
pub(crate) fn scenario_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests/scenarios");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .expect("core scenarios")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 8, "scenarios missing: {dirs:?}");
    dirs
}

/// The directory of one scenario by name.
pub(crate) fn scenario_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../core/tests/scenarios")
        .join(name)
}

/// `node.conf`, parsed as `core/tests/scenarios.rs` parses it.
pub(crate) fn node_conf(dir: &Path) -> (NodeContext, ClusterConfig) {
    let text = fs::read_to_string(dir.join("node.conf")).expect("node.conf");
    parse_node_conf(&text, &dir.display().to_string())
}

/// Parses `node.conf` text; `origin` names it in panics.
pub(crate) fn parse_node_conf(text: &str, origin: &str) -> (NodeContext, ClusterConfig) {
    let mut node = NodeContext::new("node-1", Vec::new(), Vec::new());
    let mut cfg = ClusterConfig::default();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (k, v) = line.split_once(' ').unwrap_or((line, ""));
        let list = || {
            v.split(',')
                .map(|s| s.trim().parse().expect(line))
                .collect::<Vec<_>>()
        };
        match k {
            "namespace" => cfg.default_namespace = v.to_string(),
            "node" => node.node_name = v.to_string(),
            "ips" => {
                node.node_ips = v
                    .split(',')
                    .map(|s| s.trim().parse().expect(line))
                    .collect()
            }
            "cluster-cidrs" => node.cluster_cidrs = list(),
            "nodeport-addresses" => node.nodeport_addresses = list(),
            "masquerade-all" => node.masquerade_all = v == "true",
            "chain-ids" => {
                node.chain_ids = match v {
                    "legacy" => ChainIdStyle::Legacy,
                    _ => ChainIdStyle::Current,
                }
            }
            other => panic!("{origin}: unknown key {other}"),
        }
    }
    (node, cfg)
}

/// The manifests of a scenario as (file name, text), in name order.
pub(crate) fn manifests(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                fs::read_to_string(p).expect("read"),
            )
        })
        .collect()
}

/// Builds a cluster from manifest texts; also returns the load errors (some scenarios
/// expect them).
pub(crate) fn build_checked(
    texts: &[(String, String)],
    cfg: &ClusterConfig,
) -> (Cluster, Vec<String>) {
    let mut m = Manifests::from_files(texts.iter().map(|(n, t)| (n.as_str(), t.as_str())), cfg);
    let c = m.build(cfg);
    (c, m.errors.iter().map(|e| e.to_string()).collect())
}

/// Builds a cluster from manifest texts (errors are ignored, as the scenarios expect some).
pub(crate) fn build(texts: &[(String, String)], cfg: &ClusterConfig) -> Cluster {
    build_checked(texts, cfg).0
}

/// The cluster, node and compiled plan of a scenario directory.
pub(crate) fn load(dir: &Path) -> (Cluster, NodeContext, ClusterConfig, Plan) {
    let (node, cfg) = node_conf(dir);
    let cluster = build(&manifests(dir), &cfg);
    let plan = Plan::compile(&cluster, &node);
    (cluster, node, cfg, plan)
}
