//! Loading Kubernetes manifests: multi-document YAML or JSON in, a validated [`Cluster`]
//! out.
//!
//! Documents are decoded with the Kubernetes API types from `k8s-openapi`, so real
//! manifests load unchanged. YAML is read with `serde_yaml_ng` (a maintained fork of the
//! archived `serde_yaml`, with the same data model and error locations); a file whose name
//! ends in `.json` is read with `serde_json` as one object, a `List`, or a stream of
//! objects, as kubectl reads it. Decoding is strict, like kubectl's default
//! `--validate=strict`: a field the API type does not have refuses the object
//! ("strict decoding error: unknown field ..."). Each object is then validated the way the
//! API server validates it. Every error names the file, line, document, object and field;
//! an invalid object is left out and every other object still loads. The text comes in as
//! a string: this module does no I/O.
//!
//! Workloads (Deployment, ReplicaSet, ReplicationController, StatefulSet, DaemonSet) are
//! expanded into Pods, as the controllers and the scheduler would: deterministic names,
//! round-robin placement on the Nodes from a Node chosen per workload (a StatefulSet's Pods are `name-0`, `name-1`, ...
//! with per-Pod DNS names under `spec.serviceName`; a DaemonSet has one Pod per eligible
//! Node), and Pod IPs from each Node's pod CIDR. ClusterIPs and node ports that a manifest
//! leaves out are allocated deterministically from the configured ranges.
//!
//! The module's parts: reading text into documents (this file for YAML, `json` for JSON),
//! the converters that validate one object each (`service` for Services, this file for the
//! other kinds), and the Builder that expands, allocates and rejects clashes across
//! objects.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use k8s_openapi::api::apps::v1 as apps;
use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::model::*;

mod json;
mod service;

use service::convert_service;

/// Settings of the simulated cluster that manifests are loaded into.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// Namespace for objects that name none (kubectl's context namespace).
    pub default_namespace: String,
    /// Service CIDRs, one per family, primary first (`--service-cluster-ip-range`).
    pub service_cidrs: Vec<IpNet>,
    /// Pod CIDRs, one per family (`--cluster-cidr`); each Node without `podCIDRs` gets a
    /// slice of it (/24 for IPv4, /80 for IPv6).
    pub pod_cidrs: Vec<IpNet>,
    /// The node port range (`--service-node-port-range`), inclusive.
    pub node_port_range: (u16, u16),
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            default_namespace: "default".into(),
            service_cidrs: vec![net("10.96.0.0/12")],
            pod_cidrs: vec![net("10.244.0.0/16")],
            node_port_range: (30000, 32767),
        }
    }
}

/// The most replicas a workload may ask for: each becomes a Pod in memory and in the
/// EndpointSlices, so one typo (`replicas: 70000`) would hold up every other change.
pub const MAX_REPLICAS: u32 = 10_000;

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or(IpNet::V4(ipnet::Ipv4Net::new_assert(
        Ipv4Addr::UNSPECIFIED,
        0,
    )))
}

/// Where an object came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source {
    /// File name as given to the loader.
    pub file: String,
    /// Index of the YAML document in the file, from 0.
    pub document: usize,
    /// Line of the document's first line, from 1.
    pub line: usize,
}

/// The kind, namespace and name of an object an error is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// `kind`.
    pub kind: String,
    /// Namespace (empty for cluster-scoped objects).
    pub namespace: String,
    /// Name (may be empty when the name itself is missing).
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.namespace.is_empty(), self.name.is_empty()) {
            (_, true) => write!(f, "{} <unnamed>", self.kind),
            (true, false) => write!(f, "{} {}", self.kind, self.name),
            (false, false) => write!(f, "{} {}/{}", self.kind, self.namespace, self.name),
        }
    }
}

/// What is wrong with a field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidateError {
    /// The document is not valid YAML.
    #[error("invalid YAML: {0}")]
    Yaml(String),
    /// The document does not decode as the API type (wrong type, bad apiVersion, ...).
    #[error("{0}")]
    Decode(String),
    /// A required field is missing.
    #[error("Required value")]
    Required,
    /// The kind is not one svcnat reads; the document is skipped.
    #[error("kind {0:?} is not used by svcnat; document skipped")]
    UnsupportedKind(String),
    /// A value is not one of the allowed ones.
    #[error("Unsupported value: {value:?}: supported values: {supported}")]
    Unsupported {
        /// The value given.
        value: String,
        /// The values allowed.
        supported: &'static str,
    },
    /// A value is malformed.
    #[error("Invalid value: {value:?}: {reason}")]
    Invalid {
        /// The value given.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A port number outside 1-65535.
    #[error("Invalid value: {0}: must be between 1 and 65535, inclusive")]
    PortOutOfRange(i64),
    /// A node port outside the configured range.
    #[error(
        "Invalid value: {value}: provided port is not in the valid range. The range of valid ports is {min}-{max}"
    )]
    NodePortOutOfRange {
        /// The value given.
        value: i64,
        /// Low end of the range.
        min: u16,
        /// High end of the range.
        max: u16,
    },
    /// A node port that another Service already holds.
    #[error("Invalid value: {port}: provided port is already allocated (to Service {owner})")]
    NodePortAllocated {
        /// The node port.
        port: u16,
        /// The Service holding it.
        owner: String,
    },
    /// A cluster IP that another Service already holds.
    #[error("Invalid value: {ip:?}: provided IP is already allocated (to Service {owner})")]
    ClusterIpAllocated {
        /// The address.
        ip: IpAddr,
        /// The Service holding it.
        owner: String,
    },
    /// A cluster IP outside the Service CIDRs.
    #[error(
        "Invalid value: {ip:?}: provided IP is not in the valid range. The range of valid IPs is {range}"
    )]
    ClusterIpOutOfRange {
        /// The address.
        ip: IpAddr,
        /// The configured ranges.
        range: String,
    },
    /// A range is exhausted.
    #[error("no free {what} left in {range}")]
    Exhausted {
        /// What ran out.
        what: &'static str,
        /// The range.
        range: String,
    },
    /// The same value twice where it must be unique.
    #[error("Duplicate value: {0}")]
    Duplicate(String),
    /// More of something than svcnat allows (a limit of svcnat's, not of Kubernetes).
    #[error("Too many: {value}: must be at most {limit} ({what})")]
    TooMany {
        /// The value given.
        value: i64,
        /// The limit.
        limit: u64,
        /// What is limited.
        what: &'static str,
    },
    /// An object whose kind, namespace and name another object already has: the API
    /// server's "already exists" on create.
    #[error("{resource} \"{name}\" already exists (defined at {at})")]
    AlreadyExists {
        /// The resource, lower case plural (`services`, `pods`).
        resource: String,
        /// The name.
        name: String,
        /// Where the object that has it is defined, `file:line`.
        at: String,
    },
    /// A field that is not allowed in this context.
    #[error("Forbidden: {0}")]
    Forbidden(String),
    /// The document is not valid JSON (a `.json` file).
    #[error("invalid JSON: {0}")]
    Json(String),
    /// Fields the API type does not have (a typo, or a field removed from the API): the
    /// API server's strict field validation, kubectl's default, refuses the object.
    #[error(
        "strict decoding error: {}",
        .0.iter().map(|f| format!("unknown field {f:?}")).collect::<Vec<_>>().join(", ")
    )]
    UnknownFields(Vec<String>),
}

/// One problem found while loading: where, which object, which field, what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    /// File name.
    pub file: String,
    /// Line in the file (1-based): the field's line when it can be found, else the
    /// document's first line.
    pub line: usize,
    /// Document index in the file, from 0.
    pub document: usize,
    /// The object, when its kind is known.
    pub object: Option<ObjectRef>,
    /// The field path, e.g. `spec.ports[0].nodePort` (empty for whole-document errors).
    pub field: String,
    /// What is wrong.
    pub error: ValidateError,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: document {}", self.file, self.line, self.document)?;
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.error)
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// A workload that creates Pods from a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// `Deployment`, `ReplicaSet`, `ReplicationController`, `StatefulSet` or `DaemonSet`.
    pub kind: String,
    /// Namespace and name.
    pub name: ObjectName,
    /// `spec.replicas` (a DaemonSet has none: one Pod per eligible Node).
    pub replicas: u32,
    /// The Pod template; its name, IPs and node are filled in per replica. A StatefulSet's
    /// template carries `spec.serviceName` as its `subdomain`.
    pub template: Pod,
    /// Whether the template sets `spec.nodeName`.
    pub pinned_node: bool,
    /// A StatefulSet's first ordinal (`spec.ordinals.start`); 0 for other kinds.
    pub first_ordinal: u32,
    /// The template's `spec.nodeSelector`, which a DaemonSet's Nodes must match.
    pub node_selector: BTreeMap<String, String>,
}

/// A validated object with its origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Where it came from.
    pub source: Source,
    /// Its identity: kind, namespace (after defaulting; empty when cluster-scoped), name.
    pub id: ObjectRef,
    /// The object.
    pub object: Object,
    /// The document's text, to point later errors (clashes) at the field's line.
    pub text: std::sync::Arc<str>,
}

/// A validated object of one of the kinds svcnat reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    /// A Service (cluster IPs and node ports may still be unallocated).
    Service(Service),
    /// A Pod (its IP may still be unallocated).
    Pod(Pod),
    /// A Deployment, ReplicaSet, ReplicationController, StatefulSet or DaemonSet.
    Workload(Workload),
    /// An EndpointSlice, or an Endpoints object converted to slices.
    Slices(Vec<EndpointSlice>),
    /// A Namespace.
    Namespace(String),
    /// A Node.
    Node(Node),
}

/// The result of loading: the objects that are valid, and what was wrong with the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifests {
    /// Valid objects in file and document order.
    pub objects: Vec<Loaded>,
    /// Errors: each one left an object (or a document) out.
    pub errors: Vec<LoadError>,
    /// Warnings: nothing was lost (e.g. a kind svcnat does not use).
    pub warnings: Vec<LoadError>,
}

impl Manifests {
    /// Parses one file's text and appends its objects and errors. A file whose name ends
    /// in `.json` is read as JSON (one object, a `List`, or a stream of objects), any
    /// other as multi-document YAML.
    pub fn add_file(&mut self, file: &str, text: &str, config: &ClusterConfig) {
        if is_json_file(file) {
            json::add_file(self, file, text, config);
            return;
        }
        for doc in split_documents(text) {
            load_document(self, file, &doc, config);
        }
    }

    /// Parses several files, in the order given.
    pub fn from_files<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
        config: &ClusterConfig,
    ) -> Manifests {
        let mut m = Manifests::default();
        for (file, text) in files {
            m.add_file(file, text, config);
        }
        m
    }

    /// Builds the cluster: expands workloads into Pods, allocates what is unallocated, and
    /// rejects clashes between objects (the later object loses, as the API server would
    /// refuse to create it). Errors found here are appended to `self.errors`.
    ///
    /// One identity, one object: a later object with the kind, namespace and name of an
    /// earlier one is refused (`services "x" already exists`), as the API server refuses
    /// to create an object that exists. So the first claimant in the order of
    /// [`Manifests::objects`] keeps a name, a cluster IP or a node port, and only the
    /// object that clashes is refused, never its file-mates. Loading files in a fixed
    /// order (file name, then position) makes the outcome the same in every process and
    /// across restarts.
    pub fn build(&mut self, config: &ClusterConfig) -> Cluster {
        self.refuse_duplicates();
        let mut b = Builder::new(config);
        for l in &self.objects {
            if let Object::Node(n) = &l.object {
                b.nodes.insert(n.name.clone(), n.clone());
            }
        }
        b.assign_node_cidrs();
        // The manifest world has no control plane: the cluster runs the EndpointSlice
        // controller itself (see `crate::controller`).
        let mut cluster = Cluster::simulated();
        for n in b.nodes.values() {
            cluster.upsert_node(n.clone());
        }
        // Namespaces and fixed addresses first, so allocation never hands out one of them.
        for l in &self.objects {
            match &l.object {
                Object::Namespace(ns) => cluster.add_namespace(ns.clone()),
                Object::Pod(p) => {
                    for ip in &p.ips {
                        b.used_pod_ips.insert(*ip);
                    }
                }
                _ => {}
            }
        }
        let mut errors = Vec::new();
        // Services: reserve explicit cluster IPs and node ports in load order, then
        // allocate the rest.
        let mut pending = Vec::new();
        for l in &self.objects {
            if let Object::Service(svc) = &l.object {
                let at = format!("{}:{}", l.source.file, l.source.line);
                match b.reserve_service(svc, &at) {
                    Ok(()) => pending.push((l, svc.clone())),
                    Err((field, e)) => errors.push(error_at(l, svc_ref(svc), field, e)),
                }
            }
        }
        for (l, mut svc) in pending {
            match b.allocate_service(&mut svc) {
                Ok(()) => {
                    cluster.upsert_service(svc);
                }
                Err((field, e)) => {
                    b.release_service(&svc);
                    errors.push(error_at(l, svc_ref(&svc), field, e));
                }
            }
        }
        // Pods: explicit ones keep their IPs; workload replicas are placed and addressed.
        let mut pods = Vec::new();
        let mut seen_ips: BTreeMap<IpAddr, ObjectName> = BTreeMap::new();
        for l in &self.objects {
            match &l.object {
                Object::Pod(p) => pods.push((l, p.clone())),
                Object::Workload(w) => {
                    for p in b.expand(w) {
                        pods.push((l, p));
                    }
                }
                _ => {}
            }
        }
        let mut accepted = Vec::with_capacity(pods.len());
        for (l, mut p) in pods {
            if p.ips.is_empty()
                && matches!(p.phase, PodPhase::Running | PodPhase::Pending)
                && let Err(e) = b.allocate_pod_ip(&mut p)
            {
                errors.push(error_at(l, pod_ref(&p), "status.podIP".into(), e));
                continue;
            }
            if let Some(ip) = p.ips.iter().find(|ip| seen_ips.contains_key(ip)) {
                let owner = seen_ips.get(ip).map(|o| o.to_string()).unwrap_or_default();
                errors.push(error_at(
                    l,
                    pod_ref(&p),
                    "status.podIP".into(),
                    ValidateError::Invalid {
                        value: ip.to_string(),
                        reason: format!("address already used by Pod {owner}"),
                    },
                ));
                continue;
            }
            for ip in &p.ips {
                seen_ips.insert(*ip, p.name.clone());
            }
            accepted.push(p);
        }
        // All at once, so the controller publishes each Service's slices once.
        let _ = cluster.upsert_pods(accepted);
        for l in &self.objects {
            if let Object::Slices(slices) = &l.object {
                for s in slices {
                    cluster.upsert_slice(s.clone());
                }
            }
        }
        self.errors.extend(errors);
        // Report in file order, then document order, whichever phase found the error.
        let mut order: BTreeMap<String, usize> = BTreeMap::new();
        for f in self
            .objects
            .iter()
            .map(|l| &l.source.file)
            .chain(self.errors.iter().map(|e| &e.file))
        {
            let next = order.len();
            order.entry(f.clone()).or_insert(next);
        }
        self.errors
            .sort_by_key(|e| (order.get(&e.file).copied(), e.document, e.line));
        cluster
    }
}

