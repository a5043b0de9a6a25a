//! The API source of `svcnat-proxy`: kube-rs watchers on a Kubernetes API server, fed into a
//! proxy-only [`Cluster`] through the core's typed input.
//!
//! Two layers, as the rest of svcnat splits them:
//! - [`ApiState`] is pure: [`ApiState::handle`] takes one [`ApiEvent`] (a
//!   [`watcher::Event`] of Services, EndpointSlices or this node's Node, or a watch error)
//!   and applies it to the cluster. It honours the watcher's re-list protocol (an object
//!   not listed again between [`Event::Init`] and [`Event::InitDone`] is deleted, so a
//!   Service deleted while the proxy was disconnected goes away after the re-list), never
//!   deletes anything because of an error, refuses an invalid object without touching the
//!   cluster (its last good version, if any, stays in force, as with manifests), and keeps
//!   the bookkeeping behind kube-proxy's metrics: changes, pending changes, and the earliest
//!   `endpoints.kubernetes.io/last-change-trigger-time` per Service for
//!   `kubeproxy_network_programming_duration_seconds`.
//! - [`ApiSource`] is the plumbing: a tokio runtime on a background thread runs the three
//!   watchers (with kube-rs's default backoff) and a reachability probe, and hands their
//!   events over a bounded channel; [`Source::poll`] drains it into the state on the proxy's
//!   own thread, so the cluster is never shared and the sync never waits on a lock.
//!
//! What is watched is what kube-proxy watches, with kube-proxy's label selector: Services and
//! EndpointSlices in all namespaces without `service.kubernetes.io/headless`, and without
//! `service.kubernetes.io/service-proxy-name` (or, with `--service-proxy-name NAME`, with
//! that label equal to NAME); and this node's Node (`metadata.name=NODE`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use svcnat_core::input::{Changed, InvalidObject};
use svcnat_core::model::{Cluster, ServiceName};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::proxy::{Source, SourceKind, SourceStatus};

/// The label that hands a Service to another proxy (`apis.LabelServiceProxyName`).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label the EndpointSlice controller puts on the slices of headless Services
/// (`v1.IsHeadlessService`).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// When the change behind an EndpointSlice's last update happened (RFC 3339), set by the
/// EndpointSlice controller (`v1.EndpointsLastChangeTriggerTime`).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// How often the proxy loop drains the watchers' events. Draining an empty channel costs
/// nothing, and every millisecond here is a millisecond of network programming latency
/// (a manifest directory is polled less often because each poll stats every file).
pub const API_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Watch events queued for the proxy loop at most. While a long sync runs the watchers
/// stop reading once this many are waiting (the API server buffers the rest; one that
/// gives up on a slow watcher makes it re-list), so memory stays bounded however large a
/// burst is, and the next poll takes the whole backlog at once (a 100,000-event burst at
/// 10,000 Services then takes a handful of syncs).
const CHANNEL_CAPACITY: usize = 16 * 1024;
/// Server-side timeout of one watch request; the watcher then resumes from the last
/// resource version.
const WATCH_TIMEOUT_SECS: u32 = 60;
/// A connection silent for this long is dropped (longer than [`WATCH_TIMEOUT_SECS`], so a
/// quiet but healthy watch always ends on the server's side first).
const READ_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the API server is probed while a watch is failing.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// kube-proxy's label selector for Services and EndpointSlices: none of another proxy's
/// (or, with a proxy name, only that proxy's), and no headless Service's slices.
pub fn label_selector(service_proxy_name: Option<&str>) -> String {
    match service_proxy_name {
        None => format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"),
        Some(name) => format!("{SERVICE_PROXY_NAME_LABEL}={name},!{HEADLESS_LABEL}"),
    }
}

/// Whether an object with these labels is this proxy's, by [`label_selector`]'s rule.
pub fn selected(
    labels: Option<&BTreeMap<String, String>>,
    service_proxy_name: Option<&str>,
) -> bool {
    let get = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    get(HEADLESS_LABEL).is_none() && get(SERVICE_PROXY_NAME_LABEL) == service_proxy_name
}

/// A watched resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// Services, all namespaces.
    Services,
    /// EndpointSlices, all namespaces.
    EndpointSlices,
    /// This node's Node.
    Node,
    /// Pods, all namespaces (cluster DNS's pod records).
    Pods,
}

impl Resource {
    /// Every watched resource.
    pub const ALL: [Resource; 4] = [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Node,
        Resource::Pods,
    ];

    /// The resource's name as the API spells it (`services`, `endpointslices`, `nodes`).
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Services => "services",
            Resource::EndpointSlices => "endpointslices",
            Resource::Node => "nodes",
            Resource::Pods => "pods",
        }
    }

    /// The kind of one object of it.
    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Node => "Node",
            Resource::Pods => "Pod",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the watchers hand to [`ApiState::handle`].
#[derive(Clone, Debug)]
pub enum ApiEvent {
    /// A Service watch event (boxed, as the others: objects are large).
    Service(Box<Event<corev1::Service>>),
    /// An EndpointSlice watch event.
    EndpointSlice(Box<Event<discovery::EndpointSlice>>),
    /// A watch event of this node's Node.
    Node(Box<Event<corev1::Node>>),
    /// A Pod watch event (cluster DNS only).
    Pod(Box<Event<corev1::Pod>>),
    /// A watch failed (the watcher retries with backoff; nothing is deleted).
    WatchError {
        /// Which watch.
        resource: Resource,
        /// The error, with its causes.
        error: String,
        /// When it happened.
        at: SystemTime,
    },
    /// The API server answered a request again (after watch errors).
    Reachable,
}

impl ApiEvent {
    /// A Service watch event.
    pub fn service(event: Event<corev1::Service>) -> ApiEvent {
        ApiEvent::Service(Box::new(event))
    }

    /// An EndpointSlice watch event.
    pub fn slice(event: Event<discovery::EndpointSlice>) -> ApiEvent {
        ApiEvent::EndpointSlice(Box::new(event))
    }

    /// A watch event of this node's Node.
    pub fn node(event: Event<corev1::Node>) -> ApiEvent {
        ApiEvent::Node(Box::new(event))
    }

    /// A Pod watch event.
    pub fn pod(event: Event<corev1::Pod>) -> ApiEvent {
        ApiEvent::Pod(Box::new(event))
    }
}

/// Namespace (empty for a Node) and name of an object.
type Key = (String, String);

