//! # svcnat-ipvs
//!
//! The IPVS backend: programs a [`svcnat_core::plan::Plan`] into the kernel's IPVS tables over
//! generic netlink, with VIPs bound to a dummy `kube-ipvs0` device.
//!
//! Status: not built yet (issue "backend-ipvs"). The crate exists so the workspace has its
//! final shape.
