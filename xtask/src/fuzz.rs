//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` (a crate outside the workspace) for a
//! fixed time each and tells what they found.
//!
//! 1. the nightly toolchain must be installed (we only say how) and cargo-fuzz too (installed when
//!    root);
//! 2. `cargo +nightly fuzz build` once, for every target;
//! 3. each target runs for `--seconds N` on its corpus `fuzz/corpus/TARGET` (seeds are in git,
//!    what libFuzzer adds is ignored by `fuzz/.gitignore`); libFuzzer's output is shown (minus the
//!    per-input NEW/REDUCE lines) and parsed for the number of executions;
//! 4. a table of executions and findings: files libFuzzer wrote under `fuzz/artifacts/TARGET/`
//!    during the run (crash-, oom-, timeout-...). Any finding exits 1.
//!
//! `--reproduce` instead re-runs every saved artifact against its target and reports which still
//! fail, e.g. after a fix.

use crate::proc::{capture, display, run, stdout_of};
use crate::sysdeps::is_root;
use crate::{Failure, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// libFuzzer flags for every run: a memory cap well above what a 1 MiB image needs, and a per-input
/// time limit so that a hang becomes a `timeout-` artifact instead of stalling the run.
const LIBFUZZER_FLAGS: [&str; 2] = ["-rss_limit_mb=2048", "-timeout=25"];

#[derive(Debug, PartialEq)]
struct Options {
    seconds: u64,
    /// Empty: every target `cargo fuzz list` knows.
    targets: Vec<String>,
    reproduce: bool,
}

pub fn run_fuzz(args: &[String]) -> Result {
    let options = parse_options(args)?;
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("fuzz");
    ensure_nightly()?;
    ensure_cargo_fuzz(&fuzz_dir)?;
    let known: Vec<String> = stdout_of(nightly_fuzz(&fuzz_dir).arg("list"))
        .ok_or_else(|| Failure::Failed("`cargo +nightly fuzz list` failed in fuzz/".into()))?
        .lines()
        .map(str::to_string)
        .collect();
    if let Some(unknown) = options
        .targets
        .iter()
        .find(|target| !known.contains(target))
    {
        return Err(Failure::Usage(format!(
            "fuzz: unknown target `{unknown}` (targets: {})",
            known.join(", ")
        )));
    }
    let targets = if options.targets.is_empty() {
        known
    } else {
        options.targets
    };
    println!("\n==> building the fuzz targets (the first build takes a few minutes)");
    run(nightly_fuzz(&fuzz_dir).arg("build"))?;
    if options.reproduce {
        reproduce(&fuzz_dir, &targets)
    } else {
        fuzz(&fuzz_dir, &targets, options.seconds)
    }
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut options = Options {
        seconds: 60,
        targets: Vec::new(),
        reproduce: false,
    };
    let mut seconds_given = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_string())),
            None => (arg.as_str(), None),
        };
        match flag {
            "--reproduce" if inline.is_none() => options.reproduce = true,
            "--seconds" => {
                let value = inline
                    .or_else(|| args.next().cloned())
                    .ok_or_else(|| Failure::Usage("--seconds needs a value".into()))?;
                options.seconds = value.parse().ok().filter(|s| *s >= 1).ok_or_else(|| {
                    Failure::Usage(format!("--seconds {value}: expected 1 or more"))
                })?;
                seconds_given = true;
            }
            _ if arg.starts_with('-') => {
                return Err(Failure::Usage(format!("fuzz: unexpected `{arg}`")));
            }
            _ => options.targets.push(arg.clone()),
        }
    }
    if options.reproduce && seconds_given {
        return Err(Failure::Usage(
            "fuzz: --reproduce runs each artifact once; --seconds does not apply".into(),
        ));
    }
    Ok(options)
}

/// `cargo +nightly fuzz` in `fuzz/`. The rustup proxy `cargo` from PATH, not the `$CARGO` of the
/// stable toolchain that runs xtask (it would not understand `+nightly`).
fn nightly_fuzz(fuzz_dir: &Path) -> Command {
    let mut command = Command::new("cargo");
    command
        .current_dir(fuzz_dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["+nightly", "fuzz"]);
    command
}

