//! `svcnat-proxy --kubeconfig` end to end: the proxy (iptables backend) runs inside a
//! testbed node namespace and follows the fake API server, which listens on that
//! namespace's loopback (`FakeApiOptions::netns`: nothing is bound in the root namespace).
//! The cluster is written as API objects: Services with selectors and the EndpointSlices the
//! EndpointSlice controller would write for them (the testbed's pod IPs and node names).
//! Real connections check what the proxy programs:
//!
//! - a ClusterIP (from a pod) and a NodePort (from a client) reach every endpoint; a slice
//!   scaled down to one endpoint moves all traffic there; a deleted Service refuses;
//! - the API server stopped mid-watch: an established connection and new ones keep working,
//!   the rules stay exactly as they were through periodic full resyncs, `/healthz` stays 200
//!   and says the API server is unreachable;
//! - a Service deleted while the API server is away is gone after it returns and the proxy
//!   re-lists (its traffic refused), while the other Service answers throughout;
//! - `410 Expired` (compaction) in the middle of a burst of slice updates: the final rules
//!   hold exactly the last slice's endpoints;
//! - `/healthz` turns 503 only when syncs stop succeeding (a foreign rule pins a chain the
//!   proxy must delete, with `--iptables-max-kept-chains 0`), and 200 again once they
//!   succeed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use svcnat_examples::fakeapi::{FakeApiOptions, FakeApiServer, Verb};
use svcnat_examples::testbed::{
    Daemon, PodSpec, ProbeArgs, ProbeResult, Testbed, TestbedSpec, wait_until,
};

const PROXY: &str = env!("CARGO_BIN_EXE_svcnat-proxy");
/// The namespace of every Service.
const NS: &str = "shop";
const POD_PORT: u16 = 8080;
/// The pods behind the Services (the tester pod is never an endpoint).
const WEB: [&str; 3] = ["web-0", "web-1", "web-2"];
/// Generous bound for anything that crosses the API server, the watch and a sync.
const CONVERGE: Duration = Duration::from_secs(60);

/// A Service of the test: name, ClusterIP, NodePort.
#[derive(Clone, Copy)]
struct Svc {
    name: &'static str,
    ip: [u8; 4],
    node_port: u16,
}

const FRONT: Svc = Svc {
    name: "front",
    ip: [10, 96, 0, 80],
    node_port: 30080,
};
const CART: Svc = Svc {
    name: "cart",
    ip: [10, 96, 0, 81],
    node_port: 30081,
};

/// Two nodes, one client; web-0 and web-1 on node 0, web-2 on node 1, and a tester pod on
/// node 0 that probes ClusterIPs.
fn testbed() -> Testbed {
    let spec = TestbedSpec::new(2, 1)
        .binaries(svcnat_examples::testbed_binaries!())
        .pod(PodSpec::new("web-0", 0, IpAddr::from([10, 244, 0, 10])).tcp(POD_PORT))
        .pod(PodSpec::new("web-1", 0, IpAddr::from([10, 244, 0, 11])).tcp(POD_PORT))
        .pod(PodSpec::new("web-2", 1, IpAddr::from([10, 244, 1, 10])).tcp(POD_PORT))
        .pod(PodSpec::new("tester", 0, IpAddr::from([10, 244, 0, 50])).tcp(POD_PORT));
    Testbed::new(spec).expect("testbed")
}

/// The fake API server on node 0's loopback, with the testbed's Nodes.
fn api_server(tb: &Testbed) -> FakeApiServer {
    let api = FakeApiServer::with_options(FakeApiOptions::default().netns(tb.ns_of_node(0)))
        .expect("fake API server in the node namespace");
    for n in tb.nodes() {
        api.apply_json(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name},
            "spec": {"podCIDR": n.pod_cidrs[0].to_string(),
                     "podCIDRs": [n.pod_cidrs[0].to_string()]},
            "status": {"addresses": [{"type": "InternalIP", "address": n.ip.to_string()}]}
        }))
        .unwrap();
    }
    api
}

