//! `cargo xtask bench`: snapctl against `qemu-img snapshot` on a fully allocated qcow2 image
//! (`preallocation=metadata`, 1 TiB by default: 16 Mi clusters, all of them referenced, so every
//! snapshot operation has to touch every refcount). The file is sparse; its metadata takes about
//! 160 MiB per copy.
//!
//! Each operation runs on its own fresh copy (`--runs N`: N times, median shown), for each tool,
//! with a warm page cache for both. After every snapctl operation the result is verified (snapshot
//! present/absent, data reverted) and `qemu-img check` must call the image clean. Peak RSS comes from GNU time (`/usr/bin/time -f %M`).
//!
//! Missed targets are reported, not fatal; a command that fails or a wrong result exits 1.
//!
//! The second part (`merge`, see [`merge`]) times deleting a layer of an external-snapshot chain
//! against `qemu-img rebase` and `qemu-img commit`. The third (`pause`, see [`pause`]) measures the
//! pause window of a live domain snapshot of the test guest. The fourth (`rbd`, see [`rbd`]) times
//! RBD snapshots and clones on a one-node Ceph against qemu-img snapshot on qcow2. `export` (see
//! [`export`]) times `snapctl disk export` of a snapshot with 1 GiB of data against `qemu-img convert`.
//! `--only snapshot|merge|pause|clone|rbd|export` runs one part.

mod clone;
mod export;
mod merge;
mod pause;
mod rbd;

use crate::proc::{TempDir, Workspace, capture, display, run};
use crate::sysdeps::{GNU_TIME, ensure_gnu_time, ensure_qemu_tools};
use crate::{Failure, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Instant;

const BASE: &str = "base.qcow2";
const SNAPPED: &str = "snapped.qcow2";
const WORK: &str = "work.qcow2";
const SNAPSHOT: &str = "bench";
const MIN_FREE: u64 = 2 << 30;
const RSS_LIMIT_MIB: f64 = 64.0;

#[derive(Debug, PartialEq)]
struct Options {
    /// Virtual size of the snapshot part's image (the merge part has its own sizes).
    size: String,
    /// Each operation this many times (fresh copy each time); the table shows the median.
    runs: usize,
    criterion: bool,
    /// Guest data per layer in the merge part's chain, bytes.
    merge_data: u64,
    /// Run only this part; both when None.
    only: Option<Part>,
}

/// The two parts of the bench.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Part {
    /// Internal snapshots: snapctl against `qemu-img snapshot -c/-a/-d`.
    Snapshot,
    /// External chains: `snapctl disk delete --layer` against `qemu-img rebase` / `commit`.
    Merge,
    /// The pause window of a live domain snapshot of the test guest.
    Pause,
    /// Gold-image clone time against the data size.
    Clone,
    /// RBD snapshots and clones on a one-node Ceph against qemu-img snapshot on qcow2.
    Rbd,
    /// `snapctl disk export` of a snapshot against `qemu-img convert`.
    Export,
}

/// Bounds of `--merge-data`: the chain must fit in its 64G image (mid's data ends at 1.5x).
const MERGE_DATA_MIN: u64 = 16 << 20;
const MERGE_DATA_MAX: u64 = 32 << 30;

