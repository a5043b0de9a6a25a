//! The node proxy behind `svcnat-proxy`: a directory of manifests in, a programmed
//! dataplane out, with Prometheus metrics and a health check on the side.
//!
//! - [`ManifestDir`] is the source. It polls a directory for `*.yaml` and `*.yml` files
//!   (names, sizes, modification times and inodes; a file changed in the last second is
//!   also re-read, as its time stamp cannot tell two quick writes apart) and keeps, per
//!   file, the **last text that loaded cleanly**. A change is read only once it has held
//!   still for one poll, so a file caught half-written is not applied. The cluster is
//!   built from the last good texts of all files in name order. A file whose new text has
//!   any [`LoadError`], or whose new text makes another file fail (a node port or cluster
//!   IP that another Service holds, as the API server refuses an update that clashes),
//!   is rejected as a whole: its previous good text stays in force, and a file that never
//!   loaded cleanly contributes nothing. Rejections are logged with file, line and field.
//! - [`Proxy`] is the loop: it polls the source, coalesces changes into at most one sync
//!   per `min_sync_period` (kube-proxy's `--min-sync-period`), syncs through a
//!   [`NodeAgent`] (which diffs the new plan against the old one), and rewrites everything
//!   every `sync_period` to repair drift. A failed sync is retried with a growing delay.
//! - [`Metrics`] holds the counters and renders them in the Prometheus text format;
//!   [`serve`] answers `GET /metrics` and `GET /healthz` on a small HTTP server.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use svcnat_core::manifest::{ClusterConfig, LoadError, Manifests};
use svcnat_core::model::Cluster;
use svcnat_core::plan::{Dataplane, NodeContext, SyncReport};
use tracing::{debug, error, info, warn};

use crate::agent::NodeAgent;

/// How often the manifest directory is polled by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A file modified this recently is re-read on every poll, because another write in the
/// same clock tick would leave its size and time stamps as they were.
const RACY_WINDOW: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------------------------

/// Parses a duration as Go (and so kube-proxy's flags) writes them: `1s`, `200ms`, `1m30s`,
/// `1.5h`; units `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`. A bare `0` is zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        if num.is_empty() {
            return Err(format!("invalid duration {text:?}: expected a number"));
        }
        let value: f64 = num
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: bad number {num:?}"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("invalid duration {text:?}: missing unit")),
            u => return Err(format!("invalid duration {text:?}: unknown unit {u:?}")),
        };
        total += value * scale;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The manifest directory
// ---------------------------------------------------------------------------------------------

/// What `stat` says about a file: when any of it changes, the file may have new content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file changed within [`RACY_WINDOW`] of `now` (or in the future).
    fn is_recent(&self, now: SystemTime) -> bool {
        let Ok(now) = now.duration_since(UNIX_EPOCH) else {
            return true;
        };
        let newest = self.mtime.max(self.ctime);
        let secs = u64::try_from(newest.0).unwrap_or(0);
        let nanos = u32::try_from(newest.1).unwrap_or(0).min(999_999_999);
        let changed = Duration::new(secs, nanos);
        changed + RACY_WINDOW >= now
    }
}

/// One manifest file: what is on disk, and what is in force.
#[derive(Debug, Default)]
struct FileState {
    /// Stamp of the text last read.
    read: Option<Stamp>,
    /// Re-read on every poll even when the stamp is unchanged (recently modified).
    racy: bool,
    /// The text last read; `None` when it could not be read.
    disk: Option<Arc<str>>,
    /// The last text that loaded cleanly: what the cluster is built from.
    good: Option<Arc<str>>,
    /// Why the text on disk is not in force (empty when it is).
    errors: Vec<String>,
    /// The disk text is new since the last reconcile (its warnings are not logged yet).
    fresh: bool,
}

/// A directory of manifests with per-file last-good state; see the [module](self) docs.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    config: ClusterConfig,
    files: BTreeMap<String, FileState>,
    /// Stamps seen by the previous poll: a change is read once it held still for a poll.
    seen: BTreeMap<String, Stamp>,
    cluster: Cluster,
    /// The texts `cluster` was built from.
    built_from: BTreeMap<String, Arc<str>>,
    /// Errors of the current build (objects left out of files that are in force).
    build_errors: Vec<LoadError>,
}

impl ManifestDir {
    /// Reads every manifest in `dir` now and builds the cluster from the files that load
    /// cleanly. Fails when the directory cannot be listed.
    pub fn open(dir: impl Into<PathBuf>, config: ClusterConfig) -> io::Result<ManifestDir> {
        let mut m = ManifestDir {
            dir: dir.into(),
            config,
            files: BTreeMap::new(),
            seen: BTreeMap::new(),
            cluster: Cluster::new(),
            built_from: BTreeMap::new(),
            build_errors: Vec::new(),
        };
        m.refresh(false)?;
        Ok(m)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Looks for changes; returns whether the texts in force changed (and so the cluster).
    /// Fails when the directory cannot be listed; everything then stays as it was.
    pub fn poll(&mut self) -> io::Result<bool> {
        self.refresh(true)
    }

    /// The cluster built from the last good texts.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Manifest files (by name) whose text is in force.
    pub fn loaded_files(&self) -> impl Iterator<Item = &str> {
        self.files
            .iter()
            .filter(|(_, f)| f.good.is_some())
            .map(|(n, _)| n.as_str())
    }

    /// Files with problems and what they are (one line each, `file:line: ...`): files
    /// whose text on disk is not in force, and files in force that lost an object.
    pub fn problems(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, f) in &self.files {
            if !f.errors.is_empty() {
                out.entry(name.clone())
                    .or_default()
                    .extend(f.errors.iter().cloned());
            }
        }
        for e in &self.build_errors {
            let name = self.name_of(&e.file);
            out.entry(name).or_default().push(e.to_string());
        }
        out
    }

