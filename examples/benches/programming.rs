//! `cargo bench -p svcnat-examples --bench programming`: network programming latency and an
//! event burst, with `svcnat-proxy --kubeconfig` (the real program) following the fake API
//! server in a testbed node namespace, for the iptables backend (nft flavour) and the
//! userspace datapath.
//!
//! ```text
//!   node namespace n0: fake API server on 127.0.0.1 ◄── svcnat-proxy --kubeconfig (watch)
//!                      this bench writes Services and EndpointSlices into the API server
//!                      a bare kube-rs watcher times the API's own event delivery
//! ```
//!
//! The cluster: 10,000 ClusterIP Services in 100 namespaces, each with one EndpointSlice of
//! two ready endpoints, as the EndpointSlice controller writes them (owner reference,
//! `managed-by` and `service-name` labels, node names, zones, target refs, and the
//! `endpoints.kubernetes.io/last-change-trigger-time` annotation, stamped to the
//! microsecond with the time of the write).
//!
//! Per backend, two proxies in turn:
//! 1. kube-proxy's defaults (`--min-sync-period 1s`, `--sync-period 30s`): the **latency**
//!    phase, then the **burst**.
//! 2. `--min-sync-period 0` (sync as soon as a change is seen; syncs coalesce whatever
//!    arrives while one runs): the latency phase again.
//!
//! **Latency**: 1,000 endpoint changes, one every 20 ms, each on a different Service (one
//! endpoint replaced by a new address, as a rolling update replaces a pod). 50 changes a
//! second keep several changes in flight per sync, as in a busy cluster, while staying far
//! under what the API server and the proxy absorb, so the figure is latency, not backlog.
//! Each change's latency is measured from the bench's clock just before the API write to
//! the end of the proxy's sync that carried it, read from the proxy's log: each `synced`
//! line has its time stamp and the newest trigger time it programmed (the annotation the
//! bench stamped), and changes are programmed in write order. A sync ends when
//! `iptables-nft-restore` has committed (iptables) or the workers have the new tables
//! (userspace). After the changes, `iptables-save` must show every changed Service's new
//! endpoints (the userspace datapath's tables cannot be read from outside). The proxy's own
//! `kubeproxy_network_programming_duration_seconds` histogram is read before and after as a
//! cross-check (its buckets are kube-proxy's: 0.25 s, 0.5 s, then seconds). (`nft monitor`
//! was tried as a kernel-side clock: at 10,000 Services it lags by tens of seconds, as it
//! reads the whole table to print each change.)
//!
//! References measured in the same run: the API server's write-to-watch-event time for the
//! same changes, seen by a bare kube-rs watcher in the node namespace (the floor any
//! API-driven proxy pays); for iptables, one bare `iptables-nft-restore --noflush` of a
//! one-rule chain into the loaded table (the floor of one partial sync) and one
//! `iptables-nft-restore` of the whole saved table into an empty namespace (the floor of a
//! full sync). And the anchors: kube-proxy's published 100-node job p50 1.52 s, p99 6.8 s;
//! its 5,000-node test p50 about 5 s (KEP-3453); goal here: p99 under 500 ms.
//!
//! **Burst**: 100,000 slice updates spread over the 10,000 Services (ten each, every one a new
//! endpoint address), written as fast as the fake API server takes them while the proxy
//! runs: events per second absorbed (first write to the end of the sync that programmed the
//! last), syncs it took (`kubeproxy_sync_proxy_rules_duration_seconds_count`), the proxy's
//! peak RSS during the burst (`VmHWM`, reset before it through `clear_refs`) and its CPU
//! time; then that the final state is exactly the last one: for iptables, the DNAT targets
//! of every one of the 10,000 Services in `iptables-save`; for the userspace datapath, the
//! proxy's endpoint count and no change pending.
//!
//! Figures only: nothing fails on speed (there are only generous timeouts for progress).
//! It fails when something is wrong: a change never reaches the rules, the final rules
//! differ from the last state. Needs root, `iptables-nft-restore`, `iptables-save` and
//! `curl`; otherwise prints `SKIP` and why (under `CI=true` a skip fails).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use svcnat_examples::api::TRIGGER_TIME_ANNOTATION;
use svcnat_examples::fakeapi::{FakeApiOptions, FakeApiServer};
use svcnat_examples::testbed::{Daemon, Testbed, TestbedSpec, in_ci, require_root};

