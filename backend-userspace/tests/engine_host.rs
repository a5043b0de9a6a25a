//! The host port: the node's own traffic to Services (kubelet probes, hostNetwork pods,
//! `curl` on the node), routed by the node into the engine over a veth pair whose engine
//! side is the host port ([`PortConfig::host_peer`]). The node becomes one more client:
//! its connections are masqueraded into the SNAT port range with a node address, and their
//! replies go back out the host port to the node's side of the pair.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use svcnat_core::plan::{NodeContext, Plan};
use svcnat_userspace::engine::testing::*;
use svcnat_userspace::engine::*;

/// The host port (the engine's side of the veth pair).
const HOST_PORT: PortId = 9;
/// Its MAC.
const HOST_PORT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];
/// The MAC of the node's side of the pair.
const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 9, 9];
/// `web`'s ClusterIP (endpoints POD1, POD2 on this node, POD3 behind node-b).
const WEB_CIP: [u8; 4] = [10, 96, 0, 10];
/// `dns`'s ClusterIP (UDP, endpoint POD1:53).
const DNS_CIP: [u8; 4] = [10, 96, 0, 53];
/// `empty`'s ClusterIP (no endpoints: REJECT).
const EMPTY_CIP: [u8; 4] = [10, 96, 0, 99];

fn host_port() -> PortConfig {
    PortConfig {
        id: HOST_PORT,
        name: "svcnat-eng".into(),
        mac: HOST_PORT_MAC,
        addrs: Vec::new(),
        proxy_arp: vec![POD_GATEWAY],
        proxy_ndp: vec![POD_GATEWAY6],
        mtu: 1500,
        host_peer: Some(HOST_MAC),
        loopback: false,
    }
}

/// The fixture engine with a host port, and the node's addresses known as the kernel's.
fn engine_with_host() -> Engine {
    let e = engine();
    let mut ports = ports();
    ports.push(host_port());
    e.set_ports(ports);
    let mut adm = Admission::default();
    adm.node_addrs = [IpAddr::V4(NODE_IP), IpAddr::V6(NODE_IP6)].into();
    e.set_admission(adm);
    e
}

fn feed(e: &Engine, port: PortId, frame: &[u8]) -> (Verdict, Vec<u8>, Vec<TxFrame>) {
    let mut f = frame.to_vec();
    let mut tx = Vec::new();
    let v = e.handle_frame(
        Duration::from_secs(1),
        RxMeta {
            port,
            csum: Csum::Complete,
        },
        &mut f,
        &mut tx,
    );
    (v, f, tx)
}

/// Destination MAC, source MAC, (source, destination) of an IPv4 or IPv6 TCP/UDP frame.
fn parse(frame: &[u8]) -> ([u8; 6], [u8; 6], SocketAddr, SocketAddr) {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let (s, d): (IpAddr, IpAddr) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => panic!("not IP"),
    };
    let (sp, dp) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        _ => panic!("no ports"),
    };
    let mac = |r: std::ops::Range<usize>| <[u8; 6]>::try_from(&frame[r]).unwrap();
    (
        mac(0..6),
        mac(6..12),
        SocketAddr::new(s, sp),
        SocketAddr::new(d, dp),
    )
}

/// The MAC of the neighbour behind `port` for an endpoint (the fixture's resolved ones).
fn mac_toward(port: PortId, ep: IpAddr) -> [u8; 6] {
    match (port, ep) {
        (POD1_PORT, _) => POD1_MAC,
        (POD2_PORT, _) => POD2_MAC,
        (UPLINK, _) => NODE_B_MAC,
        _ => panic!("no neighbour for {ep} on {port}"),
    }
}

