//! Random clusters and random changes to them, for property tests of the plan compiler and
//! of every backend's renderer: a few Services over a small label space (so selectors,
//! contested externalIPs and policies collide often), Pods on three nodes with random
//! readiness, termination and weights, dual stack included. Included with `#[path]`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use proptest::prelude::*;
use svcnat_core::model::*;
use svcnat_core::plan::NodeContext;

pub(crate) const NODES: [&str; 3] = ["n1", "n2", "n3"];
pub(crate) const APPS: [&str; 3] = ["a", "b", "c"];

#[derive(Clone, Debug)]
pub(crate) struct SvcSpec {
    app: usize,
    ty: u8,
    ports: u8,
    udp: bool,
    external_ip: Option<u8>,
    ext_local: bool,
    int_local: bool,
    affinity: bool,
    dual: bool,
    no_selector: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct PodSpec {
    app: usize,
    node: usize,
    ready: bool,
    terminating: bool,
    weight: u32,
}

#[derive(Clone, Debug)]
pub(crate) enum Change {
    UpsertService(u8, SvcSpec),
    RemoveService(u8),
    UpsertPod(u8, PodSpec),
    RemovePod(u8),
}

pub(crate) fn svc_spec() -> impl Strategy<Value = SvcSpec> {
    (
        (0..APPS.len(), 0u8..4, 1u8..3, any::<bool>()),
        (
            proptest::option::of(0u8..3),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            proptest::bool::weighted(0.1),
        ),
    )
        .prop_map(
            |(
                (app, ty, ports, udp),
                (external_ip, ext_local, int_local, affinity, dual, no_selector),
            )| {
                SvcSpec {
                    app,
                    ty,
                    ports,
                    udp,
                    external_ip,
                    ext_local,
                    int_local,
                    affinity,
                    dual,
                    no_selector,
                }
            },
        )
}

pub(crate) fn pod_spec() -> impl Strategy<Value = PodSpec> {
    (
        0..APPS.len(),
        0..NODES.len(),
        proptest::bool::weighted(0.8),
        proptest::bool::weighted(0.2),
        0u32..4,
    )
        .prop_map(|(app, node, ready, terminating, weight)| PodSpec {
            app,
            node,
            ready,
            terminating,
            weight,
        })
}

pub(crate) fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (0u8..6, svc_spec()).prop_map(|(i, s)| Change::UpsertService(i, s)),
        (0u8..6).prop_map(Change::RemoveService),
        (0u8..12, pod_spec()).prop_map(|(i, p)| Change::UpsertPod(i, p)),
        (0u8..12).prop_map(Change::RemovePod),
    ]
}

pub(crate) fn service(i: u8, s: &SvcSpec) -> Service {
    let mut svc = Service::new(ObjectName::new("ns", format!("svc{i}")));
    svc.service_type = match s.ty {
        1 => ServiceType::NodePort,
        2 => ServiceType::LoadBalancer,
        _ => ServiceType::ClusterIp,
    };
    svc.cluster_ips = vec![IpAddr::from([10, 96, 0, 10 + i])];
    svc.ip_families = vec![IpFamily::V4];
    if s.dual {
        svc.cluster_ips
            .push(format!("fd00:96::{:x}", 10 + i).parse().unwrap());
        svc.ip_families.push(IpFamily::V6);
    }
    if !s.no_selector {
        let mut l = BTreeMap::new();
        l.insert("app".to_string(), APPS[s.app].to_string());
        svc.selector = Some(LabelSelector::from_labels(l));
    }
    for p in 0..s.ports {
        svc.ports.push({
            let mut sp = ServicePort::new(
                if s.ports > 1 {
                    format!("p{p}")
                } else {
                    String::new()
                },
                if s.udp && p == 1 {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
                80 + u16::from(p),
                TargetPort::Number(8080 + u16::from(p)),
            );
            sp.node_port = svc
                .service_type
                .has_node_ports()
                .then_some(30000 + u16::from(i) * 10 + u16::from(p));
            sp
        });
    }
    if let Some(e) = s.external_ip {
        // A small pool, so that Services contest addresses.
        svc.external_ips.push(IpAddr::from([192, 0, 2, e]));
    }
    if svc.service_type == ServiceType::LoadBalancer {
        svc.load_balancer_ips.push(IpAddr::from([203, 0, 113, i]));
        if i.is_multiple_of(2) {
            svc.load_balancer_source_ranges
                .push("198.51.100.0/24".parse().unwrap());
            svc.load_balancer_source_ranges
                .push("192.168.0.0/24".parse().unwrap());
        }
    }
    if s.ext_local && (svc.service_type.has_node_ports() || !svc.external_ips.is_empty()) {
        svc.external_traffic_policy = TrafficPolicy::Local;
        if svc.service_type == ServiceType::LoadBalancer {
            svc.health_check_node_port = Some(32000 + u16::from(i));
        }
    }
    if s.int_local {
        svc.internal_traffic_policy = TrafficPolicy::Local;
    }
    if s.affinity {
        svc.session_affinity = SessionAffinity::ClientIp {
            timeout_seconds: 60,
        };
    }
    svc
}

pub(crate) fn pod(i: u8, p: &PodSpec) -> Pod {
    let mut pod = Pod::new(
        ObjectName::new("ns", format!("pod{i}")),
        IpAddr::from([10, 244, p.node as u8, 10 + i]),
    );
    pod.ips.push(
        format!("fd00:244:0:{}::{:x}", p.node, 10 + i)
            .parse()
            .unwrap(),
    );
    pod.labels.insert("app".into(), APPS[p.app].into());
    pod.node_name = Some(NODES[p.node].into());
    pod.ready = p.ready;
    pod.terminating = p.terminating;
    pod.weight = p.weight;
    pod
}

pub(crate) fn apply_change(c: &mut Cluster, ch: &Change) -> BTreeSet<ServiceName> {
    match ch {
        Change::UpsertService(i, s) => {
            let svc = service(*i, s);
            let name = svc.name.clone();
            c.upsert_service(svc);
            [name].into()
        }
        Change::RemoveService(i) => {
            let name = ObjectName::new("ns", format!("svc{i}"));
            c.remove_service(&name);
            [name].into()
        }
        Change::UpsertPod(i, p) => c.upsert_pod(pod(*i, p)),
        Change::RemovePod(i) => c.remove_pod(&ObjectName::new("ns", format!("pod{i}"))),
    }
}

pub(crate) fn node_ctx() -> NodeContext {
    NodeContext::new(
        "n1",
        vec![
            IpAddr::from([192, 168, 0, 1]),
            "fd00:192:168::1".parse().unwrap(),
        ],
        vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/48".parse().unwrap(),
        ],
    )
}

/// A cluster built by applying `changes` to an empty one.
pub(crate) fn cluster_from(changes: &[Change]) -> Cluster {
    let mut c = Cluster::simulated();
    for ch in changes {
        apply_change(&mut c, ch);
    }
    c
}