const PROXY: &str = env!("CARGO_BIN_EXE_svcnat-proxy");
const SERVICES: usize = 10_000;
const NAMESPACES: usize = 100;
const CHANGES: usize = 1_000;
const PACE: Duration = Duration::from_millis(20);
const BURST: usize = 100_000;
const POD_PORT: u16 = 8080;
/// Multiplier spreading consecutive changes over the Services (prime, so `k * STRIDE mod
/// SERVICES` visits every Service once per 10,000 steps).
const STRIDE: usize = 7919;
/// Generous bound for the proxy to load or to catch up: a progress timeout, not a limit on
/// speed.
const CONVERGE: Duration = Duration::from_secs(240);
const METRICS_URL: &str = "http://127.0.0.1:10249/metrics";
/// kube-proxy's published figures (KEP-3453 and its scalability jobs), seconds.
const ANCHOR_100_P50: f64 = 1.52;
const ANCHOR_100_P99: f64 = 6.8;
const ANCHOR_5000_P50: f64 = 5.0;
const GOAL_P99: f64 = 0.5;

// ---------------------------------------------------------------------------------------------
// The cluster as API objects
// ---------------------------------------------------------------------------------------------

fn namespace(i: usize) -> String {
    format!("team-{:02}", i % NAMESPACES)
}

fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

fn v4_plus(base: [u8; 4], n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::from(base)) + n as u32)
}

fn cluster_ip(i: usize) -> Ipv4Addr {
    v4_plus([10, 96, 0, 16], i)
}

/// The endpoints a Service starts with (pod addresses in the cluster CIDR).
fn initial_endpoints(i: usize) -> [Ipv4Addr; 2] {
    [
        v4_plus([10, 244, 0, 2], 2 * i),
        v4_plus([10, 244, 0, 3], 2 * i),
    ]
}

/// The new address of latency change `k` (unique in the run, so the bare watcher can tell
/// the changes apart).
fn change_ip(k: usize) -> Ipv4Addr {
    v4_plus([10, 245, 0, 1], k)
}

/// The new address of burst event `j`.
fn burst_ip(j: usize) -> Ipv4Addr {
    v4_plus([10, 246, 0, 1], j)
}

/// The current time, truncated to the microsecond, and the annotation text for it.
fn stamp() -> (SystemTime, String) {
    let us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let t = UNIX_EPOCH + Duration::from_micros(us as u64);
    (t, Timestamp::try_from(t).unwrap().to_string())
}

fn service(i: usize) -> Value {
    let name = service_name(i);
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace(i), "labels": {"app": name}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip(i).to_string(),
            "selector": {"app": name},
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": POD_PORT}]
        }
    })
}

/// The slice the EndpointSlice controller writes for Service `i` with these endpoints.
fn slice(i: usize, uid: &str, endpoints: [Ipv4Addr; 2], trigger: &str) -> Value {
    let (name, ns) = (service_name(i), namespace(i));
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|ip| {
            let n = u32::from(*ip);
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("worker-{:03}", n % 100),
                "zone": format!("zone-{}", ["a", "b", "c"][(n % 3) as usize]),
                "targetRef": {"kind": "Pod", "namespace": ns,
                              "name": format!("{name}-6d4cf56db6-{n:x}")}
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-x7k2p"),
            "namespace": ns,
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            },
            "annotations": {TRIGGER_TIME_ANNOTATION: trigger},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                                 "uid": uid, "controller": true, "blockOwnerDeletion": true}]
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": POD_PORT, "protocol": "TCP"}]
    })
}

/// What the API server holds, as the bench wrote it.
struct World {
    api: FakeApiServer,
    uids: Vec<String>,
    endpoints: Vec<[Ipv4Addr; 2]>,
    /// Latency changes made so far (addresses are never reused).
    changes: usize,
}