#[test]
fn the_node_gets_its_gateway_answered_on_the_host_port() {
    let e = engine_with_host();
    // `via 169.254.1.1 dev svcnat-host onlink src <node IP>`: the kernel asks for the
    // gateway from the node's address.
    let req = arp(
        1,
        HOST_MAC,
        BCAST,
        HOST_MAC,
        NODE_IP.octets(),
        [0; 6],
        POD_GATEWAY.octets(),
    );
    let (v, _, tx) = feed(&e, HOST_PORT, &req);
    assert_eq!(v, Verdict::Consumed);
    assert_eq!(tx.len(), 1, "{tx:?}");
    assert_eq!(tx[0].port, HOST_PORT);
    // An ARP reply to the node's side, from the host port's MAC, for the gateway.
    let r = &tx[0].data;
    assert_eq!(&r[0..6], &HOST_MAC);
    assert_eq!(&r[6..12], &HOST_PORT_MAC);
    assert_eq!(&r[20..22], &[0, 2], "op reply");
    assert_eq!(&r[22..28], &HOST_PORT_MAC, "sender MAC");
    assert_eq!(&r[28..32], &POD_GATEWAY.octets(), "sender IP");
}

/// One TCP connection from the node to `web`'s ClusterIP: the SYN is masqueraded, and the
/// endpoint's SYN-ACK comes back out the host port as from the ClusterIP. Returns the
/// endpoint and the SNAT port.
fn tcp_from_node(e: &Engine, sport: u16) -> (SocketAddr, u16) {
    let syn = tcp(
        HOST_MAC,
        HOST_PORT_MAC,
        NODE,
        WEB_CIP,
        64,
        sport,
        80,
        F::Syn,
    );
    let (v, out, _) = feed(e, HOST_PORT, &syn);
    let Verdict::Forward { port } = v else {
        panic!("SYN from the node: {v:?}");
    };
    verify_checksums(&out);
    let (dmac, smac, src, ep) = parse(&out);
    assert_eq!(ep.port(), 8080, "DNAT to the target port");
    assert_eq!(dmac, mac_toward(port, ep.ip()));
    assert_ne!(smac, HOST_MAC);
    // Masqueraded: a node address, and a port of the SNAT range, which the kernel's
    // ingress rule leaves to the engine when the reply arrives.
    assert_eq!(src.ip(), IpAddr::V4(NODE_IP), "{src}");
    assert!((61000..=65535).contains(&src.port()), "{src}");
    let smac_ep = mac_toward(port, ep.ip());
    let ep4 = match ep.ip() {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => panic!("IPv6 endpoint"),
    };
    let synack = tcp(
        smac_ep,
        out[6..12].try_into().unwrap(),
        ep4,
        NODE,
        64,
        8080,
        src.port(),
        F::SynAck,
    );
    let (v, back, _) = feed(e, port, &synack);
    assert_eq!(
        v,
        Verdict::Forward { port: HOST_PORT },
        "the reply goes back to the node through the host port"
    );
    verify_checksums(&back);
    let (dmac, smac, from, to) = parse(&back);
    assert_eq!((dmac, smac), (HOST_MAC, HOST_PORT_MAC));
    assert_eq!(from, SocketAddr::from((WEB_CIP, 80)), "from the ClusterIP");
    assert_eq!(to, SocketAddr::from((NODE, sport)), "to the node's socket");
    // The node's ACK continues the connection to the same endpoint and SNAT port.
    let ack = tcp(
        HOST_MAC,
        HOST_PORT_MAC,
        NODE,
        WEB_CIP,
        64,
        sport,
        80,
        F::Ack,
    );
    let (v, out2, _) = feed(e, HOST_PORT, &ack);
    assert_eq!(v, Verdict::Forward { port });
    let (_, _, src2, ep2) = parse(&out2);
    assert_eq!((src2, ep2), (src, ep));
    (ep, src.port())
}

