//! Bench part `rbd`: snapshot create / revert / delete and clone on a Ceph RBD image holding
//! 1 GiB of data, through `snapctl disk` (and the bare `rbd` command, to show snapctl's own
//! cost), against the same on a local qcow2 file holding the same amount of data through
//! `qemu-img snapshot -c/-a/-d` (and `snapctl disk`); the clone's counterpart on qcow2 is a new
//! overlay (`qemu-img create -b`). Then clone time on a 1 GiB and an 8 GiB image, both full of
//! data: it must not grow with the image's size (a clone copies no data).
//!
//! The cluster is one monitor and one memstore OSD started in a temporary folder (the recipe of
//! the RBD tests), killed through its pid files at the end. Without the Ceph packages (installed
//! when root, see `sysdeps::ensure_ceph`) the part is skipped with a note.

use crate::proc::{TempDir, capture, run};
use crate::sysdeps::ensure_ceph;
use crate::{Failure, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

/// A one-node Ceph in a folder; its daemons are killed on drop.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

fn uuid() -> std::result::Result<String, String> {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|u| u.trim().to_string())
        .map_err(|e| format!("kernel uuid: {e}"))
}

impl Cluster {
    fn start(dir: &Path, store_bytes: u64) -> std::result::Result<Cluster, String> {
        for sub in ["mon/ceph-a", "osd/ceph-0", "run", "log"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("mkdir {sub}: {e}"))?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("free port: {e}"))?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let fsid = uuid()?;
        let d = dir.display();
        let conf = dir.join("ceph.conf");
        let text = format!(
            "[global]\nfsid = {fsid}\nmon host = {addr}\nauth cluster required = none\n\
             auth service required = none\nauth client required = none\nrun dir = {d}/run\n\
             log file = {d}/log/$name.log\nosd pool default size = 1\nosd pool default min size = 1\n\
             mon allow pool size one = true\nosd crush chooseleaf type = 0\nmon mgr mkfs grace = 86400\n\
             paxos propose interval = 0.01\npaxos min wait = 0.001\n\
             [mon]\nmon data = {d}/mon/ceph-$id\npid file = {d}/run/$name.pid\nadmin socket = {d}/run/$name.asok\n\
             [osd]\nosd data = {d}/osd/ceph-$id\npid file = {d}/run/$name.pid\nadmin socket = {d}/run/$name.asok\n\
             osd objectstore = memstore\nmemstore device bytes = {store_bytes}\n"
        );
        std::fs::write(&conf, text).map_err(|e| format!("write ceph.conf: {e}"))?;
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            conf,
        };
        let (monmap, osdmap) = (dir.join("monmap"), dir.join("osdmap"));
        run(cluster
            .cmd("monmaptool")
            .args([
                "--create",
                "--clobber",
                "--fsid",
                &fsid,
                "--add",
                "a",
                &addr,
            ])
            .arg(&monmap))?;
        run(cluster
            .cmd("osdmaptool")
            .args(["--createsimple", "1", "--clobber"])
            .arg(&osdmap))?;
        run(cluster
            .cmd("ceph-mon")
            .args(["--mkfs", "-i", "a", "--monmap"])
            .arg(&monmap)
            .arg("--osdmap")
            .arg(&osdmap))?;
        run(cluster.cmd("ceph-mon").args(["-i", "a"]))?;
        let osd_uuid = uuid()?;
        run(cluster
            .cmd("ceph-osd")
            .args(["-i", "0", "--mkfs", "--osd-uuid", &osd_uuid]))?;
        run(cluster.cmd("ceph-osd").args(["-i", "0"]))?;
        run(cluster
            .cmd("timeout")
            .args(["60", "ceph", "osd", "pool", "create", "rbd", "8", "8"]))?;
        run(cluster
            .cmd("timeout")
            .args(["60", "rbd", "pool", "init", "rbd"]))?;
        Ok(cluster)
    }

    /// A command with `CEPH_CONF` set, output captured.
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command.env("CEPH_CONF", &self.conf);
        command
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pid_file in ["mon.a.pid", "osd.0.pid"] {
            if let Ok(pid) = std::fs::read_to_string(self.dir.join("run").join(pid_file)) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
    }
}

