//! Clone time: a domain with one qcow2 disk holding D of data (1 GiB and 4 GiB), an external
//! snapshot, then `snapctl snapshot clone --count 10 --shutoff` (clones without memory). Clones
//! are overlays only, so the time per clone must not grow with the data: target at most 0.5 s
//! per clone. Each clone's overlay is checked: backed by the snapshot's layer, clean.

use crate::proc::{TempDir, capture, run};
use crate::{Failure, Result};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const TARGET_S: f64 = 0.5;
const CLONES: u32 = 10;

pub fn run_clone(target: &Path, snapctl: &Path) -> Result {
    println!("\n==> clone time ({CLONES} clones of a snapshot, without memory)");
    let mut rows = Vec::new();
    for data_gib in [1u64, 4] {
        let scratch = TempDir::new(target, "bench-clone")?;
        let dir = scratch.path();
        let disk = dir.join("gold.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("8G"))?;
        // D of data in 256 MiB writes (qemu-io keeps one request in memory).
        let mut io = Command::new("qemu-io");
        io.args(["-f", "qcow2"]);
        for i in 0..data_gib * 4 {
            io.arg("-c")
                .arg(format!("write -P 0x{:x} {}M 256M", (i % 250) + 1, i * 256));
        }
        run(io.arg(&disk))?;
        let cfg = dir.join("gold.cfg");
        std::fs::write(
            &cfg,
            format!(
                "name = \"gold\"\nmemory = 64\ndisk = [ 'format=qcow2,vdev=xvda,target={}' ]\n",
                disk.display()
            ),
        )
        .map_err(|e| format!("write {}: {e}", cfg.display()))?;
        let state = dir.join("state");
        let snap = |args: &[&str]| -> std::result::Result<std::process::Output, String> {
            let mut command = Command::new(snapctl);
            command.arg("--state-dir").arg(&state).args(args);
            let output = capture(&mut command)?;
            if output.status.success() {
                Ok(output)
            } else {
                Err(format!(
                    "snapctl {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        };
        snap(&["domain", "start", &cfg.to_string_lossy()])?;
        snap(&["domain", "destroy", "gold"])?;
        snap(&["snapshot", "create", "gold", "base", "--external"])?;
        let started = Instant::now();
        snap(&[
            "snapshot",
            "clone",
            "gold",
            "base",
            "c",
            "--count",
            &CLONES.to_string(),
            "--shutoff",
        ])?;
        let per_clone = started.elapsed().as_secs_f64() / f64::from(CLONES);
        for i in 1..=CLONES {
            let overlay = dir.join(format!("gold.c-{i}.qcow2"));
            let output = capture(Command::new("qemu-img").args(["check", "-q"]).arg(&overlay))?;
            if !output.status.success() {
                return Err(Failure::Failed(format!(
                    "{} is not clean",
                    overlay.display()
                )));
            }
        }
        println!("  {data_gib} GiB of data: {per_clone:.3} s per clone");
        rows.push((data_gib, per_clone));
    }
    let worst = rows.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    let growth = match (rows.first(), rows.last()) {
        (Some((_, a)), Some((_, b))) if *a > 0.0 => b / a,
        _ => f64::NAN,
    };
    println!(
        "clone: worst {worst:.3} s per clone (target <= {TARGET_S} s: {}); 4 GiB / 1 GiB time ratio {growth:.2}",
        if worst <= TARGET_S { "met" } else { "MISSED" }
    );
    Ok(())
}