#[test]
fn node_to_cluster_ip_reaches_local_and_remote_endpoints_and_replies_come_back() {
    let e = engine_with_host();
    let mut seen = BTreeSet::new();
    let mut snat = BTreeSet::new();
    for sport in 40000..40060 {
        let (ep, p) = tcp_from_node(&e, sport);
        seen.insert(ep.ip());
        snat.insert((ep, p));
    }
    let want: BTreeSet<IpAddr> = [POD1_IP, POD2_IP, POD3_IP]
        .into_iter()
        .map(IpAddr::V4)
        .collect();
    assert_eq!(seen, want, "local pods and the pod behind node-b");
    // Ports are unique per endpoint (the reply tuple), as the kernel's NAT keeps them.
    assert_eq!(snat.len(), 60, "one reply tuple per connection");
}

#[test]
fn node_to_udp_cluster_ip_and_back() {
    let e = engine_with_host();
    let q = udp(HOST_MAC, HOST_PORT_MAC, NODE, DNS_CIP, 64, 45000, 53);
    let (v, out, _) = feed(&e, HOST_PORT, &q);
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    verify_checksums(&out);
    let (_, _, src, ep) = parse(&out);
    assert_eq!(ep, SocketAddr::from((POD1, 53)));
    assert_eq!(src.ip(), IpAddr::V4(NODE_IP));
    assert!((61000..=65535).contains(&src.port()), "{src}");
    let answer = udp(POD1_MAC, POD1_PORT_MAC, POD1, NODE, 64, 53, src.port());
    let (v, back, _) = feed(&e, POD1_PORT, &answer);
    assert_eq!(v, Verdict::Forward { port: HOST_PORT });
    verify_checksums(&back);
    let (dmac, _, from, to) = parse(&back);
    assert_eq!(dmac, HOST_MAC);
    assert_eq!(
        (from, to),
        (
            SocketAddr::from((DNS_CIP, 53)),
            SocketAddr::from((NODE, 45000))
        )
    );
}

#[test]
fn node_traffic_is_masqueraded_even_where_pods_are_not() {
    // Without a cluster CIDR kube-proxy masquerades no ClusterIP traffic; the node's own
    // must still be, or its replies would reach the kernel on a port it never used.
    let e = engine_with_host();
    let mut node = NodeContext::new(
        "node-a",
        vec![IpAddr::V4(NODE_IP), IpAddr::V6(NODE_IP6)],
        Vec::new(),
    );
    node.masquerade_all = false;
    e.set_plan(&Plan::compile(&cluster(), &node));
    let syn = tcp(
        HOST_MAC,
        HOST_PORT_MAC,
        NODE,
        DNS_CIP,
        64,
        41000,
        53,
        F::Syn,
    );
    // dns is UDP only: TCP/53 is no frontend, and nothing is routed on.
    assert_eq!(
        feed(&e, HOST_PORT, &syn).0,
        Verdict::Drop(DropReason::NoRoute)
    );
    let q = udp(HOST_MAC, HOST_PORT_MAC, NODE, DNS_CIP, 64, 45001, 53);
    let (v, out, _) = feed(&e, HOST_PORT, &q);
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    let (_, _, src, _) = parse(&out);
    assert!((61000..=65535).contains(&src.port()), "{src}");
    // A pod's query to the same Service keeps its own address and port.
    let q = udp(POD2_MAC, POD2_PORT_MAC, POD2, DNS_CIP, 64, 45002, 53);
    let (v, out, _) = feed(&e, POD2_PORT, &q);
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    let (_, _, src, _) = parse(&out);
    assert_eq!(src, SocketAddr::from((POD2, 45002)));
}

