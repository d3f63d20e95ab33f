//! `cargo xtask guest`: builds the tiny Linux guest the QEMU end-to-end tests boot, from Debian
//! packages only (the configured apt mirrors are the only network it uses).
//!
//! 1. `apt-get download` Debian 12's 6.1 kernel (the concrete `linux-image-6.1.0-N-amd64` package
//!    behind the newest 6.1 `linux-image-amd64`, whatever apt's pins prefer) and `busybox-static`;
//!    best effort also `qemu-guest-agent` and the library packages it needs;
//! 2. `dpkg -x` them into a scratch directory and pack an initramfs (newc cpio written here, gzip):
//!    busybox, the virtio modules (virtio_pci, virtio_blk, virtio_console and what they depend on,
//!    in load order, read from each module's `.modinfo`), qemu-ga with the shared libraries and
//!    the dynamic loader its ELF headers name, and the generated `/init`;
//! 3. `/init` mounts proc, sys and devtmpfs, loads the modules, starts qemu-ga on the
//!    `org.qemu.guest_agent.0` virtio-serial port when both are there, then counts forever: every
//!    ~100 ms the counter (kept in RAM, 1 at boot) is written as `counter N\n`, zero-padded to
//!    512 bytes, to sector 0 of /dev/vda (O_DIRECT + fsync, so QEMU has it), and only then
//!    printed as `counter N` on /dev/ttyS0. A console line `counter N` therefore means that the
//!    disk already holds N (or more); the tty makes line ends `\r\n`. Without /dev/vda the guest
//!    says so once and counts on the console only. The guest has no disk-backed filesystem, so
//!    qemu-ga's `guest-fsfreeze-freeze` answers 0 (filesystems frozen) and the status stays
//!    "thawed"; the raw sector writes go on regardless.
//!
//! Output (see [`guest_dir`]): `vmlinuz`, `initrd.img` and `manifest.json` (kernel version,
//! package versions, `has_agent`) in `$SNAPCTL_GUEST_DIR`, else `TARGET/guest`. Boot with
//! `-kernel vmlinuz -initrd initrd.img -append 'console=ttyS0 quiet'` ([`KERNEL_CMDLINE`]), a
//! virtio-blk disk and, for the agent, `-device virtio-serial-pci` plus
//! `-device virtserialport,chardev=...,name=org.qemu.guest_agent.0` ([`AGENT_PORT`]). The build is
//! skipped when the outputs are newer than this file, unless `--force`; `--no-agent` leaves
//! qemu-ga out. If any part of the agent fails, the guest is built without it and a note says so
//! (`has_agent: false` and `agent_note` in the manifest).

