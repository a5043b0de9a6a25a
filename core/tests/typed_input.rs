//! The two roles meet at the typed input: properties over random clusters and random
//! sequences of typed objects.
//!
//! - What the controller publishes for Pods, handed to a proxy-only cluster as the API
//!   objects an API server would serve, compiles to the very plan the simulated cluster
//!   compiles.
//! - Any sequence of typed apply/delete events, each followed by `Plan::update`, leaves the
//!   plan a full compile of the final state gives, and reports the diff between the two.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discovery;
use proptest::prelude::*;
use serde_json::json;
use svcnat_core::controller;
use svcnat_core::model::Cluster;
use svcnat_core::plan::Plan;

#[path = "support/random_cluster.rs"]
mod random_cluster;
use random_cluster::*;

/// The proxy-only view of a simulated cluster: its Services, and its slices as API objects.
fn through_the_api(sim: &Cluster) -> Cluster {
    let mut c = Cluster::new();
    for svc in sim.services() {
        c.upsert_service(svc.clone());
        for slice in sim.slices_of(&svc.name) {
            c.apply_endpoint_slice(&controller::to_api(slice))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Pods -> controller -> EndpointSlices -> plan equals the same EndpointSlices applied
    /// through the typed API -> plan.
    #[test]
    fn controller_slices_through_the_api_compile_to_the_same_plan(
        changes in proptest::collection::vec(change(), 0..40)
    ) {
        let sim = cluster_from(&changes);
        let api = through_the_api(&sim);
        let node = node_ctx();
        let a = Plan::compile(&sim, &node);
        let b = Plan::compile(&api, &node);
        prop_assert_eq!(a.render(), b.render());
        prop_assert_eq!(a, b);
    }
}

/// One typed event.
#[derive(Clone, Debug)]
enum Event {
    ApplyService {
        i: u8,
        node_port: bool,
        external_ip: Option<u8>,
        local: bool,
        udp: bool,
    },
    DeleteService(u8),
    ApplySlice {
        /// Slice index (its name).
        j: u8,
        /// The Service it belongs to (slices move between Services).
        i: u8,
        /// (last octet, ready, serving, terminating, node)
        endpoints: Vec<(u8, bool, bool, bool, u8)>,
        port: u16,
    },
    DeleteSlice(u8),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (
            0u8..5,
            any::<bool>(),
            proptest::option::of(0u8..2),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(
                |(i, node_port, external_ip, local, udp)| Event::ApplyService {
                    i,
                    node_port,
                    external_ip,
                    local,
                    udp,
                }
            ),
        (0u8..5).prop_map(Event::DeleteService),
        (
            0u8..8,
            0u8..5,
            proptest::collection::vec(
                (0u8..6, any::<bool>(), any::<bool>(), any::<bool>(), 0u8..3),
                0..5
            ),
            prop_oneof![Just(8080u16), Just(9090)]
        )
            .prop_map(|(j, i, endpoints, port)| Event::ApplySlice {
                j,
                i,
                endpoints,
                port
            }),
        (0u8..8).prop_map(Event::DeleteSlice),
    ]
}

fn service_object(
    i: u8,
    node_port: bool,
    external_ip: Option<u8>,
    local: bool,
    udp: bool,
) -> corev1::Service {
    let mut spec = json!({
        "type": if node_port { "NodePort" } else { "ClusterIP" },
        "clusterIP": format!("10.96.0.{}", 10 + i),
        "clusterIPs": [format!("10.96.0.{}", 10 + i)],
        "ipFamilies": ["IPv4"],
        "selector": {"app": format!("a{i}")},
        "ports": [{
            "name": "p",
            "port": 80,
            "protocol": if udp { "UDP" } else { "TCP" },
            "targetPort": 8080,
        }],
    });
    if node_port {
        spec["ports"][0]["nodePort"] = json!(30000 + u16::from(i));
        if local {
            spec["externalTrafficPolicy"] = json!("Local");
        }
    }
    if let Some(e) = external_ip {
        // A pool of two addresses, so Services contest them.
        spec["externalIPs"] = json!([format!("192.0.2.{e}")]);
    }
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc{i}"), "namespace": "ns"},
        "spec": spec,
    }))
    .unwrap()
}