#[test]
fn only_the_node_and_only_services_on_the_host_port() {
    let e = engine_with_host();
    // Not a frontend: the node routes everything else itself; nothing is routed on.
    for dst in [POD1, [8, 8, 8, 8]] {
        let f = tcp(HOST_MAC, HOST_PORT_MAC, NODE, dst, 64, 42000, 8080, F::Syn);
        assert_eq!(
            feed(&e, HOST_PORT, &f).0,
            Verdict::Drop(DropReason::NoRoute),
            "{dst:?}"
        );
    }
    // A source that is not the node's: nothing the node's stack sent.
    let f = tcp(
        HOST_MAC,
        HOST_PORT_MAC,
        POD1,
        WEB_CIP,
        64,
        42001,
        80,
        F::Syn,
    );
    assert_eq!(
        feed(&e, HOST_PORT, &f).0,
        Verdict::Drop(DropReason::Martian)
    );
    // The node's address as a source anywhere else is still a martian.
    let f = tcp(ROUTER_MAC, UPLINK_MAC, NODE, WEB_CIP, 64, 42002, 80, F::Syn);
    assert_eq!(feed(&e, UPLINK, &f).0, Verdict::Drop(DropReason::Martian));
}

#[test]
fn a_service_without_endpoints_refuses_the_node_through_the_host_port() {
    let e = engine_with_host();
    let syn = tcp(
        HOST_MAC,
        HOST_PORT_MAC,
        NODE,
        EMPTY_CIP,
        64,
        43000,
        80,
        F::Syn,
    );
    let (v, _, tx) = feed(&e, HOST_PORT, &syn);
    assert_eq!(v, Verdict::Drop(DropReason::Rejected));
    assert_eq!(tx.len(), 1, "{tx:?}");
    assert_eq!(tx[0].port, HOST_PORT);
    let p = SlicedPacket::from_ethernet(&tx[0].data).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4");
    };
    assert_eq!(&tx[0].data[0..6], &HOST_MAC);
    assert_eq!(ip.header().source_addr(), Ipv4Addr::from(EMPTY_CIP));
    assert_eq!(ip.header().destination_addr(), NODE_IP);
    verify_checksums(&tx[0].data);
}

#[test]
fn node_to_ipv6_cluster_ip_and_back() {
    let e = engine_with_host();
    let mut seen = BTreeSet::new();
    for sport in 50000..50040 {
        let syn = tcp6(
            HOST_MAC,
            HOST_PORT_MAC,
            NODE_IP6,
            WEB6_CIP,
            64,
            sport,
            80,
            F::Syn,
        );
        let (v, out, _) = feed(&e, HOST_PORT, &syn);
        let Verdict::Forward { port } = v else {
            panic!("IPv6 SYN from the node: {v:?}");
        };
        verify_checksums(&out);
        let (_, smac, src, ep) = parse(&out);
        assert_eq!(src.ip(), IpAddr::V6(NODE_IP6), "{src}");
        assert!((61000..=65535).contains(&src.port()), "{src}");
        seen.insert(ep.ip());
        let IpAddr::V6(ep6) = ep.ip() else {
            panic!("{ep}")
        };
        let synack = tcp6(
            mac_toward(port, ep.ip()),
            smac,
            ep6,
            NODE_IP6,
            64,
            8080,
            src.port(),
            F::SynAck,
        );
        let (v, back, _) = feed(&e, port, &synack);
        assert_eq!(v, Verdict::Forward { port: HOST_PORT });
        verify_checksums(&back);
        let (dmac, _, from, to) = parse(&back);
        assert_eq!(dmac, HOST_MAC);
        assert_eq!(from, SocketAddr::new(IpAddr::V6(WEB6_CIP), 80));
        assert_eq!(to, SocketAddr::new(IpAddr::V6(NODE_IP6), sport));
    }
    let want: BTreeSet<IpAddr> = [POD1_IP6, POD2_IP6, POD3_IP6]
        .into_iter()
        .map(IpAddr::V6)
        .collect::<BTreeSet<_>>();
    assert_eq!(seen, want);
}

