//! System tools the workflows need, and installing them with apt when we are root.
//!
//! QEMU's tools must be version 10 or newer. Debian 12 (bookworm) ships 7.2 in its main suites, and
//! installing `qemu-utils` from there would replace a newer backports build, so on bookworm we add the
//! bookworm-backports suite (same mirror as the main suites) and install from it with
//! `-t bookworm-backports`. apt runs with `--no-remove`: it may add and upgrade, never remove.
//!
//! QEMU's system emulator (`qemu-system-x86_64`, package `qemu-system-x86`, also >= 10) is optional:
//! the tests that attach a disk to a real QEMU machine skip without it. It comes from the same
//! suite as the tools; before installing, apt's plan is simulated and refused if it would remove
//! anything or bring any QEMU package older than 10 (bookworm's own 7.2 would replace qemu-utils 10).

use crate::proc::{capture, run, stdout_of};
use crate::{Failure, Result};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// A tool found on PATH, the Debian package that ships it and the oldest major version we accept.
struct Tool {
    binary: &'static str,
    package: &'static str,
    min_major: u32,
}

const QEMU_TOOLS: [Tool; 3] = [
    Tool {
        binary: "qemu-img",
        package: "qemu-utils",
        min_major: 10,
    },
    Tool {
        binary: "qemu-io",
        package: "qemu-utils",
        min_major: 10,
    },
    Tool {
        binary: "qemu-storage-daemon",
        package: "qemu-utils",
        min_major: 10,
    },
];

/// QEMU's x86 system emulator, for the tests that run a disk on a virtio-blk device of a real
/// machine. Optional: installed best effort, the tests skip without it.
const QEMU_SYSTEM: [Tool; 1] = [Tool {
    binary: "qemu-system-x86_64",
    package: "qemu-system-x86",
    min_major: 10,
}];

/// Independent VHD readers the snap-backend-vhd tests compare against (libvhdi's `vhdiinfo` and
/// its Python binding `pyvhdi`), and lvm2, which the snap-backend-lvm tests run on loop devices:
/// Debian packages, any version, from the main suites.
const VHD_PEER_PACKAGES: [&str; 3] = ["libvhdi-utils", "python3-libvhdi", "lvm2"];

/// Debian releases whose main suites carry a QEMU older than 10: install from their backports.
const NEEDS_BACKPORTS: [&str; 1] = ["bookworm"];

/// GNU time, for per-process peak RSS in `cargo xtask bench`.
pub const GNU_TIME: &str = "/usr/bin/time";

/// Makes sure qemu-img, qemu-io and qemu-storage-daemon >= 10 are installed: installs them when root,
/// otherwise says what to install and fails. Then, best effort, qemu-system-x86_64 >= 10 (see
/// [`ensure_qemu_system`]), checking afterwards that the tools are still >= 10.
pub fn ensure_qemu_tools() -> Result {
    ensure_vhd_peers();
    ensure_required_qemu()?;
    ensure_qemu_system();
    let still = unmet(&QEMU_TOOLS);
    if still.is_empty() {
        Ok(())
    } else {
        Err(Failure::Failed(format!(
            "after installing qemu-system-x86: {} (need version >= 10)",
            still.join(", ")
        )))
    }
}

/// The backports suite to install QEMU from, on Debian releases whose main suites are too old.
fn backports_suite() -> Option<String> {
    debian_codename()
        .filter(|name| NEEDS_BACKPORTS.contains(&name.as_str()))
        .map(|name| format!("{name}-backports"))
}

/// How to install `packages` by hand (for messages when we are not root).
fn install_hint(packages: &[&str], backports: Option<&str>) -> String {
    match backports {
        Some(suite) => format!(
            "add the {suite} suite to apt's sources, then `apt-get install --no-install-recommends -t {suite} {}`",
            packages.join(" ")
        ),
        None => format!(
            "`apt-get install --no-install-recommends {}`",
            packages.join(" ")
        ),
    }
}

