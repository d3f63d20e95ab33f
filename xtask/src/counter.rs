//! Reading the test guest's counter (see `guest.rs`): from its console log, and from sector 0
//! of its disk. Shared by the demo and the pause bench.

use crate::proc::run;
use std::path::Path;
use std::process::Command;

/// The `counter N` values on a console log, in order.
pub fn console_counters(console: &Path) -> Vec<u64> {
    let text = std::fs::read(console).unwrap_or_default();
    String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| {
            let at = l.find("counter ")?;
            l.get(at + 8..)?.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Waits (up to 120 s) for the console's counter to reach `at_least` (0: any); returns it.
pub fn wait_counter(console: &Path, at_least: u64) -> std::result::Result<u64, String> {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(120) {
        if let Some(last) = console_counters(console).last().copied()
            && last >= at_least
        {
            return Ok(last);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(format!(
        "the guest's counter did not reach {at_least} within 120 s (console {})",
        console.display()
    ))
}

/// Waits for the reverted guest's first counter: the first one after the first `seen` that is
/// lower than the one before it (the old guest may print a few more lines before it stops).
pub fn wait_new_counter(console: &Path, seen: usize) -> std::result::Result<u64, String> {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(120) {
        let all = console_counters(console);
        let drop = (seen.max(1)..all.len()).find(
            |&i| matches!((all.get(i), all.get(i - 1)), (Some(now), Some(before)) if now < before),
        );
        if let Some(first) = drop.and_then(|i| all.get(i)) {
            return Ok(*first);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err("the reverted guest printed nothing".to_string())
}

/// The counter in sector 0 of qcow2 image `image` (read with `qemu-img dd -U` through its chain;
/// relative to `dir`, where a scratch file is written).
pub fn read_counter(dir: &Path, image: &str) -> std::result::Result<u64, String> {
    let out = dir.join("sector0.raw");
    let _ = std::fs::remove_file(&out);
    run(Command::new("qemu-img").current_dir(dir).args([
        "dd",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "bs=512",
        "count=1",
        &format!("if={image}"),
        "of=sector0.raw",
    ]))?;
    let bytes = std::fs::read(&out).map_err(|e| format!("read {}: {e}", out.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    text.strip_prefix("counter ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no counter in sector 0 of {image}"))
}
