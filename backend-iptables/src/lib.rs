//! # svcnat-iptables
//!
//! The iptables backend: renders a [`svcnat_core::plan::Plan`] into `iptables-restore` input
//! in kube-proxy's chain layout (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*, ...) and applies it
//! atomically with partial syncs driven by [`svcnat_core::plan::PlanDiff`].
//!
//! Status: not built yet (issue "backend-iptables, the network-namespace testbed, and the
//! backend conformance suite"). The crate exists so the workspace has its final shape.
