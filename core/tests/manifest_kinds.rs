//! Manifest loading end to end: Services whose families come from their cluster IPs,
//! StatefulSets and DaemonSets expanded into Pods, `.json` manifests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use svcnat_core::discovery::{DiscoveryConfig, QueryType, Resolver};
use svcnat_core::manifest::{ClusterConfig, Manifests};
use svcnat_core::model::{IpFamily, ObjectName};
use svcnat_core::plan::{NodeContext, Plan};

fn load(files: &[(&str, &str)]) -> (Manifests, svcnat_core::model::Cluster) {
    let cfg = ClusterConfig::default();
    let mut m = Manifests::from_files(files.iter().copied(), &cfg);
    let c = m.build(&cfg);
    (m, c)
}

/// "ipFamilies ... defaulted from clusterIPs": a Service that names its cluster IPs and no
/// families gets the families of its cluster IPs, and is proxied.
#[test]
fn cluster_ips_without_families_get_their_families() {
    let text = "apiVersion: v1
kind: Service
metadata: {name: fixed}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, image: c}]}
status: {phase: Running, podIP: 10.244.0.5}
";
    let (m, c) = load(&[("svc.yaml", text)]);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let svc = c.service(&ObjectName::new("default", "fixed")).unwrap();
    assert_eq!(svc.ip_families, [IpFamily::V4]);
    let node = NodeContext::new("node-1", vec![[192, 168, 0, 1].into()], Vec::new());
    let plan = Plan::compile(&c, &node).render();
    assert!(plan.contains("10.96.0.10"), "{plan}");
    assert!(plan.contains("10.244.0.5:80"), "{plan}");
}

const NODES: &str = "apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 192.168.50.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2, labels: {topology.kubernetes.io/zone: zone-a}}
status: {addresses: [{type: InternalIP, address: 192.168.50.12}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-3}
status: {addresses: [{type: InternalIP, address: 192.168.50.13}]}
";

const CASSANDRA: &str = "apiVersion: v1
kind: Service
metadata: {name: cassandra, namespace: db}
spec:
  clusterIP: None
  selector: {app: cassandra}
  ports: [{name: cql, port: 9042}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: cassandra, namespace: db}
spec:
  serviceName: cassandra
  replicas: 4
  selector: {matchLabels: {app: cassandra}}
  template:
    metadata: {labels: {app: cassandra}}
    spec:
      containers:
      - name: cassandra
        image: cassandra:5
        ports: [{name: cql, containerPort: 9042}]
";

/// A StatefulSet's Pods are `name-0..name-(replicas-1)`, placed round-robin, each with
/// hostname = its name and subdomain = `spec.serviceName`, so the headless Service
/// publishes one DNS name per Pod.
#[test]
fn stateful_set_pods_get_ordinal_names_and_dns_names() {
    let (m, c) = load(&[("nodes.yaml", NODES), ("cassandra.yaml", CASSANDRA)]);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let pods: Vec<_> = c
        .pods()
        .map(|p| {
            (
                p.name.to_string(),
                p.node_name.clone().unwrap(),
                p.hostname.clone().unwrap(),
                p.subdomain.clone().unwrap(),
            )
        })
        .collect();
    let want: Vec<_> = [
        ("db/cassandra-0", "node-1"),
        ("db/cassandra-1", "node-2"),
        ("db/cassandra-2", "node-3"),
        ("db/cassandra-3", "node-1"),
    ]
    .iter()
    .map(|(n, node)| {
        (
            n.to_string(),
            node.to_string(),
            n.trim_start_matches("db/").to_string(),
            "cassandra".to_string(),
        )
    })
    .collect();
    assert_eq!(pods, want);
    let resolver = Resolver::new(&c, DiscoveryConfig::default());
    for p in c.pods() {
        let name = format!("{}.cassandra.db.svc.cluster.local", p.name.name);
        let answer = resolver.query(&name, QueryType::A);
        assert_eq!(answer.addresses(), p.ips, "{name}");
    }
    let all = resolver.query("cassandra.db.svc.cluster.local", QueryType::A);
    assert_eq!(all.addresses().len(), 4);
}

/// `spec.ordinals.start` numbers the Pods from it; without `serviceName` they have a
/// hostname and no subdomain.
#[test]
fn stateful_set_ordinals_start_and_no_service_name() {
    let text = CASSANDRA
        .replace("  serviceName: cassandra\n", "  ordinals: {start: 7}\n")
        .replace("replicas: 4", "replicas: 2");
    let (m, c) = load(&[("nodes.yaml", NODES), ("cassandra.yaml", &text)]);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let names: Vec<_> = c
        .pods()
        .map(|p| (p.name.name.clone(), p.hostname.clone(), p.subdomain.clone()))
        .collect();
    assert_eq!(
        names,
        [
            (
                "cassandra-7".to_string(),
                Some("cassandra-7".to_string()),
                None
            ),
            (
                "cassandra-8".to_string(),
                Some("cassandra-8".to_string()),
                None
            ),
        ]
    );
}

fn daemon_set(node_selector: &str, node_name: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: agent, namespace: kube-system}}
spec:
  selector: {{matchLabels: {{app: agent}}}}
  template:
    metadata: {{labels: {{app: agent}}}}
    spec:
      nodeSelector: {{{node_selector}}}
{node_name}      containers: [{{name: agent, image: agent, ports: [{{containerPort: 9100}}]}}]
"
    )
}

