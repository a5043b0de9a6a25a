//! Playing the control plane against a [`FakeApiServer`]: a [`Cluster`] (usually a
//! [simulated](Cluster::simulated) one, whose controller turns Pods into EndpointSlices)
//! written to the server as API objects, and on every later call only what changed.
//!
//! Role in the tree: test harness. The conformance suite and the lab replay use it to drive
//! proxies and cluster DNS through the API exactly as they drive them through a cluster
//! value or a manifest directory.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use svcnat_core::controller;
use svcnat_core::input::service_to_api;
use svcnat_core::model::{Cluster, Node};

use super::{FakeApiError, FakeApiServer};
use crate::api::HEADLESS_LABEL;

/// The zone label of a Node (`topology.kubernetes.io/zone`).
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A Node as the API server would hold it: its addresses as `InternalIP`s, its pod CIDRs,
/// its zone as the `topology.kubernetes.io/zone` label.
pub fn node_to_api(node: &Node) -> corev1::Node {
    corev1::Node {
        metadata: meta::ObjectMeta {
            name: Some(node.name.clone()),
            labels: node
                .zone
                .as_ref()
                .map(|z| [(ZONE_LABEL.to_string(), z.clone())].into()),
            ..Default::default()
        },
        spec: Some(corev1::NodeSpec {
            pod_cidr: node.pod_cidrs.first().map(ToString::to_string),
            pod_cidrs: (!node.pod_cidrs.is_empty())
                .then(|| node.pod_cidrs.iter().map(ToString::to_string).collect()),
            // A terminating Node as the cluster autoscaler marks one.
            taints: node.terminating.then(|| {
                vec![corev1::Taint {
                    key: svcnat_core::model::TO_BE_DELETED_TAINT.into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }),
        status: Some(corev1::NodeStatus {
            addresses: Some(
                node.addresses
                    .iter()
                    .map(|a| corev1::NodeAddress {
                        type_: "InternalIP".into(),
                        address: a.to_string(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
    }
}

/// Namespace (empty for Nodes) and name.
type Key = (String, String);

/// What has been written to a server: Services, EndpointSlices and Nodes, as written.
#[derive(Debug, Default)]
pub struct Publisher {
    services: BTreeMap<Key, corev1::Service>,
    slices: BTreeMap<Key, discovery::EndpointSlice>,
    nodes: BTreeMap<Key, corev1::Node>,
}

/// The writes one [`Publisher::publish`] made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// Objects created or updated, as `Kind namespace/name`.
    pub applied: Vec<String>,
    /// Objects deleted, as `Kind namespace/name`.
    pub deleted: Vec<String>,
}

impl Published {
    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.deleted.is_empty()
    }
}

impl Publisher {
    /// A publisher that has written nothing yet.
    pub fn new() -> Publisher {
        Publisher::default()
    }

    /// Writes the cluster's Services ([`service_to_api`]), their EndpointSlices
    /// ([`controller::to_api`], with the `service.kubernetes.io/headless` label the
    /// EndpointSlice controller puts on a headless Service's slices) and its Nodes
    /// ([`node_to_api`]) to `server`: only the objects that differ from the last publish,
    /// and deletes of those that are gone. Services are created before their slices and
    /// deleted after them. On an error, what was written so far is remembered.
    pub fn publish(
        &mut self,
        cluster: &Cluster,
        server: &FakeApiServer,
    ) -> Result<Published, FakeApiError> {
        let mut services = BTreeMap::new();
        let mut slices = BTreeMap::new();
        for svc in cluster.services() {
            let key = (svc.name.namespace.clone(), svc.name.name.clone());
            services.insert(key, service_to_api(svc));
            for slice in cluster.slices_of(&svc.name) {
                let mut obj = controller::to_api(slice);
                if svc.headless {
                    obj.metadata
                        .labels
                        .get_or_insert_default()
                        .insert(HEADLESS_LABEL.to_string(), String::new());
                }
                slices.insert((svc.name.namespace.clone(), slice.name.clone()), obj);
            }
        }
        let nodes = cluster
            .nodes()
            .map(|n| ((String::new(), n.name.clone()), node_to_api(n)))
            .collect();
        let mut out = Published::default();
        let gone_nodes = apply_changed(&mut self.nodes, nodes, "Node", server, &mut out)?;
        delete(&mut self.nodes, gone_nodes, "Node", server, &mut out)?;
        let gone_services =
            apply_changed(&mut self.services, services, "Service", server, &mut out)?;
        let gone_slices =
            apply_changed(&mut self.slices, slices, "EndpointSlice", server, &mut out)?;
        delete(
            &mut self.slices,
            gone_slices,
            "EndpointSlice",
            server,
            &mut out,
        )?;
        delete(
            &mut self.services,
            gone_services,
            "Service",
            server,
            &mut out,
        )?;
        Ok(out)
    }
}

/// Applies the objects of `wanted` that differ from `written`; returns the keys written
/// before and no longer wanted.
fn apply_changed<K>(
    written: &mut BTreeMap<Key, K>,
    wanted: BTreeMap<Key, K>,
    kind: &str,
    server: &FakeApiServer,
    out: &mut Published,
) -> Result<Vec<Key>, FakeApiError>
where
    K: k8s_openapi::Resource
        + k8s_openapi::serde::Serialize
        + k8s_openapi::serde::de::DeserializeOwned
        + PartialEq,
{
    let gone: Vec<Key> = written
        .keys()
        .filter(|k| !wanted.contains_key(*k))
        .cloned()
        .collect();
    for (key, obj) in wanted {
        if written.get(&key) == Some(&obj) {
            continue;
        }
        server.apply(&obj)?;
        out.applied.push(show(kind, &key));
        written.insert(key, obj);
    }
    Ok(gone)
}

/// Deletes the objects at `keys`.
fn delete<K>(
    written: &mut BTreeMap<Key, K>,
    keys: Vec<Key>,
    kind: &str,
    server: &FakeApiServer,
    out: &mut Published,
) -> Result<(), FakeApiError> {
    for key in keys {
        server.delete(kind, &key.0, &key.1)?;
        out.deleted.push(show(kind, &key));
        written.remove(&key);
    }
    Ok(())
}

fn show(kind: &str, (ns, name): &Key) -> String {
    if ns.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {ns}/{name}")
    }
}
