//! What the tests share: running commands, stopping a daemonized qemu-storage-daemon through
//! its pidfile, and judging an image (its guest view, our check, `qemu-img check`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use snap_backend_qcow2::{Qcow2, Qcow2Disk};
use snap_core::io::FileIo;
use std::time::{Duration, Instant};

/// Kills the process named in `pidfile` on drop and waits (bounded) for it to go.
pub struct PidfileGuard(pub PathBuf);

impl Drop for PidfileGuard {
    fn drop(&mut self) {
        let Ok(pid) = std::fs::read_to_string(&self.0) else {
            return;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let start = Instant::now();
        while nix::sys::signal::kill(pid, None).is_ok() && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether qemu-storage-daemon is installed; prints why `what` is skipped when not.
pub fn have_daemon(what: &str) -> bool {
    let found = Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("note: qemu-storage-daemon not installed; skipping {what}");
    }
    found
}

/// Runs a command with no standard input.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// Runs a command that must succeed; returns its standard output.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img info -U PATH`.
pub fn info(path: &Path) -> String {
    ok(Command::new("qemu-img").args(["info", "-U"]).arg(path))
}

/// The guest view of the image at `path` through its chain, read by our own code.
pub fn view(path: &Path) -> Result<Vec<u8>, String> {
    let disk = Qcow2Disk::open_path(path, false).map_err(|e| format!("open {path:?}: {e}"))?;
    let mut buf = vec![0u8; disk.image.virtual_size() as usize];
    disk.read(0, &mut buf)
        .map_err(|e| format!("read {path:?}: {e}"))?;
    Ok(buf)
}

/// Our check of the image at `path`: no corruption (leaks allowed).
pub fn our_check(path: &Path) -> Result<(), String> {
    let image = Qcow2::open(FileIo::open(path, false).map_err(|e| e.to_string())?, false)
        .map_err(|e| format!("open: {e}"))?;
    let report = image.check().map_err(|e| format!("check: {e}"))?;
    if report.corruptions != 0 {
        return Err(format!("our check: {:?}", report.messages));
    }
    Ok(())
}

/// `qemu-img check`: no corruption, no check error (leaks allowed).
pub fn qemu_check(path: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "qemu-img check gave no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let field = |k: &str| json.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    if field("corruptions") != 0 || field("check-errors") != 0 {
        return Err(format!("qemu-img check: {json}"));
    }
    Ok(())
}