impl Manifests {
    /// Moves every object whose identity an earlier object has to the errors.
    fn refuse_duplicates(&mut self) {
        let mut first: BTreeMap<&ObjectRef, &Source> = BTreeMap::new();
        let mut dups = BTreeSet::new();
        for (i, l) in self.objects.iter().enumerate() {
            if first.contains_key(&l.id) {
                dups.insert(i);
            } else {
                first.insert(&l.id, &l.source);
            }
        }
        if dups.is_empty() {
            return;
        }
        let mut errors = Vec::new();
        for &i in &dups {
            let Some(l) = self.objects.get(i) else {
                continue;
            };
            let at = first
                .get(&l.id)
                .map(|s| format!("{}:{}", s.file, s.line))
                .unwrap_or_default();
            errors.push(LoadError {
                file: l.source.file.clone(),
                line: l.source.line,
                document: l.source.document,
                object: Some(l.id.clone()),
                field: "metadata.name".into(),
                error: ValidateError::AlreadyExists {
                    resource: resource_of(&l.id.kind),
                    name: l.id.name.clone(),
                    at,
                },
            });
        }
        let mut i = 0;
        self.objects.retain(|_| {
            i += 1;
            !dups.contains(&(i - 1))
        });
        self.errors.extend(errors);
    }
}

/// The API resource of a kind, as the API server names it in errors: `services`.
fn resource_of(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower.ends_with('s') {
        lower
    } else {
        format!("{lower}s")
    }
}

fn svc_ref(svc: &Service) -> ObjectRef {
    ObjectRef {
        kind: "Service".into(),
        namespace: svc.name.namespace.clone(),
        name: svc.name.name.clone(),
    }
}

fn pod_ref(p: &Pod) -> ObjectRef {
    ObjectRef {
        kind: "Pod".into(),
        namespace: p.name.namespace.clone(),
        name: p.name.name.clone(),
    }
}

fn error_at(l: &Loaded, object: ObjectRef, field: String, error: ValidateError) -> LoadError {
    let src = &l.source;
    LoadError {
        file: src.file.clone(),
        line: src.line + locate(&src.file, &l.text, &field).unwrap_or(0),
        document: src.document,
        object: Some(object),
        field,
        error,
    }
}

/// One YAML document of a file, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    /// Index in the file, from 0.
    pub index: usize,
    /// Line of its first line in the file, from 1.
    pub line: usize,
    /// Its text.
    pub text: String,
}

/// Splits a multi-document YAML stream at `---` and `...` markers, keeping line numbers.
/// Documents that hold only comments and blank lines are dropped.
pub fn split_documents(text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    let mut index = 0;
    let mut flush = |cur: &mut String, start: usize, docs: &mut Vec<Document>| {
        let meaningful = cur
            .lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        if meaningful {
            docs.push(Document {
                index,
                line: start,
                text: std::mem::take(cur),
            });
            index += 1;
        }
        cur.clear();
    };
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let marker = line == "---"
            || line.starts_with("--- ")
            || line.starts_with("---\t")
            || line == "..."
            || line.starts_with("... ");
        if marker {
            flush(&mut cur, start, &mut docs);
            start = lineno + 1;
            // `--- {inline}` carries content after the marker.
            if let Some(rest) = line.strip_prefix("--- ") {
                let rest = rest.trim();
                if !rest.is_empty() && !rest.starts_with('#') {
                    start = lineno;
                    cur.push_str(rest);
                    cur.push('\n');
                }
            }
            continue;
        }
        if cur.is_empty() && line.trim().is_empty() {
            start = lineno + 1;
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    flush(&mut cur, start, &mut docs);
    docs
}

/// Finds the line of a field path such as `spec.ports[1].nodePort` in a block-style YAML
/// document; returns the 0-based line within the document. Flow style and anything it
/// cannot follow give the deepest line it did find.
pub fn locate_field(doc: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = doc.lines().collect();
    let segs = path_segments(path)?;
    // (line index of the current node, indentation of its children must exceed this)
    let mut pos: Option<usize> = None;
    let mut parent_indent: isize = -1;
    let mut from = 0;
    for seg in segs {
        let mut found = None;
        match seg {
            Seg::Key(k) => {
                let mut i = from;
                while i < lines.len() {
                    let (indent, content) = indent_of(lines[i]);
                    if is_blank(content) {
                        i += 1;
                        continue;
                    }
                    if (indent as isize) <= parent_indent && i > from {
                        break;
                    }
                    // A key may follow a list dash: `- name: x`.
                    let (indent, content) = strip_dash(indent, content);
                    if (indent as isize) > parent_indent && key_of(content) == Some(k) {
                        found = Some((i, indent as isize));
                        break;
                    }
                    i += 1;
                }
            }
            Seg::Index(n) => {
                let mut count = 0;
                let mut item_indent: Option<usize> = None;
                let mut i = from;
                while i < lines.len() {
                    let (indent, content) = indent_of(lines[i]);
                    if is_blank(content) {
                        i += 1;
                        continue;
                    }
                    if (indent as isize) < parent_indent.max(0) && i > from {
                        break;
                    }
                    let is_item = content.starts_with("- ") || content == "-";
                    if !is_item && (indent as isize) <= parent_indent {
                        // The parent's block ended before item n (or it is a flow list).
                        break;
                    }
                    if is_item {
                        if item_indent.is_none() && (indent as isize) >= parent_indent {
                            item_indent = Some(indent);
                        }
                        if Some(indent) == item_indent {
                            if count == n {
                                // Children of the item are indented past the dash.
                                found = Some((i, indent as isize));
                                break;
                            }
                            count += 1;
                        }
                    } else if item_indent.is_some_and(|ii| indent <= ii)
                        && (indent as isize) <= parent_indent
                    {
                        break;
                    }
                    i += 1;
                }
            }
        }
        match found {
            Some((line, indent)) => {
                pos = Some(line);
                parent_indent = indent;
                // The value of a key or item may start on the same line (`- key: v`), so the
                // next search starts at this line; children are found by indentation.
                from = line;
                if let Seg::Index(_) = seg {
                    // Children of `- a: 1` sit at dash indent + 2; allow the first key on
                    // the dash line itself.
                    parent_indent = indent;
                } else {
                    from = line + 1;
                }
            }
            None => return pos,
        }
    }
    pos
}

/// One step of a field path: a key, or an index into a list.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// `spec.ports[1].nodePort` as its steps; `None` when an index is not a number.
fn path_segments(path: &str) -> Option<Vec<Seg<'_>>> {
    let mut segs = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            segs.push(Seg::Key(key));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            let n = idx.trim_end_matches(']').parse().ok()?;
            segs.push(Seg::Index(n));
        }
    }
    Some(segs)
}

fn indent_of(line: &str) -> (usize, &str) {
    let trimmed = line.trim_start_matches(' ');
    (line.len() - trimmed.len(), trimmed)
}

fn is_blank(content: &str) -> bool {
    content.trim().is_empty() || content.starts_with('#')
}

fn strip_dash(indent: usize, content: &str) -> (usize, &str) {
    match content.strip_prefix("- ") {
        Some(rest) => {
            let (more, rest) = indent_of(rest);
            (indent + 2 + more, rest)
        }
        None => (indent, content),
    }
}

fn key_of(content: &str) -> Option<&str> {
    let i = content.find(':')?;
    let key = content[..i].trim().trim_matches('"').trim_matches('\'');
    let after = &content[i + 1..];
    (after.is_empty() || after.starts_with(' ') || after.starts_with('\t')).then_some(key)
}

/// apiVersions that older manifests use for kinds svcnat reads, and the version their
/// fields are read as.
fn canonical_api_version(kind: &str, api_version: &str) -> Option<&'static str> {
    match (kind, api_version) {
        ("Deployment" | "ReplicaSet", "extensions/v1beta1" | "apps/v1beta1" | "apps/v1beta2") => {
            Some("apps/v1")
        }
        ("EndpointSlice", "discovery.k8s.io/v1beta1") => Some("discovery.k8s.io/v1"),
        _ => None,
    }
}

/// Kinds the API server keeps outside namespaces (`kubectl api-resources --namespaced=false`,
/// the built-in ones): their objects are named without a namespace, in errors and in the
/// skipped-kinds report alike.
const CLUSTER_SCOPED_KINDS: &[&str] = &[
    "APIService",
    "CSIDriver",
    "CSINode",
    "CertificateSigningRequest",
    "ClusterRole",
    "ClusterRoleBinding",
    "ComponentStatus",
    "CustomResourceDefinition",
    "FlowSchema",
    "IngressClass",
    "MutatingWebhookConfiguration",
    "Namespace",
    "Node",
    "PersistentVolume",
    "PriorityClass",
    "PriorityLevelConfiguration",
    "RuntimeClass",
    "StorageClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ValidatingWebhookConfiguration",
    "VolumeAttachment",
];

/// Errors of a `List`'s item `i` name the field below `items[i]`; with `line`, they point
/// at it (items re-serialized from YAML have no lines of their own).
fn prefix_item_errors(errors: &mut [LoadError], i: usize, line: Option<usize>) {
    for e in errors {
        e.field = if e.field.is_empty() {
            format!("items[{i}]")
        } else {
            format!("items[{i}].{}", e.field)
        };
        if let Some(line) = line {
            e.line = line;
        }
    }
}