use crate::proc::{TempDir, Workspace, display, run, stdout_of};
use crate::sysdeps::is_root;
use crate::{Failure, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

/// Environment variable naming the guest directory (absolute, or relative to the current
/// directory); when unset the guest is in `TARGET/guest` ([`DEFAULT_SUBDIR`]).
pub const GUEST_DIR_ENV: &str = "SNAPCTL_GUEST_DIR";
/// The guest directory's name under the cargo target directory.
pub const DEFAULT_SUBDIR: &str = "guest";
/// The kernel, for QEMU's `-kernel`.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The initramfs (gzip'd newc cpio), for QEMU's `-initrd`.
pub const INITRD_FILE: &str = "initrd.img";
/// What was built: kernel version, package versions, `has_agent`, modules, command line.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The kernel command line the guest expects (its console is the first serial port).
pub const KERNEL_CMDLINE: &str = "console=ttyS0 quiet";
/// The virtio-serial port name qemu-ga listens on in the guest.
pub const AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// The guest's disk: sector 0 receives `counter N`.
const GUEST_DISK: &str = "/dev/vda";
/// The Debian kernel flavour and series the guest runs.
const KERNEL_META: &str = "linux-image-amd64";
const KERNEL_SERIES: &str = "6.1.";
const BUSYBOX_PACKAGE: &str = "busybox-static";
const AGENT_PACKAGE: &str = "qemu-guest-agent";
/// Where qemu-ga is in its package, and in the initramfs.
const AGENT_BINARY: &str = "usr/sbin/qemu-ga";
/// Modules to load (with their dependencies first): PCI transport, disk, virtio-serial.
const ROOT_MODULES: [&str; 3] = ["virtio_pci", "virtio_blk", "virtio_console"];
/// Where the initramfs keeps shared libraries (a default search directory of Debian's ld.so).
const LIB_DIR: &str = "lib/x86_64-linux-gnu";
/// Where to look for a shared library inside extracted packages, in order.
const LIB_SEARCH: [&str; 6] = [
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "usr/lib64",
    "lib",
    "usr/lib",
];

/// The directory the guest is built into and read from: `$SNAPCTL_GUEST_DIR` if set (relative to
/// the current directory), else `TARGET/guest` for the cargo target directory `target`.
pub fn guest_dir(target: &Path) -> PathBuf {
    match std::env::var_os(GUEST_DIR_ENV).filter(|dir| !dir.is_empty()) {
        Some(dir) => std::env::current_dir()
            .map(|cwd| cwd.join(&dir))
            .unwrap_or_else(|_| dir.into()),
        None => target.join(DEFAULT_SUBDIR),
    }
}

#[derive(Debug, PartialEq)]
struct Options {
    force: bool,
    agent: bool,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut options = Options {
        force: false,
        agent: true,
    };
    for arg in args {
        match arg.as_str() {
            "--force" => options.force = true,
            "--no-agent" => options.agent = false,
            other => return Err(Failure::Usage(format!("guest: unexpected `{other}`"))),
        }
    }
    Ok(options)
}

pub fn run_guest(args: &[String]) -> Result {
    let options = parse_options(args)?;
    let workspace = Workspace::locate();
    let out = guest_dir(&workspace.target);
    let outputs = Outputs::in_dir(&out);
    if !options.force
        && let Some(manifest) = outputs.up_to_date(options.agent)
    {
        println!("xtask: the test guest is up to date (`cargo xtask guest --force` rebuilds it)");
        if let Some(why) = missing_agent(&manifest) {
            no_agent_note(&why);
        }
        outputs.print();
        return Ok(());
    }
    check_architecture()?;
    std::fs::create_dir_all(&out)
        .map_err(|err| format!("cannot create {}: {err}", out.display()))?;
    let mut scratch = TempDir::new(&workspace.target, "guest-build")?;
    match build(scratch.path(), &outputs, options.agent) {
        Ok(missing) => {
            if let Some(why) = missing {
                no_agent_note(&why);
            }
            outputs.print();
            Ok(())
        }
        Err(message) => {
            scratch.keep();
            Err(Failure::Failed(message))
        }
    }
}

/// The three output files.
struct Outputs {
    kernel: PathBuf,
    initrd: PathBuf,
    manifest: PathBuf,
}

impl Outputs {
    fn in_dir(dir: &Path) -> Self {
        Outputs {
            kernel: dir.join(KERNEL_FILE),
            initrd: dir.join(INITRD_FILE),
            manifest: dir.join(MANIFEST_FILE),
        }
    }

    /// The manifest, when all outputs exist, are newer than this source file and were built with
    /// the agent requested the same way.
    fn up_to_date(&self, agent: bool) -> Option<serde_json::Value> {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/guest.rs");
        let input_time = modified(&source).unwrap_or(SystemTime::UNIX_EPOCH);
        let fresh = [&self.kernel, &self.initrd, &self.manifest]
            .iter()
            .all(|path| modified(path).is_some_and(|time| time > input_time));
        if !fresh {
            return None;
        }
        let text = std::fs::read_to_string(&self.manifest).ok()?;
        let manifest: serde_json::Value = serde_json::from_str(&text).ok()?;
        let requested = manifest.get("agent_requested")?.as_bool()?;
        (requested == agent).then_some(manifest)
    }

    fn print(&self) {
        println!("\ntest guest:");
        println!("  kernel    {}", self.kernel.display());
        println!("  initrd    {}", self.initrd.display());
        println!("  manifest  {}", self.manifest.display());
        println!("  cmdline   {KERNEL_CMDLINE}");
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).ok()?.modified().ok()
}

/// Why a built guest has no qemu-ga (from its manifest), or None when it has one.
fn missing_agent(manifest: &serde_json::Value) -> Option<String> {
    let has_agent = manifest
        .get("has_agent")
        .and_then(serde_json::Value::as_bool);
    if has_agent == Some(true) {
        return None;
    }
    let note = manifest
        .get("agent_note")
        .and_then(serde_json::Value::as_str);
    Some(note.unwrap_or("unknown reason").to_string())
}

fn no_agent_note(why: &str) {
    println!(
        "\nxtask: note: the guest has NO qemu-guest-agent ({why}); it boots and counts, but \
nothing answers on its {AGENT_PORT} port (guest-ping, guest-fsfreeze-*)"
    );
}

/// The guest is x86_64 and its packages come from this host's apt: refuse other architectures.
fn check_architecture() -> std::result::Result<(), String> {
    match stdout_of(Command::new("dpkg").arg("--print-architecture")) {
        Some(arch) if arch == "amd64" => Ok(()),
        Some(arch) => Err(format!(
            "the test guest is amd64 and is built from this host's apt sources, but dpkg's \
architecture is {arch}; build it on an amd64 Debian host"
        )),
        None => Err(
            "`dpkg --print-architecture` failed: the test guest is built from Debian packages \
(apt-get download, dpkg -x); run this on Debian 12 (amd64)"
                .into(),
        ),
    }
}

/// Builds everything into `outputs`; why the guest has no qemu-ga, None when it has it.
fn build(
    scratch: &Path,
    outputs: &Outputs,
    want_agent: bool,
) -> std::result::Result<Option<String>, String> {
    let mut apt = Apt::new(scratch.join("debs"))?;
    println!("\n==> resolving packages");
    apt.ensure_lists()?;
    let kernel_package = resolve_kernel_package()?;
    println!("xtask: kernel package {kernel_package}");

    println!("\n==> downloading and unpacking the kernel and busybox");
    let kernel_root = scratch.join("kernel");
    let busybox_root = scratch.join("busybox");
    apt.download(&[kernel_package.as_str(), BUSYBOX_PACKAGE])?;
    apt.extract(&kernel_package, &kernel_root)?;
    apt.extract(BUSYBOX_PACKAGE, &busybox_root)?;
    let kernel = Kernel::find(&kernel_root)?;
    println!("xtask: kernel {}", kernel.version);

    let mut image = Cpio::default();
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "etc", "lib64",
    ] {
        image.dir(dir, 0o755);
    }
    image.dir(LIB_DIR, 0o755);
    image.symlink("var/run", "../run");
    image.char_device("dev/console", 0o600, 5, 1);
    image.file(
        "bin/busybox",
        0o755,
        read(&busybox_root.join("bin/busybox"))?,
    );
    image.symlink("bin/sh", "busybox");

    let busybox = busybox_root.join("bin/busybox");
    let modules = kernel.load_order(&ROOT_MODULES, &busybox)?;
    let module_dir = format!("lib/modules/{}", kernel.version);
    image.dir(&module_dir, 0o755);
    let names: Vec<String> = modules.iter().map(|module| module.name.clone()).collect();
    println!("xtask: modules in load order: {}", names.join(" "));
    for module in modules {
        image.file(
            &format!("{module_dir}/{}.ko", module.name),
            0o644,
            module.bytes,
        );
    }

    let agent = if want_agent {
        println!("\n==> qemu-guest-agent (optional)");
        let before: BTreeSet<String> = apt.versions.keys().cloned().collect();
        match add_agent(&mut apt, scratch, &mut image) {
            Ok(()) => Ok(()),
            Err(why) => {
                println!("xtask: no qemu-guest-agent in the guest: {why}");
                // The manifest lists what is in the guest.
                apt.versions.retain(|package, _| before.contains(package));
                Err(why)
            }
        }
    } else {
        Err("not requested (--no-agent)".to_string())
    };
    let agent_note = agent.err();

    image.file(
        "init",
        0o755,
        init_script(&kernel.version, &names).into_bytes(),
    );

    println!("\n==> writing the guest");
    let initrd = gzip(&image.finish())?;
    write_atomically(&outputs.kernel, &read(&kernel.vmlinuz)?)?;
    write_atomically(&outputs.initrd, &initrd)?;
    let manifest = serde_json::json!({
        "kernel": KERNEL_FILE,
        "initrd": INITRD_FILE,
        "kernel_version": kernel.version,
        "kernel_cmdline": KERNEL_CMDLINE,
        "kernel_package": kernel_package,
        "packages": apt.versions,
        "modules": names,
        "disk": GUEST_DISK,
        "has_agent": agent_note.is_none(),
        "agent_port": AGENT_PORT,
        "agent_note": agent_note,
        "agent_requested": want_agent,
    });
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|err| format!("cannot encode the manifest: {err}"))?;
    write_atomically(&outputs.manifest, format!("{text}\n").as_bytes())?;
    println!(
        "xtask: initramfs {} KiB (gzip), kernel {}",
        initrd.len() / 1024,
        kernel.version
    );
    Ok(agent_note)
}

