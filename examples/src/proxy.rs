//! The node proxy behind `svcnat-proxy`: a directory of manifests in, a programmed
//! dataplane out, with Prometheus metrics and a health check on the side.
//!
//! - [`ManifestDir`] is the source. It polls a directory for `*.yaml`, `*.yml` and `*.json`
//!   files (names, sizes, modification times and inodes; a file changed in the last second
//!   is also re-read, as its time stamp cannot tell two quick writes apart). A change is
//!   read only once it has held still for one poll, and a text is used only when the
//!   file's stamp is the same after reading it (so a file caught between two writes is
//!   not applied). A file over [`MAX_MANIFEST_BYTES`], or beyond
//!   [`MAX_MANIFEST_TOTAL_BYTES`] for the directory, is refused by its size before
//!   anything is read. A rewrite in place is never applied half-way: a file with objects
//!   in force that becomes empty keeps them all (delete the file to remove them), and a
//!   text that does not load whole and is shorter than the last whole text, or ends in
//!   the middle of a line, keeps the objects it no longer names. Atomic replace (write
//!   beside, then rename) is the fast path. It keeps the **last good version per object**, as `kubectl apply` users
//!   expect: an object is identified by kind, namespace (after defaulting) and name, and
//!   the objects in force are, per file, those of its current text that are valid and fit
//!   with the rest. An object of the text that is invalid (a syntax or validation error,
//!   or a clash with another object: a node port, cluster IP or Pod IP already held, the
//!   same identity in another file) keeps its last good version in force if it had one,
//!   else it is left out; objects no longer in the text are removed, and so are all of a
//!   deleted file's. A document whose YAML does not parse has no identity: the last good
//!   versions of what it held stay, matched by the kind and name a line scan of it finds,
//!   else by document index. An unreadable file keeps all of its objects.
//! - Clashes go by one rule, the API server's, in one order: the texts on disk enter the
//!   build ([`Manifests::build`]) by file name, then document, so the first claimant in
//!   that order keeps a name (`services "x" already exists`), a cluster IP or a node port
//!   (`provided ... is already allocated`, naming the holder and where it is defined),
//!   and only the object that clashes is refused, never its file-mates. The order does not
//!   depend on history, so a restart, `svcnat-dns` and `svcnat-ctl` on the same directory
//!   decide the same way, and an unrelated file changing moves nothing. A refused change
//!   falls back to its last good version, which (like every last good version kept for an
//!   invalid text) enters the build after all texts on disk, so it only gets what no text
//!   claims: one more build per reconcile at most, whatever the number of files.
//! - [`ManifestDir::problems`] lists per file what is not in force and why (`file:line:
//!   document: object: field: error`), and what is in force instead (`its last good version
//!   stays in force`, or `left out`); the same lines are logged when they first appear.
//! - [`Source`] is what the loop reads: a [`ManifestDir`], or an API server
//!   ([`crate::api::ApiSource`]). A source may say it is not ready (the API before its first
//!   lists): nothing is synced until it is.
//! - [`Proxy`] is the loop: it polls the source, coalesces changes into at most one sync
//!   per `min_sync_period` (kube-proxy's `--min-sync-period`), syncs through a
//!   [`NodeAgent`] (which diffs the new plan against the old one), and rewrites everything
//!   every `sync_period` to repair drift. A failed sync is retried with a growing delay.
//! - [`Metrics`] holds the counters (kube-proxy's names where kube-proxy has the metric)
//!   and renders them in the Prometheus text format; [`Metrics::health_at`] is `/healthz`:
//!   503 once the last successful sync is older than the staleness limit (twice the sync
//!   period by default; the periodic resync keeps a quiet proxy healthy), with a body that
//!   says why. [`serve`] answers `GET /metrics` and `GET /healthz` on a small HTTP server.

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

use svcnat_core::manifest::{
    ClusterConfig, LoadError, Loaded, Manifests, Object, ObjectRef, Source as Origin,
    ValidateError, split_documents,
};
use svcnat_core::model::Cluster;
use svcnat_core::plan::{Dataplane, NodeContext, SyncReport};
use tracing::{debug, error, info, warn};

use crate::agent::NodeAgent;

/// How often the manifest directory is polled by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The largest manifest file read: a larger one is refused by its size before any of it
/// is read (its objects in force stay).
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// The most bytes of manifests read from one directory, in file name order: files that
/// would go over it are refused by their size, like files over [`MAX_MANIFEST_BYTES`].
pub const MAX_MANIFEST_TOTAL_BYTES: u64 = 128 << 20;

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

/// Identity of a manifest object: kind, namespace (after defaulting; empty when
/// cluster-scoped) and name, as `kubectl apply` matches an object to the live one.
type Id = ObjectRef;

/// One manifest file: what is on disk, and which of its objects are in force.
#[derive(Debug, Default)]
struct FileState {
    /// Stamp of the text last read.
    read: Option<Stamp>,
    /// Re-read on every poll even when the stamp is unchanged (recently modified).
    racy: bool,
    /// The text last read; `None` when it could not be read.
    disk: Option<Arc<str>>,
    /// The length of the last text taken as whole (not [`FileState::incomplete`]).
    whole_len: usize,
    /// Why the text on disk looks incomplete: the objects in force that it does not
    /// name stay in force (instead of being removed).
    partial: Option<String>,
    /// The text on disk loaded on its own; `None` until read, or when unreadable.
    parsed: Option<Parsed>,
    /// Why the file cannot be read (its objects in force stay in force).
    unreadable: Option<String>,
    /// The disk text is new since the last reconcile (its problems are logged again).
    fresh: bool,
    /// The objects of this file in force, by identity.
    in_force: BTreeMap<Id, Held>,
    /// What of the text on disk is not in force, and what is instead.
    problems: Vec<Problem>,
}

impl FileState {
    /// Keeps every object of the file in force, for `why` (the file cannot be read, is
    /// over a limit, or looks incomplete), and lets go of its text; returns whether
    /// that is news.
    fn hold(&mut self, why: String) -> bool {
        if self.unreadable.as_deref() == Some(why.as_str()) {
            return false;
        }
        self.disk = None;
        self.parsed = None;
        self.unreadable = Some(why);
        self.fresh = true;
        true
    }

    /// Why a text just read looks like a moment of a rewrite in place (or a write in
    /// several chunks) rather than what the writer means, when the file has objects in
    /// force: it does not load whole, and it is shorter than the last whole text or ends
    /// in the middle of a line.
    fn incomplete(&self, text: &str, parsed: &Parsed) -> Option<String> {
        if self.in_force.is_empty() {
            return None;
        }
        let broken = !parsed.invalid.is_empty() || !parsed.unnamed.is_empty();
        if !broken {
            return None;
        }
        let before = self.whole_len;
        if text.len() < before {
            return Some(format!(
                "{} bytes, shorter than the {before} before, and it does not load",
                text.len()
            ));
        }
        (!text.ends_with('\n')).then(|| "it ends in the middle of a line and does not load".into())
    }
}

/// An object version in force.
#[derive(Clone, Debug)]
struct Held {
    loaded: Loaded,
}

/// A file's text loaded on its own: valid objects, invalid ones, unparseable documents.
#[derive(Debug, Default)]
struct Parsed {
    /// Valid objects in document order, the first one of each identity.
    valid: Vec<Loaded>,
    /// Errors of objects whose identity is known (also later duplicates of an identity).
    invalid: Vec<(Id, LoadError)>,
    /// Errors of documents without identity (YAML that does not parse, no kind or name),
    /// with the identity a line scan of the document suggests, if any.
    unnamed: Vec<(LoadError, Option<Id>)>,
}

/// Something in a file's text that is not in force, and what is in force instead.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Problem {
    /// Line in the file, for the order of the report (0 for the whole file).
    line: usize,
    /// What is wrong, `file:line: document N: object: field: error`.
    error: String,
    /// What is in force instead.
    instead: Instead,
}

/// What is in force in place of a version that is not.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Instead {
    /// Nothing: the object (or document) is left out.
    Nothing,
    /// The object's last good version.
    LastGood,
    /// The last good versions of the objects a document without identity held, and how
    /// they were matched to it.
    LastGoodOf(Vec<Id>, &'static str),
    /// The last good versions of every object of the file (it cannot be read).
    WholeFile,
}

impl Problem {
    fn of(e: &LoadError, instead: Instead) -> Problem {
        Problem {
            line: e.line,
            error: e.to_string(),
            instead,
        }
    }

    /// What stays in force, for the logs: `its last good version stays in force`, ...
    fn outcome(&self) -> &'static str {
        match self.instead {
            Instead::Nothing => "left out",
            Instead::LastGood | Instead::LastGoodOf(..) => "its last good version stays in force",
            Instead::WholeFile => "the last good versions of its objects stay in force",
        }
    }

    /// The objects kept for a document without identity, and how they were matched.
    fn detail(&self) -> Option<String> {
        let Instead::LastGoodOf(ids, how) = &self.instead else {
            return None;
        };
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        Some(format!("{}, matched by {how}", ids.join(", ")))
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}", self.error, self.outcome())?;
        if let Some(d) = self.detail() {
            write!(f, ": {d}")?;
        }
        write!(f, ")")
    }
}

/// One object that a file's current text (or its last good version) puts forward.
#[derive(Debug)]
struct Claim {
    /// The file's name.
    file: String,
    /// The version from the text on disk, when it is valid.
    current: Option<Loaded>,
    /// The version of this file in force until now.
    held: Option<Held>,
}

impl Claim {
    /// Whether the current version differs from the one in force (or is new).
    fn changed(&self) -> bool {
        match (&self.current, &self.held) {
            (Some(c), Some(h)) => c.object != h.loaded.object,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// The version in force if the change (if any) is not accepted.
    fn settled(&self) -> Option<&Loaded> {
        if self.changed() {
            self.held.as_ref().map(|h| &h.loaded)
        } else {
            self.current
                .as_ref()
                .or(self.held.as_ref().map(|h| &h.loaded))
        }
    }

    /// The version in force if the change is accepted.
    fn proposed(&self) -> Option<&Loaded> {
        self.current
            .as_ref()
            .or(self.held.as_ref().map(|h| &h.loaded))
    }
}

/// The claims of one reconcile and the state of the search for the versions that fit.
struct Trial<'a> {
    dir: &'a ManifestDir,
    claims: Vec<Claim>,
    /// Per claim: its proposed version is in (else its settled one).
    accepted: Vec<bool>,
    /// Cluster builds made.
    builds: u64,
}

impl Trial<'_> {
    /// The versions in the build per `accepted`, in build order: the versions of the
    /// texts on disk by file name and document, then the last good versions kept for
    /// texts that are invalid, in the same order. So the texts on disk alone decide who
    /// holds a name, a cluster IP or a node port (as in a fresh process), and a last good
    /// version only gets what no text claims.
    fn objects(&self) -> Vec<Loaded> {
        let mut order: Vec<(bool, &str, usize, usize, &Loaded)> = (0..self.claims.len())
            .filter_map(|i| {
                let v = self.version(i)?;
                let from_disk = self.claims[i].current.as_ref() == Some(v);
                Some((!from_disk, v.source.file.as_str(), v.source.document, i, v))
            })
            .collect();
        order.sort_by(|a, b| (a.0, a.1, a.2, a.3).cmp(&(b.0, b.1, b.2, b.3)));
        order.into_iter().map(|o| o.4.clone()).collect()
    }

