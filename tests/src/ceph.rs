//! A real one-node Ceph cluster for the RBD tests: one monitor and one memstore OSD, no manager,
//! no authentication, everything (conf, data, pid files, logs, sockets) in a temporary folder.
//!
//! [`Ceph::start`] takes about a second: `monmaptool --create`, an initial osdmap with one OSD
//! slot (`osdmaptool --createsimple 1`, so no `ceph osd new` is needed: the OSD registers its
//! uuid when it boots), `ceph-mon --mkfs` + `ceph-mon`, `ceph-osd --mkfs` + `ceph-osd`, `ceph osd
//! pool create rbd 8 8` while the OSD starts, then `rbd pool init rbd`, which returns once the
//! pool's placement groups are active. Settings that make it fast and quiet: `paxos propose
//! interval = 0.01` and `paxos min wait = 0.001` (a snapshot removal waits for the monitor),
//! `mon mgr mkfs grace` (no manager without a health warning), pool size 1 with `mon allow pool
//! size one`, `osd crush chooseleaf type = 0`.
//!
//! The daemons are killed through their pid files when the value is dropped. Without the Ceph
//! packages (ceph-mon, ceph-osd, ceph-common) or QEMU's rbd driver (qemu-block-extra) `start`
//! returns `None` with a note, unless `SNAPCTL_REQUIRE_CEPH` is set (as `cargo xtask test` does
//! when it installed them): then it panics.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Run, p, run};

/// Binaries the cluster needs.
const BINARIES: [&str; 6] = [
    "ceph-mon",
    "ceph-osd",
    "monmaptool",
    "osdmaptool",
    "ceph",
    "rbd",
];

/// The pool every test image lives in.
pub const POOL: &str = "rbd";

/// A running one-node cluster; stopped on drop.
#[derive(Debug)]
pub struct Ceph {
    dir: tempfile::TempDir,
    conf: PathBuf,
    /// How long the start took.
    pub started_in: Duration,
}

fn have(binary: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether QEMU's tools have the rbd block driver (package qemu-block-extra).
pub fn qemu_has_rbd() -> bool {
    Command::new("qemu-img")
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(" rbd"))
}

fn skip(why: &str) -> Option<Ceph> {
    assert!(
        std::env::var_os("SNAPCTL_REQUIRE_CEPH").is_none(),
        "SNAPCTL_REQUIRE_CEPH is set but {why}"
    );
    eprintln!(
        "note: {why}; skipping (as root: `apt-get install --no-install-recommends ceph-mon ceph-osd ceph-common` \
         and qemu-block-extra at QEMU's version, or run `cargo xtask test`)"
    );
    None
}

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("kernel uuid")
        .trim()
        .to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

impl Ceph {
    /// Starts a cluster with pool `rbd` (memstore capacity 4 GiB); `None` when the packages are
    /// missing (see the module docs).
    pub fn start() -> Option<Ceph> {
        Self::start_with(4 << 30)
    }

