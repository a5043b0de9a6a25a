//! `svcnat-dns` end to end, with real packets: the server runs inside a node namespace of
//! a testbed, clients (`dig`, `nslookup`, the glibc resolver through `getent`) run in a pod
//! namespace, as the lab's `kubectl exec vote-xxxx nslookup redis` does.
//!
//! Each test builds its own testbed (one node, the pod `vote-1`), writes the lab's manifests
//! into a scratch directory, and starts `svcnat-dns --listen <node ip>:53 --listen
//! 10.96.0.10:53` in the node namespace (10.96.0.10, kube-dns's ClusterIP, is put on the
//! node's `svc0` device so that a pod's `nameserver 10.96.0.10` reaches it as in the lab).
//! Each test returns early with `SKIP: reason` when not root or without `dig` (and fails
//! under `CI=true`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use svcnat_examples::skip_unless_root;
use svcnat_examples::testbed::{PodSpec, Testbed, TestbedSpec, in_ci, wait_until};

const KUBE_DNS_IP: &str = "10.96.0.10";
const REDIS_IP: &str = "10.102.77.6";
const POD_RESOLV_CONF: &str = "nameserver 10.96.0.10\n\
                               search instavote.svc.cluster.local svc.cluster.local cluster.local\n\
                               options ndots:5\n";

/// Returns from the test with `SKIP` when a client tool is missing (panics under CI).
macro_rules! skip_unless_tools {
    () => {
        if let Err(reason) = tools_present() {
            if in_ci() {
                panic!("CI=true but {reason}");
            }
            eprintln!("SKIP: {reason}");
            return;
        }
    };
}

