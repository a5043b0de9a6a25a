//! The proxy's input: Services, EndpointSlices and Nodes, as kube-proxy reads them.
//!
//! A [`Cluster`] is what a node proxy knows about the cluster. Endpoints come **only from
//! EndpointSlices**: several slices of one Service merge as kube-proxy's endpoint-slice cache
//! merges them (one endpoint per address and port; when two slices disagree, the ready one
//! wins, then the one on this node). The plan compiler never reads a selector.
//!
//! Pods are kept too, but only for what reads them besides the proxy (cluster DNS answers
//! for Pod names, `kubectl get pods` views). Whether anything derives EndpointSlices from
//! those Pods is the [controller role](crate::controller)'s business: a cluster built with
//! [`Cluster::simulated`] runs the EndpointSlice controller on every change (the manifest
//! world, where no control plane exists); one built with [`Cluster::new`] takes slices as
//! they come (from an API server, or a program of yours).
//!
//! Every change is recorded in a journal, so [`crate::plan::Plan::update`] recompiles exactly
//! the Services that changed since the plan was last brought up to date: a caller cannot
//! forget one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::controller::Controller;
use crate::model::*;

/// Identifies one cluster value, so a plan knows whether a journal is the one it followed.
/// Not I/O, not a clock: a process-wide counter.
static NEXT_CLUSTER_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_CLUSTER_ID.fetch_add(1, Ordering::Relaxed)
}

/// Which Services changed, and when (in the cluster's own generations).
#[derive(Clone, Debug, Default)]
struct Journal {
    /// Bumped by every recorded change.
    generation: u64,
    /// Last change of each Service (also of deleted ones, until compacted).
    by_service: BTreeMap<ServiceName, u64>,
    /// The same, ordered by generation.
    by_generation: BTreeMap<u64, ServiceName>,
    /// Changes at or before this generation may have been forgotten.
    floor: u64,
}

impl Journal {
    fn record(&mut self, name: &ServiceName) {
        self.generation += 1;
        if let Some(old) = self.by_service.insert(name.clone(), self.generation) {
            self.by_generation.remove(&old);
        }
        self.by_generation.insert(self.generation, name.clone());
    }

    /// Forgets the oldest entries of Services that no longer exist once they outnumber the
    /// live ones, so a long-running proxy with churning names stays bounded.
    fn compact(&mut self, live: &BTreeMap<ServiceName, Arc<Service>>) {
        let dead = self.by_service.len().saturating_sub(live.len());
        if dead <= live.len().max(1024) {
            return;
        }
        let mut to_drop = dead / 2;
        let mut dropped = Vec::new();
        for (generation, name) in &self.by_generation {
            if to_drop == 0 {
                break;
            }
            if !live.contains_key(name) {
                dropped.push(*generation);
                to_drop -= 1;
            }
        }
        for g in dropped {
            if let Some(name) = self.by_generation.remove(&g) {
                self.by_service.remove(&name);
            }
            self.floor = self.floor.max(g);
        }
    }
}

/// Where a plan stands in a cluster's history: which cluster, which generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation {
    cluster: u64,
    generation: u64,
}

/// Services, EndpointSlices, Nodes (and Pods for DNS and views): the state a proxy and a
/// cluster DNS work from. See the [module](self) docs.
#[derive(Debug)]
pub struct Cluster {
    id: u64,
    services: BTreeMap<ServiceName, Arc<Service>>,
    /// Slices by Service, then by slice name.
    slices: BTreeMap<ServiceName, BTreeMap<String, Arc<EndpointSlice>>>,
    /// (namespace, slice name) -> the Service the slice belongs to, so a slice that changes
    /// Service, or is deleted by name, is found.
    slice_owner: BTreeMap<ObjectName, ServiceName>,
    nodes: BTreeMap<String, Node>,
    pods: BTreeMap<ObjectName, Arc<Pod>>,
    namespaces: BTreeSet<String>,
    journal: Journal,
    /// The EndpointSlice controller, in a simulated cluster.
    pub(crate) controller: Option<Box<Controller>>,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            id: next_id(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slice_owner: BTreeMap::new(),
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            namespaces: BTreeSet::new(),
            journal: Journal::default(),
            controller: None,
        }
    }
}

