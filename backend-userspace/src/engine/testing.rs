//! A fixed fixture network and engine, shared by the fixture tests, the fuzz target and
//! the benchmark.
//!
//! Node `node-a` (192.168.1.10 on the uplink port 1, MAC 02:00:00:00:00:01) with two local
//! pods on Calico-style veths (port 2: 10.244.0.5, port 3: 10.244.0.6; no addresses, proxy
//! ARP for the gateway 169.254.1.1), remote pods 10.244.1.0/24 behind node-b
//! (192.168.1.11), clients anywhere else behind the router 192.168.1.1.
//!
//! Services (all TCP unless said):
//! - `default/web` ClusterIP 10.96.0.10:80, NodePort 30080 -> 10.244.0.5, 10.244.0.6,
//!   10.244.1.7 on 8080;
//! - `default/dns` UDP ClusterIP 10.96.0.53:53 -> 10.244.0.5:53;
//! - `default/empty` ClusterIP 10.96.0.99:80, no endpoints (REJECT);
//! - `default/local` NodePort 30090 `externalTrafficPolicy: Local`, endpoint only on node-b
//!   (10.244.1.8:8080): external clients are dropped, pods take the shortcut;
//! - `default/lb` LoadBalancer 198.51.100.7:443 with source ranges 203.0.113.0/24 ->
//!   10.244.0.6:8443;
//! - `default/sticky` ClusterIP 10.96.0.20:80 with ClientIP affinity -> the web pods.
//!
//! The network is dual-stack: the uplink also has fd00:1::10/64 (and the link-local
//! fe80::ff:fe00:1), the pod veths answer neighbour discovery for the pods' IPv6 gateway
//! fe80::1, the router is fd00:1::1, node-b fd00:1::11 with pods fd00:244:1::/64, and the
//! IPv6 pods fd00:244::5 (port 2) and fd00:244::6 (port 3) have the same MACs as their IPv4
//! twins. IPv6 Services:
//! - `default/web6` NodePort, ClusterIP `[fd00:96::10]:80`, NodePort 30081 -> fd00:244::5,
//!   fd00:244::6 and fd00:244:1::7 on 8080;
//! - `default/empty6` ClusterIP `[fd00:96::99]:80`, no endpoints (REJECT).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use svcnat_core::model::*;
use svcnat_core::plan::{NodeContext, Plan};

use super::*;

/// Uplink port id.
pub const UPLINK: PortId = 1;
/// First pod veth port id.
pub const POD1_PORT: PortId = 2;
/// Second pod veth port id.
pub const POD2_PORT: PortId = 3;
/// The host port of [`fuzz_engine`] (the engine's end of the node's veth pair).
pub const HOST_PORT: PortId = 4;
/// The loopback port (`lo`; the node's own packets to NodePorts on its addresses).
pub const LO_PORT: PortId = 5;
/// Its MAC.
pub const HOST_PORT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 4];
/// The MAC of the node's end of the pair.
pub const HOST_PEER_MAC: [u8; 6] = [2, 0, 0, 0, 4, 4];
/// The uplink's MAC.
pub const UPLINK_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
/// Pod veth 1's MAC (host side).
pub const POD1_PORT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// Pod veth 2's MAC (host side).
pub const POD2_PORT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
/// The router's MAC.
pub const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
/// node-b's MAC.
pub const NODE_B_MAC: [u8; 6] = [2, 0, 0, 0, 1, 11];
/// Pod 1's MAC.
pub const POD1_MAC: [u8; 6] = [2, 0, 0, 0, 2, 5];
/// Pod 2's MAC.
pub const POD2_MAC: [u8; 6] = [2, 0, 0, 0, 2, 6];
/// This node's address.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
/// node-b's address.
pub const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 11);
/// The router.
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
/// Pod 1.
pub const POD1_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
/// Pod 2.
pub const POD2_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 6);
/// The remote web pod.
pub const POD3_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
/// The pods' gateway answered by proxy ARP.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// This node's IPv6 address.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x10);
/// The uplink's IPv6 link-local address.
pub const UPLINK_LL6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0xff, 0xfe00, 1);
/// node-b's IPv6 address.
pub const NODE_B_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x11);
/// The IPv6 router.
pub const ROUTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
/// IPv6 pod 1 (behind port 2).
pub const POD1_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 5);
/// IPv6 pod 2 (behind port 3).
pub const POD2_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 6);
/// The remote IPv6 web pod.
pub const POD3_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 7);
/// The pods' IPv6 gateway answered by neighbour discovery.
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// `web6`'s ClusterIP.
pub const WEB6_CIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// `empty6`'s ClusterIP.
pub const EMPTY6_CIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x99);

