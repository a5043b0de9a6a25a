//! Fragments and MTU through the userspace datapath with real packets, against the kernel
//! (iptables DNAT behind conntrack's defragmentation) on the same topology: the same
//! exchanges run once with `DualStack<Iptables>` programming node 0 and once with the
//! userspace datapath owning its interfaces, and must end the same way, as the test
//! expects.
//!
//! ```text
//!  client c0 (MTU 1500) ──┐
//!  client c1 (MTU 9000) ──┴─ LAN (c1 and n0 ports 9000) ── node n0 (eth0 MTU 9000)
//!                                                            │ vp (MTU 1500)   │ vp
//!                                                         echo-0 (UDP echo)   tester
//! ```
//!
//! - a 3,000-byte UDP datagram fragmented by its sender (c0, MTU 1500) reaches the pod
//!   whole through a NodePort, and through a ClusterIP from a pod, and its 3,000-byte echo
//!   (fragmented by the pod) comes back whole, over IPv4 and IPv6;
//! - from c1 (MTU 9000), a 4,000-byte datagram without DF is fragmented for the pod's
//!   1,500-byte link and echoed; with DF (IPv4) or over IPv6 it gets "fragmentation needed"
//!   / "packet too big" with MTU 1500: c1's socket reports EMSGSIZE and its kernel learns
//!   the path MTU (`ip route get`), after which its datagrams, fragmented, get through;
//! - overlapping fragments deliver nothing; after a flood of incomplete datagrams beyond
//!   the 4 MiB reassembly budget, fragments are dropped (the kernel does the same until its
//!   timeouts), while the engine's held memory stays within its budget.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etherparse::PacketBuilder;
use svcnat_core::dualstack::DualStack;
use svcnat_core::model::*;
use svcnat_core::plan::NodeContext;
use svcnat_examples::agent::NodeAgent;
use svcnat_examples::netns::run_in;
use svcnat_examples::skip_unless_root;
use svcnat_examples::testbed::{PodSpec, Testbed, TestbedSpec};
use svcnat_iptables::driver::{Iptables, IptablesConfig, Runner};
use svcnat_userspace::engine::DropReason;
use svcnat_userspace::inject::Injector;
use svcnat_userspace::{Userspace, UserspaceConfig};

const ECHO_PORT: u16 = 7777;
const NP4: u16 = 30777;
const NP6: u16 = 30778;
const CIP4: &str = "10.96.0.30";
const CIP6: &str = "fd00:10:96::30";
const EMSGSIZE: i32 = 90;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn service(name: &str, cip: &str, node_port: u16) -> Service {
    let mut svc = Service::new(ObjectName::new("default", name));
    svc.cluster_ips = vec![ip(cip)];
    svc.ip_families = vec![if ip(cip).is_ipv6() {
        IpFamily::V6
    } else {
        IpFamily::V4
    }];
    svc.service_type = ServiceType::NodePort;
    svc.selector = Some(LabelSelector::from_labels(BTreeMap::from([(
        "app".to_string(),
        "echo".to_string(),
    )])));
    let mut sp = ServicePort::new("", Protocol::Udp, ECHO_PORT, TargetPort::Number(ECHO_PORT));
    sp.node_port = Some(node_port);
    svc.ports.push(sp);
    svc
}

/// A UDP echo server in the pod; it remembers the first 16 bytes of what it received.
struct Echo {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &str) -> Echo {
        let sock = run_in(ns, || UdpSocket::bind("[::]:7777")).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (st, se) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    se.lock().unwrap().push(buf[..n.min(16)].to_vec());
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        });
        Echo {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn saw(&self, marker: &[u8]) -> bool {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.starts_with(marker))
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How one exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The whole datagram came back, this long.
    Echoed(usize),
    /// The socket reported EMSGSIZE (an ICMP "fragmentation needed" / "packet too big").
    TooBig,
    /// No answer.
    Timeout,
    /// Anything else.
    Other(String),
}

fn payload(marker: &str, n: usize) -> Vec<u8> {
    let mut p = marker.as_bytes().to_vec();
    p.extend((p.len()..n).map(|i| (i * 7 + i / 251) as u8));
    p
}

