//! Killing snapctl at every step of a domain operation (`SNAPCTL_TEST_CRASH=before:N|after:N`
//! exits at once, before step N runs or right after it ran but before the journal says so); the
//! next snapctl on the domain must settle it — roll a create back or forward, finish a revert or
//! a delete — and say so, leaving disks, memory images and the tree consistent: `qemu-img
//! check` clean, guest data equal to before or after, no journal left.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use snapctl_tests::domain::*;
use snapctl_tests::*;

const MIB: u64 = 1 << 20;
const CRASHED: i32 = 86;

fn put(img: &Path, slot: u64, byte: u8) {
    write_patterns(img, &[Pattern::new(slot * MIB, MIB, byte)]);
}

fn expect(img: &Path, slots: &[(u64, u8)], when: &str) {
    let patterns: Vec<Pattern> = slots
        .iter()
        .map(|(slot, byte)| Pattern::new(slot * MIB, MIB, *byte))
        .collect();
    verify_patterns(img, &patterns, when);
}

/// Runs snapctl in `lab` with the crash hook set.
fn crash_run(lab: &DomainLab, spec: &str, args: &[&str]) -> Run {
    let mut cmd = snapctl();
    cmd.arg("--state-dir")
        .arg(lab.state())
        .args(args)
        .env("SNAPCTL_TEST_CRASH", spec);
    let r = run(&mut cmd);
    assert!(
        !r.stderr.contains("panicked") && r.code != Some(101),
        "{}",
        r.describe()
    );
    r
}

