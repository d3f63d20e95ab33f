//! `snapctl disk ...` on LVM disks against real lvm2, on a volume group over a loop device.
//!
//! This kernel has no device-mapper: lvm2 only edits metadata here (`--driverloaded n`), so the
//! tests build an origin and a classic snapshot that way, then check what snapctl can do (list,
//! delete, name checks) and that what it cannot (create, revert) is refused clearly with nothing
//! changed. snapctl is pointed at the loop device only through `SNAPCTL_LVM_ARGS`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::PathBuf;
use std::process::Command;

use snapctl_tests::{Run, run, snapctl};

/// A VG `snapvg<pid><tag>` on a loop device over a sparse file; removed on drop.
struct LoopVg {
    file: PathBuf,
    device: String,
    vg: String,
}

fn lvm(args: &[&str]) -> Run {
    run(Command::new("lvm")
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1"))
}

impl LoopVg {
    fn new(tag: &str) -> Option<LoopVg> {
        if Command::new("lvm").arg("version").output().is_err() {
            eprintln!("lvm2 is not installed; skipping");
            return None;
        }
        let file =
            std::env::temp_dir().join(format!("snapctl-lvm-{}-{tag}.img", std::process::id()));
        std::fs::File::create(&file)
            .unwrap()
            .set_len(128 << 20)
            .unwrap();
        let losetup = run(Command::new("losetup").args(["-f", "--show"]).arg(&file));
        if !losetup.success() {
            eprintln!(
                "no loop device available ({}); skipping",
                losetup.stderr.trim()
            );
            let _ = std::fs::remove_file(&file);
            return None;
        }
        let device = losetup.stdout.trim().to_string();
        let vg = format!("snapvg{}{tag}", std::process::id());
        let this = LoopVg { file, device, vg };
        let d = this.device.clone();
        let dm = ["--devices", d.as_str(), "--driverloaded", "n"];
        lvm(&["pvcreate", "-q", "--devices", &d, &d]).ok();
        lvm(&["vgcreate", "-q", "--devices", &d, &this.vg, &d]).ok();
        let lv = |name: &str, size: &str| {
            let mut args = vec!["lvcreate", "-q"];
            args.extend(dm);
            args.extend(["-an", "-Zn", "-L", size, "-n", name, this.vg.as_str()]);
            lvm(&args).ok();
        };
        lv("o", "16M");
        lv("s", "8M");
        let origin = format!("{}/o", this.vg);
        let snap = format!("{}/s", this.vg);
        let mut args = vec!["lvconvert", "-q"];
        args.extend(dm);
        args.extend(["-y", "-Zn", "-s", origin.as_str(), snap.as_str()]);
        lvm(&args).ok();
        Some(this)
    }

    fn lv_names(&self) -> Vec<String> {
        let out = lvm(&[
            "lvs",
            "--devices",
            &self.device,
            "--noheadings",
            "-o",
            "lv_name",
            &self.vg,
        ])
        .ok();
        let mut names: Vec<String> = out.stdout.split_whitespace().map(str::to_string).collect();
        names.sort();
        names
    }

    fn snapctl(&self, args: &[&str]) -> Run {
        run(snapctl()
            .args(args)
            .env("SNAPCTL_LVM_ARGS", format!("--devices {}", self.device)))
    }
}

impl Drop for LoopVg {
    fn drop(&mut self) {
        let _ = lvm(&["vgremove", "-q", "-f", "--devices", &self.device, &self.vg]);
        let _ = lvm(&["pvremove", "-q", "--devices", &self.device, &self.device]);
        let _ = run(Command::new("losetup").args(["-d", &self.device]));
        let _ = std::fs::remove_file(&self.file);
    }
}

fn one_error_line(r: &Run) {
    assert_eq!(r.code, Some(1), "{}", r.describe());
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", r.describe());
    assert!(lines[0].starts_with("snapctl: error: "), "{}", r.describe());
}

#[test]
fn list_create_revert_delete_through_the_cli() {
    let Some(vg) = LoopVg::new("a") else { return };
    let origin = format!("{}/o", vg.vg);

    // list --json: the contract's shape, the snapshot LV listed.
    let r = vg.snapctl(&["disk", "list", &origin, "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["format"], "lvm");
    assert_eq!(v["virtual_size"], 16 << 20);
    assert_eq!(v["chain"], serde_json::json!([]));
    let snaps = v["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{v}");
    assert_eq!(snaps[0]["name"], "s");
    assert!(snaps[0]["date"].as_str().unwrap().ends_with('Z'));
    // The same through /dev/VG/LV, and human output names the snapshot and its type.
    let r = vg
        .snapctl(&["disk", "list", &format!("/dev/{origin}")])
        .ok();
    assert!(
        r.stdout.contains(" s ") && r.stdout.contains("Classic"),
        "{}",
        r.describe()
    );

    // Without device-mapper, create and revert are refused and change nothing.
    let before = vg.lv_names();
    for args in [
        vec!["disk", "create", origin.as_str(), "s2"],
        vec!["disk", "create", origin.as_str(), "s3", "--size", "4M"],
        vec!["disk", "revert", origin.as_str(), "s"],
    ] {
        let r = vg.snapctl(&args);
        one_error_line(&r);
        assert!(r.stderr.contains("device-mapper"), "{}", r.describe());
        assert_eq!(vg.lv_names(), before, "{args:?} changed the volume group");
    }

    // Names are checked before lvm2 runs: no option injection.
    let r = vg.snapctl(&["disk", "delete", &origin, "--", "-f"]);
    one_error_line(&r);
    assert_eq!(vg.lv_names(), before);
    // Unknown snapshot, and an LV that is not a snapshot of this origin.
    let r = vg.snapctl(&["disk", "delete", &origin, "nosuch"]);
    one_error_line(&r);
    let r = vg.snapctl(&["disk", "delete", &origin, "o"]);
    one_error_line(&r);
    assert_eq!(vg.lv_names(), before);

    // --dry-run changes nothing; delete removes the snapshot LV.
    vg.snapctl(&["--dry-run", "disk", "delete", &origin, "s"])
        .ok();
    assert_eq!(vg.lv_names(), before);
    vg.snapctl(&["disk", "delete", &origin, "s"]).ok();
    assert_eq!(vg.lv_names(), vec!["o".to_string()]);
    let r = vg.snapctl(&["disk", "list", &origin, "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["snapshots"], serde_json::json!([]));
}

#[test]
fn external_snapshots_are_refused_for_lvm() {
    let Some(vg) = LoopVg::new("b") else { return };
    let origin = format!("{}/o", vg.vg);
    let before = vg.lv_names();
    let r = vg.snapctl(&["disk", "create", &origin, "x", "--external"]);
    one_error_line(&r);
    let r = vg.snapctl(&["disk", "create", "no-such-vg/lv", "x"]);
    one_error_line(&r);
    assert_eq!(vg.lv_names(), before);
}
