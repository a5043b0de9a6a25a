//! A sequence of cluster changes (Services, Pods and EndpointSlices added, changed and
//! removed), applied one at a time: after each, the incremental `Plan::update` and
//! `Plan::diff` + `PlanDiff::apply` must both equal a fresh `Plan::compile`, and the diff of
//! a plan with itself is empty. Small index spaces make Services contest addresses and
//! nodePorts, and selectors overlap, so the hard cases come up often.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use svcnat_core::model::*;
use svcnat_core::plan::{NodeContext, Plan};

const APPS: [&str; 3] = ["a", "b", "c"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];

#[derive(Arbitrary, Debug)]
struct PortSpec {
    port: u8,
    udp: bool,
    named_target: bool,
    node_port: u8,
}

#[derive(Arbitrary, Debug)]
struct SvcSpec {
    ty: u8,
    app: u8,
    selector: bool,
    shared_ip: bool,
    headless: bool,
    dual: bool,
    ports: Vec<PortSpec>,
    external_ip: Option<u8>,
    lb_ip: Option<u8>,
    source_ranges: bool,
    ext_local: bool,
    int_local: bool,
    affinity: Option<u8>,
    health_check: bool,
}

#[derive(Arbitrary, Debug)]
struct PodSpec {
    app: u8,
    node: u8,
    ready: bool,
    terminating: bool,
    weight: u8,
    dual: bool,
    named_port: Option<u8>,
}

#[derive(Arbitrary, Debug)]
struct EpSpec {
    ip: u8,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<u8>,
    /// A zone hint (zone index) and whether to hint the endpoint's node too.
    zone_hint: Option<u8>,
    node_hint: bool,
}

