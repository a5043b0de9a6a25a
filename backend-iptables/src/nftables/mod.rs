//! The nftables dialect: svcnat's plan as kube-proxy's nftables mode lays it out (one
//! table per family, `ip svcnat` and `ip6 svcnat`, with verdict maps that dispatch every
//! Service in one lookup), written as `nft -f` transactions.
//!
//! - [`render`] turns a plan into `nft` transactions (whole table, bounded cold-start
//!   blocks, partial updates touching only changed chains and map elements). Pure.
//! - [`batch`] translates any transaction the renderer writes (the fixed part of the table
//!   included) into one nf_tables netlink batch (what `nft` would send, without its cache
//!   fetch of the whole table and its parsing). Pure.
//! - [`driver`] applies them (as batches; `nft -f` when a command does not translate) and
//!   implements [`svcnat_core::plan::Dataplane`] (`Nftables`).
//! - [`kernel`] reads back what the driver needs from the kernel over netlink (table
//!   presence and handle, rule counts, chain and set names) and sends batches.
//!
//! One table per family rather than one `inet` table, as kube-proxy does: each family is
//! its own transaction (one family's failure never holds the other back, and
//! [`svcnat_core::dualstack::DualStack`] runs one driver per family exactly as it runs
//! iptables and ip6tables), map keys are typed per family (`ipv4_addr` or `ipv6_addr`: an
//! `inet` table would need every map twice anyway), and a node's `nft list table ip
//! svcnat` reads like kube-proxy's `ip kube-proxy`.

pub mod batch;
pub mod driver;
pub mod kernel;
pub mod render;
