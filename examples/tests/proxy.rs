//! `svcnat-proxy` and `svcnat-ctl` end to end: the proxy runs inside each node namespace of
//! a testbed, watches a manifest directory, and real clients check what it programs.
//! The views of `svcnat-ctl` are checked against the lab's golden scenario files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use svcnat_examples::testbed::{
    Daemon, PodSpec, ProbeArgs, ProbeResult, Testbed, TestbedSpec, wait_until,
};

const PROXY: &str = env!("CARGO_BIN_EXE_svcnat-proxy");
const CTL: &str = env!("CARGO_BIN_EXE_svcnat-ctl");
const NODE_PORT: u16 = 30000;
const VOTE: [&str; 3] = ["vote-0", "vote-1", "vote-2"];

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "svcnat-proxy-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    /// Writes in place, as an editor that truncates and rewrites does.
    fn write(&self, name: &str, text: &str) {
        fs::write(self.0.join(name), text).unwrap();
    }

    fn remove(&self, name: &str) {
        fs::remove_file(self.0.join(name)).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Two nodes, one client, and the vote pods (two on node 0, one on node 1) serving TCP 8080.
fn vote_testbed() -> Testbed {
    let spec = TestbedSpec::new(2, 1)
        .binaries(svcnat_examples::testbed_binaries!())
        .pod(PodSpec::new("vote-0", 0, IpAddr::from([10, 244, 0, 10])).tcp(8080))
        .pod(PodSpec::new("vote-1", 0, IpAddr::from([10, 244, 0, 11])).tcp(8080))
        .pod(PodSpec::new("vote-2", 1, IpAddr::from([10, 244, 1, 10])).tcp(8080));
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

/// The testbed's pods as running, ready Pod objects labelled `app=vote`.
fn pods_yaml(tb: &Testbed) -> String {
    tb.pods()
        .map(|p| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  labels:\n    app: vote\nspec:\n  nodeName: node-{}\n  containers:\n  - name: vote\n    image: schoolofdevops/vote:v1\n    ports:\n    - containerPort: 8080\nstatus:\n  phase: Running\n  podIP: {}\n  conditions:\n  - type: Ready\n    status: \"True\"\n",
                p.name, p.node, p.ips[0]
            )
        })
        .collect()
}

/// The lab's NodePort Service, selecting `app=<app>`.
fn service_yaml(app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: vote\nspec:\n  type: NodePort\n  selector:\n    app: {app}\n  ports:\n  - port: 80\n    targetPort: 8080\n    nodePort: {NODE_PORT}\n"
    )
}

