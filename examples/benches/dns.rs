//! `cargo bench -p svcnat-examples --bench dns`: queries per second of `svcnat-dns` over UDP,
//! against dnsmasq serving the same A records, measured in the same run with the same load
//! generator.
//!
//! 1,000 Services with fixed cluster IPs become the manifest directory of `svcnat-dns` and
//! a hosts file for dnsmasq (`--addn-hosts`, no upstream, no cache limit in the way). Both
//! servers listen on 127.0.0.1 inside a network namespace the benchmark creates and deletes
//! (as root; otherwise on the root namespace's loopback, high ports only). The load
//! generator is this program run again inside that namespace: a few UDP sockets, each with
//! a window of queries in flight, random names from the 1,000, for a fixed time; only
//! NOERROR answers with an A record count. Without dnsmasq the svcnat figures are printed
//! alone with `SKIP`. The in-process cost of `handle_query` (no sockets) is printed too.
//! Figures only: nothing here fails on speed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use svcnat_core::discovery::{DiscoveryConfig, Resolver};
use svcnat_core::manifest::{ClusterConfig, Manifests};
use svcnat_examples::dns::{Transport, handle_query};

const SERVICES: usize = 1000;
const RUN: Duration = Duration::from_secs(3);
const SOCKETS: usize = 1;
const IN_FLIGHT: usize = 64;
const DNSMASQ_PORT: u16 = 25353;
const SVCNAT_PORT: u16 = 25354;
/// Set in the load generator's environment: `ADDR:PORT` to load.
const LOAD_ENV: &str = "SVCNAT_DNS_BENCH_LOAD";
/// Set in the load generator's environment: the file of names, one a line.
const NAMES_ENV: &str = "SVCNAT_DNS_BENCH_NAMES";

fn service_ip(i: usize) -> String {
    format!("10.100.{}.{}", i / 250, 1 + i % 250)
}

fn service_name(i: usize) -> String {
    format!("svc-{i}.bench.svc.cluster.local")
}

/// A query for `name` (type A, class IN, RD), id 0.
fn encode_query(name: &str) -> Vec<u8> {
    let mut b = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        b.push(label.len() as u8);
        b.extend_from_slice(label.as_bytes());
    }
    b.extend_from_slice(&[0, 0, 1, 0, 1]);
    b
}

/// xorshift64*: cheap, seeded, good enough to pick names.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator (this program, run again inside the namespace)
// ---------------------------------------------------------------------------------------------

/// Counts of one generator socket.
#[derive(Default)]
struct Counts {
    answered: u64,
    bad: u64,
    lost: u64,
}

fn is_good_answer(resp: &[u8]) -> bool {
    resp.len() >= 12 && resp[2] & 0x80 != 0 && resp[3] & 0x0f == 0 && resp[6..8] != [0, 0]
}

fn generate(target: SocketAddr, names: &[String]) {
    let queries: Vec<Vec<u8>> = names.iter().map(|n| encode_query(n)).collect();
    // Wait until the server answers, then start the clock.
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe.connect(target).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 1500];
    loop {
        probe.send(&queries[0]).unwrap();
        if let Ok(n) = probe.recv(&mut buf)
            && is_good_answer(&buf[..n])
        {
            break;
        }
        assert!(Instant::now() < deadline, "{target} does not answer");
    }
    let start = Instant::now();
    let end = start + RUN;
    let workers: Vec<_> = (0..SOCKETS)
        .map(|s| {
            let queries = queries.clone();
            thread::spawn(move || {
                let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
                sock.connect(target).unwrap();
                sock.set_read_timeout(Some(Duration::from_millis(20)))
                    .unwrap();
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (s as u64 + 1));
                let mut id: u16 = 0;
                let mut send = |sock: &UdpSocket, rng: &mut Rng| {
                    let q = &queries[(rng.next() % queries.len() as u64) as usize];
                    let mut q = q.clone();
                    id = id.wrapping_add(1);
                    q[..2].copy_from_slice(&id.to_be_bytes());
                    let _ = sock.send(&q);
                };
                for _ in 0..IN_FLIGHT {
                    send(&sock, &mut rng);
                }
                let mut c = Counts::default();
                let mut buf = [0u8; 1500];
                while Instant::now() < end {
                    match sock.recv(&mut buf) {
                        Ok(n) => {
                            if is_good_answer(&buf[..n]) {
                                c.answered += 1;
                            } else {
                                c.bad += 1;
                            }
                            send(&sock, &mut rng);
                        }
                        Err(_) => {
                            // The window drained: refill it.
                            c.lost += IN_FLIGHT as u64;
                            for _ in 0..IN_FLIGHT {
                                send(&sock, &mut rng);
                            }
                        }
                    }
                }
                c
            })
        })
        .collect();
    let mut total = Counts::default();
    for w in workers {
        let c = w.join().unwrap();
        total.answered += c.answered;
        total.bad += c.bad;
        total.lost += c.lost;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "qps {:.0} answered {} bad {} lost {}",
        total.answered as f64 / secs,
        total.answered,
        total.bad,
        total.lost
    );
}

