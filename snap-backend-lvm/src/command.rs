//! The one place lvm2 commands are built, run and their failures interpreted.
//!
//! Every command is `lvm SUBCOMMAND [extra args] ARGS` with `LC_ALL=C` (lvm2's messages are
//! matched in English) and `LVM_SUPPRESS_FD_WARNINGS=1`. Report commands (`lvs`, `vgs`, `pvs`) also
//! get `--reportformat json --units b --nosuffix`. The async path runs through `tokio::process`,
//! the blocking path through `std::process`; both share [`Lvm::command`] and [`Lvm::interpret`].

use std::process::{Command, Output, Stdio};

use snap_core::{Error, ErrorKind, Result};

use crate::report::{LV_FIELDS, LvRow, parse_lvs};

/// Environment variable with extra lvm2 arguments, split on whitespace and added after the
/// subcommand of every lvm2 command (e.g. `--driverloaded n --devices /dev/loop3` for tests on a
/// kernel without device-mapper). Never set by snapctl itself.
pub const ARGS_ENV: &str = "SNAPCTL_LVM_ARGS";

/// The lvm2 binary (its subcommands are run as `lvm lvs ...`).
pub const LVM_BINARY: &str = "lvm";

const REPORT_COMMANDS: [&str; 3] = ["lvs", "vgs", "pvs"];

/// How lvm2 commands are run: the binary and extra arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lvm {
    binary: String,
    extra_args: Vec<String>,
}

impl Default for Lvm {
    fn default() -> Self {
        Lvm {
            binary: LVM_BINARY.to_string(),
            extra_args: Vec::new(),
        }
    }
}

/// What a successful lvm2 command printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvmOutput {
    /// Standard output.
    pub stdout: String,
    /// Standard error (lvm2's warnings and notices).
    pub stderr: String,
}

impl LvmOutput {
    /// The meaningful lines of both streams (see [`meaningful_lines`]).
    pub fn messages(&self) -> Vec<String> {
        meaningful_lines(&self.stdout)
            .into_iter()
            .chain(meaningful_lines(&self.stderr))
            .collect()
    }
}

impl Lvm {
    /// Plain lvm2: no extra arguments.
    pub fn new() -> Self {
        Self::default()
    }

    /// lvm2 with the extra arguments of [`ARGS_ENV`], when set.
    pub fn from_env() -> Self {
        let extra = std::env::var(ARGS_ENV).unwrap_or_default();
        Self::new().with_extra_args(split_args(&extra))
    }

    /// Adds arguments passed to every lvm2 command after its subcommand.
    pub fn with_extra_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Uses another lvm2 binary (default `lvm`, found on PATH).
    pub fn with_binary(mut self, binary: impl Into<String>) -> Self {
        self.binary = binary.into();
        self
    }

    /// The extra arguments.
    pub fn extra_args(&self) -> &[String] {
        &self.extra_args
    }

    /// The command for `lvm SUBCOMMAND ...`: environment, extra and report arguments set, stdin
    /// closed, output captured.
    pub fn command(&self, subcommand: &str, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg(subcommand)
            .args(&self.extra_args)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if REPORT_COMMANDS.contains(&subcommand) {
            cmd.args(["--reportformat", "json", "--units", "b", "--nosuffix"]);
        }
        cmd.args(args);
        cmd
    }

    /// Runs `lvm SUBCOMMAND ARGS` through `tokio::process`.
    pub async fn run(&self, subcommand: &str, args: &[String]) -> Result<LvmOutput> {
        tracing::debug!(subcommand, ?args, extra = ?self.extra_args, "lvm2");
        let output = tokio::process::Command::from(self.command(subcommand, args))
            .output()
            .await;
        self.interpret(subcommand, output)
    }

    /// Runs `lvm SUBCOMMAND ARGS`, blocking the calling thread.
    pub fn run_blocking(&self, subcommand: &str, args: &[String]) -> Result<LvmOutput> {
        tracing::debug!(subcommand, ?args, extra = ?self.extra_args, "lvm2");
        let output = self.command(subcommand, args).output();
        self.interpret(subcommand, output)
    }

    /// Turns a finished command into its output, or into an error whose kind comes from lvm2's
    /// message ([`classify_failure`]).
    pub fn interpret(
        &self,
        subcommand: &str,
        output: std::io::Result<Output>,
    ) -> Result<LvmOutput> {
        let output = output.map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                " (is lvm2 installed?)"
            } else {
                ""
            };
            Error::io(format!("run {} {subcommand}{hint}", self.binary), e)
        })?;
        let out = LvmOutput {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        if output.status.success() {
            for line in meaningful_lines(&out.stderr) {
                tracing::debug!(subcommand, "lvm2: {line}");
            }
            return Ok(out);
        }
        let status = match output.status.code() {
            Some(code) => format!("exit status {code}"),
            None => "killed by a signal".to_string(),
        };
        Err(classify_failure(
            subcommand,
            &status,
            &out.stderr,
            &out.stdout,
        ))
    }

    /// `lvs -o LV_FIELDS VG` (blocking): every visible LV of a volume group.
    pub fn lvs_blocking(&self, vg: &str) -> Result<Vec<LvRow>> {
        parse_lvs(&self.run_blocking("lvs", &lvs_args(vg))?.stdout)
    }

    /// `lvs -o LV_FIELDS VG`: every visible LV of a volume group.
    pub async fn lvs(&self, vg: &str) -> Result<Vec<LvRow>> {
        parse_lvs(&self.run("lvs", &lvs_args(vg)).await?.stdout)
    }
}