fn load_document(m: &mut Manifests, file: &str, doc: &Document, config: &ClusterConfig) {
    let source = Source {
        file: file.to_string(),
        document: doc.index,
        line: doc.line,
    };
    let whole = |error: ValidateError, line: usize, object: Option<ObjectRef>| LoadError {
        file: file.to_string(),
        line,
        document: doc.index,
        object,
        field: String::new(),
        error,
    };
    let is_json = is_json_file(file);
    let parsed = if is_json {
        json::parse_value(&doc.text)
            .map_err(|(rel, message)| whole(ValidateError::Json(message), doc.line + rel, None))
    } else {
        parse_yaml(doc).map_err(|e| LoadError {
            file: file.to_string(),
            ..*e
        })
    };
    let value = match parsed {
        Ok(v) => v,
        Err(e) => {
            m.errors.push(e);
            return;
        }
    };
    if !value.is_mapping() {
        let what = match &value {
            serde_yaml_ng::Value::Null => "null",
            serde_yaml_ng::Value::Bool(_) => "a boolean",
            serde_yaml_ng::Value::Number(_) => "a number",
            serde_yaml_ng::Value::String(_) => "a string",
            serde_yaml_ng::Value::Sequence(_) => "a sequence",
            _ => "a tagged value",
        };
        m.errors.push(whole(
            ValidateError::Decode(format!(
                "invalid type: {what}, expected an object with apiVersion and kind"
            )),
            doc.line,
            None,
        ));
        return;
    }
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("");
    let meta_str = |k: &str| {
        value
            .get("metadata")
            .and_then(|md| md.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let cluster_scoped = kind == "List" || CLUSTER_SCOPED_KINDS.contains(&kind);
    let object = ObjectRef {
        kind: kind.to_string(),
        namespace: if cluster_scoped {
            String::new()
        } else {
            let ns = meta_str("namespace");
            if ns.is_empty() {
                config.default_namespace.clone()
            } else {
                ns
            }
        },
        name: meta_str("name"),
    };
    if kind.is_empty() {
        m.errors.push(LoadError {
            file: file.to_string(),
            line: doc.line,
            document: doc.index,
            object: None,
            field: "kind".into(),
            error: ValidateError::Required,
        });
        return;
    }
    // kubectl: "error validating data: apiVersion not set".
    if api_version.is_empty() {
        m.errors.push(LoadError {
            file: file.to_string(),
            line: doc.line,
            document: doc.index,
            object: Some(object),
            field: "apiVersion".into(),
            error: ValidateError::Required,
        });
        return;
    }
    if kind == "List" {
        // `kubectl get -o yaml` output: items have no precise lines; errors point at the
        // List's first line and name the item's index.
        let items = value
            .get("items")
            .and_then(|i| i.as_sequence())
            .cloned()
            .unwrap_or_default();
        for (i, item) in items.into_iter().enumerate() {
            if is_json {
                // A JSON item is a slice of the List's text: its errors keep their lines.
                let Some(span) = json::span(&doc.text, &format!("items[{i}]")) else {
                    continue;
                };
                let before = m.errors.len();
                let start = doc.text.get(..span.start).unwrap_or("");
                let sub = Document {
                    index: doc.index,
                    line: doc.line + start.matches('\n').count(),
                    text: doc.text.get(span).unwrap_or("").to_string(),
                };
                load_document(m, file, &sub, config);
                prefix_item_errors(&mut m.errors[before..], i, None);
                continue;
            }
            match serde_yaml_ng::to_string(&item) {
                Ok(text) => {
                    let before = m.errors.len();
                    let sub = Document {
                        index: doc.index,
                        line: doc.line,
                        text,
                    };
                    load_document(m, file, &sub, config);
                    prefix_item_errors(&mut m.errors[before..], i, Some(doc.line));
                }
                Err(e) => m
                    .errors
                    .push(whole(ValidateError::Yaml(e.to_string()), doc.line, None)),
            }
        }
        return;
    }
    let mut text = std::borrow::Cow::Borrowed(doc.text.as_str());
    if let Some(canon) = canonical_api_version(kind, api_version) {
        if is_json {
            if let Some(span) = json::span(&doc.text, "apiVersion") {
                let mut rewritten = doc.text.clone();
                rewritten.replace_range(span, &format!("{canon:?}"));
                text = std::borrow::Cow::Owned(rewritten);
            }
        } else {
            let rewritten: Vec<String> = doc
                .text
                .lines()
                .map(|l| {
                    if l.starts_with("apiVersion:") {
                        format!("apiVersion: {canon}")
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            text = std::borrow::Cow::Owned(rewritten.join("\n"));
        }
        m.warnings.push(LoadError {
            file: file.to_string(),
            line: doc.line,
            document: doc.index,
            object: Some(object.clone()),
            field: "apiVersion".into(),
            error: ValidateError::Invalid {
                value: api_version.to_string(),
                reason: format!("deprecated; read as {canon}"),
            },
        });
    }
    // YAML merge keys (`<<: *defaults`), which kubectl's YAML reader applies: the typed
    // decoder would see `<<` as a field, so the merged document is decoded instead (its
    // decode errors' lines are those of the merged text; validation errors still point
    // into the original).
    if !is_json
        && doc.text.contains("<<")
        && has_merge_key(&value)
        && let Some(merged) = merge_keys(value.clone(), canonical_api_version(kind, api_version))
    {
        text = std::borrow::Cow::Owned(merged);
    }
    let ctx = Ctx {
        file,
        doc,
        object: object.clone(),
        config,
        errors: Vec::new(),
    };
    let result = match kind {
        "Service" => decode::<corev1::Service>(&text, &ctx).map(|s| convert_service(s, ctx)),
        "Pod" => decode::<corev1::Pod>(&text, &ctx).map(|p| convert_pod(p, ctx)),
        "Deployment" => decode::<apps::Deployment>(&text, &ctx).map(|d| {
            // The application picks the Kubernetes version; `spec` is optional in
            // k8s-openapi's types before 1.37.
            k8s_openapi::k8s_if_le_1_36! { let spec = d.spec.unwrap_or_default(); }
            k8s_openapi::k8s_if_ge_1_37! { let spec = d.spec; }
            convert_workload(
                "Deployment",
                d.metadata,
                spec.replicas,
                Some(spec.selector),
                None,
                Some(spec.template),
                ctx,
            )
        }),
        "ReplicaSet" => decode::<apps::ReplicaSet>(&text, &ctx).map(|d| {
            // The application picks the Kubernetes version; `spec` is optional in
            // k8s-openapi's types before 1.37.
            k8s_openapi::k8s_if_le_1_36! { let spec = d.spec.unwrap_or_default(); }
            k8s_openapi::k8s_if_ge_1_37! { let spec = d.spec; }
            convert_workload(
                "ReplicaSet",
                d.metadata,
                spec.replicas,
                Some(spec.selector),
                None,
                spec.template,
                ctx,
            )
        }),
        "ReplicationController" => decode::<corev1::ReplicationController>(&text, &ctx).map(|d| {
            let spec = d.spec.unwrap_or_default();
            convert_workload(
                "ReplicationController",
                d.metadata,
                spec.replicas,
                None,
                spec.selector,
                spec.template,
                ctx,
            )
        }),
        "StatefulSet" => {
            decode::<apps::StatefulSet>(&text, &ctx).map(|d| convert_stateful_set(d, ctx))
        }
        "DaemonSet" => decode::<apps::DaemonSet>(&text, &ctx).map(|d| {
            warn_node_selector(m, &text, &ctx, &d);
            convert_daemon_set(d, ctx)
        }),
        "Endpoints" => decode::<corev1::Endpoints>(&text, &ctx).map(|e| convert_endpoints(e, ctx)),
        "EndpointSlice" => {
            decode::<discovery::EndpointSlice>(&text, &ctx).map(|e| convert_slice(e, ctx))
        }
        "Namespace" => decode::<corev1::Namespace>(&text, &ctx).map(|n| {
            let mut ctx = ctx;
            let name = n.metadata.name.unwrap_or_default();
            ctx.check_name("metadata.name", &name, NameRule::Label);
            ctx.finish(Object::Namespace(name))
        }),
        "Node" => decode::<corev1::Node>(&text, &ctx).map(|n| convert_node(n, ctx)),
        other => {
            m.warnings.push(whole(
                ValidateError::UnsupportedKind(other.to_string()),
                doc.line,
                Some(object),
            ));
            return;
        }
    };
    match result {
        Err(e) => m.errors.push(*e),
        Ok((obj, errors)) => {
            if errors.is_empty() {
                if let Some(obj) = obj {
                    m.objects.push(Loaded {
                        source,
                        id: object,
                        object: obj,
                        text: std::sync::Arc::from(doc.text.as_str()),
                    });
                }
            } else {
                m.errors.extend(errors);
            }
        }
    }
}

/// Whether a YAML value holds a merge key (`<<`) anywhere.
fn has_merge_key(value: &serde_yaml_ng::Value) -> bool {
    use serde_yaml_ng::Value;
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::Mapping(m) => {
                if m.contains_key("<<") {
                    return true;
                }
                stack.extend(m.values());
            }
            Value::Sequence(s) => stack.extend(s),
            Value::Tagged(t) => stack.push(&t.value),
            _ => {}
        }
    }
    false
}

/// The document with its merge keys applied (and its apiVersion replaced, when it is read
/// as another), as YAML text; `None` when a merge key is malformed.
fn merge_keys(mut value: serde_yaml_ng::Value, api_version: Option<&str>) -> Option<String> {
    value.apply_merge().ok()?;
    if let (Some(v), Some(m)) = (api_version, value.as_mapping_mut()) {
        m.insert("apiVersion".into(), v.into());
    }
    serde_yaml_ng::to_string(&value).ok()
}

/// Parses a YAML document into a generic value.
fn parse_yaml(doc: &Document) -> Result<serde_yaml_ng::Value, Box<LoadError>> {
    // The caller fills in the file.
    let whole = |error, line| {
        Box::new(LoadError {
            file: String::new(),
            line,
            document: doc.index,
            object: None,
            field: String::new(),
            error,
        })
    };
    // The YAML scanner's cost grows with the square of the flow nesting depth, and any
    // document nested deeper than the decoder's limit fails anyway: refuse it up front,
    // with the decoder's own message.
    if let Some(rel) = flow_nesting_over(&doc.text, MAX_FLOW_NESTING) {
        return Err(whole(
            ValidateError::Yaml("recursion limit exceeded".into()),
            doc.line + rel,
        ));
    }
    serde_yaml_ng::from_str(&doc.text).map_err(|e| {
        let line = doc.line
            + e.location()
                .map(|l| l.line().saturating_sub(1))
                .unwrap_or(0);
        whole(ValidateError::Yaml(strip_location(&e)), line)
    })
}

/// Flow collections (`[`, `{`) nested deeper than this are refused before decoding: the
/// decoder (serde_yaml_ng) refuses nesting deeper than 128 levels, but only after its
/// scanner has read the whole document, in time quadratic in the depth.
const MAX_FLOW_NESTING: usize = 128;

/// The 0-based line of a YAML document at which flow collections are certainly nested
/// more than `limit` deep, or `None`.
///
/// A lower bound, so it never refuses what the decoder accepts: in block context a `[` or
/// `{` counts only where a node starts (after the indentation, `- `, `? ` or `: `), never
/// inside plain, quoted or block scalars or comments; in flow context every bracket outside
/// quotes and comments counts (YAML 1.2, 7.3.3: plain scalars in flow context cannot hold
/// flow indicators).
fn flow_nesting_over(text: &str, limit: usize) -> Option<usize> {
    #[derive(Clone, Copy, PartialEq)]
    enum Quote {
        None,
        Single,
        Double,
    }
    let mut depth = 0usize;
    let mut quote = Quote::None;
    // Indentation of the line that opened a block scalar (`|` or `>`); deeper lines and
    // blank lines are its content.
    let mut block_scalar: Option<usize> = None;
    // Indentation of the line that ended inside a scalar in block context: deeper lines
    // continue that scalar.
    let mut continued: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        if let Some(parent) = block_scalar {
            if line.trim().is_empty() || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        let bytes = line.as_bytes();
        let mut i = indent;
        // Whether a node may start here (block context only).
        let mut node_start = quote == Quote::None
            && depth == 0
            && continued.is_none_or(|parent| indent <= parent || line.trim().is_empty());
        if line.trim().is_empty() {
            continue;
        }
        let mut prev_space = true;
        while i < bytes.len() {
            let c = bytes[i];
            let next_space = bytes.get(i + 1).is_none_or(|b| *b == b' ' || *b == b'\t');
            match quote {
                Quote::Double => {
                    match c {
                        b'\\' => i += 1,
                        b'"' => quote = Quote::None,
                        _ => {}
                    }
                    i += 1;
                    prev_space = false;
                    continue;
                }
                Quote::Single => {
                    if c == b'\'' {
                        if bytes.get(i + 1) == Some(&b'\'') {
                            i += 1;
                        } else {
                            quote = Quote::None;
                        }
                    }
                    i += 1;
                    prev_space = false;
                    continue;
                }
                Quote::None => {}
            }
            let is_space = c == b' ' || c == b'\t';
            if c == b'#' && prev_space {
                break;
            }
            if depth > 0 {
                match c {
                    b'[' | b'{' => {
                        depth += 1;
                        if depth > limit {
                            return Some(n);
                        }
                    }
                    b']' | b'}' => depth = depth.saturating_sub(1),
                    b'"' => quote = Quote::Double,
                    b'\'' => quote = Quote::Single,
                    _ => {}
                }
            } else if node_start && !is_space {
                match c {
                    b'[' | b'{' => depth = 1,
                    b'"' => quote = Quote::Double,
                    b'\'' => quote = Quote::Single,
                    b'|' | b'>' => {
                        block_scalar = Some(indent);
                        break;
                    }
                    b'-' | b'?' if next_space => {}
                    b'&' | b'!' => {
                        // An anchor or a tag; the node follows it.
                        while i < bytes.len() && bytes[i] != b' ' {
                            i += 1;
                        }
                        continue;
                    }
                    _ => node_start = false,
                }
                if c != b'-' && c != b'?' {
                    node_start = false;
                }
            } else if depth == 0 && c == b':' && next_space {
                node_start = true;
            }
            prev_space = is_space;
            i += 1;
        }
        continued = (quote == Quote::None && depth == 0 && !node_start && block_scalar.is_none())
            .then_some(indent);
    }
    None
}

/// serde's messages carry " at line N column M"; the line is reported separately.
fn strip_location(e: &serde_yaml_ng::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn decode<T: DeserializeOwned>(text: &str, ctx: &Ctx<'_>) -> Result<T, Box<LoadError>> {
    if is_json_file(ctx.file) {
        return json::decode(text, ctx);
    }
    let mut unknown = Vec::new();
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let decoded = serde_ignored::deserialize(de, |path| unknown.push(api_path(&path)));
    let value = decoded.map_err(|e| {
        let rel = e
            .location()
            .map(|l| l.line().saturating_sub(1))
            .unwrap_or(0);
        // serde_yaml_ng prefixes the message with the path of the field it was decoding
        // ("spec.ports[0].port: invalid type: ..."); that path is the field.
        let message = strip_location(&e);
        let (field, message) = match message.split_once(": ") {
            Some((path, rest))
                if !path.is_empty()
                    && path
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._[]-/".contains(&b)) =>
            {
                (path.to_string(), rest.to_string())
            }
            _ => (String::new(), message),
        };
        Box::new(LoadError {
            file: ctx.file.to_string(),
            line: ctx.doc.line + rel,
            document: ctx.doc.index,
            object: Some(ctx.object.clone()),
            field,
            error: ValidateError::Decode(message),
        })
    })?;
    strict(unknown, ctx)?;
    Ok(value)
}

/// Strict field validation, as `kubectl apply` asks of the API server by default
/// (`--validate=strict`): "strict decoding error: unknown field \"spec.ipFamily\"" for
/// every field the API type does not have; the object is refused. The error points at the
/// first unknown field's line.
fn strict(unknown: Vec<String>, ctx: &Ctx<'_>) -> Result<(), Box<LoadError>> {
    let Some(first) = unknown.first() else {
        return Ok(());
    };
    let field = first.clone();
    let line = locate(ctx.file, &ctx.doc.text, &field)
        .map(|l| ctx.doc.line + l)
        .unwrap_or(ctx.doc.line);
    Err(Box::new(LoadError {
        file: ctx.file.to_string(),
        line,
        document: ctx.doc.index,
        object: Some(ctx.object.clone()),
        field,
        error: ValidateError::UnknownFields(unknown),
    }))
}

/// A path from `serde_ignored` in the API server's spelling: `spec.ports[0].name`.
fn api_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", api_path(parent)),
        Path::Map { parent, key } => match api_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => api_path(parent),
    }
}

/// Whether a file is read as JSON: its name ends in `.json`, as kubectl decides.
fn is_json_file(file: &str) -> bool {
    file.ends_with(".json")
}

/// The 0-based line of a field path in a document of `file`, JSON or YAML.
fn locate(file: &str, doc: &str, path: &str) -> Option<usize> {
    if is_json_file(file) {
        json::locate(doc, path)
    } else {
        locate_field(doc, path)
    }
}

/// What a converter returns: the object when it is usable, and its errors (any error drops
/// the object).
type Converted = (Option<Object>, Vec<LoadError>);

/// Typed objects (from an API server or a program) validated by the same converters as
/// manifests; see [`crate::input`].
pub(crate) mod typed {
    use super::*;

    /// The validation settings for objects an API server has already accepted: its own
    /// node port range is not known here, so any port number is accepted.
    pub(crate) fn config() -> ClusterConfig {
        ClusterConfig {
            node_port_range: (1, u16::MAX),
            ..ClusterConfig::default()
        }
    }

    fn run(
        kind: &str,
        md: &meta::ObjectMeta,
        namespaced: bool,
        f: impl FnOnce(Ctx<'_>) -> Converted,
    ) -> Result<Object, (ObjectRef, Vec<LoadError>)> {
        let config = config();
        let doc = Document {
            index: 0,
            line: 0,
            text: String::new(),
        };
        let object = ObjectRef {
            kind: kind.to_string(),
            namespace: if namespaced {
                md.namespace
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| config.default_namespace.clone())
            } else {
                String::new()
            },
            name: md.name.clone().unwrap_or_default(),
        };
        let ctx = Ctx {
            file: "",
            doc: &doc,
            object: object.clone(),
            config: &config,
            errors: Vec::new(),
        };
        match f(ctx) {
            (Some(obj), errors) if errors.is_empty() => Ok(obj),
            (_, errors) => Err((object, errors)),
        }
    }

    /// A Service.
    pub(crate) fn service(s: &corev1::Service) -> Result<Object, (ObjectRef, Vec<LoadError>)> {
        run("Service", &s.metadata, true, |ctx| {
            convert_service(s.clone(), ctx)
        })
    }

    /// An EndpointSlice.
    pub(crate) fn slice(
        s: &discovery::EndpointSlice,
    ) -> Result<Object, (ObjectRef, Vec<LoadError>)> {
        run("EndpointSlice", &s.metadata, true, |ctx| {
            convert_slice(s.clone(), ctx)
        })
    }

    /// A Node.
    pub(crate) fn node(n: &corev1::Node) -> Result<Object, (ObjectRef, Vec<LoadError>)> {
        run("Node", &n.metadata, false, |ctx| {
            convert_node(n.clone(), ctx)
        })
    }

    /// A Pod.
    pub(crate) fn pod(p: &corev1::Pod) -> Result<Object, (ObjectRef, Vec<LoadError>)> {
        run("Pod", &p.metadata, true, |ctx| convert_pod(p.clone(), ctx))
    }
}

struct Ctx<'a> {
    file: &'a str,
    doc: &'a Document,
    object: ObjectRef,
    config: &'a ClusterConfig,
    errors: Vec<LoadError>,
}

#[derive(Clone, Copy)]
enum NameRule {
    /// DNS-1035 label: Service names.
    Label1035,
    /// DNS-1123 label: namespaces, port names.
    Label,
    /// DNS-1123 subdomain: most object names.
    Subdomain,
}

impl Ctx<'_> {
    fn err(&mut self, field: impl Into<String>, error: ValidateError) {
        let field = field.into();
        let line = locate(self.file, &self.doc.text, &field)
            .map(|l| self.doc.line + l)
            .unwrap_or(self.doc.line);
        self.errors.push(LoadError {
            file: self.file.to_string(),
            line,
            document: self.doc.index,
            object: Some(self.object.clone()),
            field,
            error,
        });
    }

    fn finish(self, obj: Object) -> Converted {
        (Some(obj), self.errors)
    }

    fn check_name(&mut self, field: &str, name: &str, rule: NameRule) -> bool {
        if name.is_empty() {
            self.err(field, ValidateError::Required);
            return false;
        }
        let reason = match rule {
            NameRule::Label1035 => dns_label_error(name, true),
            NameRule::Label => dns_label_error(name, false),
            NameRule::Subdomain => dns_subdomain_error(name),
        };
        match reason {
            Some(reason) => {
                self.err(
                    field,
                    ValidateError::Invalid {
                        value: name.to_string(),
                        reason,
                    },
                );
                false
            }
            None => true,
        }
    }

    fn namespace(&mut self, md: &meta::ObjectMeta) -> String {
        let ns = md
            .namespace
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| self.config.default_namespace.clone());
        self.check_name("metadata.namespace", &ns, NameRule::Label);
        ns
    }

    fn ip(&mut self, field: &str, s: &str) -> Option<IpAddr> {
        match s.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.err(
                    field,
                    ValidateError::Invalid {
                        value: s.to_string(),
                        reason: "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
                            .into(),
                    },
                );
                None
            }
        }
    }

    fn cidr(&mut self, field: &str, s: &str) -> Option<IpNet> {
        match s.trim().parse::<IpNet>() {
            Ok(n) if n.trunc() == n => Some(n),
            Ok(n) => {
                self.err(
                    field,
                    ValidateError::Invalid {
                        value: s.to_string(),
                        reason: format!("must be a network address (did you mean {}?)", n.trunc()),
                    },
                );
                None
            }
            Err(_) => {
                self.err(
                    field,
                    ValidateError::Invalid {
                        value: s.to_string(),
                        reason: "must be a valid CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32)".into(),
                    },
                );
                None
            }
        }
    }

    fn port(&mut self, field: &str, v: i32) -> Option<u16> {
        match u16::try_from(v) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                self.err(field, ValidateError::PortOutOfRange(v.into()));
                None
            }
        }
    }

    fn protocol(&mut self, field: &str, p: Option<&String>) -> Option<Protocol> {
        match p {
            None => Some(Protocol::Tcp),
            Some(s) => match Protocol::parse(s) {
                Some(p) => Some(p),
                None => {
                    self.err(
                        field,
                        ValidateError::Unsupported {
                            value: s.clone(),
                            supported: "\"SCTP\", \"TCP\", \"UDP\"",
                        },
                    );
                    None
                }
            },
        }
    }

    fn labels(
        &mut self,
        field: &str,
        m: Option<&BTreeMap<String, String>>,
    ) -> BTreeMap<String, String> {
        let m = m.cloned().unwrap_or_default();
        for (k, v) in &m {
            if let Some(reason) = label_key_error(k) {
                self.err(
                    format!("{field}.{k}"),
                    ValidateError::Invalid {
                        value: k.clone(),
                        reason,
                    },
                );
            }
            if let Some(reason) = label_value_error(v) {
                self.err(
                    format!("{field}.{k}"),
                    ValidateError::Invalid {
                        value: v.clone(),
                        reason,
                    },
                );
            }
        }
        m
    }

    fn selector(&mut self, field: &str, s: &meta::LabelSelector) -> LabelSelector {
        let match_labels = self.labels(&format!("{field}.matchLabels"), s.match_labels.as_ref());
        let mut match_expressions = Vec::new();
        for (i, r) in s.match_expressions.iter().flatten().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            let values: BTreeSet<String> = r.values.iter().flatten().cloned().collect();
            let operator = match r.operator.as_str() {
                "In" => SelectorOperator::In,
                "NotIn" => SelectorOperator::NotIn,
                "Exists" => SelectorOperator::Exists,
                "DoesNotExist" => SelectorOperator::DoesNotExist,
                other => {
                    self.err(
                        format!("{f}.operator"),
                        ValidateError::Unsupported {
                            value: other.to_string(),
                            supported: "\"DoesNotExist\", \"Exists\", \"In\", \"NotIn\"",
                        },
                    );
                    continue;
                }
            };
            // "values: ... If the operator is In or NotIn, the values array must be
            // non-empty. If the operator is Exists or DoesNotExist, the values array must
            // be empty."
            match operator {
                SelectorOperator::In | SelectorOperator::NotIn if values.is_empty() => {
                    self.err(format!("{f}.values"), ValidateError::Required)
                }
                SelectorOperator::Exists | SelectorOperator::DoesNotExist if !values.is_empty() => {
                    self.err(
                        format!("{f}.values"),
                        ValidateError::Forbidden(
                            "may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
                                .into(),
                        ),
                    )
                }
                _ => {}
            }
            if let Some(reason) = label_key_error(&r.key) {
                self.err(
                    format!("{f}.key"),
                    ValidateError::Invalid {
                        value: r.key.clone(),
                        reason,
                    },
                );
            }
            match_expressions.push(Requirement {
                key: r.key.clone(),
                operator,
                values,
            });
        }
        LabelSelector {
            match_labels,
            match_expressions,
        }
    }
}

