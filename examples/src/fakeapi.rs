//! A fake Kubernetes API server for tests, speaking the list/watch protocol kube-rs and
//! client-go speak, over HTTPS on loopback.
//!
//! Role in the tree: test harness only. The programs (`svcnat-proxy`, `svcnat-dns` with
//! `--kubeconfig`) follow a real API server through kube-rs; their tests point them at a
//! [`FakeApiServer`] instead, through the kubeconfig it writes.
//!
//! The server runs on a background thread with its own tokio runtime (tests stay sync),
//! bound to `127.0.0.1:0` (in the caller's network namespace, or in the one
//! [`FakeApiOptions::netns`] names, so that a proxy run inside a test namespace reaches it
//! without anything bound in the root namespace): HTTP/1.1 (hyper) over TLS (rustls) with a CA and a server
//! certificate for `127.0.0.1` and `localhost` made by rcgen at start. It serves core/v1
//! `services`, `nodes`, `pods`, `namespaces` and discovery.k8s.io/v1 `endpointslices`.
//!
//! # Faithful
//! - Authentication: a bearer token or a client certificate signed by the CA (the
//!   kubeconfig has a context for each, and one with no credentials); anything else is
//!   `401` with an `Unauthorized` `Status`, on every path (anonymous auth off).
//! - Paths: `/api/v1/RESOURCE`, `/api/v1/namespaces/NS/RESOURCE`, `.../NAME`, the same
//!   under `/apis/discovery.k8s.io/v1`; `/version`, `/api`, `/apis`, `/api/v1`,
//!   `/apis/discovery.k8s.io[/v1]`. Unknown paths and objects: `404` `Status` (NotFound,
//!   with `details` naming the object).
//! - One global resource version (etcd's revision) stamped on every write; a write that
//!   changes nothing commits nothing. Objects get `uid`, `creationTimestamp`,
//!   `generation` (Service, EndpointSlice, Pod: bumped when anything outside metadata and
//!   status changes), `managedFields` and the defaults the API server writes (Service:
//!   `type`, `clusterIP` from 10.96.0.0/12, `clusterIPs`, `ipFamilies`, `ipFamilyPolicy`,
//!   `sessionAffinity`, `internalTrafficPolicy`, port `protocol` and `targetPort`, node
//!   ports and `externalTrafficPolicy` for NodePort/LoadBalancer, allocated values kept
//!   across updates; EndpointSlice port `name` and `protocol`; Namespace finalizer, phase
//!   and `kubernetes.io/metadata.name` label; the common Pod defaults).
//! - LIST: items in storage-key order without their `kind`/`apiVersion`, `limit` and
//!   `continue` with the API server's token format, later pages served from the first
//!   page's snapshot (same `resourceVersion`), `remainingItemCount` when unfiltered,
//!   `resourceVersionMatch=Exact` at an old version; `410 Expired` for a continue token
//!   or an exact version older than the compaction point.
//! - `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, exists, `!key`) and `fieldSelector`
//!   (`=`, `==`, `!=` on the fields each resource supports, e.g. `metadata.name` for
//!   Nodes; other fields are `400`).
//! - WATCH: a chunked `application/json` stream of newline-delimited
//!   `{"type":...,"object":...}` events after the given version, with selectors applied
//!   as the watch cache does (an object entering the selection is ADDED, leaving it is
//!   DELETED with its last state at the change's version); no version or `0`: the current
//!   state as ADDED first; `sendInitialEvents=true` (streaming lists) ends the initial
//!   state with a BOOKMARK annotated `k8s.io/initial-events-end`; BOOKMARKs every
//!   bookmark interval with `allowWatchBookmarks=true`; a version older than the
//!   compaction point gets HTTP 200 and one ERROR event with a `410 Expired` `Status`;
//!   `timeoutSeconds` ends the stream cleanly.
//! - Faults: [`FakeApiServer::compact`] forgets history and ends open watches (as a
//!   watch cache re-initialisation does), so the clients' next watch gets 410 and they
//!   re-list; [`FakeApiServer::cut_watches`] drops every watch connection mid-stream (no
//!   last chunk, no TLS close); [`FakeApiServer::stop`] and [`FakeApiServer::start`]
//!   take the server away and bring it back on the same port with its state.
//!
//! A [`Publisher`] plays the control plane: it writes a [`svcnat_core::model::Cluster`]'s
//! Services, EndpointSlices and Nodes to the server, then only what changed, as the
//! EndpointSlice controller and kubectl would (the conformance suite and the lab replay
//! drive proxies through the API with it).
//!
//! # Simplified
//! - Read-only API: GET only (other methods are `405`); tests write through
//!   [`FakeApiServer::apply`] and [`FakeApiServer::delete`], which commit like an update
//!   from a client (`managedFields` is an approximate FieldsV1 set with manager
//!   `fakeapi`, and kept as given when the object carries one). No admission, no
//!   validation beyond what defaulting needs, no finalizers or graceful deletion.
//! - JSON only (no protobuf, no Table, no gzip); no HTTP/2, no aggregated discovery.
//! - A version newer than the server's is served as the current state (the real server
//!   waits up to 3 s, then answers 504).
//! - Compaction is explicit ([`FakeApiServer::compact`]) or by history length
//!   ([`FakeApiOptions::history_limit`]), not by time; continue tokens expire only then.
//! - Limits: 256 connections, 10 s for the TLS handshake, 30 s for request headers, watches
//!   at most an hour.

