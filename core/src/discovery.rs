//! Cluster DNS: the answers for Service and Pod names, computed from a [`Cluster`].
//!
//! This is the part of svcnat that plays CoreDNS's `kubernetes` plugin. [`Resolver::new`]
//! indexes a [`Cluster`] once into an owned, ordered zone (names are keys of `BTreeMap`s),
//! and [`Resolver::query`] answers one question from it: an [`Answer`] with a response code
//! and the answer, authority and additional sections as plain values. The module knows
//! nothing about the wire format: the DNS server example puts these answers on UDP/TCP
//! port 53 with `hickory-proto`, and decides what to do with [`Rcode::Refused`] names
//! (names outside the cluster domain and the reverse zones; we are not an open resolver).
//!
//! The records follow the Kubernetes DNS-based service discovery specification
//! (<https://github.com/kubernetes/dns/blob/master/docs/specification.md>), quoted where
//! each rule is implemented, plus what CoreDNS adds on top of it:
//!
//! | name | records |
//! |---|---|
//! | `<svc>.<ns>.svc.<domain>` | A/AAAA of the cluster IPs; headless: of the ready endpoints; ExternalName: CNAME; SRV of every named port (CoreDNS) |
//! | `<host>.<svc>.<ns>.svc.<domain>` | headless: A/AAAA of the ready endpoints with that hostname (or dashed IP, CoreDNS) |
//! | `_<port>._<proto>.<svc>.<ns>.svc.<domain>` | SRV |
//! | `<d>.<c>.<b>.<a>.in-addr.arpa`, nibbles`.ip6.arpa` | PTR for cluster IPs and hostnamed headless endpoints |
//! | `<a-b-c-d>.<ns>.pod.<domain>` | A/AAAA of a Pod that has that IP in that namespace (CoreDNS `pods verified`) |
//!
//! Missing names get NXDOMAIN and names without data of the asked type get NODATA, both
//! with the zone's SOA in the authority section (RFC 2308). [`Resolver::resolve`] adds the
//! stub resolver's side: search-list expansion with `ndots`, as glibc does it from a Pod's
//! `resolv.conf`.
//!
//! Deviations, on purpose: pod names are answered only for Pods that exist (CoreDNS `pods
//! verified`; spec 2.6 asks for any well-formed name, CoreDNS `pods insecure`), the
//! `dns-version.<zone>` TXT record (spec 2.2) is not served, and CNAMEs are followed only
//! inside our own zones (the server forwards the rest if it wants to).
//!
//! Like the rest of the crate this is pure: the zone serial is a hash of the zone's
//! content, not a clock, and record order is the index order (the server may rotate it).
//!
//! ```
//! use svcnat_core::discovery::{DiscoveryConfig, QueryType, Resolver, SearchConfig};
//! use svcnat_core::manifest::{ClusterConfig, Manifests};
//!
//! let yaml = "\
//! apiVersion: v1
//! kind: Service
//! metadata: {name: redis, namespace: instavote}
//! spec: {clusterIP: 10.96.0.20, ports: [{name: redis, port: 6379}]}
//! ";
//! let config = ClusterConfig::default();
//! let mut m = Manifests::from_files([("redis.yaml", yaml)], &config);
//! let cluster = m.build(&config);
//! let resolver = Resolver::new(&cluster, DiscoveryConfig::default());
//!
//! // A fully qualified name...
//! let answer = resolver.query("redis.instavote.svc.cluster.local", QueryType::A);
//! assert_eq!(answer.addresses(), ["10.96.0.20".parse::<std::net::IpAddr>()?]);
//! // ...and `redis` as a Pod in namespace instavote looks it up (search list, ndots:5).
//! let search = SearchConfig::for_pod("instavote", "cluster.local");
//! let r = resolver.resolve("redis", QueryType::A, &search);
//! assert_eq!(r.fqdn.as_deref(), Some("redis.instavote.svc.cluster.local."));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{Cluster, Endpoint, IpFamily, PodPhase, Protocol, Service, ServiceType};

/// The default cluster domain (kubelet's `--cluster-domain`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// The default record TTL in seconds (CoreDNS's `kubernetes` plugin default).
pub const DEFAULT_TTL: u32 = 5;
/// The `ndots` kubelet writes into a Pod's `resolv.conf`.
pub const DEFAULT_NDOTS: u8 = 5;

/// The IPv4 reverse zone.
const IN_ADDR_ARPA: &str = "in-addr.arpa";
/// The IPv6 reverse zone.
const IP6_ARPA: &str = "ip6.arpa";
/// SOA timers, as CoreDNS sets them.
const SOA_REFRESH: u32 = 7200;
const SOA_RETRY: u32 = 1800;
const SOA_EXPIRE: u32 = 86400;
/// How many CNAMEs an answer follows inside our zones before it stops.
const MAX_CNAME_CHAIN: usize = 8;

/// Settings of the cluster DNS.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiscoveryConfig {
    /// The cluster domain, e.g. `cluster.local` (case and a trailing dot do not matter).
    pub cluster_domain: String,
    /// TTL of every record, and the SOA minimum (the negative-caching TTL).
    pub ttl: u32,
    /// Whether `<a-b-c-d>.<ns>.pod.<domain>` names are answered.
    pub pod_records: bool,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
            ttl: DEFAULT_TTL,
            pod_records: true,
        }
    }
}

/// The type of a question (QTYPE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QueryType {
    /// IPv4 address.
    A,
    /// IPv6 address.
    Aaaa,
    /// Canonical name.
    Cname,
    /// Service location (RFC 2782).
    Srv,
    /// Reverse pointer.
    Ptr,
    /// Name server.
    Ns,
    /// Start of authority.
    Soa,
    /// Everything at the name (`ANY`, QTYPE 255).
    Any,
}

impl QueryType {
    /// The mnemonic: `A`, `AAAA`, `CNAME`, `SRV`, `PTR`, `NS`, `SOA`, `ANY`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueryType::A => "A",
            QueryType::Aaaa => "AAAA",
            QueryType::Cname => "CNAME",
            QueryType::Srv => "SRV",
            QueryType::Ptr => "PTR",
            QueryType::Ns => "NS",
            QueryType::Soa => "SOA",
            QueryType::Any => "ANY",
        }
    }

    /// Parses a mnemonic, case-insensitively.
    pub fn parse(s: &str) -> Option<QueryType> {
        [
            QueryType::A,
            QueryType::Aaaa,
            QueryType::Cname,
            QueryType::Srv,
            QueryType::Ptr,
            QueryType::Ns,
            QueryType::Soa,
            QueryType::Any,
        ]
        .into_iter()
        .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }

    /// Whether a record answers a question of this type.
    pub fn matches(self, data: &RecordData) -> bool {
        self == QueryType::Any || self == data.rtype()
    }
}

impl fmt::Display for QueryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The response code of an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rcode {
    /// The name exists (the answer may still be empty: NODATA).
    NoError,
    /// The name does not exist in our zones.
    NxDomain,
    /// The name is not in our zones; we do not recurse.
    Refused,
}

impl Rcode {
    /// The spelling `dig` prints: `NOERROR`, `NXDOMAIN`, `REFUSED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rcode::NoError => "NOERROR",
            Rcode::NxDomain => "NXDOMAIN",
            Rcode::Refused => "REFUSED",
        }
    }
}

impl fmt::Display for Rcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The data of a resource record; every name in it is absolute, with a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordData {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(Ipv6Addr),
    /// An alias for another name.
    Cname(String),
    /// A service location.
    Srv {
        /// Lower is preferred.
        priority: u16,
        /// Relative weight among records of one priority.
        weight: u16,
        /// The port on the target.
        port: u16,
        /// The host that serves it.
        target: String,
    },
    /// A reverse pointer.
    Ptr(String),
    /// A name server of the zone.
    Ns(String),
    /// The start of authority of a zone.
    Soa {
        /// The primary name server.
        mname: String,
        /// The responsible mailbox, as a name.
        rname: String,
        /// The zone's version.
        serial: u32,
        /// Secondary refresh interval.
        refresh: u32,
        /// Secondary retry interval.
        retry: u32,
        /// When secondaries stop answering.
        expire: u32,
        /// The negative-caching TTL (RFC 2308).
        minimum: u32,
    },
}

impl RecordData {
    /// The record's type.
    pub fn rtype(&self) -> QueryType {
        match self {
            RecordData::A(_) => QueryType::A,
            RecordData::Aaaa(_) => QueryType::Aaaa,
            RecordData::Cname(_) => QueryType::Cname,
            RecordData::Srv { .. } => QueryType::Srv,
            RecordData::Ptr(_) => QueryType::Ptr,
            RecordData::Ns(_) => QueryType::Ns,
            RecordData::Soa { .. } => QueryType::Soa,
        }
    }

    /// An A or AAAA record for an address.
    pub fn address(ip: IpAddr) -> RecordData {
        match ip {
            IpAddr::V4(v4) => RecordData::A(v4),
            IpAddr::V6(v6) => RecordData::Aaaa(v6),
        }
    }

