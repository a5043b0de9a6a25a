//! Faults against real kernels, in namespaces: nothing is lost.
//!
//! - `iptables-restore` fails in the middle of a sync: the previous rules stay in force
//!   (a Service keeps answering real connections) and the next sync repairs (both flavours).
//! - `svcnat-proxy` is killed with SIGKILL while `iptables-restore` applies a large
//!   manifest set, and restarted with a changed set: it converges to exactly the rules a
//!   clean start produces (no stale chains), and traffic flows.
//! - Someone flushes and deletes the nat table's chains under a running proxy: the canary
//!   check between syncs notices and a full resync repairs, long before the periodic one.
//! - The manifest directory disappears (renamed away, or deleted) and returns: the last
//!   good rules stay in force meanwhile, the proxy says so, and picks up what returns.
//! - `/metrics` binds loopback by default: it answers inside the node and is unreachable at
//!   the node's address from another namespace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use svcnat_core::manifest::{ClusterConfig, Manifests};
use svcnat_core::model::Cluster;
use svcnat_core::plan::{Dataplane, NodeContext, Plan};
use svcnat_examples::testbed::{
    Daemon, PodSpec, ProbeArgs, ProbeResult, Testbed, TestbedSpec, wait_until,
};
use svcnat_iptables::driver::{Flavour, Iptables, IptablesConfig, Runner, SyncError};

const PROXY: &str = env!("CARGO_BIN_EXE_svcnat-proxy");
const NODE_PORT: u16 = 30000;

/// A scratch directory removed on drop (with whatever it was renamed to).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "svcnat-faults-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    fn write(&self, name: &str, text: &str) {
        fs::write(self.0.join(name), text).unwrap();
    }

    fn away(&self) -> PathBuf {
        self.0.with_extension("away")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
        let _ = fs::remove_dir_all(self.away());
    }
}

/// One node, two clients, two vote pods on the node serving TCP 8080.
fn testbed() -> Testbed {
    let spec = TestbedSpec::new(1, 2)
        .binaries(svcnat_examples::testbed_binaries!())
        .pod(PodSpec::new("vote-0", 0, IpAddr::from([10, 244, 0, 10])).tcp(8080))
        .pod(PodSpec::new("vote-1", 0, IpAddr::from([10, 244, 0, 11])).tcp(8080));
    Testbed::new(spec).expect("testbed")
}

fn nodes_yaml(tb: &Testbed) -> String {
    tb.nodes()
        .iter()
        .map(|n| {
            format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nspec:\n  podCIDR: {}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {}\n",
                n.name, n.pod_cidrs[0], n.ip
            )
        })
        .collect()
}

fn pod_yaml(name: &str, app: &str, ip: IpAddr) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {app}}}\nspec:\n  nodeName: node-0\n  containers: [{{name: c, image: c, ports: [{{containerPort: 8080}}]}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n"
    )
}

/// The testbed's pods, labelled `app=vote`.
fn pods_yaml(tb: &Testbed) -> String {
    tb.pods()
        .map(|p| pod_yaml(&p.name, "vote", p.ips[0]))
        .collect()
}

/// A NodePort Service named `name` on `node_port`, selecting `app=<app>`.
fn service_yaml(name: &str, app: &str, node_port: u16) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: NodePort\n  selector: {{app: {app}}}\n  ports:\n  - port: 80\n    targetPort: 8080\n    nodePort: {node_port}\n"
    )
}

/// `n` ClusterIP Services starting at `first`, each with one (address-only) endpoint.
fn bulk_yaml(first: usize, n: usize) -> String {
    let mut out = String::new();
    for i in first..first + n {
        write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: bulk-{i}\nspec:\n  clusterIP: 10.{}.{}.{}\n  selector: {{app: bulk-{i}}}\n  ports: [{{port: 80, targetPort: 8080}}]\n{}",
            100 + i / 65_536,
            (i / 256) % 256,
            i % 256,
            pod_yaml(
                &format!("bulk-{i}"),
                &format!("bulk-{i}"),
                IpAddr::from([10, 244, 100 + (i / 256) as u8, (i % 256) as u8]),
            )
        )
        .unwrap();
    }
    out
}

