//! The merge part of `cargo xtask bench`: deleting the middle layer of an external-snapshot chain
//! with snapctl against doing the same with qemu-img.
//!
//! The chain is built once per bench run, for D bytes of data per layer (`--merge-data`, 1G by
//! default), with `snapctl disk create --external` making the overlays:
//!
//! ```text
//! base.qcow2           D   of 0x11 at 0
//! base.mid.qcow2       D   of 0x22 at D/2 (over the second half of base's data, and D/2 beyond)
//! base.mid.top.qcow2   D/16 of 0x33 at 0 (over base's data only, so all of mid is still seen)
//! ```
//!
//! It is built twice with the same data, on a 64G and on a 1T virtual size: a merge should cost
//! what the data costs, whatever the virtual size. Removing mid while keeping top's view is done
//! three ways, each on its own fresh copy of the chain (`cp --sparse=always` into a new folder,
//! then `sync`), each run:
//!
//! - rebase: `qemu-img rebase -b base.qcow2 -F qcow2 base.mid.top.qcow2` (safe mode: copies into
//!   top what differs between the old and the new backing);
//! - snapctl: `snapctl disk delete base.mid.top.qcow2 --layer base.mid.qcow2`: the same result.
//!   top holds D/16 and mid gives it D, so snapctl folds top into mid (D/16 copied) and renames
//!   mid over top; a child holding more than the layer gives it would be streamed into instead;
//! - commit: `qemu-img commit base.mid.qcow2` (mid into base), then
//!   `qemu-img rebase -u -b base.qcow2 -F qcow2 base.mid.top.qcow2`, timed together.
//!
//! Each qemu-img way copies D bytes of guest data. The rebase result is the reference: after every run,
//! snapctl's top must be identical to it (`qemu-img compare`), backed by base.qcow2 with mid gone,
//! and clean for `qemu-img check`; the commit result must be identical to it as well, and the
//! first rebase result identical to the chain it started from. A wrong result fails the bench.

