//! snap-backend-lvm against real lvm2 on loop devices over sparse files.
//!
//! Needs root, lvm2 (`lvm`) and loop devices; each test prints why it skips otherwise. On a kernel
//! without device-mapper (detected) lvm2 runs with `--driverloaded n`, where it can still do the
//! metadata work: these tests then check that create, revert and thin delete are refused with an
//! error naming the missing kernel support and change nothing. Every lvm2 command gets
//! `--devices LOOP` so lvm2 sees only the test's device. Extra arguments from `SNAPCTL_LVM_ARGS`
//! are added too. A guard removes the VG, the loop device and the file even when a test fails.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use snap_backend_lvm::command::kernel_has_device_mapper;
use snap_backend_lvm::{Lvm, LvmBackend, SnapshotKind};
use snap_core::{CreateRequest, DiskBackend, DiskFormat, ErrorKind, Target};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A VG on a loop device over a sparse file; removed on drop.
struct TestVg {
    vg: String,
    dev: String,
    file: PathBuf,
    lvm: Lvm,
    /// A `vgcfgbackup` of the empty VG, restored before removal (set by the thin test).
    empty_backup: Option<PathBuf>,
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

impl TestVg {
    /// Makes the VG, or says why not (then the test skips).
    fn new(tag: &str) -> Option<TestVg> {
        if !is_root() {
            println!("SKIP: not root (loop devices and lvm2 need it)");
            return None;
        }
        if Command::new("lvm").arg("version").output().is_err() {
            println!("SKIP: lvm2 is not installed (`apt-get install lvm2`)");
            return None;
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let vg = format!("snaptest{}{tag}{n}", std::process::id());
        let file = std::env::temp_dir().join(format!("{vg}.img"));
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(128 << 20).unwrap();
        drop(f);
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&file)
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            Ok(o) => {
                let _ = std::fs::remove_file(&file);
                println!(
                    "SKIP: no loop device (losetup: {})",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return None;
            }
            Err(e) => {
                let _ = std::fs::remove_file(&file);
                println!("SKIP: losetup cannot run: {e}");
                return None;
            }
        };
        let mut extra = Lvm::from_env().extra_args().to_vec();
        if !kernel_has_device_mapper() && !extra.iter().any(|a| a == "--driverloaded") {
            extra.extend(["--driverloaded".to_string(), "n".to_string()]);
        }
        extra.extend(["--devices".to_string(), dev.clone()]);
        // No metadata backups or archives under /etc/lvm for throw-away VGs.
        extra.extend([
            "--config".to_string(),
            "backup/backup=0 backup/archive=0".to_string(),
        ]);
        let lvm = Lvm::new().with_extra_args(extra);
        let t = TestVg {
            vg,
            dev,
            file,
            lvm,
            empty_backup: None,
        };
        t.lvm_ok("pvcreate", &["-q", &t.dev.clone()]);
        t.lvm_ok("vgcreate", &["-q", &t.vg.clone(), &t.dev.clone()]);
        Some(t)
    }

    /// Runs an lvm2 command through the crate's runner; panics with lvm2's message on failure.
    fn lvm_ok(&self, sub: &str, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match self.lvm.run_blocking(sub, &args) {
            Ok(out) => out.stdout,
            Err(e) => panic!("lvm {sub} {args:?}: {e}"),
        }
    }

    /// A plain LV of `mib` MiB (inactive, not zeroed: works without device-mapper).
    fn lv(&self, name: &str, mib: u32) {
        let size = format!("{mib}M");
        let vg = self.vg.clone();
        self.lvm_ok(
            "lvcreate",
            &["-q", "-an", "-Zn", "-L", &size, "-n", name, &vg],
        );
    }

    /// A classic snapshot `snap` of `origin` made the way that works without device-mapper: a
    /// plain LV converted into the origin's COW store.
    fn classic_snapshot(&self, origin: &str, snap: &str, mib: u32) {
        self.lv(snap, mib);
        let (o, s) = (
            format!("{}/{origin}", self.vg),
            format!("{}/{snap}", self.vg),
        );
        self.lvm_ok("lvconvert", &["-q", "-y", "-Zn", "-s", &o, &s]);
    }