fn pods_on_nodes(c: &svcnat_core::model::Cluster) -> Vec<(String, String)> {
    c.pods()
        .map(|p| (p.name.name.clone(), p.node_name.clone().unwrap()))
        .collect()
}

/// A DaemonSet runs one Pod on each Node its template allows, with deterministic names.
#[test]
fn daemon_set_runs_one_pod_per_eligible_node() {
    let all = daemon_set("kubernetes.io/os: linux", "");
    let (m, c) = load(&[("nodes.yaml", NODES), ("ds.yaml", &all)]);
    assert!(m.errors.is_empty() && m.warnings.is_empty(), "{m:?}");
    let pods = pods_on_nodes(&c);
    let mut nodes: Vec<_> = pods.iter().map(|(_, n)| n.as_str()).collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["node-1", "node-2", "node-3"]);
    let names: std::collections::BTreeSet<_> = pods.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(names.len(), 3);
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("agent-") && n.len() == 11)
    );
    // The same manifests give the same names.
    let (_, again) = load(&[("nodes.yaml", NODES), ("ds.yaml", &all)]);
    assert_eq!(pods_on_nodes(&again), pods);
    // Every Pod got an address from its Node's pod CIDR.
    for p in c.pods() {
        let node = c.node(p.node_name.as_deref().unwrap()).unwrap();
        assert!(node.pod_cidrs[0].contains(&p.ips[0]), "{p:?}");
    }

    let zone = daemon_set("topology.kubernetes.io/zone: zone-a", "");
    let (_, c) = load(&[("nodes.yaml", NODES), ("ds.yaml", &zone)]);
    let nodes: Vec<_> = pods_on_nodes(&c).into_iter().map(|(_, n)| n).collect();
    assert_eq!(nodes, ["node-2"]);

    let host = daemon_set("kubernetes.io/hostname: node-3", "");
    let (_, c) = load(&[("nodes.yaml", NODES), ("ds.yaml", &host)]);
    let nodes: Vec<_> = pods_on_nodes(&c).into_iter().map(|(_, n)| n).collect();
    assert_eq!(nodes, ["node-3"]);

    let pinned = daemon_set("", "      nodeName: node-1\n");
    let (_, c) = load(&[("nodes.yaml", NODES), ("ds.yaml", &pinned)]);
    let nodes: Vec<_> = pods_on_nodes(&c).into_iter().map(|(_, n)| n).collect();
    assert_eq!(nodes, ["node-1"]);

    // No Nodes, no Pods.
    let (m, c) = load(&[("ds.yaml", &all)]);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    assert_eq!(c.pods().count(), 0);
}

/// A nodeSelector key the model keeps no Node label for is not evaluated, and says so.
#[test]
fn daemon_set_unknown_node_label_is_a_warning() {
    let text = daemon_set("node-role.kubernetes.io/worker: \"\"", "");
    let (m, c) = load(&[("nodes.yaml", NODES), ("ds.yaml", &text)]);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let warnings: Vec<_> = m.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        ["ds.yaml:9: document 0: DaemonSet kube-system/agent: \
          spec.template.spec.nodeSelector.node-role.kubernetes.io/worker: Invalid value: \
          \"node-role.kubernetes.io/worker\": not evaluated: Nodes carry only the labels \
          kubernetes.io/hostname, kubernetes.io/os, topology.kubernetes.io/zone here; every \
          Node matches"]
    );
    assert_eq!(c.pods().count(), 3);
}

