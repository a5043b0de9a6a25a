//! Engine fixture tables: frame in, verdict, frame out (the in-place rewrite) and frames
//! generated, compared byte for byte with frames built independently by etherparse, whose
//! checksums are then verified again by re-parsing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use etherparse::{Icmpv4Type, icmpv4};
use svcnat_userspace::engine::testing::*;
use svcnat_userspace::engine::*;

/// One input frame.
#[derive(Clone)]
struct In {
    at: u64,
    port: PortId,
    csum: Csum,
    frame: Vec<u8>,
}

fn on(port: PortId, frame: Vec<u8>) -> In {
    In {
        at: 1,
        port,
        csum: Csum::Complete,
        frame,
    }
}

/// A fixture case.
struct Case {
    name: &'static str,
    /// Engine configuration tweak; neighbours resolved unless `arp` is set.
    unresolved: bool,
    /// Frames fed first (their verdicts must not be drops).
    setup: Vec<In>,
    input: In,
    verdict: Verdict,
    /// The frame after the in-place rewrite (for `Forward`).
    out: Option<Vec<u8>>,
    /// Frames generated.
    tx: Vec<(PortId, Vec<u8>)>,
}

fn config() -> EngineConfig {
    // One shard and one masquerade port make the allocated port deterministic.
    EngineConfig {
        shards: 1,
        snat_ports: 61000..=61000,
        ..EngineConfig::default()
    }
}

