//! The nftables driver: applies [`Ruleset`] transactions with `nft -f`, checks the kernel
//! over netlink ([`super::kernel`]), and implements [`Dataplane`].
//!
//! Every transaction's text is sent as one nf_tables netlink batch ([`super::batch`]:
//! `nft` would first fetch the whole table's chains and sets, 70-100 ms at 10,000 Services,
//! then parse and evaluate the text), or through `nft -f` when a command does not translate
//! or the batch is too large (the text stays the debuggable form either way).
//!
//! - A **cold start** (svcnat's table is not in the kernel) writes the table in transactions
//!   of at most [`NftablesConfig::cold_start_block`] Service ports (and about 20,000 rules:
//!   9 MB of netlink), each consistent: the first with the table, base chains, maps and
//!   fixed rules, the others Service ports only.
//! - A **full sync** with the table present is one transaction: `flush table`, the maps
//!   and sets flushed (affinity sets kept), everything written again, affinity sets the
//!   plan no longer has deleted; chains the plan no longer has are emptied in it and
//!   deleted by a later transaction (see [`Update::gone_chains`]). Only chain and set
//!   *names* are read from the kernel for it, never rules or elements. It goes as one batch
//!   up to 256 MiB (the datagram `nft -f` would send for it is as large; 10,000 Services x
//!   5 endpoints take 34 MB, 5,000 x 50 137 MB), so it stays atomic; a larger one goes as
//!   [`Ruleset::full_transactions`], the fixed part first and then cold-start blocks, each
//!   consistent, the Service ports of later blocks missing until their block is written.
//! - A **partial sync** writes what [`Ruleset::update`] returns: the changed Service ports'
//!   chains and the map elements whose verdict changed.
//!
//! Every transaction is atomic: when the kernel refuses one, it keeps the previous state,
//! the error names the failing line of the input (`nft`) or the refused command (netlink
//! batch), and the next sync is a full one.
//! The driver only ever writes inside `ip svcnat` / `ip6 svcnat`; other tables, kube-proxy's
//! included, are never touched. Before a partial sync (at most every
//! [`NftablesConfig::drift_interval`]) and in [`Dataplane::drifted`] it checks over netlink
//! that the table still exists with the same handle and that `services` still has its
//! dispatch rules; if not (deleted, re-created, flushed) it rebuilds.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use svcnat_core::conntrack::{StaleFlow, stale_flows};
use svcnat_core::model::IpFamily;
use svcnat_core::plan::{Dataplane, Plan, PlanDiff, SyncReport};

use super::batch;
use super::kernel::{BatchSocket, Kernel, Refused};
use super::render::{Listing, Ruleset, SERVICES_CHAIN, TABLE, Update};
use crate::conntrack::{Conntrack, in_netns};

/// Settings of the driver.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NftablesConfig {
    /// Program this named network namespace (`/run/netns/NAME`); `None` is the current one.
    pub netns: Option<String>,
    /// Address family: the table `ip svcnat` or `ip6 svcnat`.
    pub family: IpFamily,
    /// How often a partial sync first checks that the table is still as svcnat left it
    /// (a few netlink messages, whatever the size); zero checks before every sync.
    pub drift_interval: Duration,
    /// Service ports per transaction of a cold start (fewer when they hold many rules:
    /// about 20,000 rules per transaction at most).
    pub cold_start_block: usize,
    /// The `nft` program.
    pub nft: String,
    /// Send transactions (cold starts, full and partial syncs, the deletion of emptied
    /// chains) to the kernel as nf_tables netlink batches ([`super::batch`]) instead of
    /// through `nft -f`, when every command translates.
    pub netlink: bool,
}

impl Default for NftablesConfig {
    fn default() -> Self {
        NftablesConfig {
            netns: None,
            family: IpFamily::V4,
            drift_interval: Duration::from_secs(1),
            cold_start_block: 2_000,
            nft: "nft".into(),
            netlink: true,
        }
    }
}

