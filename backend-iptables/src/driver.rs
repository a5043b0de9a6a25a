//! The driver: applies rendered rules with `iptables-restore --noflush`, reconciles with
//! `iptables-save`, and implements [`Dataplane`].
//!
//! Partial syncs write only the chains a [`PlanDiff`] changed; a full resync rewrites every
//! chain svcnat owns and deletes owned chains the plan no longer has. The driver only ever
//! declares, flushes or deletes chains that [`crate::render`] names (the `KUBE-` chains of
//! kube-proxy's layout), and touches built-in chains only to insert its jump rules, so
//! rules that other software installed stay as they are.
//!
//! Each `*table ... COMMIT` block that `iptables-restore` reads is applied atomically: when
//! a restore fails, the table keeps its previous rules, the error names the failing input
//! line, and the next sync is a full resync.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use svcnat_core::model::IpFamily;
use svcnat_core::plan::{Dataplane, NodeContext, Plan, PlanDiff, SyncReport};

use svcnat_core::conntrack::{StaleFlow, stale_flows};

use crate::conntrack::Conntrack;
use crate::render::{CANARY_CHAIN, Ruleset, Table, base_jumps};

/// Which iptables implementation programs the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// `iptables-legacy`: the x_tables kernel interface; a commit replaces a whole table.
    Legacy,
    /// `iptables-nft`: the same rules stored as nftables; commits are incremental.
    Nft,
}

impl Flavour {
    fn suffix(self) -> &'static str {
        match self {
            Flavour::Legacy => "legacy",
            Flavour::Nft => "nft",
        }
    }
}

/// How commands reach the network namespace that should be programmed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runner {
    /// Run inside this named network namespace (`ip netns exec NAME ...`); `None` runs
    /// commands in the current namespace.
    pub netns: Option<String>,
}

impl Runner {
    /// Commands run in the current namespace.
    pub fn local() -> Runner {
        Runner { netns: None }
    }

    /// Commands run in a named network namespace.
    pub fn netns(name: impl Into<String>) -> Runner {
        Runner {
            netns: Some(name.into()),
        }
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }
}

/// Settings of the driver.
#[derive(Clone, Debug)]
pub struct IptablesConfig {
    /// Where to run.
    pub runner: Runner,
    /// The implementation; `None` detects it from `iptables --version`.
    pub flavour: Option<Flavour>,
    /// Address family: IPv4 (`iptables`) or IPv6 (`ip6tables`).
    pub family: IpFamily,
    /// How often a partial sync first checks that the canary chain still exists (someone
    /// flushing the tables removes it, and then the sync is a full resync). Checking costs
    /// two iptables invocations, which with the legacy flavour read whole tables, so by
    /// default it happens at most every 10 s; zero checks before every sync.
    pub canary_interval: Duration,
    /// How many chains one sync may keep (flushed) because a rule svcnat does not own
    /// still jumps to them; past it the sync fails, naming the line. Zero fails on the
    /// first such reference.
    pub max_kept_chains: usize,
}

impl Default for IptablesConfig {
    fn default() -> Self {
        IptablesConfig {
            runner: Runner::local(),
            flavour: None,
            family: IpFamily::V4,
            canary_interval: Duration::from_secs(10),
            max_kept_chains: DEFAULT_MAX_KEPT_CHAINS,
        }
    }
}

/// What went wrong while programming iptables.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// A program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// `iptables-restore` rejected its input; the previous rules of that table stay.
    #[error("{program} failed{}: {stderr}", line_text(*.line, .rule.as_deref()))]
    Restore {
        /// The program.
        program: String,
        /// The failing line of the input, 1-based, when the program said.
        line: Option<usize>,
        /// The text of that line.
        rule: Option<String>,
        /// What the program printed.
        stderr: String,
    },
    /// Another iptables command failed.
    #[error("{command} failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// The flavour could not be told from `iptables --version`.
    #[error("cannot tell the iptables flavour from {0:?}")]
    Detect(String),
}

