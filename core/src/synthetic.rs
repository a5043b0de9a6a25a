//! Synthetic clusters of any size, for benchmarks and load tests of every backend.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::model::*;

/// Shape of a synthetic cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Number of Services.
    pub services: u32,
    /// Endpoints (Pods) per Service.
    pub endpoints: u32,
    /// Names of the Nodes Pods are spread over, round-robin.
    pub nodes: Vec<String>,
    /// Every `nodeport_every`-th Service is a NodePort Service (0: none).
    pub nodeport_every: u32,
}

impl Shape {
    /// `services` x `endpoints` over three nodes, every fourth Service a NodePort.
    pub fn new(services: u32, endpoints: u32) -> Shape {
        Shape {
            services,
            endpoints,
            nodes: vec!["node-1".into(), "node-2".into(), "node-3".into()],
            nodeport_every: 4,
        }
    }
}

/// Builds the cluster: Service `svc-i` in namespace `ns<i % 10>` selects `app=svc-i`; its
/// cluster IP is the i-th address after 10.96.0.16 and Pod j of Service i has the
/// `(i * endpoints + j)`-th address of 10.244.0.0/14. Sizes beyond those ranges wrap.
pub fn cluster(shape: &Shape) -> Cluster {
    let mut c = Cluster::simulated();
    for s in 0..shape.services {
        let ns = format!("ns{}", s % 10);
        let app = format!("svc-{s}");
        let nodeport = shape.nodeport_every != 0 && s % shape.nodeport_every == 0;
        let mut svc = Service::new(ObjectName::new(ns.clone(), app.clone()));
        svc.service_type = if nodeport {
            ServiceType::NodePort
        } else {
            ServiceType::ClusterIp
        };
        svc.cluster_ips = vec![IpAddr::from(
            (0x0a60_0010u32.wrapping_add(s) & 0x000f_ffff | 0x0a60_0000).to_be_bytes(),
        )];
        svc.ip_families = vec![IpFamily::V4];
        let mut sel = BTreeMap::new();
        sel.insert("app".to_string(), app.clone());
        svc.selector = Some(LabelSelector::from_labels(sel));
        svc.ports.push(ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: TargetPort::Number(8080),
            node_port: nodeport.then(|| 30000 + ((s / shape.nodeport_every.max(1)) % 2768) as u16),
            app_protocol: None,
        });
        c.upsert_service(svc);
        let mut pods = Vec::with_capacity(shape.endpoints as usize);
        for e in 0..shape.endpoints {
            let n = s.wrapping_mul(shape.endpoints).wrapping_add(e);
            let mut p = Pod::new(
                ObjectName::new(ns.clone(), format!("{app}-{e}")),
                IpAddr::from(
                    (0x0af4_0000u32.wrapping_add(n) & 0x0003_ffff | 0x0af4_0000).to_be_bytes(),
                ),
            );
            p.labels.insert("app".into(), app.clone());
            if !shape.nodes.is_empty() {
                let i = n as usize % shape.nodes.len();
                p.node_name = shape.nodes.get(i).cloned();
            }
            pods.push(p);
        }
        let _ = c.upsert_pods(pods);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_requested_shape() {
        let c = cluster(&Shape::new(20, 3));
        assert_eq!(c.services().count(), 20);
        assert_eq!(c.pods().count(), 60);
        for svc in c.services() {
            assert_eq!(c.endpoints(svc)["http"].1.len(), 3);
        }
    }
}