    /// [`Ceph::start`] with a memstore capacity of `store_bytes` (RAM, allocated as written).
    pub fn start_with(store_bytes: u64) -> Option<Ceph> {
        if let Some(missing) = BINARIES.iter().find(|b| !have(b)) {
            return skip(&format!("{missing} is not installed"));
        }
        if !qemu_has_rbd() {
            return skip("QEMU has no rbd block driver (qemu-block-extra)");
        }
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(store_bytes) {
                Ok(ceph) => return Some(ceph),
                Err(why) => last = why,
            }
        }
        panic!("the test Ceph cluster did not start: {last}");
    }

    fn try_start(store_bytes: u64) -> Result<Ceph, String> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("snapctl-ceph-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        for sub in ["mon/ceph-a", "osd/ceph-0", "run", "log"] {
            std::fs::create_dir_all(d.join(sub)).map_err(|e| format!("mkdir {sub}: {e}"))?;
        }
        let fsid = uuid();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let conf = d.join("ceph.conf");
        let ds = p(d);
        let text = format!(
            "[global]\n\
             fsid = {fsid}\n\
             mon host = {addr}\n\
             auth cluster required = none\n\
             auth service required = none\n\
             auth client required = none\n\
             run dir = {ds}/run\n\
             log file = {ds}/log/$name.log\n\
             osd pool default size = 1\n\
             osd pool default min size = 1\n\
             mon allow pool size one = true\n\
             mon allow pool delete = true\n\
             osd crush chooseleaf type = 0\n\
             mon mgr mkfs grace = 86400\n\
             paxos propose interval = 0.01\n\
             paxos min wait = 0.001\n\
             [mon]\n\
             mon data = {ds}/mon/ceph-$id\n\
             pid file = {ds}/run/$name.pid\n\
             admin socket = {ds}/run/$name.asok\n\
             [osd]\n\
             osd data = {ds}/osd/ceph-$id\n\
             pid file = {ds}/run/$name.pid\n\
             admin socket = {ds}/run/$name.asok\n\
             osd objectstore = memstore\n\
             memstore device bytes = {store_bytes}\n"
        );
        std::fs::write(&conf, text).map_err(|e| format!("write ceph.conf: {e}"))?;
        let mut ceph = Ceph {
            dir,
            conf,
            started_in: Duration::ZERO,
        };
        let step = |what: &str, cmd: &mut Command| -> Result<(), String> {
            let r = run(cmd.env("CEPH_CONF", &ceph.conf));
            if r.success() {
                Ok(())
            } else {
                Err(format!("{what}: {}", r.describe()))
            }
        };
        let monmap = d.join("monmap");
        let osdmap = d.join("osdmap");
        step(
            "monmaptool",
            Command::new("monmaptool").args([
                "--create",
                "--clobber",
                "--fsid",
                &fsid,
                "--add",
                "a",
                &addr,
                p(&monmap),
            ]),
        )?;
        step(
            "osdmaptool",
            Command::new("osdmaptool").args(["--createsimple", "1", "--clobber", p(&osdmap)]),
        )?;
        step(
            "ceph-mon --mkfs",
            Command::new("ceph-mon").args([
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                p(&monmap),
                "--osdmap",
                p(&osdmap),
            ]),
        )?;
        step("ceph-mon", Command::new("ceph-mon").args(["-i", "a"]))?;
        // The OSD starts while the pool is created.
        let osd_uuid = uuid();
        let osd = Command::new("sh")
            .args([
                "-c",
                &format!("ceph-osd -i 0 --mkfs --osd-uuid {osd_uuid} && ceph-osd -i 0"),
            ])
            .env("CEPH_CONF", &ceph.conf)
            .stdin(std::process::Stdio::null())
            .output();
        let pool = step(
            "ceph osd pool create",
            Command::new("timeout").args(["30", "ceph", "osd", "pool", "create", POOL, "8", "8"]),
        );
        let osd = osd.map_err(|e| format!("ceph-osd: {e}"))?;
        if !osd.status.success() {
            return Err(format!(
                "ceph-osd: {}",
                String::from_utf8_lossy(&osd.stderr)
            ));
        }
        pool?;
        step(
            "rbd pool init",
            Command::new("timeout").args(["30", "rbd", "pool", "init", POOL]),
        )?;
        ceph.started_in = started.elapsed();
        Ok(ceph)
    }

    /// The cluster's ceph.conf.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sets `CEPH_CONF` for `cmd`.
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("CEPH_CONF", &self.conf)
    }

    /// Runs `rbd ARGS` against the cluster.
    pub fn rbd(&self, args: &[&str]) -> Run {
        run(self.env(Command::new("timeout").args(["60", "rbd"]).args(args)))
    }

    /// Runs `rbd ARGS --format json` and parses it (panics on failure).
    #[track_caller]
    pub fn rbd_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--format", "json"]);
        let r = self.rbd(&all).ok();
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("rbd JSON: {e}\n{}", r.describe()))
    }

    /// `rbd:rbd/IMAGE`, the disk name snapctl and QEMU take (the conf comes from `CEPH_CONF`).
    pub fn disk(&self, image: &str) -> String {
        format!("rbd:{POOL}/{image}")
    }

    /// `rbd:rbd/IMAGE:conf=CONF`, with the conf in the name.
    pub fn disk_with_conf(&self, image: &str) -> String {
        format!("rbd:{POOL}/{image}:conf={}", p(&self.conf))
    }

    /// Creates image `image` of `size` (`64M`...).
    #[track_caller]
    pub fn create(&self, image: &str, size: &str) {
        self.rbd(&["create", "--size", size, &format!("{POOL}/{image}")])
            .ok();
    }

    /// Runs `qemu-io -f raw -c CMD... rbd:rbd/IMAGE` (QEMU's rbd driver).
    pub fn qemu_io(&self, image: &str, cmds: &[String]) -> Run {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in cmds {
            cmd.arg("-c").arg(c);
        }
        cmd.arg(self.disk_with_conf(image));
        run(&mut cmd)
    }

    /// Writes byte `pattern` over `len` bytes at `offset` of the image through QEMU.
    #[track_caller]
    pub fn write(&self, image: &str, offset: u64, len: u64, pattern: u8) {
        let r = self.qemu_io(image, &[format!("write -P {pattern} {offset} {len}")]);
        assert!(
            r.success() && !r.stdout.contains("failed"),
            "qemu-io write\n{}",
            r.describe()
        );
    }

    /// The image's (or `image@snap`'s) bytes through `rbd export`.
    #[track_caller]
    pub fn export(&self, spec: &str) -> Vec<u8> {
        let out = self.dir().join(format!("export-{}.raw", uuid()));
        self.rbd(&[
            "export",
            "--no-progress",
            &format!("{POOL}/{spec}"),
            p(&out),
        ])
        .ok();
        let bytes = std::fs::read(&out).expect("read export");
        let _ = std::fs::remove_file(&out);
        bytes
    }

    /// `qemu-img compare` of two images (or snapshots, `IMAGE@SNAP`) through QEMU's rbd driver:
    /// whether QEMU sees the same data.
    pub fn qemu_same(&self, a: &str, b: &str) -> bool {
        let spec = |s: &str| match s.split_once('@') {
            Some((image, snap)) => format!(
                "json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"rbd\",\"pool\":\"{POOL}\",\"image\":\"{image}\",\"snapshot\":\"{snap}\",\"conf\":\"{}\"}}}}",
                p(&self.conf)
            ),
            None => self.disk_with_conf(s),
        };
        let r = run(Command::new("qemu-img").args(["compare", "-U", &spec(a), &spec(b)]));
        assert!(
            matches!(r.code, Some(0 | 1)),
            "qemu-img compare failed\n{}",
            r.describe()
        );
        r.code == Some(0)
    }

    /// The snapshot names of `image`, in rbd's order.
    #[track_caller]
    pub fn snap_names(&self, image: &str) -> Vec<String> {
        self.rbd_json(&["snap", "ls", &format!("{POOL}/{image}")])
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect()
    }

    /// The image names of the pool.
    #[track_caller]
    pub fn images(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .rbd_json(&["ls", POOL])
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// Everything a refused operation must leave alone: the pool's long listing (images,
    /// sizes, parents, snapshots with protection) and the bytes of `images`.
    #[track_caller]
    pub fn fingerprint(&self, images: &[&str]) -> (Value, Vec<Vec<u8>>) {
        let listing = self.rbd_json(&["ls", "-l", POOL]);
        let data = images.iter().map(|i| self.export(i)).collect();
        (listing, data)
    }

    fn pids(&self) -> Vec<i32> {
        ["mon.a.pid", "osd.0.pid"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir().join("run").join(f)).ok())
            .filter_map(|t| t.trim().parse().ok())
            .filter(|p: &i32| *p > 1)
            .collect()
    }
}

