//! The node loop: one node's plan kept in step with the cluster and handed to a
//! [`Dataplane`].
//!
//! A [`NodeAgent`] is what a proxy needs around a dataplane: it compiles the first plan and
//! programs it whole, then applies only the diff of what changed (the cluster's journal
//! names it), and after a failed sync it rewrites everything at the next one, because the
//! dataplane may then hold neither the old plan nor the new one.
//!
//! ```
//! use std::convert::Infallible;
//! use svcnat_core::agent::NodeAgent;
//! use svcnat_core::model::Cluster;
//! use svcnat_core::plan::{Dataplane, NodeContext, Plan, PlanDiff, SyncReport};
//!
//! /// A dataplane that only counts what it is asked to do.
//! #[derive(Default)]
//! struct Counting { full: usize, partial: usize }
//!
//! impl Dataplane for Counting {
//!     type Error = Infallible;
//!     fn sync(&mut self, plan: &Plan, diff: &PlanDiff) -> Result<SyncReport, Infallible> {
//!         self.partial += 1;
//!         Ok(SyncReport::of_plan(plan, false, diff.ops.len()))
//!     }
//!     fn resync(&mut self, plan: &Plan) -> Result<SyncReport, Infallible> {
//!         self.full += 1;
//!         Ok(SyncReport::of_plan(plan, true, 0))
//!     }
//!     fn cleanup(&mut self) -> Result<(), Infallible> { Ok(()) }
//! }
//!
//! let node = NodeContext::new("node-1", vec!["192.168.50.11".parse()?], vec![]);
//! let mut cluster = Cluster::new();
//! let mut agent = NodeAgent::new(node, Counting::default());
//! agent.sync(&cluster)?; // first time: everything
//! cluster.upsert_service(svcnat_core::model::Service::new(
//!     svcnat_core::model::ObjectName::new("default", "web"),
//! ));
//! agent.sync(&cluster)?; // then only what changed
//! assert_eq!((agent.dataplane().full, agent.dataplane().partial), (1, 1));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::cluster::Cluster;
use crate::plan::{Dataplane, NodeContext, Plan, SyncReport};

/// One node's plan and the dataplane that programs it.
#[derive(Debug)]
pub struct NodeAgent<D: Dataplane> {
    plan: Plan,
    dataplane: D,
    /// The dataplane holds `plan` exactly; when false the next sync rewrites everything.
    synced: bool,
}

impl<D: Dataplane> NodeAgent<D> {
    /// An agent that has programmed nothing yet.
    pub fn new(node: NodeContext, dataplane: D) -> Self {
        NodeAgent {
            plan: Plan::empty(node),
            dataplane,
            synced: false,
        }
    }

    /// Brings the plan up to date with `cluster` and programs it: the diff when the
    /// dataplane holds the previous plan, everything otherwise (first sync, or after a
    /// failure).
    pub fn sync(&mut self, cluster: &Cluster) -> Result<SyncReport, D::Error> {
        let diff = self.plan.update(cluster);
        let result = if self.synced {
            self.dataplane.sync(&self.plan, &diff)
        } else {
            self.dataplane.resync(&self.plan)
        };
        // After an error the dataplane may hold neither plan; rewrite everything next time.
        self.synced = result.is_ok();
        result
    }

    /// Rewrites everything from the current plan (repairs drift).
    pub fn resync(&mut self) -> Result<SyncReport, D::Error> {
        let result = self.dataplane.resync(&self.plan);
        self.synced = result.is_ok();
        result
    }

    /// Changes the node the plan is compiled for (its addresses changed, say): the next
    /// sync compiles everything for it and rewrites the dataplane.
    pub fn set_node(&mut self, node: NodeContext) {
        self.plan = Plan::empty(node);
        self.synced = false;
    }

    /// Whether the dataplane holds the current plan (the last sync succeeded).
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// The current plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The dataplane.
    pub fn dataplane(&mut self) -> &mut D {
        &mut self.dataplane
    }

    /// Removes everything the dataplane installed; the next sync starts from nothing.
    pub fn cleanup(&mut self) -> Result<(), D::Error> {
        self.synced = false;
        self.plan = Plan::empty(self.plan.node().clone());
        self.dataplane.cleanup()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::model::*;
    use crate::plan::PlanDiff;
    use std::net::IpAddr;

    #[derive(Debug, thiserror::Error)]
    #[error("refused")]
    struct Refused;

    #[derive(Debug, Default)]
    struct Flaky {
        fail_next: bool,
        calls: Vec<(&'static str, usize)>,
    }

    impl Dataplane for Flaky {
        type Error = Refused;
        fn sync(&mut self, plan: &Plan, diff: &PlanDiff) -> Result<SyncReport, Refused> {
            self.calls.push(("sync", diff.ops.len()));
            self.answer(plan, false)
        }
        fn resync(&mut self, plan: &Plan) -> Result<SyncReport, Refused> {
            self.calls.push(("resync", plan.frontends().count()));
            self.answer(plan, true)
        }
        fn cleanup(&mut self) -> Result<(), Refused> {
            Ok(())
        }
    }

    impl Flaky {
        fn answer(&mut self, plan: &Plan, full: bool) -> Result<SyncReport, Refused> {
            if std::mem::take(&mut self.fail_next) {
                return Err(Refused);
            }
            Ok(SyncReport::of_plan(plan, full, 0))
        }
    }

    fn service(name: &str, last: u8) -> Service {
        let mut s = Service::new(ObjectName::new("ns", name));
        s.cluster_ips = vec![IpAddr::from([10, 96, 0, last])];
        s.ports.push(ServicePort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: TargetPort::Number(80),
            node_port: None,
            app_protocol: None,
        });
        s
    }

    #[test]
    fn a_failed_sync_means_a_full_resync_next() {
        let node = NodeContext::new("n1", vec![IpAddr::from([192, 168, 1, 1])], vec![]);
        let mut c = Cluster::new();
        let mut agent = NodeAgent::new(node, Flaky::default());
        c.upsert_service(service("a", 1));
        agent.sync(&c).unwrap();
        c.upsert_service(service("b", 2));
        agent.dataplane().fail_next = true;
        assert!(agent.sync(&c).is_err());
        assert!(!agent.is_synced());
        // Nothing changed since, yet the next sync rewrites everything.
        agent.sync(&c).unwrap();
        c.upsert_service(service("c", 3));
        agent.sync(&c).unwrap();
        assert_eq!(
            agent.dataplane().calls,
            [("resync", 1), ("sync", 2), ("resync", 2), ("sync", 2)]
        );
    }
}