fn cluster_of(texts: &[(&str, &str)]) -> Cluster {
    let cfg = ClusterConfig::default();
    let mut m = Manifests::from_files(texts.iter().copied(), &cfg);
    let c = m.build(&cfg);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    c
}

/// `count` connections from client `client` to the node's NodePort `port`.
fn probe(tb: &Testbed, client: usize, port: u16, count: u32) -> ProbeResult {
    let target = SocketAddr::new(tb.node_ip(0), port);
    tb.probe(
        tb.ns_of_client(client),
        ProbeArgs::tcp(target).count(count).timeout_ms(2500),
    )
    .expect("probe")
}

fn answered(tb: &Testbed, port: u16) -> bool {
    probe(tb, 0, port, 1).all_ok()
}

fn refused(tb: &Testbed, port: u16) -> bool {
    probe(tb, 0, port, 1).refused() == 1
}

/// The rules of every table as `iptables-save` shows them, chain by chain, without counters
/// and comments: what two runs must agree on.
fn rules_by_chain(save: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or("");
            out.entry(format!("{table}/{chain}")).or_default();
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            out.entry(format!("{table}/{chain}"))
                .or_default()
                .push(rule.to_string());
        }
    }
    out
}

/// `svcnat-proxy` running inside the node namespace.
struct RunningProxy(Daemon);

impl RunningProxy {
    fn start(tb: &Testbed, dir: &Path, extra: &[&str]) -> RunningProxy {
        let mut cmd = tb.command(tb.ns_of_node(0), PROXY);
        cmd.args(["--node-name", "node-0"])
            .args(["--node-ip", &tb.node_ip(0).to_string()])
            .args(["--cluster-cidr", "10.244.0.0/16"])
            .arg("--manifests")
            .arg(dir)
            .arg("-v")
            .args(extra);
        RunningProxy(Daemon::spawn(cmd, "proxy").expect("start svcnat-proxy"))
    }

    fn wait_ready(&self) {
        if let Err(e) = self.0.wait_ready(Duration::from_secs(120)) {
            panic!("{e}");
        }
    }

    fn stderr(&self) -> String {
        self.0.stderr()
    }