impl Clone for Cluster {
    /// A copy with its own identity: plans that followed the original fall back to a full
    /// compile against the copy, since the two histories may diverge.
    fn clone(&self) -> Self {
        Cluster {
            id: next_id(),
            services: self.services.clone(),
            slices: self.slices.clone(),
            slice_owner: self.slice_owner.clone(),
            nodes: self.nodes.clone(),
            pods: self.pods.clone(),
            namespaces: self.namespaces.clone(),
            journal: self.journal.clone(),
            controller: self.controller.clone(),
        }
    }
}

impl Cluster {
    /// An empty cluster that takes EndpointSlices as they come, as kube-proxy does: Pods are
    /// stored (for DNS and views) but never turned into endpoints.
    pub fn new() -> Cluster {
        Cluster::default()
    }

    /// An empty cluster that also plays the control plane's part: the EndpointSlice
    /// controller derives the slices of every Service with a selector from its Pods, on
    /// every change (see [`crate::controller`]). The manifest world and tests use this.
    pub fn simulated() -> Cluster {
        Cluster {
            controller: Some(Box::default()),
            ..Cluster::default()
        }
    }

    /// Whether this cluster runs the EndpointSlice controller ([`Cluster::simulated`]).
    pub fn is_simulated(&self) -> bool {
        self.controller.is_some()
    }

    // -----------------------------------------------------------------------------------
    // Changes
    // -----------------------------------------------------------------------------------

    /// Adds or replaces a Service; returns the previous one.
    pub fn upsert_service(&mut self, svc: Service) -> Option<Arc<Service>> {
        let name = svc.name.clone();
        self.namespaces.insert(name.namespace.clone());
        let svc = Arc::new(svc);
        let old = self.services.insert(name.clone(), svc.clone());
        if old.as_deref() != Some(svc.as_ref()) {
            self.journal.record(&name);
        }
        if let Some(mut ctl) = self.controller.take() {
            ctl.service_changed(self, old.as_deref(), Some(&svc));
            self.controller = Some(ctl);
        }
        old
    }

    /// Removes a Service. Its EndpointSlices stay (as on an API server, where the
    /// controller's slices are garbage-collected with their owner but others are not); a
    /// simulated cluster removes the slices its controller made.
    pub fn remove_service(&mut self, name: &ServiceName) -> Option<Arc<Service>> {
        let old = self.services.remove(name)?;
        self.journal.record(name);
        if let Some(mut ctl) = self.controller.take() {
            ctl.service_changed(self, Some(&old), None);
            self.controller = Some(ctl);
        }
        self.journal.compact(&self.services);
        Some(old)
    }

    /// Adds or replaces a Pod; returns the Services whose slices the controller changed
    /// (always empty unless the cluster is [simulated](Cluster::simulated)).
    pub fn upsert_pod(&mut self, pod: Pod) -> BTreeSet<ServiceName> {
        self.upsert_pods([pod])
    }

    /// Adds or replaces many Pods, running the controller once per affected Service.
    pub fn upsert_pods(&mut self, pods: impl IntoIterator<Item = Pod>) -> BTreeSet<ServiceName> {
        let mut ctl = self.controller.take();
        let mut touched = Vec::new();
        for pod in pods {
            let name = pod.name.clone();
            self.namespaces.insert(name.namespace.clone());
            let pod = Arc::new(pod);
            let old = self.pods.insert(name, pod.clone());
            if let Some(ctl) = ctl.as_mut() {
                ctl.pod_indexed(old.as_deref(), Some(&pod));
            }
            touched.push((old, Some(pod)));
        }
        let affected = match ctl.as_mut() {
            Some(ctl) => ctl.pods_changed(self, &touched),
            None => BTreeSet::new(),
        };
        self.controller = ctl;
        affected
    }

    /// Removes a Pod; returns the Services whose slices the controller changed.
    pub fn remove_pod(&mut self, name: &ObjectName) -> BTreeSet<ServiceName> {
        let Some(old) = self.pods.remove(name) else {
            return BTreeSet::new();
        };
        let Some(mut ctl) = self.controller.take() else {
            return BTreeSet::new();
        };
        ctl.pod_indexed(Some(&old), None);
        let affected = ctl.pods_changed(self, &[(Some(old), None)]);
        self.controller = Some(ctl);
        affected
    }

    /// Adds or replaces an EndpointSlice (keyed by namespace and slice name; a slice that
    /// now names another Service leaves the old one).
    pub fn upsert_slice(&mut self, slice: EndpointSlice) {
        let key = ObjectName::new(slice.service.namespace.clone(), slice.name.clone());
        if let Some(prev) = self.slice_owner.get(&key).cloned()
            && prev != slice.service
        {
            self.drop_slice(&prev, &slice.name);
        }
        self.namespaces.insert(slice.service.namespace.clone());
        let service = slice.service.clone();
        let slice = Arc::new(slice);
        let old = self
            .slices
            .entry(service.clone())
            .or_default()
            .insert(slice.name.clone(), slice.clone());
        self.slice_owner.insert(key, service.clone());
        if old.as_deref() != Some(slice.as_ref()) {
            self.journal.record(&service);
        }
    }