fn dns_label_error(s: &str, rfc1035: bool) -> Option<String> {
    if s.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let first = s.as_bytes().first().copied().unwrap_or(b'-');
    let last = s.as_bytes().last().copied().unwrap_or(b'-');
    let first_ok = if rfc1035 {
        first.is_ascii_lowercase()
    } else {
        first.is_ascii_lowercase() || first.is_ascii_digit()
    };
    if !ok_chars || !first_ok || last == b'-' {
        return Some(if rfc1035 {
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character".into()
        } else {
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character".into()
        });
    }
    None
}

fn dns_subdomain_error(s: &str) -> Option<String> {
    if s.len() > 253 {
        return Some("must be no more than 253 characters".into());
    }
    if s.split('.').any(|l| dns_label_error(l, false).is_some()) {
        return Some("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character".into());
    }
    None
}

fn qualified_name_error(s: &str) -> bool {
    let b = s.as_bytes();
    s.is_empty()
        || s.len() > 63
        || !b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        || !b.first().is_some_and(|c| c.is_ascii_alphanumeric())
        || !b.last().is_some_and(|c| c.is_ascii_alphanumeric())
}

fn label_key_error(k: &str) -> Option<String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if prefix.is_some_and(|p| dns_subdomain_error(p).is_some()) || qualified_name_error(name) {
        return Some("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc'), with an optional DNS subdomain prefix and '/'".into());
    }
    None
}

