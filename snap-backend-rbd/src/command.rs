//! The one place `rbd` commands are built, run and their failures interpreted.
//!
//! Every command is `rbd [--conf PATH] [--id USER] --client_mount_timeout N
//! --rados_mon_op_timeout N SUBCOMMAND [--no-progress] ARGS` with `TZ=UTC` (rbd prints snapshot times with
//! `ctime`, in local time) and `LC_ALL=C`. Without `conf=` in the disk name, librados finds its
//! configuration as usual (`CEPH_CONF`, then `/etc/ceph/ceph.conf`). Reads add `--format json`.
//!
//! rbd exits with the errno of what failed (2 = ENOENT, 16 = EBUSY, 17 = EEXIST...) and says
//! why on a line starting `rbd: `; both decide the [`ErrorKind`].

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use snap_core::{Error, ErrorKind, Result};

use crate::name::RbdSpec;

/// The rbd binary (found on PATH).
pub const RBD_BINARY: &str = "rbd";

/// Seconds rbd waits to reach the monitors before it gives up (librados' default is 300).
pub const MOUNT_TIMEOUT_SECS: u32 = 15;

/// Seconds one monitor request may take.
pub const MON_OP_TIMEOUT_SECS: u32 = 30;

/// How long a metadata command may run in all before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Subcommands that print progress unless told `--no-progress` (others refuse the option).
const PROGRESS_COMMANDS: [&str; 9] = [
    "snap create",
    "snap rm",
    "snap rollback",
    "snap purge",
    "export",
    "export-diff",
    "flatten",
    "rm",
    "import",
];

/// How rbd commands are run: the binary and how to reach the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rbd {
    binary: String,
    conf: Option<PathBuf>,
    user: Option<String>,
}

impl Default for Rbd {
    fn default() -> Self {
        Rbd {
            binary: RBD_BINARY.to_string(),
            conf: None,
            user: None,
        }
    }
}

/// What a successful rbd command printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdOutput {
    /// Standard output.
    pub stdout: String,
    /// Standard error (librados log lines, notices).
    pub stderr: String,
}

impl Rbd {
    /// rbd reaching the cluster of `spec` (its `conf=` and `id=`, else librados' defaults).
    pub fn for_spec(spec: &RbdSpec) -> Self {
        Rbd {
            binary: RBD_BINARY.to_string(),
            conf: spec.conf().map(|c| c.to_path_buf()),
            user: spec.user().map(str::to_string),
        }
    }

    /// Uses another rbd binary (default `rbd`, found on PATH).
    pub fn with_binary(mut self, binary: impl Into<String>) -> Self {
        self.binary = binary.into();
        self
    }

    /// The arguments before the subcommand.
    fn global_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(conf) = &self.conf {
            args.push("--conf".to_string());
            args.push(conf.to_string_lossy().into_owned());
        }
        if let Some(user) = &self.user {
            args.push("--id".to_string());
            args.push(user.clone());
        }
        args.extend([
            "--client_mount_timeout".to_string(),
            MOUNT_TIMEOUT_SECS.to_string(),
            "--rados_mon_op_timeout".to_string(),
            MON_OP_TIMEOUT_SECS.to_string(),
        ]);
        args
    }

    /// The command for `rbd ARGS`: environment and global arguments set, stdin closed, output
    /// captured.
    pub fn command(&self, args: &[String]) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.binary);
        let words = subcommand(args);
        let split = words.split_whitespace().count().min(args.len());
        let (head, tail) = args.split_at(split);
        cmd.args(self.global_args()).args(head);
        if PROGRESS_COMMANDS.contains(&words.as_str()) {
            cmd.arg("--no-progress");
        }
        cmd.args(tail)
            .env("TZ", "UTC")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs `rbd ARGS` (killed after `timeout` when given).
    pub async fn run_with(&self, args: &[String], timeout: Option<Duration>) -> Result<RbdOutput> {
        let what = args.first().map(String::as_str).unwrap_or("");
        tracing::debug!(?args, conf = ?self.conf, user = ?self.user, "rbd");
        let mut cmd = tokio::process::Command::from(self.command(args));
        cmd.kill_on_drop(true);
        let output = match timeout {
            Some(limit) => match tokio::time::timeout(limit, cmd.output()).await {
                Ok(output) => output,
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!(
                            "rbd {}: no answer within {} s (is the Ceph cluster up?)",
                            subcommand(args),
                            limit.as_secs()
                        ),
                    ));
                }
            },
            None => cmd.output().await,
        };
        self.interpret(what, args, output)
    }

    /// Runs a metadata command (`rbd ARGS`, killed after [`COMMAND_TIMEOUT`]).
    pub async fn run(&self, args: &[String]) -> Result<RbdOutput> {
        self.run_with(args, Some(COMMAND_TIMEOUT)).await
    }

    /// Runs `rbd ARGS --format json` and parses what it printed.
    pub async fn json(&self, args: &[String]) -> Result<Value> {
        // Before a `--`, where rbd still reads options.
        let mut all = args.to_vec();
        let at = all.iter().position(|a| a == "--").unwrap_or(all.len());
        all.splice(at..at, ["--format".to_string(), "json".to_string()]);
        let out = self.run(&all).await?;
        serde_json::from_str(&out.stdout).map_err(|e| {
            Error::new(
                ErrorKind::Command,
                format!(
                    "rbd {} printed something that is not JSON ({e})",
                    subcommand(args)
                ),
            )
        })
    }

    /// Turns a finished command into its output, or into an error from rbd's exit code and
    /// message ([`classify_failure`]).
    pub fn interpret(
        &self,
        _first: &str,
        args: &[String],
        output: std::io::Result<Output>,
    ) -> Result<RbdOutput> {
        let output = output.map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                " (is ceph-common installed?)"
            } else {
                ""
            };
            Error::io(format!("run {}{hint}", self.binary), e)
        })?;
        let out = RbdOutput {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        if output.status.success() {
            return Ok(out);
        }
        Err(classify_failure(
            &subcommand(args),
            output.status.code(),
            &out.stderr,
        ))
    }
}

