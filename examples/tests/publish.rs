//! `fakeapi::Publisher`: a simulated cluster written to the fake API server, then only what
//! changed, in an order a watcher can follow (Services before their slices, slices deleted
//! before their Service). No root needed: the server listens on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use svcnat_core::model::*;
use svcnat_examples::fakeapi::{FakeApiServer, Publisher};

fn web_service() -> Service {
    let mut svc = Service::new(ObjectName::new("default", "web"));
    svc.cluster_ips = vec![IpAddr::from([10, 96, 0, 50])];
    svc.ip_families = vec![IpFamily::V4];
    svc.selector = Some(LabelSelector::from_labels(BTreeMap::from([(
        "app".to_string(),
        "web".to_string(),
    )])));
    svc.ports.push(ServicePort::new(
        "",
        Protocol::Tcp,
        80,
        TargetPort::Number(8080),
    ));
    svc
}

fn pod(name: &str, last: u8) -> Pod {
    let mut p = Pod::new(
        ObjectName::new("default", name),
        IpAddr::from([10, 244, 0, last]),
    );
    p.labels.insert("app".into(), "web".into());
    p.node_name = Some("node-0".into());
    p
}

#[test]
fn writes_only_what_changed_in_order() {
    let api = FakeApiServer::start_new().unwrap();
    let mut c = Cluster::simulated();
    c.upsert_node({
        let mut n = Node::new("node-0");
        n.addresses = vec![IpAddr::from([192, 168, 50, 11])];
        n.pod_cidrs = vec!["10.244.0.0/24".parse().unwrap()];
        n.zone = Some("a".into());
        n
    });
    c.upsert_service(web_service());
    c.upsert_pod(pod("web-0", 10));
    c.upsert_pod(pod("web-1", 11));
    let mut p = Publisher::new();

    let first = p.publish(&c, &api).unwrap();
    let slice = first
        .applied
        .iter()
        .find(|o| o.starts_with("EndpointSlice default/web-"))
        .cloned()
        .unwrap_or_else(|| panic!("{first:?}"));
    assert_eq!(
        first.applied,
        vec![
            "Node node-0".to_string(),
            "Service default/web".to_string(),
            slice.clone()
        ]
    );
    assert!(first.deleted.is_empty());

    // Nothing changed: nothing written, no new resource version.
    let rv = api.resource_version();
    assert!(p.publish(&c, &api).unwrap().is_empty());
    assert_eq!(api.resource_version(), rv);

    // A Pod going away changes its Service's slice, nothing else.
    c.remove_pod(&ObjectName::new("default", "web-1"));
    let second = p.publish(&c, &api).unwrap();
    assert_eq!(second.applied, vec![slice.clone()]);
    assert_eq!(api.resource_version(), rv + 1);

    // A Service going away: its slice first, then the Service.
    c.remove_service(&ObjectName::new("default", "web"));
    let third = p.publish(&c, &api).unwrap();
    assert!(third.applied.is_empty(), "{third:?}");
    assert_eq!(
        third.deleted,
        vec![slice, "Service default/web".to_string()]
    );

    c.remove_node("node-0");
    assert_eq!(
        p.publish(&c, &api).unwrap().deleted,
        vec!["Node node-0".to_string()]
    );
}

#[test]
fn slices_of_a_headless_service_carry_the_headless_label() {
    let api = FakeApiServer::start_new().unwrap();
    let mut c = Cluster::simulated();
    let mut svc = web_service();
    svc.cluster_ips.clear();
    svc.headless = true;
    c.upsert_service(svc);
    c.upsert_pod(pod("web-0", 10));
    let written = Publisher::new().publish(&c, &api).unwrap();
    let name = written
        .applied
        .iter()
        .find_map(|o| o.strip_prefix("EndpointSlice default/"))
        .unwrap_or_else(|| panic!("{written:?}"))
        .to_string();
    // The stored object (its last state, as deleting it returns it) has the label that
    // keeps it out of kube-proxy's selection.
    let deleted = api.delete("EndpointSlice", "default", &name).unwrap();
    assert_eq!(
        deleted["metadata"]["labels"]["service.kubernetes.io/headless"], "",
        "{deleted}"
    );
}