    fn logged(&self, what: &str, secs: u64) -> bool {
        self.0.logged(what, Duration::from_secs(secs))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn kill9(&mut self) {
        let st = Command::new("kill")
            .args(["-KILL", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        self.0.child().wait().unwrap();
    }
}

/// The children of `pid` whose command line contains `what`.
fn children_running(pid: u32, what: &str) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    entries.filter_map(Result::ok).any(|e| {
        let p = e.path();
        let Ok(status) = fs::read_to_string(p.join("status")) else {
            return false;
        };
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .map(str::trim);
        ppid == Some(pid.to_string().as_str())
            && fs::read(p.join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(what))
    })
}

fn save(tb: &Testbed, program: &str) -> String {
    tb.exec_ok(tb.ns_of_node(0), [program]).expect(program)
}

/// The iptables flavour that holds the proxy's rules in the node.
fn flavour_in_use(tb: &Testbed) -> &'static str {
    if save(tb, "iptables-nft-save").contains(":KUBE-PROXY-CANARY") {
        "nft"
    } else {
        "legacy"
    }
}

fn restore_failure(flavour: Flavour) {
    let tag = match flavour {
        Flavour::Legacy => "legacy",
        Flavour::Nft => "nft",
    };
    let tb = testbed();
    let ns = tb.ns_of_node(0).to_string();
    let node = NodeContext::new(
        "node-0",
        vec![tb.node_ip(0)],
        vec!["10.244.0.0/16".parse().unwrap()],
    );
    // Strict: the first foreign reference to a chain svcnat must delete fails the sync
    // (by default a few dozen are tolerated, the chains kept flushed), which is the
    // failure this test needs.
    let mut dp = Iptables::new(IptablesConfig {
        runner: Runner::netns(ns.clone()),
        flavour: Some(flavour),
        canary_interval: Duration::ZERO,
        max_kept_chains: 0,
        ..IptablesConfig::default()
    })
    .unwrap();
    let nodes = nodes_yaml(&tb);
    let pods = pods_yaml(&tb);
    let extra = pod_yaml("gamma-0", "gamma", IpAddr::from([10, 244, 0, 99]));
    let vote = service_yaml("vote", "vote", NODE_PORT);
    let gamma = service_yaml("gamma", "gamma", 30001);
    let a = cluster_of(&[
        ("nodes.yaml", &nodes),
        ("pods.yaml", &pods),
        ("extra.yaml", &extra),
        ("svc.yaml", &format!("{vote}{gamma}")),
    ]);
    let plan_a = Plan::compile(&a, &node);
    dp.resync(&plan_a).unwrap();
    assert!(answered(&tb, NODE_PORT), "{tag}: vote answers");

    // A foreign rule refers to gamma's endpoint chain, so the next sync, which deletes
    // gamma and empties vote, fails in the middle of its restore.
    let saved = save(&tb, &format!("iptables-{tag}-save"));
    let sep = saved
        .lines()
        .filter_map(|l| l.strip_prefix("-A "))
        .find(|l| l.starts_with("KUBE-SEP-") && l.contains("10.244.0.99/32"))
        .and_then(|l| l.split_whitespace().next())
        .expect("gamma's endpoint chain")
        .to_string();
    let run = |verb: &str| {
        let program = format!("iptables-{tag}");
        let args = [
            &program,
            "-t",
            "nat",
            verb,
            "OUTPUT",
            "-d",
            "192.0.2.99",
            "-j",
            &sep,
        ];
        tb.exec_ok(&ns, args).unwrap();
    };
    run("-I");
    let b = cluster_of(&[
        ("nodes.yaml", &nodes),
        ("pods.yaml", &pods),
        ("svc.yaml", &service_yaml("vote", "missing", NODE_PORT)),
    ]);
    let plan_b = Plan::compile(&b, &node);
    let before = rules_by_chain(&save(&tb, &format!("iptables-{tag}-save")));
    let err = dp.sync(&plan_b, &Plan::diff(&plan_a, &plan_b)).unwrap_err();
    assert!(
        matches!(&err, SyncError::Restore { line: Some(_), .. }),
        "{tag}: a restore error naming its line: {err}"
    );
    // Nothing half-applied, and real traffic still reaches the old endpoints.
    assert_eq!(
        rules_by_chain(&save(&tb, &format!("iptables-{tag}-save"))),
        before,
        "{tag}: the failed restore changed the tables"
    );
    let r = probe(&tb, 0, NODE_PORT, 20);
    assert!(r.all_ok(), "{tag}: old rules in force: {r}");
    assert_eq!(r.pods().len(), 2, "{tag}: both endpoints: {r}");

    // The reference is gone: the next sync (a full one, after the failure) applies the new
    // plan, and vote, now without endpoints, refuses.
    run("-D");
    let report = dp.sync(&plan_b, &Plan::diff(&plan_a, &plan_b)).unwrap();
    assert!(report.full, "{tag}: a full resync after a failure");
    let r = probe(&tb, 0, NODE_PORT, 3);
    assert_eq!(r.refused(), 3, "{tag}: the new plan is in force: {r}");
    let after = save(&tb, &format!("iptables-{tag}-save"));
    assert!(
        !after.contains(&sep),
        "{tag}: gamma's chain removed:\n{after}"
    );
    assert!(!after.contains("gamma"), "{tag}: gamma gone:\n{after}");
    dp.cleanup().unwrap();
}

#[test]
fn a_failed_restore_keeps_traffic_flowing_and_the_next_sync_repairs() {
    svcnat_examples::skip_unless_root!();
    restore_failure(Flavour::Legacy);
    restore_failure(Flavour::Nft);
}

#[test]
fn sigkill_mid_sync_then_restart_converges_to_a_clean_state() {
    svcnat_examples::skip_unless_root!();
    let tb = testbed();
    let dir = Scratch::new();
    dir.write("nodes.yaml", &nodes_yaml(&tb));
    dir.write("pods.yaml", &pods_yaml(&tb));
    dir.write("vote.yaml", &service_yaml("vote", "vote", NODE_PORT));
    let mut proxy = RunningProxy::start(&tb, &dir.0, &[]);
    proxy.wait_ready();
    assert!(answered(&tb, NODE_PORT));

    // A large set arrives; the proxy is killed while iptables-restore applies it.
    dir.write("bulk.yaml", &bulk_yaml(0, 3000));
    let caught = wait_until(Duration::from_secs(60), || {
        children_running(proxy.pid(), "restore")
    });
    proxy.kill9();
    eprintln!(
        "killed {} iptables-restore",
        if caught { "during" } else { "without catching" }
    );
    assert!(caught, "never saw the proxy's iptables-restore");
    // Give an orphaned restore time to finish or fail on its cut input.
    thread::sleep(Duration::from_millis(500));

    // Restarted on a changed set (half of the bulk Services gone, one new): it converges.
    dir.write("bulk.yaml", &bulk_yaml(1500, 1501));
    let proxy = RunningProxy::start(&tb, &dir.0, &[]);
    proxy.wait_ready();
    let flavour = flavour_in_use(&tb);
    let program = format!("iptables-{flavour}-save");
    let converged = save(&tb, &program);
    assert!(answered(&tb, NODE_PORT), "traffic after the restart");
    let r = probe(&tb, 1, NODE_PORT, 20);
    assert!(r.all_ok(), "{r}");
    drop(proxy);

    // What a clean start on the same set produces.
    tb.exec_ok(tb.ns_of_node(0), [PROXY, "--cleanup"]).unwrap();
    let empty = save(&tb, &program);
    assert!(!empty.contains("KUBE-"), "cleanup left:\n{empty}");
    let clean_proxy = RunningProxy::start(&tb, &dir.0, &[]);
    clean_proxy.wait_ready();
    let clean = save(&tb, &program);
    drop(clean_proxy);
    let (got, want) = (rules_by_chain(&converged), rules_by_chain(&clean));
    let stale: Vec<&String> = got.keys().filter(|c| !want.contains_key(*c)).collect();
    assert!(
        stale.is_empty(),
        "stale chains after the restart: {stale:?}"
    );
    let missing: Vec<&String> = want.keys().filter(|c| !got.contains_key(*c)).collect();
    assert!(
        missing.is_empty(),
        "chains missing after the restart: {missing:?}"
    );
    for (chain, rules) in &want {
        assert_eq!(&got[chain], rules, "{chain} differs from a clean start");
    }
    let services = converged
        .matches("cluster IP\" -m tcp --dport 80 -j KUBE-SVC-")
        .count();
    assert_eq!(services, 1501 + 1, "bulk Services and vote");
    tb.exec_ok(tb.ns_of_node(0), [PROXY, "--cleanup"]).unwrap();
}

#[test]
fn a_flushed_nat_table_is_repaired_by_the_canary() {
    svcnat_examples::skip_unless_root!();
    let tb = testbed();
    let dir = Scratch::new();
    dir.write("nodes.yaml", &nodes_yaml(&tb));
    dir.write("pods.yaml", &pods_yaml(&tb));
    dir.write("vote.yaml", &service_yaml("vote", "vote", NODE_PORT));
    // No periodic resync in the test's lifetime: only the canary can repair.
    let proxy = RunningProxy::start(&tb, &dir.0, &["--sync-period", "1h"]);
    proxy.wait_ready();
    assert!(answered(&tb, NODE_PORT));
    let flavour = flavour_in_use(&tb);
    let ipt = format!("iptables-{flavour}");
    tb.exec_ok(tb.ns_of_node(0), [ipt.as_str(), "-t", "nat", "-F"])
        .unwrap();
    tb.exec_ok(tb.ns_of_node(0), [ipt.as_str(), "-t", "nat", "-X"])
        .unwrap();
    assert!(refused(&tb, NODE_PORT), "the flush took the NodePort away");
    // The canary is checked every 10 s between syncs.
    assert!(
        proxy.logged("canary gone", 30),
        "no canary report; stderr:\n{}",
        proxy.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(10), || answered(&tb, NODE_PORT)),
        "not repaired"
    );
    let r = probe(&tb, 1, NODE_PORT, 20);
    assert!(r.all_ok(), "{r}");
    let saved = save(&tb, &format!("{ipt}-save"));
    assert_eq!(
        saved
            .lines()
            .filter(|l| l.starts_with("-A PREROUTING") && l.ends_with("-j KUBE-SERVICES"))
            .count(),
        1,
        "{saved}"
    );
    drop(proxy);
    tb.exec_ok(tb.ns_of_node(0), [PROXY, "--cleanup"]).unwrap();
}

