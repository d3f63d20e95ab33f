//! Resource hygiene (libvirt's CVE-2025-13193 and friends): files snapctl makes are never easier
//! to read than what they come from, and a failed operation leaves no partial file behind.
//!
//! - a new overlay (qcow2 or VHD, `disk create --external`) gets its backing file's owner and
//!   group and its mode with every bit for "other" cleared (and the owner's read/write added);
//! - a revert to a layer (the image rebuilt and renamed over itself) keeps the image's owner and
//!   mode;
//! - a create that fails half-way (the file size limit hit while writing, a dangling symlink in
//!   the way) leaves neither the overlay nor a temporary file, and the folder as it was;
//! - a domain snapshot's memory folder is 0700, its memory image and the image's sidecar
//!   (`SNAP.mem.json`) 0600.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use snapctl_tests::domain::*;
use snapctl_tests::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn running_as_root() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe");
    std::fs::write(&probe, b"").unwrap();
    std::fs::metadata(&probe).unwrap().uid() == 0
}

/// A base image of `format` (`qcow2` or `vpc`) of `size`.
fn base(dir: &Path, name: &str, format: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    let r = qemu_img(["create", "-q", "-f", format, p(&path), size]);
    assert!(r.success(), "{}", r.describe());
    path
}

/// The folder's entries with their sizes, sorted.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.path().symlink_metadata().map(|m| m.len()).unwrap_or(0),
            )
        })
        .collect();
    out.sort();
    out
}

fn overlay_modes(format: &str, ext: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = running_as_root();
    for (backing_mode, overlay_mode) in [
        (0o644, 0o640),
        (0o664, 0o660),
        (0o600, 0o600),
        (0o444, 0o640),
        (0o4755, 0o750),
    ] {
        let img = base(
            dir.path(),
            &format!("base-{backing_mode:o}.{ext}"),
            format,
            "4M",
        );
        chmod(&img, backing_mode);
        if root {
            std::os::unix::fs::chown(&img, Some(4321), Some(8765)).unwrap();
        }
        let r = snapctl_run(["disk", "create", p(&img), "s1", "--external"]);
        assert!(r.success(), "{}", r.describe());
        let overlay = PathBuf::from(r.stdout.trim());
        assert_eq!(
            mode(&overlay),
            overlay_mode,
            "{format}: overlay of a {backing_mode:o} file"
        );
        let meta = std::fs::metadata(&overlay).unwrap();
        if root {
            assert_eq!((meta.uid(), meta.gid()), (4321, 8765), "{format}: owner");
        }
        // The overlay works: list shows the chain, check is clean.
        let r = snapctl_run(["disk", "check", p(&overlay)]);
        assert!(r.success(), "{}", r.describe());
    }
    if !root {
        eprintln!("not root: owner and group changes were not checked");
    }
}

#[test]
fn qcow2_overlays_inherit_owner_and_mode_without_other_bits() {
    overlay_modes("qcow2", "qcow2");
}

#[test]
fn vhd_overlays_inherit_owner_and_mode_without_other_bits() {
    overlay_modes("vpc", "vhd");
}

fn revert_keeps_mode(format: &str, ext: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), &format!("disk.{ext}"), format, "4M");
    let r = snapctl_run(["disk", "create", p(&img), "s1", "--external"]);
    assert!(r.success(), "{}", r.describe());
    let active = PathBuf::from(r.stdout.trim());
    chmod(&active, 0o604);
    if running_as_root() {
        std::os::unix::fs::chown(&active, Some(1111), Some(2222)).unwrap();
    }
    let before = std::fs::metadata(&active).unwrap();
    let r = snapctl_run(["disk", "revert", p(&active), "--layer", p(&img)]);
    assert!(r.success(), "{}", r.describe());
    let after = std::fs::metadata(&active).unwrap();
    assert_ne!(
        before.ino(),
        after.ino(),
        "{format}: the image was not rebuilt"
    );
    assert_eq!(mode(&active), 0o604, "{format}: revert changed the mode");
    assert_eq!(
        (after.uid(), after.gid()),
        (before.uid(), before.gid()),
        "{format}: revert changed the owner"
    );
}