pub fn run_bench(args: &[String]) -> Result {
    let options = parse_options(args)?;
    ensure_qemu_tools()?;
    let measure_rss = ensure_gnu_time();
    let workspace = Workspace::locate();
    run(workspace
        .cargo()
        .args(["build", "--release", "-p", "snap-orchestrator"]))?;
    let snapctl = workspace.binary("release", "snapctl");
    std::fs::create_dir_all(&workspace.target)
        .map_err(|err| format!("cannot create {}: {err}", workspace.target.display()))?;
    // Both parts run even when the first fails, so that one run shows every figure.
    let mut outcomes = Vec::new();
    let wants = |part: Part| options.only.is_none_or(|only| only == part);
    if wants(Part::Snapshot) {
        outcomes.push(snapshot_bench(&workspace, &snapctl, &options, measure_rss));
    }
    if wants(Part::Pause) {
        outcomes.push(pause::run_pause(&workspace.target, &snapctl, options.runs));
    }
    if wants(Part::Clone) {
        outcomes.push(clone::run_clone(&workspace.target, &snapctl));
    }
    if wants(Part::Export) {
        outcomes.push(export::run_export(
            &workspace.target,
            &snapctl,
            options.runs,
        ));
    }
    if wants(Part::Rbd) {
        outcomes.push(rbd::run_rbd(&workspace.target, &snapctl, options.runs));
    }
    if wants(Part::Merge) {
        outcomes.push(merge::run_merge(
            &workspace.target,
            &snapctl,
            options.merge_data,
            options.runs,
            measure_rss,
        ));
    }
    let messages: Vec<String> = outcomes
        .into_iter()
        .filter_map(|outcome| match outcome.err()? {
            Failure::Usage(message)
            | Failure::Failed(message)
            | Failure::NotImplemented(message) => Some(message),
        })
        .collect();
    if !messages.is_empty() {
        return Err(Failure::Failed(messages.join("\n")));
    }
    if options.criterion {
        println!("\n==> cargo bench --workspace");
        run(workspace.cargo().args(["bench", "--workspace"]))?;
    }
    Ok(())
}

/// Snapshot create/revert/delete against `qemu-img snapshot` (the first part).
fn snapshot_bench(
    workspace: &Workspace,
    snapctl: &Path,
    options: &Options,
    measure_rss: bool,
) -> Result {
    let scratch = TempDir::new(&workspace.target, "xtask-bench")?;
    let free = free_bytes(scratch.path())?;
    if free < MIN_FREE {
        return Err(Failure::Failed(format!(
            "only {:.2} GiB free on the filesystem of {}; the bench needs at least 2 GiB \
             (each sparse copy of a 1T image holds ~160 MiB of metadata)",
            free as f64 / f64::from(1u32 << 30),
            scratch.path().display()
        )));
    }
    let bench = Bench {
        dir: scratch.path().to_path_buf(),
        snapctl: snapctl.to_path_buf(),
        measure_rss,
    };
    let outcome = bench.run(&options.size, options.runs);
    drop(scratch);
    Ok(outcome?)
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut options = Options {
        size: "1T".to_string(),
        runs: 1,
        criterion: false,
        merge_data: 1 << 30,
        only: None,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_string())),
            None => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next().cloned())
                .ok_or_else(|| Failure::Usage(format!("{flag} needs a value")))
        };
        match flag {
            "--criterion" if inline.is_none() => options.criterion = true,
            "--size" => {
                options.size = value()?;
                if !valid_size(&options.size) {
                    return Err(Failure::Usage(format!(
                        "--size {}: expected a size like 64G or 1T",
                        options.size
                    )));
                }
            }
            "--runs" => {
                let runs = value()?;
                options.runs = runs.parse().ok().filter(|runs| *runs >= 1).ok_or_else(|| {
                    Failure::Usage(format!("--runs {runs}: expected a count of 1 or more"))
                })?;
            }
            "--merge-data" => {
                let size = value()?;
                options.merge_data = size_bytes(&size)
                    .filter(|bytes| {
                        (MERGE_DATA_MIN..=MERGE_DATA_MAX).contains(bytes)
                            && bytes.is_multiple_of(1 << 20)
                    })
                    .ok_or_else(|| {
                        Failure::Usage(format!(
                            "--merge-data {size}: expected a whole number of MiB from 16M to 32G, \
                             like 1G or 512M"
                        ))
                    })?;
            }
            "--only" => {
                let part = value()?;
                options.only = Some(match part.as_str() {
                    "snapshot" => Part::Snapshot,
                    "merge" => Part::Merge,
                    "pause" => Part::Pause,
                    "clone" => Part::Clone,
                    "rbd" => Part::Rbd,
                    "export" => Part::Export,
                    _ => {
                        return Err(Failure::Usage(format!(
                            "--only {part}: expected `snapshot`, `merge`, `pause`, `clone`, `rbd` \
                             or `export`"
                        )));
                    }
                });
            }
            _ => return Err(Failure::Usage(format!("bench: unexpected `{arg}`"))),
        }
    }
    Ok(options)
}