    /// The address of an A or AAAA record.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            RecordData::A(v4) => Some(IpAddr::V4(*v4)),
            RecordData::Aaaa(v6) => Some(IpAddr::V6(*v6)),
            _ => None,
        }
    }
}

impl fmt::Display for RecordData {
    /// The RDATA in zone-file presentation format.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordData::A(ip) => write!(f, "{ip}"),
            RecordData::Aaaa(ip) => write!(f, "{ip}"),
            RecordData::Cname(n) | RecordData::Ptr(n) | RecordData::Ns(n) => f.write_str(n),
            RecordData::Srv {
                priority,
                weight,
                port,
                target,
            } => write!(f, "{priority} {weight} {port} {target}"),
            RecordData::Soa {
                mname,
                rname,
                serial,
                refresh,
                retry,
                expire,
                minimum,
            } => write!(
                f,
                "{mname} {rname} {serial} {refresh} {retry} {expire} {minimum}"
            ),
        }
    }
}

/// A resource record (class IN).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Record {
    /// The owner name, absolute (trailing dot).
    pub name: String,
    /// Time to live in seconds.
    pub ttl: u32,
    /// The data.
    pub data: RecordData,
}

impl fmt::Display for Record {
    /// Zone-file format, as `dig` prints it: `name ttl IN TYPE rdata`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\t{}\tIN\t{}\t{}",
            self.name,
            self.ttl,
            self.data.rtype(),
            self.data
        )
    }
}

/// The answer to one question. Every NoError or NxDomain answer is authoritative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The response code.
    pub rcode: Rcode,
    /// The answer section.
    pub records: Vec<Record>,
    /// The authority section: the zone's SOA on NXDOMAIN and NODATA.
    pub authority: Vec<Record>,
    /// The additional section: addresses of SRV and NS targets.
    pub additional: Vec<Record>,
}

impl Answer {
    /// An empty answer with a response code.
    pub fn new(rcode: Rcode) -> Answer {
        Answer {
            rcode,
            records: Vec::new(),
            authority: Vec::new(),
            additional: Vec::new(),
        }
    }

    /// Whether this is NODATA: the name exists but has no records of the asked type.
    pub fn is_nodata(&self) -> bool {
        self.rcode == Rcode::NoError && self.records.is_empty()
    }

    /// The addresses in the answer section (A and AAAA, CNAME chains followed).
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.records.iter().filter_map(|r| r.data.ip()).collect()
    }
}

/// A stub resolver's search settings, as in `resolv.conf`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SearchConfig {
    /// The `search` list, in order.
    pub search: Vec<String>,
    /// `options ndots:N`: names with at least this many dots are tried as-is first.
    pub ndots: u8,
}

impl SearchConfig {
    /// What kubelet writes for a Pod with `dnsPolicy: ClusterFirst`:
    /// `search <ns>.svc.<domain> svc.<domain> <domain>` and `options ndots:5`.
    pub fn for_pod(namespace: &str, cluster_domain: &str) -> SearchConfig {
        let domain = cluster_domain.trim_end_matches('.');
        SearchConfig {
            search: vec![
                format!("{namespace}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.to_string(),
            ],
            ndots: DEFAULT_NDOTS,
        }
    }

    /// The absolute names a stub tries for `name`, in order (glibc's `res_search`).
    pub fn candidates(&self, name: &str) -> Vec<String> {
        // A trailing dot means "absolute": query only that name.
        if name.ends_with('.') {
            return vec![name.to_string()];
        }
        if name.is_empty() {
            return vec![".".to_string()];
        }
        let as_is = format!("{name}.");
        let searched = self
            .search
            .iter()
            .map(|d| d.trim_end_matches('.'))
            .filter(|d| !d.is_empty())
            .map(|d| format!("{name}.{d}."));
        let dots = name.matches('.').count();
        // glibc: "If there are enough dots in the name, let's just give it a try 'as is'";
        // otherwise the search list first and the name as-is last.
        if dots >= usize::from(self.ndots) {
            std::iter::once(as_is).chain(searched).collect()
        } else {
            searched.chain(std::iter::once(as_is)).collect()
        }
    }
}

/// The outcome of a search-list lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// The absolute names queried, in order.
    pub tried: Vec<String>,
    /// The answer that ended the search, or the last one when none answered.
    pub answer: Answer,
    /// The name that answered, when one did.
    pub fqdn: Option<String>,
}

/// The cluster's DNS zone, indexed once from a [`Cluster`]; answers questions from it.
#[derive(Clone, Debug)]
pub struct Resolver {
    config: DiscoveryConfig,
    /// The cluster domain, lower case, no trailing dot.
    domain: String,
    /// Owner name (lower case, no trailing dot) -> its records; an empty list is an empty
    /// non-terminal or a name without data.
    names: BTreeMap<String, Vec<RecordData>>,
    /// (namespace, IP) of every Pod that holds an IP, for verified pod names.
    pods: BTreeSet<(String, IpAddr)>,
    serial: u32,
}

impl Resolver {
    /// Indexes the cluster's Services, endpoints and Pods.
    pub fn new(cluster: &Cluster, config: DiscoveryConfig) -> Resolver {
        let mut domain = canonical(&config.cluster_domain);
        if domain.is_empty() {
            domain = DEFAULT_CLUSTER_DOMAIN.to_string();
        }
        let mut b = Builder {
            domain: domain.clone(),
            names: BTreeMap::new(),
        };
        let ns_host = format!("ns.dns.{domain}.");
        for zone in [domain.as_str(), IN_ADDR_ARPA, IP6_ARPA] {
            b.add(zone, zone, Some(RecordData::Ns(ns_host.clone())));
        }
        b.add(&domain, &format!("svc.{domain}"), None);
        if config.pod_records {
            b.add(&domain, &format!("pod.{domain}"), None);
        }
        for ns in cluster.namespaces() {
            let ns = ns.to_ascii_lowercase();
            // `<ns>.svc.<domain>` exists (as an empty non-terminal) for every namespace.
            b.add(&domain, &format!("{ns}.svc.{domain}"), None);
            if config.pod_records {
                b.add(&domain, &format!("{ns}.pod.{domain}"), None);
            }
        }
        for svc in cluster.services() {
            b.service(cluster, svc);
        }
        // Glue for the NS record: CoreDNS answers `ns.dns.<domain>` with its own Service.
        let kube_dns = crate::model::ObjectName::new("kube-system", "kube-dns");
        if let Some(dns) = cluster.service(&kube_dns) {
            for ip in &dns.cluster_ips {
                b.add(
                    &domain,
                    &format!("ns.dns.{domain}"),
                    Some(RecordData::address(*ip)),
                );
            }
        }
        let mut pods = BTreeSet::new();
        for pod in cluster.pods() {
            // A finished Pod has given its IP back; the IP may already be someone else's.
            if matches!(pod.phase, PodPhase::Succeeded | PodPhase::Failed) {
                continue;
            }
            for ip in &pod.ips {
                pods.insert((pod.name.namespace.to_ascii_lowercase(), *ip));
            }
        }
        let mut names = b.finish();
        let serial = zone_serial(&names, &pods);
        let mut resolver = Resolver {
            config,
            domain,
            names: BTreeMap::new(),
            pods,
            serial,
        };
        for zone in [
            resolver.domain.clone(),
            IN_ADDR_ARPA.into(),
            IP6_ARPA.into(),
        ] {
            let soa = resolver.soa_data();
            if let Some(rrs) = names.get_mut(&zone) {
                rrs.insert(0, soa);
            }
        }
        resolver.names = names;
        resolver
    }

    /// The configuration.
    pub fn config(&self) -> &DiscoveryConfig {
        &self.config
    }

    /// The cluster domain, lower case and without a trailing dot.
    pub fn cluster_domain(&self) -> &str {
        &self.domain
    }

    /// The SOA serial: a hash of the zone's content, so it changes when the zone does.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Every stored record in name order (a zone dump; pod names are synthesized, not
    /// listed).
    pub fn records(&self) -> Vec<Record> {
        self.names
            .iter()
            .flat_map(|(name, rrs)| rrs.iter().map(move |d| self.record(&format!("{name}."), d)))
            .collect()
    }

    /// Answers one question. Names are case-insensitive; a trailing dot is optional.
    pub fn query(&self, name: &str, qtype: QueryType) -> Answer {
        let key = canonical(name);
        let Some(zone) = self.zone_of(&key) else {
            return Answer::new(Rcode::Refused);
        };
        // Answer with the question's own spelling (RFC 4343 case preservation).
        let owner = format!("{}.", name.strip_suffix('.').unwrap_or(name));
        let mut answer = Answer::new(Rcode::NoError);
        let mut chain = vec![key.clone()];
        self.answer_at(owner, &key, zone, qtype, &mut answer, &mut chain);
        answer
    }

