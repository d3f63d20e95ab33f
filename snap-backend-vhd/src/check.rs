//! Consistency check of one VHD file: checksums and footer copies (validated while opening),
//! every structure inside the file, and no two of them (footer copy, header, BAT, locator data,
//! blocks, footer) overlapping. Space no structure uses is reported as leaked (a crash during
//! an allocation leaves such space, and a relink leaves the old parent locator data unused on
//! purpose, since overwriting it in place would not be crash-safe; it is harmless).

use std::collections::BTreeMap;

use snap_core::{BlockIo, Result};

use crate::format::bat::UNUSED;
use crate::format::footer::FOOTER_LEN;
use crate::format::header::{HEADER_LEN, PlatformCode};
use crate::format::{SECTOR, sectors_for};
use crate::image::Vhd;

/// Most messages a report keeps (counts are always complete).
const MAX_MESSAGES: usize = 200;

/// The result of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that can lose data (overlapping structures, a damaged footer).
    pub corruptions: u64,
    /// Bytes of the data area no structure uses.
    pub leaked_bytes: u64,
    /// Blocks allocated.
    pub allocated_blocks: u64,
    /// Blocks the disk has.
    pub total_blocks: u64,
    /// Human-readable findings, at most 200.
    pub messages: Vec<String>,
}

impl CheckReport {
    fn corruption(&mut self, message: String) {
        self.corruptions += 1;
        self.note(message);
    }

    fn note(&mut self, message: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(message);
        }
    }

    /// True when nothing is corrupt (leaks are allowed).
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0
    }
}

/// Checks an open image.
pub fn check<IO: BlockIo>(image: &Vhd<IO>) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    for note in image.notes() {
        if image.footer_copy_stale() && !image.footer_from_copy() {
            // Both footers are valid and the end one is used: what an interrupted relink or type
            // change leaves (the footer is rewritten at the end first), not damage.
            report.note(format!(
                "{note}; an interrupted relink leaves this, harmless: the end copy is authoritative"
            ));
        } else {
            report.corruption(note.clone());
        }
    }
    let Some(header) = image.header() else {
        return Ok(report);
    };
    let mut extents: BTreeMap<u64, (u64, String)> = BTreeMap::new();
    let mut add = |report: &mut CheckReport, start: u64, len: u64, what: String| {
        if let Some((other_len, other)) = extents.get(&start) {
            report.corruption(format!(
                "{what} at {start:#x} overlaps {other} at {start:#x} (+{other_len:#x})"
            ));
        } else {
            extents.insert(start, (len, what));
        }
    };
    add(&mut report, 0, FOOTER_LEN as u64, "footer copy".into());
    add(
        &mut report,
        image.footer().data_offset,
        HEADER_LEN as u64,
        "dynamic header".into(),
    );
    let bat_len = sectors_for(u64::from(header.max_table_entries) * 4).unwrap_or(0) * SECTOR;
    add(&mut report, header.table_offset, bat_len, "BAT".into());
    for (i, entry) in header.locators.iter().enumerate() {
        if entry.platform == PlatformCode::None {
            continue;
        }
        match entry.space_bytes() {
            Some(space) if entry.data_offset + space <= image.footer_offset() => add(
                &mut report,
                entry.data_offset,
                space.max(u64::from(entry.data_length)),
                format!("parent locator {i}"),
            ),
            _ => report.corruption(format!("parent locator {i} lies outside the file")),
        }
    }
    let block_bytes = header.bitmap_bytes() + u64::from(header.block_size);
    let blocks = image.size().div_ceil(u64::from(header.block_size));
    report.total_blocks = blocks;
    for (index, entry) in image.bat().iter().enumerate() {
        if *entry == UNUSED {
            continue;
        }
        if index as u64 >= blocks {
            report.note(format!(
                "BAT entry {index} is set but the disk has only {blocks} blocks (ignored)"
            ));
            continue;
        }
        report.allocated_blocks += 1;
        let start = u64::from(*entry) * SECTOR;
        let len = block_bytes.min(image.footer_offset().saturating_sub(start));
        add(&mut report, start, len, format!("block {index}"));
    }
    add(
        &mut report,
        image.footer_offset(),
        FOOTER_LEN as u64,
        "footer".into(),
    );
    let mut end = 0u64;
    let mut previous = String::new();
    for (start, (len, what)) in &extents {
        if *start < end {
            report.corruption(format!(
                "{what} at {start:#x} overlaps {previous}, which runs to {end:#x}"
            ));
        } else {
            report.leaked_bytes += start - end;
        }
        if start + len > end {
            end = start + len;
            previous.clone_from(what);
        }
    }
    if report.leaked_bytes > 0 {
        report.note(format!(
            "{} bytes of the file belong to no structure (old parent locators or an interrupted allocation; harmless)",
            report.leaked_bytes
        ));
    }
    Ok(report)
}