mod http;
mod publish;
mod selector;
mod store;

pub use publish::{Published, Publisher, node_to_api};

use std::collections::BTreeMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use data_encoding::BASE64;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

use store::Store;

/// The most connections served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 256;
/// Time allowed for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the fake API server could not do what it was asked.
#[derive(Debug)]
#[non_exhaustive]
pub enum FakeApiError {
    /// A socket, file or thread operation failed.
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// Certificates or the TLS configuration could not be made.
    Tls(String),
    /// An object given to [`FakeApiServer::apply`] was not acceptable.
    Object {
        /// The object (kind, namespace/name).
        object: String,
        /// The field at fault.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The object to delete does not exist.
    NotFound {
        /// Its resource (`services`).
        resource: String,
        /// Its key (`namespace/name` or `name`).
        key: String,
    },
    /// The server's runtime did not answer.
    Runtime(String),
}

impl FakeApiError {
    pub(crate) fn object(object: &str, field: &str, problem: String) -> Self {
        FakeApiError::Object {
            object: object.to_string(),
            field: field.to_string(),
            problem,
        }
    }

    fn io(what: impl Into<String>, source: io::Error) -> Self {
        FakeApiError::Io {
            what: what.into(),
            source,
        }
    }
}

impl fmt::Display for FakeApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FakeApiError::Io { what, source } => write!(f, "{what}: {source}"),
            FakeApiError::Tls(why) => write!(f, "TLS setup: {why}"),
            FakeApiError::Object {
                object,
                field,
                problem,
            } => write!(f, "{object}: {field} {problem}"),
            FakeApiError::NotFound { resource, key } => write!(f, "{resource} {key:?} not found"),
            FakeApiError::Runtime(why) => write!(f, "fake API server runtime: {why}"),
        }
    }
}

impl std::error::Error for FakeApiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FakeApiError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A request verb, for the request counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    /// GET of one object.
    Get,
    /// LIST of a collection (one request per page).
    List,
    /// WATCH of a collection (one per stream opened).
    Watch,
}

/// Settings of a [`FakeApiServer`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FakeApiOptions {
    /// How often a watch that asked for bookmarks gets one (the API server: about a
    /// minute).
    pub bookmark_interval: Duration,
    /// Changes kept for watches and paged lists before the oldest are compacted away.
    pub history_limit: usize,
    /// The resource version the store starts at.
    pub start_resource_version: u64,
    /// The network namespace (a name under `/run/netns`) whose loopback the server
    /// listens on; `None`: the caller's.
    pub netns: Option<String>,
}

