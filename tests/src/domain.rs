//! Domain-level fixtures: a private state dir, xl.cfg files, `snapctl` with `--state-dir`, the
//! test guest built by `cargo xtask guest`, and reading its counter from the console and disk.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Run, p, run, snapctl, target_dir};

/// A folder holding one test's state dir, disks and configs; every domain started in it is
/// destroyed when dropped.
#[derive(Debug)]
pub struct DomainLab {
    /// The temporary folder (removed on drop).
    pub dir: tempfile::TempDir,
    started: std::sync::Mutex<Vec<String>>,
}

impl Default for DomainLab {
    fn default() -> Self {
        Self::new()
    }
}

impl DomainLab {
    /// A fresh lab.
    pub fn new() -> Self {
        DomainLab {
            dir: tempfile::TempDir::new().expect("tempdir"),
            started: Default::default(),
        }
    }

    /// A path in the lab.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The state dir.
    pub fn state(&self) -> PathBuf {
        self.path("state")
    }

    /// Runs `snapctl --state-dir STATE ARGS`.
    pub fn snapctl<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = snapctl();
        cmd.arg("--state-dir").arg(self.state()).args(args);
        let r = run(&mut cmd);
        assert!(
            !r.stderr.contains("panicked") && r.code != Some(101),
            "snapctl panicked\n{}",
            r.describe()
        );
        r
    }

    /// Runs snapctl and asserts success.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.snapctl(args);
        assert!(r.success(), "snapctl failed\n{}", r.describe());
        r
    }

    /// Writes an xl.cfg and returns its path.
    pub fn write_cfg(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(&format!("{name}.cfg"));
        std::fs::write(&path, text).expect("write cfg");
        path
    }

    /// `domain start CFG`, remembering to destroy it on drop.
    #[track_caller]
    pub fn start(&self, cfg: &Path, name: &str) -> Run {
        let r = self.ok(&["domain", "start", p(cfg)]);
        self.started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_string());
        r
    }

    /// Remembers a domain started by snapctl itself (e.g. a clone) to destroy it on drop.
    pub fn adopt(&self, name: &str) {
        self.started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_string());
    }

    /// `snapshot list DOMAIN --json`.
    #[track_caller]
    pub fn snapshots(&self, domain: &str) -> Value {
        let r = self.ok(&["snapshot", "list", domain, "--json"]);
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("list JSON: {e}\n{}", r.describe()))
    }

    /// `snapshot info DOMAIN NAME --json`.
    #[track_caller]
    pub fn info(&self, domain: &str, name: &str) -> Value {
        let r = self.ok(&["snapshot", "info", domain, name, "--json"]);
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("info JSON: {e}\n{}", r.describe()))
    }

    /// The state `domain list --json` reports for `domain`.
    #[track_caller]
    pub fn state_of(&self, domain: &str) -> String {
        let r = self.ok(&["domain", "list", "--json"]);
        let v: Value = serde_json::from_str(&r.stdout).expect("domain list JSON");
        v.as_array()
            .into_iter()
            .flatten()
            .find(|d| d["name"] == domain)
            .and_then(|d| d["state"].as_str())
            .unwrap_or_else(|| panic!("domain {domain} not listed\n{}", r.describe()))
            .to_string()
    }

    /// The active file of disk `vdev` (from the domain record).
    pub fn active(&self, domain: &str, vdev: &str) -> PathBuf {
        let text = std::fs::read_to_string(
            self.state()
                .join("domains")
                .join(domain)
                .join("domain.json"),
        )
        .expect("domain.json");
        let v: Value = serde_json::from_str(&text).expect("domain.json JSON");
        let disks = v["config"]["disks"].as_array().expect("disks");
        let disk = disks
            .iter()
            .find(|d| d["vdev"] == vdev)
            .unwrap_or_else(|| panic!("no disk {vdev}"));
        PathBuf::from(disk["target"].as_str().expect("target"))
    }
}

impl Drop for DomainLab {
    fn drop(&mut self) {
        for name in self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let mut cmd = snapctl();
            cmd.arg("--state-dir")
                .arg(self.state())
                .args(["domain", "destroy", name]);
            let _ = run(&mut cmd);
        }
    }
}