fn read(path: &Path) -> std::result::Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
}

/// Writes `path` through a temporary file in the same directory, so readers never see half of it.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::result::Result<(), String> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    std::fs::write(&temp, bytes)
        .map_err(|err| format!("cannot write {}: {err}", temp.display()))?;
    std::fs::rename(&temp, path).map_err(|err| {
        format!(
            "cannot rename {} to {}: {err}",
            temp.display(),
            path.display()
        )
    })
}

/// Compresses with the system's gzip (Essential in Debian).
fn gzip(bytes: &[u8]) -> std::result::Result<Vec<u8>, String> {
    filter(Command::new("gzip").args(["-9", "-n", "-c"]), bytes)
}

/// Feeds `input` to `command`'s stdin and returns its stdout; a failure names the command.
fn filter(command: &mut Command, input: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let shown = display(command);
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("could not start `{shown}`: {err}"))?;
    let writer = child.stdin.take().map(|mut stdin| {
        let input = input.to_vec();
        std::thread::spawn(move || stdin.write_all(&input))
    });
    let output = child
        .wait_with_output()
        .map_err(|err| format!("`{shown}` failed: {err}"))?;
    if let Some(Ok(Err(err))) = writer.map(std::thread::JoinHandle::join) {
        return Err(format!("cannot feed `{shown}`: {err}"));
    }
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(format!(
            "`{shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// apt

/// Downloads packages into one directory and remembers the version of each.
struct Apt {
    dir: PathBuf,
    /// Package name -> version, of everything downloaded.
    versions: BTreeMap<String, String>,
    /// Package name -> downloaded .deb.
    debs: BTreeMap<String, PathBuf>,
    updated: bool,
}

impl Apt {
    fn new(dir: PathBuf) -> std::result::Result<Self, String> {
        std::fs::create_dir_all(&dir)
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        Ok(Apt {
            dir,
            versions: BTreeMap::new(),
            debs: BTreeMap::new(),
            updated: false,
        })
    }

    /// Makes sure apt knows busybox-static and the kernel: `apt-get update` when root and the
    /// package lists lack them, an error saying so otherwise.
    fn ensure_lists(&mut self) -> std::result::Result<(), String> {
        if has_candidate(BUSYBOX_PACKAGE) && has_candidate(KERNEL_META) {
            return Ok(());
        }
        if !is_root() {
            return Err(format!(
                "apt does not know {BUSYBOX_PACKAGE} or {KERNEL_META} (package lists missing?); \
run `apt-get update` as root, or this command as root"
            ));
        }
        self.update()?;
        if has_candidate(BUSYBOX_PACKAGE) && has_candidate(KERNEL_META) {
            Ok(())
        } else {
            Err(format!(
                "after `apt-get update`, apt still has no {BUSYBOX_PACKAGE} or {KERNEL_META}: \
are Debian 12 (bookworm) main sources configured in /etc/apt/sources.list(.d)?"
            ))
        }
    }

    fn update(&mut self) -> std::result::Result<(), String> {
        self.updated = true;
        run(Command::new("apt-get").args(["update", "-q"]))
    }

    /// `apt-get download PACKAGES...` (candidate versions). When that fails as root with package
    /// lists not refreshed yet in this run (a mirror may have dropped an old version), updates
    /// them and tries once more.
    fn download(&mut self, packages: &[&str]) -> std::result::Result<(), String> {
        let wanted: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|package| !self.debs.contains_key(*package))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let mut first = self.download_command(&wanted);
        if let Err(message) = run(&mut first) {
            if self.updated || !is_root() {
                return Err(message);
            }
            println!("xtask: download failed; refreshing apt's package lists and retrying");
            self.update()?;
            run(self.download_command(&wanted))?;
        }
        for package in wanted {
            let deb = self.find_deb(package)?;
            let version = deb_field(&deb, "Version")?;
            self.versions.insert(package.to_string(), version);
            self.debs.insert(package.to_string(), deb);
        }
        Ok(())
    }

    fn download_command(&self, packages: &[&str]) -> Command {
        let mut command = Command::new("apt-get");
        command.current_dir(&self.dir).args(["download", "-q"]);
        if is_root() {
            // apt drops to its `_apt` user for downloads, which cannot write our scratch dir.
            command.args(["-o", "APT::Sandbox::User=root"]);
        }
        command.args(packages);
        command
    }

    /// The .deb of `package` in the download directory (named `PACKAGE_VERSION_ARCH.deb`).
    fn find_deb(&self, package: &str) -> std::result::Result<PathBuf, String> {
        let prefix = format!("{package}_");
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|err| format!("cannot list {}: {err}", self.dir.display()))?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|entry| Some(entry.ok()?.path()))
            .filter(|path| {
                path.file_name()
                    .map(|name| name.to_string_lossy())
                    .is_some_and(|name| name.starts_with(&prefix) && name.ends_with(".deb"))
            })
            .collect();
        found.sort();
        found.pop().ok_or_else(|| {
            format!(
                "apt-get download left no {prefix}*.deb in {}",
                self.dir.display()
            )
        })
    }

    /// `dpkg -x` of a downloaded package into `root`.
    fn extract(&self, package: &str, root: &Path) -> std::result::Result<(), String> {
        let deb = self
            .debs
            .get(package)
            .ok_or_else(|| format!("{package} was not downloaded"))?;
        std::fs::create_dir_all(root)
            .map_err(|err| format!("cannot create {}: {err}", root.display()))?;
        run(Command::new("dpkg").arg("-x").arg(deb).arg(root))
    }
}

