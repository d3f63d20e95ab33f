//! The per-domain metadata store of domain snapshots.
//!
//! Layout under the state directory (`--state-dir`, default `/var/lib/snapctl`):
//!
//! ```text
//! ROOT/                          0700
//!   domains/                     0700
//!     NAME/                      0700, one per defined domain
//!       lock                     flock(2) target: one snapctl at a time works on a domain
//!       domain.json              the DomainRecord (0600), replaced atomically by rename
//!       domain.json.tmp          a save in progress (a stale one is removed by the next save)
//!       memory/SNAP.mem          memory images of snapshots
//! ```
//!
//! Changes go through a [`DomainLock`] (an exclusive `flock` on `NAME/lock`), which loads and
//! saves the record. A save writes a temporary file, syncs it, renames it over `domain.json` and
//! syncs the directory, so a reader without the lock ([`Store::read`]) and a crash at any point
//! both see either the old or the new record, never a mix.
//!
//! The record keeps the snapshot tree of the domain: every snapshot names its parent (or none for
//! a root), names are unique and the parent links have no cycles. [`DomainRecord::validate`]
//! checks this on every load and before every save.
//!
//! The rendering functions at the end ([`snapshot_json`], [`list_json`], [`render_table`],
//! [`render_tree`], [`render_info`]) are pure and produce what `snapctl snapshot list|info`
//! prints; the JSON shapes are the CLI contract of DESIGN.md.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use snap_core::{Error, ErrorKind, Result};

use crate::xlcfg::DomainConfig;

/// The record format version this code reads and writes.
pub const RECORD_VERSION: u32 = 1;

/// The largest `domain.json` that is read (16 MiB); anything bigger is refused as corrupt.
pub const MAX_RECORD_BYTES: u64 = 16 << 20;

/// How long [`Store::lock`] waits for another snapctl to release a domain.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a waiting [`Store::lock_timeout`] retries the lock.
const LOCK_POLL: Duration = Duration::from_millis(50);

/// The longest domain name (ASCII: bytes and characters agree).
const MAX_DOMAIN_NAME: usize = 64;

/// The longest snapshot name, in bytes (it becomes a file name, `SNAP.mem`).
const MAX_SNAPSHOT_NAME: usize = 128;

/// How many existing snapshot names a "no such snapshot" error lists.
const MAX_NAMES_IN_ERROR: usize = 10;

/// The widest a name column of [`render_table`] grows; longer names overflow their own row only.
const MAX_NAME_COLUMN: usize = 40;

/// The widest the `CREATED` column of [`render_table`] grows.
const MAX_CREATED_COLUMN: usize = 32;

/// How many tree levels [`render_tree`] indents; deeper ones are shown with their depth.
const MAX_TREE_INDENT: usize = 32;

/// The file holding the record.
const RECORD_FILE: &str = "domain.json";

/// The temporary file a save writes before renaming it over [`RECORD_FILE`].
const RECORD_TMP: &str = "domain.json.tmp";

/// The file the domain lock is taken on.
const LOCK_FILE: &str = "lock";

/// The state of a domain (the guest), as recorded in a snapshot and listed by `domain list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    /// The guest runs.
    Running,
    /// The guest exists but its vCPUs are stopped.
    Paused,
    /// No guest: the domain is only defined.
    Shutoff,
}

impl DomainState {
    /// The contract's name: `running`, `paused` or `shutoff`.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::Shutoff => "shutoff",
        }
    }
}

/// How consistent a snapshot's disks are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Disks only, as after a power cut.
    Crash,
    /// Disks only, with the guest's file systems frozen through the guest agent.
    Quiesced,
    /// Disks and memory taken together: reverting resumes the guest where it was.
    Memory,
}

impl Consistency {
    /// The contract's name: `crash`, `quiesced` or `memory`.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::Quiesced => "quiesced",
            Consistency::Memory => "memory",
        }
    }
}

/// How a disk's state is kept in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskKind {
    /// Inside the image (qcow2 internal snapshot) or next to it under its own name (LV snapshot,
    /// RBD snap).
    Internal,
    /// A frozen layer below a new active overlay (qcow2 overlay, VHD differencing child, RBD clone).
    External,
}

impl DiskKind {
    /// The contract's name: `internal` or `external`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskKind::Internal => "internal",
            DiskKind::External => "external",
        }
    }
}

/// One disk of a domain snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDisk {
    /// The guest device (`xvda`, `hda`, ...).
    pub vdev: String,
    /// The disk backend: `qcow2`, `vhd`, `lvm` or `rbd`.
    pub backend: String,
    /// Internal or external.
    pub kind: DiskKind,
    /// Where the snapshot's state lives: the frozen layer (external), the image holding the
    /// internal snapshot, or the LV.
    pub path: PathBuf,
    /// For an internal snapshot, its name inside the image (or the snapshot LV's name).
    #[serde(default)]
    pub snapshot: Option<String>,
}

/// One domain snapshot: disks, optionally memory, and the config the domain had.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The snapshot's name, unique within its domain.
    pub name: String,
    /// The snapshot this one was taken on top of; `None` for a root.
    #[serde(default)]
    pub parent: Option<String>,
    /// When it was taken, RFC 3339 in UTC (see [`timestamp_now`]).
    pub created: String,
    /// Free text from `--description`.
    #[serde(default)]
    pub description: Option<String>,
    /// The domain's state when the snapshot was taken.
    pub state: DomainState,
    /// The memory image, if memory was saved (see [`Store::memory_path`]).
    #[serde(default)]
    pub memory: Option<PathBuf>,
    /// How consistent the snapshot is.
    pub consistency: Consistency,
    /// From the guest's stop to its resume, in milliseconds; `None` if the guest never ran
    /// during the snapshot.
    #[serde(default)]
    pub pause_window_ms: Option<f64>,
    /// The domain's config at snapshot time (a revert restores it).
    pub config: DomainConfig,
    /// The snapshot's disks.
    #[serde(default)]
    pub disks: Vec<SnapshotDisk>,
}

/// A running guest, as far as snapctl started it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Runtime {
    /// The hypervisor driver that started it (`qemu` or `xen`).
    pub driver: String,
    /// The QEMU (or device model) process.
    #[serde(default)]
    pub pid: Option<i32>,
    /// The QMP socket.
    #[serde(default)]
    pub qmp: Option<PathBuf>,
    /// The guest agent socket.
    #[serde(default)]
    pub qga: Option<PathBuf>,
    /// When it was started, RFC 3339 in UTC.
    pub started: String,
}

/// Everything snapctl keeps about one domain: `ROOT/domains/NAME/domain.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainRecord {
    /// The record format, [`RECORD_VERSION`].
    pub version: u32,
    /// The domain's name (also its directory's name).
    pub name: String,
    /// `qemu` or `xen`.
    pub hypervisor: String,
    /// The current config: disk targets follow external snapshots and reverts.
    pub config: DomainConfig,
    /// The xl.cfg the domain was defined from.
    #[serde(default)]
    pub source: Option<PathBuf>,
    /// The running guest, if any.
    #[serde(default)]
    pub runtime: Option<Runtime>,
    /// The current snapshot: the one the domain's disks were last taken from or reverted to.
    #[serde(default)]
    pub current: Option<String>,
    /// The snapshots, in creation order.
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord>,
}

/// The metadata store: a directory of domain records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    root: PathBuf,
}

/// The exclusive lock on one domain; it loads and saves the domain's record. Dropping it releases
/// the lock.
#[derive(Debug)]
pub struct DomainLock {
    name: String,
    dir: PathBuf,
    lock_path: PathBuf,
    _flock: Flock<File>,
}

/// The current time as RFC 3339 in UTC with whole seconds (`2026-01-02T03:04:05Z`), the format of
/// [`SnapshotRecord::created`] and [`Runtime::started`].
pub fn timestamp_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