    fn build(&mut self) -> (Cluster, Vec<LoadError>) {
        self.builds += 1;
        let mut m = Manifests {
            objects: self.objects(),
            ..Manifests::default()
        };
        let cluster = m.build(&self.dir.config);
        (cluster, m.errors)
    }

    /// The version of claim `i` in the build (without a trial).
    fn version(&self, i: usize) -> Option<&Loaded> {
        let c = &self.claims[i];
        if self.accepted[i] {
            c.proposed()
        } else {
            c.settled()
        }
    }

    /// The claims in the build that an error is about: the object it names in its file,
    /// else (a Pod of a workload) the objects of its document.
    fn hit(&self, e: &LoadError) -> Vec<usize> {
        let in_build: Vec<(usize, &Loaded)> = (0..self.claims.len())
            .filter_map(|i| self.version(i).map(|l| (i, l)))
            .filter(|(_, l)| l.source.file == e.file)
            .collect();
        let named: Vec<usize> = in_build
            .iter()
            .filter(|(_, l)| e.object.as_ref() == Some(&l.id))
            .map(|(i, _)| *i)
            .collect();
        if !named.is_empty() {
            return named;
        }
        in_build
            .iter()
            .filter(|(_, l)| l.source.document == e.document)
            .map(|(i, _)| *i)
            .collect()
    }
}

/// A directory of manifests with per-object last-good state; see the [module](self) docs.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    config: ClusterConfig,
    files: BTreeMap<String, FileState>,
    /// Stamps seen by the previous poll: a change is read once it held still for a poll.
    seen: BTreeMap<String, Stamp>,
    cluster: Cluster,
    /// The objects `cluster` was built from, in build order.
    built_from: Vec<Loaded>,
    /// Errors of the build of `cluster` (objects it left out).
    build_errors: Vec<LoadError>,
    /// Cluster builds made by all reconciles (one when nothing clashes).
    builds: u64,
    /// A file with objects in force was removed since the last reconcile.
    dropped: bool,
}

impl ManifestDir {
    /// Reads every manifest in `dir` now and builds the cluster from the objects that are
    /// valid and fit together. Fails when the directory cannot be listed.
    pub fn open(dir: impl Into<PathBuf>, config: ClusterConfig) -> io::Result<ManifestDir> {
        let mut m = ManifestDir {
            dir: dir.into(),
            config,
            files: BTreeMap::new(),
            seen: BTreeMap::new(),
            cluster: Cluster::new(),
            built_from: Vec::new(),
            build_errors: Vec::new(),
            builds: 0,
            dropped: false,
        };
        m.refresh(false)?;
        Ok(m)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Looks for changes; returns whether the objects in force changed (and so the
    /// cluster). Fails when the directory cannot be listed; everything then stays as it was.
    pub fn poll(&mut self) -> io::Result<bool> {
        self.refresh(true)
    }

    /// The cluster built from the objects in force.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Manifest files (by name) with at least one object in force.
    pub fn loaded_files(&self) -> impl Iterator<Item = &str> {
        self.files
            .iter()
            .filter(|(_, f)| !f.in_force.is_empty())
            .map(|(n, _)| n.as_str())
    }

    /// Files with problems and what they are, one line each: what of the text on disk is
    /// not in force and why (`file:line: ...`), then in parentheses what is in force
    /// instead (`its last good version stays in force`, or `left out`).
    pub fn problems(&self) -> BTreeMap<String, Vec<String>> {
        self.files
            .iter()
            .filter(|(_, f)| !f.problems.is_empty())
            .map(|(n, f)| {
                (
                    n.clone(),
                    f.problems.iter().map(|p| p.to_string()).collect(),
                )
            })
            .collect()
    }

    /// Warnings of the texts last read, where nothing was left out (kinds svcnat does not
    /// read, deprecated apiVersions); read again from those texts on each call.
    pub fn warnings(&self) -> Vec<LoadError> {
        let texts: Vec<(String, Arc<str>)> = self
            .files
            .iter()
            .filter_map(|(n, f)| f.disk.clone().map(|t| (self.path_of(n), t)))
            .collect();
        Manifests::from_files(texts.iter().map(|(p, t)| (p.as_str(), &**t)), &self.config).warnings
    }

    /// How many files have problems ([`ManifestDir::problems`]).
    pub fn broken_files(&self) -> usize {
        self.files
            .values()
            .filter(|f| !f.problems.is_empty())
            .count()
    }

    fn path_of(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The manifest files in the directory with their stamps: `*.yaml`, `*.yml` and
    /// `*.json`, following symbolic links (as a ConfigMap volume presents files), skipping
    /// hidden names and anything that is not a regular file.
    fn scan(&self) -> io::Result<BTreeMap<String, Stamp>> {
        let mut out = BTreeMap::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let manifest = [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e));
            if name.starts_with('.') || !manifest {
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
        // Bytes of the files within the limits so far, in name order.
        let mut total = 0u64;
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
                    if !f.in_force.is_empty() {
                        self.dropped = true;
                        info!(file = %self.path_of(&name), "manifest file removed");
                    }
                }
                continue;
            };
            let path = self.path_of(&name);
            let config = &self.config;
            // Limits, by the size `stat` gives, before anything is read.
            let too_big = if stamp.len > MAX_MANIFEST_BYTES {
                Some(format!(
                    "{path}: {} bytes, over the limit of {MAX_MANIFEST_BYTES} bytes per manifest file: not read",
                    stamp.len
                ))
            } else if total.saturating_add(stamp.len) > MAX_MANIFEST_TOTAL_BYTES {
                Some(format!(
                    "{path}: {} bytes, which would take the directory over the limit of {MAX_MANIFEST_TOTAL_BYTES} bytes of manifests: not read",
                    stamp.len
                ))
            } else {
                total += stamp.len;
                None
            };
            let state = self.files.entry(name.clone()).or_default();
            if state.read == Some(stamp) && !state.racy {
                continue;
            }
            if let Some(msg) = too_big {
                state.read = Some(stamp);
                state.racy = false;
                touched |= state.hold(msg);
                continue;
            }
            let text = match read_stable(Path::new(&path), stamp) {
                Ok(Some(t)) => Ok(t),
                Ok(None) => {
                    // Changed while being read: read again once it holds still.
                    debug!(file = %path, "manifest file changed while read");
                    state.read = None;
                    continue;
                }
                Err(e) => Err(e),
            };
            state.read = Some(stamp);
            state.racy = stamp.is_recent(wall);
            match text {
                Ok(t) => {
                    if state.disk.as_deref() != Some(t.as_str()) || state.unreadable.is_some() {
                        debug!(file = %path, bytes = t.len(), "manifest file read");
                        if !state.in_force.is_empty() && is_blank(&t) {
                            touched |= state.hold(format!(
                                "{path}: empty, which looks like a rewrite in place: every object of it stays in force until it has content (delete the file to remove them)"
                            ));
                            continue;
                        }
                        let (parsed, warnings) = parse(&path, &t, config);
                        state.partial = state.incomplete(&t, &parsed);
                        for w in &warnings {
                            warn!(file = %path, "{w}");
                        }
                        if state.partial.is_none() {
                            state.whole_len = t.len();
                        }
                        state.parsed = Some(parsed);
                        state.disk = Some(t.into());
                        state.unreadable = None;
                        state.fresh = true;
                        touched = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Gone between listing and reading; the next poll removes it.
                    state.read = None;
                }
                Err(e) => {
                    touched |= state.hold(format!("{path}: cannot read: {e}"));
                }
            }
        }
        self.seen = observed;
        Ok(touched && self.reconcile())
    }

    /// What each file puts forward: the valid objects of its text, and the last good
    /// versions of its objects that are invalid now.
    fn claims(&self) -> (Vec<Claim>, BTreeMap<String, Vec<Problem>>) {
        let mut claims = Vec::new();
        let mut problems: BTreeMap<String, Vec<Problem>> = BTreeMap::new();
        for (name, f) in &self.files {
            let held = |id: &Id| f.in_force.get(id).cloned();
            let Some(p) = &f.parsed else {
                // Unreadable (or not read yet): everything of it in force stays.
                if let Some(msg) = &f.unreadable {
                    problems.entry(name.clone()).or_default().push(Problem {
                        line: 0,
                        error: msg.clone(),
                        instead: Instead::WholeFile,
                    });
                }
                for h in f.in_force.values() {
                    claims.push(Claim {
                        file: name.clone(),
                        current: None,
                        held: Some(h.clone()),
                    });
                }
                continue;
            };
            let valid: BTreeSet<&Id> = p.valid.iter().map(|l| &l.id).collect();
            for l in &p.valid {
                claims.push(Claim {
                    file: name.clone(),
                    current: Some(l.clone()),
                    held: held(&l.id),
                });
            }
            // An invalid object keeps its last good version ("an invalid object never
            // stops the others", and never removes itself either).
            let mut kept: BTreeSet<&Id> = BTreeSet::new();
            for (id, _) in &p.invalid {
                if !valid.contains(id)
                    && let Some(h) = held(id)
                    && kept.insert(id)
                {
                    claims.push(Claim {
                        file: name.clone(),
                        current: None,
                        held: Some(h),
                    });
                }
            }
            // A document without identity: keep the last good versions of what it held,
            // matched by the identity a line scan finds, else by document index.
            let named: BTreeSet<&Id> = valid
                .iter()
                .copied()
                .chain(p.invalid.iter().map(|(id, _)| id))
                .chain(p.unnamed.iter().filter_map(|(_, g)| g.as_ref()))
                .collect();
            for (e, guess) in &p.unnamed {
                let (ids, how): (Vec<&Id>, _) = match guess {
                    Some(g) => (f.in_force.keys().filter(|id| *id == g).collect(), "name"),
                    None => (
                        f.in_force
                            .iter()
                            .filter(|(id, h)| {
                                !named.contains(id) && h.loaded.source.document == e.document
                            })
                            .map(|(id, _)| id)
                            .collect(),
                        "document index",
                    ),
                };
                let ids: Vec<&Id> = ids.into_iter().filter(|id| !valid.contains(id)).collect();
                for id in &ids {
                    if kept.insert(id)
                        && let Some(h) = held(id)
                    {
                        claims.push(Claim {
                            file: name.clone(),
                            current: None,
                            held: Some(h),
                        });
                    }
                }
                let instead = if ids.is_empty() {
                    Instead::Nothing
                } else {
                    Instead::LastGoodOf(ids.into_iter().cloned().collect(), how)
                };
                problems
                    .entry(name.clone())
                    .or_default()
                    .push(Problem::of(e, instead));
            }
            // A text that looks cut short: what it no longer names is not deleted.
            if let Some(why) = &f.partial {
                let missing: Vec<&Id> = f
                    .in_force
                    .keys()
                    .filter(|id| !named.contains(id) && !kept.contains(id))
                    .collect();
                for id in &missing {
                    if let Some(h) = held(id) {
                        claims.push(Claim {
                            file: name.clone(),
                            current: None,
                            held: Some(h),
                        });
                    }
                }
                if !missing.is_empty() {
                    problems.entry(name.clone()).or_default().push(Problem {
                        line: 0,
                        error: format!("{}: looks incomplete ({why})", self.path_of(name)),
                        instead: Instead::LastGoodOf(
                            missing.into_iter().cloned().collect(),
                            "their absence from a text that looks cut short",
                        ),
                    });
                }
            }
        }
        (claims, problems)
    }

    /// Decides which object versions are in force after files changed; returns whether
    /// they changed.
    fn reconcile(&mut self) -> bool {
        let (claims, mut problems) = self.claims();
        let n = claims.len();
        let mut t = Trial {
            dir: self,
            claims,
            accepted: vec![true; n],
            builds: 0,
        };
        // Rejected changes: claim index -> the errors its version brought.
        let mut rejected: BTreeMap<usize, Vec<LoadError>> = BTreeMap::new();
        let all = t.objects();
        let unchanged = same_objects(&all, &self.built_from, true);
        let (mut cluster, mut errors) = if unchanged {
            // The same objects as the last build: the same outcome.
            (self.cluster.clone(), self.build_errors.clone())
        } else {
            t.build()
        };
        if !unchanged && !errors.is_empty() {
            // A change the build refused (it clashes with what an earlier text claims)
            // falls back to its last good version, which comes after every text on disk:
            // one more build, whatever the number of files.
            let hits: Vec<(&LoadError, Vec<usize>)> =
                errors.iter().map(|e| (e, t.hit(e))).collect();
            for (e, on) in &hits {
                for &i in on {
                    if t.claims[i].changed() && t.claims[i].held.is_some() {
                        rejected.entry(i).or_default().push((*e).clone());
                    }
                }
            }
            if !rejected.is_empty() {
                for &i in rejected.keys() {
                    t.accepted[i] = false;
                }
                (cluster, errors) = t.build();
            }
        }
        // What is in force: each claim's accepted or settled version, unless the build
        // left it out.
        let left_out: BTreeSet<usize> = errors.iter().flat_map(|e| t.hit(e)).collect();
        let mut in_force: BTreeMap<String, BTreeMap<Id, Held>> = BTreeMap::new();
        for (i, c) in t.claims.iter().enumerate() {
            if let Some(v) = t.version(i)
                && !left_out.contains(&i)
            {
                in_force
                    .entry(c.file.clone())
                    .or_default()
                    .insert(v.id.clone(), Held { loaded: v.clone() });
            }
        }
        // Problems: rejected changes, objects the build left out, invalid objects.
        for (i, lines) in &rejected {
            let c = &t.claims[*i];
            let instead = if c.held.is_some() && !left_out.contains(i) {
                Instead::LastGood
            } else {
                Instead::Nothing
            };
            for e in lines {
                problems
                    .entry(c.file.clone())
                    .or_default()
                    .push(Problem::of(e, instead.clone()));
            }
        }
        for e in &errors {
            for i in t.hit(e) {
                problems
                    .entry(t.claims[i].file.clone())
                    .or_default()
                    .push(Problem::of(e, Instead::Nothing));
            }
        }
        for (name, f) in &self.files {
            let Some(p) = &f.parsed else { continue };
            let mine = in_force.get(name);
            for (id, e) in &p.invalid {
                // Kept when this file has a version of it in force that is not from the
                // text on disk (a duplicate in the text is simply left out).
                let kept = mine.and_then(|m| m.get(id)).is_some_and(|h| {
                    !p.valid
                        .iter()
                        .any(|l| l.id == *id && l.object == h.loaded.object)
                });
                let instead = if kept {
                    Instead::LastGood
                } else {
                    Instead::Nothing
                };
                problems
                    .entry(name.clone())
                    .or_default()
                    .push(Problem::of(e, instead));
            }
        }
        let built_from = t.objects();
        debug!(
            objects = built_from.len(),
            builds = t.builds,
            "manifest objects reconciled"
        );
        self.builds += t.builds;
        self.commit(in_force, problems, cluster, built_from, errors)
    }

    /// Puts the outcome of a reconcile in force and logs what changed; returns whether
    /// the objects in force changed.
    fn commit(
        &mut self,
        mut in_force: BTreeMap<String, BTreeMap<Id, Held>>,
        mut problems: BTreeMap<String, Vec<Problem>>,
        cluster: Cluster,
        built_from: Vec<Loaded>,
        errors: Vec<LoadError>,
    ) -> bool {
        // What is in force decides (the build also holds the objects it refused).
        let before: BTreeMap<(&str, &Id), &Object> = self
            .files
            .iter()
            .flat_map(|(n, f)| {
                f.in_force
                    .iter()
                    .map(move |(id, h)| ((n.as_str(), id), &h.loaded.object))
            })
            .collect();
        let after: BTreeMap<(&str, &Id), &Object> = in_force
            .iter()
            .flat_map(|(n, m)| {
                m.iter()
                    .map(move |(id, h)| ((n.as_str(), id), &h.loaded.object))
            })
            .collect();
        let changed = before != after || std::mem::take(&mut self.dropped);
        let paths: BTreeMap<String, String> = self
            .files
            .keys()
            .map(|n| (n.clone(), self.path_of(n)))
            .collect();
        for (name, f) in &mut self.files {
            let path = paths.get(name).map(String::as_str).unwrap_or(name);
            let mut now = problems.remove(name).unwrap_or_default();
            now.sort_by_key(|p| p.line);
            for p in &now {
                if f.fresh || !f.problems.contains(p) {
                    let detail = p
                        .detail()
                        .map(|d| format!("; kept: {d}"))
                        .unwrap_or_default();
                    warn!(file = %path, "manifest object rejected ({}): {}{detail}", p.outcome(), p.error);
                }
            }
            let objects = in_force.remove(name).unwrap_or_default();
            if now.is_empty() && (f.fresh || !f.problems.is_empty()) {
                info!(file = %path, objects = objects.len(), "manifest file applied");
            }
            f.in_force = objects;
            f.problems = now;
            f.fresh = false;
        }
        self.cluster = cluster;
        self.built_from = built_from;
        self.build_errors = errors;
        changed
    }
}

/// Whether a text has no objects: only blank lines, comments and document markers.
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    })
}