// ---------------------------------------------------------------------------------------------
// The parent: files, namespace, servers
// ---------------------------------------------------------------------------------------------

/// Scratch files and, when root, a network namespace; both removed on drop.
struct Bench {
    dir: PathBuf,
    netns: Option<String>,
}

impl Bench {
    fn new() -> Bench {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("svcnat-dns-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        let netns = format!("svdnsb{:x}", std::process::id() & 0xffff);
        let netns = (svcnat_examples::testbed::require_root().is_ok()
            && Command::new("ip")
                .args(["netns", "add", &netns])
                .status()
                .is_ok_and(|s| s.success()))
        .then(|| {
            let up = Command::new("ip")
                .args(["-n", &netns, "link", "set", "lo", "up"])
                .status();
            assert!(up.is_ok_and(|s| s.success()), "lo up in {netns}");
            netns
        });
        Bench { dir, netns }
    }

    /// `program` inside the namespace (or here, without one).
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Runs the load generator against `port`; returns queries per second.
    fn load(&self, port: u16, what: &str) -> f64 {
        let exe = std::env::current_exe().unwrap();
        let out = self
            .command(exe)
            .env(LOAD_ENV, format!("127.0.0.1:{port}"))
            .env(NAMES_ENV, self.dir.join("names"))
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "load generator against {what}: {text}"
        );
        let fields: Vec<&str> = text.split_whitespace().collect();
        let bad: u64 = fields[5].parse().unwrap();
        assert_eq!(bad, 0, "{what} gave wrong answers: {text}");
        fields[1].parse().unwrap()
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_svcnat(bench: &Bench, workers: usize) -> Server {
    let mut child = bench
        .command(env!("CARGO_BIN_EXE_svcnat-dns"))
        .arg("--manifests")
        .arg(bench.dir.join("manifests"))
        .args(["--listen", &format!("127.0.0.1:{SVCNAT_PORT}")])
        .args(["--udp-workers", &workers.to_string()])
        // One load generator on loopback is one client network: no response-rate limit.
        .args(["--rrl-responses-per-second", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let server = Server(child);
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(line.trim(), "ready");
    server
}

fn find_dnsmasq() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("dnsmasq"))
        .find(|p| p.is_file())
}

fn dnsmasq_version(path: &Path) -> String {
    Command::new(path)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        })
        .unwrap_or_else(|| "?".into())
}