fn cases() -> Vec<Case> {
    let pod1_syn = tcp(
        POD1_MAC,
        POD1_PORT_MAC,
        POD1,
        LB_CIP,
        64,
        40000,
        443,
        F::Syn,
    );
    let pod1_syn_dnat = tcp(POD2_PORT_MAC, POD2_MAC, POD1, POD2, 63, 40000, 8443, F::Syn);
    let np_syn = tcp(
        ROUTER_MAC,
        UPLINK_MAC,
        CLIENT,
        NODE,
        64,
        5555,
        30443,
        F::Syn,
    );
    let np_syn_out = tcp(POD2_PORT_MAC, POD2_MAC, NODE, POD2, 63, 61000, 8443, F::Syn);
    let np_reply = tcp(
        POD2_MAC,
        POD2_PORT_MAC,
        POD2,
        NODE,
        64,
        8443,
        61000,
        F::SynAck,
    );
    let dns_q = udp(POD2_MAC, POD2_PORT_MAC, POD2, [10, 96, 0, 53], 64, 5353, 53);
    let dns_q_out = udp(POD1_PORT_MAC, POD1_MAC, POD2, POD1, 63, 5353, 53);
    let empty_syn = tcp(
        POD1_MAC,
        POD1_PORT_MAC,
        POD1,
        [10, 96, 0, 99],
        64,
        40000,
        80,
        F::Syn,
    );
    let transit = tcp(ROUTER_MAC, UPLINK_MAC, CLIENT, POD1, 64, 5555, 8080, F::Syn);
    let transit_ttl1 = tcp(ROUTER_MAC, UPLINK_MAC, CLIENT, POD1, 1, 5555, 8080, F::Syn);
    let mut bad_ip = pod1_syn.clone();
    bad_ip[24] ^= 0x55;
    let mut bad_tcp = pod1_syn.clone();
    let n = bad_tcp.len();
    bad_tcp[n - 3] ^= 0x01; // urgent pointer/window bytes: checksum now wrong
    let te = |ty| Icmpv4Type::TimeExceeded(ty);
    vec![
        Case {
            name: "ClusterIP DNAT (pod to Service, no masquerade)",
            unresolved: false,
            setup: vec![],
            input: on(POD1_PORT, pod1_syn.clone()),
            verdict: Verdict::Forward { port: POD2_PORT },
            out: Some(pod1_syn_dnat.clone()),
            tx: vec![],
        },
        Case {
            name: "ClusterIP reply reverse NAT",
            unresolved: false,
            setup: vec![on(POD1_PORT, pod1_syn.clone())],
            input: on(
                POD2_PORT,
                tcp(
                    POD2_MAC,
                    POD2_PORT_MAC,
                    POD2,
                    POD1,
                    64,
                    8443,
                    40000,
                    F::SynAck,
                ),
            ),
            verdict: Verdict::Forward { port: POD1_PORT },
            out: Some(tcp(
                POD1_PORT_MAC,
                POD1_MAC,
                LB_CIP,
                POD1,
                63,
                443,
                40000,
                F::SynAck,
            )),
            tx: vec![],
        },
        Case {
            name: "NodePort DNAT + SNAT (external client, masquerade to the node IP)",
            unresolved: false,
            setup: vec![],
            input: on(UPLINK, np_syn.clone()),
            verdict: Verdict::Forward { port: POD2_PORT },
            out: Some(np_syn_out.clone()),
            tx: vec![],
        },
        Case {
            name: "NodePort reply: reverse SNAT + DNAT, routed to the client via the router",
            unresolved: false,
            setup: vec![on(UPLINK, np_syn.clone())],
            input: on(POD2_PORT, np_reply.clone()),
            verdict: Verdict::Forward { port: UPLINK },
            out: Some(tcp(
                UPLINK_MAC,
                ROUTER_MAC,
                NODE,
                CLIENT,
                63,
                30443,
                5555,
                F::SynAck,
            )),
            tx: vec![],
        },
        Case {
            name: "hairpin: a pod reaching itself through its Service is masqueraded",
            unresolved: false,
            setup: vec![],
            input: on(
                POD2_PORT,
                tcp(
                    POD2_MAC,
                    POD2_PORT_MAC,
                    POD2,
                    LB_CIP,
                    64,
                    40001,
                    443,
                    F::Syn,
                ),
            ),
            verdict: Verdict::Forward { port: POD2_PORT },
            out: Some(tcp(
                POD2_PORT_MAC,
                POD2_MAC,
                NODE,
                POD2,
                63,
                61000,
                8443,
                F::Syn,
            )),
            tx: vec![],
        },
        Case {
            name: "LoadBalancer source range: allowed client",
            unresolved: false,
            setup: vec![],
            input: on(
                UPLINK,
                tcp(
                    ROUTER_MAC,
                    UPLINK_MAC,
                    CLIENT,
                    [198, 51, 100, 7],
                    64,
                    5555,
                    443,
                    F::Syn,
                ),
            ),
            verdict: Verdict::Forward { port: POD2_PORT },
            out: Some(np_syn_out.clone()),
            tx: vec![],
        },
        Case {
            name: "LoadBalancer source range: other client dropped",
            unresolved: false,
            setup: vec![],
            input: on(
                UPLINK,
                tcp(
                    ROUTER_MAC,
                    UPLINK_MAC,
                    [198, 18, 0, 1],
                    [198, 51, 100, 7],
                    64,
                    5555,
                    443,
                    F::Syn,
                ),
            ),
            verdict: Verdict::Drop(DropReason::SourceRange),
            out: None,
            tx: vec![],
        },
        Case {
            name: "REJECT: no endpoints, ICMP port unreachable from the ClusterIP",
            unresolved: false,
            setup: vec![],
            input: on(POD1_PORT, empty_syn.clone()),
            verdict: Verdict::Drop(DropReason::Rejected),
            out: None,
            tx: vec![(
                POD1_PORT,
                icmp4(
                    POD1_PORT_MAC,
                    POD1_MAC,
                    [10, 96, 0, 99],
                    POD1,
                    64,
                    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
                    ip_of(&empty_syn),
                ),
            )],
        },
        Case {
            name: "externalTrafficPolicy Local, no local endpoint: external client dropped",
            unresolved: false,
            setup: vec![],
            input: on(
                UPLINK,
                tcp(
                    ROUTER_MAC,
                    UPLINK_MAC,
                    CLIENT,
                    NODE,
                    64,
                    5555,
                    30090,
                    F::Syn,
                ),
            ),
            verdict: Verdict::Drop(DropReason::NoEndpoints),
            out: None,
            tx: vec![],
        },
        Case {
            name: "externalTrafficPolicy Local: a pod takes the cluster-wide shortcut",
            unresolved: false,
            setup: vec![],
            input: on(
                POD1_PORT,
                tcp(
                    POD1_MAC,
                    POD1_PORT_MAC,
                    POD1,
                    NODE,
                    64,
                    40000,
                    30090,
                    F::Syn,
                ),
            ),
            verdict: Verdict::Forward { port: UPLINK },
            out: Some(tcp(
                UPLINK_MAC,
                NODE_B_MAC,
                POD1,
                [10, 244, 1, 8],
                63,
                40000,
                8080,
                F::Syn,
            )),
            tx: vec![],
        },
        Case {
            name: "UDP ClusterIP DNAT",
            unresolved: false,
            setup: vec![],
            input: on(POD2_PORT, dns_q.clone()),
            verdict: Verdict::Forward { port: POD1_PORT },
            out: Some(dns_q_out.clone()),
            tx: vec![],
        },
        Case {
            name: "ICMP port unreachable from the endpoint translated back to the client (UDP)",
            unresolved: false,
            setup: vec![on(POD2_PORT, dns_q.clone())],
            input: on(
                POD1_PORT,
                icmp4(
                    POD1_MAC,
                    POD1_PORT_MAC,
                    POD1,
                    POD2,
                    64,
                    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
                    ip_of(&udp(POD2_MAC, POD2_PORT_MAC, POD2, POD1, 63, 5353, 53)),
                ),
            ),
            verdict: Verdict::Forward { port: POD2_PORT },
            out: Some(icmp4(
                POD2_PORT_MAC,
                POD2_MAC,
                [10, 96, 0, 53],
                POD2,
                63,
                Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
                ip_of(&udp(
                    POD2_MAC,
                    POD2_PORT_MAC,
                    POD2,
                    [10, 96, 0, 53],
                    63,
                    5353,
                    53,
                )),
            )),
            tx: vec![],
        },
        Case {
            name: "ICMP error about a masqueraded NodePort flow translated back (outer and inner SNAT+DNAT)",
            unresolved: false,
            setup: vec![on(UPLINK, np_syn.clone())],
            input: on(
                POD2_PORT,
                icmp4(
                    POD2_MAC,
                    POD2_PORT_MAC,
                    POD2,
                    NODE,
                    64,
                    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
                    ip_of(&np_syn_out),
                ),
            ),
            verdict: Verdict::Forward { port: UPLINK },
            out: Some(icmp4(
                UPLINK_MAC,
                ROUTER_MAC,
                NODE,
                CLIENT,
                63,
                Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
                ip_of(&tcp(
                    POD2_PORT_MAC,
                    POD2_MAC,
                    CLIENT,
                    NODE,
                    63,
                    5555,
                    30443,
                    F::Syn,
                )),
            )),
            tx: vec![],
        },
        Case {
            name: "ARP request for the pods' gateway answered by proxy ARP",
            unresolved: false,
            setup: vec![],
            input: on(
                POD1_PORT,
                arp(1, POD1_MAC, BCAST, POD1_MAC, POD1, [0; 6], [169, 254, 1, 1]),
            ),
            verdict: Verdict::Consumed,
            out: None,
            tx: vec![(
                POD1_PORT,
                arp(
                    2,
                    POD1_PORT_MAC,
                    POD1_MAC,
                    POD1_PORT_MAC,
                    [169, 254, 1, 1],
                    POD1_MAC,
                    POD1,
                ),
            )],
        },
        Case {
            name: "ARP request for the kernel's own address is left to the kernel",
            unresolved: false,
            setup: vec![],
            input: on(
                UPLINK,
                arp(
                    1,
                    ROUTER_MAC,
                    BCAST,
                    ROUTER_MAC,
                    [192, 168, 1, 1],
                    [0; 6],
                    NODE,
                ),
            ),
            verdict: Verdict::Kernel,
            out: None,
            tx: vec![],
        },
        Case {
            name: "unresolved next hop: packet queued, ARP request sent from the node IP",
            unresolved: true,
            setup: vec![],
            input: on(POD1_PORT, pod1_syn.clone()),
            verdict: Verdict::Consumed,
            out: None,
            tx: vec![(
                POD2_PORT,
                arp(1, POD2_PORT_MAC, BCAST, POD2_PORT_MAC, NODE, [0; 6], POD2),
            )],
        },
        Case {
            name: "ARP reply learned: the queued packet is released",
            unresolved: true,
            setup: vec![on(POD1_PORT, pod1_syn.clone())],
            input: on(
                POD2_PORT,
                arp(
                    2,
                    POD2_MAC,
                    POD2_PORT_MAC,
                    POD2_MAC,
                    POD2,
                    POD2_PORT_MAC,
                    NODE,
                ),
            ),
            verdict: Verdict::Consumed,
            out: None,
            tx: vec![(POD2_PORT, pod1_syn_dnat.clone())],
        },
        Case {
            name: "plain routing between owned ports (TTL decremented)",
            unresolved: false,
            setup: vec![],
            input: on(UPLINK, transit.clone()),
            verdict: Verdict::Forward { port: POD1_PORT },
            out: Some(tcp(
                POD1_PORT_MAC,
                POD1_MAC,
                CLIENT,
                POD1,
                63,
                5555,
                8080,
                F::Syn,
            )),
            tx: vec![],
        },
        Case {
            name: "TTL expiry: ICMP time exceeded from the ingress address",
            unresolved: false,
            setup: vec![],
            input: on(UPLINK, transit_ttl1.clone()),
            verdict: Verdict::Drop(DropReason::TtlExceeded),
            out: None,
            tx: vec![(
                UPLINK,
                icmp4(
                    UPLINK_MAC,
                    ROUTER_MAC,
                    NODE,
                    CLIENT,
                    64,
                    te(icmpv4::TimeExceededCode::TtlExceededInTransit),
                    ip_of(&transit_ttl1),
                ),
            )],
        },
        Case {
            name: "TTL expiry on a frontend: time exceeded, no connection",
            unresolved: false,
            setup: vec![],
            input: on(
                UPLINK,
                tcp(ROUTER_MAC, UPLINK_MAC, CLIENT, NODE, 1, 5555, 30443, F::Syn),
            ),
            verdict: Verdict::Drop(DropReason::TtlExceeded),
            out: None,
            tx: vec![(
                UPLINK,
                icmp4(
                    UPLINK_MAC,
                    ROUTER_MAC,
                    NODE,
                    CLIENT,
                    64,
                    te(icmpv4::TimeExceededCode::TtlExceededInTransit),
                    ip_of(&tcp(
                        ROUTER_MAC,
                        UPLINK_MAC,
                        CLIENT,
                        NODE,
                        1,
                        5555,
                        30443,
                        F::Syn,
                    )),
                ),
            )],
        },
        Case {
            name: "first fragment to a frontend held for reassembly",
            unresolved: false,
            setup: vec![],
            input: on(POD1_PORT, fragment(pod1_syn.clone(), true, 0)),
            verdict: Verdict::Consumed,
            out: None,
            tx: vec![],
        },
        Case {
            name: "later fragment to a frontend address held for reassembly",
            unresolved: false,
            setup: vec![],
            input: on(POD1_PORT, fragment(pod1_syn.clone(), false, 100)),
            verdict: Verdict::Consumed,
            out: None,
            tx: vec![],
        },
        Case {
            name: "fragment of a translated connection held for reassembly",
            unresolved: false,
            setup: vec![on(POD1_PORT, pod1_syn.clone())],
            input: on(
                POD2_PORT,
                fragment(
                    tcp(POD2_MAC, POD2_PORT_MAC, POD2, POD1, 64, 8443, 40000, F::Ack),
                    true,
                    0,
                ),
            ),
            verdict: Verdict::Consumed,
            out: None,
            tx: vec![],
        },
        Case {
            // Conntrack defragments whatever it forwards: transit fragments too.
            name: "transit fragment held for reassembly",
            unresolved: false,
            setup: vec![],
            input: on(UPLINK, fragment(transit.clone(), true, 0)),
            verdict: Verdict::Consumed,
            out: None,
            tx: vec![],
        },
        Case {
            name: "bad IPv4 header checksum dropped",
            unresolved: false,
            setup: vec![],
            input: on(POD1_PORT, bad_ip),
            verdict: Verdict::Drop(DropReason::BadIpChecksum),
            out: None,
            tx: vec![],
        },
        Case {
            name: "bad TCP checksum on a connection-creating SYN dropped",
            unresolved: false,
            setup: vec![],
            input: on(POD1_PORT, bad_tcp),
            verdict: Verdict::Drop(DropReason::BadL4Checksum),
            out: None,
            tx: vec![],
        },
        Case {
            name: "RST without a connection is INVALID",
            unresolved: false,
            setup: vec![],
            input: on(
                POD1_PORT,
                tcp(
                    POD1_MAC,
                    POD1_PORT_MAC,
                    POD1,
                    LB_CIP,
                    64,
                    40000,
                    443,
                    F::Rst,
                ),
            ),
            verdict: Verdict::Drop(DropReason::Invalid),
            out: None,
            tx: vec![],
        },
        Case {
            name: "not addressed to our MAC: kernel",
            unresolved: false,
            setup: vec![],
            input: on(
                POD1_PORT,
                tcp(
                    POD1_MAC,
                    [2, 9, 9, 9, 9, 9],
                    POD1,
                    LB_CIP,
                    64,
                    40000,
                    443,
                    F::Syn,
                ),
            ),
            verdict: Verdict::Kernel,
            out: None,
            tx: vec![],
        },
        Case {
            name: "to the node's own address, no frontend: kernel",
            unresolved: false,
            setup: vec![],
            input: on(
                UPLINK,
                tcp(ROUTER_MAC, UPLINK_MAC, CLIENT, NODE, 64, 5555, 22, F::Syn),
            ),
            verdict: Verdict::Kernel,
            out: None,
            tx: vec![],
        },
        Case {
            name: "TCP loose pickup: a mid-stream ACK to a frontend opens a connection",
            unresolved: false,
            setup: vec![],
            input: on(
                POD1_PORT,
                tcp(
                    POD1_MAC,
                    POD1_PORT_MAC,
                    POD1,
                    LB_CIP,
                    64,
                    40000,
                    443,
                    F::Ack,
                ),
            ),
            verdict: Verdict::Forward { port: POD2_PORT },
            out: Some(tcp(
                POD2_PORT_MAC,
                POD2_MAC,
                POD1,
                POD2,
                63,
                40000,
                8443,
                F::Ack,
            )),
            tx: vec![],
        },
    ]
}