/// Checks a name a user gave: `kind` is `"snapshot"` for snapshot names, anything else (`"domain"`,
/// `"clone"`) applies the domain rules and is only used in the message.
///
/// - domain names: 1 to 64 of `A-Z a-z 0-9 _ . -`, not `.` or `..`;
/// - snapshot names: 1 to 128 bytes, no `/`, no leading `.`, printable: no control characters,
///   no whitespace other than a plain space, no invisible formatting characters (zero-width,
///   bidirectional overrides).
///
/// Both end up as file names (`domains/NAME`, `memory/SNAP.mem`), so neither can escape its folder.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let problem = if kind == "snapshot" {
        snapshot_name_problem(name)
    } else {
        domain_name_problem(name)
    };
    match problem {
        None => Ok(()),
        Some(why) => Err(Error::invalid(format!(
            "invalid {kind} name {}: {why}",
            shown(name)
        ))),
    }
}

/// Why `name` is not a valid domain name, if it is not.
fn domain_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("it is empty".into());
    }
    if name.len() > MAX_DOMAIN_NAME {
        return Some(format!("longer than {MAX_DOMAIN_NAME} characters"));
    }
    if name == "." || name == ".." {
        return Some("'.' and '..' are not names".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Some("only letters, digits, '_', '.' and '-' are allowed".into());
    }
    None
}

/// Why `name` is not a valid snapshot name, if it is not.
fn snapshot_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("it is empty".into());
    }
    if name.len() > MAX_SNAPSHOT_NAME {
        return Some(format!("longer than {MAX_SNAPSHOT_NAME} bytes"));
    }
    if name.starts_with('.') {
        return Some("it must not start with '.'".into());
    }
    if name.contains('/') {
        return Some("it must not contain '/'".into());
    }
    if name
        .chars()
        .any(|c| c.is_control() || (c.is_whitespace() && c != ' ') || is_invisible(c))
    {
        return Some("only printable characters are allowed".into());
    }
    None
}

/// Invisible formatting characters (zero-width, bidirectional overrides, soft hyphen, BOM) that
/// would make a name print as something else.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{206f}'
            | '\u{feff}'
    )
}

/// `s` for a message: quoted, control characters escaped, at most 64 characters.
fn shown(s: &str) -> String {
    let mut out = String::from("\"");
    for (i, c) in s.chars().enumerate() {
        if i == 64 {
            out.push_str("...");
            break;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    out
}

/// `s` for human output: control characters escaped (names in a valid record have none; a
/// description may have newlines).
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl Store {
    /// A store rooted at `root` (the state directory). Does no I/O; directories are created by
    /// the first [`Store::lock`].
    pub fn new(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
        }
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of all domains: `ROOT/domains`.
    fn domains_dir(&self) -> PathBuf {
        self.root.join("domains")
    }

    /// The directory of domain `name`: `ROOT/domains/NAME`. The name is not checked here.
    pub fn domain_dir(&self, name: &str) -> PathBuf {
        self.domains_dir().join(name)
    }

    /// Where the memory image of snapshot `snap` of `domain` goes:
    /// `ROOT/domains/DOMAIN/memory/SNAP.mem`. Names are not checked here (records' names are).
    pub fn memory_path(&self, domain: &str, snap: &str) -> PathBuf {
        self.domain_dir(domain)
            .join("memory")
            .join(format!("{snap}.mem"))
    }

    /// The defined domains, sorted: the directories under `ROOT/domains` with a valid name and a
    /// `domain.json`. A missing state directory is an empty list.
    pub fn list_domains(&self) -> Result<Vec<String>> {
        let dir = self.domains_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list domains", e).with_path(&dir)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list domains", e).with_path(&dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if domain_name_problem(&name).is_some() {
                continue;
            }
            if entry.path().join(RECORD_FILE).is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Reads domain `name`'s record without taking the lock (for list commands: saves are atomic
    /// renames, so this sees a whole record). `None` if the domain is not defined.
    pub fn read(&self, name: &str) -> Result<Option<DomainRecord>> {
        validate_name("domain", name)?;
        read_record(&self.domain_dir(name), name)
    }

    /// Takes the exclusive lock on domain `name`, waiting up to [`DEFAULT_LOCK_TIMEOUT`].
    pub fn lock(&self, name: &str) -> Result<DomainLock> {
        self.lock_timeout(name, DEFAULT_LOCK_TIMEOUT)
    }

    /// Takes the exclusive lock on domain `name`, creating the state directory and the domain's
    /// directory (0700) as needed. Retries every 50 ms; after `timeout` it fails with
    /// [`ErrorKind::InUse`]. A zero timeout tries once.
    pub fn lock_timeout(&self, name: &str, timeout: Duration) -> Result<DomainLock> {
        validate_name("domain", name)?;
        let dir = self.domain_dir(name);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io("create the domain's state directory", e).with_path(&dir))?;
        let lock_path = dir.join(LOCK_FILE);
        // No deadline at all for a timeout too large to add (`Duration::MAX`).
        let deadline = Instant::now().checked_add(timeout);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| Error::io("open the domain lock", e).with_path(&lock_path))?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => {
                    return Ok(DomainLock {
                        name: name.to_string(),
                        dir,
                        lock_path,
                        _flock: flock,
                    });
                }
                Err((f, Errno::EWOULDBLOCK)) => {
                    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    if left == Some(Duration::ZERO) {
                        return Err(Error::new(
                            ErrorKind::InUse,
                            format!(
                                "another snapctl is working on domain {name} (lock {} held)",
                                lock_path.display()
                            ),
                        ));
                    }
                    std::thread::sleep(left.map_or(LOCK_POLL, |left| left.min(LOCK_POLL)));
                    file = f;
                }
                Err((f, Errno::EINTR)) => file = f,
                Err((_, errno)) => {
                    return Err(Error::io("lock the domain", errno.into()).with_path(&lock_path));
                }
            }
        }
    }
}

impl DomainLock {
    /// The locked domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The locked domain's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lock file.
    pub fn lock_path(&self) -> &Path {
        &self.lock_path
    }

    /// The path of the record file, `domain.json`.
    pub fn record_path(&self) -> PathBuf {
        self.dir.join(RECORD_FILE)
    }

    /// Loads the record; `None` if the domain is not defined yet. A file over 16 MiB, one that
    /// does not parse or one that breaks the tree's invariants is [`ErrorKind::Corrupt`]; an
    /// unknown `version` is [`ErrorKind::Unsupported`].
    pub fn load(&self) -> Result<Option<DomainRecord>> {
        read_record(&self.dir, &self.name)
    }

    /// Saves `record` atomically: writes `domain.json.tmp` (0600, after removing a stale one),
    /// syncs it, renames it over `domain.json` and syncs the directory. The record must belong to
    /// this domain and be valid ([`DomainRecord::validate`]); otherwise nothing is written.
    pub fn save(&self, record: &DomainRecord) -> Result<()> {
        self.save_with(record, &mut RealSteps)
    }

    /// [`save`](DomainLock::save) with its file-system steps taken by `steps` (a test stands in
    /// for the file system there, to stop between any two steps).
    fn save_with(&self, record: &DomainRecord, steps: &mut dyn ReplaceSteps) -> Result<()> {
        if record.name != self.name {
            return Err(Error::invalid(format!(
                "refusing to save the record of domain {} as domain {}",
                shown(&record.name),
                self.name
            )));
        }
        if record.version != RECORD_VERSION {
            return Err(Error::unsupported(format!(
                "refusing to save domain metadata version {} (this snapctl writes version \
                 {RECORD_VERSION})",
                record.version
            )));
        }
        if let Some(why) = record.invariant_problem() {
            return Err(Error::invalid(format!(
                "refusing to save domain {}: {why}",
                self.name
            )));
        }
        let mut bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::invalid(format!("cannot serialize domain {}: {e}", self.name)))?;
        bytes.push(b'\n');

