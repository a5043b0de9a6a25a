//! # svcnat-userspace
//!
//! The userspace backend: a sans-IO NAT and connection-tracking engine driven by AF_PACKET
//! rings, forwarding the service traffic a [`svcnat_core::plan::Plan`] describes.
//!
//! Status: not built yet (issue "backend-userspace"). The crate exists so the workspace has
//! its final shape.
