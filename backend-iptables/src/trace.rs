//! A packet tracer over the rules svcnat renders, so tests can check behaviour without a
//! kernel (kube-proxy's `proxier_test.go` has one for the same purpose).
//!
//! [`RestoreModel`] models what `iptables-restore --noflush` does to the chains svcnat owns:
//! declared chains are created or flushed, `-A` appends, `-X` deletes, each `*table` block
//! commits atomically, and a jump to a missing chain or the deletion of a chain still in use
//! fails as it would in the kernel. [`Tracer`] interprets the rules of such a state (plus the
//! [`base_jumps`](crate::render::base_jumps) from the built-in chains) for one new
//! connection: `nat PREROUTING` or `nat OUTPUT`, then `filter INPUT`, `FORWARD` or `OUTPUT`
//! depending on the (translated) destination, then `nat POSTROUTING`.
//!
//! Only what svcnat renders is understood: `-s`/`-d` (optionally negated), `-p`, `--dport`,
//! and the `comment`, `tcp`/`udp`/`sctp`, `addrtype` (`LOCAL`), `statistic` (random),
//! `recent`, `mark` and `conntrack` matches; targets are chains, `RETURN`, `ACCEPT`,
//! `DROP`, `REJECT`, `DNAT`, `MARK` and `MASQUERADE`. Anything else is an error rather than
//! silently matching. Every traced packet is the first of its connection (`ctstate NEW`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use svcnat_core::model::Protocol;

use crate::render::{Ruleset, Table, base_jump_order};

/// Why a restore text could not be applied to a [`RestoreModel`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreError {
    /// The failing line, 1-based.
    pub line: usize,
    /// Its text.
    pub text: String,
    /// What was wrong.
    pub reason: String,
}

impl fmt::Display for RestoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.reason, self.text)
    }
}

impl std::error::Error for RestoreError {}

/// Targets that are not chains.
const BUILTIN_TARGETS: [&str; 9] = [
    "ACCEPT",
    "DROP",
    "RETURN",
    "REJECT",
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "MARK",
    "LOG",
];

/// The chains of the `nat` and `filter` tables as `iptables-restore --noflush` leaves them
/// (user-defined chains only; the built-in chains hold just the base jumps).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreModel {
    chains: BTreeMap<(Table, String), Vec<String>>,
}

impl RestoreModel {
    /// Empty tables.
    pub fn new() -> RestoreModel {
        RestoreModel::default()
    }

    /// The state after a full restore of `rules` into empty tables.
    pub fn of(rules: &Ruleset) -> Result<RestoreModel, RestoreError> {
        let mut m = RestoreModel::new();
        m.apply(&rules.full_restore())?;
        Ok(m)
    }

