//! # svcnat-examples
//!
//! The programs that show svcnat at work, and the harness their end-to-end tests share:
//! - [`agent`]: the node loop, which lives in `svcnat-core` (re-exported here).
//! - [`api`]: the API source of `svcnat-proxy`: watch events into a proxy-only cluster
//!   (pure [`api::ApiState`]), and the kube-rs watchers on a background runtime.
//! - [`cli`]: flags the programs share.
//! - [`conformance`]: the scenarios every backend must pass with real traffic, the agents
//!   fed directly or through a fake API server.
//! - [`fakeapi`]: a fake Kubernetes API server (HTTPS, list/watch as kube-rs uses them)
//!   for tests of the programs that follow an API server, and a publisher that writes a
//!   cluster's changes to it.
//! - [`dns`]: the cluster DNS server behind `svcnat-dns`: DNS messages in and out
//!   (sans-IO), the resolver swapped on reload, the UDP and TCP loops.
//! - [`lab`]: the replay of the lab behind `svcnat-lab`: the lab's cluster in namespaces,
//!   every step applied to a watched manifest directory (or written to fake API servers)
//!   and observed with real traffic.
//! - [`netns`]: sockets made inside another network namespace.
//! - [`proxy`]: the node proxy behind `svcnat-proxy`: the coalescing sync loop over a
//!   [`proxy::Source`] (a manifest directory with per-object last-good state, or the API),
//!   `/metrics` and `/healthz`.
//! - [`sctp`]: one-to-one SCTP sockets for the testbed's pod server and probe.
//! - [`svchealth`]: kube-proxy's service health server (`healthCheckNodePort` of
//!   `externalTrafficPolicy: Local` Services).
//! - [`testbed`]: clusters built from network namespaces and veth pairs, with servers in
//!   pod namespaces and a probe, for real-packet tests of every backend.
//! - [`vm`]: a test binary run in the qemu VM (a kernel with IPVS and SCTP).
pub use svcnat_core::agent;
pub mod api;
pub mod cli;
pub mod conformance;
pub mod dns;
pub mod fakeapi;
pub mod lab;
pub mod netns;
pub mod proxy;
pub mod sandbox;
pub mod sctp;
pub mod svchealth;
pub mod testbed;
pub mod vm;
pub mod voteapp;