fn start_dnsmasq(bench: &Bench, path: &Path) -> Server {
    let child = bench
        .command(path)
        .args([
            "--no-daemon",
            &format!("--port={DNSMASQ_PORT}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--cache-size=10000",
            "--user=root",
            "--group=root",
        ])
        .arg(format!(
            "--addn-hosts={}",
            bench.dir.join("hosts").display()
        ))
        .arg(format!(
            "--pid-file={}",
            bench.dir.join("dnsmasq.pid").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The load generator waits until it answers.
    Server(child)
}

/// The in-process cost of `handle_query`, no sockets: (µs per query, queries).
fn in_process(manifests: &str, names: &[String]) -> (f64, u64) {
    let config = ClusterConfig::default();
    let mut m = Manifests::from_files([("bench.yaml", manifests)], &config);
    let cluster = m.build(&config);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let resolver = Resolver::new(&cluster, DiscoveryConfig::default());
    let queries: Vec<Vec<u8>> = names.iter().map(|n| encode_query(n)).collect();
    let start = Instant::now();
    let mut n = 0u64;
    let mut rng = Rng(7);
    while start.elapsed() < Duration::from_secs(1) {
        for _ in 0..1000 {
            let q = &queries[(rng.next() % queries.len() as u64) as usize];
            let out = handle_query(&resolver, q, Transport::Udp).unwrap();
            assert!(is_good_answer(&out));
            n += 1;
        }
    }
    (start.elapsed().as_secs_f64() * 1e6 / n as f64, n)
}

fn main() {
    if let (Some(target), Some(names)) = (std::env::var_os(LOAD_ENV), std::env::var_os(NAMES_ENV)) {
        let target: SocketAddr = target.to_string_lossy().parse().unwrap();
        let names: Vec<String> = std::fs::read_to_string(names)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        generate(target, &names);
        return;
    }

    let bench = Bench::new();
    let mut manifests = String::new();
    let mut hosts = String::new();
    let mut names = String::new();
    for i in 0..SERVICES {
        manifests.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec:\n  clusterIP: {}\n  ports: [{{port: 80}}]\n",
            service_ip(i)
        ));
        hosts.push_str(&format!("{} {}\n", service_ip(i), service_name(i)));
        names.push_str(&service_name(i));
        names.push('\n');
    }
    std::fs::write(bench.dir.join("manifests/services.yaml"), &manifests).unwrap();
    std::fs::write(bench.dir.join("hosts"), &hosts).unwrap();
    std::fs::write(bench.dir.join("names"), &names).unwrap();
    let name_list: Vec<String> = names.lines().map(str::to_string).collect();

    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let default_workers = cpus.min(4);
    println!(
        "svcnat-dns vs dnsmasq: {SERVICES} Services, UDP A queries to 127.0.0.1 {}, {} s per \
         server, load generator: {SOCKETS} socket(s) x {IN_FLIGHT} queries in flight, {cpus} CPUs",
        match &bench.netns {
            Some(ns) => format!("in netns {ns}"),
            None => "in the root namespace (not root: no netns)".into(),
        },
        RUN.as_secs()
    );
    let (us, n) = in_process(&manifests, &name_list);
    println!(
        "  in-process handle_query (parse, resolve, encode; no sockets): {us:.2} us/query \
         ({:.0} queries/s on one core, {n} queries)",
        1e6 / us
    );

    let reference = match find_dnsmasq() {
        Some(path) => {
            let _server = start_dnsmasq(&bench, &path);
            let qps = bench.load(DNSMASQ_PORT, "dnsmasq");
            println!(
                "  dnsmasq {} (reference, single-threaded): {qps:>9.0} qps",
                dnsmasq_version(&path)
            );
            Some(qps)
        }
        None => {
            println!("  SKIP dnsmasq: not installed (Debian: dnsmasq-base); svcnat figures alone");
            None
        }
    };
    let mut runs = vec![1];
    if default_workers > 1 {
        runs.push(default_workers);
    }
    for workers in runs {
        let _server = start_svcnat(&bench, workers);
        let qps = bench.load(SVCNAT_PORT, "svcnat-dns");
        let ratio = reference
            .map(|r| format!(" = {:.2}x dnsmasq", qps / r))
            .unwrap_or_default();
        println!(
            "  svcnat-dns, {workers} UDP worker{}:{}{qps:>9.0} qps{ratio}",
            if workers == 1 { "" } else { "s" },
            if workers == 1 {
                "                  "
            } else {
                "                 "
            }
        );
    }
}