    /// Applies restore text with `--noflush` semantics; a failing table block changes
    /// nothing (blocks before it stay committed, as with `iptables-restore`).
    pub fn apply(&mut self, text: &str) -> Result<(), RestoreError> {
        let mut block: Option<(Table, BTreeMap<String, Vec<String>>)> = None;
        let mut last = 0;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            last = i + 1;
            let err = |reason: &str| RestoreError {
                line: i + 1,
                text: raw.to_string(),
                reason: reason.to_string(),
            };
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                if block.is_some() {
                    return Err(err("table started before COMMIT"));
                }
                let table = match name {
                    "nat" => Table::Nat,
                    "filter" => Table::Filter,
                    _ => return Err(err("unknown table")),
                };
                let chains = self
                    .chains
                    .iter()
                    .filter(|((t, _), _)| *t == table)
                    .map(|((_, c), r)| (c.clone(), r.clone()))
                    .collect();
                block = Some((table, chains));
                continue;
            }
            let Some((table, chains)) = block.as_mut() else {
                return Err(err("command outside a table"));
            };
            if line == "COMMIT" {
                for (c, rules) in chains.iter() {
                    for r in rules {
                        if let Some(t) = jump_target(r)
                            && !BUILTIN_TARGETS.contains(&t)
                            && !chains.contains_key(t)
                        {
                            return Err(err(&format!("{c}: jump to missing chain {t}")));
                        }
                    }
                }
                let table = *table;
                self.chains.retain(|(t, _), _| *t != table);
                if let Some((_, chains)) = block.take() {
                    for (c, r) in chains {
                        self.chains.insert((table, c), r);
                    }
                }
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or("");
                if name.is_empty() {
                    return Err(err("empty chain name"));
                }
                // Declaring a chain under --noflush creates it or flushes it.
                chains.insert(name.to_string(), Vec::new());
                continue;
            }
            if let Some(rest) = line.strip_prefix("-A ") {
                let (name, rule) = rest.split_once(' ').unwrap_or((rest, ""));
                let Some(rules) = chains.get_mut(name) else {
                    return Err(err("append to a missing chain"));
                };
                rules.push(rule.to_string());
                continue;
            }
            if let Some(name) = line.strip_prefix("-X ") {
                let name = name.trim();
                if !chains.contains_key(name) {
                    return Err(err("delete of a missing chain"));
                }
                if chains.get(name).is_some_and(|r| !r.is_empty()) {
                    return Err(err("delete of a chain that is not empty"));
                }
                if chains
                    .values()
                    .flatten()
                    .any(|r| jump_target(r) == Some(name))
                {
                    return Err(err("delete of a chain still referenced"));
                }
                chains.remove(name);
                continue;
            }
            return Err(err("unknown command"));
        }
        if block.is_some() {
            return Err(RestoreError {
                line: last,
                text: String::new(),
                reason: "missing COMMIT".into(),
            });
        }
        Ok(())
    }

    /// The chains, in (table, name) order, with their rules.
    pub fn chains(&self) -> impl Iterator<Item = (Table, &str, &[String])> {
        self.chains
            .iter()
            .map(|((t, c), r)| (*t, c.as_str(), r.as_slice()))
    }

    /// One chain's rules.
    pub fn chain(&self, table: Table, name: &str) -> Option<&[String]> {
        self.chains
            .get(&(table, name.to_string()))
            .map(Vec::as_slice)
    }
}

/// The `-j` target of a rule's argument text.
fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "--jump" {
            return words.next();
        }
    }
    None
}

/// Why a packet could not be traced.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceError {
    /// A rule uses an option, match or target the tracer does not know.
    Parse {
        /// The chain.
        chain: String,
        /// The rule's arguments.
        rule: String,
        /// What was not understood.
        reason: String,
    },
    /// A rule jumps to a chain that does not exist.
    MissingChain {
        /// The table.
        table: Table,
        /// The missing chain.
        chain: String,
    },
    /// A target that is not valid in its table (DNAT in `filter`, ...).
    WrongTable {
        /// The table.
        table: Table,
        /// The rule.
        rule: String,
    },
    /// The rules loop or nest beyond any sane depth.
    Loop,
    /// The rules restored into the model failed.
    Restore(RestoreError),
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceError::Parse {
                chain,
                rule,
                reason,
            } => write!(f, "{chain}: {reason}: {rule}"),
            TraceError::MissingChain { table, chain } => {
                write!(f, "jump to missing chain {} {chain}", table.as_str())
            }
            TraceError::WrongTable { table, rule } => {
                write!(f, "target not valid in table {}: {rule}", table.as_str())
            }
            TraceError::Loop => f.write_str("rules loop"),
            TraceError::Restore(e) => write!(f, "restore: {e}"),
        }
    }
}

impl std::error::Error for TraceError {}

/// A new connection's first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Source port.
    pub src_port: u16,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port.
    pub dst_port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
}

/// Where the packet enters the node's netfilter hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// Arriving on an interface (from outside or from a pod): `PREROUTING`, then `INPUT`
    /// or `FORWARD`.
    Prerouting,
    /// Sent by a local process: `OUTPUT`, then `POSTROUTING` (and `INPUT` when the
    /// destination is local).
    Output,
}

/// What happens to the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Accepted unchanged.
    Accept,
    /// Accepted after its destination was translated to this endpoint.
    Dnat(SocketAddr),
    /// Refused (ICMP port unreachable / TCP RST).
    Reject,
    /// Dropped silently.
    Drop,
}