/// A `qemu-storage-daemon` that has an RBD image open through QEMU's rbd driver (a client
/// `rbd status` lists as a watcher, as a running guest would be); killed on drop.
#[derive(Debug)]
pub struct Holder {
    child: std::process::Child,
}

impl Ceph {
    /// Opens `image` in a `qemu-storage-daemon` and waits (at most 10 s) until rbd lists it as a
    /// watcher.
    #[track_caller]
    pub fn hold(&self, image: &str) -> Holder {
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=rbd,pool={POOL},image={image},conf={},node-name=n0",
                p(&self.conf)
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon");
        let holder = Holder { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.rbd_json(&["status", &format!("{POOL}/{image}")]);
            if status["watchers"].as_array().is_some_and(|w| !w.is_empty()) {
                return holder;
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not open {image} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Holder {
    /// SIGTERM first: the daemon closes the image, so its watch goes at once (a killed
    /// client's watch lingers for about 30 s).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let pids = self.pids();
        for pid in &pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|pid| alive(*pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether `pid` is a live process (not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        !matches!(state, Some("Z") | Some("X") | None)
    })
}

/// The test guest running on a new 64 MiB RBD image of a fresh cluster, counting. Dropped in
/// field order: the lab (which destroys its domains) before the cluster.
#[derive(Debug)]
pub struct RbdGuest {
    /// The lab the domain lives in.
    pub lab: crate::domain::DomainLab,
    /// The cluster.
    pub ceph: Ceph,
    /// The domain's disk: `rbd:rbd/IMAGE:conf=...`.
    pub target: String,
    /// The guest's console file.
    pub console: PathBuf,
    /// The counter the guest had reached when `start` returned.
    pub counter: u64,
}

impl RbdGuest {
    /// Starts domain `name` on image `image` and waits until its counter reaches `at_least`;
    /// `None` when the test guest, QEMU or Ceph is not there (see [`Ceph::start`]).
    pub fn start(name: &str, image: &str, at_least: u64) -> Option<RbdGuest> {
        let (kernel, initrd) = crate::domain::guest()?;
        let ceph = Ceph::start()?;
        let lab = crate::domain::DomainLab::new();
        ceph.create(image, "64M");
        let target = ceph.disk_with_conf(image);
        let console = lab.path(&format!("{name}.console"));
        let cfg = lab.write_cfg(
            name,
            &crate::domain::guest_cfg(
                name,
                &kernel,
                &initrd,
                &console,
                128,
                &[("xvda", "raw", Path::new(&target))],
            ),
        );
        lab.start(&cfg, name);
        let counter = crate::domain::wait_counter(&console, at_least, Duration::from_secs(90));
        Some(RbdGuest {
            lab,
            ceph,
            target,
            console,
            counter,
        })
    }
}
