//! The plans both dialects' golden tests render: every core scenario
//! (`core/tests/scenarios/*`) and the scenarios defined here, which add IPv6 and the rarer
//! paths (weights, SCTP, affinity, load balancer source ranges, masquerade-all).

#![allow(dead_code)]

use svcnat_core::model::*;
use svcnat_core::plan::{NodeContext, Plan};

use crate::load;

/// Scenarios defined here: (name, node.conf text, manifests).
pub(crate) fn local_scenarios() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        (
            "dual-stack",
            "node node-1\nips 192.168.0.1,fd00:192:168::1\ncluster-cidrs 10.244.0.0/16,fd00:244::/56\n",
            DUAL_STACK,
        ),
        (
            "weights-sctp-affinity",
            "node node-1\nips 192.168.0.1\ncluster-cidrs 10.244.0.0/16\n",
            WEIGHTS,
        ),
        (
            "lb-cluster-policy",
            "node node-1\nips 192.168.0.1,172.16.0.1\ncluster-cidrs 10.244.0.0/16\nmasquerade-all true\n",
            LB_CLUSTER,
        ),
    ]
}

const DUAL_STACK: &str = "---
apiVersion: v1
kind: Service
metadata: {name: ds, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: [10.96.5.5, \"fd00:10:96::5\"]
  selector: {app: ds}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: v6only, namespace: default}
spec:
  ipFamilies: [IPv6]
  clusterIP: \"fd00:10:96::7\"
  ports: [{port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Pod
metadata: {name: ds-1, namespace: default, labels: {app: ds}}
spec: {nodeName: node-1, containers: [{name: a, image: x}]}
status:
  podIPs: [{ip: 10.244.1.5}, {ip: \"fd00:244::5\"}]
---
apiVersion: v1
kind: Pod
metadata: {name: ds-2, namespace: default, labels: {app: ds}}
spec: {nodeName: node-2, containers: [{name: a, image: x}]}
status:
  podIPs: [{ip: 10.244.2.5}, {ip: \"fd00:244:0:2::5\"}]
";

const WEIGHTS: &str = "---
apiVersion: v1
kind: Service
metadata: {name: sig, namespace: default}
spec:
  clusterIP: 10.96.7.7
  selector: {app: sig}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  externalIPs: [198.51.100.9]
  ports: [{port: 2905, protocol: SCTP}]
---
apiVersion: v1
kind: Pod
metadata: {name: sig-1, namespace: default, labels: {app: sig}, annotations: {svcnat.io/weight: \"3\"}}
spec: {nodeName: node-1, containers: [{name: a, image: x}]}
status: {podIP: 10.244.1.7}
---
apiVersion: v1
kind: Pod
metadata: {name: sig-2, namespace: default, labels: {app: sig}, annotations: {svcnat.io/weight: \"0\"}}
spec: {nodeName: node-2, containers: [{name: a, image: x}]}
status: {podIP: 10.244.2.7}
---
apiVersion: v1
kind: Pod
metadata: {name: sig-3, namespace: default, labels: {app: sig}}
spec: {nodeName: node-2, containers: [{name: a, image: x}]}
status: {podIP: 10.244.2.8}
";

const LB_CLUSTER: &str = "---
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: default}
spec:
  type: LoadBalancer
  selector: {app: shop}
  loadBalancerSourceRanges: [192.168.0.0/24, 198.51.100.0/24]
  ports: [{port: 443, nodePort: 30443}]
status:
  loadBalancer: {ingress: [{ip: 203.0.113.20}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  type: LoadBalancer
  selector: {app: nothing}
  externalIPs: [198.51.100.30]
  ports: [{port: 8443, nodePort: 30444}]
status:
  loadBalancer: {ingress: [{ip: 203.0.113.30}]}
---
apiVersion: v1
kind: Pod
metadata: {name: shop-1, namespace: default, labels: {app: shop}}
spec: {nodeName: node-2, containers: [{name: a, image: x}]}
status: {podIP: 10.244.2.20}
";

/// (golden name, plan) of every scenario: the core ones and the local ones.
pub(crate) fn all_plans() -> Vec<(String, Plan)> {
    let mut v = Vec::new();
    for dir in load::scenario_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let (_, _, _, plan) = load::load(&dir);
        v.push((name, plan));
    }
    for (name, _, _) in local_scenarios() {
        v.push((name.to_string(), local_scenario(name).2));
    }
    v
}

/// The cluster, node and plan of a scenario defined in this file; it must load cleanly.
pub(crate) fn local_scenario(name: &str) -> (Cluster, NodeContext, Plan) {
    let (_, conf, yaml) = local_scenarios()
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .unwrap();
    let (node, mut cfg) = load::parse_node_conf(conf, name);
    cfg.service_cidrs.push("fd00:10:96::/108".parse().unwrap());
    cfg.pod_cidrs.push("fd00:244::/56".parse().unwrap());
    let (cluster, errors) =
        load::build_checked(&[(format!("{name}.yaml"), yaml.to_string())], &cfg);
    assert!(errors.is_empty(), "{name}: {errors:#?}");
    let plan = Plan::compile(&cluster, &node);
    (cluster, node, plan)
}

pub(crate) fn has_family(plan: &Plan, family: IpFamily) -> bool {
    plan.frontends()
        .any(|(k, _)| IpFamily::of(&k.addr) == family)
}