fn pod(c: &mut Cluster, name: &str, ip: impl Into<IpAddr>, app: &str, node: &str) {
    let mut p = Pod::new(ObjectName::new("default", name), ip.into());
    p.labels.insert("app".into(), app.into());
    p.node_name = Some(node.into());
    c.upsert_pod(p);
}

#[allow(clippy::too_many_arguments)]
fn service(
    c: &mut Cluster,
    name: &str,
    ty: ServiceType,
    cluster_ip: impl Into<IpAddr>,
    proto: Protocol,
    port: u16,
    target: u16,
    node_port: Option<u16>,
    edit: impl FnOnce(&mut Service),
) {
    let mut s = Service::new(ObjectName::new("default", name));
    s.service_type = ty;
    let cluster_ip = cluster_ip.into();
    s.cluster_ips = vec![cluster_ip];
    s.ip_families = vec![if cluster_ip.is_ipv6() {
        IpFamily::V6
    } else {
        IpFamily::V4
    }];
    let mut sel = BTreeMap::new();
    sel.insert("app".to_string(), name.to_string());
    s.selector = Some(LabelSelector::from_labels(sel));
    s.ports.push({
        let mut sp = ServicePort::new("", proto, port, TargetPort::Number(target));
        sp.node_port = node_port;
        sp
    });
    edit(&mut s);
    c.upsert_service(s);
}

/// The fixture cluster (see the module docs).
pub fn cluster() -> Cluster {
    let mut c = Cluster::simulated();
    let v4 = |a, b, c2, d| Ipv4Addr::new(a, b, c2, d);
    service(
        &mut c,
        "web",
        ServiceType::NodePort,
        v4(10, 96, 0, 10),
        Protocol::Tcp,
        80,
        8080,
        Some(30080),
        |_| {},
    );
    pod(&mut c, "web-1", POD1_IP, "web", "node-a");
    pod(&mut c, "web-2", POD2_IP, "web", "node-a");
    pod(&mut c, "web-3", POD3_IP, "web", "node-b");
    service(
        &mut c,
        "dns",
        ServiceType::ClusterIp,
        v4(10, 96, 0, 53),
        Protocol::Udp,
        53,
        53,
        None,
        |_| {},
    );
    pod(&mut c, "dns-1", POD1_IP, "dns", "node-a");
    service(
        &mut c,
        "empty",
        ServiceType::ClusterIp,
        v4(10, 96, 0, 99),
        Protocol::Tcp,
        80,
        80,
        None,
        |_| {},
    );
    service(
        &mut c,
        "local",
        ServiceType::NodePort,
        v4(10, 96, 0, 30),
        Protocol::Tcp,
        80,
        8080,
        Some(30090),
        |s| {
            s.external_traffic_policy = TrafficPolicy::Local;
        },
    );
    pod(
        &mut c,
        "local-1",
        Ipv4Addr::new(10, 244, 1, 8),
        "local",
        "node-b",
    );
    service(
        &mut c,
        "lb",
        ServiceType::LoadBalancer,
        v4(10, 96, 0, 40),
        Protocol::Tcp,
        443,
        8443,
        Some(30443),
        |s| {
            s.load_balancer_ips = vec![IpAddr::V4(v4(198, 51, 100, 7))];
            s.load_balancer_source_ranges = vec![ipnet::IpNet::V4(
                ipnet::Ipv4Net::new(v4(203, 0, 113, 0), 24).unwrap_or_default(),
            )];
        },
    );
    pod(&mut c, "lb-1", POD2_IP, "lb", "node-a");
    service(
        &mut c,
        "web6",
        ServiceType::NodePort,
        WEB6_CIP,
        Protocol::Tcp,
        80,
        8080,
        Some(30081),
        |_| {},
    );
    pod(&mut c, "web6-1", POD1_IP6, "web6", "node-a");
    pod(&mut c, "web6-2", POD2_IP6, "web6", "node-a");
    pod(&mut c, "web6-3", POD3_IP6, "web6", "node-b");
    service(
        &mut c,
        "empty6",
        ServiceType::ClusterIp,
        EMPTY6_CIP,
        Protocol::Tcp,
        80,
        80,
        None,
        |_| {},
    );
    service(
        &mut c,
        "sticky",
        ServiceType::ClusterIp,
        v4(10, 96, 0, 20),
        Protocol::Tcp,
        80,
        8080,
        None,
        |s| {
            s.session_affinity = SessionAffinity::ClientIp {
                timeout_seconds: 10800,
            };
            s.selector = Some(LabelSelector::from_labels(BTreeMap::from([(
                "app".to_string(),
                "web".to_string(),
            )])));
        },
    );
    c
}