/// The outcome of one trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// The verdict.
    pub verdict: Verdict,
    /// Whether `KUBE-POSTROUTING` masqueraded the packet.
    pub masquerade: bool,
    /// The translated destination, if any (also when the packet was then dropped).
    pub dnat: Option<SocketAddr>,
    /// The chains visited, as `table/CHAIN`, in order.
    pub path: Vec<String>,
}

impl Trace {
    /// Whether a chain (of either table) was visited.
    pub fn visited(&self, chain: &str) -> bool {
        self.path
            .iter()
            .any(|p| p.split_once('/').is_some_and(|(_, c)| c == chain))
    }
}

/// The `recent` match's lists: (list name, source address) -> last time seen, in seconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecentTable {
    entries: BTreeMap<(String, IpAddr), u64>,
}

impl RecentTable {
    /// Empty lists.
    pub fn new() -> RecentTable {
        RecentTable::default()
    }

    /// Number of entries over all lists.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no list has an entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// When `addr` was last added to list `name`.
    pub fn last_seen(&self, name: &str, addr: IpAddr) -> Option<u64> {
        self.entries.get(&(name.to_string(), addr)).copied()
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Match {
    Src(bool, IpNet),
    Dst(bool, IpNet),
    Proto(Protocol),
    DPort(u16),
    /// `--src-type LOCAL` (true) or `--dst-type LOCAL` (false), negated or not.
    AddrTypeLocal {
        source: bool,
        negate: bool,
    },
    Statistic(f64),
    RecentCheck {
        name: String,
        seconds: Option<u64>,
        reap: bool,
        negate: bool,
    },
    RecentSet {
        name: String,
    },
    Mark {
        negate: bool,
        value: u32,
        mask: u32,
    },
    /// Matches the NEW state (all a tracer sees) when the list holds it, unless negated.
    CtState {
        new: bool,
        negate: bool,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum Target {
    None,
    Chain(String),
    Return,
    Accept,
    Drop,
    Reject,
    Dnat(SocketAddr),
    Mark { value: u32, mask: u32 },
    Masquerade,
}

#[derive(Clone, Debug, PartialEq)]
struct Rule {
    text: String,
    matches: Vec<Match>,
    target: Target,
}

/// Splits rule arguments into words, honouring double quotes and backslash escapes.
fn words(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("bad address {s}"))
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("bad number {s}"))
}

/// `value[/mask]`; the mask defaults to all ones.
fn parse_mark(s: &str) -> Result<(u32, u32), String> {
    match s.split_once('/') {
        Some((v, m)) => Ok((parse_u32(v)?, parse_u32(m)?)),
        None => Ok((parse_u32(s)?, u32::MAX)),
    }
}

fn parse_proto(s: &str) -> Result<Protocol, String> {
    match s {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "sctp" => Ok(Protocol::Sctp),
        _ => Err(format!("unknown protocol {s}")),
    }
}

fn parse_rule(text: &str) -> Result<Rule, String> {
    let w = words(text)?;
    let mut i = 0;
    let mut matches = Vec::new();
    let mut target = Target::None;
    let mut negate = false;
    let next = |i: &mut usize| -> Result<&str, String> {
        *i += 1;
        w.get(*i)
            .map(String::as_str)
            .ok_or_else(|| "missing value".to_string())
    };
    // The module whose options follow (`-m NAME`, or the protocol after `-p`).
    let mut module = String::new();
    // Pending recent options, collected until the module ends.
    while i < w.len() {
        let word = w[i].as_str();
        match word {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-s" | "--source" => {
                let net = parse_net(next(&mut i)?)?;
                matches.push(Match::Src(negate, net));
            }
            "-d" | "--destination" => {
                let net = parse_net(next(&mut i)?)?;
                matches.push(Match::Dst(negate, net));
            }
            "-p" | "--protocol" => {
                if negate {
                    return Err("negated protocol".into());
                }
                let p = next(&mut i)?;
                matches.push(Match::Proto(parse_proto(p)?));
                module = p.to_string();
            }
            "-m" | "--match" => {
                if negate {
                    return Err("negated -m".into());
                }
                module = next(&mut i)?.to_string();
                if !matches!(
                    module.as_str(),
                    "comment"
                        | "tcp"
                        | "udp"
                        | "sctp"
                        | "addrtype"
                        | "statistic"
                        | "recent"
                        | "mark"
                        | "conntrack"
                ) {
                    return Err(format!("unknown match {module}"));
                }
                if module == "recent" {
                    i = parse_recent(&w, i + 1, &mut matches)?;
                    continue;
                }
                if module == "statistic" {
                    i = parse_statistic(&w, i + 1, &mut matches)?;
                    continue;
                }
            }
            "-j" | "--jump" => {
                if negate {
                    return Err("negated target".into());
                }
                let t = next(&mut i)?;
                let (tg, end) = parse_target(t, &w, i + 1)?;
                target = tg;
                if end != w.len() {
                    return Err(format!("unexpected {}", w[end]));
                }
                i = end;
                continue;
            }
            opt if opt.starts_with("--") => match (module.as_str(), opt) {
                ("comment", "--comment") => {
                    next(&mut i)?;
                }
                ("tcp" | "udp" | "sctp", "--dport" | "--destination-port") => {
                    if negate {
                        return Err("negated --dport".into());
                    }
                    let p = next(&mut i)?;
                    let port = p.parse().map_err(|_| format!("bad port {p}"))?;
                    matches.push(Match::DPort(port));
                }
                ("addrtype", "--dst-type" | "--src-type") => {
                    let t = next(&mut i)?;
                    if t != "LOCAL" {
                        return Err(format!("unsupported address type {t}"));
                    }
                    matches.push(Match::AddrTypeLocal {
                        source: opt == "--src-type",
                        negate,
                    });
                }
                ("mark", "--mark") => {
                    let (value, mask) = parse_mark(next(&mut i)?)?;
                    matches.push(Match::Mark {
                        negate,
                        value,
                        mask,
                    });
                }
                ("conntrack", "--ctstate") => {
                    let states = next(&mut i)?;
                    let mut new = false;
                    for s in states.split(',') {
                        match s {
                            "NEW" => new = true,
                            "INVALID" | "ESTABLISHED" | "RELATED" | "UNTRACKED" | "SNAT"
                            | "DNAT" => {}
                            _ => return Err(format!("unknown state {s}")),
                        }
                    }
                    matches.push(Match::CtState { new, negate });
                }
                _ => return Err(format!("unknown option {opt} for module {module:?}")),
            },
            other => return Err(format!("unknown option {other}")),
        }
        negate = false;
        i += 1;
    }
    if negate {
        return Err("dangling !".into());
    }
    Ok(Rule {
        text: text.to_string(),
        matches,
        target,
    })
}

/// Parses `-m statistic` options from `i`; returns the index after them.
fn parse_statistic(w: &[String], mut i: usize, out: &mut Vec<Match>) -> Result<usize, String> {
    let mut random = false;
    let mut p = None;
    while let Some(opt) = w.get(i).filter(|o| o.starts_with("--")) {
        let val = w.get(i + 1).ok_or("missing value")?;
        match opt.as_str() {
            "--mode" if val == "random" => random = true,
            "--probability" => {
                p = Some(
                    val.parse::<f64>()
                        .map_err(|_| format!("bad probability {val}"))?,
                )
            }
            _ => return Err(format!("unsupported statistic option {opt} {val}")),
        }
        i += 2;
    }
    match (random, p) {
        (true, Some(p)) => out.push(Match::Statistic(p)),
        _ => return Err("statistic needs --mode random --probability".into()),
    }
    Ok(i)
}

/// Parses `-m recent` options from `i`; returns the index after them.
fn parse_recent(w: &[String], mut i: usize, out: &mut Vec<Match>) -> Result<usize, String> {
    let mut negate = false;
    let mut check = false;
    let mut set = false;
    let mut seconds = None;
    let mut reap = false;
    let mut name = None;
    while let Some(opt) = w.get(i) {
        if opt == "!" && w.get(i + 1).is_some_and(|o| o == "--rcheck") {
            negate = true;
            i += 1;
            continue;
        }
        if !opt.starts_with("--") {
            break;
        }
        match opt.as_str() {
            "--rcheck" => check = true,
            "--set" => set = true,
            "--reap" => reap = true,
            "--rsource" => {}
            "--seconds" => {
                let v = w.get(i + 1).ok_or("missing value")?;
                seconds = Some(v.parse::<u64>().map_err(|_| format!("bad seconds {v}"))?);
                i += 1;
            }
            "--name" => {
                name = Some(w.get(i + 1).ok_or("missing value")?.clone());
                i += 1;
            }
            "--mask" => {
                let v = w.get(i + 1).ok_or("missing value")?;
                if v != "255.255.255.255" && v != "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" {
                    return Err(format!("unsupported recent mask {v}"));
                }
                i += 1;
            }
            _ => return Err(format!("unsupported recent option {opt}")),
        }
        i += 1;
    }
    let name = name.unwrap_or_else(|| "DEFAULT".into());
    match (check, set) {
        (true, false) => out.push(Match::RecentCheck {
            name,
            seconds,
            reap,
            negate,
        }),
        (false, true) if !negate && seconds.is_none() => out.push(Match::RecentSet { name }),
        _ => return Err("recent needs exactly one of --rcheck and --set".into()),
    }
    Ok(i)
}

/// Parses a target and its options starting at `i`; returns the index after them.
fn parse_target(t: &str, w: &[String], mut i: usize) -> Result<(Target, usize), String> {
    let opt = |name: &str, i: &mut usize| -> Result<Option<String>, String> {
        if w.get(*i).is_some_and(|o| o == name) {
            let v = w.get(*i + 1).ok_or("missing value")?.clone();
            *i += 2;
            Ok(Some(v))
        } else {
            Ok(None)
        }
    };
    let target = match t {
        "ACCEPT" => Target::Accept,
        "DROP" => Target::Drop,
        "RETURN" => Target::Return,
        "REJECT" => {
            opt("--reject-with", &mut i)?;
            Target::Reject
        }
        "DNAT" => {
            let v = opt("--to-destination", &mut i)?.ok_or("DNAT needs --to-destination")?;
            let addr = v
                .parse::<SocketAddr>()
                .map_err(|_| format!("unsupported DNAT destination {v}"))?;
            Target::Dnat(addr)
        }
        "MARK" => {
            let o = w.get(i).cloned().ok_or("MARK needs an option")?;
            let v = w.get(i + 1).ok_or("missing value")?;
            i += 2;
            let (value, mask) = parse_mark(v)?;
            // The kernel computes mark = (mark & ~mask) ^ value.
            match o.as_str() {
                "--set-xmark" => Target::Mark { value, mask },
                "--set-mark" => Target::Mark { value, mask },
                "--or-mark" => Target::Mark { value, mask: value },
                "--xor-mark" => Target::Mark { value, mask: 0 },
                "--and-mark" => Target::Mark {
                    value: 0,
                    mask: !value,
                },
                _ => return Err(format!("unsupported MARK option {o}")),
            }
        }
        "MASQUERADE" => {
            while w
                .get(i)
                .is_some_and(|o| o == "--random-fully" || o == "--random")
            {
                i += 1;
            }
            Target::Masquerade
        }
        "SNAT" | "LOG" | "REDIRECT" | "TPROXY" | "CT" | "NOTRACK" => {
            return Err(format!("unsupported target {t}"));
        }
        chain => Target::Chain(chain.to_string()),
    };
    Ok((target, i))
}

/// Decides `-m statistic` matches.
trait Chooser {
    fn statistic(&mut self, p: f64) -> bool;
}

struct RandomChooser<'r>(&'r mut dyn FnMut() -> f64);