fn label_value_error(v: &str) -> Option<String> {
    if !v.is_empty() && qualified_name_error(v) {
        return Some("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character".into());
    }
    None
}

/// IANA_SVC_NAME: at most 15 characters, lower case letters, digits and '-', at least one
/// letter, no leading, trailing or double '-'.
fn port_name_error(s: &str) -> Option<String> {
    let b = s.as_bytes();
    if s.len() > 15
        || !b
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        || !b.iter().any(|c| c.is_ascii_lowercase())
        || s.starts_with('-')
        || s.ends_with('-')
        || s.contains("--")
    {
        return Some("must be no more than 15 characters, contain only lower case letters, digits and '-', contain at least one letter, and not begin, end or have two '-' in a row (IANA_SVC_NAME)".into());
    }
    None
}

fn timestamp(t: Option<&meta::Time>) -> Option<i64> {
    t.map(|t| t.0.as_second())
}

fn pod_from_spec(
    ctx: &mut Ctx<'_>,
    prefix: &str,
    name: ObjectName,
    md: &meta::ObjectMeta,
    spec: Option<&corev1::PodSpec>,
) -> Pod {
    let mut pod = Pod {
        name,
        labels: ctx.labels(&format!("{prefix}metadata.labels"), md.labels.as_ref()),
        weight: DEFAULT_WEIGHT,
        node_name: None,
        ips: Vec::new(),
        ports: Vec::new(),
        phase: PodPhase::Running,
        ready: true,
        terminating: md.deletion_timestamp.is_some(),
        hostname: None,
        subdomain: None,
        owner: None,
        created: timestamp(md.creation_timestamp.as_ref()),
    };
    if let Some(w) = md
        .annotations
        .as_ref()
        .and_then(|a| a.get(WEIGHT_ANNOTATION))
    {
        match w.trim().parse::<u32>() {
            Ok(w) if w <= 1_000_000 => pod.weight = w,
            _ => ctx.err(
                format!("{prefix}metadata.annotations.{WEIGHT_ANNOTATION}"),
                ValidateError::Invalid {
                    value: w.clone(),
                    reason: "must be an integer between 0 and 1000000".into(),
                },
            ),
        }
    }
    if let Some(spec) = spec {
        pod.node_name = spec.node_name.clone().filter(|s| !s.is_empty());
        pod.hostname = spec.hostname.clone().filter(|s| !s.is_empty());
        pod.subdomain = spec.subdomain.clone().filter(|s| !s.is_empty());
        for (ci, c) in spec.containers.iter().enumerate() {
            for (pi, p) in c.ports.iter().flatten().enumerate() {
                let f = format!("{prefix}spec.containers[{ci}].ports[{pi}]");
                let Some(port) = ctx.port(&format!("{f}.containerPort"), p.container_port) else {
                    continue;
                };
                let Some(protocol) = ctx.protocol(&format!("{f}.protocol"), p.protocol.as_ref())
                else {
                    continue;
                };
                let name = p.name.clone().unwrap_or_default();
                if !name.is_empty()
                    && let Some(reason) = port_name_error(&name)
                {
                    ctx.err(
                        format!("{f}.name"),
                        ValidateError::Invalid {
                            value: name.clone(),
                            reason,
                        },
                    );
                }
                pod.ports.push(ContainerPort {
                    name,
                    port,
                    protocol,
                });
            }
        }
    }
    pod
}

fn convert_pod(p: corev1::Pod, mut ctx: Ctx<'_>) -> Converted {
    let md = &p.metadata;
    let name = md.name.clone().unwrap_or_default();
    ctx.check_name("metadata.name", &name, NameRule::Subdomain);
    let ns = ctx.namespace(md);
    let mut pod = pod_from_spec(&mut ctx, "", ObjectName::new(ns, name), md, p.spec.as_ref());
    if let Some(st) = &p.status {
        pod.phase = match st.phase.as_deref() {
            None | Some("Running") => PodPhase::Running,
            Some("Pending") => PodPhase::Pending,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            Some("Unknown") => PodPhase::Pending,
            Some(other) => {
                ctx.err(
                    "status.phase",
                    ValidateError::Unsupported {
                        value: other.to_string(),
                        supported: "\"Failed\", \"Pending\", \"Running\", \"Succeeded\", \"Unknown\"",
                    },
                );
                PodPhase::Running
            }
        };
        // A Pod whose status lists conditions is ready only with Ready=True; a manifest
        // without conditions describes a Pod we start ourselves, which is ready when running.
        if let Some(conds) = &st.conditions {
            pod.ready = conds
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
        } else {
            pod.ready = pod.phase == PodPhase::Running;
        }
        let mut ips: Vec<String> = st.pod_ips.iter().flatten().map(|p| p.ip.clone()).collect();
        if let Some(ip) = st.pod_ip.as_ref().filter(|s| !s.is_empty())
            && !ips.contains(ip)
        {
            ips.insert(0, ip.clone());
        }
        for (i, s) in ips.iter().enumerate() {
            let field = if i == 0 {
                "status.podIP".to_string()
            } else {
                format!("status.podIPs[{i}].ip")
            };
            if let Some(ip) = ctx.ip(&field, s) {
                pod.ips.push(ip);
            }
        }
    }
    ctx.finish(Object::Pod(pod))
}

fn convert_workload(
    kind: &str,
    md: meta::ObjectMeta,
    replicas: Option<i32>,
    selector: Option<meta::LabelSelector>,
    rc_selector: Option<BTreeMap<String, String>>,
    template: Option<corev1::PodTemplateSpec>,
    mut ctx: Ctx<'_>,
) -> Converted {
    let name = md.name.clone().unwrap_or_default();
    ctx.check_name("metadata.name", &name, NameRule::Subdomain);
    let ns = ctx.namespace(&md);
    let replicas = match replicas {
        None => 1,
        Some(r) if r >= 0 && r.unsigned_abs() <= MAX_REPLICAS => r.unsigned_abs(),
        Some(r) if r >= 0 => {
            ctx.err(
                "spec.replicas",
                ValidateError::TooMany {
                    value: i64::from(r),
                    limit: u64::from(MAX_REPLICAS),
                    what: "replicas per workload",
                },
            );
            0
        }
        Some(r) => {
            ctx.err(
                "spec.replicas",
                ValidateError::Invalid {
                    value: r.to_string(),
                    reason: "must be greater than or equal to 0".into(),
                },
            );
            0
        }
    };
    let Some(template) = template else {
        ctx.err("spec.template", ValidateError::Required);
        return (None, ctx.errors);
    };
    let tmd = template.metadata.clone().unwrap_or_default();
    let mut pod = pod_from_spec(
        &mut ctx,
        "spec.template.",
        ObjectName::new(ns.clone(), name.clone()),
        &tmd,
        template.spec.as_ref(),
    );
    pod.owner = Some(format!("{kind}/{name}"));
    let errors_before = ctx.errors.len();
    let selector = match (selector, rc_selector) {
        (Some(s), _) => ctx.selector("spec.selector", &s),
        // "If the selector is empty, it is defaulted to the labels present on the Pod template."
        (None, Some(m)) if !m.is_empty() => {
            LabelSelector::from_labels(ctx.labels("spec.selector", Some(&m)))
        }
        (None, _) => LabelSelector::from_labels(pod.labels.clone()),
    };
    // An invalid requirement was reported already; it left the selector empty, not the
    // manifest. "empty selector is invalid for deployment" (ReplicaSets say so too),
    // "... for statefulset", "... for daemonset".
    if selector.is_empty() && ctx.errors.len() == errors_before {
        let what = match kind {
            "StatefulSet" => "statefulset",
            "DaemonSet" => "daemonset",
            _ => "deployment",
        };
        ctx.err(
            "spec.selector",
            ValidateError::Invalid {
                value: "{}".into(),
                reason: format!("empty selector is invalid for {what}"),
            },
        );
    } else if !selector.matches(&pod.labels) {
        ctx.err(
            "spec.template.metadata.labels",
            ValidateError::Invalid {
                value: LabelSelector::from_labels(pod.labels.clone()).to_string(),
                reason: format!("`selector` ({selector}) does not match template `labels`"),
            },
        );
    }
    let pinned_node = pod.node_name.is_some();
    let node_selector = template
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    ctx.finish(Object::Workload(Workload {
        kind: kind.to_string(),
        name: ObjectName::new(ns, name),
        replicas,
        template: pod,
        pinned_node,
        first_ordinal: 0,
        node_selector,
    }))
}

/// A StatefulSet: a workload whose Pods are `name-<ordinal>`, each with its own DNS name
/// `name-<ordinal>.<serviceName>` under the headless Service `spec.serviceName`.
fn convert_stateful_set(d: apps::StatefulSet, mut ctx: Ctx<'_>) -> Converted {
    // The application picks the Kubernetes version; `spec` is optional in k8s-openapi's
    // types before 1.37.
    k8s_openapi::k8s_if_le_1_36! { let spec = d.spec.unwrap_or_default(); }
    k8s_openapi::k8s_if_ge_1_37! { let spec = d.spec; }
    // apps validation: "serviceName", when set, must be a DNS-1123 label (it becomes each
    // Pod's spec.subdomain).
    let service_name = spec.service_name.filter(|s| !s.is_empty());
    if let Some(sn) = &service_name
        && let Some(reason) = dns_label_error(sn, false)
    {
        ctx.err(
            "spec.serviceName",
            ValidateError::Invalid {
                value: sn.clone(),
                reason,
            },
        );
    }
    // "ordinals.start ... must be greater than or equal to 0"; Pods are numbered from it.
    let first_ordinal = match spec.ordinals.and_then(|o| o.start) {
        None => 0,
        Some(s) => u32::try_from(s).unwrap_or_else(|_| {
            ctx.err(
                "spec.ordinals.start",
                ValidateError::Invalid {
                    value: s.to_string(),
                    reason: "must be greater than or equal to 0".into(),
                },
            );
            0
        }),
    };
    if let Some(p) = spec
        .pod_management_policy
        .as_deref()
        .filter(|p| !matches!(*p, "OrderedReady" | "Parallel"))
    {
        ctx.err(
            "spec.podManagementPolicy",
            ValidateError::Unsupported {
                value: p.to_string(),
                supported: "\"OrderedReady\", \"Parallel\"",
            },
        );
    }
    let (mut obj, errors) = convert_workload(
        "StatefulSet",
        d.metadata,
        spec.replicas,
        Some(spec.selector),
        None,
        Some(spec.template),
        ctx,
    );
    if let Some(Object::Workload(w)) = &mut obj {
        // The StatefulSet controller sets each Pod's "subdomain" to spec.serviceName (and
        // its hostname to the Pod's name, in Builder::expand).
        w.template.subdomain = service_name;
        w.first_ordinal = first_ordinal;
    }
    (obj, errors)
}

/// A DaemonSet: a workload with one Pod per eligible Node, no replica count.
fn convert_daemon_set(d: apps::DaemonSet, ctx: Ctx<'_>) -> Converted {
    k8s_openapi::k8s_if_le_1_36! { let spec = d.spec.unwrap_or_default(); }
    k8s_openapi::k8s_if_ge_1_37! { let spec = d.spec; }
    let (mut obj, errors) = convert_workload(
        "DaemonSet",
        d.metadata,
        None,
        Some(spec.selector),
        None,
        Some(spec.template),
        ctx,
    );
    if let Some(Object::Workload(w)) = &mut obj {
        w.replicas = 0;
    }
    (obj, errors)
}

/// The Node labels the model knows: what the kubelet sets on every Node
/// (`kubernetes.io/hostname`, `kubernetes.io/os`; svcnat's Nodes are Linux) and the zone.
const KNOWN_NODE_LABELS: [&str; 3] = [
    "kubernetes.io/hostname",
    "kubernetes.io/os",
    "topology.kubernetes.io/zone",
];

/// The value of a known Node label for `node`.
fn node_label<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    match key {
        "kubernetes.io/hostname" => Some(node.name.as_str()),
        "kubernetes.io/os" => Some("linux"),
        "topology.kubernetes.io/zone" => node.zone.as_deref(),
        _ => None,
    }
}

