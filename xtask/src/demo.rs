//! `cargo xtask demo`: a guided tour of `snapctl disk` on a generated qcow2 image, checked at every
//! step against QEMU's own tools. Any surprise stops the tour with an error (and keeps the scratch
//! directory for a look).

use crate::counter::{console_counters, read_counter, wait_counter, wait_new_counter};
use crate::proc::{TempDir, Workspace, capture, display, run};
use crate::sysdeps::ensure_qemu_tools;
use crate::{Result, no_args};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const IMAGE: &str = "demo.qcow2";
const SNAPSHOT: &str = "before-upgrade";
const VIRTUAL_SIZE: u64 = 256 << 20;

pub fn run_demo(args: &[String]) -> Result {
    no_args("demo", args)?;
    ensure_qemu_tools()?;
    let workspace = Workspace::locate();
    run(workspace
        .cargo()
        .args(["build", "-p", "snap-orchestrator", "--bin", "snapctl"]))?;
    let snapctl = workspace.binary("debug", "snapctl");
    let mut scratch = TempDir::new(&std::env::temp_dir(), "snapctl-demo")?;
    let mut tour = Tour {
        snapctl,
        dir: scratch.path().to_path_buf(),
        step: 0,
    };
    let outcome = tour.walk();
    if outcome.is_err() {
        scratch.keep();
    }
    Ok(outcome?)
}

struct Tour {
    snapctl: PathBuf,
    dir: PathBuf,
    step: u32,
}

impl Tour {
    fn walk(&mut self) -> std::result::Result<(), String> {
        println!(
            "\nsnapctl demo: working in {}\n(snapctl below is {})",
            self.dir.display(),
            self.snapctl.display()
        );

        self.say("Create a 256 MiB qcow2 image.");
        run(self
            .tool("qemu-img")
            .args(["create", "-f", "qcow2", IMAGE, "256M"]))?;

        self.say("Write a pattern (0xaa) into its first MiB, as a guest would.");
        run(self.qemu_io("write -P 0xaa 0 1M"))?;

        self.say("Take an internal snapshot: the image keeps a frozen copy of its tables.");
        run(self.snapctl(&["disk", "create", IMAGE, SNAPSHOT]))?;
        let mut qemu_list = self.tool("qemu-img");
        qemu_list.args(["snapshot", "-l", IMAGE]);
        let output = self.show(&mut qemu_list)?;
        if !output.status.success() || !String::from_utf8_lossy(&output.stdout).contains(SNAPSHOT) {
            return Err(format!("QEMU does not see snapshot '{SNAPSHOT}'"));
        }
        println!("(QEMU sees the snapshot too: the image is plain qcow2)");

        self.say("The 'upgrade' overwrites the data (0xbb).");
        run(self.qemu_io("write -P 0xbb 0 1M"))?;
        run(self.qemu_io("read -P 0xbb 0 1M"))?;

        self.say("List the snapshots, for people and for scripts.");
        run(self.snapctl(&["disk", "list", IMAGE]))?;
        self.list_json(&[SNAPSHOT])?;

        self.say("Revert: the image's data is the snapshot's again.");
        run(self.snapctl(&["disk", "revert", IMAGE, SNAPSHOT]))?;
        run(self.qemu_io("read -P 0xaa 0 1M"))?;
        println!("(qemu-io verified the pattern: the first MiB holds 0xaa again)");

        self.say("Delete the snapshot; its clusters are freed.");
        run(self.snapctl(&["disk", "delete", IMAGE, SNAPSHOT]))?;
        self.list_json(&[])?;

        self.say("Check the image: snapctl's checker, then QEMU's.");
        run(self.snapctl(&["disk", "check", IMAGE]))?;
        let mut qemu_check = self.tool("qemu-img");
        qemu_check.args(["check", IMAGE]);
        let output = self.show(&mut qemu_check)?;
        let report = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !report.contains("No errors were found on the image.") {
            return Err(format!(
                "`qemu-img check` did not call the image clean ({})",
                output.status
            ));
        }

        self.say(
            "A bad request is refused with one line on stderr and exit 1; the image is untouched.",
        );
        let before = sha256(&self.dir.join(IMAGE))?;
        println!("sha256 before: {before}");
        let mut bad = self.snapctl(&["disk", "revert", IMAGE, "no-such-snapshot"]);
        let output = self.show(&mut bad)?;
        println!("(exit status {})", exit_code(&output));
        refused_cleanly(&output)?;
        let after = sha256(&self.dir.join(IMAGE))?;
        println!("sha256 after:  {after}");
        if before != after {
            return Err("the refused revert changed the image".to_string());
        }
        println!("(byte-identical)");

        self.domain_tour()?;

        println!("\nsnapctl demo: every step passed.");
        Ok(())
    }