    /// Removes an EndpointSlice by namespace and name; returns the Service it belonged to.
    pub fn remove_slice_named(&mut self, namespace: &str, name: &str) -> Option<ServiceName> {
        let service = self
            .slice_owner
            .get(&ObjectName::new(namespace, name))
            .cloned()?;
        self.drop_slice(&service, name);
        Some(service)
    }

    /// Removes an EndpointSlice of a Service.
    pub fn remove_slice(&mut self, service: &ServiceName, name: &str) {
        self.drop_slice(service, name);
    }

    fn drop_slice(&mut self, service: &ServiceName, name: &str) {
        let Some(m) = self.slices.get_mut(service) else {
            return;
        };
        if m.remove(name).is_some() {
            self.journal.record(service);
            self.slice_owner
                .remove(&ObjectName::new(service.namespace.clone(), name));
        }
        if m.is_empty() {
            self.slices.remove(service);
        }
    }

    /// Adds or replaces a Node.
    pub fn upsert_node(&mut self, node: Node) {
        let name = node.name.clone();
        let old = self.nodes.insert(name.clone(), node);
        let zone_changed = old.as_ref().map(|n| &n.zone) != self.nodes.get(&name).map(|n| &n.zone);
        if zone_changed {
            self.zone_changed(&name);
        }
    }

    /// A Node's zone changed: the controller copies zones into endpoints (and hints), and
    /// a plan chooses topology by its own node's zone, so every Service is recompiled
    /// (rare: a proxy watches only its own Node).
    fn zone_changed(&mut self, node: &str) {
        if let Some(mut ctl) = self.controller.take() {
            ctl.node_zone_changed(self, node);
            self.controller = Some(ctl);
        }
        let names: Vec<ServiceName> = self.services.keys().cloned().collect();
        for name in &names {
            self.journal.record(name);
        }
    }

    /// Removes a Node.
    pub fn remove_node(&mut self, name: &str) -> Option<Node> {
        let old = self.nodes.remove(name)?;
        if old.zone.is_some() {
            self.zone_changed(name);
        }
        Some(old)
    }

    /// Records a namespace.
    pub fn add_namespace(&mut self, ns: impl Into<String>) {
        self.namespaces.insert(ns.into());
    }

    // -----------------------------------------------------------------------------------
    // The journal
    // -----------------------------------------------------------------------------------

    /// Where this cluster's history stands now.
    pub fn generation(&self) -> Generation {
        Generation {
            cluster: self.id,
            generation: self.journal.generation,
        }
    }

    /// The Services that changed (added, changed or removed, in their slices too) after
    /// `since`, or `None` when `since` is not from this cluster's history or older than
    /// what the journal remembers (then everything must be recompiled).
    pub fn changed_since(&self, since: Generation) -> Option<BTreeSet<&ServiceName>> {
        if since.cluster != self.id
            || since.generation < self.journal.floor
            || since.generation > self.journal.generation
        {
            return None;
        }
        Some(
            self.journal
                .by_generation
                .range(since.generation + 1..)
                .map(|(_, n)| n)
                .collect(),
        )
    }

    // -----------------------------------------------------------------------------------
    // Reading
    // -----------------------------------------------------------------------------------

    /// A Service by name.
    pub fn service(&self, name: &ServiceName) -> Option<&Service> {
        self.services.get(name).map(|s| s.as_ref())
    }