use super::{RSS_LIMIT_MIB, Timed, free_bytes, median, mib, run_check, timed, verdict};
use crate::proc::{TempDir, capture, display, run};
use crate::{Failure, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const BASE: &str = "base.qcow2";
const MID: &str = "base.mid.qcow2";
const TOP: &str = "base.mid.top.qcow2";
/// The two chains: the same data on two virtual sizes, 16x apart.
const VIRTUAL_SIZES: [&str; 2] = ["64G", "1T"];
/// snapctl against each qemu-img way: at least this much faster.
const TARGET: f64 = 1.5;
/// The merge on the 1T chain may take this much longer than on the 64G chain ("about the same
/// time") ...
const PROPORTIONAL_LIMIT: f64 = 1.25;
/// ... or this many seconds longer, for a small --merge-data whose times are tiny.
const PROPORTIONAL_SLACK_S: f64 = 0.1;
/// The largest write in one qemu-io request.
const WRITE_CHUNK: u64 = 1 << 30;

pub(super) fn run_merge(
    target: &Path,
    snapctl: &Path,
    data: u64,
    runs: usize,
    measure_rss: bool,
) -> Result {
    let scratch = TempDir::new(target, "xtask-bench-merge")?;
    let need = free_needed(data);
    let free = free_bytes(scratch.path())?;
    if free < need {
        return Err(Failure::Failed(format!(
            "only {} free on the filesystem of {}; the merge bench with --merge-data {} needs at \
             least {} (two chains of three layers, plus two fresh copies at a time)",
            human(free),
            scratch.path().display(),
            qemu_size(data),
            human(need)
        )));
    }
    let bench = MergeBench {
        dir: scratch.path().to_path_buf(),
        snapctl: snapctl.to_path_buf(),
        data,
        measure_rss,
    };
    let outcome = bench.run(runs);
    drop(scratch);
    Ok(outcome?)
}

/// Bytes of free space the merge part needs: two chains of about 2.1 D each, the reference
/// result (2.1 D) and one other fresh copy (3.1 D at its fullest), and 1 GiB to spare.
fn free_needed(data: u64) -> u64 {
    data.saturating_mul(10).saturating_add(1 << 30)
}

/// Median timings and checks of one chain (one virtual size).
struct Case {
    virtual_size: &'static str,
    rebase: std::result::Result<Timed, String>,
    commit: std::result::Result<Timed, String>,
    snapctl: std::result::Result<Timed, String>,
    /// `qemu-img check` of snapctl's result: the first verdict that was not "clean".
    check: String,
    /// snapctl's result is identical to rebase's, relinked to base.qcow2, mid removed.
    verified: std::result::Result<(), String>,
    /// The references agree: rebase's result with the original chain, commit's with rebase's.
    reference: std::result::Result<(), String>,
}

impl Case {
    /// snapctl's result passed every check: only then can it meet a target.
    fn correct(&self) -> bool {
        self.snapctl.is_ok() && self.verified.is_ok() && self.check == "clean"
    }
}

/// All the timings of one way across runs, or why it stopped.
type Tally = std::result::Result<Vec<Timed>, String>;

fn push(tally: &mut Tally, timed: std::result::Result<Timed, String>) {
    match (tally.as_mut(), timed) {
        (Ok(all), Ok(timed)) => all.push(timed),
        (Ok(_), Err(why)) => *tally = Err(why),
        (Err(_), _) => {}
    }
}

fn keep_first(
    slot: &mut std::result::Result<(), String>,
    outcome: std::result::Result<(), String>,
) {
    if slot.is_ok() {
        *slot = outcome;
    }
}

struct MergeBench {
    dir: PathBuf,
    snapctl: PathBuf,
    data: u64,
    measure_rss: bool,
}

impl MergeBench {
    fn run(&self, runs: usize) -> std::result::Result<(), String> {
        println!(
            "\n==> merge bench: chains base <- mid <- top with {} of data per layer, in {}",
            human(self.data),
            self.dir.display()
        );
        let mut cases = Vec::new();
        for virtual_size in VIRTUAL_SIZES {
            let chain = self.build_chain(virtual_size)?;
            cases.push(self.measure(&chain, virtual_size, runs)?);
        }
        report(&cases, self.data, runs, self.measure_rss);
        let broken: Vec<String> = cases.iter().flat_map(problems).collect();
        if broken.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the merge bench hit errors:\n  {}",
                broken.join("\n  ")
            ))
        }
    }

    /// A command run in `dir` (relative to the scratch directory).
    fn tool(&self, program: impl AsRef<std::ffi::OsStr>, dir: &str) -> Command {
        let mut command = Command::new(program);
        command.current_dir(self.dir.join(dir));
        command
    }

    /// `qemu-io` writing `len` bytes of `pattern` at `offset`, in requests of at most 1 GiB.
    fn write(&self, dir: &str, image: &str, pattern: u8, offset: u64, len: u64) -> Command {
        let mut command = self.tool("qemu-io", dir);
        command.args(["-f", "qcow2"]);
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let chunk = WRITE_CHUNK.min(end - at);
            command.arg("-c").arg(format!(
                "write -P {pattern:#04x} {} {}",
                qemu_size(at),
                qemu_size(chunk)
            ));
            at += chunk;
        }
        command.arg(image);
        command
    }

    /// Builds the chain on `virtual_size` in its own folder; returns the folder's name.
    fn build_chain(&self, virtual_size: &str) -> std::result::Result<String, String> {
        let folder = format!("chain-{virtual_size}");
        let path = self.dir.join(&folder);
        std::fs::create_dir_all(&path)
            .map_err(|err| format!("cannot create {}: {err}", path.display()))?;
        let data = self.data;
        println!(
            "\n==> {virtual_size} chain in {folder}/: {BASE} with {} of 0x11 at 0, {MID} with {} \
             of 0x22 at {}, {TOP} with {} of 0x33 at 0",
            human(data),
            human(data),
            human(data / 2),
            human(data / 16)
        );
        run(self
            .tool("qemu-img", &folder)
            .args(["create", "-f", "qcow2", BASE, virtual_size]))?;
        run(self.write(&folder, BASE, 0x11, 0, data))?;
        run(self
            .tool(&self.snapctl, &folder)
            .args(["disk", "create", BASE, "mid", "--external"]))?;
        run(self.write(&folder, MID, 0x22, data / 2, data))?;
        run(self
            .tool(&self.snapctl, &folder)
            .args(["disk", "create", MID, "top", "--external"]))?;
        run(self.write(&folder, TOP, 0x33, 0, data / 16))?;
        for layer in [BASE, MID, TOP] {
            if !path.join(layer).is_file() {
                return Err(format!("building the chain left no {folder}/{layer}"));
            }
        }
        Ok(folder)
    }

    /// Every way `runs` times on the chain in `chain`, then the medians.
    fn measure(
        &self,
        chain: &str,
        virtual_size: &'static str,
        runs: usize,
    ) -> std::result::Result<Case, String> {
        let mut rebase: Tally = Ok(Vec::new());
        let mut commit: Tally = Ok(Vec::new());
        let mut snapctl: Tally = Ok(Vec::new());
        let mut check = "clean".to_string();
        let mut verified = Ok(());
        let mut reference = Ok(());
        for number in 1..=runs {
            println!(
                "\n==> merge on the {virtual_size} chain, run {number} of {runs}: qemu-img rebase"
            );
            let reference_dir = self.fresh(chain, "rebase")?;
            let timed = self.timed(
                self.tool("qemu-img", &reference_dir)
                    .args(["rebase", "-b", BASE, "-F", "qcow2", TOP]),
            );
            let rebase_ok = timed.is_ok();
            push(&mut rebase, timed);
            if !rebase_ok {
                self.remove(&reference_dir);
                break;
            }
            // Not part of the work: mid would be deleted by hand after a rebase.
            let _ = std::fs::remove_file(self.dir.join(&reference_dir).join(MID));
            if number == 1 {
                let same = self
                    .compare(&format!("{chain}/{TOP}"), &format!("{reference_dir}/{TOP}"))
                    .map_err(|why| format!("qemu-img rebase's result against the chain: {why}"));
                keep_first(&mut reference, same);
            }

            println!("\n==> merge on the {virtual_size} chain, run {number} of {runs}: snapctl");
            let dir = self.fresh(chain, "snapctl")?;
            let timed = self.timed(
                self.tool(&self.snapctl, &dir)
                    .args(["disk", "delete", TOP, "--layer", MID]),
            );
            let snapctl_ok = timed.is_ok();
            if snapctl_ok {
                keep_first(&mut verified, self.verify(&dir, &reference_dir));
                let verdict = self.check(&format!("{dir}/{TOP}"));
                if check == "clean" {
                    check = verdict;
                }
            }
            push(&mut snapctl, timed);
            self.remove(&dir);

            println!(
                "\n==> merge on the {virtual_size} chain, run {number} of {runs}: qemu-img commit \
                 + rebase -u"
            );
            let dir = self.fresh(chain, "commit")?;
            let timed = self
                .timed(self.tool("qemu-img", &dir).args(["commit", MID]))
                .and_then(|commit| {
                    let relink = self.timed(
                        self.tool("qemu-img", &dir)
                            .args(["rebase", "-u", "-b", BASE, "-F", "qcow2", TOP]),
                    )?;
                    Ok(Timed {
                        seconds: commit.seconds + relink.seconds,
                        rss_kib: commit.rss_kib.max(relink.rss_kib),
                    })
                });
            let commit_ok = timed.is_ok();
            if commit_ok {
                let same = self
                    .compare(&format!("{dir}/{TOP}"), &format!("{reference_dir}/{TOP}"))
                    .map_err(|why| {
                        format!("qemu-img commit + rebase -u's result against rebase's: {why}")
                    });
                keep_first(&mut reference, same);
            }
            push(&mut commit, timed);
            self.remove(&dir);
            self.remove(&reference_dir);
            if !(snapctl_ok && commit_ok) {
                break;
            }
        }
        Ok(Case {
            virtual_size,
            rebase: rebase.map(median),
            commit: commit.map(median),
            snapctl: snapctl.map(median),
            check,
            verified,
            reference,
        })
    }

    /// A fresh copy of the chain in `chain` as folder `name`, synced to disk.
    fn fresh(&self, chain: &str, name: &str) -> std::result::Result<String, String> {
        self.remove(name);
        let path = self.dir.join(name);
        std::fs::create_dir_all(&path)
            .map_err(|err| format!("cannot create {}: {err}", path.display()))?;
        run(self
            .tool("cp", ".")
            .arg("--sparse=always")
            .args([BASE, MID, TOP].map(|layer| format!("{chain}/{layer}")))
            .arg(format!("{name}/")))?;
        run(self.tool("sync", "."))?;
        // Start every method from the same memory state: with the page cache full, the first
        // writer pays for reclaim and timings swing 3x on this kind of machine. Dropping the
        // cache (root only) and reading the fresh copy back in leaves the sources warm and free
        // pages for the new data. Without root, timings are noisier.
        if crate::sysdeps::is_root() {
            let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
            for layer in [BASE, MID, TOP] {
                if let Ok(mut file) = std::fs::File::open(self.dir.join(name).join(layer)) {
                    let _ = std::io::copy(&mut file, &mut std::io::sink());
                }
            }
        }
        Ok(name.to_string())
    }

    fn remove(&self, name: &str) {
        let _ = std::fs::remove_dir_all(self.dir.join(name));
    }

    fn timed(&self, command: &mut Command) -> std::result::Result<Timed, String> {
        timed(command, &self.dir.join("rss.txt"), self.measure_rss)
    }

    /// Whether snapctl's result in `dir` is the reference's, relinked to base, without mid.
    fn verify(&self, dir: &str, reference: &str) -> std::result::Result<(), String> {
        if self.dir.join(dir).join(MID).exists() {
            return Err(format!("{MID} still present after the merge"));
        }
        let mut info = self.tool("qemu-img", dir);
        info.args(["info", "--output=json", TOP]);
        let output = capture(&mut info)?;
        if !output.status.success() {
            return Err(format!("`{}` failed ({})", display(&info), output.status));
        }
        let info: serde_json::Value = serde_json::from_slice(&output.stdout)
            .map_err(|err| format!("qemu-img info: {err}"))?;
        let backing = info.get("backing-filename").and_then(|name| name.as_str());
        if backing != Some(BASE) {
            return Err(format!(
                "{TOP} is backed by {backing:?} after the merge, not {BASE:?}"
            ));
        }
        self.compare(&format!("{dir}/{TOP}"), &format!("{reference}/{TOP}"))
            .map_err(|why| format!("against qemu-img rebase's result: {why}"))
    }

    /// `qemu-img compare` of two images' guest views (exit 0 identical, 1 different).
    fn compare(&self, first: &str, second: &str) -> std::result::Result<(), String> {
        let mut compare = self.tool("qemu-img", ".");
        compare.args(["compare", "-f", "qcow2", "-F", "qcow2", first, second]);
        println!("$ {}", display(&compare));
        let output = capture(&mut compare)?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let said = said.trim();
        println!("({said})");
        match output.status.code() {
            Some(0) => Ok(()),
            Some(1) => Err(format!("DIFFERENT ({said})")),
            _ => Err(format!(
                "`{}` failed ({}): {said}",
                display(&compare),
                output.status
            )),
        }
    }

    /// `qemu-img check` of `image`, in words.
    fn check(&self, image: &str) -> String {
        let mut check = self.tool("qemu-img", ".");
        check.args(["check", image]);
        run_check(&mut check)
    }
}