impl World {
    fn new(tb: &Testbed) -> World {
        let api = FakeApiServer::with_options(
            FakeApiOptions::default()
                .netns(tb.ns_of_node(0))
                .history_limit(200_000),
        )
        .expect("fake API server in the node namespace");
        let n = tb.node(0);
        api.apply_json(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name},
            "spec": {"podCIDR": n.pod_cidrs[0].to_string(),
                     "podCIDRs": [n.pod_cidrs[0].to_string()]},
            "status": {"addresses": [{"type": "InternalIP", "address": n.ip.to_string()}]}
        }))
        .unwrap();
        let mut uids = Vec::with_capacity(SERVICES);
        let mut endpoints = Vec::with_capacity(SERVICES);
        for i in 0..SERVICES {
            let stored = api.apply_json(service(i)).unwrap();
            let uid = stored["metadata"]["uid"].as_str().unwrap().to_string();
            let (_, trigger) = stamp();
            api.apply_json(slice(i, &uid, initial_endpoints(i), &trigger))
                .unwrap();
            uids.push(uid);
            endpoints.push(initial_endpoints(i));
        }
        World {
            api,
            uids,
            endpoints,
            changes: 0,
        }
    }

    /// Replaces Service `i`'s first endpoint by `ip`; returns the stamped write time.
    fn set_first(&mut self, i: usize, ip: Ipv4Addr) -> SystemTime {
        self.endpoints[i][0] = ip;
        let (at, trigger) = stamp();
        self.api
            .apply_json(slice(i, &self.uids[i], self.endpoints[i], &trigger))
            .unwrap();
        at
    }
}

// ---------------------------------------------------------------------------------------------
// Observers
// ---------------------------------------------------------------------------------------------

/// Runs `f` on a thread inside the network namespace `ns` (processes it spawns start there).
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(format!("/run/netns/{ns}")).expect("open the namespace");
    thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

/// First sightings of addresses, with the wall-clock time.
type Seen = Arc<Mutex<HashMap<Ipv4Addr, SystemTime>>>;

/// A bare kube-rs watcher of EndpointSlices in the node namespace: when each slice update
/// reached a client (its first endpoint's address, first time seen).
struct BareWatcher {
    stop: Arc<AtomicBool>,
    seen: Seen,
    handle: Option<thread::JoinHandle<()>>,
}

impl BareWatcher {
    fn start(ns: &str, kubeconfig: &Path) -> BareWatcher {
        let (stop, seen): (Arc<AtomicBool>, Seen) = Default::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (ns, path) = (ns.to_string(), kubeconfig.to_path_buf());
        let (stop2, sink) = (stop.clone(), seen.clone());
        let handle = thread::spawn(move || {
            let file = File::open(format!("/run/netns/{ns}")).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
                let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .unwrap();
                let client = kube::Client::try_from(config).unwrap();
                let api: kube::Api<EndpointSlice> = kube::Api::all(client);
                let mut stream = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
                while !stop2.load(Ordering::SeqCst) {
                    let next =
                        tokio::time::timeout(Duration::from_millis(100), stream.next()).await;
                    match next {
                        Err(_) => {}
                        Ok(None) => break,
                        Ok(Some(Ok(Event::InitDone))) => {
                            let _ = ready_tx.send(());
                        }
                        Ok(Some(Ok(Event::Apply(s)))) => {
                            let at = SystemTime::now();
                            let ip = s
                                .endpoints
                                .as_ref()
                                .and_then(|e| e.first())
                                .and_then(|e| e.addresses.first())
                                .and_then(|a| a.parse::<Ipv4Addr>().ok());
                            if let Some(ip) = ip {
                                sink.lock().unwrap().entry(ip).or_insert(at);
                            }
                        }
                        Ok(Some(Ok(_))) => {}
                        Ok(Some(Err(e))) => eprintln!("bare watcher: {e}"),
                    }
                }
            });
        });
        ready_rx
            .recv_timeout(CONVERGE)
            .expect("the bare watcher listed the slices");
        BareWatcher {
            stop,
            seen,
            handle: Some(handle),
        }
    }
}

impl Drop for BareWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Iptables,
    Userspace,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables (nft)",
            Backend::Userspace => "userspace",
        }
    }
}

/// One `synced` line of the proxy's log.
#[derive(Clone, Debug)]
struct SyncLine {
    end: SystemTime,
    full: bool,
    duration: String,
    programmed: usize,
    newest_trigger: Option<SystemTime>,
}

