//! Which connection-tracking entries a plan change leaves stale, for the backends whose
//! datapath keeps its own per-flow state (kernel conntrack under iptables and IPVS, the
//! userspace engine's table).
//!
//! A NAT decision is taken on a flow's first packet and then remembered. For TCP that is
//! what everyone wants: an established connection keeps its endpoint. UDP has no
//! connection to end, so a client that keeps sending from one port (a DNS resolver with a
//! connected socket) keeps its entry alive forever, pointing at whatever was decided first.
//! kube-proxy (`pkg/proxy/conntrack/cleanup.go`) therefore deletes, after each sync, exactly
//! two kinds of entries for UDP (and SCTP) Service ports, and nothing else:
//!
//! - an endpoint left: a client that keeps sending would stay pinned to it, so its
//!   entries go ([`StaleFlow::EndpointGone`]: original destination a frontend, reply
//!   source the departed endpoint);
//! - a frontend that had no endpoints (so its packets were rejected or dropped, and the
//!   kernel may have tracked them untranslated) gets some: every entry to it goes
//!   ([`StaleFlow::FrontendActivated`]: original destination a frontend whose backend set
//!   went from no endpoints, or no set at all for a new Service, to some that take new
//!   flows).
//!
//! Unlike kube-proxy, which matches an IP alone (or a node port alone), both kinds match
//! address *and* port on each side, so an endpoint that leaves one Service port keeps its
//! flows of other ports, and a node port is matched on the node addresses the plan serves
//! it on.
//!
//! [`stale_flows`] computes the set from a [`PlanDiff`] and the plan it leads to, so a
//! backend needs no copy of the previous plan. It is pure and cheap: it looks only at the
//! backend sets the diff touches and the frontends of their Services.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use crate::model::{IpFamily, Protocol};
use crate::plan::{BackendSet, BackendSetId, Frontend, FrontendKey, Op, Plan, PlanDiff};

/// Whether flows of `protocol` keep a stale NAT decision that must be deleted when
/// endpoints change (kube-proxy's `IsClearConntrackNeeded`: UDP and SCTP, never TCP).
pub fn needs_cleanup(protocol: Protocol) -> bool {
    matches!(protocol, Protocol::Udp | Protocol::Sctp)
}

/// A class of tracked flows that a plan change made wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StaleFlow {
    /// Flows translated from `frontend` to `endpoint`, which left the frontend's backend
    /// set: original destination `frontend`, reply source `endpoint`.
    EndpointGone {
        /// The protocol (UDP or SCTP).
        protocol: Protocol,
        /// The frontend's address and port (original destination).
        frontend: SocketAddr,
        /// The endpoint's address and port (reply source).
        endpoint: SocketAddr,
    },
    /// Every flow to `frontend`, whose backend set just gained its first usable
    /// endpoints: whatever was tracked before was not translated to one of them.
    FrontendActivated {
        /// The protocol (UDP or SCTP).
        protocol: Protocol,
        /// The frontend's address and port (original destination).
        frontend: SocketAddr,
    },
}

impl StaleFlow {
    /// The protocol of the flows.
    pub fn protocol(&self) -> Protocol {
        match self {
            StaleFlow::EndpointGone { protocol, .. }
            | StaleFlow::FrontendActivated { protocol, .. } => *protocol,
        }
    }

    /// The frontend the flows were sent to (their original destination).
    pub fn frontend(&self) -> SocketAddr {
        match self {
            StaleFlow::EndpointGone { frontend, .. }
            | StaleFlow::FrontendActivated { frontend, .. } => *frontend,
        }
    }

    /// The address family of the flows.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.frontend().ip())
    }

    /// Whether a tracked flow belongs to this class: its protocol, the destination of its
    /// original direction, and the source of its reply direction (where the reply comes
    /// from: the endpoint after DNAT, the frontend itself when untranslated).
    pub fn matches(&self, protocol: Protocol, orig_dst: SocketAddr, reply_src: SocketAddr) -> bool {
        if protocol != self.protocol() || orig_dst != self.frontend() {
            return false;
        }
        match self {
            StaleFlow::EndpointGone { endpoint, .. } => reply_src == *endpoint,
            StaleFlow::FrontendActivated { .. } => true,
        }
    }
}

