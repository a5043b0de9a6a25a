//! `svcnat-lab up` with real public manifest sets (`examples/apps/`): every NodePort answers
//! from the client through the dataplane on both nodes, every Service answers a pod by its
//! name (svcnat-dns, the pod's resolv.conf, the ClusterIP), Ctrl-C leaves nothing behind,
//! and a broken manifest stops the start naming its file and line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use nix::fcntl::{Flock, FlockArg};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use svcnat_core::manifest::{ClusterConfig, Manifests};

const LAB: &str = env!("CARGO_BIN_EXE_svcnat-lab");

/// One sandbox at a time on the machine (it has one state file): a lock on a file, so that
/// runners that give each test its own process (cargo-nextest) serialise them too.
fn one_at_a_time() -> Flock<std::fs::File> {
    let path = std::env::temp_dir().join("svcnat-sandbox-tests.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Flock::lock(file, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("lock {}: {e}", path.display()))
}

fn exec(target: &str, cmd: &[&str]) -> String {
    let out = Command::new(LAB)
        .args(["exec", target, "--"])
        .args(cmd)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `curl` from `target` to `url`, a few tries (proxies sync within a second of start).
fn fetch(target: &str, url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = exec(target, &["curl", "-s", "--max-time", "3", url]);
        if reply.starts_with("pod=") || Instant::now() > deadline {
            return reply;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The Services of a manifest set: (namespace, name, ports).
fn services(dir: &Path) -> Vec<(String, String, Vec<u16>)> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            files.push((
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            ));
        }
    }
    let cfg = ClusterConfig::default();
    let mut m = Manifests::from_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str())), &cfg);
    let cluster = m.build(&cfg);
    cluster
        .services()
        .filter(|s| s.cluster_ip().is_some())
        .map(|s| {
            (
                s.name.namespace.clone(),
                s.name.name.clone(),
                s.ports.iter().map(|p| p.port).collect(),
            )
        })
        .collect()
}

/// SIGINT, as Ctrl-C sends.
fn interrupt(pid: u32) -> std::io::Result<()> {
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("kill -INT {pid}: {status}")))
    }
}

fn bring_up(app: &str) {
    let _one = one_at_a_time();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("apps").join(app);
    let mut child = Command::new(LAB)
        .args(["up", "--manifests", dir.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    /// Stops the sandbox even when an assertion fails.
    struct Up(std::process::Child);
    impl Drop for Up {
        fn drop(&mut self) {
            if matches!(self.0.try_wait(), Ok(None)) {
                let _ = interrupt(self.0.id());
                let _ = self.0.wait();
            }
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut up = Up(child);
    let mut lines = BufReader::new(stdout).lines();
    let mut frontends = Vec::new();
    let mut pods = Vec::new();
    let mut namespaces = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        println!("{line}");
        if let Some(rest) = line.strip_prefix("frontend ") {
            let url = rest.split_whitespace().nth(1).unwrap().to_string();
            frontends.push(url);
        }
        if let Some(rest) = line.strip_prefix("pods: ") {
            pods = rest.split_whitespace().map(str::to_string).collect();
        }
        if line.contains("(kubelet) pod ") {
            namespaces.push(
                line.rsplit('(')
                    .next()
                    .unwrap()
                    .trim_end_matches(')')
                    .to_string(),
            );
        }
        if line.starts_with("ready:") {
            break;
        }
    }
    // Keep reading what it prints until it exits.
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    assert!(
        !frontends.is_empty(),
        "{app}: no NodePort frontends printed"
    );
    assert!(!pods.is_empty(), "{app}: no pods");
    // Every NodePort, on both nodes, from the client.
    for url in &frontends {
        for node in ["192.168.50.11", "192.168.50.12"] {
            let url = url.replace("192.168.50.11", node);
            let reply = fetch("client", &url);
            assert!(
                reply.starts_with("pod="),
                "{app}: {url} from the client: {reply:?}"
            );
        }
    }
    // Every Service by name, from a pod of the app (not kube-system's).
    let from = pods
        .iter()
        .find(|p| !p.starts_with("kube-system/"))
        .unwrap()
        .clone();
    for (ns, name, ports) in services(&dir) {
        for port in ports {
            let url = format!("http://{name}.{ns}:{port}/");
            let reply = fetch(&from, &url);
            assert!(
                reply.starts_with("pod="),
                "{app}: {url} from {from}: {reply:?}"
            );
        }
    }
    // Ctrl-C: everything goes.
    interrupt(up.0.id()).unwrap();
    let status = up.0.wait().unwrap();
    assert!(status.success(), "{app}: svcnat-lab up exited {status}");
    let rest = rest.join().unwrap();
    assert!(
        rest.iter()
            .any(|l| l.contains("everything it made is removed")),
        "{app}: {rest:?}"
    );
    let left = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    for ns in &namespaces {
        assert!(
            !left.split_whitespace().any(|w| w == ns),
            "{app}: {ns} left behind"
        );
        assert!(
            !Path::new("/etc/netns").join(ns).exists(),
            "{app}: /etc/netns/{ns} left behind"
        );
    }
    assert!(!Path::new(svcnat_examples::sandbox::STATE_FILE).exists());
}

#[test]
fn the_docker_voting_app() {
    svcnat_examples::skip_unless_root!();
    bring_up("voting-app");
}

#[test]
fn the_kubernetes_guestbook() {
    svcnat_examples::skip_unless_root!();
    bring_up("guestbook");
}

#[test]
fn the_online_boutique() {
    svcnat_examples::skip_unless_root!();
    bring_up("online-boutique");
}

#[test]
fn a_broken_manifest_stops_the_start_naming_file_and_line() {
    svcnat_examples::skip_unless_root!();
    let _one = one_at_a_time();
    let dir = std::env::temp_dir().join(format!("svcnat-sandbox-broken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("app.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 99999}]\n",
    )
    .unwrap();
    let out = Command::new(LAB)
        .args(["up", "--manifests", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("app.yaml:"),
        "names the file and line: {stderr}"
    );
    assert!(!Path::new(svcnat_examples::sandbox::STATE_FILE).exists());
    let none = Command::new(LAB)
        .args(["exec", "client", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("no sandbox is up"));
}