    /// Looks a name up through a stub's search list (glibc's rules) and reports each try.
    ///
    /// The search stops at the first NoError answer that has records; NXDOMAIN, NODATA and
    /// REFUSED move on to the next candidate. When nothing answered, the last answer is
    /// returned and `fqdn` is `None`.
    pub fn resolve(&self, name: &str, qtype: QueryType, search: &SearchConfig) -> Resolution {
        let mut tried = Vec::new();
        let mut last = Answer::new(Rcode::Refused);
        for candidate in search.candidates(name) {
            let answer = self.query(&candidate, qtype);
            tried.push(candidate.clone());
            if answer.rcode == Rcode::NoError && !answer.records.is_empty() {
                return Resolution {
                    tried,
                    answer,
                    fqdn: Some(candidate),
                };
            }
            last = answer;
        }
        Resolution {
            tried,
            answer: last,
            fqdn: None,
        }
    }

    /// The zone a canonical name belongs to: the cluster domain or a reverse zone.
    fn zone_of(&self, key: &str) -> Option<&str> {
        [self.domain.as_str(), IN_ADDR_ARPA, IP6_ARPA]
            .into_iter()
            .filter(|z| in_zone(key, z))
            .max_by_key(|z| z.len())
    }

    /// The records at a canonical name, or `None` when the name does not exist.
    fn lookup(&self, key: &str) -> Option<Cow<'_, [RecordData]>> {
        if let Some(rrs) = self.names.get(key) {
            return Some(Cow::Borrowed(rrs.as_slice()));
        }
        self.pod_lookup(key).map(Cow::Owned)
    }

    /// `<a-b-c-d>.<ns>.pod.<domain>`: the IP in the name, when a Pod in `<ns>` has it.
    fn pod_lookup(&self, key: &str) -> Option<Vec<RecordData>> {
        if !self.config.pod_records {
            return None;
        }
        let rest = key.strip_suffix(&self.domain)?.strip_suffix(".pod.")?;
        let (label, ns) = rest.split_once('.')?;
        if ns.contains('.') {
            return None;
        }
        let ip = parse_dashed(label)?;
        // Spec 2.6 (deprecated): `<a>-<b>-<c>-<d>.<ns>.pod.<zone>. <ttl> IN A <a>.<b>.<c>.<d>`
        // "for any values" (CoreDNS `pods insecure`). We are stricter, like CoreDNS `pods
        // verified`: "Return an A record if there exists a pod in same namespace with
        // matching IP."
        self.pods
            .contains(&(ns.to_string(), ip))
            .then(|| vec![RecordData::address(ip)])
    }

    /// Fills `answer` for `qtype` at one name, following CNAMEs inside our zones.
    fn answer_at(
        &self,
        owner: String,
        key: &str,
        zone: &str,
        qtype: QueryType,
        answer: &mut Answer,
        chain: &mut Vec<String>,
    ) {
        let Some(rrs) = self.lookup(key) else {
            // RFC 2308: NXDOMAIN carries the zone's SOA so that the denial can be cached.
            answer.rcode = Rcode::NxDomain;
            answer.authority.push(self.soa(zone));
            return;
        };
        // RFC 1034 4.3.2 step 3b: "If the data at the node is a CNAME, and QTYPE doesn't
        // match CNAME, copy the CNAME RR into the answer section of the response, change
        // QNAME to the canonical name in the CNAME RR, and go back to step 1."
        if !matches!(qtype, QueryType::Cname | QueryType::Any)
            && let Some(cname) = rrs.iter().find(|d| matches!(d, RecordData::Cname(_)))
        {
            answer.records.push(self.record(&owner, cname));
            if let RecordData::Cname(target) = cname {
                let tkey = canonical(target);
                if chain.len() < MAX_CNAME_CHAIN
                    && !chain.contains(&tkey)
                    && let Some(tzone) = self.zone_of(&tkey)
                {
                    chain.push(tkey.clone());
                    self.answer_at(target.clone(), &tkey, tzone, qtype, answer, chain);
                }
            }
            return;
        }
        let before = answer.records.len();
        for d in rrs.iter().filter(|d| qtype.matches(d)) {
            answer.records.push(self.record(&owner, d));
        }
        if answer.records.len() == before {
            // NODATA (RFC 2308 section 2.2): NOERROR, no answer, the SOA in authority.
            answer.authority.push(self.soa(zone));
            return;
        }
        // Addresses of SRV and NS targets go in the additional section (RFC 2782).
        let targets: BTreeSet<&str> = rrs
            .iter()
            .filter(|d| qtype.matches(d))
            .filter_map(|d| match d {
                RecordData::Srv { target, .. } | RecordData::Ns(target) => Some(target.as_str()),
                _ => None,
            })
            .collect();
        for target in targets {
            if let Some(trrs) = self.names.get(&canonical(target)) {
                for d in trrs.iter().filter(|d| d.ip().is_some()) {
                    let rec = self.record(target, d);
                    if !answer.additional.contains(&rec) {
                        answer.additional.push(rec);
                    }
                }
            }
        }
    }

    fn record(&self, owner: &str, data: &RecordData) -> Record {
        Record {
            name: owner.to_string(),
            ttl: self.config.ttl,
            data: data.clone(),
        }
    }

    fn soa_data(&self) -> RecordData {
        RecordData::Soa {
            mname: format!("ns.dns.{}.", self.domain),
            rname: format!("hostmaster.{}.", self.domain),
            serial: self.serial,
            refresh: SOA_REFRESH,
            retry: SOA_RETRY,
            expire: SOA_EXPIRE,
            minimum: self.config.ttl,
        }
    }

    /// The SOA record of a zone, for the authority section.
    fn soa(&self, zone: &str) -> Record {
        self.record(&format!("{zone}."), &self.soa_data())
    }
}

/// Collects records while the index is built; sets dedupe and order them.
struct Builder {
    domain: String,
    names: BTreeMap<String, BTreeSet<RecordData>>,
}

impl Builder {
    /// Adds `name` (and every ancestor of it up to `zone`, as empty non-terminals), with a
    /// record when one is given.
    fn add(&mut self, zone: &str, name: &str, data: Option<RecordData>) {
        let mut n = name;
        while n.len() > zone.len() {
            if !self.names.contains_key(n) {
                self.names.insert(n.to_string(), BTreeSet::new());
            }
            match n.split_once('.') {
                Some((_, parent)) => n = parent,
                None => break,
            }
        }
        if !self.names.contains_key(zone) {
            self.names.insert(zone.to_string(), BTreeSet::new());
        }
        if let Some(d) = data
            && let Some(set) = self.names.get_mut(name)
        {
            set.insert(d);
        }
    }

    fn service(&mut self, cluster: &Cluster, svc: &Service) {
        let domain = self.domain.clone();
        let fqdn = format!(
            "{}.{}.svc.{domain}",
            svc.name.name.to_ascii_lowercase(),
            svc.name.namespace.to_ascii_lowercase()
        );
        if svc.service_type == ServiceType::ExternalName {
            // Spec 2.5: "a CNAME record named <service>.<ns>.svc.<zone> pointing to
            // <extname> must exist": `<service>.<ns>.svc.<zone>. <ttl> IN CNAME <extname>.`
            let cname = svc
                .external_name
                .as_deref()
                .map(|n| RecordData::Cname(absolute(n)));
            self.add(&domain, &fqdn, cname);
        } else if svc.headless {
            self.headless(cluster, svc, &fqdn);
        } else {
            self.cluster_ip(svc, &fqdn);
        }
    }

    fn cluster_ip(&mut self, svc: &Service, fqdn: &str) {
        let domain = self.domain.clone();
        let target = format!("{fqdn}.");
        self.add(&domain, fqdn, None);
        for ip in &svc.cluster_ips {
            // Spec 2.3.1: `<service>.<ns>.svc.<zone>. <ttl> IN A <cluster-ip>` (and AAAA
            // for an IPv6 cluster IP, as CoreDNS does).
            self.add(&domain, fqdn, Some(RecordData::address(*ip)));
            // Spec 2.3.3: `<d>.<c>.<b>.<a>.in-addr.arpa. <ttl> IN PTR
            // <service>.<ns>.svc.<zone>.` (and the ip6.arpa nibble name for IPv6).
            self.ptr(*ip, &target);
        }
        for sp in &svc.ports {
            // Spec 2.3.2: `_<port>._<proto>.<service>.<ns>.svc.<zone>. <ttl> IN SRV
            // <weight> <priority> <port-number> <service>.<ns>.svc.<zone>.`; "Unnamed
            // ports do not have an SRV record."
            if sp.name.is_empty() {
                continue;
            }
            let srv = RecordData::Srv {
                priority: 0,
                weight: 0,
                port: sp.port,
                target: target.clone(),
            };
            self.add(
                &domain,
                &srv_name(&sp.name, sp.protocol, fqdn),
                Some(srv.clone()),
            );
            // CoreDNS also answers SRV at the Service name itself, for every port.
            self.add(&domain, fqdn, Some(srv));
        }
    }