/// Reads a file whose `stat` gave `stamp`, if it holds still: `None` when it changed while
/// being read (another size, another stamp afterwards), so a text caught between two
/// writes is never used. Reads at most `stamp.len` bytes (and one more, to notice growth).
fn read_stable(path: &Path, stamp: Stamp) -> io::Result<Option<String>> {
    let file = fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(stamp.len.saturating_add(1))
        .read_to_end(&mut bytes)?;
    let after = fs::metadata(path).map(|m| Stamp::of(&m));
    if u64::try_from(bytes.len()).ok() != Some(stamp.len) || after.ok() != Some(stamp) {
        return Ok(None);
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Loads one file's text on its own and sorts what it holds by identity; returns the
/// warnings too.
fn parse(path: &str, text: &str, config: &ClusterConfig) -> (Parsed, Vec<LoadError>) {
    let mut m = Manifests::default();
    m.add_file(path, text, config);
    let mut p = Parsed::default();
    let mut first: BTreeMap<Id, Origin> = BTreeMap::new();
    for l in m.objects {
        if let Some(s) = first.get(&l.id) {
            // kubectl applies both and the last one wins; a directory has no "last", so
            // the first definition is used and the other is reported.
            let e = LoadError {
                file: path.to_string(),
                line: l.source.line,
                document: l.source.document,
                object: Some(l.id.clone()),
                field: "metadata.name".into(),
                error: ValidateError::Duplicate(format!(
                    "{} is already defined at {}:{} (document {}), which is used",
                    l.id, s.file, s.line, s.document
                )),
            };
            p.invalid.push((l.id, e));
            continue;
        }
        first.insert(l.id.clone(), l.source.clone());
        p.valid.push(l);
    }
    let mut docs = None;
    for e in m.errors {
        match &e.object {
            Some(o) if !o.kind.is_empty() && !o.name.is_empty() => p.invalid.push((o.clone(), e)),
            _ => {
                let docs = docs.get_or_insert_with(|| split_documents(text));
                let guess = docs
                    .iter()
                    .find(|d| d.index == e.document)
                    .and_then(|d| guess_identity(&d.text, config));
                p.unnamed.push((e, guess));
            }
        }
    }
    (p, m.warnings)
}

/// The identity a block-style document names, read line by line without a YAML parser:
/// a top-level `kind:`, and `name:` and `namespace:` directly under a top-level
/// `metadata:`. For documents that do not parse, to match them with their last good
/// version; `None` when it finds no kind or no name (or a `List`, which holds many).
fn guess_identity(doc: &str, config: &ClusterConfig) -> Option<Id> {
    let mut kind = None;
    let mut name = None;
    let mut namespace = None;
    let mut in_metadata = false;
    let mut child_indent = None;
    for line in doc.lines() {
        let body = line.trim_start_matches(' ');
        if body.trim().is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = line.len() - body.len();
        if indent == 0 {
            in_metadata = false;
            if let Some(v) = body.strip_prefix("kind:") {
                kind = plain_scalar(v);
            } else if let Some(v) = body.strip_prefix("metadata:") {
                // Block style only: nothing after the colon but a comment.
                in_metadata = v.trim().is_empty() || v.trim_start().starts_with('#');
                child_indent = None;
            }
            continue;
        }
        if !in_metadata || *child_indent.get_or_insert(indent) != indent {
            continue;
        }
        if let Some(v) = body.strip_prefix("name:") {
            name = plain_scalar(v);
        } else if let Some(v) = body.strip_prefix("namespace:") {
            namespace = plain_scalar(v);
        }
    }
    let kind = kind?;
    let name = name?;
    // As the loader: Namespace and Node are cluster-scoped; others default the namespace.
    let namespace = match kind.as_str() {
        "List" => return None,
        "Namespace" | "Node" => String::new(),
        _ => namespace.unwrap_or_else(|| config.default_namespace.clone()),
    };
    Some(ObjectRef {
        kind,
        namespace,
        name,
    })
}

/// The value of `key: value` when it is a plain or quoted scalar on the same line.
fn plain_scalar(v: &str) -> Option<String> {
    let v = match v.find(" #") {
        Some(i) => &v[..i],
        None => v,
    }
    .trim();
    let v = v
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
        .unwrap_or(v);
    let structural = v.starts_with(['[', '{', '&', '*', '!', '|', '>', '#', '"', '\'']);
    (!v.is_empty() && !structural).then(|| v.to_string())
}

/// Whether two builds have the same objects (identities and contents, in any order), and
/// with `sources` from the same places (the lines errors point at).
fn same_objects(a: &[Loaded], b: &[Loaded], sources: bool) -> bool {
    type Key<'a> = (&'a Object, Option<&'a Origin>);
    fn by_id(v: &[Loaded], sources: bool) -> BTreeMap<&Id, Key<'_>> {
        // The first of an identity is the one built (later ones are refused).
        let mut out = BTreeMap::new();
        for l in v {
            out.entry(&l.id)
                .or_insert((&l.object, sources.then_some(&l.source)));
        }
        out
    }
    a.len() == b.len() && by_id(a, sources) == by_id(b, sources)
}

// ---------------------------------------------------------------------------------------------
// Sources
// ---------------------------------------------------------------------------------------------

/// Where the proxy's cluster comes from: a [`ManifestDir`], or an API server
/// ([`crate::api::ApiSource`]; its pure part [`crate::api::ApiState`] is a source too).
pub trait Source {
    /// Takes in what changed since the last poll; returns whether the cluster changed. An
    /// error means the source cannot be read now; the cluster then stays as it was.
    fn poll(&mut self) -> Result<bool, String>;
    /// The cluster to program.
    fn cluster(&self) -> &Cluster;
    /// Whether the cluster is complete enough to program. Until then the proxy syncs
    /// nothing, so a restart never replaces the rules in force with an empty plan.
    fn is_ready(&self) -> bool {
        true
    }
    /// Counters and state for `/metrics` and `/healthz`.
    fn status(&self) -> SourceStatus;
    /// Called after each successful sync, which programmed everything taken in so far:
    /// returns the trigger times of those changes (for
    /// `kubeproxy_network_programming_duration_seconds`) and forgets them.
    fn take_programmed(&mut self) -> Vec<SystemTime> {
        Vec::new()
    }
    /// What the source is, for logs: `the manifest directory DIR`, `the API server URL`.
    fn describe(&self) -> String;
}

/// Which kind of source a [`SourceStatus`] describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceKind {
    /// A manifest directory.
    #[default]
    Manifests,
    /// A Kubernetes API server.
    Api,
}

