//! `snapctl disk export`, `snapshot export` and `snapshot import`, with QEMU's tools as the
//! oracle: every exported view is compared with `qemu-img compare` against the view QEMU reads
//! (an internal snapshot through `qemu-img convert -l snapshot.name=...`), sparseness is read
//! from `qemu-img map` and the file's allocated blocks, VHD outputs are read back by libvhdi
//! (`vhdiinfo`, and `pyvhdi` when python3-libvhdi is installed), the printed checksum is
//! recomputed from QEMU's raw conversion, and refusals leave no output behind. The domain tests
//! export internal and external snapshots of the running test guest, import them on a clean
//! state dir and revert to them: the guest continues from the snapshot's counter.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use snapctl_tests::domain::*;
use snapctl_tests::*;

const BOOT: Duration = Duration::from_secs(90);

/// The checksum snapctl prints, recomputed from a raw file: BLAKE3 of the BLAKE3 digests of its
/// 4 MiB chunks.
fn chunk_checksum(raw: &Path) -> String {
    use std::io::Read;
    let mut file = std::fs::File::open(raw).expect("open raw");
    let mut total = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let mut n = 0;
        while n < buf.len() {
            let got = file.read(&mut buf[n..]).expect("read raw");
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            break;
        }
        total.update(blake3::hash(&buf[..n]).as_bytes());
    }
    total.finalize().to_hex().to_string()
}

/// `qemu-img convert` of a view to raw (`-U`: QEMU may hold it), optionally of a snapshot.
fn to_raw(img: &Path, fmt: &str, snapshot: Option<&str>, out: &Path) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-U", "-f", fmt, "-O", "raw"]);
    if let Some(name) = snapshot {
        cmd.args(["-l", &format!("snapshot.name={name}")]);
    }
    cmd.args([p(img), p(out)]);
    run(&mut cmd).ok();
}

#[track_caller]
fn assert_same_view(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    let r = qemu_img(["compare", "-U", "-f", a_fmt, "-F", b_fmt, p(a), p(b)]);
    assert!(
        r.success(),
        "{} and {} differ\n{}",
        a.display(),
        b.display(),
        r.describe()
    );
}

/// Bytes `qemu-img map` reports as data.
fn mapped_data(img: &Path, fmt: &str) -> u64 {
    let r = qemu_img(["map", "-U", "-f", fmt, "--output=json", p(img)]).ok();
    let v: Value = serde_json::from_str(&r.stdout).expect("map JSON");
    v.as_array()
        .expect("map array")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum()
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

fn export_json(args: &[&str]) -> Value {
    let mut all = vec!["disk", "export"];
    all.extend_from_slice(args);
    all.push("--json");
    let r = snapctl_run(&all);
    assert!(r.success(), "export failed\n{}", r.describe());
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("JSON: {e}\n{}", r.describe()))
}

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("note: qemu-img missing; skipping");
    }
    ok
}