/// A size qemu-img accepts: digits with an optional k/K/M/G/T/P/E suffix.
fn valid_size(size: &str) -> bool {
    let digits = size.trim_end_matches(['k', 'K', 'M', 'G', 'T', 'P', 'E']);
    !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && size.len() - digits.len() <= 1
        && digits.chars().any(|c| c != '0')
}

/// A size in qemu's notation (binary suffixes; k and K both mean KiB) in bytes.
fn size_bytes(size: &str) -> Option<u64> {
    if !valid_size(size) {
        return None;
    }
    let digits = size.trim_end_matches(['k', 'K', 'M', 'G', 'T', 'P', 'E']);
    let shift = match &size[digits.len()..] {
        "" => 0,
        "k" | "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => 60,
    };
    let value: u64 = digits.parse().ok()?;
    value
        .checked_mul(1 << shift)
        .filter(|bytes| bytes >> shift == value)
}

/// Bytes available to us on the filesystem holding `dir` (`df -Pk`).
fn free_bytes(dir: &Path) -> std::result::Result<u64, String> {
    let output = capture(Command::new("df").arg("-Pk").arg(dir))?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .nth(1)
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("cannot read free space of {} from df", dir.display()))
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Create,
    Revert,
    Delete,
}

const OPS: [Op; 3] = [Op::Create, Op::Revert, Op::Delete];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Revert => "revert",
            Op::Delete => "delete",
        }
    }

    /// The speed-up over qemu-img we aim for.
    fn target(self) -> f64 {
        match self {
            Op::Create | Op::Revert => 20.0,
            Op::Delete => 10.0,
        }
    }

    /// Create starts from the plain image; revert and delete need the snapshot to exist.
    fn source(self) -> &'static str {
        match self {
            Op::Create => BASE,
            Op::Revert | Op::Delete => SNAPPED,
        }
    }

    fn qemu_args(self) -> [&'static str; 4] {
        let flag = match self {
            Op::Create => "-c",
            Op::Revert => "-a",
            Op::Delete => "-d",
        };
        ["snapshot", flag, SNAPSHOT, WORK]
    }

    fn snapctl_args(self) -> [&'static str; 4] {
        ["disk", self.name(), WORK, SNAPSHOT]
    }
}

/// One timed child process.
struct Timed {
    seconds: f64,
    rss_kib: Option<u64>,
}

/// How snapctl's operation went beyond its exit status.
struct Row {
    op: Op,
    qemu: std::result::Result<Timed, String>,
    snapctl: std::result::Result<Timed, String>,
    /// `qemu-img check` of snapctl's result, and whether the result is what the op promised.
    check: String,
    verified: std::result::Result<(), String>,
}

struct Bench {
    dir: PathBuf,
    snapctl: PathBuf,
    measure_rss: bool,
}

