//! nftables dialect benchmark, in one run, each measurement in a fresh network namespace:
//!
//! - 10,000 Services x 5 endpoints: cold start (empty namespace), full sync (table
//!   present), one-endpoint change end to end (plan update, render, `nft -f`), for the
//!   nftables dialect and the iptables dialect's legacy and nft flavours, printed as ratios
//!   to the nftables figures; and kube-proxy's own nftables layout (one `numgen vmap`
//!   anonymous set per Service port, one chain per endpoint) rendered from the same plan
//!   and loaded with `nft -f` alone, as the reference for the layout.
//! - 5,000 x 50 and 44,000 x 2: cold start, full sync and one-endpoint change, nftables.
//! - Peak memory: of this process (`VmHWM`: cluster, plan, rulesets) and of the largest
//!   `nft` child (`getrusage(RUSAGE_CHILDREN)`, a running maximum).
//!
//! Goals (issue 14): 10k x 5 full sync < 1 s, one change < 20 ms; 5,000 x 50 full sync
//! < 20 s; 44,000 full sync < 60 s, one change < 50 ms. Figures only: nothing fails on
//! speed. Needs root, `ip`, `nft` and the iptables tools; otherwise it says why and exits.
//! `cargo bench -p svcnat-iptables --bench nft_sync` (without `--bench`, e.g. under
//! `cargo test --benches`, a quick run at 1/20 of the sizes; `-- --shape 5000x50`: one
//! shape, the nftables dialect alone).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use svcnat_core::model::{Cluster, ObjectName};
use svcnat_core::plan::{Dataplane, NodeContext, Plan};
use svcnat_core::synthetic;
use svcnat_iptables::driver::{Flavour, Iptables, IptablesConfig, Runner};
use svcnat_iptables::nftables::batch::translate;
use svcnat_iptables::nftables::driver::{Nftables, NftablesConfig};
use svcnat_iptables::nftables::kernel::Kernel;
use svcnat_iptables::nftables::render::Ruleset;

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("svbench-{}-{tag}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "ip netns add {name} failed");
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn vm_hwm_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn children_max_rss_mib() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(0.0, |u| u.max_rss() as f64 / 1024.0)
}

/// A dataplane under test and how to make one in a namespace.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dialect {
    Nftables,
    Iptables(Flavour),
}

impl Dialect {
    fn name(self) -> &'static str {
        match self {
            Dialect::Nftables => "nftables (svcnat)",
            Dialect::Iptables(Flavour::Legacy) => "iptables legacy",
            Dialect::Iptables(Flavour::Nft) => "iptables nft",
        }
    }

    fn make(self, ns: &str) -> Box<dyn Dataplane<Error = Failed>> {
        match self {
            Dialect::Nftables => {
                let mut c =
                    NftablesConfig::new(Some(ns.to_string()), svcnat_core::model::IpFamily::V4);
                c.drift_interval = Duration::from_secs(3600);
                Box::new(Boxed(Nftables::new(c)))
            }
            Dialect::Iptables(f) => Box::new(Boxed(
                Iptables::new(IptablesConfig {
                    runner: Runner::netns(ns),
                    flavour: Some(f),
                    canary_interval: Duration::from_secs(3600),
                    ..IptablesConfig::default()
                })
                .unwrap(),
            )),
        }
    }
}

/// A dataplane with its error as text, so the dialects share one loop.
struct Boxed<D>(D);

#[derive(Debug)]
struct Failed(String);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failed {}

fn failed(e: impl std::fmt::Display) -> Failed {
    Failed(e.to_string())
}

impl<D: Dataplane> Dataplane for Boxed<D> {
    type Error = Failed;
    fn sync(
        &mut self,
        p: &Plan,
        d: &svcnat_core::plan::PlanDiff,
    ) -> Result<svcnat_core::plan::SyncReport, Self::Error> {
        self.0.sync(p, d).map_err(failed)
    }
    fn resync(&mut self, p: &Plan) -> Result<svcnat_core::plan::SyncReport, Self::Error> {
        self.0.resync(p).map_err(failed)
    }
    fn cleanup(&mut self) -> Result<(), Self::Error> {
        self.0.cleanup().map_err(failed)
    }
}

struct Figures {
    cold: Duration,
    full: Duration,
    change: Duration,
    /// nftables only: the floors measured in the same namespace (see [`floors`]).
    floors: Option<Floors>,
}