/// The fixture node context.
pub fn node() -> NodeContext {
    NodeContext::new(
        "node-a",
        vec![IpAddr::V4(NODE_IP), IpAddr::V6(NODE_IP6)],
        vec![net("10.244.0.0/16"), net("fd00:244::/48")],
    )
}

/// The fixture plan.
pub fn plan() -> Plan {
    Plan::compile(&cluster(), &node())
}

/// The fixture ports.
pub fn ports() -> Vec<PortConfig> {
    let gw = vec![POD_GATEWAY];
    let gw6 = vec![POD_GATEWAY6];
    vec![
        PortConfig {
            id: UPLINK,
            name: "eth0".into(),
            mac: UPLINK_MAC,
            addrs: vec![
                net("192.168.1.10/24"),
                net("fd00:1::10/64"),
                net("fe80::ff:fe00:1/64"),
            ],
            proxy_arp: Vec::new(),
            proxy_ndp: Vec::new(),
            mtu: 1500,
            host_peer: None,
            loopback: false,
        },
        PortConfig {
            id: POD1_PORT,
            name: "cali1".into(),
            mac: POD1_PORT_MAC,
            addrs: Vec::new(),
            proxy_arp: gw.clone(),
            proxy_ndp: gw6.clone(),
            mtu: 1500,
            host_peer: None,
            loopback: false,
        },
        PortConfig {
            id: POD2_PORT,
            name: "cali2".into(),
            mac: POD2_PORT_MAC,
            addrs: Vec::new(),
            proxy_arp: gw,
            proxy_ndp: gw6,
            mtu: 1500,
            host_peer: None,
            loopback: false,
        },
    ]
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse()
        .unwrap_or(ipnet::IpNet::V4(ipnet::Ipv4Net::default()))
}

/// The fixture routes.
pub fn routes() -> Vec<Route> {
    vec![
        Route {
            dst: net("0.0.0.0/0"),
            port: UPLINK,
            gateway: Some(IpAddr::V4(ROUTER_IP)),
        },
        Route {
            dst: net("192.168.1.0/24"),
            port: UPLINK,
            gateway: None,
        },
        Route {
            dst: net("10.244.1.0/24"),
            port: UPLINK,
            gateway: Some(IpAddr::V4(NODE_B_IP)),
        },
        Route {
            dst: net("10.244.0.5/32"),
            port: POD1_PORT,
            gateway: None,
        },
        Route {
            dst: net("10.244.0.6/32"),
            port: POD2_PORT,
            gateway: None,
        },
        Route {
            dst: net("::/0"),
            port: UPLINK,
            gateway: Some(IpAddr::V6(ROUTER_IP6)),
        },
        Route {
            dst: net("fd00:1::/64"),
            port: UPLINK,
            gateway: None,
        },
        Route {
            dst: net("fd00:244:1::/64"),
            port: UPLINK,
            gateway: Some(IpAddr::V6(NODE_B_IP6)),
        },
        Route {
            dst: net("fd00:244::5/128"),
            port: POD1_PORT,
            gateway: None,
        },
        Route {
            dst: net("fd00:244::6/128"),
            port: POD2_PORT,
            gateway: None,
        },
    ]
}

