//! Helpers shared by the end-to-end tests.
//!
//! The tests drive the real `snapctl` binary and use QEMU's own tools (`qemu-img`, `qemu-io`,
//! `qemu-storage-daemon`) as the oracle: QEMU writes the images snapctl reads, reads the images
//! snapctl writes, and `qemu-img check` judges every result.
//!
//! What is here:
//! - [`snapctl`] / [`snapctl_run`]: the binary under test (env `SNAPCTL_BIN`, else
//!   `<target>/debug/snapctl`, built once with cargo if it is missing).
//! - [`qemu_img`], [`qemu_io`], [`qemu_img_check`], [`qemu_snapshots`]: QEMU's tools, with their
//!   JSON output read into plain values.
//! - [`Qcow2Spec`]: `qemu-img create -f qcow2 -o ...` for the image variants.
//! - [`Pattern`], [`write_patterns`], [`verify_patterns`]: guest data written and read back
//!   through `qemu-io`.
//! - [`assert_same_bytes`], [`assert_error_line`]: what a refused operation must look like.
//! - [`Qcow2Header`] / [`patch_be_u64`] / ...: enough qcow2 layout to damage images on purpose.
//! - [`StorageDaemon`]: a `qemu-storage-daemon` holding an image, killed when dropped.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod ceph;
pub mod domain;

// ---------------------------------------------------------------------------------------------
// Running programs
// ---------------------------------------------------------------------------------------------

/// What a finished command left: exit code (`None` if killed by a signal) and its output.
#[derive(Debug, Clone)]
pub struct Run {
    /// What was run, for messages.
    pub cmdline: String,
    /// The exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl Run {
    /// True when the command exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// A multi-line description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nexit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }

    /// Panics (with the full output) unless the command exited 0; returns `self` for chaining.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert!(self.success(), "command failed\n{}", self.describe());
        self
    }
}

/// Runs `cmd` to completion with no standard input and captures its output.
pub fn run(cmd: &mut Command) -> Run {
    let cmdline = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmdline}: {e}"));
    Run {
        cmdline,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A path as `&str` (temporary directories are UTF-8 here); for building argument lists.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

// ---------------------------------------------------------------------------------------------
// snapctl
// ---------------------------------------------------------------------------------------------

/// The workspace root (the folder above this crate).
pub fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target folder: `CARGO_TARGET_DIR` (relative to the workspace) or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_dir().join(dir),
        _ => workspace_dir().join("target"),
    }
}

/// The snapctl binary under test: `SNAPCTL_BIN` if set, else `<target>/debug/snapctl`, which is
/// built once (`cargo build -p snap-orchestrator --bin snapctl`) when missing. Cargo's own lock
/// makes concurrent builds from parallel test processes safe. An existing binary is used as is:
/// build it (or set `SNAPCTL_BIN`) before running the tests when the sources changed.
pub fn snapctl_path() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("SNAPCTL_BIN").filter(|b| !b.is_empty()) {
            return PathBuf::from(bin);
        }
        let bin = target_dir().join("debug").join("snapctl");
        if !bin.exists() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let build = run(Command::new(cargo).current_dir(workspace_dir()).args([
                "build",
                "-p",
                "snap-orchestrator",
                "--bin",
                "snapctl",
            ]));
            assert!(
                build.success() && bin.exists(),
                "building snapctl failed\n{}",
                build.describe()
            );
        }
        bin
    })
}

/// A `Command` for the snapctl binary, with a private state dir so tests never touch
/// `/var/lib/snapctl`.
pub fn snapctl() -> Command {
    let mut cmd = Command::new(snapctl_path());
    cmd.env(
        "SNAPCTL_STATE_DIR",
        std::env::temp_dir().join("snapctl-tests-state"),
    );
    cmd.env_remove("RUST_BACKTRACE");
    cmd
}

/// Runs snapctl with `args`.
pub fn snapctl_run<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(snapctl().args(args))
}

/// Asserts the CLI contract for a refused operation: exit 1, exactly one line on stderr that
/// starts with `snapctl: error: `, and no panic.
#[track_caller]
pub fn assert_error_line(r: &Run) {
    assert_eq!(r.code, Some(1), "expected exit 1 (error)\n{}", r.describe());
    assert!(
        !r.stderr.contains("panicked"),
        "snapctl panicked\n{}",
        r.describe()
    );
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr\n{}",
        r.describe()
    );
    assert!(
        lines[0].starts_with("snapctl: error: ") && lines[0].len() > "snapctl: error: ".len(),
        "stderr must start with 'snapctl: error: ' and say something\n{}",
        r.describe()
    );
}