/// What the kernel and `nft` take for the same work, without svcnat around it.
struct Floors {
    /// One `nft -f` of the whole table into a fresh namespace.
    load: Duration,
    /// The same full table as one netlink batch into a fresh namespace: translation and
    /// the kernel's transaction.
    load_netlink: Duration,
    /// Of which the translation of the text into the batch.
    translate: Duration,
    /// The one-endpoint change's transaction text alone through `nft -f`.
    change_nft: Duration,
    /// The same transaction alone as one netlink batch.
    change_netlink: Duration,
}

/// Cold start, full sync, and the median one-endpoint change (a pod's readiness flipping,
/// back and forth) of one dialect in a fresh namespace.
fn measure(
    dialect: Dialect,
    cluster: &mut Cluster,
    plan: &Plan,
    services: u32,
    runs: usize,
) -> Figures {
    let ns = Netns::new("m");
    let mut dp = dialect.make(&ns.0);
    let t = Instant::now();
    dp.resync(plan).unwrap();
    let cold = t.elapsed();
    let t = Instant::now();
    let r = dp.resync(plan).unwrap();
    let full = t.elapsed();
    assert!(r.full);
    let target = ObjectName::new(
        format!("ns{}", (services / 2 + 7) % 10),
        format!("svc-{}-1", services / 2 + 7),
    );
    let mut p = plan.clone();
    let change = median(
        (0..runs)
            .map(|i| {
                let mut pod = cluster.pod(&target).cloned().expect("pod");
                pod.ready = i % 2 == 1;
                let t = Instant::now();
                let _ = cluster.upsert_pod(pod);
                let diff = p.update(cluster);
                assert!(!diff.is_empty());
                let report = dp.sync(&p, &diff).unwrap();
                assert!(!report.full);
                t.elapsed()
            })
            .collect(),
    );
    // Leave the cluster as it was.
    let mut pod = cluster.pod(&target).cloned().expect("pod");
    pod.ready = true;
    let _ = cluster.upsert_pod(pod);
    let diff = p.update(cluster);
    dp.sync(&p, &diff).unwrap();
    let floors = (dialect == Dialect::Nftables).then(|| floors(&ns.0, cluster, &p, &target, runs));
    dp.cleanup().unwrap();
    Figures {
        cold,
        full,
        change,
        floors,
    }
}

/// The floors: the same one-endpoint change's transaction (rendered alongside) applied
/// alone, by `nft -f` and as a netlink batch, into the loaded table of namespace `ns`; and
/// the whole table loaded into a fresh namespace, by `nft -f` and as a netlink batch.
fn floors(
    ns: &str,
    cluster: &mut Cluster,
    plan: &Plan,
    target: &ObjectName,
    runs: usize,
) -> Floors {
    let family = svcnat_core::model::IpFamily::V4;
    let mut p = plan.clone();
    let mut rules = Ruleset::new_for(&p, family);
    let mut sock = Kernel::new(Some(ns.to_string())).batch_socket().unwrap();
    let mut by_nft = Vec::new();
    let mut by_netlink = Vec::new();
    for i in 0..runs * 2 {
        let mut pod = cluster.pod(target).cloned().expect("pod");
        pod.ready = i % 2 == 1;
        let _ = cluster.upsert_pod(pod);
        let diff = p.update(cluster);
        let text = rules.update(&p, &diff).expect("a change").text;
        if i % 4 < 2 {
            by_nft.push(nft_in(ns, &text));
        } else {
            let batch = translate(&text).expect("translated");
            let t = Instant::now();
            sock.apply(&batch).unwrap().unwrap();
            by_netlink.push(t.elapsed());
        }
    }
    let text = Ruleset::new_for(plan, family).full_text();
    let fresh = Netns::new("floor");
    let load = nft_in(&fresh.0, &text);
    drop(fresh);
    // The same table as one netlink batch (one transaction, as the `nft -f` load is).
    let fresh = Netns::new("floor-nl");
    let mut sock = Kernel::new(Some(fresh.0.clone())).batch_socket().unwrap();
    let t = Instant::now();
    let batch = translate(&text).expect("translated");
    let translate_time = t.elapsed();
    sock.apply(&batch).unwrap().unwrap();
    let load_netlink = t.elapsed();
    drop(fresh);
    Floors {
        load,
        load_netlink,
        translate: translate_time,
        change_nft: median(by_nft),
        change_netlink: median(by_netlink),
    }
}

/// `nft -f` of `text` in namespace `ns`, the way the driver runs it (no `ip netns exec`).
fn nft_in(ns: &str, text: &str) -> Duration {
    let text = text.to_string();
    let t = Instant::now();
    svcnat_iptables::conntrack::in_netns(Some(ns), move || {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()?;
        child.stdin.take().unwrap().write_all(text.as_bytes())?;
        assert!(child.wait()?.success(), "nft -f failed");
        Ok(())
    })
    .unwrap();
    t.elapsed()
}