    /// Warnings of the texts in force, where nothing was left out (kinds svcnat does not
    /// read, deprecated apiVersions); read again from those texts on each call.
    pub fn warnings(&self) -> Vec<LoadError> {
        let texts: Vec<(String, Arc<str>)> = self
            .good_texts()
            .into_iter()
            .map(|(n, t)| (self.path_of(&n), t))
            .collect();
        Manifests::from_files(texts.iter().map(|(p, t)| (p.as_str(), &**t)), &self.config).warnings
    }

    /// How many files have problems ([`ManifestDir::problems`]).
    pub fn broken_files(&self) -> usize {
        self.problems().len()
    }

    fn path_of(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The file name of a path that [`ManifestDir::path_of`] made.
    fn name_of(&self, path: &str) -> String {
        Path::new(path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.to_string())
    }

    /// The manifest files in the directory with their stamps: `*.yaml` and `*.yml`,
    /// following symbolic links (as a ConfigMap volume presents files), skipping hidden
    /// names and anything that is not a regular file.
    fn scan(&self) -> io::Result<BTreeMap<String, Stamp>> {
        let mut out = BTreeMap::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                continue;
            }
            // A file may vanish between listing and stat; the next poll sees it gone.
            let Ok(meta) = fs::metadata(entry.path()) else {
                continue;
            };
            if meta.is_file() {
                out.insert(name, Stamp::of(&meta));
            }
        }
        Ok(out)
    }

    fn refresh(&mut self, settle: bool) -> io::Result<bool> {
        let observed = self.scan()?;
        let wall = SystemTime::now();
        let mut touched = false;
        let names: BTreeSet<String> = observed.keys().chain(self.files.keys()).cloned().collect();
        for name in names {
            let now = observed.get(&name).copied();
            if settle && self.seen.get(&name).copied() != now {
                // Changed since the last poll: wait until it holds still.
                continue;
            }
            let Some(stamp) = now else {
                if let Some(f) = self.files.remove(&name) {
                    touched = true;
                    if f.good.is_some() {
                        info!(file = %self.path_of(&name), "manifest file removed");
                    }
                }
                continue;
            };
            let path = self.path_of(&name);
            let state = self.files.entry(name.clone()).or_default();
            if state.read == Some(stamp) && !state.racy {
                continue;
            }
            let text = fs::read_to_string(&path);
            state.read = Some(stamp);
            state.racy = stamp.is_recent(wall);
            match text {
                Ok(t) => {
                    if state.disk.as_deref() != Some(t.as_str()) {
                        debug!(file = %path, bytes = t.len(), "manifest file read");
                        state.disk = Some(t.into());
                        state.fresh = true;
                        touched = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Gone between listing and reading; the next poll removes it.
                    state.read = None;
                }
                Err(e) => {
                    let msg = format!("{path}: cannot read: {e}");
                    if state.errors != [msg.clone()] {
                        warn!(file = %path, error = %e, "cannot read manifest file; its last good version stays in force");
                    }
                    state.disk = None;
                    state.errors = vec![msg];
                    touched = true;
                }
            }
        }
        self.seen = observed;
        Ok(touched && self.reconcile())
    }

    fn good_texts(&self) -> BTreeMap<String, Arc<str>> {
        self.files
            .iter()
            .filter_map(|(n, f)| f.good.clone().map(|t| (n.clone(), t)))
            .collect()
    }

    fn build(&self, texts: &BTreeMap<String, Arc<str>>) -> (Cluster, Vec<LoadError>) {
        let paths: Vec<(String, &str)> = texts
            .iter()
            .map(|(n, t)| (self.path_of(n), t.as_ref()))
            .collect();
        let mut m =
            Manifests::from_files(paths.iter().map(|(p, t)| (p.as_str(), *t)), &self.config);
        let cluster = m.build(&self.config);
        (cluster, m.errors)
    }

    /// Decides which texts are in force after files changed; returns whether they changed.
    fn reconcile(&mut self) -> bool {
        // What the cluster was built from last time (a removed file is already gone from
        // `files`, so this is the reference for "changed").
        let before = std::mem::take(&mut self.built_from);
        let mut good = self.good_texts();
        let (mut cluster, mut errors) = if good == before {
            (self.cluster.clone(), self.build_errors.clone())
        } else {
            self.build(&good)
        };
        // Texts that are new on disk, or were rejected before and may fit now.
        let mut candidates = Vec::new();
        for (name, f) in &mut self.files {
            let Some(disk) = f.disk.clone() else {
                continue;
            };
            if f.good.as_ref() == Some(&disk) {
                if !f.errors.is_empty() {
                    info!(file = %self.dir.join(name).display(), "manifest file is back to its last good version");
                    f.errors.clear();
                }
                f.fresh = false;
                continue;
            }
            candidates.push((name.clone(), disk, f.fresh));
        }
        // First each file on its own: syntax and validation errors.
        let mut valid = Vec::new();
        for (name, text, fresh) in candidates {
            let mut alone = Manifests::default();
            alone.add_file(&self.path_of(&name), &text, &self.config);
            if fresh {
                for w in &alone.warnings {
                    warn!(file = %self.path_of(&name), "{w}");
                }
            }
            if alone.errors.is_empty() {
                valid.push((name, text));
            } else {
                let lines = alone.errors.iter().map(ToString::to_string).collect();
                self.reject(&name, lines);
            }
        }
        // Then together with the files in force: a text is rejected when the cluster built
        // with it has an error that it did not have before. All at once first (one build
        // in the common case), then one by one in name order.
        if !valid.is_empty() {
            let mut all = good.clone();
            all.extend(valid.iter().cloned());
            let (c, e) = self.build(&all);
            if new_errors(&e, &errors).is_empty() {
                for (name, _) in &valid {
                    self.accept(name);
                }
                good = all;
                cluster = c;
                errors = e;
            } else {
                for (name, text) in valid {
                    let mut trial = good.clone();
                    trial.insert(name.clone(), text);
                    let (c, e) = self.build(&trial);
                    let new = new_errors(&e, &errors);
                    if new.is_empty() {
                        self.accept(&name);
                        good = trial;
                        cluster = c;
                        errors = e;
                    } else {
                        self.reject(&name, new);
                    }
                }
            }
        }
        for f in self.files.values_mut() {
            f.fresh = false;
        }
        let old: BTreeSet<String> = self.build_errors.iter().map(|e| e.to_string()).collect();
        for e in &errors {
            if !old.contains(&e.to_string()) {
                warn!(file = %e.file, "object left out: {e}");
            }
        }
        let changed = good != before;
        self.cluster = cluster;
        self.built_from = good;
        self.build_errors = errors;
        changed
    }

    fn accept(&mut self, name: &str) {
        let path = self.path_of(name);
        if let Some(f) = self.files.get_mut(name) {
            info!(file = %path, "manifest file applied");
            f.good = f.disk.clone();
            f.errors.clear();
        }
    }

    fn reject(&mut self, name: &str, lines: Vec<String>) {
        let path = self.path_of(name);
        let Some(f) = self.files.get_mut(name) else {
            return;
        };
        if f.fresh || f.errors != lines {
            let keeps = if f.good.is_some() {
                "its last good version stays in force"
            } else {
                "it never loaded cleanly and contributes nothing"
            };
            for l in &lines {
                warn!(file = %path, "manifest file rejected ({keeps}): {l}");
            }
        }
        f.errors = lines;
    }
}

