//! Interoperability with independent implementations: QEMU's vpc driver (dynamic disks) and
//! libvhdi (`vhdiinfo`, `pyvhdi`; dynamic and differencing). Each test skips with a printed note
//! only when its tool is not installed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::Path;
use std::process::Command;

use snap_backend_vhd::{ParentPolicy, create_dynamic, create_external, delete_layer, open_chain};
use snap_core::lock::LockMode;

fn have(tool: &str, arg: &str) -> bool {
    let ok = Command::new(tool)
        .arg(arg)
        .output()
        .map(|o| o.status.success() || !o.stdout.is_empty() || !o.stderr.is_empty())
        .unwrap_or(false);
    if !ok {
        println!("SKIP: {tool} is not installed");
    }
    ok
}

/// The python interpreter that has pyvhdi (the Debian package installs it for /usr/bin/python3).
fn python_with_pyvhdi() -> Option<&'static str> {
    for python in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(python)
            .args(["-c", "import pyvhdi"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(python);
        }
    }
    println!("SKIP: python3 module pyvhdi (python3-libvhdi) is not installed");
    None
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn guest_view(path: &Path) -> Vec<u8> {
    let chain = open_chain(path, ParentPolicy::ChildFolder, |_, _| LockMode::Shared).unwrap();
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read(0, &mut buf).unwrap();
    buf
}

fn write_guest(path: &Path, offset: u64, data: &[u8]) {
    let mut chain = open_chain(path, ParentPolicy::ChildFolder, |level, _| {
        if level == 0 {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        }
    })
    .unwrap();
    chain.write(offset, data).unwrap();
}

#[test]
fn qemu_written_dynamic_reads_equal() {
    if !have("qemu-img", "--version") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.vhd");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic"])
        .arg(&img)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "vpc",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 3000k 5000",
        ])
        .arg(&img));
    let ours = guest_view(&img);
    let raw = dir.path().join("q.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&img)
        .arg(&raw));
    let theirs = std::fs::read(&raw).unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert!(ours == theirs);
    assert!(ours[..1 << 20].iter().all(|b| *b == 0x11));
}

#[test]
fn our_dynamic_read_by_qemu() {
    if !have("qemu-img", "--version") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ours.vhd");
    create_dynamic(&img, 64 << 20, None).unwrap();
    write_guest(&img, 0, &vec![0x33; 1 << 20]);
    write_guest(&img, (5 << 20) + 100, &vec![0x44; 70_000]);
    run(Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "vpc",
            "-c",
            "read -P 0x33 0 1M",
            "-c",
            "read -P 0 1M 4M",
        ])
        .arg(&img));
    let raw = dir.path().join("ours.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&img)
        .arg(&raw));
    assert!(std::fs::read(&raw).unwrap() == guest_view(&img));
    let info = run(Command::new("qemu-img")
        .args(["info", "-f", "vpc"])
        .arg(&img));
    assert!(info.contains("67108864"), "{info}");
}

#[test]
fn vhdiinfo_and_pyvhdi_read_our_chain() {
    if !have("vhdiinfo", "-V") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    create_dynamic(&base, 32 << 20, None).unwrap();
    write_guest(&base, 0, &vec![0x55; 3 << 20]);
    let child = create_external(&base, "s1", None, ParentPolicy::ChildFolder).unwrap();
    assert_eq!(child, dir.path().join("base.s1.vhd"));
    write_guest(&child, 1 << 20, &vec![0x66; 4096 + 7]);
    let info = run(Command::new("vhdiinfo").arg(&base));
    assert!(info.contains("Dynamic"), "{info}");
    assert!(info.contains("33554432"), "{info}");
    let info = run(Command::new("vhdiinfo").arg(&child));
    assert!(info.contains("Differential"), "{info}");
    assert!(info.contains("base.vhd"), "{info}");
    let expected = guest_view(&child);
    if let Some(python) = python_with_pyvhdi() {
        let script = "import pyvhdi,sys\n\
p=pyvhdi.file(); p.open(sys.argv[1])\n\
c=pyvhdi.file(); c.open(sys.argv[2]); c.set_parent(p)\n\
sys.stdout.buffer.write(c.read_buffer(c.get_media_size()))\n";
        let out = Command::new(python)
            .args(["-c", script])
            .arg(&base)
            .arg(&child)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == expected);
    }
    // Coalesce the base into the child: the child becomes dynamic with the same content.
    let outcome = delete_layer(&child, &base, ParentPolicy::ChildFolder).unwrap();
    assert!(outcome.removed && outcome.child_now_dynamic);
    assert!(!base.exists());
    assert!(guest_view(&child) == expected);
    let info = run(Command::new("vhdiinfo").arg(&child));
    assert!(info.contains("Dynamic"), "{info}");
}