    /// The domain part: boot the test guest, take a live snapshot with memory, let the guest run
    /// on, show the tree, revert, and see the guest continue from the snapshot's counter.
    fn domain_tour(&mut self) -> std::result::Result<(), String> {
        self.say("Build (or reuse) the tiny test guest: a Debian kernel and a busybox initramfs whose init counts in RAM, writing `counter N` to its disk and console every ~100 ms.");
        crate::guest::run_guest(&[]).map_err(|e| match e {
            crate::Failure::Usage(m)
            | crate::Failure::Failed(m)
            | crate::Failure::NotImplemented(m) => m,
        })?;
        let guest = crate::guest::guest_dir(&Workspace::locate().target);
        let console = self.dir.join("demo-vm.console");
        let disk = self.dir.join("demo-vm.qcow2");
        run(self
            .tool("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "demo-vm.qcow2", "64M"]))?;
        let cfg = format!(
            "# the demo domain (xl.cfg syntax)\nname = \"demo-vm\"\nmemory = 128\nvcpus = 1\nkernel = \"{}\"\nramdisk = \"{}\"\nextra = \"console=ttyS0 quiet\"\nserial = \"file:{}\"\ndisk = [ 'format=qcow2,vdev=xvda,access=rw,target={}' ]\n",
            guest.join("vmlinuz").display(),
            guest.join("initrd.img").display(),
            console.display(),
            disk.display()
        );
        std::fs::write(self.dir.join("demo-vm.cfg"), cfg)
            .map_err(|e| format!("write demo-vm.cfg: {e}"))?;
        let state = self.dir.join("state");
        let state = state.to_string_lossy().into_owned();
        let (bin, dir) = (self.snapctl.clone(), self.dir.clone());
        let domain = move |args: &[&str]| -> Command {
            let mut command = Command::new(&bin);
            command
                .current_dir(&dir)
                .arg("--state-dir")
                .arg(&state)
                .args(args);
            command
        };

        self.say("Start the domain from its xl.cfg with the qemu driver and wait for the guest to count.");
        run(domain(&["domain", "start", "demo-vm.cfg"]))?;
        let result = (|| {
            let seen = wait_counter(&console, 10)?;
            println!("(the guest's console says: counter {seen})");
            run(domain(&["domain", "list"]))?;

            self.say("Take a live snapshot: memory saved while the guest runs, external disk snapshots (a new overlay takes the writes).");
            run(domain(&[
                "snapshot",
                "create",
                "demo-vm",
                "checkpoint",
                "--live",
                "--external",
                "--description",
                "demo",
            ]))?;
            run(domain(&["snapshot", "info", "demo-vm", "checkpoint"]))?;
            let frozen = read_counter(&self.dir, "demo-vm.qcow2")?;
            println!(
                "(the snapshot's disk holds counter {frozen}: where the guest was when it stopped)"
            );

            self.say("Let the guest run on, and take a second snapshot.");
            let later = wait_counter(&console, frozen + 20)?;
            println!("(the guest is at counter {later} now)");
            run(domain(&[
                "snapshot",
                "create",
                "demo-vm",
                "later",
                "--live",
                "--external",
            ]))?;
            run(domain(&["snapshot", "list", "demo-vm", "--tree"]))?;

            self.say("Revert to the first snapshot: the guest continues from its counter, not from the later one.");
            let before = console_counters(&console).len();
            run(domain(&["snapshot", "revert", "demo-vm", "checkpoint"]))?;
            let resumed = wait_new_counter(&console, before)?;
            println!(
                "(after the revert the console says: counter {resumed}; the snapshot had {frozen})"
            );
            if resumed < frozen || resumed > frozen + 2 {
                return Err(format!(
                    "the guest did not continue from the snapshot: counter {resumed}, snapshot {frozen}"
                ));
            }
            run(domain(&["snapshot", "list", "demo-vm"]))?;

            self.say("Delete the first snapshot while the guest runs: its layer is merged by a block job.");
            run(domain(&[
                "--dry-run",
                "snapshot",
                "delete",
                "demo-vm",
                "checkpoint",
            ]))?;
            run(domain(&["snapshot", "delete", "demo-vm", "checkpoint"]))?;
            run(domain(&["snapshot", "list", "demo-vm", "--tree"]))?;
            Ok(())
        })();
        self.say("Destroy the domain (it stays defined with its snapshots).");
        run(domain(&["domain", "destroy", "demo-vm"]))?;
        run(domain(&["domain", "list"]))?;
        result
    }

    fn say(&mut self, text: &str) {
        self.step += 1;
        println!("\n## {}. {text}", self.step);
    }

    fn tool(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.current_dir(&self.dir);
        command
    }

    fn snapctl(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.snapctl);
        command.current_dir(&self.dir).args(args);
        command
    }

    fn qemu_io(&self, request: &str) -> Command {
        let mut command = self.tool("qemu-io");
        command.args(["-f", "qcow2", "-c", request, IMAGE]);
        command
    }

    /// Prints the command, runs it capturing its output, then shows that output.
    fn show(&self, command: &mut Command) -> std::result::Result<Output, String> {
        println!("$ {}", display(command));
        let output = capture(command)?;
        print!("{}", String::from_utf8_lossy(&output.stdout));
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        Ok(output)
    }

    /// `snapctl disk list --json`, checked against the CLI contract and the snapshots we expect.
    fn list_json(&self, expected: &[&str]) -> std::result::Result<(), String> {
        let mut list = self.snapctl(&["disk", "list", IMAGE, "--json"]);
        let output = self.show(&mut list)?;
        if !output.status.success() {
            return Err(format!("`{}` failed ({})", display(&list), output.status));
        }
        check_listing(&String::from_utf8_lossy(&output.stdout), expected)
            .map_err(|why| format!("`{}`: {why}", display(&list)))
    }
}

/// Checks `disk list --json` output: one object with format qcow2, our virtual size, and exactly
/// the snapshots named in `expected`.
fn check_listing(json: &str, expected: &[&str]) -> std::result::Result<(), String> {
    let listing: serde_json::Value =
        serde_json::from_str(json).map_err(|err| format!("output is not one JSON value: {err}"))?;
    let format = listing.get("format").and_then(|value| value.as_str());
    if format != Some("qcow2") {
        return Err(format!("\"format\" is {format:?}, expected \"qcow2\""));
    }
    let size = listing.get("virtual_size").and_then(|value| value.as_u64());
    if size != Some(VIRTUAL_SIZE) {
        return Err(format!(
            "\"virtual_size\" is {size:?}, expected {VIRTUAL_SIZE}"
        ));
    }
    let names: Option<Vec<&str>> = listing
        .get("snapshots")
        .and_then(|value| value.as_array())
        .map(|snapshots| {
            snapshots
                .iter()
                .filter_map(|snapshot| snapshot.get("name")?.as_str())
                .collect()
        });
    match names {
        Some(names) if names == expected => Ok(()),
        Some(names) => Err(format!("snapshots are {names:?}, expected {expected:?}")),
        None => Err("no \"snapshots\" array".to_string()),
    }
}

/// The contract for a refused request: exit 1 and exactly one stderr line `snapctl: error: ...`.
fn refused_cleanly(output: &Output) -> std::result::Result<(), String> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    if output.status.code() != Some(1) {
        return Err(format!("expected exit status 1, got {}", exit_code(output)));
    }
    match lines.as_slice() {
        [line] if line.starts_with("snapctl: error: ") => Ok(()),
        _ => Err(format!(
            "expected one stderr line `snapctl: error: ...`, got {} line(s): {stderr:?}",
            lines.len()
        )),
    }
}

