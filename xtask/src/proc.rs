//! Running child processes the way a tutorial would: print the command, then run it; plus the
//! workspace paths and scratch directories every workflow needs.

use std::borrow::BorrowMut;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the workspace and its build output are.
#[derive(Debug)]
pub struct Workspace {
    pub root: PathBuf,
    /// Absolute; honours CARGO_TARGET_DIR and `build.target-dir` (cargo resolves both, relative to
    /// the directory `cargo xtask` was started in).
    pub target: PathBuf,
}

impl Workspace {
    pub fn locate() -> Self {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf();
        let metadata = Command::new(cargo_program())
            .args([
                "metadata",
                "--format-version",
                "1",
                "--no-deps",
                "--manifest-path",
            ])
            .arg(root.join("Cargo.toml"))
            .stderr(Stdio::inherit())
            .output();
        let from_metadata = metadata
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| {
                let value: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                value.get("target_directory")?.as_str().map(PathBuf::from)
            });
        let target = from_metadata.unwrap_or_else(|| match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => std::env::current_dir()
                .map(|cwd| cwd.join(&dir))
                .unwrap_or_else(|_| dir.into()),
            None => root.join("target"),
        });
        Workspace { root, target }
    }

    /// `cargo` run in the workspace root, writing to our target directory. A CARGO_TARGET_DIR from
    /// the user is passed on made absolute, since it was relative to their directory, not the root.
    pub fn cargo(&self) -> Command {
        let mut command = Command::new(cargo_program());
        command.current_dir(&self.root);
        if std::env::var_os("CARGO_TARGET_DIR").is_some() {
            command.env("CARGO_TARGET_DIR", &self.target);
        }
        command
    }

    /// A binary of the workspace built with `profile` ("debug" or "release").
    pub fn binary(&self, profile: &str, name: &str) -> PathBuf {
        self.target.join(profile).join(name)
    }
}

/// `cargo` as chosen by the `cargo xtask` that started us (same toolchain), else from PATH.
fn cargo_program() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// The command line as a user would type it: program by its file name, arguments quoted for sh.
pub fn display(command: &Command) -> String {
    let program = Path::new(command.get_program());
    let mut words: Vec<String> = command
        .get_envs()
        .filter_map(|(key, value)| Some(format!("{}={}", key.to_string_lossy(), quote(value?))))
        .collect();
    words.push(quote(program.file_name().unwrap_or(program.as_os_str())));
    words.extend(command.get_args().map(quote));
    words.join(" ")
}

/// Quotes a word for a POSIX shell when it needs it.
pub fn quote(word: &OsStr) -> String {
    let text = word.to_string_lossy();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,@%+".contains(c));
    if plain {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Prints `$ command` and runs it with the terminal attached; an unsuccessful exit is an error.
pub fn run(mut command: impl BorrowMut<Command>) -> Result<(), String> {
    let command = command.borrow_mut();
    println!("$ {}", display(command));
    let status = command
        .status()
        .map_err(|err| format!("could not start `{}`: {err}", display(command)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", display(command)))
    }
}

/// Runs a command quietly and returns what it printed, whatever its exit status.
pub fn capture(command: &mut Command) -> Result<Output, String> {
    command
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("could not start `{}`: {err}", display(command)))
}

/// Runs a command quietly; its trimmed stdout when it succeeds, None otherwise (e.g. not installed).
pub fn stdout_of(command: &mut Command) -> Option<String> {
    let output = capture(command).ok()?;
    if output.status.success() {
        Some(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        None
    }
}

/// A scratch directory, removed on drop unless `keep` was called.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `PARENT/PREFIX-PID-NANOS`.
    pub fn new(parent: &Path, prefix: &str) -> Result<Self, String> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(|err| format!("cannot create {}: {err}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory in place (for a look after a failure) and says where it is.
    pub fn keep(&mut self) {
        self.keep = true;
        eprintln!("xtask: kept {} for inspection", self.path.display());
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(quote(OsStr::new("demo.qcow2")), "demo.qcow2");
        assert_eq!(
            quote(OsStr::new("write -P 0xaa 0 1M")),
            "'write -P 0xaa 0 1M'"
        );
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(quote(OsStr::new("")), "''");
    }

    #[test]
    fn display_names_the_program_by_file_name() {
        let mut command = Command::new("/work/target/debug/snapctl");
        command.args(["disk", "list", "a b.qcow2"]);
        assert_eq!(display(&command), "snapctl disk list 'a b.qcow2'");
    }
}
