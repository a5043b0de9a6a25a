//! Lookup tables compiled from a [`Plan`]: frontends by (address, protocol, port), backend
//! sets as weighted Maglev tables, ClientIP affinity.
//!
//! Backend indices are kept stable across plans (a set's endpoints are registered
//! append-only; departed ones get weight 0), as [`Maglev::changed_slots`] asks, so a plan
//! update moves only the flows of the endpoints that changed, and affinity entries keep
//! pointing at the right endpoint.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use parking_lot::Mutex;
use svcnat_core::model::Protocol;
use svcnat_core::plan::{BackendSet, BackendSetId, EmptyAction, FrontendKind, Masquerade, Plan};
use svcnat_core::select::{AffinityTable, MAX_MAGLEV_SIZE, Maglev, MaglevBackend};

use super::wire::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use super::{FastMap, FastSet};

/// Affinity entries kept per backend set.
const AFFINITY_MAX: usize = 65_536;
/// Maglev slots per endpoint (a prime near this multiple is used).
const SLOTS_PER_ENDPOINT: u64 = 100;

/// A compiled backend set.
#[derive(Debug)]
pub(crate) struct CSet {
    /// Endpoint registry snapshot: index to address (departed ones have weight 0).
    pub(crate) endpoints: Vec<SocketAddr>,
    /// Weight per index.
    pub(crate) weights: Vec<u32>,
    /// The Maglev table over the registry.
    pub(crate) maglev: Maglev,
    /// Persistent state shared across plans.
    pub(crate) reg: Arc<SetReg>,
}

impl CSet {
    /// Whether no endpoint can take a new connection.
    pub(crate) fn is_empty(&self) -> bool {
        self.maglev.is_empty()
    }

    /// Picks an endpoint for a flow hash and client, honouring affinity.
    pub(crate) fn select(
        &self,
        now_secs: u64,
        client: IpAddr,
        hash: u64,
        affinity: Option<u32>,
    ) -> Option<SocketAddr> {
        let live = |i: u32| {
            self.weights
                .get(i as usize)
                .is_some_and(|&w| w > 0)
                .then(|| self.endpoints.get(i as usize).copied())
                .flatten()
        };
        let Some(timeout) = affinity else {
            return self.maglev.lookup(hash).and_then(live);
        };
        let mut guard = self.reg.affinity.lock();
        let table = match &mut *guard {
            Some(t) if t.timeout_secs() == timeout => t,
            slot => slot.insert(AffinityTable::new(timeout, AFFINITY_MAX)),
        };
        if let Some(ep) = table.lookup(now_secs, &client).and_then(live) {
            return Some(ep);
        }
        let idx = self.maglev.lookup(hash)?;
        let ep = live(idx)?;
        table.insert(now_secs, client, idx);
        Some(ep)
    }
}

/// State of a backend set that outlives one plan.
#[derive(Debug, Default)]
pub(crate) struct SetReg {
    /// Registered endpoints, append-only between compactions.
    addrs: Mutex<Vec<SocketAddr>>,
    /// ClientIP affinity (created on first use with the frontend's timeout).
    affinity: Mutex<Option<AffinityTable<IpAddr>>>,
    /// The last compiled form, reused when the plan's set is unchanged.
    last: Mutex<Option<(Arc<BackendSet>, Arc<CSet>)>>,
    /// The Maglev table size in use: kept while the endpoint count stays in range, since
    /// a new size remaps every flow.
    size: Mutex<u32>,
}

/// A compiled frontend.
#[derive(Debug)]
pub(crate) struct CFrontend {
    /// Set for new connections (`None`: the plan named a set it does not hold: empty).
    pub(crate) backends: Option<Arc<CSet>>,
    /// Set for traffic from pods or the node under `externalTrafficPolicy: Local`.
    pub(crate) shortcut: Option<Arc<CSet>>,
    /// Source rewriting.
    pub(crate) masquerade: Masquerade,
    /// Allowed clients.
    pub(crate) source_ranges: Vec<IpNet>,
    /// ClientIP affinity timeout.
    pub(crate) affinity: Option<u32>,
    /// Empty-set action.
    pub(crate) on_empty: EmptyAction,
    /// A NodePort (the node's own connections on `lo` are served only for these).
    pub(crate) node_port: bool,
}

/// Everything the packet path needs from a plan.
#[derive(Debug, Default)]
pub(crate) struct Compiled {
    /// Frontends by (address, IP protocol number, port).
    pub(crate) frontends: FastMap<(IpAddr, u8, u16), CFrontend>,
    /// Frontend addresses (any port), for fragment handling.
    pub(crate) frontend_addrs: FastSet<IpAddr>,
    /// The node's addresses.
    pub(crate) node_ips: Vec<IpAddr>,
    /// Pod ranges.
    pub(crate) cluster_cidrs: Vec<IpNet>,
}

/// The IP protocol number of a plan protocol (SCTP is not translated by the engine).
pub(crate) fn proto_number(p: Protocol) -> Option<u8> {
    match p {
        Protocol::Tcp => Some(PROTO_TCP),
        Protocol::Udp => Some(PROTO_UDP),
        Protocol::Sctp => Some(PROTO_SCTP),
    }
}