/// qemu-img, qemu-io and qemu-storage-daemon >= 10, installed when root; an error otherwise.
fn ensure_required_qemu() -> Result {
    let missing = unmet(&QEMU_TOOLS);
    if missing.is_empty() {
        println!("xtask: {}", describe(&QEMU_TOOLS));
        return Ok(());
    }
    let mut packages: Vec<&str> = QEMU_TOOLS.iter().map(|tool| tool.package).collect();
    packages.dedup();
    let backports = backports_suite();
    if !is_root() {
        return Err(Failure::Failed(format!(
            "{} (need version >= 10). As root: {}, or run this command as root to do it for you.",
            describe(&QEMU_TOOLS),
            install_hint(&packages, backports.as_deref())
        )));
    }
    println!(
        "xtask: {}; installing {}",
        missing.join(", "),
        packages.join(" ")
    );
    if let Some(suite) = &backports {
        ensure_suite(suite)?;
    }
    apt_install(&packages, backports.as_deref())?;
    let still = unmet(&QEMU_TOOLS);
    if still.is_empty() {
        println!("xtask: {}", describe(&QEMU_TOOLS));
        Ok(())
    } else {
        Err(Failure::Failed(format!(
            "after installing {}: {} (need version >= 10)",
            packages.join(" "),
            still.join(", ")
        )))
    }
}

/// qemu-system-x86_64 >= 10 for the tests that attach a disk to a real QEMU machine: installed
/// when root and missing or too old. Best effort: on failure says why, and those tests skip.
fn ensure_qemu_system() {
    let missing = unmet(&QEMU_SYSTEM);
    if missing.is_empty() {
        println!("xtask: {}", describe(&QEMU_SYSTEM));
        return;
    }
    let packages = [QEMU_SYSTEM[0].package];
    let backports = backports_suite();
    if !is_root() {
        println!(
            "xtask: {} (need version >= 10; the QEMU guest tests will skip). As root: {}",
            missing.join(", "),
            install_hint(&packages, backports.as_deref())
        );
        return;
    }
    println!(
        "xtask: {}; installing {}",
        missing.join(", "),
        packages.join(" ")
    );
    match install_qemu_system(&packages, backports.as_deref()) {
        Ok(()) => println!("xtask: {}", describe(&QEMU_SYSTEM)),
        Err(message) => println!(
            "xtask: could not install {} >= 10 ({message}); the QEMU guest tests will skip",
            packages.join(" ")
        ),
    }
}

