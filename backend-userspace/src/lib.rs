//! # svcnat-userspace
//!
//! The userspace backend: a sans-IO NAT and connection-tracking [`engine`] driven by
//! AF_PACKET rings, forwarding the service traffic a [`svcnat_core::plan::Plan`] describes.
//!
//! The [`engine`] module is pure (no syscalls, no clock reads, no `unsafe`): the driver hands
//! it frames, the time and buffers, and sends what it returns.

pub mod driver;
pub mod engine;
pub mod inject;
mod sys;

pub use driver::{Stats, SyncError, Userspace, UserspaceConfig};
pub use sys::RingConfig;