fn problems(case: &Case) -> Vec<String> {
    let name = format!("merge on the {} chain", case.virtual_size);
    let mut found = Vec::new();
    for (way, timed) in [
        ("qemu-img rebase", &case.rebase),
        ("qemu-img commit + rebase -u", &case.commit),
    ] {
        if let Err(why) = timed {
            found.push(format!("{name} ({way}): {why}"));
        }
    }
    match &case.snapctl {
        Err(why) => found.push(format!("{name} (snapctl): {why}")),
        Ok(_) => {
            if let Err(why) = &case.verified {
                found.push(format!("{name} (snapctl): {why}"));
            }
            if case.check != "clean" {
                found.push(format!("{name} (snapctl): qemu-img check: {}", case.check));
            }
        }
    }
    if let Err(why) = &case.reference {
        found.push(format!("{name} (reference): {why}"));
    }
    found
}

/// qemu-img's time over snapctl's, when both ran.
fn ratio(
    qemu: &std::result::Result<Timed, String>,
    snapctl: &std::result::Result<Timed, String>,
) -> Option<f64> {
    match (qemu, snapctl) {
        (Ok(qemu), Ok(snapctl)) => Some(qemu.seconds / snapctl.seconds.max(1e-6)),
        _ => None,
    }
}

fn seconds(timed: &std::result::Result<Timed, String>) -> String {
    timed.as_ref().map_or("FAILED".to_string(), |timed| {
        format!("{:.3}", timed.seconds)
    })
}

