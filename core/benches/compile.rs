//! Plan compiler benchmark: 10,000 Services x 10 endpoints.
//!
//! Prints the full compile time, the cost of a one-endpoint change (incremental update,
//! which returns its diff) and of a whole-plan diff, each as a ratio of the full compile
//! measured in the same run, and the Maglev table build time for 1,000 backends.
//! Run with `cargo bench -p svcnat-core --bench compile`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use svcnat_core::model::*;
use svcnat_core::plan::{NodeContext, Plan};
use svcnat_core::select::{DEFAULT_MAGLEV_SIZE, Maglev, MaglevBackend};
use svcnat_core::synthetic;

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn cluster() -> Cluster {
    synthetic::cluster(&synthetic::Shape::new(SERVICES, ENDPOINTS))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                black_box(f());
                t.elapsed()
            })
            .collect(),
    )
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent; keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let runs = if quick { 1 } else { 15 };
    let t = Instant::now();
    let mut c = cluster();
    let build = t.elapsed();
    let node = NodeContext::new(
        "node-1",
        vec![IpAddr::from([192, 168, 50, 11])],
        vec!["10.244.0.0/16".parse().expect("cidr")],
    );
    let full = time(runs, || Plan::compile(&c, &node));
    let base = Plan::compile(&c, &node);
    println!(
        "cluster: {SERVICES} services x {ENDPOINTS} endpoints, {} frontends, {} endpoints in the plan (built in {:.1?})",
        base.frontends().count(),
        base.endpoint_count(),
        build
    );
    println!("full compile:                       {:>10.3?}", full);

    // One endpoint changes: a Pod stops being ready, then becomes ready again.
    let target = ObjectName::new("ns7", "svc-4567-3");
    let mut flip = false;
    let mut plan = base.clone();
    let incremental = time(runs.max(101), || {
        let mut p = c.pod(&target).cloned().expect("pod");
        flip = !flip;
        p.ready = !flip;
        let _ = c.upsert_pod(p);
        plan.update(&c)
    });
    let mut same = c.pod(&target).cloned().expect("pod");
    same.ready = true;
    let _ = c.upsert_pod(same.clone());
    let _ = plan.update(&c);
    let _ = c.upsert_pod(same);
    let diff = plan.update(&c);
    assert!(diff.is_empty(), "an unchanged pod changes nothing");
    let mut p = c.pod(&target).cloned().expect("pod");
    p.ready = false;
    c.upsert_pod(p);
    let changed = Plan::compile(&c, &node);
    let whole_diff = time(runs, || Plan::diff(&base, &changed));
    let d = Plan::diff(&base, &changed);
    println!(
        "one-endpoint change, incremental:   {:>10.3?}  = {:.4}% of a full compile ({} ops)",
        incremental,
        100.0 * incremental.as_secs_f64() / full.as_secs_f64(),
        d.ops.len()
    );
    println!(
        "whole-plan diff (two compiles):     {:>10.3?}  = {:.3}% of a full compile",
        whole_diff,
        100.0 * whole_diff.as_secs_f64() / full.as_secs_f64()
    );

    let keys: Vec<String> = (0..1000u32)
        .map(|i| format!("10.244.{}.{}:8080", i / 256, i % 256))
        .collect();
    let backends: Vec<MaglevBackend<'_>> = keys
        .iter()
        .map(|k| MaglevBackend {
            key: k.as_bytes(),
            weight: 1,
        })
        .collect();
    let maglev = time(runs.max(21), || {
        Maglev::build(&backends, DEFAULT_MAGLEV_SIZE)
    });
    println!(
        "maglev, 1000 backends, M={DEFAULT_MAGLEV_SIZE}:     {:>10.3?}  = {:.3}x a full compile",
        maglev,
        maglev.as_secs_f64() / full.as_secs_f64()
    );
}