fn line_text(line: Option<usize>, rule: Option<&str>) -> String {
    match (line, rule) {
        (Some(n), Some(r)) => format!(" at input line {n} ({r})"),
        (Some(n), None) => format!(" at input line {n}"),
        _ => String::new(),
    }
}

/// The iptables backend: a [`Dataplane`] over `iptables-restore`.
#[derive(Debug)]
pub struct Iptables {
    runner: Runner,
    flavour: Flavour,
    family: IpFamily,
    /// The rules last applied successfully; `None` forces a full resync.
    applied: Option<Ruleset>,
    canary_interval: Duration,
    canary_checked: Option<Instant>,
    max_kept_chains: usize,
    /// The conntrack table of the same namespace.
    conntrack: Conntrack,
    /// Stale flows of diffs whose rules are not applied yet (a failed sync's are kept for
    /// the next one, which may be a resync without a diff).
    stale: BTreeSet<StaleFlow>,
}

impl Iptables {
    /// Connects to iptables, detecting the flavour when the configuration names none.
    pub fn new(config: IptablesConfig) -> Result<Iptables, SyncError> {
        let flavour = match config.flavour {
            Some(f) => f,
            None => detect(&config.runner)?,
        };
        Ok(Iptables {
            conntrack: Conntrack::new(config.runner.netns.clone()),
            stale: BTreeSet::new(),
            runner: config.runner,
            flavour,
            family: config.family,
            applied: None,
            canary_interval: config.canary_interval,
            canary_checked: None,
            max_kept_chains: config.max_kept_chains,
        })
    }

    /// The flavour in use.
    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    fn program(&self, tool: &str) -> String {
        let base = match self.family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        match tool {
            "" => format!("{base}-{}", self.flavour.suffix()),
            t => format!("{base}-{}-{t}", self.flavour.suffix()),
        }
    }

