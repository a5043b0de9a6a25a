//! The IPVS driver against a real kernel. This machine's kernel has no IPVS, so
//! `ipvs_in_a_vm` boots Debian's cloud kernel under qemu (`vm/run.sh`) with this very test
//! binary inside, which then runs `inside_vm`: the driver programs IPVS, `ipvsadm -Ln` is
//! checked, and HTTP requests flow from a client namespace through the node (the VM's own
//! namespace) to pod namespaces. Without qemu the test prints `SKIP:` (and fails under
//! `CI=true`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use svcnat_core::manifest::{ClusterConfig, Manifests};
use svcnat_core::model::Cluster;
use svcnat_core::plan::{Dataplane, NodeContext, Plan};
use svcnat_ipvs::driver::{Ipvs, IpvsConfig, Scheduler};

fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

#[test]
fn ipvs_in_a_vm() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        let why = "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86 busybox-static ipvsadm kmod)";
        if in_ci() {
            panic!("CI=true but {why}");
        }
        eprintln!("SKIP: {why}");
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vm/run.sh");
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg("--file")
        .arg(format!("{}:/bin/ipvs-vm-test", exe.display()))
        .args(["--env", "SVCNAT_IPVS_VM=1", "--env", "RUST_BACKTRACE=1"])
        .args([
            "--",
            "/bin/ipvs-vm-test",
            "--ignored",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "inside_vm",
        ])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    println!("{console}");
    eprintln!("VM run took {:.1} s", start.elapsed().as_secs_f64());
    assert!(
        out.status.success(),
        "the VM test failed ({}); console above",
        out.status
    );
    assert!(
        console.contains("IPVS-VM: all checks passed"),
        "the VM test did not report success"
    );
}

// ----- inside the VM ----------------------------------------------------------------------

const NODE_IP: &str = "192.168.50.1";
const CLIENT_IP: &str = "192.168.50.100";
const GATEWAY: &str = "10.244.0.1";

/// Runs a shell command line. busybox's `sh` runs its own applets before `$PATH`, so the
/// lines name iproute2's `ip` as `/sbin/ip`.
fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "`{cmd}` failed: {text}");
    text
}

fn manifests(web1: bool) -> String {
    let mut y = String::from(
        "---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.11
  selector: {app: web}
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: default, labels: {app: web}, annotations: {svcnat.io/weight: '3'}}
spec: {nodeName: node, containers: [{name: app, image: x}]}
status: {podIP: 10.244.0.10, phase: Running, conditions: [{type: Ready, status: 'True'}]}
",
    );
    if web1 {
        y.push_str(
            "---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {nodeName: node, containers: [{name: app, image: x}]}
status: {podIP: 10.244.0.11, phase: Running, conditions: [{type: Ready, status: 'True'}]}
",
        );
    }
    y
}

fn plan(web1: bool) -> Plan {
    let cfg = {
        let mut cfg = ClusterConfig::default();
        cfg.default_namespace = "default".into();
        cfg
    };
    let text = manifests(web1);
    let mut m = Manifests::from_files([("vm.yaml", text.as_str())], &cfg);
    let cluster: Cluster = m.build(&cfg);
    assert!(m.errors.is_empty(), "{:#?}", m.errors);
    let node = NodeContext::new(
        "node",
        vec![NODE_IP.parse().unwrap()],
        vec!["10.244.0.0/16".parse().unwrap()],
    );
    Plan::compile(&cluster, &node)
}

struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn topology() -> Servers {
    sh(&format!(
        "/sbin/ip netns add client && /sbin/ip link add vc type veth peer name eth0 netns client && \
         /sbin/ip addr add {NODE_IP}/24 dev vc && /sbin/ip link set vc up && \
         /sbin/ip -n client addr add {CLIENT_IP}/24 dev eth0 && /sbin/ip -n client link set eth0 up && \
         /sbin/ip -n client link set lo up && /sbin/ip -n client route add default via {NODE_IP}"
    ));
    let mut servers = Vec::new();
    for (i, ip) in ["10.244.0.10", "10.244.0.11"].iter().enumerate() {
        let ns = format!("pod{i}");
        sh(&format!(
            "/sbin/ip netns add {ns} && /sbin/ip link add vp{i} type veth peer name eth0 netns {ns} && \
             /sbin/ip addr add {GATEWAY}/32 dev vp{i} && /sbin/ip link set vp{i} up && \
             /sbin/ip route add {ip}/32 dev vp{i} && \
             /sbin/ip -n {ns} addr add {ip}/32 dev eth0 && /sbin/ip -n {ns} link set eth0 up && \
             /sbin/ip -n {ns} link set lo up && /sbin/ip -n {ns} route add {GATEWAY} dev eth0 && \
             /sbin/ip -n {ns} route add default via {GATEWAY} && \
             mkdir -p /tmp/www{i}/cgi-bin && \
             printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho web-{i} $REMOTE_ADDR\\n' \
               > /tmp/www{i}/cgi-bin/who && chmod +x /tmp/www{i}/cgi-bin/who"
        ));
        servers.push(
            Command::new("ip")
                .args(["netns", "exec", &ns, "busybox", "httpd", "-f", "-p", "8080"])
                .arg("-h")
                .arg(format!("/tmp/www{i}"))
                .spawn()
                .unwrap(),
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    Servers(servers)
}

/// `n` HTTP requests from namespace `ns` to `url`; answers counted by text ("web-0 <ip>").
fn requests(ns: &str, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        // busybox 1.35's `wget -T` and `wget -q` crash; `timeout` bounds the request.
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "busybox", "timeout", "10"])
            .args(["busybox", "wget", "-O", "-", url])
            .output()
            .unwrap();
        // httpd listens on IPv6: REMOTE_ADDR is `[::ffff:a.b.c.d]`.
        let text = String::from_utf8_lossy(&out.stdout)
            .trim()
            .replace("[::ffff:", "")
            .replace(']', "");
        let key = if out.status.success() {
            text
        } else {
            format!(
                "error ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        };
        *seen.entry(key).or_default() += 1;
    }
    seen
}

fn ipvsadm() -> String {
    sh("ipvsadm -Ln")
}

#[test]
#[ignore = "runs inside the IPVS VM (see ipvs_in_a_vm)"]
fn inside_vm() {
    assert_eq!(
        std::env::var("SVCNAT_IPVS_VM").as_deref(),
        Ok("1"),
        "inside_vm runs only inside the VM that ipvs_in_a_vm boots"
    );
    let _servers = topology();

    // 1. First sync: services, weighted destinations, persistence, VIPs.
    let mut ipvs = Ipvs::new(IpvsConfig {
        scheduler: Scheduler::Rr,
        ..IpvsConfig::default()
    })
    .unwrap();
    let p2 = plan(true);
    let r = ipvs.resync(&p2).unwrap();
    println!("resync: {r:?}");
    let table = ipvsadm();
    println!("{table}");
    // rr is configured, but the endpoints' weights differ (3:1): wrr.
    assert!(table.contains("TCP  10.96.0.10:80 wrr"), "{table}");
    assert!(
        table.contains("TCP  10.96.0.11:80 wrr persistent 10800"),
        "{table}"
    );
    let dest_line = |addr: &str, weight: u32| {
        table.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 4
                && f[0] == "->"
                && f[1] == addr
                && f[2] == "Masq"
                && f[3] == weight.to_string()
        })
    };
    assert!(dest_line("10.244.0.10:8080", 3), "{table}");
    assert!(dest_line("10.244.0.11:8080", 1), "{table}");
    let addrs = sh("/sbin/ip -o addr show dev kube-ipvs0");
    assert!(
        addrs.contains("10.96.0.10/32") && addrs.contains("10.96.0.11/32"),
        "{addrs}"
    );
    let dump = ipvs.dump().unwrap();
    assert_eq!(dump.len(), 2, "{dump:?}");

    // 2. Traffic from an off-cluster client: weighted spread, masqueraded source.
    let seen = requests("client", "http://10.96.0.10/cgi-bin/who", 40);
    println!("client -> web: {seen:?}");
    if seen.keys().any(|k| k.starts_with("error")) {
        diagnose();
    }
    let w0 = seen.get(&format!("web-0 {GATEWAY}")).copied().unwrap_or(0);
    let w1 = seen.get(&format!("web-1 {GATEWAY}")).copied().unwrap_or(0);
    assert_eq!(
        w0 + w1,
        40,
        "every answer comes from a pod and sees the node's address: {seen:?}"
    );
    assert_eq!(w0, 30, "wrr 3:1 over 40 new connections: {seen:?}");

    // 3. ClientIP affinity: one client, one pod.
    let seen = requests("client", "http://10.96.0.11/cgi-bin/who", 10);
    println!("client -> sticky: {seen:?}");
    assert_eq!(seen.len(), 1, "{seen:?}");

    // 4. In-cluster client: no masquerade, except hairpin (a pod reaching itself).
    let seen = requests("pod0", "http://10.96.0.10/cgi-bin/who", 20);
    println!("pod0 -> web: {seen:?}");
    assert!(
        seen.contains_key("web-1 10.244.0.10"),
        "pod source kept: {seen:?}"
    );
    assert!(
        seen.contains_key(&format!("web-0 {GATEWAY}")),
        "hairpin masqueraded: {seen:?}"
    );
    assert_eq!(seen.len(), 2, "{seen:?}");

    // 5. A diff: web-1 goes away; only its destinations are deleted.
    let p1 = plan(false);
    let r = ipvs.sync(&p1, &Plan::diff(&p2, &p1)).unwrap();
    println!("sync without web-1: {r:?}");
    assert!(!r.full);
    let table = ipvsadm();
    assert!(!table.contains("10.244.0.11"), "{table}");
    // One endpoint left: weights no longer differ, so the service goes back to rr.
    assert!(table.contains("TCP  10.96.0.10:80 rr"), "{table}");
    let seen = requests("client", "http://10.96.0.10/cgi-bin/who", 5);
    assert_eq!(seen.get(&format!("web-0 {GATEWAY}")), Some(&5), "{seen:?}");

    // 6. Errors name the service and the errno: the service vanished behind our back.
    sh("ipvsadm -D -t 10.96.0.10:80");
    let err = ipvs.sync(&p2, &Plan::diff(&p1, &p2)).unwrap_err();
    let msg = err.to_string();
    println!("expected error: {msg}");
    assert!(
        msg.contains("IPVS_CMD_NEW_DEST") || msg.contains("IPVS_CMD_SET_SERVICE"),
        "{msg}"
    );
    assert!(msg.contains("default/web:http"), "{msg}");
    assert!(err.errno().is_some(), "{msg}");
    // ... and the next sync reads the kernel again and converges.
    let r = ipvs.sync(&p2, &Plan::diff(&p1, &p2)).unwrap();
    assert!(r.full, "{r:?}");
    assert!(ipvsadm().contains("TCP  10.96.0.10:80 wrr"));

    // 7. Restart: a new driver finds a stale service on kube-ipvs0 and a changed weight.
    sh(
        "ipvsadm -A -t 10.96.0.99:80 -s rr && /sbin/ip addr add 10.96.0.99/32 dev kube-ipvs0 && \
        ipvsadm -e -t 10.96.0.10:80 -r 10.244.0.10:8080 -m -w 7 && \
        ipvsadm -A -t 172.31.0.1:80 -s rr",
    );
    drop(ipvs);
    let mut ipvs = Ipvs::new(IpvsConfig::default()).unwrap();
    let r = ipvs.resync(&p2).unwrap();
    println!("resync after restart: {r:?}");
    let table = ipvsadm();
    println!("{table}");
    assert!(
        !table.contains("10.96.0.99"),
        "stale service removed: {table}"
    );
    assert!(
        table.contains("172.31.0.1:80"),
        "a service that is not ours stays: {table}"
    );
    assert!(
        dest_line_in(&table, "10.244.0.10:8080", 3),
        "weight repaired: {table}"
    );
    assert!(!sh("/sbin/ip -o addr show dev kube-ipvs0").contains("10.96.0.99"));

    // 8. Cleanup removes services, the device and the iptables chains.
    ipvs.cleanup().unwrap();
    let table = ipvsadm();
    assert!(!table.contains("10.96.0."), "{table}");
    assert!(table.contains("172.31.0.1:80"), "{table}");
    assert!(
        Command::new("ip")
            .args(["link", "show", "kube-ipvs0"])
            .output()
            .unwrap()
            .status
            .code()
            != Some(0)
    );
    let nat = sh("iptables-save -t nat");
    assert!(!nat.contains("KUBE-"), "{nat}");
    println!("IPVS-VM: all checks passed");
}

/// Prints the state that explains a failed request.
fn diagnose() {
    for cmd in [
        "/sbin/ip netns exec client busybox timeout 5 busybox wget -O - http://10.96.0.10/cgi-bin/who",
        "/sbin/ip netns exec client busybox timeout 5 busybox wget -O - http://10.244.0.10:8080/cgi-bin/who",
        "/sbin/ip netns exec pod0 busybox timeout 5 busybox wget -O - http://127.0.0.1:8080/cgi-bin/who",
        "ipvsadm -Lnc",
        "iptables-save",
        "/sbin/ip addr",
        "/sbin/ip route show table all",
        "/sbin/ip -n client route",
        "sysctl -a 2>/dev/null | grep -E 'vs.conntrack|ip_forward|rp_filter'",
        "cat /proc/net/nf_conntrack 2>&1 | head",
    ] {
        let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        println!(
            "--- {cmd} ({})\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn dest_line_in(table: &str, addr: &str, weight: u32) -> bool {
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 4 && f[0] == "->" && f[1] == addr && f[3] == weight.to_string()
    })
}
