//! Any app in a sandbox: `svcnat-lab up --manifests DIR` brings an arbitrary manifest set up
//! in network namespaces (nodes, one namespace per Pod running `svcnat-podserver` on each of
//! its container ports, TCP and UDP, `svcnat-proxy` on every node, `svcnat-dns` behind the
//! kube-dns ClusterIP with each pod's resolv.conf, a client namespace) and keeps it up until
//! Ctrl-C; `svcnat-lab exec POD|client|node-N -- CMD` runs a command inside.
//!
//! The manifests are read as `svcnat-proxy --manifests` reads them (Deployments and the
//! other workloads become Pods, Services get cluster IPs and node ports); svcnat adds the
//! nodes (`node-0`..`node-N-1`, the testbed's addresses and pod CIDRs) and, unless the set has
//! one, the kube-dns Service. A file with an error stops the start, naming file and line.
//! Everything made is removed on Ctrl-C, on SIGTERM and when the start fails.
//!
//! `exec` finds the running sandbox through its state file, `/run/svcnat-lab/sandbox`
//! (one sandbox at a time).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use svcnat_core::manifest::{ClusterConfig, Manifests};
use svcnat_core::model::{Protocol, ServiceType};

use crate::lab::{LabBackend, LabError, Programs};
use crate::testbed::{NodeSpec, PodSpec, Testbed, TestbedSpec};

/// Where a running sandbox says which namespace is which.
pub const STATE_FILE: &str = "/run/svcnat-lab/sandbox";

/// The most nodes a sandbox may have.
pub const MAX_NODES: usize = 16;

/// The most pods a sandbox starts (each is a namespace and a process).
pub const MAX_PODS: usize = 400;

/// The kube-dns ClusterIP every pod's resolv.conf names.
const DNS_IP: &str = "10.96.0.10";

/// What to bring up.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    /// The manifest directory (`*.yaml`, `*.yml`, `*.json`, not recursive).
    pub manifests: PathBuf,
    /// How many nodes.
    pub nodes: usize,
    /// The proxies' dataplane.
    pub backend: LabBackend,
    /// The namespace of objects that name none.
    pub default_namespace: String,
}

/// A running sandbox; dropping it removes everything it made.
pub struct Sandbox {
    tb: Testbed,
    dir: PathBuf,
    daemons: Vec<Child>,
    /// How to reach each NodePort frontend: (Service, port name, URL-ish address).
    pub frontends: Vec<(String, SocketAddr)>,
    /// Pod name (`ns/name`) to its namespace.
    pub pods: BTreeMap<String, String>,
    state_written: bool,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
        if self.state_written {
            let _ = fs::remove_file(STATE_FILE);
        }
    }
}

fn setup<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> LabError {
    move |e| LabError::Setup(format!("{what}: {e}"))
}