/// A source's counters and state, as `/metrics` and `/healthz` show them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceStatus {
    /// Which kind of source.
    pub kind: SourceKind,
    /// Problems now: manifest files with problems, or API objects refused as invalid.
    pub problems: usize,
    /// Objects refused as invalid so far (API).
    pub invalid_total: u64,
    /// Service changes taken in so far (API; kube-proxy's service change count).
    pub service_changes: Option<u64>,
    /// EndpointSlice changes taken in so far (API).
    pub endpoint_changes: Option<u64>,
    /// Services with Service changes not programmed yet.
    pub service_changes_pending: usize,
    /// Services with EndpointSlice changes not programmed yet.
    pub endpoint_changes_pending: usize,
    /// Watch failures so far, per resource (API).
    pub watch_errors: BTreeMap<&'static str, u64>,
    /// Since when the API server does not answer, and its last error.
    pub unreachable_since: Option<(SystemTime, String)>,
    /// What the source waits for before the first sync (`the first list of services`).
    pub waiting_for: Option<String>,
}

impl SourceStatus {
    /// A status with nothing to report.
    pub fn new(kind: SourceKind) -> SourceStatus {
        SourceStatus {
            kind,
            ..SourceStatus::default()
        }
    }
}

impl Source for ManifestDir {
    fn poll(&mut self) -> Result<bool, String> {
        ManifestDir::poll(self).map_err(|e| e.to_string())
    }

    fn cluster(&self) -> &Cluster {
        ManifestDir::cluster(self)
    }

    fn status(&self) -> SourceStatus {
        SourceStatus {
            problems: self.broken_files(),
            ..SourceStatus::new(SourceKind::Manifests)
        }
    }

    fn describe(&self) -> String {
        format!("the manifest directory {}", self.dir.display())
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// Upper bounds of the sync duration histograms: 1 ms doubling to 16.384 s, as kube-proxy's
/// `sync_proxy_rules_duration_seconds` (`ExponentialBuckets(0.001, 2, 15)`).
const BUCKETS_MS: [u64; 15] = [
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
];

/// Upper bounds of kube-proxy's `network_programming_duration_seconds`: 0.25 s and 0.5 s,
/// every second to 59 s, every 5 s to 115 s, every 30 s to 5 min.
fn programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| f64::from(60 + 5 * i)));
    b.extend((0..7).map(|i| f64::from(120 + 30 * i)));
    b
}

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

/// A Prometheus histogram with fixed upper bounds (seconds).
#[derive(Clone, Debug)]
struct Histogram {
    bounds: Vec<f64>,
    /// Observations per bucket (not cumulative); the last slot is `+Inf`.
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn new(bounds: Vec<f64>) -> Histogram {
        Histogram {
            counts: vec![0; bounds.len() + 1],
            bounds,
            count: 0,
            sum: 0.0,
        }
    }

    fn sync() -> Histogram {
        Histogram::new(BUCKETS_MS.iter().map(|ms| *ms as f64 / 1000.0).collect())
    }

    fn observe(&mut self, secs: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.count += 1;
        self.sum += secs;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

#[derive(Debug)]
struct MetricsState {
    /// Every sync attempt, and by kind.
    sync: Histogram,
    sync_full: Histogram,
    sync_partial: Histogram,
    /// From a change's trigger time to the end of the sync that programmed it.
    programming: Histogram,
    /// Syncs by (ok, full).
    totals: BTreeMap<(bool, bool), u64>,
    errors: u64,
    services: usize,
    endpoints: usize,
    frontends: usize,
    rules_written: usize,
    source: SourceStatus,
    last_sync_unix: f64,
    last_queued_unix: f64,
    last_ok: Option<Instant>,
    last_ok_wall: Option<SystemTime>,
    /// When the metrics were made (for "no sync yet" in `/healthz`).
    started_wall: SystemTime,
    /// This node's Node is being deleted or tainted for deletion.
    node_terminating: bool,
}

impl Default for MetricsState {
    fn default() -> Self {
        MetricsState {
            sync: Histogram::sync(),
            sync_full: Histogram::sync(),
            sync_partial: Histogram::sync(),
            programming: Histogram::new(programming_buckets()),
            totals: BTreeMap::new(),
            errors: 0,
            services: 0,
            endpoints: 0,
            frontends: 0,
            rules_written: 0,
            source: SourceStatus::default(),
            last_sync_unix: 0.0,
            last_queued_unix: 0.0,
            last_ok: None,
            last_ok_wall: None,
            started_wall: SystemTime::now(),
            node_terminating: false,
        }
    }
}

/// Renders a dataplane's own metrics (Prometheus text) when `/metrics` is scraped.
pub type DataplaneMetrics = Box<dyn Fn() -> String + Send + Sync>;

/// What `/healthz` answers: healthy or not, and a body that says why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// 200 when true, 503 when false.
    pub healthy: bool,
    /// `ok` or `stale: ...`, then the last sync time, the current time, and what the
    /// source waits for or cannot reach.
    pub body: String,
}

/// The proxy's counters and gauges, shared with the metrics server.
pub struct Metrics {
    state: Mutex<MetricsState>,
    stale_after: Duration,
    dataplane: Mutex<Option<DataplaneMetrics>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("state", &self.state)
            .field("stale_after", &self.stale_after)
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch.
fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// RFC 3339 in UTC, to the millisecond.
fn rfc3339(t: SystemTime) -> String {
    use k8s_openapi::jiff::{Timestamp, Unit};
    Timestamp::try_from(t)
        .and_then(|t| t.round(Unit::Millisecond))
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("{:.3}", unix(t)))
}

/// RFC 3339 in UTC, to the microsecond.
fn rfc3339_micros(t: SystemTime) -> String {
    use k8s_openapi::jiff::{Timestamp, Unit};
    Timestamp::try_from(t)
        .and_then(|t| t.round(Unit::Microsecond))
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("{:.6}", unix(t)))
}

impl Metrics {
    /// Empty metrics; `/healthz` passes while the last successful sync is younger than
    /// twice `sync_period` (kube-proxy's health timeout).
    pub fn new(sync_period: Duration) -> Metrics {
        Metrics::with_stale_after(sync_period * 2)
    }

