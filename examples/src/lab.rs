//! The lab replay: `../shared/seed/lab-k105-services.md` ("Load Balancing and Service
//! Discovery with Services"), step by step, with real packets in network namespaces.
//!
//! The cluster: a `browser` client, two nodes (`node-0`, `node-1`) each running
//! `svcnat-proxy`, the `vote` Deployment (5 pods), later `redis` (2 pods), and `svcnat-dns`
//! in a `coredns` pod behind the kube-dns ClusterIP 10.96.0.10. Every pod's
//! `/etc/netns/<ns>/resolv.conf` is the lab's (`nameserver 10.96.0.10`, the three search
//! domains, `ndots:5`). Manifests live in a temporary directory that the proxies and the DNS
//! server watch; each step edits files there, as `kubectl apply`/`edit` would, and then
//! observes what real clients get. Pods follow the manifests: the lab loads them with the
//! core (deterministic names and addresses) and creates or deletes pod namespaces to match.
//!
//! Through the API ([`Feed::Api`], `svcnat-lab --api`), the proxies and svcnat-dns follow
//! fake API servers (`--kubeconfig`) instead of the directory: after every manifest edit the
//! lab builds the cluster from the directory with the core (the controller role turns the
//! Deployments' Pods into EndpointSlices, as the EndpointSlice controller would) and writes
//! what changed as API objects ([`crate::fakeapi::Publisher`]). A fake API server listens
//! only on a namespace's own loopback, so there is one per namespace that follows it (node-0,
//! node-1, the coredns pod), each written the same objects; nothing is bound in the root
//! namespace. `kubectl` (svcnat-ctl) still reads the directory.
//!
//! Every step prints what it did and what it observed; the first wrong observation ends the
//! replay with an error. Dropping the [`Lab`] stops every process and deletes every
//! namespace and file it made, also on Ctrl-C (checked between and within steps).

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use svcnat_core::graph::ServiceGraph;
use svcnat_core::manifest::{ClusterConfig, Manifests};
use svcnat_core::model::{Cluster, ObjectName, Protocol};
use svcnat_core::plan::{ChainIdStyle, NodeContext, Plan, ServicePortName};

use crate::fakeapi::{FakeApiOptions, FakeApiServer, Publisher};
use crate::testbed::{PodSpec, ProbeArgs, Testbed, TestbedSpec};

/// How the proxies and the DNS server hear of the lab's cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Feed {
    /// They watch the manifest directory.
    #[default]
    Manifests,
    /// They follow fake API servers the lab writes every change to.
    Api,
}

/// Which dataplane the lab's proxies program (`svcnat-proxy --backend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LabBackend {
    /// iptables rules in kube-proxy's layout; step 2 reads the `KUBE-SVC-` chain.
    #[default]
    Iptables,
    /// nftables in kube-proxy's nftables layout; step 2 reads the `service-` chain.
    Nftables,
    /// The userspace AF_PACKET datapath on the nodes' pod and LAN interfaces; step 2 reads
    /// the node's plan and the datapath's counters.
    Userspace,
    /// IPVS; step 2 reads `ipvsadm -Ln`. Needs a kernel with IPVS: the lab refuses to start
    /// without one, saying so.
    Ipvs,
}

impl LabBackend {
    /// The `--backend` value.
    pub fn as_str(self) -> &'static str {
        match self {
            LabBackend::Iptables => "iptables",
            LabBackend::Nftables => "nftables",
            LabBackend::Userspace => "userspace",
            LabBackend::Ipvs => "ipvs",
        }
    }

    /// `svcnat-proxy`'s arguments for this backend on a testbed node.
    pub fn proxy_args(self) -> Vec<&'static str> {
        match self {
            LabBackend::Userspace => vec![
                "--backend",
                "userspace",
                "--interfaces",
                "eth0,vp*",
                "--workers",
                "1",
            ],
            b => vec!["--backend", b.as_str()],
        }
    }

    /// Why this kernel cannot run it, if it cannot.
    pub fn unavailable(self) -> Option<String> {
        (self == LabBackend::Ipvs && !Path::new("/proc/net/ip_vs").exists()).then(|| {
            "this kernel has no IPVS (/proc/net/ip_vs is missing) and cannot load modules; \
             the IPVS backend runs in the VM (backend-ipvs/vm/run.sh, its conformance suite)"
                .to_string()
        })
    }
}

/// One fake API server on a namespace's loopback, and what was written to it.
struct LabApi {
    server: FakeApiServer,
    publisher: Publisher,
}

/// The lab's namespace (`kubectl config set-context --current --namespace=instavote`).
pub const NAMESPACE: &str = "instavote";
/// The kube-dns ClusterIP of the lab's resolv.conf.
pub const DNS_IP: &str = "10.96.0.10";
/// The pod address of the DNS server.
pub const DNS_POD_IP: &str = "10.244.0.53";
/// The lab's pod resolv.conf.
pub const RESOLV_CONF: &str = "nameserver 10.96.0.10\nsearch instavote.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n";

/// The lab's `vote-svc.yaml`, exactly as the lab gives it.
pub const VOTE_SVC: &str = "---
apiVersion: v1
kind: Service
metadata:
  name: vote
  labels:
    role: vote
spec:
  selector:
    role: vote
  ports:
    - port: 80
      targetPort: 80
      nodePort: 30000
  type: NodePort
";

const NODES: &str = "---
apiVersion: v1
kind: Node
metadata: {name: node-0}
spec: {podCIDR: 10.244.0.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.50.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.50.12}]}
";

/// kube-dns in `kube-system` behind 10.96.0.10, and the pod svcnat-dns runs in.
pub(crate) const KUBE_DNS: &str = "---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
spec:
  clusterIP: 10.96.0.10
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: v1
kind: Pod
metadata:
  name: coredns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
spec:
  nodeName: node-0
  containers:
  - name: svcnat-dns
    image: svcnat-dns
    ports:
    - {name: dns, containerPort: 53, protocol: UDP}
    - {name: dns-tcp, containerPort: 53, protocol: TCP}
status:
  podIP: 10.244.0.53
";

fn deployment(name: &str, replicas: u32, label: &str, port: u16) -> String {
    format!(
        "---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      {label}
  template:
    metadata:
      labels:
        {label}
    spec:
      containers:
      - name: {name}
        image: schoolofdevops/{name}:latest
        ports:
        - containerPort: {port}
"
    )
}

/// The lab's `redis-svc.yaml`.
pub const REDIS_SVC: &str = "---
apiVersion: v1
kind: Service
metadata:
  labels:
    role: redis
    tier: back
  name: redis
spec:
  ports:
  - port: 6379
    protocol: TCP
    targetPort: 6379
  selector:
    app: redis
  type: ClusterIP
";

/// What went wrong in the replay.
#[derive(Debug)]
pub enum LabError {
    /// The machine cannot run it (not root, a tool missing).
    Unsupported(String),
    /// Setting up or running something failed.
    Setup(String),
    /// An observation was not what the lab says.
    Wrong {
        /// The step.
        step: String,
        /// What was expected and what was seen.
        detail: String,
    },
    /// Ctrl-C.
    Interrupted,
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabError::Unsupported(s) => write!(f, "cannot run the lab here: {s}"),
            LabError::Setup(s) => write!(f, "setup failed: {s}"),
            LabError::Wrong { step, detail } => write!(f, "step {step:?}: {detail}"),
            LabError::Interrupted => f.write_str("interrupted"),
        }
    }
}

impl std::error::Error for LabError {}