fn parse_time(text: &str) -> Option<SystemTime> {
    text.parse::<Timestamp>().ok().map(SystemTime::from)
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))?;
    line[at + key.len() + 2..]
        .split_whitespace()
        .next()
        .map(|v| v.trim_matches('"'))
}

fn sync_lines(log: &str) -> Vec<SyncLine> {
    log.lines()
        .filter(|l| l.contains(" synced ") || l.ends_with(" synced"))
        .filter(|l| l.contains("newest_trigger="))
        .filter_map(|l| {
            Some(SyncLine {
                end: parse_time(l.split_whitespace().next()?)?,
                full: field(l, "kind")? == "full",
                duration: field(l, "duration")?.to_string(),
                programmed: field(l, "programmed")?.parse().ok()?,
                newest_trigger: parse_time(field(l, "newest_trigger")?),
            })
        })
        .collect()
}

/// `svcnat-proxy --kubeconfig` in the node namespace.
struct RunningProxy {
    daemon: Daemon,
    ns: String,
    started: Instant,
}

impl RunningProxy {
    fn start(tb: &Testbed, world: &World, backend: Backend, min_sync: &str) -> RunningProxy {
        let ns = tb.ns_of_node(0).to_string();
        let mut cmd = tb.command(&ns, PROXY);
        match backend {
            Backend::Iptables => cmd.args(["--backend", "iptables", "--iptables-flavour", "nft"]),
            Backend::Userspace => cmd.args([
                "--backend",
                "userspace",
                "--interfaces",
                "eth0",
                "--workers",
                "1",
            ]),
        };
        cmd.arg("--kubeconfig")
            .arg(world.api.kubeconfig_path())
            .args(["--node-name", &tb.node(0).name])
            .args(["--node-ip", &tb.node_ip(0).to_string()])
            .args(["--cluster-cidr", "10.244.0.0/16"])
            .args(["--min-sync-period", min_sync])
            .args(["--metrics-bind-address", "127.0.0.1:10249", "-v"]);
        let started = Instant::now();
        let daemon = Daemon::spawn(cmd, "proxy").expect("start svcnat-proxy");
        if let Err(e) = daemon.wait_ready(CONVERGE) {
            panic!("{e}");
        }
        RunningProxy {
            daemon,
            ns,
            started,
        }
    }

    fn syncs(&self) -> Vec<SyncLine> {
        sync_lines(&self.daemon.stderr())
    }

    fn pid(&self) -> u32 {
        self.daemon.id()
    }

    /// `/proc/PID/status` field in kB.
    fn status_kb(&self, key: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Resets the peak RSS (`VmHWM`) to the current RSS.
    fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").unwrap();
    }

    /// User and system CPU seconds so far.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        (ticks(11) + ticks(12)) as f64 / 100.0
    }

    /// The proxy's `/metrics`, by series (`name{labels}`).
    fn metrics(&self, tb: &Testbed) -> BTreeMap<String, f64> {
        let text = tb
            .exec_ok(&self.ns, ["curl", "-sS", "--max-time", "10", METRICS_URL])
            .expect("curl /metrics");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }
}

