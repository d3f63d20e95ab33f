//! `snapctl`: VM disk and domain snapshots for Xen dom0s and QEMU/KVM hosts.

use std::process::ExitCode;

use clap::Parser;

use snap_orchestrator::cli::{Cli, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    snap_orchestrator::logging::init(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("snapctl: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let text = e.to_string().replace('\n', " ");
            eprintln!("snapctl: error: {text}");
            ExitCode::from(1)
        }
    }
}