    fn headless(&mut self, cluster: &Cluster, svc: &Service, fqdn: &str) {
        let domain = self.domain.clone();
        let ready: Vec<Endpoint> = address_endpoints(cluster, svc)
            .into_iter()
            .filter(|e| e.ready)
            .collect();
        // Spec 2.4.1: "If there are no ready endpoints for the headless Service, the
        // answer should be NXDOMAIN." So the name is only created by its records.
        for ep in &ready {
            // Spec 2.4.1: "an A record for each ready endpoint of the headless Service":
            // `<service>.<ns>.svc.<zone>. <ttl> IN A <endpoint-ip>`.
            self.add(&domain, fqdn, Some(RecordData::address(ep.ip)));
            // Spec 2.4.1: "an A record ... for each ready endpoint with hostname":
            // `<hostname>.<service>.<ns>.svc.<zone>. <ttl> IN A <endpoint-ip>`. CoreDNS
            // names an endpoint without a hostname by its dashed IP.
            let host = format!("{}.{fqdn}", endpoint_label(ep));
            self.add(&domain, &host, Some(RecordData::address(ep.ip)));
            if ep.hostname.is_some() {
                // Spec 2.4.3: "Given a ready endpoint with hostname of <hostname> ...
                // `<d>.<c>.<b>.<a>.in-addr.arpa. <ttl> IN PTR
                // <hostname>.<service>.<ns>.svc.<zone>.`"
                self.ptr(ep.ip, &format!("{host}."));
            }
        }
        for (port_name, (protocol, list)) in cluster.endpoints(svc) {
            if port_name.is_empty() {
                continue;
            }
            let owner = srv_name(&port_name, protocol, fqdn);
            for pe in list.iter().filter(|pe| pe.endpoint.ready) {
                // Spec 2.4.2: "For each combination of ready endpoint with hostname of
                // <hostname>, and port in the Service with name <port> ...
                // `_<port>._<proto>.<service>.<ns>.svc.<zone>. <ttl> IN SRV <weight>
                // <priority> <port-number> <hostname>.<service>.<ns>.svc.<zone>.`"
                let srv = RecordData::Srv {
                    priority: 0,
                    weight: 0,
                    port: pe.port,
                    target: format!("{}.{fqdn}.", endpoint_label(&pe.endpoint)),
                };
                self.add(&domain, &owner, Some(srv.clone()));
                self.add(&domain, fqdn, Some(srv));
            }
        }
    }

    fn ptr(&mut self, ip: IpAddr, target: &str) {
        let zone = match ip {
            IpAddr::V4(_) => IN_ADDR_ARPA,
            IpAddr::V6(_) => IP6_ARPA,
        };
        let name = canonical(&reverse_name(ip));
        self.add(zone, &name, Some(RecordData::Ptr(target.to_string())));
    }

    /// Fixes SRV weights and freezes the index.
    fn finish(self) -> BTreeMap<String, Vec<RecordData>> {
        self.names
            .into_iter()
            .map(|(name, set)| {
                let mut rrs: Vec<RecordData> = set.into_iter().collect();
                // CoreDNS splits a weight of 100 among the records of one priority:
                // each of n SRV records gets floor(100 / n), at least 1.
                let n = rrs
                    .iter()
                    .filter(|d| matches!(d, RecordData::Srv { .. }))
                    .count();
                let weight = u16::try_from(100 / n.max(1)).unwrap_or(1).max(1);
                for d in &mut rrs {
                    if let RecordData::Srv { weight: w, .. } = d {
                        *w = weight;
                    }
                }
                (name, rrs)
            })
            .collect()
    }
}

/// The endpoints whose addresses a headless Service publishes, whatever their ports: every
/// endpoint of its EndpointSlices (a Pod without the Service's named port, or a Service
/// without ports, still has an address), in the Service's families.
fn address_endpoints(cluster: &Cluster, svc: &Service) -> Vec<Endpoint> {
    cluster
        .addresses(svc)
        .into_iter()
        .filter(|e| svc.ip_families.is_empty() || svc.ip_families.contains(&IpFamily::of(&e.ip)))
        .collect()
}

/// The label that names an endpoint under its Service: its hostname, or its dashed IP.
///
/// Spec 2.1: the _hostname_ of an endpoint is "the value of the endpoint's `hostname`
/// field", else "a unique, system-assigned identifier"; CoreDNS uses the dashed IP.
fn endpoint_label(ep: &Endpoint) -> String {
    match &ep.hostname {
        Some(h) => h.to_ascii_lowercase(),
        None => dashed_ip(ep.ip),
    }
}

/// `_<port>._<proto>.<fqdn>`.
fn srv_name(port: &str, protocol: Protocol, fqdn: &str) -> String {
    format!(
        "_{}._{}.{fqdn}",
        port.to_ascii_lowercase(),
        protocol.as_lower()
    )
}

/// An IP as one DNS label: `.` and `:` replaced by `-` (`10-244-1-5`, `fd00--5`).
pub fn dashed_ip(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// Parses a dashed IP label back (`10-244-1-5`, `fd00--5`).
pub fn parse_dashed(label: &str) -> Option<IpAddr> {
    let parts: Vec<&str> = label.split('-').collect();
    if parts.len() == 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return label
            .replace('-', ".")
            .parse::<Ipv4Addr>()
            .ok()
            .map(IpAddr::V4);
    }
    label
        .replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

/// The reverse-lookup name of an IP, absolute: `d.c.b.a.in-addr.arpa.` or 32 nibbles
/// under `ip6.arpa.`.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.{IN_ADDR_ARPA}.")
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(73);
            for byte in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            s.push_str(IP6_ARPA);
            s.push('.');
            s
        }
    }
}

/// Parses a full reverse-lookup name (case-insensitive, trailing dot optional).
pub fn parse_reverse(name: &str) -> Option<IpAddr> {
    let key = canonical(name);
    if let Some(rest) = key.strip_suffix(".in-addr.arpa") {
        let labels: Vec<&str> = rest.split('.').collect();
        if labels.len() != 4 {
            return None;
        }
        let mut octets = [0u8; 4];
        for (i, label) in labels.iter().rev().enumerate() {
            let canonical_decimal = !label.is_empty()
                && label.len() <= 3
                && label.bytes().all(|b| b.is_ascii_digit())
                && (label.len() == 1 || !label.starts_with('0'));
            if !canonical_decimal {
                return None;
            }
            *octets.get_mut(i)? = label.parse().ok()?;
        }
        return Some(IpAddr::from(octets));
    }
    let rest = key.strip_suffix(".ip6.arpa")?;
    let labels: Vec<&str> = rest.split('.').collect();
    if labels.len() != 32 {
        return None;
    }
    let mut value: u128 = 0;
    for label in labels.iter().rev() {
        let mut chars = label.chars();
        let (Some(c), None) = (chars.next(), chars.next()) else {
            return None;
        };
        value = (value << 4) | u128::from(c.to_digit(16)?);
    }
    Some(IpAddr::V6(Ipv6Addr::from(value)))
}

