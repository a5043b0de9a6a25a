//! The upstream forwarder: what CoreDNS's `forward . /etc/resolv.conf` does for pods, for
//! the queries [`handle_query_step`](super::handle_query_step) cannot answer from the
//! cluster.
//!
//! Each upstream query goes out on a fresh UDP socket bound to port 0 (the kernel picks a
//! random ephemeral source port) and connected to the upstream (the kernel drops datagrams
//! from anyone else), with a fresh random id from the operating system's generator, drawn
//! so that no two queries in flight share one. The answer must carry that id and our exact
//! question ([`Pending::accepts`]); anything else is ignored while the attempt waits. This
//! is the cache-poisoning hygiene of RFC 5452: an off-path attacker has to guess 16 bits of
//! id and about 15 bits of port. A truncated answer is asked again over TCP, and a client
//! that asked over TCP is forwarded over TCP.
//!
//! The forwarder owns a small tokio runtime (one worker thread): UDP queries are handed to
//! it with [`Forwarder::spawn`] so that the server's UDP workers never wait on an upstream,
//! and TCP connection threads wait on it with [`Forwarder::forward_blocking`]. The number
//! of queries in flight is bounded by a table keyed by upstream id; a query beyond it is
//! REFUSED at once ([`Pending::refuse`]). Upstreams are tried in turn (the first one
//! rotating per query) within one overall timeout, after which the client gets SERVFAIL.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use super::{Outcome, Pending, TCP_MAX_MESSAGE};

/// The default time a client waits for an upstream answer before it gets SERVFAIL.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default number of upstream queries in flight.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// The receive buffer for one upstream UDP answer (we advertise 1232 bytes).
const UDP_ANSWER_BUFFER: usize = 4096;

/// Where and how to forward.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ForwardConfig {
    /// The upstream servers, tried in turn.
    pub upstreams: Vec<SocketAddr>,
    /// How long a client waits in all before it gets SERVFAIL.
    pub timeout: Duration,
    /// How many upstream queries may be in flight at once.
    pub max_in_flight: usize,
}

impl ForwardConfig {
    /// Forwarding to `upstreams` with the default timeout and bound.
    pub fn new(upstreams: Vec<SocketAddr>) -> ForwardConfig {
        ForwardConfig {
            upstreams,
            timeout: DEFAULT_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// Why an upstream exchange gave no answer.
#[derive(Debug)]
#[non_exhaustive]
pub enum ForwardError {
    /// No answer before the deadline.
    Timeout,
    /// A socket error (refused, unreachable, reset...).
    Io(io::Error),
    /// A TCP answer that was not ours or did not parse.
    Mismatch,
    /// The query could not be encoded.
    Encode,
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardError::Timeout => f.write_str("timed out"),
            ForwardError::Io(e) => write!(f, "{e}"),
            ForwardError::Mismatch => f.write_str("an answer that is not ours"),
            ForwardError::Encode => f.write_str("cannot encode the query"),
        }
    }
}

impl From<io::Error> for ForwardError {
    fn from(e: io::Error) -> ForwardError {
        ForwardError::Io(e)
    }
}

/// Reads the upstreams a `--upstream` value names: `ADDR`, `ADDR:PORT` or `[V6]:PORT`
/// (port 53 by default), or else a path to a `resolv.conf` whose `nameserver` lines are
/// read.
pub fn parse_upstream(value: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, 53)]);
    }
    let text = std::fs::read_to_string(value).map_err(|e| {
        format!("--upstream {value}: neither ADDR[:PORT] nor a readable resolv.conf: {e}")
    })?;
    let servers = resolv_conf_nameservers(&text);
    if servers.is_empty() {
        return Err(format!("--upstream {value}: no `nameserver` line"));
    }
    Ok(servers)
}