fn ensure_nightly() -> Result {
    let toolchains =
        stdout_of(Command::new("rustup").args(["toolchain", "list"])).ok_or_else(|| {
            Failure::Failed(
            "cannot run `rustup toolchain list`: fuzzing needs rustup and the nightly toolchain"
                .into(),
        )
        })?;
    if toolchains.lines().any(|line| line.starts_with("nightly")) {
        Ok(())
    } else {
        Err(Failure::Failed(
            "the nightly toolchain is not installed (cargo-fuzz needs it): \
             `rustup toolchain install nightly`"
                .into(),
        ))
    }
}

/// cargo-fuzz must work with nightly; as root, installs it when missing.
fn ensure_cargo_fuzz(fuzz_dir: &Path) -> Result {
    let version = || stdout_of(nightly_fuzz(fuzz_dir).arg("--version"));
    if let Some(version) = version() {
        println!("xtask: {version}");
        return Ok(());
    }
    if !is_root() {
        return Err(Failure::Failed(
            "cargo-fuzz is not installed: `cargo install cargo-fuzz --locked`, \
             or run this command as root to do it for you"
                .into(),
        ));
    }
    println!("xtask: cargo-fuzz is missing; installing it (about a minute)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    version()
        .map(|_| ())
        .ok_or_else(|| Failure::Failed("cargo-fuzz still does not run after installing it".into()))
}

/// One target's run.
struct Row {
    target: String,
    seconds: f64,
    execs: Option<u64>,
    /// Artifacts written during the run, each with what the output says about the failure.
    findings: Vec<(PathBuf, Option<String>)>,
    /// A failed run that left no artifact (e.g. the target did not start).
    error: Option<String>,
}

fn fuzz(fuzz_dir: &Path, targets: &[String], seconds: u64) -> Result {
    let mut rows = Vec::new();
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .map_err(|err| format!("cannot create {}: {err}", corpus.display()))?;
        println!("\n==> fuzzing {target} for {seconds} s");
        let mut command = nightly_fuzz(fuzz_dir);
        command
            .args(["run", target.as_str()])
            .arg(&corpus)
            .arg("--")
            .args(LIBFUZZER_FLAGS)
            .arg(format!("-max_total_time={seconds}"));
        // Files' mtimes come from a coarser clock than SystemTime::now(): allow a second.
        let since = SystemTime::now() - Duration::from_secs(1);
        let started = Instant::now();
        let (status, output) = run_logged(command)?;
        let wall = started.elapsed().as_secs_f64();
        let progress = parse_progress(&output);
        let findings: Vec<_> = artifacts_since(&fuzz_dir.join("artifacts").join(target), since)
            .into_iter()
            .map(|path| (path, failure_summary(&output)))
            .collect();
        let error = (!status.success() && findings.is_empty()).then(|| match progress {
            None => format!("did not start fuzzing ({status}; see the output above)"),
            Some(_) => failure_summary(&output).unwrap_or_else(|| format!("failed ({status})")),
        });
        rows.push(Row {
            target: target.clone(),
            seconds: progress.and_then(|p| p.seconds).map_or(wall, |s| s as f64),
            execs: progress.map(|p| p.execs),
            findings,
            error,
        });
    }
    let root = fuzz_dir.parent().unwrap_or(fuzz_dir);
    println!("\nxtask fuzz summary ({seconds} s per target):");
    println!(
        "  {:<16} {:>7} {:>12} {:>9}  findings",
        "target", "seconds", "execs", "execs/s"
    );
    for row in &rows {
        let execs = row.execs.map_or("?".to_string(), |n| n.to_string());
        let rate = match row.execs {
            Some(n) if row.seconds > 0.0 => format!("{:.0}", n as f64 / row.seconds),
            _ => "?".to_string(),
        };
        let mut found: Vec<String> = row
            .findings
            .iter()
            .map(|(path, why)| {
                let kind = path
                    .file_name()
                    .and_then(|name| name.to_str()?.split('-').next())
                    .unwrap_or("artifact");
                let path = path.strip_prefix(root).unwrap_or(path).display();
                match why {
                    Some(why) => format!("{kind}: {path} ({why})"),
                    None => format!("{kind}: {path}"),
                }
            })
            .collect();
        if let Some(error) = &row.error {
            found.push(format!("ERROR: {error}"));
        }
        if found.is_empty() {
            found.push("none".into());
        }
        // One finding per line, the first on the target's line.
        let indent = format!("\n{:51}", "");
        println!(
            "  {:<16} {:>7.0} {:>12} {:>9}  {}",
            row.target,
            row.seconds,
            execs,
            rate,
            found.join(&indent)
        );
    }
    let bad: Vec<&str> = rows
        .iter()
        .filter(|row| !row.findings.is_empty() || row.error.is_some())
        .map(|row| row.target.as_str())
        .collect();
    if bad.is_empty() {
        println!("no findings");
        Ok(())
    } else {
        Err(Failure::Failed(format!(
            "fuzzing found problems in: {} (reproduce with `cargo +nightly fuzz run TARGET \
             ARTIFACT` in fuzz/, or `cargo xtask fuzz --reproduce`)",
            bad.join(", ")
        )))
    }
}