/// Whether qemu-system-x86_64 runs here.
pub fn have_qemu_system() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The test guest (kernel, initrd) from `cargo xtask guest`: `SNAPCTL_GUEST_DIR` or
/// `<target>/guest`. `None` (with a note) when it is not built — unless `SNAPCTL_REQUIRE_GUEST`
/// is set (as `cargo xtask test` does), then a missing guest fails the test.
pub fn guest() -> Option<(PathBuf, PathBuf)> {
    let dir = std::env::var_os("SNAPCTL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest"));
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.img");
    let present = kernel.exists() && initrd.exists() && have_qemu_system();
    if !present {
        assert!(
            std::env::var_os("SNAPCTL_REQUIRE_GUEST").is_none(),
            "the test guest is missing at {} (run `cargo xtask guest`) or qemu-system-x86_64 is not installed",
            dir.display()
        );
        eprintln!(
            "note: no test guest at {} or no qemu-system-x86_64; skipping (run `cargo xtask guest`)",
            dir.display()
        );
        return None;
    }
    Some((kernel, initrd))
}

/// Whether the guest has qemu-ga (from the guest's manifest.json).
pub fn guest_has_agent() -> bool {
    let dir = std::env::var_os("SNAPCTL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest"));
    std::fs::read_to_string(dir.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["has_agent"].as_bool())
        .unwrap_or(false)
}

/// The counters (`counter N` lines) in a console log, in order.
pub fn console_counters(console: &Path) -> Vec<u64> {
    let text = std::fs::read(console).unwrap_or_default();
    String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| {
            let at = l.find("counter ")?;
            l.get(at + 8..)?.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Waits until the console shows a counter of at least `at_least`; returns the last one.
#[track_caller]
pub fn wait_counter(console: &Path, at_least: u64, timeout: Duration) -> u64 {
    let start = Instant::now();
    loop {
        if let Some(last) = console_counters(console).last().copied()
            && last >= at_least
        {
            return last;
        }
        assert!(
            start.elapsed() < timeout,
            "the guest's counter did not reach {at_least} within {timeout:?}; console:\n{}",
            String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The counter in sector 0 of a qcow2 image (through its chain; `-U`: QEMU may hold it), or of
/// internal snapshot `snapshot` in it.
pub fn disk_counter(image: &Path, snapshot: Option<&str>) -> Option<u64> {
    let out = tempfile::NamedTempFile::new().ok()?;
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-U", "-f", "qcow2", "-O", "raw"]);
    if let Some(name) = snapshot {
        cmd.args(["-l", &format!("snapshot.name={name}")]);
    }
    cmd.args([p(image), p(out.path())]);
    let r = run(&mut cmd);
    if !r.success() {
        return None;
    }
    let mut sector = vec![0u8; 512];
    let mut file = std::fs::File::open(out.path()).ok()?;
    std::io::Read::read_exact(&mut file, &mut sector).ok()?;
    let text = String::from_utf8_lossy(&sector);
    let rest = text.strip_prefix("counter ")?;
    rest.chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .ok()
}

/// An xl.cfg for the test guest with the given disks (`(vdev, format, path)`).
pub fn guest_cfg(
    name: &str,
    kernel: &Path,
    initrd: &Path,
    console: &Path,
    memory_mib: u64,
    disks: &[(&str, &str, &Path)],
) -> String {
    let disks: Vec<String> = disks
        .iter()
        .map(|(vdev, format, path)| {
            format!(
                "    'format={format},vdev={vdev},access=rw,target={}',",
                p(path)
            )
        })
        .collect();
    format!(
        "name = \"{name}\"\nmemory = {memory_mib}\nvcpus = 1\nkernel = \"{}\"\nramdisk = \"{}\"\nextra = \"console=ttyS0 quiet\"\nserial = \"file:{}\"\ndisk = [\n{}\n]\n",
        p(kernel),
        p(initrd),
        p(console),
        disks.join("\n")
    )
}

/// An xl.cfg with no kernel (QEMU sits in its firmware): enough for offline snapshot tests,
/// whose domains are started once to be defined and destroyed at once.
pub fn plain_cfg(name: &str, disks: &[(&str, &str, &Path)]) -> String {
    let disks: Vec<String> = disks
        .iter()
        .map(|(vdev, format, path)| {
            format!("'format={format},vdev={vdev},access=rw,target={}'", p(path))
        })
        .collect();
    format!(
        "# test domain\nname = \"{name}\"\nmemory = 64\nvcpus = 1\ndisk = [ {} ]\n",
        disks.join(", ")
    )
}

/// Waits (bounded) until `f` holds.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