impl Default for FakeApiOptions {
    fn default() -> Self {
        FakeApiOptions {
            bookmark_interval: Duration::from_secs(60),
            history_limit: 100_000,
            start_resource_version: 1000,
            netns: None,
        }
    }
}

impl FakeApiOptions {
    /// Sets how often watches get a BOOKMARK.
    #[must_use]
    pub fn bookmark_interval(mut self, every: Duration) -> Self {
        self.bookmark_interval = every;
        self
    }

    /// Sets how many changes are kept before the oldest are compacted away.
    #[must_use]
    pub fn history_limit(mut self, changes: usize) -> Self {
        self.history_limit = changes;
        self
    }

    /// Listens on the loopback of the network namespace `/run/netns/NAME` instead of the
    /// caller's (also after [`FakeApiServer::start`]), so that a program run in that
    /// namespace (`ip netns exec NAME ...`) reaches it at `127.0.0.1` and nothing is
    /// bound or routed in the caller's namespace.
    #[must_use]
    pub fn netns(mut self, name: impl Into<String>) -> Self {
        self.netns = Some(name.into());
        self
    }
}

/// What the runtime tasks share with the test-facing handle.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// The resource version after the last write.
    changed: watch::Sender<u64>,
    /// Bumped by [`FakeApiServer::cut_watches`].
    cut: watch::Sender<u64>,
    /// Bumped by [`FakeApiServer::compact`]: open watches end.
    closed: watch::Sender<u64>,
    token: String,
    counters: Mutex<BTreeMap<(Verb, String), u64>>,
    unauthorized: AtomicU64,
    open_watches: AtomicUsize,
    options: FakeApiOptions,
    addr: SocketAddr,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn count(&self, verb: Verb, resource: &str) {
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        *counters.entry((verb, resource.to_string())).or_default() += 1;
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A fake Kubernetes API server on `127.0.0.1`, with the kubeconfig to reach it.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    acceptor: TlsAcceptor,
    accept_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    dir: PathBuf,
    kubeconfig: PathBuf,
    ca_pem: String,
}

impl fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.shared.addr)
            .field("kubeconfig", &self.kubeconfig)
            .finish_non_exhaustive()
    }
}

/// Certificates made for one server.
struct Pki {
    ca_pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
    ca_der: CertificateDer<'static>,
    client_cert_pem: String,
    client_key_pem: String,
}

fn make_pki() -> Result<Pki, rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fakeapi-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    // The user kubeadm's admin.conf has: group system:masters.
    let client_key = KeyPair::generate()?;
    let mut client_params = CertificateParams::new(Vec::<String>::new())?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, "fakeapi-admin");
    client_params
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer)?;

    Ok(Pki {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().clone(),
        server_chain: vec![server_cert.der().clone(), ca_cert.der().clone()],
        server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
    })
}

fn tls_acceptor(pki: &Pki) -> Result<TlsAcceptor, FakeApiError> {
    let tls = |e: &dyn fmt::Display| FakeApiError::Tls(e.to_string());
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der.clone()).map_err(|e| tls(&e))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls(&e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
        .map_err(|e| tls(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn random_hex(random: &RandomState, salt: u64) -> String {
    let mut h = random.build_hasher();
    h.write_u64(salt);
    let a = h.finish();
    h.write_u64(a);
    format!("{a:016x}{:016x}", h.finish())
}

fn kubeconfig_text(addr: SocketAddr, pki: &Pki, token: &str) -> String {
    let ca = BASE64.encode(pki.ca_pem.as_bytes());
    let cert = BASE64.encode(pki.client_cert_pem.as_bytes());
    let key = BASE64.encode(pki.client_key_pem.as_bytes());
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fakeapi
  cluster:
    server: https://{addr}
    certificate-authority-data: {ca}
contexts:
- name: fakeapi
  context:
    cluster: fakeapi
    user: fakeapi-token
    namespace: default
- name: fakeapi-cert
  context:
    cluster: fakeapi
    user: fakeapi-cert
    namespace: default
- name: fakeapi-anonymous
  context:
    cluster: fakeapi
    user: fakeapi-anonymous
current-context: fakeapi
preferences: {{}}
users:
- name: fakeapi-token
  user:
    token: {token}
- name: fakeapi-cert
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
- name: fakeapi-anonymous
  user: {{}}
"
    )
}

async fn serve_connection(tcp: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
        return;
    };
    // The verifier only lets through certificates signed by our CA.
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    let service = service_fn(move |req| http::handle(shared.clone(), req, client_cert));
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

async fn accept_loop(listener: std::net::TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let Ok(listener) = TcpListener::from_std(listener) else {
        return;
    };
    // Dropping the set (when this task is aborted) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) if connections.len() < MAX_CONNECTIONS => {
                    connections.spawn(serve_connection(tcp, acceptor.clone(), shared.clone()));
                }
                Ok(_) => {}
                // Out of descriptors and the like: let connections finish.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
        }
    }
}

