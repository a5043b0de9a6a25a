//! The frame injector's three transmit paths (`sendmmsg`, the `AF_PACKET` transmit ring,
//! an `AF_XDP` socket in copy mode) each deliver every frame, unchanged and in order, to a
//! socket in a pod behind a veth, small and full-size frames alike. The datapath
//! benchmark compares their costs, so each must first be shown to send what it is given.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::time::Duration;

use svcnat_examples::skip_unless_root;
use svcnat_examples::testbed::{PodSpec, Testbed, TestbedSpec};
use svcnat_userspace::inject::Injector;

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const PORT: u16 = 5301;

fn frames(tb: &Testbed, pod_ns: &str, count: u16, payload: usize) -> Vec<Vec<u8>> {
    let node = tb.ns_of_node(0);
    let pod_mac = tb.mac(pod_ns, "eth0").unwrap();
    let vp_mac = tb.mac(node, "vp0").unwrap();
    (0..count)
        .map(|i| {
            let b = etherparse::PacketBuilder::ethernet2(vp_mac, pod_mac)
                .ipv4([192, 168, 50, 1], POD_IP.octets(), 64)
                .udp(20000, PORT);
            let mut body = vec![0x5a; payload];
            body[..2].copy_from_slice(&i.to_be_bytes());
            let mut out = Vec::with_capacity(b.size(payload));
            b.write(&mut out, &body).unwrap();
            out
        })
        .collect()
}

/// Receives until `want` datagrams came or none arrives for a second; returns their
/// sequence numbers and lengths.
fn receive(sock: &UdpSocket, want: usize) -> Vec<(u16, usize)> {
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while got.len() < want {
        match sock.recv(&mut buf) {
            Ok(n) => got.push((u16::from_be_bytes([buf[0], buf[1]]), n)),
            Err(_) => break,
        }
    }
    got
}

#[test]
fn every_transmit_path_delivers_every_frame_in_order() {
    skip_unless_root!();
    let tb = Testbed::new(TestbedSpec::new(1, 1).pod(PodSpec::new("srv", 0, IpAddr::V4(POD_IP))))
        .unwrap();
    let pod_ns = tb.ns_of_pod("srv").unwrap().to_string();
    let sock = svcnat_examples::netns::run_in(&pod_ns, || UdpSocket::bind((POD_IP, PORT))).unwrap();
    let node = tb.ns_of_node(0).to_string();
    type Open = fn(Option<&str>, &str) -> std::io::Result<Injector>;
    let paths: [(&str, Open); 3] = [
        ("sendmmsg", Injector::open),
        ("ring", Injector::open_ring),
        ("af_xdp", Injector::open_xdp),
    ];
    for (name, open) in paths {
        let inj = open(Some(&node), "vp0").unwrap_or_else(|e| panic!("{name}: open: {e}"));
        // 200 small frames (fewer than the socket buffer holds), then full-size ones.
        let small = frames(&tb, &pod_ns, 200, 18);
        let sent = inj.send(&small).unwrap();
        assert_eq!(sent, 200, "{name}: the kernel took {sent} of 200 frames");
        let got = receive(&sock, 200);
        let want: Vec<(u16, usize)> = (0..200).map(|i| (i, 18)).collect();
        assert_eq!(got, want, "{name}: datagrams received (sequence, length)");
        let large = frames(&tb, &pod_ns, 20, 1400);
        assert_eq!(inj.send(&large).unwrap(), 20, "{name}: large frames taken");
        let got = receive(&sock, 20);
        let want: Vec<(u16, usize)> = (0..20).map(|i| (i, 1400)).collect();
        assert_eq!(got, want, "{name}: large datagrams received");
    }
}