fn exit_code(output: &Output) -> String {
    output
        .status
        .code()
        .map_or_else(|| output.status.to_string(), |code| code.to_string())
}

/// The file's SHA-256 from coreutils' `sha256sum`.
pub fn sha256(path: &Path) -> std::result::Result<String, String> {
    let output = capture(Command::new("sha256sum").arg(path))?;
    let text = String::from_utf8_lossy(&output.stdout);
    match text.split_whitespace().next() {
        Some(digest) if output.status.success() => Ok(digest.to_string()),
        _ => Err(format!(
            "sha256sum {} failed ({})",
            path.display(),
            output.status
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_must_match_the_contract() {
        let good = r#"{"image": "demo.qcow2", "format": "qcow2", "virtual_size": 268435456,
            "snapshots": [{"id": "1", "name": "before-upgrade", "vm_state_size": 0,
            "date": "2025-01-01T00:00:00Z", "vm_clock_ns": 0}], "chain": []}"#;
        assert_eq!(check_listing(good, &["before-upgrade"]), Ok(()));
        assert!(check_listing(good, &[]).is_err());
        let raw = r#"{"format": "raw", "virtual_size": 268435456, "snapshots": []}"#;
        assert!(check_listing(raw, &[]).is_err());
        assert!(check_listing("not json", &[]).is_err());
    }
}
