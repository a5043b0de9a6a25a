//! # svcnat-core
//!
//! The pure heart of svcnat: a Kubernetes-style service model, weighted endpoint selection,
//! and a compiler from cluster state to a neutral **NAT plan** that the backends
//! (`svcnat-iptables`, `svcnat-ipvs`, `svcnat-userspace`) program into a datapath. A plan
//! [`plan::Plan::diff`]s against the previous one so that backends apply only what changed.
//! [`discovery`] answers cluster DNS names from the same state, and [`describe`] renders
//! `kubectl get/describe`-style views.
//!
//! The crate plays two roles, kept apart as they are on a cluster:
//!
//! ```text
//!  API server (kube-rs watch) ── typed apply/delete (input) ──────────────┐ Services,
//!                                                                         │ EndpointSlices,
//!  manifests ── manifest (validate like the API server) ── controller ────┤ Nodes
//!               workloads -> Pods, placement, IPs          Pods -> slices │
//!                                                                         ▼
//!                                  cluster::Cluster (journal of changed Services)
//!                                     │                          │
//!                   discovery::Resolver, describe     Plan::compile / Plan::update
//!                                                                │ PlanDiff
//!                                              agent::NodeAgent ──► Dataplane (backends)
//! ```
//!
//! - **The proxy side** ([`cluster`], [`input`], [`plan`], [`select`], [`agent`]) reads what
//!   kube-proxy reads: Services, EndpointSlices and Nodes. It never reads a selector:
//!   endpoints come only from EndpointSlices, merged as kube-proxy's endpoint-slice cache
//!   merges them.
//! - **The controller side** ([`controller`], [`manifest`]) does what the control plane does
//!   when there is none: workloads to Pods, placement and IPs, and Pods to EndpointSlices as
//!   the EndpointSlice controller writes them. The lab, the sandbox and the tests live there.
//!
//! Nothing here performs I/O, reads a clock or draws random numbers: time and seeds are
//! parameters, maps are ordered, and the same input always yields the same plan.
//!
//! ## Quick start
//!
//! svcnat-core reads Kubernetes objects with the types of `k8s-openapi`, and like every
//! library on `k8s-openapi` it enables no Kubernetes version: your **application** picks
//! exactly one, for all the crates in its build. Add next to `svcnat-core`:
//!
//! ```toml
//! [dependencies]
//! svcnat-core = "0.1"
//! k8s-openapi = { version = "0.29", features = ["latest"] }
//! ```
//!
//! (or `v1_33` ... `v1_37` for the API server you target; without one, `k8s-openapi` stops
//! the build and says so). A library built on svcnat-core enables no version either: it
//! puts one on its `k8s-openapi` dev-dependency for its tests, and sets
//! `K8S_OPENAPI_ENABLED_VERSION=1.37` for `cargo build`, `cargo doc` or `cargo package`
//! of the library alone (this workspace does so in `.cargo/config.toml`). The crates in
//! svcnat-core's public API are re-exported ([`k8s_openapi`], [`ipnet`]) so that you name
//! the same types without a second version in your manifest.
//!
//! ```
//! use svcnat_core::describe::{self, ViewOptions};
//! use svcnat_core::manifest::{ClusterConfig, Manifests};
//!
//! let yaml = "\
//! apiVersion: v1
//! kind: Service
//! metadata: {name: web}
//! spec:
//!   clusterIP: 10.96.0.80
//!   selector: {app: web}
//!   ports: [{port: 80}]
//! ";
//! let config = ClusterConfig::default();
//! let mut manifests = Manifests::from_files([("web.yaml", yaml)], &config);
//! let cluster = manifests.build(&config);
//! assert!(manifests.errors.is_empty());
//! let table = describe::get_services(&cluster, Some("default"), &ViewOptions::default());
//! assert!(table.contains("web    ClusterIP   10.96.0.80   <none>        80/TCP"));
//! ```

#![forbid(unsafe_code)]

/// The `ipnet` crate, whose [`ipnet::IpNet`] appears in svcnat-core's public types (CIDRs).
pub use ipnet;
/// The `k8s-openapi` crate svcnat-core reads Kubernetes objects with; its version feature
/// is the application's choice (see the Quick start).
pub use k8s_openapi;

// The shared vocabulary.
pub mod model;

// The proxy side: what kube-proxy reads, and what it makes of it.
pub mod agent;
pub mod cluster;
pub mod conntrack;
pub mod dualstack;
pub mod input;
pub mod plan;
pub mod select;

// The controller side: what the control plane does when there is none (manifest world).
pub mod controller;
pub mod manifest;

// Views of the same state: cluster DNS, kubectl.
pub mod describe;
pub mod discovery;
pub mod graph;

// Clusters of any size, for benchmarks.
pub mod synthetic;