fn slice_object(
    j: u8,
    i: u8,
    endpoints: &[(u8, bool, bool, bool, u8)],
    port: u16,
) -> discovery::EndpointSlice {
    let eps: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(last, ready, serving, terminating, node)| {
            json!({
                "addresses": [format!("10.244.{node}.{last}")],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "nodeName": NODES[usize::from(*node)],
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("slice{j}"),
            "namespace": "ns",
            "labels": {"kubernetes.io/service-name": format!("svc{i}")},
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [
            {"name": "p", "port": port, "protocol": "TCP"},
            {"name": "p", "port": port, "protocol": "UDP"},
        ],
    }))
    .unwrap()
}

fn apply(c: &mut Cluster, e: &Event) {
    match e {
        Event::ApplyService {
            i,
            node_port,
            external_ip,
            local,
            udp,
        } => {
            c.apply_service(&service_object(*i, *node_port, *external_ip, *local, *udp))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        Event::DeleteService(i) => {
            let _ = c.delete_service("ns", &format!("svc{i}"));
        }
        Event::ApplySlice {
            j,
            i,
            endpoints,
            port,
        } => {
            c.apply_endpoint_slice(&slice_object(*j, *i, endpoints, *port))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        Event::DeleteSlice(j) => {
            let _ = c.delete_endpoint_slice("ns", &format!("slice{j}"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// After every typed event, the incrementally updated plan equals a full compile of
    /// the state so far, and the diff it reports is the diff between the two plans.
    #[test]
    fn typed_event_sequences_keep_the_plan_exact(
        events in proptest::collection::vec(event(), 1..40)
    ) {
        let node = node_ctx();
        let mut c = Cluster::new();
        let mut plan = Plan::compile(&c, &node);
        for e in &events {
            let before = plan.clone();
            apply(&mut c, e);
            let diff = plan.update(&c);
            let full = Plan::compile(&c, &node);
            prop_assert_eq!(&plan, &full, "after {:?}", e);
            prop_assert_eq!(plan.render(), full.render());
            prop_assert_eq!(&diff, &Plan::diff(&before, &full), "diff after {:?}", e);
            prop_assert_eq!(diff.apply(&before), full);
        }
    }
}

/// kube-proxy never reads a selector: a Service that has one, with EndpointSlices and no
/// Pods, gets the slices' endpoints (in the manifest world too, where the controller
/// publishes nothing for it since no Pod matches).
#[test]
fn a_selector_service_with_slices_and_no_pods_uses_the_slices() {
    let text = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.40
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.7]
  conditions: {ready: true}
- addresses: [10.244.2.7]
  conditions: {ready: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-2
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.2.7]
  conditions: {ready: true}
";
    let cfg = svcnat_core::manifest::ClusterConfig::default();
    let mut m = svcnat_core::manifest::Manifests::from_files([("web.yaml", text)], &cfg);
    let cluster = m.build(&cfg);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let plan = Plan::compile(&cluster, &node_ctx());
    let rendered = plan.render();
    // Both addresses, each once: 10.244.2.7 is in two slices and the ready copy wins.
    assert_eq!(plan.endpoint_count(), 2, "{rendered}");
    assert!(rendered.contains("10.244.1.7:8080"), "{rendered}");
    assert!(rendered.contains("10.244.2.7:8080"), "{rendered}");
    let svc = cluster
        .services()
        .find(|s| s.name.name == "web")
        .expect("web");
    assert!(
        cluster.endpoints(svc)["http"]
            .1
            .iter()
            .all(|e| e.endpoint.ready)
    );
    // The same objects through the typed API give the same plan.
    let mut api = Cluster::new();
    api.upsert_service(svc.clone());
    for s in cluster.slices_of(&svc.name) {
        api.apply_endpoint_slice(&controller::to_api(s)).unwrap();
    }
    assert_eq!(Plan::compile(&api, &node_ctx()), plan);
}