impl NftablesConfig {
    /// The settings for one family in a network namespace (`None`: the current one).
    pub fn new(netns: Option<String>, family: IpFamily) -> NftablesConfig {
        NftablesConfig {
            netns,
            family,
            ..NftablesConfig::default()
        }
    }
}

/// What went wrong while programming nftables.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// `nft` could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// `nft` refused a transaction; the kernel kept the previous state.
    #[error("{program} -f refused the transaction{}: {stderr}", line_text(*.line, .text.as_deref()))]
    Transaction {
        /// The program.
        program: String,
        /// The failing line of the input, 1-based, when `nft` said.
        line: Option<usize>,
        /// The text of that line.
        text: Option<String>,
        /// What `nft` printed.
        stderr: String,
    },
    /// The kernel refused a netlink batch; it kept the previous state.
    #[error("{table}{}: {source}", in_ns(.netns))]
    Refused {
        /// The table (`ip svcnat`).
        table: String,
        /// The network namespace.
        netns: Option<String>,
        /// The refused command and the kernel's errno.
        source: Refused,
    },
    /// Reading the table's state over netlink failed.
    #[error("reading table {table} over netlink{}: {source}", in_ns(.netns))]
    Kernel {
        /// The table (`ip svcnat`).
        table: String,
        /// The network namespace.
        netns: Option<String>,
        /// The OS error.
        source: std::io::Error,
    },
}

fn in_ns(netns: &Option<String>) -> String {
    match netns {
        Some(n) => format!(" in netns {n}"),
        None => String::new(),
    }
}

fn line_text(line: Option<usize>, text: Option<&str>) -> String {
    match (line, text) {
        (Some(n), Some(t)) => format!(" at input line {n} ({})", t.trim()),
        (Some(n), None) => format!(" at input line {n}"),
        _ => String::new(),
    }
}

/// Reads the failing input line out of `nft`'s error output: `/dev/stdin:12:3-9: Error:
/// ...` (file, line, columns). `None` when no such location is there.
pub fn failing_line(stderr: &str) -> Option<usize> {
    stderr.lines().find_map(|l| {
        let (loc, _) = l.split_once(": Error")?;
        let mut parts = loc.rsplitn(3, ':');
        let _cols = parts.next()?;
        let line = parts.next()?;
        let _file = parts.next()?;
        line.parse().ok()
    })
}

/// The nftables backend: a [`Dataplane`] over `nft -f` transactions.
#[derive(Debug)]
pub struct Nftables {
    config: NftablesConfig,
    kernel: Kernel,
    /// The ruleset last applied successfully; `None` forces a full sync.
    applied: Option<Ruleset>,
    /// The table's handle after the last successful sync.
    handle: Option<u64>,
    drift_checked: Option<Instant>,
    /// Chains emptied and unreferenced, with when; deleted by a later transaction.
    gone_chains: BTreeMap<String, Instant>,
    conntrack: Conntrack,
    /// Stale flows of diffs whose rules are not applied yet.
    stale: BTreeSet<StaleFlow>,
    /// Transactions sent as netlink batches so far.
    batches: u64,
    /// The socket batches go through, opened at the first one.
    batch_socket: Option<BatchSocket>,
}

/// Most commands a netlink batch holds; larger transactions go through `nft -f`.
const MAX_BATCH_COMMANDS: usize = 200_000;
/// Largest netlink batch (one datagram: the send buffer is raised to fit it).
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Largest full sync sent as one batch: it replaces the whole table atomically, and `nft -f`
/// would send a datagram as large for the same transaction (the kernel takes the batch
/// into one buffer either way; `nft`'s own memory for it is several times larger). Larger
/// ones go in blocks of [`MAX_BATCH_BYTES`], which is slower too: every block makes the
/// kernel validate the whole table again.
const MAX_FULL_BATCH_BYTES: usize = 256 * 1024 * 1024;
/// Most commands of a full sync sent as one batch.
const MAX_FULL_BATCH_COMMANDS: usize = 4_000_000;