fn names(lab: &DomainLab, domain: &str) -> Vec<String> {
    lab.snapshots(domain)["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

fn qcow2_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    out.sort();
    out
}

/// A shut-off domain `name` with two qcow2 disks (data 0xa0 / 0xb0 at MiB 0), defined in a new
/// lab; returns (lab, disks folder, [disk a, disk b]).
fn offline_lab(name: &str) -> (DomainLab, PathBuf, [PathBuf; 2]) {
    let lab = DomainLab::new();
    let dir = lab.path("disks");
    std::fs::create_dir(&dir).unwrap();
    let a = dir.join("a.qcow2");
    let b = dir.join("b.qcow2");
    for (img, byte) in [(&a, 0xa0), (&b, 0xb0)] {
        qemu_img(["create", "-q", "-f", "qcow2", p(img), "16M"]).ok();
        put(img, 0, byte);
    }
    let cfg = lab.write_cfg(
        name,
        &plain_cfg(name, &[("xvda", "qcow2", &a), ("xvdb", "qcow2", &b)]),
    );
    lab.start(&cfg, name);
    lab.ok(&["domain", "destroy", name]);
    (lab, dir, [a, b])
}

/// Runs `op` with a crash at every step until it completes without crashing; after each crash,
/// `snapshot list` settles it and `check` judges the result. Returns the number of crash runs.
fn every_step(
    name: &str,
    setup: impl Fn(&DomainLab, &Path, &[PathBuf; 2]),
    op: &[&str],
    check: impl Fn(&DomainLab, &Path, &[PathBuf; 2], &str, bool),
) -> usize {
    let mut crashes = 0;
    for index in 0.. {
        let mut completed_without_crash = true;
        for when in ["before", "after"] {
            let (lab, dir, disks) = offline_lab(name);
            setup(&lab, &dir, &disks);
            let spec = format!("{when}:{index}");
            let r = crash_run(&lab, &spec, op);
            if r.code == Some(0) {
                check(&lab, &dir, &disks, &format!("{spec} (no crash)"), true);
                continue;
            }
            assert_eq!(r.code, Some(CRASHED), "{spec}\n{}", r.describe());
            completed_without_crash = false;
            crashes += 1;
            assert!(
                lab.state()
                    .join("domains")
                    .join(name)
                    .join("journal.json")
                    .exists(),
                "{spec}: a killed operation leaves its journal"
            );
            // The next snapctl settles it and says so.
            let r = lab.snapctl(["snapshot", "list", name, "--json"]);
            assert!(r.success(), "{spec}: settling failed\n{}", r.describe());
            assert!(
                r.stderr.contains("rolled back") || r.stderr.contains("finished"),
                "{spec}: the settling is reported\n{}",
                r.describe()
            );
            assert!(
                !lab.state()
                    .join("domains")
                    .join(name)
                    .join("journal.json")
                    .exists(),
                "{spec}: the journal is gone once settled"
            );
            let rolled_back = r.stderr.contains("rolled back");
            check(&lab, &dir, &disks, &spec, !rolled_back);
            for file in qcow2_files(&dir) {
                assert_qemu_clean(&file, &spec);
            }
        }
        if completed_without_crash {
            break;
        }
    }
    crashes
}

#[test]
fn killed_offline_create_internal_rolls_back_or_forward_at_every_step() {
    if !have_qemu_system() {
        return;
    }
    let crashes = every_step(
        "jci",
        |_, _, _| {},
        &["snapshot", "create", "jci", "s1"],
        |lab, _, [a, b], spec, done| {
            let listed = names(lab, "jci");
            if done {
                assert_eq!(listed, ["s1"], "{spec}");
                assert_eq!(qemu_snapshot_names(a), ["s1"], "{spec}");
                assert_eq!(qemu_snapshot_names(b), ["s1"], "{spec}");
            } else {
                assert!(listed.is_empty(), "{spec}");
                assert!(qemu_snapshot_names(a).is_empty(), "{spec}: rolled back");
                assert!(qemu_snapshot_names(b).is_empty(), "{spec}: rolled back");
            }
        },
    );
    assert!(crashes >= 4, "crash states: {crashes}");
    eprintln!("killed offline internal create: {crashes} crash states settled");
}

#[test]
fn killed_offline_create_external_rolls_back_or_forward_at_every_step() {
    if !have_qemu_system() {
        return;
    }
    let crashes = every_step(
        "jce",
        |_, _, _| {},
        &["snapshot", "create", "jce", "s1", "--external"],
        |lab, dir, [a, _], spec, done| {
            let listed = names(lab, "jce");
            let overlay = dir.join("a.s1.qcow2");
            if done {
                assert_eq!(listed, ["s1"], "{spec}");
                assert_eq!(lab.active("jce", "xvda"), overlay, "{spec}");
                expect(&overlay, &[(0, 0xa0)], spec);
            } else {
                assert!(listed.is_empty(), "{spec}");
                assert_eq!(&lab.active("jce", "xvda"), a, "{spec}");
                assert!(!overlay.exists(), "{spec}: no overlay left behind");
                assert!(
                    !dir.join("b.s1.qcow2").exists(),
                    "{spec}: no overlay left behind"
                );
            }
        },
    );
    assert!(crashes >= 4, "crash states: {crashes}");
    eprintln!("killed offline external create: {crashes} crash states settled");
}

#[test]
fn killed_offline_revert_is_finished_at_every_step() {
    if !have_qemu_system() {
        return;
    }
    let setup = |lab: &DomainLab, _: &Path, [a, _]: &[PathBuf; 2]| {
        lab.ok(&["snapshot", "create", "jr", "s1", "--external"]);
        let active = lab.active("jr", "xvda");
        put(&active, 1, 0xa1);
        let _ = a;
    };
    let crashes = every_step(
        "jr",
        setup,
        &["snapshot", "revert", "jr", "s1"],
        |lab, _, _, spec, done| {
            assert!(done, "{spec}: a revert is always finished");
            let list = lab.snapshots("jr");
            assert_eq!(list["current"], "s1", "{spec}");
            let active = lab.active("jr", "xvda");
            expect(&active, &[(0, 0xa0), (1, 0)], spec);
            let b = lab.active("jr", "xvdb");
            expect(&b, &[(0, 0xb0)], spec);
        },
    );
    assert!(crashes >= 4, "crash states: {crashes}");
    eprintln!("killed offline revert: {crashes} crash states settled");
}

#[test]
fn killed_offline_delete_of_a_node_with_two_children_is_finished_at_every_step() {
    if !have_qemu_system() {
        return;
    }
    // s1 (external) with two children: s2 (taken, then reverted away from) and s3.
    let setup = |lab: &DomainLab, _: &Path, _: &[PathBuf; 2]| {
        lab.ok(&["snapshot", "create", "jd", "s1", "--external"]);
        put(&lab.active("jd", "xvda"), 1, 0xa1);
        lab.ok(&["snapshot", "create", "jd", "s2", "--external"]);
        lab.ok(&["snapshot", "revert", "jd", "s1"]);
        put(&lab.active("jd", "xvda"), 2, 0xa2);
        lab.ok(&["snapshot", "create", "jd", "s3", "--external"]);
        put(&lab.active("jd", "xvda"), 3, 0xa3);
    };
    let crashes = every_step(
        "jd",
        setup,
        &["snapshot", "delete", "jd", "s1"],
        |lab, _, [a, b], spec, done| {
            assert!(done, "{spec}: a delete is always finished");
            assert_eq!(names(lab, "jd"), ["s2", "s3"], "{spec}");
            assert!(
                !a.exists() && !b.exists(),
                "{spec}: s1's layers are merged away"
            );
            let active = lab.active("jd", "xvda");
            expect(&active, &[(0, 0xa0), (1, 0), (2, 0xa2), (3, 0xa3)], spec);
            // s2's state survived the merge into its layer.
            let s2 = lab.info("jd", "s2");
            let layer = PathBuf::from(s2["disks"][0]["path"].as_str().unwrap());
            expect(&layer, &[(0, 0xa0), (1, 0xa1), (2, 0)], spec);
        },
    );
    assert!(crashes >= 6, "crash states: {crashes}");
    eprintln!("killed offline delete: {crashes} crash states settled");
}

/// A live create killed at every step of a running guest: the next snapctl resumes the guest
/// and rolls the snapshot back or forward; the guest keeps counting.
#[test]
fn killed_live_create_leaves_a_running_guest_at_every_step() {
    let Some((kernel, initrd)) = guest() else {
        return;
    };
    let lab = DomainLab::new();
    let disk = lab.path("jl.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", p(&disk), "64M"]).ok();
    let console = lab.path("jl.console");
    let cfg = lab.write_cfg(
        "jl",
        &guest_cfg(
            "jl",
            &kernel,
            &initrd,
            &console,
            128,
            &[("xvda", "qcow2", &disk)],
        ),
    );
    lab.start(&cfg, "jl");
    wait_counter(&console, 5, Duration::from_secs(90));
    let mut crashes = 0;
    let mut taken: Vec<String> = Vec::new();
    for (mode, flags) in [
        ("live-ext", &["--live", "--external"][..]),
        ("nonlive-int", &[][..]),
    ] {
        for index in 0..8 {
            for when in ["before", "after"] {
                let snap = format!("{mode}-{when}-{index}");
                let mut args = vec!["snapshot", "create", "jl", &snap];
                args.extend_from_slice(flags);
                let r = crash_run(&lab, &format!("{when}:{index}"), &args);
                if r.code == Some(0) {
                    taken.push(snap);
                    continue;
                }
                assert_eq!(r.code, Some(CRASHED), "{}", r.describe());
                crashes += 1;
                let r = lab.snapctl(["snapshot", "list", "jl", "--json"]);
                assert!(r.success(), "{snap}: settling failed\n{}", r.describe());
                let list: Value = serde_json::from_str(&r.stdout).unwrap();
                let present = list["snapshots"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["name"] == snap.as_str());
                if r.stderr.contains("rolled back") {
                    assert!(!present, "{snap}: rolled back but recorded");
                    assert!(
                        !lab.state()
                            .join("domains/jl/memory")
                            .join(format!("{snap}.mem"))
                            .exists(),
                        "{snap}: the memory image of a rolled-back create is removed"
                    );
                } else {
                    assert!(
                        present,
                        "{snap}: finished but not recorded\n{}",
                        r.describe()
                    );
                    taken.push(snap.clone());
                }
                // The guest runs on.
                assert_eq!(lab.state_of("jl"), "running", "{snap}");
                let now = console_counters(&console).last().copied().unwrap_or(0);
                wait_counter(&console, now + 3, Duration::from_secs(30));
            }
        }
    }
    assert!(crashes >= 8, "crash states: {crashes}");
    // Every recorded snapshot works: revert to the first one taken with memory.
    let first = taken.first().expect("some snapshot completed").clone();
    lab.ok(&["snapshot", "revert", "jl", &first]);
    let now = console_counters(&console).last().copied().unwrap_or(0);
    let _ = now;
    assert_eq!(lab.state_of("jl"), "running");
    lab.ok(&["domain", "destroy", "jl"]);
    for file in std::fs::read_dir(lab.dir.path()).unwrap() {
        let file = file.unwrap().path();
        if file.extension().is_some_and(|e| e == "qcow2") {
            assert_qemu_clean(&file, "after the killed live creates");
        }
    }
    eprintln!("killed live creates: {crashes} crash states settled");
    let _ = Command::new("true");
}