fn tools_present() -> Result<(), String> {
    for tool in ["dig", "nslookup", "getent"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Err(format!(
                "`{tool}` is not installed (Debian: dnsutils, libc-bin)"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------

const KUBE_DNS: &str = "\
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
";

/// The lab's vote Service, and the testbed's pod `vote-1` behind it.
const VOTE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: vote
  labels: {role: vote}
spec:
  selector: {role: vote}
  clusterIP: 10.108.108.157
  ports:
  - {port: 80, targetPort: 80, nodePort: 30000}
  type: NodePort
---
apiVersion: v1
kind: Pod
metadata:
  name: vote-1
  labels: {role: vote}
spec:
  nodeName: node-0
  containers: [{name: vote, image: schoolofdevops/vote}]
status: {podIP: 10.244.0.10}
";

/// The lab's redis Service, with a named port (for SRV) and a fixed ClusterIP.
fn redis_svc(cluster_ip: &str) -> String {
    format!(
        "\
apiVersion: v1
kind: Service
metadata:
  name: redis
  labels: {{role: redis, tier: back}}
spec:
  clusterIP: {cluster_ip}
  selector: {{app: redis}}
  ports:
  - {{name: redis, port: 6379, protocol: TCP, targetPort: 6379}}
  type: ClusterIP
"
    )
}

/// A headless Service whose Pod has a hostname, and an ExternalName Service.
const DB_AND_SEARCH: &str = "\
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, labels: {app: db}}
spec: {hostname: db-0, subdomain: db, containers: [{name: pg, image: postgres}]}
status: {podIP: 10.244.0.20}
---
apiVersion: v1
kind: Service
metadata: {name: search}
spec:
  type: ExternalName
  externalName: search.example.com
";

/// A headless Service `big` with 60 ready endpoints from an Endpoints object: 60 A
/// records, 1,000 bytes, more than 512.
fn big_headless() -> String {
    let mut s = String::from(
        "\
apiVersion: v1
kind: Service
metadata: {name: big}
spec:
  clusterIP: None
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: big}
subsets:
- ports: [{name: http, port: 80}]
  addresses:
",
    );
    for i in 1..=60 {
        s.push_str(&format!("  - ip: 10.244.7.{i}\n"));
    }
    s
}

/// A scratch manifest directory, removed on drop.
struct ManifestDir(PathBuf);

impl ManifestDir {
    fn new() -> ManifestDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("svcnat-dns-test-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        ManifestDir(dir)
    }

    fn write(&self, name: &str, text: &str) {
        // Write and rename, as editors and `kubectl` do, so the server never sees half a file.
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.0.join(name)).unwrap();
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// `svcnat-dns` running in a namespace; killed on drop.
struct Dns {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Dns {
    fn start(tb: &Testbed, ns: &str, dir: &Path, listen: &[String]) -> Dns {
        let mut cmd = tb.command(ns, env!("CARGO_BIN_EXE_svcnat-dns"));
        cmd.arg("--manifests")
            .arg(dir)
            .args(["--default-namespace", "instavote", "-v"]);
        for l in listen {
            cmd.args(["--listen", l]);
        }
        Dns::spawn(cmd)
    }

    /// Runs `cmd` (an `svcnat-dns` command line) and waits for `ready`.
    fn spawn(mut cmd: Command) -> Dns {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let dns = Dns { child, stderr };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line == "ready" => dns,
            other => {
                thread::sleep(Duration::from_millis(200));
                panic!("svcnat-dns did not start: {other:?}\n{}", dns.stderr());
            }
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success(), "kill -TERM {pid}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "svcnat-dns ignored SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A testbed with the DNS server running on node 0; fields drop in order (server first).
struct Lab {
    dns: Dns,
    dir: ManifestDir,
    pod_ns: String,
    node_ip: IpAddr,
    tb: Testbed,
}

/// Builds the testbed and the manifest directory, lets `prepare` edit the directory, and
/// starts the server.
fn lab(prepare: impl FnOnce(&ManifestDir)) -> Lab {
    let spec = TestbedSpec::new(1, 0)
        .binaries(svcnat_examples::testbed_binaries!())
        .pod(PodSpec::new("vote-1", 0, "10.244.0.10".parse().unwrap()).tcp(80));
    let mut tb = Testbed::new(spec).unwrap();
    let node_ns = tb.ns_of_node(0).to_string();
    let pod_ns = tb.ns_of_pod("vote-1").unwrap().to_string();
    let node_ip = tb.node_ip(0);
    // kube-dns's ClusterIP as a local address of the node, so pods reach it as in the lab
    // (a proxy would DNAT it to a CoreDNS pod instead).
    tb.exec_ok(
        &node_ns,
        [
            "ip",
            "addr",
            "add",
            &format!("{KUBE_DNS_IP}/32"),
            "dev",
            "svc0",
        ],
    )
    .unwrap();
    tb.set_resolv_conf(&pod_ns, POD_RESOLV_CONF).unwrap();
    let dir = ManifestDir::new();
    dir.write("kube-dns.yaml", KUBE_DNS);
    dir.write("vote-svc.yaml", VOTE);
    dir.write("db.yaml", DB_AND_SEARCH);
    dir.write("big.yaml", &big_headless());
    prepare(&dir);
    let listen = [format!("{node_ip}:53"), format!("{KUBE_DNS_IP}:53")];
    let dns = Dns::start(&tb, &node_ns, dir.path(), &listen);
    Lab {
        dns,
        dir,
        pod_ns,
        node_ip,
        tb,
    }
}

fn with_redis(dir: &ManifestDir) {
    dir.write("redis-svc.yaml", &redis_svc(REDIS_IP));
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// What `dig` printed, split up.
#[derive(Debug)]
struct Dig {
    text: String,
}

impl Dig {
    fn status(&self) -> &str {
        self.text
            .split("status: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or("")
    }

    /// The header flags (`qr aa rd ...`) of the last response shown.
    fn flags(&self) -> Vec<&str> {
        self.text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(";; flags: "))
            .and_then(|l| l.split(';').next())
            .map(|f| f.split_whitespace().collect())
            .unwrap_or_default()
    }

    /// The records of a section (`ANSWER`, `AUTHORITY`, `ADDITIONAL`) of the last response,
    /// as `[name, ttl, class, type, rdata...]`.
    fn section(&self, name: &str) -> Vec<Vec<&str>> {
        let marker = format!(";; {name} SECTION:");
        let Some(start) = self.text.rfind(&marker) else {
            return Vec::new();
        };
        self.text[start + marker.len()..]
            .lines()
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .map(|l| l.split_whitespace().collect())
            .collect()
    }

    /// The rdata of the answer records of one type.
    fn answers(&self, rtype: &str) -> Vec<String> {
        self.section("ANSWER")
            .into_iter()
            .filter(|r| r.get(3) == Some(&rtype))
            .map(|r| r[4..].join(" "))
            .collect()
    }
}

impl Lab {
    /// `dig @server ARGS` from the pod; one try, two seconds.
    fn dig_at(&self, server: &str, args: &[&str]) -> Dig {
        let mut cmd = vec!["dig", "+time=2", "+tries=1"];
        let at = format!("@{server}");
        cmd.push(&at);
        cmd.extend_from_slice(args);
        let out = self.tb.exec(&self.pod_ns, &cmd).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{cmd:?}: {}\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Dig { text }
    }

    fn dig(&self, args: &[&str]) -> Dig {
        self.dig_at(&self.node_ip.to_string(), args)
    }

    /// `getent ARGS` in the pod (the glibc resolver with the pod's resolv.conf):
    /// (exit code, stdout).
    fn getent(&self, args: &[&str]) -> (i32, String) {
        let mut cmd = vec!["getent"];
        cmd.extend_from_slice(args);
        let out = self.tb.exec(&self.pod_ns, &cmd).unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// The first address `getent hosts NAME` gives, if any.
    fn hosts(&self, name: &str) -> Option<String> {
        let (code, out) = self.getent(&["hosts", name]);
        (code == 0).then(|| out.split_whitespace().next().unwrap_or("").to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn dig_gets_a_records_nodata_nxdomain_and_refused() {
    skip_unless_root!();
    skip_unless_tools!();
    let lab = lab(with_redis);

    // `dig @<node ip> redis.instavote.svc.cluster.local A +short` = the ClusterIP.
    let short = lab.dig(&["redis.instavote.svc.cluster.local", "A", "+short"]);
    assert_eq!(short.text.trim(), REDIS_IP);
    let a = lab.dig(&["redis.instavote.svc.cluster.local", "A"]);
    assert_eq!(a.status(), "NOERROR");
    assert_eq!(
        a.flags(),
        ["qr", "aa", "rd"],
        "authoritative, no RA\n{}",
        a.text
    );
    assert_eq!(a.answers("A"), [REDIS_IP]);
    assert_eq!(a.section("ANSWER")[0][1], "5", "TTL");
    // The kube-dns address answers the same, from that address.
    let via_cluster_ip = lab.dig_at(KUBE_DNS_IP, &["vote.instavote.svc.cluster.local", "A"]);
    assert_eq!(via_cluster_ip.answers("A"), ["10.108.108.157"]);

    // AAAA of a v4-only Service: NODATA, the zone's SOA in authority.
    let aaaa = lab.dig(&["redis.instavote.svc.cluster.local", "AAAA"]);
    assert_eq!(aaaa.status(), "NOERROR");
    assert!(aaaa.section("ANSWER").is_empty(), "{}", aaaa.text);
    let soa = aaaa.section("AUTHORITY");
    assert_eq!(soa.len(), 1, "{}", aaaa.text);
    assert_eq!((soa[0][0], soa[0][3]), ("cluster.local.", "SOA"));

    // A name in the domain that does not exist: NXDOMAIN with the SOA.
    let nx = lab.dig(&["nosuch.instavote.svc.cluster.local", "A"]);
    assert_eq!(nx.status(), "NXDOMAIN");
    assert!(nx.flags().contains(&"aa"));
    assert_eq!(nx.section("AUTHORITY")[0][3], "SOA");

    // Outside the cluster domain: REFUSED, we are not an open resolver.
    let refused = lab.dig(&["example.com"]);
    assert_eq!(refused.status(), "REFUSED");
    assert!(
        refused.flags().contains(&"rd"),
        "recursion was asked for: {}",
        refused.text
    );
    assert!(!refused.flags().contains(&"aa"));
    assert!(!refused.flags().contains(&"ra"));

    // An EDNS query gets an OPT record back.
    assert!(a.text.contains("; EDNS: version: 0"), "{}", a.text);
}

#[test]
fn dig_gets_srv_ptr_cname_and_headless_answers() {
    skip_unless_root!();
    skip_unless_tools!();
    let lab = lab(with_redis);

    let srv = lab.dig(&["_redis._tcp.redis.instavote.svc.cluster.local", "SRV"]);
    assert_eq!(
        srv.answers("SRV"),
        ["0 100 6379 redis.instavote.svc.cluster.local."]
    );
    // The target's address comes along in the additional section.
    let extra = srv.section("ADDITIONAL");
    assert!(
        extra
            .iter()
            .any(|r| r[0] == "redis.instavote.svc.cluster.local." && r[4] == REDIS_IP),
        "{}",
        srv.text
    );

    let ptr = lab.dig(&["-x", REDIS_IP, "+short"]);
    assert_eq!(ptr.text.trim(), "redis.instavote.svc.cluster.local.");
    let ptr = lab.dig(&["-x", KUBE_DNS_IP, "+short"]);
    assert_eq!(ptr.text.trim(), "kube-dns.kube-system.svc.cluster.local.");

    let cname = lab.dig(&["search.instavote.svc.cluster.local", "A"]);
    assert_eq!(cname.status(), "NOERROR");
    assert_eq!(cname.answers("CNAME"), ["search.example.com."]);
    assert!(cname.answers("A").is_empty(), "nothing outside is chased");

    let headless = lab.dig(&["db.instavote.svc.cluster.local", "A", "+short"]);
    assert_eq!(headless.text.trim(), "10.244.0.20");
    let host = lab.dig(&["db-0.db.instavote.svc.cluster.local", "A", "+short"]);
    assert_eq!(host.text.trim(), "10.244.0.20");
    let srv = lab.dig(&["_pg._tcp.db.instavote.svc.cluster.local", "SRV", "+short"]);
    assert_eq!(
        srv.text.trim(),
        "0 100 5432 db-0.db.instavote.svc.cluster.local."
    );
}

#[test]
fn large_answers_are_truncated_over_udp_and_complete_over_tcp() {
    skip_unless_root!();
    skip_unless_tools!();
    let lab = lab(with_redis);
    let name = "big.instavote.svc.cluster.local";

    // Plain DNS over UDP: 512 bytes; 60 A records do not fit. `+ignore` shows the
    // truncated response itself instead of retrying over TCP.
    let udp = lab.dig(&[name, "A", "+noedns", "+ignore"]);
    assert_eq!(udp.status(), "NOERROR");
    assert!(udp.flags().contains(&"tc"), "{}", udp.text);
    assert!(udp.answers("A").len() < 60);
    // dig's default on TC: the same question again over TCP, complete.
    let retried = lab.dig(&[name, "A", "+noedns"]);
    assert!(retried.text.contains("Truncated, retrying in TCP mode"));
    assert_eq!(retried.answers("A").len(), 60);
    // EDNS with a 512-byte buffer: truncated too, and the OPT record is echoed.
    let small = lab.dig(&[name, "A", "+bufsize=512", "+ignore"]);
    assert!(small.flags().contains(&"tc"), "{}", small.text);
    assert!(small.text.contains("; EDNS: version: 0"), "{}", small.text);

    // TCP from the start.
    let tcp = lab.dig(&[name, "A", "+tcp"]);
    assert!(!tcp.flags().contains(&"tc"));
    let mut ips = tcp.answers("A");
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 60, "{}", tcp.text);
    assert!(tcp.text.contains("(TCP)"), "{}", tcp.text);
    // Several queries on one TCP connection (dig +keepopen reuses it).
    let two = lab.dig(&[
        "+tcp",
        "+keepopen",
        "redis.instavote.svc.cluster.local",
        "A",
        "vote.instavote.svc.cluster.local",
        "A",
    ]);
    assert_eq!(
        two.text.matches("status: NOERROR").count(),
        2,
        "{}",
        two.text
    );
    assert!(two.text.contains(REDIS_IP) && two.text.contains("10.108.108.157"));
}

#[test]
fn the_glibc_resolver_finds_services_through_the_search_path() {
    skip_unless_root!();
    skip_unless_tools!();
    let lab = lab(with_redis);

    // `getent hosts redis`: the search list turns `redis` into the Service's FQDN.
    let (code, out) = lab.getent(&["hosts", "redis"]);
    assert_eq!(code, 0, "{out}\n{}", lab.dns.stderr());
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields[..2], [REDIS_IP, "redis.instavote.svc.cluster.local"]);

    let (code, out) = lab.getent(&["ahostsv4", "redis.instavote.svc.cluster.local"]);
    assert_eq!(code, 0);
    assert!(out.lines().all(|l| l.starts_with(REDIS_IP)), "{out}");
    // Another namespace's Service by `<svc>.<ns>`, and the ExternalName alias.
    assert_eq!(
        lab.hosts("kube-dns.kube-system").as_deref(),
        Some(KUBE_DNS_IP)
    );
    let (code, _) = lab.getent(&["hosts", "nosuch"]);
    assert_eq!(code, 2, "not found");

    // The lab's `nslookup redis`.
    let out = lab.tb.exec_ok(&lab.pod_ns, ["nslookup", "redis"]).unwrap();
    assert!(
        out.contains("Name:\tredis.instavote.svc.cluster.local"),
        "{out}"
    );
    assert!(out.contains(&format!("Address: {REDIS_IP}")), "{out}");
}

#[test]
fn reload_adds_redis_and_a_broken_edit_keeps_the_last_good_answer() {
    skip_unless_root!();
    skip_unless_tools!();
    // A file with an error from the start: reported with file, line and field; the other
    // objects load (the proxy's rules: an object that never loaded is left out).
    let mut lab = lab(|dir| {
        dir.write(
            "bad.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec:\n  type: NodePort\n  \
             ports:\n  - {port: 80, nodePort: 80}\n",
        )
    });
    let bad = lab.dir.path().join("bad.yaml").display().to_string();
    let stderr = lab.dns.stderr();
    assert!(
        stderr.contains(&format!(
            "{bad}:7: document 0: Service instavote/bad: spec.ports[0].nodePort: "
        )),
        "{stderr}"
    );

    // The lab: before the redis Service exists, `nslookup redis` finds nothing.
    let (code, out) = lab.getent(&["hosts", "redis"]);
    assert_eq!(code, 2, "{out}");
    let out = lab.tb.exec(&lab.pod_ns, ["nslookup", "redis"]).unwrap();
    assert!(!out.status.success());
    // Every search-list name is NXDOMAIN; the last try, `redis.` as it is, is outside the
    // cluster domain and REFUSED (CoreDNS would forward it upstream).
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("** server can't find redis"), "{text}");

    // `kubectl apply -f redis-svc.yaml`: within a few seconds it resolves.
    let applied = Instant::now();
    with_redis(&lab.dir);
    assert!(
        wait_until(Duration::from_secs(5), || lab.hosts("redis").as_deref()
            == Some(REDIS_IP)),
        "redis never resolved\n{}",
        lab.dns.stderr()
    );
    eprintln!(
        "redis resolved {:?} after the file appeared",
        applied.elapsed()
    );

    // A broken edit (invalid YAML): reported, and the last good answer stays.
    lab.dir.write(
        "redis-svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [redis\n",
    );
    let file = lab.dir.path().join("redis-svc.yaml").display().to_string();
    let kept = format!("(its last good version stays in force): {file}:");
    assert!(
        wait_until(Duration::from_secs(5), || lab.dns.stderr().contains(&kept)),
        "{}",
        lab.dns.stderr()
    );
    assert_eq!(lab.hosts("redis").as_deref(), Some(REDIS_IP));
    let a = lab.dig(&["redis.instavote.svc.cluster.local", "A", "+short"]);
    assert_eq!(a.text.trim(), REDIS_IP);

    // A good edit is served again.
    lab.dir.write("redis-svc.yaml", &redis_svc("10.102.77.7"));
    assert!(
        wait_until(Duration::from_secs(5), || lab.hosts("redis").as_deref()
            == Some("10.102.77.7")),
        "{}",
        lab.dns.stderr()
    );

    // Deleting the file deletes the name.
    std::fs::remove_file(lab.dir.path().join("redis-svc.yaml")).unwrap();
    assert!(wait_until(Duration::from_secs(5), || lab
        .hosts("redis")
        .is_none()));

    // SIGHUP reloads the zone; the server keeps serving (a daemon must not die of it).
    let pid = lab.dns.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        wait_until(Duration::from_secs(5), || lab
            .dns
            .stderr()
            .contains("reload asked (SIGHUP)")),
        "{}",
        lab.dns.stderr()
    );
    assert!(lab.hosts("vote").is_some(), "{}", lab.dns.stderr());

    // SIGTERM: a clean exit.
    let status = lab.dns.terminate();
    assert!(status.success(), "{status:?}\n{}", lab.dns.stderr());
}

// ---------------------------------------------------------------------------------------------
// Forwarding and rate limiting: one bare namespace per test
// ---------------------------------------------------------------------------------------------
//
// The namespace holds only `lo`, with 10.244.0.5 and 10.244.1.5 (inside the default pod
// CIDR, so allowed to recurse; two /24s for the rate limit) and 192.0.2.5 (outside) added
// to it. svcnat-dns listens on 127.0.0.1:53 and forwards to a stub upstream on
// 127.0.0.1:5300 (UDP and TCP) that this test process serves from a thread that entered
// the namespace.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};

use hickory_proto::op::{Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

const ALLOWED: &str = "10.244.0.5";
const ALLOWED_OTHER_NET: &str = "10.244.1.5";
const OUTSIDE: &str = "192.0.2.5";
const UPSTREAM: &str = "127.0.0.1:5300";
const EXAMPLE_ORG_IP: &str = "192.0.2.80";

/// A network namespace with only `lo` up and the test's client addresses; deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("svcnat-fwd-{}-{tag}", std::process::id());
        // A leftover from an interrupted run of this process id.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ns = Netns(name);
        ns.ip(&["netns", "add", &ns.0]);
        ns.ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        for addr in [ALLOWED, ALLOWED_OTHER_NET, OUTSIDE] {
            ns.ip(&[
                "-n",
                &ns.0,
                "addr",
                "add",
                &format!("{addr}/32"),
                "dev",
                "lo",
            ]);
        }
        ns
    }

    fn ip(&self, args: &[&str]) {
        let status = Command::new("ip").args(args).status().unwrap();
        assert!(status.success(), "ip {args:?}");
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens stay in it).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
        thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0, program]);
        cmd
    }

    /// `dig @127.0.0.1 -b SOURCE ARGS` in the namespace.
    fn dig(&self, source: &str, args: &[&str]) -> Dig {
        let out = self
            .command("dig")
            .args(["+time=3", "+tries=1", "@127.0.0.1", "-b", source])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "dig {args:?}: {text}");
        Dig { text }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// What the stub upstream saw: transport, id, client address, question name.
#[derive(Clone, Debug)]
struct Seen {
    tcp: bool,
    id: u16,
    from: SocketAddr,
    name: String,
}

/// A stub upstream resolver on 127.0.0.1:5300 in a namespace. It answers `example.org` A
/// with 192.0.2.80, `big.example.org` with 60 A records over TCP and with TC over UDP,
/// stays silent for `timeout.*`, and says NXDOMAIN to the rest.
struct Upstream {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Upstream {
    fn start(ns: &Netns) -> Upstream {
        let (udp, tcp) = ns.run(|| {
            let udp = UdpSocket::bind(UPSTREAM).unwrap();
            let tcp = TcpListener::bind(UPSTREAM).unwrap();
            (udp, tcp)
        });
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            threads.push(thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some(out) = stub_answer(&buf[..n], false, from, &seen) {
                        let _ = udp.send_to(&out, from);
                    }
                }
            }));
        }
        {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut stream, from)) = tcp.accept() else {
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    stream.set_nonblocking(false).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(2)))
                        .unwrap();
                    let mut len = [0u8; 2];
                    if stream.read_exact(&mut len).is_err() {
                        continue;
                    }
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if stream.read_exact(&mut q).is_err() {
                        continue;
                    }
                    if let Some(out) = stub_answer(&q, true, from, &seen) {
                        let mut frame = (out.len() as u16).to_be_bytes().to_vec();
                        frame.extend_from_slice(&out);
                        let _ = std::io::Write::write_all(&mut stream, &frame);
                    }
                }
            }));
        }
        Upstream {
            seen,
            stop,
            threads,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn stub_answer(
    query: &[u8],
    tcp: bool,
    from: SocketAddr,
    seen: &Mutex<Vec<Seen>>,
) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let name = question.name().to_ascii().to_ascii_lowercase();
    seen.lock().unwrap().push(Seen {
        tcp,
        id: q.metadata.id,
        from,
        name: name.clone(),
    });
    if name.starts_with("timeout.") {
        return None;
    }
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(question.clone());
    let a = |ip: String| {
        Record::from_rdata(
            question.name().clone(),
            300,
            RData::A(A(ip.parse().unwrap())),
        )
    };
    match (name.as_str(), question.query_type()) {
        ("example.org.", RecordType::A) => {
            m.add_answer(a(EXAMPLE_ORG_IP.to_string()));
        }
        ("example.org.", _) => {}
        ("big.example.org.", RecordType::A) if !tcp => m.metadata.truncation = true,
        ("big.example.org.", RecordType::A) => {
            for i in 1..=60 {
                m.add_answer(a(format!("198.51.100.{i}")));
            }
        }
        _ => m.metadata.response_code = ResponseCode::NXDomain,
    }
    m.to_vec().ok()
}

