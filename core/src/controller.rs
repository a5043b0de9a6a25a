//! The controller role: what the control plane does when there is no control plane.
//!
//! On a real cluster, kube-controller-manager's EndpointSlice controller watches Services and
//! Pods and publishes EndpointSlices; kube-proxy reads only those slices. In the manifest
//! world (the lab, the sandbox, tests) nobody runs that controller, so svcnat plays it: a
//! [`Cluster::simulated`] keeps the slices of every Service with a selector in step with its
//! Pods, and the proxy side compiles from slices exactly as it would on a cluster.
//!
//! The rules are the EndpointSlice controller's: a Pod is an endpoint of every Service in its
//! namespace whose selector matches its labels, unless it has finished (Succeeded/Failed) or
//! has no IP; `ready` = Ready and not terminating, `serving` = Ready,
//! `publishNotReadyAddresses` makes every such Pod ready; a named `targetPort` is resolved in
//! each Pod's container ports (a Pod without it is left out of that port's mapping); endpoints
//! that share a port mapping and an address family share slices of at most
//! [`MAX_ENDPOINTS_PER_SLICE`]; each slice carries the
//! `endpointslice.kubernetes.io/managed-by` label. Placement and IP allocation (the
//! scheduler's and the kubelet's part) happen in [`crate::manifest`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use sha2::{Digest, Sha256};

use crate::cluster::Cluster;
use crate::model::*;

/// The label naming the controller that manages an EndpointSlice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The value kube-controller-manager's EndpointSlice controller writes there.
pub const CONTROLLER_NAME: &str = "endpointslice-controller.k8s.io";
/// "By default, the control plane creates and manages EndpointSlices to have no more than
/// 100 endpoints each" (`--max-endpoints-per-slice`).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// The EndpointSlices the controller publishes for a Service, given the Pods its selector
/// matches (in any order) and a lookup of Nodes (for endpoint zones).
///
/// Empty for a Service without a selector and for ExternalName Services. Slice names are
/// `<service>-<hash>` with the hash of the slice's family, port mapping and index, so the
/// same input always yields the same names.
pub fn endpoint_slices<'a>(
    svc: &Service,
    pods: impl IntoIterator<Item = &'a Pod>,
    node: impl Fn(&str) -> Option<&'a Node>,
) -> Vec<EndpointSlice> {
    if svc.selector.is_none() || svc.service_type == ServiceType::ExternalName {
        return Vec::new();
    }
    let mut pods: Vec<&Pod> = pods.into_iter().collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    let mut groups: BTreeMap<(IpFamily, Vec<EndpointPort>), Vec<Endpoint>> = BTreeMap::new();
    for pod in pods {
        // "Pods in a terminal phase (Succeeded or Failed) are not endpoints."
        if matches!(pod.phase, PodPhase::Succeeded | PodPhase::Failed) {
            continue;
        }
        let ports = port_mapping(svc, pod);
        let ready = svc.publish_not_ready_addresses || (pod.ready && !pod.terminating);
        let serving = svc.publish_not_ready_addresses || pod.ready;
        let zone = pod
            .node_name
            .as_deref()
            .and_then(&node)
            .and_then(|n| n.zone.clone());
        // "hostname ... set when the Pod's spec.hostname is set and its spec.subdomain
        // names the Service".
        let hostname = match (&pod.hostname, &pod.subdomain) {
            (Some(h), Some(sd)) if sd == &svc.name.name => Some(h.clone()),
            _ => None,
        };
        for ip in &pod.ips {
            let family = IpFamily::of(ip);
            if !svc.ip_families.is_empty() && !svc.ip_families.contains(&family) {
                continue;
            }
            groups.entry((family, ports.clone())).or_default().push({
                let mut ep = Endpoint::new(*ip);
                ep.ready = ready;
                ep.serving = serving;
                ep.terminating = pod.terminating;
                ep.node_name = pod.node_name.clone();
                ep.zone = zone.clone();
                ep.hostname = hostname.clone();
                ep.pod = Some(pod.name.name.clone());
                ep.weight = pod.weight;
                set_hints(&mut ep, svc.traffic_distribution);
                ep
            });
        }
    }
    let mut out = Vec::new();
    for ((family, ports), endpoints) in groups {
        for (i, chunk) in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE).enumerate() {
            out.push(EndpointSlice {
                service: svc.name.clone(),
                name: slice_name(&svc.name.name, family, &ports, i),
                endpoints: chunk.to_vec(),
                ports: ports.clone(),
            });
        }
    }
    out
}

