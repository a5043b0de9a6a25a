//! The fake API server's storage: objects by resource, a global resource version, the
//! history of changes a watch replays, and what the API server writes into an object on
//! create and update (metadata, defaults, managedFields).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value, json};

use super::FakeApiError;

/// A resource the fake API server serves.
#[derive(Debug)]
pub(crate) struct ResourceInfo {
    /// URL name (`services`).
    pub(crate) plural: &'static str,
    /// Singular name in discovery (`service`).
    pub(crate) singular: &'static str,
    /// Object kind (`Service`).
    pub(crate) kind: &'static str,
    /// `apiVersion` of its objects (`v1`, `discovery.k8s.io/v1`).
    pub(crate) api_version: &'static str,
    /// Whether objects live in a namespace.
    pub(crate) namespaced: bool,
    /// Short names in discovery.
    pub(crate) short_names: &'static [&'static str],
    /// Fields the API server accepts in a field selector for this resource.
    pub(crate) fields: &'static [&'static str],
}

/// Everything served: core/v1 services, nodes, pods, namespaces; discovery.k8s.io/v1
/// endpointslices.
pub(crate) const RESOURCES: &[ResourceInfo] = &[
    ResourceInfo {
        plural: "services",
        singular: "service",
        kind: "Service",
        api_version: "v1",
        namespaced: true,
        short_names: &["svc"],
        // pkg/registry/core/service: ObjectMetaFieldsSet only.
        fields: &["metadata.name", "metadata.namespace"],
    },
    ResourceInfo {
        plural: "nodes",
        singular: "node",
        kind: "Node",
        api_version: "v1",
        namespaced: false,
        short_names: &["no"],
        fields: &["metadata.name", "spec.unschedulable"],
    },
    ResourceInfo {
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        api_version: "v1",
        namespaced: true,
        short_names: &["po"],
        fields: &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
    },
    ResourceInfo {
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        api_version: "v1",
        namespaced: false,
        short_names: &["ns"],
        fields: &["metadata.name", "status.phase"],
    },
    ResourceInfo {
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        api_version: "discovery.k8s.io/v1",
        namespaced: true,
        short_names: &[],
        fields: &["metadata.name", "metadata.namespace", "addressType"],
    },
];

/// The resource with this URL name.
pub(crate) fn resource_by_plural(plural: &str) -> Option<&'static ResourceInfo> {
    RESOURCES.iter().find(|r| r.plural == plural)
}

/// The resource of this kind (any case).
pub(crate) fn resource_by_kind(kind: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.kind.eq_ignore_ascii_case(kind) || r.plural == kind)
}

/// The value of a selectable field, as the API server's field set spells it.
pub(crate) fn field_value(object: &Value, field: &str) -> String {
    let mut at = object;
    for step in field.split('.') {
        at = &at[step];
    }
    match at {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        // An absent bool (spec.unschedulable) reads as false.
        Value::Null if field == "spec.unschedulable" => "false".to_string(),
        _ => String::new(),
    }
}

/// The labels of an object.
pub(crate) fn labels_of(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// The storage key of an object: `namespace/name`, or `name` when cluster-scoped. Lists
/// come out in this key's byte order, as etcd returns them.
pub(crate) fn key_of(resource: &ResourceInfo, namespace: &str, name: &str) -> String {
    if resource.namespaced {
        format!("{namespace}/{name}")
    } else {
        name.to_string()
    }
}

/// The namespace part of a key.
pub(crate) fn namespace_of_key(key: &str) -> &str {
    key.split_once('/').map_or("", |(ns, _)| ns)
}

/// One committed change, kept so that a watch can replay it.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    /// The resource version the change was committed at.
    pub(crate) rv: u64,
    /// The resource changed.
    pub(crate) resource: &'static str,
    /// The storage key.
    pub(crate) key: String,
    /// The object before (None: created).
    pub(crate) prev: Option<Value>,
    /// The object after (None: deleted).
    pub(crate) cur: Option<Value>,
}