#[test]
fn an_endpoint_s_icmp_error_reaches_the_node_as_from_the_cluster_ip() {
    use etherparse::{Icmpv4Type, icmpv4};
    let e = engine_with_host();
    let q = udp(HOST_MAC, HOST_PORT_MAC, NODE, DNS_CIP, 64, 45100, 53);
    let (v, out, _) = feed(&e, HOST_PORT, &q);
    assert_eq!(v, Verdict::Forward { port: POD1_PORT });
    let (_, _, src, _) = parse(&out);
    // The pod's port is closed: it answers the translated datagram with a port
    // unreachable to the masquerade address.
    let err = icmp4(
        POD1_MAC,
        POD1_PORT_MAC,
        POD1,
        NODE,
        64,
        Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
        ip_of(&out),
    );
    let (v, back, _) = feed(&e, POD1_PORT, &err);
    assert_eq!(v, Verdict::Forward { port: HOST_PORT });
    verify_checksums(&back);
    assert_eq!(&back[0..6], &HOST_MAC);
    let p = SlicedPacket::from_ethernet(&back).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4");
    };
    assert_eq!(ip.header().source_addr(), Ipv4Addr::from(DNS_CIP));
    assert_eq!(ip.header().destination_addr(), NODE_IP);
    // The quoted datagram is the node's own, as it sent it.
    let quote = &back[14 + 20 + 8..];
    let (qs, qd) = (&quote[12..16], &quote[16..20]);
    assert_eq!((qs, qd), (&NODE[..], &DNS_CIP[..]));
    assert_eq!(
        &quote[20..24],
        &[45100u16.to_be_bytes(), 53u16.to_be_bytes()].concat()[..]
    );
    assert_ne!(src.port(), 45100);
}

// ---------------------------------------------------------------------------------------------
// `lo`: the node's own connections to NodePorts on its own addresses
// ---------------------------------------------------------------------------------------------

/// The loopback port (`lo`, all-zero MACs).
const LO: PortId = 11;
/// `web`'s NodePort (TCP, endpoints POD1, POD2 here and POD3 behind node-b).
const WEB_NP: u16 = 30080;
/// `web6`'s NodePort.
const WEB6_NP: u16 = 30081;

fn lo_port() -> PortConfig {
    PortConfig {
        id: LO,
        name: "lo".into(),
        mac: [0; 6],
        addrs: vec!["127.0.0.1/8".parse().unwrap(), "::1/128".parse().unwrap()],
        proxy_arp: Vec::new(),
        proxy_ndp: Vec::new(),
        mtu: 65536,
        host_peer: None,
        loopback: true,
    }
}

/// [`engine_with_host`] plus `lo`, with 127.0.0.1 and ::1 among the node's addresses (as
/// the driver reads them from every interface).
fn engine_with_lo() -> Engine {
    let e = engine_with_host();
    let mut ports = ports();
    ports.push(host_port());
    ports.push(lo_port());
    e.set_ports(ports);
    let mut adm = Admission::default();
    adm.node_addrs = [
        IpAddr::V4(NODE_IP),
        IpAddr::V6(NODE_IP6),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    ]
    .into();
    e.set_admission(adm);
    e
}