/// Whether apt has an installable version of `package`.
fn has_candidate(package: &str) -> bool {
    stdout_of(Command::new("apt-cache").args(["policy", package])).is_some_and(|text| {
        text.lines()
            .filter_map(|line| line.trim().strip_prefix("Candidate:"))
            .any(|candidate| candidate.trim() != "(none)")
    })
}

/// One control field of a .deb (`dpkg-deb -f DEB FIELD`).
fn deb_field(deb: &Path, field: &str) -> std::result::Result<String, String> {
    let mut command = Command::new("dpkg-deb");
    command.arg("-f").arg(deb).arg(field);
    stdout_of(&mut command)
        .filter(|value| !value.is_empty())
        .ok_or_else(|| format!("`{}` gave no {field}", display(&command)))
}

/// The concrete kernel package: what the newest 6.1 `linux-image-amd64` depends on
/// (`linux-image-6.1.0-N-amd64`), else the highest such N apt knows.
fn resolve_kernel_package() -> std::result::Result<String, String> {
    let madison =
        stdout_of(Command::new("apt-cache").args(["madison", KERNEL_META])).unwrap_or_default();
    for version in series_versions(&madison, KERNEL_SERIES) {
        let show = stdout_of(Command::new("apt-cache").args([
            "show",
            "--no-all-versions",
            &format!("{KERNEL_META}={version}"),
        ]));
        if let Some(package) = show.as_deref().and_then(kernel_dependency) {
            return Ok(package);
        }
    }
    let names = stdout_of(Command::new("apt-cache").args(["pkgnames", "linux-image-6.1.0-"]))
        .unwrap_or_default();
    newest_kernel_name(&names).ok_or_else(|| {
        format!(
            "apt knows no Debian 12 {KERNEL_SERIES}x kernel ({KERNEL_META} {KERNEL_SERIES}* or \
linux-image-6.1.0-N-amd64); are the bookworm and bookworm-security main sources configured?"
        )
    })
}

/// The versions in `apt-cache madison` output that start with `series`, in its order (newest
/// first).
fn series_versions(madison: &str, series: &str) -> Vec<String> {
    madison
        .lines()
        .filter_map(|line| line.split('|').nth(1))
        .map(str::trim)
        .filter(|version| version.starts_with(series))
        .map(str::to_string)
        .collect()
}

/// Whether `name` is `linux-image-6.1.0-N-amd64`; N if so.
fn kernel_abi(name: &str) -> Option<u32> {
    let abi = name
        .strip_prefix("linux-image-6.1.0-")?
        .strip_suffix("-amd64")?;
    if abi.chars().all(|c| c.is_ascii_digit()) {
        abi.parse().ok()
    } else {
        None
    }
}

/// The `linux-image-6.1.0-N-amd64` named in the Depends field of an `apt-cache show` stanza.
fn kernel_dependency(show: &str) -> Option<String> {
    let depends = show
        .lines()
        .find_map(|line| line.strip_prefix("Depends:"))?;
    depends
        .split([',', '|'])
        .filter_map(|item| item.split_whitespace().next())
        .find(|name| kernel_abi(name).is_some())
        .map(str::to_string)
}

/// The `linux-image-6.1.0-N-amd64` with the highest N in `apt-cache pkgnames` output.
fn newest_kernel_name(names: &str) -> Option<String> {
    names
        .lines()
        .map(str::trim)
        .filter_map(|name| Some((kernel_abi(name)?, name)))
        .max()
        .map(|(_, name)| name.to_string())
}

