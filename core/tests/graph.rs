//! The drawing of a Service's path (`svcnat_core::graph`): the SVG is well-formed XML
//! holding every box and label the plan implies, hostile names are escaped, and a Service
//! the plan has nothing for draws nothing. The DOT form is golden in `tests/scenarios/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/scenario.rs"]
mod load;

use std::path::Path;

use svcnat_core::graph::{self, ServiceGraph};
use svcnat_core::manifest::Manifests;
use svcnat_core::model::ObjectName;
use svcnat_core::plan::Plan;

/// Checks that `svg` is well-formed: tags balance, attribute values are quoted, text holds
/// no raw `<` or stray `&`.
fn well_formed(svg: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| entity.starts_with(e)),
                "stray & in {text:?}"
            );
        }
        let close = rest[open..].find('>').expect("unclosed tag") + open;
        let tag = &rest[open + 1..close];
        assert!(!tag.contains('<'), "< inside a tag: {tag}");
        assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag}");
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.trim()), "at </{name}>");
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().unwrap().to_string();
            stack.push(name);
        }
        rest = &rest[close + 1..];
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    assert!(rest.trim().is_empty());
}

#[test]
fn the_labs_vote_service_is_drawn_whole() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/lab-vote");
    let (node, cfg) = load::node_conf(&dir);
    let texts = load::manifests(&dir);
    let mut m = Manifests::from_files(texts.iter().map(|(n, t)| (n.as_str(), t.as_str())), &cfg);
    let cluster = m.build(&cfg);
    let plan = Plan::compile(&cluster, &node);
    let vote = ObjectName::new("instavote", "vote");
    assert_eq!(
        graph::services(&plan).into_iter().collect::<Vec<_>>(),
        vec![vote.clone()]
    );
    let g = ServiceGraph::build(&cluster, &plan, &vote).unwrap();
    assert_eq!(g.frontends.len(), 2, "ClusterIP and NodePort");
    assert_eq!(g.chains.len(), 1);
    assert_eq!(
        g.chains[0].name, "KUBE-SVC-VIQHAVHDK4QE7NA4",
        "the lab's chain"
    );
    let shares: Vec<f64> = g.chains[0].branches.iter().map(|b| b.share).collect();
    assert_eq!(shares, vec![0.2; 5]);
    let probabilities: Vec<String> = g.chains[0]
        .branches
        .iter()
        .map(|b| format!("{:.4}", b.probability))
        .collect();
    assert_eq!(
        probabilities,
        ["0.2000", "0.2500", "0.3333", "0.5000", "1.0000"]
    );
    let svg = g.to_svg();
    well_formed(&svg);
    for want in [
        "vote-58bpv",
        "vote-986cl",
        "node k-02",
        "node k-03",
        "KUBE-SEP-2CJQISP4W7F2HCRW",
        "DNAT 10.38.0.5:80",
        "p 0.3333 → 20%",
        "NodePort TCP",
        "192.168.50.12:30000",
    ] {
        assert!(svg.contains(want), "{want} missing from the SVG");
    }
    // Every pod and endpoint chain is drawn once: 2 frontends + 1 chain + 5 SEPs + 5 pods
    // boxes, and 2 node groups.
    assert_eq!(svg.matches("<rect ").count(), 1 + 2 + 1 + 5 + 5 + 2);
}

#[test]
fn hostile_names_are_escaped() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 80, protocol: TCP}]
endpoints:
- addresses: [10.244.0.9]
  nodeName: \"n</text><script>&\\\"\"
  targetRef: {kind: Pod, name: \"p<&>\\\"'\"}
  conditions: {ready: true}
";
    let cfg = Default::default();
    let mut m = Manifests::from_files([("web.yaml", yaml)], &cfg);
    let cluster = m.build(&cfg);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let node = svcnat_core::plan::NodeContext::new("n1".to_string(), Vec::new(), Vec::new());
    let plan = Plan::compile(&cluster, &node);
    let g = ServiceGraph::build(&cluster, &plan, &ObjectName::new("default", "web")).unwrap();
    let svg = g.to_svg();
    well_formed(&svg);
    assert!(!svg.contains("<script>"));
    let dot = g.to_dot();
    assert!(dot.contains(r#"p<&>\"'"#), "{dot}");
    assert!(ServiceGraph::build(&cluster, &plan, &ObjectName::new("default", "nope")).is_none());
}