/// What became of a transaction offered as a batch.
enum Sent {
    /// The kernel took it.
    Applied,
    /// A command does not translate, or the batch does not fit one datagram: nothing sent.
    NotBatched,
    /// The batch is larger than allowed: nothing sent.
    TooLarge,
}

/// Rules per cold-start block at most (about 9 MB of netlink): Service ports with many
/// endpoints come in smaller blocks, each still one batch.
const COLD_START_RULES: usize = 20_000;

/// How long an emptied chain waits before its deletion: kernels before 6.2 notice only a
/// while after a map element's deletion that the chain it pointed at is unreferenced.
const GONE_CHAIN_DELAY: Duration = Duration::from_secs(1);

impl Nftables {
    /// A driver for one family; nothing is written until the first sync.
    pub fn new(config: NftablesConfig) -> Nftables {
        Nftables {
            kernel: Kernel::new(config.netns.clone()),
            conntrack: Conntrack::new(config.netns.clone()),
            config,
            applied: None,
            handle: None,
            drift_checked: None,
            gone_chains: BTreeMap::new(),
            stale: BTreeSet::new(),
            batches: 0,
            batch_socket: None,
        }
    }

    /// The table this driver owns: `ip svcnat` or `ip6 svcnat`.
    pub fn table(&self) -> String {
        match self.config.family {
            IpFamily::V4 => format!("ip {TABLE}"),
            IpFamily::V6 => format!("ip6 {TABLE}"),
        }
    }

    fn kernel_err(&self, source: std::io::Error) -> SyncError {
        SyncError::Kernel {
            table: self.table(),
            netns: self.config.netns.clone(),
            source,
        }
    }

    /// How many transactions went to the kernel as netlink batches rather than `nft -f`.
    pub fn netlink_batches(&self) -> u64 {
        self.batches
    }

    /// Whether svcnat's table of this family is in the kernel (one netlink request).
    pub fn present(&self) -> Result<bool, SyncError> {
        let state = self
            .kernel
            .table_state(self.config.family, TABLE, SERVICES_CHAIN)
            .map_err(|e| self.kernel_err(e))?;
        Ok(state.handle.is_some())
    }