/// Library packages qemu-ga needs: the `lib*` packages reachable from `root` through Depends and
/// PreDepends in `apt-cache depends --recurse` output. Of alternatives (` |Depends: A` then
/// `  Depends: B`) the first real package is taken; virtual ones (`<name>`) are skipped.
fn library_closure(depends: &str, root: &str) -> Vec<String> {
    let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut current: Option<&str> = None;
    let mut group: Vec<&str> = Vec::new();
    for line in depends.lines() {
        if !line.starts_with(' ') {
            current = Some(line.trim());
            group.clear();
            continue;
        }
        let trimmed = line.trim_start();
        let relation = trimmed.trim_start_matches('|');
        let Some(target) = relation
            .strip_prefix("Depends:")
            .or_else(|| relation.strip_prefix("PreDepends:"))
        else {
            // Other relations, or the providers of a virtual package listed below it.
            continue;
        };
        group.push(target.trim());
        if trimmed.starts_with('|') {
            continue; // more alternatives follow
        }
        let chosen = group.iter().copied().find(|name| !name.starts_with('<'));
        if let (Some(package), Some(chosen)) = (current, chosen) {
            graph.entry(package).or_default().push(chosen);
        }
        group.clear();
    }
    let mut seen = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(package) = stack.pop() {
        for &next in graph.get(package).into_iter().flatten() {
            if next.starts_with("lib") && seen.insert(next.to_string()) {
                stack.push(next);
            }
        }
    }
    seen.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// the kernel and its modules

struct Kernel {
    version: String,
    vmlinuz: PathBuf,
    /// `lib/modules/VERSION` in the extracted package.
    modules: PathBuf,
}

/// A kernel module ready for `insmod`.
struct Module {
    name: String,
    /// Decompressed.
    bytes: Vec<u8>,
}

impl Kernel {
    /// The one `lib/modules/VERSION` of an extracted kernel package and its `boot/vmlinuz-VERSION`.
    fn find(root: &Path) -> std::result::Result<Kernel, String> {
        let modules_root = root.join("lib/modules");
        let entries = std::fs::read_dir(&modules_root)
            .map_err(|err| format!("cannot list {}: {err}", modules_root.display()))?;
        let versions: Vec<String> = entries
            .filter_map(|entry| Some(entry.ok()?.file_name().to_string_lossy().into_owned()))
            .collect();
        let [version] = versions.as_slice() else {
            return Err(format!(
                "expected one kernel version in {}, found {versions:?}",
                modules_root.display()
            ));
        };
        let vmlinuz = root.join(format!("boot/vmlinuz-{version}"));
        if !vmlinuz.is_file() {
            return Err(format!("the kernel package has no {}", vmlinuz.display()));
        }
        Ok(Kernel {
            version: version.clone(),
            vmlinuz,
            modules: modules_root.join(version),
        })
    }

    /// `roots` and the modules they depend on (from each module's `.modinfo`), dependencies
    /// first, decompressed; built-in ones are left out. `busybox` unpacks `.ko.xz` when xz-utils
    /// is not installed.
    fn load_order(
        &self,
        roots: &[&str],
        busybox: &Path,
    ) -> std::result::Result<Vec<Module>, String> {
        let mut files = BTreeMap::new();
        index_modules(&self.modules.join("kernel"), &mut files)?;
        let builtin = std::fs::read_to_string(self.modules.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.rsplit('/').next())
            .map(module_name)
            .collect();
        let mut walk = ModuleWalk {
            files,
            builtin,
            busybox,
            order: Vec::new(),
            visiting: BTreeSet::new(),
        };
        for root in roots {
            walk.visit(&module_name(root))?;
        }
        Ok(walk.order)
    }
}

/// A module's name from its file name: `virtio-rng.ko.xz` -> `virtio_rng`.
fn module_name(file: &str) -> String {
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Every `*.ko[.xz|.gz|.zst]` under `dir`, by module name.
fn index_modules(
    dir: &Path,
    index: &mut BTreeMap<String, PathBuf>,
) -> std::result::Result<(), String> {
    let entries =
        std::fs::read_dir(dir).map_err(|err| format!("cannot list {}: {err}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|err| format!("cannot list {}: {err}", dir.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|err| format!("cannot stat {}: {err}", path.display()))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if kind.is_dir() {
            index_modules(&path, index)?;
        } else if [".ko", ".ko.xz", ".ko.gz", ".ko.zst"]
            .iter()
            .any(|suffix| file.ends_with(suffix))
        {
            index.insert(module_name(&file), path);
        }
    }
    Ok(())
}

/// Depth-first walk of module dependencies.
struct ModuleWalk<'a> {
    /// Module files by name.
    files: BTreeMap<String, PathBuf>,
    /// Names of the modules built into the kernel.
    builtin: BTreeSet<String>,
    busybox: &'a Path,
    order: Vec<Module>,
    /// On the current path, to refuse loops.
    visiting: BTreeSet<String>,
}

impl ModuleWalk<'_> {
    /// Adds `name`'s dependencies, then `name`.
    fn visit(&mut self, name: &str) -> std::result::Result<(), String> {
        if self.builtin.contains(name) || self.order.iter().any(|module| module.name == name) {
            return Ok(());
        }
        if !self.visiting.insert(name.to_string()) {
            return Err(format!("module dependencies loop through {name}"));
        }
        let path = self.files.get(name).ok_or_else(|| {
            format!("the kernel package has no module {name} (and it is not built in)")
        })?;
        let bytes = decompress_module(path, self.busybox)?;
        for dependency in modinfo_depends(&bytes) {
            self.visit(&dependency)?;
        }
        self.visiting.remove(name);
        self.order.push(Module {
            name: name.to_string(),
            bytes,
        });
        Ok(())
    }
}

/// A module file as `insmod` wants it: decompressed (busybox's insmod may not read .xz).
fn decompress_module(path: &Path, busybox: &Path) -> std::result::Result<Vec<u8>, String> {
    let bytes = read(path)?;
    let file = path.to_string_lossy();
    if file.ends_with(".ko") {
        Ok(bytes)
    } else if file.ends_with(".ko.gz") {
        filter(Command::new("gzip").args(["-d", "-c"]), &bytes)
    } else if file.ends_with(".ko.zst") {
        filter(Command::new("zstd").args(["-d", "-c", "-q"]), &bytes)
            .map_err(|err| format!("{err} (decompressing {}: install zstd)", path.display()))
    } else {
        // .ko.xz: xz-utils if installed, else the unxz applet of the busybox just unpacked.
        filter(Command::new("xz").args(["-d", "-c"]), &bytes)
            .or_else(|_| filter(Command::new(busybox).args(["unxz", "-c"]), &bytes))
            .map_err(|err| format!("{err} (decompressing {})", path.display()))
    }
}

/// The `depends=` list of a module's `.modinfo` (NUL-separated `key=value` strings).
fn modinfo_depends(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|byte| *byte == 0)
        .filter_map(|field| field.strip_prefix(b"depends="))
        .flat_map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(module_name)
                .collect::<Vec<_>>()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// qemu-guest-agent

/// Downloads qemu-guest-agent and its library packages, and adds qemu-ga, the libraries its ELF
/// headers need (transitively) and the dynamic loader to `image`.
fn add_agent(apt: &mut Apt, scratch: &Path, image: &mut Cpio) -> std::result::Result<(), String> {
    let depends = stdout_of(Command::new("apt-cache").args([
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
        AGENT_PACKAGE,
    ]))
    .ok_or_else(|| format!("`apt-cache depends {AGENT_PACKAGE}` failed"))?;
    let libraries = library_closure(&depends, AGENT_PACKAGE);
    println!("xtask: library packages: {}", libraries.join(" "));
    let mut packages = vec![AGENT_PACKAGE];
    packages.extend(libraries.iter().map(String::as_str));
    apt.download(&packages)?;
    let root = scratch.join("agent");
    for package in &packages {
        apt.extract(package, &root)?;
    }
    let binary = root.join(AGENT_BINARY);
    let program = read(&binary)?;
    let elf = ElfDeps::parse(&program).map_err(|err| format!("{}: {err}", binary.display()))?;
    let interpreter = elf
        .interpreter
        .clone()
        .ok_or_else(|| format!("{} names no dynamic loader", binary.display()))?;
    let interpreter_rel = interpreter.trim_start_matches('/');
    let loader = resolve_in_root(&root, Path::new(interpreter_rel)).ok_or_else(|| {
        format!("the dynamic loader {interpreter} is in none of the downloaded packages")
    })?;

    // Breadth-first over DT_NEEDED.
    let mut libraries: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut queue: Vec<String> = elf.needed;
    while let Some(soname) = queue.pop() {
        if libraries.contains_key(&soname) {
            continue;
        }
        let path = find_library(&root, &soname).ok_or_else(|| {
            format!(
                "qemu-ga needs {soname}, which none of the downloaded packages ({}) has",
                packages.join(" ")
            )
        })?;
        let bytes = read(&path)?;
        let deps = ElfDeps::parse(&bytes).map_err(|err| format!("{}: {err}", path.display()))?;
        queue.extend(deps.needed);
        libraries.insert(soname, bytes);
    }
    println!(
        "xtask: qemu-ga needs {} (loader {interpreter})",
        libraries.keys().cloned().collect::<Vec<_>>().join(" ")
    );
    // libc needs the loader by soname too: then one copy, and PT_INTERP's path links to it.
    let loader_name = Path::new(interpreter_rel)
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let loader_copy = if libraries.contains_key(&loader_name) {
        None
    } else {
        Some(read(&loader)?)
    };
    // Nothing fails from here on: the image gets all of the agent or none of it.
    match loader_copy {
        Some(bytes) => image.file(interpreter_rel, 0o755, bytes),
        None => image.symlink(interpreter_rel, &format!("/{LIB_DIR}/{loader_name}")),
    }
    for (soname, bytes) in libraries {
        image.file(&format!("{LIB_DIR}/{soname}"), 0o755, bytes);
    }
    image.file(AGENT_BINARY, 0o755, program);
    Ok(())
}