/// Installs `packages` (qemu-system-x86) from `backports` (added if needed) after checking apt's
/// simulated plan: nothing removed, no QEMU package older than 10. Then checks the emulator's
/// version.
fn install_qemu_system(
    packages: &[&str],
    backports: Option<&str>,
) -> std::result::Result<(), String> {
    if let Some(suite) = backports {
        ensure_suite(suite)?;
    }
    apt_update_once()?;
    let simulation = capture(apt_get_install(packages, backports).arg("-s"))?;
    let plan = String::from_utf8_lossy(&simulation.stdout);
    if !simulation.status.success() {
        let errors = String::from_utf8_lossy(&simulation.stderr);
        return Err(format!(
            "apt cannot plan it: {}",
            errors
                .lines()
                .filter(|line| !line.trim().is_empty())
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    check_qemu_plan(&plan)?;
    apt_install(packages, backports)?;
    match unmet(&QEMU_SYSTEM).as_slice() {
        [] => Ok(()),
        still => Err(format!("after installing: {}", still.join(", "))),
    }
}

/// Refuses an `apt-get install -s` plan that removes a package or installs a QEMU package whose
/// upstream version is older than 10.
fn check_qemu_plan(plan: &str) -> std::result::Result<(), String> {
    let mut installs_emulator = false;
    for line in plan.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Remv") => return Err(format!("apt would remove a package: {line}")),
            Some("Inst") => {}
            _ => continue,
        }
        let Some(package) = words.next() else {
            continue;
        };
        // "Inst NAME [INSTALLED] (CANDIDATE SUITE [ARCH])"
        let candidate = line
            .split_once('(')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if !package.starts_with("qemu") {
            continue;
        }
        match candidate.and_then(debian_upstream_major) {
            Some(major) if major >= 10 => {}
            _ => return Err(format!("apt would install an old QEMU: {line}")),
        }
        installs_emulator |= package == QEMU_SYSTEM[0].package;
    }
    if installs_emulator {
        Ok(())
    } else {
        Err(format!(
            "apt's plan does not install {}",
            QEMU_SYSTEM[0].package
        ))
    }
}

/// The upstream major version of a Debian version string: 10 for "1:10.0.2+ds-2+deb13u1~bpo12+1".
fn debian_upstream_major(version: &str) -> Option<u32> {
    let upstream = version.split_once(':').map_or(version, |(_, rest)| rest);
    upstream
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Installs the libvhdi packages (see [`VHD_PEER_PACKAGES`]) when missing and root. Best effort:
/// the VHD interop tests skip with a note when the tools are absent.
fn ensure_vhd_peers() {
    let missing: Vec<&str> = VHD_PEER_PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            !stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .is_some_and(|status| status.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return;
    }
    if !is_root() {
        println!(
            "xtask: {} not installed (VHD interop tests will skip); as root: `apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
        return;
    }
    println!("xtask: installing {}", missing.join(" "));
    if let Err(message) = apt_install(&missing, None) {
        println!(
            "xtask: could not install {} ({message}); VHD interop tests will skip",
            missing.join(" ")
        );
    }
}

/// The Debian packages snap-orchestrator's `xen` feature builds against: libxenlight's and
/// libxentoollog's headers, libraries and pkg-config files, and pkg-config itself.
const XEN_DEV_PACKAGES: [&str; 2] = ["libxen-dev", "pkg-config"];

/// Whether libxenlight can be built against (`pkg-config --exists xenlight`).
fn has_xenlight() -> bool {
    Command::new("pkg-config")
        .args(["--exists", "xenlight", "xentoollog"])
        .status()
        .is_ok_and(|status| status.success())
}

/// Makes sure libxen-dev is installed for the `xen` feature of snap-orchestrator: installs it
/// when root. Ok(false) when it is missing and we are not root (the Xen build and tests are
/// then skipped with a note); an error when installing it failed.
pub fn ensure_xen_dev() -> Result<bool> {
    if has_xenlight() {
        println!("xtask: libxenlight found (the `xen` feature is built and tested)");
        return Ok(true);
    }
    if !is_root() {
        println!(
            "xtask: libxenlight is not installed, so the `xen` feature is not built or tested. \
             As root: `apt-get install {}`",
            XEN_DEV_PACKAGES.join(" ")
        );
        return Ok(false);
    }
    println!("xtask: installing {}", XEN_DEV_PACKAGES.join(" "));
    apt_install(&XEN_DEV_PACKAGES, None).map_err(Failure::Failed)?;
    if has_xenlight() {
        Ok(true)
    } else {
        Err(Failure::Failed(format!(
            "after installing {}: pkg-config still finds no xenlight",
            XEN_DEV_PACKAGES.join(" ")
        )))
    }
}

/// The Ceph packages the RBD tests run a one-node cluster with (a monitor, a memstore OSD and
/// the rbd command), from the release's main suites, without recommends (about 10 s; they touch
/// no QEMU package).
const CEPH_PACKAGES: [&str; 3] = ["ceph-mon", "ceph-osd", "ceph-common"];

/// QEMU's rbd block driver (for `-blockdev driver=rbd` and `qemu-img ... rbd:`): a module that
/// must be exactly the installed QEMU's version.
const QEMU_RBD_PACKAGE: &str = "qemu-block-extra";

/// Whether the Ceph binaries the RBD tests use are installed.
fn has_ceph() -> bool {
    [
        "ceph-mon",
        "ceph-osd",
        "monmaptool",
        "osdmaptool",
        "ceph",
        "rbd",
    ]
    .iter()
    .all(|binary| {
        Command::new("sh")
            .args(["-c", &format!("command -v {binary}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Whether QEMU's tools have the rbd block driver.
fn qemu_has_rbd() -> bool {
    stdout_of(Command::new("qemu-img").arg("--help")).is_some_and(|help| help.contains(" rbd"))
}

/// The installed version of Debian package `package`.
fn installed_version(package: &str) -> Option<String> {
    stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Makes sure a one-node Ceph can run for the RBD tests: ceph-mon, ceph-osd and ceph-common
/// (main suites, `--no-install-recommends`), and qemu-block-extra at exactly the installed
/// qemu-utils' version (on bookworm that is in bookworm-backports: the exact version is asked
/// for, so nothing else comes from there). apt's plan is simulated first and refused if it
/// would remove anything or bring a QEMU package older than 10. Best effort: returns whether
/// everything is there (then the tests must not skip: `SNAPCTL_REQUIRE_CEPH`).
pub fn ensure_ceph() -> bool {
    if has_ceph() && qemu_has_rbd() {
        println!("xtask: Ceph (ceph-mon, ceph-osd, rbd) and QEMU's rbd driver found");
        return true;
    }
    let Some(qemu_version) = installed_version("qemu-utils") else {
        println!("xtask: qemu-utils is not installed; the RBD tests will skip");
        return false;
    };
    let mut packages: Vec<String> = CEPH_PACKAGES.iter().map(|p| p.to_string()).collect();
    packages.push(format!("{QEMU_RBD_PACKAGE}={qemu_version}"));
    let refs: Vec<&str> = packages.iter().map(String::as_str).collect();
    if !is_root() {
        println!(
            "xtask: Ceph or QEMU's rbd driver is missing (the RBD tests will skip). As root: {}",
            install_hint(&refs, None)
        );
        return false;
    }
    println!("xtask: installing {}", refs.join(" "));
    let installed = (|| {
        if let Some(suite) = backports_suite() {
            ensure_suite(&suite)?;
        }
        apt_update_once()?;
        let simulation = capture(apt_get_install(&refs, None).arg("-s"))?;
        if !simulation.status.success() {
            return Err(format!(
                "apt cannot plan it: {}",
                String::from_utf8_lossy(&simulation.stderr).trim()
            ));
        }
        check_ceph_plan(&String::from_utf8_lossy(&simulation.stdout))?;
        apt_install(&refs, None)
    })();
    if let Err(message) = installed {
        println!("xtask: could not install Ceph ({message}); the RBD tests will skip");
        return false;
    }
    let ok = has_ceph() && qemu_has_rbd();
    if !ok {
        println!(
            "xtask: Ceph or QEMU's rbd driver still missing after installing; the RBD tests will skip"
        );
    }
    ok
}

/// Refuses an `apt-get install -s` plan that removes a package or installs a QEMU package whose
/// upstream version is older than 10.
fn check_ceph_plan(plan: &str) -> std::result::Result<(), String> {
    for line in plan.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Remv"), _) => return Err(format!("apt would remove a package: {line}")),
            (Some("Inst"), Some(package)) if package.starts_with("qemu") => {
                let candidate = line
                    .split_once('(')
                    .and_then(|(_, rest)| rest.split_whitespace().next());
                if candidate
                    .and_then(debian_upstream_major)
                    .is_none_or(|major| major < 10)
                {
                    return Err(format!("apt would install an old QEMU: {line}"));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether GNU time is available for RSS measurements; installs package `time` when root.
pub fn ensure_gnu_time() -> bool {
    if Path::new(GNU_TIME).exists() {
        return true;
    }
    if !is_root() {
        println!(
            "xtask: {GNU_TIME} is missing (Debian package `time`); peak RSS will not be measured"
        );
        return false;
    }
    match apt_install(&["time"], None) {
        Ok(()) => Path::new(GNU_TIME).exists(),
        Err(message) => {
            println!("xtask: could not install `time` ({message}); peak RSS will not be measured");
            false
        }
    }
}

/// Whether we run as root (effective uid 0, from /proc/self/status).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("Uid:"))?;
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// One line per unmet requirement, e.g. "qemu-img 7.2.0 is too old".
fn unmet(tools: &[Tool]) -> Vec<String> {
    tools
        .iter()
        .filter_map(|tool| match tool_version(tool.binary) {
            None => Some(format!("{} is not installed", tool.binary)),
            Some((major, version)) if major < tool.min_major => {
                Some(format!("{} {version} is too old", tool.binary))
            }
            Some(_) => None,
        })
        .collect()
}

fn describe(tools: &[Tool]) -> String {
    let found: Vec<String> = tools
        .iter()
        .map(|tool| match tool_version(tool.binary) {
            Some((_, version)) => format!("{} {version}", tool.binary),
            None => format!("{} missing", tool.binary),
        })
        .collect();
    found.join(", ")
}

/// `(major, "10.0.2")` from `TOOL --version`.
fn tool_version(binary: &str) -> Option<(u32, String)> {
    parse_version(&stdout_of(Command::new(binary).arg("--version"))?)
}

/// Parses the first line of QEMU's `--version` output: "qemu-img version 10.0.2 (Debian ...)".
fn parse_version(text: &str) -> Option<(u32, String)> {
    let mut words = text.lines().next()?.split_whitespace();
    words.find(|word| *word == "version")?;
    let version = words.next()?;
    let major = version.split('.').next()?.parse().ok()?;
    Some((major, version.to_string()))
}

fn debian_codename() -> Option<String> {
    let release = std::fs::read_to_string("/etc/os-release").ok()?;
    let field = |key: &str| {
        release.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix('=')?;
            Some(value.trim_matches('"').to_string())
        })
    };
    (field("ID")? == "debian").then(|| field("VERSION_CODENAME"))?
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// `apt-get update`, once per xtask run (again after a suite was added).
fn apt_update_once() -> std::result::Result<(), String> {
    if !APT_UPDATED.swap(true, Ordering::SeqCst)
        && let Err(message) = run(Command::new("apt-get").args(["update", "-q"]))
    {
        APT_UPDATED.store(false, Ordering::SeqCst);
        return Err(message);
    }
    Ok(())
}

/// `apt-get install -y -q --no-install-recommends --no-remove [-t RELEASE] PACKAGES...`.
fn apt_get_install(packages: &[&str], target_release: Option<&str>) -> Command {
    let mut install = Command::new("apt-get");
    install.env("DEBIAN_FRONTEND", "noninteractive").args([
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "--no-remove",
    ]);
    if let Some(release) = target_release {
        install.args(["-t", release]);
    }
    install.args(packages);
    install
}

/// `apt-get install` (after one `apt-get update` per xtask run), adding and upgrading only.
fn apt_install(packages: &[&str], target_release: Option<&str>) -> std::result::Result<(), String> {
    apt_update_once()?;
    run(apt_get_install(packages, target_release))
}

const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

/// Adds apt suite `suite` (e.g. bookworm-backports) unless a source already names it, copying the
/// mirror, components and key of the release's main suite.
fn ensure_suite(suite: &str) -> std::result::Result<(), String> {
    let mut files = vec![Path::new(SOURCES_LIST).to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(SOURCES_DIR) {
        let mut listed: Vec<_> = entries
            .filter_map(|entry| Some(entry.ok()?.path()))
            .collect();
        listed.sort();
        files.extend(listed);
    }
    let sources: Vec<(String, String)> = files
        .iter()
        .filter(|path| {
            let name = path.to_string_lossy();
            name.ends_with(".list") || name.ends_with(".sources")
        })
        .filter_map(|path| {
            Some((
                path.to_string_lossy().into_owned(),
                std::fs::read_to_string(path).ok()?,
            ))
        })
        .collect();
    if sources.iter().any(|(_, text)| names_suite(text, suite)) {
        return Ok(());
    }
    let release = suite.trim_end_matches("-backports");
    let deb822 = sources
        .iter()
        .filter(|(path, _)| path.ends_with(".sources"))
        .find_map(|(_, text)| deb822_for_suite(text, release, suite));
    let (path, content) = match deb822 {
        Some(stanza) => (format!("{SOURCES_DIR}/{suite}.sources"), stanza),
        None => {
            let one_line = sources
                .iter()
                .filter(|(path, _)| path.ends_with(".list"))
                .find_map(|(_, text)| one_line_for_suite(text, release, suite));
            let line = one_line
                .unwrap_or_else(|| format!("deb http://deb.debian.org/debian {suite} main\n"));
            (format!("{SOURCES_DIR}/{suite}.list"), line)
        }
    };
    println!("xtask: adding apt suite {suite} in {path}:\n{content}");
    std::fs::write(&path, content).map_err(|err| format!("cannot write {path}: {err}"))?;
    // Package lists fetched earlier in this run do not know the new suite.
    APT_UPDATED.store(false, Ordering::SeqCst);
    Ok(())
}

/// Whether a sources file (one-line or deb822) enables `suite` on a line that is not a comment.
fn names_suite(text: &str, suite: &str) -> bool {
    text.lines()
        .map(str::trim_start)
        .filter(|line| !line.starts_with('#'))
        .any(|line| line.split_whitespace().any(|word| word == suite))
}

/// From deb822 sources, the stanza whose Suites include `release` (not a security mirror),
/// rewritten to name `suite` alone. Other fields (URIs, Components, Signed-By...) are kept.
fn deb822_for_suite(text: &str, release: &str, suite: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let fields: Vec<&str> = stanza
            .lines()
            .filter(|line| !line.trim_start().starts_with('#') && !line.trim().is_empty())
            .collect();
        let value = |key: &str| {
            fields.iter().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case(key)
                    .then_some(value.trim())
            })
        };
        let suites = value("Suites")?;
        let uris = value("URIs")?;
        if !suites.split_whitespace().any(|word| word == release) || uris.contains("security") {
            return None;
        }
        let mut out = String::new();
        for line in &fields {
            let is_suites = line
                .split_once(':')
                .is_some_and(|(name, _)| name.trim().eq_ignore_ascii_case("Suites"));
            if is_suites {
                out.push_str(&format!("Suites: {suite}\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        Some(out)
    })
}

/// From one-line sources, the `deb` line for `release` (not a security mirror), renamed to `suite`.
fn one_line_for_suite(text: &str, release: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() != Some(&"deb") || line.contains("security") {
            return None;
        }
        let at = words.iter().position(|word| *word == release)?;
        let renamed: Vec<&str> = words
            .iter()
            .enumerate()
            .map(|(index, word)| if index == at { suite } else { word })
            .collect();
        Some(format!("{}\n", renamed.join(" ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_versions() {
        let text = "qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025";
        assert_eq!(parse_version(text), Some((10, "10.0.2".to_string())));
        let old = "qemu-io version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u15)";
        assert_eq!(parse_version(old), Some((7, "7.2.15".to_string())));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn qemu_install_plans() {
        let good = "NOTE: This is only a simulation!\n\
Inst seabios (1.16.2-1 Debian:12.11/oldstable [all])\n\
Inst qemu-system-common (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:bookworm-backports [amd64])\n\
Inst qemu-system-x86 (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:bookworm-backports [amd64])\n\
Conf qemu-system-x86 (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:bookworm-backports [amd64])\n";
        assert_eq!(check_qemu_plan(good), Ok(()));
        let old =
            "Inst qemu-system-x86 (1:7.2+dfsg-7+deb12u18+b3 Debian:12.11/oldstable [amd64])\n";
        assert!(check_qemu_plan(old).is_err());
        let downgrade = "Inst qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1] (1:7.2+dfsg-7+deb12u18+b3 Debian:12.11/oldstable [amd64])\n\
Inst qemu-system-x86 (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:bookworm-backports [amd64])\n";
        assert!(check_qemu_plan(downgrade).is_err());
        let removes = "Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]\n\
Inst qemu-system-x86 (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:bookworm-backports [amd64])\n";
        assert!(check_qemu_plan(removes).is_err());
        assert!(check_qemu_plan("0 upgraded, 0 newly installed\n").is_err());
        assert_eq!(debian_upstream_major("1:10.0.2+ds-2"), Some(10));
        assert_eq!(debian_upstream_major("7.2+dfsg-7"), Some(7));
        assert_eq!(debian_upstream_major("x"), None);
    }

    #[test]
    fn ceph_install_plans() {
        let good = "Inst librbd1 (16.2.15+ds-0+deb12u2 Debian:12.15/oldstable [amd64])\n\
Inst ceph-mon (16.2.15+ds-0+deb12u2 Debian:12.15/oldstable [amd64])\n\
Inst qemu-block-extra (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])\n";
        assert_eq!(check_ceph_plan(good), Ok(()));
        let old =
            "Inst qemu-block-extra (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])\n";
        assert!(check_ceph_plan(old).is_err());
        let removes = "Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]\n";
        assert!(check_ceph_plan(removes).is_err());
    }

    #[test]
    fn deb822_stanza_becomes_backports() {
        let sources = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\
Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
        assert!(!names_suite(sources, "bookworm-backports"));
        let stanza = deb822_for_suite(sources, "bookworm", "bookworm-backports");
        assert_eq!(
            stanza.as_deref(),
            Some(
                "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            )
        );
        assert!(names_suite(
            stanza.as_deref().unwrap_or_default(),
            "bookworm-backports"
        ));
    }

    #[test]
    fn one_line_source_becomes_backports() {
        let sources = "# comment bookworm-backports\n\
deb http://security.debian.org/debian-security bookworm-security main\n\
deb [arch=amd64] http://deb.debian.org/debian bookworm main contrib\n";
        assert!(!names_suite(sources, "bookworm-backports"));
        assert_eq!(
            one_line_for_suite(sources, "bookworm", "bookworm-backports").as_deref(),
            Some("deb [arch=amd64] http://deb.debian.org/debian bookworm-backports main contrib\n")
        );
    }
}
