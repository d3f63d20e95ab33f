//! snap-core's image locks against real QEMU tools: a `qemu-storage-daemon` holding an image
//! must keep snapctl out, and snapctl holding an image must keep `qemu-img` / `qemu-io` out.
//! Skipped (with a message) when `qemu-storage-daemon` is not installed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use snap_core::ErrorKind;
use snap_core::lock::{ImageLock, LockMode, open_locked};

/// The QEMU tools, or `None` (after saying why) when they are not installed.
fn qemu_tools() -> Option<()> {
    for tool in ["qemu-storage-daemon", "qemu-img", "qemu-io"] {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!("skipping: {tool} is not installed");
            return None;
        }
    }
    Some(())
}

fn create_qcow2(dir: &Path) -> PathBuf {
    let image = dir.join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M")
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img create: {out:?}");
    image
}

/// `qemu-img info IMAGE` without `-U`: takes QEMU's read-only locks.
fn qemu_img_info(image: &Path) -> Output {
    Command::new("qemu-img")
        .arg("info")
        .arg(image)
        .output()
        .unwrap()
}

/// `qemu-io -c 'read 0 512' IMAGE`: opens read-write, so takes the write locks.
fn qemu_io_read(image: &Path) -> Output {
    Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read 0 512"])
        .arg(image)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A running `qemu-storage-daemon`, killed and reaped on drop (also when a test fails).
struct Daemon {
    child: Child,
}

impl Daemon {
    /// Opens `image` as a writable qcow2 node exported over NBD (so a user holds write
    /// permission), and waits until the NBD socket exists, i.e. the block nodes are open.
    fn start(image: &Path, dir: &Path) -> Daemon {
        let sock = dir.join("nbd.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},locking=on",
                image.display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", sock.display()))
            .args(["--export", "type=nbd,id=e0,node-name=disk0,writable=on"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut daemon = Daemon { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!("qemu-storage-daemon exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not come up within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    /// Kills the daemon and waits for it, so its locks are gone when this returns.
    fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn qemu_storage_daemon_keeps_snapctl_out() {
    if qemu_tools().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = create_qcow2(dir.path());
    // Unlocked at first.
    drop(open_locked(&image, LockMode::Exclusive).unwrap());

    let daemon = Daemon::start(&image, dir.path());

    // qemu-img itself is refused: proves the daemon really holds QEMU's locks.
    let info = qemu_img_info(&image);
    assert!(
        !info.status.success(),
        "qemu-img info succeeded while qemu-storage-daemon holds the image"
    );
    assert!(stderr(&info).contains("lock"), "{}", stderr(&info));

    let err = open_locked(&image, LockMode::Exclusive).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InUse, "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    assert!(err.message().contains("\"write\""), "{err}");
    assert!(err.message().contains("--qmp SOCKET --node NODE"), "{err}");
    assert_eq!(err.path(), Some(image.as_path()));

    // A reader is refused too: QEMU holds "write", which a reader does not share.
    let err = open_locked(&image, LockMode::Shared).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InUse, "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    assert!(err.message().contains("\"write\""), "{err}");

    // A failed acquire leaves nothing behind: once the daemon is gone, we get it.
    daemon.stop();
    let (_io, lock) = open_locked(&image, LockMode::Exclusive).unwrap();
    assert_eq!(lock.mode(), LockMode::Exclusive);
}

#[test]
fn snapctl_exclusive_keeps_qemu_out() {
    if qemu_tools().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = create_qcow2(dir.path());

    let (io, lock) = open_locked(&image, LockMode::Exclusive).unwrap();
    let info = qemu_img_info(&image);
    assert!(
        !info.status.success(),
        "qemu-img info succeeded while snapctl holds the image exclusively"
    );
    let msg = stderr(&info);
    assert!(
        msg.contains("Failed to get shared \"write\" lock") || msg.contains("lock"),
        "{msg}"
    );
    let rw = qemu_io_read(&image);
    assert!(
        !rw.status.success(),
        "qemu-io succeeded while snapctl holds the image exclusively"
    );
    assert!(stderr(&rw).contains("lock"), "{}", stderr(&rw));

    // The lock lives in the lock object, not in the FileIo: dropping the file keeps it held.
    drop(io);
    assert!(!qemu_img_info(&image).status.success());

    drop(lock);
    let info = qemu_img_info(&image);
    assert!(info.status.success(), "{}", stderr(&info));
    let rw = qemu_io_read(&image);
    assert!(rw.status.success(), "{}", stderr(&rw));
}

#[test]
fn snapctl_shared_admits_qemu_readers_only() {
    if qemu_tools().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = create_qcow2(dir.path());

    let file = std::fs::File::open(&image).unwrap();
    let lock = ImageLock::acquire(&file, &image, LockMode::Shared).unwrap();
    // A read-only QEMU user coexists with a snapctl reader ...
    let info = qemu_img_info(&image);
    assert!(info.status.success(), "{}", stderr(&info));
    // ... a writer does not.
    let rw = qemu_io_read(&image);
    assert!(!rw.status.success(), "qemu-io (read-write) succeeded");
    assert!(stderr(&rw).contains("\"write\" lock"), "{}", stderr(&rw));

    drop(lock);
    let rw = qemu_io_read(&image);
    assert!(rw.status.success(), "{}", stderr(&rw));
}