        let tmp = self.dir.join(RECORD_TMP);
        replace_atomically(steps, &self.dir, &tmp, &self.record_path(), &bytes)
    }

    /// Saves `value` as JSON in `FILE` of the domain folder, atomically (the way [`save`] writes
    /// the record: `FILE.tmp`, 0600, synced, renamed, directory synced). For the operation
    /// journal and other per-domain state that must survive a crash.
    ///
    /// [`save`]: DomainLock::save
    pub fn save_file<T: Serialize>(&self, file: &str, value: &T) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::invalid(format!("cannot serialize {file}: {e}")))?;
        bytes.push(b'\n');
        let tmp = self.dir.join(format!("{file}.tmp"));
        let path = self.dir.join(file);
        replace_atomically(&mut RealSteps, &self.dir, &tmp, &path, &bytes)
    }

    /// Reads `FILE` of the domain folder saved by [`save_file`](DomainLock::save_file); `None`
    /// when there is none. Over 16 MiB or unparsable: [`ErrorKind::Corrupt`].
    pub fn load_file<T: serde::de::DeserializeOwned>(&self, file: &str) -> Result<Option<T>> {
        let path = self.dir.join(file);
        let bytes = match fs::metadata(&path) {
            Ok(meta) if meta.len() > MAX_RECORD_BYTES => {
                return Err(Error::corrupt("file is too large").with_path(&path));
            }
            Ok(_) => fs::read(&path).map_err(|e| Error::io("read", e).with_path(&path))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", e).with_path(&path)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::corrupt(format!("unreadable: {e}")).with_path(&path))
    }

    /// Removes `FILE` of the domain folder (durably); a missing file is fine.
    pub fn remove_file(&self, file: &str) -> Result<()> {
        remove_if_present(&self.dir.join(file))?;
        sync_dir(&self.dir)
    }

    /// Undefines the domain: removes `domain.json` (and a stale temporary file) and the `memory`
    /// folder if it is empty. The caller deletes the snapshots' memory images and disks first;
    /// files still in `memory/` stay. The directory and its lock file stay too (removing a lock
    /// file others may be waiting on would let two snapctls hold "the" lock at once); without
    /// `domain.json` the directory is not listed.
    pub fn remove_domain(&self) -> Result<()> {
        remove_if_present(&self.dir.join(RECORD_TMP))?;
        remove_if_present(&self.record_path())?;
        let memory = self.dir.join("memory");
        match fs::remove_dir(&memory) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty
                ) => {}
            Err(e) => return Err(Error::io("remove the memory folder", e).with_path(&memory)),
        }
        sync_dir(&self.dir)
    }
}

/// The file-system steps of [`replace_atomically`], one call each, so that tests can stand in for
/// the file system: stop ("crash") after any step, or fail one.
trait ReplaceSteps {
    /// Removes the temporary file if a crashed save left one.
    fn remove_stale(&mut self, tmp: &Path) -> Result<()>;
    /// Creates the temporary file (0600; it must not exist), writes `bytes` and syncs them: when
    /// this returns, the bytes are durable.
    fn write_synced(&mut self, tmp: &Path, bytes: &[u8]) -> Result<()>;
    /// Renames the temporary file over `path` (atomically replacing it).
    fn rename(&mut self, tmp: &Path, path: &Path) -> Result<()>;
    /// Syncs the directory: the rename becomes durable.
    fn sync_dir(&mut self, dir: &Path) -> Result<()>;
    /// Removes the temporary file after a failed step (best effort).
    fn discard(&mut self, tmp: &Path);
}

/// The real file system.
struct RealSteps;

impl ReplaceSteps for RealSteps {
    fn remove_stale(&mut self, tmp: &Path) -> Result<()> {
        remove_if_present(tmp)
    }
    fn write_synced(&mut self, tmp: &Path, bytes: &[u8]) -> Result<()> {
        write_synced(tmp, bytes)
    }
    fn rename(&mut self, tmp: &Path, path: &Path) -> Result<()> {
        fs::rename(tmp, path).map_err(|e| Error::io("replace the domain record", e).with_path(path))
    }
    fn sync_dir(&mut self, dir: &Path) -> Result<()> {
        sync_dir(dir)
    }
    fn discard(&mut self, tmp: &Path) {
        let _ = fs::remove_file(tmp);
    }
}

/// Replaces `path` (in `dir`) by a file holding `bytes` so that a crash at any moment leaves the
/// old file or the new one, whole: a stale `tmp` is removed, `tmp` is written and synced, renamed
/// over `path`, and `dir` is synced. On an error `tmp` is removed and `path` is untouched (or,
/// after the rename, already whole and new).
fn replace_atomically(
    steps: &mut dyn ReplaceSteps,
    dir: &Path,
    tmp: &Path,
    path: &Path,
    bytes: &[u8],
) -> Result<()> {
    steps.remove_stale(tmp)?;
    let mut written = steps.write_synced(tmp, bytes);
    if written.is_ok() {
        written = steps.rename(tmp, path);
    }
    if written.is_ok() {
        written = steps.sync_dir(dir);
    }
    if written.is_err() {
        steps.discard(tmp);
    }
    written
}

/// Removes `path`; a missing file is fine.
pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", e).with_path(path)),
    }
}

/// Creates `path` (which must not exist) with mode 0600, writes `bytes` and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("create the domain record", e).with_path(path))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write the domain record", e).with_path(path))
}

/// Syncs a directory, making a rename or removal in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync the directory", e).with_path(dir))
}

/// Reads and checks `DIR/domain.json` of domain `name`.
fn read_record(dir: &Path, name: &str) -> Result<Option<DomainRecord>> {
    let path = dir.join(RECORD_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open the domain record", e).with_path(&path)),
    };
    let too_big = || {
        Error::corrupt(format!(
            "domain record is larger than {} MiB",
            MAX_RECORD_BYTES >> 20
        ))
        .with_path(&path)
    };
    let len = file
        .metadata()
        .map_err(|e| Error::io("read the domain record", e).with_path(&path))?
        .len();
    if len > MAX_RECORD_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("read the domain record", e).with_path(&path))?;
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return Err(too_big());
    }
    parse_record(&bytes, name)
        .map(Some)
        .map_err(|e| e.with_path(&path))
}

/// Parses a record of domain `name`: the version first (so a newer format is reported as such,
/// not as a parse error), then the whole record and its invariants.
fn parse_record(bytes: &[u8], name: &str) -> Result<DomainRecord> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(format!("cannot parse the domain record: {e}")))?;
    let version = value
        .get("version")
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::corrupt("domain record has no valid \"version\""))?;
    if version != u64::from(RECORD_VERSION) {
        return Err(Error::unsupported(format!(
            "domain record version {version} is not supported (this snapctl reads version \
             {RECORD_VERSION})"
        )));
    }
    let record: DomainRecord = serde_json::from_value(value)
        .map_err(|e| Error::corrupt(format!("cannot parse the domain record: {e}")))?;
    if record.name != name {
        return Err(Error::corrupt(format!(
            "domain record names domain {}, but it is stored as {name}",
            shown(&record.name)
        )));
    }
    record.validate()?;
    Ok(record)
}

impl DomainRecord {
    /// A new record (version 1) of a domain with no snapshots and no running guest.
    pub fn new(
        name: &str,
        hypervisor: &str,
        config: DomainConfig,
        source: Option<PathBuf>,
    ) -> DomainRecord {
        DomainRecord {
            version: RECORD_VERSION,
            name: name.to_string(),
            hypervisor: hypervisor.to_string(),
            config,
            source,
            runtime: None,
            current: None,
            snapshots: Vec::new(),
        }
    }

    /// The snapshot called `name`.
    pub fn snapshot(&self, name: &str) -> Option<&SnapshotRecord> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    /// The snapshot called `name`, to change it (do not change its name or parent this way;
    /// [`DomainLock::save`] refuses a record whose invariants broke).
    pub fn snapshot_mut(&mut self, name: &str) -> Option<&mut SnapshotRecord> {
        self.snapshots.iter_mut().find(|s| s.name == name)
    }

    /// The snapshot called `name`, or [`ErrorKind::NotFound`] listing (some of) the snapshots
    /// the domain has.
    pub fn get(&self, name: &str) -> Result<&SnapshotRecord> {
        self.snapshot(name)
            .ok_or_else(|| self.no_such_snapshot(name))
    }

    /// The [`ErrorKind::NotFound`] error for snapshot `name`, naming at most ten that exist.
    fn no_such_snapshot(&self, name: &str) -> Error {
        let existing = if self.snapshots.is_empty() {
            "it has no snapshots".to_string()
        } else {
            let names: Vec<&str> = self
                .snapshots
                .iter()
                .take(MAX_NAMES_IN_ERROR)
                .map(|s| s.name.as_str())
                .collect();
            let more = self.snapshots.len().saturating_sub(names.len());
            let mut list = format!("it has: {}", clean(&names.join(", ")));
            if more > 0 {
                let _ = write!(list, " and {more} more");
            }
            list
        };
        Error::not_found(format!(
            "domain {} has no snapshot {} ({existing})",
            clean(&self.name),
            shown(name)
        ))
    }

