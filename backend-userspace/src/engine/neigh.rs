//! The FIB (longest-prefix match over the owned ports' routes) and the neighbour table (ARP
//! and NDP resolution with a bounded queue per unresolved neighbour, retries and expiry).

use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::{Csum, FastMap, FibEntry, PortId, Route};

/// Routes grouped by prefix length, longest first. `None`: the kernel routes the prefix
/// elsewhere (an interface the engine does not own, or a blackhole).
#[derive(Debug, Default)]
pub(crate) struct Fib {
    v4: Vec<(u8, FastMap<u32, Option<Route>>)>,
    v6: Vec<(u8, FastMap<u128, Option<Route>>)>,
}

fn mask4(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len.min(128)))
    }
}

impl Fib {
    /// Builds the FIB; among equal prefixes the first route wins.
    pub(crate) fn new(routes: Vec<FibEntry>) -> Fib {
        let mut fib = Fib::default();
        for e in routes {
            let (dst, r) = match e {
                FibEntry::Port(r) => (r.dst, Some(r)),
                FibEntry::NotOurs(dst) => (dst, None),
            };
            match dst {
                IpNet::V4(n) => {
                    let len = n.prefix_len();
                    let key = u32::from(n.network()) & mask4(len);
                    let pos = match fib.v4.iter().position(|(l, _)| *l == len) {
                        Some(p) => p,
                        None => {
                            fib.v4.push((len, FastMap::default()));
                            fib.v4.len() - 1
                        }
                    };
                    if let Some((_, m)) = fib.v4.get_mut(pos) {
                        m.entry(key).or_insert(r);
                    }
                }
                IpNet::V6(n) => {
                    let len = n.prefix_len();
                    let key = u128::from(n.network()) & mask6(len);
                    let pos = match fib.v6.iter().position(|(l, _)| *l == len) {
                        Some(p) => p,
                        None => {
                            fib.v6.push((len, FastMap::default()));
                            fib.v6.len() - 1
                        }
                    };
                    if let Some((_, m)) = fib.v6.get_mut(pos) {
                        m.entry(key).or_insert(r);
                    }
                }
            }
        }
        fib.v4.sort_by_key(|e| std::cmp::Reverse(e.0));
        fib.v6.sort_by_key(|e| std::cmp::Reverse(e.0));
        fib
    }

    /// The route for a destination: (egress port, next hop); `None` when the kernel's
    /// best route goes through no owned port, or there is none.
    pub(crate) fn lookup(&self, dst: IpAddr) -> Option<(PortId, IpAddr)> {
        let r = self.best(dst)?.as_ref()?;
        Some((r.port, r.gateway.unwrap_or(dst)))
    }

    /// The longest matching entry: `Some(None)` for a prefix routed elsewhere.
    pub(crate) fn best(&self, dst: IpAddr) -> Option<&Option<Route>> {
        match dst {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().find_map(|(l, m)| m.get(&(a & mask4(*l))))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().find_map(|(l, m)| m.get(&(a & mask6(*l))))
            }
        }
    }
}

/// A packet waiting for its next hop's address.
#[derive(Debug)]
pub(crate) struct Queued {
    /// The frame, translated, with the source MAC set.
    pub(crate) frame: Vec<u8>,
    /// Checksum state it came with.
    pub(crate) csum: Csum,
}

/// A neighbour.
#[derive(Debug)]
pub(crate) struct Neigh {
    /// Its MAC, once known.
    pub(crate) mac: Option<[u8; 6]>,
    /// Reachable until then; after, still used while being re-resolved.
    pub(crate) reachable_until: Duration,
    /// Requests sent in the current resolution round (0: not resolving).
    pub(crate) tries: u8,
    /// When to send the next request or give up.
    pub(crate) next_try: Duration,
    /// Packets waiting for the MAC.
    pub(crate) queue: Vec<Queued>,
}

/// Requests per resolution round (the kernel's `mcast_solicit` is 3).
pub(crate) const ARP_TRIES: u8 = 3;
/// Time between requests.
pub(crate) const ARP_RETRY: Duration = Duration::from_secs(1);
/// Unresolved neighbours kept at once (bounds memory under scans).
pub(crate) const MAX_INCOMPLETE: usize = 1024;
/// Neighbours kept at once (the kernel's `gc_thresh3` is 1024 by default): requests from
/// more senders than this are answered but not learnt from.
pub(crate) const MAX_NEIGHBOURS: usize = 8192;
/// A resolved neighbour not confirmed for this long past reachability is forgotten.
pub(crate) const STALE_GC: Duration = Duration::from_secs(60);

/// Neighbours by (port, address).
pub(crate) type Neighbours = HashMap<(PortId, IpAddr), Neigh>;

/// A thread's copy of a resolved neighbour entry, valid while its engine's neighbour
/// generation is the one it was read at (every writer of the table moves it on).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CachedNeighbour {
    /// The engine's number.
    pub(crate) engine: u64,
    /// The engine's neighbour generation when read.
    pub(crate) generation: u64,
    pub(crate) port: PortId,
    pub(crate) ip: IpAddr,
    pub(crate) mac: [u8; 6],
    pub(crate) reachable_until: Duration,
    /// Being re-resolved (`tries > 0`).
    pub(crate) resolving: bool,
}

/// Entries of [`NEIGHBOUR_CACHE`] (direct-mapped).
const NEIGHBOUR_CACHE_SLOTS: usize = 64;

impl CachedNeighbour {
    /// The cache slot of a neighbour.
    pub(crate) fn slot(port: PortId, ip: IpAddr) -> usize {
        let a = match ip {
            IpAddr::V4(a) => u64::from(a.to_bits()),
            IpAddr::V6(a) => {
                let b = a.to_bits();
                (b as u64) ^ ((b >> 64) as u64)
            }
        };
        let h = (a ^ (u64::from(port) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> 58) as usize % NEIGHBOUR_CACHE_SLOTS
    }
}

thread_local! {
    /// The neighbour entries a thread last read, per slot.
    pub(crate) static NEIGHBOUR_CACHE: [Cell<Option<CachedNeighbour>>; NEIGHBOUR_CACHE_SLOTS] =
        const { [const { Cell::new(None) }; NEIGHBOUR_CACHE_SLOTS] };
}