/// The python interpreter with pyvhdi (python3-libvhdi), if installed.
fn pyvhdi() -> Option<&'static str> {
    ["/usr/bin/python3", "python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import pyvhdi"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Reads a VHD with libvhdi and checks it against a raw file: `vhdiinfo` (size, type), and the
/// whole content through pyvhdi when it is installed.
fn assert_libvhdi_reads(vhd: &Path, raw: &Path) {
    let size = std::fs::metadata(raw).expect("raw").len();
    if Command::new("vhdiinfo").arg("-V").output().is_ok() {
        let r = run(Command::new("vhdiinfo").arg(p(vhd))).ok();
        assert!(r.stdout.contains("Dynamic"), "{}", r.describe());
        assert!(
            r.stdout.contains(&format!("({size} bytes)")),
            "vhdiinfo size\n{}",
            r.describe()
        );
    } else {
        eprintln!("note: vhdiinfo missing (libvhdi-utils)");
    }
    match pyvhdi() {
        Some(py) => {
            let script = "import pyvhdi,sys\nf=pyvhdi.file()\nf.open(sys.argv[1])\nr=open(sys.argv[2],'rb')\nn=f.get_media_size()\nassert n==int(sys.argv[3]),n\nat=0\nwhile at<n:\n  k=min(4<<20,n-at)\n  a=f.read_buffer_at_offset(k,at)\n  b=r.read(k)\n  assert a==b,'differs at %d'%at\n  at+=k\nprint('same')\n";
            let r =
                run(Command::new(py).args(["-c", script, p(vhd), p(raw), &size.to_string()])).ok();
            assert_eq!(r.stdout.trim(), "same", "{}", r.describe());
        }
        None => eprintln!("note: pyvhdi missing (python3-libvhdi); content checked by QEMU only"),
    }
}

/// A 64 MiB qcow2 image with data, zeroes written as data, and an internal snapshot `s1` whose
/// view differs from the current one.
fn image_with_snapshot(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", p(&img), "64M"]).ok();
    qemu_io_ok(
        &img,
        &[
            "write -P 0x11 0 3M".into(),
            "write -P 0 8M 2M".into(),
            "write -P 0x22 20M 64k".into(),
            "write -P 0x23 63M 512".into(),
        ],
    );
    qemu_img(["snapshot", "-c", "s1", p(&img)]).ok();
    qemu_io_ok(
        &img,
        &["write -P 0x33 0 1M".into(), "write -P 0x44 40M 1M".into()],
    );
    img
}

#[test]
fn internal_snapshot_exports_to_qcow2_raw_and_vhd() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_snapshot(dir.path());
    let before = file_bytes(&img);
    let reference = dir.path().join("s1.raw");
    to_raw(&img, "qcow2", Some("s1"), &reference);
    let checksum = chunk_checksum(&reference);
    // Non-zero data in the snapshot: 3M + 64k + 64k (the 512 bytes' cluster).
    let data = (3 << 20) + 2 * 65536;

    for (format, qemu_fmt, name) in [
        ("qcow2", "qcow2", "out.qcow2"),
        ("raw", "raw", "out.raw"),
        ("vhd", "vpc", "out.vhd"),
    ] {
        let out = dir.path().join(name);
        let v = export_json(&[p(&img), "s1", p(&out), "--format", format]);
        assert_eq!(v["format"], format);
        assert_eq!(v["view"]["snapshot"], "s1");
        assert_eq!(v["virtual_size"], 64 << 20);
        assert_eq!(
            v["data_bytes"], data,
            "{format}: only non-zero data is written"
        );
        assert_eq!(v["checksum"], checksum.as_str(), "{format}: checksum");
        assert_same_view(&reference, "raw", &out, qemu_fmt);
        match format {
            "qcow2" => {
                assert_qemu_clean(&out, "exported qcow2");
                assert_eq!(mapped_data(&out, "qcow2"), data, "qcow2 map");
                assert!(qemu_info(&out)["backing-filename"].is_null());
            }
            "raw" => {
                assert_eq!(std::fs::metadata(&out).unwrap().len(), 64 << 20);
                assert!(
                    allocated_bytes(&out) <= data + (1 << 20),
                    "raw output is not sparse: {} bytes allocated",
                    allocated_bytes(&out)
                );
            }
            _ => {
                assert!(allocated_bytes(&out) <= data + (1 << 20), "VHD not sparse");
                assert_libvhdi_reads(&out, &reference);
            }
        }
    }
    assert_same_bytes(&img, &before, "the source is only read");
}

