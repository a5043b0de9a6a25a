//! # svcnat-iptables
//!
//! The iptables backend: programs a [`svcnat_core::plan::Plan`] the way kube-proxy's
//! iptables mode does, so that a node running svcnat looks like a kube-proxy node to
//! anyone reading `iptables-save`.
//!
//! - [`render`] turns a plan into `iptables-restore` input in kube-proxy's chain layout
//!   (`KUBE-SERVICES` -> `KUBE-SVC-*` -> `KUBE-SEP-*`, `statistic --probability`, DNAT,
//!   `KUBE-MARK-MASQ`, REJECT for Services without endpoints), and patches that rendering
//!   from a [`svcnat_core::plan::PlanDiff`] so that a partial sync rewrites only the
//!   chains that changed. Pure: no processes, no I/O.
//! - [`trace`] interprets the rendered rules for a packet without a kernel: the tests use it
//!   to check DNAT targets, masquerading and verdicts exactly.
//! - [`driver`] applies rules with `iptables-restore --noflush` (legacy or nft flavour),
//!   reconciles with `iptables-save`, and implements [`svcnat_core::plan::Dataplane`].

pub mod driver;
pub mod render;
pub mod trace;