    /// LV names of the VG, sorted (the "nothing changed" check).
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .lvm
            .lvs_blocking(&self.vg)
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        names.sort();
        names
    }

    fn backend(&self, lv: &str) -> LvmBackend {
        LvmBackend::new(format!("/dev/{}/{lv}", self.vg))
            .unwrap()
            .with_lvm(self.lvm.clone())
    }

    fn dm(&self) -> bool {
        kernel_has_device_mapper()
    }
}

impl Drop for TestVg {
    fn drop(&mut self) {
        if let Some(empty) = &self.empty_backup {
            // Thin LVs cannot be removed without device-mapper: put back the empty VG first.
            let args = vec![
                "--force".to_string(),
                "-f".to_string(),
                empty.to_string_lossy().into_owned(),
                self.vg.clone(),
            ];
            if let Err(e) = self.lvm.run_blocking("vgcfgrestore", &args) {
                eprintln!("cleanup: vgcfgrestore {}: {e}", self.vg);
            }
            let _ = std::fs::remove_file(empty);
        }
        let vg = vec!["-f".to_string(), self.vg.clone()];
        if let Err(e) = self.lvm.run_blocking("vgremove", &vg) {
            eprintln!("cleanup: vgremove {}: {e}", self.vg);
        }
        let _ = self
            .lvm
            .run_blocking("pvremove", &["-ff".into(), "-y".into(), self.dev.clone()]);
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.file);
    }
}