#[test]
fn layer_and_current_views_of_qcow2_and_vhd_chains() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // qcow2: base <- base.mid <- base.mid.top
    let base = dir.path().join("base.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", p(&base), "32M"]).ok();
    qemu_io_ok(&base, &["write -P 0x11 0 4M".into()]);
    let mid = PathBuf::from(
        snapctl_run(["disk", "create", p(&base), "mid", "--external"])
            .ok()
            .stdout
            .trim(),
    );
    qemu_io_ok(
        &mid,
        &["write -P 0x22 1M 1M".into(), "write -z 3M 1M".into()],
    );
    let top = PathBuf::from(
        snapctl_run(["disk", "create", p(&mid), "top", "--external"])
            .ok()
            .stdout
            .trim(),
    );
    qemu_io_ok(&top, &["write -P 0x33 0 64k".into()]);

    let out = dir.path().join("mid-view.qcow2");
    let v = export_json(&[p(&top), p(&out), "--layer", p(&mid)]);
    assert_eq!(v["view"]["layer"], p(&mid));
    assert_same_view(&mid, "qcow2", &out, "qcow2");
    assert_qemu_clean(&out, "layer export");
    // 4M of base, minus mid's zeroed 1M.
    assert_eq!(v["data_bytes"], 3 << 20);
    assert_eq!(mapped_data(&out, "qcow2"), 3 << 20);

    let out = dir.path().join("top-view.raw");
    export_json(&[p(&top), p(&out), "--format", "raw"]);
    assert_same_view(&top, "qcow2", &out, "raw");

    // VHD: base.vhd <- base.s1.vhd (snapctl's differencing child)
    let vbase = dir.path().join("vbase.vhd");
    qemu_img([
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        p(&vbase),
        "24M",
    ])
    .ok();
    run(Command::new("qemu-io").args([
        "-f",
        "vpc",
        "-c",
        "write -P 0x55 0 3M",
        "-c",
        "write -P 0x56 10M 4k",
        p(&vbase),
    ]))
    .ok();
    let frozen = dir.path().join("vbase-frozen.raw");
    to_raw(&vbase, "vpc", None, &frozen);
    let child = PathBuf::from(
        snapctl_run(["disk", "create", p(&vbase), "s1", "--external"])
            .ok()
            .stdout
            .trim(),
    );
    let out = dir.path().join("vhd-layer.qcow2");
    let v = export_json(&[p(&child), p(&out), "--layer", p(&vbase)]);
    assert_eq!(v["data_bytes"], (3 << 20) + 65536);
    assert_same_view(&frozen, "raw", &out, "qcow2");
    let out = dir.path().join("vhd-current.vhd");
    export_json(&[p(&child), p(&out), "--format", "vhd"]);
    assert_same_view(&frozen, "raw", &out, "vpc");
    assert_libvhdi_reads(&out, &frozen);
}

#[test]
fn refusals_write_nothing() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_snapshot(dir.path());
    let before = file_bytes(&img);
    let out = dir.path().join("o.qcow2");

    // An existing output stays as it is.
    std::fs::write(&out, b"keep me").unwrap();
    let r = snapctl_run(["disk", "export", p(&img), "s1", p(&out)]);
    assert_error_line(&r);
    assert!(r.stderr.contains("exists"), "{}", r.describe());
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    std::fs::remove_file(&out).unwrap();

    // Unknown snapshot, raw input, a layer not in the chain, a VHD "snapshot".
    let raw = dir.path().join("plain.raw");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let other = dir.path().join("other.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", p(&other), "1M"]).ok();
    let vhd = dir.path().join("v.vhd");
    qemu_img(["create", "-q", "-f", "vpc", p(&vhd), "4M"]).ok();
    for (args, says) in [
        (vec!["disk", "export", p(&img), "nope", p(&out)], "nope"),
        (vec!["disk", "export", p(&raw), p(&out)], "raw"),
        (
            vec!["disk", "export", p(&img), p(&out), "--layer", p(&other)],
            "not a layer",
        ),
        (vec!["disk", "export", p(&vhd), "s1", p(&out)], "VHD"),
    ] {
        let r = snapctl_run(&args);
        assert_error_line(&r);
        assert!(r.stderr.contains(says), "{says}\n{}", r.describe());
        assert!(!out.exists(), "{args:?} left an output behind");
    }
    // Usage errors: NAME with --layer, too many arguments.
    let r = snapctl_run(["disk", "export", p(&img), "s1", p(&out), "--layer", p(&img)]);
    assert_usage_error(&r);
    let r = snapctl_run(["disk", "export", p(&img), "a", "b", "c"]);
    assert_usage_error(&r);
    // A dry run plans and creates nothing.
    let r = snapctl_run(["--dry-run", "disk", "export", p(&img), "s1", p(&out)]).ok();
    assert!(r.stdout.contains("bytes to copy"), "{}", r.describe());
    assert!(r.stdout.contains("space needed"), "{}", r.describe());
    assert!(!out.exists());
    assert_same_bytes(&img, &before, "refusals");
}