    /// Empty metrics; `/healthz` passes while the last successful sync is at most
    /// `stale_after` old. Keep it above the sync period: the periodic resync is what keeps
    /// a proxy with nothing to change healthy.
    pub fn with_stale_after(stale_after: Duration) -> Metrics {
        Metrics {
            state: Mutex::new(MetricsState::default()),
            stale_after,
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

    fn observe(s: &mut MetricsState, took: Duration, full: bool) {
        let secs = took.as_secs_f64();
        s.sync.observe(secs);
        if full {
            s.sync_full.observe(secs);
        } else {
            s.sync_partial.observe(secs);
        }
    }

    /// Records a successful sync at `at` that took `took`; `services` is the number of
    /// Services in the cluster it programmed.
    pub fn sync_ok(&self, at: Instant, took: Duration, report: &SyncReport, services: usize) {
        let mut s = self.lock();
        Self::observe(&mut s, took, report.full);
        *s.totals.entry((true, report.full)).or_default() += 1;
        s.services = services;
        s.endpoints = report.endpoints;
        s.frontends = report.frontends;
        s.rules_written = report.written;
        let wall = SystemTime::now();
        s.last_sync_unix = unix(wall);
        s.last_ok = Some(at);
        s.last_ok_wall = Some(wall);
    }

    /// Records a failed sync of the given kind.
    pub fn sync_failed(&self, took: Duration, kind: SyncKind) {
        let mut s = self.lock();
        Self::observe(&mut s, took, kind == SyncKind::Full);
        *s.totals.entry((false, kind == SyncKind::Full)).or_default() += 1;
        s.errors += 1;
    }

    /// Records that a sync which ended at `end` programmed changes triggered at
    /// `triggers` (one per Service).
    pub fn programmed(&self, end: SystemTime, triggers: &[SystemTime]) {
        let mut s = self.lock();
        for t in triggers {
            // A trigger "in the future" (clock skew between nodes) counts as zero.
            let latency = end.duration_since(*t).unwrap_or_default();
            s.programming.observe(latency.as_secs_f64());
        }
    }

    /// Records that a change was taken in at `at`, to be programmed by the next sync.
    pub fn queued(&self, at: SystemTime) {
        self.lock().last_queued_unix = unix(at);
    }

    /// Sets the source's counters and state.
    pub fn set_source(&self, status: SourceStatus) {
        self.lock().source = status;
    }

    /// Sets the number of manifest files with problems.
    pub fn set_manifest_errors(&self, files: usize) {
        self.lock().source.problems = files;
    }

    /// Whether the last successful sync is at most the staleness limit old at `now`.
    pub fn healthy_at(&self, now: Instant) -> bool {
        self.health_at(now, SystemTime::now()).healthy
    }

    /// Records whether this node's Node is being deleted (or tainted for deletion by the
    /// cluster autoscaler): `/healthz` then fails so that load balancers drain the node,
    /// while `/livez` does not (the proxy itself is fine).
    pub fn set_node_terminating(&self, terminating: bool) {
        self.lock().node_terminating = terminating;
    }

    /// `/healthz` at `now` (monotonic, for the check) and `wall` (for the body).
    /// Healthy while the last successful sync is at most the staleness limit old (the
    /// periodic resync refreshes it when nothing changes) and this node is not being
    /// deleted.
    pub fn health_at(&self, now: Instant, wall: SystemTime) -> Health {
        self.check(now, wall, true)
    }

    /// `/livez` at `now`: as [`Metrics::health_at`], but a Node being deleted does not
    /// count (kube-proxy's `/livez`: restarting the proxy would not help).
    pub fn liveness_at(&self, now: Instant, wall: SystemTime) -> Health {
        self.check(now, wall, false)
    }

    fn check(&self, now: Instant, wall: SystemTime, node_aware: bool) -> Health {
        let s = self.lock();
        let age = s.last_ok.map(|t| now.saturating_duration_since(t));
        let fresh = age.is_some_and(|a| a <= self.stale_after);
        let draining = node_aware && s.node_terminating;
        let healthy = fresh && !draining;
        let limit = self.stale_after.as_secs_f64();
        let mut body = match age {
            Some(_) if draining => {
                "node terminating: this Node is being deleted or tainted ToBeDeletedByClusterAutoscaler\n"
                    .to_string()
            }
            Some(_) if fresh => "ok\n".to_string(),
            Some(a) => format!(
                "stale: the last successful sync is {:.1}s old (limit {limit}s)\n",
                a.as_secs_f64()
            ),
            None => format!(
                "stale: no successful sync since the start at {}\n",
                rfc3339(s.started_wall)
            ),
        };
        match (s.last_ok_wall, age) {
            (Some(w), Some(a)) => {
                let _ = writeln!(
                    body,
                    "last successful sync: {} ({:.1}s ago)",
                    rfc3339(w),
                    a.as_secs_f64()
                );
            }
            _ => body.push_str("last successful sync: never\n"),
        }
        let _ = writeln!(body, "current time: {}", rfc3339(wall));
        if let Some(w) = &s.source.waiting_for {
            let _ = writeln!(body, "waiting for {w}");
        }
        if let Some((since, error)) = &s.source.unreachable_since {
            let _ = writeln!(
                body,
                "API server not reachable since {}: {error}",
                rfc3339(*since)
            );
        }
        Health { healthy, body }
    }

    /// The metrics in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let s = self.lock();
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        s.sync.render(
            &mut out,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "How long one sync of the dataplane took (partial or full).",
        );
        s.sync_full.render(
            &mut out,
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "How long one full sync (everything rewritten) took.",
        );
        s.sync_partial.render(
            &mut out,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "How long one partial sync (only what changed) took.",
        );
        s.programming.render(
            &mut out,
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to the end of the sync that programmed it, per Service.",
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
        let mut counters: Vec<(&str, &str, u64)> = vec![(
            "svcnat_sync_errors_total",
            "Syncs of the dataplane that failed.",
            s.errors,
        )];
        let src = &s.source;
        if let Some(n) = src.service_changes {
            counters.push((
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "Service changes taken in from the API server.",
                n,
            ));
        }
        if let Some(n) = src.endpoint_changes {
            counters.push((
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "EndpointSlice changes taken in from the API server.",
                n,
            ));
        }
        if src.kind == SourceKind::Api {
            counters.push((
                "svcnat_api_invalid_objects_total",
                "API objects refused as invalid (each refusal of each version).",
                src.invalid_total,
            ));
        }
        for (name, help, value) in counters {
            head(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {value}");
        }
        if src.kind == SourceKind::Api {
            let name = "svcnat_api_watch_errors_total";
            head(
                &mut out,
                name,
                "counter",
                "Failed list or watch requests, per resource (retried with backoff).",
            );
            for (resource, n) in &src.watch_errors {
                let _ = writeln!(out, "{name}{{resource=\"{resource}\"}} {n}");
            }
        }
        let mut gauges: Vec<(&str, &str, String)> = vec![
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
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "Unix time of the last successful sync.",
                format!("{:.3}", s.last_sync_unix),
            ),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "Unix time a change was last taken in for the next sync.",
                format!("{:.3}", s.last_queued_unix),
            ),
        ];
        match src.kind {
            SourceKind::Manifests => gauges.push((
                "svcnat_manifest_errors",
                "Manifest files with problems: rejected texts, or objects left out.",
                src.problems.to_string(),
            )),
            SourceKind::Api => {
                gauges.push((
                    "kubeproxy_sync_proxy_rules_service_changes_pending",
                    "Services with Service changes not programmed yet.",
                    src.service_changes_pending.to_string(),
                ));
                gauges.push((
                    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                    "Services with EndpointSlice changes not programmed yet.",
                    src.endpoint_changes_pending.to_string(),
                ));
                gauges.push((
                    "svcnat_api_invalid_objects",
                    "API objects refused as invalid now (their last good version, if any, stays in force).",
                    src.problems.to_string(),
                ));
                gauges.push((
                    "svcnat_api_reachable",
                    "1 while the API server answers, 0 since a watch failed until it answers again.",
                    u8::from(src.unreachable_since.is_none()).to_string(),
                ));
            }
        }
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

/// At most this many connections are answered at once per server; more are closed
/// unanswered. The health server has its own budget, so a flood of slow metrics scrapers
/// cannot starve a load balancer's health checks.
const MAX_METRICS_CONNECTIONS: usize = 16;
/// A request must arrive whole within this time.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

/// What a server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routes {
    /// `/metrics` and `/healthz` (kube-proxy's `--metrics-bind-address` server).
    Metrics,
    /// `/healthz` and `/livez` only (kube-proxy's `--healthz-bind-address` server, which
    /// cloud load balancers probe on every node).
    Health,
}

impl Routes {
    fn name(self) -> &'static str {
        match self {
            Routes::Metrics => "metrics",
            Routes::Health => "healthz",
        }
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `addr` from background threads; returns
/// the bound address (useful with port 0). Each connection gets its own thread, at most
/// 16 at once; a request must arrive within 2 s and fit in 16 KiB.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<SocketAddr> {
    serve_routes(addr, metrics, Routes::Metrics)
}

/// Serves `routes` on `addr` as [`serve`] does, with a connection budget of its own.
pub fn serve_routes(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    routes: Routes,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let what = routes.name();
    thread::Builder::new()
        .name(format!("svcnat-{what}"))
        .spawn(move || {
            for stream in listener.incoming() {
                let s = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(error = %e, server = what, "accept");
                        continue;
                    }
                };
                if open.fetch_add(1, Ordering::SeqCst) >= MAX_METRICS_CONNECTIONS {
                    open.fetch_sub(1, Ordering::SeqCst);
                    debug!(
                        server = what,
                        "too many connections; closing one unanswered"
                    );
                    continue;
                }
                let (metrics, done) = (metrics.clone(), open.clone());
                let spawned = thread::Builder::new()
                    .name(format!("svcnat-{what}-conn"))
                    .spawn(move || {
                        if let Err(e) = answer(s, &metrics, routes) {
                            debug!(error = %e, server = what, "connection");
                        }
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    open.fetch_sub(1, Ordering::SeqCst);
                    debug!(error = %e, server = what, "cannot start a connection thread");
                }
            }
        })?;
    Ok(bound)
}

/// Reads one HTTP request and writes the response.
fn answer(mut stream: TcpStream, metrics: &Metrics, routes: Routes) -> io::Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !(buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request too slow"));
        }
        stream.set_read_timeout(Some(left))?;
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
        ("GET" | "HEAD", "/metrics") if routes == Routes::Metrics => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        // /livez (kube-proxy's, on the health server): alive and syncing; unlike /healthz
        // it ignores a Node being deleted.
        ("GET" | "HEAD", "/healthz") | ("GET" | "HEAD", "/livez")
            if path == "/healthz" || routes == Routes::Health =>
        {
            let h = if path == "/livez" {
                metrics.liveness_at(Instant::now(), SystemTime::now())
            } else {
                metrics.health_at(Instant::now(), SystemTime::now())
            };
            let status = if h.healthy {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "text/plain; charset=utf-8", h.body)
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            match routes {
                Routes::Metrics => "not found: try /metrics or /healthz\n",
                Routes::Health => "not found: try /healthz or /livez\n",
            }
            .to_string(),
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

/// Settings of the proxy loop over a manifest directory.
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

    /// The loop's settings, without the directory's.
    pub fn sync_config(&self) -> SyncConfig {
        SyncConfig {
            node: self.node.clone(),
            min_sync_period: self.min_sync_period,
            sync_period: self.sync_period,
            poll_interval: self.poll_interval,
        }
    }
}

/// Settings of the proxy loop over any [`Source`].
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// This node and the proxy's masquerade settings.
    pub node: NodeContext,
    /// Changes within this period after a sync are batched into the next one.
    pub min_sync_period: Duration,
    /// Everything is rewritten this often, to repair drift.
    pub sync_period: Duration,
    /// How often the source is polled.
    pub poll_interval: Duration,
}

impl SyncConfig {
    /// kube-proxy's defaults (1 s minimum, 30 s full resync) and a 200 ms poll.
    pub fn new(node: NodeContext) -> Self {
        SyncConfig {
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
    /// The source was polled.
    pub polled: bool,
    /// A sync ran: its kind and whether it succeeded.
    pub synced: Option<(SyncKind, bool)>,
}

/// The node proxy: a source (a manifest directory by default) kept in step with a
/// dataplane.
#[derive(Debug)]
pub struct Proxy<D: Dataplane, S: Source = ManifestDir> {
    config: SyncConfig,
    source: S,
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
    source_error: Option<String>,
    /// The source said it is not ready yet (logged once).
    waiting: bool,
    /// The health check node ports of `externalTrafficPolicy: Local` Services, when served.
    service_health: Option<crate::svchealth::ServiceHealth>,
    /// Set (by SIGHUP) to ask for a reload: the source polled and everything rewritten now.
    reload: Option<Arc<AtomicBool>>,
    /// Reads the node's interface addresses (NodePorts are served on them).
    local_addresses: Option<AddressReader>,
    /// When the addresses were last read.
    addresses_read: Option<Instant>,
}

/// Reads the addresses of the node's interfaces (e.g. [`crate::cli::local_addresses`]).
pub struct AddressReader(pub Box<dyn FnMut() -> io::Result<Vec<std::net::IpAddr>> + Send>);

impl std::fmt::Debug for AddressReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AddressReader")
    }
}

/// How often [`Proxy::follow_local_addresses`] reads the node's addresses.
pub const ADDRESS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl<D: Dataplane> Proxy<D, ManifestDir> {
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
        Ok(Proxy::with_source(
            source,
            config.sync_config(),
            dataplane,
            metrics,
        ))
    }
}

impl<D: Dataplane, S: Source> Proxy<D, S> {
    /// A proxy over `source`; nothing is synced before the first [`Proxy::step`], nor
    /// before the source is ready.
    pub fn with_source(source: S, config: SyncConfig, dataplane: D, metrics: Arc<Metrics>) -> Self {
        metrics.set_source(source.status());
        let agent = NodeAgent::new(config.node.clone(), dataplane);
        Proxy {
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
            source_error: None,
            waiting: false,
            service_health: None,
            reload: None,
            local_addresses: None,
            addresses_read: None,
        }
    }