/// Why a list or watch cannot be served at the version asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expired {
    /// The version asked for.
    pub(crate) asked: u64,
    /// The oldest version still served.
    pub(crate) oldest: u64,
}

/// The objects, the version counter and the history.
#[derive(Debug)]
pub(crate) struct Store {
    /// The last committed resource version (etcd's revision: one counter for everything).
    pub(crate) rv: u64,
    /// Objects by resource, then by key.
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// Changes with `rv > compacted`, oldest first.
    history: VecDeque<Change>,
    /// Versions at or below this one are forgotten: watching or listing exactly at an
    /// older version is answered 410 Expired.
    pub(crate) compacted: u64,
    /// The most changes kept before the oldest are compacted away.
    history_limit: usize,
    /// Next cluster IP to try (offset in 10.96.0.0/12).
    next_ip: u32,
    /// Next node port to try.
    next_node_port: u16,
    /// Seeds uids.
    random: RandomState,
    /// Uids handed out so far.
    uids: u64,
}

impl Store {
    /// An empty store at resource version `start` (a real cluster is never at 0).
    pub(crate) fn new(start: u64, history_limit: usize) -> Self {
        Store {
            rv: start,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: start,
            history_limit: history_limit.max(1),
            next_ip: 10,
            next_node_port: 30000,
            random: RandomState::new(),
            uids: 0,
        }
    }

    /// The current objects of a resource.
    pub(crate) fn objects(&self, resource: &str) -> Option<&BTreeMap<String, Value>> {
        self.objects.get(resource)
    }

    /// The objects of a resource as they were at version `at`, rebuilt by undoing newer
    /// changes; Err when `at` is older than the history goes back.
    pub(crate) fn snapshot(
        &self,
        resource: &str,
        at: u64,
    ) -> Result<BTreeMap<String, Value>, Expired> {
        if at < self.compacted {
            return Err(Expired {
                asked: at,
                oldest: self.compacted,
            });
        }
        let mut objects = self.objects.get(resource).cloned().unwrap_or_default();
        for change in self.history.iter().rev().take_while(|c| c.rv > at) {
            if change.resource != resource {
                continue;
            }
            match &change.prev {
                Some(prev) => objects.insert(change.key.clone(), prev.clone()),
                None => objects.remove(&change.key),
            };
        }
        Ok(objects)
    }

    /// The changes after version `after`; Err when the history no longer reaches back.
    pub(crate) fn changes_after(
        &self,
        after: u64,
    ) -> Result<impl Iterator<Item = &Change>, Expired> {
        if after < self.compacted {
            return Err(Expired {
                asked: after,
                oldest: self.compacted,
            });
        }
        let start = self.history.partition_point(|c| c.rv <= after);
        Ok(self.history.range(start..))
    }