#[tokio::test]
async fn classic_snapshots_list_delete_and_refusals() {
    let Some(t) = TestVg::new("c") else { return };
    t.lv("o", 16);
    t.lv("plain", 4);
    t.classic_snapshot("o", "s", 8);
    let b = t.backend("o");

    // list: the contract's listing from lvm2's real JSON.
    let listing = b.list().await.unwrap();
    assert_eq!(listing.format, DiskFormat::Lvm);
    assert_eq!(listing.virtual_size, 16 << 20);
    assert_eq!(listing.image, PathBuf::from(format!("/dev/{}/o", t.vg)));
    assert!(listing.chain.is_empty());
    assert_eq!(listing.snapshots.len(), 1);
    let s = &listing.snapshots[0];
    assert_eq!((s.id.as_str(), s.name.as_str()), ("s", "s"));
    assert_eq!((s.vm_state_size, s.vm_clock_ns), (0, 0));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        s.date_sec + 600 > now && s.date_sec <= now + 5,
        "{}",
        s.date_sec
    );
    let detailed = b.list_detailed().await.unwrap();
    let d = detailed.snapshot("s").unwrap();
    assert_eq!(d.kind, SnapshotKind::Classic);
    assert_eq!(d.size, 8 << 20);
    assert!(!detailed.thin);
    if !t.dm() {
        assert_eq!(d.fill_percent, None, "no kernel, no fill");
    }
    // VG/LV form, and the blocking API, see the same.
    let short = LvmBackend::new(format!("{}/o", t.vg))
        .unwrap()
        .with_lvm(t.lvm.clone());
    assert_eq!(short.list_blocking().unwrap().snapshots, detailed.snapshots);
    // A volume that is not a snapshot origin lists no snapshots.
    assert!(
        t.backend("plain")
            .list()
            .await
            .unwrap()
            .snapshots
            .is_empty()
    );

    let before = t.names();
    // Refusals before lvm2 runs.
    let e = b
        .create(&CreateRequest::Internal { name: "s".into() })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Exists, "{e}");
    for bad in ["-s", "--yes", "snapshot1", "a b", ""] {
        let e = b
            .create(&CreateRequest::Internal { name: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}: {e}");
        let e = b.delete(&Target::Internal(bad.into())).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}: {e}");
    }
    let e = t
        .backend("s")
        .create(&CreateRequest::Internal { name: "ss".into() })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.message().contains("snapshots of snapshots"), "{e}");
    for name in ["plain", "o", "nope"] {
        let e = b.delete(&Target::Internal(name.into())).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{name}: {e}");
        let e = b.revert(&Target::Internal(name.into())).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{name}: {e}");
    }
    let e = b.delete(&Target::Layer("/x".into())).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert_eq!(t.names(), before);

    // lvm2's own failures, through the runner, keep lvm2's message.
    let run = |sub: &str, args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        t.lvm.run_blocking(sub, &args).unwrap_err()
    };
    let e = run("lvremove", &["-y", "--", &format!("{}/nope", t.vg)]);
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.message().contains("Failed to find logical volume"), "{e}");
    let e = run(
        "lvcreate",
        &["-an", "-Zn", "-L", "4M", "-n", "s", "--", &t.vg],
    );
    assert_eq!(e.kind(), ErrorKind::Exists, "{e}");
    assert!(e.message().contains("already exists"), "{e}");
    let e = t.lvm.lvs_blocking(&format!("{}missing", t.vg)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = LvmBackend::new(format!("{}missing/o", t.vg))
        .unwrap()
        .with_lvm(t.lvm.clone())
        .list()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(t.names(), before);

    if t.dm() {
        // A kernel with device-mapper: the real operations.
        b.create(&CreateRequest::Internal { name: "n1".into() })
            .await
            .unwrap();
        let l = b.list_detailed().await.unwrap();
        assert_eq!(l.snapshot("n1").unwrap().kind, SnapshotKind::Classic);
        b.delete(&Target::Internal("n1".into())).await.unwrap();
    } else {
        // No device-mapper: create and revert refused, naming it, with nothing changed...
        let e = b
            .create(&CreateRequest::Internal { name: "n1".into() })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.message().contains("device-mapper"), "{e}");
        let e = b.revert(&Target::Internal("s".into())).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.message().contains("device-mapper"), "{e}");
        assert!(b.revert_blocking("s").is_err());
        assert_eq!(t.names(), before);
        // ...and lvm2 itself says the same, mapped to Unsupported with its message kept.
        let o = format!("{}/o", t.vg);
        let e = run("lvcreate", &["-y", "-s", "-L", "4M", "-n", "n1", "--", &o]);
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(
            e.message()
                .contains("Can't create snapshot without using device-mapper kernel driver"),
            "{e}"
        );
        let e = run(
            "lvconvert",
            &["-y", "--merge", "--", &format!("{}/s", t.vg)],
        );
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.message().contains("Missing support in kernel"), "{e}");
        assert_eq!(t.names(), before);
        assert_eq!(
            b.list_detailed().await.unwrap().snapshots,
            detailed.snapshots
        );
    }

    // delete = lvremove, async and blocking.
    b.delete(&Target::Internal("s".into())).await.unwrap();
    assert!(b.list().await.unwrap().snapshots.is_empty());
    t.classic_snapshot("o", "s2", 4);
    assert_eq!(b.list_blocking().unwrap().snapshots.len(), 1);
    b.delete_blocking("s2").unwrap();
    assert!(b.list_blocking().unwrap().snapshots.is_empty());
    assert_eq!(t.names(), ["o", "plain"]);
}