/// A shared library by soname in the extracted packages under `root`.
fn find_library(root: &Path, soname: &str) -> Option<PathBuf> {
    LIB_SEARCH
        .iter()
        .find_map(|dir| resolve_in_root(root, &Path::new(dir).join(soname)))
}

/// Follows symlinks with `root` as `/` (packages ship absolute links such as
/// `/lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2`); the regular
/// file it ends at.
fn resolve_in_root(root: &Path, relative: &Path) -> Option<PathBuf> {
    let mut path = root.join(relative);
    for _ in 0..16 {
        let metadata = std::fs::symlink_metadata(&path).ok()?;
        if metadata.is_file() {
            return Some(path);
        }
        if !metadata.file_type().is_symlink() {
            return None;
        }
        let target = std::fs::read_link(&path).ok()?;
        path = match target.strip_prefix("/") {
            Ok(inside) => root.join(inside),
            Err(_) => path.parent()?.join(target),
        };
    }
    None
}

/// What a dynamically linked ELF file asks of the loader.
#[derive(Debug, Default, PartialEq)]
struct ElfDeps {
    /// PT_INTERP, e.g. `/lib64/ld-linux-x86-64.so.2` (programs only).
    interpreter: Option<String>,
    /// DT_NEEDED sonames, in order.
    needed: Vec<String>,
}

impl ElfDeps {
    /// Reads PT_INTERP and the DT_NEEDED entries of a 64-bit little-endian ELF file.
    fn parse(bytes: &[u8]) -> std::result::Result<ElfDeps, String> {
        if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
            return Err("not an ELF file".into());
        }
        if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
            return Err("not a 64-bit little-endian ELF file".into());
        }
        let phoff = le_u64(bytes, 0x20)?;
        let phentsize = u64::from(le_u16(bytes, 0x36)?);
        let phnum = le_u16(bytes, 0x38)?;
        struct Segment {
            kind: u32,
            offset: u64,
            vaddr: u64,
            filesz: u64,
        }
        let mut segments = Vec::new();
        for index in 0..u64::from(phnum) {
            let at = index
                .checked_mul(phentsize)
                .and_then(|rel| rel.checked_add(phoff))
                .ok_or("program header offset overflows")?;
            segments.push(Segment {
                kind: le_u32(bytes, at)?,
                offset: le_u64(bytes, at.saturating_add(8))?,
                vaddr: le_u64(bytes, at.saturating_add(16))?,
                filesz: le_u64(bytes, at.saturating_add(32))?,
            });
        }
        let mut deps = ElfDeps::default();
        if let Some(interp) = segments.iter().find(|segment| segment.kind == 3) {
            deps.interpreter = Some(c_string(bytes, interp.offset)?);
        }
        let Some(dynamic) = segments.iter().find(|segment| segment.kind == 2) else {
            return Ok(deps); // static
        };
        let mut needed_offsets = Vec::new();
        let mut strtab = None;
        let mut at = dynamic.offset;
        let end = dynamic.offset.saturating_add(dynamic.filesz);
        while at.saturating_add(16) <= end {
            let tag = le_u64(bytes, at)?;
            let value = le_u64(bytes, at.saturating_add(8))?;
            match tag {
                0 => break,
                1 => needed_offsets.push(value),
                5 => strtab = Some(value),
                _ => {}
            }
            at += 16;
        }
        if needed_offsets.is_empty() {
            return Ok(deps);
        }
        let strtab = strtab.ok_or("DT_NEEDED without DT_STRTAB")?;
        let strtab_offset = segments
            .iter()
            .filter(|segment| segment.kind == 1)
            .find(|segment| strtab >= segment.vaddr && strtab - segment.vaddr < segment.filesz)
            .map(|segment| strtab - segment.vaddr + segment.offset)
            .ok_or("DT_STRTAB is in no loaded segment")?;
        for offset in needed_offsets {
            let at = strtab_offset
                .checked_add(offset)
                .ok_or("DT_NEEDED offset overflows")?;
            deps.needed.push(c_string(bytes, at)?);
        }
        Ok(deps)
    }
}

fn field<const N: usize>(bytes: &[u8], at: u64) -> std::result::Result<[u8; N], String> {
    let start = usize::try_from(at).map_err(|_| "offset too large")?;
    bytes
        .get(start..)
        .and_then(|rest| rest.get(..N))
        .and_then(|slice| <[u8; N]>::try_from(slice).ok())
        .ok_or_else(|| format!("truncated ELF file (offset {at})"))
}

fn le_u16(bytes: &[u8], at: u64) -> std::result::Result<u16, String> {
    field(bytes, at).map(u16::from_le_bytes)
}

fn le_u32(bytes: &[u8], at: u64) -> std::result::Result<u32, String> {
    field(bytes, at).map(u32::from_le_bytes)
}

fn le_u64(bytes: &[u8], at: u64) -> std::result::Result<u64, String> {
    field(bytes, at).map(u64::from_le_bytes)
}