impl Chooser for RandomChooser<'_> {
    fn statistic(&mut self, p: f64) -> bool {
        (self.0)() < p
    }
}

/// Follows a fixed prefix of decisions, then matches whenever it can; records all.
struct Script {
    prefix: Vec<bool>,
    taken: Vec<(f64, bool)>,
}

impl Chooser for Script {
    fn statistic(&mut self, p: f64) -> bool {
        let d = match self.prefix.get(self.taken.len()) {
            Some(d) => *d,
            None => p > 0.0,
        };
        self.taken.push((p, d));
        d
    }
}

/// How a chain walk ended.
enum Outcome {
    /// Fell off the built-in chain (policy ACCEPT) or nothing decided.
    Continue,
    Accept,
    Drop,
    Reject,
    Dnat(SocketAddr),
    Masquerade,
}

/// The packet's mutable state while traced.
struct State {
    src: IpAddr,
    dst: IpAddr,
    dst_port: u16,
    protocol: Protocol,
    mark: u32,
}

/// The most chain entries and rule evaluations a trace may take.
const MAX_STEPS: usize = 1_000_000;

/// Interprets svcnat's rules for single packets.
#[derive(Clone, Debug)]
pub struct Tracer {
    chains: BTreeMap<(Table, String), Vec<Rule>>,
    local: Vec<IpAddr>,
}