/// A query for `name` with id `id`, RD set.
fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

/// svcnat-dns in `ns` on 127.0.0.1:53, forwarding to the stub, with `extra` flags.
fn forwarding_dns(ns: &Netns, dir: &ManifestDir, extra: &[&str]) -> Dns {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_svcnat-dns"));
    cmd.arg("--manifests")
        .arg(dir.path())
        .args(["--default-namespace", "instavote", "-vv"])
        .args(["--listen", "127.0.0.1:53", "--upstream", UPSTREAM])
        .args(extra);
    Dns::spawn(cmd)
}

/// The manifests: redis, and an ExternalName Service `ext` pointing at example.org.
fn forwarding_manifests() -> ManifestDir {
    let dir = ManifestDir::new();
    dir.write("redis-svc.yaml", &redis_svc(REDIS_IP));
    dir.write(
        "ext.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\n\
         spec: {type: ExternalName, externalName: example.org}\n",
    );
    dir
}

/// Sends `queries` one at a time from `source` over UDP inside `ns`, waiting up to `wait`
/// for each answer; `None` where nothing came back. Also returns the client's port.
fn udp_exchanges(
    ns: &Netns,
    source: &str,
    queries: Vec<Vec<u8>>,
    wait: Duration,
) -> (Vec<Option<Message>>, u16) {
    let source: IpAddr = source.parse().unwrap();
    ns.run(move || {
        let socket = UdpSocket::bind(SocketAddr::new(source, 0)).unwrap();
        socket.set_read_timeout(Some(wait)).unwrap();
        let port = socket.local_addr().unwrap().port();
        let answers = queries
            .iter()
            .map(|q| {
                socket.send_to(q, "127.0.0.1:53").unwrap();
                let mut buf = [0u8; 4096];
                socket
                    .recv_from(&mut buf)
                    .ok()
                    .map(|(n, _)| Message::from_vec(&buf[..n]).unwrap())
            })
            .collect();
        (answers, port)
    })
}