/// One TCP connection from the node to its own `web` NodePort, sent out `lo`: masqueraded
/// to an endpoint, the endpoint's SYN-ACK back out the host port (not `lo`, where a local
/// source is a martian) as from the NodePort. Returns the endpoint.
fn node_port_from_lo(e: &Engine, sport: u16) -> SocketAddr {
    let syn = tcp([0; 6], [0; 6], NODE, NODE, 64, sport, WEB_NP, F::Syn);
    let (v, out, _) = feed(e, LO, &syn);
    let Verdict::Forward { port } = v else {
        panic!("SYN on lo to the node's NodePort: {v:?}");
    };
    verify_checksums(&out);
    let (dmac, smac, src, ep) = parse(&out);
    assert_eq!(ep.port(), 8080, "DNAT to the target port");
    assert_eq!(dmac, mac_toward(port, ep.ip()));
    assert_ne!(smac, [0; 6], "the egress port's MAC");
    assert_eq!(src.ip(), IpAddr::V4(NODE_IP), "{src}");
    assert!((61000..=65535).contains(&src.port()), "masqueraded: {src}");
    let IpAddr::V4(ep4) = ep.ip() else {
        panic!("{ep}")
    };
    let synack = tcp(
        mac_toward(port, ep.ip()),
        smac,
        ep4.octets(),
        NODE,
        64,
        8080,
        src.port(),
        F::SynAck,
    );
    let (v, back, _) = feed(e, port, &synack);
    assert_eq!(v, Verdict::Forward { port: HOST_PORT }, "reply to the node");
    verify_checksums(&back);
    let (dmac, smac, from, to) = parse(&back);
    assert_eq!((dmac, smac), (HOST_MAC, HOST_PORT_MAC));
    assert_eq!(from, SocketAddr::from((NODE, WEB_NP)), "from the NodePort");
    assert_eq!(to, SocketAddr::from((NODE, sport)), "to the node's socket");
    // The node's ACK, again on lo, continues the connection.
    let ack = tcp([0; 6], [0; 6], NODE, NODE, 64, sport, WEB_NP, F::Ack);
    let (v, out2, _) = feed(e, LO, &ack);
    assert_eq!(v, Verdict::Forward { port });
    let (_, _, src2, ep2) = parse(&out2);
    assert_eq!((src2, ep2), (src, ep));
    ep
}

#[test]
fn node_to_its_own_node_port_on_lo_reaches_every_endpoint() {
    let e = engine_with_lo();
    let seen: BTreeSet<IpAddr> = (40000..40060)
        .map(|sport| node_port_from_lo(&e, sport).ip())
        .collect();
    let want: BTreeSet<IpAddr> = [POD1_IP, POD2_IP, POD3_IP]
        .into_iter()
        .map(IpAddr::V4)
        .collect();
    assert_eq!(seen, want, "local pods and the pod behind node-b");
}

#[test]
fn node_to_its_own_ipv6_node_port_on_lo() {
    let e = engine_with_lo();
    let syn = tcp6(
        [0; 6],
        [0; 6],
        NODE_IP6,
        NODE_IP6,
        64,
        50100,
        WEB6_NP,
        F::Syn,
    );
    let (v, out, _) = feed(&e, LO, &syn);
    let Verdict::Forward { port } = v else {
        panic!("IPv6 SYN on lo: {v:?}");
    };
    verify_checksums(&out);
    let (_, smac, src, ep) = parse(&out);
    assert_eq!(src.ip(), IpAddr::V6(NODE_IP6), "{src}");
    assert!((61000..=65535).contains(&src.port()), "{src}");
    let IpAddr::V6(ep6) = ep.ip() else {
        panic!("{ep}")
    };
    let synack = tcp6(
        mac_toward(port, ep.ip()),
        smac,
        ep6,
        NODE_IP6,
        64,
        8080,
        src.port(),
        F::SynAck,
    );
    let (v, back, _) = feed(&e, port, &synack);
    assert_eq!(v, Verdict::Forward { port: HOST_PORT });
    verify_checksums(&back);
    let (dmac, _, from, to) = parse(&back);
    assert_eq!(dmac, HOST_MAC);
    assert_eq!(from, SocketAddr::new(IpAddr::V6(NODE_IP6), WEB6_NP));
    assert_eq!(to, SocketAddr::new(IpAddr::V6(NODE_IP6), 50100));
}