fn metric(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

const SYNC_COUNT: &str = "kubeproxy_sync_proxy_rules_duration_seconds_count";
const PROG: &str = "kubeproxy_network_programming_duration_seconds";

/// What the proxy's programming histogram says about the observations between two reads.
fn histogram_summary(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let delta = |k: &str| metric(after, k) - metric(before, k);
    let count = delta(&format!("{PROG}_count"));
    if count <= 0.0 {
        return "no observations".into();
    }
    let mut buckets: Vec<(f64, String, f64)> = after
        .keys()
        .filter_map(|k| {
            let le = k
                .strip_prefix(&format!("{PROG}_bucket{{le=\""))?
                .strip_suffix("\"}")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, le.to_string(), delta(k)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let bucket_of = |q: f64| {
        buckets
            .iter()
            .find(|(_, _, c)| *c >= q * count)
            .map(|(_, le, _)| format!("<= {le} s"))
            .unwrap_or_default()
    };
    let within = |bound: f64| {
        buckets
            .iter()
            .find(|(b, _, _)| *b == bound)
            .map(|(_, _, c)| 100.0 * c / count)
            .unwrap_or(0.0)
    };
    format!(
        "{count:.0} observed, mean {:.0} ms, p50 {}, p99 {}; {:.1}% <= 0.25 s, {:.1}% <= 0.5 s",
        1000.0 * delta(&format!("{PROG}_sum")) / count,
        bucket_of(0.5),
        bucket_of(0.99),
        within(0.25),
        within(0.5),
    )
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

/// Percentiles of a sample, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Dist {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn dist(mut v: Vec<f64>) -> Dist {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Dist::default();
    }
    let q = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] * 1000.0;
    Dist {
        p50: q(0.50),
        p90: q(0.90),
        p99: q(0.99),
        max: q(1.0),
    }
}

fn secs(later: SystemTime, earlier: SystemTime) -> f64 {
    later
        .duration_since(earlier)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

struct Latency {
    min_sync: String,
    /// From the write to the end of the sync that carried it (proxy log).
    synced: Dist,
    /// From the write to the bare watcher's event.
    delivery: Dist,
    syncs: f64,
    full_syncs: usize,
    histogram: String,
}

fn latency_phase(
    tb: &Testbed,
    world: &mut World,
    proxy: &RunningProxy,
    backend: Backend,
) -> Latency {
    let ns = tb.ns_of_node(0).to_string();
    let watcher = BareWatcher::start(&ns, world.api.kubeconfig_path());
    let before = proxy.metrics(tb);
    let logged_before = proxy.syncs().len();
    let first = world.changes;
    let mut writes = Vec::with_capacity(CHANGES);
    let t0 = Instant::now();
    for n in 0..CHANGES {
        let k = first + n;
        let i = (k * STRIDE) % SERVICES;
        let ip = change_ip(k);
        writes.push((i, world.set_first(i, ip)));
        if let Some(wait) = (PACE * (n as u32 + 1)).checked_sub(t0.elapsed()) {
            thread::sleep(wait);
        }
    }
    world.changes += CHANGES;
    let (_, last_write) = writes[CHANGES - 1];
    // Every change reaches the proxy's log as programmed.
    let deadline = Instant::now() + CONVERGE;
    while !proxy
        .syncs()
        .iter()
        .any(|s| s.newest_trigger.is_some_and(|t| t >= last_write))
    {
        assert!(
            Instant::now() < deadline,
            "{}: changes never programmed within {CONVERGE:?}",
            backend.name()
        );
        thread::sleep(Duration::from_millis(50));
    }
    // And the kernel holds every change (iptables: each changed Service's DNAT targets).
    if backend == Backend::Iptables {
        let rules = dnat_targets(tb, &ns);
        let wrong: Vec<String> = writes
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| rules.get(&service_key(*i)) != Some(&targets(&world.endpoints[*i])))
            .map(service_key)
            .collect();
        assert!(
            wrong.is_empty(),
            "iptables: {} changed Services lack their new endpoints, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
    // A second for the histogram's last observations and the watcher's last events.
    thread::sleep(Duration::from_millis(500));
    let after = proxy.metrics(tb);
    let syncs: Vec<SyncLine> = proxy.syncs().split_off(logged_before);
    let mut synced = Vec::with_capacity(CHANGES);
    for (_, w) in &writes {
        let s = syncs
            .iter()
            .find(|s| s.newest_trigger.is_some_and(|t| t >= *w))
            .expect("a sync carried the change");
        synced.push(secs(s.end, *w));
    }
    let delivery = {
        let seen = watcher.seen.lock().unwrap();
        dist(
            writes
                .iter()
                .filter_map(|(i, w)| seen.get(&world.endpoints[*i][0]).map(|t| secs(*t, *w)))
                .collect(),
        )
    };
    drop(watcher);
    Latency {
        min_sync: String::new(),
        synced: dist(synced),
        delivery,
        syncs: metric(&after, SYNC_COUNT) - metric(&before, SYNC_COUNT),
        full_syncs: syncs.iter().filter(|s| s.full).count(),
        histogram: histogram_summary(&before, &after),
    }
}

struct Burst {
    write_secs: f64,
    absorb_secs: f64,
    syncs: f64,
    peak_rss_mb: f64,
    rss_before_mb: f64,
    cpu_secs: f64,
    checked: String,
}

/// The rule comment of Service `i`'s port.
fn service_key(i: usize) -> String {
    format!("{}/{}:http", namespace(i), service_name(i))
}

/// DNAT destinations as `iptables-save` writes them.
fn targets(endpoints: &[Ipv4Addr; 2]) -> BTreeSet<String> {
    endpoints
        .iter()
        .map(|ip| format!("{ip}:{POD_PORT}"))
        .collect()
}

/// The DNAT targets per Service (`ns/name:port` comment) in `iptables-save -t nat`.
fn dnat_targets(tb: &Testbed, ns: &str) -> HashMap<String, BTreeSet<String>> {
    let save = tb
        .exec_ok(ns, ["iptables-save", "-t", "nat"])
        .expect("iptables-save");
    let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
    for rule in save.lines().filter(|l| l.starts_with("-A KUBE-SEP-")) {
        let Some((_, rest)) = rule.split_once("--comment ") else {
            continue;
        };
        let comment = rest
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_matches('"');
        if let Some((_, dest)) = rule.split_once("--to-destination ") {
            out.entry(comment.to_string())
                .or_default()
                .insert(dest.trim().to_string());
        }
    }
    out
}

fn burst_phase(tb: &Testbed, world: &mut World, proxy: &RunningProxy, backend: Backend) -> Burst {
    let before = proxy.metrics(tb);
    let rss_before_mb = proxy.status_kb("VmRSS") as f64 / 1024.0;
    proxy.reset_peak();
    let cpu0 = proxy.cpu_seconds();
    let changes_key = "kubeproxy_sync_proxy_rules_endpoint_changes_total";
    let started = SystemTime::now();
    let t0 = Instant::now();
    for j in 0..BURST {
        let i = (j * STRIDE) % SERVICES;
        world.set_first(i, burst_ip(j));
    }
    let write_secs = t0.elapsed().as_secs_f64();
    let last_write = SystemTime::now();
    // Done: every event taken in and the sync after the last one succeeded.
    let deadline = Instant::now() + CONVERGE;
    let after = loop {
        let m = proxy.metrics(tb);
        let pending = metric(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending");
        if metric(&m, changes_key) - metric(&before, changes_key) >= BURST as f64 && pending == 0.0
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "{}: the burst was not absorbed within {CONVERGE:?} ({} of {BURST} changes taken in, {pending} pending)",
            backend.name(),
            metric(&m, changes_key) - metric(&before, changes_key)
        );
        thread::sleep(Duration::from_millis(100));
    };
    let cpu_secs = proxy.cpu_seconds() - cpu0;
    let peak_rss_mb = proxy.status_kb("VmHWM") as f64 / 1024.0;
    // The end: the first sync that ended after the last write and left nothing pending
    // is the one that programmed the last events (the metrics said none is pending).
    let syncs = proxy.syncs();
    let end = syncs
        .iter()
        .rev()
        .find(|s| s.programmed > 0)
        .map(|s| s.end)
        .unwrap_or(last_write);
    let absorb_secs = secs(end, started);
    let expected_endpoints = 2 * SERVICES;
    assert_eq!(
        metric(&after, "svcnat_endpoints") as usize,
        expected_endpoints,
        "{}: endpoints programmed",
        backend.name()
    );
    let checked = match backend {
        Backend::Iptables => {
            let rules = dnat_targets(tb, tb.ns_of_node(0));
            let mut wrong = Vec::new();
            for i in 0..SERVICES {
                let key = service_key(i);
                let want = targets(&world.endpoints[i]);
                if rules.get(&key) != Some(&want) {
                    wrong.push(format!("{key}: {:?} != {want:?}", rules.get(&key)));
                }
            }
            assert!(
                wrong.is_empty(),
                "iptables: {} Services differ from the last state, e.g. {:?}",
                wrong.len(),
                &wrong[..wrong.len().min(5)]
            );
            format!("DNAT targets of all {SERVICES} Services = last state")
        }
        Backend::Userspace => format!(
            "{expected_endpoints} endpoints programmed, 0 changes pending (tables not readable from outside)"
        ),
    };
    Burst {
        write_secs,
        absorb_secs,
        syncs: metric(&after, SYNC_COUNT) - metric(&before, SYNC_COUNT),
        peak_rss_mb,
        rss_before_mb,
        cpu_secs,
        checked,
    }
}

/// Reference floors for iptables: one bare `iptables-nft-restore --noflush` of a one-rule
/// chain into the loaded table (median of 10, ms), and one restore of the whole saved table
/// into an empty namespace (ms).
fn iptables_floors(tb: &Testbed) -> (f64, f64) {
    let ns = tb.ns_of_node(0).to_string();
    let restore = |text: &str, noflush: bool| {
        let mut cmd = Command::new("iptables-nft-restore");
        if noflush {
            cmd.arg("--noflush");
        }
        let t = Instant::now();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("iptables-nft-restore");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "iptables-nft-restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed().as_secs_f64() * 1000.0
    };
    let partial = in_netns(&ns, || {
        let mut runs: Vec<f64> = (0..10)
            .map(|r| {
                restore(
                    &format!(
                        "*nat\n:SVCNAT-BENCH-REF - [0:0]\n-A SVCNAT-BENCH-REF -p tcp -j DNAT --to-destination 198.18.0.{}:8080\nCOMMIT\n",
                        r + 1
                    ),
                    true,
                )
            })
            .collect();
        restore(
            "*nat\n-F SVCNAT-BENCH-REF\n-X SVCNAT-BENCH-REF\nCOMMIT\n",
            true,
        );
        runs.sort_by(f64::total_cmp);
        runs[runs.len() / 2]
    });
    let saved = tb.exec_ok(&ns, ["iptables-save"]).expect("iptables-save");
    let scratch = Scratch::new();
    let full = in_netns(&scratch.0, || restore(&saved, false));
    (partial, full)
}

/// A network namespace of this bench's own, deleted on drop.
struct Scratch(String);

impl Scratch {
    fn new() -> Scratch {
        let name = format!("svcnat-bench-ref-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        Scratch(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

// ---------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------

struct Figures {
    backend: Backend,
    load_secs: f64,
    initial_sync: String,
    load_rss_mb: f64,
    latency: Vec<Latency>,
    burst: Burst,
    floors: Option<(f64, f64)>,
}

fn measure(tb: &Testbed, world: &mut World, backend: Backend) -> Figures {
    eprintln!(
        "--- {}: kube-proxy's defaults (--min-sync-period 1s)",
        backend.name()
    );
    let proxy = RunningProxy::start(tb, world, backend, "1s");
    let load_secs = proxy.started.elapsed().as_secs_f64();
    let m = proxy.metrics(tb);
    assert_eq!(
        metric(&m, "svcnat_services") as usize,
        SERVICES,
        "{}: the first sync holds every Service",
        backend.name()
    );
    let initial_sync = proxy
        .syncs()
        .first()
        .map(|s| s.duration.clone())
        .unwrap_or_default();
    let load_rss_mb = proxy.status_kb("VmRSS") as f64 / 1024.0;
    let mut slow = latency_phase(tb, world, &proxy, backend);
    slow.min_sync = "1s".into();
    let burst = burst_phase(tb, world, &proxy, backend);
    drop(proxy);

    eprintln!("--- {}: --min-sync-period 0", backend.name());
    let proxy = RunningProxy::start(tb, world, backend, "0");
    let mut fast = latency_phase(tb, world, &proxy, backend);
    fast.min_sync = "0".into();
    let floors = (backend == Backend::Iptables).then(|| iptables_floors(tb));
    drop(proxy);
    if backend == Backend::Iptables {
        let _ = tb.exec(
            tb.ns_of_node(0),
            [PROXY, "--cleanup", "--iptables-flavour", "nft"],
        );
    }
    Figures {
        backend,
        load_secs,
        initial_sync,
        load_rss_mb,
        latency: vec![slow, fast],
        burst,
        floors,
    }
}

fn print(figures: &[Figures], took: f64) {
    println!(
        "network programming benchmark: {SERVICES} ClusterIP Services x 2 endpoints, svcnat-proxy --kubeconfig in a node namespace"
    );
    println!(
        "latency: {CHANGES} endpoint changes, one every {} ms, API write -> rules in force; anchors kube-proxy 100-node p50 {ANCHOR_100_P50} s / p99 {ANCHOR_100_P99} s, 5,000-node p50 ~{ANCHOR_5000_P50} s; goal p99 < {} ms",
        PACE.as_millis(),
        GOAL_P99 * 1000.0
    );
    for f in figures {
        println!(
            "\n== {}: loaded in {:.1} s (first full sync {}), RSS {:.0} MB",
            f.backend.name(),
            f.load_secs,
            f.initial_sync,
            f.load_rss_mb
        );
        println!(
            "{:<44} {:>7} {:>7} {:>7} {:>7}",
            "latency, ms", "p50", "p90", "p99", "max"
        );
        for l in &f.latency {
            let row = |what: &str, d: &Dist| {
                println!(
                    "{:<44} {:>7.0} {:>7.0} {:>7.0} {:>7.0}",
                    what, d.p50, d.p90, d.p99, d.max
                );
            };
            let tag = format!("--min-sync-period {}", l.min_sync);
            row(&format!("{tag}: write -> sync end (proxy log)"), &l.synced);
            row(
                &format!("{tag}: write -> bare watcher (reference)"),
                &l.delivery,
            );
            let d = &l.synced;
            println!(
                "  {:.0} syncs ({} full) for {CHANGES} changes; p50 {:.3}x / p99 {:.3}x kube-proxy's 100-node anchors, p50 {:.3}x the 5,000-node one; p99 {} the {} ms goal; p50 {:.1}x the API's own delivery",
                l.syncs,
                l.full_syncs,
                d.p50 / 1000.0 / ANCHOR_100_P50,
                d.p99 / 1000.0 / ANCHOR_100_P99,
                d.p50 / 1000.0 / ANCHOR_5000_P50,
                if d.p99 / 1000.0 < GOAL_P99 {
                    "meets"
                } else {
                    "misses"
                },
                GOAL_P99 * 1000.0,
                d.p50 / l.delivery.p50.max(0.001)
            );
            println!("  proxy's histogram: {}", l.histogram);
        }
        if let Some((partial, full)) = f.floors {
            println!(
                "  floors: one bare iptables-nft-restore --noflush into the loaded table {partial:.0} ms; the whole table into an empty namespace {full:.0} ms"
            );
        }
        let b = &f.burst;
        println!(
            "burst: {BURST} slice updates written in {:.1} s ({:.0}/s); absorbed end to end in {:.1} s = {:.0} events/s; {:.0} syncs ({:.0} events per sync; kpng: 130,941 events -> 1,218 revisions = 108 per revision)",
            b.write_secs,
            BURST as f64 / b.write_secs,
            b.absorb_secs,
            BURST as f64 / b.absorb_secs,
            b.syncs,
            BURST as f64 / b.syncs.max(1.0)
        );
        println!(
            "  proxy RSS {:.0} MB before, peak {:.0} MB during; CPU {:.1} s ({:.0} us per event); final state: {}",
            b.rss_before_mb,
            b.peak_rss_mb,
            b.cpu_secs,
            1e6 * b.cpu_secs / BURST as f64,
            b.checked
        );
    }
    println!("\n(took {took:.0} s; figures only, nothing here fails on speed)");
}

fn skip(why: &str) {
    if in_ci() {
        panic!("CI=true but the programming benchmark cannot run: {why}");
    }
    println!("SKIP: {why}");
}

fn main() {
    if let Err(why) = require_root() {
        skip(&why);
        return;
    }
    for (tool, arg) in [
        ("iptables-nft-restore", "--version"),
        ("iptables-save", "--version"),
        ("curl", "--version"),
    ] {
        if !Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
        {
            skip(&format!("{tool} is not installed"));
            return;
        }
    }
    if !PathBuf::from(PROXY).is_file() {
        skip(&format!("{PROXY} is not built"));
        return;
    }
    let started = Instant::now();
    let tb = Testbed::new(TestbedSpec::new(1, 0)).expect("testbed");
    let t = Instant::now();
    let mut world = World::new(&tb);
    eprintln!(
        "fake API server loaded with {SERVICES} Services and slices in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let figures: Vec<Figures> = [Backend::Iptables, Backend::Userspace]
        .into_iter()
        .map(|b| measure(&tb, &mut world, b))
        .collect();
    print(&figures, started.elapsed().as_secs_f64());
}
