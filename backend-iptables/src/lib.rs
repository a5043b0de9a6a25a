//! # svcnat-iptables
//!
//! The netfilter backends, in two dialects: programs a [`svcnat_core::plan::Plan`] the way
//! kube-proxy's iptables mode does (the iptables dialect), or the way its nftables mode
//! does (the nftables dialect, [`nftables`]), so that a node running svcnat looks like a
//! kube-proxy node to anyone reading `iptables-save` or `nft list ruleset`.
//!
//! The iptables dialect (also reachable as [`iptables`]):
//!
//! - [`render`] turns a plan into `iptables-restore` input in kube-proxy's chain layout
//!   (`KUBE-SERVICES` -> `KUBE-SVC-*` -> `KUBE-SEP-*`, `statistic --probability`, DNAT,
//!   `KUBE-MARK-MASQ`, REJECT for Services without endpoints), and patches that rendering
//!   from a [`svcnat_core::plan::PlanDiff`] so that a partial sync rewrites only the
//!   chains that changed. Pure: no processes, no I/O.
//! - [`trace`] interprets the rendered rules for a packet without a kernel: the tests use it
//!   to check DNAT targets, masquerading and verdicts exactly.
//! - [`conntrack`] deletes the kernel conntrack entries a plan change made stale (UDP
//!   flows to a departed endpoint, flows cached before a Service had endpoints) over
//!   ctnetlink; the driver runs it after each sync, the IPVS backend too.
//! - [`driver`] applies rules with `iptables-restore --noflush` (legacy or nft flavour),
//!   reconciles with `iptables-save`, and implements [`svcnat_core::plan::Dataplane`].
//!
//! The nftables dialect, [`nftables`]: `nftables::render` (the table, verdict maps and
//! partial transactions), `nftables::driver` (`nft -f`, `Nftables`), `nftables::kernel`
//! (netlink reads of the table's state).
//!
//! Shared by both: [`conntrack`], and the plan's per Service port units (both renderers
//! keep one unit per Service port and re-render only the units a diff touches).

//!
//! Render a plan as `iptables-restore` input, and trace a packet through the rules:
//!
//! ```
//! use std::net::IpAddr;
//! use svcnat_core::manifest::{ClusterConfig, Manifests};
//! use svcnat_core::model::Protocol;
//! use svcnat_core::plan::{NodeContext, Plan};
//! use svcnat_iptables::render::Ruleset;
//! use svcnat_iptables::trace::{Hook, Packet, RecentTable, Tracer, Verdict};
//!
//! let yaml = "\
//! apiVersion: v1
//! kind: Service
//! metadata: {name: web, namespace: default}
//! spec:
//!   clusterIP: 10.96.0.80
//!   selector: {app: web}
//!   ports: [{port: 80, targetPort: 8080}]
//! ---
//! apiVersion: v1
//! kind: Pod
//! metadata: {name: web-0, namespace: default, labels: {app: web}}
//! spec: {nodeName: node-1, containers: [{name: web, image: nginx}]}
//! status: {podIP: 10.244.1.5}
//! ";
//! let config = ClusterConfig::default();
//! let mut m = Manifests::from_files([("web.yaml", yaml)], &config);
//! let cluster = m.build(&config);
//! let node_ip: IpAddr = "192.168.50.11".parse()?;
//! let node = NodeContext::new("node-1", vec![node_ip], vec!["10.244.0.0/16".parse()?]);
//! let plan = Plan::compile(&cluster, &node);
//!
//! // What `iptables-restore --noflush` would be given.
//! let rules = Ruleset::new(&plan);
//! let text = rules.full_restore();
//! assert!(text.contains("-j DNAT --to-destination 10.244.1.5:8080"));
//!
//! // A pod connecting to the ClusterIP is translated to the only endpoint.
//! let tracer = Tracer::new(&rules, vec![node_ip])?;
//! let pkt = Packet {
//!     src: "10.244.2.9".parse()?,
//!     src_port: 40000,
//!     dst: "10.96.0.80".parse()?,
//!     dst_port: 80,
//!     protocol: Protocol::Tcp,
//! };
//! let trace = tracer.trace(&pkt, Hook::Prerouting, &mut || 0.5, &mut RecentTable::new(), 0)?;
//! assert_eq!(trace.verdict, Verdict::Dnat("10.244.1.5:8080".parse()?));
//! assert!(trace.visited("KUBE-SERVICES"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod conntrack;
pub mod driver;
pub mod nftables;
mod owned;
pub mod render;
pub mod trace;

/// The iptables dialect under one name, beside [`nftables`]: [`render`], [`trace`] and
/// [`driver`].
pub mod iptables {
    pub use crate::{driver, render, trace};
}
