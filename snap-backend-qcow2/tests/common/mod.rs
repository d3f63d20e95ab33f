//! What the online tests share: running commands, and stopping a daemonized
//! qemu-storage-daemon through its pidfile.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
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
