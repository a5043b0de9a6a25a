//! # svcnat-examples
//!
//! The programs that show svcnat at work, and the harness their end-to-end tests share:
//! - [`agent`]: the loop that keeps one node's plan in step with the cluster and syncs it
//!   into a dataplane.
//! - [`conformance`]: the scenarios every backend must pass with real traffic.
//! - [`proxy`]: the node proxy behind `svcnat-proxy`: a manifest directory with per-file
//!   last-good state, the coalescing sync loop, `/metrics` and `/healthz`.
//! - [`testbed`]: clusters built from network namespaces and veth pairs, with servers in
//!   pod namespaces and a probe, for real-packet tests of every backend.
pub mod agent;
pub mod conformance;

pub mod proxy;
pub mod testbed;