fn key_of(md: &ObjectMeta, namespaced: bool) -> Key {
    let ns = if namespaced {
        // As the core's typed input defaults it.
        md.namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_string())
    } else {
        String::new()
    };
    (ns, md.name.clone().unwrap_or_default())
}

/// What a watch of one resource has delivered.
#[derive(Debug, Default)]
struct Tracker {
    /// Objects the API holds as far as we know (applied, valid or not, and not deleted).
    known: BTreeSet<Key>,
    /// Between `Init` and `InitDone`: the objects listed so far.
    listing: Option<BTreeSet<Key>>,
    /// A first complete list has been received.
    listed: bool,
    /// Watch errors so far.
    errors: u64,
}

/// Who follows the API server: what is watched, and which objects are taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ApiRole {
    /// The node proxy, as kube-proxy: Services and EndpointSlices by kube-proxy's label
    /// selector, no headless Services, this node's Node.
    #[default]
    Proxy,
    /// The cluster DNS, as CoreDNS's `kubernetes` plugin: every Service (headless and
    /// ExternalName too, whatever proxy serves them) and EndpointSlice, and with `pods`
    /// every Pod (for `pods verified` records).
    Dns {
        /// Watch Pods too.
        pods: bool,
    },
}

/// Settings of the pure state.
#[derive(Clone, Debug)]
pub struct ApiStateConfig {
    /// Who follows the API server.
    pub role: ApiRole,
    /// This node's name: only its Node is taken.
    pub node_name: String,
    /// `--service-proxy-name`: take only Services (and slices) labelled with it.
    pub service_proxy_name: Option<String>,
    /// When the proxy started: earlier trigger times are not measured (kube-proxy's
    /// `trackerStartTime`), so the first list does not report hours of "latency".
    pub started: SystemTime,
}

/// The cluster as the watch events describe it, and the bookkeeping around it; see the
/// [module](self) docs.
#[derive(Debug)]
pub struct ApiState {
    config: ApiStateConfig,
    cluster: Cluster,
    trackers: BTreeMap<Resource, Tracker>,
    /// Objects refused as invalid, with the message last logged.
    invalid: BTreeMap<(Resource, Key), String>,
    /// Objects with a version in the cluster.
    applied: BTreeSet<(Resource, Key)>,
    invalid_total: u64,
    service_changes: u64,
    endpoint_changes: u64,
    /// Services changed by Service events since the last successful sync.
    services_pending: BTreeSet<ServiceName>,
    /// Services changed by EndpointSlice events since the last successful sync.
    endpoints_pending: BTreeSet<ServiceName>,
    /// The earliest trigger time per Service not programmed yet.
    triggers: BTreeMap<ServiceName, SystemTime>,
    /// Since when the watches fail, and the last error.
    unreachable: Option<(SystemTime, String)>,
    /// The cluster changed since the last [`ApiState::take_changed`].
    dirty: bool,
}

impl ApiState {
    /// An empty, proxy-only cluster that has heard nothing yet.
    pub fn new(config: ApiStateConfig) -> ApiState {
        ApiState {
            config,
            cluster: Cluster::new(),
            trackers: Resource::ALL
                .iter()
                .map(|r| (*r, Tracker::default()))
                .collect(),
            invalid: BTreeMap::new(),
            applied: BTreeSet::new(),
            invalid_total: 0,
            service_changes: 0,
            endpoint_changes: 0,
            services_pending: BTreeSet::new(),
            endpoints_pending: BTreeSet::new(),
            triggers: BTreeMap::new(),
            unreachable: None,
            dirty: false,
        }
    }

    /// The cluster.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Whether Services and EndpointSlices have both been listed once: before that the
    /// cluster is incomplete and programming it would drop rules that are still wanted
    /// (kube-proxy waits for the same two informers).
    pub fn is_listed(&self) -> bool {
        let pods = matches!(self.config.role, ApiRole::Dns { pods: true });
        [Resource::Services, Resource::EndpointSlices]
            .iter()
            .chain(pods.then_some(&Resource::Pods))
            .all(|r| self.trackers.get(r).is_some_and(|t| t.listed))
    }

    /// Objects refused as invalid, as `Kind namespace/name is invalid: field: error`.
    pub fn invalid_objects(&self) -> impl Iterator<Item = &str> {
        self.invalid.values().map(String::as_str)
    }

    /// Whether the cluster changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Since when the watches fail (and the last error), if they do.
    pub fn unreachable_since(&self) -> Option<&(SystemTime, String)> {
        self.unreachable.as_ref()
    }

    /// Takes in one event; returns the Services it changed.
    pub fn handle(&mut self, event: ApiEvent) -> Changed {
        match event {
            ApiEvent::Service(e) => self.handle_watch(*e),
            ApiEvent::EndpointSlice(e) => self.handle_watch(*e),
            ApiEvent::Node(e) => self.handle_watch(*e),
            ApiEvent::Pod(e) => self.handle_watch(*e),
            ApiEvent::WatchError {
                resource,
                error,
                at,
            } => {
                if let Some(t) = self.trackers.get_mut(&resource) {
                    t.errors += 1;
                }
                match &mut self.unreachable {
                    Some((_, last)) => *last = error,
                    None => {
                        warn!(%resource, "watch failed; everything stays in force while it retries: {error}");
                        self.unreachable = Some((at, error));
                    }
                }
                Changed::new()
            }
            ApiEvent::Reachable => {
                self.reachable();
                Changed::new()
            }
        }
    }

    fn reachable(&mut self) {
        if let Some((since, _)) = self.unreachable.take() {
            let secs = SystemTime::now()
                .duration_since(since)
                .unwrap_or_default()
                .as_secs();
            info!(unreachable_for_s = secs, "the API server answers again");
        }
    }

    fn tracker(&mut self, r: Resource) -> &mut Tracker {
        self.trackers.entry(r).or_default()
    }

    fn handle_watch<K: Watched>(&mut self, event: Event<K>) -> Changed {
        let r = K::RESOURCE;
        if !matches!(event, Event::Init) {
            // An object or the end of a list came from the server. (`Init` does not
            // prove it: the watcher emits it before each list attempt.)
            self.reachable();
        }
        match event {
            Event::Init => {
                debug!(resource = %r, "listing");
                self.tracker(r).listing = Some(BTreeSet::new());
                Changed::new()
            }
            Event::InitApply(obj) => {
                let key = obj.key();
                if let Some(l) = &mut self.tracker(r).listing {
                    l.insert(key);
                }
                self.apply(&obj)
            }
            Event::Apply(obj) => self.apply(&obj),
            Event::Delete(obj) => self.delete(r, &obj.key()),
            Event::InitDone => {
                let t = self.tracker(r);
                let listed = t.listing.take().unwrap_or_default();
                let gone: Vec<Key> = t.known.difference(&listed).cloned().collect();
                let first = !std::mem::replace(&mut t.listed, true);
                let mut changed = Changed::new();
                for key in &gone {
                    info!(resource = %r, object = %show(r, key), "gone after a re-list; deleting");
                    changed.extend(self.delete(r, key));
                }
                debug!(resource = %r, objects = listed.len(), first, "listed");
                changed
            }
        }
    }

