//! Typed, incremental input: `k8s-openapi` objects in, as a kube-rs watcher hands them over.
//!
//! The proxy side reads what kube-proxy reads: [`Service`](corev1::Service),
//! [`EndpointSlice`](discovery::EndpointSlice) and [`Node`](corev1::Node). Pods may be
//! applied too, for cluster DNS (`pods verified`) and views; only a
//! [simulated](Cluster::simulated) cluster turns them into endpoints.
//!
//! Every object is validated as the API server validates it (the same rules, and the same
//! field-precise messages, as manifests get in [`crate::manifest`]); an invalid object
//! changes nothing and yields an [`InvalidObject`] naming the object and each bad field.
//! Each call returns the Services whose plan entries may have changed; the cluster also
//! records them, so [`crate::plan::Plan::update`] needs no list.
//!
//! The way back, for whoever plays the API server (tests, the lab): [`service_to_api`]
//! turns a model Service into the object [`Cluster::apply_service`] reads back as the same
//! Service; [`crate::controller::to_api`] does the same for EndpointSlices.
//!
//! ```
//! use k8s_openapi::api::core::v1 as corev1;
//! use k8s_openapi::api::discovery::v1 as discovery;
//! use svcnat_core::model::Cluster;
//! use svcnat_core::plan::{NodeContext, Plan};
//!
//! let svc: corev1::Service = serde_json::from_value(serde_json::json!({
//!     "metadata": {"name": "redis", "namespace": "instavote"},
//!     "spec": {"clusterIPs": ["10.96.0.20"], "selector": {"app": "redis"},
//!              "ports": [{"port": 6379}]}
//! }))?;
//! let slice: discovery::EndpointSlice = serde_json::from_value(serde_json::json!({
//!     "metadata": {"name": "redis-abcde", "namespace": "instavote",
//!                  "labels": {"kubernetes.io/service-name": "redis"}},
//!     "addressType": "IPv4",
//!     "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true}}],
//!     "ports": [{"name": "", "port": 6379, "protocol": "TCP"}]
//! }))?;
//!
//! let mut cluster = Cluster::new();
//! let node = NodeContext::new("node-1", vec!["192.168.50.11".parse()?], vec![]);
//! let mut plan = Plan::compile(&cluster, &node);
//! cluster.apply_service(&svc)?;
//! let changed = cluster.apply_endpoint_slice(&slice)?;
//! assert_eq!(changed.len(), 1);
//! let diff = plan.update(&cluster);
//! assert!(!diff.is_empty());
//! assert_eq!(plan.endpoint_count(), 1);
//!
//! // A bad object changes nothing and names its field.
//! let mut bad = slice.clone();
//! bad.endpoints.as_mut().expect("endpoints")[0].addresses[0] = "10.244.1.500".into();
//! let err = cluster.apply_endpoint_slice(&bad).unwrap_err();
//! assert_eq!(err.errors[0].field, "endpoints[0].addresses[0]");
//! assert!(plan.update(&cluster).is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::cluster::Cluster;
use crate::manifest::{LoadError, Object, ObjectRef, ValidateError, typed};
use crate::model::{
    IpFamilyPolicy, ObjectName, Service, ServiceName, ServiceType, SessionAffinity, TargetPort,
};

/// One invalid field of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field path, e.g. `spec.ports[0].port` (empty when the whole object is wrong).
    pub field: String,
    /// What is wrong.
    pub error: ValidateError,
}

/// An object the API server would refuse: which object, and every bad field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidObject {
    /// Kind, namespace and name.
    pub object: ObjectRef,
    /// The bad fields, at least one.
    pub errors: Vec<FieldError>,
}

impl InvalidObject {
    fn new(object: ObjectRef, errors: Vec<LoadError>) -> Self {
        let mut errors: Vec<FieldError> = errors
            .into_iter()
            .map(|e| FieldError {
                field: e.field,
                error: e.error,
            })
            .collect();
        if errors.is_empty() {
            errors.push(FieldError {
                field: String::new(),
                error: ValidateError::Decode("the object was refused".into()),
            });
        }
        InvalidObject { object, errors }
    }
}

