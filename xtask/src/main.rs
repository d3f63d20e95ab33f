//! `cargo xtask`: the developer workflows of the snapctl workspace.
//!
//! - `test`  installs what the tests need (qemu-utils >= 10, cargo-nextest when root), builds the
//!   workspace, runs every test (nextest + doctests), clippy and rustfmt; CI runs exactly this.
//! - `demo`  a guided tour of `snapctl disk` on a generated qcow2 image.
//! - `bench` snapctl against `qemu-img snapshot` on a fully allocated (sparse) 1 TiB image, and
//!   layer merge (`disk delete --layer`) against `qemu-img rebase`/`commit`.
//! - `fuzz`  runs the cargo-fuzz targets of `fuzz/` for a while each and reports what they found.
//! - `guest` builds the test guest of the QEMU end-to-end tests (a Debian 6.1 kernel and an
//!   initramfs with busybox, the virtio modules and qemu-ga) from Debian packages into
//!   `target/guest/` (or `$SNAPCTL_GUEST_DIR`).

mod bench;
mod counter;
mod demo;
mod fuzz;
mod guest;
mod proc;
mod sysdeps;
mod test;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  test [-- NEXTEST-ARGS...]   install missing test tools (when root), build the workspace, run every
                              test (cargo nextest + doctests), clippy -D warnings and rustfmt --check
  demo                        walk through snapctl disk create/list/revert/delete/check on a temp image
  bench [--size SIZE] [--runs N] [--criterion] [--merge-data SIZE] [--only snapshot|merge]
                              time snapctl against qemu-img snapshot -c/-a/-d on a fully allocated
                              qcow2 image (default 1T, sparse), and disk delete --layer against
                              qemu-img rebase/commit on a 3-layer chain (default 1G of data per
                              layer, on 64G and 1T); median of N runs (default 1);
                              --criterion also runs cargo bench
  fuzz [--seconds N] [TARGET...]
                              build the cargo-fuzz targets in fuzz/ (nightly; cargo-fuzz installed
                              when root) and run each (default: all) for N seconds (default 60) on
                              fuzz/corpus/TARGET; prints execs and findings, exits 1 on any finding
  fuzz --reproduce [TARGET...]
                              re-run every saved artifact in fuzz/artifacts/ and report which still fail
  guest [--force] [--no-agent]
                              build the QEMU test guest from Debian packages (apt-get download):
                              kernel 6.1 + initramfs (busybox, virtio modules, qemu-ga best effort)
                              that writes `counter N` to sector 0 of /dev/vda and ttyS0 every
                              ~100 ms; into target/guest/ or $SNAPCTL_GUEST_DIR (vmlinuz,
                              initrd.img, manifest.json); --force rebuilds even when up to date
";

/// Why an xtask command did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// Bad command line: exit 2.
    Usage(String),
    /// A step failed: exit 1.
    Failed(String),
    /// A workflow that belongs to a later issue: exit 2, having run nothing.
    NotImplemented(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Failed(message)
    }
}

pub type Result<T = ()> = std::result::Result<T, Failure>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let outcome = match command {
        "test" => test::run_tests(rest),
        "demo" => demo::run_demo(rest),
        "bench" => bench::run_bench(rest),
        "fuzz" => fuzz::run_fuzz(rest),
        "guest" => guest::run_guest(rest),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(Failure::Usage(format!("unknown command `{other}`"))),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("xtask: {message}\n\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(message)) => {
            eprintln!("\nxtask: error: {message}");
            ExitCode::FAILURE
        }
        Err(Failure::NotImplemented(message)) => {
            eprintln!("xtask: {message}");
            ExitCode::from(2)
        }
    }
}

/// Placeholders stay honest: they say that nothing ran. (No command is a placeholder right now.)
#[allow(dead_code)]
fn not_implemented(command: &str, why: &str) -> Result {
    Err(Failure::NotImplemented(format!(
        "`cargo xtask {command}` is not implemented yet: see the issue tracker ({why}). Nothing was run."
    )))
}

/// Rejects any argument for commands that take none.
fn no_args(command: &str, args: &[String]) -> Result {
    match args.first() {
        None => Ok(()),
        Some(arg) => Err(Failure::Usage(format!(
            "`cargo xtask {command}` takes no arguments (got `{arg}`)"
        ))),
    }
}