#[test]
fn a_vanished_manifest_directory_keeps_the_last_rules_until_it_returns() {
    svcnat_examples::skip_unless_root!();
    let tb = testbed();
    let dir = Scratch::new();
    dir.write("nodes.yaml", &nodes_yaml(&tb));
    dir.write("pods.yaml", &pods_yaml(&tb));
    dir.write("vote.yaml", &service_yaml("vote", "vote", NODE_PORT));
    let proxy = RunningProxy::start(&tb, &dir.0, &[]);
    proxy.wait_ready();
    assert!(answered(&tb, NODE_PORT));

    // Renamed away: reported, and the rules stay.
    fs::rename(&dir.0, dir.away()).unwrap();
    assert!(
        proxy.logged("cannot read the source; everything stays as it is", 5),
        "{}",
        proxy.stderr()
    );
    for _ in 0..3 {
        let r = probe(&tb, 0, NODE_PORT, 5);
        assert!(r.all_ok(), "while the directory is gone: {r}");
        thread::sleep(Duration::from_millis(400));
    }

    // It returns with a change (vote now selects nothing): picked up.
    fs::write(
        dir.away().join("vote.yaml"),
        service_yaml("vote", "missing", NODE_PORT),
    )
    .unwrap();
    fs::rename(dir.away(), &dir.0).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || refused(&tb, NODE_PORT)),
        "the returned contents were not applied"
    );
    assert!(proxy.logged("the source is readable again", 5));
    dir.write("vote.yaml", &service_yaml("vote", "vote", NODE_PORT));
    assert!(wait_until(Duration::from_secs(5), || answered(
        &tb, NODE_PORT
    )));

    // Deleted outright (files first, then the directory): the rules stay.
    fs::remove_dir_all(&dir.0).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || proxy
            .stderr()
            .matches("cannot read the source; everything stays as it is")
            .count()
            == 2),
        "{}",
        proxy.stderr()
    );
    for _ in 0..3 {
        let r = probe(&tb, 0, NODE_PORT, 5);
        assert!(r.all_ok(), "while the directory is deleted: {r}");
        thread::sleep(Duration::from_millis(400));
    }
    // Recreated in one step (as a ConfigMap volume swaps its data), with one more Service.
    let staging = dir.away();
    fs::create_dir_all(&staging).unwrap();
    fs::write(staging.join("nodes.yaml"), nodes_yaml(&tb)).unwrap();
    fs::write(staging.join("pods.yaml"), pods_yaml(&tb)).unwrap();
    fs::write(
        staging.join("vote.yaml"),
        format!(
            "{}{}",
            service_yaml("vote", "vote", NODE_PORT),
            service_yaml("vote2", "vote", NODE_PORT + 1)
        ),
    )
    .unwrap();
    fs::rename(&staging, &dir.0).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || answered(&tb, NODE_PORT + 1)),
        "the new Service was not picked up"
    );
    let r = probe(&tb, 1, NODE_PORT, 10);
    assert!(r.all_ok(), "{r}");
    drop(proxy);
    tb.exec_ok(tb.ns_of_node(0), [PROXY, "--cleanup"]).unwrap();
}

