//! kube-proxy's service health server: for every Service with `externalTrafficPolicy:
//! Local`, an HTTP server on its `healthCheckNodePort` that tells a cloud load balancer
//! whether this node has local endpoints to send the Service's traffic to.
//!
//! Every request on such a port, whatever its path, is answered with the Service's name and
//! its number of ready local endpoints, as kube-proxy answers:
//!
//! ```text
//! HTTP/1.1 200 OK                              (503 with no local endpoint, or a stale proxy)
//! Content-Type: application/json
//! X-Content-Type-Options: nosniff
//! X-Load-Balancing-Endpoint-Weight: 2
//!
//! {"service":{"namespace":"shop","name":"front"},"localEndpoints":2,"serviceProxyHealthy":true}
//! ```
//!
//! `serviceProxyHealthy` is the proxy's own `/livez` verdict (its last successful sync is
//! recent); a stale proxy answers 503 on every port, so load balancers stop trusting rules
//! it no longer keeps current. The listeners follow the plan after each sync:
//! [`ServiceHealth::update`] opens a port when a Service starts needing one and closes it
//! when none does; a port that cannot be bound (in use) is logged once and retried at the
//! next update. All ports are served by one thread (a small tokio runtime); at most
//! [`MAX_CONNECTIONS`] connections are answered at once over all ports, each request must
//! arrive within 2 s and fit in 4 KiB.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use svcnat_core::model::ServiceName;
use svcnat_core::plan::Plan;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{debug, info, warn};

use crate::proxy::Metrics;

/// At most this many health check connections are answered at once, over every port.
pub const MAX_CONNECTIONS: usize = 64;
/// A request must arrive whole within this time.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// A request head larger than this is answered without reading the rest.
const MAX_REQUEST: usize = 4096;

/// What one port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    service: ServiceName,
    local_endpoints: usize,
}

type Table = Arc<Mutex<BTreeMap<u16, Entry>>>;

/// The health check servers of one node's `externalTrafficPolicy: Local` Services.
pub struct ServiceHealth {
    runtime: tokio::runtime::Runtime,
    /// Where each port listens: every address (unspecified) by default, or these.
    addresses: Vec<IpAddr>,
    /// The network namespace the ports are bound in (`/run/netns/NAME`), if not this one.
    netns: Option<String>,
    table: Table,
    listeners: BTreeMap<u16, Vec<tokio::task::JoinHandle<()>>>,
    /// Ports that failed to bind, so the failure is logged once.
    failed: BTreeSet<u16>,
    metrics: Arc<Metrics>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for ServiceHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHealth")
            .field("addresses", &self.addresses)
            .field("ports", &self.listeners.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ServiceHealth {
    /// A server with no port open yet. `addresses` are where each port listens (kube-proxy
    /// listens on the `--nodeport-addresses` when given, else on every address: pass an
    /// empty list). `metrics` gives the proxy's own health.
    pub fn new(addresses: Vec<IpAddr>, metrics: Arc<Metrics>) -> io::Result<ServiceHealth> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("svcnat-svchealth")
            .enable_io()
            .enable_time()
            .build()?;
        Ok(ServiceHealth {
            runtime,
            addresses,
            netns: None,
            table: Arc::new(Mutex::new(BTreeMap::new())),
            listeners: BTreeMap::new(),
            failed: BTreeSet::new(),
            metrics,
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        })
    }

    /// Binds the ports in the network namespace `/run/netns/NAME` (as `ip netns` names
    /// it) instead of the caller's: a test serves a node's health checks inside the node's
    /// namespace this way, the rest of the process staying where it is.
    pub fn in_netns(mut self, name: impl Into<String>) -> ServiceHealth {
        self.netns = Some(name.into());
        self
    }

    /// The ports open now.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.listeners.keys().copied()
    }