/// Errors in `after` that are not in `before`, as text.
fn new_errors(after: &[LoadError], before: &[LoadError]) -> Vec<String> {
    let old: BTreeSet<String> = before.iter().map(ToString::to_string).collect();
    after
        .iter()
        .map(ToString::to_string)
        .filter(|e| !old.contains(e))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// Upper bounds of the sync duration histogram: 1 ms doubling to 16.384 s, as kube-proxy's
/// `sync_proxy_rules_duration_seconds` (`ExponentialBuckets(0.001, 2, 15)`).
const BUCKETS_MS: [u64; 15] = [
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
];

/// Whether a sync rewrote everything or applied a diff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    /// Everything was rewritten.
    Full,
    /// Only what changed was written.
    Partial,
}

impl SyncKind {
    fn as_str(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Partial => "partial",
        }
    }
}

#[derive(Debug, Default)]
struct MetricsState {
    buckets: [u64; BUCKETS_MS.len()],
    count: u64,
    sum: f64,
    /// Syncs by (ok, full).
    totals: BTreeMap<(bool, bool), u64>,
    errors: u64,
    services: usize,
    endpoints: usize,
    frontends: usize,
    rules_written: usize,
    manifest_errors: usize,
    last_sync_unix: f64,
    last_ok: Option<Instant>,
}

/// Renders a dataplane's own metrics (Prometheus text) when `/metrics` is scraped.
pub type DataplaneMetrics = Box<dyn Fn() -> String + Send + Sync>;

/// The proxy's counters and gauges, shared with the metrics server.
pub struct Metrics {
    state: Mutex<MetricsState>,
    sync_period: Duration,
    dataplane: Mutex<Option<DataplaneMetrics>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("state", &self.state)
            .field("sync_period", &self.sync_period)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Empty metrics; `/healthz` passes while the last successful sync is younger than
    /// twice `sync_period`.
    pub fn new(sync_period: Duration) -> Metrics {
        Metrics {
            state: Mutex::new(MetricsState::default()),
            sync_period,
            dataplane: Mutex::new(None),
        }
    }

    /// Adds the dataplane's own metrics (packets, drops, connections...) to every scrape.
    pub fn set_dataplane(&self, render: DataplaneMetrics) {
        *self.dataplane.lock().unwrap_or_else(|e| e.into_inner()) = Some(render);
    }