fn a_records(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn allowed_clients_get_forwarded_answers_and_others_refused() {
    skip_unless_root!();
    skip_unless_tools!();
    let ns = Netns::new("allow");
    let upstream = Upstream::start(&ns);
    let dir = forwarding_manifests();
    let dns = forwarding_dns(&ns, &dir, &[]);

    // An allowed client (inside the pod CIDR): the upstream's answer, with its own id.
    let (answers, client_port) = udp_exchanges(
        &ns,
        ALLOWED,
        vec![query(0x4242, "example.org.", RecordType::A)],
        Duration::from_secs(3),
    );
    let m = answers[0].as_ref().expect("an answer");
    assert_eq!(m.metadata.id, 0x4242);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.recursion_available, "RA for allowed clients");
    assert!(!m.metadata.authoritative);
    assert_eq!(a_records(m), [EXAMPLE_ORG_IP], "{}", dns.stderr());
    // The upstream saw a new id from a port of svcnat-dns's own, over UDP.
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(!seen[0].tcp);
    assert_ne!(seen[0].id, 0x4242, "a fresh id upstream");
    assert_ne!(seen[0].from.port(), client_port);
    assert_ne!(seen[0].from.port(), 53);

    // A client outside the allowed networks: REFUSED, and nothing goes upstream.
    let (answers, _) = udp_exchanges(
        &ns,
        OUTSIDE,
        vec![query(0x4343, "example.org.", RecordType::A)],
        Duration::from_secs(3),
    );
    let m = answers[0].as_ref().expect("an answer");
    assert_eq!(m.metadata.id, 0x4343);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.recursion_available);
    assert_eq!(upstream.seen().len(), 1);
    // Cluster names still answer for everyone.
    let d = ns.dig(OUTSIDE, &["redis.instavote.svc.cluster.local", "+short"]);
    assert_eq!(d.text.trim(), REDIS_IP);

    // The ExternalName Service: CNAME completed with the upstream's A for the allowed
    // client; the CNAME alone for the other.
    let d = ns.dig(ALLOWED, &["ext.instavote.svc.cluster.local", "A"]);
    assert_eq!(d.status(), "NOERROR", "{}", d.text);
    assert_eq!(d.answers("CNAME"), ["example.org."], "{}", d.text);
    assert_eq!(d.answers("A"), [EXAMPLE_ORG_IP], "{}", d.text);
    assert!(d.flags().contains(&"ra"), "{}", d.text);
    let d = ns.dig(OUTSIDE, &["ext.instavote.svc.cluster.local", "A"]);
    assert_eq!(d.answers("CNAME"), ["example.org."]);
    assert!(d.answers("A").is_empty(), "{}", d.text);

    // A TCP client is forwarded over TCP.
    let before = upstream.seen().len();
    let d = ns.dig(ALLOWED, &["+tcp", "example.org", "A"]);
    assert_eq!(d.answers("A"), [EXAMPLE_ORG_IP], "{}", d.text);
    let seen = upstream.seen();
    assert!(seen[before..].iter().all(|s| s.tcp), "{seen:?}");

    // A truncated upstream answer is asked again over TCP: all 60 records arrive.
    let d = ns.dig(ALLOWED, &["big.example.org", "A"]);
    assert_eq!(d.answers("A").len(), 60, "{}", d.text);
    let big: Vec<bool> = upstream
        .seen()
        .iter()
        .filter(|s| s.name == "big.example.org.")
        .map(|s| s.tcp)
        .collect();
    assert_eq!(big, [false, true], "UDP, then TCP after TC");
    // Every upstream query used its own source port and id.
    let seen = upstream.seen();
    let udp: Vec<&Seen> = seen.iter().filter(|s| !s.tcp).collect();
    let ports: std::collections::BTreeSet<u16> = udp.iter().map(|s| s.from.port()).collect();
    let ids: std::collections::BTreeSet<u16> = seen.iter().map(|s| s.id).collect();
    assert!(ports.len() >= udp.len() - 1, "{seen:?}");
    assert!(ids.len() >= seen.len() - 1, "{seen:?}");
}