impl fmt::Display for StaleFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StaleFlow::EndpointGone {
                protocol,
                frontend,
                endpoint,
            } => write!(f, "{protocol} {frontend} -> {endpoint} (endpoint gone)"),
            StaleFlow::FrontendActivated { protocol, frontend } => {
                write!(f, "{protocol} {frontend} (first endpoints)")
            }
        }
    }
}

/// What the diff says about one backend set: its endpoint count before, and the endpoints
/// that left it.
struct SetChange<'a> {
    old_len: usize,
    gone: Vec<SocketAddr>,
    new: Option<&'a BackendSet>,
}

fn serves(fe: &Frontend, id: &BackendSetId) -> bool {
    &fe.backends == id || fe.local_shortcut.as_ref() == Some(id)
}

/// The flows that applying `diff` (leading to `new`) made stale: see the
/// [module documentation](self). Empty for TCP frontends, for sets that did not change,
/// and for sets that only gained endpoints after already having some.
pub fn stale_flows(diff: &PlanDiff, new: &Plan) -> BTreeSet<StaleFlow> {
    let mut sets: BTreeMap<&BackendSetId, SetChange<'_>> = BTreeMap::new();
    let mut removed_fe: Vec<(&FrontendKey, &Frontend)> = Vec::new();
    let mut added_fe: BTreeSet<&FrontendKey> = BTreeSet::new();
    let mut updated_fe: BTreeMap<&FrontendKey, &Frontend> = BTreeMap::new();
    for op in &diff.ops {
        match op {
            Op::AddBackendSet(s) if needs_cleanup(s.id.service_port.protocol) => {
                sets.insert(
                    &s.id,
                    SetChange {
                        old_len: 0,
                        gone: Vec::new(),
                        new: Some(s),
                    },
                );
            }
            Op::UpdateBackendSet { set, changes }
                if needs_cleanup(set.id.service_port.protocol) =>
            {
                let old_len = (set.endpoints.len() + changes.removed.len())
                    .saturating_sub(changes.added.len());
                sets.insert(
                    &set.id,
                    SetChange {
                        old_len,
                        gone: changes.removed.iter().map(|e| e.addr).collect(),
                        new: Some(set),
                    },
                );
            }
            Op::RemoveBackendSet(s) if needs_cleanup(s.id.service_port.protocol) => {
                sets.insert(
                    &s.id,
                    SetChange {
                        old_len: s.endpoints.len(),
                        gone: s.endpoints.iter().map(|e| e.addr).collect(),
                        new: None,
                    },
                );
            }
            Op::RemoveFrontend { key, old } if needs_cleanup(key.protocol) => {
                removed_fe.push((key, old));
            }
            Op::AddFrontend { key, .. } if needs_cleanup(key.protocol) => {
                added_fe.insert(key);
            }
            Op::UpdateFrontend { key, old, .. } if needs_cleanup(key.protocol) => {
                updated_fe.insert(key, old);
            }
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for (id, change) in &sets {
        // The frontends that served this set before the change: those of the new plan
        // that existed already (as they were), and those the diff removed.
        // (An updated frontend may have changed hands between Services contesting its
        // address, so the updated ones are taken from the diff, not the Service.)
        let before = new
            .frontends_of_service(&id.service_port.service)
            .filter(|(k, _)| !added_fe.contains(k) && !updated_fe.contains_key(k))
            .map(|(k, f)| (k, &**f))
            .chain(updated_fe.iter().map(|(k, f)| (*k, *f)))
            .chain(removed_fe.iter().copied())
            .filter(|(_, f)| serves(f, id));
        for (key, _) in before {
            let frontend = SocketAddr::new(key.addr, key.port);
            // An endpoint still reachable through the frontend's other set (the
            // externalTrafficPolicy: Local short circuit) keeps its flows.
            let still: BTreeSet<SocketAddr> = match new.frontend(key) {
                Some(f) => [Some(&f.backends), f.local_shortcut.as_ref()]
                    .into_iter()
                    .flatten()
                    .filter_map(|s| new.backend_set(s))
                    .flat_map(|s| s.endpoints.iter().map(|e| e.addr))
                    .collect(),
                None => BTreeSet::new(),
            };
            for endpoint in change.gone.iter().filter(|e| !still.contains(e)) {
                out.insert(StaleFlow::EndpointGone {
                    protocol: key.protocol,
                    frontend,
                    endpoint: *endpoint,
                });
            }
        }
        // "A UDP service that changes from 0 to non-0 endpoints is newly active."
        if change.old_len == 0
            && let Some(set) = change.new
            && !set.is_empty()
        {
            for (key, _) in new
                .frontends_of_service(&id.service_port.service)
                .filter(|(_, f)| serves(f, id))
            {
                out.insert(StaleFlow::FrontendActivated {
                    protocol: key.protocol,
                    frontend: SocketAddr::new(key.addr, key.port),
                });
            }
        }
    }
    out
}

/// The distinct address families of `flows`, IPv4 first.
pub fn families(flows: &BTreeSet<StaleFlow>) -> Vec<IpFamily> {
    let mut v: Vec<IpFamily> = Vec::new();
    for f in flows {
        if !v.contains(&f.family()) {
            v.push(f.family());
        }
    }
    v.sort_by_key(|f| matches!(f, IpFamily::V6));
    v
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use super::*;
    use crate::cluster::Cluster;
    use crate::model::*;
    use crate::plan::NodeContext;

    const NODE_IP: [u8; 4] = [192, 168, 0, 1];

    fn node() -> NodeContext {
        NodeContext::new(
            "n1",
            vec![IpAddr::from(NODE_IP)],
            vec!["10.244.0.0/16".parse().unwrap()],
        )
    }

    fn sock(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::from(ip), port)
    }

    /// A NodePort Service `dns` on 10.96.0.10:53 (node port 30053) selecting `app=dns`.
    fn dns(protocol: Protocol) -> Service {
        let mut svc = Service::new(ObjectName::new("ns", "dns"));
        svc.service_type = ServiceType::NodePort;
        svc.cluster_ips = vec![IpAddr::from([10, 96, 0, 10])];
        svc.ip_families = vec![IpFamily::V4];
        let mut sel = BTreeMap::new();
        sel.insert("app".to_string(), "dns".to_string());
        svc.selector = Some(LabelSelector::from_labels(sel));
        let mut port = ServicePort::new(String::new(), protocol, 53, TargetPort::Number(5353));
        port.node_port = Some(30053);
        svc.ports.push(port);
        svc
    }

    fn pod(i: u8) -> Pod {
        let mut pod = Pod::new(
            ObjectName::new("ns", format!("dns-{i}")),
            IpAddr::from([10, 244, 0, i]),
        );
        pod.labels.insert("app".into(), "dns".into());
        pod.node_name = Some("n1".into());
        pod
    }

    /// The stale flows of one change, found through `Plan::update` as a backend sees it.
    fn after(c: &mut Cluster, change: impl FnOnce(&mut Cluster)) -> BTreeSet<StaleFlow> {
        let mut plan = Plan::compile(c, &node());
        change(c);
        let diff = plan.update(c);
        stale_flows(&diff, &plan)
    }

    fn cluster(protocol: Protocol, pods: &[u8]) -> Cluster {
        let mut c = Cluster::simulated();
        c.upsert_service(dns(protocol));
        for i in pods {
            c.upsert_pod(pod(*i));
        }
        c
    }

    fn gone(frontend: SocketAddr, endpoint: SocketAddr) -> StaleFlow {
        StaleFlow::EndpointGone {
            protocol: Protocol::Udp,
            frontend,
            endpoint,
        }
    }

    fn activated(frontend: SocketAddr) -> StaleFlow {
        StaleFlow::FrontendActivated {
            protocol: Protocol::Udp,
            frontend,
        }
    }

    #[test]
    fn a_departed_udp_endpoint_is_stale_on_every_frontend_it_served() {
        let mut c = cluster(Protocol::Udp, &[5, 6]);
        let flows = after(&mut c, |c| {
            c.remove_pod(&ObjectName::new("ns", "dns-5"));
        });
        let ep = sock([10, 244, 0, 5], 5353);
        let want: BTreeSet<_> = [
            gone(sock([10, 96, 0, 10], 53), ep),
            gone(sock(NODE_IP, 30053), ep),
        ]
        .into();
        assert_eq!(flows, want);
    }

    #[test]
    fn tcp_never_needs_cleanup() {
        let mut c = cluster(Protocol::Tcp, &[5, 6]);
        assert!(
            after(&mut c, |c| {
                c.remove_pod(&ObjectName::new("ns", "dns-5"));
            })
            .is_empty()
        );
        let mut c = cluster(Protocol::Tcp, &[]);
        assert!(
            after(&mut c, |c| {
                c.upsert_pod(pod(5));
            })
            .is_empty()
        );
    }

    #[test]
    fn gaining_endpoints_when_some_exist_changes_nothing() {
        let mut c = cluster(Protocol::Udp, &[5]);
        assert!(
            after(&mut c, |c| {
                c.upsert_pod(pod(6));
            })
            .is_empty()
        );
    }

    #[test]
    fn draining_an_endpoint_keeps_its_flows() {
        // Weight 0: kept for existing flows, never chosen for new ones.
        let mut c = cluster(Protocol::Udp, &[5, 6]);
        let flows = after(&mut c, |c| {
            let mut p = pod(5);
            p.weight = 0;
            c.upsert_pod(p);
        });
        assert!(flows.is_empty(), "{flows:?}");
    }

    #[test]
    fn first_endpoints_make_every_frontend_of_the_set_stale() {
        let mut c = cluster(Protocol::Udp, &[]);
        let flows = after(&mut c, |c| {
            c.upsert_pod(pod(5));
        });
        let want: BTreeSet<_> = [
            activated(sock([10, 96, 0, 10], 53)),
            activated(sock(NODE_IP, 30053)),
        ]
        .into();
        assert_eq!(flows, want);
    }

    #[test]
    fn a_new_service_with_endpoints_is_newly_active() {
        let mut c = Cluster::simulated();
        c.upsert_pod(pod(5));
        let flows = after(&mut c, |c| {
            c.upsert_service(dns(Protocol::Udp));
        });
        assert!(
            flows.contains(&activated(sock([10, 96, 0, 10], 53))),
            "{flows:?}"
        );
        assert_eq!(flows.len(), 2, "{flows:?}");
    }

    #[test]
    fn a_new_service_without_endpoints_changes_nothing() {
        let mut c = Cluster::simulated();
        assert!(
            after(&mut c, |c| {
                c.upsert_service(dns(Protocol::Udp));
            })
            .is_empty()
        );
    }

    #[test]
    fn a_deleted_service_leaves_its_endpoints_flows_stale() {
        let mut c = cluster(Protocol::Udp, &[5]);
        let flows = after(&mut c, |c| {
            c.remove_service(&ObjectName::new("ns", "dns"));
        });
        let ep = sock([10, 244, 0, 5], 5353);
        let want: BTreeSet<_> = [
            gone(sock([10, 96, 0, 10], 53), ep),
            gone(sock(NODE_IP, 30053), ep),
        ]
        .into();
        assert_eq!(flows, want);
    }

    #[test]
    fn replacing_the_only_endpoint_is_one_departure() {
        let mut c = cluster(Protocol::Udp, &[5]);
        let flows = after(&mut c, |c| {
            c.remove_pod(&ObjectName::new("ns", "dns-5"));
            c.upsert_pod(pod(6));
        });
        assert!(
            flows
                .iter()
                .all(|f| matches!(f, StaleFlow::EndpointGone { endpoint, .. } if *endpoint == sock([10, 244, 0, 5], 5353))),
            "{flows:?}"
        );
        assert_eq!(flows.len(), 2);
    }

    #[test]
    fn matching_is_by_address_and_port_on_both_sides() {
        let f = gone(sock([10, 96, 0, 10], 53), sock([10, 244, 0, 5], 5353));
        let fe = sock([10, 96, 0, 10], 53);
        assert!(f.matches(Protocol::Udp, fe, sock([10, 244, 0, 5], 5353)));
        assert!(!f.matches(Protocol::Tcp, fe, sock([10, 244, 0, 5], 5353)));
        assert!(!f.matches(Protocol::Udp, fe, sock([10, 244, 0, 5], 5354)));
        assert!(!f.matches(
            Protocol::Udp,
            sock([10, 96, 0, 10], 54),
            sock([10, 244, 0, 5], 5353)
        ));
        let a = activated(fe);
        assert!(a.matches(Protocol::Udp, fe, fe));
        assert!(a.matches(Protocol::Udp, fe, sock([10, 244, 0, 7], 5353)));
        assert!(!a.matches(Protocol::Udp, sock([10, 96, 0, 11], 53), fe));
        assert_eq!(
            f.to_string(),
            "UDP 10.96.0.10:53 -> 10.244.0.5:5353 (endpoint gone)"
        );
    }
}