    /// An object added, changed, or listed.
    fn apply<K: Watched>(&mut self, obj: &K) -> Changed {
        let r = K::RESOURCE;
        let key = obj.key();
        if !obj.wanted(&self.config) {
            // No longer ours (relabelled, or the selector was not applied upstream): as
            // if deleted.
            debug!(resource = %r, object = %show(r, &key), "not this proxy's; ignored");
            return self.delete(r, &key);
        }
        self.tracker(r).known.insert(key.clone());
        match obj.apply_to(&mut self.cluster) {
            Ok(changed) => {
                self.applied.insert((r, key.clone()));
                if self.invalid.remove(&(r, key.clone())).is_some() {
                    info!(resource = %r, object = %show(r, &key), "valid again");
                }
                let trigger = obj.trigger_time().filter(|t| *t > self.config.started);
                self.record(r, &changed, trigger);
                changed
            }
            Err(e) => self.refuse(r, key, &e),
        }
    }

    fn refuse(&mut self, r: Resource, key: Key, e: &InvalidObject) -> Changed {
        self.invalid_total += 1;
        let msg = e.to_string();
        let kept = if self.in_force(r, &key) {
            "its last good version stays in force"
        } else {
            "left out"
        };
        match self.invalid.get(&(r, key.clone())) {
            Some(prev) if *prev == msg => {}
            _ => warn!("{msg} ({kept})"),
        }
        self.invalid.insert((r, key), msg);
        Changed::new()
    }

    /// Whether a version of the object is in the cluster.
    fn in_force(&self, r: Resource, key: &Key) -> bool {
        self.applied.contains(&(r, key.clone()))
    }

    fn delete(&mut self, r: Resource, key: &Key) -> Changed {
        self.tracker(r).known.remove(key);
        self.applied.remove(&(r, key.clone()));
        self.invalid.remove(&(r, key.clone()));
        let (ns, name) = key;
        let changed = match r {
            Resource::Services => self.cluster.delete_service(ns, name),
            Resource::EndpointSlices => self.cluster.delete_endpoint_slice(ns, name),
            Resource::Node => self.cluster.delete_node(name),
            Resource::Pods => self.cluster.delete_pod(ns, name),
        };
        self.record(r, &changed, None);
        changed
    }

    /// Counts a change and remembers what the next sync programs.
    fn record(&mut self, r: Resource, changed: &Changed, trigger: Option<SystemTime>) {
        if changed.is_empty() {
            return;
        }
        self.dirty = true;
        match r {
            Resource::Services => {
                self.service_changes += 1;
                self.services_pending.extend(changed.iter().cloned());
            }
            Resource::EndpointSlices => {
                self.endpoint_changes += 1;
                self.endpoints_pending.extend(changed.iter().cloned());
            }
            Resource::Node | Resource::Pods => {}
        }
        if let Some(t) = trigger {
            for svc in changed {
                self.triggers
                    .entry(svc.clone())
                    .and_modify(|e| *e = (*e).min(t))
                    .or_insert(t);
            }
        }
    }

    /// The earliest trigger time per Service of the changes not programmed yet.
    pub fn pending_triggers(&self) -> &BTreeMap<ServiceName, SystemTime> {
        &self.triggers
    }

    /// After a successful sync: everything applied so far is programmed; returns the
    /// trigger times of what it programmed (one per Service) and clears the pending changes.
    pub fn take_programmed(&mut self) -> Vec<SystemTime> {
        self.services_pending.clear();
        self.endpoints_pending.clear();
        std::mem::take(&mut self.triggers).into_values().collect()
    }

    /// Counters and state for metrics and health.
    pub fn status(&self) -> SourceStatus {
        let mut s = SourceStatus::new(SourceKind::Api);
        s.problems = self.invalid.len();
        s.invalid_total = self.invalid_total;
        s.service_changes = Some(self.service_changes);
        s.endpoint_changes = Some(self.endpoint_changes);
        s.service_changes_pending = self.services_pending.len();
        s.endpoint_changes_pending = self.endpoints_pending.len();
        s.watch_errors = self
            .trackers
            .iter()
            .map(|(r, t)| (r.as_str(), t.errors))
            .collect();
        s.unreachable_since = self.unreachable.clone();
        if !self.is_listed() {
            let waiting: Vec<&str> = [Resource::Services, Resource::EndpointSlices]
                .iter()
                .filter(|r| !self.trackers.get(r).is_some_and(|t| t.listed))
                .map(|r| r.as_str())
                .collect();
            s.waiting_for = Some(format!("the first list of {}", waiting.join(" and ")));
        }
        s
    }
}

impl Source for ApiState {
    fn poll(&mut self) -> Result<bool, String> {
        Ok(self.take_changed())
    }

    fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn is_ready(&self) -> bool {
        self.is_listed()
    }

    fn status(&self) -> SourceStatus {
        ApiState::status(self)
    }

    fn take_programmed(&mut self) -> Vec<SystemTime> {
        ApiState::take_programmed(self)
    }

    fn describe(&self) -> String {
        "the API server".into()
    }
}

/// `Kind namespace/name`, or `Kind name` for a cluster-scoped object.
fn show(r: Resource, (ns, name): &Key) -> String {
    if ns.is_empty() {
        format!("{} {name}", r.kind())
    } else {
        format!("{} {ns}/{name}", r.kind())
    }
}

/// A watched object type and how it enters the cluster.
trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + fmt::Debug
    + k8s_openapi::serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Which resource.
    const RESOURCE: Resource;
    /// Its key.
    fn key(&self) -> Key;
    /// Whether this proxy takes it.
    fn wanted(&self, config: &ApiStateConfig) -> bool;
    /// Applies it.
    fn apply_to(&self, cluster: &mut Cluster) -> Result<Changed, InvalidObject>;
    /// Its `last-change-trigger-time`, if it has a valid one.
    fn trigger_time(&self) -> Option<SystemTime> {
        None
    }
    /// Wraps a watch event.
    fn wrap(event: Event<Self>) -> ApiEvent;
}