/// The hints the controller writes for `spec.trafficDistribution` (its `trafficdist`
/// heuristics): the endpoint's own zone for `PreferClose`/`PreferSameZone`, and also its own
/// node for `PreferSameNode`. An endpoint without a zone (or node) gets no such hint; a
/// proxy then ignores that kind of hint for the whole Service.
fn set_hints(ep: &mut Endpoint, distribution: Option<TrafficDistribution>) {
    let Some(d) = distribution else { return };
    ep.zone_hints = ep.zone.iter().cloned().collect();
    if d == TrafficDistribution::PreferSameNode {
        ep.node_hints = ep.node_name.iter().cloned().collect();
    }
}

/// The Service ports a Pod serves, with the port on the Pod: numbers as given, names
/// resolved in the Pod's container ports ("a Pod that does not expose the named port is
/// left out for that port").
fn port_mapping(svc: &Service, pod: &Pod) -> Vec<EndpointPort> {
    svc.ports
        .iter()
        .filter_map(|sp| {
            let port = match &sp.target_port {
                TargetPort::Number(n) => Some(*n),
                TargetPort::Name(name) => pod
                    .ports
                    .iter()
                    .find(|cp| &cp.name == name && cp.protocol == sp.protocol)
                    .map(|cp| cp.port),
            }?;
            Some(EndpointPort {
                name: sp.name.clone(),
                port,
                protocol: sp.protocol,
            })
        })
        .collect()
}

fn slice_name(service: &str, family: IpFamily, ports: &[EndpointPort], index: usize) -> String {
    let mut h = Sha256::new();
    h.update(family.as_str());
    for p in ports {
        h.update(format!("/{}:{}:{}", p.name, p.protocol, p.port));
    }
    h.update(format!("#{index}"));
    let digest = h.finalize();
    let tag = data_encoding::BASE32_NOPAD
        .encode(digest.get(..5).unwrap_or_default())
        .to_ascii_lowercase();
    format!("{service}-{}", tag.get(..5).unwrap_or("x"))
}

