//! # svcnat-examples
//!
//! The programs that show svcnat at work, and the harness their end-to-end tests share:
//! - [`agent`]: the loop that keeps one node's plan in step with the cluster and syncs it
//!   into a dataplane.
pub mod agent;
