//! `cargo bench -p svcnat-examples --bench datapath`: the userspace datapath against the
//! kernel's iptables DNAT, in the same namespace topology, in the same run.
//!
//! ```text
//!   client c0 ──LAN── node n0 (datapath under test) ──veth── pod srv (iperf3 -s)
//!   iperf3 -c <node IP>:30521        NodePort 30521 -> srv:5201, TCP and UDP, masqueraded
//! ```
//!
//! For each dataplane (iptables, then userspace with one worker, one worker sending with
//! `sendmmsg` instead of its transmit ring, two workers, and one worker that busy-polls
//! its ring for 50 us before sleeping) it measures
//! TCP bulk throughput (`iperf3`, 4 s, one stream and four streams) and the small-packet
//! rate: 64-byte UDP frames (256 flows) written onto the client's link by the frame injector
//! for 4 s, counted where they arrive on the pod's interface; and prints the
//! userspace/kernel ratios; and, at light load, the round trip of one UDP request and its
//! answer at a time through the NodePort (median and 99th percentile), TCP retransmits. Streams and flows spread over the workers by the fanout hash,
//! so a single TCP stream always runs on one worker. For the
//! userspace datapath it also prints the packets per second of worker CPU time (read from
//! `/proc/self/task/*/stat`): on a machine where the load generator, the receiver and the
//! datapath share few cores, the wall-clock rate is bounded by the generator, while the
//! rate per worker core second says what one core of the datapath can forward.
//! Last, the transmit path alone: CPU time of the sending thread per 64-byte frame into a
//! pod's veth with a worker's `sendmmsg`, its transmit ring, and an `AF_XDP` socket in
//! copy mode; and the ring again with frames the pod's link layer drops, which leaves out
//! the pod's receive (the kernel runs it in the sender's context). The ring's figure is
//! the ceiling of any datapath that hands frames to the kernel to transmit into the veth;
//! the worker's figure less the pod's receive is what forwarding alone costs a worker.
//! Figures only: nothing here fails on speed. Needs root and `iperf3`; otherwise prints
//! `SKIP` and why.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use svcnat_core::model::*;
use svcnat_core::plan::{Dataplane, NodeContext};
use svcnat_examples::agent::NodeAgent;
use svcnat_examples::testbed::{PodSpec, Testbed, TestbedSpec, require_root};
use svcnat_iptables::driver::{Flavour, Iptables, IptablesConfig, Runner};
use svcnat_userspace::inject::Injector;
use svcnat_userspace::{Userspace, UserspaceConfig};

const NODE_PORT: u16 = 30521;
const SECONDS: u32 = 4;
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);

struct Figures {
    tcp_bps: f64,
    /// Four parallel streams.
    tcp4_bps: f64,
    udp_pps: f64,
    /// Userspace only: (worker CPU seconds during the TCP run, during the UDP run).
    worker_cpu: Option<(f64, f64)>,
    tcp_packets: u64,
    udp_packets: u64,
    /// Retransmitted segments in the TCP runs (one stream, four streams).
    retransmits: (f64, f64),
    /// One UDP request and its answer at a time through the NodePort: round-trip
    /// microseconds, median and 99th percentile.
    round_trip_us: (f64, f64),
}

fn service() -> Service {
    let mut svc = Service::new(ObjectName::new("default", "perf"));
    svc.cluster_ips = vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 52))];
    svc.ip_families = vec![IpFamily::V4];
    svc.service_type = ServiceType::NodePort;
    let mut sel = BTreeMap::new();
    sel.insert("app".to_string(), "perf".to_string());
    svc.selector = Some(LabelSelector::from_labels(sel));
    for (name, protocol) in [("tcp", Protocol::Tcp), ("udp", Protocol::Udp)] {
        svc.ports.push({
            let mut sp = ServicePort::new(name, protocol, 5201, TargetPort::Number(5201));
            sp.node_port = Some(NODE_PORT);
            sp
        });
    }
    svc
}

fn cluster(tb: &Testbed) -> Cluster {
    let mut c = Cluster::simulated();
    let n = tb.node(0);
    c.upsert_node({
        let mut node = Node::new(n.name.clone());
        node.addresses = vec![IpAddr::V4(n.ip)];
        node.pod_cidrs = n.pod_cidrs.clone();
        node
    });
    let mut pod = Pod::new(ObjectName::new("default", "srv"), IpAddr::V4(POD_IP));
    pod.labels.insert("app".into(), "perf".into());
    pod.node_name = Some(n.name.clone());
    c.upsert_pod(pod);
    c.upsert_service(service());
    c
}