/// Smallest prime at or above `n`.
fn prime_at_least(n: u64) -> u32 {
    let mut c = n.max(3);
    loop {
        if c >= u64::from(MAX_MAGLEV_SIZE) {
            return MAX_MAGLEV_SIZE;
        }
        let is_prime = c == 2
            || (c % 2 == 1
                && (3..)
                    .step_by(2)
                    .take_while(|d| d * d <= c)
                    .all(|d| !c.is_multiple_of(d)));
        if is_prime {
            return u32::try_from(c).unwrap_or(MAX_MAGLEV_SIZE);
        }
        c += 1;
    }
}

/// Persistent per-set registries, owned by the engine's control path.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    sets: HashMap<BackendSetId, Arc<SetReg>>,
}

impl Registry {
    fn compile_set(&mut self, set: &Arc<BackendSet>) -> Arc<CSet> {
        let reg = self.sets.entry(set.id.clone()).or_default().clone();
        if let Some((old, c)) = &*reg.last.lock()
            && (Arc::ptr_eq(old, set) || **old == **set)
        {
            return c.clone();
        }
        let mut addrs = reg.addrs.lock();
        let live: HashMap<SocketAddr, u32> =
            set.endpoints.iter().map(|e| (e.addr, e.weight)).collect();
        // Compact the registry when departed endpoints dominate (affinity resets then).
        if addrs.len() > 2 * live.len() + 16 {
            addrs.retain(|a| live.contains_key(a));
            *reg.affinity.lock() = None;
        }
        let known: HashSet<SocketAddr> = addrs.iter().copied().collect();
        for e in &set.endpoints {
            if !known.contains(&e.addr) {
                addrs.push(e.addr);
            }
        }
        let weights: Vec<u32> = addrs
            .iter()
            .map(|a| live.get(a).copied().unwrap_or(0))
            .collect();
        if let Some(aff) = &mut *reg.affinity.lock() {
            for (i, w) in weights.iter().enumerate() {
                if *w == 0 {
                    aff.forget_backend(i as u32);
                }
            }
        }
        let keys: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        let backends: Vec<MaglevBackend<'_>> = keys
            .iter()
            .zip(&weights)
            .map(|(k, &w)| MaglevBackend {
                key: k.as_bytes(),
                weight: w,
            })
            .collect();
        let nonzero = weights.iter().filter(|&&w| w > 0).count() as u64;
        let size = {
            let mut size = reg.size.lock();
            let prev = u64::from(*size);
            let in_range = prev >= nonzero.saturating_mul(SLOTS_PER_ENDPOINT / 10)
                && prev <= nonzero.saturating_mul(SLOTS_PER_ENDPOINT * 10).max(1009);
            if prev == 0 || !in_range {
                *size = prime_at_least(nonzero.saturating_mul(SLOTS_PER_ENDPOINT));
            }
            *size
        };
        // Only fails with more weighted endpoints than MAX_MAGLEV_SIZE: then the set is
        // treated as empty.
        let maglev = Maglev::build(&backends, size).unwrap_or_default();
        let c = Arc::new(CSet {
            endpoints: addrs.clone(),
            weights,
            maglev,
            reg: reg.clone(),
        });
        drop(addrs);
        *reg.last.lock() = Some((set.clone(), c.clone()));
        c
    }

    /// Compiles a plan, reusing unchanged sets and dropping registries of removed ones.
    pub(crate) fn compile(&mut self, plan: &Plan) -> Compiled {
        let mut sets: HashMap<&BackendSetId, Arc<CSet>> = HashMap::new();
        for (id, set) in plan.backend_sets() {
            sets.insert(id, self.compile_set(set));
        }
        let present: HashSet<&BackendSetId> = sets.keys().copied().collect();
        self.sets.retain(|id, _| present.contains(id));
        let mut out = Compiled {
            node_ips: plan.node().node_ips.clone(),
            cluster_cidrs: plan.node().cluster_cidrs.clone(),
            ..Compiled::default()
        };
        for (key, fe) in plan.frontends() {
            let Some(proto) = proto_number(key.protocol) else {
                continue;
            };
            out.frontend_addrs.insert(key.addr);
            out.frontends.insert(
                (key.addr, proto, key.port),
                CFrontend {
                    backends: sets.get(&fe.backends).cloned(),
                    shortcut: fe
                        .local_shortcut
                        .as_ref()
                        .and_then(|s| sets.get(s).cloned()),
                    masquerade: fe.masquerade,
                    source_ranges: fe.source_ranges.clone(),
                    affinity: fe.affinity_timeout,
                    on_empty: fe.on_empty,
                    node_port: key.kind == FrontendKind::NodePort,
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        assert_eq!(prime_at_least(100), 101);
        assert_eq!(prime_at_least(1), 3);
        assert_eq!(prime_at_least(200), 211);
        assert_eq!(prime_at_least(u64::MAX / 2), MAX_MAGLEV_SIZE);
    }
}