/// Warns about a DaemonSet's `nodeSelector` keys the model has no Node labels for: they
/// are not evaluated (every Node passes them).
fn warn_node_selector(m: &mut Manifests, text: &str, ctx: &Ctx<'_>, d: &apps::DaemonSet) {
    k8s_openapi::k8s_if_le_1_36! { let spec = d.spec.as_ref(); }
    k8s_openapi::k8s_if_ge_1_37! { let spec = Some(&d.spec); }
    let selector = spec
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.node_selector.as_ref());
    for key in selector.into_iter().flat_map(|s| s.keys()) {
        if KNOWN_NODE_LABELS.contains(&key.as_str()) {
            continue;
        }
        let field = format!("spec.template.spec.nodeSelector.{key}");
        m.warnings.push(LoadError {
            file: ctx.file.to_string(),
            line: ctx.doc.line + locate(ctx.file, text, &field).unwrap_or(0),
            document: ctx.doc.index,
            object: Some(ctx.object.clone()),
            field,
            error: ValidateError::Invalid {
                value: key.clone(),
                reason: format!(
                    "not evaluated: Nodes carry only the labels {} here; every Node matches",
                    KNOWN_NODE_LABELS.join(", ")
                ),
            },
        });
    }
}

fn parse_weights(ctx: &mut Ctx<'_>, md: &meta::ObjectMeta) -> BTreeMap<IpAddr, u32> {
    let mut out = BTreeMap::new();
    let Some(spec) = md
        .annotations
        .as_ref()
        .and_then(|a| a.get(WEIGHTS_ANNOTATION))
    else {
        return out;
    };
    let field = format!("metadata.annotations.{WEIGHTS_ANNOTATION}");
    for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parsed = part.split_once('=').and_then(|(ip, w)| {
            Some((
                ip.trim().parse::<IpAddr>().ok()?,
                w.trim().parse::<u32>().ok()?,
            ))
        });
        match parsed {
            Some((ip, w)) if w <= 1_000_000 => {
                out.insert(ip, w);
            }
            _ => ctx.err(
                field.clone(),
                ValidateError::Invalid {
                    value: part.to_string(),
                    reason: "must be ip=weight with a weight between 0 and 1000000".into(),
                },
            ),
        }
    }
    out
}

fn convert_endpoints(e: corev1::Endpoints, mut ctx: Ctx<'_>) -> Converted {
    let md = &e.metadata;
    let name = md.name.clone().unwrap_or_default();
    ctx.check_name("metadata.name", &name, NameRule::Label1035);
    let ns = ctx.namespace(md);
    let weights = parse_weights(&mut ctx, md);
    let service = ObjectName::new(ns, name.clone());
    let mut slices = Vec::new();
    for (si, subset) in e.subsets.iter().flatten().enumerate() {
        let f = format!("subsets[{si}]");
        let mut ports = Vec::new();
        for (pi, p) in subset.ports.iter().flatten().enumerate() {
            let pf = format!("{f}.ports[{pi}]");
            let (Some(port), Some(protocol)) = (
                ctx.port(&format!("{pf}.port"), p.port),
                ctx.protocol(&format!("{pf}.protocol"), p.protocol.as_ref()),
            ) else {
                continue;
            };
            ports.push(EndpointPort {
                name: p.name.clone().unwrap_or_default(),
                port,
                protocol,
            });
        }
        let mut endpoints = Vec::new();
        let lists = [
            (true, "addresses", subset.addresses.as_ref()),
            (
                false,
                "notReadyAddresses",
                subset.not_ready_addresses.as_ref(),
            ),
        ];
        for (ready, list_name, list) in lists {
            for (ai, a) in list.into_iter().flatten().enumerate() {
                let Some(ip) = ctx.ip(&format!("{f}.{list_name}[{ai}].ip"), &a.ip) else {
                    continue;
                };
                endpoints.push(Endpoint {
                    ip,
                    ready,
                    serving: ready,
                    terminating: false,
                    node_name: a.node_name.clone(),
                    zone: None,
                    hostname: a.hostname.clone(),
                    pod: a
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .and_then(|r| r.name.clone()),
                    weight: weights.get(&ip).copied().unwrap_or(DEFAULT_WEIGHT),
                    zone_hints: Vec::new(),
                    node_hints: Vec::new(),
                });
            }
        }
        slices.push(EndpointSlice {
            service: service.clone(),
            name: format!("{name}-subset-{si}"),
            endpoints,
            ports,
        });
    }
    ctx.finish(Object::Slices(slices))
}

fn convert_slice(e: discovery::EndpointSlice, mut ctx: Ctx<'_>) -> Converted {
    let md = &e.metadata;
    let name = md.name.clone().unwrap_or_default();
    ctx.check_name("metadata.name", &name, NameRule::Subdomain);
    let ns = ctx.namespace(md);
    let weights = parse_weights(&mut ctx, md);
    let svc_name = md
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .unwrap_or_default();
    if svc_name.is_empty() {
        ctx.err(
            format!("metadata.labels.{SERVICE_NAME_LABEL}"),
            ValidateError::Required,
        );
    }
    let family = match e.address_type.as_str() {
        "IPv4" => Some(IpFamily::V4),
        "IPv6" => Some(IpFamily::V6),
        "FQDN" => None,
        other => {
            ctx.err(
                "addressType",
                ValidateError::Unsupported {
                    value: other.to_string(),
                    supported: "\"FQDN\", \"IPv4\", \"IPv6\"",
                },
            );
            None
        }
    };
    let mut endpoints = Vec::new();
    if family.is_some() {
        // `endpoints` is optional in k8s-openapi's types from 1.36 on.
        k8s_openapi::k8s_if_le_1_35! { let slice_endpoints: &[discovery::Endpoint] = &e.endpoints; }
        k8s_openapi::k8s_if_ge_1_36! { let slice_endpoints = e.endpoints.as_deref().unwrap_or_default(); }
        for (i, ep) in slice_endpoints.iter().enumerate() {
            let c = ep.conditions.clone().unwrap_or_default();
            // "ready ... nil should be interpreted as true"; "serving ... nil should be
            // interpreted as ready"; "terminating ... nil should be interpreted as false".
            let ready = c.ready.unwrap_or(true);
            let serving = c.serving.unwrap_or(ready);
            let terminating = c.terminating.unwrap_or(false);
            for (ai, a) in ep.addresses.iter().enumerate() {
                let f = format!("endpoints[{i}].addresses[{ai}]");
                let Some(ip) = ctx.ip(&f, a) else { continue };
                if Some(IpFamily::of(&ip)) != family {
                    ctx.err(
                        f,
                        ValidateError::Invalid {
                            value: a.to_string(),
                            reason: format!("must be an {} address", e.address_type),
                        },
                    );
                    continue;
                }
                endpoints.push(Endpoint {
                    ip,
                    ready,
                    serving,
                    terminating,
                    node_name: ep.node_name.clone(),
                    zone: ep.zone.clone(),
                    hostname: ep.hostname.clone(),
                    pod: ep
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .and_then(|r| r.name.clone()),
                    weight: weights.get(&ip).copied().unwrap_or(DEFAULT_WEIGHT),
                    zone_hints: ep
                        .hints
                        .iter()
                        .flat_map(|h| h.for_zones.iter().flatten())
                        .map(|z| z.name.clone())
                        .collect(),
                    node_hints: ep
                        .hints
                        .iter()
                        .flat_map(|h| h.for_nodes.iter().flatten())
                        .map(|n| n.name.clone())
                        .collect(),
                });
            }
        }
    }
    let mut ports = Vec::new();
    for (i, p) in e.ports.iter().flatten().enumerate() {
        let f = format!("ports[{i}]");
        let Some(port) = p.port else {
            ctx.err(format!("{f}.port"), ValidateError::Required);
            continue;
        };
        let (Some(port), Some(protocol)) = (
            ctx.port(&format!("{f}.port"), port),
            ctx.protocol(&format!("{f}.protocol"), p.protocol.as_ref()),
        ) else {
            continue;
        };
        ports.push(EndpointPort {
            name: p.name.clone().unwrap_or_default(),
            port,
            protocol,
        });
    }
    ctx.finish(Object::Slices(vec![EndpointSlice {
        service: ObjectName::new(ns, svc_name),
        name,
        endpoints,
        ports,
    }]))
}

fn convert_node(n: corev1::Node, mut ctx: Ctx<'_>) -> Converted {
    let name = n.metadata.name.clone().unwrap_or_default();
    ctx.check_name("metadata.name", &name, NameRule::Subdomain);
    let mut node = Node::new(name);
    node.zone = n
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("topology.kubernetes.io/zone"))
        .cloned();
    node.terminating = n.metadata.deletion_timestamp.is_some()
        || n.spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    if let Some(spec) = &n.spec {
        let mut cidrs: Vec<String> = spec.pod_cidrs.clone().unwrap_or_default();
        if let Some(c) = spec.pod_cidr.as_ref().filter(|c| !c.is_empty())
            && !cidrs.contains(c)
        {
            cidrs.insert(0, c.clone());
        }
        for (i, c) in cidrs.iter().enumerate() {
            if let Some(n) = ctx.cidr(&format!("spec.podCIDRs[{i}]"), c) {
                node.pod_cidrs.push(n);
            }
        }
    }
    for (i, a) in n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        if (a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            && let Some(ip) = ctx.ip(&format!("status.addresses[{i}].address"), &a.address)
        {
            node.addresses.push(ip);
        }
    }
    ctx.finish(Object::Node(node))
}

/// Allocation state while building a cluster.
struct Builder<'a> {
    config: &'a ClusterConfig,
    nodes: BTreeMap<String, Node>,
    cluster_ips: BTreeMap<IpAddr, ServiceName>,
    node_ports: BTreeMap<(u16, Protocol), ServiceName>,
    health_ports: BTreeMap<u16, ServiceName>,
    used_pod_ips: BTreeSet<IpAddr>,
    /// Where each Service holding something is defined (`file:line`), for the errors of
    /// later claimants.
    defined_at: BTreeMap<ServiceName, String>,
}

type FieldError = (String, ValidateError);

impl<'a> Builder<'a> {
    fn new(config: &'a ClusterConfig) -> Self {
        Builder {
            config,
            nodes: BTreeMap::new(),
            cluster_ips: BTreeMap::new(),
            node_ports: BTreeMap::new(),
            health_ports: BTreeMap::new(),
            used_pod_ips: BTreeSet::new(),
            defined_at: BTreeMap::new(),
        }
    }

    /// Gives each Node without a pod CIDR the i-th subnet of the cluster's pod CIDRs.
    fn assign_node_cidrs(&mut self) {
        let taken: BTreeSet<IpNet> = self
            .nodes
            .values()
            .flat_map(|n| n.pod_cidrs.clone())
            .collect();
        let mut next = 0u32;
        for node in self.nodes.values_mut() {
            if !node.pod_cidrs.is_empty() {
                continue;
            }
            loop {
                let cidrs: Vec<IpNet> = self
                    .config
                    .pod_cidrs
                    .iter()
                    .filter_map(|c| nth_subnet(c, next))
                    .collect();
                next += 1;
                if cidrs.is_empty() {
                    break;
                }
                if cidrs.iter().all(|c| !taken.contains(c)) {
                    node.pod_cidrs = cidrs;
                    break;
                }
            }
        }
    }