    /// Follows `plan`: the counts every port reports, ports opened for new health checks
    /// and closed for those gone.
    pub fn update(&mut self, plan: &Plan) {
        let wanted: BTreeMap<u16, Entry> = plan
            .health_checks()
            .map(|(name, hc)| {
                (
                    hc.port,
                    Entry {
                        service: name.clone(),
                        local_endpoints: hc.local_endpoints,
                    },
                )
            })
            .collect();
        *self.table.lock().unwrap_or_else(PoisonError::into_inner) = wanted.clone();
        let gone: Vec<u16> = self
            .listeners
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            for task in self.listeners.remove(&port).into_iter().flatten() {
                task.abort();
            }
            info!(port, "closed a health check node port");
        }
        self.failed.retain(|p| wanted.contains_key(p));
        for (port, entry) in &wanted {
            if self.listeners.contains_key(port) {
                continue;
            }
            match self.open(*port) {
                Ok(tasks) => {
                    self.failed.remove(port);
                    info!(port, service = %entry.service, "serving a health check node port");
                    self.listeners.insert(*port, tasks);
                }
                Err(e) => {
                    if self.failed.insert(*port) {
                        warn!(port, service = %entry.service, "cannot serve the health check node port: {e}");
                    }
                }
            }
        }
    }

    /// Binds `port` on every configured address (all of them or none).
    fn open(&self, port: u16) -> io::Result<Vec<tokio::task::JoinHandle<()>>> {
        let bound = match &self.netns {
            Some(name) => crate::netns::run_in(name, || bind(&self.addresses, port))?,
            None => bind(&self.addresses, port)?,
        };
        let _guard = self.runtime.enter();
        let mut tasks = Vec::new();
        for l in bound {
            let listener = tokio::net::TcpListener::from_std(l)?;
            let (table, metrics, permits) = (
                self.table.clone(),
                self.metrics.clone(),
                self.permits.clone(),
            );
            tasks.push(
                self.runtime
                    .spawn(accept(listener, port, table, metrics, permits)),
            );
        }
        Ok(tasks)
    }
}

/// Listening sockets for `port` on `addresses`, or on every address of both families
/// when none is given (`[::]`, which takes IPv4 too unless `bindv6only` is set; then, or
/// without IPv6, `0.0.0.0` as well), as kube-proxy's `:port` listens.
fn bind(addresses: &[IpAddr], port: u16) -> io::Result<Vec<std::net::TcpListener>> {
    let listen = |ip: IpAddr| {
        std::net::TcpListener::bind(SocketAddr::new(ip, port))
            .map_err(|e| io::Error::new(e.kind(), format!("{ip}:{port}: {e}")))
    };
    let mut bound = Vec::new();
    if addresses.is_empty() {
        let v6 = listen(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        let v6_ok = v6.is_ok();
        bound.extend(v6);
        match listen(IpAddr::V4(Ipv4Addr::UNSPECIFIED)) {
            Ok(l) => bound.push(l),
            // The dual-stack socket already takes IPv4.
            Err(e) if v6_ok && e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(e),
        }
    } else {
        for ip in addresses {
            bound.push(listen(*ip)?);
        }
    }
    for l in &bound {
        l.set_nonblocking(true)?;
    }
    Ok(bound)
}

impl Drop for ServiceHealth {
    fn drop(&mut self) {
        for task in self.listeners.values().flatten() {
            task.abort();
        }
    }
}

async fn accept(
    listener: tokio::net::TcpListener,
    port: u16,
    table: Table,
    metrics: Arc<Metrics>,
    permits: Arc<tokio::sync::Semaphore>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                debug!(port, "health check accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over budget: closed unanswered (a load balancer retries; a flood does not grow
        // memory or tasks without bound).
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(
                port,
                "too many health check connections; closing one unanswered"
            );
            continue;
        };
        let (table, metrics) = (table.clone(), metrics.clone());
        tokio::spawn(async move {
            let answered =
                tokio::time::timeout(REQUEST_DEADLINE, answer(stream, port, &table, &metrics))
                    .await;
            if let Ok(Err(e)) = answered {
                debug!(port, "health check connection: {e}");
            }
            drop(permit);
        });
    }
}