#[derive(Arbitrary, Debug)]
enum Change {
    UpsertService(u8, SvcSpec),
    RemoveService(u8),
    UpsertPod(u8, PodSpec),
    RemovePod(u8),
    UpsertSlice(u8, u8, Vec<EpSpec>, u8),
    RemoveSlice(u8, u8),
    /// A Node's zone set (or removed): the plan's own node's zone decides topology.
    NodeZone(u8, Option<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    base: Vec<Change>,
    steps: Vec<Change>,
}

fn svc_name(i: u8) -> ServiceName {
    ObjectName::new("ns", format!("svc{}", i % 8))
}

fn service(i: u8, s: &SvcSpec) -> Service {
    let i = i % 8;
    let mut svc = Service::new(svc_name(i));
    svc.service_type = match s.ty % 4 {
        1 => ServiceType::NodePort,
        2 => ServiceType::LoadBalancer,
        _ => ServiceType::ClusterIp,
    };
    svc.headless = s.headless && svc.service_type == ServiceType::ClusterIp;
    if !svc.headless {
        // A shared address lets two Services claim the same frontend.
        let last = if s.shared_ip { 10 } else { 10 + i };
        svc.cluster_ips = vec![IpAddr::from([10, 96, 0, last])];
        svc.ip_families = vec![IpFamily::V4];
        if s.dual {
            svc.cluster_ips
                .push(IpAddr::from([0xfd00, 0x96, 0, 0, 0, 0, 0, u16::from(last)]));
            svc.ip_families.push(IpFamily::V6);
            svc.ip_family_policy = IpFamilyPolicy::PreferDualStack;
        }
    }
    if s.selector {
        let mut l = BTreeMap::new();
        l.insert(
            "app".to_string(),
            APPS[usize::from(s.app) % APPS.len()].to_string(),
        );
        svc.selector = Some(LabelSelector::from_labels(l));
    }
    let mut seen = BTreeSet::new();
    for (n, p) in s.ports.iter().take(4).enumerate() {
        let protocol = if p.udp { Protocol::Udp } else { Protocol::Tcp };
        let port = 80 + u16::from(p.port % 4);
        if !seen.insert((port, protocol)) {
            continue;
        }
        svc.ports.push({
            let mut sp = ServicePort::new(
                format!("p{n}"),
                protocol,
                port,
                if p.named_target {
                    TargetPort::Name("http".into())
                } else {
                    TargetPort::Number(8080 + u16::from(p.port % 4))
                },
            );
            sp.node_port = svc
                .service_type
                .has_node_ports()
                .then_some(30000 + u16::from(p.node_port % 8));
            sp
        });
    }
    if s.ports.len() == 1
        && let Some(p) = svc.ports.first_mut()
    {
        p.name.clear();
    }
    if let Some(e) = s.external_ip {
        svc.external_ips.push(IpAddr::from([192, 0, 2, e % 4]));
    }
    if svc.service_type == ServiceType::LoadBalancer {
        if let Some(l) = s.lb_ip {
            svc.load_balancer_ips
                .push(IpAddr::from([203, 0, 113, l % 4]));
        }
        if s.source_ranges {
            svc.load_balancer_source_ranges
                .push("198.51.100.0/24".parse().unwrap());
        }
    }
    if s.ext_local && (svc.service_type.has_node_ports() || !svc.external_ips.is_empty()) {
        svc.external_traffic_policy = TrafficPolicy::Local;
        if s.health_check && svc.service_type == ServiceType::LoadBalancer {
            svc.health_check_node_port = Some(32000 + u16::from(i));
        }
    }
    if s.int_local {
        svc.internal_traffic_policy = TrafficPolicy::Local;
    }
    if let Some(t) = s.affinity {
        svc.session_affinity = SessionAffinity::ClientIp {
            timeout_seconds: u32::from(t) + 1,
        };
    }
    svc
}

fn pod(i: u8, p: &PodSpec) -> Pod {
    let i = i % 16;
    let node = usize::from(p.node) % NODES.len();
    let mut pod = Pod::new(
        ObjectName::new("ns", format!("pod{i}")),
        IpAddr::from([10, 244, node as u8, 10 + i]),
    );
    if p.dual {
        pod.ips.push(IpAddr::from([
            0xfd00,
            0x244,
            0,
            node as u16,
            0,
            0,
            0,
            u16::from(i),
        ]));
    }
    pod.labels
        .insert("app".into(), APPS[usize::from(p.app) % APPS.len()].into());
    pod.node_name = Some(NODES[node].into());
    pod.ready = p.ready;
    pod.terminating = p.terminating;
    pod.weight = u32::from(p.weight % 5);
    if let Some(n) = p.named_port {
        pod.ports.push(ContainerPort {
            name: "http".into(),
            port: 9000 + u16::from(n % 3),
            protocol: Protocol::Tcp,
        });
    }
    pod
}

fn slice(svc: u8, name: u8, eps: &[EpSpec], port: u8) -> EndpointSlice {
    EndpointSlice {
        service: svc_name(svc),
        name: format!("slice{}", name % 3),
        endpoints: eps
            .iter()
            .take(6)
            .map(|e| {
                let mut ep = Endpoint::new(IpAddr::from([10, 245, 0, e.ip % 8]));
                ep.ready = e.ready;
                ep.serving = e.serving;
                ep.terminating = e.terminating;
                ep.node_name = e
                    .node
                    .map(|n| NODES[usize::from(n) % NODES.len()].to_string());
                ep.zone_hints = e.zone_hint.map(zone).into_iter().collect();
                if e.node_hint {
                    ep.node_hints = ep.node_name.iter().cloned().collect();
                }
                ep
            })
            .collect(),
        ports: vec![EndpointPort {
            name: String::new(),
            port: 7000 + u16::from(port % 3),
            protocol: Protocol::Tcp,
        }],
    }
}

/// Applies a change; returns the Services whose plan entries it may change.
fn apply(c: &mut Cluster, ch: &Change) -> BTreeSet<ServiceName> {
    match ch {
        Change::UpsertService(i, s) => {
            let svc = service(*i, s);
            let name = svc.name.clone();
            c.upsert_service(svc);
            [name].into()
        }
        Change::RemoveService(i) => {
            let name = svc_name(*i);
            c.remove_service(&name);
            [name].into()
        }
        // Relabelling a Pod changes the Services that selected it before, too: the model
        // must report both.
        Change::UpsertPod(i, p) => c.upsert_pod(pod(*i, p)),
        Change::RemovePod(i) => c.remove_pod(&ObjectName::new("ns", format!("pod{}", i % 16))),
        Change::UpsertSlice(svc, name, eps, port) => {
            let s = slice(*svc, *name, eps, *port);
            let affected = [s.service.clone()].into();
            c.upsert_slice(s);
            affected
        }
        Change::RemoveSlice(svc, name) => {
            let name_s = svc_name(*svc);
            c.remove_slice(&name_s, &format!("slice{}", name % 3));
            [name_s].into()
        }
        Change::NodeZone(n, z) => {
            let mut node = Node::new(NODES[usize::from(*n) % NODES.len()]);
            node.zone = z.map(zone);
            c.upsert_node(node);
            c.services().map(|s| s.name.clone()).collect()
        }
    }
}

fn zone(z: u8) -> String {
    format!("zone{}", z % 2)
}

fn node() -> NodeContext {
    NodeContext::new(
        "n1",
        vec![
            IpAddr::from([192, 168, 0, 1]),
            IpAddr::from([0xfd00, 0x192, 0, 0, 0, 0, 0, 1]),
        ],
        vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/48".parse().unwrap(),
        ],
    )
}

fuzz_target!(|input: Input| {
    let node = node();
    let mut c = Cluster::simulated();
    for ch in input.base.iter().take(32) {
        apply(&mut c, ch);
    }
    let mut plan = Plan::compile(&c, &node);
    assert!(Plan::diff(&plan, &plan).is_empty());
    for ch in input.steps.iter().take(32) {
        let before = plan.clone();
        let _ = apply(&mut c, ch);
        let diff = plan.update(&c);
        let full = Plan::compile(&c, &node);
        assert_eq!(plan, full, "update after {ch:?}");
        assert_eq!(plan.render(), full.render());
        let full_diff = Plan::diff(&before, &full);
        assert_eq!(diff, full_diff, "update's diff after {ch:?}");
        assert_eq!(full_diff.apply(&before), full, "diff.apply after {ch:?}");
        assert_eq!(Plan::diff(&full, &before).apply(&full), before);
        assert!(Plan::diff(&full, &full).is_empty());
    }
});