/// The `nameserver` addresses of a `resolv.conf`, port 53, in order (glibc's rules:
/// one address per line, `#` and `;` start comments, a `%zone` suffix is dropped, lines
/// that do not parse are skipped).
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then_some(())?;
            let addr = words.next()?;
            let addr = addr.split('%').next().unwrap_or(addr);
            addr.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The table of upstream ids in flight.
#[derive(Debug)]
struct InFlight {
    /// Upstream id -> the upstream it went to.
    ids: HashMap<u16, SocketAddr>,
    max: usize,
}

/// One query's place in the [`InFlight`] table; its id is freed on drop.
#[derive(Debug)]
struct Lease {
    table: Arc<Mutex<InFlight>>,
    id: u16,
}

impl Lease {
    /// Takes a place with a fresh random id, or `None` when the table is full.
    fn take(table: &Arc<Mutex<InFlight>>) -> io::Result<Option<Lease>> {
        let mut t = table.lock().unwrap_or_else(PoisonError::into_inner);
        if t.ids.len() >= t.max {
            return Ok(None);
        }
        let id = fresh_id(&t.ids)?;
        t.ids
            .insert(id, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        Ok(Some(Lease {
            table: Arc::clone(table),
            id,
        }))
    }

    /// Trades this id for a fresh random one for the next query to `upstream`.
    fn renew(&mut self, upstream: SocketAddr) -> io::Result<u16> {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.ids.remove(&self.id);
        let id = fresh_id(&t.ids)?;
        t.ids.insert(id, upstream);
        self.id = id;
        Ok(id)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.ids.remove(&self.id);
    }
}

/// A random id no query in flight holds (the table is never full of all 65536).
fn fresh_id(taken: &HashMap<u16, SocketAddr>) -> io::Result<u16> {
    loop {
        let mut bytes = [0u8; 2];
        getrandom::fill(&mut bytes).map_err(|e| io::Error::other(format!("getrandom: {e}")))?;
        let id = u16::from_be_bytes(bytes);
        if !taken.contains_key(&id) {
            return Ok(id);
        }
    }
}

/// Sends pending queries upstream and builds the clients' responses from the answers.
#[derive(Debug)]
pub struct Forwarder {
    config: ForwardConfig,
    runtime: tokio::runtime::Runtime,
    table: Arc<Mutex<InFlight>>,
    next: Arc<AtomicUsize>,
}

impl Forwarder {
    /// A forwarder with its runtime (one worker thread, `dns-forward`).
    pub fn new(config: ForwardConfig) -> io::Result<Forwarder> {
        if config.upstreams.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "forwarding needs at least one upstream",
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dns-forward")
            .enable_all()
            .build()?;
        let table = Arc::new(Mutex::new(InFlight {
            ids: HashMap::new(),
            max: config.max_in_flight.max(1),
        }));
        Ok(Forwarder {
            config,
            runtime,
            table,
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ForwardConfig {
        &self.config
    }

    /// How many upstream queries are in flight now.
    pub fn in_flight(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ids
            .len()
    }

    /// Forwards `pending` and calls `reply` with the client's response once it is known
    /// (upstream answer, SERVFAIL after the timeout, or REFUSED at once when the table is
    /// full). Returns at once; `reply` runs on the forwarder's thread.
    pub fn spawn(
        &self,
        pending: Box<Pending>,
        tcp: bool,
        reply: impl FnOnce(Option<Vec<u8>>, Outcome) + Send + 'static,
    ) {
        let lease = match Lease::take(&self.table) {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                let (out, outcome) = pending.refuse();
                return reply(out, outcome);
            }
            Err(e) => {
                debug!("no upstream id: {e}");
                let (out, outcome) = pending.fail();
                return reply(out, outcome);
            }
        };
        let job = Job {
            config: self.config.clone(),
            next: Arc::clone(&self.next),
        };
        self.runtime.spawn(async move {
            let (out, outcome) = job.run(lease, pending, tcp).await;
            reply(out, outcome);
        });
    }

    /// Forwards `pending` and waits for the client's response (for TCP connection
    /// threads; never call it from the forwarder's own runtime).
    pub fn forward_blocking(&self, pending: Box<Pending>, tcp: bool) -> (Option<Vec<u8>>, Outcome) {
        let lease = match Lease::take(&self.table) {
            Ok(Some(lease)) => lease,
            Ok(None) => return pending.refuse(),
            Err(e) => {
                debug!("no upstream id: {e}");
                return pending.fail();
            }
        };
        let job = Job {
            config: self.config.clone(),
            next: Arc::clone(&self.next),
        };
        self.runtime.block_on(job.run(lease, pending, tcp))
    }
}

/// One client query's trip upstream.
struct Job {
    config: ForwardConfig,
    next: Arc<AtomicUsize>,
}

impl Job {
    /// Tries the upstreams in turn within the timeout; SERVFAIL when none answered.
    async fn run(
        self,
        mut lease: Lease,
        pending: Box<Pending>,
        tcp: bool,
    ) -> (Option<Vec<u8>>, Outcome) {
        let started = Instant::now();
        let deadline = started + self.config.timeout;
        let upstreams = &self.config.upstreams;
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..upstreams.len() {
            let Some(&upstream) = upstreams.get((first + i) % upstreams.len()) else {
                break;
            };
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // The time left, shared among the upstreams not tried yet.
            let left = u32::try_from(upstreams.len() - i)
                .unwrap_or(u32::MAX)
                .max(1);
            let attempt_deadline = now + (deadline - now) / left;
            let id = match lease.renew(upstream) {
                Ok(id) => id,
                Err(e) => {
                    debug!("no upstream id: {e}");
                    break;
                }
            };
            match exchange(upstream, &pending, id, tcp, attempt_deadline).await {
                Ok(answer) => {
                    debug!(
                        "{} {:?} forwarded to {upstream}: {:?} in {:?}",
                        pending.question().name(),
                        pending.question().query_type(),
                        answer.metadata.response_code,
                        started.elapsed()
                    );
                    return pending.complete(answer);
                }
                Err(e) => debug!(
                    "{} {:?} upstream {upstream}: {e}",
                    pending.question().name(),
                    pending.question().query_type()
                ),
            }
        }
        pending.fail()
    }
}

/// One query to one upstream: UDP (then TCP when the answer is truncated), or TCP.
async fn exchange(
    upstream: SocketAddr,
    pending: &Pending,
    id: u16,
    tcp: bool,
    deadline: Instant,
) -> Result<Message, ForwardError> {
    let query = pending.upstream_query(id).ok_or(ForwardError::Encode)?;
    if !tcp {
        let answer = exchange_udp(upstream, pending, id, &query, deadline).await?;
        if !answer.metadata.truncation {
            return Ok(answer);
        }
    }
    exchange_tcp(upstream, pending, id, &query, deadline).await
}

async fn exchange_udp(
    upstream: SocketAddr,
    pending: &Pending,
    id: u16,
    query: &[u8],
    deadline: Instant,
) -> Result<Message, ForwardError> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // Port 0: a fresh random ephemeral port per query.
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; UDP_ANSWER_BUFFER];
    loop {
        let n = timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| ForwardError::Timeout)??;
        if let Some(answer) = buf.get(..n).and_then(|b| pending.accepts(id, b)) {
            return Ok(answer);
        }
        // Not ours (a late answer to nothing, or a forgery): keep waiting.
        debug!("upstream {upstream}: ignored a datagram that does not answer id {id}");
    }
}