/// Sends `data` from a new socket in `ns` to `target` (up to three tries) and waits for the
/// echo.
fn exchange(ns: &str, target: SocketAddr, data: &[u8]) -> Outcome {
    let any: SocketAddr = if target.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let sock = run_in(ns, || {
        let s = UdpSocket::bind(any)?;
        s.connect(target)?;
        Ok(s)
    })
    .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    for _ in 0..3 {
        if let Err(e) = sock.send(data) {
            return match e.raw_os_error() {
                Some(EMSGSIZE) => Outcome::TooBig,
                _ => Outcome::Other(format!("send: {e}")),
            };
        }
        match sock.recv(&mut buf) {
            Ok(n) if buf[..n] == *data => return Outcome::Echoed(n),
            Ok(n) => return Outcome::Other(format!("a different {n}-byte reply")),
            Err(e) if e.raw_os_error() == Some(EMSGSIZE) => return Outcome::TooBig,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Outcome::Other(format!("recv: {e}")),
        }
    }
    Outcome::Timeout
}

/// The path MTU `ns`'s kernel has learnt towards `dst`, if any.
fn learnt_mtu(tb: &Testbed, ns: &str, dst: IpAddr) -> Option<u32> {
    let out = tb
        .exec_ok(ns, ["ip", "route", "get", &dst.to_string()])
        .unwrap();
    let mut words = out.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

/// A UDP/IPv4 frame from c0 to node 0's NodePort, and its fragments at 1,500 bytes.
fn datagram4(tb: &Testbed, sport: u16, id: u16, data: &[u8]) -> Vec<u8> {
    let client_mac = tb.mac(tb.ns_of_client(0), "eth0").unwrap();
    let node_mac = tb.mac(tb.ns_of_node(0), "eth0").unwrap();
    let IpAddr::V4(src) = tb.client_ip(0) else {
        panic!()
    };
    let IpAddr::V4(dst) = tb.node_ip(0) else {
        panic!()
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(client_mac, node_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, NP4)
        .write(&mut out, data)
        .unwrap();
    out[18..20].copy_from_slice(&id.to_be_bytes());
    out
}

/// An IPv4 fragment of `frame`'s UDP datagram: `data` at byte `offset`.
fn frag4(frame: &[u8], offset: usize, data: &[u8], more: bool) -> Vec<u8> {
    let mut f = frame[..34].to_vec();
    f.extend_from_slice(data);
    let mut h = etherparse::Ipv4Header::from_slice(&f[14..]).unwrap().0;
    h.more_fragments = more;
    h.dont_fragment = false;
    h.fragment_offset = etherparse::IpFragOffset::try_new((offset / 8) as u16).unwrap();
    h.set_payload_len(data.len()).unwrap();
    h.header_checksum = h.calc_header_checksum();
    let mut w = Vec::new();
    h.write(&mut w).unwrap();
    f[14..34].copy_from_slice(&w);
    f
}

fn split4(frame: &[u8]) -> Vec<Vec<u8>> {
    let body = &frame[34..];
    body.chunks(1480)
        .enumerate()
        .map(|(i, c)| frag4(frame, i * 1480, c, (i + 1) * 1480 < body.len()))
        .collect()
}

/// Every exchange, in order, with what happened; `held` reports the datapath's held
/// reassembly memory after the flood (none for the kernel).
fn run_checks(tb: &Testbed, echo: &Echo, tag: &str) -> Vec<(String, Outcome)> {
    let c0 = tb.ns_of_client(0).to_string();
    let c1 = tb.ns_of_client(1).to_string();
    let tester = tb.ns_of_pod("tester").unwrap().to_string();
    let node4 = tb.node_ip(0);
    let node6 = tb.node_ip6(0).unwrap();
    for fam in ["-4", "-6"] {
        tb.exec_ok(&c1, ["ip", fam, "route", "flush", "cache"])
            .unwrap();
    }
    assert_eq!(learnt_mtu(tb, &c1, node4), None, "{tag}: stale path MTU");
    assert_eq!(learnt_mtu(tb, &c1, node6), None, "{tag}: stale path MTU");
    let mut out = Vec::new();
    let mut check = |name: &str, o: Outcome| out.push((name.to_string(), o));

    // Fragmented by the sender (MTU 1500), both ways.
    let big = payload("frag", 3000);
    check(
        "v4 NodePort, 3000 bytes from c0",
        exchange(&c0, SocketAddr::new(node4, NP4), &big),
    );
    check(
        "v6 NodePort, 3000 bytes from c0",
        exchange(&c0, SocketAddr::new(node6, NP6), &big),
    );
    check(
        "v4 ClusterIP, 3000 bytes from a pod",
        exchange(&tester, SocketAddr::new(ip(CIP4), ECHO_PORT), &big),
    );
    check(
        "v6 ClusterIP, 3000 bytes from a pod",
        exchange(&tester, SocketAddr::new(ip(CIP6), ECHO_PORT), &big),
    );

    // From the jumbo client: without DF the node fragments for the pod's link.
    let jumbo = payload("jumbo", 4000);
    tb.exec_ok(&c1, ["sysctl", "-q", "-w", "net.ipv4.ip_no_pmtu_disc=1"])
        .unwrap();
    check(
        "v4 NodePort, 4000 bytes without DF from c1",
        exchange(&c1, SocketAddr::new(node4, NP4), &jumbo),
    );
    tb.exec_ok(&c1, ["sysctl", "-q", "-w", "net.ipv4.ip_no_pmtu_disc=0"])
        .unwrap();
    // With DF (the default for a datagram within the local MTU), and over IPv6.
    check(
        "v4 NodePort, 4000 bytes with DF from c1",
        exchange(&c1, SocketAddr::new(node4, NP4), &jumbo),
    );
    check(
        "v6 NodePort, 4000 bytes from c1",
        exchange(&c1, SocketAddr::new(node6, NP6), &jumbo),
    );
    check(
        "v4 path MTU c1 learnt",
        Outcome::Other(format!("{:?}", learnt_mtu(tb, &c1, node4))),
    );
    check(
        "v6 path MTU c1 learnt",
        Outcome::Other(format!("{:?}", learnt_mtu(tb, &c1, node6))),
    );
    check(
        "v4 NodePort, 4000 bytes from c1 after PMTU discovery",
        exchange(&c1, SocketAddr::new(node4, NP4), &jumbo),
    );
    check(
        "v6 NodePort, 4000 bytes from c1 after PMTU discovery",
        exchange(&c1, SocketAddr::new(node6, NP6), &jumbo),
    );

    // Injected fragments: a control, overlapping ones, then a flood.
    let inj = Injector::open(Some(&c0), "eth0").unwrap();
    let settle = || std::thread::sleep(Duration::from_millis(500));
    let control = datagram4(tb, 45001, 0x1001, &payload("control", 3000));
    inj.send(&split4(&control)).unwrap();
    settle();
    check(
        "injected fragmented datagram delivered",
        Outcome::Other(echo.saw(b"control").to_string()),
    );
    let ov = datagram4(tb, 45002, 0x1002, &payload("overlap", 3000));
    let body = &ov[34..];
    inj.send(&[
        frag4(&ov, 0, &body[..1480], true),
        frag4(&ov, 1472, &body[1472..2952], true),
        frag4(&ov, 2952, &body[2952..], false),
    ])
    .unwrap();
    settle();
    check(
        "overlapping fragments delivered",
        Outcome::Other(echo.saw(b"overlap").to_string()),
    );
    // 4,000 incomplete datagrams of 1,480 bytes: past the 4 MiB budget.
    let flood: Vec<Vec<u8>> = (0..4000u16)
        .map(|i| {
            let d = datagram4(tb, 46000, 0x2000 + i, &payload("flood", 3000));
            frag4(&d, 0, &d[34..34 + 1480], true)
        })
        .collect();
    for chunk in flood.chunks(500) {
        inj.send(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    settle();
    let after = datagram4(tb, 45003, 0x1003, &payload("after", 3000));
    inj.send(&split4(&after)).unwrap();
    settle();
    check(
        "fragmented datagram after the flood delivered",
        Outcome::Other(echo.saw(b"after").to_string()),
    );
    check(
        "unfragmented datagram after the flood",
        exchange(&c0, SocketAddr::new(node4, NP4), &payload("small", 500)),
    );
    out
}

fn expected() -> Vec<Outcome> {
    let s = |t: &str| Outcome::Other(t.to_string());
    vec![
        Outcome::Echoed(3000),
        Outcome::Echoed(3000),
        Outcome::Echoed(3000),
        Outcome::Echoed(3000),
        Outcome::Echoed(4000),
        Outcome::TooBig,
        Outcome::TooBig,
        s("Some(1500)"),
        s("Some(1500)"),
        Outcome::Echoed(4000),
        Outcome::Echoed(4000),
        s("true"),
        s("false"),
        s("false"),
        Outcome::Echoed(500),
    ]
}

#[test]
fn fragments_and_mtu_as_the_kernel_handles_them() {
    skip_unless_root!();
    let spec = TestbedSpec::new(1, 2)
        .with_ipv6()
        .pod(PodSpec::new("echo-0", 0, ip("10.244.0.10")).with_ip(ip("fd00:10:244:0::10")))
        .pod(PodSpec::new("tester", 0, ip("10.244.0.99")).with_ip(ip("fd00:10:244:0::99")));
    let tb = Testbed::new(spec).unwrap();
    // Jumbo frames between c1 and the node; c0 and the pods keep 1500.
    let sw = tb.ns_of_switch().to_string();
    for port in ["c1", "n0"] {
        tb.exec_ok(&sw, ["ip", "link", "set", port, "mtu", "9000"])
            .unwrap();
    }
    for ns in [tb.ns_of_client(1), tb.ns_of_node(0)] {
        tb.exec_ok(ns, ["ip", "link", "set", "eth0", "mtu", "9000"])
            .unwrap();
    }
    let echo = Echo::start(tb.ns_of_pod("echo-0").unwrap());

    let n = tb.node(0).clone();
    let mut cluster = Cluster::simulated();
    let mut node = Node::new(n.name.clone());
    node.addresses = vec![IpAddr::V4(n.ip), IpAddr::V6(n.ip6.unwrap())];
    node.pod_cidrs = n.pod_cidrs.clone();
    cluster.upsert_node(node);
    for (name, v4, v6, app) in [
        ("echo-0", "10.244.0.10", "fd00:10:244:0::10", "echo"),
        ("tester", "10.244.0.99", "fd00:10:244:0::99", "tester"),
    ] {
        let mut pod = Pod::new(ObjectName::new("default", name), ip(v4));
        pod.ips.push(ip(v6));
        pod.labels.insert("app".into(), app.into());
        pod.node_name = Some(n.name.clone());
        cluster.upsert_pod(pod);
    }
    cluster.upsert_service(service("echo4", CIP4, NP4));
    cluster.upsert_service(service("echo6", CIP6, NP6));
    let ctx = NodeContext::new(
        n.name.clone(),
        vec![IpAddr::V4(n.ip), IpAddr::V6(n.ip6.unwrap())],
        vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10:244::/56".parse().unwrap(),
        ],
    );
    let node_ns = tb.ns_of_node(0).to_string();

    // The kernel: iptables and ip6tables DNAT, conntrack defragmenting.
    let one = |family| {
        Iptables::new(IptablesConfig {
            runner: Runner::netns(node_ns.clone()),
            family,
            canary_interval: Duration::ZERO,
            ..IptablesConfig::default()
        })
        .unwrap()
    };
    let mut kernel = NodeAgent::new(
        ctx.clone(),
        DualStack::new(one(IpFamily::V4), one(IpFamily::V6)),
    );
    kernel.sync(&cluster).unwrap();
    let by_kernel = run_checks(&tb, &echo, "kernel");
    kernel.cleanup().unwrap();
    drop(kernel);

    // The userspace datapath on the same topology.
    let dp = Userspace::start(UserspaceConfig {
        netns: Some(node_ns.clone()),
        interfaces: vec!["eth0".into(), "vp*".into()],
        workers: 1,
        ..UserspaceConfig::default()
    })
    .unwrap();
    let mut user = NodeAgent::new(ctx, dp);
    user.sync(&cluster).unwrap();
    let by_user = run_checks(&tb, &echo, "userspace");
    let st = user.dataplane().stats().engine;
    user.cleanup().unwrap();

    let want = expected();
    for ((name, k), (_, u)) in by_kernel.iter().zip(&by_user) {
        eprintln!("{name}: kernel {k:?}, userspace {u:?}");
    }
    eprintln!("{st:?}");
    assert_eq!(by_kernel.len(), want.len());
    let mut wrong = Vec::new();
    for (((name, k), (_, u)), w) in by_kernel.iter().zip(&by_user).zip(&want) {
        if k != w {
            wrong.push(format!("{name}: kernel {k:?}, the test expected {w:?}"));
        }
        if u != k {
            wrong.push(format!("{name}: userspace {u:?}, the kernel {k:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}\n{st:?}", wrong.join("\n"));
    // The engine did the work, within its bounds.
    assert!(st.reassembled >= 8, "{st:?}");
    assert!(st.fragments_sent >= 8, "{st:?}");
    assert!(st.dropped(DropReason::TooBig) >= 2, "{st:?}");
    assert!(st.dropped(DropReason::FragmentOverlap) >= 2, "{st:?}");
    assert!(st.dropped(DropReason::FragmentMemory) > 0, "{st:?}");
    assert!(st.reassembly_memory <= (4 << 20) + 4096, "{st:?}");
}