#[test]
fn a_silent_upstream_gives_servfail_within_the_timeout() {
    skip_unless_root!();
    skip_unless_tools!();
    let ns = Netns::new("timeout");
    let upstream = Upstream::start(&ns);
    let dir = forwarding_manifests();
    let dns = forwarding_dns(&ns, &dir, &["--upstream-timeout", "1s"]);
    let started = Instant::now();
    let (answers, _) = udp_exchanges(
        &ns,
        ALLOWED,
        vec![query(0x0909, "timeout.example.org.", RecordType::A)],
        Duration::from_secs(5),
    );
    let took = started.elapsed();
    let m = answers[0].as_ref().expect("SERVFAIL, not silence");
    assert_eq!(m.metadata.id, 0x0909);
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::ServFail,
        "{}",
        dns.stderr()
    );
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(1900),
        "{took:?}"
    );
    assert_eq!(upstream.seen().len(), 1);
}

#[test]
fn the_rate_limit_drops_and_slips_per_client_network() {
    skip_unless_root!();
    skip_unless_tools!();
    let ns = Netns::new("rrl");
    let _upstream = Upstream::start(&ns);
    let dir = forwarding_manifests();
    // 1 response a second, 4 at once; one over-limit response in two slips.
    let dns = forwarding_dns(
        &ns,
        &dir,
        &["--rrl-responses-per-second", "1", "--rrl-burst", "4"],
    );
    let name = "redis.instavote.svc.cluster.local.";
    let queries: Vec<Vec<u8>> = (0..10).map(|i| query(i, name, RecordType::A)).collect();
    let (answers, _) = udp_exchanges(&ns, ALLOWED, queries.clone(), Duration::from_millis(100));
    let kinds: Vec<&str> = answers
        .iter()
        .map(|a| match a {
            None => "drop",
            Some(m) if m.metadata.truncation => {
                assert!(m.answers.is_empty());
                assert_eq!(m.queries.len(), 1, "the question comes back");
                "slip"
            }
            Some(m) => {
                assert_eq!(a_records(m), [REDIS_IP]);
                "answer"
            }
        })
        .collect();
    let count = |k: &str| kinds.iter().filter(|x| **x == k).count();
    // Within the first second: the burst of 4, then drop and slip in turn (a refill on a
    // slow machine may add one answer).
    assert!((4..=5).contains(&count("answer")), "{kinds:?}");
    assert_eq!(
        &kinds[..5],
        ["answer", "answer", "answer", "answer", "drop"],
        "{kinds:?}\n{}",
        dns.stderr()
    );
    assert!(count("slip") >= 2 && count("drop") >= 2, "{kinds:?}");
    // Another /24 has its own budget.
    let (answers, _) = udp_exchanges(
        &ns,
        ALLOWED_OTHER_NET,
        queries[..4].to_vec(),
        Duration::from_secs(2),
    );
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_some_and(|m| a_records(m) == [REDIS_IP])),
        "{answers:?}"
    );
    // A limited client that retries over TCP, as the slip asks it to, gets its answer.
    let d = ns.dig(ALLOWED, &["+tcp", name, "A"]);
    assert_eq!(d.answers("A"), [REDIS_IP], "{}", d.text);
}