    /// Runs `nft -f -` with `text` as one transaction.
    pub fn apply(&self, text: &str) -> Result<(), SyncError> {
        let program = self.config.nft.clone();
        let out = in_netns(self.config.netns.as_deref(), || {
            // A child started from this thread is in the thread's network namespace.
            let mut child = Command::new(&program)
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                // A write error means nft exited early; its status says why.
                let _ = stdin.write_all(text.as_bytes());
            }
            child.wait_with_output()
        })
        .map_err(|source| SyncError::Spawn {
            program: program.clone(),
            source,
        })?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let line = failing_line(&stderr);
        Err(SyncError::Transaction {
            program,
            text: line.and_then(|n| text.lines().nth(n.saturating_sub(1)).map(str::to_string)),
            line,
            stderr,
        })
    }

    /// Applies a transaction as one netlink batch when every command translates (see
    /// [`super::batch::translate`]); through `nft -f` otherwise, or when the batch is too
    /// large for one datagram (16 MiB).
    pub fn apply_small(&mut self, text: &str) -> Result<(), SyncError> {
        match self.try_batch(text, MAX_BATCH_COMMANDS, MAX_BATCH_BYTES)? {
            Sent::Applied => Ok(()),
            Sent::NotBatched | Sent::TooLarge => self.apply(text),
        }
    }

    /// Sends a transaction as one netlink batch if it translates and holds at most
    /// `max_commands` commands and `max_bytes` bytes.
    fn try_batch(
        &mut self,
        text: &str,
        max_commands: usize,
        max_bytes: usize,
    ) -> Result<Sent, SyncError> {
        if !self.config.netlink {
            return Ok(Sent::NotBatched);
        }
        let Ok(batch) = batch::translate(text) else {
            return Ok(Sent::NotBatched);
        };
        if batch.commands().len() > max_commands || batch.encoded_len() > max_bytes {
            return Ok(Sent::TooLarge);
        }
        let sock = match self.batch_socket.take() {
            Some(s) => s,
            None => self.kernel.batch_socket().map_err(|e| self.kernel_err(e))?,
        };
        let mut sock = sock;
        let result = sock.apply(&batch);
        // A socket whose exchange failed is dropped; the next batch opens another.
        if result.is_ok() {
            self.batch_socket = Some(sock);
        }
        match result {
            Ok(Ok(())) => {
                self.batches += 1;
                Ok(Sent::Applied)
            }
            Ok(Err(source)) => Err(SyncError::Refused {
                table: self.table(),
                netns: self.config.netns.clone(),
                source,
            }),
            // The send buffer could not be raised for a batch this large: `nft` then.
            Err(e) if e.raw_os_error() == Some(nix::libc::EMSGSIZE) => Ok(Sent::NotBatched),
            Err(e) => Err(self.kernel_err(e)),
        }
    }

    /// Service ports per block of a cold start (or of a full sync too large for one batch):
    /// [`NftablesConfig::cold_start_block`] at most, and about [`COLD_START_RULES`] rules,
    /// so that each block fits a batch.
    fn block_units(&self, rules: &Ruleset) -> usize {
        let per_unit = rules
            .rule_count()
            .div_ceil(rules.unit_count().max(1))
            .max(1);
        self.config
            .cold_start_block
            .min((COLD_START_RULES / per_unit).max(1))
    }

    /// Whether the table is still as the last sync left it: present, same handle, and the
    /// `services` chain holding its two dispatch rules.
    fn intact(&self) -> Result<bool, SyncError> {
        let state = self
            .kernel
            .table_state(self.config.family, TABLE, SERVICES_CHAIN)
            .map_err(|e| self.kernel_err(e))?;
        Ok(state.handle.is_some() && state.handle == self.handle && state.watched_rules >= 2)
    }

    fn record_handle(&mut self) -> Result<(), SyncError> {
        let state = self
            .kernel
            .table_state(self.config.family, TABLE, SERVICES_CHAIN)
            .map_err(|e| self.kernel_err(e))?;
        self.handle = state.handle;
        self.drift_checked = Some(Instant::now());
        Ok(())
    }

    /// Deletes chains emptied by earlier transactions once they waited long enough, in a
    /// transaction of their own; a refusal only postpones them.
    fn delete_gone_chains(&mut self) {
        if !self
            .gone_chains
            .values()
            .any(|t| t.elapsed() >= GONE_CHAIN_DELAY)
        {
            return;
        }
        // A chain the plan has again is not gone any more.
        let wanted: BTreeSet<&str> = self
            .applied
            .as_ref()
            .map(|r| r.chains().collect())
            .unwrap_or_default();
        self.gone_chains.retain(|c, _| !wanted.contains(c.as_str()));
        let due: Vec<String> = self
            .gone_chains
            .iter()
            .filter(|(_, t)| t.elapsed() >= GONE_CHAIN_DELAY)
            .map(|(c, _)| c.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let t = self.table();
        let text: String = due
            .iter()
            .map(|c| format!("delete chain {t} {c}\n"))
            .collect();
        if self.apply_small(&text).is_ok() {
            for c in due {
                self.gone_chains.remove(&c);
            }
        }
    }

    fn note_gone(&mut self, chains: Vec<String>) {
        let now = Instant::now();
        for c in chains {
            self.gone_chains.entry(c).or_insert(now);
        }
    }

    fn full_sync(&mut self, plan: &Plan) -> Result<SyncReport, SyncError> {
        self.applied = None;
        let rules = Ruleset::new_for(plan, self.config.family);
        let state = self
            .kernel
            .table_state(self.config.family, TABLE, SERVICES_CHAIN)
            .map_err(|e| self.kernel_err(e))?;
        let (rules_written, elements) = if state.handle.is_none() {
            // Cold start: bounded transactions, each consistent.
            self.gone_chains.clear();
            let mut written = (0, 0);
            for tx in rules.cold_start_transactions(self.block_units(&rules)) {
                self.apply_small(&tx.text)?;
                written.0 += tx.rules;
                written.1 += tx.elements;
            }
            written
        } else {
            let listing: Listing = self
                .kernel
                .listing(self.config.family, TABLE)
                .map_err(|e| self.kernel_err(e))?;
            let tx: Update = rules.full_transaction(&listing);
            match self.try_batch(&tx.text, MAX_FULL_BATCH_COMMANDS, MAX_FULL_BATCH_BYTES)? {
                Sent::Applied => {}
                Sent::NotBatched => self.apply(&tx.text)?,
                Sent::TooLarge => {
                    for part in rules.full_transactions(&listing, self.block_units(&rules)) {
                        self.apply_small(&part.text)?;
                    }
                }
            }
            let written = (tx.rules, tx.elements);
            self.note_gone(tx.gone_chains);
            written
        };
        self.record_handle()?;
        let report = SyncReport::of_plan(plan, true, rules_written + elements);
        self.applied = Some(rules);
        self.delete_gone_chains();
        Ok(report)
    }

    fn partial_sync(&mut self, plan: &Plan, diff: &PlanDiff) -> Result<SyncReport, SyncError> {
        let due = self
            .drift_checked
            .is_none_or(|t| t.elapsed() >= self.config.drift_interval);
        if due {
            self.drift_checked = Some(Instant::now());
            if !self.intact()? {
                return self.full_sync(plan);
            }
        }
        let Some(mut rules) = self.applied.take() else {
            return self.full_sync(plan);
        };
        let Some(update) = rules.update(plan, diff) else {
            self.applied = Some(rules);
            self.delete_gone_chains();
            return Ok(SyncReport::of_plan(plan, false, 0));
        };
        // On failure `applied` stays None: the kernel kept the old state and the next sync
        // is a full one.
        self.apply_small(&update.text)?;
        self.note_gone(update.gone_chains);
        self.applied = Some(rules);
        self.delete_gone_chains();
        Ok(SyncReport::of_plan(
            plan,
            false,
            update.rules + update.elements,
        ))
    }
}