impl Sandbox {
    /// Brings `spec` up; `say` gets each line of progress.
    pub fn up(
        spec: &SandboxSpec,
        programs: &Programs,
        stop: &Arc<AtomicBool>,
        mut say: impl FnMut(&str),
    ) -> Result<Sandbox, LabError> {
        crate::testbed::require_root().map_err(LabError::Unsupported)?;
        if let Some(why) = spec.backend.unavailable() {
            return Err(LabError::Unsupported(why));
        }
        if spec.nodes == 0 || spec.nodes > MAX_NODES {
            return Err(LabError::Setup(format!(
                "--nodes must be 1 to {MAX_NODES}, got {}",
                spec.nodes
            )));
        }
        if Path::new(STATE_FILE).exists() {
            let pid = fs::read_to_string(STATE_FILE).unwrap_or_default();
            let pid = pid
                .lines()
                .find_map(|l| l.strip_prefix("pid "))
                .unwrap_or("?")
                .to_string();
            if Path::new(&format!("/proc/{pid}")).exists() {
                return Err(LabError::Setup(format!(
                    "a sandbox is already up (pid {pid}); one at a time"
                )));
            }
            let _ = fs::remove_file(STATE_FILE);
        }
        // The user's files, read once: nothing half-written is applied later.
        let mut files: Vec<(String, String)> = Vec::new();
        let entries = fs::read_dir(&spec.manifests).map_err(|e| {
            LabError::Setup(format!("cannot read {}: {e}", spec.manifests.display()))
        })?;
        for e in entries.filter_map(Result::ok) {
            let path = e.path();
            let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
            if !path.is_file() || !matches!(ext, "yaml" | "yml" | "json") {
                continue;
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = fs::read_to_string(&path)
                .map_err(|e| LabError::Setup(format!("cannot read {}: {e}", path.display())))?;
            files.push((name, text));
        }
        files.sort();
        if files.is_empty() {
            return Err(LabError::Setup(format!(
                "{} holds no *.yaml, *.yml or *.json file",
                spec.manifests.display()
            )));
        }
        let mut config = ClusterConfig::default();
        config.default_namespace.clone_from(&spec.default_namespace);
        let tb_spec = TestbedSpec::new(spec.nodes, 1);
        let nodes: Vec<NodeSpec> = tb_spec.nodes.clone();
        // The sandbox's own objects first, then the user's files under their own names.
        let mut ours: Vec<(String, String)> =
            vec![("000-svcnat-nodes.yaml".into(), nodes_yaml(&nodes))];
        let user =
            Manifests::from_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str())), &config);
        if let Some(e) = user.errors.first() {
            return Err(LabError::Setup(format!(
                "{}: {e}",
                spec.manifests.display()
            )));
        }
        let has_dns = {
            let mut m =
                Manifests::from_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str())), &config);
            let c = m.build(&config);
            c.services()
                .any(|s| s.name.namespace == "kube-system" && s.name.name == "kube-dns")
        };
        if !has_dns {
            ours.push((
                "000-svcnat-kube-dns.yaml".into(),
                crate::lab::KUBE_DNS.into(),
            ));
        }
        let all: Vec<(String, String)> = ours
            .iter()
            .cloned()
            .chain(files.iter().map(|(n, t)| (format!("app-{n}"), t.clone())))
            .collect();
        let mut m =
            Manifests::from_files(all.iter().map(|(n, t)| (n.as_str(), t.as_str())), &config);
        let cluster = m.build(&config);
        if let Some(e) = m.errors.first() {
            return Err(LabError::Setup(format!(
                "{}: {e}",
                spec.manifests.display()
            )));
        }
        let pod_count = cluster.pods().count();
        if pod_count > MAX_PODS {
            return Err(LabError::Setup(format!(
                "{pod_count} Pods: a sandbox starts at most {MAX_PODS}"
            )));
        }
        let dir = std::env::temp_dir().join(format!("svcnat-sandbox-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(setup("manifest directory"))?;
        for (name, text) in &all {
            fs::write(dir.join(name), text).map_err(setup("manifest directory"))?;
        }
        let tb = Testbed::new(tb_spec).map_err(setup("testbed"))?;
        let mut sb = Sandbox {
            tb,
            dir,
            daemons: Vec::new(),
            frontends: Vec::new(),
            pods: BTreeMap::new(),
            state_written: false,
        };
        say(&format!(
            "(testbed) {} nodes {}, a client namespace",
            nodes.len(),
            nodes
                .iter()
                .map(|n| format!("{}={}", n.name, n.ip))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        for pod in cluster.pods() {
            if stop.load(Ordering::Relaxed) {
                return Err(LabError::Interrupted);
            }
            let node = nodes
                .iter()
                .position(|n| Some(n.name.as_str()) == pod.node_name.as_deref())
                .unwrap_or(0);
            let Some(ip) = pod.ips.first().copied() else {
                say(&format!(
                    "  (kubelet) pod {} has no IP: not started",
                    pod.name
                ));
                continue;
            };
            let key = pod.name.to_string();
            // Unique per sandbox: the namespace's pod name, with its namespace if taken.
            let name = if sb.tb.ns_of_pod(&pod.name.name).is_some() {
                format!("{}.{}", pod.name.name, pod.name.namespace)
            } else {
                pod.name.name.clone()
            };
            let resolv = format!(
                "nameserver {DNS_IP}\nsearch {}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
                pod.name.namespace
            );
            let mut ps = PodSpec::new(name.clone(), node, ip).resolv_conf(resolv);
            let is_dns =
                pod.name.namespace == "kube-system" && pod.name.name == "coredns" && !has_dns;
            if !is_dns {
                for p in &pod.ports {
                    ps = match p.protocol {
                        Protocol::Tcp if !ps.tcp_ports.contains(&p.port) => ps.tcp(p.port),
                        Protocol::Udp if !ps.udp_ports.contains(&p.port) => ps.udp(p.port),
                        _ => ps,
                    };
                }
            }
            sb.tb.add_pod(ps).map_err(setup("add pod"))?;
            let ns = sb
                .tb
                .ns_of_pod(&name)
                .map(str::to_string)
                .ok_or_else(|| LabError::Setup(format!("pod {name} vanished")))?;
            say(&format!(
                "  (kubelet) pod {key} on {} with IP {ip} ({ns})",
                nodes[node].name
            ));
            sb.pods.insert(key, ns);
        }
        let manifests = sb.dir.display().to_string();
        let ns_arg = spec.default_namespace.clone();
        if !has_dns {
            let ns = sb
                .pods
                .get("kube-system/coredns")
                .cloned()
                .ok_or_else(|| LabError::Setup("the coredns pod did not start".into()))?;
            let dns = programs.dns.clone();
            sb.spawn(
                &ns,
                &dns,
                &[
                    "--manifests",
                    &manifests,
                    "--listen",
                    "0.0.0.0:53",
                    "--default-namespace",
                    &ns_arg,
                ],
            )?;
            say(&format!("(kube-dns) svcnat-dns behind {DNS_IP}"));
        }
        for (i, node) in nodes.iter().enumerate() {
            let ns = sb.tb.ns_of_node(i).to_string();
            let cidrs = "10.244.0.0/16".to_string();
            let ip = node.ip.to_string();
            let proxy = programs.proxy.clone();
            sb.spawn(
                &ns,
                &proxy,
                &[
                    "--manifests",
                    &manifests,
                    "--node-name",
                    &node.name,
                    "--node-ip",
                    &ip,
                    "--cluster-cidr",
                    &cidrs,
                    "--default-namespace",
                    &ns_arg,
                    "--min-sync-period",
                    "200ms",
                ]
                .into_iter()
                .chain(spec.backend.proxy_args())
                .collect::<Vec<_>>(),
            )?;
            say(&format!(
                "(node) svcnat-proxy --backend {} on {}",
                spec.backend.as_str(),
                node.name
            ));
        }
        for svc in cluster.services() {
            if !matches!(
                svc.service_type,
                ServiceType::NodePort | ServiceType::LoadBalancer
            ) {
                continue;
            }
            for p in &svc.ports {
                if let Some(np) = p.node_port {
                    let addr = SocketAddr::new(nodes[0].ip.into(), np);
                    let label = if p.name.is_empty() {
                        svc.name.to_string()
                    } else {
                        format!("{}:{}", svc.name, p.name)
                    };
                    sb.frontends.push((label, addr));
                }
            }
        }
        let mut state = format!(
            "pid {}\nclient {}\n",
            std::process::id(),
            sb.tb.ns_of_client(0)
        );
        for (i, n) in nodes.iter().enumerate() {
            let _ = writeln!(state, "node {} {}", n.name, sb.tb.ns_of_node(i));
        }
        for (pod, ns) in &sb.pods {
            let _ = writeln!(state, "pod {pod} {ns}");
        }
        if let Some(parent) = Path::new(STATE_FILE).parent() {
            fs::create_dir_all(parent).map_err(setup("state directory"))?;
        }
        let tmp = format!("{STATE_FILE}.tmp");
        fs::write(&tmp, state).map_err(setup("state file"))?;
        fs::rename(&tmp, STATE_FILE).map_err(setup("state file"))?;
        sb.state_written = true;
        Ok(sb)
    }

    /// Starts `program` in `ns` and waits for its `ready` line.
    fn spawn(&mut self, ns: &str, program: &Path, args: &[&str]) -> Result<(), LabError> {
        crate::lab::spawn_ready(&self.tb, &mut self.daemons, ns, program, args, |l| {
            l.trim() == "ready"
        })
    }

    /// Waits until `stop` is set (Ctrl-C, SIGTERM) or a daemon dies (an error naming it).
    pub fn wait(&mut self, stop: &Arc<AtomicBool>) -> Result<(), LabError> {
        while !stop.load(Ordering::Relaxed) {
            for d in &mut self.daemons {
                if let Ok(Some(status)) = d.try_wait() {
                    return Err(LabError::Setup(format!(
                        "a sandbox daemon exited ({status})"
                    )));
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

/// The running sandbox's namespace for `target`: `client`, a node name (`node-0`), or a
/// pod (`NAME` or `NAMESPACE/NAME`).
pub fn find(target: &str) -> Result<String, String> {
    let state = fs::read_to_string(STATE_FILE).map_err(|_| {
        format!("no sandbox is up ({STATE_FILE} missing): run `svcnat-lab up` first")
    })?;
    let pid = state
        .lines()
        .find_map(|l| l.strip_prefix("pid "))
        .unwrap_or_default();
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(format!(
            "the sandbox recorded in {STATE_FILE} (pid {pid}) is gone"
        ));
    }
    let mut matches = Vec::new();
    for l in state.lines() {
        let words: Vec<&str> = l.split_whitespace().collect();
        match words.as_slice() {
            ["client", ns] if target == "client" => matches.push(ns.to_string()),
            ["node", name, ns] if *name == target => matches.push(ns.to_string()),
            ["pod", name, ns]
                if *name == target || name.split_once('/').is_some_and(|(_, n)| n == target) =>
            {
                matches.push(ns.to_string());
            }
            _ => {}
        }
    }
    if matches.is_empty() {
        // A unique prefix names a pod too (`vote` for `vote-5d8f9c-x2x7k`).
        for l in state.lines() {
            if let ["pod", name, ns] = l.split_whitespace().collect::<Vec<_>>().as_slice() {
                let short = name.split_once('/').map_or(*name, |(_, n)| n);
                if short.starts_with(target) || name.starts_with(target) {
                    matches.push((*ns).to_string());
                }
            }
        }
    }
    match matches.as_slice() {
        [ns] => Ok(ns.clone()),
        [] => Err(format!(
            "no pod, node or client named {target} in the sandbox"
        )),
        _ => Err(format!("{target} names several pods: say NAMESPACE/NAME")),
    }
}

fn nodes_yaml(nodes: &[NodeSpec]) -> String {
    let mut y = String::new();
    for n in nodes {
        let cidr = n
            .pod_cidrs
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nspec: {{podCIDR: {cidr}}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}]}}\n",
            n.name, n.ip
        );
    }
    y
}

/// Runs `args` in the sandbox's namespace for `target` with the terminal's stdio; returns
/// its exit code.
pub fn exec(target: &str, args: &[String]) -> Result<i32, String> {
    let ns = find(target)?;
    let Some((program, rest)) = args.split_first() else {
        return Err("exec needs a command after --".into());
    };
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(program)
        .args(rest)
        .status()
        .map_err(|e| format!("ip netns exec {ns} {program}: {e}"))?;
    Ok(status.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn nodes_are_written_as_the_testbed_lays_them_out() {
        let y = nodes_yaml(&[NodeSpec::standard(0), NodeSpec::standard(1)]);
        assert!(y.contains("metadata: {name: node-1}"));
        assert!(y.contains("podCIDR: 10.244.1.0/24"));
        assert!(y.contains("address: 192.168.50.12"));
    }
}