#[test]
fn metrics_on_loopback_health_on_every_address_each_with_its_own_budget() {
    svcnat_examples::skip_unless_root!();
    let tb = testbed();
    let dir = Scratch::new();
    dir.write("nodes.yaml", &nodes_yaml(&tb));
    dir.write("pods.yaml", &pods_yaml(&tb));
    dir.write("vote.yaml", &service_yaml("vote", "vote", NODE_PORT));
    let proxy = RunningProxy::start(&tb, &dir.0, &[]);
    proxy.wait_ready();
    let inside = tb
        .exec_ok(
            tb.ns_of_node(0),
            [
                "curl",
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:10249/metrics",
            ],
        )
        .expect("metrics on loopback inside the node");
    assert!(inside.contains("svcnat_sync_total"), "{inside}");
    // From a client, at the node's address: nothing listens there.
    let url = format!("http://{}:10249/metrics", tb.node_ip(0));
    let out = tb
        .exec(tb.ns_of_client(0), ["curl", "-sS", "--max-time", "5", &url])
        .unwrap();
    assert!(!out.status.success(), "metrics reachable from a client");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to connect"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The node's own address inside the node is not loopback either.
    let out = tb
        .exec(tb.ns_of_node(0), ["curl", "-sS", "--max-time", "5", &url])
        .unwrap();
    assert!(!out.status.success(), "metrics bound beyond loopback");

    // kube-proxy's health port answers on every address (load balancers probe it), with
    // /healthz and /livez only.
    let health = format!("http://{}:10256", tb.node_ip(0));
    let get = |ns: &str, path: &str| {
        tb.exec_ok(
            ns,
            [
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                &format!("{health}{path}"),
            ],
        )
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    };
    let client = tb.ns_of_client(0);
    let healthz = get(client, "/healthz");
    assert!(
        healthz.starts_with("ok\n") && healthz.ends_with("\n200"),
        "{healthz}"
    );
    assert!(get(client, "/livez").ends_with("\n200"));
    let metrics = get(client, "/metrics");
    assert!(metrics.ends_with("\n404"), "{metrics}");

    // 16 idle connections take every metrics slot: a 17th metrics request is closed
    // unanswered, while the health port, with a budget of its own, still answers.
    let script = format!(
        "for fd in $(seq 3 18); do eval \"exec $fd<>/dev/tcp/127.0.0.1/10249\"; done; \
         sleep 0.2; \
         echo metrics=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 1 http://127.0.0.1:10249/metrics); \
         echo health=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 1 {health}/healthz)"
    );
    let out = tb
        .exec_ok(tb.ns_of_node(0), ["bash", "-c", &script])
        .expect("starvation script");
    assert!(
        out.contains("metrics=000"),
        "the metrics cap did not engage: {out}"
    );
    assert!(out.contains("health=200"), "health checks starved: {out}");
    drop(proxy);
    tb.exec_ok(tb.ns_of_node(0), [PROXY, "--cleanup"]).unwrap();
}