impl Watched for corev1::Service {
    const RESOURCE: Resource = Resource::Services;

    fn key(&self) -> Key {
        key_of(&self.metadata, true)
    }

    fn wanted(&self, config: &ApiStateConfig) -> bool {
        if let ApiRole::Dns { .. } = config.role {
            // Cluster DNS answers for every Service, headless ones above all.
            return true;
        }
        // kube-proxy skips headless Services (`clusterIP: None`); so does the plan.
        let headless = self
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref())
            .is_some_and(|ip| ip == "None");
        !headless
            && selected(
                self.metadata.labels.as_ref(),
                config.service_proxy_name.as_deref(),
            )
    }

    fn apply_to(&self, cluster: &mut Cluster) -> Result<Changed, InvalidObject> {
        cluster.apply_service(self)
    }

    fn wrap(event: Event<Self>) -> ApiEvent {
        ApiEvent::service(event)
    }
}

impl Watched for discovery::EndpointSlice {
    const RESOURCE: Resource = Resource::EndpointSlices;

    fn key(&self) -> Key {
        key_of(&self.metadata, true)
    }

    fn wanted(&self, config: &ApiStateConfig) -> bool {
        config.role != ApiRole::Proxy
            || selected(
                self.metadata.labels.as_ref(),
                config.service_proxy_name.as_deref(),
            )
    }

    fn apply_to(&self, cluster: &mut Cluster) -> Result<Changed, InvalidObject> {
        cluster.apply_endpoint_slice(self)
    }

    fn trigger_time(&self) -> Option<SystemTime> {
        let text = self
            .metadata
            .annotations
            .as_ref()?
            .get(TRIGGER_TIME_ANNOTATION)?;
        match text.parse::<k8s_openapi::jiff::Timestamp>() {
            Ok(t) => Some(SystemTime::from(t)),
            Err(e) => {
                let (ns, name) = self.key();
                debug!(slice = %format!("{ns}/{name}"), "bad {TRIGGER_TIME_ANNOTATION} {text:?}: {e}");
                None
            }
        }
    }

    fn wrap(event: Event<Self>) -> ApiEvent {
        ApiEvent::slice(event)
    }
}

impl Watched for corev1::Node {
    const RESOURCE: Resource = Resource::Node;

    fn key(&self) -> Key {
        key_of(&self.metadata, false)
    }

    fn wanted(&self, config: &ApiStateConfig) -> bool {
        self.metadata.name.as_deref() == Some(config.node_name.as_str())
    }

    fn apply_to(&self, cluster: &mut Cluster) -> Result<Changed, InvalidObject> {
        // Stored for what reads Nodes; the plan itself reads none (its node is the
        // NodeContext), so a Node change alone needs no sync.
        cluster.apply_node(self)
    }

    fn wrap(event: Event<Self>) -> ApiEvent {
        ApiEvent::node(event)
    }
}

impl Watched for corev1::Pod {
    const RESOURCE: Resource = Resource::Pods;

    fn key(&self) -> Key {
        key_of(&self.metadata, true)
    }

    fn wanted(&self, config: &ApiStateConfig) -> bool {
        matches!(config.role, ApiRole::Dns { pods: true })
    }

    fn apply_to(&self, cluster: &mut Cluster) -> Result<Changed, InvalidObject> {
        // A proxy-only cluster stores Pods for DNS and views; they never become endpoints.
        cluster.apply_pod(self)
    }

    fn wrap(event: Event<Self>) -> ApiEvent {
        ApiEvent::pod(event)
    }
}

// ---------------------------------------------------------------------------------------------
// The plumbing
// ---------------------------------------------------------------------------------------------

/// Where the API client's configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientSource {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The Pod's service account (`KUBERNETES_SERVICE_HOST`/`PORT` and
    /// `/var/run/secrets/kubernetes.io/serviceaccount/`).
    InCluster,
}

/// The service account token an in-cluster client authenticates with.
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Whether this process runs in a Pod that can reach its API server: the environment
/// variables and the service account token are there.
pub fn in_cluster_available() -> bool {
    let set = |v: &str| std::env::var(v).is_ok_and(|s| !s.is_empty());
    set("KUBERNETES_SERVICE_HOST")
        && set("KUBERNETES_SERVICE_PORT")
        && std::path::Path::new(SERVICE_ACCOUNT_TOKEN).is_file()
}

/// Settings of an [`ApiSource`].
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// How to reach the API server.
    pub client: ClientSource,
    /// This node's name (its Node is watched).
    pub node_name: String,
    /// `--service-proxy-name`.
    pub service_proxy_name: Option<String>,
    /// Who follows the API server (what is watched).
    pub role: ApiRole,
}

/// Why an [`ApiSource`] cannot start.
#[derive(Debug)]
#[non_exhaustive]
pub enum ApiError {
    /// The kubeconfig file cannot be read or used.
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        error: String,
    },
    /// The in-cluster configuration is not usable.
    InCluster(String),
    /// The client, its runtime or its thread cannot be made.
    Client(String),
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Kubeconfig { path, error } => {
                write!(f, "kubeconfig {}: {error}", path.display())
            }
            ApiError::InCluster(e) => write!(f, "in-cluster configuration: {e}"),
            ApiError::Client(e) => write!(f, "API client: {e}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// An error and its causes on one line, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Loads the client configuration.
async fn client_config(source: &ClientSource) -> Result<kube::Config, ApiError> {
    let mut config = match source {
        ClientSource::Kubeconfig(path) => {
            let bad = |error: String| ApiError::Kubeconfig {
                path: path.clone(),
                error,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(chain(&e)))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| bad(chain(&e)))?
        }
        ClientSource::InCluster => {
            kube::Config::incluster().map_err(|e| ApiError::InCluster(chain(&e)))?
        }
    };
    config.read_timeout = Some(READ_TIMEOUT);
    Ok(config)
}

/// The watchers on a background thread, and the state they feed; see the [module](self)
/// docs. Dropping it stops the watchers.
#[derive(Debug)]
pub struct ApiSource {
    state: ApiState,
    /// Bounded at [`CHANNEL_CAPACITY`] events (memory stays bounded under any burst); the
    /// next poll takes the whole backlog into one sync.
    rx: mpsc::Receiver<ApiEvent>,
    stop: Option<oneshot::Sender<()>>,
    worker: Option<thread::JoinHandle<()>>,
    server: String,
}