/// The NUL-terminated string at `at`.
fn c_string(bytes: &[u8], at: u64) -> std::result::Result<String, String> {
    let start = usize::try_from(at).map_err(|_| "offset too large")?;
    let rest = bytes
        .get(start..)
        .ok_or_else(|| format!("string offset {at} is past the end of the ELF file"))?;
    let end = rest
        .iter()
        .position(|byte| *byte == 0)
        .ok_or_else(|| format!("unterminated string at offset {at}"))?;
    let text = rest.get(..end).unwrap_or_default();
    String::from_utf8(text.to_vec()).map_err(|_| format!("string at offset {at} is not UTF-8"))
}

// ---------------------------------------------------------------------------------------------
// /init

/// The guest's `/init` (busybox sh). See the module documentation for what it does.
fn init_script(kernel_version: &str, modules: &[String]) -> String {
    let modules = modules.join(" ");
    format!(
        r#"#!/bin/sh
# snapctl test guest: generated by `cargo xtask guest` (xtask/src/guest.rs).
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
[ -c /dev/ttyS0 ] && exec </dev/null >/dev/ttyS0 2>&1
mkdir -p /dev/pts /run /tmp
mount -t tmpfs -o mode=1777 tmpfs /tmp

for m in {modules}; do
    insmod /lib/modules/{kernel_version}/$m.ko || echo "guest: insmod $m failed"
done

# devtmpfs has /dev/vportNpM; udev would add /dev/virtio-ports/NAME (the name arrives from the
# host after the port appears).
link_ports() {{
    for port in /sys/class/virtio-ports/*; do
        [ -r "$port/name" ] || continue
        name=$(cat "$port/name")
        [ -n "$name" ] || continue
        mkdir -p /dev/virtio-ports
        ln -sf "../${{port##*/}}" "/dev/virtio-ports/$name"
    done
}}