/// Appends thin LVs (pool on extents 0..8 of pv0, origin `t`, snapshot `ts` with activation skip)
/// to a `vgcfgbackup` of an empty VG.
fn with_thin_lvs(backup: &str) -> String {
    let lv = |name: &str, n: u32, flags: &str, visible: bool, segment: &str| {
        let status = if visible {
            r#"["READ", "WRITE", "VISIBLE"]"#
        } else {
            r#"["READ", "WRITE"]"#
        };
        format!(
            "\t\t{name} {{\n\t\t\tid = \"aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa{n}\"\n\t\t\tstatus = {status}\n\
             \t\t\tflags = [{flags}]\n\t\t\tcreation_time = {}\n\t\t\tcreation_host = \"test\"\n\
             \t\t\tsegment_count = 1\n\t\t\tsegment1 {{\n{segment}\t\t\t}}\n\t\t}}\n",
            1_700_000_000 + n
        )
    };
    let striped = |count: u32, at: u32| {
        format!(
            "\t\t\t\tstart_extent = 0\n\t\t\t\textent_count = {count}\n\t\t\t\ttype = \"striped\"\n\
             \t\t\t\tstripe_count = 1\n\t\t\t\tstripes = [\n\t\t\t\t\t\"pv0\", {at}\n\t\t\t\t]\n"
        )
    };
    let thin = |id: u32, origin: &str| {
        format!(
            "\t\t\t\tstart_extent = 0\n\t\t\t\textent_count = 4\n\t\t\t\ttype = \"thin\"\n\
             \t\t\t\tthin_pool = \"pool\"\n\t\t\t\ttransaction_id = {}\n\t\t\t\tdevice_id = {id}\n{origin}",
            id - 1
        )
    };
    let pool = "\t\t\t\tstart_extent = 0\n\t\t\t\textent_count = 8\n\t\t\t\ttype = \"thin-pool\"\n\
                \t\t\t\tmetadata = \"pool_tmeta\"\n\t\t\t\tpool = \"pool_tdata\"\n\
                \t\t\t\ttransaction_id = 2\n\t\t\t\tchunk_size = 128\n\t\t\t\tdiscards = \"passdown\"\n\
                \t\t\t\tzero_new_blocks = 1\n";
    let lvs = [
        lv("pool", 1, "", true, pool),
        lv("t", 2, "", true, &thin(1, "")),
        lv(
            "ts",
            3,
            "\"ACTIVATION_SKIP\"",
            true,
            &thin(2, "\t\t\t\torigin = \"t\"\n"),
        ),
        lv("pool_tmeta", 4, "", false, &striped(1, 0)),
        lv("pool_tdata", 5, "", false, &striped(8, 1)),
    ]
    .concat();
    let end = backup.rfind('}').unwrap();
    format!(
        "{}\tlogical_volumes {{\n{lvs}\t}}\n{}",
        &backup[..end],
        &backup[end..]
    )
}

#[tokio::test]
async fn thin_snapshots_listed_from_restored_metadata() {
    let Some(mut t) = TestVg::new("t") else {
        return;
    };
    let empty = std::env::temp_dir().join(format!("{}.empty.cfg", t.vg));
    let vg = t.vg.clone();
    t.lvm_ok("vgcfgbackup", &["-q", "-f", &empty.to_string_lossy(), &vg]);
    t.empty_backup = Some(empty.clone());
    let cfg = std::env::temp_dir().join(format!("{}.cfg", t.vg));
    let cfg_s = cfg.to_string_lossy().into_owned();
    let backup = std::fs::read_to_string(&empty).unwrap();
    std::fs::write(&cfg, with_thin_lvs(&backup)).unwrap();
    let restored = t.lvm.run_blocking(
        "vgcfgrestore",
        &["--force".into(), "-f".into(), cfg_s.clone(), vg.clone()],
    );
    let _ = std::fs::remove_file(&cfg);
    restored.unwrap();

    let b = t.backend("t");
    let l = b.list_detailed().await.unwrap();
    assert!(l.thin);
    assert_eq!(l.pool.as_deref(), Some("pool"));
    assert_eq!(l.size, 16 << 20);
    assert_eq!(l.snapshots.len(), 1);
    let ts = &l.snapshots[0];
    assert_eq!(ts.name, "ts");
    assert_eq!(ts.kind, SnapshotKind::Thin);
    assert!(ts.skip_activation);
    assert_eq!(ts.size, 16 << 20);
    assert_eq!(ts.time, Some(1_700_000_003));
    assert_eq!(ts.uuid, "aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa3");
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let listing = b.list().await.unwrap();
    assert_eq!(listing.snapshots[0].date_sec, 1_700_000_003);
    // The thin snapshot of the thin snapshot's origin only; the pool is not a disk.
    assert!(t.backend("ts").list().await.unwrap().snapshots.is_empty());
    let e = t
        .backend("pool")
        .create(&CreateRequest::Internal { name: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");

    if !t.dm() {
        // Without device-mapper lvm2 would drop the LV from the metadata and then fail on the
        // pool: create, revert and delete are refused first, and nothing changes.
        let before = t.names();
        let e = b
            .create(&CreateRequest::Internal { name: "n".into() })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        let e = b.revert(&Target::Internal("ts".into())).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.message().contains("device-mapper"), "{e}");
        let e = b.delete(&Target::Internal("ts".into())).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(b.delete_blocking("ts").is_err());
        assert_eq!(t.names(), before);
        assert_eq!(b.list_detailed().await.unwrap(), l);
    }
}