/// Reads the request head (whatever it asks) and writes the Service's health.
async fn answer(
    mut stream: tokio::net::TcpStream,
    port: u16,
    table: &Table,
    metrics: &Metrics,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !(buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")) {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if buf.len() > MAX_REQUEST {
            break;
        }
    }
    let entry = table
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&port)
        .cloned();
    let proxy_healthy = metrics
        .liveness_at(Instant::now(), SystemTime::now())
        .healthy;
    let response = render(entry.as_ref(), proxy_healthy);
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The HTTP response for a port's entry (none: the Service went away meanwhile).
fn render(entry: Option<&Entry>, proxy_healthy: bool) -> String {
    let Some(entry) = entry else {
        let body = "no Service uses this health check port now\n";
        return format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    let body = serde_json::json!({
        "service": {
            "namespace": entry.service.namespace,
            "name": entry.service.name,
        },
        "localEndpoints": entry.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    })
    .to_string();
    let status = if entry.local_endpoints > 0 && proxy_healthy {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        entry.local_endpoints,
        body.len()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use std::io::{Read as _, Write as _};

    fn entry(n: usize) -> Entry {
        Entry {
            service: ServiceName::new("shop", "front"),
            local_endpoints: n,
        }
    }

    #[test]
    fn answers_as_kube_proxy() {
        let ok = render(Some(&entry(2)), true);
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("\r\nX-Load-Balancing-Endpoint-Weight: 2\r\n"));
        let body = ok.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "shop", "name": "front"},
                "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        assert!(render(Some(&entry(0)), true).starts_with("HTTP/1.1 503 "));
        // A stale proxy fails every Service's check, with its endpoints still counted.
        let stale = render(Some(&entry(3)), false);
        assert!(stale.starts_with("HTTP/1.1 503 "), "{stale}");
        assert!(stale.contains("\"serviceProxyHealthy\":false"), "{stale}");
        assert!(render(None, true).starts_with("HTTP/1.1 503 "));
    }

    /// Ports follow the plan; a port in use is retried at the next update. Loopback only.
    #[test]
    fn ports_follow_the_plan() {
        use svcnat_core::model::*;
        use svcnat_core::plan::NodeContext;
        let metrics = Arc::new(Metrics::new(Duration::from_secs(30)));
        // A sync just succeeded: the proxy is healthy.
        metrics.sync_ok(
            Instant::now(),
            Duration::from_millis(1),
            &svcnat_core::plan::SyncReport::default(),
            1,
        );
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut hs = ServiceHealth::new(vec![lo], metrics).unwrap();
        // A free port, then a Service whose health check uses it.
        let port = std::net::TcpListener::bind((lo, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cluster = Cluster::new();
        let mut node = Node::new("n1");
        node.addresses = vec![IpAddr::from([192, 0, 2, 1])];
        cluster.upsert_node(node);
        let mut svc = Service::new(ObjectName::new("shop", "front"));
        svc.service_type = ServiceType::LoadBalancer;
        svc.cluster_ips = vec![IpAddr::from([10, 96, 0, 9])];
        svc.external_traffic_policy = TrafficPolicy::Local;
        svc.health_check_node_port = Some(port);
        let mut sp = ServicePort::new("http", Protocol::Tcp, 80, TargetPort::Number(8080));
        sp.node_port = Some(30080);
        svc.ports.push(sp);
        cluster.upsert_service(svc);
        let ctx = NodeContext::new("n1", vec![IpAddr::from([192, 0, 2, 1])], vec![]);
        let get = || -> String {
            let mut s = std::net::TcpStream::connect((lo, port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };

        hs.update(&Plan::compile(&cluster, &ctx));
        assert_eq!(hs.ports().collect::<Vec<_>>(), [port]);
        let r = get();
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(r.contains("\"localEndpoints\":0"), "{r}");

        cluster.upsert_slice(EndpointSlice {
            service: ServiceName::new("shop", "front"),
            name: "front-1".into(),
            endpoints: vec![{
                let mut ep = Endpoint::new(IpAddr::from([10, 244, 0, 5]));
                ep.node_name = Some("n1".into());
                ep
            }],
            ports: vec![EndpointPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        });
        hs.update(&Plan::compile(&cluster, &ctx));
        let r = get();
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains("\"localEndpoints\":1"), "{r}");

        cluster.remove_service(&ServiceName::new("shop", "front"));
        hs.update(&Plan::compile(&cluster, &ctx));
        assert_eq!(hs.ports().count(), 0);
        // Closed: the port can be bound again.
        std::thread::sleep(Duration::from_millis(100));
        assert!(std::net::TcpListener::bind((lo, port)).is_ok());
    }
}