# Virtio device ids in /sys/bus/virtio/devices/*/device: 0x0002 block, 0x0003 console.
has_virtio() {{
    grep -qx "$1" /sys/bus/virtio/devices/*/device 2>/dev/null
}}

# Wait (up to 5 s) for the disk and the agent's port, if the machine has such devices at all.
disk={disk}
agent_port=/dev/virtio-ports/{agent_port}
i=0
while [ $i -lt 50 ]; do
    link_ports
    {{ [ -b $disk ] || ! has_virtio 0x0002; }} && {{ [ -e $agent_port ] || ! has_virtio 0x0003; }} && break
    sleep 0.1
    i=$((i + 1))
done

if [ ! -x /usr/sbin/qemu-ga ]; then
    echo "guest: no qemu-ga in this guest"
elif [ ! -e $agent_port ]; then
    echo "guest: no virtio-serial port {agent_port}; qemu-ga not started"
else
    /usr/sbin/qemu-ga -m virtio-serial -p $agent_port -t /run -f /run/qemu-ga.pid &
    echo "guest: qemu-ga started on $agent_port"
fi

if [ -b $disk ]; then
    echo "guest: writing the counter to sector 0 of $disk"
else
    echo "guest: no $disk: counting on the console only"
fi

# The counter lives in RAM only: it is 1 at every boot. The disk is written before the console
# line, so a console line "counter N" means that sector 0 already holds N (or more).
n=0
failed=0
while :; do
    n=$((n + 1))
    if [ -b $disk ]; then
        if printf 'counter %d\n' $n |
            dd of=$disk bs=512 count=1 conv=sync,notrunc,fsync oflag=direct 2>/dev/null; then
            failed=0
        elif [ $failed = 0 ]; then
            echo "guest: writing $disk failed"
            failed=1
        fi
    fi
    echo "counter $n"
    sleep 0.1
done
"#,
        disk = GUEST_DISK,
        agent_port = AGENT_PORT,
    )
}

// ---------------------------------------------------------------------------------------------
// cpio

/// A newc ("070701") cpio archive as the kernel's initramfs unpacker reads it. Entries are kept
/// by path and written sorted, so every directory comes before what it contains; missing parent
/// directories are added.
#[derive(Debug, Default)]
struct Cpio {
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    /// Full st_mode (type and permissions).
    mode: u32,
    data: Vec<u8>,
    rdev: (u32, u32),
}

const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl Cpio {
    fn dir(&mut self, path: &str, permissions: u32) {
        self.add(path, S_IFDIR | permissions, Vec::new(), (0, 0));
    }

    fn file(&mut self, path: &str, permissions: u32, data: Vec<u8>) {
        self.add(path, S_IFREG | permissions, data, (0, 0));
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.add(path, S_IFLNK | 0o777, target.as_bytes().to_vec(), (0, 0));
    }

    fn char_device(&mut self, path: &str, permissions: u32, major: u32, minor: u32) {
        self.add(path, S_IFCHR | permissions, Vec::new(), (major, minor));
    }

    fn add(&mut self, path: &str, mode: u32, data: Vec<u8>, rdev: (u32, u32)) {
        let path = path.trim_matches('/').to_string();
        let mut parent = Path::new(&path).parent();
        while let Some(dir) = parent.filter(|dir| !dir.as_os_str().is_empty()) {
            self.entries
                .entry(dir.to_string_lossy().into_owned())
                .or_insert(Entry {
                    mode: S_IFDIR | 0o755,
                    data: Vec::new(),
                    rdev: (0, 0),
                });
            parent = dir.parent();
        }
        self.entries.insert(path, Entry { mode, data, rdev });
    }

    /// The archive, with its trailer.
    fn finish(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (inode, (path, entry)) in (1..).zip(&self.entries) {
            let nlink = if entry.mode & S_IFMT == S_IFDIR { 2 } else { 1 };
            write_entry(
                &mut out,
                path,
                inode,
                entry.mode,
                nlink,
                &entry.data,
                entry.rdev,
            );
        }
        write_entry(&mut out, "TRAILER!!!", 0, 0, 1, &[], (0, 0));
        out
    }
}

fn write_entry(
    out: &mut Vec<u8>,
    name: &str,
    inode: u32,
    mode: u32,
    nlink: u32,
    data: &[u8],
    rdev: (u32, u32),
) {
    let fields = [
        inode,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime: reproducible archives
        u32::try_from(data.len()).unwrap_or(u32::MAX),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for value in fields {
        out.extend_from_slice(format!("{value:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_options(&args(&[])).ok(),
            Some(Options {
                force: false,
                agent: true
            })
        );
        assert_eq!(
            parse_options(&args(&["--force", "--no-agent"])).ok(),
            Some(Options {
                force: true,
                agent: false
            })
        );
        assert!(matches!(
            parse_options(&args(&["--bogus"])),
            Err(Failure::Usage(_))
        ));
    }

    #[test]
    fn kernel_resolution() {
        let madison = "linux-image-amd64 | 6.12.95-1~bpo12+1 | http://deb.debian.org/debian bookworm-backports/main amd64 Packages\n\
linux-image-amd64 |  6.1.192-2 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages\n\
linux-image-amd64 |  6.1.176-1 | http://deb.debian.org/debian bookworm/main amd64 Packages\n";
        assert_eq!(
            series_versions(madison, "6.1."),
            vec!["6.1.192-2".to_string(), "6.1.176-1".to_string()]
        );
        let show = "Package: linux-image-amd64\nVersion: 6.1.192-2\n\
Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\nDescription: Linux\n";
        assert_eq!(
            kernel_dependency(show).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let names = "linux-image-6.1.0-9-amd64\nlinux-image-6.1.0-56-amd64-dbg\n\
linux-image-6.1.0-56-cloud-amd64\nlinux-image-6.1.0-47-amd64\nlinux-image-6.1.0-47-amd64-unsigned\n";
        assert_eq!(
            newest_kernel_name(names).as_deref(),
            Some("linux-image-6.1.0-47-amd64")
        );
        assert_eq!(kernel_abi("linux-image-6.1.0-56-rt-amd64"), None);
    }

    #[test]
    fn library_closure_follows_lib_packages_and_first_alternatives() {
        let depends = [
            "qemu-guest-agent",
            "  Depends: libc6",
            "  Depends: libglib2.0-0",
            "  Depends: init-system-helpers",
            " |Depends: <virtual-lib>",
            "    libfoo1",
            " |Depends: libfoo1",
            "  Depends: libbar1",
            "libc6",
            "  Depends: libgcc-s1",
            "  Breaks: <libc6-bad>",
            "libglib2.0-0",
            "  PreDepends: libpcre2-8-0",
            "  Depends: <perl:any>",
            "init-system-helpers",
            "  Depends: libperl5.36",
            "libgcc-s1",
            "  Depends: gcc-12-base",
            "libfoo1",
            "libbar1",
            "  Depends: libnever",
        ]
        .join("\n");
        assert_eq!(
            library_closure(&depends, "qemu-guest-agent"),
            vec![
                "libc6",
                "libfoo1",
                "libgcc-s1",
                "libglib2.0-0",
                "libpcre2-8-0"
            ]
        );
    }

    #[test]
    fn modinfo_dependencies() {
        let modinfo =
            b"\0license=GPL\0depends=virtio_ring,virtio-pci-modern-dev,virtio\0intree=Y\0";
        assert_eq!(
            modinfo_depends(modinfo),
            vec!["virtio_ring", "virtio_pci_modern_dev", "virtio"]
        );
        assert!(modinfo_depends(b"\0depends=\0name=x\0").is_empty());
        assert_eq!(module_name("virtio-rng.ko.xz"), "virtio_rng");
    }

    #[test]
    fn elf_of_this_test_binary() {
        // The test binary is a dynamically linked x86_64/aarch64 ELF program that needs libc.
        let Ok(bytes) = std::fs::read("/proc/self/exe") else {
            return;
        };
        let deps = ElfDeps::parse(&bytes);
        let Ok(deps) = deps else {
            panic!("cannot parse /proc/self/exe: {deps:?}");
        };
        assert!(deps.interpreter.is_some_and(|path| path.contains("ld-")));
        assert!(deps.needed.iter().any(|name| name.starts_with("libc.so")));
        assert!(ElfDeps::parse(b"#!/bin/sh\n").is_err());
        assert!(ElfDeps::parse(b"\x7fELF\x02\x01\x01").is_err());
    }

    #[test]
    fn cpio_layout() {
        let mut cpio = Cpio::default();
        cpio.file("a/b/c", 0o644, b"hello".to_vec());
        cpio.symlink("a/l", "b/c");
        cpio.char_device("dev/console", 0o600, 5, 1);
        let bytes = cpio.finish();
        assert_eq!(bytes.len() % 4, 0);
        // Walk the archive back.
        let mut names = Vec::new();
        let mut at = 0;
        loop {
            let header = &bytes[at..at + 110];
            assert_eq!(&header[..6], b"070701");
            let hex = |index: usize| {
                let start = 6 + index * 8;
                u32::from_str_radix(
                    std::str::from_utf8(&header[start..start + 8]).unwrap_or(""),
                    16,
                )
                .unwrap_or(u32::MAX) as usize
            };
            let (mode, size, namesize) = (hex(1), hex(6), hex(11));
            let name = std::str::from_utf8(&bytes[at + 110..at + 110 + namesize - 1])
                .unwrap_or("")
                .to_string();
            let data_at = (at + 110 + namesize + 3) & !3;
            if name == "a/b/c" {
                assert_eq!(&bytes[data_at..data_at + size], b"hello");
                assert_eq!(mode as u32, S_IFREG | 0o644);
            }
            if name == "dev/console" {
                assert_eq!((hex(9), hex(10)), (5, 1));
            }
            at = (data_at + size + 3) & !3;
            names.push(name);
            if names.last().map(String::as_str) == Some("TRAILER!!!") {
                break;
            }
        }
        assert_eq!(at, bytes.len());
        assert_eq!(
            names,
            vec![
                "a",
                "a/b",
                "a/b/c",
                "a/l",
                "dev",
                "dev/console",
                "TRAILER!!!"
            ]
        );
    }

    #[test]
    fn init_script_mentions_every_module_in_order() {
        let modules = ["virtio_ring", "virtio", "virtio_blk"].map(String::from);
        let script = init_script("6.1.0-56-amd64", &modules);
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.contains("for m in virtio_ring virtio virtio_blk; do"));
        assert!(script.contains("/lib/modules/6.1.0-56-amd64/$m.ko"));
        assert!(script.contains("/dev/virtio-ports/org.qemu.guest_agent.0"));
    }
}
