//! The pause window of a live domain snapshot: the test guest (`cargo xtask guest`) with 256 MiB
//! of RAM and two qcow2 disks, booted by `snapctl domain start` under the qemu driver; then
//! `snapshot create --live --external` N times (memory saved while the guest runs, both disks in
//! one QMP transaction). snapctl measures the window itself (QEMU's STOP to RESUME event
//! timestamps) and records it; `snapshot info --json` reports it. Target: at most 50 ms. A
//! non-live snapshot (the guest paused for the whole save) is shown for comparison.
//!
//! Every snapshot is checked: its frozen layer holds the guest's counter, and the guest runs on
//! afterwards.

use crate::counter::{console_counters, read_counter, wait_counter};
use crate::proc::{TempDir, capture, run};
use crate::{Failure, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const TARGET_MS: f64 = 50.0;
const MEMORY_MIB: u64 = 256;

pub fn run_pause(target: &Path, snapctl: &Path, runs: usize) -> Result {
    println!(
        "\n==> pause window of a live snapshot (test guest, {MEMORY_MIB} MiB, 2 external disks)"
    );
    crate::guest::run_guest(&[])?;
    let guest = crate::guest::guest_dir(target);
    let scratch = TempDir::new(target, "bench-pause")?;
    let dir = scratch.path();
    let console = dir.join("bench-vm.console");
    let mut disks = Vec::new();
    for (vdev, size) in [("xvda", "256M"), ("xvdb", "64M")] {
        let path = dir.join(format!("bench-vm-{vdev}.qcow2"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg(size))?;
        disks.push(format!(
            "'format=qcow2,vdev={vdev},access=rw,target={}'",
            path.display()
        ));
    }
    let cfg = dir.join("bench-vm.cfg");
    std::fs::write(
        &cfg,
        format!(
            "name = \"bench-vm\"\nmemory = {MEMORY_MIB}\nvcpus = 1\nkernel = \"{}\"\nramdisk = \"{}\"\nextra = \"console=ttyS0 quiet\"\nserial = \"file:{}\"\ndisk = [ {} ]\n",
            guest.join("vmlinuz").display(),
            guest.join("initrd.img").display(),
            console.display(),
            disks.join(", ")
        ),
    )
    .map_err(|e| format!("write {}: {e}", cfg.display()))?;
    let lab = Lab {
        snapctl: snapctl.to_path_buf(),
        state: dir.join("state"),
    };
    lab.run(&["domain", "start", &cfg.to_string_lossy()])?;
    let outcome = measure(&lab, &console, dir, runs.max(5));
    let _ = lab.run(&["domain", "destroy", "bench-vm"]);
    outcome
}

struct Lab {
    snapctl: PathBuf,
    state: PathBuf,
}

impl Lab {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.snapctl);
        command.arg("--state-dir").arg(&self.state).args(args);
        command
    }

    fn run(&self, args: &[&str]) -> std::result::Result<(), String> {
        let output = capture(&mut self.command(args))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "snapctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    fn info(&self, name: &str) -> std::result::Result<serde_json::Value, String> {
        let output = capture(&mut self.command(&["snapshot", "info", "bench-vm", name, "--json"]))?;
        serde_json::from_slice(&output.stdout).map_err(|e| format!("snapshot info JSON: {e}"))
    }
}

fn measure(lab: &Lab, console: &Path, dir: &Path, runs: usize) -> Result {
    let boot = Instant::now();
    wait_counter(console, 5)?;
    println!(
        "guest booted (counter 5 after {:.1} s)",
        boot.elapsed().as_secs_f64()
    );
    let mut live = Vec::new();
    for i in 1..=runs {
        let name = format!("live{i}");
        let before = console_counters(console).last().copied().unwrap_or(0);
        wait_counter(console, before + 5)?;
        lab.run(&[
            "snapshot",
            "create",
            "bench-vm",
            &name,
            "--live",
            "--external",
        ])?;
        let info = lab.info(&name)?;
        let window = info["pause_window_ms"]
            .as_f64()
            .ok_or_else(|| format!("snapshot {name} has no pause window: {info}"))?;
        let layer = info["disks"][0]["path"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let frozen = read_counter(dir, &layer)?;
        let after = wait_counter(console, frozen + 3)?;
        println!(
            "  {name}: pause window {window:.1} ms (frozen counter {frozen}, guest at {after} after)"
        );
        live.push(window);
    }
    lab.run(&["snapshot", "create", "bench-vm", "nonlive", "--external"])?;
    let nonlive = lab.info("nonlive")?["pause_window_ms"]
        .as_f64()
        .unwrap_or(f64::NAN);
    live.sort_by(|a, b| a.total_cmp(b));
    let median = live.get(live.len() / 2).copied().unwrap_or(f64::NAN);
    let (min, max) = (
        live.first().copied().unwrap_or(f64::NAN),
        live.last().copied().unwrap_or(f64::NAN),
    );
    println!("\npause window, live snapshot with memory + 2 external disks ({runs} runs):");
    println!(
        "  median {median:.1} ms, min {min:.1} ms, max {max:.1} ms; target <= {TARGET_MS} ms: {}",
        if median <= TARGET_MS { "met" } else { "MISSED" }
    );
    println!(
        "  non-live snapshot (guest paused for the whole {MEMORY_MIB} MiB save): {nonlive:.1} ms"
    );
    if median.is_nan() {
        return Err(Failure::Failed("no pause window measured".into()));
    }
    Ok(())
}
