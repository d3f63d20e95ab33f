//! The `snapctl` binary and `--hypervisor xen`. Built with the `xen` feature on a host without
//! Xen (CI): every command that needs the Xen driver fails with exit status 1 and one line
//! `snapctl: error: ...` that names the problem — never a panic (101) or an abort. Built without
//! the feature: the same, saying so.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::{Command, Output};

#[cfg(feature = "xen")]
use snap_orchestrator::store::{DomainRecord, Store};

fn snapctl(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snapctl"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("SNAPCTL_STATE_DIR")
        .output()
        .unwrap()
}

#[cfg(feature = "xen")]
/// Exit 1 and one stderr line naming the missing Xen.
fn assert_no_xen(output: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{what}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: {stderr}");
    let line = lines[0];
    assert!(line.starts_with("snapctl: error: "), "{what}: {line}");
    assert!(
        line.contains("not a Xen dom0: cannot open the Xen control interface (libxl: "),
        "{what}: {line}"
    );
    assert!(line.contains("--hypervisor qemu"), "{what}: {line}");
}

#[cfg(feature = "xen")]
fn skip_on_xen() -> bool {
    if snap_orchestrator::domain::is_xen_dom0() {
        eprintln!("skipped: this host is a Xen dom0");
        return true;
    }
    false
}

#[cfg(feature = "xen")]
/// Defines domain `name` as a Xen domain in the store, as `domain start` would have.
fn define_xen_domain(state: &Path, name: &str, image: &Path) {
    let config = snap_orchestrator::xlcfg::parse(&format!(
        "name = \"{name}\"\nmemory = 256\ndisk = [ \"format=qcow2,vdev=xvda,access=rw,target={}\" ]\n",
        image.display()
    ))
    .unwrap();
    let record: DomainRecord = serde_json::from_value(serde_json::json!({
        "version": 1,
        "name": name,
        "hypervisor": "xen",
        "config": config,
        "source": null,
        "runtime": null,
        "current": null,
        "snapshots": [],
    }))
    .unwrap();
    let store = Store::new(state);
    store.lock(name).unwrap().save(&record).unwrap();
}

#[cfg(feature = "xen")]
#[test]
fn domain_list_names_the_missing_xen() {
    if skip_on_xen() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    assert_no_xen(
        &snapctl(state.path(), &["--hypervisor", "xen", "domain", "list"]),
        "domain list",
    );
    assert_no_xen(
        &snapctl(
            state.path(),
            &["--hypervisor", "xen", "domain", "list", "--json"],
        ),
        "domain list --json",
    );
    // the qemu driver is unaffected
    let qemu = snapctl(state.path(), &["--hypervisor", "qemu", "domain", "list"]);
    assert_eq!(qemu.status.code(), Some(0));
}

#[cfg(feature = "xen")]
#[test]
fn domain_start_names_the_missing_xen_and_defines_nothing() {
    if skip_on_xen() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("x.cfg");
    std::fs::write(&cfg, "name = \"x\"\nmemory = 128\n").unwrap();
    let cfg_text = cfg.to_str().unwrap();
    assert_no_xen(
        &snapctl(
            state.path(),
            &["--hypervisor", "xen", "domain", "start", cfg_text],
        ),
        "domain start",
    );
    let listed = snapctl(
        state.path(),
        &["--hypervisor", "qemu", "domain", "list", "--json"],
    );
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "[]");
}

#[cfg(feature = "xen")]
#[test]
fn snapshot_commands_on_a_xen_domain_name_the_missing_xen() {
    if skip_on_xen() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.qcow2");
    std::fs::write(&image, b"not read: the driver fails first").unwrap();
    define_xen_domain(state.path(), "d", &image);
    for args in [
        vec!["snapshot", "create", "d", "s1"],
        vec![
            "--hypervisor",
            "xen",
            "snapshot",
            "create",
            "d",
            "s1",
            "--live",
        ],
        vec!["snapshot", "create", "d", "s1", "--disk-only"],
        vec!["domain", "destroy", "d"],
    ] {
        assert_no_xen(&snapctl(state.path(), &args), &args.join(" "));
    }
    // reading the metadata needs no hypervisor
    let list = snapctl(state.path(), &["snapshot", "list", "d", "--json"]);
    assert_eq!(list.status.code(), Some(0), "{list:?}");
    // and nothing was created
    let after: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(after.len(), 1);
}

#[cfg(not(feature = "xen"))]
#[test]
fn without_the_feature_xen_is_refused_clearly() {
    let state = tempfile::tempdir().unwrap();
    let output = snapctl(state.path(), &["--hypervisor", "xen", "domain", "list"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("snapctl: error: this snapctl was built without Xen support"),
        "{stderr}"
    );
}
