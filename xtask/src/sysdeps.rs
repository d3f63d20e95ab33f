//! System tools the workflows need, and installing them with apt when we are root.
//!
//! QEMU's tools must be version 10 or newer. Debian 12 (bookworm) ships 7.2 in its main suites, and
//! installing `qemu-utils` from there would replace a newer backports build, so on bookworm we add the
//! bookworm-backports suite (same mirror as the main suites) and install from it with
//! `-t bookworm-backports`. apt runs with `--no-remove`: it may add and upgrade, never remove.

use crate::proc::{run, stdout_of};
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

/// Independent VHD readers the snap-backend-vhd tests compare against (libvhdi's `vhdiinfo` and
/// its Python binding `pyvhdi`), and lvm2, which the snap-backend-lvm tests run on loop devices:
/// Debian packages, any version, from the main suites.
const VHD_PEER_PACKAGES: [&str; 3] = ["libvhdi-utils", "python3-libvhdi", "lvm2"];

/// Debian releases whose main suites carry a QEMU older than 10: install from their backports.
const NEEDS_BACKPORTS: [&str; 1] = ["bookworm"];

/// GNU time, for per-process peak RSS in `cargo xtask bench`.
pub const GNU_TIME: &str = "/usr/bin/time";

/// Makes sure qemu-img, qemu-io and qemu-storage-daemon >= 10 are installed: installs them when root,
/// otherwise says what to install and fails.
pub fn ensure_qemu_tools() -> Result {
    ensure_vhd_peers();
    let missing = unmet(&QEMU_TOOLS);
    if missing.is_empty() {
        println!("xtask: {}", describe(&QEMU_TOOLS));
        return Ok(());
    }
    let mut packages: Vec<&str> = QEMU_TOOLS.iter().map(|tool| tool.package).collect();
    packages.dedup();
    let codename = debian_codename();
    let backports = codename
        .as_deref()
        .filter(|name| NEEDS_BACKPORTS.contains(name))
        .map(|name| format!("{name}-backports"));
    if !is_root() {
        let how = match &backports {
            Some(suite) => format!(
                "add the {suite} suite to apt's sources, then `apt-get install -t {suite} {}`",
                packages.join(" ")
            ),
            None => format!("`apt-get install {}`", packages.join(" ")),
        };
        return Err(Failure::Failed(format!(
            "{} (need version >= 10). As root: {how}, or run this command as root to do it for you.",
            describe(&QEMU_TOOLS)
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

/// `apt-get install` (after one `apt-get update` per xtask run), adding and upgrading only.
fn apt_install(packages: &[&str], target_release: Option<&str>) -> std::result::Result<(), String> {
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        run(Command::new("apt-get").args(["update", "-q"]))?;
    }
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
    run(&mut install)
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