fn rss(timed: &std::result::Result<Timed, String>) -> String {
    match timed {
        Ok(Timed {
            rss_kib: Some(kib), ..
        }) => format!("{:.1}", mib(*kib)),
        Ok(_) => "n/a".to_string(),
        Err(_) => "-".to_string(),
    }
}

fn report(cases: &[Case], data: u64, runs: usize, measured_rss: bool) {
    println!(
        "\nsnapctl disk delete --layer against qemu-img on the same work: remove the middle layer of \
         base <- mid <- top keeping top's view, {} of data per layer (qemu-img copies {}), \
         fresh copies, warm page cache; {}",
        human(data),
        human(data),
        if runs == 1 {
            "one run each (use --runs N for medians)".to_string()
        } else {
            format!("median of {runs} runs each")
        }
    );
    println!("  rebase:  qemu-img rebase -b {BASE} -F qcow2 {TOP} (safe mode: streams into top)");
    println!(
        "  commit:  qemu-img commit {MID}, then qemu-img rebase -u -b {BASE} -F qcow2 {TOP} \
         (timed together)"
    );
    println!(
        "  snapctl: snapctl disk delete {TOP} --layer {MID} (top holds {} of its own, so it is \
         folded into mid, which takes its place: {} copied)\n",
        human(data / 16),
        human(data / 16)
    );
    print_row([
        "chain",
        "rebase s",
        "commit s",
        "snapctl s",
        "rebase/snapctl",
        "commit/snapctl",
        "target",
        "snapctl RSS MiB",
        "RSS<=64",
        "rebase/commit RSS",
        "after snapctl",
    ]);
    let mut met = 0;
    let mut goals = 0;
    for case in cases {
        let correct = case.correct();
        let mut speed = |qemu: &std::result::Result<Timed, String>| {
            let ratio = ratio(qemu, &case.snapctl);
            let fast = ratio.map(|ratio| ratio >= TARGET);
            met += usize::from(correct && fast == Some(true));
            goals += 1;
            format!(
                "{} {}",
                ratio.map_or("-".to_string(), |ratio| format!("{ratio:.2}x")),
                verdict(fast, correct)
            )
        };
        let vs_rebase = speed(&case.rebase);
        let vs_commit = speed(&case.commit);
        let small = case
            .snapctl
            .as_ref()
            .ok()
            .and_then(|snapctl| snapctl.rss_kib)
            .map(|kib| mib(kib) <= RSS_LIMIT_MIB);
        met += usize::from(correct && small == Some(true));
        goals += usize::from(measured_rss);
        let after = match (&case.snapctl, &case.verified) {
            (Err(_), _) => "-".to_string(),
            (Ok(_), Ok(())) => format!("check {}, identical to rebase's", case.check),
            (Ok(_), Err(_)) => format!("check {}, WRONG RESULT", case.check),
        };
        let after = match &case.reference {
            Ok(()) => after,
            Err(_) => format!("{after}; REFERENCES DISAGREE"),
        };
        print_row([
            case.virtual_size,
            &seconds(&case.rebase),
            &seconds(&case.commit),
            &seconds(&case.snapctl),
            &vs_rebase,
            &vs_commit,
            &format!(">={TARGET}x"),
            &rss(&case.snapctl),
            verdict(small, correct),
            &format!("{}/{}", rss(&case.rebase), rss(&case.commit)),
            &after,
        ]);
    }

    // Same data, 16x the virtual size: the time should not follow the virtual size.
    if let [small, large] = cases {
        let growth = |small: &std::result::Result<Timed, String>,
                      large: &std::result::Result<Timed, String>| {
            match (small, large) {
                (Ok(small), Ok(large)) => Some((small.seconds, large.seconds)),
                _ => None,
            }
        };
        let describe = |pair: Option<(f64, f64)>| {
            pair.map_or("-".to_string(), |(small, large)| {
                format!(
                    "{small:.3} s -> {large:.3} s (x{:.2})",
                    large / small.max(1e-6)
                )
            })
        };
        let snapctl = growth(&small.snapctl, &large.snapctl);
        let flat = snapctl.map(|(small, large)| {
            large <= small * PROPORTIONAL_LIMIT || large <= small + PROPORTIONAL_SLACK_S
        });
        let correct = small.correct() && large.correct();
        met += usize::from(correct && flat == Some(true));
        goals += 1;
        println!(
            "\nsame data on a {} and a {} virtual size:",
            small.virtual_size, large.virtual_size
        );
        println!(
            "  snapctl          {}  target <= x{PROPORTIONAL_LIMIT} (or +{PROPORTIONAL_SLACK_S} s): {}",
            describe(snapctl),
            verdict(flat, correct)
        );
        println!(
            "  qemu-img rebase  {}",
            describe(growth(&small.rebase, &large.rebase))
        );
        println!(
            "  qemu-img commit  {}",
            describe(growth(&small.commit, &large.commit))
        );
    }
    if measured_rss {
        println!(
            "\nmerge targets met: {met} of {goals} (>= {TARGET}x against rebase and against commit \
             per chain, peak RSS <= 64 MiB, time independent of the virtual size)"
        );
    } else {
        println!("\nmerge targets met: {met} of {goals} (peak RSS not measured: GNU time missing)");
    }
}

