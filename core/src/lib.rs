//! # svcnat-core
//!
//! The pure heart of svcnat: a Kubernetes-style service model, weighted endpoint selection,
//! and a compiler from cluster state to a neutral **NAT plan** that the backends
//! (`svcnat-iptables`, `svcnat-ipvs`, `svcnat-userspace`) program into a datapath. A plan
//! [`plan::Plan::diff`]s against the previous one so that backends apply only what changed.
//! [`discovery`] answers cluster DNS names from the same state, and [`describe`] renders
//! `kubectl get/describe`-style views.
//!
//! ```text
//! manifests ──manifest──► Cluster ──Plan::compile──► Plan ──Plan::diff──► PlanDiff ──► Dataplane
//!                            └──discovery::Resolver (A/AAAA/SRV/PTR/CNAME)
//! ```
//!
//! Nothing here performs I/O, reads a clock or draws random numbers: time and seeds are
//! parameters, maps are ordered, and the same input always yields the same plan.

#![forbid(unsafe_code)]

// The shared vocabulary.
pub mod model;

// The proxy side: what kube-proxy reads, and what it makes of it.
pub mod agent;
pub mod cluster;
pub mod input;
pub mod plan;
pub mod select;

// The controller side: what the control plane does when there is none (manifest world).
pub mod controller;
pub mod manifest;

// Views of the same state: cluster DNS, kubectl.
pub mod describe;
pub mod discovery;

// Clusters of any size, for benchmarks.
pub mod synthetic;