    fn lock(&self) -> MutexGuard<'_, MetricsState> {
        // The state stays consistent whatever panicked while holding the lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observe(s: &mut MetricsState, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            if ms <= *b as f64
                && let Some(c) = s.buckets.get_mut(i)
            {
                *c += 1;
                break;
            }
        }
        s.count += 1;
        s.sum += took.as_secs_f64();
    }

    /// Records a successful sync at `at` that took `took`; `services` is the number of
    /// Services in the cluster it programmed.
    pub fn sync_ok(&self, at: Instant, took: Duration, report: &SyncReport, services: usize) {
        let mut s = self.lock();
        Self::observe(&mut s, took);
        *s.totals.entry((true, report.full)).or_default() += 1;
        s.services = services;
        s.endpoints = report.endpoints;
        s.frontends = report.frontends;
        s.rules_written = report.written;
        s.last_sync_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        s.last_ok = Some(at);
    }

    /// Records a failed sync of the given kind.
    pub fn sync_failed(&self, took: Duration, kind: SyncKind) {
        let mut s = self.lock();
        Self::observe(&mut s, took);
        *s.totals.entry((false, kind == SyncKind::Full)).or_default() += 1;
        s.errors += 1;
    }

    /// Sets the number of manifest files with problems.
    pub fn set_manifest_errors(&self, files: usize) {
        self.lock().manifest_errors = files;
    }

    /// Whether the last successful sync happened within twice the sync period of `now`.
    pub fn healthy_at(&self, now: Instant) -> bool {
        self.lock()
            .last_ok
            .is_some_and(|t| now.saturating_duration_since(t) <= self.sync_period * 2)
    }

    /// The metrics in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let s = self.lock();
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "svcnat_sync_duration_seconds",
            "histogram",
            "How long one sync of the dataplane took (partial or full).",
        );
        let mut cumulative = 0;
        for (b, c) in BUCKETS_MS.iter().zip(s.buckets) {
            cumulative += c;
            let le = *b as f64 / 1000.0;
            let _ = writeln!(
                out,
                "svcnat_sync_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "svcnat_sync_duration_seconds_bucket{{le=\"+Inf\"}} {}\nsvcnat_sync_duration_seconds_sum {}\nsvcnat_sync_duration_seconds_count {}",
            s.count, s.sum, s.count
        );
        head(
            &mut out,
            "svcnat_sync_total",
            "counter",
            "Syncs of the dataplane by result and kind.",
        );
        for ok in [true, false] {
            for full in [true, false] {
                let n = s.totals.get(&(ok, full)).copied().unwrap_or(0);
                let result = if ok { "ok" } else { "error" };
                let kind = if full { "full" } else { "partial" };
                let _ = writeln!(
                    out,
                    "svcnat_sync_total{{result=\"{result}\",kind=\"{kind}\"}} {n}"
                );
            }
        }
        head(
            &mut out,
            "svcnat_sync_errors_total",
            "counter",
            "Syncs of the dataplane that failed.",
        );
        let _ = writeln!(out, "svcnat_sync_errors_total {}", s.errors);
        let gauges: [(&str, &str, String); 6] = [
            (
                "svcnat_services",
                "Services in the cluster at the last successful sync.",
                s.services.to_string(),
            ),
            (
                "svcnat_endpoints",
                "Endpoints programmed by the last successful sync.",
                s.endpoints.to_string(),
            ),
            (
                "svcnat_frontends",
                "Frontends (address, protocol, port) programmed by the last successful sync.",
                s.frontends.to_string(),
            ),
            (
                "svcnat_rules_written",
                "Rules (or objects) the last successful sync wrote.",
                s.rules_written.to_string(),
            ),
            (
                "svcnat_manifest_errors",
                "Manifest files with problems: rejected texts, or objects left out.",
                s.manifest_errors.to_string(),
            ),
            (
                "svcnat_last_sync_timestamp_seconds",
                "Unix time of the last successful sync.",
                format!("{:.3}", s.last_sync_unix),
            ),
        ];
        for (name, help, value) in gauges {
            head(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
        drop(s);
        if let Some(render) = self
            .dataplane
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            out.push_str(&render());
        }
        out
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `addr` from a background thread; returns
/// the bound address (useful with port 0). Connections are answered one at a time, each
/// with a 2 s read and write timeout.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    thread::Builder::new()
        .name("svcnat-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = answer(s, &metrics) {
                            debug!(error = %e, "metrics connection");
                        }
                    }
                    Err(e) => debug!(error = %e, "metrics accept"),
                }
            }
        })?;
    Ok(bound)
}