fn lvs_args(vg: &str) -> Vec<String> {
    vec!["-o".into(), LV_FIELDS.into(), "--".into(), vg.into()]
}

/// Splits an extra-arguments string on whitespace (no quoting: lvm2 options need none).
pub fn split_args(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

/// Lines that carry information: trimmed, non-empty, without lvm2's warnings, file-descriptor
/// leak notices and `--help` hints.
pub fn meaningful_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !l.starts_with("WARNING:"))
        .filter(|l| !(l.starts_with("File descriptor") && l.contains("leaked")))
        .filter(|l| !(l.starts_with("Run `") && l.contains("--help")))
        .map(str::to_string)
        .collect()
}

/// Messages libdevmapper prints whenever the kernel driver is missing, before the real error.
const DM_NOISE: [&str; 6] = [
    "/dev/mapper/control: open failed",
    "Failure to communicate with kernel device-mapper driver",
    "Check that device-mapper is available in the kernel",
    "Incompatible libdevmapper",
    "/sbin/modprobe",
    "modprobe failed",
];

/// Substrings of lvm2 messages meaning the kernel lacks what the operation needs.
const NO_KERNEL_SUPPORT: [&str; 5] = [
    "without using device-mapper kernel driver",
    "Missing support in kernel",
    "not detected in your kernel",
    "device-mapper kernel driver",
    "Check that device-mapper is available in the kernel",
];
const NOT_FOUND: [&str; 3] = ["Failed to find logical volume", "not found", "No such"];
const EXISTS: [&str; 1] = ["already exists"];
const IN_USE: [&str; 4] = [
    " in use",
    "is open",
    "still open",
    "Device or resource busy",
];

/// Maps a failed lvm2 command to an error: no kernel support (device-mapper messages) is
/// [`ErrorKind::Unsupported`], "Failed to find logical volume" / "not found" is
/// [`ErrorKind::NotFound`], "already exists" is [`ErrorKind::Exists`], "in use" / "open" is
/// [`ErrorKind::InUse`], anything else [`ErrorKind::Command`]. The message is `lvm2 SUBCOMMAND:
/// LINE` with lvm2's own line.
pub fn classify_failure(subcommand: &str, status: &str, stderr: &str, stdout: &str) -> Error {
    let lines: Vec<String> = meaningful_lines(stderr)
        .into_iter()
        .chain(meaningful_lines(stdout))
        .collect();
    let is_noise = |l: &str| DM_NOISE.iter().any(|n| l.contains(n));
    let real: Vec<&String> = lines.iter().filter(|l| !is_noise(l)).collect();
    // libdevmapper's complaints about the missing driver come first; the line after them says
    // what failed. Look at them only when lvm2 printed nothing else.
    let find = |needles: &[&str]| {
        let hit = |l: &&String| needles.iter().any(|n| l.contains(n));
        match real.iter().copied().find(hit) {
            Some(line) => Some(line.clone()),
            None if real.is_empty() => lines.iter().find(hit).cloned(),
            None => None,
        }
    };
    let (kind, line) = if let Some(line) = find(&NO_KERNEL_SUPPORT) {
        (ErrorKind::Unsupported, line)
    } else if let Some(line) = find(&NOT_FOUND) {
        (ErrorKind::NotFound, line)
    } else if let Some(line) = find(&EXISTS) {
        (ErrorKind::Exists, line)
    } else if let Some(line) = find(&IN_USE) {
        (ErrorKind::InUse, line)
    } else {
        let line = real
            .first()
            .map(|l| (*l).clone())
            .or_else(|| lines.first().cloned())
            .unwrap_or_else(|| format!("failed with {status} and no message"));
        (ErrorKind::Command, format!("{line} ({status})"))
    };
    let mut message = format!("lvm2 {subcommand}: {line}");
    if kind == ErrorKind::Unsupported {
        message.push_str(" (the kernel lacks the device-mapper support lvm2 needs for this)");
    }
    Error::new(kind, message)
}