/// `snap create`, `info`...: the subcommand words of an argument list (up to the first option
/// or image spec).
pub fn subcommand(args: &[String]) -> String {
    args.iter()
        .take(2)
        .take_while(|a| !a.starts_with('-') && !a.contains('/'))
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

/// rbd's own explanation: the last line starting `rbd: ` (without it), else the last
/// librbd/librados log line's message, else nothing.
pub fn rbd_message(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if let Some(line) = lines.iter().rev().find_map(|l| l.strip_prefix("rbd: ")) {
        return Some(line.trim().to_string());
    }
    // "2026-11-26T01:19:55.741+0000 7fd6655d86c0 -1 librbd::Operations: snapshot is protected"
    lines.iter().rev().find_map(|l| {
        let at = l.find(" -1 ")?;
        l.get(at + 4..).map(|m| m.trim().to_string())
    })
}

/// Maps a failed rbd command to an error. The kind comes from the exit code (rbd exits with the
/// errno): 2 ENOENT is [`ErrorKind::NotFound`], 17 EEXIST [`ErrorKind::Exists`], 16 EBUSY and
/// 39 ENOTEMPTY [`ErrorKind::InUse`], 110 ETIMEDOUT and 5 EIO [`ErrorKind::Io`], 95 EOPNOTSUPP
/// and 38 ENOSYS [`ErrorKind::Unsupported`], anything else [`ErrorKind::Command`]. The message
/// is `rbd SUBCOMMAND: LINE` with rbd's own line.
pub fn classify_failure(subcommand: &str, code: Option<i32>, stderr: &str) -> Error {
    let kind = match code {
        Some(2) => ErrorKind::NotFound,
        Some(17) => ErrorKind::Exists,
        Some(16) | Some(39) => ErrorKind::InUse,
        Some(110) | Some(5) => ErrorKind::Io,
        Some(95) | Some(38) => ErrorKind::Unsupported,
        _ => ErrorKind::Command,
    };
    let status = match code {
        Some(c) => format!("exit status {c}"),
        None => "killed by a signal".to_string(),
    };
    let line =
        rbd_message(stderr).unwrap_or_else(|| format!("failed with {status} and no message"));
    let mut message = format!("rbd {subcommand}: {line}");
    if kind == ErrorKind::Command {
        message.push_str(&format!(" ({status})"));
    }
    if code == Some(110) && line.contains("Connection timed out") {
        message.push_str(" — is the Ceph cluster up and its conf right?");
    }
    Error::new(kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from Ceph 16.2.15.
    const PROTECTED: &str = "2026-11-26T01:19:55.741+0000 7fd6655d86c0 -1 librbd::Operations: snapshot is protected\n\nRemoving snap: 0% complete...failed.\nrbd: snapshot 's1' is protected from removal.\n";
    const NO_POOL: &str = "rbd: error opening pool 'nopool': (2) No such file or directory\n";
    const TIMEOUT: &str = "2026-11-26T01:20:56.269+0000 7f3b0ae27380  0 monclient(hunting): authenticate timed out after 3\nrbd: couldn't connect to the cluster!\nrbd: listing images failed: (110) Connection timed out\n";
    const ONLY_LOG: &str = "2026-11-26T01:19:55.945+0000 7fd470eb8380 -1 librbd::Operations: No such snapshot found.\n";

    #[test]
    fn classifies_captured_failures() {
        let e = classify_failure("snap rm", Some(16), PROTECTED);
        assert_eq!(e.kind(), ErrorKind::InUse);
        assert_eq!(
            e.message(),
            "rbd snap rm: snapshot 's1' is protected from removal."
        );
        let e = classify_failure("info", Some(2), NO_POOL);
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.message().contains("error opening pool 'nopool'"));
        let e = classify_failure("ls", Some(110), TIMEOUT);
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.message().contains("cluster up"), "{e}");
        let e = classify_failure("snap rollback", Some(2), ONLY_LOG);
        assert!(
            e.message()
                .ends_with("librbd::Operations: No such snapshot found.")
        );
        let e = classify_failure("x", None, "");
        assert_eq!(e.kind(), ErrorKind::Command);
        assert!(e.message().contains("killed by a signal"));
        assert!(!e.message().contains('\n'));
    }

    #[test]
    fn subcommands() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            subcommand(&args(&["snap", "create", "p/i@s"])),
            "snap create"
        );
        assert_eq!(subcommand(&args(&["info", "p/i"])), "info");
        assert_eq!(subcommand(&args(&["status", "--", "p/i"])), "status");
    }

    #[test]
    fn command_line() {
        let spec = RbdSpec::parse("rbd:p/i:conf=/c.conf:id=u").unwrap();
        let cmd = Rbd::for_spec(&spec).command(&["info".to_string()]);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[..4], ["--conf", "/c.conf", "--id", "u"]);
        assert_eq!(args.last().map(String::as_str), Some("info"));
    }
}