/// The same objects as JSON (a stream holding a List and an object) and as YAML give the
/// same cluster.
#[test]
fn json_manifests_load_like_yaml() {
    let json = r#"{"apiVersion": "v1", "kind": "List", "items": [
  {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "cassandra", "namespace": "db"},
   "spec": {"clusterIP": "None", "selector": {"app": "cassandra"},
            "ports": [{"name": "cql", "port": 9042}]}}
]}
{
  "apiVersion": "apps/v1",
  "kind": "StatefulSet",
  "metadata": {"name": "cassandra", "namespace": "db"},
  "spec": {
    "serviceName": "cassandra",
    "replicas": 4,
    "selector": {"matchLabels": {"app": "cassandra"}},
    "template": {
      "metadata": {"labels": {"app": "cassandra"}},
      "spec": {"containers": [{"name": "cassandra", "image": "cassandra:5",
                               "ports": [{"name": "cql", "containerPort": 9042}]}]}
    }
  }
}
"#;
    let (m, from_json) = load(&[("nodes.yaml", NODES), ("cassandra.json", json)]);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let (_, from_yaml) = load(&[("nodes.yaml", NODES), ("cassandra.yaml", CASSANDRA)]);
    let view = |c: &svcnat_core::model::Cluster| {
        let services: Vec<_> = c.services().cloned().collect();
        let pods: Vec<_> = c.pods().cloned().collect();
        format!("{services:?}\n{pods:?}")
    };
    assert_eq!(view(&from_json), view(&from_yaml));
    assert_eq!(from_json.pods().count(), 4);
}

/// A `.json` file is read as JSON: YAML in it is a JSON syntax error with its line.
#[test]
fn json_file_with_yaml_is_a_json_error() {
    let (m, _) = load(&[("svc.json", "\n\napiVersion: v1\nkind: Service\n")]);
    let errors: Vec<_> = m.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        ["svc.json:3: document 0: invalid JSON: expected value"]
    );
}

/// Errors found after loading (a node port clash) and warnings (an old apiVersion, read as
/// the current one) point at their JSON lines too.
#[test]
fn json_clashes_and_old_api_versions_have_lines() {
    let svc = |name: &str| {
        format!(
            r#"{{
  "apiVersion": "v1",
  "kind": "Service",
  "metadata": {{"name": "{name}"}},
  "spec": {{
    "type": "NodePort",
    "selector": {{"app": "web"}},
    "ports": [{{"port": 80, "nodePort": 30080}}]
  }}
}}
"#
        )
    };
    let deployment = r#"{"apiVersion": "extensions/v1beta1", "kind": "Deployment",
 "metadata": {"name": "web"},
 "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
          "template": {"metadata": {"labels": {"app": "web"}},
                       "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}}
"#;
    let text = format!("{}{}{deployment}", svc("first"), svc("second"));
    let (m, c) = load(&[("web.json", &text)]);
    let errors: Vec<_> = m.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "web.json:18: document 1: Service default/second: spec.ports[0].nodePort: Invalid \
          value: 30080: provided port is already allocated (to Service default/first in web.json:1)"
        ]
    );
    let warnings: Vec<_> = m.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "web.json:21: document 2: Deployment default/web: apiVersion: Invalid value: \
          \"extensions/v1beta1\": deprecated; read as apps/v1"
        ]
    );
    assert_eq!(c.pods().count(), 2);
    assert_eq!(c.services().count(), 1);
}

/// YAML merge keys, which kubectl's YAML reader applies, are applied (and `<<` is not an
/// unknown field).
#[test]
fn yaml_merge_keys_are_applied() {
    let text = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - &http {name: http, port: 80, targetPort: 8080}
  - <<: *http
    name: alt
    port: 9090
";
    let (m, c) = load(&[("svc.yaml", text)]);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let svc = c.service(&ObjectName::new("default", "web")).unwrap();
    let ports: Vec<_> = svc
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port, format!("{:?}", p.target_port)))
        .collect();
    assert_eq!(
        ports,
        [
            ("http", 80, "Number(8080)".to_string()),
            // The target port comes from the merged item.
            ("alt", 9090, "Number(8080)".to_string())
        ]
    );
}
