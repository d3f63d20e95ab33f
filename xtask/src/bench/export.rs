//! Export throughput: `snapctl disk export IMAGE SNAPSHOT OUT` against `qemu-img convert -l
//! snapshot.name=SNAPSHOT -O qcow2` of the same internal snapshot, both writing a sparse qcow2.
//! snapctl flushes its output before it reports success; `qemu-img convert` does not by default
//! (its output cache mode is `unsafe`), so the target is set against `qemu-img convert -t
//! writeback` (flushed when closed), the same durability; the default's time is shown too.
//!
//! The image is a 4G qcow2 with 1 GiB of data (in 256 MiB writes of varying patterns) and 128 MiB
//! of zeroes written as data, then an internal snapshot, then 256 MiB overwritten (so the
//! snapshot's view is not the current one). The page cache is warm for both tools; each run
//! writes a new output (removed afterwards). snapctl also computes its checksum of the whole
//! guest view while it copies; qemu-img computes none. Verified every run: the two outputs are
//! identical (`qemu-img compare`), snapctl's is clean (`qemu-img check`) and holds no more data
//! than qemu-img's (`qemu-img map`). Target: at least as fast as qemu-img convert (ratio >= 1).

use super::{Timed, median, timed};
use crate::proc::{TempDir, capture, run};
use crate::{Failure, Result};
use std::path::Path;
use std::process::Command;

const IMAGE: &str = "export.qcow2";
const SNAPSHOT: &str = "bench";
const QEMU_OUT: &str = "qemu.qcow2";
const SNAPCTL_OUT: &str = "snapctl.qcow2";
const TARGET: f64 = 1.0;

pub(super) fn run_export(target: &Path, snapctl: &Path, runs: usize) -> Result {
    println!(
        "\n==> export of an internal snapshot with 1 GiB of data: snapctl vs qemu-img convert"
    );
    let scratch = TempDir::new(target, "bench-export")?;
    let dir = scratch.path();
    let tool = |program: &str| {
        let mut command = Command::new(program);
        command.current_dir(dir);
        command
    };
    run(tool("qemu-img").args(["create", "-q", "-f", "qcow2", IMAGE, "4G"]))?;
    let mut io = tool("qemu-io");
    io.args(["-f", "qcow2"]);
    for i in 0..4u64 {
        io.arg("-c")
            .arg(format!("write -P 0x{:x} {}M 256M", 0x41 + i, i * 512));
    }
    io.args(["-c", "write -P 0 3G 128M"]);
    run(io.arg(IMAGE))?;
    run(tool("qemu-img").args(["snapshot", "-c", SNAPSHOT, IMAGE]))?;
    run(tool("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x77 0 256M", IMAGE]))?;
    run(tool("cat").arg(IMAGE).stdout(std::process::Stdio::null()))?;

    let mut qemu: Vec<Timed> = Vec::new();
    let mut qemu_unsafe: Vec<Timed> = Vec::new();
    let mut ours: Vec<Timed> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    for round in 0..runs.max(1) {
        let _ = std::fs::remove_file(dir.join(SNAPCTL_OUT));
        for durable in [false, true] {
            let _ = std::fs::remove_file(dir.join(QEMU_OUT));
            run(tool("sync"))?;
            let mut convert = tool("qemu-img");
            convert.arg("convert");
            if durable {
                convert.args(["-t", "writeback"]);
            }
            convert.args([
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                "-l",
                &format!("snapshot.name={SNAPSHOT}"),
                IMAGE,
                QEMU_OUT,
            ]);
            let t = timed(&mut convert, &dir.join("rss"), false)?;
            if durable {
                qemu.push(t);
            } else {
                qemu_unsafe.push(t);
            }
        }
        run(tool("sync"))?;
        let mut export = Command::new(snapctl);
        export
            .current_dir(dir)
            .args(["disk", "export", IMAGE, SNAPSHOT, SNAPCTL_OUT]);
        ours.push(timed(&mut export, &dir.join("rss"), false)?);
        let compare = capture(tool("qemu-img").args([
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            QEMU_OUT,
            SNAPCTL_OUT,
        ]))?;
        if !compare.status.success() {
            problems.push(format!(
                "run {}: the outputs differ: {}",
                round + 1,
                String::from_utf8_lossy(&compare.stdout).trim()
            ));
        }
        let check = capture(tool("qemu-img").args(["check", "-q", SNAPCTL_OUT]))?;
        if !check.status.success() {
            problems.push(format!("run {}: qemu-img check: not clean", round + 1));
        }
        let (q, s) = (mapped(dir, QEMU_OUT)?, mapped(dir, SNAPCTL_OUT)?);
        if s > q {
            problems.push(format!(
                "run {}: snapctl's output maps {s} bytes of data, qemu-img's {q}",
                round + 1
            ));
        }
        if round == 0 {
            println!("(data mapped: qemu-img {q} bytes, snapctl {s} bytes)");
        }
    }
    let (q, u, s) = (median(qemu), median(qemu_unsafe), median(ours));
    let ratio = q.seconds / s.seconds.max(1e-9);
    let met = ratio >= TARGET;
    println!("\nexport of a snapshot with 1 GiB of data (4G virtual), median of {runs}:");
    println!(
        "  qemu-img convert -O qcow2            {:>8.3} s   (not flushed: cache mode unsafe)",
        u.seconds
    );
    println!(
        "  qemu-img convert -t writeback        {:>8.3} s   (flushed, like snapctl)",
        q.seconds
    );
    println!(
        "  snapctl disk export                  {:>8.3} s   ({:.0} MiB/s of data, with its checksum)",
        s.seconds,
        1024.0 / s.seconds.max(1e-9)
    );
    println!(
        "  ratio (qemu-img -t writeback / snapctl) {ratio:.2}x, target >= {TARGET:.1}x: {}; against \
         the unflushed default {:.2}x; outputs {}",
        if met { "met" } else { "MISSED" },
        u.seconds / s.seconds.max(1e-9),
        if problems.is_empty() {
            "identical"
        } else {
            "WRONG"
        }
    );
    drop(scratch);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::Failed(format!(
            "export bench: {}",
            problems.join("; ")
        )))
    }
}

/// Bytes `qemu-img map` calls data.
fn mapped(dir: &Path, image: &str) -> std::result::Result<u64, String> {
    let out = capture(Command::new("qemu-img").current_dir(dir).args([
        "map",
        "--output=json",
        "-f",
        "qcow2",
        image,
    ]))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("qemu-img map JSON: {e}"))?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["data"] == true)
                .filter_map(|e| e["length"].as_u64())
                .sum()
        })
        .unwrap_or(0))
}