impl fmt::Display for InvalidObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is invalid", self.object)?;
        for (i, e) in self.errors.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            if !e.field.is_empty() {
                write!(f, "{}: ", e.field)?;
            }
            write!(f, "{}", e.error)?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidObject {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.errors
            .first()
            .map(|e| &e.error as &(dyn std::error::Error + 'static))
    }
}

/// The Services an input changed (empty when the object was already as given).
pub type Changed = BTreeSet<ServiceName>;

impl Cluster {
    fn changes(&self, before: crate::cluster::Generation) -> Changed {
        self.changed_since(before)
            .map(|s| s.into_iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Adds or replaces a Service (an ADDED or MODIFIED watch event).
    pub fn apply_service(&mut self, svc: &corev1::Service) -> Result<Changed, InvalidObject> {
        let before = self.generation();
        match typed::service(svc) {
            Ok(Object::Service(s)) => {
                self.upsert_service(s);
                Ok(self.changes(before))
            }
            Ok(_) => Ok(Changed::new()),
            Err((object, errors)) => Err(InvalidObject::new(object, errors)),
        }
    }

    /// Removes a Service (a DELETED watch event).
    pub fn delete_service(&mut self, namespace: &str, name: &str) -> Changed {
        let before = self.generation();
        self.remove_service(&ObjectName::new(namespace, name));
        self.changes(before)
    }

    /// Adds or replaces an EndpointSlice. A slice moved to another Service (its
    /// `kubernetes.io/service-name` label changed) leaves the old one: both are returned.
    pub fn apply_endpoint_slice(
        &mut self,
        slice: &discovery::EndpointSlice,
    ) -> Result<Changed, InvalidObject> {
        let before = self.generation();
        match typed::slice(slice) {
            Ok(Object::Slices(slices)) => {
                for s in slices {
                    self.upsert_slice(s);
                }
                Ok(self.changes(before))
            }
            Ok(_) => Ok(Changed::new()),
            Err((object, errors)) => Err(InvalidObject::new(object, errors)),
        }
    }

    /// Removes an EndpointSlice by namespace and name.
    pub fn delete_endpoint_slice(&mut self, namespace: &str, name: &str) -> Changed {
        let before = self.generation();
        self.remove_slice_named(namespace, name);
        self.changes(before)
    }

    /// Adds or replaces a Node.
    pub fn apply_node(&mut self, node: &corev1::Node) -> Result<Changed, InvalidObject> {
        let before = self.generation();
        match typed::node(node) {
            Ok(Object::Node(n)) => {
                self.upsert_node(n);
                Ok(self.changes(before))
            }
            Ok(_) => Ok(Changed::new()),
            Err((object, errors)) => Err(InvalidObject::new(object, errors)),
        }
    }

    /// Removes a Node.
    pub fn delete_node(&mut self, name: &str) -> Changed {
        let before = self.generation();
        self.remove_node(name);
        self.changes(before)
    }

    /// Adds or replaces a Pod (for DNS and views; a [simulated](Cluster::simulated)
    /// cluster also republishes the slices of the Services selecting it).
    pub fn apply_pod(&mut self, pod: &corev1::Pod) -> Result<Changed, InvalidObject> {
        let before = self.generation();
        match typed::pod(pod) {
            Ok(Object::Pod(p)) => {
                self.upsert_pod(p);
                Ok(self.changes(before))
            }
            Ok(_) => Ok(Changed::new()),
            Err((object, errors)) => Err(InvalidObject::new(object, errors)),
        }
    }

    /// Removes a Pod.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Changed {
        let before = self.generation();
        self.remove_pod(&ObjectName::new(namespace, name));
        self.changes(before)
    }
}

/// The way back: a Service as an API server would hold it, the inverse of
/// [`Cluster::apply_service`].
///
/// For every Service the typed input or the manifest loader produces,
/// `apply_service(&service_to_api(&s))` yields `s` again (a property the tests check over
/// every field). The object is what a client would read after the API server defaulted
/// it: `type`, `clusterIP` and `clusterIPs` (`None` when headless, absent for
/// ExternalName), `ipFamilies`, `ipFamilyPolicy`, `internalTrafficPolicy`,
/// `sessionAffinity` (with `sessionAffinityConfig` for ClientIP), every port's protocol and
/// targetPort; `externalTrafficPolicy` only where it may be set (node ports or
/// externalIPs); the load balancer addresses in `status.loadBalancer.ingress` and the
/// requested one in `spec.loadBalancerIP`; the selector as `matchLabels` (a Service has no
/// other kind); `creationTimestamp` when the model has one. No `uid` or
/// `resourceVersion`: the API server stamps those.
///
/// Values no validated Service holds do not come back unchanged: an empty selector (read
/// back as none), a Local external policy without external addresses (refused), load
/// balancer addresses on another type (refused).
pub fn service_to_api(svc: &Service) -> corev1::Service {
    let non_empty = |m: &BTreeMap<String, String>| (!m.is_empty()).then(|| m.clone());
    let strings = |v: Vec<String>| (!v.is_empty()).then_some(v);
    let external_name = svc.service_type == ServiceType::ExternalName;
    let cluster_ips: Vec<String> = if external_name {
        Vec::new()
    } else if svc.headless {
        vec!["None".to_string()]
    } else {
        svc.cluster_ips.iter().map(ToString::to_string).collect()
    };
    let (session_affinity, session_affinity_config) = match svc.session_affinity {
        SessionAffinity::None => ("None", None),
        SessionAffinity::ClientIp { timeout_seconds } => (
            "ClientIP",
            Some(corev1::SessionAffinityConfig {
                client_ip: Some(corev1::ClientIPConfig {
                    timeout_seconds: i32::try_from(timeout_seconds).ok(),
                }),
            }),
        ),
    };
    // "externalTrafficPolicy ... may only be set on services with an external address".
    let has_external = svc.service_type.has_node_ports() || !svc.external_ips.is_empty();
    let ports = svc
        .ports
        .iter()
        .map(|p| corev1::ServicePort {
            name: (!p.name.is_empty()).then(|| p.name.clone()),
            protocol: Some(p.protocol.as_str().to_string()),
            port: i32::from(p.port),
            target_port: Some(match &p.target_port {
                TargetPort::Number(n) => IntOrString::Int(i32::from(*n)),
                TargetPort::Name(s) => IntOrString::String(s.clone()),
            }),
            node_port: p.node_port.map(i32::from),
            app_protocol: p.app_protocol.clone(),
        })
        .collect();
    let spec = corev1::ServiceSpec {
        type_: Some(svc.service_type.as_str().to_string()),
        cluster_ip: cluster_ips.first().cloned(),
        cluster_ips: strings(cluster_ips),
        external_name: if external_name {
            svc.external_name.clone()
        } else {
            None
        },
        ip_families: strings(
            svc.ip_families
                .iter()
                .map(|f| f.as_str().to_string())
                .collect(),
        ),
        ip_family_policy: (!external_name || svc.ip_family_policy != IpFamilyPolicy::SingleStack)
            .then(|| {
                match svc.ip_family_policy {
                    IpFamilyPolicy::SingleStack => "SingleStack",
                    IpFamilyPolicy::PreferDualStack => "PreferDualStack",
                    IpFamilyPolicy::RequireDualStack => "RequireDualStack",
                }
                .to_string()
            }),
        selector: svc
            .selector
            .as_ref()
            .and_then(|s| non_empty(&s.match_labels)),
        ports: Some(ports),
        external_ips: strings(svc.external_ips.iter().map(ToString::to_string).collect()),
        load_balancer_ip: svc.requested_load_balancer_ip.map(|ip| ip.to_string()),
        load_balancer_source_ranges: strings(
            svc.load_balancer_source_ranges
                .iter()
                .map(ToString::to_string)
                .collect(),
        ),
        session_affinity: Some(session_affinity.to_string()),
        session_affinity_config,
        external_traffic_policy: has_external
            .then(|| svc.external_traffic_policy.as_str().to_string()),
        internal_traffic_policy: Some(svc.internal_traffic_policy.as_str().to_string()),
        health_check_node_port: svc.health_check_node_port.map(i32::from),
        publish_not_ready_addresses: svc.publish_not_ready_addresses.then_some(true),
        traffic_distribution: svc.traffic_distribution.map(|t| t.as_str().to_string()),
        ..Default::default()
    };
    let ingress: Vec<corev1::LoadBalancerIngress> = svc
        .load_balancer_ips
        .iter()
        .map(|ip| (ip, "VIP"))
        .chain(svc.load_balancer_proxy_ips.iter().map(|ip| (ip, "Proxy")))
        .map(|(ip, mode)| corev1::LoadBalancerIngress {
            ip: Some(ip.to_string()),
            ip_mode: Some(mode.to_string()),
            ..Default::default()
        })
        .collect();
    corev1::Service {
        metadata: meta::ObjectMeta {
            name: Some(svc.name.name.clone()),
            namespace: Some(svc.name.namespace.clone()),
            labels: non_empty(&svc.labels),
            annotations: non_empty(&svc.annotations),
            creation_timestamp: svc
                .created
                .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok())
                .map(meta::Time),
            ..Default::default()
        },
        spec: Some(spec),
        status: Some(corev1::ServiceStatus {
            load_balancer: Some(corev1::LoadBalancerStatus {
                ingress: (!ingress.is_empty()).then_some(ingress),
            }),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::plan::{NodeContext, Plan};

    fn svc(json: serde_json::Value) -> corev1::Service {
        serde_json::from_value(json).unwrap()
    }

    fn node() -> NodeContext {
        NodeContext::new("n1", vec!["192.168.1.1".parse().unwrap()], vec![])
    }

    #[test]
    fn cluster_ips_without_families_still_compile() {
        // A Service built by hand (or by an old client) with clusterIPs and no
        // ipFamilies: the API server defaults the families from the addresses.
        let mut c = Cluster::new();
        c.apply_service(&svc(serde_json::json!({
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.5", "ports": [{"port": 80}]}
        })))
        .unwrap();
        let plan = Plan::compile(&c, &node());
        assert_eq!(plan.frontends().count(), 1, "{}", plan.render());
    }

    #[test]
    fn an_invalid_service_changes_nothing_and_names_the_field() {
        let mut c = Cluster::new();
        let err = c
            .apply_service(&svc(serde_json::json!({
                "metadata": {"name": "a", "namespace": "ns"},
                "spec": {"clusterIP": "10.96.0.5", "ports": [{"port": 70000}]}
            })))
            .unwrap_err();
        assert_eq!(err.object.to_string(), "Service ns/a");
        assert_eq!(err.errors[0].field, "spec.ports[0].port");
        assert!(
            err.to_string()
                .starts_with("Service ns/a is invalid: spec.ports[0].port: ")
        );
        assert!(std::error::Error::source(&err).is_some());
        assert_eq!(c.services().count(), 0);
    }

    #[test]
    fn deletes_report_what_they_changed() {
        let mut c = Cluster::new();
        let changed = c
            .apply_service(&svc(serde_json::json!({
                "metadata": {"name": "a", "namespace": "ns"},
                "spec": {"clusterIP": "10.96.0.5", "ports": [{"port": 80}]}
            })))
            .unwrap();
        assert_eq!(changed, Changed::from([ObjectName::new("ns", "a")]));
        assert_eq!(c.delete_service("ns", "a").len(), 1);
        assert!(c.delete_service("ns", "a").is_empty());
        assert!(c.delete_endpoint_slice("ns", "nosuch").is_empty());
    }
}