async fn exchange_tcp(
    upstream: SocketAddr,
    pending: &Pending,
    id: u16,
    query: &[u8],
    deadline: Instant,
) -> Result<Message, ForwardError> {
    let exchange = async {
        let mut stream = TcpStream::connect(upstream).await?;
        stream.set_nodelay(true)?;
        let len = u16::try_from(query.len()).map_err(|_| ForwardError::Encode)?;
        let mut frame = Vec::with_capacity(query.len() + 2);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(query);
        stream.write_all(&frame).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let len = usize::from(u16::from_be_bytes(len)).min(TCP_MAX_MESSAGE);
        let mut answer = vec![0u8; len];
        stream.read_exact(&mut answer).await?;
        pending.accepts(id, &answer).ok_or(ForwardError::Mismatch)
    };
    timeout_at(deadline, exchange)
        .await
        .map_err(|_| ForwardError::Timeout)?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "\
# generated
search example.internal
nameserver 192.0.2.53
nameserver   2001:db8::53 # comment
nameserver fe80::1%eth0
;nameserver 192.0.2.99
nameserver not-an-address
options ndots:2
";
        let got = resolv_conf_nameservers(text);
        let want: Vec<SocketAddr> = ["192.0.2.53:53", "[2001:db8::53]:53", "[fe80::1]:53"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn upstream_values() {
        assert_eq!(
            parse_upstream("192.0.2.1").unwrap(),
            ["192.0.2.1:53".parse().unwrap()]
        );
        assert_eq!(
            parse_upstream("192.0.2.1:5353").unwrap(),
            ["192.0.2.1:5353".parse().unwrap()]
        );
        assert_eq!(
            parse_upstream("2001:db8::1").unwrap(),
            ["[2001:db8::1]:53".parse().unwrap()]
        );
        let file = std::env::temp_dir().join(format!("svcnat-resolv-{}.conf", std::process::id()));
        std::fs::write(&file, "nameserver 192.0.2.53\nnameserver 192.0.2.54\n").unwrap();
        let got = parse_upstream(&file.display().to_string());
        std::fs::write(&file, "search example\n").unwrap();
        let none = parse_upstream(&file.display().to_string());
        let _ = std::fs::remove_file(&file);
        assert_eq!(
            got.unwrap(),
            [
                "192.0.2.53:53".parse().unwrap(),
                "192.0.2.54:53".parse().unwrap()
            ]
        );
        assert!(none.unwrap_err().ends_with("no `nameserver` line"));
        let err = parse_upstream("/nonexistent/resolv.conf").unwrap_err();
        assert!(
            err.starts_with("--upstream /nonexistent/resolv.conf: neither"),
            "{err}"
        );
    }

    #[test]
    fn the_id_table_is_bounded_and_ids_are_unique_and_freed() {
        let table = Arc::new(Mutex::new(InFlight {
            ids: HashMap::new(),
            max: 3,
        }));
        let a = Lease::take(&table).unwrap().unwrap();
        let mut b = Lease::take(&table).unwrap().unwrap();
        let c = Lease::take(&table).unwrap().unwrap();
        assert!(Lease::take(&table).unwrap().is_none(), "full");
        let old = b.id;
        let up: SocketAddr = "192.0.2.1:53".parse().unwrap();
        let new = b.renew(up).unwrap();
        let ids = [a.id, new, c.id];
        assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
        {
            let t = table.lock().unwrap();
            assert_eq!(t.ids.len(), 3);
            assert_eq!(t.ids.get(&new), Some(&up));
            assert!(new == old || !t.ids.contains_key(&old));
        }
        drop(a);
        assert_eq!(table.lock().unwrap().ids.len(), 2);
        assert!(Lease::take(&table).unwrap().is_some());
    }

    #[test]
    fn ids_are_not_sequential() {
        // 64 ids from the OS generator: a counter or a constant would repeat a pattern.
        let table = Arc::new(Mutex::new(InFlight {
            ids: HashMap::new(),
            max: 64,
        }));
        let leases: Vec<Lease> = (0..64)
            .map(|_| Lease::take(&table).unwrap().unwrap())
            .collect();
        let steps: std::collections::HashSet<u16> = leases
            .windows(2)
            .map(|w| w[1].id.wrapping_sub(w[0].id))
            .collect();
        assert!(steps.len() > 32, "{steps:?}");
    }
}