#[test]
fn fixture_table() {
    let mut failures = Vec::new();
    let all = cases();
    for case in &all {
        let engine = engine_with(config(), !case.unresolved);
        let mut tx = Vec::new();
        for s in &case.setup {
            let mut f = s.frame.clone();
            let v = engine.handle_frame(
                Duration::from_secs(s.at),
                RxMeta {
                    port: s.port,
                    csum: s.csum,
                },
                &mut f,
                &mut tx,
            );
            assert!(
                !matches!(v, Verdict::Drop(_)),
                "{}: setup frame dropped: {v:?}",
                case.name
            );
        }
        tx.clear();
        let mut frame = case.input.frame.clone();
        let v = engine.handle_frame(
            Duration::from_secs(case.input.at),
            RxMeta {
                port: case.input.port,
                csum: case.input.csum,
            },
            &mut frame,
            &mut tx,
        );
        let mut bad = Vec::new();
        if v != case.verdict {
            bad.push(format!("verdict {v:?}, want {:?}", case.verdict));
        }
        if let Some(want) = &case.out {
            if &frame != want {
                bad.push(format!(
                    "frame out\n  got  {}\n  want {}",
                    hex(&frame),
                    hex(want)
                ));
            }
            verify_checksums(&frame);
        }
        let got: Vec<(PortId, Vec<u8>)> = tx.iter().map(|t| (t.port, t.data.clone())).collect();
        if got != case.tx {
            bad.push(format!(
                "tx\n  got  {:?}\n  want {:?}",
                got.iter().map(|(p, d)| (p, hex(d))).collect::<Vec<_>>(),
                case.tx.iter().map(|(p, d)| (p, hex(d))).collect::<Vec<_>>()
            ));
        }
        for (_, d) in &got {
            verify_checksums(d);
        }
        if !bad.is_empty() {
            failures.push(format!("{}:\n  {}", case.name, bad.join("\n  ")));
        }
    }
    println!("{} fixture cases, {} failed", all.len(), failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