#[test]
fn image_held_by_qemu_exports_frozen_views_only() {
    if !have_qemu_img()
        || !Command::new("qemu-storage-daemon")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_snapshot(dir.path());
    let reference = dir.path().join("s1.raw");
    to_raw(&img, "qcow2", Some("s1"), &reference);
    let _daemon = StorageDaemon::start(&img, &dir.path().join("nbd.sock"));
    let out = dir.path().join("cur.qcow2");
    let r = snapctl_run(["disk", "export", p(&img), p(&out)]);
    assert_error_line(&r);
    assert!(r.stderr.contains("snapshot"), "{}", r.describe());
    assert!(!out.exists());
    // The snapshot's clusters never change: read without the lock.
    let out = dir.path().join("s1.qcow2");
    export_json(&[p(&img), "s1", p(&out)]);
    assert_same_view(&reference, "raw", &out, "qcow2");
}

// ---------------------------------------------------------------------------------------------
// Domains

/// Destroys a domain of a state dir when dropped (the imported domains are started by revert).
struct Running {
    state: PathBuf,
    name: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut cmd = snapctl();
        cmd.arg("--state-dir")
            .arg(&self.state)
            .args(["domain", "destroy", &self.name]);
        let _ = run(&mut cmd);
    }
}

fn assert_continues_from(new: &[u64], n: u64, what: &str) {
    let first = new[0];
    assert!(
        first >= n && first <= n + 2,
        "{what}: the restored guest must continue from the snapshot's counter {n}, but printed {new:?}"
    );
    for pair in new.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "{what}: counters must run on: {new:?}"
        );
    }
}

/// Imports `dir` as `new` into a clean state dir, reverts to `snap` and checks that the guest
/// continues from `counter` on `console`.
fn import_and_revert(dir: &Path, new: &str, snap: &str, console: &Path, counter: u64) {
    let lab = DomainLab::new();
    let r = lab.ok(&["--dry-run", "snapshot", "import", p(dir), new]);
    assert!(r.stdout.contains("nothing changed"), "{}", r.describe());
    assert!(lab.snapctl(["domain", "list", "--json"]).stdout.trim() == "[]");
    lab.ok(&["snapshot", "import", p(dir), new]);
    assert_eq!(lab.state_of(new), "shutoff");
    let list = lab.snapshots(new);
    assert_eq!(list["current"], snap);
    let info = lab.info(new, snap);
    assert_eq!(info["memory"], true);
    assert_eq!(info["disks"][0]["kind"], "external");
    assert_eq!(info["disks"][0]["path"], p(&dir.join("xvda.qcow2")));
    // A second import under the same name is refused.
    let again = lab.snapctl(["snapshot", "import", p(dir), new]);
    assert_error_line(&again);

    let start = console_counters(console).len();
    let _running = Running {
        state: lab.state(),
        name: new.to_string(),
    };
    lab.ok(&["snapshot", "revert", new, snap]);
    assert_eq!(lab.state_of(new), "running");
    assert!(
        wait_until(BOOT, || console_counters(console).len() >= start + 5),
        "the imported guest printed nothing; console:\n{}",
        String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default())
    );
    let new_counters = console_counters(console).split_off(start);
    assert_continues_from(&new_counters, counter, new);
}

