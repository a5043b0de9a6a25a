//! Plan compiler benchmark: 10,000 Services x 10 endpoints.
//!
//! Prints the full compile time, the cost of a one-endpoint change (incremental update,
//! which returns its diff) and of a whole-plan diff, each as a ratio of the full compile
//! measured in the same run, and the Maglev table build time for 1,000 backends.
//!
//! Then the proxy's input: 100,000 typed EndpointSlice updates applied one by one, each
//! followed by `Plan::update` (per update, as a ratio of a full compile), and how building
//! the state scales: the simulated cluster (Pods through the controller) and the proxy-only
//! cluster (typed Services and EndpointSlices) at 10,000 and 100,000 Services, with the
//! ratio of the two sizes (linear is 10) and the heap per Service and per endpoint.
//! Run with `cargo bench -p svcnat-core --bench compile`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// The counting allocator below is the only unsafe code: a GlobalAlloc impl.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discovery;
use svcnat_core::controller;

use svcnat_core::model::*;
use svcnat_core::plan::{NodeContext, Plan};
use svcnat_core::select::{DEFAULT_MAGLEV_SIZE, Maglev, MaglevBackend};
use svcnat_core::synthetic;

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn cluster() -> Cluster {
    synthetic::cluster(&synthetic::Shape::new(SERVICES, ENDPOINTS))
}

/// Counts the bytes live on the heap, to report memory per Service and per endpoint.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// Safety: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // Safety: same layout as given to us.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // Safety: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - layout.size() as isize, Ordering::Relaxed);
        // Safety: as for `dealloc`, and `new` is the caller's new size.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// A synthetic Service as an API server would serve it.
fn service_object(svc: &Service) -> corev1::Service {
    let ports: Vec<serde_json::Value> = svc
        .ports
        .iter()
        .map(|p| {
            let mut v = serde_json::json!({
                "name": p.name, "port": p.port, "protocol": p.protocol.as_str(),
                "targetPort": p.target_port.to_string().parse::<u16>().unwrap_or(8080),
            });
            if let Some(np) = p.node_port {
                v["nodePort"] = np.into();
            }
            v
        })
        .collect();
    let ips: Vec<String> = svc.cluster_ips.iter().map(ToString::to_string).collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": svc.name.name, "namespace": svc.name.namespace},
        "spec": {
            "type": svc.service_type.as_str(),
            "clusterIP": ips[0], "clusterIPs": ips, "ipFamilies": ["IPv4"],
            "selector": svc.selector.as_ref().map(|s| s.match_labels.clone()),
            "ports": ports,
        }
    }))
    .expect("service object")
}

/// The API objects of a synthetic cluster: its Services, and the slices the controller
/// published for them.
fn api_objects(shape: &synthetic::Shape) -> (Vec<corev1::Service>, Vec<discovery::EndpointSlice>) {
    let sim = synthetic::cluster(shape);
    let services = sim.services().map(service_object).collect();
    let slices = sim
        .services()
        .flat_map(|s| sim.slices_of(&s.name))
        .map(controller::to_api)
        .collect();
    (services, slices)
}

/// A proxy-only cluster built from API objects, as from an initial LIST.
fn apply_all(services: &[corev1::Service], slices: &[discovery::EndpointSlice]) -> Cluster {
    let mut c = Cluster::new();
    for s in services {
        c.apply_service(s).expect("valid service");
    }
    for s in slices {
        c.apply_endpoint_slice(s).expect("valid slice");
    }
    c
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

    typed_updates(&node, full, quick);
    scaling(quick);
}

/// 100,000 typed EndpointSlice updates, one by one, each followed by `Plan::update`.
fn typed_updates(node: &NodeContext, full: Duration, quick: bool) {
    let shape = synthetic::Shape::new(SERVICES, ENDPOINTS);
    let (services, mut slices) = api_objects(&shape);
    let mut c = apply_all(&services, &slices);
    let mut plan = Plan::compile(&c, node);
    let updates = if quick { 1_000 } else { 100_000 };
    let t = Instant::now();
    let mut ops = 0usize;
    for k in 0..updates {
        // Walk the slices with a stride so consecutive updates hit different Services;
        // flip one endpoint's readiness.
        let i = (k * 7919) % slices.len();
        let slice = &mut slices[i];
        let eps = slice.endpoints.as_mut().expect("endpoints");
        let j = k % eps.len();
        let cond = eps[j].conditions.get_or_insert_with(Default::default);
        let ready = !cond.ready.unwrap_or(true);
        cond.ready = Some(ready);
        cond.serving = Some(ready);
        let changed = c.apply_endpoint_slice(slice).expect("valid slice");
        debug_assert_eq!(changed.len(), 1);
        let diff = plan.update(&c);
        ops += diff.ops.len();
    }
    let took = t.elapsed();
    let per = took / updates as u32;
    assert!(ops >= updates, "every update changes the plan");
    assert_eq!(
        plan,
        Plan::compile(&c, node),
        "updated plan equals a full compile"
    );
    println!(
        "typed EndpointSlice update + Plan::update, {updates} one by one: {took:.2?} = {per:.2?} each = {:.4}% of a full compile",
        100.0 * per.as_secs_f64() / full.as_secs_f64()
    );
}

/// Building the state at 10,000 and 100,000 Services: time ratio and memory.
fn scaling(quick: bool) {
    let sizes: &[u32] = if quick {
        &[1_000, 10_000]
    } else {
        &[10_000, 100_000]
    };
    let mut sim_times = Vec::new();
    let mut api_times = Vec::new();
    for &n in sizes {
        let shape = synthetic::Shape::new(n, ENDPOINTS);
        // Simulated: Services and Pods, the controller publishing slices.
        let before = live();
        let t = Instant::now();
        let sim = synthetic::cluster(&shape);
        let sim_time = t.elapsed();
        let sim_bytes = live() - before;
        drop(sim);
        // Proxy-only: typed Services and EndpointSlices, as from an initial LIST.
        let (services, slices) = api_objects(&shape);
        let before = live();
        let t = Instant::now();
        let api = apply_all(&services, &slices);
        let api_time = t.elapsed();
        let api_bytes = live() - before;
        // The same Services without endpoints, to split memory per Service and endpoint.
        let before = live();
        let bare = apply_all(&services, &[]);
        let svc_bytes = live() - before;
        drop(bare);
        let per_svc = svc_bytes as f64 / f64::from(n);
        let per_ep = (api_bytes - svc_bytes) as f64 / (f64::from(n) * f64::from(ENDPOINTS));
        println!(
            "{n:>7} services x {ENDPOINTS}: simulated (pods -> controller -> slices) {sim_time:>9.2?}, {:.0} MiB = {:.0} B per pod; typed apply of services + slices {api_time:>9.2?}, {:.0} MiB = {per_svc:.0} B per service + {per_ep:.0} B per endpoint",
            sim_bytes as f64 / 1048576.0,
            sim_bytes as f64 / (f64::from(n) * f64::from(ENDPOINTS)),
            api_bytes as f64 / 1048576.0,
        );
        drop(api);
        sim_times.push(sim_time);
        api_times.push(api_time);
    }
    let ratio = |v: &[Duration]| v[1].as_secs_f64() / v[0].as_secs_f64();
    println!(
        "build time, {}x the Services: simulated {:.1}x, typed apply {:.1}x (linear = {}x)",
        sizes[1] / sizes[0],
        ratio(&sim_times),
        ratio(&api_times),
        sizes[1] / sizes[0]
    );
}