    /// Forgets the history, as etcd compaction does; the revision moves on by one (in a
    /// real cluster other writes, Leases and Events, move it all the time), so every
    /// version a client holds is now too old to watch from.
    pub(crate) fn compact(&mut self) {
        self.rv += 1;
        self.compacted = self.rv;
        self.history.clear();
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(change);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    /// Creates or updates an object as a write through the API would: metadata, defaults,
    /// managedFields; a no-op update commits nothing. Returns the stored object.
    pub(crate) fn apply(&mut self, mut object: Value) -> Result<(Value, bool), FakeApiError> {
        if !object.is_object() {
            return Err(FakeApiError::object(
                "object",
                "",
                "must be a JSON object".into(),
            ));
        }
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let api_version = object["apiVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let resource = RESOURCES
            .iter()
            .find(|r| r.kind == kind && r.api_version == api_version)
            .ok_or_else(|| {
                FakeApiError::object(
                    "object",
                    "kind",
                    format!("{api_version} {kind} is not served"),
                )
            })?;
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !object["metadata"].is_object() || name.is_empty() {
            return Err(FakeApiError::object(
                resource.kind,
                "metadata.name",
                "is required".into(),
            ));
        }
        let namespace = if resource.namespaced {
            let ns = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            object["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            if let Some(m) = object["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            String::new()
        };
        let key = key_of(resource, &namespace, &name);
        let prev = self
            .objects
            .get(resource.plural)
            .and_then(|m| m.get(&key))
            .cloned();
        let now = now_rfc3339();

        match resource.kind {
            "Service" => self
                .default_service(&mut object, prev.as_ref())
                .map_err(|(f, e)| FakeApiError::object(&format!("Service {key}"), &f, e))?,
            "Pod" => default_pod(&mut object),
            "Namespace" => default_namespace(&mut object, &name),
            "EndpointSlice" => default_endpoint_slice(&mut object),
            _ => {}
        }

        let meta = object["metadata"].as_object_mut().ok_or_else(|| {
            FakeApiError::object(resource.kind, "metadata", "must be an object".into())
        })?;
        match &prev {
            Some(prev) => {
                for field in ["uid", "creationTimestamp"] {
                    meta.insert(field.into(), prev["metadata"][field].clone());
                }
                meta.insert(
                    "resourceVersion".into(),
                    prev["metadata"]["resourceVersion"].clone(),
                );
                if let Some(g) = prev["metadata"].get("generation") {
                    meta.insert("generation".into(), g.clone());
                }
            }
            None => {
                meta.insert("uid".into(), json!(self.uid()));
                meta.insert("creationTimestamp".into(), json!(now));
                if has_generation(resource) {
                    meta.insert("generation".into(), json!(1));
                }
            }
        }
        if meta
            .get("managedFields")
            .is_none_or(|m| m.as_array().is_none_or(Vec::is_empty))
        {
            let fields = fields_v1(&object, resource);
            let entry = json!({
                "manager": "fakeapi",
                "operation": "Update",
                "apiVersion": resource.api_version,
                "time": now,
                "fieldsType": "FieldsV1",
                "fieldsV1": fields,
            });
            object["metadata"]["managedFields"] = json!([entry]);
        }
        if let Some(prev) = &prev {
            // An update that changes nothing is not written (no new version, no event);
            // managedFields times do not count.
            if strip_volatile(&object) == strip_volatile(prev) {
                return Ok((prev.clone(), false));
            }
            if has_generation(resource) && spec_of(&object) != spec_of(prev) {
                let g = prev["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                object["metadata"]["generation"] = json!(g);
            }
        }
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects
            .entry(resource.plural)
            .or_default()
            .insert(key.clone(), object.clone());
        self.record(Change {
            rv: self.rv,
            resource: resource.plural,
            key,
            prev,
            cur: Some(object.clone()),
        });
        Ok((object, true))
    }

    /// Deletes an object; its last state, at the deletion's version, is what a watch sees.
    pub(crate) fn delete(
        &mut self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Value, FakeApiError> {
        let resource = resource_by_kind(kind)
            .ok_or_else(|| FakeApiError::object(kind, "kind", "is not served".into()))?;
        let key = key_of(resource, namespace, name);
        let prev = self
            .objects
            .get_mut(resource.plural)
            .and_then(|m| m.remove(&key))
            .ok_or_else(|| FakeApiError::NotFound {
                resource: resource.plural.to_string(),
                key: key.clone(),
            })?;
        self.rv += 1;
        let mut last = prev.clone();
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(Change {
            rv: self.rv,
            resource: resource.plural,
            key,
            prev: Some(prev),
            cur: None,
        });
        Ok(last)
    }

    fn uid(&mut self) -> String {
        self.uids += 1;
        let mut a = self.random.build_hasher();
        a.write_u64(self.uids);
        let hi = a.finish();
        a.write_u64(hi);
        let lo = a.finish();
        // A version 4, variant 1 UUID, as the API server's uuid.NewUUID.
        let hi = (hi & !0xf000) | 0x4000;
        let lo = (lo & !(0xc000 << 48)) | (0x8000 << 48);
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            hi & 0xffff,
            lo >> 48,
            lo & 0xffff_ffff_ffff
        )
    }

    fn used_cluster_ips(&self) -> BTreeSet<String> {
        self.objects
            .get("services")
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|s| s["spec"]["clusterIP"].as_str().map(str::to_string))
            .collect()
    }

    fn used_node_ports(&self) -> BTreeSet<u64> {
        self.objects
            .get("services")
            .into_iter()
            .flat_map(|m| m.values())
            .flat_map(|s| s["spec"]["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["nodePort"].as_u64())
            .collect()
    }

    /// Service defaults (pkg/apis/core/v1/defaults.go and the Service REST storage):
    /// type ClusterIP, sessionAffinity None, a cluster IP from 10.96.0.0/12 with
    /// clusterIPs/ipFamilies/ipFamilyPolicy, internalTrafficPolicy Cluster, port protocol
    /// TCP and targetPort = port, node ports for NodePort/LoadBalancer with
    /// externalTrafficPolicy Cluster. Allocated values survive an update that omits them.
    fn default_service(
        &mut self,
        object: &mut Value,
        prev: Option<&Value>,
    ) -> Result<(), (String, String)> {
        let mut spec = take_object(object, "spec");
        let result = self.default_service_spec(&mut spec, prev);
        put_object(object, "spec", spec);
        result?;
        let mut status = take_object(object, "status");
        status.entry("loadBalancer").or_insert(json!({}));
        put_object(object, "status", status);
        Ok(())
    }

    fn default_service_spec(
        &mut self,
        spec: &mut Map<String, Value>,
        prev: Option<&Value>,
    ) -> Result<(), (String, String)> {
        let ty = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string();
        spec.insert("type".into(), json!(ty));
        spec.entry("sessionAffinity").or_insert(json!("None"));
        let prev_spec = prev.map(|p| &p["spec"]);
        if ty != "ExternalName" {
            let mut ip = spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if ip.is_empty() {
                ip = prev_spec
                    .and_then(|p| p["clusterIP"].as_str())
                    .map(str::to_string)
                    .unwrap_or_default();
            }
            if ip.is_empty() {
                // Only an allocation looks at the other Services (a scan of all of them).
                let used_ips = self.used_cluster_ips();
                ip = self.allocate_ip(&used_ips).ok_or((
                    "spec.clusterIP".to_string(),
                    "no cluster IP left in 10.96.0.0/12".to_string(),
                ))?;
            }
            if ip != "None" && ip.parse::<IpAddr>().is_err() {
                return Err((
                    "spec.clusterIP".into(),
                    format!("{ip:?} must be a valid IP address or None"),
                ));
            }
            spec.insert("clusterIP".into(), json!(ip));
            if spec
                .get("clusterIPs")
                .is_none_or(|v| v.as_array().is_none_or(Vec::is_empty))
            {
                spec.insert("clusterIPs".into(), json!([ip]));
            }
            if spec
                .get("ipFamilies")
                .is_none_or(|v| v.as_array().is_none_or(Vec::is_empty))
            {
                let family = match ip.parse::<IpAddr>() {
                    Ok(IpAddr::V6(_)) => "IPv6",
                    _ => "IPv4",
                };
                spec.insert("ipFamilies".into(), json!([family]));
            }
            if !spec.contains_key("ipFamilyPolicy") {
                // Headless without a selector may take every family of the cluster.
                let policy = if ip == "None" && spec.get("selector").is_none_or(Value::is_null) {
                    "RequireDualStack"
                } else {
                    "SingleStack"
                };
                spec.insert("ipFamilyPolicy".into(), json!(policy));
            }
            spec.entry("internalTrafficPolicy")
                .or_insert(json!("Cluster"));
        }
        let wants_node_ports = ty == "NodePort" || ty == "LoadBalancer";
        if wants_node_ports {
            spec.entry("externalTrafficPolicy")
                .or_insert(json!("Cluster"));
        }
        if ty == "LoadBalancer" {
            spec.entry("allocateLoadBalancerNodePorts")
                .or_insert(json!(true));
        }
        let prev_ports = prev_spec
            .and_then(|p| p["ports"].as_array())
            .cloned()
            .unwrap_or_default();
        let mut taken = if wants_node_ports {
            self.used_node_ports()
        } else {
            BTreeSet::new()
        };
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for (i, port) in ports.iter_mut().enumerate() {
                let Some(p) = port.as_object_mut() else {
                    return Err((format!("spec.ports[{i}]"), "must be an object".into()));
                };
                p.entry("protocol").or_insert(json!("TCP"));
                let number = p.get("port").cloned().unwrap_or(Value::Null);
                if !number.is_u64() {
                    return Err((format!("spec.ports[{i}].port"), "is required".into()));
                }
                p.entry("targetPort").or_insert(number.clone());
                if wants_node_ports
                    && p.get("nodePort")
                        .is_none_or(|n| n.as_u64().is_none_or(|n| n == 0))
                {
                    let kept = prev_ports
                        .iter()
                        .find(|q| q["port"] == number && q["protocol"] == p["protocol"])
                        .and_then(|q| q["nodePort"].as_u64());
                    let node_port = match kept {
                        Some(n) => n,
                        None => {
                            let n = self.allocate_node_port(&taken).ok_or((
                                format!("spec.ports[{i}].nodePort"),
                                "no node port left in 30000-32767".to_string(),
                            ))?;
                            taken.insert(n);
                            n
                        }
                    };
                    p.insert("nodePort".into(), json!(node_port));
                }
            }
        }
        Ok(())
    }

    fn allocate_ip(&mut self, used: &BTreeSet<String>) -> Option<String> {
        let base = u32::from(Ipv4Addr::new(10, 96, 0, 0));
        for _ in 0..(1u32 << 20) {
            let offset = self.next_ip;
            self.next_ip = if self.next_ip >= (1 << 20) - 2 {
                10
            } else {
                self.next_ip + 1
            };
            let ip = Ipv4Addr::from(base + offset).to_string();
            if !used.contains(&ip) {
                return Some(ip);
            }
        }
        None
    }

    fn allocate_node_port(&mut self, used: &BTreeSet<u64>) -> Option<u64> {
        for _ in 30000..=32767 {
            let port = self.next_node_port;
            self.next_node_port = if port >= 32767 { 30000 } else { port + 1 };
            if !used.contains(&u64::from(port)) {
                return Some(u64::from(port));
            }
        }
        None
    }
}

fn has_generation(resource: &ResourceInfo) -> bool {
    matches!(resource.kind, "Service" | "EndpointSlice" | "Pod")
}

/// Everything but metadata and status: what moves `metadata.generation`.
fn spec_of(object: &Value) -> Value {
    let mut v = object.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn strip_volatile(object: &Value) -> Value {
    let mut v = object.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("managedFields");
        m.remove("resourceVersion");
    }
    v
}

/// Takes a field out as a map (a missing or non-map field gives an empty map).
fn take_object(object: &mut Value, field: &str) -> Map<String, Value> {
    match object.as_object_mut().and_then(|m| m.remove(field)) {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// Puts a map back as a field.
fn put_object(object: &mut Value, field: &str, map: Map<String, Value>) {
    if let Some(m) = object.as_object_mut() {
        m.insert(field.to_string(), Value::Object(map));
    }
}

/// Pod defaults: the handful of fields of pkg/apis/core/v1/defaults.go every Pod gets.
fn default_pod(object: &mut Value) {
    let mut spec = take_object(object, "spec");
    spec.entry("restartPolicy").or_insert(json!("Always"));
    spec.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
    spec.entry("schedulerName")
        .or_insert(json!("default-scheduler"));
    spec.entry("terminationGracePeriodSeconds")
        .or_insert(json!(30));
    spec.entry("enableServiceLinks").or_insert(json!(true));
    spec.entry("securityContext").or_insert(json!({}));
    if let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) {
        for c in containers.iter_mut().filter_map(Value::as_object_mut) {
            c.entry("terminationMessagePath")
                .or_insert(json!("/dev/termination-log"));
            c.entry("terminationMessagePolicy").or_insert(json!("File"));
            let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
            let tag = image.rsplit_once('/').map_or(image, |(_, t)| t);
            let latest =
                !image.contains('@') && tag.split_once(':').is_none_or(|(_, t)| t == "latest");
            c.entry("imagePullPolicy").or_insert(json!(if latest {
                "Always"
            } else {
                "IfNotPresent"
            }));
            c.entry("resources").or_insert(json!({}));
            if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    p.entry("protocol").or_insert(json!("TCP"));
                }
            }
        }
    }
    put_object(object, "spec", spec);
    let mut status = take_object(object, "status");
    status.entry("phase").or_insert(json!("Pending"));
    put_object(object, "status", status);
}

/// Namespace defaults: the `kubernetes` finalizer, phase Active, and the
/// `kubernetes.io/metadata.name` label the API server always sets.
fn default_namespace(object: &mut Value, name: &str) {
    let mut spec = take_object(object, "spec");
    spec.entry("finalizers").or_insert(json!(["kubernetes"]));
    put_object(object, "spec", spec);
    let mut status = take_object(object, "status");
    status.entry("phase").or_insert(json!("Active"));
    put_object(object, "status", status);
    let mut meta = take_object(object, "metadata");
    let mut labels = match meta.remove("labels") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    labels.insert("kubernetes.io/metadata.name".into(), json!(name));
    meta.insert("labels".into(), Value::Object(labels));
    put_object(object, "metadata", meta);
}

/// EndpointSlice defaults (pkg/apis/discovery/v1/defaults.go): port name "" and
/// protocol TCP.
fn default_endpoint_slice(object: &mut Value) {
    if let Some(ports) = object.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            p.entry("name").or_insert(json!(""));
            p.entry("protocol").or_insert(json!("TCP"));
        }
    }
}

/// An approximation of the FieldsV1 set of an Update: every field set, `.` on nested
/// maps, Service ports keyed by port and protocol, Pod containers by name, other lists
/// atomic. Status and system metadata are not owned.
fn fields_v1(object: &Value, resource: &ResourceInfo) -> Value {
    let mut top = Map::new();
    if let Some(m) = object.as_object() {
        for (k, v) in m {
            match k.as_str() {
                "apiVersion" | "kind" | "status" => {}
                "metadata" => {
                    let mut meta = Map::new();
                    for field in ["labels", "annotations"] {
                        if let Some(v) = v
                            .get(field)
                            .filter(|v| v.as_object().is_some_and(|m| !m.is_empty()))
                        {
                            meta.insert(format!("f:{field}"), field_set(v, true, resource, field));
                        }
                    }
                    if !meta.is_empty() {
                        top.insert("f:metadata".into(), Value::Object(meta));
                    }
                }
                _ => {
                    top.insert(format!("f:{k}"), field_set(v, false, resource, k));
                }
            }
        }
    }
    Value::Object(top)
}

fn field_set(value: &Value, nested: bool, resource: &ResourceInfo, name: &str) -> Value {
    let mut set = Map::new();
    match value {
        Value::Object(m) => {
            if nested {
                set.insert(".".into(), json!({}));
            }
            for (k, v) in m {
                set.insert(format!("f:{k}"), field_set(v, true, resource, k));
            }
        }
        Value::Array(items) => {
            let keyed = match (resource.kind, name) {
                ("Service", "ports") => Some(&["port", "protocol"][..]),
                ("Pod", "containers") | ("Pod", "initContainers") => Some(&["name"][..]),
                _ => None,
            };
            if let Some(keys) = keyed {
                set.insert(".".into(), json!({}));
                for item in items {
                    let mut k = Map::new();
                    for key in keys {
                        k.insert((*key).to_string(), item[*key].clone());
                    }
                    let mut inner = match field_set(item, true, resource, "") {
                        Value::Object(m) => m,
                        _ => Map::new(),
                    };
                    inner.insert(".".into(), json!({}));
                    set.insert(format!("k:{}", Value::Object(k)), Value::Object(inner));
                }
            }
        }
        _ => {}
    }
    Value::Object(set)
}

/// The time now in the API's format (RFC 3339, seconds, UTC).
pub(crate) fn now_rfc3339() -> String {
    serde_json::to_value(Time(Timestamp::now()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Namespace filter helper: whether a key is in `namespace` (None: all).
pub(crate) fn in_namespace(key: &str, namespace: Option<&str>) -> bool {
    namespace.is_none_or(|ns| namespace_of_key(key) == ns)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn svc(name: &str, spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns"}, "spec": spec})
    }

    #[test]
    fn an_update_that_changes_nothing_commits_nothing() {
        let mut store = Store::new(100, 10);
        let (first, written) = store
            .apply(svc("web", json!({"ports": [{"port": 80}]})))
            .unwrap();
        assert!(written);
        assert_eq!(first["metadata"]["resourceVersion"], "101");
        let (again, written) = store
            .apply(svc("web", json!({"ports": [{"port": 80}]})))
            .unwrap();
        assert!(!written);
        assert_eq!(store.rv, 101);
        assert_eq!(again, first);
        let (changed, written) = store
            .apply(svc("web", json!({"ports": [{"port": 81}]})))
            .unwrap();
        assert!(written);
        assert_eq!(changed["metadata"]["generation"], 2);
        assert_eq!(changed["metadata"]["uid"], first["metadata"]["uid"]);
        assert_eq!(
            changed["spec"]["clusterIP"], first["spec"]["clusterIP"],
            "allocated IP kept"
        );
    }

    #[test]
    fn node_ports_are_allocated_once_and_kept() {
        let mut store = Store::new(1, 10);
        let spec =
            json!({"type": "NodePort", "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]});
        let (a, _) = store.apply(svc("a", spec.clone())).unwrap();
        assert_eq!(a["spec"]["ports"][0]["nodePort"], 30000);
        assert_eq!(a["spec"]["ports"][1]["nodePort"], 30001);
        assert_eq!(a["spec"]["externalTrafficPolicy"], "Cluster");
        let (b, _) = store.apply(svc("b", spec.clone())).unwrap();
        assert_eq!(b["spec"]["ports"][0]["nodePort"], 30002);
        let (a2, written) = store.apply(svc("a", spec)).unwrap();
        assert!(!written, "same ports, same allocation: no change");
        assert_eq!(a2["spec"]["ports"][1]["nodePort"], 30001);
        let (h, _) = store.apply(svc("h", json!({"clusterIP": "None"}))).unwrap();
        assert_eq!(h["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(h["spec"]["clusterIPs"], json!(["None"]));
        let err = store
            .apply(svc("x", json!({"clusterIP": "10.0.0.300"})))
            .unwrap_err();
        assert!(
            err.to_string().contains("Service ns/x: spec.clusterIP"),
            "{err}"
        );
    }

    #[test]
    fn snapshots_rewind_and_history_is_bounded() {
        let mut store = Store::new(10, 3);
        store.apply(svc("a", json!({}))).unwrap(); // 11
        store.apply(svc("b", json!({}))).unwrap(); // 12
        store.delete("Service", "ns", "a").unwrap(); // 13
        let at_12 = store.snapshot("services", 12).unwrap();
        assert_eq!(at_12.keys().collect::<Vec<_>>(), ["ns/a", "ns/b"]);
        let now = store.snapshot("services", 13).unwrap();
        assert_eq!(now.keys().collect::<Vec<_>>(), ["ns/b"]);
        store.apply(svc("c", json!({}))).unwrap(); // 14: the change at 11 falls out
        assert_eq!(store.compacted, 11);
        assert!(store.snapshot("services", 10).is_err());
        assert_eq!(
            store
                .changes_after(11)
                .unwrap()
                .map(|c| c.rv)
                .collect::<Vec<_>>(),
            [12, 13, 14]
        );
        store.compact();
        assert_eq!(store.compacted, 15);
        assert_eq!(
            store.changes_after(14).err(),
            Some(Expired {
                asked: 14,
                oldest: 15
            })
        );
    }
}