#[test]
fn running_domain_snapshots_export_and_import() {
    let Some((kernel, initrd)) = guest() else {
        return;
    };
    let lab = DomainLab::new();
    let disk = lab.path("ex.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", p(&disk), "64M"]).ok();
    let console = lab.path("ex.console");
    let cfg = lab.write_cfg(
        "ex",
        &guest_cfg(
            "ex",
            &kernel,
            &initrd,
            &console,
            128,
            &[("xvda", "qcow2", &disk)],
        ),
    );
    lab.start(&cfg, "ex");
    wait_counter(&console, 5, BOOT);

    // An internal snapshot with memory (non-live), then an external one saved live.
    lab.ok(&["snapshot", "create", "ex", "s1"]);
    let n1 = disk_counter(&disk, Some("s1")).expect("counter in s1");
    wait_counter(&console, n1 + 5, BOOT);
    lab.ok(&["snapshot", "create", "ex", "s2", "--live", "--external"]);
    let layer = PathBuf::from(lab.info("ex", "s2")["disks"][0]["path"].as_str().unwrap());
    let n2 = disk_counter(&layer, None).expect("counter in s2's layer");
    assert!(n2 > n1);
    wait_counter(&console, n2 + 5, BOOT);
    assert_eq!(lab.state_of("ex"), "running");

    // Exports while the guest runs on.
    let dir1 = lab.path("export-s1");
    let r = lab.ok(&["--dry-run", "snapshot", "export", "ex", "s1", p(&dir1)]);
    assert!(r.stdout.contains("space needed"), "{}", r.describe());
    assert!(!dir1.exists());
    lab.ok(&["snapshot", "export", "ex", "s1", p(&dir1)]);
    let dir2 = lab.path("export-s2");
    std::fs::create_dir(&dir2).unwrap();
    let r = lab.ok(&["snapshot", "export", "ex", "s2", p(&dir2), "--json"]);
    let manifest: Value = serde_json::from_str(&r.stdout).expect("manifest JSON");
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(manifest["snapshot"]["name"], "s2");
    assert_eq!(lab.state_of("ex"), "running");
    for d in [&dir1, &dir2] {
        for f in [
            "xvda.qcow2",
            "memory.mem",
            "memory.mem.json",
            "domain.cfg",
            "snapshot.json",
        ] {
            assert!(d.join(f).is_file(), "{} lacks {f}", d.display());
        }
        assert!(qemu_info(&d.join("xvda.qcow2"))["backing-filename"].is_null());
        let cfg = std::fs::read_to_string(d.join("domain.cfg")).unwrap();
        assert!(cfg.contains(p(&d.join("xvda.qcow2"))), "{cfg}");
    }
    // The exported disks are the snapshots' views.
    let s1_raw = lab.path("s1.raw");
    to_raw(&disk, "qcow2", Some("s1"), &s1_raw);
    assert_same_view(&s1_raw, "raw", &dir1.join("xvda.qcow2"), "qcow2");
    assert_same_view(&layer, "qcow2", &dir2.join("xvda.qcow2"), "qcow2");
    assert_eq!(disk_counter(&dir1.join("xvda.qcow2"), None), Some(n1));
    assert_eq!(disk_counter(&dir2.join("xvda.qcow2"), None), Some(n2));
    // A non-empty folder is refused and left alone.
    let r = lab.snapctl(["snapshot", "export", "ex", "s1", p(&dir2)]);
    assert_error_line(&r);

    // The original stops; each export becomes a domain on a clean state dir and resumes.
    lab.ok(&["domain", "destroy", "ex"]);
    import_and_revert(&dir1, "imported1", "s1", &console, n1);
    import_and_revert(&dir2, "imported2", "s2", &console, n2);
}