fn print_floors(f: &Figures) {
    let Some(fl) = &f.floors else { return };
    let x = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "  floor: whole table, one nft -f into a fresh namespace {:>10} (cold start = x {:.2}, full sync = x {:.2}); as one netlink batch {:>10} (= nft -f x {:.2}; translating the text {})",
        ms(fl.load),
        x(f.cold, fl.load),
        x(f.full, fl.load),
        ms(fl.load_netlink),
        x(fl.load_netlink, fl.load),
        ms(fl.translate),
    );
    println!(
        "  floor: the one-endpoint change's transaction alone: nft -f {:>9}, netlink batch {:>9}; our change end to end = x {:.2} of the batch, x {:.3} of nft -f",
        ms(fl.change_nft),
        ms(fl.change_netlink),
        x(f.change, fl.change_netlink),
        x(f.change, fl.change_nft),
    );
}

/// kube-proxy's nftables layout for the same plan (IPv4, ClusterIP and NodePort): a
/// `service-` chain choosing with `numgen random mod N vmap { i : goto endpoint-... }` and
/// one `endpoint-` chain per endpoint (hairpin mark, DNAT), the `service-ips` and
/// `service-nodeports` maps. Enough of it to time what the kernel does with it.
fn kube_proxy_layout(plan: &Plan) -> String {
    let mut out = String::new();
    out.push_str("add table ip kube-proxy\n");
    out.push_str(
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100; }\n",
    );
    out.push_str("add chain ip kube-proxy services\nadd chain ip kube-proxy mark-for-masquerade\n");
    out.push_str("add rule ip kube-proxy mark-for-masquerade meta mark set meta mark or 0x4000\n");
    out.push_str("add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n");
    out.push_str(
        "add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict; }\n",
    );
    out.push_str("add rule ip kube-proxy nat-prerouting jump services\n");
    out.push_str(
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    out.push_str("add rule ip kube-proxy services fib daddr type local meta l4proto . th dport vmap @service-nodeports\n");
    let mut elements = Vec::new();
    let mut nodeports = Vec::new();
    for (i, (_, set)) in plan.backend_sets().enumerate() {
        let svc = format!("service-{i:06}");
        let _ = writeln!(out, "add chain ip kube-proxy {svc}");
        let mut vmap = Vec::new();
        for (j, ep) in set.endpoints.iter().enumerate() {
            let epc = format!("endpoint-{i:06}-{j}");
            let _ = writeln!(out, "add chain ip kube-proxy {epc}");
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {epc} ip saddr {} jump mark-for-masquerade",
                ep.addr.ip()
            );
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {epc} meta l4proto tcp dnat to {}",
                ep.addr
            );
            vmap.push(format!("{j} : goto {epc}"));
        }
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ {} }}",
            vmap.len(),
            vmap.join(", ")
        );
        for (k, f) in plan.frontends() {
            if f.backends == set.id {
                match k.kind {
                    svcnat_core::plan::FrontendKind::NodePort => {
                        nodeports.push(format!("tcp . {} : goto {svc}", k.port))
                    }
                    _ => elements.push(format!("{} . tcp . {} : goto {svc}", k.addr, k.port)),
                }
            }
        }
    }
    nodeports.sort();
    nodeports.dedup();
    for (map, els) in [("service-ips", elements), ("service-nodeports", nodeports)] {
        for chunk in els.chunks(1000) {
            let _ = writeln!(
                out,
                "add element ip kube-proxy {map} {{ {} }}",
                chunk.join(", ")
            );
        }
    }
    out
}

fn nft_alone(ns: &str, text: &str) -> Duration {
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft -f failed");
    t.elapsed()
}