impl Bench {
    fn run(&self, size: &str, runs: usize) -> std::result::Result<(), String> {
        println!(
            "\n==> bench image: {size} qcow2, preallocation=metadata, in {}",
            self.dir.display()
        );
        let created = self.timed(self.tool("qemu-img").args([
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            BASE,
            size,
        ]))?;
        println!("(created in {:.3} s)", created.seconds);
        run(self.qemu_io("write -P 0xaa 0 64k", BASE))?;
        println!("\n==> reference: qemu-img check reads all metadata");
        let reference = self.timed(self.tool("qemu-img").args(["check", BASE]))?;

        println!(
            "\n==> image with a snapshot '{SNAPSHOT}' (then overwritten) for revert and delete"
        );
        self.copy(BASE, SNAPPED)?;
        run(self
            .tool("qemu-img")
            .args(["snapshot", "-c", SNAPSHOT, SNAPPED]))?;
        run(self.qemu_io("write -P 0xbb 0 64k", SNAPPED))?;

        let mut rows = Vec::new();
        for op in OPS {
            println!("\n==> {}: qemu-img", op.name());
            let qemu = repeat(runs, || {
                self.fresh(op)?;
                let timed = self.timed(self.tool("qemu-img").args(op.qemu_args()));
                self.remove_work();
                timed
            });
            println!("\n==> {}: snapctl", op.name());
            // Every run's result is checked; the row keeps the first problem found.
            let mut verified = Ok(());
            let mut check = "clean".to_string();
            let snapctl = repeat(runs, || {
                self.fresh(op)?;
                let mut snapctl = Command::new(&self.snapctl);
                snapctl.current_dir(&self.dir).args(op.snapctl_args());
                let timed = self.timed(&mut snapctl);
                if timed.is_ok() {
                    let this_verified = self.verify(op);
                    let this_check = self.check_work();
                    if verified.is_ok() {
                        verified = this_verified;
                    }
                    if check == "clean" {
                        check = this_check;
                    }
                }
                self.remove_work();
                timed
            });
            rows.push(Row {
                op,
                qemu,
                snapctl,
                check,
                verified,
            });
        }
        report(size, runs, &reference, &rows, self.measure_rss);
        let broken: Vec<String> = rows.iter().flat_map(problems).collect();
        if broken.is_empty() {
            Ok(())
        } else {
            Err(format!("the bench hit errors:\n  {}", broken.join("\n  ")))
        }
    }

    fn tool(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.current_dir(&self.dir);
        command
    }

    fn qemu_io(&self, request: &str, image: &str) -> Command {
        let mut command = self.tool("qemu-io");
        command.args(["-f", "qcow2", "-c", request, image]);
        command
    }

    fn copy(&self, from: &str, to: &str) -> std::result::Result<(), String> {
        run(self.tool("cp").args(["--sparse=always", from, to]))
    }

    /// A fresh WORK copy of the image `op` starts from.
    fn fresh(&self, op: Op) -> std::result::Result<(), String> {
        self.copy(op.source(), WORK)
    }

    fn remove_work(&self) {
        let _ = std::fs::remove_file(self.dir.join(WORK));
    }

    /// Prints and runs `command` in its directory, timing it and taking its peak RSS.
    fn timed(&self, command: &mut Command) -> std::result::Result<Timed, String> {
        timed(command, &self.dir.join("rss.txt"), self.measure_rss)
    }

    /// Whether snapctl's result is what the operation promises.
    fn verify(&self, op: Op) -> std::result::Result<(), String> {
        let names = self.snapshot_names()?;
        let has_snapshot = names.iter().any(|name| name == SNAPSHOT);
        match op {
            Op::Create | Op::Revert if !has_snapshot => Err(format!(
                "snapshot '{SNAPSHOT}' missing afterwards (snapshots: {names:?})"
            )),
            Op::Delete if has_snapshot => Err(format!("snapshot '{SNAPSHOT}' still present")),
            Op::Revert => {
                let read = capture(&mut self.qemu_io("read -P 0xaa 0 64k", WORK))?;
                if read.status.success() {
                    Ok(())
                } else {
                    Err(
                        "data not reverted: the first 64 KiB do not hold the snapshot's 0xaa"
                            .into(),
                    )
                }
            }
            Op::Create | Op::Delete => Ok(()),
        }
    }