    fn range_text(&self) -> String {
        self.config
            .service_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The holder of something, for an error: `default/b in b.yaml:4`.
    fn holder(&self, owner: &ServiceName) -> String {
        match self.defined_at.get(owner) {
            Some(at) => format!("{owner} in {at}"),
            None => owner.to_string(),
        }
    }

    fn reserve_service(&mut self, svc: &Service, at: &str) -> Result<(), FieldError> {
        for (i, ip) in svc.cluster_ips.iter().enumerate() {
            let field = if i == 0 {
                "spec.clusterIP".to_string()
            } else {
                format!("spec.clusterIPs[{i}]")
            };
            if !self.config.service_cidrs.iter().any(|c| c.contains(ip)) {
                return Err((
                    field,
                    ValidateError::ClusterIpOutOfRange {
                        ip: *ip,
                        range: self.range_text(),
                    },
                ));
            }
            if let Some(owner) = self.cluster_ips.get(ip) {
                return Err((
                    field,
                    ValidateError::ClusterIpAllocated {
                        ip: *ip,
                        owner: self.holder(owner),
                    },
                ));
            }
        }
        for (i, p) in svc.ports.iter().enumerate() {
            if let Some(np) = p.node_port
                && let Some(owner) = self.node_ports.get(&(np, p.protocol))
            {
                return Err((
                    format!("spec.ports[{i}].nodePort"),
                    ValidateError::NodePortAllocated {
                        port: np,
                        owner: self.holder(owner),
                    },
                ));
            }
        }
        if let Some(h) = svc.health_check_node_port
            && let Some(owner) = self
                .health_ports
                .get(&h)
                .or_else(|| self.node_ports.get(&(h, Protocol::Tcp)))
        {
            return Err((
                "spec.healthCheckNodePort".into(),
                ValidateError::NodePortAllocated {
                    port: h,
                    owner: self.holder(owner),
                },
            ));
        }
        self.defined_at.insert(svc.name.clone(), at.to_string());
        for ip in &svc.cluster_ips {
            self.cluster_ips.insert(*ip, svc.name.clone());
        }
        for p in &svc.ports {
            if let Some(np) = p.node_port {
                self.node_ports.insert((np, p.protocol), svc.name.clone());
            }
        }
        if let Some(h) = svc.health_check_node_port {
            self.health_ports.insert(h, svc.name.clone());
        }
        Ok(())
    }

    fn release_service(&mut self, svc: &Service) {
        self.cluster_ips.retain(|_, o| o != &svc.name);
        self.node_ports.retain(|_, o| o != &svc.name);
        self.health_ports.retain(|_, o| o != &svc.name);
    }

    fn allocate_service(&mut self, svc: &mut Service) -> Result<(), FieldError> {
        if svc.headless
            && svc.ip_families.is_empty()
            && let Some(first) = self.config.service_cidrs.first()
        {
            // The API server gives a headless Service the cluster's primary family.
            svc.ip_families.push(family_of_net(first));
        }
        if svc.is_proxied() && svc.cluster_ips.is_empty() {
            // Families to allocate: the requested ones, else the primary service CIDR's;
            // PreferDualStack and RequireDualStack add the other family when configured.
            let mut families = svc.ip_families.clone();
            if families.is_empty()
                && let Some(first) = self.config.service_cidrs.first()
            {
                families.push(family_of_net(first));
            }
            if svc.ip_family_policy != IpFamilyPolicy::SingleStack {
                for c in &self.config.service_cidrs {
                    let f = family_of_net(c);
                    if !families.contains(&f) {
                        families.push(f);
                    }
                }
            }
            for fam in families {
                let Some(cidr) = self
                    .config
                    .service_cidrs
                    .iter()
                    .find(|c| family_of_net(c) == fam)
                    .copied()
                else {
                    if svc.ip_family_policy == IpFamilyPolicy::PreferDualStack
                        && !svc.cluster_ips.is_empty()
                    {
                        continue;
                    }
                    return Err((
                        "spec.ipFamilies".into(),
                        ValidateError::Invalid {
                            value: fam.as_str().into(),
                            reason: "the cluster has no service CIDR of this family".into(),
                        },
                    ));
                };
                let seed = format!("{}", svc.name);
                let taken = &self.cluster_ips;
                let ip =
                    probe_addr(&cidr, &seed, 16, |ip| taken.contains_key(ip)).ok_or_else(|| {
                        (
                            "spec.clusterIP".to_string(),
                            ValidateError::Exhausted {
                                what: "cluster IPs",
                                range: cidr.to_string(),
                            },
                        )
                    })?;
                self.cluster_ips.insert(ip, svc.name.clone());
                svc.cluster_ips.push(ip);
            }
            svc.ip_families = svc.cluster_ips.iter().map(IpFamily::of).collect();
        }
        if svc.service_type.has_node_ports() {
            let (min, max) = self.config.node_port_range;
            for i in 0..svc.ports.len() {
                let Some(p) = svc.ports.get(i).cloned() else {
                    continue;
                };
                if p.node_port.is_some() {
                    continue;
                }
                let seed = format!("{}:{}:{}", svc.name, p.port, p.protocol);
                let np = self.probe_port(min, max, &seed).ok_or_else(|| {
                    (
                        format!("spec.ports[{i}].nodePort"),
                        ValidateError::Exhausted {
                            what: "node ports",
                            range: format!("{min}-{max}"),
                        },
                    )
                })?;
                self.node_ports.insert((np, p.protocol), svc.name.clone());
                if let Some(sp) = svc.ports.get_mut(i) {
                    sp.node_port = Some(np);
                }
            }
            if svc.service_type == ServiceType::LoadBalancer
                && svc.external_traffic_policy == TrafficPolicy::Local
                && svc.health_check_node_port.is_none()
            {
                let seed = format!("{}:healthcheck", svc.name);
                let h = self.probe_port(min, max, &seed).ok_or_else(|| {
                    (
                        "spec.healthCheckNodePort".to_string(),
                        ValidateError::Exhausted {
                            what: "node ports",
                            range: format!("{min}-{max}"),
                        },
                    )
                })?;
                self.health_ports.insert(h, svc.name.clone());
                svc.health_check_node_port = Some(h);
            }
        }
        Ok(())
    }

    /// A free node port for `seed`: a hashed start in the range, then linear probing.
    fn probe_port(&self, min: u16, max: u16, seed: &str) -> Option<u16> {
        let span = u64::from(max.saturating_sub(min)) + 1;
        let start = hash64(seed) % span;
        let used: BTreeSet<u16> = self
            .node_ports
            .keys()
            .map(|(p, _)| *p)
            .chain(self.health_ports.keys().copied())
            .collect();
        (0..span)
            .map(|i| min.wrapping_add(((start + i) % span) as u16))
            .find(|np| !used.contains(np))
    }

    /// The Node of replica `i` of a workload: round-robin over the Nodes in name order,
    /// starting at one chosen by hashing the workload's kind, namespace and name. Each
    /// workload's placement depends on nothing but itself and the Nodes (scaling one never
    /// moves another's Pods, and their IPs with them), and single-replica workloads spread
    /// over the Nodes instead of all landing on the first, as the scheduler spreads them.
    fn node_for(&self, w: &Workload, i: u32) -> Option<String> {
        let n = self.nodes.len();
        if n == 0 || w.pinned_node {
            return None;
        }
        let digest = Sha256::digest(format!("{}/{}", w.kind, w.name).as_bytes());
        let start = u64::from_be_bytes(digest[..8].try_into().unwrap_or_default());
        let at = (start % n as u64) as usize + i as usize % n;
        self.nodes.keys().nth(at % n).cloned()
    }

    /// Replicas of a workload as Pods, placed by [`Builder::node_for`]; a DaemonSet's, one
    /// on each eligible Node.
    fn expand(&self, w: &Workload) -> Vec<Pod> {
        match w.kind.as_str() {
            "StatefulSet" => return self.expand_stateful_set(w),
            "DaemonSet" => return self.expand_daemon_set(w),
            _ => {}
        }
        let template_hash = {
            let h = Sha256::digest(format!("{:?}", w.template.labels).as_bytes());
            safe_suffix(&h, 10)
        };
        (0..w.replicas)
            .map(|i| {
                let mut p = w.template.clone();
                let digest = Sha256::digest(format!("{}/{}#{i}", w.kind, w.name).as_bytes());
                let suffix = safe_suffix(&digest, 5);
                p.name.name = if w.kind == "Deployment" {
                    format!("{}-{template_hash}-{suffix}", w.name.name)
                } else {
                    format!("{}-{suffix}", w.name.name)
                };
                if let Some(node) = self.node_for(w, i) {
                    p.node_name = Some(node);
                }
                p
            })
            .collect()
    }

    /// A StatefulSet's Pods: "Each Pod in a StatefulSet derives its hostname from the name
    /// of the StatefulSet and the ordinal of the Pod. The pattern for the constructed
    /// hostname is $(statefulset name)-$(ordinal)"; the subdomain is `spec.serviceName`.
    fn expand_stateful_set(&self, w: &Workload) -> Vec<Pod> {
        (0..w.replicas)
            .map(|i| {
                let mut p = w.template.clone();
                let name = format!(
                    "{}-{}",
                    w.name.name,
                    u64::from(w.first_ordinal) + u64::from(i)
                );
                p.hostname = Some(name.clone());
                p.name.name = name;
                if let Some(node) = self.node_for(w, i) {
                    p.node_name = Some(node);
                }
                p
            })
            .collect()
    }

    /// A DaemonSet's Pods: one on every Node that the template's `nodeSelector` (as far as
    /// the model knows the Node's labels) and `nodeName` allow, named after the DaemonSet
    /// with a suffix derived from the Node.
    fn expand_daemon_set(&self, w: &Workload) -> Vec<Pod> {
        self.nodes
            .values()
            .filter(|n| {
                // The DaemonSet controller: a template's nodeName limits it to that Node;
                // "nodeSelector ... must match a node's labels for the pod to be scheduled".
                (!w.pinned_node || w.template.node_name.as_deref() == Some(n.name.as_str()))
                    && w.node_selector.iter().all(|(k, v)| match node_label(n, k) {
                        Some(have) => have == v,
                        // A Node without a zone lacks that label; a key the model keeps
                        // no labels for is not evaluated (a load warning says so).
                        None => !KNOWN_NODE_LABELS.contains(&k.as_str()),
                    })
            })
            .map(|n| {
                let mut p = w.template.clone();
                let digest = Sha256::digest(format!("{}/{}@{}", w.kind, w.name, n.name).as_bytes());
                p.name.name = format!("{}-{}", w.name.name, safe_suffix(&digest, 5));
                p.node_name = Some(n.name.clone());
                p
            })
            .collect()
    }

    fn allocate_pod_ip(&mut self, p: &mut Pod) -> Result<(), ValidateError> {
        let cidrs: Vec<IpNet> = match p.node_name.as_ref().and_then(|n| self.nodes.get(n)) {
            Some(node) if !node.pod_cidrs.is_empty() => node.pod_cidrs.clone(),
            _ => self.config.pod_cidrs.clone(),
        };
        for cidr in cidrs {
            let seed = p.name.to_string();
            let used = &self.used_pod_ips;
            // Skip the network address and the first host (the node's bridge/gateway).
            let ip = probe_addr(&cidr, &seed, 2, |ip| used.contains(ip)).ok_or(
                ValidateError::Exhausted {
                    what: "pod IPs",
                    range: cidr.to_string(),
                },
            )?;
            self.used_pod_ips.insert(ip);
            p.ips.push(ip);
        }
        Ok(())
    }
}

fn family_of_net(n: &IpNet) -> IpFamily {
    match n {
        IpNet::V4(_) => IpFamily::V4,
        IpNet::V6(_) => IpFamily::V6,
    }
}

/// The i-th /24 (IPv4) or /80 (IPv6) of a pod CIDR.
fn nth_subnet(c: &IpNet, i: u32) -> Option<IpNet> {
    match c {
        IpNet::V4(n) => {
            let len = n.prefix_len().max(8);
            if len > 24 {
                return (i == 0).then_some(*c);
            }
            let count = 1u64 << (24 - len);
            if u64::from(i) >= count {
                return None;
            }
            let base = u32::from(n.network()) + (i << 8);
            ipnet::Ipv4Net::new(Ipv4Addr::from(base), 24)
                .ok()
                .map(IpNet::V4)
        }
        IpNet::V6(n) => {
            let len = n.prefix_len();
            if len > 80 {
                return (i == 0).then_some(*c);
            }
            let bits = (80 - len).min(32);
            if bits < 32 && u64::from(i) >= (1u64 << bits) {
                return None;
            }
            let base = u128::from(n.network()) + (u128::from(i) << 48);
            ipnet::Ipv6Net::new(Ipv6Addr::from(base), 80)
                .ok()
                .map(IpNet::V6)
        }
    }
}

/// A stable 64-bit hash of a string (first 8 bytes of SHA-256).
fn hash64(s: &str) -> u64 {
    let d = Sha256::digest(s.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// Picks an address in `cidr` for `seed`: a hashed start, then linear probing. Skips the
/// first `skip` addresses and the last one (broadcast for IPv4).
fn probe_addr(
    cidr: &IpNet,
    seed: &str,
    skip: u64,
    taken: impl Fn(&IpAddr) -> bool,
) -> Option<IpAddr> {
    let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len()).min(63);
    let size = 1u64 << host_bits;
    if size <= skip + 1 {
        return None;
    }
    let span = size - skip - 1;
    let start = hash64(seed) % span;
    for i in 0..span.min(1 << 20) {
        let off = skip + (start + i) % span;
        let ip = match cidr {
            IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(
                u32::from(n.network()).wrapping_add(off as u32),
            )),
            IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(
                u128::from(n.network()).wrapping_add(u128::from(off)),
            )),
        };
        if !taken(&ip) {
            return Some(ip);
        }
    }
    None
}