#[test]
fn everything_else_on_lo_stays_the_kernel_s() {
    let e = engine_with_lo();
    let lo = |src: [u8; 4], dst: [u8; 4], dport: u16| {
        feed(
            &e,
            LO,
            &tcp([0; 6], [0; 6], src, dst, 64, 41000, dport, F::Syn),
        )
        .0
    };
    // 127.0.0.1 NodePorts are not served; nor is anything that is no NodePort (SSH, a
    // ClusterIP the node's stack sent out lo, a port of the NodePort range no Service has).
    assert_eq!(lo([127, 0, 0, 1], [127, 0, 0, 1], WEB_NP), Verdict::Kernel);
    assert_eq!(lo(NODE, [127, 0, 0, 1], WEB_NP), Verdict::Kernel);
    assert_eq!(lo(NODE, NODE, 22), Verdict::Kernel);
    assert_eq!(lo(NODE, WEB_CIP, 80), Verdict::Kernel);
    assert_eq!(lo(NODE, NODE, 30444), Verdict::Kernel);
    // A source that is not the node's cannot have come from its stack.
    assert_eq!(lo(POD1, NODE, WEB_NP), Verdict::Kernel);
    // UDP to a TCP NodePort, and the node's reply from its NodePort to one of its own
    // sockets (what it would send if something listened there): not taken again.
    let q = udp([0; 6], [0; 6], NODE, NODE, 64, 45000, WEB_NP);
    assert_eq!(feed(&e, LO, &q).0, Verdict::Kernel);
    let back = tcp([0; 6], [0; 6], NODE, NODE, 64, WEB_NP, 41000, F::SynAck);
    assert_eq!(feed(&e, LO, &back).0, Verdict::Kernel);
    // ARP never appears on lo; whatever is not IP is the kernel's.
    let a = arp(1, [0; 6], BCAST, [0; 6], NODE, [0; 6], NODE);
    assert_eq!(feed(&e, LO, &a).0, Verdict::Kernel);
}

#[test]
fn a_node_port_without_endpoints_refuses_the_node_through_the_host_port() {
    let e = engine_with_lo();
    let mut c = cluster();
    for p in ["web-1", "web-2", "web-3"] {
        c.remove_pod(&svcnat_core::model::ObjectName::new("default", p));
    }
    e.set_plan(&Plan::compile(&c, &node()));
    let syn = tcp([0; 6], [0; 6], NODE, NODE, 64, 43000, WEB_NP, F::Syn);
    let (v, _, tx) = feed(&e, LO, &syn);
    assert_eq!(v, Verdict::Drop(DropReason::Rejected));
    assert_eq!(tx.len(), 1, "{tx:?}");
    // Out the host port to the node's side: on lo a node-address source is a martian.
    assert_eq!(tx[0].port, HOST_PORT);
    assert_eq!(&tx[0].data[0..6], &HOST_MAC);
    assert_eq!(&tx[0].data[6..12], &HOST_PORT_MAC);
    let p = SlicedPacket::from_ethernet(&tx[0].data).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4");
    };
    assert_eq!(ip.header().source_addr(), NODE_IP);
    assert_eq!(ip.header().destination_addr(), NODE_IP);
    assert_eq!(&tx[0].data[34..36], &[3, 3], "ICMP port unreachable");
    verify_checksums(&tx[0].data);
}

#[test]
fn a_tcp_aggregate_from_lo_leaves_whole_for_the_kernel_to_segment() {
    use etherparse::PacketBuilder;
    let e = engine_with_lo();
    let ep = node_port_from_lo(&e, 44000);
    // lo's MTU is 65,536: TCP hands it GSO aggregates of MSS-sized segments (checksum
    // partial), larger than the endpoint link's 1,500.
    let mut big = Vec::new();
    PacketBuilder::ethernet2([0; 6], [0; 6])
        .ipv4(NODE, NODE, 64)
        .tcp(44000, WEB_NP, 2000, 64240)
        .ack(1001)
        .write(&mut big, &[7u8; 8000])
        .unwrap();
    let mut f = big.clone();
    let mut tx = Vec::new();
    let meta = RxMeta {
        port: LO,
        csum: Csum::Partial,
    };
    let v = e.handle_frame(Duration::from_secs(1), meta, &mut f, &mut tx);
    assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
    assert!(tx.is_empty(), "no ICMP error, no fragments: {tx:?}");
    assert_eq!(f.len(), big.len(), "whole");
    let (_, _, _, to) = parse(&f);
    assert_eq!(to, ep);
}