/// Re-runs every artifact under `fuzz/artifacts/TARGET/` once.
fn reproduce(fuzz_dir: &Path, targets: &[String]) -> Result {
    let root = fuzz_dir.parent().unwrap_or(fuzz_dir);
    let mut still_failing = 0;
    let mut count = 0;
    println!("\nxtask fuzz --reproduce:");
    for target in targets {
        for artifact in artifacts_since(
            &fuzz_dir.join("artifacts").join(target),
            SystemTime::UNIX_EPOCH,
        ) {
            count += 1;
            let mut command = nightly_fuzz(fuzz_dir);
            command
                .args(["run", target.as_str()])
                .arg(&artifact)
                .arg("--")
                .args(LIBFUZZER_FLAGS);
            let output = capture(&mut command)?;
            let shown = artifact.strip_prefix(root).unwrap_or(&artifact).display();
            if output.status.success() {
                println!("  passes now   {shown}");
            } else {
                still_failing += 1;
                let text = String::from_utf8_lossy(&output.stderr);
                let why = failure_summary(&text).unwrap_or_else(|| output.status.to_string());
                println!("  still FAILS  {shown}: {why}");
            }
        }
    }
    let unknown: Vec<String> = std::fs::read_dir(fuzz_dir.join("artifacts"))
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .filter(|name| !targets.contains(name))
                .collect()
        })
        .unwrap_or_default();
    if !unknown.is_empty() {
        println!(
            "  (not checked: artifacts of other targets: {})",
            unknown.join(", ")
        );
    }
    println!("{count} artifact(s), {still_failing} still failing");
    if still_failing == 0 {
        Ok(())
    } else {
        Err(Failure::Failed(format!(
            "{still_failing} artifact(s) still fail"
        )))
    }
}

/// Runs `command`, showing its output (stdout as is; stderr, where cargo and libFuzzer write, minus
/// libFuzzer's per-input NEW/REDUCE lines) and returning its stderr.
fn run_logged(mut command: Command) -> std::result::Result<(ExitStatus, String), String> {
    println!("$ {}", display(&command));
    let mut child = command
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("could not start `{}`: {err}", display(&command)))?;
    let mut log = String::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr)
            .split(b'\n')
            .map_while(|line| line.ok())
        {
            let line = String::from_utf8_lossy(&line);
            if !is_new_input_line(&line) {
                eprintln!("{line}");
            }
            log.push_str(&line);
            log.push('\n');
        }
    }
    let status = child
        .wait()
        .map_err(|err| format!("`{}`: {err}", display(&command)))?;
    Ok((status, log))
}

/// `#1234\tNEW    cov: ...` and the like: one line per input added to the corpus.
fn is_new_input_line(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('#') else {
        return false;
    };
    let mut words = rest.split_whitespace();
    let counted = words
        .next()
        .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()));
    counted && matches!(words.next(), Some("NEW" | "REDUCE" | "RELOAD"))
}

/// How far a libFuzzer run got.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Progress {
    execs: u64,
    /// From "Done N runs in S second(s)"; absent when the run stopped early (a crash).
    seconds: Option<u64>,
}

/// The final "Done N runs in S second(s)" line, else the last "#N ..." status line.
fn parse_progress(output: &str) -> Option<Progress> {
    let mut last = None;
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("Done ") {
            let mut words = rest.split_whitespace();
            let execs = words.next().and_then(|n| n.parse().ok());
            let seconds = words.nth(2).and_then(|s| s.parse().ok());
            if let Some(execs) = execs {
                last = Some(Progress { execs, seconds });
            }
        } else if let Some(execs) = line
            .strip_prefix('#')
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        {
            last = Some(Progress {
                execs,
                seconds: None,
            });
        }
    }
    last
}