fn setup<E: fmt::Display>(what: &str) -> impl FnOnce(E) -> LabError + '_ {
    move |e| LabError::Setup(format!("{what}: {e}"))
}

/// Where the svcnat programs are.
#[derive(Clone, Debug)]
pub struct Programs {
    /// `svcnat-proxy`.
    pub proxy: PathBuf,
    /// `svcnat-dns`.
    pub dns: PathBuf,
    /// `svcnat-ctl`.
    pub ctl: PathBuf,
    /// Debian's Chromium, the lab reader's browser (headless).
    pub chromium: PathBuf,
    /// `redis-server`, run in each redis pod.
    pub redis_server: PathBuf,
    /// `redis-cli`, to look into redis.
    pub redis_cli: PathBuf,
}

impl Programs {
    /// The programs next to the running executable (`target/<profile>/`), and the lab's
    /// browser and redis on the PATH.
    pub fn discover() -> Result<Programs, LabError> {
        let mut p = Programs::discover_svcnat()?;
        let tool = |name: &str, package: &str| {
            which(name).ok_or_else(|| {
                LabError::Unsupported(format!(
                    "{name} not found (apt-get install {package}; examples/run-lab.sh installs it)"
                ))
            })
        };
        p.chromium = tool("chromium", "chromium")?;
        p.redis_server = tool("redis-server", "redis-server")?;
        p.redis_cli = tool("redis-cli", "redis-tools")?;
        Ok(p)
    }

    /// svcnat's programs next to the running executable (`target/<profile>/`) only; the
    /// browser and redis are left as bare names.
    pub fn discover_svcnat() -> Result<Programs, LabError> {
        let exe = std::env::current_exe().map_err(setup("current_exe"))?;
        let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.file_name().is_some_and(|n| n == "deps")
            && let Some(p) = dir.parent()
        {
            dir = p.to_path_buf();
        }
        let p = Programs {
            proxy: dir.join("svcnat-proxy"),
            dns: dir.join("svcnat-dns"),
            ctl: dir.join("svcnat-ctl"),
            chromium: "chromium".into(),
            redis_server: "redis-server".into(),
            redis_cli: "redis-cli".into(),
        };
        for f in [&p.proxy, &p.dns, &p.ctl] {
            if !f.is_file() {
                return Err(LabError::Unsupported(format!(
                    "{} not found: run `cargo build -p svcnat-examples --bins` first",
                    f.display()
                )));
            }
        }
        Ok(p)
    }
}

/// A running lab.
pub struct Lab {
    tb: Testbed,
    dir: PathBuf,
    programs: Programs,
    daemons: Vec<Child>,
    /// Fed through the API: the fake API server of each namespace that follows one, by
    /// namespace name.
    apis: Vec<(String, LabApi)>,
    feed: Feed,
    backend: LabBackend,
    stop: Arc<AtomicBool>,
    config: ClusterConfig,
    /// Lines printed so far (the replay's report).
    pub transcript: Vec<String>,
    /// Drawings of Services' paths through node-0 taken during the replay: (the step's
    /// transcript line count when taken, caption, SVG).
    pub drawings: Vec<(usize, String, String)>,
    /// The browser's screenshots: (transcript line count when taken, caption, file).
    pub screenshots: Vec<(usize, String, PathBuf)>,
    /// Where screenshots go (the report's directory); `None`: a scratch directory.
    pub screenshot_dir: Option<PathBuf>,
    /// The browser's profile, pages and default screenshot directory.
    browser_dir: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_dir_all(&self.browser_dir);
    }
}

impl Lab {
    /// Builds the namespaces and starts the proxies and the DNS server on the manifest
    /// directory, with the vote Deployment, the nodes and kube-dns applied but no vote
    /// Service yet.
    pub fn start(programs: Programs, stop: Arc<AtomicBool>) -> Result<Lab, LabError> {
        Lab::start_with(programs, stop, Feed::Manifests)
    }

    /// [`Lab::start`], with the proxies and the DNS server fed as `feed` says.
    pub fn start_with(
        programs: Programs,
        stop: Arc<AtomicBool>,
        feed: Feed,
    ) -> Result<Lab, LabError> {
        Lab::start_on(programs, stop, feed, LabBackend::Iptables)
    }

