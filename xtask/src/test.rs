//! `cargo xtask test`: everything CI checks, in the order a developer wants to hear about it.
//!
//! 1. system tools (qemu-utils >= 10, libxen-dev, Ceph and qemu-block-extra for the RBD tests;
//!    installed when root)
//! 2. `cargo build --workspace --all-targets --features snap-orchestrator/xen` (the feature only
//!    where libxenlight is installed, as in steps 4 to 6)
//! 3. the QEMU test guest (`cargo xtask guest`; skipped when up to date)
//! 4. every test: `cargo nextest run --workspace` (or `cargo test --workspace` without nextest),
//!    with SNAPCTL_BIN pointing at the debug `snapctl` just built
//! 5. doctests (nextest does not run them)
//! 6. `cargo clippy --workspace --all-targets --features snap-orchestrator/xen -- -D warnings`
//! 7. the same clippy without the `xen` feature (only snap-orchestrator is checked again)
//! 8. `cargo fmt --all --check`
//!
//! Steps after the build run even when an earlier one fails, so one run reports every problem.

use crate::proc::{Workspace, run, stdout_of};
use crate::sysdeps::{ensure_qemu_tools, ensure_xen_dev, is_root};
use crate::{Failure, Result};
use std::time::{Duration, Instant};

enum Outcome {
    Passed,
    Failed(String),
    Skipped(&'static str),
}

struct Step {
    name: &'static str,
    outcome: Outcome,
    took: Duration,
}

pub fn run_tests(args: &[String]) -> Result {
    let extra = nextest_args(args)?;
    ensure_qemu_tools()?;
    // A one-node Ceph for the RBD tests (best effort: they skip without it).
    let ceph = crate::sysdeps::ensure_ceph();
    // snap-orchestrator's Xen driver (libxl bindings) is built and tested where it can link.
    let xen: &[&str] = if ensure_xen_dev()? {
        &["--features", "snap-orchestrator/xen"]
    } else {
        &[]
    };
    let workspace = Workspace::locate();
    let snapctl = workspace.binary("debug", "snapctl");
    let mut steps = Vec::new();

    let build = step(&mut steps, "build", || {
        run(workspace
            .cargo()
            .args(["build", "--workspace", "--all-targets"])
            .args(xen))
    });
    // The QEMU test guest of the domain tests (kernel + initramfs from Debian packages).
    let guest = step(&mut steps, "guest", || {
        crate::guest::run_guest(&[]).map_err(|e| match e {
            Failure::Usage(m) | Failure::Failed(m) | Failure::NotImplemented(m) => m,
        })
    });
    if build {
        let mut tests = workspace.cargo();
        if has_nextest(&workspace) {
            tests.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
        } else {
            println!("xtask: cargo-nextest is not available; running `cargo test` instead");
            // The test targets nextest would run; doctests are the next step.
            tests.args([
                "test",
                "--workspace",
                "--no-fail-fast",
                "--lib",
                "--bins",
                "--tests",
            ]);
        }
        tests.args(xen).args(&extra).env("SNAPCTL_BIN", &snapctl);
        if guest {
            // The guest is there: a domain test that cannot find it must fail, not skip.
            tests.env("SNAPCTL_REQUIRE_GUEST", "1");
        }
        if ceph {
            // Ceph is installed: an RBD test that cannot start its cluster must fail, not skip.
            tests.env("SNAPCTL_REQUIRE_CEPH", "1");
        }
        if !snapctl.exists() {
            println!(
                "xtask: warning: {} was not built; tests that need snapctl will fail",
                snapctl.display()
            );
        }
        step(&mut steps, "tests", || run(&mut tests));
        step(&mut steps, "doctests", || {
            run(workspace
                .cargo()
                .env("SNAPCTL_BIN", &snapctl)
                .args(["test", "--workspace", "--doc"])
                .args(xen))
        });
    } else {
        for name in ["tests", "doctests"] {
            steps.push(Step {
                name,
                outcome: Outcome::Skipped("the build failed"),
                took: Duration::ZERO,
            });
        }
    }
    let clippy = ["clippy", "--workspace", "--all-targets"];
    let deny = ["--", "-D", "warnings"];
    step(&mut steps, "clippy", || {
        run(workspace.cargo().args(clippy).args(xen).args(deny))
    });
    if !xen.is_empty() {
        // The build without the feature must stay clean too.
        step(&mut steps, "clippy-noxen", || {
            run(workspace.cargo().args(clippy).args(deny))
        });
    }
    step(&mut steps, "fmt", || {
        run(workspace.cargo().args(["fmt", "--all", "--check"]))
    });

    println!("\nxtask test summary:");
    for Step {
        name,
        outcome,
        took,
    } in &steps
    {
        let verdict = match outcome {
            Outcome::Passed => "ok".to_string(),
            Outcome::Failed(why) => format!("FAILED: {why}"),
            Outcome::Skipped(why) => format!("skipped ({why})"),
        };
        println!("  {name:<12} {:>6.1}s  {verdict}", took.as_secs_f64());
    }
    let failed: Vec<&str> = steps
        .iter()
        .filter(|step| matches!(step.outcome, Outcome::Failed(_)))
        .map(|step| step.name)
        .collect();
    if failed.is_empty() {
        println!("all steps passed");
        Ok(())
    } else {
        Err(Failure::Failed(format!(
            "cargo xtask test failed in: {}",
            failed.join(", ")
        )))
    }
}

/// Runs one step with a banner, records how it went, returns whether it passed.
fn step(
    steps: &mut Vec<Step>,
    name: &'static str,
    body: impl FnOnce() -> std::result::Result<(), String>,
) -> bool {
    println!("\n==> xtask test: {name}");
    let started = Instant::now();
    let outcome = match body() {
        Ok(()) => Outcome::Passed,
        Err(why) => {
            println!("xtask: step `{name}` failed: {why}");
            Outcome::Failed(why)
        }
    };
    let passed = matches!(outcome, Outcome::Passed);
    steps.push(Step {
        name,
        outcome,
        took: started.elapsed(),
    });
    passed
}

/// Arguments after `--` go to nextest (or to `cargo test` when nextest is absent).
fn nextest_args(args: &[String]) -> Result<Vec<String>> {
    match args.split_first() {
        None => Ok(Vec::new()),
        Some((first, rest)) if first == "--" => Ok(rest.to_vec()),
        Some((first, _)) => Err(Failure::Usage(format!(
            "unexpected `{first}`: pass test arguments after `--`, e.g. `cargo xtask test -- -E 'test(name)'`"
        ))),
    }
}

/// Whether `cargo nextest` works; as root, installs it when missing.
fn has_nextest(workspace: &Workspace) -> bool {
    let works = || stdout_of(workspace.cargo().args(["nextest", "--version"])).is_some();
    if works() {
        return true;
    }
    if !is_root() {
        return false;
    }
    println!("xtask: cargo-nextest is missing; installing it (a few minutes)");
    let installed = run(workspace
        .cargo()
        .args(["install", "cargo-nextest", "--locked"]));
    match installed {
        Ok(()) => works(),
        Err(why) => {
            println!("xtask: could not install cargo-nextest: {why}");
            false
        }
    }
}