    /// The names of the snapshots whose parent is `name`, in creation order.
    pub fn children(&self, name: &str) -> Vec<&str> {
        self.snapshots
            .iter()
            .filter(|s| s.parent.as_deref() == Some(name))
            .map(|s| s.name.as_str())
            .collect()
    }

    /// The names of the snapshots without a parent, in creation order.
    pub fn roots(&self) -> Vec<&str> {
        self.snapshots
            .iter()
            .filter(|s| s.parent.is_none())
            .map(|s| s.name.as_str())
            .collect()
    }

    /// Children of every snapshot (and of `None`, the roots), each in creation order.
    fn child_map(&self) -> HashMap<Option<&str>, Vec<&str>> {
        let mut map: HashMap<Option<&str>, Vec<&str>> = HashMap::new();
        for s in &self.snapshots {
            map.entry(s.parent.as_deref())
                .or_default()
                .push(s.name.as_str());
        }
        map
    }

    /// All snapshots below `name` (not `name` itself) in post-order: every snapshot comes after
    /// all of its descendants, siblings in creation order — the order a delete must go.
    pub fn descendants(&self, name: &str) -> Vec<String> {
        let map = self.child_map();
        let mut out = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        seen.insert(name);
        // (node, index of the next child to visit)
        let mut stack: Vec<(&str, usize)> = vec![(name, 0)];
        while let Some((node, next)) = stack.pop() {
            let child = map
                .get(&Some(node))
                .and_then(|children| children.get(next))
                .copied();
            match child {
                Some(child) => {
                    stack.push((node, next + 1));
                    // A cycle (only possible in an unvalidated record) is not followed twice.
                    if seen.insert(child) {
                        stack.push((child, 0));
                    }
                }
                None => {
                    if node != name {
                        out.push(node.to_string());
                    }
                }
            }
        }
        out
    }

    /// The ancestors of `name`: its parent first, the root last. Empty for a root or an unknown
    /// name.
    pub fn ancestors(&self, name: &str) -> Vec<String> {
        let parents: HashMap<&str, Option<&str>> = self
            .snapshots
            .iter()
            .map(|s| (s.name.as_str(), s.parent.as_deref()))
            .collect();
        let mut out: Vec<String> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::from([name]);
        let mut node = name;
        while let Some(&Some(parent)) = parents.get(node) {
            // A cycle (only possible in an unvalidated record) ends the walk.
            if !seen.insert(parent) {
                break;
            }
            out.push(parent.to_string());
            node = parent;
        }
        out
    }

    /// Whether `a` is a proper ancestor of `b` (its parent, grandparent, ...).
    pub fn is_ancestor(&self, a: &str, b: &str) -> bool {
        self.ancestors(b).iter().any(|x| x == a)
    }

    /// Adds a snapshot at the end (creation order). Its name must be valid and free
    /// ([`ErrorKind::Exists`] otherwise) and its parent must exist ([`ErrorKind::NotFound`]).
    /// `current` is not changed.
    pub fn add_snapshot(&mut self, snap: SnapshotRecord) -> Result<()> {
        validate_name("snapshot", &snap.name)?;
        if self.snapshot(&snap.name).is_some() {
            return Err(Error::new(
                ErrorKind::Exists,
                format!(
                    "domain {} already has a snapshot {}",
                    self.name,
                    shown(&snap.name)
                ),
            ));
        }
        if let Some(parent) = &snap.parent {
            if self.snapshot(parent).is_none() {
                return Err(Error::not_found(format!(
                    "parent snapshot {} of {} does not exist in domain {}",
                    shown(parent),
                    shown(&snap.name),
                    self.name
                )));
            }
        }
        self.snapshots.push(snap);
        Ok(())
    }

    /// Removes snapshot `name` from the metadata and returns it. Its children take its parent as
    /// their parent (they become roots if it was one); if it was current, its parent becomes
    /// current. Files are not touched.
    pub fn remove_snapshot(&mut self, name: &str) -> Result<SnapshotRecord> {
        let index = self
            .snapshots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| self.no_such_snapshot(name))?;
        let removed = self.snapshots.remove(index);
        for s in &mut self.snapshots {
            if s.parent.as_deref() == Some(name) {
                s.parent.clone_from(&removed.parent);
            }
        }
        if self.current.as_deref() == Some(name) {
            self.current.clone_from(&removed.parent);
        }
        Ok(removed)
    }

    /// Checks the invariants: valid domain and snapshot names, unique snapshot names, every
    /// parent exists, no cycles, `current` exists. [`ErrorKind::Corrupt`] on a violation.
    pub fn validate(&self) -> Result<()> {
        match self.invariant_problem() {
            None => Ok(()),
            Some(why) => Err(Error::corrupt(format!(
                "domain record of {}: {why}",
                shown(&self.name)
            ))),
        }
    }

    /// The first broken invariant, described.
    fn invariant_problem(&self) -> Option<String> {
        if let Some(why) = domain_name_problem(&self.name) {
            return Some(format!("invalid domain name: {why}"));
        }
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(self.snapshots.len());
        for (i, s) in self.snapshots.iter().enumerate() {
            if let Some(why) = snapshot_name_problem(&s.name) {
                return Some(format!("invalid snapshot name {}: {why}", shown(&s.name)));
            }
            if index.insert(s.name.as_str(), i).is_some() {
                return Some(format!("two snapshots are named {}", shown(&s.name)));
            }
        }
        for s in &self.snapshots {
            if let Some(parent) = &s.parent {
                if !index.contains_key(parent.as_str()) {
                    return Some(format!(
                        "snapshot {} has a parent {} that does not exist",
                        shown(&s.name),
                        shown(parent)
                    ));
                }
            }
        }
        if let Some(current) = &self.current {
            if !index.contains_key(current.as_str()) {
                return Some(format!(
                    "the current snapshot {} does not exist",
                    shown(current)
                ));
            }
        }
        // Cycle check: walk up from every snapshot; 1 = on the walk now, 2 = known to reach a root.
        let mut mark = vec![0u8; self.snapshots.len()];
        for start in 0..self.snapshots.len() {
            let mut path = Vec::new();
            let mut at = Some(start);
            while let Some(i) = at {
                match mark.get(i).copied() {
                    Some(2) | None => break,
                    Some(1) => {
                        let name = self.snapshots.get(i).map_or("", |s| s.name.as_str());
                        return Some(format!(
                            "the parents of snapshot {} form a cycle",
                            shown(name)
                        ));
                    }
                    Some(_) => {}
                }
                if let Some(m) = mark.get_mut(i) {
                    *m = 1;
                }
                path.push(i);
                at = self
                    .snapshots
                    .get(i)
                    .and_then(|s| s.parent.as_deref())
                    .and_then(|p| index.get(p).copied());
            }
            for i in path {
                if let Some(m) = mark.get_mut(i) {
                    *m = 2;
                }
            }
        }
        None
    }
}

/// The contract's SNAP object (DESIGN.md, `snapshot info --json`) of `snap` in `rec`.
pub fn snapshot_json(rec: &DomainRecord, snap: &SnapshotRecord) -> Value {
    snap_object(snap, &rec.children(&snap.name))
}

/// The SNAP object of `snap` with the given children.
fn snap_object(snap: &SnapshotRecord, children: &[&str]) -> Value {
    let disks: Vec<Value> = snap
        .disks
        .iter()
        .map(|d| {
            json!({
                "vdev": d.vdev,
                "kind": d.kind.as_str(),
                "path": d.path.to_string_lossy(),
            })
        })
        .collect();
    json!({
        "name": snap.name,
        "parent": snap.parent,
        "children": children,
        "created": snap.created,
        "state": snap.state.as_str(),
        "memory": snap.memory.is_some(),
        "consistency": snap.consistency.as_str(),
        "pause_window_ms": snap.pause_window_ms.map_or(Value::Null, Value::from),
        "disks": disks,
        "description": snap.description,
    })
}

/// The contract's `snapshot list --json` object: `{"domain", "current", "snapshots": [SNAP...]}`
/// with the snapshots in creation order.
pub fn list_json(rec: &DomainRecord) -> Value {
    let map = rec.child_map();
    let snapshots: Vec<Value> = rec
        .snapshots
        .iter()
        .map(|s| {
            let children = map
                .get(&Some(s.name.as_str()))
                .map_or(&[][..], Vec::as_slice);
            snap_object(s, children)
        })
        .collect();
    json!({
        "domain": rec.name,
        "current": rec.current,
        "snapshots": snapshots,
    })
}