/// Asserts a usage error: exit 2 and no panic.
#[track_caller]
pub fn assert_usage_error(r: &Run) {
    assert_eq!(r.code, Some(2), "expected exit 2 (usage)\n{}", r.describe());
    assert!(
        !r.stderr.contains("panicked"),
        "snapctl panicked\n{}",
        r.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// QEMU tools
// ---------------------------------------------------------------------------------------------

/// Runs `qemu-img ARGS`.
pub fn qemu_img<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new("qemu-img").args(args))
}

/// Runs `qemu-io -f qcow2 -c CMD... IMG` (the format is given, never probed).
pub fn qemu_io(img: &Path, cmds: &[String]) -> Run {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(img);
    run(&mut cmd)
}

/// `qemu-img info --output=json IMG` as JSON (`-U`: works while another process holds the image).
pub fn qemu_info(img: &Path) -> Value {
    let r = qemu_img(["info", "-U", "-f", "qcow2", "--output=json", p(img)]).ok();
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("qemu-img info JSON: {e}\n{}", r.describe()))
}

/// `qemu-img check --output=json IMG` as `(errors, leaks)`: errors are `corruptions` plus
/// `check-errors`; a field that is absent counts as 0. Exit codes 0 (clean), 2 (corruptions) and
/// 3 (leaks) all carry the JSON; anything else panics.
pub fn qemu_img_check(img: &Path) -> (u64, u64) {
    let r = qemu_img(["check", "-f", "qcow2", "--output=json", p(img)]);
    assert!(
        matches!(r.code, Some(0 | 2 | 3)),
        "qemu-img check could not check the image\n{}",
        r.describe()
    );
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("qemu-img check JSON: {e}\n{}", r.describe()));
    let field = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    (field("corruptions") + field("check-errors"), field("leaks"))
}

/// Asserts `qemu-img check` finds neither errors nor leaks; `when` names the step.
#[track_caller]
pub fn assert_qemu_clean(img: &Path, when: &str) {
    let (errors, leaks) = qemu_img_check(img);
    if (errors, leaks) != (0, 0) {
        let text = qemu_img(["check", "-f", "qcow2", p(img)]);
        panic!(
            "{when}: qemu-img check: {errors} errors, {leaks} leaks\n{}{}",
            text.stdout, text.stderr
        );
    }
}

/// One internal snapshot as `qemu-img info` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSnapshot {
    /// `id`
    pub id: String,
    /// `name`
    pub name: String,
    /// `vm-state-size`
    pub vm_state_size: u64,
    /// `date-sec`
    pub date_sec: u64,
    /// `date-nsec`
    pub date_nsec: u64,
    /// `vm-clock-sec` * 1e9 + `vm-clock-nsec`
    pub vm_clock_ns: u64,
}

/// The internal snapshots `qemu-img info --output=json` lists, in table order (absent = none).
pub fn qemu_snapshots(img: &Path) -> Vec<QemuSnapshot> {
    let info = qemu_info(img);
    let Some(list) = info.get("snapshots").and_then(Value::as_array) else {
        return Vec::new();
    };
    list.iter()
        .map(|s| {
            let u = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
            let t = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            QemuSnapshot {
                id: t("id"),
                name: t("name"),
                vm_state_size: u("vm-state-size"),
                date_sec: u("date-sec"),
                date_nsec: u("date-nsec"),
                vm_clock_ns: u("vm-clock-sec") * 1_000_000_000 + u("vm-clock-nsec"),
            }
        })
        .collect()
}

/// The names of the snapshots `qemu-img info` lists, in table order.
pub fn qemu_snapshot_names(img: &Path) -> Vec<String> {
    qemu_snapshots(img).into_iter().map(|s| s.name).collect()
}

/// `cp --sparse=always SRC DST`.
pub fn cp_sparse(src: &Path, dst: &Path) {
    run(Command::new("cp").args(["--sparse=always", p(src), p(dst)])).ok();
}

// ---------------------------------------------------------------------------------------------
// Image variants
// ---------------------------------------------------------------------------------------------

/// `qemu-img create -f qcow2 -o OPTS PATH SIZE`, built up option by option.
#[derive(Debug, Clone)]
pub struct Qcow2Spec {
    /// Virtual size in bytes.
    pub size: u64,
    /// `-o` options in order.
    pub opts: Vec<(String, String)>,
}

impl Qcow2Spec {
    /// A qcow2 of `size` bytes with QEMU's defaults (v3, 64 KiB clusters, 16-bit refcounts).
    pub fn new(size: u64) -> Self {
        Self {
            size,
            opts: Vec::new(),
        }
    }

    /// Any `-o KEY=VALUE`.
    pub fn opt(mut self, key: &str, value: impl ToString) -> Self {
        self.opts.push((key.to_string(), value.to_string()));
        self
    }

    /// `compat=0.10` (v2) or `compat=1.1` (v3).
    pub fn compat(self, v: &str) -> Self {
        self.opt("compat", v)
    }