impl ApiSource {
    /// Loads the client configuration and starts watching. An API server that does not
    /// answer is no error here: the watchers retry, and the proxy syncs nothing until
    /// Services and EndpointSlices have been listed.
    pub fn start(config: ApiConfig) -> Result<ApiSource, ApiError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ApiError::Client(format!("tokio runtime: {e}")))?;
        let client_config = runtime.block_on(client_config(&config.client))?;
        let server = client_config.cluster_url.to_string();
        let client = {
            let _guard = runtime.enter();
            kube::Client::try_from(client_config).map_err(|e| ApiError::Client(chain(&e)))?
        };
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (stop, stopped) = oneshot::channel();
        let watch = Watch {
            client,
            node_name: config.node_name.clone(),
            selector: match config.role {
                ApiRole::Proxy => label_selector(config.service_proxy_name.as_deref()),
                ApiRole::Dns { .. } => String::new(),
            },
            role: config.role,
            tx,
        };
        info!(server = %server, selector = %watch.selector, node = %watch.node_name, "watching the API server");
        let worker = thread::Builder::new()
            .name("svcnat-api".into())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        _ = stopped => {}
                        () = watch.run() => {}
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| ApiError::Client(format!("cannot start the watcher thread: {e}")))?;
        Ok(ApiSource {
            state: ApiState::new(ApiStateConfig {
                role: config.role,
                node_name: config.node_name,
                service_proxy_name: config.service_proxy_name,
                started: SystemTime::now(),
            }),
            rx,
            stop: Some(stop),
            worker: Some(worker),
            server,
        })
    }

    /// The pure state.
    pub fn state(&self) -> &ApiState {
        &self.state
    }
}

impl Drop for ApiSource {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Source for ApiSource {
    fn poll(&mut self) -> Result<bool, String> {
        // What is queued now (the backlog of a long sync included), and no more: a flood
        // still lets the loop sync.
        for _ in 0..self.rx.len().max(1) {
            match self.rx.try_recv() {
                Ok(event) => {
                    self.state.handle(event);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Err("the API watchers stopped".into());
                }
            }
        }
        Ok(self.state.take_changed())
    }

    fn cluster(&self) -> &Cluster {
        self.state.cluster()
    }

    fn is_ready(&self) -> bool {
        self.state.is_listed()
    }

    fn status(&self) -> SourceStatus {
        self.state.status()
    }

    fn take_programmed(&mut self) -> Vec<SystemTime> {
        self.state.take_programmed()
    }