/// Whether the kernel has device-mapper (what lvm2 needs to create and merge snapshots): its
/// misc device is registered (`/proc/misc`), its module is loaded or built in
/// (`/sys/module/dm_mod`), or a loadable `dm-mod` module exists for the running kernel.
pub fn kernel_has_device_mapper() -> bool {
    let misc = std::fs::read_to_string("/proc/misc").unwrap_or_default();
    if misc.lines().any(|l| l.trim().ends_with(" device-mapper")) {
        return true;
    }
    // Not /dev/mapper/control: libdevmapper creates that node even when the driver is missing.
    if std::path::Path::new("/sys/module/dm_mod").exists() {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = format!("/lib/modules/{}/kernel/drivers/md", release.trim());
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("dm-mod.ko"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured stderr of lvm2 2.03.16 on a kernel without device-mapper.
    const CREATE_NO_DM: &str = "  WARNING: Activation disabled. No device-mapper interaction will be attempted.\n  Can't create snapshot without using device-mapper kernel driver.\n";
    const CREATE_NO_DM_LOADED: &str = "  /dev/mapper/control: open failed: No such device\n  Failure to communicate with kernel device-mapper driver.\n  Check that device-mapper is available in the kernel.\n  Incompatible libdevmapper 1.02.185 (2022-05-18) and kernel driver (unknown version).\n  /sbin/modprobe: execvp failed: No such file or directory\n  /sbin/modprobe failed: 2\n  snapshot: Required device-mapper target(s) not detected in your kernel.\n  Run `lvcreate --help' for more information.\n";
    const MERGE_NO_DM: &str = "  WARNING: Activation disabled. No device-mapper interaction will be attempted.\n  Can't initialize snapshot merge. Missing support in kernel?\n";
    const NOT_FOUND_LV: &str = "  WARNING: Activation disabled. No device-mapper interaction will be attempted.\n  Failed to find logical volume \"vgt14767/nope\"\n";
    const NOT_FOUND_VG: &str = "  WARNING: Activation disabled. No device-mapper interaction will be attempted.\n  Volume group \"novg\" not found\n  Cannot process volume group novg\n";
    const EXISTS_LV: &str = "  WARNING: Activation disabled. No device-mapper interaction will be attempted.\n  Logical Volume \"s\" already exists in volume group \"vgt14767\"\n";
    const NOT_FOUND_WITH_DM_NOISE: &str = "  /dev/mapper/control: open failed: No such device\n  Failure to communicate with kernel device-mapper driver.\n  Check that device-mapper is available in the kernel.\n  Incompatible libdevmapper 1.02.185 (2022-05-18) and kernel driver (unknown version).\n  Failed to find logical volume \"vg/x\"\n";

    #[test]
    fn classifies_captured_failures() {
        let e = classify_failure("lvcreate", "exit status 5", CREATE_NO_DM, "");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().starts_with(
            "lvm2 lvcreate: Can't create snapshot without using device-mapper kernel driver."
        ));
        let e = classify_failure("lvcreate", "exit status 3", CREATE_NO_DM_LOADED, "");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(
            e.message()
                .contains("Required device-mapper target(s) not detected"),
            "{e}"
        );
        let e = classify_failure("lvconvert", "exit status 5", MERGE_NO_DM, "");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(
            e.message()
                .contains("Can't initialize snapshot merge. Missing support in kernel?")
        );
        let e = classify_failure("lvremove", "exit status 5", NOT_FOUND_LV, "");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(
            e.message(),
            "lvm2 lvremove: Failed to find logical volume \"vgt14767/nope\""
        );
        let e = classify_failure("lvs", "exit status 5", NOT_FOUND_VG, "");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.message(), "lvm2 lvs: Volume group \"novg\" not found");
        let e = classify_failure("lvcreate", "exit status 5", EXISTS_LV, "");
        assert_eq!(e.kind(), ErrorKind::Exists);
        let e = classify_failure("lvremove", "exit status 5", NOT_FOUND_WITH_DM_NOISE, "");
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    }

    #[test]
    fn in_use_and_other_failures() {
        let e = classify_failure(
            "lvremove",
            "exit status 5",
            "  Logical volume vg/s in use.\n",
            "",
        );
        assert_eq!(e.kind(), ErrorKind::InUse);
        let e = classify_failure(
            "lvcreate",
            "exit status 5",
            "  Volume group \"vg\" has insufficient free space (1 extents): 2 required.\n",
            "",
        );
        assert_eq!(e.kind(), ErrorKind::Command);
        assert_eq!(
            e.message(),
            "lvm2 lvcreate: Volume group \"vg\" has insufficient free space (1 extents): 2 required. (exit status 5)"
        );
        let e = classify_failure("lvs", "exit status 3", "", "");
        assert_eq!(e.kind(), ErrorKind::Command);
        assert!(e.message().contains("exit status 3"));
    }

    #[test]
    fn command_line_shape() {
        let lvm =
            Lvm::new().with_extra_args(split_args("  --driverloaded n\t--devices /dev/loop0 "));
        let cmd = lvm.command("lvs", &["--".into(), "vg".into()]);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "lvs",
                "--driverloaded",
                "n",
                "--devices",
                "/dev/loop0",
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "--",
                "vg"
            ]
        );
        assert!(
            cmd.get_envs()
                .any(|(k, v)| k == "LVM_SUPPRESS_FD_WARNINGS" && v.is_some_and(|v| v == "1"))
        );
        let create = Lvm::new().command("lvcreate", &["x".into()]);
        assert_eq!(create.get_args().count(), 2);
        assert_eq!(Lvm::default().extra_args(), &[] as &[String]);
    }

    #[test]
    fn missing_binary_is_io_not_found() {
        let e = Lvm::new()
            .with_binary("/nonexistent/lvm")
            .run_blocking("lvs", &[])
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.message().contains("is lvm2 installed?"));
    }
}