    /// `cluster_size=BYTES`.
    pub fn cluster_size(self, bytes: u64) -> Self {
        self.opt("cluster_size", bytes)
    }

    /// `refcount_bits=N`.
    pub fn refcount_bits(self, bits: u32) -> Self {
        self.opt("refcount_bits", bits)
    }

    /// The cluster size the image will have.
    pub fn cluster(&self) -> u64 {
        self.opts
            .iter()
            .rev()
            .find(|(k, _)| k == "cluster_size")
            .and_then(|(_, v)| parse_size(v))
            .unwrap_or(65536)
    }

    /// Runs `qemu-img create`; panics if QEMU refuses the options.
    pub fn create(&self, path: &Path) {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if !self.opts.is_empty() {
            let o: Vec<String> = self.opts.iter().map(|(k, v)| format!("{k}={v}")).collect();
            cmd.arg("-o").arg(o.join(","));
        }
        cmd.arg(path).arg(self.size.to_string());
        run(&mut cmd).ok();
    }
}

/// Parses a size as `qemu-img` takes it: bytes, or a number with a `k`/`K`, `M`, `G` suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'M' => (&s[..s.len() - 1], 20),
        b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

// ---------------------------------------------------------------------------------------------
// Guest data through qemu-io
// ---------------------------------------------------------------------------------------------

/// A byte range of the guest disk filled with one byte value (0 = reads as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    /// Guest offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The byte every position holds.
    pub byte: u8,
}

impl Pattern {
    /// `byte` over `[offset, offset + len)`.
    pub const fn new(offset: u64, len: u64, byte: u8) -> Self {
        Self { offset, len, byte }
    }

    /// The qemu-io command that checks this range.
    pub fn read_cmd(&self) -> String {
        format!("read -P {:#x} {} {}", self.byte, self.offset, self.len)
    }
}

/// Runs qemu-io commands (`write ...`) on IMG and panics unless all succeed.
#[track_caller]
pub fn qemu_io_ok(img: &Path, cmds: &[String]) {
    let r = qemu_io(img, cmds);
    assert!(
        r.success() && !r.stdout.contains("failed") && !r.stderr.contains("failed"),
        "qemu-io failed\n{}",
        r.describe()
    );
}

/// Writes each pattern with `write -P` (or `write -z` for byte 0).
#[track_caller]
pub fn write_patterns(img: &Path, patterns: &[Pattern]) {
    let cmds: Vec<String> = patterns
        .iter()
        .map(|pt| {
            if pt.byte == 0 {
                format!("write -z {} {}", pt.offset, pt.len)
            } else {
                format!("write -P {:#x} {} {}", pt.byte, pt.offset, pt.len)
            }
        })
        .collect();
    qemu_io_ok(img, &cmds);
}