impl FakeApiServer {
    /// Starts a server with the default options.
    pub fn start_new() -> Result<Self, FakeApiError> {
        Self::with_options(FakeApiOptions::default())
    }

    /// Starts a server: certificates, kubeconfig, listener, runtime thread.
    pub fn with_options(options: FakeApiOptions) -> Result<Self, FakeApiError> {
        let pki = make_pki().map_err(|e| FakeApiError::Tls(e.to_string()))?;
        let acceptor = tls_acceptor(&pki)?;
        let listener = bind(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            options.netns.as_deref(),
        )?;
        let addr = listener
            .local_addr()
            .map_err(|e| FakeApiError::io("local address", e))?;
        let random = RandomState::new();
        let token = random_hex(&random, 1);

        static SERVERS: AtomicU64 = AtomicU64::new(0);
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "svcnat-fakeapi-{}-{n}-{}",
            std::process::id(),
            &random_hex(&random, 2)[..8]
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| FakeApiError::io(format!("create {}", dir.display()), e))?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(addr, &pki, &token))
            .map_err(|e| FakeApiError::io(format!("write {}", kubeconfig.display()), e))?;

        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("fakeapi".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        let _ = handle_tx.send(Ok(runtime.handle().clone()));
                        runtime.block_on(async {
                            let _ = shutdown_rx.await;
                        });
                    }
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| FakeApiError::io("spawn the fakeapi thread", e))?;
        let runtime = handle_rx
            .recv()
            .map_err(|e| FakeApiError::Runtime(e.to_string()))?
            .map_err(|e| FakeApiError::io("build the tokio runtime", e))?;

        let start = options.start_resource_version;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(start, options.history_limit)),
            changed: watch::Sender::new(start),
            cut: watch::Sender::new(0),
            closed: watch::Sender::new(0),
            token,
            counters: Mutex::new(BTreeMap::new()),
            unauthorized: AtomicU64::new(0),
            open_watches: AtomicUsize::new(0),
            options,
            addr,
        });
        let server = FakeApiServer {
            shared,
            runtime,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
            acceptor,
            accept_task: Mutex::new(None),
            dir,
            kubeconfig,
            ca_pem: pki.ca_pem,
        };
        server.listen(listener);
        Ok(server)
    }

    fn listen(&self, listener: std::net::TcpListener) {
        let task = self.runtime.spawn(accept_loop(
            listener,
            self.acceptor.clone(),
            self.shared.clone(),
        ));
        *self
            .accept_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task);
    }

    /// The address served (`127.0.0.1:PORT`), the same across [`stop`](Self::stop) and
    /// [`start`](Self::start).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The server URL (`https://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("https://{}", self.shared.addr)
    }

    /// The kubeconfig file: context `fakeapi` (current, bearer token), `fakeapi-cert`
    /// (client certificate), `fakeapi-anonymous` (no credentials).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The bearer token the server accepts.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// The CA certificate (PEM) that signed the server's and the client's certificates.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Creates or updates an object as a client write would (see the module docs);
    /// returns the stored object, with its resource version.
    pub fn apply<K>(&self, object: &K) -> Result<K, FakeApiError>
    where
        K: k8s_openapi::Resource
            + k8s_openapi::serde::Serialize
            + k8s_openapi::serde::de::DeserializeOwned,
    {
        let value = serde_json::to_value(object)
            .map_err(|e| FakeApiError::object(K::KIND, "", format!("does not serialize: {e}")))?;
        let stored = self.apply_json(value)?;
        serde_json::from_value(stored)
            .map_err(|e| FakeApiError::object(K::KIND, "", format!("does not read back: {e}")))
    }

    /// Creates or updates an object given as JSON (with `apiVersion` and `kind`).
    pub fn apply_json(&self, object: Value) -> Result<Value, FakeApiError> {
        let mut store = self.shared.lock();
        let (stored, written) = store.apply(object)?;
        if written {
            self.shared.changed.send_replace(store.rv);
        }
        Ok(stored)
    }

    /// Deletes an object: `kind` as `Service` (or `services`), `namespace` empty for
    /// cluster-scoped kinds. Returns its last state, at the deletion's version.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<Value, FakeApiError> {
        let mut store = self.shared.lock();
        let last = store.delete(kind, namespace, name)?;
        self.shared.changed.send_replace(store.rv);
        Ok(last)
    }

    /// The current resource version (the last write's).
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Forgets the history and ends every open watch: each client's next watch (from a
    /// version it holds) gets `410 Expired`, and paged lists in progress get `410` on
    /// their next page.
    pub fn compact(&self) {
        let mut store = self.shared.lock();
        store.compact();
        drop(store);
        self.shared.closed.send_modify(|n| *n += 1);
    }

    /// Drops every open watch connection mid-stream.
    pub fn cut_watches(&self) {
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Takes the server off the network: the listener closes (connections are refused)
    /// and every connection is dropped. The state stays.
    pub fn stop(&self) -> Result<(), FakeApiError> {
        let task = self
            .accept_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(task) = task else {
            return Ok(());
        };
        task.abort();
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = task.await;
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|e| FakeApiError::Runtime(format!("stopping the listener: {e}")))
    }

    /// Brings the server back on the same port (after [`stop`](Self::stop)).
    pub fn start(&self) -> Result<(), FakeApiError> {
        if self
            .accept_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            return Ok(());
        }
        let listener = bind(self.shared.addr, self.shared.options.netns.as_deref())?;
        self.listen(listener);
        Ok(())
    }

    /// Requests served so far with this verb on this resource (`services`, ...).
    pub fn requests(&self, verb: Verb, resource: &str) -> u64 {
        let counters = self
            .shared
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counters
            .get(&(verb, resource.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Requests turned away with 401.
    pub fn unauthorized_requests(&self) -> u64 {
        self.shared.unauthorized.load(Ordering::Relaxed)
    }

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::Relaxed)
    }
}

/// Binds `addr` in the caller's network namespace, or in `/run/netns/NETNS` from a short-lived
/// thread that enters it (`setns(2)` changes only the calling thread's namespace; the socket
/// stays in the namespace it was made in, whichever thread uses it later).
fn bind(addr: SocketAddr, netns: Option<&str>) -> Result<std::net::TcpListener, FakeApiError> {
    let Some(name) = netns else {
        return bind_here(addr);
    };
    crate::netns::run_in(name, || {
        bind_here(addr).map_err(|e| match e {
            FakeApiError::Io { what, source } => {
                io::Error::new(source.kind(), format!("{what}: {source}"))
            }
            other => io::Error::other(other.to_string()),
        })
    })
    .map_err(|e| FakeApiError::io(format!("bind {addr}"), e))
}

fn bind_here(addr: SocketAddr) -> Result<std::net::TcpListener, FakeApiError> {
    // std sets SO_REUSEADDR, so the port can be bound again right after a stop.
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| FakeApiError::io(format!("bind {addr}"), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| FakeApiError::io(format!("set {addr} non-blocking"), e))?;
    Ok(listener)
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