/// A NodePort Service selecting `app=web`, as a client would create it.
fn service(svc: Svc) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": svc.name, "namespace": NS},
        "spec": {
            "type": "NodePort",
            "clusterIP": IpAddr::from(svc.ip).to_string(),
            "selector": {"app": "web"},
            "ports": [{"name": "http", "protocol": "TCP", "port": 80,
                       "targetPort": POD_PORT, "nodePort": svc.node_port}]
        }
    })
}

/// The EndpointSlice the EndpointSlice controller writes for `svc` with `pods` ready
/// (owned by the Service, `managed-by` and `service-name` labels, node names, target refs).
fn slice(tb: &Testbed, svc: Svc, uid: &str, pods: &[&str]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|name| {
            let pod = tb.pods().find(|p| p.name == *name).expect("a testbed pod");
            json!({
                "addresses": [pod.ips[0].to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": tb.node(pod.node).name,
                "targetRef": {"kind": "Pod", "namespace": NS, "name": name}
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-7xk2p", svc.name),
            "namespace": NS,
            "labels": {
                "kubernetes.io/service-name": svc.name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc.name,
                                 "uid": uid, "controller": true, "blockOwnerDeletion": true}]
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": POD_PORT, "protocol": "TCP"}]
    })
}

/// A Service and its slice in the API server.
struct Published {
    svc: Svc,
    uid: String,
}

impl Published {
    fn create(api: &FakeApiServer, tb: &Testbed, svc: Svc, pods: &[&str]) -> Published {
        let stored = api.apply_json(service(svc)).unwrap();
        let uid = stored["metadata"]["uid"].as_str().unwrap().to_string();
        let p = Published { svc, uid };
        p.set(api, tb, pods);
        p
    }

    /// Writes the slice with these endpoints, as the controller's update would.
    fn set(&self, api: &FakeApiServer, tb: &Testbed, pods: &[&str]) {
        api.apply_json(slice(tb, self.svc, &self.uid, pods))
            .unwrap();
    }

    /// Deletes the Service and (as the garbage collector does) its slice.
    fn delete(&self, api: &FakeApiServer) {
        api.delete("Service", NS, self.svc.name).unwrap();
        api.delete("EndpointSlice", NS, &format!("{}-7xk2p", self.svc.name))
            .unwrap();
    }
}

/// `svcnat-proxy --kubeconfig` running inside node 0's namespace.
struct RunningProxy(Daemon);

impl RunningProxy {
    fn start(tb: &Testbed, kubeconfig: &Path, extra: &[&str]) -> RunningProxy {
        let mut cmd = tb.command(tb.ns_of_node(0), PROXY);
        cmd.args(["--backend", "iptables"])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--node-name", &tb.node(0).name])
            .args(["--node-ip", &tb.node_ip(0).to_string()])
            .args(["--cluster-cidr", "10.244.0.0/16"])
            .args(["--metrics-bind-address", "127.0.0.1:10249", "-v"])
            .args(extra);
        RunningProxy(Daemon::spawn(cmd, "proxy").expect("start svcnat-proxy"))
    }

    fn wait_ready(&self) {
        if let Err(e) = self.0.wait_ready(CONVERGE) {
            panic!("{e}");
        }
    }
}

/// New connections from the tester pod to a Service's ClusterIP. The timeout outlasts the
/// first SYN retransmission: the kernel rate-limits the ICMP errors a REJECT sends.
fn via_cluster_ip(tb: &Testbed, svc: Svc, count: u32) -> ProbeResult {
    let target = SocketAddr::new(IpAddr::from(svc.ip), 80);
    let ns = tb.ns_of_pod("tester").unwrap();
    tb.probe(ns, ProbeArgs::tcp(target).count(count).timeout_ms(2500))
        .expect("probe")
}

/// New connections from the client to a Service's NodePort on node 0.
fn via_node_port(tb: &Testbed, svc: Svc, count: u32) -> ProbeResult {
    let target = SocketAddr::new(tb.node_ip(0), svc.node_port);
    tb.probe(
        tb.ns_of_client(0),
        ProbeArgs::tcp(target).count(count).timeout_ms(2500),
    )
    .expect("probe")
}

fn names(pods: &[&str]) -> BTreeSet<String> {
    pods.iter().map(|s| s.to_string()).collect()
}

/// Whether the Service is gone from node 0: a connection to its NodePort is refused (no
/// rule, nothing listens), and one to its ClusterIP gets no answer (no rule translates it:
/// the node routes the service range to a sink, as a real node has no route for it).
fn gone(tb: &Testbed, svc: Svc) -> bool {
    via_node_port(tb, svc, 1).refused() == 1 && via_cluster_ip(tb, svc, 1).ok() == 0
}

/// `count` connections through each path all answered, spread over exactly `pods`.
fn assert_spread(tb: &Testbed, svc: Svc, pods: &[&str], count: u32) {
    for (path, r) in [
        ("ClusterIP", via_cluster_ip(tb, svc, count)),
        ("NodePort", via_node_port(tb, svc, count)),
    ] {
        assert!(r.all_ok(), "{} {path}: {r}", svc.name);
        assert_eq!(r.pods(), names(pods), "{} {path}: {r}", svc.name);
    }
}

/// `GET path` on the proxy's metrics server: status code and body.
fn http_get(tb: &Testbed, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:10249{path}");
    let out = tb
        .exec_ok(
            tb.ns_of_node(0),
            [
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                &url,
            ],
        )
        .expect("curl (install curl)");
    let (body, code) = out.trim_end().rsplit_once('\n').expect("a status line");
    (code.parse().expect("a status code"), format!("{body}\n"))
}

/// A value on `/metrics` (the line `NAME VALUE`), 0 when absent.
fn metric(tb: &Testbed, name: &str) -> f64 {
    let (_, text) = http_get(tb, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn full_syncs(tb: &Testbed) -> f64 {
    metric(tb, "svcnat_sync_total{result=\"ok\",kind=\"full\"}")
}

/// Node 0's rules (`iptables-save`, the flavour the proxy detected too), by chain; counters
/// and chain declarations left out.
fn rules(tb: &Testbed) -> BTreeMap<String, Vec<String>> {
    let save = tb
        .exec_ok(tb.ns_of_node(0), ["iptables-save"])
        .expect("iptables-save");
    let mut by_chain: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            by_chain
                .entry(format!("{table}/{chain}"))
                .or_default()
                .push(rule.to_string());
        }
    }
    by_chain
}

/// The DNAT destinations node 0's rules hold for `svc` (its endpoint chains).
fn dnat_targets(tb: &Testbed, svc: Svc) -> BTreeSet<String> {
    let comment = format!("--comment \"{NS}/{}:http\"", svc.name);
    rules(tb)
        .into_values()
        .flatten()
        .filter(|r| r.contains(&comment))
        .filter_map(|r| {
            r.split_once("-j DNAT --to-destination ")
                .map(|(_, d)| d.trim().to_string())
        })
        .collect()
}

/// The endpoint chain (`KUBE-SEP-...`) of `svc` that DNATs to `pod_ip`.
fn endpoint_chain(tb: &Testbed, svc: Svc, pod_ip: IpAddr) -> String {
    let comment = format!("--comment \"{NS}/{}:http\"", svc.name);
    let dest = format!("--to-destination {pod_ip}:{POD_PORT}");
    rules(tb)
        .into_values()
        .flatten()
        .find(|r| r.starts_with("KUBE-SEP-") && r.contains(&comment) && r.ends_with(&dest))
        .and_then(|r| r.split_whitespace().next().map(str::to_string))
        .expect("the endpoint chain")
}

fn endpoints_of(tb: &Testbed, pods: &[&str]) -> BTreeSet<String> {
    pods.iter()
        .map(|p| format!("{}:{POD_PORT}", tb.pod_ip(p).unwrap()))
        .collect()
}

#[test]
fn proxy_follows_the_api_server_with_real_traffic() {
    svcnat_examples::skip_unless_root!();
    let tb = testbed();
    let api = api_server(&tb);
    // The server listens in node 0's namespace only: nothing answers in this (the root)
    // namespace at its address.
    let root = std::net::TcpStream::connect_timeout(&api.addr(), Duration::from_secs(2));
    assert!(
        root.is_err(),
        "the fake API server answers in the root namespace"
    );
    let front = Published::create(&api, &tb, FRONT, &WEB);
    let proxy = RunningProxy::start(&tb, api.kubeconfig_path(), &[]);
    proxy.wait_ready();
    assert!(api.requests(Verb::List, "endpointslices") >= 1);
    assert!(
        wait_until(CONVERGE, || api.open_watches() >= 3),
        "the proxy watches Services, EndpointSlices and its Node"
    );

    // Both paths spread over the three pods, on both nodes.
    assert_spread(&tb, FRONT, &WEB, 60);
    assert_eq!(dnat_targets(&tb, FRONT), endpoints_of(&tb, &WEB));

    // The slice scaled down to the pod on the other node: all traffic goes there.
    front.set(&api, &tb, &["web-2"]);
    assert!(
        wait_until(CONVERGE, || dnat_targets(&tb, FRONT)
            == endpoints_of(&tb, &["web-2"])),
        "the scale-down never reached the rules"
    );
    assert_spread(&tb, FRONT, &["web-2"], 20);

    // And up again.
    front.set(&api, &tb, &["web-0", "web-1"]);
    assert!(
        wait_until(CONVERGE, || dnat_targets(&tb, FRONT)
            == endpoints_of(&tb, &["web-0", "web-1"])),
        "the scale-up never reached the rules"
    );
    assert_spread(&tb, FRONT, &["web-0", "web-1"], 30);

    // The Service deleted: no rules for it, and both paths refuse.
    front.delete(&api);
    assert!(
        wait_until(CONVERGE, || gone(&tb, FRONT)),
        "the deleted Service still answers"
    );
    let left: Vec<String> = rules(&tb)
        .into_values()
        .flatten()
        .filter(|r| r.contains(&format!("{NS}/{}", FRONT.name)) || r.contains("30080"))
        .collect();
    assert!(
        left.is_empty(),
        "rules left for the deleted Service: {left:?}"
    );
    assert_eq!(metric(&tb, "svcnat_services"), 0.0);
    let r = via_node_port(&tb, FRONT, 3);
    assert_eq!(r.refused(), 3, "{r}");
    drop(proxy);
}

#[test]
fn api_faults_with_traffic_flowing() {
    svcnat_examples::skip_unless_root!();
    let tb = testbed();
    let api = api_server(&tb);
    let front = Published::create(&api, &tb, FRONT, &WEB);
    let cart = Published::create(&api, &tb, CART, &WEB);
    // A full resync every second, so the outage spans many of them; /healthz allows 4 s.
    let stale_after = Duration::from_secs(4);
    let proxy = RunningProxy::start(
        &tb,
        api.kubeconfig_path(),
        &[
            "--sync-period",
            "1s",
            "--healthz-stale-after",
            "4s",
            "--min-sync-period",
            "200ms",
            // The first foreign reference fails a sync (the default keeps a few dozen
            // chains flushed and goes on); the staleness check below needs failing syncs.
            "--iptables-max-kept-chains",
            "0",
        ],
    );
    proxy.wait_ready();
    assert_spread(&tb, FRONT, &WEB, 30);
    assert_spread(&tb, CART, &WEB, 30);
    let mut held = tb
        .hold(
            tb.ns_of_client(0),
            SocketAddr::new(tb.node_ip(0), FRONT.node_port),
        )
        .expect("a held connection through the NodePort");
    let first = held.ping("before").expect("held connection answers");
    let held_pod = svcnat_examples::testbed::reply_field(&first, "pod")
        .expect("pod=")
        .to_string();

    // --- The API server stops mid-watch. ---
    assert!(
        wait_until(CONVERGE, || api.open_watches() >= 3),
        "watches open before the outage"
    );
    let before = rules(&tb);
    let syncs_before = full_syncs(&tb);
    let stopped = Instant::now();
    api.stop().unwrap();
    assert!(
        wait_until(CONVERGE, || http_get(&tb, "/healthz")
            .1
            .contains("\nAPI server not reachable since ")),
        "/healthz never said the API server is unreachable"
    );
    // Longer than the staleness limit, and several full resyncs (which succeed: nothing
    // about the dataplane is wrong) later.
    assert!(
        wait_until(CONVERGE, || stopped.elapsed()
            > stale_after + Duration::from_secs(1)
            && full_syncs(&tb) >= syncs_before + 3.0),
        "no periodic resyncs while the API server is away"
    );
    let (code, body) = http_get(&tb, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ok\n"), "{body}");
    assert!(body.contains("\nAPI server not reachable since "), "{body}");
    assert_eq!(metric(&tb, "svcnat_api_reachable"), 0.0);
    assert_eq!(rules(&tb), before, "the rules changed during the outage");
    let reply = held.ping("during the outage").expect("held connection");
    assert_eq!(
        svcnat_examples::testbed::reply_field(&reply, "pod"),
        Some(held_pod.as_str())
    );
    assert_spread(&tb, FRONT, &WEB, 30);
    assert_spread(&tb, CART, &WEB, 30);

    // --- cart is deleted while the API server is away, and the history compacted, so the
    // watches cannot resume: the proxy must re-list to learn of it. ---
    cart.delete(&api);
    api.compact();
    // Nothing is removed for want of the API server: cart still answers.
    assert_spread(&tb, CART, &WEB, 30);
    let lists = api.requests(Verb::List, "services");
    api.start().unwrap();
    let restarted = Instant::now();
    let mut front_checks = 0;
    let gone = wait_until(CONVERGE, || {
        // front answers throughout.
        let r = via_node_port(&tb, FRONT, 1);
        assert!(r.all_ok(), "front during the re-list: {r}");
        front_checks += 1;
        gone(&tb, CART)
    });
    assert!(gone, "cart still answers after the API server returned");
    eprintln!(
        "the deletion made during a {:.1} s outage was programmed {:.1} s after the API server returned",
        (restarted - stopped).as_secs_f64(),
        restarted.elapsed().as_secs_f64()
    );
    // The watchers did not wait out the backoff they grew during the outage: the probe's
    // first answer restarted them (kube-rs's backoff alone took ~13 s after a 6 s outage).
    assert!(
        proxy
            .0
            .stderr()
            .contains("API server answers again; watching anew"),
        "{}",
        proxy.0.stderr()
    );
    assert!(front_checks >= 1);
    assert!(
        api.requests(Verb::List, "services") > lists,
        "the proxy re-listed Services"
    );
    let r = via_node_port(&tb, CART, 3);
    assert_eq!(r.refused(), 3, "{r}");
    assert!(dnat_targets(&tb, CART).is_empty());
    assert_spread(&tb, FRONT, &WEB, 30);
    assert!(
        wait_until(CONVERGE, || !http_get(&tb, "/healthz")
            .1
            .contains("not reachable")),
        "/healthz still says the API server is unreachable"
    );
    assert_eq!(metric(&tb, "svcnat_api_reachable"), 1.0);
    let reply = held.ping("after the outage").expect("held connection");
    assert_eq!(
        svcnat_examples::testbed::reply_field(&reply, "pod"),
        Some(held_pod.as_str())
    );

    // --- A burst of slice updates with compactions (410 on the next watch) in between;
    // traffic keeps flowing to some endpoint of each version. ---
    let steps: [&[&str]; 8] = [
        &["web-0"],
        &["web-1", "web-2"],
        &["web-2"],
        &["web-0", "web-1", "web-2"],
        &["web-1"],
        &["web-0", "web-1"],
        &["web-2", "web-1"],
        &["web-0", "web-2"],
    ];
    let relists = api.requests(Verb::List, "endpointslices");
    for (i, pods) in steps.iter().enumerate() {
        front.set(&api, &tb, pods);
        if i % 2 == 1 {
            api.compact();
        }
        let r = via_node_port(&tb, FRONT, 2);
        assert!(r.all_ok(), "front during the burst, step {i}: {r}");
    }
    let last = steps[steps.len() - 1];
    assert!(
        wait_until(CONVERGE, || dnat_targets(&tb, FRONT)
            == endpoints_of(&tb, last)),
        "the final slice never reached the rules: {:?}",
        dnat_targets(&tb, FRONT)
    );
    assert!(
        api.requests(Verb::List, "endpointslices") > relists,
        "a compaction made the proxy re-list EndpointSlices"
    );
    assert_spread(&tb, FRONT, last, 40);
    assert_eq!(metric(&tb, "svcnat_endpoints"), 2.0);
    assert_eq!(metric(&tb, "svcnat_services"), 1.0);

    // --- Syncs stop succeeding: a foreign rule refers to web-0's endpoint chain, which the
    // next change (web-0 leaves the slice) must delete. /healthz turns 503 after the
    // staleness limit; the old rules stay in force meanwhile. ---
    let (code, body) = http_get(&tb, "/healthz");
    assert_eq!(code, 200, "{body}");
    let sep = endpoint_chain(&tb, FRONT, tb.pod_ip("web-0").unwrap());
    let pin = |verb: &str| {
        tb.exec_ok(
            tb.ns_of_node(0),
            [
                "iptables",
                "-t",
                "nat",
                verb,
                "OUTPUT",
                "-d",
                "192.0.2.99/32",
                "-j",
                &sep,
            ],
        )
        .unwrap();
    };
    pin("-I");
    let errors = metric(&tb, "svcnat_sync_errors_total");
    front.set(&api, &tb, &["web-2"]);
    let failing = Instant::now();
    assert!(
        wait_until(CONVERGE, || metric(&tb, "svcnat_sync_errors_total")
            > errors),
        "the pinned chain did not make a sync fail"
    );
    let mut went_stale = None;
    assert!(
        wait_until(CONVERGE, || {
            let (code, body) = http_get(&tb, "/healthz");
            (code == 503)
                .then(|| went_stale = Some((failing.elapsed(), body)))
                .is_some()
        }),
        "/healthz never turned 503 while syncs failed"
    );
    let (after, body) = went_stale.unwrap();
    assert!(
        body.starts_with("stale: the last successful sync is "),
        "{body}"
    );
    // Not before the limit: the last success was at most one sync period (1 s) before the
    // change, so 503 comes no sooner than the limit less that period.
    assert!(
        after >= stale_after - Duration::from_millis(1500),
        "503 after only {after:?}"
    );
    assert_spread(&tb, FRONT, &["web-0", "web-2"], 30);

    // The pin removed: the next sync succeeds, /healthz is 200 again, web-2 alone serves.
    pin("-D");
    assert!(
        wait_until(CONVERGE, || http_get(&tb, "/healthz").0 == 200),
        "/healthz stayed 503 after syncs succeeded again"
    );
    assert!(
        wait_until(CONVERGE, || dnat_targets(&tb, FRONT)
            == endpoints_of(&tb, &["web-2"])),
        "the change never reached the rules"
    );
    assert_spread(&tb, FRONT, &["web-2"], 20);
    drop(held);
    drop(proxy);
}

/// `GET url` from client 0: status code and body.
fn client_get(tb: &Testbed, url: &str) -> (u16, String) {
    let out = tb
        .exec_ok(
            tb.ns_of_client(0),
            [
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                url,
            ],
        )
        .expect("curl from the client");
    let (body, code) = out.trim_end().rsplit_once('\n').expect("a status line");
    (code.parse().expect("a status code"), body.to_string())
}

/// What a cloud load balancer sees from node 0: the healthCheckNodePort of an
/// `externalTrafficPolicy: Local` Service says whether the node has local endpoints, and
/// kube-proxy's health port fails while the Node is being deleted (so the node is drained)
/// while `/livez` does not.
#[test]
fn load_balancer_health_checks_follow_local_endpoints_and_node_deletion() {
    svcnat_examples::skip_unless_root!();
    let tb = testbed();
    let api = api_server(&tb);
    let hc_port = 32001;
    let mut svc = service(FRONT);
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    svc["spec"]["healthCheckNodePort"] = json!(hc_port);
    let stored = api.apply_json(svc).unwrap();
    let front = Published {
        svc: FRONT,
        uid: stored["metadata"]["uid"].as_str().unwrap().to_string(),
    };
    front.set(&api, &tb, &WEB);
    let proxy = RunningProxy::start(&tb, api.kubeconfig_path(), &[]);
    proxy.wait_ready();
    let hc = format!("http://{}:{hc_port}/healthz", tb.node_ip(0));
    let health = format!("http://{}:10256", tb.node_ip(0));

    // Two of the three endpoints run on node 0.
    let (code, body) = client_get(&tb, &hc);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        json!({"service": {"namespace": NS, "name": "front"}, "localEndpoints": 2,
               "serviceProxyHealthy": true})
    );
    // Only the pod on node 1 left: node 0 must not get the load balancer's traffic.
    front.set(&api, &tb, &["web-2"]);
    assert!(
        wait_until(CONVERGE, || client_get(&tb, &hc).0 == 503),
        "the health check still passes without local endpoints"
    );
    assert!(client_get(&tb, &hc).1.contains("\"localEndpoints\":0"));
    front.set(&api, &tb, &["web-1"]);
    assert!(
        wait_until(CONVERGE, || client_get(&tb, &hc).0 == 200),
        "the health check never passed again"
    );

    // The cluster autoscaler taints node 0 for deletion: /healthz fails, /livez does not.
    assert_eq!(client_get(&tb, &format!("{health}/healthz")).0, 200);
    let node = tb.node(0);
    let tainted = |taints: Value| {
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name},
            "spec": {"podCIDR": node.pod_cidrs[0].to_string(),
                     "podCIDRs": [node.pod_cidrs[0].to_string()], "taints": taints},
            "status": {"addresses": [{"type": "InternalIP", "address": node.ip.to_string()}]}
        })
    };
    api.apply_json(tainted(json!([{"key": "ToBeDeletedByClusterAutoscaler",
        "value": "1732000000", "effect": "NoSchedule"}])))
        .unwrap();
    assert!(
        wait_until(CONVERGE, || client_get(&tb, &format!("{health}/healthz")).0
            == 503),
        "/healthz passes on a node being deleted"
    );
    let (code, body) = client_get(&tb, &format!("{health}/healthz"));
    assert!(body.starts_with("node terminating"), "{code} {body}");
    assert_eq!(client_get(&tb, &format!("{health}/livez")).0, 200);
    // Traffic is still served meanwhile (draining is the load balancer's decision).
    assert_spread(&tb, FRONT, &["web-1"], 5);
    api.apply_json(tainted(json!([]))).unwrap();
    assert!(
        wait_until(CONVERGE, || client_get(&tb, &format!("{health}/healthz")).0
            == 200),
        "/healthz never recovered after the taint was removed"
    );
    drop(proxy);
}

#[test]
fn a_missing_namespace_is_named() {
    let err = FakeApiServer::with_options(FakeApiOptions::default().netns("svcnat-no-such-ns"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/run/netns/svcnat-no-such-ns"), "{err}");
    let err = FakeApiServer::with_options(FakeApiOptions::default().netns("../etc"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad network namespace name \"../etc\""),
        "{err}"
    );
}