/// Lower case, one trailing dot removed. Spec 2.1: "All comparisons between query data
/// and data in Kubernetes is case-insensitive."
fn canonical(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Lower case with exactly one trailing dot.
fn absolute(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.').to_ascii_lowercase())
}

/// Whether a canonical name is a zone's apex or below it.
fn in_zone(key: &str, zone: &str) -> bool {
    key == zone
        || (key.len() > zone.len()
            && key.ends_with(zone)
            && key.as_bytes().get(key.len() - zone.len() - 1) == Some(&b'.'))
}

/// FNV-1a over the zone's presentation form: a serial that changes with the content.
fn zone_serial(
    names: &BTreeMap<String, Vec<RecordData>>,
    pods: &BTreeSet<(String, IpAddr)>,
) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut feed = |s: &str| {
        for b in s.bytes().chain(std::iter::once(b'\n')) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    };
    for (name, rrs) in names {
        feed(name);
        for d in rrs {
            feed(&format!("{} {d}", d.rtype()));
        }
    }
    for (ns, ip) in pods {
        feed(&format!("pod {ns} {ip}"));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ClusterConfig, Manifests};
    use crate::model::{
        EndpointPort, EndpointSlice, LabelSelector, ObjectName, Pod, ServicePort, TargetPort,
    };

    const D: &str = "cluster.local";

    fn lab_config() -> ClusterConfig {
        ClusterConfig {
            default_namespace: "instavote".into(),
            ..ClusterConfig::default()
        }
    }

    fn load(text: &str) -> Cluster {
        let cfg = lab_config();
        let mut m = Manifests::from_files([("lab.yaml", text)], &cfg);
        let c = m.build(&cfg);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        c
    }

    fn resolver(c: &Cluster) -> Resolver {
        Resolver::new(c, DiscoveryConfig::default())
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn port(name: &str, protocol: Protocol, port: u16, target: u16) -> ServicePort {
        ServicePort {
            name: name.into(),
            protocol,
            port,
            target_port: TargetPort::Number(target),
            node_port: None,
            app_protocol: None,
        }
    }

    fn service(ns: &str, name: &str, ips: &[&str]) -> Service {
        let mut s = Service::new(ObjectName::new(ns, name));
        s.cluster_ips = ips.iter().map(|i| ip(i)).collect();
        s
    }

    fn pod(ns: &str, name: &str, addr: &str, pairs: &[(&str, &str)]) -> Pod {
        let mut p = Pod::new(ObjectName::new(ns, name), ip(addr));
        p.labels = labels(pairs);
        p
    }

    fn soa_owner(a: &Answer) -> Vec<&str> {
        a.authority
            .iter()
            .filter(|r| matches!(r.data, RecordData::Soa { .. }))
            .map(|r| r.name.as_str())
            .collect()
    }

    fn assert_nxdomain(a: &Answer, zone: &str) {
        assert_eq!(a.rcode, Rcode::NxDomain, "{a:?}");
        assert!(a.records.is_empty(), "{a:?}");
        assert_eq!(soa_owner(a), vec![format!("{zone}.")], "{a:?}");
    }

    fn assert_nodata(a: &Answer, zone: &str) {
        assert!(a.is_nodata(), "{a:?}");
        assert_eq!(soa_owner(a), vec![format!("{zone}.")], "{a:?}");
    }

    fn srv_of(a: &Answer) -> Vec<(u16, u16, u16, String)> {
        a.records
            .iter()
            .filter_map(|r| match &r.data {
                RecordData::Srv {
                    priority,
                    weight,
                    port,
                    target,
                } => Some((*priority, *weight, *port, target.clone())),
                _ => None,
            })
            .collect()
    }

    const LAB_NODE_AND_PODS: &str = "apiVersion: v1
kind: Namespace
metadata: {name: instavote}
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 192.168.50.11}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: vote}
spec:
  replicas: 2
  selector: {matchLabels: {role: vote}}
  template:
    metadata: {labels: {role: vote}}
    spec:
      containers:
      - name: app
        image: schoolofdevops/vote:v1
        ports: [{containerPort: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: redis}
spec:
  replicas: 1
  selector: {matchLabels: {role: redis}}
  template:
    metadata: {labels: {role: redis}}
    spec:
      containers:
      - name: redis
        image: redis:alpine
        ports: [{containerPort: 6379}]
";

    const LAB_REDIS_SVC: &str = "---
apiVersion: v1
kind: Service
metadata: {name: redis, labels: {role: redis}}
spec:
  selector: {role: redis}
  ports:
  - name: redis
    port: 6379
    targetPort: 6379
  type: ClusterIP
";

    fn lab(with_redis: bool) -> Cluster {
        if with_redis {
            load(&format!("{LAB_NODE_AND_PODS}{LAB_REDIS_SVC}"))
        } else {
            load(LAB_NODE_AND_PODS)
        }
    }

    #[test]
    fn lab_redis_resolves_through_the_search_path_from_a_vote_pod() {
        let c = lab(true);
        let redis_ip = c
            .service(&ObjectName::new("instavote", "redis"))
            .and_then(Service::cluster_ip)
            .expect("allocated");
        let r = resolver(&c);
        let search = SearchConfig::for_pod("instavote", D);
        assert_eq!(
            search.search,
            vec![
                "instavote.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(search.ndots, 5);
        let res = r.resolve("redis", QueryType::A, &search);
        assert_eq!(res.tried, vec!["redis.instavote.svc.cluster.local."]);
        assert_eq!(
            res.fqdn.as_deref(),
            Some("redis.instavote.svc.cluster.local.")
        );
        assert_eq!(res.answer.rcode, Rcode::NoError);
        assert_eq!(res.answer.addresses(), vec![redis_ip]);
        assert_eq!(
            res.answer.records[0].name,
            "redis.instavote.svc.cluster.local."
        );
        assert_eq!(res.answer.records[0].ttl, DEFAULT_TTL);

        // `redis.instavote` has one dot: the search list comes first, the second entry hits.
        let res = r.resolve("redis.instavote", QueryType::A, &search);
        assert_eq!(
            res.tried,
            vec![
                "redis.instavote.instavote.svc.cluster.local.",
                "redis.instavote.svc.cluster.local."
            ]
        );
        assert_eq!(res.answer.addresses(), vec![redis_ip]);

        // The vote pods can be resolved by their pod names too.
        let vote = c
            .pods()
            .find(|p| p.labels.get("role").map(String::as_str) == Some("vote"))
            .expect("vote pod");
        let name = format!("{}.instavote.pod.{D}", dashed_ip(vote.ips[0]));
        assert_eq!(r.query(&name, QueryType::A).addresses(), vec![vote.ips[0]]);
    }

    #[test]
    fn lab_redis_fails_before_the_service_exists() {
        let c = lab(false);
        let r = resolver(&c);
        let search = SearchConfig::for_pod("instavote", D);
        let res = r.resolve("redis", QueryType::A, &search);
        assert_eq!(
            res.tried,
            vec![
                "redis.instavote.svc.cluster.local.",
                "redis.svc.cluster.local.",
                "redis.cluster.local.",
                "redis.",
            ]
        );
        assert_eq!(res.fqdn, None);
        for name in &res.tried[..3] {
            assert_nxdomain(&r.query(name, QueryType::A), D);
        }
        // The bare name is outside the cluster domain: ours to refuse, the server's to
        // forward.
        assert_eq!(res.answer.rcode, Rcode::Refused);
        // The namespace itself exists (pods and a Namespace object are in it).
        assert_nodata(&r.query("instavote.svc.cluster.local", QueryType::A), D);
    }

    #[test]
    fn dual_stack_service_answers_each_family_for_its_own_type() {
        let mut c = Cluster::simulated();
        c.upsert_service(service("default", "web", &["10.96.0.20", "fd00:96::20"]));
        c.upsert_service(service("default", "v4only", &["10.96.0.21"]));
        let r = resolver(&c);
        let name = "web.default.svc.cluster.local";
        let a = r.query(name, QueryType::A);
        assert_eq!(a.rcode, Rcode::NoError);
        assert_eq!(a.records.len(), 1);
        assert_eq!(
            a.records[0].data,
            RecordData::A("10.96.0.20".parse().expect("v4"))
        );
        assert!(a.authority.is_empty());
        let aaaa = r.query(name, QueryType::Aaaa);
        assert_eq!(
            aaaa.records.iter().map(|r| &r.data).collect::<Vec<_>>(),
            vec![&RecordData::Aaaa("fd00:96::20".parse().expect("v6"))]
        );
        let any = r.query(name, QueryType::Any);
        assert_eq!(any.addresses(), vec![ip("10.96.0.20"), ip("fd00:96::20")]);

        // AAAA of a v4-only Service: NODATA with the SOA.
        let nodata = r.query("v4only.default.svc.cluster.local", QueryType::Aaaa);
        assert_nodata(&nodata, D);
        let RecordData::Soa {
            mname,
            rname,
            serial,
            minimum,
            ..
        } = &nodata.authority[0].data
        else {
            panic!("not an SOA: {nodata:?}");
        };
        assert_eq!(mname, "ns.dns.cluster.local.");
        assert_eq!(rname, "hostmaster.cluster.local.");
        assert_eq!(*serial, r.serial());
        assert_eq!(*minimum, DEFAULT_TTL);
    }

    fn headless_cluster() -> (Cluster, Service) {
        let mut c = Cluster::simulated();
        for (i, host) in [Some("web-0"), Some("web-1"), None].iter().enumerate() {
            let mut p = pod(
                "shop",
                &format!("web-{i}"),
                &format!("10.244.1.{}", 10 + i),
                &[("app", "web")],
            );
            p.hostname = host.map(str::to_string);
            p.subdomain = host.map(|_| "web".to_string());
            c.upsert_pod(p);
        }
        let mut not_ready = pod("shop", "web-3", "10.244.1.13", &[("app", "web")]);
        not_ready.ready = false;
        not_ready.hostname = Some("web-3".into());
        not_ready.subdomain = Some("web".into());
        c.upsert_pod(not_ready);
        let mut svc = Service::new(ObjectName::new("shop", "web"));
        svc.headless = true;
        svc.selector = Some(LabelSelector::from_labels(labels(&[("app", "web")])));
        svc.ports.push(port("http", Protocol::Tcp, 80, 8080));
        svc.ports.push(port("", Protocol::Udp, 53, 5353));
        c.upsert_service(svc.clone());
        (c, svc)
    }

    #[test]
    fn headless_answers_ready_endpoints_and_hostnames() {
        let (c, _) = headless_cluster();
        let r = resolver(&c);
        let a = r.query("web.shop.svc.cluster.local", QueryType::A);
        assert_eq!(a.rcode, Rcode::NoError);
        assert_eq!(
            a.addresses(),
            vec![ip("10.244.1.10"), ip("10.244.1.11"), ip("10.244.1.12")],
            "ready endpoints only, each once although the Service has two ports"
        );
        assert!(
            a.records
                .iter()
                .all(|r| r.name == "web.shop.svc.cluster.local.")
        );
        let host = r.query("web-1.web.shop.svc.cluster.local", QueryType::A);
        assert_eq!(host.addresses(), vec![ip("10.244.1.11")]);
        // An endpoint without a hostname is named by its dashed IP (CoreDNS).
        let dashed = r.query("10-244-1-12.web.shop.svc.cluster.local", QueryType::A);
        assert_eq!(dashed.addresses(), vec![ip("10.244.1.12")]);
        // A not-ready endpoint has no name.
        assert_nxdomain(
            &r.query("web-3.web.shop.svc.cluster.local", QueryType::A),
            D,
        );
        assert_nodata(&r.query("web.shop.svc.cluster.local", QueryType::Aaaa), D);
    }

    #[test]
    fn headless_publish_not_ready_addresses_and_no_ready_endpoints() {
        let (mut c, mut svc) = headless_cluster();
        svc.publish_not_ready_addresses = true;
        c.upsert_service(svc);
        let r = resolver(&c);
        assert_eq!(
            r.query("web.shop.svc.cluster.local", QueryType::A)
                .addresses()
                .len(),
            4
        );
        assert_eq!(
            r.query("web-3.web.shop.svc.cluster.local", QueryType::A)
                .addresses(),
            vec![ip("10.244.1.13")]
        );

        // "If there are no ready endpoints for the headless Service, the answer should be
        // NXDOMAIN."
        let mut empty = Service::new(ObjectName::new("shop", "nobody"));
        empty.headless = true;
        empty.selector = Some(LabelSelector::from_labels(labels(&[("app", "none")])));
        empty.ports.push(port("http", Protocol::Tcp, 80, 80));
        c.upsert_service(empty);
        let r = resolver(&c);
        assert_nxdomain(&r.query("nobody.shop.svc.cluster.local", QueryType::A), D);
        assert_nodata(&r.query("shop.svc.cluster.local", QueryType::A), D);
    }

    #[test]
    fn headless_without_ports_and_selectorless_slices_still_have_addresses() {
        let mut c = Cluster::simulated();
        c.upsert_pod(pod("db", "pg-0", "10.244.2.5", &[("app", "pg")]));
        let mut portless = Service::new(ObjectName::new("db", "pg"));
        portless.headless = true;
        portless.selector = Some(LabelSelector::from_labels(labels(&[("app", "pg")])));
        c.upsert_service(portless);

        let mut manual = Service::new(ObjectName::new("db", "ext"));
        manual.headless = true;
        manual.ports.push(port("pg", Protocol::Tcp, 5432, 5432));
        c.upsert_service(manual.clone());
        let ep = |addr: &str, ready: bool, host: Option<&str>| Endpoint {
            ip: ip(addr),
            ready,
            serving: ready,
            terminating: false,
            node_name: None,
            zone: None,
            hostname: host.map(str::to_string),
            pod: None,
            weight: 1,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        };
        c.upsert_slice(EndpointSlice {
            service: manual.name.clone(),
            name: "ext-1".into(),
            endpoints: vec![
                ep("192.0.2.1", true, Some("primary")),
                ep("192.0.2.2", false, None),
            ],
            ports: vec![EndpointPort {
                name: "pg".into(),
                port: 15432,
                protocol: Protocol::Tcp,
            }],
        });
        c.upsert_slice(EndpointSlice {
            service: manual.name.clone(),
            name: "ext-2".into(),
            endpoints: vec![ep("2001:db8::7", true, None)],
            ports: vec![],
        });
        let r = resolver(&c);
        assert_eq!(
            r.query("pg.db.svc.cluster.local", QueryType::A).addresses(),
            vec![ip("10.244.2.5")]
        );
        assert_eq!(
            r.query("ext.db.svc.cluster.local", QueryType::A)
                .addresses(),
            vec![ip("192.0.2.1")]
        );
        assert_eq!(
            r.query("ext.db.svc.cluster.local", QueryType::Aaaa)
                .addresses(),
            vec![ip("2001:db8::7")]
        );
        assert_eq!(
            r.query("primary.ext.db.svc.cluster.local", QueryType::A)
                .addresses(),
            vec![ip("192.0.2.1")]
        );
        assert_eq!(
            srv_of(&r.query("_pg._tcp.ext.db.svc.cluster.local", QueryType::Srv)),
            vec![(0, 100, 15432, "primary.ext.db.svc.cluster.local.".into())]
        );
    }

    #[test]
    fn srv_for_a_normal_service() {
        let mut c = Cluster::simulated();
        let mut svc = service("default", "kubernetes", &["10.96.0.1"]);
        svc.ports.push(port("https", Protocol::Tcp, 443, 6443));
        svc.ports.push(port("dns", Protocol::Udp, 53, 53));
        c.upsert_service(svc);
        let mut unnamed = service("default", "plain", &["10.96.0.2"]);
        unnamed.ports.push(port("", Protocol::Tcp, 80, 8080));
        c.upsert_service(unnamed);
        let r = resolver(&c);
        let a = r.query(
            "_https._tcp.kubernetes.default.svc.cluster.local",
            QueryType::Srv,
        );
        assert_eq!(a.rcode, Rcode::NoError);
        assert_eq!(
            srv_of(&a),
            vec![(0, 100, 443, "kubernetes.default.svc.cluster.local.".into())]
        );
        assert_eq!(
            a.additional,
            vec![Record {
                name: "kubernetes.default.svc.cluster.local.".into(),
                ttl: DEFAULT_TTL,
                data: RecordData::A("10.96.0.1".parse().expect("v4")),
            }]
        );
        assert_eq!(
            srv_of(&r.query(
                "_dns._udp.kubernetes.default.svc.cluster.local",
                QueryType::Srv
            )),
            vec![(0, 100, 53, "kubernetes.default.svc.cluster.local.".into())]
        );
        // The wrong protocol is a name that does not exist.
        assert_nxdomain(
            &r.query(
                "_dns._tcp.kubernetes.default.svc.cluster.local",
                QueryType::Srv,
            ),
            D,
        );
        // `_tcp.<svc>` is an empty non-terminal.
        assert_nodata(
            &r.query("_tcp.kubernetes.default.svc.cluster.local", QueryType::Srv),
            D,
        );
        // SRV at the Service name: every named port (CoreDNS), weight split between them.
        let bare = r.query("kubernetes.default.svc.cluster.local", QueryType::Srv);
        let mut ports: Vec<_> = srv_of(&bare).into_iter().map(|s| (s.1, s.2)).collect();
        ports.sort();
        assert_eq!(ports, vec![(50, 53), (50, 443)]);
        // A/AAAA at the name are not disturbed by the SRV records.
        assert_eq!(
            r.query("kubernetes.default.svc.cluster.local", QueryType::A)
                .records
                .len(),
            1
        );
        // "Unnamed ports do not have an SRV record."
        assert_nodata(
            &r.query("plain.default.svc.cluster.local", QueryType::Srv),
            D,
        );
    }

    #[test]
    fn srv_for_a_headless_service() {
        let (c, _) = headless_cluster();
        let r = resolver(&c);
        let a = r.query("_http._tcp.web.shop.svc.cluster.local", QueryType::Srv);
        assert_eq!(
            srv_of(&a),
            vec![
                (
                    0,
                    33,
                    8080,
                    "10-244-1-12.web.shop.svc.cluster.local.".into()
                ),
                (0, 33, 8080, "web-0.web.shop.svc.cluster.local.".into()),
                (0, 33, 8080, "web-1.web.shop.svc.cluster.local.".into()),
            ]
        );
        let mut extra: Vec<_> = a
            .additional
            .iter()
            .map(|r| (r.name.as_str(), r.data.ip()))
            .collect();
        extra.sort();
        assert_eq!(
            extra,
            vec![
                (
                    "10-244-1-12.web.shop.svc.cluster.local.",
                    Some(ip("10.244.1.12"))
                ),
                ("web-0.web.shop.svc.cluster.local.", Some(ip("10.244.1.10"))),
                ("web-1.web.shop.svc.cluster.local.", Some(ip("10.244.1.11"))),
            ]
        );
        // The unnamed UDP port has no SRV record.
        assert_nxdomain(
            &r.query("_udp.web.shop.svc.cluster.local", QueryType::Srv),
            D,
        );
        assert_eq!(
            srv_of(&r.query("web.shop.svc.cluster.local", QueryType::Srv)).len(),
            3
        );
    }

    #[test]
    fn ptr_for_cluster_ips_and_headless_hostnames() {
        let (mut c, _) = headless_cluster();
        c.upsert_service(service("default", "web", &["10.96.0.20", "fd00:96::20"]));
        let r = resolver(&c);
        let v4 = r.query("20.0.96.10.in-addr.arpa", QueryType::Ptr);
        assert_eq!(v4.rcode, Rcode::NoError);
        assert_eq!(
            v4.records,
            vec![Record {
                name: "20.0.96.10.in-addr.arpa.".into(),
                ttl: DEFAULT_TTL,
                data: RecordData::Ptr("web.default.svc.cluster.local.".into()),
            }]
        );
        let v6_name = reverse_name(ip("fd00:96::20"));
        assert_eq!(
            v6_name,
            "0.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa."
        );
        let v6 = r.query(&v6_name, QueryType::Ptr);
        assert_eq!(
            v6.records.iter().map(|r| &r.data).collect::<Vec<_>>(),
            vec![&RecordData::Ptr("web.default.svc.cluster.local.".into())]
        );
        let host = r.query(&reverse_name(ip("10.244.1.10")), QueryType::Ptr);
        assert_eq!(
            host.records.iter().map(|r| &r.data).collect::<Vec<_>>(),
            vec![&RecordData::Ptr("web-0.web.shop.svc.cluster.local.".into())]
        );
        // An endpoint without a hostname, and addresses we do not know: NXDOMAIN.
        assert_nxdomain(
            &r.query(&reverse_name(ip("10.244.1.12")), QueryType::Ptr),
            "in-addr.arpa",
        );
        assert_nxdomain(
            &r.query("8.8.8.8.in-addr.arpa.", QueryType::Ptr),
            "in-addr.arpa",
        );
        assert_nxdomain(
            &r.query(&reverse_name(ip("2001:db8::1")), QueryType::Ptr),
            "ip6.arpa",
        );
        // A known reverse name asked for another type is NODATA; so is an ancestor of one.
        assert_nodata(
            &r.query("20.0.96.10.in-addr.arpa", QueryType::A),
            "in-addr.arpa",
        );
        assert_nodata(&r.query("10.in-addr.arpa", QueryType::Ptr), "in-addr.arpa");
        // The reverse zones have their own SOA.
        let soa = r.query("in-addr.arpa", QueryType::Soa);
        assert_eq!(soa.records.len(), 1);
        assert_eq!(soa.records[0].data.rtype(), QueryType::Soa);
    }

    #[test]
    fn reverse_names_round_trip_and_reject_malformed() {
        for s in [
            "10.96.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "fd00:96::20",
            "::1",
            "2001:db8:ffff::abcd",
        ] {
            let addr = ip(s);
            assert_eq!(parse_reverse(&reverse_name(addr)), Some(addr), "{s}");
            let upper = reverse_name(addr).to_ascii_uppercase();
            assert_eq!(
                parse_reverse(upper.trim_end_matches('.')),
                Some(addr),
                "{s}"
            );
        }
        assert_eq!(reverse_name(ip("10.96.0.1")), "1.0.96.10.in-addr.arpa.");
        for bad in [
            "1.0.96.in-addr.arpa",
            "1.0.96.10.11.in-addr.arpa",
            "1.0.96.256.in-addr.arpa",
            "1.00.96.10.in-addr.arpa",
            "1.+0.96.10.in-addr.arpa",
            "1..96.10.in-addr.arpa",
            "1.0.96.10.example.com",
            "1.0.ip6.arpa",
            "10.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa",
            "g.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa",
        ] {
            assert_eq!(parse_reverse(bad), None, "{bad}");
        }
    }

    #[test]
    fn external_name_is_a_cname() {
        let yaml = "apiVersion: v1
kind: Service
metadata: {name: db, namespace: prod}
spec:
  type: ExternalName
  externalName: My.Database.Example.com
---
apiVersion: v1
kind: Service
metadata: {name: alias, namespace: prod}
spec:
  type: ExternalName
  externalName: api.prod.svc.cluster.local
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: prod}
spec:
  clusterIP: 10.96.5.5
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: ghost, namespace: prod}
spec:
  type: ExternalName
  externalName: nope.prod.svc.cluster.local
";
        let c = load(yaml);
        let r = resolver(&c);
        let cname = RecordData::Cname("my.database.example.com.".into());
        for qtype in [
            QueryType::A,
            QueryType::Aaaa,
            QueryType::Cname,
            QueryType::Any,
            QueryType::Srv,
        ] {
            let a = r.query("db.prod.svc.cluster.local", qtype);
            assert_eq!(a.rcode, Rcode::NoError, "{qtype}");
            assert_eq!(
                a.records,
                vec![Record {
                    name: "db.prod.svc.cluster.local.".into(),
                    ttl: DEFAULT_TTL,
                    data: cname.clone(),
                }],
                "{qtype}: the CNAME only; nothing outside the cluster is chased"
            );
            assert!(a.authority.is_empty());
        }
        // A CNAME into the cluster domain is followed (RFC 1034 4.3.2 step 3b).
        let a = r.query("alias.prod.svc.cluster.local", QueryType::A);
        assert_eq!(a.records.len(), 2);
        assert_eq!(
            a.records[0].data,
            RecordData::Cname("api.prod.svc.cluster.local.".into())
        );
        assert_eq!(a.records[1].name, "api.prod.svc.cluster.local.");
        assert_eq!(a.addresses(), vec![ip("10.96.5.5")]);
        let a = r.query("alias.prod.svc.cluster.local", QueryType::Aaaa);
        assert_eq!(a.records.len(), 1);
        assert_eq!(
            soa_owner(&a),
            vec!["cluster.local."],
            "NODATA at the end of the chain"
        );
        // ... and the end of the chain decides the rcode (RFC 6604).
        let a = r.query("ghost.prod.svc.cluster.local", QueryType::A);
        assert_eq!(a.rcode, Rcode::NxDomain);
        assert_eq!(a.records.len(), 1);
        assert_eq!(soa_owner(&a), vec!["cluster.local."]);
    }

    #[test]
    fn cname_loops_stop() {
        let mut c = Cluster::simulated();
        for (name, target) in [
            ("a", "b.loop.svc.cluster.local"),
            ("b", "a.loop.svc.cluster.local"),
        ] {
            let mut s = Service::new(ObjectName::new("loop", name));
            s.service_type = ServiceType::ExternalName;
            s.external_name = Some(target.into());
            c.upsert_service(s);
        }
        let r = resolver(&c);
        let a = r.query("a.loop.svc.cluster.local", QueryType::A);
        assert_eq!(a.rcode, Rcode::NoError);
        assert_eq!(a.records.len(), 2, "{a:?}");
    }

    #[test]
    fn missing_names_are_nxdomain_with_soa() {
        let (c, _) = headless_cluster();
        let r = resolver(&c);
        for name in [
            "nosuch.shop.svc.cluster.local",
            "web.nosuchns.svc.cluster.local",
            "nosuchns.svc.cluster.local",
            "foo.cluster.local",
            "x.web-0.web.shop.svc.cluster.local",
            "_http._udp.web.shop.svc.cluster.local",
        ] {
            let a = r.query(name, QueryType::A);
            assert_nxdomain(&a, D);
            assert_eq!(a.authority[0].ttl, DEFAULT_TTL);
        }
    }

    #[test]
    fn empty_non_terminals_and_apex_are_nodata() {
        let mut c = Cluster::simulated();
        c.add_namespace("empty");
        c.upsert_service(service("default", "web", &["10.96.0.20"]));
        let r = resolver(&c);
        for name in [
            "svc.cluster.local",
            "default.svc.cluster.local",
            "empty.svc.cluster.local",
            "pod.cluster.local",
            "empty.pod.cluster.local",
            "cluster.local",
        ] {
            assert_nodata(&r.query(name, QueryType::A), D);
        }
        let soa = r.query("cluster.local.", QueryType::Soa);
        assert_eq!(soa.rcode, Rcode::NoError);
        assert_eq!(soa.records.len(), 1);
        assert_eq!(soa.records[0].name, "cluster.local.");
        let ns = r.query("cluster.local", QueryType::Ns);
        assert_eq!(
            ns.records.iter().map(|r| &r.data).collect::<Vec<_>>(),
            vec![&RecordData::Ns("ns.dns.cluster.local.".into())]
        );
        assert!(ns.additional.is_empty(), "no kube-dns Service, no glue");
        assert_eq!(
            r.query("ns.dns.cluster.local", QueryType::A).rcode,
            Rcode::NxDomain
        );
    }

    #[test]
    fn name_server_glue_comes_from_the_kube_dns_service() {
        let mut c = Cluster::simulated();
        c.upsert_service(service("kube-system", "kube-dns", &["10.96.0.10"]));
        let r = resolver(&c);
        assert_eq!(
            r.query("ns.dns.cluster.local", QueryType::A).addresses(),
            vec![ip("10.96.0.10")]
        );
        let ns = r.query("cluster.local", QueryType::Ns);
        assert_eq!(ns.additional.len(), 1);
        assert_eq!(ns.additional[0].name, "ns.dns.cluster.local.");
    }

    #[test]
    fn names_outside_our_zones_are_refused() {
        let (c, _) = headless_cluster();
        let r = resolver(&c);
        for name in [
            "example.com",
            "redis",
            "redis.",
            "local",
            "cluster.local.example.com",
            "notcluster.local",
            ".",
            "",
            "arpa",
        ] {
            let a = r.query(name, QueryType::A);
            assert_eq!(a, Answer::new(Rcode::Refused), "{name:?}");
        }
    }

    #[test]
    fn names_are_case_insensitive_and_the_trailing_dot_is_optional() {
        let (mut c, _) = headless_cluster();
        c.upsert_service(service("default", "web", &["10.96.0.20"]));
        let r = resolver(&c);
        let plain = r.query("web.default.svc.cluster.local", QueryType::A);
        for name in [
            "web.default.svc.cluster.local.",
            "WEB.Default.SVC.Cluster.Local",
            "Web.Default.Svc.Cluster.Local.",
        ] {
            let a = r.query(name, QueryType::A);
            assert_eq!(a.addresses(), plain.addresses(), "{name}");
            // The owner keeps the question's spelling, made absolute.
            let expect = format!("{}.", name.trim_end_matches('.'));
            assert_eq!(a.records[0].name, expect);
        }
        assert_eq!(
            r.query("WEB-0.web.SHOP.svc.cluster.local", QueryType::A)
                .addresses(),
            vec![ip("10.244.1.10")]
        );
        assert_eq!(
            r.query("_HTTP._TCP.web.shop.svc.cluster.local", QueryType::Srv)
                .records
                .len(),
            3
        );
        assert_eq!(
            r.query("20.0.96.10.IN-ADDR.ARPA.", QueryType::Ptr)
                .records
                .len(),
            1
        );
    }

    #[test]
    fn ndots_decides_between_as_is_and_the_search_list() {
        let c = lab(true);
        let r = resolver(&c);
        let search = SearchConfig::for_pod("instavote", D);
        // 4 dots < ndots 5: the search list is tried first, the name itself last.
        let res = r.resolve("redis.instavote.svc.cluster.local", QueryType::A, &search);
        assert_eq!(
            res.tried,
            vec![
                "redis.instavote.svc.cluster.local.instavote.svc.cluster.local.",
                "redis.instavote.svc.cluster.local.svc.cluster.local.",
                "redis.instavote.svc.cluster.local.cluster.local.",
                "redis.instavote.svc.cluster.local.",
            ]
        );
        assert_eq!(
            res.fqdn.as_deref(),
            Some("redis.instavote.svc.cluster.local.")
        );
        assert_eq!(res.answer.addresses().len(), 1);
        // 6 dots >= 5: as-is first, and it answers.
        let res = r.resolve(
            "_redis._tcp.redis.instavote.svc.cluster.local",
            QueryType::Srv,
            &search,
        );
        assert_eq!(
            res.tried,
            vec!["_redis._tcp.redis.instavote.svc.cluster.local."]
        );
        assert_eq!(
            srv_of(&res.answer),
            vec![(0, 100, 6379, "redis.instavote.svc.cluster.local.".into())]
        );
        // Exactly 5 dots: as-is first; when that fails the search list follows.
        let res = r.resolve("a.b.c.d.e.f", QueryType::A, &search);
        assert_eq!(res.tried[0], "a.b.c.d.e.f.");
        assert_eq!(res.tried.len(), 4);
        assert_eq!(res.tried[1], "a.b.c.d.e.f.instavote.svc.cluster.local.");
        assert_eq!(res.fqdn, None);
        assert_eq!(res.answer.rcode, Rcode::NxDomain);
        // With ndots:1 (a typical host), one dot is enough to go as-is first.
        let host = SearchConfig {
            search: vec!["instavote.svc.cluster.local.".into()],
            ndots: 1,
        };
        assert_eq!(
            host.candidates("redis.instavote"),
            vec![
                "redis.instavote.",
                "redis.instavote.instavote.svc.cluster.local."
            ]
        );
        // NODATA does not stop the search: AAAA of a v4-only Service tries everything.
        let res = r.resolve("redis", QueryType::Aaaa, &search);
        assert_eq!(res.tried.len(), 4);
        assert_eq!(res.fqdn, None);
    }

    #[test]
    fn a_trailing_dot_queries_only_that_name() {
        let c = lab(true);
        let r = resolver(&c);
        let search = SearchConfig::for_pod("instavote", D);
        let res = r.resolve("redis.", QueryType::A, &search);
        assert_eq!(res.tried, vec!["redis."]);
        assert_eq!(res.answer.rcode, Rcode::Refused);
        assert_eq!(res.fqdn, None);
        let res = r.resolve("redis.instavote.svc.cluster.local.", QueryType::A, &search);
        assert_eq!(res.tried, vec!["redis.instavote.svc.cluster.local."]);
        assert_eq!(res.answer.addresses().len(), 1);
    }

    #[test]
    fn pod_records_are_verified() {
        let mut c = Cluster::simulated();
        c.upsert_pod(pod("default", "a", "10.244.1.5", &[]));
        let mut dual = pod("default", "b", "10.244.1.6", &[]);
        dual.ips.push(ip("fd00:10:244::6"));
        c.upsert_pod(dual);
        let mut done = pod("default", "job", "10.244.1.7", &[]);
        done.phase = PodPhase::Succeeded;
        c.upsert_pod(done);
        let r = resolver(&c);
        let a = r.query("10-244-1-5.default.pod.cluster.local", QueryType::A);
        assert_eq!(a.rcode, Rcode::NoError);
        assert_eq!(a.records[0].name, "10-244-1-5.default.pod.cluster.local.");
        assert_eq!(a.addresses(), vec![ip("10.244.1.5")]);
        assert_nodata(
            &r.query("10-244-1-5.default.pod.cluster.local", QueryType::Aaaa),
            D,
        );
        assert_eq!(
            r.query("fd00-10-244--6.default.pod.cluster.local", QueryType::Aaaa)
                .addresses(),
            vec![ip("fd00:10:244::6")]
        );
        assert_eq!(dashed_ip(ip("fd00:10:244::6")), "fd00-10-244--6");
        for name in [
            "10-244-1-9.default.pod.cluster.local",   // no such Pod
            "10-244-1-5.other.pod.cluster.local",     // not in that namespace
            "10-244-1-7.default.pod.cluster.local",   // Succeeded: the IP is released
            "10-244-1.default.pod.cluster.local",     // malformed
            "10-244-1-500.default.pod.cluster.local", // malformed
            "x.10-244-1-5.default.pod.cluster.local",
        ] {
            assert_nxdomain(&r.query(name, QueryType::A), D);
        }
        let off = Resolver::new(
            &c,
            DiscoveryConfig {
                pod_records: false,
                ..DiscoveryConfig::default()
            },
        );
        assert_nxdomain(
            &off.query("10-244-1-5.default.pod.cluster.local", QueryType::A),
            D,
        );
        assert_nxdomain(&off.query("pod.cluster.local", QueryType::A), D);
    }

    #[test]
    fn custom_domain_and_ttl() {
        let mut c = Cluster::simulated();
        c.upsert_service(service("default", "web", &["10.96.0.20"]));
        let r = Resolver::new(
            &c,
            DiscoveryConfig {
                cluster_domain: "Lab.Example.".into(),
                ttl: 30,
                pod_records: true,
            },
        );
        assert_eq!(r.cluster_domain(), "lab.example");
        let a = r.query("web.default.svc.lab.example", QueryType::A);
        assert_eq!(a.records[0].ttl, 30);
        assert_eq!(a.addresses(), vec![ip("10.96.0.20")]);
        assert_eq!(
            r.query("web.default.svc.cluster.local", QueryType::A).rcode,
            Rcode::Refused
        );
        let nx = r.query("nope.default.svc.lab.example", QueryType::A);
        assert_nxdomain(&nx, "lab.example");
        let RecordData::Soa { minimum, mname, .. } = &nx.authority[0].data else {
            panic!("{nx:?}");
        };
        assert_eq!((*minimum, mname.as_str()), (30, "ns.dns.lab.example."));
        assert_eq!(
            r.query(&reverse_name(ip("10.96.0.20")), QueryType::Ptr)
                .records[0]
                .data,
            RecordData::Ptr("web.default.svc.lab.example.".into())
        );
        assert_eq!(
            SearchConfig::for_pod("default", "lab.example.").search[2],
            "lab.example"
        );
    }

    #[test]
    fn serial_is_stable_and_follows_the_content() {
        let c = lab(true);
        let a = resolver(&c).serial();
        assert_eq!(a, resolver(&lab(true)).serial());
        assert_ne!(a, resolver(&lab(false)).serial());
    }

    #[test]
    fn any_returns_everything_at_a_name() {
        let mut c = Cluster::simulated();
        let mut svc = service("default", "web", &["10.96.0.20", "fd00:96::20"]);
        svc.ports.push(port("http", Protocol::Tcp, 80, 8080));
        c.upsert_service(svc);
        let r = resolver(&c);
        let a = r.query("web.default.svc.cluster.local", QueryType::Any);
        let types: Vec<_> = a.records.iter().map(|r| r.data.rtype()).collect();
        assert_eq!(types, vec![QueryType::A, QueryType::Aaaa, QueryType::Srv]);
        assert_eq!(a.additional.len(), 2);
        let apex = r.query("cluster.local", QueryType::Any);
        let types: Vec<_> = apex.records.iter().map(|r| r.data.rtype()).collect();
        assert_eq!(types, vec![QueryType::Soa, QueryType::Ns]);
    }

    #[test]
    fn presentation_format_and_parsing() {
        let rec = Record {
            name: "_http._tcp.web.default.svc.cluster.local.".into(),
            ttl: 5,
            data: RecordData::Srv {
                priority: 0,
                weight: 100,
                port: 80,
                target: "web.default.svc.cluster.local.".into(),
            },
        };
        assert_eq!(
            rec.to_string(),
            "_http._tcp.web.default.svc.cluster.local.\t5\tIN\tSRV\t0 100 80 web.default.svc.cluster.local."
        );
        assert_eq!(QueryType::parse("aaaa"), Some(QueryType::Aaaa));
        assert_eq!(QueryType::parse("TXT"), None);
        assert_eq!(Rcode::NxDomain.to_string(), "NXDOMAIN");
        assert_eq!(parse_dashed("10-244-1-5"), Some(ip("10.244.1.5")));
        assert_eq!(parse_dashed("10-244-1"), None);
        assert_eq!(parse_dashed("web-0"), None);
    }
}