/// Reads every pattern back with `qemu-io read -P` and panics with qemu-io's output on a
/// mismatch; `when` names the step.
#[track_caller]
pub fn verify_patterns(img: &Path, patterns: &[Pattern], when: &str) {
    let cmds: Vec<String> = patterns.iter().map(Pattern::read_cmd).collect();
    let r = qemu_io(img, &cmds);
    assert!(
        r.success()
            && !r.stdout.contains("Pattern verification failed")
            && !r.stderr.contains("Pattern verification failed"),
        "{when}: guest data differs from what was expected: {patterns:x?}\n{}",
        r.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// Files, bytes and qcow2 layout
// ---------------------------------------------------------------------------------------------

/// The whole file.
pub fn file_bytes(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Asserts the file still holds exactly `before`, naming the first differing offset otherwise.
#[track_caller]
pub fn assert_same_bytes(path: &Path, before: &[u8], when: &str) {
    let now = file_bytes(path);
    if now != before {
        let first = now
            .iter()
            .zip(before)
            .position(|(a, b)| a != b)
            .unwrap_or(now.len().min(before.len()));
        panic!(
            "{when}: {} changed: length {} -> {}, first difference at byte {first} ({first:#x})",
            path.display(),
            before.len(),
            now.len()
        );
    }
}

/// Reads a big-endian u64 at `offset`.
pub fn read_be_u64(path: &Path, offset: u64) -> u64 {
    let mut f = fs::File::open(path).expect("open");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut b = [0u8; 8];
    f.read_exact(&mut b).expect("read u64");
    u64::from_be_bytes(b)
}

/// Reads a big-endian u32 at `offset`.
pub fn read_be_u32(path: &Path, offset: u64) -> u32 {
    let mut f = fs::File::open(path).expect("open");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut b = [0u8; 4];
    f.read_exact(&mut b).expect("read u32");
    u32::from_be_bytes(b)
}

/// Writes `bytes` at `offset` (in place, extending the file if needed).
pub fn patch_bytes(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for patch");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(bytes).expect("patch");
}

/// Writes a big-endian u64 at `offset`.
pub fn patch_be_u64(path: &Path, offset: u64, value: u64) {
    patch_bytes(path, offset, &value.to_be_bytes());
}

/// The qcow2 header fields the tests need (offsets from the qcow2 spec).
#[derive(Debug, Clone, Copy)]
pub struct Qcow2Header {
    /// `cluster_bits` (byte 20) as a size.
    pub cluster_size: u64,
    /// `l1_table_offset` (byte 40).
    pub l1_table_offset: u64,
    /// `refcount_table_offset` (byte 48).
    pub refcount_table_offset: u64,
    /// `refcount_order` (byte 96, v3; 4 in v2).
    pub refcount_order: u32,
}

impl Qcow2Header {
    /// Reads the header of a qcow2 file.
    pub fn read(path: &Path) -> Self {
        let version = read_be_u32(path, 4);
        Self {
            cluster_size: 1u64 << read_be_u32(path, 20),
            l1_table_offset: read_be_u64(path, 40),
            refcount_table_offset: read_be_u64(path, 48),
            refcount_order: if version >= 3 {
                read_be_u32(path, 96)
            } else {
                4
            },
        }
    }

    /// The file offset of refcount block 0 (the first refcount table entry).
    pub fn refcount_block0(&self, path: &Path) -> u64 {
        read_be_u64(path, self.refcount_table_offset)
    }

    /// Sets the 16-bit refcount of host cluster `index` (must be covered by refcount block 0,
    /// image with `refcount_bits=16`).
    pub fn set_refcount16(&self, path: &Path, index: u64, value: u16) {
        assert_eq!(
            self.refcount_order, 4,
            "set_refcount16 needs refcount_bits=16"
        );
        let block = self.refcount_block0(path);
        assert!(
            index < self.cluster_size / 2,
            "cluster {index} not in block 0"
        );
        patch_bytes(path, block + 2 * index, &value.to_be_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------------------------

/// Parses an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)`, `T`/`t`/space
/// separator) to `(unix seconds, nanoseconds)`; `None` if it is not one.
pub fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: u32 = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let frac = s.get(start..i)?;
        if frac.is_empty() {
            return None;
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = digits.parse().ok()?;
    }
    let offset = match s.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && &tz[3..4] == ":" => {
            let h = num(i + 1..i + 3)?;
            let m = num(i + 4..i + 6)?;
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hour * 3600 + min * 60 + sec - offset, nanos))
}

// ---------------------------------------------------------------------------------------------
// qemu-storage-daemon
// ---------------------------------------------------------------------------------------------

/// A `qemu-storage-daemon` that opens IMG read-write (qcow2 over file) and exports it over NBD on
/// a unix socket, as a running VM would hold it. Killed (and reaped) on drop.
#[derive(Debug)]
pub struct StorageDaemon {
    child: Child,
}

impl StorageDaemon {
    /// Starts the daemon and waits (at most 10 s) until it holds the image's locks.
    ///
    /// It waits for the NBD socket first: the daemon opens its block nodes (taking the locks)
    /// before it starts the NBD server, so the socket means the image is held. Probing with
    /// `qemu-img info` before that would race: the probe's own shared locks can make the daemon's
    /// open fail. Once the socket exists, `qemu-img info` without `-U` must fail on the lock.
    pub fn start(img: &Path, socket: &Path) -> Self {
        let log = socket.with_extension("log");
        let stderr = fs::File::create(&log).expect("create daemon log");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                p(img).replace(',', ",,")
            ))
            .args(["--blockdev", "driver=qcow2,node-name=d0,file=f0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", p(socket)))
            .args(["--export", "type=nbd,id=e0,node-name=d0,writable=on"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start qemu-storage-daemon");
        let mut daemon = Self { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!(
                    "qemu-storage-daemon exited early: {status}\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not open {} within 10 s",
                img.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = qemu_img(["info", "-f", "qcow2", p(img)]);
        assert!(
            !r.success() && r.stderr.contains("lock"),
            "qemu-storage-daemon should hold the image's locks now\n{}",
            r.describe()
        );
        daemon
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_parses() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:34:56.5+01:00"),
            Some((1_709_206_496, 500_000_000))
        );
        assert_eq!(
            parse_rfc3339("2024-02-29 12:34:56Z"),
            Some((1_709_210_096, 0))
        );
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56"), None);
        assert_eq!(parse_rfc3339("1795646476"), None);
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(Qcow2Spec::new(1).cluster_size(4096).cluster(), 4096);
        assert_eq!(
            Qcow2Spec::new(1).opt("cluster_size", "2M").cluster(),
            2 << 20
        );
        assert_eq!(Qcow2Spec::new(1).cluster(), 65536);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("-o"), "-o");
    }
}
