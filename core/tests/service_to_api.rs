//! `input::service_to_api` is the inverse of `Cluster::apply_service`: for every Service the
//! typed input or the manifest loader can produce, applying its API object gives it back.
//!
//! - a table of Services, one per field the model has (types, ports with named target ports
//!   and node ports, families and policy, externalIPs, load balancer addresses and source
//!   ranges, traffic policies, affinity and timeout, publishNotReadyAddresses,
//!   externalName, labels and annotations, headless);
//! - random valid Services (proptest);
//! - every Service of the golden scenarios, as the manifest loader built it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/scenario.rs"]
mod load;

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;
use svcnat_core::input::service_to_api;
use svcnat_core::manifest::Manifests;
use svcnat_core::model::*;

/// Applies the API object of `svc` to an empty proxy-only cluster and reads it back.
fn round_trip(svc: &Service) -> Service {
    let api = service_to_api(svc);
    let mut c = Cluster::new();
    if let Err(e) = c.apply_service(&api) {
        panic!(
            "{e}\nobject: {}",
            serde_json::to_string_pretty(&api).unwrap()
        );
    }
    c.service(&svc.name).cloned().expect("the Service is there")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn base(name: &str) -> Service {
    let mut s = Service::new(ObjectName::new("ns", name));
    s.cluster_ips = vec![ip("10.96.0.10")];
    s.ip_families = vec![IpFamily::V4];
    s.ports.push(ServicePort::new(
        "",
        Protocol::Tcp,
        80,
        TargetPort::Number(8080),
    ));
    s
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One Service per field (or group of fields that only make sense together).
fn table() -> Vec<(&'static str, Service)> {
    let mut out = vec![("plain ClusterIP", base("plain"))];

    let mut s = base("selector");
    s.selector = Some(LabelSelector::from_labels(labels(&[
        ("app", "web"),
        ("tier", "front"),
    ])));
    out.push(("selector", s));

    let mut s = base("meta");
    s.labels = labels(&[("app.kubernetes.io/name", "web"), ("team", "a")]);
    s.annotations = labels(&[("svcnat.io/note", "anything: goes here")]);
    s.created = Some(1_700_000_000);
    out.push(("labels, annotations, creationTimestamp", s));

    let mut s = base("ports");
    s.ports.clear();
    let mut p = ServicePort::new("http", Protocol::Tcp, 80, TargetPort::Name("web".into()));
    p.app_protocol = Some("http".into());
    s.ports.push(p);
    s.ports.push(ServicePort::new(
        "dns",
        Protocol::Udp,
        53,
        TargetPort::Number(5353),
    ));
    s.ports.push(ServicePort::new(
        "sctp",
        Protocol::Sctp,
        9000,
        TargetPort::Number(9000),
    ));
    out.push(("named ports, named targetPort, UDP, SCTP, appProtocol", s));

    let mut s = base("nodeport");
    s.service_type = ServiceType::NodePort;
    s.ports[0].node_port = Some(30080);
    s.external_traffic_policy = TrafficPolicy::Local;
    out.push(("NodePort, externalTrafficPolicy Local", s));

    let mut s = base("lb");
    s.service_type = ServiceType::LoadBalancer;
    s.ports[0].node_port = Some(30081);
    s.requested_load_balancer_ip = Some(ip("192.0.2.5"));
    s.load_balancer_ips = vec![ip("192.0.2.10"), ip("192.0.2.11")];
    s.load_balancer_source_ranges = vec![
        "198.51.100.0/24".parse::<IpNet>().unwrap(),
        "2001:db8::/64".parse().unwrap(),
    ];
    s.external_traffic_policy = TrafficPolicy::Local;
    s.health_check_node_port = Some(32000);
    out.push((
        "LoadBalancer: requested and granted IPs, source ranges, healthCheckNodePort",
        s,
    ));

    let mut s = base("lb-requested");
    s.service_type = ServiceType::LoadBalancer;
    s.ports[0].node_port = Some(30082);
    s.requested_load_balancer_ip = Some(ip("192.0.2.6"));
    s.load_balancer_ips = vec![ip("192.0.2.6")];
    out.push(("LoadBalancer granted its requested IP", s));

    let mut s = base("lb-proxy-mode");
    s.service_type = ServiceType::LoadBalancer;
    s.ports[0].node_port = Some(30083);
    s.load_balancer_ips = vec![ip("192.0.2.7")];
    s.load_balancer_proxy_ips = vec![ip("192.0.2.8")];
    s.traffic_distribution = Some(TrafficDistribution::PreferSameNode);
    out.push((
        "LoadBalancer ingress with ipMode Proxy, trafficDistribution",
        s,
    ));

    let mut s = base("close");
    s.traffic_distribution = Some(TrafficDistribution::PreferClose);
    out.push(("trafficDistribution PreferClose", s));

    let mut s = base("external");
    s.external_ips = vec![ip("192.0.2.20"), ip("2001:db8::20")];
    s.external_traffic_policy = TrafficPolicy::Local;
    out.push(("externalIPs with externalTrafficPolicy Local", s));

    let mut s = base("dual");
    s.cluster_ips = vec![ip("fd00::10"), ip("10.96.0.11")];
    s.ip_families = vec![IpFamily::V6, IpFamily::V4];
    s.ip_family_policy = IpFamilyPolicy::RequireDualStack;
    out.push(("dual stack, IPv6 primary, RequireDualStack", s));

    let mut s = base("prefer");
    s.ip_family_policy = IpFamilyPolicy::PreferDualStack;
    out.push(("PreferDualStack with one family", s));

    let mut s = base("sticky");
    s.session_affinity = SessionAffinity::ClientIp {
        timeout_seconds: 300,
    };
    out.push(("ClientIP affinity with a timeout", s));

    let mut s = base("sticky-default");
    s.session_affinity = SessionAffinity::ClientIp {
        timeout_seconds: DEFAULT_AFFINITY_TIMEOUT,
    };
    out.push(("ClientIP affinity, default timeout", s));

    let mut s = base("internal");
    s.internal_traffic_policy = TrafficPolicy::Local;
    out.push(("internalTrafficPolicy Local", s));

    let mut s = base("notready");
    s.publish_not_ready_addresses = true;
    out.push(("publishNotReadyAddresses", s));

    let mut s = base("headless");
    s.cluster_ips.clear();
    s.headless = true;
    s.ip_families.clear();
    s.selector = Some(LabelSelector::from_labels(labels(&[("app", "db")])));
    out.push(("headless", s));

    let mut s = base("headless-noports");
    s.cluster_ips.clear();
    s.ports.clear();
    s.headless = true;
    s.ip_families = vec![IpFamily::V4, IpFamily::V6];
    s.ip_family_policy = IpFamilyPolicy::RequireDualStack;
    out.push(("headless without ports, both families", s));

    let mut s = base("alias");
    s.service_type = ServiceType::ExternalName;
    s.cluster_ips.clear();
    s.ip_families.clear();
    s.ports.clear();
    s.external_name = Some("db.example.com".into());
    out.push(("ExternalName", s));

    let mut s = base("alias-ports");
    s.service_type = ServiceType::ExternalName;
    s.cluster_ips.clear();
    s.ip_families.clear();
    s.external_name = Some("db.example.com".into());
    out.push(("ExternalName with ports", s));
    out
}

#[test]
fn every_field_survives_the_round_trip() {
    for (what, svc) in table() {
        assert_eq!(round_trip(&svc), svc, "{what}");
    }
}

#[test]
fn the_object_is_what_an_api_server_holds() {
    let table = table();
    let lb = &table.iter().find(|(_, s)| s.name.name == "lb").unwrap().1;
    let v = serde_json::to_value(service_to_api(lb)).unwrap();
    assert_eq!(v["metadata"]["name"], "lb");
    assert_eq!(v["metadata"]["namespace"], "ns");
    assert_eq!(v["spec"]["type"], "LoadBalancer");
    assert_eq!(v["spec"]["clusterIP"], "10.96.0.10");
    assert_eq!(v["spec"]["clusterIPs"], serde_json::json!(["10.96.0.10"]));
    assert_eq!(v["spec"]["loadBalancerIP"], "192.0.2.5");
    assert_eq!(
        v["status"]["loadBalancer"]["ingress"],
        // The API server defaults ipMode to VIP (LoadBalancerIPMode, GA in 1.32).
        serde_json::json!([{"ip": "192.0.2.10", "ipMode": "VIP"}, {"ip": "192.0.2.11", "ipMode": "VIP"}])
    );
    assert_eq!(v["spec"]["ports"][0]["nodePort"], 30081);
    assert_eq!(v["spec"]["ports"][0]["targetPort"], 8080);
    assert_eq!(v["spec"]["healthCheckNodePort"], 32000);
    let headless = &table
        .iter()
        .find(|(_, s)| s.name.name == "headless")
        .unwrap()
        .1;
    let v = serde_json::to_value(service_to_api(headless)).unwrap();
    assert_eq!(v["spec"]["clusterIP"], "None");
    // A ClusterIP Service without external addresses has no externalTrafficPolicy (the
    // API server refuses one there).
    assert!(v["spec"].get("externalTrafficPolicy").is_none(), "{v}");
}

#[test]
fn every_golden_scenario_service_survives_the_round_trip() {
    let mut seen = 0;
    for dir in load::scenario_dirs() {
        let (_, cfg) = load::node_conf(&dir);
        let texts = load::manifests(&dir);
        let mut m =
            Manifests::from_files(texts.iter().map(|(n, t)| (n.as_str(), t.as_str())), &cfg);
        let cluster = m.build(&cfg);
        for svc in cluster.services() {
            assert_eq!(&round_trip(svc), svc, "{}: {}", dir.display(), svc.name);
            seen += 1;
        }
    }
    assert!(seen >= 10, "only {seen} Services in the golden scenarios");
}

// ---------------------------------------------------------------------------------------------
// Random valid Services
// ---------------------------------------------------------------------------------------------

/// The shape of a Service, from which a valid model Service is built.
#[derive(Clone, Debug)]
struct Shape {
    ty: ServiceType,
    headless: bool,
    /// 0: IPv4 only, 1: IPv6 only, 2: both, IPv4 first, 3: both, IPv6 first.
    families: u8,
    policy: IpFamilyPolicy,
    selector: Vec<(u8, u8)>,
    labels: Vec<(u8, u8)>,
    /// (protocol, named target port, node port, appProtocol) per port.
    ports: Vec<(u8, bool, bool, bool)>,
    single_port_named: bool,
    external_ips: Vec<u8>,
    requested_lb: Option<u8>,
    lb_ips: Vec<u8>,
    ranges: Vec<(u8, u8)>,
    affinity: Option<u32>,
    external_local: bool,
    internal_local: bool,
    health_check: bool,
    publish_not_ready: bool,
    created: Option<i64>,
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        (
            prop_oneof![
                Just(ServiceType::ClusterIp),
                Just(ServiceType::NodePort),
                Just(ServiceType::LoadBalancer),
                Just(ServiceType::ExternalName),
            ],
            any::<bool>(),
            0u8..4,
            prop_oneof![
                Just(IpFamilyPolicy::SingleStack),
                Just(IpFamilyPolicy::PreferDualStack),
                Just(IpFamilyPolicy::RequireDualStack),
            ],
            proptest::collection::vec((0u8..3, 0u8..3), 0..3),
            proptest::collection::vec((0u8..3, 0u8..3), 0..3),
        ),
        (
            proptest::collection::vec((0u8..3, any::<bool>(), any::<bool>(), any::<bool>()), 0..4),
            any::<bool>(),
            proptest::collection::vec(1u8..4, 0..3),
            proptest::option::of(1u8..4),
            proptest::collection::vec(1u8..4, 0..3),
            proptest::collection::vec((0u8..4, 8u8..33), 0..3),
        ),
        (
            proptest::option::of(1u32..=MAX_AFFINITY_TIMEOUT),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(0i64..4_000_000_000),
        ),
    )
        .prop_map(
            |(
                (ty, headless, families, policy, selector, labels),
                (ports, single_port_named, external_ips, requested_lb, lb_ips, ranges),
                (
                    affinity,
                    external_local,
                    internal_local,
                    health_check,
                    publish_not_ready,
                    created,
                ),
            )| Shape {
                ty,
                headless,
                families,
                policy,
                selector,
                labels,
                ports,
                single_port_named,
                external_ips,
                requested_lb,
                lb_ips,
                ranges,
                affinity,
                external_local,
                internal_local,
                health_check,
                publish_not_ready,
                created,
            },
        )
}

/// A Service the API server would accept, built from a shape.
fn service(s: &Shape) -> Service {
    let mut svc = Service::new(ObjectName::new("ns", "svc"));
    svc.service_type = s.ty;
    let pairs = |v: &[(u8, u8)]| -> BTreeMap<String, String> {
        v.iter()
            .map(|(k, v)| (format!("k{k}"), format!("v{v}")))
            .collect()
    };
    svc.labels = pairs(&s.labels);
    let selector = pairs(&s.selector);
    svc.selector = (!selector.is_empty()).then(|| LabelSelector::from_labels(selector));
    let v4 = ip("10.96.1.1");
    let v6 = ip("fd00::1:1");
    let fams: Vec<IpFamily> = match s.families {
        0 => vec![IpFamily::V4],
        1 => vec![IpFamily::V6],
        2 => vec![IpFamily::V4, IpFamily::V6],
        _ => vec![IpFamily::V6, IpFamily::V4],
    };
    let two = fams.len() == 2;
    svc.ip_family_policy = if two && s.policy == IpFamilyPolicy::SingleStack {
        IpFamilyPolicy::PreferDualStack
    } else {
        s.policy
    };
    match s.ty {
        ServiceType::ExternalName => {
            svc.external_name = Some("db.example.com".into());
        }
        ServiceType::ClusterIp if s.headless => {
            svc.headless = true;
            svc.ip_families = fams;
        }
        _ => {
            svc.cluster_ips = fams
                .iter()
                .map(|f| if *f == IpFamily::V4 { v4 } else { v6 })
                .collect();
            svc.ip_families = fams;
        }
    }
    let count = s.ports.len();
    for (i, (proto, named_target, node_port, app)) in s.ports.iter().enumerate() {
        let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][usize::from(*proto)];
        let name = if count > 1 || s.single_port_named {
            format!("p{i}")
        } else {
            String::new()
        };
        let target = if *named_target {
            TargetPort::Name(format!("port{i}"))
        } else {
            TargetPort::Number(8000 + i as u16)
        };
        let mut p = ServicePort::new(name, protocol, 80 + i as u16, target);
        if *node_port && s.ty.has_node_ports() {
            p.node_port = Some(30000 + i as u16);
        }
        if *app {
            p.app_protocol = Some("http".into());
        }
        svc.ports.push(p);
    }
    if svc.ports.is_empty() && s.ty != ServiceType::ExternalName && !svc.headless {
        svc.ports.push(ServicePort::new(
            "",
            Protocol::Tcp,
            80,
            TargetPort::Number(80),
        ));
    }
    let addr = |last: u8, v6: bool| {
        if v6 {
            ip(&format!("2001:db8::{last}"))
        } else {
            ip(&format!("192.0.2.{last}"))
        }
    };
    svc.external_ips = s.external_ips.iter().map(|l| addr(*l, *l == 3)).collect();
    if s.ty == ServiceType::LoadBalancer {
        svc.requested_load_balancer_ip = s.requested_lb.map(|l| addr(l + 10, false));
        for l in &s.lb_ips {
            let a = addr(l + 20, *l == 3);
            if !svc.load_balancer_ips.contains(&a) {
                svc.load_balancer_ips.push(a);
            }
        }
        if svc.load_balancer_ips.is_empty()
            && let Some(r) = svc.requested_load_balancer_ip
        {
            svc.load_balancer_ips.push(r);
        }
        svc.load_balancer_source_ranges = s
            .ranges
            .iter()
            .map(|(a, len)| {
                IpNet::new(IpAddr::from([198, 51, 100 + a, 0]), *len)
                    .unwrap()
                    .trunc()
            })
            .collect();
    }
    if let Some(t) = s.affinity {
        svc.session_affinity = SessionAffinity::ClientIp { timeout_seconds: t };
    }
    if s.external_local && (s.ty.has_node_ports() || !svc.external_ips.is_empty()) {
        svc.external_traffic_policy = TrafficPolicy::Local;
        if s.health_check && s.ty == ServiceType::LoadBalancer {
            svc.health_check_node_port = Some(32100);
        }
    }
    if s.internal_local {
        svc.internal_traffic_policy = TrafficPolicy::Local;
    }
    svc.publish_not_ready_addresses = s.publish_not_ready;
    svc.created = s.created;
    svc
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any valid Service comes back from its API object unchanged.
    #[test]
    fn random_services_survive_the_round_trip(s in shape()) {
        let svc = service(&s);
        prop_assert_eq!(round_trip(&svc), svc);
    }
}