impl Tracer {
    /// A tracer over the full state of `rules` on a node with `local_addrs` (usually
    /// `plan.node().node_ips`); the rules go through [`RestoreModel`] first, so the
    /// restore text itself is what is interpreted.
    pub fn new(rules: &Ruleset, local_addrs: Vec<IpAddr>) -> Result<Tracer, TraceError> {
        let model = RestoreModel::of(rules).map_err(TraceError::Restore)?;
        Tracer::from_model(&model, local_addrs)
    }

    /// A tracer over restored state (for example after a partial update).
    pub fn from_model(
        model: &RestoreModel,
        local_addrs: Vec<IpAddr>,
    ) -> Result<Tracer, TraceError> {
        let mut chains = BTreeMap::new();
        let builtins = [
            (Table::Nat, "PREROUTING"),
            (Table::Nat, "OUTPUT"),
            (Table::Nat, "POSTROUTING"),
            (Table::Filter, "INPUT"),
            (Table::Filter, "FORWARD"),
            (Table::Filter, "OUTPUT"),
        ];
        for (table, chain) in builtins {
            let mut rules = Vec::new();
            for words in base_jump_order(table, chain) {
                // Re-quote the argv words so that the one parser reads both.
                let text = words
                    .iter()
                    .map(|w| {
                        if w.contains(' ') {
                            format!("\"{w}\"")
                        } else {
                            w.clone()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                rules.push(parse_rule(&text).map_err(|reason| TraceError::Parse {
                    chain: chain.to_string(),
                    rule: text.clone(),
                    reason,
                })?);
            }
            chains.insert((table, chain.to_string()), rules);
        }
        for (table, chain, rules) in model.chains() {
            let parsed = rules
                .iter()
                .map(|r| {
                    parse_rule(r).map_err(|reason| TraceError::Parse {
                        chain: chain.to_string(),
                        rule: r.clone(),
                        reason,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            chains.insert((table, chain.to_string()), parsed);
        }
        Ok(Tracer {
            chains,
            local: local_addrs,
        })
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local.contains(&ip)
    }

    /// Traces the first packet of a new connection. `random` gives the values in `[0, 1)`
    /// that `-m statistic --mode random` compares with its probability; `recent` holds
    /// the `recent` lists (ClientIP affinity) and is updated; `now_secs` is the time.
    pub fn trace(
        &self,
        pkt: &Packet,
        hook: Hook,
        random: &mut dyn FnMut() -> f64,
        recent: &mut RecentTable,
        now_secs: u64,
    ) -> Result<Trace, TraceError> {
        self.run(pkt, hook, &mut RandomChooser(random), recent, now_secs)
    }

    fn run(
        &self,
        pkt: &Packet,
        hook: Hook,
        chooser: &mut dyn Chooser,
        recent: &mut RecentTable,
        now: u64,
    ) -> Result<Trace, TraceError> {
        let mut st = State {
            src: pkt.src,
            dst: pkt.dst,
            dst_port: pkt.dst_port,
            protocol: pkt.protocol,
            mark: 0,
        };
        let mut path = Vec::new();
        let mut dnat = None;
        let mut masquerade = false;
        let mut walk = |table: Table,
                        chain: &str,
                        st: &mut State,
                        path: &mut Vec<String>|
         -> Result<Outcome, TraceError> {
            self.walk(table, chain, st, chooser, recent, now, path)
        };
        let finish = |verdict: Verdict, dnat, masquerade, path| Trace {
            verdict,
            masquerade,
            dnat,
            path,
        };
        let nat_chain = match hook {
            Hook::Prerouting => "PREROUTING",
            Hook::Output => "OUTPUT",
        };
        match walk(Table::Nat, nat_chain, &mut st, &mut path)? {
            Outcome::Dnat(a) => {
                st.dst = a.ip();
                st.dst_port = a.port();
                dnat = Some(a);
            }
            Outcome::Drop => return Ok(finish(Verdict::Drop, dnat, false, path)),
            Outcome::Reject => return Ok(finish(Verdict::Reject, dnat, false, path)),
            _ => {}
        }
        let local = self.is_local(st.dst);
        let filter_chains: &[&str] = match (hook, local) {
            (Hook::Prerouting, true) => &["INPUT"],
            (Hook::Prerouting, false) => &["FORWARD"],
            (Hook::Output, true) => &["OUTPUT", "INPUT"],
            (Hook::Output, false) => &["OUTPUT"],
        };
        for (n, chain) in filter_chains.iter().enumerate() {
            // A locally sent packet to a local address passes POSTROUTING on its way out
            // through the loopback device, before INPUT.
            if n == 1 {
                masquerade |= matches!(
                    walk(Table::Nat, "POSTROUTING", &mut st, &mut path)?,
                    Outcome::Masquerade
                );
            }
            match walk(Table::Filter, chain, &mut st, &mut path)? {
                Outcome::Drop => return Ok(finish(Verdict::Drop, dnat, false, path)),
                Outcome::Reject => return Ok(finish(Verdict::Reject, dnat, false, path)),
                _ => {}
            }
        }
        let through_postrouting = match (hook, local) {
            (Hook::Prerouting, true) => false,
            (Hook::Output, true) => false, // walked above, before INPUT
            _ => true,
        };
        if through_postrouting {
            masquerade |= matches!(
                walk(Table::Nat, "POSTROUTING", &mut st, &mut path)?,
                Outcome::Masquerade
            );
        }
        let verdict = dnat.map_or(Verdict::Accept, Verdict::Dnat);
        Ok(finish(verdict, dnat, masquerade, path))
    }

    #[allow(clippy::too_many_arguments)]
    fn walk(
        &self,
        table: Table,
        start: &str,
        st: &mut State,
        chooser: &mut dyn Chooser,
        recent: &mut RecentTable,
        now: u64,
        path: &mut Vec<String>,
    ) -> Result<Outcome, TraceError> {
        let mut stack: Vec<(&str, &[Rule], usize)> = Vec::new();
        let rules = self.chain(table, start)?;
        path.push(format!("{}/{start}", table.as_str()));
        stack.push((start, rules, 0));
        let mut steps = 0;
        loop {
            steps += 1;
            if steps > MAX_STEPS || stack.len() > 1000 {
                return Err(TraceError::Loop);
            }
            let Some((_, rules, idx)) = stack.last_mut() else {
                break;
            };
            let Some(rule) = rules.get(*idx) else {
                stack.pop();
                continue;
            };
            *idx += 1;
            if !self.matches(rule, st, chooser, recent, now) {
                continue;
            }
            let wrong = || TraceError::WrongTable {
                table,
                rule: rule.text.clone(),
            };
            match &rule.target {
                Target::None => {}
                Target::Chain(c) => {
                    let rules = self.chain(table, c)?;
                    path.push(format!("{}/{c}", table.as_str()));
                    stack.push((c.as_str(), rules, 0));
                }
                Target::Return => {
                    stack.pop();
                }
                Target::Accept => return Ok(Outcome::Accept),
                Target::Drop => return Ok(Outcome::Drop),
                Target::Reject => {
                    if table != Table::Filter {
                        return Err(wrong());
                    }
                    return Ok(Outcome::Reject);
                }
                Target::Dnat(a) => {
                    if table != Table::Nat {
                        return Err(wrong());
                    }
                    return Ok(Outcome::Dnat(*a));
                }
                Target::Mark { value, mask } => st.mark = (st.mark & !mask) ^ value,
                Target::Masquerade => {
                    if table != Table::Nat || start != "POSTROUTING" {
                        return Err(wrong());
                    }
                    return Ok(Outcome::Masquerade);
                }
            }
        }
        Ok(Outcome::Continue)
    }

    fn chain(&self, table: Table, chain: &str) -> Result<&[Rule], TraceError> {
        self.chains
            .get(&(table, chain.to_string()))
            .map(Vec::as_slice)
            .ok_or_else(|| TraceError::MissingChain {
                table,
                chain: chain.to_string(),
            })
    }

    /// Evaluates a rule's matches in order, stopping at the first that fails (as the
    /// kernel does, so `statistic` draws and `recent --set` happen only when reached).
    fn matches(
        &self,
        rule: &Rule,
        st: &State,
        chooser: &mut dyn Chooser,
        recent: &mut RecentTable,
        now: u64,
    ) -> bool {
        for m in &rule.matches {
            let ok = match m {
                Match::Src(neg, net) => net.contains(&st.src) != *neg,
                Match::Dst(neg, net) => net.contains(&st.dst) != *neg,
                Match::Proto(p) => st.protocol == *p,
                Match::DPort(p) => st.dst_port == *p,
                Match::AddrTypeLocal { source, negate } => {
                    let ip = if *source { st.src } else { st.dst };
                    self.is_local(ip) != *negate
                }
                Match::Statistic(p) => chooser.statistic(*p),
                Match::RecentCheck {
                    name,
                    seconds,
                    reap,
                    negate,
                } => {
                    let key = (name.clone(), st.src);
                    // xt_recent: a hit counts when it is at most `seconds` old.
                    let fresh = recent
                        .entries
                        .get(&key)
                        .is_some_and(|t| seconds.is_none_or(|s| now.saturating_sub(*t) <= s));
                    if *reap && let Some(s) = seconds {
                        recent
                            .entries
                            .retain(|(n, _), t| n != name || now.saturating_sub(*t) <= *s);
                    }
                    fresh != *negate
                }
                Match::RecentSet { name } => {
                    recent.entries.insert((name.clone(), st.src), now);
                    true
                }
                Match::Mark {
                    negate,
                    value,
                    mask,
                } => (st.mark & mask == *value) != *negate,
                Match::CtState { new, negate } => *new != *negate,
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

/// The exact probability of each verdict for a packet, over every outcome of the
/// `statistic` matches: each branch point is followed both ways and weighted by its
/// probability, so a cascade over N endpoints takes N traces and the shares are exact up to
/// the rendered decimals (`0.3333333333`). `recent` is the affinity state each branch
/// starts from (it is not changed).
pub fn distribution(
    tracer: &Tracer,
    pkt: &Packet,
    hook: Hook,
    recent: &RecentTable,
    now_secs: u64,
) -> Result<BTreeMap<Verdict, f64>, TraceError> {
    let mut out: BTreeMap<Verdict, f64> = BTreeMap::new();
    let mut pending: Vec<Vec<bool>> = vec![Vec::new()];
    let mut runs = 0usize;
    while let Some(prefix) = pending.pop() {
        runs += 1;
        if runs > 100_000 {
            return Err(TraceError::Loop);
        }
        let fixed = prefix.len();
        let mut script = Script {
            prefix,
            taken: Vec::new(),
        };
        let mut rt = recent.clone();
        let t = tracer.run(pkt, hook, &mut script, &mut rt, now_secs)?;
        let mut weight = 1.0;
        for (i, (p, d)) in script.taken.iter().enumerate() {
            weight *= if *d { *p } else { 1.0 - *p };
            if i >= fixed && *p > 0.0 && *p < 1.0 {
                let mut alt: Vec<bool> = script.taken[..i].iter().map(|(_, d)| *d).collect();
                alt.push(!*d);
                pending.push(alt);
            }
        }
        *out.entry(t.verdict).or_insert(0.0) += weight;
    }
    Ok(out)
}