fn print_row(cells: [&str; 11]) {
    let [
        chain,
        rebase_s,
        commit_s,
        snapctl_s,
        vs_rebase,
        vs_commit,
        target,
        snapctl_rss,
        rss_ok,
        qemu_rss,
        after,
    ] = cells;
    println!(
        "{chain:<5} {rebase_s:>9} {commit_s:>9} {snapctl_s:>9} {vs_rebase:>14} {vs_commit:>14} \
         {target:>7} {snapctl_rss:>15} {rss_ok:>7} {qemu_rss:>17}  {after}"
    );
}

/// A size in qemu's notation: the largest binary suffix that divides it.
fn qemu_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "k")] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A size for people: GiB or MiB.
fn human(bytes: u64) -> String {
    let gib = bytes as f64 / f64::from(1u32 << 30);
    if gib >= 1.0 {
        format!("{} GiB", trim(gib))
    } else {
        format!("{} MiB", trim(bytes as f64 / f64::from(1u32 << 20)))
    }
}

/// At most two decimals, none when whole.
fn trim(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(qemu_size(1 << 30), "1G");
        assert_eq!(qemu_size(512 << 20), "512M");
        assert_eq!(qemu_size(3 << 29), "1536M");
        assert_eq!(qemu_size(64 << 10), "64k");
        assert_eq!(qemu_size(1 << 40), "1T");
        assert_eq!(qemu_size(1000), "1000");
        assert_eq!(qemu_size(0), "0");
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(free_needed(1 << 30), 11 << 30);
    }

    #[test]
    fn writes_are_split_into_requests_of_at_most_1g() {
        let bench = MergeBench {
            dir: PathBuf::from("/nonexistent"),
            snapctl: PathBuf::from("snapctl"),
            data: 3 << 30,
            measure_rss: false,
        };
        let command = bench.write(".", MID, 0x22, 3 << 29, 3 << 30);
        assert_eq!(
            display(&command),
            "qemu-io -f qcow2 -c 'write -P 0x22 1536M 1G' -c 'write -P 0x22 2560M 1G' \
             -c 'write -P 0x22 3584M 1G' base.mid.qcow2"
        );
    }

    #[test]
    fn tallies_keep_the_first_failure() {
        let mut tally: Tally = Ok(Vec::new());
        push(
            &mut tally,
            Ok(Timed {
                seconds: 1.0,
                rss_kib: Some(10),
            }),
        );
        push(&mut tally, Err("first".into()));
        push(&mut tally, Err("second".into()));
        assert!(matches!(tally, Err(ref why) if why == "first"));
    }
}