/// CPU seconds used so far by this process's threads whose name starts with `prefix`
/// (user and system time together: the per-thread split that `/proc` gives is adjusted to
/// stay monotonic, so its differences over an interval can be far off).
fn thread_cpu(prefix: &str) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !comm.trim().starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        total += utime + stime;
    }
    total as f64 / ticks
}

/// Runs iperf3 in `client` and returns its JSON report.
fn iperf(tb: &Testbed, client: &str, args: &[&str]) -> serde_json::Value {
    let out = tb
        .command(client, "iperf3")
        .args(args)
        .output()
        .expect("run iperf3");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("iperf3 {args:?}: {e}\n{text}"))
}

/// 4,096 UDP frames from the client to the NodePort, 256 source ports, valid checksums.
fn udp_frames(tb: &Testbed) -> Vec<Vec<u8>> {
    let client_mac = tb.mac(tb.ns_of_client(0), "eth0").expect("client MAC");
    let node_mac = tb.mac(tb.ns_of_node(0), "eth0").expect("node MAC");
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (tb.client_ip(0), tb.node_ip(0)) else {
        panic!("IPv4 testbed");
    };
    (0..4096u16)
        .map(|i| {
            let b = etherparse::PacketBuilder::ethernet2(client_mac, node_mac)
                .ipv4(src.octets(), dst.octets(), 64)
                .udp(20000 + i % 256, NODE_PORT);
            let mut out = Vec::with_capacity(b.size(18));
            b.write(&mut out, &[0x5a; 18]).expect("frame");
            out
        })
        .collect()
}

fn num(v: &serde_json::Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, p| v.get(p))?.as_f64()
}

fn measure<D: Dataplane>(name: &str, make: impl Fn(&str) -> D, userspace: bool) -> Figures {
    let tb = Testbed::new(TestbedSpec::new(1, 1).pod(PodSpec::new("srv", 0, IpAddr::V4(POD_IP))))
        .expect("testbed");
    let n = tb.node(0);
    let cidr = "10.244.0.0/16".parse().into_iter().collect::<Vec<_>>();
    let ctx = NodeContext::new(n.name.clone(), vec![IpAddr::V4(n.ip)], cidr);
    let mut agent = NodeAgent::new(ctx, make(tb.ns_of_node(0)));
    agent
        .sync(&cluster(&tb))
        .unwrap_or_else(|e| panic!("{name}: sync: {e}"));
    let pod_ns = tb.ns_of_pod("srv").expect("pod ns").to_string();
    let mut server: Child = tb
        .command(&pod_ns, "iperf3")
        .args(["-s", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    let client = tb.ns_of_client(0).to_string();
    let target = tb.node_ip(0).to_string();
    let port = NODE_PORT.to_string();
    let secs = SECONDS.to_string();

    let cpu0 = thread_cpu("svcnat-dp");
    let t = iperf(
        &tb,
        &client,
        &["-c", &target, "-p", &port, "-t", &secs, "-J"],
    );
    let tcp_bps = num(&t, &["end", "sum_received", "bits_per_second"]).unwrap_or(0.0);
    let tcp_bytes = num(&t, &["end", "sum_received", "bytes"]).unwrap_or(0.0);
    let t4 = iperf(
        &tb,
        &client,
        &["-c", &target, "-p", &port, "-t", &secs, "-P", "4", "-J"],
    );
    let tcp4_bps = num(&t4, &["end", "sum_received", "bits_per_second"]).unwrap_or(0.0);
    let cpu1 = thread_cpu("svcnat-dp");
    let round_trip_us = round_trips(&pod_ns, &client, tb.node_ip(0));

    // Small packets: 64-byte frames (18-byte UDP payloads) written straight onto the
    // client's link by the injector, 256 flows, as fast as sendmmsg goes; what reaches the
    // pod's interface counts. The pod answers nothing: a socket bound to the port and never
    // read is its sink (the kernel drops at its full buffer). Without one, the pod's stack
    // would build an ICMP port unreachable per datagram (route lookups, then the rate
    // limit), about a quarter of the userspace worker's time, which is the pod's work and
    // not forwarding.
    let frames = udp_frames(&tb);
    let _sink = svcnat_examples::netns::run_in(&pod_ns, || {
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5201))
    })
    .expect("UDP sink in the pod");
    let inj = Injector::open(Some(&client), "eth0").expect("injector");
    let pod_rx0 = tb.rx_packets(&pod_ns, "eth0").expect("pod rx");
    let t0 = Instant::now();
    let mut sent = 0usize;
    while t0.elapsed() < Duration::from_secs(u64::from(SECONDS)) {
        sent += inj.send(&frames).expect("inject");
    }
    let wall = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let cpu2 = thread_cpu("svcnat-dp");
    let received = tb.rx_packets(&pod_ns, "eth0").expect("pod rx") - pod_rx0;
    let udp_pps = received as f64 / wall;
    let udp_packets = received as f64;
    let _ = sent;
    let _ = server.kill();
    let _ = server.wait();
    let _ = agent.cleanup();
    Figures {
        tcp_bps,
        udp_pps,
        tcp4_bps,
        worker_cpu: userspace.then_some((cpu1 - cpu0, cpu2 - cpu1)),
        // MSS-sized segments, for a packets-per-core-second figure of the TCP runs.
        tcp_packets: ((tcp_bytes + num(&t4, &["end", "sum_received", "bytes"]).unwrap_or(0.0))
            / 1448.0) as u64,
        udp_packets: udp_packets as u64,
        round_trip_us,
        retransmits: (
            num(&t, &["end", "sum_sent", "retransmits"]).unwrap_or(0.0),
            num(&t4, &["end", "sum_sent", "retransmits"]).unwrap_or(0.0),
        ),
    }
}