/// kube's random-suffix alphabet (no vowels, no confusable characters).
fn safe_suffix(bytes: &[u8], n: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    bytes
        .iter()
        .take(n)
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn flow_nesting_is_measured_only_where_flow_collections_start() {
        let deep = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
        let doc = |value: &str| format!("kind: Service\nspec:\n  x: {value}\n");
        assert_eq!(super::flow_nesting_over(&doc(&deep(128)), 128), None);
        assert_eq!(super::flow_nesting_over(&doc(&deep(129)), 128), Some(2));
        // Nesting that spans lines and mixes maps and sequences.
        let mixed = format!("a:\n  - {}\n{}\n", "{b: [".repeat(70), "]}".repeat(70));
        assert_eq!(super::flow_nesting_over(&mixed, 128), Some(1));
        // Brackets that are not flow collections: scalars of every style, comments,
        // anchors' names, keys.
        let b = "[".repeat(300);
        for text in [
            format!("a: x{b}\n"),
            format!("a: \"{b}\"\n"),
            format!("a: '{b}'\n"),
            format!("a: [\"{b}\", '{b}']\n"),
            format!("a: 1 # {b}\n"),
            format!("a: |\n  {b}\n  {b}\nb: 1\n"),
            format!("- >-\n    {b}\n"),
            format!("a: long plain\n  {b} continued\n"),
            format!("\"{b}\": 1\n"),
            format!("a: \"multi\n  {b}\"\n"),
        ] {
            assert_eq!(super::flow_nesting_over(&text, 128), None, "{text}");
        }
        // Whatever it refuses, the decoder refuses too.
        for d in [129, 200] {
            let text = doc(&deep(d));
            assert!(super::flow_nesting_over(&text, 128).is_some());
            assert!(serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text).is_err());
        }
        assert!(serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&doc(&deep(120))).is_ok());
    }

    use super::*;

    /// What strict field validation rests on: k8s-openapi's Deserialize impls skip unknown
    /// fields with `IgnoredAny`, and `serde_ignored` reports each of them with its path,
    /// through serde_yaml_ng's and serde_json's deserializers alike.
    #[test]
    fn serde_ignored_reports_unknown_fields_of_k8s_openapi_types() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: a, nmae: b}\nspec:\n  ipFamily: IPv4\n  ports:\n  - port: 80\n    protocl: TCP\n";
        let mut seen = Vec::new();
        let de = serde_yaml_ng::Deserializer::from_str(yaml);
        let svc: Result<corev1::Service, _> =
            serde_ignored::deserialize(de, |p| seen.push(api_path(&p)));
        assert!(svc.is_ok(), "{svc:?}");
        assert_eq!(
            seen,
            ["metadata.nmae", "spec.ipFamily", "spec.ports[0].protocl"]
        );
        let json = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
            "spec": {"ports": [{"port": 80}, {"port": 81, "nodeport": 1}]}}"#;
        let mut seen = Vec::new();
        let de = &mut serde_json::Deserializer::from_str(json);
        let svc: Result<corev1::Service, _> =
            serde_ignored::deserialize(de, |p| seen.push(api_path(&p)));
        assert!(svc.is_ok(), "{svc:?}");
        assert_eq!(seen, ["spec.ports[1].nodeport"]);
    }

    const LAB_VOTE: &str = "---
apiVersion: v1
kind: Service
metadata:
  name: vote
  labels:
    role: vote
spec:
  selector:
    role: vote
  ports:
    - port: 80
      targetPort: 80
      nodePort: 30000
  type: NodePort
";

    fn lab_config() -> ClusterConfig {
        ClusterConfig {
            default_namespace: "instavote".into(),
            ..ClusterConfig::default()
        }
    }

    #[test]
    fn loads_the_lab_vote_service() {
        let cfg = lab_config();
        let mut m = Manifests::from_files([("vote-svc.yaml", LAB_VOTE)], &cfg);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let c = m.build(&cfg);
        let svc = c
            .service(&ObjectName::new("instavote", "vote"))
            .expect("vote");
        assert_eq!(svc.service_type, ServiceType::NodePort);
        assert_eq!(svc.ports[0].node_port, Some(30000));
        assert_eq!(svc.ports[0].target_port, TargetPort::Number(80));
        let ip = svc.cluster_ip().expect("allocated");
        assert!(cfg.service_cidrs[0].contains(&ip));
    }

    #[test]
    fn splits_documents_with_lines() {
        let docs = split_documents("# c\n---\na: 1\n---\n\n# only comment\n---\nb: 2\nc: 3\n...\n");
        assert_eq!(docs.len(), 2);
        assert_eq!(
            (docs[0].index, docs[0].line, docs[0].text.as_str()),
            (0, 3, "a: 1\n")
        );
        assert_eq!((docs[1].index, docs[1].line), (1, 8));
    }

    #[test]
    fn locates_fields() {
        let doc = LAB_VOTE.trim_start_matches("---\n");
        assert_eq!(locate_field(doc, "spec.ports[0].nodePort"), Some(12));
        assert_eq!(locate_field(doc, "spec.ports[0].port"), Some(10));
        assert_eq!(locate_field(doc, "spec.type"), Some(13));
        assert_eq!(locate_field(doc, "metadata.labels.role"), Some(5));
        assert_eq!(locate_field(doc, "spec.selector.role"), Some(8));
        let two = "spec:\n  ports:\n  - name: a\n    port: 1\n  - name: b\n    port: 2\n    nodePort: 5\n";
        assert_eq!(locate_field(two, "spec.ports[1].nodePort"), Some(6));
        assert_eq!(locate_field(two, "spec.ports[1].name"), Some(4));
        assert_eq!(locate_field(two, "spec.ports[0].port"), Some(3));
    }

    #[test]
    fn one_bad_service_does_not_stop_the_others() {
        let text = format!(
            "{LAB_VOTE}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: bad\nspec:\n  type: NodePort\n  ports:\n  - port: 80\n    nodePort: 80\n"
        );
        let cfg = lab_config();
        let mut m = Manifests::from_files([("svc.yaml", text.as_str())], &cfg);
        assert_eq!(m.errors.len(), 1);
        let e = &m.errors[0];
        assert_eq!(
            e.to_string(),
            "svc.yaml:25: document 1: Service instavote/bad: spec.ports[0].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-32767"
        );
        let c = m.build(&cfg);
        assert_eq!(c.services().count(), 1);
    }

    #[test]
    fn node_port_clash_rejects_the_later_service() {
        let other = LAB_VOTE.replace("name: vote", "name: vote2");
        let cfg = lab_config();
        let mut m = Manifests::from_files([("a.yaml", LAB_VOTE), ("b.yaml", other.as_str())], &cfg);
        let c = m.build(&cfg);
        assert_eq!(c.services().count(), 1);
        assert_eq!(m.errors.len(), 1);
        assert_eq!(
            m.errors[0].to_string(),
            "b.yaml:14: document 0: Service instavote/vote2: spec.ports[0].nodePort: Invalid value: 30000: provided port is already allocated (to Service instavote/vote in a.yaml:2)"
        );
    }

    fn clash_svc(name: &str, ip: &str, node_port: u16) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: NodePort\n  \
             clusterIP: {ip}\n  ports: [{{port: 80, nodePort: {node_port}}}]\n"
        )
    }

    fn services_of(c: &Cluster) -> Vec<(String, String, u16)> {
        c.services()
            .map(|s| {
                (
                    s.name.name.clone(),
                    s.cluster_ips[0].to_string(),
                    s.ports[0].node_port.unwrap_or(0),
                )
            })
            .collect()
    }

    #[test]
    fn the_first_claimant_keeps_names_ips_and_ports_and_only_clashes_are_refused() {
        let cfg = ClusterConfig::default();
        let a = [
            clash_svc("x", "10.96.0.10", 30000),
            clash_svc("ok", "10.96.0.11", 30001),
        ]
        .concat();
        let b = [
            clash_svc("x", "10.96.0.20", 30020),
            clash_svc("y", "10.96.0.10", 30021),
            clash_svc("z", "10.96.0.22", 30000),
            clash_svc("w", "10.96.0.23", 30023),
        ]
        .concat();
        let load = |files: &[(&str, &str)]| {
            let mut m = Manifests::from_files(files.iter().copied(), &cfg);
            let c = m.build(&cfg);
            let errors: Vec<String> = m.errors.iter().map(ToString::to_string).collect();
            (services_of(&c), errors)
        };
        let (services, errors) = load(&[("a.yaml", &a), ("b.yaml", &b)]);
        assert_eq!(
            services,
            [
                ("ok".to_string(), "10.96.0.11".to_string(), 30001),
                ("w".to_string(), "10.96.0.23".to_string(), 30023),
                ("x".to_string(), "10.96.0.10".to_string(), 30000),
            ],
            "file-mates of refused objects stay"
        );
        assert_eq!(
            errors,
            [
                "b.yaml:2: document 0: Service default/x: metadata.name: services \"x\" already exists (defined at a.yaml:2)",
                "b.yaml:15: document 1: Service default/y: spec.clusterIP: Invalid value: 10.96.0.10: provided IP is already allocated (to Service default/x in a.yaml:2)",
                "b.yaml:24: document 2: Service default/z: spec.ports[0].nodePort: Invalid value: 30000: provided port is already allocated (to Service default/x in a.yaml:2)",
            ]
        );
        // An unrelated file loaded in between changes nothing of who holds what.
        let c = clash_svc("c", "10.96.0.30", 30030);
        let (with_c, errors_c) = load(&[("a.yaml", &a), ("b.yaml", &b), ("c.yaml", &c)]);
        assert_eq!(with_c.len(), 4);
        assert!(with_c.contains(&("x".to_string(), "10.96.0.10".to_string(), 30000)));
        assert_eq!(errors_c, errors);
    }

    #[test]
    fn replicas_over_the_limit_are_refused_by_name() {
        let cfg = ClusterConfig::default();
        let deploy = |n: u32| {
            format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: huge}}\nspec:\n  replicas: {n}\n  \
                 selector: {{matchLabels: {{app: h}}}}\n  template:\n    metadata: {{labels: {{app: h}}}}\n    \
                 spec: {{containers: [{{name: c, image: x}}]}}\n"
            )
        };
        let text = deploy(70_000);
        let m = Manifests::from_files([("big.yaml", text.as_str())], &cfg);
        assert!(m.objects.is_empty());
        assert_eq!(
            m.errors[0].to_string(),
            "big.yaml:5: document 0: Deployment default/huge: spec.replicas: Too many: 70000: must be at most 10000 (replicas per workload)"
        );
        let text = deploy(MAX_REPLICAS);
        let m = Manifests::from_files([("big.yaml", text.as_str())], &cfg);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
    }

    #[test]
    fn deployment_expands_into_pods_on_nodes() {
        let text = "apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 192.168.50.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
status: {addresses: [{type: InternalIP, address: 192.168.50.12}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: vote}
spec:
  replicas: 5
  selector: {matchLabels: {role: vote}}
  template:
    metadata: {labels: {role: vote}}
    spec:
      containers:
      - name: app
        image: schoolofdevops/vote:v1
        ports: [{containerPort: 80}]
";
        let cfg = lab_config();
        let mut m = Manifests::from_files([("lab.yaml", text)], &cfg);
        let c = m.build(&cfg);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let pods: Vec<_> = c.pods().collect();
        assert_eq!(pods.len(), 5);
        let on1 = pods
            .iter()
            .filter(|p| p.node_name.as_deref() == Some("node-1"))
            .count();
        assert!(
            on1 == 2 || on1 == 3,
            "round-robin over two nodes: {on1} on node-1"
        );
        for p in &pods {
            let node = c
                .node(p.node_name.as_deref().expect("placed"))
                .expect("node");
            assert!(node.pod_cidrs[0].contains(&p.ips[0]), "{p:?} in {node:?}");
            assert!(p.name.name.starts_with("vote-"));
        }
        // Deterministic: loading again gives the same names and addresses.
        let mut m2 = Manifests::from_files([("lab.yaml", text)], &cfg);
        let c2 = m2.build(&cfg);
        let a: Vec<_> = c.pods().map(|p| (p.name.clone(), p.ips.clone())).collect();
        let b: Vec<_> = c2.pods().map(|p| (p.name.clone(), p.ips.clone())).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn single_replica_workloads_spread_and_scaling_one_moves_no_other() {
        // The lab's shape: several one-replica Deployments on two Nodes. They must not all
        // land on the first Node, and scaling one must leave the others where they are
        // (same Node, same IP).
        let deployment = |name: &str, replicas: u32| {
            format!(
                "---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers: [{{name: app, image: app:v1}}]
"
            )
        };
        let nodes = "apiVersion: v1
kind: Node
metadata: {name: node-1}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
";
        let names = [
            "vote", "redis", "worker", "db", "result", "web", "api", "cache",
        ];
        let world = |scale_vote: u32| {
            let mut text = nodes.to_string();
            for n in names {
                text.push_str(&deployment(n, if n == "vote" { scale_vote } else { 1 }));
            }
            let cfg = lab_config();
            let mut m = Manifests::from_files([("lab.yaml", text.as_str())], &cfg);
            let c = m.build(&cfg);
            assert!(m.errors.is_empty(), "{:?}", m.errors);
            c.pods()
                .map(|p| (p.name.name.clone(), (p.node_name.clone(), p.ips.clone())))
                .collect::<BTreeMap<_, _>>()
        };
        let before = world(1);
        let used: BTreeSet<_> = before.values().map(|(n, _)| n.clone()).collect();
        assert_eq!(
            used.len(),
            2,
            "every single replica on one node: {before:?}"
        );
        let after = world(4);
        assert_eq!(after.len(), before.len() + 3);
        for (name, place) in &before {
            if !name.starts_with("vote-") {
                assert_eq!(after.get(name), Some(place), "{name} moved");
            }
        }
    }
}