    /// [`Lab::start_with`], with the proxies on `backend`.
    pub fn start_on(
        programs: Programs,
        stop: Arc<AtomicBool>,
        feed: Feed,
        backend: LabBackend,
    ) -> Result<Lab, LabError> {
        crate::testbed::require_root().map_err(LabError::Unsupported)?;
        if let Some(why) = backend.unavailable() {
            return Err(LabError::Unsupported(why));
        }
        let dir = std::env::temp_dir().join(format!("svcnat-lab-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(setup("manifest directory"))?;
        let config = {
            let mut cfg = ClusterConfig::default();
            cfg.default_namespace = NAMESPACE.into();
            cfg
        };
        let browser_dir =
            std::env::temp_dir().join(format!("svcnat-lab-{}-browser", std::process::id()));
        fs::create_dir_all(&browser_dir).map_err(setup("browser directory"))?;
        let spec = TestbedSpec::new(2, 1).pod(PodSpec::new("coredns", 0, ip(DNS_POD_IP)).tcp(9153));
        let tb = Testbed::new(spec).map_err(setup("testbed"))?;
        let mut lab = Lab {
            tb,
            dir,
            programs,
            daemons: Vec::new(),
            apis: Vec::new(),
            feed,
            backend,
            stop,
            config,
            transcript: Vec::new(),
            drawings: Vec::new(),
            screenshots: Vec::new(),
            screenshot_dir: None,
            browser_dir,
        };
        lab.write("nodes.yaml", NODES)?;
        lab.write("kube-dns.yaml", KUBE_DNS)?;
        lab.write("vote-deploy.yaml", &deployment("vote", 5, "role: vote", 80))?;
        lab.reconcile_pods()?;
        let dns_ns = lab.pod_ns("coredns")?;
        if feed == Feed::Api {
            let namespaces = [
                lab.tb.ns_of_node(0).to_string(),
                lab.tb.ns_of_node(1).to_string(),
                dns_ns.clone(),
            ];
            for ns in namespaces {
                lab.start_api(&ns)?;
            }
            lab.publish()?;
        }
        // svcnat-dns in the coredns pod, behind the kube-dns ClusterIP.
        let dns = lab.programs.dns.clone();
        let source = lab.source_args(&dns_ns)?;
        lab.spawn(
            &dns_ns,
            &dns,
            &[
                source[0].as_str(),
                source[1].as_str(),
                "--listen",
                "0.0.0.0:53",
                "--default-namespace",
                NAMESPACE,
            ],
        )?;
        for i in 0..2 {
            let ns = lab.tb.ns_of_node(i).to_string();
            let node_ip = lab.tb.node_ip(i).to_string();
            let name = format!("node-{i}");
            let proxy = lab.programs.proxy.clone();
            let source = lab.source_args(&ns)?;
            lab.spawn(
                &ns,
                &proxy,
                &[
                    source[0].as_str(),
                    source[1].as_str(),
                    "--node-name",
                    &name,
                    "--node-ip",
                    &node_ip,
                    "--cluster-cidr",
                    "10.244.0.0/16",
                    "--default-namespace",
                    NAMESPACE,
                    "--min-sync-period",
                    "200ms",
                ]
                .into_iter()
                .chain(lab.backend.proxy_args())
                .collect::<Vec<_>>(),
            )?;
        }
        Ok(lab)
    }

    /// Step 2 on iptables: the `KUBE-SVC-` chain spreads with statistic probabilities; the
    /// `KUBE-SEP-` chains' DNAT targets are returned.
    fn step2_iptables(&mut self) -> Result<BTreeSet<IpAddr>, LabError> {
        let step = "the KUBE-SVC chain spreads with statistic probabilities";
        self.say(format!("\n== STEP 2: {step}"));
        let spn = ServicePortName {
            service: ObjectName::new(NAMESPACE, "vote"),
            port: String::new(),
            protocol: Protocol::Tcp,
        };
        let chain = format!("KUBE-SVC-{}", spn.chain_hash(ChainIdStyle::Current));
        self.say(format!("$ iptables -t nat -S {chain}   (on node-0)"));
        let out = self
            .tb
            .exec(
                self.tb.ns_of_node(0),
                ["iptables", "-t", "nat", "-S", &chain],
            )
            .map_err(setup("iptables"))?;
        let rules = String::from_utf8_lossy(&out.stdout).into_owned();
        for l in rules.lines() {
            self.say(format!("  {l}"));
        }
        let seps = rules.lines().filter(|l| l.contains("-j KUBE-SEP-")).count();
        expect(step, seps == 5, "five KUBE-SEP jumps, one per pod", &rules)?;
        for p in [
            "0.20000000019",
            "0.25000000000",
            "0.33333333349",
            "0.50000000000",
        ] {
            expect(step, rules.contains(p), &format!("probability {p}"), &rules)?;
        }
        let seps: Vec<String> = rules
            .lines()
            .filter_map(|l| l.split("-j ").nth(1))
            .filter(|t| t.starts_with("KUBE-SEP-"))
            .map(|t| t.trim().to_string())
            .collect();
        let mut targets = BTreeSet::new();
        for sep in seps {
            let text = self.on_node(0, &["iptables", "-t", "nat", "-S", &sep])?;
            targets.extend(
                text.split_whitespace()
                    .skip_while(|w| *w != "--to-destination")
                    .nth(1)
                    .and_then(|d| d.parse::<SocketAddr>().ok())
                    .map(|d| d.ip()),
            );
        }
        Ok(targets)
    }

    /// Step 2 on the userspace datapath: no rules to read; the node's plan (what the
    /// datapath holds, `svcnat-ctl plan`) spreads over the five pods with the same cascade.
    fn step2_plan(&mut self) -> Result<BTreeSet<IpAddr>, LabError> {
        let step = "the node's plan spreads over the five pods";
        self.say(format!("\n== STEP 2: {step}"));
        let node0 = self.tb.node_ip(0).to_string();
        let plan = self.ctl(&[
            "plan",
            "--node-name",
            "node-0",
            "--node-ip",
            &node0,
            "--cluster-cidr",
            "10.244.0.0/16",
        ])?;
        let vote: Vec<&str> = plan
            .lines()
            .skip_while(|l| !(l.starts_with("backends instavote/vote") && l.contains("Cluster")))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .collect();
        expect(step, vote.len() == 5, "five endpoints", &plan)?;
        for p in [
            "0.2000000000",
            "0.2500000000",
            "0.3333333333",
            "0.5000000000",
        ] {
            expect(
                step,
                vote.iter().any(|l| l.contains(p)),
                &format!("probability {p}"),
                &plan,
            )?;
        }
        Ok(vote
            .iter()
            .filter_map(|l| l.split_whitespace().next()?.parse::<SocketAddr>().ok())
            .map(|a| a.ip())
            .collect())
    }

    /// Step 2 on IPVS: the virtual service's real servers.
    fn step2_ipvs(&mut self) -> Result<BTreeSet<IpAddr>, LabError> {
        let step = "the IPVS virtual service has the five pods as real servers";
        self.say(format!("\n== STEP 2: {step}"));
        let text = self.on_node(0, &["ipvsadm", "-Ln"])?;
        let reals: BTreeSet<IpAddr> = text
            .lines()
            .skip_while(|l| !l.contains(":30000"))
            .skip(1)
            .take_while(|l| l.trim_start().starts_with("->"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<SocketAddr>().ok())
            .map(|a| a.ip())
            .collect();
        expect(step, reals.len() == 5, "five real servers", &text)?;
        Ok(reals)
    }

    /// Runs `args` on node `i` (showing the command and its output) and returns stdout.
    fn on_node(&mut self, i: usize, args: &[&str]) -> Result<String, LabError> {
        self.say(format!("$ {}   (on node-{i})", args.join(" ")));
        let ns = self.tb.ns_of_node(i).to_string();
        let out = self.tb.exec(&ns, args).map_err(setup("exec on a node"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        for l in text.lines() {
            self.say(format!("  {l}"));
        }
        Ok(text)
    }

    /// Runs `args` in pod `pod` (showing the command and its output); returns whether it
    /// succeeded and its stdout, or `None` when the program is not installed (an error under
    /// CI, where nothing may be skipped).
    fn in_pod(&mut self, pod: &str, args: &[&str]) -> Result<Option<(bool, String)>, LabError> {
        let program = args.first().copied().unwrap_or_default();
        self.say(format!("$ kubectl exec {pod} -- {}", args.join(" ")));
        if !installed(program) {
            let why = format!("{program} is not installed (examples/run-lab.sh installs it)");
            if crate::testbed::in_ci() {
                return Err(LabError::Setup(why));
            }
            self.say(format!("  SKIP: {why}"));
            return Ok(None);
        }
        let ns = self.pod_ns(pod)?;
        let out = self.tb.exec(&ns, args).map_err(setup("exec in a pod"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        for l in text.lines() {
            self.say(format!("  {l}"));
        }
        Ok(Some((out.status.success(), text)))
    }

    /// Under the hood of step 1: the NodePort rule counted the browser's connections
    /// (`iptables -nvL -t nat | grep 30000`), or the `service-nodeports` map holds 30000.
    fn nodeport_counters(&mut self, step: &str) -> Result<(), LabError> {
        match self.backend {
            LabBackend::Iptables => {
                let text = self.on_node(0, &["iptables", "-t", "nat", "-nvL", "KUBE-NODEPORTS"])?;
                let counted: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains("dpt:30000"))
                    .filter(|l| l.split_whitespace().next().is_some_and(|n| n != "0"))
                    .collect();
                expect(
                    step,
                    !counted.is_empty(),
                    "the rule for port 30000 counted packets (the first of each connection: \
                     the nat table sees only those)",
                    &text,
                )
            }
            LabBackend::Userspace => {
                let text = self.on_node(0, &["curl", "-s", "http://127.0.0.1:10249/metrics"])?;
                let forwarded = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("svcnat_userspace_verdicts_total{verdict=\"forward\"} ")
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                expect(
                    step,
                    forwarded > 0,
                    &format!("the datapath forwarded the browser's frames ({forwarded})"),
                    &text,
                )
            }
            LabBackend::Ipvs => {
                let text = self.on_node(0, &["ipvsadm", "-Ln", "--stats"])?;
                expect(
                    step,
                    text.contains(":30000"),
                    "an IPVS service for port 30000 with its counters",
                    &text,
                )
            }
            LabBackend::Nftables => {
                let text = self.on_node(
                    0,
                    &["nft", "list", "map", "ip", "svcnat", "service-nodeports"],
                )?;
                expect(
                    step,
                    text.contains("tcp . 30000"),
                    "service-nodeports maps tcp . 30000 to the Service's chain",
                    &text,
                )
            }
        }
    }

    /// Under the hood of step 2: the DNAT targets are the vote pods' IPs, as `kubectl get
    /// pods -o wide` lists them.
    fn dnat_matches_pods(&mut self, dnat: &BTreeSet<IpAddr>) -> Result<(), LabError> {
        let step = "the DNAT targets are the vote pods";
        self.ctl(&["get", "pods", "-o", "wide"])?;
        let pods: BTreeSet<IpAddr> = self
            .cluster()?
            .pods()
            .filter(|p| p.labels.get("role").map(String::as_str) == Some("vote"))
            .filter_map(|p| p.ips.first().copied())
            .collect();
        expect(
            step,
            *dnat == pods,
            &format!("DNAT to exactly the vote pods' IPs {pods:?}"),
            &format!("{dnat:?}"),
        )
    }

    /// Under the hood of step 2: `route -n` on a node. Pods of the other node are routed
    /// via it; ClusterIPs only to a sink: no machine has them, only the rules do.
    fn node_routes(&mut self) -> Result<(), LabError> {
        let step = "the node's routes";
        let node1 = self.tb.node_ip(1);
        let text = self.on_node(0, &["ip", "route"])?;
        expect(
            step,
            text.lines().any(|l| l.contains(&format!("via {node1}"))),
            "node-1's pod CIDR routed via node-1",
            &text,
        )?;
        expect(
            step,
            text.lines().any(|l| l.contains("dev svc0")),
            "the ClusterIP range routed to a sink device (svc0): nothing owns a ClusterIP",
            &text,
        )
    }

    /// Step 2 on nftables: the Service's `service-` chain (reached through the
    /// `service-ips` map) spreads with an exact `numgen` cascade: 1/5, 1/4, 1/3, 1/2, rest;
    /// its DNAT targets are returned.
    fn step2_nftables(&mut self) -> Result<BTreeSet<IpAddr>, LabError> {
        let step = "the service- chain spreads with an exact numgen cascade";
        self.say(format!("\n== STEP 2: {step}"));
        let chain = svcnat_iptables::nftables::render::cluster_chain_name(&ServicePortName {
            service: ObjectName::new(NAMESPACE, "vote"),
            port: String::new(),
            protocol: Protocol::Tcp,
        });
        self.say(format!("$ nft list chain ip svcnat {chain}   (on node-0)"));
        let out = self
            .tb
            .exec(
                self.tb.ns_of_node(0),
                ["nft", "list", "chain", "ip", "svcnat", chain.as_str()],
            )
            .map_err(setup("nft"))?;
        let rules = String::from_utf8_lossy(&out.stdout).into_owned();
        for l in rules.lines() {
            self.say(format!("  {l}"));
        }
        let dnats = rules
            .lines()
            .filter(|l| l.contains("dnat") && l.contains(" to 10."))
            .count();
        expect(step, dnats == 5, "five DNAT rules, one per pod", &rules)?;
        for m in [5, 4, 3, 2] {
            expect(
                step,
                rules.contains(&format!("numgen random mod {m} < 1")),
                &format!("one in {m}"),
                &rules,
            )?;
        }
        Ok(rules
            .split_whitespace()
            .skip(1)
            .zip(rules.split_whitespace())
            .filter(|(_, before)| *before == "to")
            .filter_map(|(d, _)| d.parse::<SocketAddr>().ok())
            .map(|d| d.ip())
            .collect())
    }

    /// Starts a fake API server on the loopback of namespace `ns`.
    fn start_api(&mut self, ns: &str) -> Result<(), LabError> {
        let server = FakeApiServer::with_options(FakeApiOptions::default().netns(ns))
            .map_err(setup(&format!("fake API server in {ns}")))?;
        self.say(format!(
            "  (control plane) API server {} in namespace {ns}",
            server.url()
        ));
        self.apis.push((
            ns.to_string(),
            LabApi {
                server,
                publisher: Publisher::new(),
            },
        ));
        Ok(())
    }

    /// How a program in namespace `ns` reads the cluster: `--manifests DIR`, or
    /// `--kubeconfig FILE` of that namespace's fake API server.
    fn source_args(&self, ns: &str) -> Result<[String; 2], LabError> {
        match self.feed {
            Feed::Manifests => Ok(["--manifests".into(), self.dir.display().to_string()]),
            Feed::Api => self
                .apis
                .iter()
                .find(|(n, _)| n == ns)
                .map(|(_, api)| {
                    [
                        "--kubeconfig".into(),
                        api.server.kubeconfig_path().display().to_string(),
                    ]
                })
                .ok_or_else(|| LabError::Setup(format!("no API server in {ns}"))),
        }
    }

    /// Fed through the API: writes what changed in the manifests' cluster (Services, the
    /// EndpointSlices of their Pods, Nodes) to every fake API server.
    fn publish(&mut self) -> Result<(), LabError> {
        if self.apis.is_empty() {
            return Ok(());
        }
        let cluster = self.cluster()?;
        let mut lines = Vec::new();
        for (i, (ns, api)) in self.apis.iter_mut().enumerate() {
            let written = api
                .publisher
                .publish(&cluster, &api.server)
                .map_err(setup(&format!("publishing to the API server in {ns}")))?;
            if i == 0 {
                lines.extend(
                    written
                        .applied
                        .iter()
                        .map(|o| format!("  (API) applied {o}")),
                );
                lines.extend(
                    written
                        .deleted
                        .iter()
                        .map(|o| format!("  (API) deleted {o}")),
                );
            }
        }
        for l in lines {
            self.say(l);
        }
        Ok(())
    }

    /// Draws `service`'s path through node-0's dataplane as the manifests stand now (what
    /// `svcnat-ctl graph svc` prints) for the report.
    fn draw(&mut self, service: &str) -> Result<(), LabError> {
        let cluster = self.cluster()?;
        let cidr = "10.244.0.0/16"
            .parse()
            .map_err(|e| LabError::Setup(format!("cluster CIDR: {e}")))?;
        let node = NodeContext::new("node-0", vec![self.tb.node_ip(0)], vec![cidr]);
        let plan = Plan::compile(&cluster, &node);
        let name = ObjectName::new(NAMESPACE, service);
        let graph = ServiceGraph::build(&cluster, &plan, &name)
            .ok_or_else(|| LabError::Setup(format!("{name} is not in node-0's plan")))?;
        self.say(format!(
            "$ kubectl graph svc {service}   (svcnat-ctl: its path through node-0)"
        ));
        self.drawings.push((
            self.transcript.len(),
            format!("{name}: its path through node-0's dataplane"),
            graph.to_svg(),
        ));
        Ok(())
    }

    /// Runs headless Chromium in the browser namespace (client 0) on `url`; returns what
    /// it printed. At most [`BROWSER_TIMEOUT`].
    fn chromium(&self, args: &[&str], url: &str) -> Result<String, LabError> {
        let profile = self.browser_dir.join("profile");
        let mut cmd = self
            .tb
            .command(self.tb.ns_of_client(0), &self.programs.chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(setup("chromium"))?;
        let Some(mut stdout) = child.stdout.take() else {
            return Err(LabError::Setup("chromium: no stdout".into()));
        };
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
            text
        });
        let deadline = Instant::now() + BROWSER_TIMEOUT;
        loop {
            if child.try_wait().map_err(setup("chromium"))?.is_some() {
                break;
            }
            if Instant::now() > deadline || self.stop.load(Ordering::Relaxed) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LabError::Setup(format!(
                    "chromium on {url} did not finish within {BROWSER_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        reader
            .join()
            .map_err(|_| LabError::Setup("chromium output reader".into()))
    }

    /// The page at `url` as the browser renders it (its DOM).
    fn browser_dom(&self, url: &str) -> Result<String, LabError> {
        self.chromium(&["--dump-dom"], url)
    }

    /// A page that makes the browser POST a vote for option `vote` to the vote app on
    /// `node` as clicking its button does; its `file://` URL.
    fn vote_form(&self, node: IpAddr, vote: &str) -> Result<String, LabError> {
        let path = self.browser_dir.join(format!("vote-{vote}.html"));
        fs::write(
            &path,
            format!(
                "<!DOCTYPE html><html><body><form method=\"POST\" action=\"http://{}/\">\
                 <input type=\"hidden\" name=\"vote\" value=\"{vote}\"></form>\
                 <script>document.forms[0].submit()</script></body></html>\n",
                SocketAddr::new(node, 30000)
            ),
        )
        .map_err(setup("vote form"))?;
        Ok(format!("file://{}", path.display()))
    }

    /// Votes for option `vote` in the browser; the resulting page's DOM.
    fn vote_in_browser(&self, node: IpAddr, vote: &str) -> Result<String, LabError> {
        let form = self.vote_form(node, vote)?;
        self.chromium(&["--virtual-time-budget=8000", "--dump-dom"], &form)
    }

    /// Saves the browser's screenshot of `url` as `file` (in the report's directory when
    /// there is one) and checks that it is a PNG.
    fn screenshot(&mut self, url: &str, file: &str, caption: &str) -> Result<(), LabError> {
        let dir = self
            .screenshot_dir
            .clone()
            .unwrap_or_else(|| self.browser_dir.clone());
        fs::create_dir_all(&dir).map_err(setup("screenshot directory"))?;
        let path = dir.join(file);
        let _ = fs::remove_file(&path);
        self.chromium(
            &[
                "--window-size=900,520",
                "--virtual-time-budget=8000",
                &format!("--screenshot={}", path.display()),
            ],
            url,
        )?;
        let png = fs::read(&path).unwrap_or_default();
        expect(
            caption,
            png.starts_with(b"\x89PNG") && png.len() > 1000,
            &format!(
                "the browser saved a screenshot ({file}, {} bytes)",
                png.len()
            ),
            &path.display().to_string(),
        )?;
        self.screenshots
            .push((self.transcript.len(), caption.to_string(), path));
        Ok(())
    }

    /// A screenshot of the page after voting for `vote` (the browser votes once more).
    fn screenshot_vote(
        &mut self,
        node: IpAddr,
        vote: &str,
        file: &str,
        caption: &str,
    ) -> Result<(), LabError> {
        let form = self.vote_form(node, vote)?;
        self.screenshot(&form, file, caption)
    }

    /// `redis-cli ARGS` in pod `pod`; its output (not shown).
    fn in_pod_quiet(&self, pod: &str, args: &[&str]) -> Result<String, LabError> {
        let ns = self.pod_ns(pod)?;
        let mut argv: Vec<&str> = vec![self.programs.redis_cli.to_str().unwrap_or("redis-cli")];
        argv.extend_from_slice(args);
        let out = self.tb.exec(&ns, argv).map_err(setup("redis-cli"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr))
    }

    fn say(&mut self, line: impl Into<String>) {
        let line = line.into();
        println!("{line}");
        self.transcript.push(line);
    }

    fn check_stop(&self) -> Result<(), LabError> {
        if self.stop.load(Ordering::Relaxed) {
            Err(LabError::Interrupted)
        } else {
            Ok(())
        }
    }

    fn write(&mut self, file: &str, text: &str) -> Result<(), LabError> {
        // Write and rename, so a watcher never reads half a file.
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, text).map_err(setup("write manifest"))?;
        fs::rename(&tmp, self.dir.join(file)).map_err(setup("rename manifest"))?;
        // Through the API, the edit reaches the programs as API writes.
        self.publish()
    }

    fn spawn(&mut self, ns: &str, program: &Path, args: &[&str]) -> Result<(), LabError> {
        self.spawn_until(ns, program, args, |l| l.trim() == "ready")
    }

    /// Starts `program` in `ns` and waits until it prints a line `ready` says is the one.
    fn spawn_until(
        &mut self,
        ns: &str,
        program: &Path,
        args: &[&str],
        ready: fn(&str) -> bool,
    ) -> Result<(), LabError> {
        spawn_ready(&self.tb, &mut self.daemons, ns, program, args, ready)
    }

    fn pod_ns(&self, pod: &str) -> Result<String, LabError> {
        self.tb
            .ns_of_pod(pod)
            .map(str::to_string)
            .ok_or_else(|| LabError::Setup(format!("no pod {pod}")))
    }

    /// The cluster as the manifests describe it right now.
    fn cluster(&self) -> Result<Cluster, LabError> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map_err(setup("read manifests"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        let texts: Vec<(String, String)> = files
            .iter()
            .filter_map(|p| {
                let name = p.file_name()?.to_string_lossy().into_owned();
                Some((name, fs::read_to_string(p).ok()?))
            })
            .collect();
        let mut m = Manifests::from_files(
            texts.iter().map(|(n, t)| (n.as_str(), t.as_str())),
            &self.config,
        );
        let c = m.build(&self.config);
        if let Some(e) = m.errors.first() {
            return Err(LabError::Setup(format!("lab manifests: {e}")));
        }
        Ok(c)
    }

    /// Creates and deletes pod namespaces so that they match the manifests' Pods (what the
    /// kubelet does).
    fn reconcile_pods(&mut self) -> Result<(), LabError> {
        let cluster = self.cluster()?;
        let wanted: BTreeSet<String> = cluster.pods().map(|p| p.name.name.clone()).collect();
        let have: BTreeSet<String> = self.tb.pods().map(|p| p.name.clone()).collect();
        for gone in have.difference(&wanted) {
            self.tb.remove_pod(gone).map_err(setup("remove pod"))?;
            self.say(format!("  (kubelet) pod {gone} deleted"));
        }
        for pod in cluster.pods().filter(|p| !have.contains(&p.name.name)) {
            let node = match pod.node_name.as_deref() {
                Some("node-1") => 1,
                _ => 0,
            };
            let Some(ip) = pod.ips.first().copied() else {
                continue;
            };
            let role = |k: &str, v: &str| pod.labels.get(k).map(String::as_str) == Some(v);
            let redis = role("app", "redis");
            // The resolv.conf first: the pod's programs read it when they start.
            let mut spec = PodSpec::new(pod.name.name.clone(), node, ip).resolv_conf(RESOLV_CONF);
            if !redis {
                for p in pod.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                    spec = spec.tcp(p.port);
                }
            }
            if role("role", "vote") {
                // The vote page reaches redis by its Service's name, as the app does.
                spec = spec.vote_app("redis:6379");
            }
            self.tb.add_pod(spec).map_err(setup("add pod"))?;
            let ns = self.pod_ns(&pod.name.name)?;
            if redis {
                let data = self.browser_dir.join(&pod.name.name);
                fs::create_dir_all(&data).map_err(setup("redis directory"))?;
                let server = self.programs.redis_server.clone();
                let data = data.display().to_string();
                self.spawn_until(
                    &ns,
                    &server,
                    &[
                        "--port",
                        "6379",
                        "--bind",
                        "0.0.0.0",
                        "--protected-mode",
                        "no",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        &data,
                    ],
                    |l| l.contains("Ready to accept connections"),
                )?;
            }
            self.say(format!(
                "  (kubelet) pod {} started on node-{node} with IP {ip}",
                pod.name.name
            ));
        }
        Ok(())
    }

    fn ctl(&mut self, args: &[&str]) -> Result<String, LabError> {
        let out = std::process::Command::new(&self.programs.ctl)
            .args([
                "--manifests",
                &self.dir.display().to_string(),
                "--default-namespace",
                NAMESPACE,
            ])
            .args(args)
            .output()
            .map_err(setup("svcnat-ctl"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        self.say(format!("$ kubectl {}", args.join(" ")));
        for l in text.lines() {
            self.say(format!("  {l}"));
        }
        Ok(text)
    }

    /// Polls `f` until it returns `Ok(true)` or 20 seconds pass.
    fn eventually(
        &mut self,
        step: &str,
        what: &str,
        mut f: impl FnMut(&mut Lab) -> Result<(bool, String), LabError>,
    ) -> Result<String, LabError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.check_stop()?;
            let (ok, seen) = f(self)?;
            if ok {
                self.say(format!("  OK: {what}: {seen}"));
                return Ok(seen);
            }
            if Instant::now() > deadline {
                return Err(LabError::Wrong {
                    step: step.into(),
                    detail: format!("expected {what}; observed {seen}"),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn browse(
        &self,
        target: SocketAddr,
        count: u32,
    ) -> Result<crate::testbed::ProbeResult, LabError> {
        self.tb
            .probe(
                self.tb.ns_of_client(0),
                ProbeArgs::tcp(target).count(count).timeout_ms(1500),
            )
            .map_err(setup("probe"))
    }

    fn vote_pods(&self) -> Result<BTreeSet<String>, LabError> {
        Ok(self
            .cluster()?
            .pods()
            .filter(|p| p.labels.get("role").map(String::as_str) == Some("vote"))
            .map(|p| p.name.name.clone())
            .collect())
    }

    fn getent(&self, pod: &str, name: &str) -> Result<(bool, String), LabError> {
        let ns = self.pod_ns(pod)?;
        let out = self
            .tb
            .exec(&ns, ["getent", "hosts", name])
            .map_err(setup("getent"))?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok((out.status.success(), text))
    }

    /// Runs every step of the lab.
    pub fn replay(&mut self) -> Result<(), LabError> {
        let node0 = self.tb.node_ip(0);
        let node1 = self.tb.node_ip(1);

        // 1. Publishing the vote app with a NodePort Service.
        let step = "NodePort 30000 spreads over the five vote pods";
        self.say(format!("\n== STEP 1: {step}"));
        self.say("$ kubectl apply -f vote-svc.yaml");
        self.write("vote-svc.yaml", VOTE_SVC)?;
        let all = self.vote_pods()?;
        self.say(format!("  {} vote pods: {all:?}", all.len()));
        for node in [node0, node1] {
            let target = SocketAddr::new(node, 30000);
            self.say(format!(
                "$ curl http://{target}/  (x100, from the browser namespace)"
            ));
            let want = all.clone();
            self.eventually(
                step,
                &format!("all five vote pods answer on {target}"),
                |lab| {
                    let r = lab.browse(target, 100)?;
                    Ok((r.all_ok() && r.pods() == want, r.to_string()))
                },
            )?;
        }
        let url = format!("http://{node0}:30000/");
        self.say(format!(
            "$ browser: open {url}   (Chromium, headless, in the browser namespace)"
        ));
        let first = self.eventually(step, "the vote page, processed by a vote pod", |lab| {
            let dom = lab.browser_dom(&url)?;
            let pod = pod_in_page(&dom);
            let ok = dom.contains("Cats vs Dogs!") && pod.starts_with("vote-");
            Ok((ok, if ok { pod } else { page_result(&dom) }))
        })?;
        self.screenshot(
            &url,
            "step1-vote-page.png",
            "Step 1: the vote page through NodePort 30000",
        )?;
        self.say("$ browser: reload");
        self.eventually(step, "a reload is processed by another pod", |lab| {
            let pod = pod_in_page(&lab.browser_dom(&url)?);
            Ok((
                pod.starts_with("vote-") && pod != first,
                format!("{first}, then {pod}"),
            ))
        })?;
        self.ctl(&["get", "svc"])?;
        let describe = self.ctl(&["describe", "service", "vote"])?;
        expect(
            step,
            describe.contains("NodePort:") && describe.contains("30000/TCP"),
            "describe shows NodePort 30000/TCP",
            &describe,
        )?;
        expect(
            step,
            describe.contains("+ 2 more..."),
            "describe lists endpoints with `+ 2 more...`",
            &describe,
        )?;
        self.nodeport_counters(step)?;

        // 2. Services under the hood: the iptables chains (or the nftables chain).
        let dnat = match self.backend {
            LabBackend::Iptables => self.step2_iptables()?,
            LabBackend::Nftables => self.step2_nftables()?,
            LabBackend::Userspace => self.step2_plan()?,
            LabBackend::Ipvs => self.step2_ipvs()?,
        };
        self.draw("vote")?;
        self.dnat_matches_pods(&dnat)?;
        self.node_routes()?;

        // 3. Exercise: the selector changed to a label that does not exist, then back.
        let step = "selector on a missing label empties the endpoints";
        self.say(format!("\n== STEP 3: {step}"));
        self.say("$ kubectl edit svc vote   (selector role: vote -> role: nosuchlabel)");
        self.write(
            "vote-svc.yaml",
            &VOTE_SVC.replace("    role: vote\n  ports", "    role: nosuchlabel\n  ports"),
        )?;
        let target = SocketAddr::new(node0, 30000);
        self.eventually(step, "connections to :30000 are refused", |lab| {
            let r = lab.browse(target, 3)?;
            Ok((r.refused() == 3, r.to_string()))
        })?;
        let d = self.ctl(&["describe", "service", "vote"])?;
        expect(
            step,
            d.contains("Endpoints:                <none>")
                || d.lines()
                    .any(|l| l.starts_with("Endpoints:") && l.contains("<none>")),
            "describe shows Endpoints: <none>",
            &d,
        )?;
        self.say("$ kubectl edit svc vote   (selector back to role: vote)");
        self.write("vote-svc.yaml", VOTE_SVC)?;
        let want = all.clone();
        self.eventually(step, "the five pods answer again", |lab| {
            let r = lab.browse(target, 100)?;
            Ok((r.all_ok() && r.pods() == want, r.to_string()))
        })?;

        // 4. Exercise: scaling changes the number of endpoints.
        let step = "scaling 5 -> 2 -> 5 changes the endpoints";
        self.say(format!("\n== STEP 4: {step}"));
        for replicas in [2u32, 5] {
            self.say(format!("$ kubectl scale deploy vote --replicas={replicas}"));
            self.write(
                "vote-deploy.yaml",
                &deployment("vote", replicas, "role: vote", 80),
            )?;
            self.reconcile_pods()?;
            let want = self.vote_pods()?;
            expect(
                step,
                want.len() == replicas as usize,
                &format!("{replicas} vote pods"),
                &format!("{want:?}"),
            )?;
            self.eventually(step, &format!("exactly {replicas} pods answer"), |lab| {
                let r = lab.browse(target, 60)?;
                Ok((r.all_ok() && r.pods() == want, r.to_string()))
            })?;
            self.ctl(&["get", "endpoints"])?;
        }

        // 5. Exposing the app with externalIPs: the two nodes' addresses.
        let step = "externalIPs on the two node addresses";
        self.say(format!("\n== STEP 5: {step}"));
        self.say(format!(
            "$ kubectl edit svc vote   (externalIPs: {node0}, {node1})"
        ));
        self.write(
            "vote-svc.yaml",
            &format!("{VOTE_SVC}  externalIPs:\n    - {node0}\n    - {node1}\n"),
        )?;
        for node in [node0, node1] {
            let t = SocketAddr::new(node, 80);
            self.eventually(step, &format!("http://{t}/ answers"), |lab| {
                let r = lab.browse(t, 20)?;
                Ok((r.all_ok(), r.to_string()))
            })?;
        }
        let svc = self.ctl(&["get", "svc"])?;
        expect(
            step,
            svc.contains(&format!("{node0},{node1}")),
            "EXTERNAL-IP lists both node addresses",
            &svc,
        )?;

        // 6. Service discovery: redis does not resolve before its Service exists.
        let step = "nslookup redis fails before the redis Service exists";
        self.say(format!("\n== STEP 6: {step}"));
        let vote_pod = self.vote_pods()?.into_iter().next().unwrap_or_default();
        let ns = self.pod_ns(&vote_pod)?;
        let resolv = fs::read_to_string(format!("/etc/netns/{ns}/resolv.conf")).unwrap_or_default();
        self.say(format!("$ kubectl exec {vote_pod} cat /etc/resolv.conf"));
        for l in resolv.lines() {
            self.say(format!("  {l}"));
        }
        self.say(format!("$ kubectl exec {vote_pod} getent hosts redis"));
        let vp = vote_pod.clone();
        self.eventually(
            step,
            "redis does not resolve (but kube-dns answers)",
            |lab| {
                let (found, text) = lab.getent(&vp, "redis")?;
                let (dns_ok, dns) = lab.getent(&vp, "kube-dns.kube-system")?;
                Ok((
                    !found && dns_ok,
                    format!("redis: {text:?}; kube-dns.kube-system: {dns:?}"),
                ))
            },
        )?;

        // The reader tries to vote: it does not go through.
        self.say(format!("$ browser: vote for Cats on http://{node0}:30000/"));
        let dom = self.vote_in_browser(node0, "a")?;
        expect(
            step,
            dom.contains("Your vote could not be recorded") && dom.contains("cannot resolve redis"),
            "the vote does not go through: the vote pod cannot resolve redis",
            &page_result(&dom),
        )?;
        self.screenshot_vote(
            node0,
            "a",
            "step6-vote-fails.png",
            "Step 6: the vote does not go through",
        )?;
        let svc = self.ctl(&["get", "svc", "-n", "kube-system"])?;
        expect(
            step,
            svc.lines().any(|l| l.starts_with("kube-dns ")),
            "the kube-dns Service in kube-system (the nameserver of resolv.conf)",
            &svc,
        )?;
        if let Some((ok, text)) = self.in_pod(&vote_pod, &["nslookup", "redis"])? {
            // nslookup walks the search list (NXDOMAIN for each cluster name) and reports
            // the last name tried, `redis.` itself: outside the cluster, so REFUSED here,
            // where svcnat-dns runs without `--upstream` (CoreDNS would forward it and
            // report NXDOMAIN); "recursion not available" says the same.
            expect(
                step,
                !ok && text.contains("server can't find redis"),
                "nslookup redis: the server can't find redis",
                &text,
            )?;
        }

        // 7. The redis Service: the name resolves to its ClusterIP.
        let step = "redis resolves to its ClusterIP after kubectl apply -f redis-svc.yaml";
        self.say(format!("\n== STEP 7: {step}"));
        self.say("$ kubectl apply -f redis-svc.yaml");
        self.write("redis-svc.yaml", REDIS_SVC)?;
        let redis_ip = self
            .cluster()?
            .service(&ObjectName::new(NAMESPACE, "redis"))
            .and_then(|s| s.cluster_ip())
            .ok_or_else(|| LabError::Setup("redis has no ClusterIP".into()))?;
        let vp = vote_pod.clone();
        let seen = self.eventually(step, "getent hosts redis", |lab| {
            let (found, text) = lab.getent(&vp, "redis")?;
            Ok((found && text.starts_with(&redis_ip.to_string()), text))
        })?;
        expect(
            step,
            seen.contains("redis.instavote.svc.cluster.local"),
            "the FQDN redis.instavote.svc.cluster.local",
            &seen,
        )?;
        let d = self.ctl(&["describe", "service", "redis"])?;
        expect(
            step,
            d.lines()
                .any(|l| l.starts_with("Endpoints:") && l.contains("<none>")),
            "no endpoints yet",
            &d,
        )?;
        if let Some((ok, text)) = self.in_pod(&vote_pod, &["nslookup", "redis"])? {
            expect(
                step,
                ok && text.contains("Name:\tredis.instavote.svc.cluster.local")
                    && text.contains(&format!("Address: {redis_ip}")),
                "nslookup redis: redis.instavote.svc.cluster.local and its ClusterIP",
                &text,
            )?;
        }
        // The name resolves, the address does not answer ping: a ClusterIP is only a
        // translation for the Service's ports, nothing on any machine owns it (with
        // kube-proxy's IPVS mode it does answer: there it sits on the kube-ipvs0 device).
        if let Some((ok, text)) =
            self.in_pod(&vote_pod, &["ping", "-c", "2", "-W", "1", "redis"])?
        {
            expect(
                step,
                !ok && text.contains(&format!("({redis_ip})")) && text.contains("100% packet loss"),
                "ping redis resolves to the ClusterIP, and nothing answers",
                &text,
            )?;
        }

        // 8. The redis Deployment: endpoints appear, and vote reaches redis.
        let step = "redis endpoints appear and the vote pod reaches redis through the Service";
        self.say(format!("\n== STEP 8: {step}"));
        self.say("$ kubectl apply -f redis-deploy.yaml");
        self.write(
            "redis-deploy.yaml",
            &deployment("redis", 2, "app: redis", 6379),
        )?;
        self.reconcile_pods()?;
        let d = self.ctl(&["describe", "service", "redis"])?;
        let eps = d
            .lines()
            .find(|l| l.starts_with("Endpoints:"))
            .unwrap_or_default()
            .to_string();
        expect(
            step,
            eps.matches(":6379").count() == 2,
            "two redis endpoints",
            &eps,
        )?;
        let vp = vote_pod.clone();
        self.say(format!(
            "$ kubectl exec {vote_pod} -- redis-cli -h redis PING   (through the ClusterIP)"
        ));
        self.eventually(step, "redis pods answer the vote pod", |lab| {
            let out = lab.in_pod_quiet(&vp, &["-h", "redis", "PING"])?;
            Ok((out.trim() == "PONG", out.trim().to_string()))
        })?;
        // The reader votes again, and this time it goes through.
        let page = format!("http://{node0}:30000/");
        self.say(format!("$ browser: vote for Cats on {page}"));
        self.eventually(step, "the vote goes through", |lab| {
            let dom = lab.vote_in_browser(node0, "a")?;
            Ok((
                dom.contains("Your vote for Cats was recorded"),
                page_result(&dom),
            ))
        })?;
        self.screenshot_vote(
            node0,
            "b",
            "step8-vote-recorded.png",
            "Step 8: the vote goes through",
        )?;
        // Each redis pod is a server of its own: the votes are in one or the other.
        let redis_pods: Vec<(String, IpAddr)> = self
            .cluster()?
            .pods()
            .filter(|p| p.labels.get("app").map(String::as_str) == Some("redis"))
            .filter_map(|p| Some((p.name.name.clone(), *p.ips.first()?)))
            .collect();
        let mut votes = Vec::new();
        for (pod, pod_ip) in &redis_pods {
            self.say(format!(
                "$ kubectl exec {vote_pod} -- redis-cli -h {pod_ip} LRANGE votes 0 -1   ({pod})"
            ));
            let out = self.in_pod_quiet(
                &vote_pod,
                &["-h", &pod_ip.to_string(), "LRANGE", "votes", "0", "-1"],
            )?;
            for l in out.lines().filter(|l| !l.trim().is_empty()) {
                self.say(format!("  {l}"));
                votes.push(l.to_string());
            }
        }
        expect(
            step,
            votes.iter().any(|v| v.contains(r#""vote":"a""#))
                && votes.iter().any(|v| v.contains(r#""vote":"b""#)),
            "the votes for Cats and Dogs are stored in redis",
            &votes.join("\n"),
        )?;
        self.draw("redis")?;
        self.say("\nAll steps of the lab observed as the lab describes them.");
        Ok(())
    }
}

/// Starts `program` in `ns` (kept in `daemons`, killed with them) and waits up to 30 s for
/// a line of its stdout that `ready` accepts: the first sync done, the server listening.
pub(crate) fn spawn_ready(
    tb: &Testbed,
    daemons: &mut Vec<Child>,
    ns: &str,
    program: &Path,
    args: &[&str],
    ready: fn(&str) -> bool,
) -> Result<(), LabError> {
    let mut child = tb
        .command(ns, program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(setup("spawn"))?;
    let Some(stdout) = child.stdout.take() else {
        return Err(LabError::Setup("no stdout".into()));
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if ready(&line) {
                let _ = tx.send(());
            }
        }
    });
    daemons.push(child);
    rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
        LabError::Setup(format!(
            "{} in {ns} did not become ready",
            program.display()
        ))
    })
}

/// The longest a browser run may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where `program` is on the PATH.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Whether `program` is on the PATH.
fn installed(program: &str) -> bool {
    which(program).is_some()
}

/// The pod named on a vote page (`Processed by container ID <b>NAME</b>`), or "".
fn pod_in_page(dom: &str) -> String {
    dom.split_once("Processed by container ID <b>")
        .and_then(|(_, rest)| rest.split_once("</b>"))
        .map(|(pod, _)| pod.to_string())
        .unwrap_or_default()
}

/// The result line of a vote page, or the page's start when it has none.
fn page_result(dom: &str) -> String {
    dom.split_once("<p id=\"result\"")
        .and_then(|(_, rest)| rest.split_once("</p>"))
        .map(|(p, _)| p.split_once('>').map_or(p, |(_, t)| t).to_string())
        .unwrap_or_else(|| dom.chars().take(300).collect())
}

fn expect(step: &str, ok: bool, what: &str, seen: &str) -> Result<(), LabError> {
    if ok {
        println!("  OK: {what}");
        Ok(())
    } else {
        Err(LabError::Wrong {
            step: step.into(),
            detail: format!("expected {what}; observed:\n{seen}"),
        })
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

/// Writes `DIR/index.html`: the replay as a page (each step, its commands, what was
/// observed, the drawings and the browser's screenshots where they were taken) and whether
/// it passed. Returns the page's path. The page is written to a temporary name first, so a
/// reader never sees half of it.
pub fn write_report(
    dir: &Path,
    title: &str,
    lab: &Lab,
    outcome: &Result<(), String>,
) -> std::io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let transcript = &lab.transcript;
    // Figures in transcript order: drawings inline, screenshots by file name.
    let mut drawings: Vec<(usize, String, String)> = lab.drawings.clone();
    for (at, caption, path) in &lab.screenshots {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.parent() == Some(dir) {
            drawings.push((
                *at,
                caption.clone(),
                format!(
                    "<img src=\"{}\" alt=\"{}\" width=\"900\">",
                    svcnat_core::graph::xml_escape(&name),
                    svcnat_core::graph::xml_escape(caption)
                ),
            ));
        }
    }
    drawings.sort_by_key(|(at, _, _)| *at);
    let drawings = &drawings;
    let mut html = String::new();
    html.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    html.push_str(&format!(
        "<title>{}</title>\n",
        svcnat_core::graph::xml_escape(title)
    ));
    html.push_str(
        "<style>body{font-family:sans-serif;margin:2em;max-width:80em}\
         pre{background:#f6f8fa;padding:.8em;overflow-x:auto}\
         .cmd{color:#024;font-weight:bold}.ok{color:#185c1a}.skip{color:#a60}\
         .pass{color:#185c1a}.fail{color:#b00}section{margin-bottom:2em}\
         figure{margin:1em 0;overflow-x:auto}figcaption{color:#555}</style>\n</head><body>\n",
    );
    html.push_str(&format!(
        "<h1>{}</h1>\n",
        svcnat_core::graph::xml_escape(title)
    ));
    match outcome {
        Ok(()) => html.push_str(
            "<p class=\"pass\" id=\"outcome\">PASSED: every step observed as the lab describes it.</p>\n",
        ),
        Err(e) => html.push_str(&format!(
            "<p class=\"fail\" id=\"outcome\">FAILED: {}</p>\n",
            svcnat_core::graph::xml_escape(e)
        )),
    }
    let mut open = false;
    let mut in_pre = false;
    let mut next_drawing = drawings.iter().peekable();
    for (i, line) in transcript.iter().enumerate() {
        while let Some((at, caption, svg)) = next_drawing.peek() {
            if *at > i {
                break;
            }
            if in_pre {
                html.push_str("</pre>\n");
                in_pre = false;
            }
            html.push_str(&format!(
                "<figure>{svg}<figcaption>{}</figcaption></figure>\n",
                svcnat_core::graph::xml_escape(caption)
            ));
            next_drawing.next();
        }
        if let Some(step) = line.trim_start().strip_prefix("== ") {
            if in_pre {
                html.push_str("</pre>\n");
                in_pre = false;
            }
            if open {
                html.push_str("</section>\n");
            }
            html.push_str(&format!(
                "<section>\n<h2>{}</h2>\n",
                svcnat_core::graph::xml_escape(step)
            ));
            open = true;
            continue;
        }
        if !in_pre {
            html.push_str("<pre>");
            in_pre = true;
        }
        let class = if line.starts_with("$ ") {
            "cmd"
        } else if line.trim_start().starts_with("OK: ") {
            "ok"
        } else if line.trim_start().starts_with("SKIP: ") {
            "skip"
        } else {
            ""
        };
        if class.is_empty() {
            html.push_str(&svcnat_core::graph::xml_escape(line));
        } else {
            html.push_str(&format!(
                "<span class=\"{class}\">{}</span>",
                svcnat_core::graph::xml_escape(line)
            ));
        }
        html.push('\n');
    }
    if in_pre {
        html.push_str("</pre>\n");
    }
    for (_, caption, svg) in next_drawing {
        html.push_str(&format!(
            "<figure>{svg}<figcaption>{}</figcaption></figure>\n",
            svcnat_core::graph::xml_escape(caption)
        ));
    }
    if open {
        html.push_str("</section>\n");
    }
    html.push_str("</body></html>\n");
    let path = dir.join("index.html");
    let tmp = dir.join(".index.html.tmp");
    fs::write(&tmp, html)?;
    fs::rename(&tmp, &path)?;
    Ok(path)
}