/// An EndpointSlice as the API server would publish it: what [`Cluster::apply_endpoint_slice`]
/// reads back. The address type is the family of the first endpoint (IPv4 for an empty
/// slice); weights other than 1 go into the `svcnat.io/weights` annotation.
pub fn to_api(slice: &EndpointSlice) -> discovery::EndpointSlice {
    let address_type = match slice.endpoints.first().map(|e| IpFamily::of(&e.ip)) {
        Some(IpFamily::V6) => "IPv6",
        _ => "IPv4",
    };
    let weights: Vec<String> = slice
        .endpoints
        .iter()
        .filter(|e| e.weight != DEFAULT_WEIGHT)
        .map(|e| format!("{}={}", e.ip, e.weight))
        .collect();
    let endpoints: Vec<discovery::Endpoint> = slice
        .endpoints
        .iter()
        .map(|e| discovery::Endpoint {
            addresses: vec![e.ip.to_string()],
            conditions: Some(discovery::EndpointConditions {
                ready: Some(e.ready),
                serving: Some(e.serving),
                terminating: Some(e.terminating),
            }),
            hostname: e.hostname.clone(),
            node_name: e.node_name.clone(),
            zone: e.zone.clone(),
            hints: (!e.zone_hints.is_empty() || !e.node_hints.is_empty()).then(|| {
                discovery::EndpointHints {
                    for_zones: (!e.zone_hints.is_empty()).then(|| {
                        e.zone_hints
                            .iter()
                            .map(|z| discovery::ForZone { name: z.clone() })
                            .collect()
                    }),
                    for_nodes: (!e.node_hints.is_empty()).then(|| {
                        e.node_hints
                            .iter()
                            .map(|n| discovery::ForNode { name: n.clone() })
                            .collect()
                    }),
                }
            }),
            target_ref: e.pod.as_ref().map(|p| corev1::ObjectReference {
                kind: Some("Pod".into()),
                name: Some(p.clone()),
                namespace: Some(slice.service.namespace.clone()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    // `endpoints` is optional in k8s-openapi's types from 1.36 on.
    k8s_openapi::k8s_if_ge_1_36! { let endpoints = Some(endpoints); }
    discovery::EndpointSlice {
        metadata: meta::ObjectMeta {
            name: Some(slice.name.clone()),
            namespace: Some(slice.service.namespace.clone()),
            labels: Some(
                [
                    (SERVICE_NAME_LABEL.to_string(), slice.service.name.clone()),
                    (MANAGED_BY_LABEL.to_string(), CONTROLLER_NAME.to_string()),
                ]
                .into(),
            ),
            annotations: (!weights.is_empty())
                .then(|| [(WEIGHTS_ANNOTATION.to_string(), weights.join(","))].into()),
            ..Default::default()
        },
        address_type: address_type.into(),
        endpoints,
        ports: Some(
            slice
                .ports
                .iter()
                .map(|p| discovery::EndpointPort {
                    name: Some(p.name.clone()),
                    port: Some(i32::from(p.port)),
                    protocol: Some(p.protocol.as_str().into()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// A Pod before and after a change (`None`: absent).
pub(crate) type PodChange = (Option<Arc<Pod>>, Option<Arc<Pod>>);

/// The controller's state inside a simulated [`Cluster`]: label indexes both ways, and the
/// slices it published.
#[derive(Clone, Debug, Default)]
pub(crate) struct Controller {
    /// (namespace, label key, label value) -> names of the Pods carrying it.
    pods_by_label: BTreeMap<(String, String, String), BTreeSet<String>>,
    /// (namespace, key, value) of one `matchLabels` term -> Services whose selector has it.
    services_by_label: BTreeMap<(String, String, String), BTreeSet<String>>,
    /// Services whose selector has no `matchLabels` term, by namespace (matched by scan).
    services_unindexed: BTreeMap<String, BTreeSet<String>>,
    /// The slices this controller published, by Service.
    published: BTreeMap<ServiceName, BTreeSet<String>>,
}

fn index_key(svc: &Service) -> Option<Option<(String, String, String)>> {
    let sel = svc.selector.as_ref()?;
    Some(
        sel.match_labels
            .iter()
            .next()
            .map(|(k, v)| (svc.name.namespace.clone(), k.clone(), v.clone())),
    )
}

/// Whether two versions of a Service could publish different slices.
fn same_slices(a: &Service, b: &Service) -> bool {
    a.selector == b.selector
        && a.ports == b.ports
        && a.ip_families == b.ip_families
        && a.publish_not_ready_addresses == b.publish_not_ready_addresses
        && (a.service_type == ServiceType::ExternalName)
            == (b.service_type == ServiceType::ExternalName)
}

/// Adds `name` to, or removes it from, the set at `key`, dropping the set when it empties.
fn set_membership<K: Ord>(map: &mut BTreeMap<K, BTreeSet<String>>, key: K, name: &str, add: bool) {
    if add {
        map.entry(key).or_default().insert(name.to_string());
    } else if let Some(set) = map.get_mut(&key) {
        set.remove(name);
        if set.is_empty() {
            map.remove(&key);
        }
    }
}

impl Controller {
    /// Keeps the Pod label index in step.
    pub(crate) fn pod_indexed(&mut self, old: Option<&Pod>, new: Option<&Pod>) {
        if let Some(old) = old {
            for (k, v) in &old.labels {
                let key = (old.name.namespace.clone(), k.clone(), v.clone());
                if let Some(set) = self.pods_by_label.get_mut(&key) {
                    set.remove(&old.name.name);
                    if set.is_empty() {
                        self.pods_by_label.remove(&key);
                    }
                }
            }
        }
        if let Some(new) = new {
            for (k, v) in &new.labels {
                self.pods_by_label
                    .entry((new.name.namespace.clone(), k.clone(), v.clone()))
                    .or_default()
                    .insert(new.name.name.clone());
            }
        }
    }

    /// Services in the Pod's namespace whose selector matches its labels; costs in
    /// proportion to the Services sharing one of its labels, not to the namespace.
    fn services_selecting(&self, cluster: &Cluster, pod: &Pod) -> BTreeSet<ServiceName> {
        let ns = &pod.name.namespace;
        let mut candidates: BTreeSet<&String> = BTreeSet::new();
        for (k, v) in &pod.labels {
            if let Some(set) = self
                .services_by_label
                .get(&(ns.clone(), k.clone(), v.clone()))
            {
                candidates.extend(set);
            }
        }
        if let Some(set) = self.services_unindexed.get(ns) {
            candidates.extend(set);
        }
        candidates
            .into_iter()
            .map(|n| ObjectName::new(ns.clone(), n.clone()))
            .filter(|n| {
                cluster
                    .service(n)
                    .and_then(|s| s.selector.as_ref())
                    .is_some_and(|sel| sel.matches(&pod.labels))
            })
            .collect()
    }

    /// Pods of a namespace that a selector matches, in name order.
    pub(crate) fn select<'a>(
        &self,
        cluster: &'a Cluster,
        namespace: &str,
        selector: &LabelSelector,
    ) -> Vec<&'a Pod> {
        // Start from the smallest posting list of the matchLabels terms; an empty
        // matchLabels falls back to a scan of the namespace.
        let mut best: Option<&BTreeSet<String>> = None;
        for (k, v) in &selector.match_labels {
            let key = (namespace.to_string(), k.clone(), v.clone());
            match self.pods_by_label.get(&key) {
                None => return Vec::new(),
                Some(set) => {
                    if best.is_none_or(|b| set.len() < b.len()) {
                        best = Some(set);
                    }
                }
            }
        }
        let pods = cluster.pods_map();
        match best {
            Some(names) => names
                .iter()
                .filter_map(|n| pods.get(&ObjectName::new(namespace, n.clone())))
                .map(|p| p.as_ref())
                .filter(|p| selector.matches(&p.labels))
                .collect(),
            None => cluster
                .pods_in(namespace)
                .filter(|p| selector.matches(&p.labels))
                .collect(),
        }
    }

    /// Pods were added, changed or removed: republish the slices of every Service that
    /// selected one of them before or selects it now. Returns the Services whose slices
    /// changed.
    pub(crate) fn pods_changed(
        &mut self,
        cluster: &mut Cluster,
        touched: &[PodChange],
    ) -> BTreeSet<ServiceName> {
        let mut affected = BTreeSet::new();
        for (old, new) in touched {
            for p in [old, new].into_iter().flatten() {
                affected.extend(self.services_selecting(cluster, p));
            }
        }
        affected
            .into_iter()
            .filter(|name| self.reconcile(cluster, name))
            .collect()
    }

    /// A Service was added, changed or removed.
    pub(crate) fn service_changed(
        &mut self,
        cluster: &mut Cluster,
        old: Option<&Service>,
        new: Option<&Service>,
    ) {
        if let (Some(a), Some(b)) = (old, new)
            && same_slices(a, b)
        {
            return;
        }
        for (svc, add) in [(old, false), (new, true)] {
            let Some(svc) = svc else { continue };
            let name = &svc.name.name;
            match index_key(svc) {
                None => {}
                Some(Some(key)) => set_membership(&mut self.services_by_label, key, name, add),
                Some(None) => set_membership(
                    &mut self.services_unindexed,
                    svc.name.namespace.clone(),
                    name,
                    add,
                ),
            }
        }
        if let Some(svc) = new.or(old) {
            let name = svc.name.clone();
            self.reconcile(cluster, &name);
        }
    }

    /// A Node's zone changed: republish the Services that have endpoints on it.
    pub(crate) fn node_zone_changed(&mut self, cluster: &mut Cluster, node: &str) {
        let mut affected = BTreeSet::new();
        for pod in cluster.pods() {
            if pod.node_name.as_deref() == Some(node) {
                affected.extend(self.services_selecting(cluster, pod));
            }
        }
        for name in affected {
            self.reconcile(cluster, &name);
        }
    }

    /// Publishes what the Service's slices should be now; returns whether they changed.
    fn reconcile(&mut self, cluster: &mut Cluster, name: &ServiceName) -> bool {
        let before = cluster.generation();
        let desired = match cluster.service(name) {
            Some(svc) => {
                let pods = match &svc.selector {
                    Some(sel) => self.select(cluster, &name.namespace, sel),
                    None => Vec::new(),
                };
                endpoint_slices(svc, pods, |n| cluster.node(n))
            }
            None => Vec::new(),
        };
        let names: BTreeSet<String> = desired.iter().map(|s| s.name.clone()).collect();
        let stale: Vec<String> = self
            .published
            .get(name)
            .map(|old| old.difference(&names).cloned().collect())
            .unwrap_or_default();
        for s in stale {
            cluster.remove_slice(name, &s);
        }
        for s in desired {
            cluster.upsert_slice(s);
        }
        if names.is_empty() {
            self.published.remove(name);
        } else {
            self.published.insert(name.clone(), names);
        }
        cluster.generation() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::labels;
    use std::net::IpAddr;

    fn vote_cluster() -> Cluster {
        let mut c = Cluster::simulated();
        for i in 0..5u8 {
            let mut p = Pod::new(
                ObjectName::new("instavote", format!("vote-{i}")),
                IpAddr::from([10, 244, 1, 10 + i]),
            );
            p.labels = labels(&[("role", "vote")]);
            p.ports.push(ContainerPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            });
            c.upsert_pod(p);
        }
        c
    }

    fn vote_service(target: TargetPort) -> Service {
        let mut s = Service::new(ObjectName::new("instavote", "vote"));
        s.selector = Some(LabelSelector::from_labels(labels(&[("role", "vote")])));
        s.ports.push(ServicePort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: target,
            node_port: None,
            app_protocol: None,
        });
        s
    }

    #[test]
    fn selector_derives_endpoints_and_missing_label_empties_them() {
        let mut c = vote_cluster();
        let svc = vote_service(TargetPort::Number(80));
        c.upsert_service(svc.clone());
        assert_eq!(c.endpoints(&svc)[""].1.len(), 5);
        assert_eq!(c.slice_count(), 1);
        let mut broken = svc.clone();
        broken.selector = Some(LabelSelector::from_labels(labels(&[("role", "nosuch")])));
        c.upsert_service(broken.clone());
        assert!(c.endpoints(&broken)[""].1.is_empty());
        assert_eq!(
            c.slice_count(),
            0,
            "the controller's slices go with the match"
        );
    }

    #[test]
    fn named_target_port_resolves_per_pod() {
        let mut c = vote_cluster();
        let mut odd = Pod::new(
            ObjectName::new("instavote", "vote-odd"),
            IpAddr::from([10, 244, 2, 1]),
        );
        odd.labels = labels(&[("role", "vote")]);
        c.upsert_pod(odd);
        let svc = vote_service(TargetPort::Name("http".into()));
        c.upsert_service(svc.clone());
        let eps = c.endpoints(&svc);
        let list = &eps[""].1;
        assert_eq!(list.len(), 5, "the pod without the named port is left out");
        assert!(list.iter().all(|e| e.port == 8080));
        // It is still an address of the Service (a slice with no ports).
        assert_eq!(c.addresses(&svc).len(), 6);
        assert_eq!(c.slice_count(), 2, "one slice per port mapping");
    }

    #[test]
    fn pod_updates_report_affected_services() {
        let mut c = vote_cluster();
        let svc = vote_service(TargetPort::Number(80));
        c.upsert_service(svc.clone());
        let mut p = c
            .pod(&ObjectName::new("instavote", "vote-0"))
            .cloned()
            .expect("pod");
        p.labels = labels(&[("role", "other")]);
        let affected = c.upsert_pod(p);
        assert!(affected.contains(&svc.name));
        assert_eq!(c.endpoints(&svc)[""].1.len(), 4);
        let affected = c.remove_pod(&ObjectName::new("instavote", "vote-1"));
        assert!(affected.contains(&svc.name));
        assert_eq!(c.endpoints(&svc)[""].1.len(), 3);
    }

    #[test]
    fn terminating_and_not_ready_conditions() {
        let mut c = vote_cluster();
        for (name, f) in [
            (
                "vote-0",
                (|p: &mut Pod| p.terminating = true) as fn(&mut Pod),
            ),
            ("vote-1", |p: &mut Pod| p.ready = false),
        ] {
            let mut p = c
                .pod(&ObjectName::new("instavote", name))
                .cloned()
                .expect("pod");
            f(&mut p);
            c.upsert_pod(p);
        }
        let svc = vote_service(TargetPort::Number(80));
        c.upsert_service(svc.clone());
        let eps = c.endpoints(&svc);
        let by_ip = |last: u8| {
            eps[""]
                .1
                .iter()
                .find(|e| e.endpoint.ip == IpAddr::from([10, 244, 1, last]))
                .cloned()
                .expect("endpoint")
        };
        let t = by_ip(10);
        assert!(!t.endpoint.ready && t.endpoint.serving && t.endpoint.terminating);
        let nr = by_ip(11);
        assert!(!nr.endpoint.ready && !nr.endpoint.serving && !nr.endpoint.terminating);
        let mut publish = svc.clone();
        publish.publish_not_ready_addresses = true;
        c.upsert_service(publish.clone());
        assert!(c.endpoints(&publish)[""].1.iter().all(|e| e.endpoint.ready));
    }

    #[test]
    fn slices_hold_at_most_100_endpoints_and_carry_the_managed_by_label() {
        let mut c = Cluster::simulated();
        let svc = vote_service(TargetPort::Number(80));
        c.upsert_service(svc.clone());
        let pods = (0..250u32).map(|i| {
            let mut p = Pod::new(
                ObjectName::new("instavote", format!("vote-{i:03}")),
                IpAddr::from((0x0af4_0000u32 + i).to_be_bytes()),
            );
            p.labels = labels(&[("role", "vote")]);
            p
        });
        let affected = c.upsert_pods(pods);
        assert_eq!(affected, BTreeSet::from([svc.name.clone()]));
        let sizes: Vec<usize> = c.slices_of(&svc.name).map(|s| s.endpoints.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 250);
        assert!(
            sizes.iter().all(|n| *n <= MAX_ENDPOINTS_PER_SLICE),
            "{sizes:?}"
        );
        assert_eq!(sizes.len(), 3);
        let api = to_api(c.slices_of(&svc.name).next().expect("slice"));
        let labels = api.metadata.labels.expect("labels");
        assert_eq!(labels[MANAGED_BY_LABEL], CONTROLLER_NAME);
        assert_eq!(labels[SERVICE_NAME_LABEL], "vote");
    }

    #[test]
    fn selecting_costs_follow_labels_not_the_namespace() {
        let mut c = Cluster::simulated();
        for i in 0..200 {
            let mut s = vote_service(TargetPort::Number(80));
            s.name.name = format!("svc-{i}");
            s.selector = Some(LabelSelector::from_labels(labels(&[(
                "app",
                &format!("a{i}"),
            )])));
            c.upsert_service(s);
        }
        let mut p = Pod::new(
            ObjectName::new("instavote", "p"),
            IpAddr::from([10, 1, 1, 1]),
        );
        p.labels = labels(&[("app", "a7")]);
        let ctl = c.controller.clone().expect("simulated");
        assert_eq!(
            ctl.services_selecting(&c, &p),
            BTreeSet::from([ObjectName::new("instavote", "svc-7")])
        );
        assert_eq!(c.upsert_pod(p).len(), 1);
    }
}
