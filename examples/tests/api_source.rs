//! The API source against the fake API server (HTTPS list/watch on loopback): the first
//! lists, changes as they come, the proxy-name filter at the server, an outage during
//! which nothing is removed, and the re-list after it that removes what was deleted
//! meanwhile. No root needed: no dataplane is programmed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::json;
use svcnat_core::model::ServiceName;
use svcnat_examples::api::{ApiConfig, ApiSource, ClientSource};
use svcnat_examples::fakeapi::{FakeApiServer, Verb};
use svcnat_examples::proxy::Source;

fn service(name: &str, ip: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "web", "labels": labels},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]}
    })
}

fn slice(name: &str, svc: &str, ips: &[&str]) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "web",
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}]
    })
}

/// Polls until `done` holds (at most 30 s).
fn until(source: &mut ApiSource, what: &str, done: impl Fn(&ApiSource) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        source.poll().unwrap();
        if done(source) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn services(source: &ApiSource) -> Vec<String> {
    source
        .cluster()
        .services()
        .map(|s| s.name.name.clone())
        .collect()
}

fn endpoints(source: &ApiSource, svc: &str) -> usize {
    source
        .cluster()
        .slices_of(&ServiceName::new("web", svc))
        .map(|s| s.endpoints.len())
        .sum()
}

#[test]
fn follows_the_api_server_through_an_outage() {
    let api = FakeApiServer::start_new().unwrap();
    api.apply_json(service("a", "10.96.0.10", json!({})))
        .unwrap();
    api.apply_json(service("b", "10.96.0.11", json!({})))
        .unwrap();
    api.apply_json(service(
        "other",
        "10.96.0.12",
        json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
    ))
    .unwrap();
    api.apply_json(slice("a-1", "a", &["10.244.0.5"])).unwrap();

    let mut source = ApiSource::start(ApiConfig {
        role: svcnat_examples::api::ApiRole::Proxy,
        client: ClientSource::Kubeconfig(api.kubeconfig_path().to_path_buf()),
        node_name: "node-1".into(),
        service_proxy_name: None,
    })
    .unwrap();
    until(&mut source, "the first lists", |s| s.is_ready());
    assert_eq!(
        services(&source),
        ["a", "b"],
        "another proxy's Service is not listed"
    );
    assert_eq!(endpoints(&source, "a"), 1);

    // A change as it comes.
    api.apply_json(slice("a-1", "a", &["10.244.0.5", "10.244.0.6"]))
        .unwrap();
    until(&mut source, "the second endpoint", |s| {
        endpoints(s, "a") == 2
    });

    // The API server goes away: reported, nothing removed.
    api.stop().unwrap();
    until(&mut source, "the outage", |s| {
        s.status().unreachable_since.is_some()
    });
    assert_eq!(services(&source), ["a", "b"]);

    // Meanwhile b is deleted and the history compacted: the watch cannot resume, so the
    // source re-lists, and only b goes.
    api.delete("Service", "web", "b").unwrap();
    api.compact();
    api.start().unwrap();
    until(&mut source, "b removed by the re-list", |s| {
        services(s) == ["a"]
    });
    assert_eq!(endpoints(&source, "a"), 2);
    // A re-list it was (the probe lists only Services). The EndpointSlices watcher gets
    // its 410 and re-lists on its own schedule (its own backoff), so wait for it.
    until(&mut source, "the EndpointSlices re-list", |_| {
        api.requests(Verb::List, "endpointslices") >= 2
    });
    until(&mut source, "the API server reachable again", |s| {
        s.status().unreachable_since.is_none()
    });
    assert_eq!(source.status().problems, 0);
}
