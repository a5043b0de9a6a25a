//! `svcnat-dns --kubeconfig`: cluster DNS following an API server (the fake one, over HTTPS
//! with a bearer token), as CoreDNS's `kubernetes` plugin does: Services (headless ones
//! too), EndpointSlices with their hostnames, Pods for pod records; changes are served as
//! they arrive.
//!
//! Everything runs on 127.0.0.1 (the fake API server and svcnat-dns on free ports); no root
//! needed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::json;
use svcnat_examples::fakeapi::FakeApiServer;

/// svcnat-dns, killed on drop.
struct Dns(Child);

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    // A port free for both TCP and UDP right now.
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn ask(port: u16, name: &str, rtype: RecordType) -> (ResponseCode, Vec<String>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut m = Message::query();
    m.metadata.id = 4242;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    sock.send_to(&m.to_vec().unwrap(), ("127.0.0.1", port))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("an answer");
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, 4242);
    let data = r
        .answers
        .iter()
        .map(|rr| match &rr.data {
            RData::A(a) => IpAddr::V4(a.0).to_string(),
            RData::CNAME(c) => c.0.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    (r.metadata.response_code, data)
}

/// Polls until `f` holds, for at most 20 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dns_follows_the_api_server() {
    let api = FakeApiServer::start_new().unwrap();
    api.apply_json(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "redis", "namespace": "instavote"},
        "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "redis", "port": 6379}]}
    }))
    .unwrap();
    // A headless Service with a hostnamed endpoint (a StatefulSet's pod).
    api.apply_json(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "instavote"},
        "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]}
    }))
    .unwrap();
    api.apply_json(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "db-abcde", "namespace": "instavote",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.7"], "hostname": "db-0",
                       "conditions": {"ready": true}}],
        "ports": [{"name": "", "port": 5432, "protocol": "TCP"}]
    }))
    .unwrap();
    api.apply_json(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "vote-1", "namespace": "instavote"},
        "spec": {"containers": [{"name": "vote", "image": "vote"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.9",
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap();

    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_svcnat-dns"))
        .arg("--kubeconfig")
        .arg(api.kubeconfig_path())
        .args(["--listen", &format!("127.0.0.1:{port}"), "-v"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _dns = Dns(child);
    assert_eq!(line.trim(), "ready");

    // What was listed before it started serving.
    assert_eq!(
        ask(port, "redis.instavote.svc.cluster.local", RecordType::A),
        (ResponseCode::NoError, vec!["10.96.0.20".to_string()])
    );
    assert_eq!(
        ask(port, "db-0.db.instavote.svc.cluster.local", RecordType::A),
        (ResponseCode::NoError, vec!["10.244.1.7".to_string()])
    );
    assert_eq!(
        ask(port, "db.instavote.svc.cluster.local", RecordType::A),
        (ResponseCode::NoError, vec!["10.244.1.7".to_string()])
    );
    assert_eq!(
        ask(
            port,
            "10-244-1-9.instavote.pod.cluster.local",
            RecordType::A
        ),
        (ResponseCode::NoError, vec!["10.244.1.9".to_string()])
    );
    // Changes arrive by watch: a new Service resolves, a deleted one stops resolving, and a
    // second endpoint shows up under the headless name.
    api.apply_json(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "vote", "namespace": "instavote"},
        "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}
    }))
    .unwrap();
    eventually("the new Service", || {
        ask(port, "vote.instavote.svc.cluster.local", RecordType::A).1 == ["10.96.0.30"]
    });
    api.delete("Service", "instavote", "redis").unwrap();
    eventually("the deleted Service to go", || {
        ask(port, "redis.instavote.svc.cluster.local", RecordType::A).0 == ResponseCode::NXDomain
    });
    api.apply_json(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "db-abcde", "namespace": "instavote",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.244.1.7"], "hostname": "db-0", "conditions": {"ready": true}},
            {"addresses": ["10.244.2.7"], "hostname": "db-1", "conditions": {"ready": true}}
        ],
        "ports": [{"name": "", "port": 5432, "protocol": "TCP"}]
    }))
    .unwrap();
    eventually("the second endpoint", || {
        let (rc, mut ips) = ask(port, "db.instavote.svc.cluster.local", RecordType::A);
        ips.sort();
        rc == ResponseCode::NoError && ips == ["10.244.1.7", "10.244.2.7"]
    });
    assert_eq!(
        ask(port, "db-1.db.instavote.svc.cluster.local", RecordType::A).1,
        ["10.244.2.7"]
    );
}