    /// All Services in name order.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values().map(|s| s.as_ref())
    }

    /// Services of one namespace in name order.
    pub fn services_in<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a Service> + 'a {
        let lo = ObjectName::new(namespace, String::new());
        let namespace = namespace.to_string();
        self.services
            .range(lo..)
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, s)| s.as_ref())
    }

    /// A Pod by name.
    pub fn pod(&self, name: &ObjectName) -> Option<&Pod> {
        self.pods.get(name).map(|p| p.as_ref())
    }

    /// All Pods in name order.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values().map(|p| p.as_ref())
    }

    /// Pods of one namespace in name order.
    pub fn pods_in<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a Pod> + 'a {
        let lo = ObjectName::new(namespace, String::new());
        let namespace = namespace.to_string();
        self.pods
            .range(lo..)
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, p)| p.as_ref())
    }

    /// All Nodes in name order.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// A Node by name.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Known namespaces.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces.iter().map(String::as_str)
    }

    /// The EndpointSlices of a Service, in slice name order: those a controller published
    /// and those written by hand.
    pub fn slices_of(&self, name: &ServiceName) -> impl Iterator<Item = &EndpointSlice> {
        self.slices
            .get(name)
            .into_iter()
            .flat_map(|m| m.values().map(|s| s.as_ref()))
    }

    /// Number of EndpointSlices.
    pub fn slice_count(&self) -> usize {
        self.slices.values().map(BTreeMap::len).sum()
    }

    /// Pods of a namespace that a selector matches, in name order.
    pub fn select_pods<'a>(&'a self, namespace: &str, selector: &LabelSelector) -> Vec<&'a Pod> {
        match &self.controller {
            Some(ctl) => ctl.select(self, namespace, selector),
            None => self
                .pods_in(namespace)
                .filter(|p| selector.matches(&p.labels))
                .collect(),
        }
    }

    pub(crate) fn pods_map(&self) -> &BTreeMap<ObjectName, Arc<Pod>> {
        &self.pods
    }

    /// The endpoints of every port of a Service, keyed by Service port name, merged from its
    /// EndpointSlices as kube-proxy's endpoint-slice cache merges them.
    ///
    /// A slice contributes to a Service port when it has a port of the same name and
    /// protocol. One address and port is one endpoint, whatever number of slices list it:
    /// kube-proxy dedups them, preferring a ready copy, then a copy on this node's... here
    /// (no node is known) the first copy in slice name order.
    pub fn endpoints(&self, svc: &Service) -> BTreeMap<String, (Protocol, Vec<PortEndpoint>)> {
        let mut out: BTreeMap<String, (Protocol, Vec<PortEndpoint>)> = BTreeMap::new();
        for sp in &svc.ports {
            out.insert(sp.name.clone(), (sp.protocol, Vec::new()));
        }
        for slice in self.slices_of(&svc.name) {
            for p in &slice.ports {
                let Some((proto, list)) = out.get_mut(&p.name) else {
                    continue;
                };
                if *proto != p.protocol {
                    continue;
                }
                list.extend(slice.endpoints.iter().map(|ep| PortEndpoint {
                    endpoint: ep.clone(),
                    port: p.port,
                }));
            }
        }
        for (_, list) in out.values_mut() {
            merge_duplicates(list);
        }
        out
    }

    /// Every endpoint of a Service whatever its ports (a headless Service publishes the
    /// addresses of Pods without ports too), one per address, merged as
    /// [`Cluster::endpoints`] merges them.
    pub fn addresses(&self, svc: &Service) -> Vec<Endpoint> {
        let mut list: Vec<PortEndpoint> = self
            .slices_of(&svc.name)
            .flat_map(|s| s.endpoints.iter())
            .map(|ep| PortEndpoint {
                endpoint: ep.clone(),
                port: 0,
            })
            .collect();
        merge_duplicates(&mut list);
        list.into_iter().map(|pe| pe.endpoint).collect()
    }
}

