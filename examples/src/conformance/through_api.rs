//! The suite's second feed: the fixture's cluster published to a fake API server, and each
//! node's agent programmed from what its own API watchers built.
//!
//! Every sync writes what changed in the fixture's (simulated) cluster as API objects
//! ([`Publisher`]: Services, the EndpointSlices its controller made of the Pods, Nodes),
//! then waits until every node's [`ApiSource`] (kube-rs watchers over HTTPS, as
//! `svcnat-proxy --kubeconfig` runs them) has listed and compiles to the very plan the
//! fixture's cluster compiles for that node, and only then syncs the node's agent from the
//! API-fed cluster. A view that does not agree within [`AGREE_WITHIN`] fails the scenario
//! with the difference and the objects the view refused.

use std::time::{Duration, Instant};

use svcnat_core::model::Cluster;
use svcnat_core::plan::{NodeContext, Plan};

use crate::api::{ApiConfig, ApiRole, ApiSource, ClientSource};
use crate::fakeapi::{FakeApiServer, Publisher};
use crate::proxy::Source;

/// How long every node's API view has to agree with the cluster after a publish.
pub const AGREE_WITHIN: Duration = Duration::from_secs(30);

/// The fake API server, what was written to it, and one API source per node.
pub(crate) struct ApiFeed {
    // Declared first, so dropped first: the watchers stop before the server goes.
    sources: Vec<ApiSource>,
    publisher: Publisher,
    server: FakeApiServer,
}

impl ApiFeed {
    /// Starts a fake API server on the root namespace's loopback (`127.0.0.1`: the agents
    /// run in this process) and one proxy-role API source per node.
    pub(crate) fn start(nodes: &[NodeContext]) -> Result<ApiFeed, String> {
        let server = FakeApiServer::start_new().map_err(|e| format!("fake API server: {e}"))?;
        let sources = nodes
            .iter()
            .map(|n| {
                ApiSource::start(ApiConfig {
                    client: ClientSource::Kubeconfig(server.kubeconfig_path().to_path_buf()),
                    node_name: n.node_name.clone(),
                    service_proxy_name: None,
                    role: ApiRole::Proxy,
                })
                .map_err(|e| format!("API source of {}: {e}", n.node_name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ApiFeed {
            sources,
            publisher: Publisher::new(),
            server,
        })
    }

    /// Publishes what changed in `cluster`, then waits until node `i`'s view compiles to
    /// the plan `cluster` compiles for `nodes[i]`, for every node.
    pub(crate) fn publish_and_agree(
        &mut self,
        cluster: &Cluster,
        nodes: &[NodeContext],
    ) -> Result<(), String> {
        let written = self
            .publisher
            .publish(cluster, &self.server)
            .map_err(|e| format!("publishing to the fake API server: {e}"))?;
        let deadline = Instant::now() + AGREE_WITHIN;
        for (source, node) in self.sources.iter_mut().zip(nodes) {
            let want = Plan::compile(cluster, node);
            loop {
                source
                    .poll()
                    .map_err(|e| format!("API source of {}: {e}", node.node_name))?;
                if source.is_ready() && Plan::compile(source.cluster(), node) == want {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(disagreement(source, node, &want, &written));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// The cluster node `i`'s API watchers built.
    pub(crate) fn cluster(&self, i: usize) -> Option<&Cluster> {
        self.sources.get(i).map(|s| s.cluster())
    }
}

/// What differs between a node's API view and the cluster, for the failure message.
fn disagreement(
    source: &ApiSource,
    node: &NodeContext,
    want: &Plan,
    written: &crate::fakeapi::Published,
) -> String {
    let got = Plan::compile(source.cluster(), node);
    let diff = Plan::diff(&got, want);
    let refused: Vec<&str> = source.state().invalid_objects().collect();
    format!(
        "node {}: the view fed by the API server did not reach the cluster's plan within \
         {AGREE_WITHIN:?} (listed: {}).\n\
         last publish wrote {:?}, deleted {:?}\n\
         objects the view refused: {refused:?}\n\
         operations from the API view's plan to the cluster's: {:#?}\n\
         API view's plan:\n{}\ncluster's plan:\n{}",
        node.node_name,
        source.is_ready(),
        written.applied,
        written.deleted,
        diff.ops,
        got.render(),
        want.render(),
    )
}