    fn describe(&self) -> String {
        format!("the API server {}", self.server)
    }
}

/// Whether some watch fails, a wake-up for the probe when one starts to, and a signal
/// from the probe to the watchers once the API server answers again.
#[derive(Debug)]
struct Failing {
    flag: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
    /// Bumped each time the probe sees the API server answer after an outage.
    recovered: tokio::sync::watch::Sender<u64>,
}

impl Default for Failing {
    fn default() -> Failing {
        Failing {
            flag: std::sync::atomic::AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
            recovered: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Failing {
    fn set(&self) {
        if !self.flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.notify.notify_one();
        }
    }

    /// The probe got an answer: watchers waiting out a backoff start over now.
    fn clear(&self) {
        self.flag.store(false, std::sync::atomic::Ordering::SeqCst);
        self.recovered.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The async half: three watchers and a probe, all sending into one channel.
struct Watch {
    client: kube::Client,
    node_name: String,
    selector: String,
    role: ApiRole,
    tx: mpsc::Sender<ApiEvent>,
}

impl Watch {
    async fn run(self) {
        let labelled = watcher::Config::default()
            .labels(&self.selector)
            .timeout(WATCH_TIMEOUT_SECS);
        let node = watcher::Config::default()
            .fields(&format!("metadata.name={}", self.node_name))
            .timeout(WATCH_TIMEOUT_SECS);
        let failing = std::sync::Arc::new(Failing::default());
        let services = forward::<corev1::Service>(
            kube::Api::all(self.client.clone()),
            labelled.clone(),
            self.tx.clone(),
            &failing,
        );
        let slices = forward::<discovery::EndpointSlice>(
            kube::Api::all(self.client.clone()),
            labelled,
            self.tx.clone(),
            &failing,
        );
        // The proxy watches its own Node; cluster DNS may watch every Pod instead.
        let nodes = async {
            if self.role == ApiRole::Proxy {
                forward::<corev1::Node>(
                    kube::Api::all(self.client.clone()),
                    node,
                    self.tx.clone(),
                    &failing,
                )
                .await;
            }
        };
        let pods = async {
            if self.role == (ApiRole::Dns { pods: true }) {
                forward::<corev1::Pod>(
                    kube::Api::all(self.client.clone()),
                    watcher::Config::default().timeout(WATCH_TIMEOUT_SECS),
                    self.tx.clone(),
                    &failing,
                )
                .await;
            }
        };
        let probe = probe(self.client.clone(), self.tx.clone(), &failing);
        futures::join!(services, slices, nodes, pods, probe);
    }
}

/// Runs one watcher (kube-rs's default backoff between failures, as client-go's: 0.8 s
/// doubling to 30 s) and sends its events until the receiver is gone. A watcher waiting out
/// its backoff starts over (a fresh list and watch) as soon as the probe sees the API server
/// answer again: after an outage the proxy catches up within one probe interval instead of
/// the backoff it grew meanwhile, while a server that stays down still sees few requests.
/// A watcher restarted once that fails again without a single event in between (say, a
/// 403 on one resource while the probe's Services answer) stays in its backoff.
async fn forward<K: Watched>(
    api: kube::Api<K>,
    config: watcher::Config,
    tx: mpsc::Sender<ApiEvent>,
    failing: &Failing,
) {
    let start = || Box::pin(watcher::watcher(api.clone(), config.clone()).default_backoff());
    let mut stream = start();
    let mut recovered = failing.recovered.subscribe();
    let mut in_error = false;
    let mut restarted = false;
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            changed = recovered.changed() => {
                if changed.is_ok() && in_error && !restarted {
                    info!(resource = %K::RESOURCE, "API server answers again; watching anew");
                    stream = start();
                    (in_error, restarted) = (false, true);
                }
                continue;
            }
        };
        let Some(item) = item else { return };
        in_error = item.is_err();
        restarted &= in_error;
        let event = match item {
            Ok(e) => K::wrap(e),
            // "410 Gone / Expired": the server answered, our resourceVersion is too old; the
            // watcher re-lists. Not an outage: nothing to report as unreachable.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                debug!(resource = %K::RESOURCE, "resourceVersion expired (410); re-listing");
                in_error = false;
                continue;
            }
            Err(e) => {
                failing.set();
                ApiEvent::WatchError {
                    resource: K::RESOURCE,
                    error: chain(&e),
                    at: SystemTime::now(),
                }
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// While a watch fails, asks the API server for one Service every [`PROBE_INTERVAL`]
/// and reports [`ApiEvent::Reachable`] once it answers: a watch that resumes quietly
/// sends no event of its own.
async fn probe(client: kube::Client, tx: mpsc::Sender<ApiEvent>, failing: &Failing) {
    let api: kube::Api<corev1::Service> = kube::Api::all(client);
    let params = kube::api::ListParams::default().limit(1);
    loop {
        if !failing.flag.load(std::sync::atomic::Ordering::SeqCst) {
            failing.notify.notified().await;
            continue;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
        match api.list_metadata(&params).await {
            Ok(_) => {
                failing.clear();
                if tx.send(ApiEvent::Reachable).await.is_err() {
                    return;
                }
            }
            Err(e) => debug!("API probe: {}", chain(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use serde_json::json;

    const T0: Duration = Duration::from_secs(1_700_000_000);

    fn state(proxy_name: Option<&str>) -> ApiState {
        ApiState::new(ApiStateConfig {
            role: ApiRole::Proxy,
            node_name: "node-1".into(),
            service_proxy_name: proxy_name.map(String::from),
            started: UNIX_EPOCH + T0,
        })
    }

    use std::time::UNIX_EPOCH;

    fn svc_with(name: &str, ip: &str, port: u32, labels: serde_json::Value) -> corev1::Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "labels": labels},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"port": port}]}
        }))
        .unwrap()
    }

    fn svc(name: &str, ip: &str) -> corev1::Service {
        svc_with(name, ip, 80, json!({}))
    }

    fn slice_with(
        name: &str,
        service: &str,
        ip: &str,
        labels: serde_json::Value,
        trigger: Option<&str>,
    ) -> discovery::EndpointSlice {
        let mut labels = labels;
        labels[SERVICE_NAME_LABEL_KEY] = json!(service);
        let annotations = match trigger {
            Some(t) => json!({ TRIGGER_TIME_ANNOTATION: t }),
            None => json!({}),
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "labels": labels, "annotations": annotations},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}]
        }))
        .unwrap()
    }

    const SERVICE_NAME_LABEL_KEY: &str = svcnat_core::model::SERVICE_NAME_LABEL;

    fn slice(name: &str, service: &str, ip: &str) -> discovery::EndpointSlice {
        slice_with(name, service, ip, json!({}), None)
    }

    fn names(c: &Cluster) -> Vec<String> {
        c.services().map(|s| s.name.name.clone()).collect()
    }

    fn slices_of(c: &Cluster, svc: &str) -> Vec<String> {
        c.slices_of(&ServiceName::new("ns", svc))
            .map(|s| s.name.clone())
            .collect()
    }

    fn list(
        st: &mut ApiState,
        services: Vec<corev1::Service>,
        slices: Vec<discovery::EndpointSlice>,
    ) -> Changed {
        let mut changed = Changed::new();
        st.handle(ApiEvent::service(Event::Init));
        for s in services {
            changed.extend(st.handle(ApiEvent::service(Event::InitApply(s))));
        }
        changed.extend(st.handle(ApiEvent::service(Event::InitDone)));
        st.handle(ApiEvent::slice(Event::Init));
        for s in slices {
            changed.extend(st.handle(ApiEvent::slice(Event::InitApply(s))));
        }
        changed.extend(st.handle(ApiEvent::slice(Event::InitDone)));
        changed
    }

    fn error(resource: Resource, secs: u64) -> ApiEvent {
        ApiEvent::WatchError {
            resource,
            error: "connection refused".into(),
            at: UNIX_EPOCH + T0 + Duration::from_secs(secs),
        }
    }

    #[test]
    fn nothing_is_ready_before_services_and_slices_are_listed() {
        let mut st = state(None);
        assert!(!st.is_listed());
        st.handle(ApiEvent::service(Event::Init));
        st.handle(ApiEvent::service(Event::InitApply(svc("a", "10.96.0.1"))));
        assert!(!st.is_listed());
        assert_eq!(
            st.status().waiting_for.as_deref(),
            Some("the first list of services and endpointslices")
        );
        st.handle(ApiEvent::service(Event::InitDone));
        assert_eq!(
            st.status().waiting_for.as_deref(),
            Some("the first list of endpointslices")
        );
        // The Node does not gate the first sync.
        st.handle(ApiEvent::slice(Event::Init));
        st.handle(ApiEvent::slice(Event::InitDone));
        assert!(st.is_listed());
        assert_eq!(st.status().waiting_for, None);
        assert_eq!(names(st.cluster()), ["a"]);
    }

    #[test]
    fn a_relist_deletes_only_what_vanished() {
        let mut st = state(None);
        list(
            &mut st,
            vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")],
            vec![
                slice("a-1", "a", "10.244.0.1"),
                slice("b-1", "b", "10.244.0.2"),
            ],
        );
        st.handle(ApiEvent::service(Event::Apply(svc("c", "10.96.0.3"))));
        assert!(st.take_changed());
        assert_eq!(names(st.cluster()), ["a", "b", "c"]);

        // The API goes away: nothing is deleted, however long it lasts.
        for r in Resource::ALL {
            assert!(st.handle(error(r, 5)).is_empty());
        }
        assert!(!st.take_changed());
        assert_eq!(names(st.cluster()), ["a", "b", "c"]);
        let status = st.status();
        assert_eq!(
            status.unreachable_since,
            Some((
                UNIX_EPOCH + T0 + Duration::from_secs(5),
                "connection refused".into()
            ))
        );
        assert_eq!(status.watch_errors["services"], 1);

        // Back, with a re-list: b and slice b-1 were deleted meanwhile.
        st.handle(ApiEvent::service(Event::Init));
        assert!(
            st.status().unreachable_since.is_some(),
            "Init precedes every list attempt, failed or not"
        );
        st.handle(ApiEvent::service(Event::InitApply(svc("a", "10.96.0.1"))));
        assert_eq!(
            st.status().unreachable_since,
            None,
            "an object means the API answers"
        );
        st.handle(ApiEvent::service(Event::InitApply(svc("c", "10.96.0.3"))));
        // Until InitDone, nothing is deleted.
        assert_eq!(names(st.cluster()), ["a", "b", "c"]);
        let changed = st.handle(ApiEvent::service(Event::InitDone));
        assert_eq!(changed, Changed::from([ServiceName::new("ns", "b")]));
        assert_eq!(names(st.cluster()), ["a", "c"]);

        st.handle(ApiEvent::slice(Event::Init));
        st.handle(ApiEvent::slice(Event::InitApply(slice(
            "a-1",
            "a",
            "10.244.0.1",
        ))));
        assert_eq!(slices_of(st.cluster(), "b"), ["b-1"]);
        st.handle(ApiEvent::slice(Event::InitDone));
        assert!(slices_of(st.cluster(), "b").is_empty());
        assert_eq!(slices_of(st.cluster(), "a"), ["a-1"]);

        // An interrupted re-list forgets what it saw: the next one starts afresh.
        st.handle(ApiEvent::service(Event::Init));
        st.handle(ApiEvent::service(Event::InitApply(svc("a", "10.96.0.1"))));
        st.handle(error(Resource::Services, 9));
        st.handle(ApiEvent::service(Event::Init));
        st.handle(ApiEvent::service(Event::InitApply(svc("c", "10.96.0.3"))));
        st.handle(ApiEvent::service(Event::InitDone));
        assert_eq!(names(st.cluster()), ["c"]);
    }

    #[test]
    fn an_invalid_object_is_refused_without_touching_the_cluster() {
        let mut st = state(None);
        list(&mut st, vec![svc("a", "10.96.0.1")], vec![]);
        st.take_changed();
        let generation = st.cluster().generation();

        // A bad version of a: refused, its last good version stays.
        let bad = svc_with("a", "10.96.0.1", 70000, json!({}));
        assert!(st.handle(ApiEvent::service(Event::Apply(bad))).is_empty());
        assert_eq!(st.cluster().generation(), generation);
        assert!(!st.take_changed());
        let a = st.cluster().service(&ServiceName::new("ns", "a")).unwrap();
        assert_eq!(a.ports[0].port, 80);
        let invalid: Vec<&str> = st.invalid_objects().collect();
        assert_eq!(invalid.len(), 1);
        assert!(
            invalid[0].starts_with("Service ns/a is invalid: spec.ports[0].port: "),
            "{invalid:?}"
        );

        // A bad new object and a good one: the good one is taken.
        let bad_d = svc_with("d", "10.96.0.4", 0, json!({}));
        st.handle(ApiEvent::service(Event::Apply(bad_d)));
        st.handle(ApiEvent::service(Event::Apply(svc("e", "10.96.0.5"))));
        assert_eq!(names(st.cluster()), ["a", "e"]);
        let status = st.status();
        assert_eq!((status.problems, status.invalid_total), (2, 2));

        // A bad slice next to a good one.
        let bad_slice = slice("a-bad", "a", "10.244.0.300");
        st.handle(ApiEvent::slice(Event::Apply(bad_slice)));
        st.handle(ApiEvent::slice(Event::Apply(slice(
            "a-1",
            "a",
            "10.244.0.1",
        ))));
        assert_eq!(slices_of(st.cluster(), "a"), ["a-1"]);
        assert_eq!(st.status().problems, 3);

        // Fixed, or deleted: no longer a problem.
        st.handle(ApiEvent::service(Event::Apply(svc_with(
            "a",
            "10.96.0.1",
            81,
            json!({}),
        ))));
        assert_eq!(
            st.cluster()
                .service(&ServiceName::new("ns", "a"))
                .unwrap()
                .ports[0]
                .port,
            81
        );
        st.handle(ApiEvent::service(Event::Delete(svc("d", "10.96.0.4"))));
        assert_eq!(st.status().problems, 1);
        assert_eq!(st.status().invalid_total, 3);
    }

    #[test]
    fn a_slice_moving_between_services_leaves_the_old_one() {
        let mut st = state(None);
        list(
            &mut st,
            vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")],
            vec![slice("s-1", "a", "10.244.0.1")],
        );
        assert_eq!(slices_of(st.cluster(), "a"), ["s-1"]);
        let changed = st.handle(ApiEvent::slice(Event::Apply(slice(
            "s-1",
            "b",
            "10.244.0.1",
        ))));
        assert_eq!(
            changed,
            Changed::from([ServiceName::new("ns", "a"), ServiceName::new("ns", "b")])
        );
        assert!(slices_of(st.cluster(), "a").is_empty());
        assert_eq!(slices_of(st.cluster(), "b"), ["s-1"]);
        // Deleted by name, wherever it is now.
        st.handle(ApiEvent::slice(Event::Delete(slice(
            "s-1",
            "a",
            "10.244.0.1",
        ))));
        assert!(slices_of(st.cluster(), "b").is_empty());
    }

    #[test]
    fn the_service_proxy_name_label_decides_whose_services_these_are() {
        assert_eq!(
            label_selector(None),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
        assert_eq!(
            label_selector(Some("svcnat")),
            "service.kubernetes.io/service-proxy-name=svcnat,!service.kubernetes.io/headless"
        );
        let other = json!({ SERVICE_PROXY_NAME_LABEL: "other" });
        let ours = json!({ SERVICE_PROXY_NAME_LABEL: "svcnat" });

        // Default: only Services without the label.
        let mut st = state(None);
        list(
            &mut st,
            vec![
                svc("plain", "10.96.0.1"),
                svc_with("theirs", "10.96.0.2", 80, other.clone()),
            ],
            vec![],
        );
        assert_eq!(names(st.cluster()), ["plain"]);
        // Relabelled for another proxy: as if deleted.
        let changed = st.handle(ApiEvent::service(Event::Apply(svc_with(
            "plain",
            "10.96.0.1",
            80,
            other.clone(),
        ))));
        assert_eq!(changed.len(), 1);
        assert!(names(st.cluster()).is_empty());

        // With a proxy name: only Services labelled with it, and their slices.
        let mut st = state(Some("svcnat"));
        list(
            &mut st,
            vec![
                svc("plain", "10.96.0.1"),
                svc_with("theirs", "10.96.0.2", 80, other.clone()),
                svc_with("ours", "10.96.0.3", 80, ours.clone()),
            ],
            vec![
                slice_with("ours-1", "ours", "10.244.0.3", ours.clone(), None),
                slice("plain-1", "plain", "10.244.0.1"),
            ],
        );
        assert_eq!(names(st.cluster()), ["ours"]);
        assert_eq!(slices_of(st.cluster(), "ours"), ["ours-1"]);
        assert!(slices_of(st.cluster(), "plain").is_empty());

        // Headless Services, and the slices the controller marks headless, are skipped.
        let mut st = state(None);
        list(
            &mut st,
            vec![svc("db", "None")],
            vec![slice_with(
                "db-1",
                "db",
                "10.244.0.9",
                json!({ HEADLESS_LABEL: "" }),
                None,
            )],
        );
        assert!(names(st.cluster()).is_empty());
        assert!(slices_of(st.cluster(), "db").is_empty());
        assert_eq!(st.status().problems, 0);
    }

    fn rfc3339(secs_after_start: i64) -> String {
        let t = k8s_openapi::jiff::Timestamp::from_second(T0.as_secs() as i64 + secs_after_start)
            .unwrap();
        t.to_string()
    }

    #[test]
    fn trigger_times_keep_the_earliest_pending_change_per_service() {
        let mut st = state(None);
        list(
            &mut st,
            vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")],
            // Listed at start with a trigger from before the proxy started: not measured.
            vec![slice_with(
                "a-1",
                "a",
                "10.244.0.1",
                json!({}),
                Some(&rfc3339(-3600)),
            )],
        );
        assert!(st.pending_triggers().is_empty());
        let status = st.status();
        assert_eq!(status.service_changes, Some(2));
        assert_eq!(status.endpoint_changes, Some(1));

        let at = |s: i64| UNIX_EPOCH + T0 + Duration::from_secs(s as u64);
        let ev = |name: &str, svc: &str, ip: &str, t: i64| {
            ApiEvent::slice(Event::Apply(slice_with(
                name,
                svc,
                ip,
                json!({}),
                Some(&rfc3339(t)),
            )))
        };
        st.handle(ev("a-1", "a", "10.244.0.2", 10));
        st.handle(ev("a-1", "a", "10.244.0.3", 12));
        st.handle(ev("b-1", "b", "10.244.0.4", 11));
        // The same object again changes nothing: no change, no trigger.
        st.handle(ev("b-1", "b", "10.244.0.4", 5));
        // A bad annotation is no trigger, but the change counts.
        st.handle(ApiEvent::slice(Event::Apply(slice_with(
            "b-2",
            "b",
            "10.244.0.5",
            json!({}),
            Some("yesterday"),
        ))));
        let pending: Vec<(String, SystemTime)> = st
            .pending_triggers()
            .iter()
            .map(|(k, v)| (k.name.clone(), *v))
            .collect();
        assert_eq!(pending, [("a".into(), at(10)), ("b".into(), at(11))]);
        let status = st.status();
        assert_eq!(status.endpoint_changes, Some(5));
        assert_eq!(status.endpoint_changes_pending, 2);
        assert_eq!(status.service_changes_pending, 2);

        let mut programmed = st.take_programmed();
        programmed.sort();
        assert_eq!(programmed, [at(10), at(11)]);
        assert!(st.take_programmed().is_empty());
        let status = st.status();
        assert_eq!(
            (
                status.endpoint_changes_pending,
                status.service_changes_pending
            ),
            (0, 0)
        );
    }

    #[test]
    fn only_this_nodes_node_is_taken() {
        let node = |name: &str| -> corev1::Node {
            serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
        };
        let mut st = state(None);
        st.handle(ApiEvent::node(Event::Init));
        st.handle(ApiEvent::node(Event::InitApply(node("node-1"))));
        st.handle(ApiEvent::node(Event::InitApply(node("node-2"))));
        st.handle(ApiEvent::node(Event::InitDone));
        let nodes: Vec<&str> = st.cluster().nodes().map(|n| n.name.as_str()).collect();
        assert_eq!(nodes, ["node-1"]);
        st.handle(ApiEvent::node(Event::Delete(node("node-1"))));
        assert_eq!(st.cluster().nodes().count(), 0);
    }

    #[test]
    fn the_probe_clears_unreachable() {
        let mut st = state(None);
        st.handle(error(Resource::EndpointSlices, 1));
        st.handle(error(Resource::EndpointSlices, 3));
        let (since, last) = st.unreachable_since().cloned().unwrap();
        assert_eq!(since, UNIX_EPOCH + T0 + Duration::from_secs(1));
        assert_eq!(last, "connection refused");
        st.handle(ApiEvent::Reachable);
        assert!(st.unreachable_since().is_none());
        assert_eq!(st.status().watch_errors["endpointslices"], 2);
    }

    /// A kubeconfig for `server`, in a file removed on drop.
    struct TempKubeconfig(PathBuf);

    impl TempKubeconfig {
        fn new(server: &str) -> TempKubeconfig {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "svcnat-api-kubeconfig-{}-{}.yaml",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ));
            let text = format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{server}\"}}\nusers:\n- name: u\n  user: {{token: t}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n"
            );
            std::fs::write(&path, text).unwrap();
            TempKubeconfig(path)
        }
    }

    impl Drop for TempKubeconfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_missing_kubeconfig_is_named() {
        let err = ApiSource::start(ApiConfig {
            role: ApiRole::Proxy,
            client: ClientSource::Kubeconfig("/nonexistent/kubeconfig".into()),
            node_name: "n1".into(),
            service_proxy_name: None,
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("kubeconfig /nonexistent/kubeconfig: "),
            "{err}"
        );
    }

    #[test]
    fn an_unreachable_api_server_is_reported_and_nothing_is_ready() {
        // A loopback port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let kc = TempKubeconfig::new(&format!("http://127.0.0.1:{port}"));
        let mut source = ApiSource::start(ApiConfig {
            role: ApiRole::Proxy,
            client: ClientSource::Kubeconfig(kc.0.clone()),
            node_name: "n1".into(),
            service_proxy_name: None,
        })
        .unwrap();
        assert!(source.describe().contains(&format!("127.0.0.1:{port}")));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while source.state().unreachable_since().is_none() && std::time::Instant::now() < deadline {
            assert_eq!(source.poll(), Ok(false));
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = source.status();
        let (_, error) = status.unreachable_since.clone().unwrap();
        assert!(error.contains("Connection refused"), "{error}");
        assert!(!source.is_ready());
        assert!(status.watch_errors.values().sum::<u64>() >= 1, "{status:?}");
        assert_eq!(source.cluster().services().count(), 0);
        // Dropping the source stops its thread promptly.
        let t = std::time::Instant::now();
        drop(source);
        assert!(t.elapsed() < Duration::from_secs(3));
    }
}