/// The line printed for a domain without snapshots.
fn no_snapshots(rec: &DomainRecord) -> String {
    format!("domain {} has no snapshots\n", clean(&rec.name))
}

/// `s` left-aligned in `width` characters (longer text is kept whole).
fn pad(s: &str, width: usize) -> String {
    let len = s.chars().count();
    let mut out = s.to_string();
    out.extend(std::iter::repeat_n(' ', width.saturating_sub(len)));
    out
}

/// The human `snapshot list`: one row per snapshot in creation order with name, creation time,
/// state, memory (yes/no), consistency and parent; the current snapshot is marked `*`. Column
/// widths are capped, so one long name only widens its own row.
pub fn render_table(rec: &DomainRecord) -> String {
    if rec.snapshots.is_empty() {
        return no_snapshots(rec);
    }
    let rows: Vec<[String; 6]> = rec
        .snapshots
        .iter()
        .map(|s| {
            [
                clean(&s.name),
                clean(&s.created),
                s.state.as_str().to_string(),
                if s.memory.is_some() { "yes" } else { "no" }.to_string(),
                s.consistency.as_str().to_string(),
                s.parent.as_deref().map_or_else(|| "-".to_string(), clean),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "CREATED",
        "STATE",
        "MEMORY",
        "CONSISTENCY",
        "PARENT",
    ];
    let caps = [
        MAX_NAME_COLUMN,
        MAX_CREATED_COLUMN,
        usize::MAX,
        usize::MAX,
        usize::MAX,
        0,
    ];
    let mut widths = [0usize; 6];
    for (col, (width, cap)) in widths.iter_mut().zip(caps).enumerate() {
        let longest = rows
            .iter()
            .filter_map(|r| r.get(col))
            .map(|c| c.chars().count())
            .chain(header.get(col).map(|h| h.len()))
            .max()
            .unwrap_or(0);
        *width = longest.min(cap);
    }
    let line = |mark: &str, cells: [&str; 6]| -> String {
        let mut out = String::from(mark);
        let last = cells.len() - 1;
        for (col, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if col == last {
                out.push_str(cell);
            } else {
                out.push_str(&pad(cell, width));
                out.push_str("  ");
            }
        }
        out.push('\n');
        out
    };
    let mut out = line("  ", header);
    for (s, row) in rec.snapshots.iter().zip(&rows) {
        let mark = if rec.current.as_deref() == Some(s.name.as_str()) {
            "* "
        } else {
            "  "
        };
        out.push_str(&line(mark, row.each_ref().map(String::as_str)));
    }
    out
}

/// The human `snapshot list --tree`: the snapshot tree with ASCII branches (`|-` for a child
/// with younger siblings, `+-` for the last one), roots and siblings in creation order, the
/// current snapshot marked `(current)`. Levels deeper than 32 are not indented further but
/// followed by their depth (`[depth 40]`).
pub fn render_tree(rec: &DomainRecord) -> String {
    if rec.snapshots.is_empty() {
        return no_snapshots(rec);
    }
    let map = rec.child_map();
    let no_children: Vec<&str> = Vec::new();
    let mut out = String::new();
    let mut seen: HashSet<&str> = HashSet::new();
    // Depth-first without recursion: each stack frame is a list of siblings and the index of the
    // next one to print; `levels` has one flag per printed ancestor, true if it has younger
    // siblings (then a `|` runs down past its subtree).
    let roots = map.get(&None).unwrap_or(&no_children);
    let mut stack: Vec<(&[&str], usize)> = vec![(roots.as_slice(), 0)];
    let mut levels: Vec<bool> = Vec::new();
    while let Some((siblings, next)) = stack.pop() {
        let Some(&node) = siblings.get(next) else {
            levels.pop();
            continue;
        };
        stack.push((siblings, next + 1));
        if !seen.insert(node) {
            continue;
        }
        let depth = stack.len() - 1;
        let last = next + 1 == siblings.len();
        let mut line = String::new();
        if depth > 0 {
            let parents = levels.get(1..).unwrap_or(&[]);
            let skip = parents.len().saturating_sub(MAX_TREE_INDENT - 1);
            for &more in parents.iter().skip(skip) {
                line.push_str(if more { "|  " } else { "   " });
            }
            line.push_str(if last { "+- " } else { "|- " });
        }
        line.push_str(&clean(node));
        if depth > MAX_TREE_INDENT {
            let _ = write!(line, " [depth {depth}]");
        }
        if rec.current.as_deref() == Some(node) {
            line.push_str(" (current)");
        }
        line.push('\n');
        out.push_str(&line);
        let children = map.get(&Some(node)).unwrap_or(&no_children);
        levels.push(!last);
        stack.push((children.as_slice(), 0));
    }
    out
}

/// The human `snapshot info`: every field of `snap` on its own line, then one line per disk.
pub fn render_info(rec: &DomainRecord, snap: &SnapshotRecord) -> String {
    let mut out = String::new();
    let dash = |v: Option<&str>| v.map_or_else(|| "-".to_string(), clean);
    let children = rec.children(&snap.name);
    let mut field = |label: &str, value: String| {
        let _ = writeln!(out, "{:<14}{value}", format!("{label}:"));
    };
    field("Name", clean(&snap.name));
    field("Domain", clean(&rec.name));
    field(
        "Current",
        if rec.current.as_deref() == Some(snap.name.as_str()) {
            "yes"
        } else {
            "no"
        }
        .to_string(),
    );
    field("Parent", dash(snap.parent.as_deref()));
    field(
        "Children",
        if children.is_empty() {
            "-".to_string()
        } else {
            clean(&children.join(", "))
        },
    );
    field("Created", clean(&snap.created));
    field("State", snap.state.as_str().to_string());
    field(
        "Memory",
        match &snap.memory {
            Some(path) => format!("yes ({})", clean(&path.to_string_lossy())),
            None => "no".to_string(),
        },
    );
    field("Consistency", snap.consistency.as_str().to_string());
    field(
        "Pause window",
        snap.pause_window_ms
            .map_or_else(|| "-".to_string(), |ms| format!("{ms:.1} ms")),
    );
    field("Description", dash(snap.description.as_deref()));
    field(
        "Config",
        format!(
            "{}, {} MiB, {} vCPU(s), {} disk(s)",
            clean(&snap.config.name),
            snap.config.memory_mib,
            snap.config.vcpus,
            snap.config.disks.len()
        ),
    );
    field("Disks", snap.disks.len().to_string());
    for d in &snap.disks {
        let mut line = format!(
            "  {}  {}  {}  {}",
            clean(&d.vdev),
            d.kind.as_str(),
            clean(&d.backend),
            clean(&d.path.to_string_lossy())
        );
        if let Some(inner) = &d.snapshot {
            let _ = write!(line, "  (snapshot {})", clean(inner));
        }
        let _ = writeln!(out, "{line}");
    }
    out
}

#[cfg(test)]
#[path = "store_crash_tests.rs"]
mod crash_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(name: &str) -> DomainConfig {
        DomainConfig {
            name: name.to_string(),
            memory_mib: 512,
            vcpus: 2,
            ..DomainConfig::default()
        }
    }

    fn snap(name: &str, parent: Option<&str>) -> SnapshotRecord {
        SnapshotRecord {
            name: name.to_string(),
            parent: parent.map(str::to_string),
            created: "2026-01-02T03:04:05Z".to_string(),
            description: None,
            state: DomainState::Shutoff,
            memory: None,
            consistency: Consistency::Crash,
            pause_window_ms: None,
            config: config("vm1"),
            disks: Vec::new(),
        }
    }

    fn domain() -> DomainRecord {
        DomainRecord::new(
            "vm1",
            "qemu",
            config("vm1"),
            Some("/etc/xen/vm1.cfg".into()),
        )
    }

    /// base -> {a -> {a1, a2 -> a2x}, b -> b1, c}; `a` is current.
    fn branching() -> DomainRecord {
        let mut rec = domain();
        for (name, parent) in [
            ("base", None),
            ("a", Some("base")),
            ("a1", Some("a")),
            ("b", Some("base")),
            ("a2", Some("a")),
            ("b1", Some("b")),
            ("a2x", Some("a2")),
            ("c", Some("base")),
        ] {
            rec.add_snapshot(snap(name, parent)).unwrap();
        }
        rec.current = Some("a".into());
        rec
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("state"));
        (dir, store)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn paths_follow_the_layout() {
        let store = Store::new(Path::new("/var/lib/snapctl"));
        assert_eq!(store.root(), Path::new("/var/lib/snapctl"));
        assert_eq!(
            store.domain_dir("vm1"),
            Path::new("/var/lib/snapctl/domains/vm1")
        );
        assert_eq!(
            store.memory_path("vm1", "s1"),
            Path::new("/var/lib/snapctl/domains/vm1/memory/s1.mem")
        );
    }

    #[test]
    fn save_load_round_trip() {
        let (_dir, store) = store();
        assert!(store.list_domains().unwrap().is_empty());
        let mut rec = branching();
        rec.runtime = Some(Runtime {
            driver: "qemu".into(),
            pid: Some(4242),
            qmp: Some("/run/snapctl/vm1.qmp".into()),
            qga: None,
            started: "2026-01-02T03:00:00Z".into(),
        });
        let s = rec.snapshot_mut("a").unwrap();
        s.memory = Some(store.memory_path("vm1", "a"));
        s.state = DomainState::Running;
        s.consistency = Consistency::Memory;
        s.pause_window_ms = Some(12.25);
        s.description = Some("before \"upgrade\"\n".into());
        s.disks.push(SnapshotDisk {
            vdev: "xvda".into(),
            backend: "qcow2".into(),
            kind: DiskKind::Internal,
            path: "/images/vm1.qcow2".into(),
            snapshot: Some("a".into()),
        });

        let lock = store.lock("vm1").unwrap();
        assert_eq!(lock.load().unwrap(), None);
        lock.save(&rec).unwrap();
        assert_eq!(lock.load().unwrap().as_ref(), Some(&rec));
        drop(lock);
        assert_eq!(store.read("vm1").unwrap(), Some(rec.clone()));
        assert_eq!(store.read("vm2").unwrap(), None);

        // Saved again with a change, the new record replaces the old one.
        let lock = store.lock("vm1").unwrap();
        rec.remove_snapshot("c").unwrap();
        lock.save(&rec).unwrap();
        assert_eq!(store.read("vm1").unwrap(), Some(rec));
        assert_eq!(store.list_domains().unwrap(), ["vm1"]);
    }

    #[test]
    fn list_domains_sorted_and_only_defined_ones() {
        let (_dir, store) = store();
        for name in ["zeta", "alpha", "mid"] {
            let lock = store.lock(name).unwrap();
            let mut rec = domain();
            rec.name = name.into();
            lock.save(&rec).unwrap();
        }
        // Locked but never saved: not a domain.
        drop(store.lock("empty").unwrap());
        // Not a valid name: ignored.
        fs::create_dir_all(store.domain_dir("bad name")).unwrap();
        fs::write(store.domain_dir("bad name").join(RECORD_FILE), "{}").unwrap();
        assert_eq!(store.list_domains().unwrap(), ["alpha", "mid", "zeta"]);

        let lock = store.lock("mid").unwrap();
        lock.remove_domain().unwrap();
        assert_eq!(lock.load().unwrap(), None);
        drop(lock);
        assert_eq!(store.list_domains().unwrap(), ["alpha", "zeta"]);
    }

    #[test]
    fn save_is_atomic_and_private() {
        let (_dir, store) = store();
        let lock = store.lock("vm1").unwrap();
        assert_eq!(mode(store.root()), 0o700);
        assert_eq!(mode(&store.root().join("domains")), 0o700);
        assert_eq!(mode(lock.dir()), 0o700);

        let rec = branching();
        // A stale temporary file from a crashed save (even a read-only one) does not matter.
        let tmp = lock.dir().join(RECORD_TMP);
        fs::write(&tmp, "{ half a record").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444)).unwrap();
        assert_eq!(lock.load().unwrap(), None);
        lock.save(&rec).unwrap();
        assert!(!tmp.exists());
        assert_eq!(mode(&lock.record_path()), 0o600);

        fs::write(&tmp, "garbage").unwrap();
        assert_eq!(lock.load().unwrap(), Some(rec.clone()));
        let mut changed = rec.clone();
        changed.current = Some("b1".into());
        lock.save(&changed).unwrap();
        assert!(!tmp.exists());
        assert_eq!(lock.load().unwrap(), Some(changed));
        assert_eq!(mode(&lock.record_path()), 0o600);
    }

    #[test]
    fn save_refuses_invalid_records_and_writes_nothing() {
        let (_dir, store) = store();
        let lock = store.lock("vm1").unwrap();
        let good = branching();
        lock.save(&good).unwrap();
        let before = fs::read(lock.record_path()).unwrap();

        let mut other = good.clone();
        other.name = "vm2".into();
        assert_eq!(
            lock.save(&other).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let mut orphan = good.clone();
        orphan.snapshot_mut("b1").unwrap().parent = Some("gone".into());
        assert_eq!(
            lock.save(&orphan).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let mut newer = good.clone();
        newer.version = 2;
        assert_eq!(
            lock.save(&newer).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(fs::read(lock.record_path()).unwrap(), before);
        assert!(!lock.dir().join(RECORD_TMP).exists());
    }

    #[test]
    fn lock_excludes_a_second_locker() {
        let (_dir, store) = store();
        let first = store.lock("vm1").unwrap();
        let other = store.clone();
        let waiter = std::thread::spawn(move || {
            let started = Instant::now();
            let err = other
                .lock_timeout("vm1", Duration::from_millis(200))
                .unwrap_err();
            (err, started.elapsed())
        });
        let (err, waited) = waiter.join().unwrap();
        assert_eq!(err.kind(), ErrorKind::InUse);
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("another snapctl is working on domain vm1"),
            "{msg}"
        );
        assert!(
            msg.contains(&first.lock_path().display().to_string()),
            "{msg}"
        );

        // Another domain is not blocked.
        drop(store.lock_timeout("vm2", Duration::ZERO).unwrap());

        // A waiter gets the lock once the holder lets go.
        let other = store.clone();
        let waiter = std::thread::spawn(move || {
            other
                .lock_timeout("vm1", Duration::from_secs(10))
                .map(|l| l.name().to_string())
        });
        std::thread::sleep(Duration::from_millis(120));
        drop(first);
        assert_eq!(waiter.join().unwrap().unwrap(), "vm1");
        drop(store.lock_timeout("vm1", Duration::ZERO).unwrap());
    }

    #[test]
    fn lock_refuses_bad_domain_names_before_touching_disk() {
        let (_dir, store) = store();
        for name in ["", ".", "..", "../x", "a/b"] {
            assert_eq!(
                store.lock(name).unwrap_err().kind(),
                ErrorKind::InvalidInput,
                "{name:?}"
            );
            assert_eq!(
                store.read(name).unwrap_err().kind(),
                ErrorKind::InvalidInput
            );
        }
        assert!(!store.root().exists());
    }

    #[test]
    fn corrupt_record_is_reported_with_its_path() {
        let (_dir, store) = store();
        let lock = store.lock("vm1").unwrap();
        let path = lock.record_path();
        for bad in [
            "{ not json",
            "[]",
            r#"{"version": 1, "name": "vm1"}"#,
            r#"{"name": "vm1"}"#,
        ] {
            fs::write(&path, bad).unwrap();
            let err = lock.load().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{bad}: {err}");
            assert_eq!(err.path(), Some(path.as_path()));
            assert!(err.to_string().contains(&path.display().to_string()));
            assert_eq!(store.read("vm1").unwrap_err().kind(), ErrorKind::Corrupt);
        }

        // A valid record stored under the wrong name.
        let mut rec = domain();
        rec.name = "vm2".into();
        fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
        assert_eq!(lock.load().unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn broken_invariants_on_disk_are_corrupt() {
        let (_dir, store) = store();
        let lock = store.lock("vm1").unwrap();
        let write = |rec: &DomainRecord| {
            fs::write(lock.record_path(), serde_json::to_vec(rec).unwrap()).unwrap();
        };
        let mut cycle = branching();
        cycle.snapshot_mut("base").unwrap().parent = Some("a2x".into());
        write(&cycle);
        let err = lock.load().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.message().contains("cycle"), "{err}");

        let mut selfloop = branching();
        selfloop.snapshot_mut("c").unwrap().parent = Some("c".into());
        write(&selfloop);
        assert_eq!(lock.load().unwrap_err().kind(), ErrorKind::Corrupt);

        let mut dup = branching();
        dup.snapshots.push(snap("a1", Some("b")));
        write(&dup);
        let err = lock.load().unwrap_err();
        assert!(err.message().contains("two snapshots"), "{err}");

        let mut orphan = branching();
        orphan.snapshot_mut("b").unwrap().parent = Some("nope".into());
        write(&orphan);
        assert_eq!(lock.load().unwrap_err().kind(), ErrorKind::Corrupt);

        let mut current = branching();
        current.current = Some("nope".into());
        write(&current);
        assert_eq!(lock.load().unwrap_err().kind(), ErrorKind::Corrupt);

        let mut hostile = branching();
        hostile.snapshot_mut("c").unwrap().name = "../../etc/passwd".into();
        write(&hostile);
        assert_eq!(lock.load().unwrap_err().kind(), ErrorKind::Corrupt);

        // Cycles do not hang the tree walks of an unvalidated record.
        assert_eq!(cycle.ancestors("a").len(), 3);
        assert!(cycle.descendants("base").len() <= cycle.snapshots.len());
    }

    #[test]
    fn unknown_version_is_unsupported() {
        let (_dir, store) = store();
        let lock = store.lock("vm1").unwrap();
        let mut rec = serde_json::to_value(domain()).unwrap();
        rec["version"] = json!(2);
        // A newer format may change anything else too.
        rec["snapshots"] = json!("elsewhere");
        fs::write(lock.record_path(), serde_json::to_vec(&rec).unwrap()).unwrap();
        let err = lock.load().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
        assert!(err.message().contains("version 2"), "{err}");
    }

    #[test]
    fn oversized_record_is_refused() {
        let (_dir, store) = store();
        let lock = store.lock("vm1").unwrap();
        let file = File::create(lock.record_path()).unwrap();
        file.set_len(MAX_RECORD_BYTES + 1).unwrap();
        let err = lock.load().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.message().contains("16 MiB"), "{err}");
    }

    #[test]
    fn tree_queries() {
        let rec = branching();
        assert_eq!(rec.roots(), ["base"]);
        assert_eq!(rec.children("base"), ["a", "b", "c"]);
        assert_eq!(rec.children("a"), ["a1", "a2"]);
        assert!(rec.children("c").is_empty());
        assert!(rec.children("nope").is_empty());
        assert_eq!(
            rec.descendants("base"),
            ["a1", "a2x", "a2", "a", "b1", "b", "c"]
        );
        assert_eq!(rec.descendants("a"), ["a1", "a2x", "a2"]);
        assert!(rec.descendants("a1").is_empty());
        assert_eq!(rec.ancestors("a2x"), ["a2", "a", "base"]);
        assert!(rec.ancestors("base").is_empty());
        assert!(rec.ancestors("nope").is_empty());
        assert!(rec.is_ancestor("base", "a2x"));
        assert!(rec.is_ancestor("a", "a2x"));
        assert!(!rec.is_ancestor("a2x", "a2x"));
        assert!(!rec.is_ancestor("b", "a2x"));
        assert!(!rec.is_ancestor("a2x", "base"));
        assert_eq!(rec.get("b1").unwrap().parent.as_deref(), Some("b"));
        rec.validate().unwrap();
    }

    #[test]
    fn get_unknown_snapshot_lists_a_bounded_set_of_names() {
        let mut rec = domain();
        let err = rec.get("s1").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(
            err.message(),
            "domain vm1 has no snapshot \"s1\" (it has no snapshots)"
        );
        for i in 0..25 {
            rec.add_snapshot(snap(&format!("s{i}"), None)).unwrap();
        }
        let err = rec.get(&"x".repeat(10_000)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.message().contains("s0, s1,"), "{err}");
        assert!(err.message().contains("s9 and 15 more"), "{err}");
        assert!(err.message().len() < 300, "{err}");
    }

    #[test]
    fn add_snapshot_checks_name_and_parent() {
        let mut rec = branching();
        let err = rec.add_snapshot(snap("a1", Some("base"))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Exists);
        let err = rec.add_snapshot(snap("new", Some("gone"))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let err = rec.add_snapshot(snap("../evil", None)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert_eq!(rec, branching());
        rec.add_snapshot(snap("root2", None)).unwrap();
        assert_eq!(rec.roots(), ["base", "root2"]);
        assert_eq!(rec.current.as_deref(), Some("a"));
    }

    #[test]
    fn remove_middle_snapshot_reparents_children_and_moves_current() {
        let mut rec = branching();
        let removed = rec.remove_snapshot("a").unwrap();
        assert_eq!(removed.name, "a");
        assert_eq!(rec.children("base"), ["a1", "b", "a2", "c"]);
        assert_eq!(rec.snapshot("a1").unwrap().parent.as_deref(), Some("base"));
        assert_eq!(rec.snapshot("a2").unwrap().parent.as_deref(), Some("base"));
        assert_eq!(rec.children("a2"), ["a2x"]);
        assert_eq!(rec.current.as_deref(), Some("base"));
        rec.validate().unwrap();

        // Removing a root makes its children roots; a non-current removal keeps current.
        let removed = rec.remove_snapshot("base").unwrap();
        assert_eq!(removed.parent, None);
        assert_eq!(rec.roots(), ["a1", "b", "a2", "c"]);
        assert_eq!(rec.current, None);
        rec.current = Some("b1".into());
        rec.remove_snapshot("a2x").unwrap();
        assert_eq!(rec.current.as_deref(), Some("b1"));
        rec.validate().unwrap();

        assert_eq!(
            rec.remove_snapshot("a2x").unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn snapshot_json_matches_the_contract() {
        let mut rec = branching();
        let a = rec.snapshot_mut("a").unwrap();
        a.state = DomainState::Running;
        a.memory = Some("/state/domains/vm1/memory/a.mem".into());
        a.consistency = Consistency::Memory;
        a.pause_window_ms = Some(12.5);
        a.description = Some("before upgrade".into());
        a.disks = vec![
            SnapshotDisk {
                vdev: "xvda".into(),
                backend: "qcow2".into(),
                kind: DiskKind::Internal,
                path: "/images/vm1.qcow2".into(),
                snapshot: Some("a".into()),
            },
            SnapshotDisk {
                vdev: "xvdb".into(),
                backend: "vhd".into(),
                kind: DiskKind::External,
                path: "/images/data.vhd".into(),
                snapshot: None,
            },
        ];
        let v = snapshot_json(&rec, rec.snapshot("a").unwrap());
        let obj = v.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "children",
                "consistency",
                "created",
                "description",
                "disks",
                "memory",
                "name",
                "parent",
                "pause_window_ms",
                "state"
            ]
        );
        assert_eq!(v["name"], json!("a"));
        assert_eq!(v["parent"], json!("base"));
        assert_eq!(v["children"], json!(["a1", "a2"]));
        assert_eq!(v["created"], json!("2026-01-02T03:04:05Z"));
        assert_eq!(v["state"], json!("running"));
        assert_eq!(v["memory"], json!(true));
        assert_eq!(v["consistency"], json!("memory"));
        assert_eq!(v["pause_window_ms"], json!(12.5));
        assert_eq!(v["description"], json!("before upgrade"));
        assert_eq!(
            v["disks"],
            json!([
                {"vdev": "xvda", "kind": "internal", "path": "/images/vm1.qcow2"},
                {"vdev": "xvdb", "kind": "external", "path": "/images/data.vhd"},
            ])
        );

        // The nulls and falses of a disk-only root snapshot with no children.
        let mut root = domain();
        root.add_snapshot(snap("s1", None)).unwrap();
        let v = snapshot_json(&root, root.get("s1").unwrap());
        assert_eq!(v["parent"], Value::Null);
        assert_eq!(v["children"], json!([]));
        assert_eq!(v["state"], json!("shutoff"));
        assert_eq!(v["memory"], json!(false));
        assert_eq!(v["consistency"], json!("crash"));
        assert_eq!(v["pause_window_ms"], Value::Null);
        assert_eq!(v["disks"], json!([]));
        assert_eq!(v["description"], Value::Null);

        let quiesced = SnapshotRecord {
            consistency: Consistency::Quiesced,
            state: DomainState::Paused,
            ..snap("q", None)
        };
        let v = snapshot_json(&root, &quiesced);
        assert_eq!(v["consistency"], json!("quiesced"));
        assert_eq!(v["state"], json!("paused"));
    }

    #[test]
    fn list_json_matches_the_contract() {
        let rec = branching();
        let v = list_json(&rec);
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["current", "domain", "snapshots"]);
        assert_eq!(v["domain"], json!("vm1"));
        assert_eq!(v["current"], json!("a"));
        let names: Vec<&str> = v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["base", "a", "a1", "b", "a2", "b1", "a2x", "c"]);
        assert_eq!(
            v["snapshots"][0],
            snapshot_json(&rec, rec.get("base").unwrap())
        );

        let empty = list_json(&domain());
        assert_eq!(
            empty,
            json!({"domain": "vm1", "current": null, "snapshots": []})
        );
    }

    #[test]
    fn record_json_uses_snake_case_names() {
        let mut rec = branching();
        rec.snapshot_mut("a").unwrap().disks.push(SnapshotDisk {
            vdev: "xvda".into(),
            backend: "lvm".into(),
            kind: DiskKind::External,
            path: "/dev/vg/lv".into(),
            snapshot: None,
        });
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["version"], json!(1));
        assert_eq!(v["snapshots"][1]["state"], json!("shutoff"));
        assert_eq!(v["snapshots"][1]["consistency"], json!("crash"));
        assert_eq!(v["snapshots"][1]["disks"][0]["kind"], json!("external"));
    }

    #[test]
    fn tree_rendering_golden() {
        let rec = branching();
        assert_eq!(
            render_tree(&rec),
            "\
base
|- a (current)
|  |- a1
|  +- a2
|     +- a2x
|- b
|  +- b1
+- c
"
        );

        let mut forest = domain();
        forest.add_snapshot(snap("r1", None)).unwrap();
        forest.add_snapshot(snap("r2", None)).unwrap();
        forest.add_snapshot(snap("r1-child", Some("r1"))).unwrap();
        forest.current = Some("r2".into());
        assert_eq!(render_tree(&forest), "r1\n+- r1-child\nr2 (current)\n");

        assert_eq!(render_tree(&domain()), "domain vm1 has no snapshots\n");
    }

    #[test]
    fn deep_chains_render_with_bounded_indentation() {
        let mut rec = domain();
        let mut parent: Option<String> = None;
        for i in 0..2000 {
            let name = format!("s{i}");
            rec.add_snapshot(snap(&name, parent.as_deref())).unwrap();
            parent = Some(name);
        }
        rec.validate().unwrap();
        let tree = render_tree(&rec);
        assert_eq!(tree.lines().count(), 2000);
        let widest = tree.lines().map(str::len).max().unwrap();
        assert!(widest < 3 * MAX_TREE_INDENT + 40, "{widest}");
        assert!(
            tree.lines()
                .last()
                .unwrap()
                .ends_with("+- s1999 [depth 1999]")
        );
        assert_eq!(rec.descendants("s0").len(), 1999);
        assert_eq!(
            rec.descendants("s0").first().map(String::as_str),
            Some("s1999")
        );
        assert_eq!(rec.ancestors("s1999").len(), 1999);
    }

    #[test]
    fn table_rendering() {
        let mut rec = branching();
        let a = rec.snapshot_mut("a").unwrap();
        a.memory = Some("/m/a.mem".into());
        a.consistency = Consistency::Memory;
        a.state = DomainState::Running;
        let table = render_table(&rec);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 1 + rec.snapshots.len());
        assert_eq!(
            lines[0],
            "  NAME  CREATED               STATE    MEMORY  CONSISTENCY  PARENT"
        );
        assert_eq!(
            lines[1],
            "  base  2026-01-02T03:04:05Z  shutoff  no      crash        -"
        );
        assert_eq!(
            lines[2],
            "* a     2026-01-02T03:04:05Z  running  yes     memory       base"
        );
        assert_eq!(render_table(&domain()), "domain vm1 has no snapshots\n");

        // One long name does not widen the other rows.
        let long = "n".repeat(MAX_SNAPSHOT_NAME);
        rec.add_snapshot(snap(&long, Some("c"))).unwrap();
        let table = render_table(&rec);
        let base_row = table.lines().find(|l| l.starts_with("  base ")).unwrap();
        assert!(base_row.len() < 100, "{base_row}");
        assert!(table.contains(&long));
    }

    #[test]
    fn info_rendering() {
        let mut rec = branching();
        let a = rec.snapshot_mut("a").unwrap();
        a.memory = Some("/m/a.mem".into());
        a.consistency = Consistency::Memory;
        a.state = DomainState::Running;
        a.pause_window_ms = Some(12.34);
        a.description = Some("two\nlines".into());
        a.disks.push(SnapshotDisk {
            vdev: "xvda".into(),
            backend: "qcow2".into(),
            kind: DiskKind::Internal,
            path: "/images/vm1.qcow2".into(),
            snapshot: Some("a".into()),
        });
        a.disks.push(SnapshotDisk {
            vdev: "xvdb".into(),
            backend: "qcow2".into(),
            kind: DiskKind::External,
            path: "/images/data.qcow2".into(),
            snapshot: None,
        });
        let info = render_info(&rec, rec.get("a").unwrap());
        for line in [
            "Name:         a",
            "Domain:       vm1",
            "Current:      yes",
            "Parent:       base",
            "Children:     a1, a2",
            "Created:      2026-01-02T03:04:05Z",
            "State:        running",
            "Memory:       yes (/m/a.mem)",
            "Consistency:  memory",
            "Pause window: 12.3 ms",
            "Description:  two\\nlines",
            "Config:       vm1, 512 MiB, 2 vCPU(s), 0 disk(s)",
            "Disks:        2",
            "  xvda  internal  qcow2  /images/vm1.qcow2  (snapshot a)",
            "  xvdb  external  qcow2  /images/data.qcow2",
        ] {
            assert!(info.lines().any(|l| l == line), "{line:?} not in\n{info}");
        }

        let info = render_info(&rec, rec.get("c").unwrap());
        for line in [
            "Current:      no",
            "Children:     -",
            "Memory:       no",
            "Pause window: -",
            "Description:  -",
            "Disks:        0",
        ] {
            assert!(info.lines().any(|l| l == line), "{line:?} not in\n{info}");
        }
    }

    #[test]
    fn hostile_names_are_refused() {
        for name in ["vm1", "a", "web-01.example_x", &"d".repeat(64)] {
            validate_name("domain", name).unwrap();
        }
        for name in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "with space",
            "tab\t",
            "nl\n",
            "nul\0",
            "ümlaut",
            "$(reboot)",
            &"d".repeat(65),
        ] {
            let err = validate_name("domain", name).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{name:?}");
            assert!(err.message().starts_with("invalid domain name"), "{err}");
        }
        for name in [
            "s1",
            "before upgrade",
            "2026-01-02T03:04:05Z",
            "ümlaut ok",
            "a..b",
            &"s".repeat(128),
        ] {
            validate_name("snapshot", name).unwrap();
        }
        for name in [
            "",
            ".",
            "..",
            ".hidden",
            "../../etc/passwd",
            "a/b",
            "/abs",
            "nl\nx",
            "cr\r",
            "esc\x1b[2J",
            "nul\0",
            "tab\tx",
            "ls\u{2028}x",
            "del\x7f",
            "rtl\u{202e}gpj.exe",
            "zero\u{200b}width",
            &"s".repeat(129),
            &"é".repeat(65),
        ] {
            let err = validate_name("snapshot", name).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{name:?}");
            assert!(err.message().starts_with("invalid snapshot name"), "{err}");
            // The message shows the name escaped and bounded.
            assert!(!err.message().contains('\n'));
            assert!(err.message().len() < 200, "{err}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_seconds() {
        let t = timestamp_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z'), "{t}");
        time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).unwrap();
    }
}