    /// Reloads whenever `flag` is set (the programs set it on SIGHUP): the source is polled
    /// and every rule rewritten at the next step, as the periodic resync would.
    pub fn reload_on(&mut self, flag: Arc<AtomicBool>) {
        self.reload = Some(flag);
    }

    /// Serves NodePorts on the node's interface addresses as `read` gives them (see
    /// [`svcnat_core::plan::NodeContext::local_addresses`]), read now and every
    /// [`ADDRESS_CHECK_INTERVAL`]: an address added or removed later is followed within
    /// about a second.
    pub fn follow_local_addresses(&mut self, read: AddressReader) {
        self.local_addresses = Some(read);
        self.addresses_read = None;
    }

    /// Reads the node's addresses when due; when they changed, the plan is recompiled for
    /// them and everything rewritten at the next sync.
    fn check_local_addresses(&mut self, now: Instant) {
        let Some(read) = &mut self.local_addresses else {
            return;
        };
        if self
            .addresses_read
            .is_some_and(|t| now.saturating_duration_since(t) < ADDRESS_CHECK_INTERVAL)
        {
            return;
        }
        self.addresses_read = Some(now);
        let mut addresses = match (read.0)() {
            Ok(a) => a,
            Err(e) => {
                warn!("cannot read the node's addresses: {e}");
                return;
            }
        };
        addresses.sort();
        addresses.dedup();
        let node = self.agent.plan().node();
        if node.local_addresses == addresses {
            return;
        }
        let mut node = node.clone();
        info!(
            addresses = ?addresses,
            nodeports = ?{
                let mut n = node.clone();
                n.local_addresses = addresses.clone();
                n.nodeport_ips().collect::<Vec<_>>()
            },
            "the node's addresses changed: NodePorts follow"
        );
        node.local_addresses = addresses;
        self.agent.set_node(node);
        self.dirty = true;
        self.full_next = true;
    }

    /// Serves the health check node ports of the plan's `externalTrafficPolicy: Local`
    /// Services with `health`, following the plan after every successful sync.
    pub fn serve_service_health(&mut self, health: crate::svchealth::ServiceHealth) {
        self.service_health = Some(health);
    }

    /// Whether a sync has succeeded yet.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The source, to change (tests feed events through it).
    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// The node agent (plan and dataplane).
    pub fn agent(&mut self) -> &mut NodeAgent<D> {
        &mut self.agent
    }

    fn poll(&mut self) {
        match self.source.poll() {
            Ok(changed) => {
                if self.source_error.take().is_some() {
                    info!(source = %self.source.describe(), "the source is readable again");
                }
                if changed {
                    self.dirty = true;
                    self.metrics.queued(SystemTime::now());
                }
            }
            Err(e) => {
                if self.source_error.as_deref() != Some(e.as_str()) {
                    warn!(source = %self.source.describe(), error = %e, "cannot read the source; everything stays as it is");
                }
                self.source_error = Some(e);
            }
        }
        self.metrics.set_source(self.source.status());
        self.metrics.set_node_terminating(
            self.source
                .cluster()
                .node(&self.config.node.node_name)
                .is_some_and(|n| n.terminating),
        );
    }