/// A Service whose YAML does not parse (the flow mapping on line 7 is never closed).
const BROKEN_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: vote\nspec:\n  type: NodePort\n  selector: {app: vote\n  ports:\n  - port: 80\n";

fn write_cluster(tb: &Testbed, dir: &Scratch) {
    dir.write("nodes.yaml", &nodes_yaml(tb));
    dir.write("pods.yaml", &pods_yaml(tb));
    dir.write("vote-svc.yaml", &service_yaml("vote"));
}

/// `svcnat-proxy` running inside a node namespace.
struct RunningProxy {
    daemon: Daemon,
    ns: String,
}

impl RunningProxy {
    fn start(tb: &Testbed, node: usize, dir: &Path) -> RunningProxy {
        Self::start_with(tb, node, dir, &[])
    }

    fn start_with(tb: &Testbed, node: usize, dir: &Path, extra: &[&str]) -> RunningProxy {
        let ns = tb.ns_of_node(node).to_string();
        let mut cmd = tb.command(&ns, PROXY);
        cmd.args(["--node-name", &format!("node-{node}")])
            .args(["--node-ip", &tb.node_ip(node).to_string()])
            .args(["--cluster-cidr", "10.244.0.0/16"])
            .arg("--manifests")
            .arg(dir)
            .args(["--metrics-bind-address", "127.0.0.1:10249", "-v"])
            .args(extra);
        let daemon = Daemon::spawn(cmd, &format!("node-{node}")).expect("start svcnat-proxy");
        RunningProxy { daemon, ns }
    }

    fn wait_ready(&self) {
        if let Err(e) = self.daemon.wait_ready(Duration::from_secs(30)) {
            panic!("in {}: {e}", self.ns);
        }
    }

    fn stderr(&self) -> String {
        self.daemon.stderr()
    }

    /// Sends SIGTERM and waits for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.daemon.child().id().to_string();
        let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(st.success(), "kill -TERM {pid}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.daemon.child().try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "svcnat-proxy ignored SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Connections from the client to node `node`'s NodePort. The timeout outlasts the first
/// SYN retransmission (1 s): the kernel rate-limits the ICMP errors a REJECT sends, so a
/// refusal can take a second try.
fn probe(tb: &Testbed, node: usize, count: u32) -> ProbeResult {
    let target = SocketAddr::new(tb.node_ip(node), NODE_PORT);
    tb.probe(
        tb.ns_of_client(0),
        ProbeArgs::tcp(target).count(count).timeout_ms(2500),
    )
    .expect("probe")
}

/// Waits (up to `secs`) until one connection to every node's NodePort gets `want`.
fn wait_all_nodes(tb: &Testbed, secs: u64, want: fn(&ProbeResult) -> bool) -> bool {
    wait_until(Duration::from_secs(secs), || {
        (0..2).all(|i| want(&probe(tb, i, 1)))
    })
}

fn refused(r: &ProbeResult) -> bool {
    r.refused() == 1
}

fn answered(r: &ProbeResult) -> bool {
    r.all_ok()
}

/// Whether `text` names `file` with a line number (`.../vote-svc.yaml:7:`).
fn has_file_line(text: &str, file: &str) -> bool {
    text.match_indices(&format!("{file}:")).any(|(i, m)| {
        let rest = &text[i + m.len()..];
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        digits > 0 && rest[digits..].starts_with(':')
    })
}

fn curl(tb: &Testbed, node: usize, path: &str) -> String {
    let out = tb
        .exec(
            tb.ns_of_node(node),
            [
                "curl",
                "-sS",
                "--max-time",
                "5",
                &format!("http://127.0.0.1:10249{path}"),
            ],
        )
        .expect("curl (install curl)");
    assert!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn iptables_save(tb: &Testbed, node: usize) -> String {
    save(tb, node, "iptables-save")
}

fn save(tb: &Testbed, node: usize, program: &str) -> String {
    tb.exec_ok(tb.ns_of_node(node), [program]).expect(program)
}

#[test]
fn proxy_follows_the_manifest_directory() {
    svcnat_examples::skip_unless_root!();
    let tb = vote_testbed();
    let dir = Scratch::new();
    write_cluster(&tb, &dir);
    let proxies: Vec<RunningProxy> = (0..2)
        .map(|i| RunningProxy::start(&tb, i, &dir.0))
        .collect();
    for p in &proxies {
        p.wait_ready();
    }

    // The NodePort answers on both nodes and spreads over every pod, wherever it runs.
    for i in 0..2 {
        assert!(iptables_save(&tb, i).contains("--dport 30000"));
        let r = probe(&tb, i, 45);
        assert!(r.all_ok(), "node {i}: {}", r);
        assert_eq!(
            r.pods(),
            VOTE.iter().map(|s| s.to_string()).collect(),
            "node {i}: {}",
            r
        );
    }

    // The lab's exercise: the selector changed to a label no pod has. The Service has no
    // endpoints, so its NodePort refuses connections.
    let t = Instant::now();
    dir.write("vote-svc.yaml", &service_yaml("missing"));
    assert!(wait_all_nodes(&tb, 5, refused), "still answering");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "applied after {took:?}");

    // Broken YAML: reported with file and line; the last good text (refusing) stays.
    dir.write("vote-svc.yaml", BROKEN_SERVICE);
    assert!(
        wait_until(Duration::from_secs(5), || proxies
            .iter()
            .all(|p| has_file_line(&p.stderr(), "vote-svc.yaml"))),
        "no file:line report; stderr:\n{}",
        proxies[0].stderr()
    );
    for i in 0..2 {
        let r = probe(&tb, i, 3);
        assert_eq!(r.refused(), 3, "node {i}: {}", r);
        assert!(curl(&tb, i, "/metrics").contains("\nsvcnat_manifest_errors 1\n"));
    }

    // Fixed: the pods answer again.
    dir.write("vote-svc.yaml", &service_yaml("vote"));
    assert!(wait_all_nodes(&tb, 5, answered), "not answering again");
    for i in 0..2 {
        assert!(curl(&tb, i, "/metrics").contains("\nsvcnat_manifest_errors 0\n"));
    }

    // Broken again: now the last good text is the working one, and it keeps working.
    dir.write("vote-svc.yaml", BROKEN_SERVICE);
    thread::sleep(Duration::from_millis(1500));
    for i in 0..2 {
        let r = probe(&tb, i, 10);
        assert!(r.all_ok(), "node {i}: {}", r);
    }

    // Deleted: the Service and its rules go; nothing listens on the node port.
    dir.remove("vote-svc.yaml");
    assert!(wait_all_nodes(&tb, 5, refused), "still answering");
    for i in 0..2 {
        let rules = iptables_save(&tb, i);
        assert!(!rules.contains("--dport 30000"), "node {i} rules:\n{rules}");
        assert!(curl(&tb, i, "/metrics").contains("\nsvcnat_services 0\n"));
    }
}

#[test]
fn metrics_health_sigterm_and_cleanup() {
    svcnat_examples::skip_unless_root!();
    let tb = vote_testbed();
    let dir = Scratch::new();
    write_cluster(&tb, &dir);
    // Node 0 names the legacy flavour; node 1 detects it, and resyncs every 2 s.
    let mut proxies = vec![
        RunningProxy::start_with(&tb, 0, &dir.0, &["--iptables-flavour", "legacy"]),
        RunningProxy::start_with(&tb, 1, &dir.0, &["--sync-period", "2s"]),
    ];
    for p in &proxies {
        p.wait_ready();
    }

    let metrics = curl(&tb, 0, "/metrics");
    for want in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"}",
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"}",
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"}",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count ",
        "\nsvcnat_services 1\n",
        // ClusterIP, and the NodePort on the node's LAN address and on 127.0.0.1
        // (--localhost-nodeports is on by default with iptables).
        "\nsvcnat_frontends 3\n",
        "\nsvcnat_endpoints 3\n",
        "\nsvcnat_manifest_errors 0\n",
        "\nsvcnat_sync_errors_total 0\n",
        "svcnat_sync_total{result=\"ok\",kind=\"full\"} ",
        "\nkubeproxy_sync_proxy_rules_last_timestamp_seconds ",
        "\nsvcnat_rules_written ",
    ] {
        assert!(metrics.contains(want), "no {want:?} in\n{metrics}");
    }
    let health = curl(&tb, 0, "/healthz");
    assert!(
        health.starts_with("ok\nlast successful sync: ") && health.contains("\ncurrent time: "),
        "{health}"
    );

    // Drift: someone flushes the NodePort chain on node 1; the next periodic full resync
    // rewrites it.
    let full_syncs = || {
        curl(&tb, 1, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix("svcnat_sync_total{result=\"ok\",kind=\"full\"} "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = full_syncs();
    tb.exec_ok(
        tb.ns_of_node(1),
        ["iptables", "-t", "nat", "-F", "KUBE-NODEPORTS"],
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || full_syncs() > before),
        "no full resync within 5 s"
    );
    let r = probe(&tb, 1, 5);
    assert!(r.all_ok(), "drift not repaired: {r}");

    // SIGTERM: a clean exit that leaves the rules, so traffic keeps flowing.
    let status = proxies[0].terminate();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let rules = save(&tb, 0, "iptables-legacy-save");
    assert!(rules.contains(":KUBE-SERVICES"), "rules gone:\n{rules}");
    let r = probe(&tb, 0, 5);
    assert!(r.all_ok(), "{}", r);

    // --cleanup removes every chain svcnat installed, with either flavour.
    let out = tb
        .exec(tb.ns_of_node(0), [PROXY, "--cleanup", "-v"])
        .unwrap();
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for program in ["iptables-legacy-save", "iptables-nft-save"] {
        let rules = save(&tb, 0, program);
        assert!(!rules.contains("KUBE-"), "{program}: left behind:\n{rules}");
    }
    let r = probe(&tb, 0, 3);
    assert_eq!(r.refused(), 3, "{}", r);
    // Node 1 is untouched.
    assert!(probe(&tb, 1, 3).all_ok());
    drop(proxies);
}

#[test]
fn proxy_with_the_nftables_backend() {
    svcnat_examples::skip_unless_root!();
    let tb = vote_testbed();
    let dir = Scratch::new();
    write_cluster(&tb, &dir);
    let nft = ["--backend", "nftables"];
    let mut proxies = vec![
        RunningProxy::start_with(&tb, 0, &dir.0, &nft),
        RunningProxy::start_with(&tb, 1, &dir.0, &nft),
    ];
    for p in &proxies {
        p.wait_ready();
    }
    for node in 0..2 {
        let r = probe(&tb, node, 60);
        assert!(r.all_ok(), "NodePort on node {node}: {r}");
        assert_eq!(r.pods().len(), 3, "node {node} spreads: {r}");
    }
    let list = |node: usize| {
        tb.exec(
            tb.ns_of_node(node),
            ["nft", "list", "table", "ip", "svcnat"],
        )
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let table = list(0).expect("ip svcnat");
    assert!(table.contains("map service-nodeports"), "{table}");
    assert!(
        !iptables_save(&tb, 0).contains("KUBE-"),
        "no iptables rules"
    );

    // A Service edit reaches the table: the selector to a missing label refuses.
    dir.write("vote-svc.yaml", &service_yaml("missing"));
    assert!(
        wait_all_nodes(&tb, 10, refused),
        "selector change not applied"
    );
    dir.write("vote-svc.yaml", &service_yaml("vote"));
    assert!(
        wait_all_nodes(&tb, 10, answered),
        "selector restore not applied"
    );

    // Someone deletes the table on node 1: the drift check notices, a full resync rebuilds.
    tb.exec_ok(tb.ns_of_node(1), ["nft", "delete", "table", "ip", "svcnat"])
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || list(1).is_some()),
        "the table was not rebuilt"
    );
    assert!(probe(&tb, 1, 5).all_ok());

    // SIGTERM leaves the table, so traffic keeps flowing; --cleanup removes it.
    let status = proxies[0].terminate();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(list(0).is_some(), "table gone with the proxy");
    assert!(probe(&tb, 0, 5).all_ok());
    let out = tb
        .exec(
            tb.ns_of_node(0),
            [PROXY, "--backend", "nftables", "--cleanup", "-v"],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(list(0), None, "table left behind");
    assert_eq!(probe(&tb, 0, 3).refused(), 3);
    assert!(probe(&tb, 1, 3).all_ok(), "node 1 untouched");
    drop(proxies);
}

#[test]
fn proxy_with_the_userspace_backend() {
    svcnat_examples::skip_unless_root!();
    let tb = vote_testbed();
    let dir = Scratch::new();
    write_cluster(&tb, &dir);
    let userspace = [
        "--backend",
        "userspace",
        "--interfaces",
        "eth0,vp*",
        "--workers",
        "1",
    ];
    let mut proxies = vec![
        RunningProxy::start_with(&tb, 0, &dir.0, &userspace),
        RunningProxy::start_with(&tb, 1, &dir.0, &userspace),
    ];
    for p in &proxies {
        p.wait_ready();
    }
    for node in 0..2 {
        let r = probe(&tb, node, 60);
        assert!(r.all_ok(), "NodePort on node {node}: {r}");
        assert_eq!(
            r.pods().len(),
            3,
            "node {node} spreads over the three pods: {r}"
        );
    }
    // The datapath forwards in the process: no iptables rules, its counters on /metrics.
    assert!(!iptables_save(&tb, 0).contains("KUBE-"));
    let metrics = curl(&tb, 0, "/metrics");
    for want in [
        "\nsvcnat_services 1\n",
        "svcnat_userspace_rx_frames_total ",
        "svcnat_userspace_verdicts_total{verdict=\"forward\"} ",
        "svcnat_userspace_drops_total{reason=\"truncated\"} ",
        "\nsvcnat_userspace_connections ",
    ] {
        assert!(metrics.contains(want), "no {want:?} in\n{metrics}");
    }
    let forwarded = metrics
        .lines()
        .find_map(|l| l.strip_prefix("svcnat_userspace_verdicts_total{verdict=\"forward\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(forwarded > 0, "{metrics}");

    // A Service edit reaches the datapath: the selector to a missing label refuses.
    dir.write("vote-svc.yaml", &service_yaml("missing"));
    assert!(
        wait_all_nodes(&tb, 10, refused),
        "selector change not applied"
    );
    dir.write("vote-svc.yaml", &service_yaml("vote"));
    assert!(
        wait_all_nodes(&tb, 10, answered),
        "selector restore not applied"
    );

    // Someone deletes the ingress table on node 1: the drift check notices and a full
    // resync puts it back.
    tb.exec_ok(
        tb.ns_of_node(1),
        ["nft", "delete", "table", "netdev", "svcnat"],
    )
    .unwrap();
    let restored = wait_until(Duration::from_secs(15), || {
        tb.exec(
            tb.ns_of_node(1),
            ["nft", "list", "table", "netdev", "svcnat"],
        )
        .is_ok_and(|o| o.status.success())
    });
    assert!(restored, "the ingress table was not restored");
    assert!(probe(&tb, 1, 5).all_ok());

    // SIGTERM hands forwarding back to the kernel: no ingress table, forwarding on.
    let status = proxies[0].terminate();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let out = tb
        .exec(
            tb.ns_of_node(0),
            ["nft", "list", "table", "netdev", "svcnat"],
        )
        .unwrap();
    assert!(
        !out.status.success(),
        "the ingress table outlived the proxy"
    );
    let fwd = tb
        .exec_ok(tb.ns_of_node(0), ["sysctl", "-n", "net.ipv4.ip_forward"])
        .unwrap();
    assert_eq!(fwd.trim(), "1");
    drop(proxies);
}

/// `--userspace-node-traffic`: the node's own connections to a ClusterIP go through the
/// datapath (the veth pair and the ClusterIP's route made by the proxy) to the pods of
/// both nodes, and SIGTERM removes the pair.
#[test]
fn proxy_userspace_node_traffic() {
    svcnat_examples::skip_unless_root!();
    let tb = vote_testbed();
    let dir = Scratch::new();
    write_cluster(&tb, &dir);
    dir.write(
        "vote-svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: vote\nspec:\n  clusterIP: 10.96.0.81\n  selector:\n    app: vote\n  ports:\n  - port: 80\n    targetPort: 8080\n",
    );
    let args = [
        "--backend",
        "userspace",
        "--interfaces",
        "eth0,vp*",
        "--workers",
        "1",
        "--userspace-node-traffic",
    ];
    let mut proxies = vec![
        RunningProxy::start_with(&tb, 0, &dir.0, &args),
        RunningProxy::start_with(&tb, 1, &dir.0, &args),
    ];
    for p in &proxies {
        p.wait_ready();
    }
    let node0 = tb.ns_of_node(0).to_string();
    let r = tb
        .probe(
            &node0,
            ProbeArgs::tcp(SocketAddr::new(IpAddr::from([10, 96, 0, 81]), 80))
                .count(60)
                .timeout_ms(2500),
        )
        .expect("probe");
    assert!(r.all_ok(), "ClusterIP from node 0: {r}");
    assert_eq!(r.pods().len(), 3, "both nodes' pods: {r}");
    let status = proxies[0].terminate();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let pair = tb
        .exec(&node0, ["ip", "link", "show", "svcnat-host"])
        .unwrap();
    assert!(!pair.status.success(), "the veth pair outlived the proxy");
    drop(proxies);
}

/// The node's forwarding as the userspace datapath must leave it: `ip_forward` back at its
/// original value and no ingress table.
fn assert_forwarding_given_back(tb: &Testbed, node: usize, when: &str) {
    let fwd = tb
        .exec_ok(tb.ns_of_node(node), ["sysctl", "-n", "net.ipv4.ip_forward"])
        .unwrap();
    assert_eq!(fwd.trim(), "1", "{when}: net.ipv4.ip_forward");
    let out = tb
        .exec(
            tb.ns_of_node(node),
            ["nft", "list", "table", "netdev", "svcnat"],
        )
        .unwrap();
    assert!(!out.status.success(), "{when}: the ingress table is left");
}

/// Sends `signal` to a running proxy and waits for it to exit.
fn signal_and_wait(p: &mut RunningProxy, signals: &[&str]) -> ExitStatus {
    let pid = p.daemon.child().id().to_string();
    for sig in signals {
        let st = Command::new("kill")
            .args([*sig, pid.as_str()])
            .status()
            .unwrap();
        assert!(st.success(), "kill {sig} {pid}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = p.daemon.child().try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "svcnat-proxy outlived {signals:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn userspace_never_leaves_the_node_black_holed() {
    svcnat_examples::skip_unless_root!();
    let tb = vote_testbed();
    let dir = Scratch::new();
    write_cluster(&tb, &dir);
    let userspace = [
        "--backend",
        "userspace",
        "--interfaces",
        "eth0,vp*",
        "--workers",
        "1",
    ];
    let start = || {
        let p = RunningProxy::start_with(&tb, 0, &dir.0, &userspace);
        p.wait_ready();
        assert!(probe(&tb, 0, 3).all_ok(), "{}", p.stderr());
        p
    };

    // SIGKILL leaves forwarding off and the table in place; the restarted proxy must take
    // the original from the table, not the killed one's 0, so SIGTERM restores 1.
    let mut p = start();
    p.daemon.child().kill().unwrap();
    p.daemon.child().wait().unwrap();
    let fwd = tb
        .exec_ok(tb.ns_of_node(0), ["sysctl", "-n", "net.ipv4.ip_forward"])
        .unwrap();
    assert_eq!(
        fwd.trim(),
        "0",
        "the killed datapath had turned forwarding off"
    );
    let mut p = start();
    let status = p.terminate();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert_forwarding_given_back(&tb, 0, "SIGKILL, restart, SIGTERM");

    // A second SIGTERM right behind the first exits at once, and still gives forwarding
    // back.
    let mut p = start();
    signal_and_wait(&mut p, &["-TERM", "-TERM"]);
    assert_forwarding_given_back(&tb, 0, "two SIGTERMs");

    // SIGHUP reloads and keeps serving.
    let mut p = start();
    signal_and_wait_alive(&mut p, "-HUP");
    assert!(probe(&tb, 0, 3).all_ok(), "after SIGHUP");

    // Someone flushes the ingress chains (the table stays): the kernel would deliver
    // NodePort traffic locally and refuse it. The drift check notices within its
    // interval and the proxy restores the rules.
    let listing = |tb: &Testbed| {
        tb.exec_ok(
            tb.ns_of_node(0),
            ["nft", "list", "table", "netdev", "svcnat"],
        )
        .unwrap()
    };
    assert!(listing(&tb).contains("svcnat frontend"));
    tb.exec_ok(
        tb.ns_of_node(0),
        ["nft", "flush", "table", "netdev", "svcnat"],
    )
    .unwrap();
    assert!(!listing(&tb).contains("svcnat frontend"));
    let restored = wait_until(Duration::from_secs(12), || {
        listing(&tb).contains("svcnat frontend")
    });
    assert!(
        restored,
        "the flushed chains were not restored:\n{}",
        p.stderr()
    );
    assert!(probe(&tb, 0, 5).all_ok(), "after the flush");
    let status = p.terminate();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert_forwarding_given_back(&tb, 0, "SIGTERM");
}

/// Sends `signal` and checks the proxy is still running a moment later.
fn signal_and_wait_alive(p: &mut RunningProxy, signal: &str) {
    let pid = p.daemon.child().id().to_string();
    let st = Command::new("kill").args([signal, &pid]).status().unwrap();
    assert!(st.success(), "kill {signal} {pid}");
    thread::sleep(Duration::from_millis(500));
    assert!(
        p.daemon.child().try_wait().unwrap().is_none(),
        "svcnat-proxy died of {signal}:\n{}",
        p.stderr()
    );
}

#[test]
fn invalid_flags_exit_2() {
    for flags in [&["--backend", "dpdk"][..], &["--workers", "many"][..]] {
        let out = Command::new(PROXY)
            .args(flags)
            .args(["--manifests", "/nonexistent"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
    }
    let out = Command::new(PROXY).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "--manifests is required");
}

#[test]
fn ipvs_backend_without_ipvs_exits_1_naming_the_cause() {
    if std::path::Path::new("/proc/net/ip_vs").exists() {
        eprintln!("SKIP: this kernel has IPVS (the VM tests cover that case)");
        return;
    }
    // Nothing is changed on a kernel without IPVS: the driver looks the family up first.
    let out = Command::new(PROXY)
        .args(["--backend", "ipvs", "--manifests", "/nonexistent"])
        .args(["--node-name", "n", "--metrics-bind-address", ""])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("IPVS is not available"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// svcnat-ctl against the lab's golden views
// ---------------------------------------------------------------------------------------------

fn lab_vote() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests/scenarios/lab-vote")
}

/// The output recorded under `$ <command>` in the scenario's views.txt.
fn view(command: &str) -> String {
    let text = fs::read_to_string(lab_vote().join("views.txt")).unwrap();
    let head = format!("$ {command}\n");
    let start = text.find(&head).unwrap_or_else(|| panic!("no {head:?}")) + head.len();
    let rest = &text[start..];
    let end = rest.find("\n$ ").map_or(rest.len(), |i| i + 1);
    rest[..end].trim_end_matches('\n').to_string() + "\n"
}

fn ctl(args: &[&str]) -> String {
    let out = Command::new(CTL)
        .arg("--manifests")
        .arg(lab_vote())
        .args(["--default-namespace", "instavote"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "svcnat-ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn ctl_views_match_the_lab() {
    assert_eq!(ctl(&["get", "svc", "-A"]), view("kubectl get svc -A"));
    assert_eq!(
        ctl(&["get", "endpoints", "-A"]),
        view("kubectl get endpoints -A")
    );
    assert_eq!(
        ctl(&["get", "pods", "-A", "-o", "wide"]),
        view("kubectl get pods -A -o wide")
    );
    assert_eq!(
        ctl(&["describe", "service", "-n", "instavote", "vote"]),
        view("kubectl describe service -n instavote vote")
    );
    // Without -A: the default namespace, and no NAMESPACE column.
    let svc = ctl(&["get", "svc"]);
    assert!(svc.starts_with("NAME   TYPE       CLUSTER-IP"), "{svc}");
    assert!(svc.contains("vote   NodePort   10.99.113.112   <none>        80:30000/TCP"));
    // Without -o wide: no IP and NODE columns.
    let pods = ctl(&["get", "pods"]);
    assert!(
        pods.starts_with("NAME         READY   STATUS    RESTARTS   AGE\n"),
        "{pods}"
    );
    assert!(!pods.contains("10.32.0.6"));
}

#[test]
fn ctl_plan_matches_the_lab() {
    let plan = ctl(&[
        "plan",
        "--node-name",
        "k-02",
        "--node-ip",
        "192.168.50.12",
        "--cluster-cidr",
        "10.32.0.0/12",
        "--chain-ids",
        "legacy",
    ]);
    let golden = fs::read_to_string(lab_vote().join("plan.txt")).unwrap();
    assert_eq!(plan, golden);
}

#[test]
fn ctl_reports_broken_files() {
    let dir = Scratch::new();
    dir.write("a.yaml", &service_yaml("vote"));
    dir.write("b.yaml", BROKEN_SERVICE);
    let out = Command::new(CTL)
        .arg("--manifests")
        .arg(&dir.0)
        .args(["get", "svc"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("vote   NodePort"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(has_file_line(&stderr, "b.yaml"), "{stderr}");
    let missing = Command::new(CTL)
        .arg("--manifests")
        .arg(&dir.0)
        .args(["describe", "svc", "nope"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
}

/// `svcnat-proxy --backend iptables` on dual-stack nodes: one `RequireDualStack` Service
/// (a cluster IP per family, a NodePort) reached over IPv4 and IPv6, its rules in both
/// iptables and ip6tables, the pods' IPv6 addresses taken from `podIPs`.
#[test]
fn proxy_programs_both_families() {
    svcnat_examples::skip_unless_root!();
    let pod6 = |node: u16, n: u16| IpAddr::from([0xfd00, 0x10, 0x244, node, 0, 0, 0, n]);
    let spec = TestbedSpec::new(2, 1)
        .with_ipv6()
        .binaries(svcnat_examples::testbed_binaries!())
        .pod(
            PodSpec::new("vote-0", 0, IpAddr::from([10, 244, 0, 10]))
                .with_ip(pod6(0, 10))
                .tcp(8080),
        )
        .pod(
            PodSpec::new("vote-1", 0, IpAddr::from([10, 244, 0, 11]))
                .with_ip(pod6(0, 11))
                .tcp(8080),
        )
        .pod(
            PodSpec::new("vote-2", 1, IpAddr::from([10, 244, 1, 10]))
                .with_ip(pod6(1, 10))
                .tcp(8080),
        );
    let tb = Testbed::new(spec).expect("testbed");
    let dir = Scratch::new();
    let nodes: String = tb
        .nodes()
        .iter()
        .map(|n| {
            format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nspec:\n  podCIDRs: [{}, {}]\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {}\n  - type: InternalIP\n    address: {}\n",
                n.name,
                n.pod_cidrs[0],
                n.pod_cidrs[1],
                n.ip,
                n.ip6.expect("node IPv6 address")
            )
        })
        .collect();
    let pods: String = tb
        .pods()
        .map(|p| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  labels:\n    app: vote\nspec:\n  nodeName: node-{}\n  containers:\n  - name: vote\n    image: schoolofdevops/vote:v1\n    ports:\n    - containerPort: 8080\nstatus:\n  phase: Running\n  podIP: {}\n  podIPs:\n  - ip: {}\n  - ip: {}\n  conditions:\n  - type: Ready\n    status: \"True\"\n",
                p.name, p.node, p.ips[0], p.ips[0], p.ips[1]
            )
        })
        .collect();
    dir.write("nodes.yaml", &nodes);
    dir.write("pods.yaml", &pods);
    dir.write(
        "vote-svc.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: vote\nspec:\n  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [10.96.0.80, \"fd00:10:96::80\"]\n  selector:\n    app: vote\n  ports:\n  - port: 80\n    targetPort: 8080\n    nodePort: {NODE_PORT}\n"
        ),
    );
    let proxies: Vec<RunningProxy> = (0..2)
        .map(|i| {
            let v6 = tb.node_ip6(i).expect("node IPv6").to_string();
            RunningProxy::start_with(
                &tb,
                i,
                &dir.0,
                &[
                    "--node-ip",
                    &v6,
                    "--cluster-cidr",
                    "fd00:10:244::/48",
                    "--service-cidr",
                    "10.96.0.0/12,fd00:10:96::/108",
                ],
            )
        })
        .collect();
    for p in &proxies {
        p.wait_ready();
    }
    let want: std::collections::BTreeSet<String> = VOTE.iter().map(|s| s.to_string()).collect();
    for i in 0..2 {
        for (program, what) in [("iptables-save", "IPv4"), ("ip6tables-save", "IPv6")] {
            let rules = save(&tb, i, program);
            assert!(
                rules.contains("--dport 30000"),
                "node {i} {what} rules:\n{rules}"
            );
        }
        let node6 = tb.node_ip6(i).expect("node IPv6");
        for target in [tb.node_ip(i), node6] {
            let target = SocketAddr::new(target, NODE_PORT);
            let r = tb
                .probe(tb.ns_of_client(0), ProbeArgs::tcp(target).count(45))
                .expect("probe");
            assert!(r.all_ok(), "NodePort {target}: {r}");
            assert_eq!(r.pods(), want, "NodePort {target}: {r}");
        }
    }
    let pod_ns = tb.ns_of_pod("vote-0").expect("pod namespace").to_string();
    for vip in ["10.96.0.80", "fd00:10:96::80"] {
        let target = SocketAddr::new(vip.parse().expect("address"), 80);
        let r = tb
            .probe(&pod_ns, ProbeArgs::tcp(target).count(45))
            .expect("probe");
        assert!(r.all_ok(), "ClusterIP {target}: {r}");
        assert_eq!(r.pods(), want, "ClusterIP {target}: {r}");
    }
    drop(proxies);
}
