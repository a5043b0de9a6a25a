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

pub mod describe;
pub mod discovery;
pub mod manifest;
pub mod model;
pub mod plan;
pub mod select;
pub mod synthetic;