/// 2,000 UDP requests from the client to the NodePort, one at a time, each answered by an
/// echo socket in the pod: round-trip microseconds, median and 99th percentile. A light
/// load, where what a datapath adds to each packet's latency shows.
fn round_trips(pod_ns: &str, client_ns: &str, node: IpAddr) -> (f64, f64) {
    use std::net::UdpSocket;
    use std::sync::atomic::{AtomicBool, Ordering};
    let echo =
        svcnat_examples::netns::run_in(pod_ns, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5201)))
            .expect("echo socket in the pod");
    let client =
        svcnat_examples::netns::run_in(client_ns, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
            .expect("client socket");
    echo.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    client.connect((node, NODE_PORT)).expect("connect");
    let stop = AtomicBool::new(false);
    let mut rtts = Vec::with_capacity(2000);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = echo.recv_from(&mut buf) {
                    let _ = echo.send_to(&buf[..n], from);
                }
            }
        });
        let mut buf = [0u8; 64];
        for i in 0..2100u32 {
            let t0 = Instant::now();
            client.send(&i.to_be_bytes()).expect("send");
            // A lost or late answer is skipped (and counted out of the percentiles).
            while let Ok(n) = client.recv(&mut buf) {
                if n == 4 && buf[..4] == i.to_be_bytes() {
                    if i >= 100 {
                        rtts.push(t0.elapsed().as_secs_f64() * 1e6);
                    }
                    break;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    if rtts.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    rtts.sort_by(f64::total_cmp);
    (rtts[rtts.len() / 2], rtts[rtts.len() * 99 / 100])
}

/// CPU time of the calling thread so far, in nanoseconds (`/proc/thread-self/schedstat`,
/// the scheduler's own count, not sampled).
fn own_cpu_ns() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// CPU nanoseconds of the sending thread per 64-byte frame, the transmit path alone.
struct Transmit {
    /// `sendmmsg`, the pod's receive included.
    mmsg: f64,
    /// The transmit ring, the pod's receive included.
    ring: f64,
    /// The transmit ring, frames addressed to another MAC: the pod's link layer drops
    /// them, so this is the transmit without the pod's stack.
    ring_bare: f64,
    /// An `AF_XDP` socket in copy mode (veth has no zero-copy), the pod's receive included.
    xdp: f64,
}

/// The transmit path alone, as a worker uses it: 64-byte frames written from the node's
/// namespace straight onto the pod's veth, to a UDP socket in the pod that reads nothing,
/// with `sendmmsg` and with the transmit ring; CPU nanoseconds of the sending thread per
/// frame (its system call, the veth and the pod's receive, which the kernel runs in the
/// sender's context). Then the ring again with frames for a MAC the pod does not have,
/// which its link layer drops: the difference is what the pod's receive costs the sender.
/// Three alternating rounds each; the median.
fn transmit_cost() -> Transmit {
    let tb = Testbed::new(TestbedSpec::new(1, 1).pod(PodSpec::new("srv", 0, IpAddr::V4(POD_IP))))
        .expect("testbed");
    let node = tb.ns_of_node(0).to_string();
    let pod_ns = tb.ns_of_pod("srv").expect("pod ns").to_string();
    let _sink = svcnat_examples::netns::run_in(&pod_ns, || {
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5201))
    })
    .expect("UDP sink in the pod");
    let pod_mac = tb.mac(&pod_ns, "eth0").expect("pod MAC");
    let vp_mac = tb.mac(&node, "vp0").expect("veth MAC");
    let build = |dst_mac: [u8; 6]| -> Vec<Vec<u8>> {
        (0..256u16)
            .map(|i| {
                let b = etherparse::PacketBuilder::ethernet2(vp_mac, dst_mac)
                    .ipv4([192, 168, 50, 1], POD_IP.octets(), 64)
                    .udp(20000 + i, 5201);
                let mut out = Vec::with_capacity(b.size(18));
                b.write(&mut out, &[0x5a; 18]).expect("frame");
                out
            })
            .collect()
    };
    let frames = build(pod_mac);
    // Locally administered, unicast, and not the pod's.
    let elsewhere = build([0x02, 0x5c, 0x00, 0x00, 0x00, 0x01]);
    let plain = Injector::open(Some(&node), "vp0").expect("injector");
    let ring = Injector::open_ring(Some(&node), "vp0").expect("ring injector");
    let xdp = Injector::open_xdp(Some(&node), "vp0").expect("AF_XDP injector");
    let per_frame = |inj: &Injector, frames: &[Vec<u8>]| {
        let c0 = own_cpu_ns();
        let mut sent = 0;
        while sent < 1_000_000 {
            sent += inj.send(frames).expect("send");
        }
        (own_cpu_ns() - c0) / sent as f64
    };
    let (mut a, mut b, mut c, mut d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        a.push(per_frame(&plain, &frames));
        b.push(per_frame(&ring, &frames));
        c.push(per_frame(&ring, &elsewhere));
        d.push(per_frame(&xdp, &frames));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[1]
    };
    Transmit {
        mmsg: median(a),
        ring: median(b),
        ring_bare: median(c),
        xdp: median(d),
    }
}