/// Runs `command` and returns how long it took; its failure is an error.
fn timed(command: &mut Command) -> std::result::Result<Duration, String> {
    let started = Instant::now();
    let output = capture(command)?;
    let took = started.elapsed();
    if !output.status.success() {
        return Err(format!(
            "{:?} failed: {}",
            command,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(took)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Fills `rbd/IMAGE` with `bytes` of data (4 MiB sequential writes, non-zero).
fn fill_rbd(cluster: &Cluster, image: &str, bytes: u64) -> std::result::Result<(), String> {
    run(cluster.cmd("rbd").args([
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4M",
        "--io-threads",
        "8",
        "--io-pattern",
        "seq",
        "--io-total",
        &bytes.to_string(),
        &format!("rbd/{image}"),
    ]))
}

/// The `rbd` part of `cargo xtask bench`.
pub fn run_rbd(target: &Path, snapctl: &Path, runs: usize) -> Result {
    println!(
        "\n==> RBD: snapshot create/revert/delete and clone on an image with 1 GiB of data \
         (one-node memstore Ceph) vs qemu-img snapshot on a local qcow2 with the same data"
    );
    if !ensure_ceph() {
        println!("xtask: Ceph is not installed; the rbd part is skipped");
        return Ok(());
    }
    let scratch = TempDir::new(target, "bench-rbd")?;
    let dir = scratch.path();
    let started = Instant::now();
    let cluster = Cluster::start(&dir.join("ceph"), 12 * GIB).map_err(Failure::Failed)?;
    println!("cluster up in {:.2} s", started.elapsed().as_secs_f64());
    let snap = |args: &[&str]| {
        let mut c = cluster.cmd(snapctl);
        c.args(args);
        c
    };
    let rbd = |args: &[&str]| {
        let mut c = cluster.cmd("rbd");
        c.args(args);
        c
    };

    // RBD: 1 GiB image full of data.
    run(rbd(&["create", "--size", "1G", "rbd/b1"]))?;
    fill_rbd(&cluster, "b1", GIB)?;
    // qcow2: the same amount of data in a local file.
    let qcow2 = dir.join("b1.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow2)
        .arg("1G"))?;
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2"]);
    for i in 0..4u64 {
        io.arg("-c")
            .arg(format!("write -P 0x{:x} {}M 256M", i + 1, i * 256));
    }
    run(io.arg(&qcow2))?;
    let q = qcow2.to_string_lossy().into_owned();

    let mut table: Vec<(&str, [Vec<Duration>; 4])> = vec![
        ("create", Default::default()),
        ("revert", Default::default()),
        ("delete", Default::default()),
        ("clone / overlay", Default::default()),
    ];
    let mut add = |row: usize, col: usize, d: Duration| {
        if let Some((_, cols)) = table.get_mut(row)
            && let Some(cell) = cols.get_mut(col)
        {
            cell.push(d);
        }
    };
    for i in 0..runs.max(1) {
        let s = format!("s{i}");
        // snapctl on RBD.
        add(
            0,
            0,
            timed(&mut snap(&["disk", "create", "rbd:rbd/b1", &s]))?,
        );
        add(
            1,
            0,
            timed(&mut snap(&["disk", "revert", "rbd:rbd/b1", &s]))?,
        );
        add(
            2,
            0,
            timed(&mut snap(&["disk", "delete", "rbd:rbd/b1", &s]))?,
        );
        // The bare rbd command.
        let at = format!("rbd/b1@{s}");
        add(
            0,
            1,
            timed(&mut rbd(&["snap", "create", "--no-progress", &at]))?,
        );
        add(
            1,
            1,
            timed(&mut rbd(&["snap", "rollback", "--no-progress", &at]))?,
        );
        add(
            2,
            1,
            timed(&mut rbd(&["snap", "rm", "--no-progress", &at]))?,
        );
        // snapctl on qcow2.
        add(0, 2, timed(&mut snap(&["disk", "create", &q, &s]))?);
        add(1, 2, timed(&mut snap(&["disk", "revert", &q, &s]))?);
        add(2, 2, timed(&mut snap(&["disk", "delete", &q, &s]))?);
        // qemu-img on qcow2.
        add(
            0,
            3,
            timed(Command::new("qemu-img").args(["snapshot", "-c", &s, &q]))?,
        );
        add(
            1,
            3,
            timed(Command::new("qemu-img").args(["snapshot", "-a", &s, &q]))?,
        );
        add(
            2,
            3,
            timed(Command::new("qemu-img").args(["snapshot", "-d", &s, &q]))?,
        );
        // Clones: snapctl (snapshot + protect + clone) and bare rbd clone; a qcow2 overlay.
        let clone = format!("rbd:rbd/b1-c{i}");
        add(
            3,
            0,
            timed(&mut snap(&[
                "disk",
                "create",
                "rbd:rbd/b1",
                &format!("g{i}"),
                "--external",
                "--overlay",
                &clone,
            ]))?,
        );
        run(rbd(&[
            "snap",
            "create",
            "--no-progress",
            &format!("rbd/b1@h{i}"),
        ]))?;
        run(rbd(&["snap", "protect", &format!("rbd/b1@h{i}")]))?;
        add(
            3,
            1,
            timed(&mut rbd(&[
                "clone",
                &format!("rbd/b1@h{i}"),
                &format!("rbd/b1-d{i}"),
            ]))?,
        );
        let overlay = dir.join(format!("b1.o{i}.qcow2"));
        add(
            3,
            2,
            timed(&mut snap(&[
                "disk",
                "create",
                &q,
                &format!("o{i}"),
                "--external",
                "--overlay",
                &overlay.to_string_lossy(),
            ]))?,
        );
        let overlay2 = dir.join(format!("b1.p{i}.qcow2"));
        add(
            3,
            3,
            timed(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &q])
                    .arg(&overlay2),
            )?,
        );
        let _ = std::fs::remove_file(&overlay);
        let _ = std::fs::remove_file(&overlay2);
    }
    println!(
        "\n{:<16} {:>14} {:>14} {:>14} {:>16}",
        "operation", "snapctl rbd", "rbd command", "snapctl qcow2", "qemu-img qcow2"
    );
    for (name, cols) in &table {
        let [a, b, c, d] = cols;
        println!(
            "{:<16} {:>14} {:>14} {:>14} {:>16}",
            name,
            ms(median(a.clone())),
            ms(median(b.clone())),
            ms(median(c.clone())),
            ms(median(d.clone()))
        );
    }
    println!(
        "(median of {} run(s); the qcow2 clone column is a new overlay on the image)",
        runs.max(1)
    );

    // Clone time against image size: 1 GiB vs 8 GiB, both full of data, on a fresh cluster
    // (the snapshots and rollbacks above hold data the memstore OSD has no room for next to
    // 9 GiB).
    drop(cluster);
    let cluster = Cluster::start(&dir.join("ceph2"), 12 * GIB).map_err(Failure::Failed)?;
    let snap = |args: &[&str]| {
        let mut c = cluster.cmd(snapctl);
        c.args(args);
        c
    };
    let rbd = |args: &[&str]| {
        let mut c = cluster.cmd("rbd");
        c.args(args);
        c
    };
    run(rbd(&["create", "--size", "1G", "rbd/b1"]))?;
    fill_rbd(&cluster, "b1", GIB)?;
    run(rbd(&["create", "--size", "8G", "rbd/b8"]))?;
    fill_rbd(&cluster, "b8", 8 * GIB)?;
    // Interleaved (1, 8, 1, 8, ...) so that the cluster's background work after the fill
    // weighs on both sizes alike.
    let sizes = [("b1", "1 GiB"), ("b8", "8 GiB")];
    let mut took: Vec<Vec<Duration>> = vec![Vec::new(); sizes.len()];
    for i in 0..runs.max(5) {
        for ((image, _), times) in sizes.iter().zip(took.iter_mut()) {
            times.push(timed(&mut snap(&[
                "disk",
                "create",
                &format!("rbd:rbd/{image}"),
                &format!("k{i}"),
                "--external",
                "--overlay",
                &format!("rbd:rbd/{image}-k{i}"),
            ]))?);
        }
    }
    let mut per_size = Vec::new();
    for ((_, label), times) in sizes.iter().zip(took) {
        let (lo, hi) = (
            times.iter().min().copied().unwrap_or_default(),
            times.iter().max().copied().unwrap_or_default(),
        );
        let m = median(times);
        println!(
            "clone of a {label} image full of data (snapctl --external): median {} (range {}-{})",
            ms(m),
            ms(lo),
            ms(hi)
        );
        per_size.push(m);
    }
    if let [small, large] = per_size.as_slice() {
        let ratio = large.as_secs_f64() / small.as_secs_f64().max(1e-9);
        println!(
            "8 GiB / 1 GiB clone time: {ratio:.2}x (a clone copies no data: should stay near 1)"
        );
        if ratio > 2.0 {
            println!("xtask: note: clone time grew with the image size ({ratio:.2}x)");
        }
    }
    drop(cluster);
    drop(scratch);
    Ok(())
}
