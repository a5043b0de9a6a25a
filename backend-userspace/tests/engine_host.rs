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
        snat.insert(p);
    }
    let want: BTreeSet<IpAddr> = [POD1_IP, POD2_IP, POD3_IP]
        .into_iter()
        .map(IpAddr::V4)
        .collect();
    assert_eq!(seen, want, "local pods and the pod behind node-b");
    assert_eq!(snat.len(), 60, "one SNAT port per connection");
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