fn main() {
    if let Err(why) = require_root() {
        println!("SKIP: {why}");
        return;
    }
    if Command::new("iperf3").arg("--version").output().is_err() {
        println!("SKIP: iperf3 is not installed");
        return;
    }
    let started = Instant::now();
    let kernel = measure(
        "iptables",
        |ns: &str| {
            Iptables::new(IptablesConfig {
                runner: Runner::netns(ns),
                flavour: Some(Flavour::Nft),
                ..IptablesConfig::default()
            })
            .expect("iptables")
        },
        false,
    );
    let userspace = |workers: usize, tx_ring: bool, busy_poll: Duration| {
        measure(
            "userspace",
            move |ns: &str| {
                Userspace::start(UserspaceConfig {
                    netns: Some(ns.to_string()),
                    interfaces: vec!["eth0".into(), "vp*".into()],
                    workers,
                    tx_ring,
                    busy_poll,
                    ..UserspaceConfig::default()
                })
                .expect("userspace datapath")
            },
            true,
        )
    };
    let users = [
        ("x1", userspace(1, true, Duration::ZERO)),
        ("x1 sendmmsg", userspace(1, false, Duration::ZERO)),
        ("x2", userspace(2, true, Duration::ZERO)),
        (
            "x1 spin 50us",
            userspace(1, true, Duration::from_micros(50)),
        ),
    ];
    println!(
        "datapath benchmark: NodePort -> one pod, masqueraded, {SECONDS} s per run, same topology"
    );
    println!(
        "(userspace: transmit ring unless marked sendmmsg; x1/x2: workers; spin: busy polling before sleeping)"
    );
    for (workers, user) in &users {
        println!();
        println!(
            "{:<30} {:>17} {:>14} {:>8}",
            "",
            "iptables (kernel)",
            format!("userspace {workers}"),
            "ratio"
        );
        let row = |what: &str, k: f64, u: f64, scale: f64, prec: usize| {
            println!(
                "{what:<30} {:>17.prec$} {:>14.prec$} {:>7.2}x",
                k / scale,
                u / scale,
                u / k.max(1.0)
            );
        };
        row(
            "TCP, 1 stream, Gbit/s",
            kernel.tcp_bps,
            user.tcp_bps,
            1e9,
            2,
        );
        row(
            "TCP, 4 streams, Gbit/s",
            kernel.tcp4_bps,
            user.tcp4_bps,
            1e9,
            2,
        );
        row(
            "64-byte frames forwarded/s",
            kernel.udp_pps,
            user.udp_pps,
            1.0,
            0,
        );
        println!(
            "{:<30} {:>17} {:>14}",
            "UDP round trip p50 / p99, us",
            format!(
                "{:.0} / {:.0}",
                kernel.round_trip_us.0, kernel.round_trip_us.1
            ),
            format!("{:.0} / {:.0}", user.round_trip_us.0, user.round_trip_us.1),
        );
        println!(
            "{:<30} {:>17} {:>14}",
            "TCP retransmits, 1 / 4 streams",
            format!("{:.0} / {:.0}", kernel.retransmits.0, kernel.retransmits.1),
            format!("{:.0} / {:.0}", user.retransmits.0, user.retransmits.1),
        );
        if let Some((tcp_cpu, udp_cpu)) = user.worker_cpu {
            let per_core = |packets: u64, cpu: f64| packets as f64 / cpu.max(0.001);
            println!(
                "userspace {workers} worker CPU: TCP runs {tcp_cpu:.2} s for ~{} segments ({:.0} pkt per worker core-second, GSO frames count as many)",
                user.tcp_packets,
                per_core(user.tcp_packets, tcp_cpu)
            );
            println!(
                "userspace {workers} worker CPU: small-packet run {udp_cpu:.2} s for {} frames = {:.2} Mpps per worker core (target >= 1)",
                user.udp_packets,
                per_core(user.udp_packets, udp_cpu) / 1e6
            );
        }
    }
    let tx = transmit_cost();
    let pod_rx = (tx.ring - tx.ring_bare).max(0.0);
    println!();
    println!(
        "transmit path, 64-byte frame into a veth (pod's receive included): sendmmsg {:.0} ns, ring {:.0} ns of sender CPU = {:.2}x",
        tx.mmsg,
        tx.ring,
        tx.ring / tx.mmsg.max(1.0)
    );
    println!(
        "  AF_XDP in copy mode (veth has no zero-copy): {:.0} ns = {:.2}x the ring",
        tx.xdp,
        tx.xdp / tx.ring.max(1.0)
    );
    println!(
        "  of which the pod's receive, run inline by the veth: {pod_rx:.0} ns (ring to a MAC the pod drops: {:.0} ns)",
        tx.ring_bare
    );
    println!(
        "  ceiling for any datapath that transmits into the pod's veth through the kernel: {:.2} M frames per core-second",
        1e3 / tx.ring.max(1.0)
    );
    for (workers, user) in &users {
        let Some((_, udp)) = user.worker_cpu else {
            continue;
        };
        let ns = udp * 1e9 / (user.udp_packets.max(1) as f64);
        println!(
            "userspace {workers}: {ns:.0} ns of worker CPU per frame; less the pod's receive, {:.0} ns = {:.2} M frames per core-second",
            ns - pod_rx,
            1e3 / (ns - pod_rx).max(1.0)
        );
    }
    let (one, two) = (&users[0].1, &users[2].1);
    println!();
    println!(
        "scaling, 2 workers / 1 worker: TCP 4 streams {:.2}x, 64-byte frames {:.2}x (two cores shared with the generator and the receiver)",
        two.tcp4_bps / one.tcp4_bps.max(1.0),
        two.udp_pps / one.udp_pps.max(1.0)
    );
    println!("(took {:.1} s)", started.elapsed().as_secs_f64());
}