/// Reads one HTTP request and writes the response.
fn answer(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !(buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")) {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if buf.len() > 16 * 1024 {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let method = words.next().unwrap_or_default();
    let target = words.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        ("GET" | "HEAD", "/healthz") => {
            if metrics.healthy_at(Instant::now()) {
                ("200 OK", "text/plain; charset=utf-8", "ok".to_string())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    "no successful sync within twice the sync period".to_string(),
                )
            }
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: try /metrics or /healthz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

// ---------------------------------------------------------------------------------------------
// The loop
// ---------------------------------------------------------------------------------------------

/// Settings of the proxy loop.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The manifest directory.
    pub manifests: PathBuf,
    /// How manifests are loaded (default namespace, service and pod CIDRs).
    pub cluster: ClusterConfig,
    /// This node and the proxy's masquerade settings.
    pub node: NodeContext,
    /// Changes within this period after a sync are batched into the next one.
    pub min_sync_period: Duration,
    /// Everything is rewritten this often, to repair drift.
    pub sync_period: Duration,
    /// How often the directory is polled.
    pub poll_interval: Duration,
}

impl ProxyConfig {
    /// kube-proxy's defaults (1 s minimum, 30 s full resync) and a 200 ms poll.
    pub fn new(manifests: impl Into<PathBuf>, cluster: ClusterConfig, node: NodeContext) -> Self {
        ProxyConfig {
            manifests: manifests.into(),
            cluster,
            node,
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }
}

/// What one [`Proxy::step`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// The directory was polled.
    pub polled: bool,
    /// A sync ran: its kind and whether it succeeded.
    pub synced: Option<(SyncKind, bool)>,
}

/// The node proxy: a manifest directory kept in step with a dataplane.
#[derive(Debug)]
pub struct Proxy<D: Dataplane> {
    config: ProxyConfig,
    source: ManifestDir,
    agent: NodeAgent<D>,
    metrics: Arc<Metrics>,
    /// The cluster changed since the last successful sync.
    dirty: bool,
    next_poll: Option<Instant>,
    last_attempt: Option<Instant>,
    last_full: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The agent's next apply rewrites everything (first sync, or after a failure).
    full_next: bool,
    ready: bool,
    dir_error: Option<String>,
}

impl<D: Dataplane> Proxy<D> {
    /// Reads the manifest directory (failing when it cannot be listed); nothing is synced
    /// before the first [`Proxy::step`].
    pub fn new(config: ProxyConfig, dataplane: D, metrics: Arc<Metrics>) -> io::Result<Self> {
        let source = ManifestDir::open(&config.manifests, config.cluster.clone())?;
        info!(
            dir = %config.manifests.display(),
            files = source.loaded_files().count(),
            services = source.cluster().services().count(),
            "manifests loaded"
        );
        metrics.set_manifest_errors(source.broken_files());
        let agent = NodeAgent::new(config.node.clone(), dataplane);
        Ok(Proxy {
            backoff: Duration::ZERO,
            config,
            source,
            agent,
            metrics,
            dirty: true,
            next_poll: None,
            last_attempt: None,
            last_full: None,
            retry_at: None,
            full_next: true,
            ready: false,
            dir_error: None,
        })
    }

    /// Whether a sync has succeeded yet.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The manifest source.
    pub fn source(&self) -> &ManifestDir {
        &self.source
    }

    /// The node agent (plan and dataplane).
    pub fn agent(&mut self) -> &mut NodeAgent<D> {
        &mut self.agent
    }

    /// Polls the directory when a poll is due, then syncs when one is due: after a change
    /// (at most once per `min_sync_period`, so changes coalesce), and a full resync every
    /// `sync_period`. Time is a parameter so tests can drive it.
    pub fn step(&mut self, now: Instant) -> Step {
        let mut step = Step::default();
        if self.next_poll.is_none_or(|t| now >= t) {
            self.next_poll = Some(now + self.config.poll_interval);
            step.polled = true;
            match self.source.poll() {
                Ok(changed) => {
                    if self.dir_error.take().is_some() {
                        info!(dir = %self.source.dir().display(), "manifest directory readable again");
                    }
                    self.dirty |= changed;
                }
                Err(e) => {
                    let text = e.to_string();
                    if self.dir_error.as_deref() != Some(text.as_str()) {
                        warn!(dir = %self.source.dir().display(), error = %e, "cannot list the manifest directory; everything stays as it is");
                    }
                    self.dir_error = Some(text);
                }
            }
            self.metrics.set_manifest_errors(self.source.broken_files());
        }
        // Someone changed the rules behind our back (the iptables canary is gone): rewrite
        // everything now rather than at the next periodic resync. A pending change syncs
        // anyway, and that sync checks the canary itself.
        if self.ready && !self.dirty && self.retry_at.is_none() {
            match self.agent.dataplane().drifted() {
                Ok(true) => {
                    warn!(
                        "the dataplane's rules were changed from outside (canary gone); full resync"
                    );
                    self.last_full = None;
                }
                Ok(false) => {}
                Err(e) => warn!("cannot check the dataplane for drift: {e}"),
            }
        }
        let min_elapsed = self
            .last_attempt
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.min_sync_period);
        let retry_ok = self.retry_at.is_none_or(|t| now >= t);
        let full_due = self
            .last_full
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.sync_period);
        if !(min_elapsed && retry_ok && (self.dirty || full_due)) {
            return step;
        }
        self.last_attempt = Some(now);
        let started = Instant::now();
        let (kind, result) = if self.dirty {
            let r = self.agent.apply(self.source.cluster());
            let kind = match &r {
                Ok(rep) if !rep.full => SyncKind::Partial,
                Ok(_) => SyncKind::Full,
                Err(_) if self.full_next => SyncKind::Full,
                Err(_) => SyncKind::Partial,
            };
            (kind, r)
        } else {
            (SyncKind::Full, self.agent.resync())
        };
        let took = started.elapsed();
        let services = self.source.cluster().services().count();
        match result {
            Ok(report) => {
                self.metrics.sync_ok(now, took, &report, services);
                info!(
                    kind = kind.as_str(),
                    services,
                    frontends = report.frontends,
                    endpoints = report.endpoints,
                    rules = report.written,
                    duration = ?took,
                    "synced"
                );
                self.dirty = false;
                self.full_next = false;
                if report.full {
                    self.last_full = Some(now);
                }
                self.retry_at = None;
                self.backoff = Duration::ZERO;
                self.ready = true;
                step.synced = Some((kind, true));
            }
            Err(e) => {
                self.metrics.sync_failed(took, kind);
                self.full_next = true;
                self.backoff = if self.backoff.is_zero() {
                    self.config.min_sync_period.max(Duration::from_secs(1))
                } else {
                    (self.backoff * 2).min(self.config.sync_period.max(Duration::from_secs(1)))
                };
                self.retry_at = Some(now + self.backoff);
                error!(
                    kind = kind.as_str(),
                    retry_in_ms = self.backoff.as_millis() as u64,
                    "sync failed: {e}"
                );
                step.synced = Some((kind, false));
            }
        }
        step
    }

    /// Runs [`Proxy::step`] until `stop` is set (checked every 50 ms), calling `on_ready`
    /// once after the first successful sync. Leaves the dataplane's rules in place, as
    /// kube-proxy does when it exits.
    pub fn run(&mut self, stop: &AtomicBool, on_ready: impl FnOnce()) {
        let mut on_ready = Some(on_ready);
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            self.step(now);
            if self.ready
                && let Some(f) = on_ready.take()
            {
                f();
            }
            let until_poll = self.next_poll.map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(Instant::now())
            });
            thread::sleep(until_poll.clamp(Duration::from_millis(1), Duration::from_millis(50)));
        }
        info!("stopping; the dataplane's rules stay in place");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use std::net::IpAddr;
    use std::sync::atomic::AtomicU64;
    use svcnat_core::model::ObjectName;
    use svcnat_core::plan::{Plan, PlanDiff};

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "svcnat-proxy-unit-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }

        fn write(&self, name: &str, text: &str) {
            // Write beside and rename, so the stamp always changes (new inode).
            let tmp = self.0.join(format!(".{name}.tmp"));
            fs::write(&tmp, text).unwrap();
            fs::rename(&tmp, self.0.join(name)).unwrap();
        }

        fn remove(&self, name: &str) {
            fs::remove_file(self.0.join(name)).unwrap();
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn svc(name: &str, app: &str, node_port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: NodePort\n  selector:\n    app: {app}\n  ports:\n  - port: 80\n    targetPort: 8080\n    nodePort: {node_port}\n"
        )
    }

    fn pod(name: &str, ip: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    app: vote\nspec:\n  nodeName: node-0\n  containers:\n  - name: app\n    image: x\nstatus:\n  phase: Running\n  podIP: {ip}\n  conditions:\n  - type: Ready\n    status: \"True\"\n"
        )
    }

    fn selector_of(m: &ManifestDir, name: &str) -> Option<String> {
        m.cluster()
            .service(&ObjectName::new("default", name))
            .map(|s| {
                s.selector
                    .as_ref()
                    .map(|x| x.to_string())
                    .unwrap_or_default()
            })
    }

    /// Polls twice: once to see a change, once to read it after it held still.
    fn settle(m: &mut ManifestDir) -> bool {
        let a = m.poll().unwrap();
        let b = m.poll().unwrap();
        a || b
    }

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("5").unwrap_err().contains("missing unit"));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_text() {
        let d = Scratch::new();
        d.write("svc.yaml", &svc("vote", "vote", 30000));
        let mut m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        assert_eq!(selector_of(&m, "vote").as_deref(), Some("app=vote"));
        assert_eq!(m.broken_files(), 0);

        // A validation error (a node port out of range) on line 12.
        d.write("svc.yaml", &svc("vote", "other", 80));
        assert!(!settle(&mut m), "nothing in force changes");
        assert_eq!(selector_of(&m, "vote").as_deref(), Some("app=vote"));
        let problems = m.problems();
        let lines = &problems["svc.yaml"];
        assert!(
            lines[0]
                .contains("svc.yaml:12: document 0: Service default/vote: spec.ports[0].nodePort"),
            "{lines:?}"
        );
        assert_eq!(m.broken_files(), 1);

        // Broken YAML: still the last good text.
        d.write(
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: vote\n",
        );
        assert!(!settle(&mut m));
        assert_eq!(selector_of(&m, "vote").as_deref(), Some("app=vote"));
        assert!(m.problems()["svc.yaml"][0].contains("svc.yaml:"));

        // A good edit applies and clears the problem.
        d.write("svc.yaml", &svc("vote", "missing", 30000));
        assert!(settle(&mut m));
        assert_eq!(selector_of(&m, "vote").as_deref(), Some("app=missing"));
        assert_eq!(m.broken_files(), 0);

        // Deleting the file removes its objects.
        d.remove("svc.yaml");
        assert!(settle(&mut m));
        assert_eq!(selector_of(&m, "vote"), None);
    }

    #[test]
    fn a_file_that_never_loaded_contributes_nothing() {
        let d = Scratch::new();
        // One good Service and one bad one in the same file: the file as a whole is out.
        let text = format!("{}---\n{}", svc("good", "vote", 30001), svc("bad", "x", 80));
        d.write("a.yaml", &text);
        d.write("b.yaml", &pod("vote-0", "10.244.0.10"));
        let m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        assert_eq!(m.cluster().services().count(), 0);
        assert_eq!(m.cluster().pods().count(), 1);
        assert_eq!(m.broken_files(), 1);
        assert_eq!(m.loaded_files().collect::<Vec<_>>(), ["b.yaml"]);
    }

    #[test]
    fn a_clash_rejects_the_change_not_the_holder() {
        let d = Scratch::new();
        d.write("a.yaml", &svc("a", "vote", 30000));
        d.write("b.yaml", &svc("b", "vote", 30001));
        let mut m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        assert_eq!(m.cluster().services().count(), 2);
        // a.yaml (earlier in name order) now claims b's node port: as the API server
        // refuses that update, a.yaml keeps its previous text and b keeps its port.
        d.write("a.yaml", &svc("a", "other", 30001));
        assert!(!settle(&mut m));
        assert_eq!(selector_of(&m, "a").as_deref(), Some("app=vote"));
        assert_eq!(selector_of(&m, "b").as_deref(), Some("app=vote"));
        let p = m.problems();
        assert!(p["a.yaml"][0].contains("already allocated"), "{p:?}");
        // Once b goes, a's text fits and is applied (rejected texts are retried).
        d.remove("b.yaml");
        assert!(settle(&mut m));
        assert_eq!(selector_of(&m, "a").as_deref(), Some("app=other"));
        assert_eq!(m.broken_files(), 0);
    }

    #[test]
    fn a_change_is_read_once_it_holds_still() {
        let d = Scratch::new();
        let mut m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        d.write("svc.yaml", &svc("vote", "vote", 30000));
        assert!(!m.poll().unwrap(), "first sight: not read yet");
        assert!(m.poll().unwrap(), "held still for a poll: read");
        assert_eq!(m.cluster().services().count(), 1);
        // Other files are ignored: hidden, other extensions, directories.
        d.write("notes.txt", "x");
        d.write(".hidden.yaml", &svc("hidden", "vote", 30002));
        fs::create_dir(d.0.join("dir.yaml")).unwrap();
        assert!(!settle(&mut m));
        assert_eq!(m.cluster().services().count(), 1);
    }

    #[test]
    fn quick_rewrites_of_the_same_size_are_seen() {
        let d = Scratch::new();
        let path = d.0.join("svc.yaml");
        fs::write(&path, svc("vote", "aaaa", 30000)).unwrap();
        let mut m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        // In place, same length, right away: the stamp may not change at all.
        fs::write(&path, svc("vote", "bbbb", 30000)).unwrap();
        settle(&mut m);
        assert_eq!(selector_of(&m, "vote").as_deref(), Some("app=bbbb"));
    }

    /// A dataplane that records what it is asked to do.
    #[derive(Debug, Default)]
    struct Fake {
        calls: Vec<&'static str>,
        fail: bool,
        frontends: usize,
        drifted: bool,
    }

    #[derive(Debug)]
    struct FakeError;

    impl std::fmt::Display for FakeError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("fake failure")
        }
    }

    impl std::error::Error for FakeError {}

    impl Dataplane for Fake {
        type Error = FakeError;

        fn sync(&mut self, plan: &Plan, diff: &PlanDiff) -> Result<SyncReport, FakeError> {
            self.calls.push("sync");
            if self.fail {
                return Err(FakeError);
            }
            self.frontends = plan.frontends().count();
            Ok(SyncReport {
                full: false,
                written: diff.ops.len(),
                frontends: self.frontends,
                endpoints: plan.endpoint_count(),
            })
        }

        fn resync(&mut self, plan: &Plan) -> Result<SyncReport, FakeError> {
            self.calls.push("resync");
            if self.fail {
                return Err(FakeError);
            }
            self.frontends = plan.frontends().count();
            Ok(SyncReport {
                full: true,
                written: 7,
                frontends: self.frontends,
                endpoints: plan.endpoint_count(),
            })
        }

        fn cleanup(&mut self) -> Result<(), FakeError> {
            self.calls.push("cleanup");
            Ok(())
        }

        fn drifted(&mut self) -> Result<bool, FakeError> {
            Ok(std::mem::take(&mut self.drifted))
        }
    }

    fn proxy(d: &Scratch) -> (Proxy<Fake>, Arc<Metrics>) {
        let node = NodeContext::new(
            "node-0",
            vec![IpAddr::from([192, 168, 50, 11])],
            vec!["10.244.0.0/16".parse().unwrap()],
        );
        let cfg = ProxyConfig::new(&d.0, ClusterConfig::default(), node);
        let metrics = Arc::new(Metrics::new(cfg.sync_period));
        let p = Proxy::new(cfg, Fake::default(), metrics.clone()).unwrap();
        (p, metrics)
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn changes_coalesce_within_the_minimum_sync_period() {
        let d = Scratch::new();
        d.write("svc.yaml", &svc("vote", "vote", 30000));
        d.write("pods.yaml", &pod("vote-0", "10.244.0.10"));
        let (mut p, metrics) = proxy(&d);
        let t0 = Instant::now();
        assert_eq!(p.step(t0).synced, Some((SyncKind::Full, true)));
        assert!(p.is_ready());
        assert_eq!(p.agent().dataplane().frontends, 2);
        // Two edits in a row: seen at 200 ms, read at 400 ms, synced once at 1 s.
        d.write("svc.yaml", &svc("vote", "missing", 30000));
        assert_eq!(p.step(ms(t0, 200)).synced, None);
        d.write("pods.yaml", &pod("vote-0", "10.244.0.11"));
        assert_eq!(p.step(ms(t0, 400)).synced, None);
        assert_eq!(p.step(ms(t0, 600)).synced, None);
        assert_eq!(p.step(ms(t0, 800)).synced, None);
        assert_eq!(p.step(ms(t0, 1000)).synced, Some((SyncKind::Partial, true)));
        assert_eq!(p.agent().dataplane().calls, ["resync", "sync"]);
        assert_eq!(p.agent().plan().endpoint_count(), 0);
        // Nothing more until the full resync is due (30 s after the first sync).
        for t in (1200..30_000).step_by(200) {
            assert_eq!(p.step(ms(t0, t)).synced, None, "at {t} ms");
        }
        assert_eq!(p.step(ms(t0, 30_000)).synced, Some((SyncKind::Full, true)));
        let text = metrics.render();
        assert!(
            text.contains("svcnat_sync_total{result=\"ok\",kind=\"full\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("svcnat_sync_total{result=\"ok\",kind=\"partial\"} 1\n"));
        assert!(text.contains("svcnat_services 1\n"));
        assert!(text.contains("svcnat_frontends 2\n"));
        assert!(text.contains("svcnat_sync_duration_seconds_count 3\n"));
        assert!(text.contains("svcnat_sync_duration_seconds_bucket{le=\"16.384\"} 3\n"));
        assert!(metrics.healthy_at(ms(t0, 30_000)));
        assert!(!metrics.healthy_at(ms(t0, 90_001)));
    }

    #[test]
    fn a_failed_sync_is_retried_with_backoff() {
        let d = Scratch::new();
        d.write("svc.yaml", &svc("vote", "vote", 30000));
        let (mut p, metrics) = proxy(&d);
        p.agent().dataplane().fail = true;
        let t0 = Instant::now();
        assert_eq!(p.step(t0).synced, Some((SyncKind::Full, false)));
        assert!(!p.is_ready());
        assert!(!metrics.healthy_at(t0));
        // Retried after 1 s, then 2 s.
        assert_eq!(p.step(ms(t0, 800)).synced, None);
        assert_eq!(p.step(ms(t0, 1000)).synced, Some((SyncKind::Full, false)));
        assert_eq!(p.step(ms(t0, 2800)).synced, None);
        p.agent().dataplane().fail = false;
        assert_eq!(p.step(ms(t0, 3000)).synced, Some((SyncKind::Full, true)));
        assert!(p.is_ready());
        let text = metrics.render();
        assert!(text.contains("svcnat_sync_errors_total 2\n"), "{text}");
        assert!(text.contains("svcnat_sync_total{result=\"error\",kind=\"full\"} 2\n"));
    }

    #[test]
    fn drift_between_syncs_forces_a_full_resync_at_once() {
        let d = Scratch::new();
        d.write("svc.yaml", &svc("vote", "vote", 30000));
        let (mut p, _) = proxy(&d);
        let t0 = Instant::now();
        assert_eq!(p.step(t0).synced, Some((SyncKind::Full, true)));
        assert_eq!(p.step(ms(t0, 1200)).synced, None);
        // The rules were flushed from outside: the next step rewrites them, long before
        // the periodic resync.
        p.agent().dataplane().drifted = true;
        assert_eq!(p.step(ms(t0, 1400)).synced, Some((SyncKind::Full, true)));
        assert_eq!(p.step(ms(t0, 1600)).synced, None);
        assert_eq!(p.agent().dataplane().calls, ["resync", "resync"]);
    }

    #[test]
    fn metrics_report_broken_manifests() {
        let d = Scratch::new();
        d.write("svc.yaml", "kind: Service\napiVersion: v1\nmetadata: [\n");
        let (mut p, metrics) = proxy(&d);
        p.step(Instant::now());
        assert!(metrics.render().contains("svcnat_manifest_errors 1\n"));
        assert!(metrics.render().contains("svcnat_services 0\n"));
    }

    fn http_get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_health() {
        let metrics = Arc::new(Metrics::new(Duration::from_secs(30)));
        let addr = serve("127.0.0.1:0".parse().unwrap(), metrics.clone()).unwrap();
        let health = http_get(addr, "/healthz");
        assert!(health.starts_with("HTTP/1.1 503 "), "{health}");
        let report = SyncReport {
            full: true,
            written: 12,
            frontends: 2,
            endpoints: 3,
        };
        metrics.sync_ok(Instant::now(), Duration::from_millis(3), &report, 1);
        let health = http_get(addr, "/healthz");
        assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
        assert!(health.ends_with("\r\n\r\nok"), "{health}");
        let m = http_get(addr, "/metrics?x=1");
        assert!(m.contains("Content-Type: text/plain; version=0.0.4"), "{m}");
        assert!(m.contains("svcnat_sync_duration_seconds_bucket{le=\"0.002\"} 0\n"));
        assert!(m.contains("svcnat_sync_duration_seconds_bucket{le=\"0.004\"} 1\n"));
        assert!(m.contains("svcnat_rules_written 12\n"));
        assert!(m.contains("svcnat_endpoints 3\n"));
        assert!(http_get(addr, "/nope").starts_with("HTTP/1.1 404 "));
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "POST /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 405 "), "{out}");
    }
}