/// Sorts by address and port and keeps one copy of each: "If an endpoint is duplicated
/// across slices" the ready copy wins (then a serving one), else the first in slice order.
fn merge_duplicates(list: &mut Vec<PortEndpoint>) {
    // A stable sort keeps slice order among equals.
    list.sort_by(|a, b| {
        (
            a.endpoint.ip,
            a.port,
            !a.endpoint.ready,
            !a.endpoint.serving,
        )
            .cmp(&(
                b.endpoint.ip,
                b.port,
                !b.endpoint.ready,
                !b.endpoint.serving,
            ))
    });
    list.dedup_by(|later, first| {
        later.endpoint.ip == first.endpoint.ip && later.port == first.port
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ep(ip: [u8; 4], ready: bool) -> Endpoint {
        Endpoint {
            ip: IpAddr::from(ip),
            ready,
            serving: ready,
            terminating: false,
            node_name: None,
            zone: None,
            hostname: None,
            pod: None,
            weight: DEFAULT_WEIGHT,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }

    fn slice(svc: &ServiceName, name: &str, eps: Vec<Endpoint>, port: u16) -> EndpointSlice {
        EndpointSlice {
            service: svc.clone(),
            name: name.into(),
            endpoints: eps,
            ports: vec![EndpointPort {
                name: "http".into(),
                port,
                protocol: Protocol::Tcp,
            }],
        }
    }

    fn web() -> Service {
        let mut s = Service::new(ObjectName::new("ns", "web"));
        s.ports.push(ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: TargetPort::Number(8080),
            node_port: None,
            app_protocol: None,
        });
        s
    }

    #[test]
    fn slices_merge_and_the_ready_copy_wins() {
        let mut c = Cluster::new();
        let svc = web();
        c.upsert_service(svc.clone());
        c.upsert_slice(slice(
            &svc.name,
            "web-a",
            vec![ep([10, 0, 0, 1], false), ep([10, 0, 0, 2], true)],
            8080,
        ));
        c.upsert_slice(slice(
            &svc.name,
            "web-b",
            vec![ep([10, 0, 0, 1], true), ep([10, 0, 0, 3], true)],
            8080,
        ));
        let eps = &c.endpoints(&svc)["http"].1;
        assert_eq!(eps.len(), 3, "{eps:?}");
        assert!(eps.iter().all(|e| e.endpoint.ready), "{eps:?}");
        // The same address on another port is another endpoint.
        c.upsert_slice(slice(
            &svc.name,
            "web-c",
            vec![ep([10, 0, 0, 1], true)],
            9090,
        ));
        assert_eq!(c.endpoints(&svc)["http"].1.len(), 4);
        assert_eq!(c.addresses(&svc).len(), 3);
    }

    #[test]
    fn a_selector_alone_gives_no_endpoints_and_slices_do() {
        // kube-proxy never reads a selector: with slices and no Pods the Service has the
        // slices' endpoints, whether or not it has a selector.
        let mut c = Cluster::new();
        let mut svc = web();
        svc.selector = Some(LabelSelector::from_labels(
            [("app".to_string(), "web".to_string())].into(),
        ));
        c.upsert_service(svc.clone());
        let mut p = Pod::new(ObjectName::new("ns", "web-0"), IpAddr::from([10, 0, 0, 9]));
        p.labels.insert("app".into(), "web".into());
        assert!(c.upsert_pod(p).is_empty());
        assert!(c.endpoints(&svc)["http"].1.is_empty());
        c.upsert_slice(slice(
            &svc.name,
            "web-x",
            vec![ep([10, 0, 0, 1], true)],
            8080,
        ));
        assert_eq!(c.endpoints(&svc)["http"].1.len(), 1);
    }

    #[test]
    fn the_journal_names_every_changed_service() {
        let mut c = Cluster::new();
        let g0 = c.generation();
        let svc = web();
        c.upsert_service(svc.clone());
        c.upsert_slice(slice(&svc.name, "web-a", vec![ep([10, 0, 0, 1], true)], 80));
        let g1 = c.generation();
        assert_eq!(
            c.changed_since(g0).expect("same history"),
            BTreeSet::from([&svc.name])
        );
        assert!(c.changed_since(g1).expect("same history").is_empty());
        // Re-applying an identical object is not a change.
        c.upsert_service(svc.clone());
        assert!(c.changed_since(g1).expect("same history").is_empty());
        // A slice that moves to another Service changes both.
        let other = ObjectName::new("ns", "other");
        let mut moved = slice(&other, "web-a", vec![ep([10, 0, 0, 1], true)], 80);
        moved.service = other.clone();
        c.upsert_slice(moved);
        assert_eq!(
            c.changed_since(g1).expect("same history"),
            BTreeSet::from([&svc.name, &other])
        );
        assert!(c.slices_of(&svc.name).next().is_none());
        assert_eq!(c.remove_slice_named("ns", "web-a"), Some(other.clone()));
        // A copy has another history.
        assert!(c.clone().changed_since(g1).is_none());
    }

    #[test]
    fn the_journal_forgets_deleted_services_but_stays_exact() {
        let mut c = Cluster::new();
        let g0 = c.generation();
        for i in 0..5000 {
            let s = Service::new(ObjectName::new("ns", format!("s{i}")));
            c.upsert_service(s.clone());
            c.remove_service(&s.name);
        }
        assert!(
            c.journal.by_service.len() <= 2048,
            "{}",
            c.journal.by_service.len()
        );
        // An old generation can no longer be answered exactly: the caller recompiles.
        assert!(c.changed_since(g0).is_none());
        let g1 = c.generation();
        c.upsert_service(web());
        assert_eq!(c.changed_since(g1).expect("recent").len(), 1);
    }
}
