//! # svcnat-ipvs
//!
//! The IPVS backend: programs a [`svcnat_core::plan::Plan`] into the kernel's IPVS tables over
//! generic netlink, as kube-proxy's IPVS mode does.
//!
//! - [`message`]: the IPVS generic-netlink messages as typed values (`Emitable`/`Parseable`
//!   on top of `netlink-packet-core`/`netlink-packet-generic`), pure and socket-free.
//! - [`driver`]: [`driver::Ipvs`], the [`svcnat_core::plan::Dataplane`]: one virtual service
//!   per plan frontend, destinations from its backend set, VIPs on the dummy `kube-ipvs0`
//!   device (rtnetlink), masquerade and source-range filtering with iptables.
//!
//! The machine this is developed on has no IPVS; the real-kernel tests boot a Debian kernel
//! under qemu (`vm/run.sh`).

pub mod driver;
pub mod message;
mod nl;
