//! A node agent: keeps the plan of one node in step with the cluster and hands each change
//! to a [`Dataplane`]. This is the loop at the heart of `svcnat-proxy` and of every
//! backend's end-to-end tests.

use std::collections::BTreeSet;

use svcnat_core::model::{Cluster, ServiceName};
use svcnat_core::plan::{Dataplane, NodeContext, Plan, SyncReport};

/// One node's plan and the dataplane that programs it.
#[derive(Debug)]
pub struct NodeAgent<D: Dataplane> {
    node: NodeContext,
    plan: Plan,
    dataplane: D,
    synced: bool,
}

impl<D: Dataplane> NodeAgent<D> {
    /// An agent that has programmed nothing yet.
    pub fn new(node: NodeContext, dataplane: D) -> Self {
        NodeAgent {
            plan: Plan::empty(node.clone()),
            node,
            dataplane,
            synced: false,
        }
    }

    /// Recompiles the whole plan and syncs what changed (a full resync the first time).
    pub fn apply(&mut self, cluster: &Cluster) -> Result<SyncReport, D::Error> {
        let new = Plan::compile(cluster, &self.node);
        let result = if self.synced {
            let diff = Plan::diff(&self.plan, &new);
            self.dataplane.sync(&new, &diff)
        } else {
            self.dataplane.resync(&new)
        };
        self.plan = new;
        // After an error the dataplane may hold neither plan; resync next time.
        self.synced = result.is_ok();
        result
    }

    /// Recompiles only the named Services and syncs the diff.
    pub fn apply_services(
        &mut self,
        cluster: &Cluster,
        changed: &BTreeSet<ServiceName>,
    ) -> Result<SyncReport, D::Error> {
        if !self.synced {
            return self.apply(cluster);
        }
        let diff = self.plan.update(cluster, changed);
        self.dataplane.sync(&self.plan, &diff).inspect_err(|_| {
            // The dataplane may hold neither plan now; the next apply rewrites everything.
            self.synced = false;
        })
    }

    /// Rewrites everything from the current plan (repairs drift).
    pub fn resync(&mut self) -> Result<SyncReport, D::Error> {
        self.dataplane.resync(&self.plan)
    }

    /// The current plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The dataplane.
    pub fn dataplane(&mut self) -> &mut D {
        &mut self.dataplane
    }

    /// Removes everything the dataplane installed.
    pub fn cleanup(&mut self) -> Result<(), D::Error> {
        self.synced = false;
        self.plan = Plan::empty(self.node.clone());
        self.dataplane.cleanup()
    }
}