/// What a failed run's output says went wrong: the Rust panic (location and message) if there
/// is one, else the first sanitizer/libFuzzer "ERROR:" line.
fn failure_summary(output: &str) -> Option<String> {
    let lines: Vec<&str> = output.lines().collect();
    if let Some(at) = lines.iter().position(|line| line.contains(" panicked at ")) {
        let line = lines.get(at).copied().unwrap_or_default();
        let location = line
            .split(" panicked at ")
            .nth(1)
            .unwrap_or_default()
            .trim_end_matches(':');
        let message = lines.get(at + 1).copied().unwrap_or_default().trim();
        return Some(format!("panicked at {location}: {message}"));
    }
    lines
        .iter()
        .find_map(|line| line.split_once("ERROR: "))
        .map(|(_, error)| error.trim().to_string())
}

/// Files in `dir` modified at or after `since`, sorted (none if `dir` does not exist).
fn artifacts_since(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| {
                    let entry = entry.ok()?;
                    let metadata = entry.metadata().ok()?;
                    (metadata.is_file() && metadata.modified().ok()? >= since).then(|| entry.path())
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|word| word.to_string()).collect()
    }

    #[test]
    fn options() {
        assert_eq!(
            parse_options(&[]).ok(),
            Some(Options {
                seconds: 60,
                targets: vec![],
                reproduce: false
            })
        );
        assert_eq!(
            parse_options(&args(&["--seconds", "5", "qcow2_image"])).ok(),
            Some(Options {
                seconds: 5,
                targets: args(&["qcow2_image"]),
                reproduce: false
            })
        );
        assert!(parse_options(&args(&["--reproduce"])).is_ok_and(|o| o.reproduce));
        assert!(parse_options(&args(&["--seconds=0"])).is_err());
        assert!(parse_options(&args(&["--reproduce", "--seconds=5"])).is_err());
        assert!(parse_options(&args(&["--jobs", "2"])).is_err());
    }

    #[test]
    fn progress_of_a_finished_run() {
        let output = "INFO: Seed: 3916346203\n\
#2\tINITED cov: 512 ft: 600 corp: 4/150Kb exec/s: 0 rss: 45Mb\n\
#1024\tpulse  cov: 900 ft: 1500 corp: 60/1Mb lim: 151552 exec/s: 512 rss: 80Mb\n\
#1100\tNEW    cov: 901 ft: 1502 corp: 61/1Mb lim: 151552 exec/s: 500 rss: 80Mb L: 9/9 MS: 1 CopyPart-\n\
#123456\tDONE   cov: 950 ft: 1800 corp: 90/2Mb lim: 151552 exec/s: 2023 rss: 300Mb\n\
Done 123456 runs in 61 second(s)\n";
        assert_eq!(
            parse_progress(output),
            Some(Progress {
                execs: 123456,
                seconds: Some(61)
            })
        );
        assert!(is_new_input_line("#1100\tNEW    cov: 901"));
        assert!(!is_new_input_line("#1024\tpulse  cov: 900"));
        assert!(!is_new_input_line("INFO: Seed: 1"));
        assert_eq!(failure_summary(output), None);
    }

    #[test]
    fn progress_and_panic_of_a_crashed_run() {
        let output = "#4096\tpulse  cov: 900 ft: 1500 corp: 60/1Mb exec/s: 1365 rss: 80Mb\n\
#5000\tREDUCE cov: 901 ft: 1502 corp: 61/1Mb lim: 151552 exec/s: 1250 rss: 80Mb\n\n\
thread '<unnamed>' panicked at fuzz_targets/qcow2_image.rs:39:13:\n\
refused operation 0 changed the image: corrupt image\n\
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n\
==4242== ERROR: libFuzzer: deadly signal\n\
artifact_prefix='/w/fuzz/artifacts/qcow2_image/'; Test unit written to /w/fuzz/artifacts/qcow2_image/crash-00ff\n";
        assert_eq!(
            parse_progress(output),
            Some(Progress {
                execs: 5000,
                seconds: None
            })
        );
        assert_eq!(
            failure_summary(output).as_deref(),
            Some(
                "panicked at fuzz_targets/qcow2_image.rs:39:13: \
                 refused operation 0 changed the image: corrupt image"
            )
        );
        let oom = "==77== ERROR: libFuzzer: out-of-memory (used: 2100Mb; exceeds: 2048Mb)\n";
        assert_eq!(
            failure_summary(oom).as_deref(),
            Some("libFuzzer: out-of-memory (used: 2100Mb; exceeds: 2048Mb)")
        );
        assert_eq!(parse_progress("INFO: Seed: 1\n"), None);
    }
}