    fn snapshot_names(&self) -> std::result::Result<Vec<String>, String> {
        let mut info = self.tool("qemu-img");
        info.args(["info", "--output=json", WORK]);
        let output = capture(&mut info)?;
        if !output.status.success() {
            return Err(format!("`{}` failed ({})", display(&info), output.status));
        }
        let info: serde_json::Value = serde_json::from_slice(&output.stdout)
            .map_err(|err| format!("qemu-img info: {err}"))?;
        Ok(info
            .get("snapshots")
            .and_then(|value| value.as_array())
            .map(|snapshots| {
                snapshots
                    .iter()
                    .filter_map(|snapshot| Some(snapshot.get("name")?.as_str()?.to_string()))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `qemu-img check` of WORK, in words (its exit status: 0 clean, 3 leaks, 2 corrupt).
    fn check_work(&self) -> String {
        let mut check = self.tool("qemu-img");
        check.args(["check", WORK]);
        run_check(&mut check)
    }
}

/// Prints and runs a prepared `qemu-img check` command and returns its verdict in words (its exit
/// status: 0 clean, 3 leaks, 2 corrupt), echoing the report when it is not clean.
fn run_check(check: &mut Command) -> String {
    println!("$ {}", display(check));
    match capture(check) {
        Ok(output) => {
            let verdict = check_verdict(output.status);
            println!("({verdict})");
            if verdict != "clean" {
                print!("{}", String::from_utf8_lossy(&output.stdout));
                eprint!("{}", String::from_utf8_lossy(&output.stderr));
            }
            verdict.to_string()
        }
        Err(why) => why,
    }
}

/// Prints and runs `command` (in the directory set on it), timing it and, with GNU time writing to
/// `rss_file`, taking its peak RSS. An unsuccessful exit is an error.
fn timed(
    command: &mut Command,
    rss_file: &Path,
    measure_rss: bool,
) -> std::result::Result<Timed, String> {
    println!("$ {}", display(command));
    let mut child = if measure_rss {
        let mut wrapped = Command::new(GNU_TIME);
        wrapped
            .arg("-f")
            .arg("%M")
            .arg("-o")
            .arg(rss_file)
            .arg(command.get_program())
            .args(command.get_args());
        wrapped
    } else {
        let mut plain = Command::new(command.get_program());
        plain.args(command.get_args());
        plain
    };
    if let Some(dir) = command.get_current_dir() {
        child.current_dir(dir);
    }
    let started = Instant::now();
    let output = capture(&mut child)?;
    let seconds = started.elapsed().as_secs_f64();
    print!("{}", String::from_utf8_lossy(&output.stdout));
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    let rss_kib = measure_rss.then(|| peak_rss(rss_file)).flatten();
    println!(
        "({seconds:.3} s{})",
        rss_kib.map_or(String::new(), |kib| format!(
            ", peak RSS {:.1} MiB",
            mib(kib)
        ))
    );
    if output.status.success() {
        Ok(Timed { seconds, rss_kib })
    } else {
        Err(format!("`{}` failed ({})", display(command), output.status))
    }
}

/// Runs `once` `runs` times (stopping at the first failure): the median time, the largest peak RSS.
fn repeat(
    runs: usize,
    mut once: impl FnMut() -> std::result::Result<Timed, String>,
) -> std::result::Result<Timed, String> {
    let mut all = Vec::with_capacity(runs);
    for _ in 0..runs {
        all.push(once()?);
    }
    Ok(median(all))
}

/// The median time of `all` and the largest peak RSS among them.
fn median(mut all: Vec<Timed>) -> Timed {
    all.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let median = all.get(all.len() / 2).map_or(0.0, |timed| timed.seconds);
    Timed {
        seconds: median,
        rss_kib: all.iter().filter_map(|timed| timed.rss_kib).max(),
    }
}

fn check_verdict(status: ExitStatus) -> &'static str {
    match status.code() {
        Some(0) => "clean",
        Some(3) => "leaks only",
        Some(2) => "CORRUPT",
        _ => "check failed",
    }
}

/// GNU time's `%M` (KiB): the last line of its output file (it may say the command failed first).
fn peak_rss(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())?
        .trim()
        .parse()
        .ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn problems(row: &Row) -> Vec<String> {
    let mut found = Vec::new();
    let name = row.op.name();
    if let Err(why) = &row.qemu {
        found.push(format!("{name} (qemu-img): {why}"));
    }
    match &row.snapctl {
        Err(why) => found.push(format!("{name} (snapctl): {why}")),
        Ok(_) => {
            if let Err(why) = &row.verified {
                found.push(format!("{name} (snapctl): {why}"));
            }
            if row.check != "clean" {
                found.push(format!("{name} (snapctl): qemu-img check: {}", row.check));
            }
        }
    }
    found
}

fn report(size: &str, runs: usize, reference: &Timed, rows: &[Row], measured_rss: bool) {
    let rss = |timed: &Timed| {
        timed
            .rss_kib
            .map_or("n/a".to_string(), |kib| format!("{:.1}", mib(kib)))
    };
    println!(
        "\nsnapctl vs qemu-img snapshot on a {size} qcow2 image (preallocation=metadata), warm page \
         cache; {}",
        if runs == 1 {
            "one run each (use --runs N for medians)".to_string()
        } else {
            format!("median of {runs} runs each")
        }
    );
    println!(
        "reference: qemu-img check (reads all metadata) {:.3} s, peak RSS {} MiB\n",
        reference.seconds,
        rss(reference)
    );
    print_row([
        "operation",
        "qemu-img s",
        "snapctl s",
        "ratio",
        "target",
        "speed",
        "snapctl RSS MiB",
        "RSS<=64",
        "qemu RSS MiB",
        "after snapctl",
    ]);
    let mut met = 0;
    let mut goals = 0;
    for row in rows {
        // A fast or small wrong result meets no target.
        let correct = row.snapctl.is_ok() && row.verified.is_ok() && row.check == "clean";
        let ratio = match (&row.qemu, &row.snapctl) {
            (Ok(qemu), Ok(snapctl)) => Some(qemu.seconds / snapctl.seconds.max(1e-6)),
            _ => None,
        };
        let fast = ratio.map(|ratio| ratio >= row.op.target());
        let small = row
            .snapctl
            .as_ref()
            .ok()
            .and_then(|snapctl| snapctl.rss_kib)
            .map(|kib| mib(kib) <= RSS_LIMIT_MIB);
        met += usize::from(correct && fast == Some(true))
            + usize::from(correct && small == Some(true));
        let snapctl_s = row
            .snapctl
            .as_ref()
            .map_or("FAILED".to_string(), |snapctl| {
                format!("{:.3}", snapctl.seconds)
            });
        let snapctl_rss = row.snapctl.as_ref().map_or("-".to_string(), rss);
        let ratio = ratio.map_or("-".to_string(), |ratio| format!("{ratio:.1}x"));
        goals += 1 + usize::from(measured_rss);
        let qemu_s = row
            .qemu
            .as_ref()
            .map_or("FAILED".to_string(), |qemu| format!("{:.3}", qemu.seconds));
        let qemu_rss = row.qemu.as_ref().map_or("-".to_string(), rss);
        let after = match (&row.snapctl, &row.verified) {
            (Err(_), _) => "-".to_string(),
            (Ok(_), Ok(())) => format!("check {}, verified", row.check),
            (Ok(_), Err(_)) => format!("check {}, WRONG RESULT", row.check),
        };
        print_row([
            row.op.name(),
            &qemu_s,
            &snapctl_s,
            &ratio,
            &format!(">={}x", row.op.target()),
            verdict(fast, correct),
            &snapctl_rss,
            verdict(small, correct),
            &qemu_rss,
            &after,
        ]);
    }
    if measured_rss {
        println!("\ntargets met: {met} of {goals} (speed-up per operation, peak RSS <= 64 MiB)");
    } else {
        println!("\ntargets met: {met} of {goals} (peak RSS not measured: {GNU_TIME} missing)");
    }
}

fn print_row(cells: [&str; 10]) {
    let [
        op,
        qemu_s,
        snapctl_s,
        ratio,
        target,
        speed,
        snapctl_rss,
        rss_ok,
        qemu_rss,
        after,
    ] = cells;
    println!(
        "{op:<9} {qemu_s:>11} {snapctl_s:>11} {ratio:>9} {target:>7} {speed:>6} {snapctl_rss:>16} \
         {rss_ok:>8} {qemu_rss:>13}  {after}"
    );
}

/// pass/fail for a target; a wrong result fails every target, an unmeasured one is n/a.
fn verdict(met: Option<bool>, correct: bool) -> &'static str {
    match met {
        Some(true) if correct => "pass",
        None if correct => "n/a",
        _ => "fail",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|word| word.to_string()).collect()
    }

    #[test]
    fn options() {
        let defaults = Options {
            size: "1T".to_string(),
            runs: 1,
            criterion: false,
            merge_data: 1 << 30,
            only: None,
        };
        assert_eq!(parse_options(&[]).ok(), Some(defaults));
        let quick = parse_options(&args(&["--size", "64G", "--criterion", "--runs=3"])).ok();
        assert_eq!(
            quick,
            Some(Options {
                size: "64G".to_string(),
                runs: 3,
                criterion: true,
                merge_data: 1 << 30,
                only: None,
            })
        );
        let merge = parse_options(&args(&["--only", "merge", "--merge-data=512M"])).ok();
        assert_eq!(
            merge,
            Some(Options {
                size: "1T".to_string(),
                runs: 1,
                criterion: false,
                merge_data: 512 << 20,
                only: Some(Part::Merge),
            })
        );
        assert!(matches!(
            parse_options(&args(&["--only=snapshot", "--merge-data", "2G"])),
            Ok(Options { only: Some(Part::Snapshot), merge_data, .. }) if merge_data == 2 << 30
        ));
        assert!(matches!(
            parse_options(&args(&["--size=2T"])),
            Ok(Options { ref size, .. }) if size == "2T"
        ));
        for bad in [
            &["--size"][..],
            &["--size", "big"],
            &["--size", "0G"],
            &["--runs", "0"],
            &["--runs", "x"],
            &["--criterion=yes"],
            &["--fast"],
            &["--only"],
            &["--only", "both"],
            &["--merge-data"],
            &["--merge-data", "8M"],
            &["--merge-data", "33G"],
            &["--merge-data", "1000k"],
            &["--merge-data", "lots"],
        ] {
            assert!(
                matches!(parse_options(&args(bad)), Err(Failure::Usage(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sizes() {
        for good in ["1T", "64G", "512M", "1073741824", "100k"] {
            assert!(valid_size(good), "{good}");
        }
        for bad in ["", "T", "1TT", "1.5T", "-1G", "0"] {
            assert!(!valid_size(bad), "{bad}");
            assert_eq!(size_bytes(bad), None, "{bad}");
        }
        assert_eq!(size_bytes("1G"), Some(1 << 30));
        assert_eq!(size_bytes("512M"), Some(512 << 20));
        assert_eq!(size_bytes("100k"), Some(102_400));
        assert_eq!(size_bytes("64K"), Some(65_536));
        assert_eq!(size_bytes("1073741824"), Some(1 << 30));
        assert_eq!(size_bytes("1T"), Some(1 << 40));
        assert_eq!(size_bytes("16E"), None, "overflows u64");
    }

    #[test]
    fn gnu_time_output() {
        let dir = std::env::temp_dir().join(format!("xtask-rss-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("rss.txt");
        let _ = std::fs::write(&file, "Command exited with non-zero status 1\n41124\n");
        assert_eq!(peak_rss(&file), Some(41124));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
