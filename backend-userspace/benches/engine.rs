//! Engine speed and memory, as ratios against references measured in the same run.
//!
//! - ns per frame for an established-connection forward, a new connection, and a
//!   reverse-NAT reply, against (a) a plain copy of the frame into the working buffer (which
//!   every engine measurement also pays) and (b) that copy plus an etherparse
//!   `SlicedPacket::from_ethernet` parse of the frame; Mpps per core implied.
//! - heap bytes per connection at 1M IPv4 connections (counting global allocator), against
//!   the 128 MiB budget.
//!
//! Run: `cargo bench -p svcnat-userspace --bench engine`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(unsafe_code)] // the counting allocator only

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use etherparse::{PacketBuilder, SlicedPacket};
use svcnat_userspace::engine::testing::*;
use svcnat_userspace::engine::*;

struct Counting;

static HEAP: AtomicIsize = AtomicIsize::new(0);

// Safety: delegates to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HEAP.fetch_add(l.size() as isize, Ordering::Relaxed);
        // Safety: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HEAP.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // Safety: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        HEAP.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // Safety: same contract as the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn tcp(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sp: u16,
    dp: u16,
    syn: bool,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src, dst, 64)
        .tcp(sp, dp, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, &[0u8; 64]).unwrap();
    out
}

/// Median ns per iteration of `f` over a few rounds of `n` iterations.
fn measure(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut rounds = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        for i in 0..n {
            f(i);
        }
        rounds.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    rounds.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rounds[rounds.len() / 2]
}

fn main() {
    let now = Duration::from_secs(1);
    let mut tx = Vec::new();
    let e = engine_with(
        EngineConfig {
            max_connections: 4_000_000,
            ..EngineConfig::default()
        },
        true,
    );
    let meta = |port| RxMeta {
        port,
        csum: Csum::Complete,
    };

    // An established pod -> ClusterIP connection and a NodePort (SNAT) connection.
    let pod1 = [10, 244, 0, 5];
    let pod2 = [10, 244, 0, 6];
    let cip = [10, 96, 0, 40];
    let node = [192, 168, 1, 10];
    let client = [203, 0, 113, 9];
    let mut f = tcp(POD1_MAC, POD1_PORT_MAC, pod1, cip, 40000, 443, true);
    assert!(matches!(
        e.handle_frame(now, meta(POD1_PORT), &mut f, &mut tx),
        Verdict::Forward { .. }
    ));
    let data = tcp(POD1_MAC, POD1_PORT_MAC, pod1, cip, 40000, 443, false);
    let mut np = tcp(ROUTER_MAC, UPLINK_MAC, client, node, 5555, 30443, true);
    assert!(matches!(
        e.handle_frame(now, meta(UPLINK), &mut np, &mut tx),
        Verdict::Forward { .. }
    ));
    let snat_port = u16::from_be_bytes([np[34], np[35]]);
    let reply = tcp(POD2_MAC, POD2_PORT_MAC, pod2, node, 8443, snat_port, false);

    let n = 200_000;
    let mut buf = vec![0u8; data.len()];
    let copy = measure(n, |_| {
        buf.copy_from_slice(black_box(&data));
        black_box(&buf);
    });
    let parse = measure(n, |_| {
        buf.copy_from_slice(black_box(&data));
        black_box(SlicedPacket::from_ethernet(&buf).is_ok());
    });
    let established = measure(n, |_| {
        buf.copy_from_slice(black_box(&data));
        let v = e.handle_frame(now, meta(POD1_PORT), &mut buf, &mut tx);
        debug_assert!(matches!(v, Verdict::Forward { .. }));
        let _ = black_box(v);
    });
    let reverse = measure(n, |_| {
        buf.copy_from_slice(black_box(&reply));
        let v = e.handle_frame(now, meta(POD2_PORT), &mut buf, &mut tx);
        let _ = black_box(v);
    });
    // New connections: distinct clients (pods) to the ClusterIP; each round uses fresh
    // 5-tuples so every frame creates an entry.
    let syns: Vec<Vec<u8>> = (0..n as u32)
        .map(|i| {
            tcp(
                POD1_MAC,
                POD1_PORT_MAC,
                [10, 244, (i >> 16) as u8 | 0x80, (i >> 8) as u8],
                cip,
                (i & 0xff) as u16 + 1024,
                443,
                true,
            )
        })
        .collect();
    let mut round = 0u64;
    let new_conn = measure(n, |i| {
        if i == 0 {
            round += 1;
        }
        let s = &syns[i];
        buf.copy_from_slice(s);
        // A fresh 5-tuple per round: set the source port's high byte, fix the checksum
        // (RFC 1624) so the engine accepts the SYN.
        let old = u16::from_be_bytes([buf[34], buf[35]]);
        buf[34] = round as u8;
        let new = u16::from_be_bytes([buf[34], buf[35]]);
        let c = u16::from_be_bytes([buf[50], buf[51]]);
        let mut sum = u32::from(!c) + u32::from(!old) + u32::from(new);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        buf[50..52].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let v = e.handle_frame(
            now + Duration::from_millis(round),
            meta(POD1_PORT),
            &mut buf,
            &mut tx,
        );
        let _ = black_box(v);
    });
    let c = e.counters();
    assert!(
        c.connections_created >= 7 * n as u64,
        "created {}",
        c.connections_created
    );

    println!("engine bench ({}-byte frames, one core)", data.len());
    println!("  reference copy            {copy:8.1} ns/frame");
    println!("  reference copy + parse    {parse:8.1} ns/frame (etherparse SlicedPacket)");
    for (name, ns) in [
        ("established forward", established),
        ("reverse-NAT reply", reverse),
        ("new connection", new_conn),
    ] {
        println!(
            "  {name:<25} {ns:8.1} ns/frame = {:5.2}x copy+parse, {:5.2} Mpps/core",
            ns / parse,
            1000.0 / ns
        );
    }

    // Memory: 1M IPv4 connections.
    drop(e);
    drop(syns);
    tx.clear();
    tx.shrink_to_fit();
    let target = 1_000_000u32;
    let before = HEAP.load(Ordering::Relaxed);
    let e = engine_with(
        EngineConfig {
            max_connections: 1_100_000,
            ..EngineConfig::default()
        },
        true,
    );
    for i in 0..target {
        // Clients in 10.244.128.0/17, 256 ports each: 1M distinct tuples.
        let ip = [10, 244, 0x80 | (i >> 16) as u8 & 0x7f, (i >> 8) as u8];
        let port = (i & 0xff) as u16 + 1024;
        let mut buf = tcp(POD1_MAC, POD1_PORT_MAC, ip, cip, port, 443, true);
        let v = e.handle_frame(now, meta(POD1_PORT), &mut buf, &mut tx);
        assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
        tx.clear();
    }
    let c = e.counters();
    let after = HEAP.load(Ordering::Relaxed);
    let used = (after - before) as f64;
    println!(
        "  memory: {} connections, {:.1} MiB heap ({:.0} bytes/connection; conntrack alone {:.1} MiB), budget 128 MiB: {}",
        c.connections,
        used / 1048576.0,
        used / c.connections as f64,
        e.conntrack_heap_bytes() as f64 / 1048576.0,
        if used < 128.0 * 1048576.0 {
            "ok"
        } else {
            "OVER"
        }
    );
    assert_eq!(c.connections, u64::from(target));
    assert!(used < 128.0 * 1048576.0);
}