    /// Polls the source when a poll is due, then syncs when one is due: after a change
    /// (at most once per `min_sync_period`, so changes coalesce), and a full resync every
    /// `sync_period`. Nothing is synced while the source is not ready. Time is a
    /// parameter so tests can drive it.
    pub fn step(&mut self, now: Instant) -> Step {
        let mut step = Step::default();
        if self
            .reload
            .as_ref()
            .is_some_and(|f| f.swap(false, Ordering::SeqCst))
        {
            info!("reload asked (SIGHUP): re-reading the source and rewriting every rule");
            self.next_poll = None;
            self.last_full = None;
            self.retry_at = None;
        }
        if self.next_poll.is_none_or(|t| now >= t) {
            self.next_poll = Some(now + self.config.poll_interval);
            step.polled = true;
            self.poll();
            self.check_local_addresses(now);
        }
        if !self.source.is_ready() {
            if !self.waiting {
                let why = self.source.status().waiting_for.unwrap_or_default();
                info!(source = %self.source.describe(), "waiting for {why} before the first sync");
                self.waiting = true;
            }
            return step;
        }
        // Someone changed the rules behind our back (the iptables canary is gone): rewrite
        // everything now rather than at the next periodic resync. A pending change syncs
        // anyway, and that sync checks the canary itself.
        if self.ready && !self.dirty && self.retry_at.is_none() {
            match self.agent.dataplane().drifted() {
                Ok(true) => {
                    warn!(
                        "the dataplane drifted from its last sync (canary gone: rules changed \
                         from outside, or interfaces it owns came or went); full resync"
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
        step.synced = Some(self.sync(now));
        step
    }

    /// One sync: the diff when something changed, else everything.
    fn sync(&mut self, now: Instant) -> (SyncKind, bool) {
        self.last_attempt = Some(now);
        let started = Instant::now();
        let (kind, result) = if self.dirty {
            let r = self.agent.sync(self.source.cluster());
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
                let end = SystemTime::now();
                self.metrics.sync_ok(now, took, &report, services);
                // Everything taken in before the sync is programmed now.
                let triggers = self.source.take_programmed();
                self.metrics.programmed(end, &triggers);
                self.metrics.set_source(self.source.status());
                // The newest trigger time this sync programmed (to the microsecond): with
                // the log line's own time stamp, it tells which changes a sync carried.
                let newest_trigger = triggers
                    .iter()
                    .max()
                    .map_or_else(|| "-".to_string(), |t| rfc3339_micros(*t));
                info!(
                    kind = kind.as_str(),
                    services,
                    frontends = report.frontends,
                    endpoints = report.endpoints,
                    rules = report.written,
                    conntrack_deleted = report.conntrack_deleted,
                    duration = ?took,
                    programmed = triggers.len(),
                    %newest_trigger,
                    "synced"
                );
                for e in report.conntrack_errors.iter().chain(&report.warnings) {
                    warn!("{e}");
                }
                self.dirty = false;
                self.full_next = false;
                if report.full {
                    self.last_full = Some(now);
                }
                self.retry_at = None;
                self.backoff = Duration::ZERO;
                self.ready = true;
                if let Some(h) = &mut self.service_health {
                    h.update(self.agent.plan());
                }
                (kind, true)
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
                (kind, false)
            }
        }
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

    fn problems_of(m: &ManifestDir, file: &str) -> String {
        m.problems()
            .get(file)
            .map(|l| l.join("\n"))
            .unwrap_or_default()
    }

    fn node_port_of(m: &ManifestDir, name: &str) -> Option<u16> {
        m.cluster()
            .service(&ObjectName::new("default", name))
            .and_then(|s| s.ports.first().and_then(|p| p.node_port))
    }

    #[test]
    fn one_bad_object_leaves_the_others_of_its_file_in_force() {
        let d = Scratch::new();
        // One good Service and one bad one (node port 80) in the same file.
        let text = format!("{}---\n{}", svc("good", "vote", 30001), svc("bad", "x", 80));
        d.write("a.yaml", &text);
        d.write("b.yaml", &pod("vote-0", "10.244.0.10"));
        let m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        assert_eq!(selector_of(&m, "good").as_deref(), Some("app=vote"));
        assert_eq!(selector_of(&m, "bad"), None);
        assert_eq!(m.cluster().pods().count(), 1);
        assert_eq!(m.broken_files(), 1);
        assert_eq!(m.loaded_files().collect::<Vec<_>>(), ["a.yaml", "b.yaml"]);
        let p = problems_of(&m, "a.yaml");
        assert!(
            p.contains("a.yaml:25: document 1: Service default/bad: spec.ports[0].nodePort")
                && p.ends_with("(left out)"),
            "{p}"
        );
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_good_version_and_applies_its_neighbour() {
        let d = Scratch::new();
        let two = |a: &str, b: &str| format!("{a}---\n{b}");
        d.write(
            "ab.yaml",
            &two(&svc("a", "vote", 30000), &svc("b", "vote", 30001)),
        );
        let mut m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        assert_eq!(m.cluster().services().count(), 2);

        // a gets an invalid node port, b a new selector: b changes, a stays as it was.
        d.write("ab.yaml", &two(&svc("a", "x", 80), &svc("b", "b1", 30001)));
        assert!(settle(&mut m));
        assert_eq!(selector_of(&m, "a").as_deref(), Some("app=vote"));
        assert_eq!(selector_of(&m, "b").as_deref(), Some("app=b1"));
        let p = problems_of(&m, "ab.yaml");
        assert!(
            p.contains("ab.yaml:12: document 0: Service default/a: spec.ports[0].nodePort")
                && p.ends_with("(its last good version stays in force)"),
            "{p}"
        );

        // a's document no longer parses: it is matched by the name a line scan finds.
        let broken = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\nspec: {ports: [\n";
        d.write("ab.yaml", &two(broken, &svc("b", "b2", 30001)));
        assert!(settle(&mut m));
        assert_eq!(selector_of(&m, "a").as_deref(), Some("app=vote"));
        assert_eq!(selector_of(&m, "b").as_deref(), Some("app=b2"));
        let p = problems_of(&m, "ab.yaml");
        assert!(p.contains("ab.yaml:"), "{p}");
        assert!(
            p.contains(
                "(its last good version stays in force: Service default/a, matched by name)"
            ),
            "{p}"
        );

        // No name to be found: matched by document index.
        let nameless = "apiVersion: v1\nkind: Service\nmetadata: {name: a\n";
        d.write("ab.yaml", &two(nameless, &svc("b", "b3", 30001)));
        assert!(settle(&mut m));
        assert_eq!(selector_of(&m, "a").as_deref(), Some("app=vote"));
        assert_eq!(selector_of(&m, "b").as_deref(), Some("app=b3"));
        let p = problems_of(&m, "ab.yaml");
        assert!(
            p.contains("Service default/a, matched by document index)"),
            "{p}"
        );

        // b leaves a text that is shorter and does not load: it may be cut short (a
        // rewrite in place), so b stays too.
        d.write("ab.yaml", nameless);
        assert!(!settle(&mut m));
        assert_eq!(selector_of(&m, "b").as_deref(), Some("app=b3"));
        assert_eq!(selector_of(&m, "a").as_deref(), Some("app=vote"));
        assert!(problems_of(&m, "ab.yaml").contains("looks incomplete"));

        // Fixed, a whole text without b: applied, b goes, no problems left.
        d.write("ab.yaml", &svc("a", "a1", 30000));
        assert!(settle(&mut m));
        assert_eq!(selector_of(&m, "a").as_deref(), Some("app=a1"));
        assert_eq!(selector_of(&m, "b"), None);
        assert_eq!(m.broken_files(), 0);

        // A new object that is invalid from the start is left out, and says so.
        d.write("ab.yaml", &two(&svc("a", "a1", 30000), &svc("c", "c", 80)));
        assert!(!settle(&mut m), "nothing in force changes");
        assert_eq!(selector_of(&m, "c"), None);
        assert!(problems_of(&m, "ab.yaml").ends_with("(left out)"));
    }

    #[test]
    fn a_clash_refuses_the_later_claimant_which_keeps_its_last_good_version() {
        let d = Scratch::new();
        d.write("a.yaml", &svc("a", "vote", 30000));
        d.write("b.yaml", &svc("b", "vote", 30001));
        let mut m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        assert_eq!(m.cluster().services().count(), 2);
        // b.yaml (later in name order) now claims a's node port: refused, and b keeps
        // its last good version.
        d.write("b.yaml", &svc("b", "other", 30000));
        assert!(!settle(&mut m));
        assert_eq!(selector_of(&m, "a").as_deref(), Some("app=vote"));
        assert_eq!(node_port_of(&m, "b"), Some(30001));
        let p = problems_of(&m, "b.yaml");
        assert!(
            p.contains("provided port is already allocated (to Service default/a in ")
                && p.contains("a.yaml:1)")
                && p.ends_with("(its last good version stays in force)"),
            "{p}"
        );
        // Once a goes, b's text fits and is applied (refused texts are retried).
        d.remove("a.yaml");
        assert!(settle(&mut m));
        assert_eq!(selector_of(&m, "b").as_deref(), Some("app=other"));
        assert_eq!(m.broken_files(), 0);
    }

    /// Who holds what, per Service: (selector, node port).
    fn holdings(m: &ManifestDir) -> Vec<(String, Option<String>, Option<u16>)> {
        ["a", "b", "c", "z"]
            .iter()
            .map(|n| (n.to_string(), selector_of(m, n), node_port_of(m, n)))
            .collect()
    }

    #[test]
    fn ownership_follows_file_order_the_same_in_every_process_and_after_restarts() {
        let d = Scratch::new();
        d.write("b.yaml", &svc("b", "vote", 30001));
        let mut m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        // a.yaml (earlier in name order) arrives claiming b's node port, next to a Pod:
        // the text that sorts first holds it, as a fresh process would decide.
        let a = format!(
            "{}{}",
            svc("a", "vote", 30001),
            pod("vote-0", "10.244.0.10")
        );
        d.write("a.yaml", &a);
        assert!(settle(&mut m));
        assert_eq!(node_port_of(&m, "a"), Some(30001));
        assert_eq!(selector_of(&m, "b"), None, "the later claimant is refused");
        assert_eq!(m.cluster().pods().count(), 1, "its neighbour is in");
        let p = problems_of(&m, "b.yaml");
        assert!(
            p.contains("b.yaml:12: document 0: Service default/b: spec.ports[0].nodePort")
                && p.contains("already allocated (to Service default/a in ")
                && p.ends_with("(left out)"),
            "{p}"
        );
        assert!(!m.problems().contains_key("a.yaml"));

        // Unrelated changes move nothing: another file, another object of a.yaml.
        d.write("c.yaml", &svc("c", "vote", 30002));
        assert!(settle(&mut m));
        d.write("a.yaml", &a.replace("10.244.0.10", "10.244.0.11"));
        assert!(settle(&mut m));
        d.write("z.yaml", &svc("z", "vote", 30002));
        assert!(!settle(&mut m));
        let running = holdings(&m);
        assert_eq!(
            running,
            [
                ("a".into(), Some("app=vote".into()), Some(30001)),
                ("b".into(), None, None),
                ("c".into(), Some("app=vote".into()), Some(30002)),
                ("z".into(), None, None),
            ]
        );
        // A restart, or svcnat-dns reading the same directory, agrees.
        let fresh = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        assert_eq!(holdings(&fresh), running);
        assert_eq!(fresh.problems(), m.problems());

        // Once the holder lets go, the refused claimant gets it.
        d.remove("a.yaml");
        assert!(settle(&mut m));
        assert_eq!(node_port_of(&m, "b"), Some(30001));
    }

    #[test]
    fn one_identity_one_object_across_files() {
        let d = Scratch::new();
        d.write("b.yaml", &svc("vote", "b", 30001));
        let mut m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        // The same Service in a file that sorts later: refused, as the API server
        // refuses to create an object that exists.
        d.write("c.yaml", &svc("vote", "c", 30002));
        assert!(!settle(&mut m));
        assert_eq!(selector_of(&m, "vote").as_deref(), Some("app=b"));
        let p = problems_of(&m, "c.yaml");
        assert!(
            p.contains("c.yaml:1: document 0: Service default/vote: metadata.name: services \"vote\" already exists (defined at ")
                && p.contains("b.yaml:1)"),
            "{p}"
        );
        // b.yaml lets go of it: c.yaml's version comes in.
        d.write("b.yaml", &pod("vote-0", "10.244.0.10"));
        assert!(settle(&mut m));
        assert_eq!(selector_of(&m, "vote").as_deref(), Some("app=c"));
        assert_eq!(m.broken_files(), 0);
        let fresh = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        assert_eq!(selector_of(&fresh, "vote").as_deref(), Some("app=c"));
    }

    #[test]
    fn a_json_file_loads() {
        let d = Scratch::new();
        let json = r#"{
  "apiVersion": "v1",
  "kind": "Service",
  "metadata": {"name": "vote"},
  "spec": {
    "type": "NodePort",
    "selector": {"app": "vote"},
    "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30000}]
  }
}
"#;
        d.write("svc.json", json);
        d.write("notes.jsonl", json);
        let m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        assert_eq!(selector_of(&m, "vote").as_deref(), Some("app=vote"));
        assert_eq!(node_port_of(&m, "vote"), Some(30000));
        assert_eq!(m.loaded_files().collect::<Vec<_>>(), ["svc.json"]);
    }

    #[test]
    fn a_clash_costs_one_more_build_whatever_the_number_of_files() {
        let d = Scratch::new();
        for i in 0..40 {
            d.write(
                &format!("s{i:02}.yaml"),
                &svc(&format!("s{i}"), "vote", 30100 + i),
            );
        }
        let mut m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        assert_eq!(m.builds, 1);
        // A clean change: one build.
        d.write("s05.yaml", &svc("s5", "other", 30105));
        assert!(settle(&mut m));
        assert_eq!(m.builds, 2);
        // A clash, a clean edit and a new object at once: one build with everything,
        // one more with the clashing change back at its last good version.
        d.write("s09.yaml", &svc("s9", "other", 30106));
        d.write("s08.yaml", &svc("s8", "other", 30108));
        d.write("t.yaml", &svc("t", "vote", 30200));
        assert!(settle(&mut m));
        assert_eq!(m.builds, 2 + 2);
        assert_eq!(selector_of(&m, "s9").as_deref(), Some("app=vote"));
        assert_eq!(node_port_of(&m, "s9"), Some(30109));
        assert_eq!(selector_of(&m, "s8").as_deref(), Some("app=other"));
        assert_eq!(node_port_of(&m, "t"), Some(30200));
        assert_eq!(m.problems().keys().collect::<Vec<_>>(), ["s09.yaml"]);
        // Later edits elsewhere: the refused text costs one more build each, no more.
        d.write("s10.yaml", &svc("s10", "other", 30110));
        assert!(settle(&mut m));
        assert_eq!(m.builds, 4 + 2);
    }

    /// Every Service's selector, by name.
    fn selectors(m: &ManifestDir) -> BTreeMap<String, String> {
        m.cluster()
            .services()
            .map(|s| {
                let sel = s
                    .selector
                    .as_ref()
                    .map(|x| x.to_string())
                    .unwrap_or_default();
                (s.name.name.clone(), sel)
            })
            .collect()
    }

    /// Polls like the proxy (every 200 ms) for `n` polls, checking the state each time.
    fn poll_for(m: &mut ManifestDir, n: usize, mut check: impl FnMut(&ManifestDir)) {
        for _ in 0..n {
            thread::sleep(DEFAULT_POLL_INTERVAL);
            m.poll().unwrap();
            check(m);
        }
    }

    #[test]
    fn rewrites_in_place_never_apply_a_momentary_state() {
        let d = Scratch::new();
        let text = |app: &str| {
            ["x", "y", "z"]
                .iter()
                .enumerate()
                .map(|(i, n)| format!("---\n{}", svc(n, app, 30000 + i as u16)))
                .collect::<String>()
        };
        let path = d.0.join("svcs.yaml");
        fs::write(&path, text("old")).unwrap();
        let mut m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        let old = selectors(&m);
        assert_eq!(old.len(), 3);
        let whole_or_old = |m: &ManifestDir| {
            let now = selectors(m);
            assert_eq!(now.len(), 3, "a Service went missing: {now:?}");
            for v in now.values() {
                assert!(v == "app=old" || v == "app=new", "{now:?}");
            }
        };
        // Truncated in place, and left so for a while (several polls).
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(0).unwrap();
        poll_for(&mut m, 4, |m| assert_eq!(selectors(m), old));
        assert!(problems_of(&m, "svcs.yaml").contains("empty"));
        // The first chunk: the new text cut in the middle of its second document.
        let new = text("new");
        let cut = new.find("name: y").unwrap() + 4;
        fs::write(&path, &new[..cut]).unwrap();
        poll_for(&mut m, 4, whole_or_old);
        assert_eq!(selectors(&m)["y"], "app=old");
        assert_eq!(selectors(&m)["z"], "app=old");
        // The rest: the whole new text applies.
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&new.as_bytes()[cut..]).unwrap();
        drop(f);
        poll_for(&mut m, 3, whole_or_old);
        assert!(
            selectors(&m).values().all(|v| v == "app=new"),
            "{:?}",
            selectors(&m)
        );
        assert_eq!(m.broken_files(), 0);
        // Atomic replace stays the fast path: seen at the second poll.
        d.write("svcs.yaml", &text("newer"));
        assert!(settle(&mut m));
        assert!(selectors(&m).values().all(|v| v == "app=newer"));
    }

    #[test]
    fn files_over_the_size_limit_are_refused_by_their_size() {
        let d = Scratch::new();
        d.write("good.yaml", &svc("good", "vote", 30000));
        d.write("was-good.yaml", &svc("kept", "vote", 30001));
        // A sparse 2 GiB file: never read (reading it would need 2 GiB of memory).
        let huge = fs::File::create(d.0.join("huge.yaml")).unwrap();
        huge.set_len(2 << 30).unwrap();
        let mut m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        assert_eq!(selector_of(&m, "good").as_deref(), Some("app=vote"));
        let p = problems_of(&m, "huge.yaml");
        assert!(
            p.contains("huge.yaml: 2147483648 bytes, over the limit of 16777216 bytes per manifest file: not read"),
            "{p}"
        );
        // A file with objects in force that grows over the limit keeps them.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(d.0.join("was-good.yaml"))
            .unwrap();
        f.set_len(MAX_MANIFEST_BYTES + 1).unwrap();
        poll_for(&mut m, 2, |_| {});
        assert_eq!(selector_of(&m, "kept").as_deref(), Some("app=vote"));
        assert!(problems_of(&m, "was-good.yaml").contains("over the limit"));
        // A neighbour's edit still applies at once.
        d.write("good.yaml", &svc("good", "edited", 30000));
        assert!(settle(&mut m));
        assert_eq!(selector_of(&m, "good").as_deref(), Some("app=edited"));
    }

    #[test]
    fn replicas_over_the_limit_name_the_workload_and_hold_up_nothing() {
        let d = Scratch::new();
        d.write(
            "huge.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: huge}\nspec:\n  replicas: 70000\n  \
             selector: {matchLabels: {app: h}}\n  template:\n    metadata: {labels: {app: h}}\n    \
             spec: {containers: [{name: c, image: x}]}\n",
        );
        d.write("good.yaml", &svc("good", "vote", 30000));
        let started = Instant::now();
        let m = ManifestDir::open(&d.0, ClusterConfig::default()).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(m.cluster().pods().count(), 0);
        assert_eq!(selector_of(&m, "good").as_deref(), Some("app=vote"));
        let p = problems_of(&m, "huge.yaml");
        assert!(
            p.contains(
                "Deployment default/huge: spec.replicas: Too many: 70000: must be at most 10000"
            ),
            "{p}"
        );
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
            Ok(SyncReport::new(
                false,
                diff.ops.len(),
                self.frontends,
                plan.endpoint_count(),
            ))
        }

        fn resync(&mut self, plan: &Plan) -> Result<SyncReport, FakeError> {
            self.calls.push("resync");
            if self.fail {
                return Err(FakeError);
            }
            self.frontends = plan.frontends().count();
            Ok(SyncReport::new(
                true,
                7,
                self.frontends,
                plan.endpoint_count(),
            ))
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
        assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 3\n"));
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 3\n")
        );
        assert!(text.contains("kubeproxy_sync_full_proxy_rules_duration_seconds_count 2\n"));
        assert!(text.contains("kubeproxy_sync_partial_proxy_rules_duration_seconds_count 1\n"));
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
        let report = SyncReport::new(true, 12, 2, 3);
        metrics.sync_ok(Instant::now(), Duration::from_millis(3), &report, 1);
        let health = http_get(addr, "/healthz");
        assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
        assert!(
            health.contains("\r\n\r\nok\nlast successful sync: "),
            "{health}"
        );
        let m = http_get(addr, "/metrics?x=1");
        assert!(m.contains("Content-Type: text/plain; version=0.0.4"), "{m}");
        assert!(m.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 0\n"));
        assert!(m.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1\n"));
        assert!(m.contains("svcnat_rules_written 12\n"));
        assert!(m.contains("svcnat_endpoints 3\n"));
        assert!(http_get(addr, "/nope").starts_with("HTTP/1.1 404 "));
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "POST /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 405 "), "{out}");
    }

    #[test]
    fn health_goes_stale_only_without_successful_syncs() {
        let metrics = Metrics::with_stale_after(Duration::from_secs(60));
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let h = metrics.health_at(t0, wall);
        assert!(!h.healthy);
        assert!(
            h.body
                .starts_with("stale: no successful sync since the start at "),
            "{}",
            h.body
        );
        assert!(
            h.body.contains("\nlast successful sync: never\n"),
            "{}",
            h.body
        );
        metrics.sync_ok(
            t0,
            Duration::from_millis(1),
            &SyncReport::new(true, 1, 1, 1),
            1,
        );
        let h = metrics.health_at(ms(t0, 60_000), wall);
        assert!(h.healthy, "{}", h.body);
        assert!(
            h.body.starts_with("ok\nlast successful sync: "),
            "{}",
            h.body
        );
        assert!(h.body.contains("(60.0s ago)\ncurrent time: "), "{}", h.body);
        let h = metrics.health_at(ms(t0, 61_000), wall);
        assert!(!h.healthy);
        assert!(
            h.body
                .starts_with("stale: the last successful sync is 61.0s old (limit 60s)\n"),
            "{}",
            h.body
        );
        // Why: the API server is gone.
        let mut status = SourceStatus::new(SourceKind::Api);
        status.unreachable_since = Some((
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            "connection refused".into(),
        ));
        metrics.set_source(status);
        let h = metrics.health_at(ms(t0, 61_000), wall);
        assert!(
            h.body.ends_with(
                "API server not reachable since 2023-11-14T22:13:20Z: connection refused\n"
            ),
            "{}",
            h.body
        );
        assert!(metrics.render().contains("\nsvcnat_api_reachable 0\n"));
    }

    #[test]
    fn a_quiet_proxy_stays_healthy_and_a_failing_one_does_not() {
        let d = Scratch::new();
        d.write("svc.yaml", &svc("vote", "vote", 30000));
        let (mut p, metrics) = proxy(&d);
        let t0 = Instant::now();
        // Nothing changes for ten minutes: the periodic resync keeps /healthz at 200.
        for t in (0..600_000).step_by(1000) {
            p.step(ms(t0, t));
            assert!(metrics.healthy_at(ms(t0, t)), "at {t} ms");
        }
        let full = p.agent().dataplane().calls.len();
        assert_eq!(full, 20, "one resync every 30 s");
        // The dataplane starts failing right after the resync at 600 s: retries back
        // off, no sync succeeds, and /healthz turns 503 once the last success is older
        // than twice the sync period.
        assert_eq!(p.step(ms(t0, 600_000)).synced, Some((SyncKind::Full, true)));
        p.agent().dataplane().fail = true;
        for t in (601_000..=720_000).step_by(1000) {
            p.step(ms(t0, t));
            let healthy = metrics.healthy_at(ms(t0, t));
            assert_eq!(healthy, t <= 660_000, "at {t} ms");
        }
        assert!(p.agent().dataplane().calls.len() > full + 2);
    }

    fn api_service(name: &str, ip: &str) -> k8s_openapi::api::core::v1::Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"port": 80, "targetPort": 8080}]}
        }))
        .unwrap()
    }

    fn api_slice(
        name: &str,
        service: &str,
        ips: &[&str],
        trigger: SystemTime,
    ) -> k8s_openapi::api::discovery::v1::EndpointSlice {
        let trigger = k8s_openapi::jiff::Timestamp::try_from(trigger)
            .unwrap()
            .to_string();
        let endpoints: Vec<serde_json::Value> = ips
            .iter()
            .map(|ip| serde_json::json!({"addresses": [ip], "conditions": {"ready": true}}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name, "namespace": "ns",
                "labels": {"kubernetes.io/service-name": service},
                "annotations": {crate::api::TRIGGER_TIME_ANNOTATION: trigger}
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}]
        }))
        .unwrap()
    }

    #[test]
    fn an_api_fed_proxy_waits_for_the_lists_and_measures_programming() {
        use crate::api::{ApiEvent, ApiState, ApiStateConfig, Resource};
        use kube::runtime::watcher::Event;
        let wall = SystemTime::now();
        let state = ApiState::new(ApiStateConfig {
            role: crate::api::ApiRole::Proxy,
            node_name: "node-0".into(),
            service_proxy_name: None,
            started: wall - Duration::from_secs(60),
        });
        let node = NodeContext::new(
            "node-0",
            vec![IpAddr::from([192, 168, 50, 11])],
            vec!["10.244.0.0/16".parse().unwrap()],
        );
        let metrics = Arc::new(Metrics::new(Duration::from_secs(30)));
        let mut p = Proxy::with_source(
            state,
            SyncConfig::new(node),
            Fake::default(),
            metrics.clone(),
        );
        let t0 = Instant::now();

        // Nothing listed yet: no sync at all, however long (an empty plan would wipe the
        // rules a previous run left).
        for t in (0..40_000).step_by(200) {
            assert_eq!(p.step(ms(t0, t)).synced, None, "at {t} ms");
        }
        assert!(p.agent().dataplane().calls.is_empty());
        let h = metrics.health_at(ms(t0, 40_000), SystemTime::now());
        assert!(!h.healthy);
        assert!(
            h.body
                .contains("\nwaiting for the first list of services and endpointslices\n"),
            "{}",
            h.body
        );

        // The lists arrive: one full sync.
        let st = p.source_mut();
        st.handle(ApiEvent::service(Event::Init));
        st.handle(ApiEvent::service(Event::InitApply(api_service(
            "web",
            "10.96.0.10",
        ))));
        st.handle(ApiEvent::service(Event::InitDone));
        st.handle(ApiEvent::slice(Event::Init));
        st.handle(ApiEvent::slice(Event::InitApply(api_slice(
            "web-1",
            "web",
            &["10.244.0.5"],
            wall - Duration::from_secs(120),
        ))));
        st.handle(ApiEvent::slice(Event::InitDone));
        assert_eq!(p.step(ms(t0, 40_000)).synced, Some((SyncKind::Full, true)));
        assert_eq!(p.agent().plan().endpoint_count(), 1);
        assert!(metrics.healthy_at(ms(t0, 40_000)));

        // An endpoint is added, 3 s after its Pod became ready: a partial sync after the
        // minimum sync period, and one latency observation of at least 3 s.
        let trigger = SystemTime::now() - Duration::from_secs(3);
        p.source_mut()
            .handle(ApiEvent::slice(Event::Apply(api_slice(
                "web-1",
                "web",
                &["10.244.0.5", "10.244.0.6"],
                trigger,
            ))));
        assert_eq!(p.step(ms(t0, 40_200)).synced, None);
        let text = metrics.render();
        assert!(
            text.contains("\nkubeproxy_sync_proxy_rules_endpoint_changes_pending 1\n"),
            "{text}"
        );
        assert!(
            text.contains("\nkubeproxy_network_programming_duration_seconds_count 0\n"),
            "{text}"
        );
        assert_eq!(
            p.step(ms(t0, 41_000)).synced,
            Some((SyncKind::Partial, true))
        );
        assert_eq!(p.agent().plan().endpoint_count(), 2);
        let text = metrics.render();
        for want in [
            "\nkubeproxy_network_programming_duration_seconds_count 1\n",
            "\nkubeproxy_network_programming_duration_seconds_bucket{le=\"2\"} 0\n",
            "\nkubeproxy_network_programming_duration_seconds_bucket{le=\"60\"} 1\n",
            "\nkubeproxy_sync_proxy_rules_endpoint_changes_total 2\n",
            "\nkubeproxy_sync_proxy_rules_service_changes_total 1\n",
            "\nkubeproxy_sync_proxy_rules_endpoint_changes_pending 0\n",
            "\nsvcnat_api_reachable 1\n",
            "\nsvcnat_api_invalid_objects 0\n",
        ] {
            assert!(text.contains(want), "{want:?} in {text}");
        }

        // The API server goes away: nothing is removed, the periodic resync goes on,
        // and /healthz says so while staying healthy.
        p.source_mut().handle(ApiEvent::WatchError {
            resource: Resource::Services,
            error: "connection refused".into(),
            at: SystemTime::now(),
        });
        assert_eq!(p.step(ms(t0, 41_200)).synced, None);
        assert_eq!(p.step(ms(t0, 70_000)).synced, Some((SyncKind::Full, true)));
        assert_eq!(p.agent().plan().endpoint_count(), 2);
        let h = metrics.health_at(ms(t0, 70_000), SystemTime::now());
        assert!(h.healthy);
        assert!(
            h.body.contains("\nAPI server not reachable since "),
            "{}",
            h.body
        );
        let text = metrics.render();
        assert!(
            text.contains("\nsvcnat_api_watch_errors_total{resource=\"services\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("\nsvcnat_api_reachable 0\n"), "{text}");
    }
}