#[test]
fn qcow2_revert_to_a_layer_keeps_owner_and_mode() {
    revert_keeps_mode("qcow2", "qcow2");
}

#[test]
fn vhd_revert_to_a_layer_keeps_owner_and_mode() {
    revert_keeps_mode("vpc", "vhd");
}

/// Runs `snapctl ARGS` with the file size limit at `kib` KiB (and SIGXFSZ ignored, so a write
/// past it fails with EFBIG instead of killing the process).
fn snapctl_with_file_limit(kib: u64, args: &[&str]) -> Run {
    let mut script = format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\"");
    for i in 1..=args.len() {
        script.push_str(&format!(" \"${i}\""));
    }
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .arg(snapctl_path())
        .args(args)
        .env(
            "SNAPCTL_STATE_DIR",
            std::env::temp_dir().join("snapctl-tests-state"),
        )
        .env_remove("RUST_BACKTRACE");
    run(&mut cmd)
}

fn failed_create_leaves_nothing(format: &str, ext: &str, size: &str, limit_kib: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), &format!("disk.{ext}"), format, size);
    let before = listing(dir.path());
    let r = snapctl_with_file_limit(limit_kib, &["disk", "create", p(&img), "s1", "--external"]);
    assert_eq!(r.code, Some(1), "{format}: {}", r.describe());
    assert_error_line(&r);
    assert_eq!(
        listing(dir.path()),
        before,
        "{format}: a failed create left files behind ({})",
        r.stderr.trim()
    );
    // A dangling symlink where the overlay goes: refused, the link's target not created, no
    // temporary file left.
    let link = dir.path().join(format!("link.{ext}"));
    let target = dir.path().join("elsewhere");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let before = listing(dir.path());
    let r = snapctl_run([
        "disk",
        "create",
        p(&img),
        "s2",
        "--external",
        "--overlay",
        p(&link),
    ]);
    assert_eq!(r.code, Some(1), "{format}: {}", r.describe());
    assert!(!target.exists(), "{format}: the symlink was followed");
    assert_eq!(listing(dir.path()), before, "{format}: files left behind");
    // Without the limit the same create works.
    let r = snapctl_run(["disk", "create", p(&img), "s1", "--external"]);
    assert!(r.success(), "{}", r.describe());
}

#[test]
fn qcow2_failed_create_leaves_no_partial_overlay() {
    // The overlay's refcount table goes at 64 KiB: a 64 KiB limit stops the create in the middle.
    failed_create_leaves_nothing("qcow2", "qcow2", "1G", 64);
}

#[test]
fn vhd_failed_create_leaves_no_partial_overlay() {
    // A 2000 GiB disk's BAT alone is 4 MiB.
    failed_create_leaves_nothing("vpc", "vhd", "2000G", 1024);
}

#[test]
fn memory_images_and_their_sidecars_are_private() {
    if !Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("no qemu-system-x86_64; skipping");
        return;
    }
    let lab = DomainLab::new();
    let disk = lab.path("vm.qcow2");
    assert!(qemu_img(["create", "-q", "-f", "qcow2", p(&disk), "16M"]).success());
    let name = "hygiene-mem";
    let cfg = lab.write_cfg(name, &plain_cfg(name, &[("xvda", "qcow2", &disk)]));
    lab.start(&cfg, name);
    lab.ok(&["snapshot", "create", name, "s1"]);
    let info = lab.info(name, "s1");
    assert_eq!(info["memory"], true, "{info}");
    let memory = lab
        .state()
        .join("domains")
        .join(name)
        .join("memory")
        .join("s1.mem");
    let sidecar = memory.with_file_name("s1.mem.json");
    assert!(memory.exists() && sidecar.exists());
    assert_eq!(mode(memory.parent().unwrap()), 0o700, "memory folder");
    assert_eq!(
        mode(&memory) & 0o077,
        0,
        "memory image: {:o}",
        mode(&memory)
    );
    assert_eq!(mode(&sidecar), 0o600, "memory image sidecar");
    lab.ok(&["domain", "destroy", name]);
}