#[test]
fn sighup_reloads_instead_of_killing_the_proxy() {
    svcnat_examples::skip_unless_root!();
    let tb = testbed();
    let dir = Scratch::new();
    dir.write("nodes.yaml", &nodes_yaml(&tb));
    dir.write("pods.yaml", &pods_yaml(&tb));
    dir.write("vote.yaml", &service_yaml("vote", "vote", NODE_PORT));
    let proxy = RunningProxy::start(&tb, &dir.0, &[]);
    proxy.wait_ready();
    let program = format!("iptables-{}-save", flavour_in_use(&tb));
    let rules = |tb: &Testbed| -> Vec<String> {
        save(tb, &program)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(str::to_string)
            .collect()
    };
    let before = rules(&tb);
    for round in 1..=2 {
        let syncs = proxy.stderr().matches(" synced").count();
        let st = Command::new("kill")
            .args(["-HUP", &proxy.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        // Each reload rewrites everything: a sync follows each signal.
        assert!(
            wait_until(Duration::from_secs(10), || {
                let err = proxy.stderr();
                err.matches("reload asked (SIGHUP)").count() >= round
                    && err.matches(" synced").count() > syncs
            }),
            "{}",
            proxy.stderr()
        );
    }
    assert!(
        Path::new(&format!("/proc/{}", proxy.pid())).exists(),
        "SIGHUP killed the proxy: {}",
        proxy.stderr()
    );
    let r = tb
        .probe(
            tb.ns_of_client(0),
            ProbeArgs::tcp(SocketAddr::new(tb.node_ip(0), NODE_PORT)).count(5),
        )
        .unwrap();
    assert!(r.all_ok(), "{r}");
    assert_eq!(rules(&tb), before);
    drop(proxy);
    tb.exec_ok(tb.ns_of_node(0), [PROXY, "--cleanup"]).unwrap();
}

/// A previous kube-proxy left legacy-flavour rules that DNAT the NodePort to a pod that is
/// gone (both flavours' NAT hooks see every packet, so whichever registered first would
/// decide); svcnat-proxy (nft flavour) removes them at start, as kube-proxy does, and the
/// NodePort reaches the real pods.
#[test]
fn stale_rules_of_the_other_flavour_are_removed_at_start() {
    svcnat_examples::skip_unless_root!();
    let tb = testbed();
    let stale = format!(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SVC-STALE0123456789 - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         -A KUBE-NODEPORTS -p tcp -m tcp --dport {NODE_PORT} -j KUBE-SVC-STALE0123456789\n\
         -A KUBE-SVC-STALE0123456789 -p tcp -j DNAT --to-destination 10.244.0.250:8080\n\
         COMMIT\n"
    );
    let mut cmd = tb.command(tb.ns_of_node(0), "iptables-legacy-restore");
    cmd.arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stale.as_bytes())
            .unwrap();
    }
    assert!(
        child.wait().unwrap().success(),
        "legacy restore of the stale rules"
    );
    assert!(save(&tb, "iptables-legacy-save").contains(":KUBE-SVC-STALE0123456789"));

    let dir = Scratch::new();
    dir.write("nodes.yaml", &nodes_yaml(&tb));
    dir.write("pods.yaml", &pods_yaml(&tb));
    dir.write("vote.yaml", &service_yaml("vote", "vote", NODE_PORT));
    let proxy = RunningProxy::start(&tb, &dir.0, &["--iptables-flavour", "nft"]);
    proxy.wait_ready();
    assert!(
        proxy
            .stderr()
            .contains("removed stale KUBE-* rules and chains of the other iptables flavour"),
        "{}",
        proxy.stderr()
    );
    let legacy = save(&tb, "iptables-legacy-save");
    assert!(!legacy.contains("KUBE-"), "{legacy}");
    let r = tb
        .probe(
            tb.ns_of_client(0),
            ProbeArgs::tcp(SocketAddr::new(tb.node_ip(0), NODE_PORT)).count(10),
        )
        .unwrap();
    assert!(r.all_ok(), "{r}");
    drop(proxy);
    tb.exec_ok(tb.ns_of_node(0), [PROXY, "--cleanup"]).unwrap();
}