fn shape(services: u32, endpoints: u32) -> (Cluster, Plan) {
    let cluster = synthetic::cluster(&synthetic::Shape::new(services, endpoints));
    let node = NodeContext::new(
        "node-1",
        vec![IpAddr::from([192, 168, 50, 11])],
        vec!["10.244.0.0/14".parse().unwrap()],
    );
    let plan = Plan::compile(&cluster, &node);
    (cluster, plan)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let have = |p: &str| Command::new(p).arg("--version").output().is_ok();
    if !root || !have("nft") || !have("iptables-legacy-restore") || !have("iptables-nft-restore") {
        eprintln!(
            "SKIP: the nftables benchmark needs root, iproute2, nft and iptables (legacy and nft)"
        );
        return;
    }
    let scale = |n: u32| if quick { (n / 20).max(1) } else { n };
    let runs = if quick { 3 } else { 7 };

    // `-- --shape SERVICESxENDPOINTS`: that shape alone, the nftables dialect only.
    let args: Vec<String> = std::env::args().collect();
    if let Some(shape_arg) = args
        .iter()
        .position(|a| a == "--shape")
        .and_then(|i| args.get(i + 1))
    {
        let (s, e) = shape_arg
            .split_once('x')
            .expect("--shape SERVICESxENDPOINTS");
        let (services, endpoints) = (s.parse().unwrap(), e.parse().unwrap());
        let (mut cluster, plan) = shape(services, endpoints);
        println!("== {services} Services x {endpoints} endpoints");
        let f = measure(Dialect::Nftables, &mut cluster, &plan, services, runs);
        println!(
            "{:<22} cold start {:>10}  full sync {:>10}  one-endpoint change {:>9}",
            Dialect::Nftables.name(),
            ms(f.cold),
            ms(f.full),
            ms(f.change)
        );
        print_floors(&f);
        return;
    }

    // 10,000 x 5, every dialect.
    let (services, endpoints) = (scale(10_000), 5);
    let (mut cluster, plan) = shape(services, endpoints);
    println!(
        "== {services} Services x {endpoints} endpoints ({} frontends, {} endpoints in the plan)",
        plan.frontends().count(),
        plan.endpoint_count()
    );
    let nft = measure(Dialect::Nftables, &mut cluster, &plan, services, runs);
    println!(
        "{:<22} cold start {:>10}  full sync {:>10}  one-endpoint change {:>9}",
        Dialect::Nftables.name(),
        ms(nft.cold),
        ms(nft.full),
        ms(nft.change)
    );
    print_floors(&nft);
    for flavour in [Flavour::Legacy, Flavour::Nft] {
        let d = Dialect::Iptables(flavour);
        let f = measure(d, &mut cluster, &plan, services, runs);
        println!(
            "{:<22} cold start {:>10}  full sync {:>10}  one-endpoint change {:>9}  = nftables x {:.1} / x {:.1} / x {:.1}",
            d.name(),
            ms(f.cold),
            ms(f.full),
            ms(f.change),
            f.cold.as_secs_f64() / nft.cold.as_secs_f64(),
            f.full.as_secs_f64() / nft.full.as_secs_f64(),
            f.change.as_secs_f64() / nft.change.as_secs_f64(),
        );
    }
    let kp = kube_proxy_layout(&plan);
    let ns = Netns::new("kp");
    let kp_time = nft_alone(&ns.0, &kp);
    drop(ns);
    println!(
        "{:<22} nft -f alone {:>8}  = nftables cold start x {:.1} (one anonymous vmap per Service port, a chain per endpoint)",
        "kube-proxy's layout",
        ms(kp_time),
        kp_time.as_secs_f64() / nft.cold.as_secs_f64()
    );
    println!(
        "goals: full sync < 1 s: {}; one change < 20 ms: {}",
        if nft.full < Duration::from_secs(1) {
            "met"
        } else {
            "missed"
        },
        if nft.change < Duration::from_millis(20) {
            "met"
        } else {
            "missed"
        },
    );
    println!(
        "peak memory: bench process {:.0} MiB, largest nft child {:.0} MiB",
        vm_hwm_mib(),
        children_max_rss_mib()
    );
    drop(cluster);
    drop(plan);

    for (services, endpoints, full_goal, change_goal) in [
        (scale(5_000), 50, Duration::from_secs(20), None),
        (
            scale(44_000),
            2,
            Duration::from_secs(60),
            Some(Duration::from_millis(50)),
        ),
    ] {
        let (mut cluster, plan) = shape(services, endpoints);
        println!(
            "== {services} Services x {endpoints} endpoints ({} frontends, {} endpoints in the plan)",
            plan.frontends().count(),
            plan.endpoint_count()
        );
        let f = measure(Dialect::Nftables, &mut cluster, &plan, services, runs);
        println!(
            "{:<22} cold start {:>10}  full sync {:>10}  one-endpoint change {:>9}",
            Dialect::Nftables.name(),
            ms(f.cold),
            ms(f.full),
            ms(f.change)
        );
        print_floors(&f);
        let mut goals = format!(
            "goals: full sync < {:?}: {}",
            full_goal,
            if f.full < full_goal { "met" } else { "missed" }
        );
        if let Some(g) = change_goal {
            let _ = write!(
                goals,
                "; one change < {g:?}: {}",
                if f.change < g { "met" } else { "missed" }
            );
        }
        println!("{goals}");
        println!(
            "peak memory: bench process {:.0} MiB, largest nft child {:.0} MiB",
            vm_hwm_mib(),
            children_max_rss_mib()
        );
    }
}