/// The fixture engine with the given configuration; with `resolved`, the router, node-b and
/// the local pods are permanent neighbours in both families (otherwise they are resolved by
/// ARP and neighbour discovery).
pub fn engine_with(cfg: EngineConfig, resolved: bool) -> Engine {
    let e = Engine::new(cfg);
    e.set_ports(ports());
    e.set_routes(routes());
    e.set_plan(&plan());
    if resolved {
        for (port, ip, mac) in [
            (UPLINK, ROUTER_IP, ROUTER_MAC),
            (UPLINK, NODE_B_IP, NODE_B_MAC),
            (POD1_PORT, POD1_IP, POD1_MAC),
            (POD2_PORT, POD2_IP, POD2_MAC),
        ] {
            e.add_neighbour(port, IpAddr::V4(ip), mac);
        }
        for (port, ip, mac) in [
            (UPLINK, ROUTER_IP6, ROUTER_MAC),
            (UPLINK, NODE_B_IP6, NODE_B_MAC),
            (POD1_PORT, POD1_IP6, POD1_MAC),
            (POD2_PORT, POD2_IP6, POD2_MAC),
        ] {
            e.add_neighbour(port, IpAddr::V6(ip), mac);
        }
    }
    e
}

/// The fixture engine, default configuration, neighbours resolved.
pub fn engine() -> Engine {
    engine_with(EngineConfig::default(), true)
}

/// The fuzz target's engine: [`engine`] plus a host port ([`HOST_PORT`], the node's own
/// traffic), `lo` ([`LO_PORT`]) and the node's addresses known to admission, so inputs
/// reach the host-port and loopback paths (node sources only there, masquerade, replies
/// back to the pair) too.
pub fn fuzz_engine() -> Engine {
    let e = engine();
    let mut all = ports();
    all.push(PortConfig {
        id: HOST_PORT,
        name: "svcnat-eng".into(),
        mac: HOST_PORT_MAC,
        addrs: Vec::new(),
        proxy_arp: vec![POD_GATEWAY],
        proxy_ndp: vec![POD_GATEWAY6],
        mtu: 1500,
        host_peer: Some(HOST_PEER_MAC),
        loopback: false,
    });
    all.push(PortConfig {
        id: LO_PORT,
        name: "lo".into(),
        mac: [0; 6],
        addrs: vec![ipnet::IpNet::V4(
            ipnet::Ipv4Net::new(Ipv4Addr::LOCALHOST, 8).unwrap_or_default(),
        )],
        proxy_arp: Vec::new(),
        proxy_ndp: Vec::new(),
        mtu: 65536,
        host_peer: None,
        loopback: true,
    });
    e.set_ports(all);
    let adm = Admission {
        node_addrs: [IpAddr::V4(NODE_IP), IpAddr::V6(NODE_IP6)].into(),
        ..Admission::default()
    };
    e.set_admission(adm);
    e
}

/// Feeds one fuzz input to `engine`: the first byte picks the port (bits 0-1: ports 0-3,
/// port 0 unknown; bit 3 set: the host port instead, bit 4 set: `lo`) and checksum state (bit 2), the rest
/// is the frame. Never panics (that is what the fuzz target checks).
pub fn fuzz_one(engine: &Engine, data: &[u8]) {
    let Some((&sel, frame)) = data.split_first() else {
        return;
    };
    let meta = RxMeta {
        port: if sel & 16 != 0 {
            LO_PORT
        } else if sel & 8 != 0 {
            HOST_PORT
        } else {
            u32::from(sel & 3)
        },
        csum: if sel & 4 != 0 {
            Csum::Partial
        } else {
            Csum::Complete
        },
    };
    let mut frame = frame.to_vec();
    let mut tx = Vec::new();
    let now = Duration::from_millis(u64::from(sel) * 100);
    let _ = engine.handle_frame(now, meta, &mut frame, &mut tx);
    engine.handle_timeout(now, &mut tx);
}