    /// Feeds `text` to `iptables-restore --noflush`.
    pub fn restore(&self, text: &str) -> Result<(), SyncError> {
        let program = self.program("restore");
        let mut child = self
            .runner
            .command(&program)
            .args(["--noflush", "--wait", "5"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| SyncError::Spawn {
                program: program.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error means the program exited early; its status says why.
            let _ = stdin.write_all(text.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|source| SyncError::Spawn {
                program: program.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let line = failing_line(&stderr);
        Err(SyncError::Restore {
            program,
            rule: line.and_then(|n| text.lines().nth(n.saturating_sub(1)).map(str::to_string)),
            line,
            stderr,
        })
    }

    /// [`Iptables::restore`], except that a chain which cannot be deleted because a rule
    /// svcnat does not own still jumps to it is kept (flushed: the transaction declares it)
    /// and the rest of the transaction is applied: one foreign reference must not block
    /// every later update. Returns the chains kept; a later full sync, which deletes every
    /// stale owned chain it finds, tries again.
    fn restore_sparing(&self, text: &str) -> Result<Vec<String>, SyncError> {
        let mut text = text.to_string();
        let mut kept = Vec::new();
        loop {
            let err = match self.restore(&text) {
                Ok(()) => return Ok(kept),
                Err(e) => e,
            };
            let SyncError::Restore {
                line: Some(n),
                rule: Some(rule),
                ..
            } = &err
            else {
                return Err(err);
            };
            // Bounded: each round removes one `-X` line.
            let Some(chain) = rule.strip_prefix("-X ").map(str::trim) else {
                return Err(err);
            };
            if kept.len() >= self.max_kept_chains {
                return Err(err);
            }
            kept.push(chain.to_string());
            text = text
                .lines()
                .enumerate()
                .filter(|(i, _)| i + 1 != *n)
                .map(|(_, l)| format!("{l}\n"))
                .collect();
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<String, SyncError> {
        let program = self.program(tool);
        let out = self
            .runner
            .command(&program)
            .args(args)
            .output()
            .map_err(|source| SyncError::Spawn {
                program: program.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(SyncError::Command {
                command: format!("{program} {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// `iptables-save -t TABLE`.
    pub fn save(&self, table: Table) -> Result<String, SyncError> {
        self.run("save", &["-t", table.as_str()])
    }

    /// Whether the canary chain exists in every table svcnat uses; when someone flushes or
    /// deletes our chains it is gone and the next sync is a full resync.
    pub fn canary_present(&self) -> bool {
        [Table::Nat, Table::Filter].into_iter().all(|t| {
            self.run("", &["-w", "5", "-t", t.as_str(), "-S", CANARY_CHAIN])
                .is_ok()
        })
    }

    /// Chains in the kernel's table that svcnat owns: per-service chains, and the fixed
    /// chains that the renderer always declares. Nothing else is ever touched.
    fn owned_chains_in_kernel(&self, table: Table) -> Result<BTreeSet<String>, SyncError> {
        Ok(owned_in_save(&self.save(table)?, &self.fixed_chains(table)))
    }

    fn full_sync(&mut self, plan: &Plan) -> Result<SyncReport, SyncError> {
        self.applied = None;
        let rules = Ruleset::new_for(plan, self.family);
        let wanted: BTreeSet<(Table, String)> =
            rules.chains().map(|(t, c)| (t, c.to_string())).collect();
        // iptables-nft-restore slows down with the square of the chains one transaction
        // declares; blocks of a few hundred chains keep a full sync linear.
        let mut text = match self.flavour {
            Flavour::Nft => rules.full_restore_batched(NFT_BATCH_CHAINS),
            Flavour::Legacy => rules.full_restore(),
        };
        // One `iptables-save` per table tells both which owned chains are stale and which
        // jumps from the built-in chains are missing; both go into that table's block of
        // the one restore, before its COMMIT (with the legacy flavour every extra
        // iptables call, and every extra commit, rereads or rewrites the whole table).
        let mut jumps = 0;
        for table in [Table::Nat, Table::Filter] {
            let saved = self.save(table)?;
            let gone: Vec<String> = owned_in_save(&saved, &self.fixed_chains(table))
                .into_iter()
                .filter(|c| !wanted.contains(&(table, c.clone())))
                .collect();
            let missing: Vec<String> = base_jumps()
                .into_iter()
                .filter(|(t, builtin, rule)| *t == table && !has_jump(&saved, builtin, rule))
                .map(|(_, builtin, rule)| format!("-I {builtin} 1 {}", quote_args(&rule)))
                .collect();
            if gone.is_empty() && missing.is_empty() {
                continue;
            }
            // Stale chains: declaring flushes them; `-X` deletes them once nothing refers
            // to them, which holds by then because the block rewrote every owned chain.
            let mut extra = String::new();
            for c in &gone {
                extra.push_str(&format!(":{c} - [0:0]\n"));
            }
            for c in &gone {
                extra.push_str(&format!("-X {c}\n"));
            }
            // Inserted at the head in kube-proxy's order, so the last listed ends up first.
            for j in &missing {
                extra.push_str(j);
                extra.push('\n');
            }
            jumps += missing.len();
            text = splice_before_commit(&text, table, &extra);
        }
        let kept = self.restore_sparing(&nat_first(&text))?;
        let mut report = SyncReport::of_plan(plan, true, rules.rule_count() + jumps);
        report.warnings = kept_warnings(&kept);
        self.applied = Some(rules);
        self.canary_checked = Some(Instant::now());
        Ok(report)
    }

    /// Applies `diff` to the rules (a full sync when the canary is gone or the last sync
    /// failed).
    fn apply(&mut self, plan: &Plan, diff: &PlanDiff) -> Result<SyncReport, SyncError> {
        let check_due = self
            .canary_checked
            .is_none_or(|t| t.elapsed() >= self.canary_interval);
        if check_due {
            self.canary_checked = Some(Instant::now());
            if !self.canary_present() {
                return self.full_sync(plan);
            }
        }
        if self.applied.is_none() {
            return self.full_sync(plan);
        }
        let Some(mut rules) = self.applied.take() else {
            return self.full_sync(plan);
        };
        let Some(text) = rules.update(plan, diff) else {
            let report = SyncReport::of_plan(plan, false, 0);
            self.applied = Some(rules);
            return Ok(report);
        };
        // A partial restore is one transaction, and iptables-nft-restore slows down with
        // the square of the chains one transaction declares (a burst that changed 4,096 of
        // 10,000 Services took 10-12 s this way); past one block's worth, the full sync in
        // blocks is the faster way to the same rules.
        if self.flavour == Flavour::Nft
            && text.lines().filter(|l| l.starts_with(':')).count() > NFT_BATCH_CHAINS
        {
            return self.full_sync(plan);
        }
        // On failure `applied` stays None: the kernel kept the old rules and the next sync
        // rewrites everything.
        let kept = self.restore_sparing(&nat_first(&text))?;
        let mut report = SyncReport::of_plan(
            plan,
            false,
            text.lines().filter(|l| l.starts_with("-A ")).count(),
        );
        report.warnings = kept_warnings(&kept);
        self.applied = Some(rules);
        Ok(report)
    }

    /// After the rules are in place (as kube-proxy does it: new packets of a flow whose
    /// entry is deleted must meet the new rules), deletes the stale conntrack entries the
    /// synced diffs left, and adds what happened to `report`.
    fn clean_conntrack(&mut self, report: SyncReport) -> SyncReport {
        self.conntrack.clean_into(&mut self.stale, report)
    }

    /// The fixed chains the renderer always declares in `table` (the chains of an empty
    /// plan).
    fn fixed_chains(&self, table: Table) -> BTreeSet<String> {
        let empty = Plan::empty(NodeContext::new("", Vec::new(), Vec::new()));
        Ruleset::new_for(&empty, self.family)
            .chains()
            .filter(|(t, _)| *t == table)
            .map(|(_, c)| c.to_string())
            .collect()
    }
}

/// The default of [`IptablesConfig::max_kept_chains`]: past a few dozen foreign references
/// something is badly wrong with the tables, and failing says so.
pub const DEFAULT_MAX_KEPT_CHAINS: usize = 64;

fn kept_warnings(kept: &[String]) -> Vec<String> {
    kept.iter()
        .map(|c| {
            format!(
                "chain {c} is kept (flushed) because a rule svcnat does not own jumps to it; \
                 it is deleted once that rule is gone"
            )
        })
        .collect()
}

/// Restore text with the `nat` table's blocks first, each table's blocks in their order.
///
/// `iptables-restore` commits table by table and stops at the first failure. The chains
/// that can fail to go (someone else's rule still jumps to them) and the rules that carry
/// traffic (DNAT) are in `nat`; with `nat` first, a failure there leaves every table as it
/// was, instead of a committed `filter` (REJECT for "no endpoints") over an old `nat`.
fn nat_first(text: &str) -> String {
    let mut head = String::new();
    let mut nat = String::new();
    let mut rest = String::new();
    let mut current: Option<bool> = None;
    for line in text.lines() {
        if let Some(table) = line.strip_prefix('*') {
            current = Some(table.trim() == "nat");
        }
        let out = match current {
            Some(true) => &mut nat,
            Some(false) => &mut rest,
            None => &mut head,
        };
        out.push_str(line);
        out.push('\n');
        if line.trim() == "COMMIT" {
            current = None;
        }
    }
    head + &nat + &rest
}

/// Chains per `*table ... COMMIT` block of a full sync with the nft flavour.
const NFT_BATCH_CHAINS: usize = 500;

/// Inserts `extra` before the COMMIT of `table`'s last block in restore input (every chain
/// exists by then), or appends a block of its own when the input has none for that table.
fn splice_before_commit(text: &str, table: Table, extra: &str) -> String {
    let header = format!("*{}\n", table.as_str());
    if let Some(start) = text.rfind(&header)
        && let Some(rel) = text[start..].find("COMMIT\n")
    {
        let at = start + rel;
        return format!("{}{extra}{}", &text[..at], &text[at..]);
    }
    format!("{text}{header}{extra}COMMIT\n")
}

/// Chains in `iptables-save` output that svcnat owns: per-service chains (see
/// [`is_service_chain`]) and `fixed`. The text comes from the kernel's tables, which anyone
/// on the node may write: any input is read without a panic.
pub fn owned_in_save(saved: &str, fixed: &BTreeSet<String>) -> BTreeSet<String> {
    saved
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| is_service_chain(c) || fixed.contains(*c))
        .map(str::to_string)
        .collect()
}

/// Whether `iptables-save` output has the jump `rule` in `builtin`; a jump is identified by
/// its built-in chain and its target, which no two base jumps share.
pub fn has_jump(saved: &str, builtin: &str, rule: &[String]) -> bool {
    let Some(target) = rule.last() else {
        return false;
    };
    let prefix = format!("-A {builtin} ");
    let suffix = format!("-j {target}");
    saved
        .lines()
        .any(|l| l.starts_with(&prefix) && l.trim_end().ends_with(&suffix))
}

/// Joins argv words for iptables-restore, quoting those with spaces.
fn quote_args(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether a chain name is one of the per-service chains svcnat (and kube-proxy) creates:
/// `KUBE-SVC-`, `KUBE-SVL-`, `KUBE-EXT-`, `KUBE-FW-` or `KUBE-SEP-` and a hash.
pub fn is_service_chain(chain: &str) -> bool {
    const PREFIXES: [&str; 5] = [
        "KUBE-SVC-",
        "KUBE-SVL-",
        "KUBE-EXT-",
        "KUBE-FW-",
        "KUBE-SEP-",
    ];
    PREFIXES.iter().any(|p| chain.starts_with(p))
}

/// Reads the failing line number out of iptables-restore's error message: `line 7 failed`,
/// `line 12: RULE_APPEND failed`, or (iptables 1.8 when a chain or target is missing)
/// `Error occurred at line: 3`. `None` when no `line` is followed by a number.
pub fn failing_line(stderr: &str) -> Option<usize> {
    stderr.match_indices("line").find_map(|(i, m)| {
        let rest = stderr[i + m.len()..]
            .strip_prefix(':')
            .unwrap_or(&stderr[i + m.len()..]);
        let rest = rest.trim_start_matches(' ');
        let digits = &rest[..rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len())];
        digits.parse().ok()
    })
}

fn detect(runner: &Runner) -> Result<Flavour, SyncError> {
    let out = runner
        .command("iptables")
        .arg("--version")
        .output()
        .map_err(|source| SyncError::Spawn {
            program: "iptables".into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.contains("nf_tables") {
        Ok(Flavour::Nft)
    } else if text.contains("legacy") {
        Ok(Flavour::Legacy)
    } else {
        Err(SyncError::Detect(text))
    }
}

impl Dataplane for Iptables {
    type Error = SyncError;

    fn sync(&mut self, plan: &Plan, diff: &PlanDiff) -> Result<SyncReport, SyncError> {
        let family = self.family;
        self.stale.extend(
            stale_flows(diff, plan)
                .into_iter()
                .filter(|f| f.family() == family),
        );
        let report = self.apply(plan, diff)?;
        Ok(self.clean_conntrack(report))
    }

    fn resync(&mut self, plan: &Plan) -> Result<SyncReport, SyncError> {
        let report = self.full_sync(plan)?;
        Ok(self.clean_conntrack(report))
    }

    /// The canary check of [`IptablesConfig::canary_interval`], between syncs: `true` when
    /// it is due and the canary chain is gone from a table.
    fn drifted(&mut self) -> Result<bool, SyncError> {
        let due = self
            .canary_checked
            .is_none_or(|t| t.elapsed() >= self.canary_interval);
        if !due || self.applied.is_none() {
            return Ok(false);
        }
        self.canary_checked = Some(Instant::now());
        Ok(!self.canary_present())
    }

    fn cleanup(&mut self) -> Result<(), SyncError> {
        self.applied = None;
        for (table, chain, rule) in base_jumps() {
            let mut del = vec!["-w", "5", "-t", table.as_str(), "-D", chain];
            del.extend(rule.iter().map(String::as_str));
            // Delete every copy; a missing rule ends the loop.
            while self.run("", &del).is_ok() {}
        }
        let mut text = String::new();
        for table in [Table::Nat, Table::Filter] {
            let chains = self.owned_chains_in_kernel(table)?;
            if chains.is_empty() {
                continue;
            }
            text.push_str(&format!("*{}\n", table.as_str()));
            for c in &chains {
                text.push_str(&format!(":{c} - [0:0]\n"));
            }
            for c in &chains {
                text.push_str(&format!("-X {c}\n"));
            }
            text.push_str("COMMIT\n");
        }
        if !text.is_empty() {
            self.restore(&text)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_blocks_go_first_in_their_order() {
        let text = "# head\n*filter\n:A - [0:0]\nCOMMIT\n*nat\n:B - [0:0]\nCOMMIT\n*filter\n:C - [0:0]\nCOMMIT\n*nat\n-A B -j RETURN\nCOMMIT\n";
        assert_eq!(
            nat_first(text),
            "# head\n*nat\n:B - [0:0]\nCOMMIT\n*nat\n-A B -j RETURN\nCOMMIT\n*filter\n:A - [0:0]\nCOMMIT\n*filter\n:C - [0:0]\nCOMMIT\n"
        );
        assert_eq!(nat_first(""), "");
    }

    #[test]
    fn reads_the_failing_line() {
        assert_eq!(failing_line("iptables-restore: line 7 failed"), Some(7));
        assert_eq!(
            failing_line("iptables-restore v1.8.9 (nf_tables): line 12: RULE_APPEND failed"),
            Some(12)
        );
        assert_eq!(failing_line("something else"), None);
        // iptables 1.8.9, both flavours, when a rule jumps to a missing chain: the number
        // follows a colon, and an earlier "line" (in a quoted comment) has none.
        assert_eq!(
            failing_line(
                "iptables-restore v1.8.9 (legacy): Couldn't load target `KUBE-SEP-X':No such \
                 file or directory\n\nError occurred at line: 3\nTry `iptables-restore -h'"
            ),
            Some(3)
        );
        assert_eq!(
            failing_line("--comment \"line x\" ... Error occurred at line: 4"),
            Some(4)
        );
        assert_eq!(failing_line("line 99999999999999999999999999"), None);
        assert_eq!(failing_line("line"), None);
    }

    #[test]
    fn splices_into_the_right_block() {
        let text = "*filter\n:A - [0:0]\nCOMMIT\n*nat\n:B - [0:0]\nCOMMIT\n";
        assert_eq!(
            splice_before_commit(text, Table::Nat, "-X C\n"),
            "*filter\n:A - [0:0]\nCOMMIT\n*nat\n:B - [0:0]\n-X C\nCOMMIT\n"
        );
        assert_eq!(
            splice_before_commit("*filter\nCOMMIT\n", Table::Nat, "-X C\n"),
            "*filter\nCOMMIT\n*nat\n-X C\nCOMMIT\n"
        );
    }

    #[test]
    fn finds_jumps_in_save_output() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\nCOMMIT\n";
        let rule: Vec<String> = [
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert!(has_jump(saved, "PREROUTING", &rule));
        assert!(!has_jump(saved, "OUTPUT", &rule));
        assert_eq!(
            quote_args(&rule),
            "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        );
    }

    #[test]
    fn service_chains_are_recognised() {
        assert!(is_service_chain("KUBE-SVC-VIQHAVHDK4QE7NA4"));
        assert!(is_service_chain("KUBE-SEP-BAI3HQ7SV7RZ2CI6"));
        assert!(!is_service_chain("KUBE-SERVICES"));
        assert!(!is_service_chain("DOCKER"));
        assert!(!is_service_chain("KUBE-KUBELET-CANARY"));
    }
}