impl Dataplane for Nftables {
    type Error = SyncError;

    fn sync(&mut self, plan: &Plan, diff: &PlanDiff) -> Result<SyncReport, SyncError> {
        let family = self.config.family;
        self.stale.extend(
            stale_flows(diff, plan)
                .into_iter()
                .filter(|f| f.family() == family),
        );
        let report = self.partial_sync(plan, diff)?;
        Ok(self.conntrack.clean_into(&mut self.stale, report))
    }

    fn resync(&mut self, plan: &Plan) -> Result<SyncReport, SyncError> {
        let report = self.full_sync(plan)?;
        Ok(self.conntrack.clean_into(&mut self.stale, report))
    }

    /// `true` when the check is due and the table is gone, re-created by someone else, or
    /// flushed.
    fn drifted(&mut self) -> Result<bool, SyncError> {
        let due = self
            .drift_checked
            .is_none_or(|t| t.elapsed() >= self.config.drift_interval);
        if !due || self.applied.is_none() {
            return Ok(false);
        }
        self.drift_checked = Some(Instant::now());
        Ok(!self.intact()?)
    }

    /// Deletes svcnat's table of this family (if it exists), and nothing else.
    fn cleanup(&mut self) -> Result<(), SyncError> {
        self.applied = None;
        self.handle = None;
        self.gone_chains.clear();
        let t = self.table();
        // `add` first, so that the deletion never fails on a missing table.
        self.apply(&format!("add table {t}\ndelete table {t}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_failing_line() {
        assert_eq!(
            failing_line(
                "/dev/stdin:3:22-28: Error: No such file or directory\nadd rule ip t c jump x\n                     ^^^^^^^"
            ),
            Some(3)
        );
        assert_eq!(
            failing_line(
                "/dev/stdin:4:2-8: Error: Could not process rule: No such file or directory"
            ),
            Some(4)
        );
        assert_eq!(failing_line("Error: No such file or directory"), None);
        assert_eq!(failing_line("a:b:c: Error: x"), None);
        assert_eq!(failing_line(""), None);
    }
}
