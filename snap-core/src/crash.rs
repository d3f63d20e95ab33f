//! Crash states of a recorded write log (in the manner of CrashMonkey), for crash-state tests.
//!
//! An operation runs over a [`RecordingIo`](crate::io::RecordingIo); its log of writes, length
//! changes and flushes is cut at every flush boundary (just before and just after each flush, and
//! at the end of the log), and at each boundary a bounded, deterministic sample of subsets of the
//! events not yet flushed is applied as well (those may or may not have reached the disk, in any
//! combination), plus one state with every pending write that spans an atomic unit (a 512-byte
//! sector by default) torn at a unit boundary in its middle. [`materialize`] applies a state's events to a copy of the bytes before the
//! operation.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};

use crate::io::{IoEvent, MemIo, replay};

/// Bytes a disk writes atomically.
pub const SECTOR: usize = 512;

/// One crash state: what it is and the events that reached the disk, in order.
#[derive(Debug, Clone)]
pub struct CrashState {
    /// A description for failure messages.
    pub label: String,
    /// The events applied to the image before the operation.
    pub events: Vec<IoEvent>,
    /// A flush-boundary prefix of the log (worth deeper checks: external tools, every view).
    pub boundary: bool,
}

/// A deterministic generator (xorshift64*), seeded per operation and boundary.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed` and `boundary`.
    pub fn new(seed: &str, boundary: usize) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        seed.hash(&mut h);
        boundary.hash(&mut h);
        Rng(h.finish() | 1)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Subsets (as keep-masks) of `n` pending events: all of them (but the full set) when there are
/// at most 4, else at most `max` of them: none, the last dropped, the first dropped, the last
/// alone, the first alone, then random ones (one dropped, half kept, three in four kept). The full
/// set is never included: it is the flush-boundary prefix itself.
pub fn subsets(n: usize, max: usize, rng: &mut Rng) -> Vec<Vec<bool>> {
    if n == 0 || max == 0 {
        return Vec::new();
    }
    if n <= 4 {
        return (0..(1u32 << n) - 1)
            .take(max)
            .map(|m| (0..n).map(|i| m & (1 << i) != 0).collect())
            .collect();
    }
    let mut out: Vec<Vec<bool>> = vec![vec![false; n]];
    let mut seen: HashSet<Vec<bool>> = out.iter().cloned().collect();
    let mut push = |mask: Vec<bool>, out: &mut Vec<Vec<bool>>| {
        if out.len() < max && !mask.iter().all(|k| *k) && seen.insert(mask.clone()) {
            out.push(mask);
        }
    };
    for drop in [n - 1, 0] {
        push((0..n).map(|i| i != drop).collect(), &mut out);
    }
    for keep in [n - 1, 0] {
        push((0..n).map(|i| i == keep).collect(), &mut out);
    }
    let mut attempts = 0;
    while out.len() < max && attempts < 200 {
        attempts += 1;
        let mask = match attempts % 3 {
            0 => {
                let drop = rng.below(n);
                (0..n).map(|i| i != drop).collect()
            }
            1 => (0..n).map(|_| rng.next_u64() % 2 == 0).collect(),
            _ => (0..n).map(|_| rng.next_u64() % 4 != 0).collect(),
        };
        push(mask, &mut out);
    }
    out
}

/// Every crash state of `log` (see the module documentation), with at most `max_subsets` subsets
/// of pending events per boundary; `seed` makes the random subsets reproducible. Writes are torn
/// at 512-byte boundaries.
pub fn crash_states(log: &[IoEvent], seed: &str, max_subsets: usize) -> Vec<CrashState> {
    crash_states_with_unit(log, seed, max_subsets, SECTOR)
}

/// [`crash_states`] for storage that writes `atomic_unit` bytes atomically (e.g. 4096 for a format
/// that relies on page-sized writes): a write is torn only at a multiple of `atomic_unit` (counted
/// from the start of the file) inside it — the first one from its middle on, else the last one
/// before — and a write inside one unit is never torn.
pub fn crash_states_with_unit(
    log: &[IoEvent],
    seed: &str,
    max_subsets: usize,
    atomic_unit: usize,
) -> Vec<CrashState> {
    let unit = atomic_unit.max(1) as u64;
    // Where a write is torn: the bytes kept from its start, if it spans a unit boundary.
    let tear = |offset: u64, len: usize| -> Option<usize> {
        let end = offset.checked_add(len as u64)?;
        let mut cut = (offset + len as u64 / 2).next_multiple_of(unit);
        if cut >= end {
            cut = end.checked_sub(1)? / unit * unit;
        }
        (cut > offset && cut < end).then(|| (cut - offset) as usize)
    };
    let mut states = vec![CrashState {
        label: "nothing written".into(),
        events: Vec::new(),
        boundary: true,
    }];
    let mut durable = 0usize; // log[..durable] reached the disk (the last flush included)
    let mut boundary = 0usize;
    let mut cut = |end: usize, end_of_log: bool, durable: usize, states: &mut Vec<CrashState>| {
        boundary += 1;
        let what = if end_of_log {
            "end of log".to_string()
        } else {
            format!("flush at event {end}")
        };
        if !end_of_log {
            states.push(CrashState {
                label: format!("just before {what}"),
                events: log.get(..end).unwrap_or_default().to_vec(),
                boundary: true,
            });
            states.push(CrashState {
                label: format!("just after {what}"),
                events: log.get(..=end).unwrap_or_default().to_vec(),
                boundary: true,
            });
        } else if end > durable {
            states.push(CrashState {
                label: what.clone(),
                events: log.get(..end).unwrap_or_default().to_vec(),
                boundary: true,
            });
        }
        let pending: Vec<usize> = (durable..end)
            .filter(|&i| !matches!(log.get(i), Some(IoEvent::Flush) | None))
            .collect();
        let mut rng = Rng::new(seed, boundary);
        for mask in subsets(pending.len(), max_subsets, &mut rng) {
            let mut events = log.get(..durable).unwrap_or_default().to_vec();
            let mut kept = Vec::new();
            for (&i, &keep) in pending.iter().zip(&mask) {
                if let (true, Some(event)) = (keep, log.get(i)) {
                    events.push(event.clone());
                    kept.push(i);
                }
            }
            states.push(CrashState {
                label: format!("{what}, of pending events {pending:?} only {kept:?} persisted"),
                events,
                boundary: false,
            });
        }
        // Torn writes: every pending write spanning an atomic unit reached the disk only up to a
        // unit boundary in its middle.
        let torn: Vec<usize> = pending
            .iter()
            .copied()
            .filter(|&i| {
                matches!(log.get(i), Some(IoEvent::Write { offset, data })
                    if tear(*offset, data.len()).is_some())
            })
            .collect();
        if !torn.is_empty() {
            let mut events = log.get(..durable).unwrap_or_default().to_vec();
            for event in pending.iter().filter_map(|&i| log.get(i)) {
                match event {
                    IoEvent::Write { offset, data } => {
                        let kept = tear(*offset, data.len()).unwrap_or(data.len());
                        events.push(IoEvent::Write {
                            offset: *offset,
                            data: data.get(..kept).unwrap_or_default().to_vec(),
                        });
                    }
                    e => events.push(e.clone()),
                }
            }
            states.push(CrashState {
                label: format!("{what}, pending writes {torn:?} torn at a middle sector"),
                events,
                boundary: false,
            });
        }
    };
    for (i, e) in log.iter().enumerate() {
        if matches!(e, IoEvent::Flush) {
            cut(i, false, durable, &mut states);
            durable = i + 1;
        }
    }
    cut(log.len(), true, durable, &mut states);
    states
}

/// `before` with `events` applied.
pub fn materialize(before: &[u8], events: &[IoEvent]) -> crate::Result<Vec<u8>> {
    let io = MemIo::from_bytes(before.to_vec());
    replay(&io, events)?;
    Ok(io.to_bytes())
}

/// A one-line description of a log (`3:W0x1000+0x200 4:F ...`), for failure messages.
pub fn describe(log: &[IoEvent]) -> String {
    log.iter()
        .enumerate()
        .map(|(i, e)| match e {
            IoEvent::Write { offset, data } => format!("{i}:W{offset:#x}+{:#x}", data.len()),
            IoEvent::SetLen(len) => format!("{i}:L{len:#x}"),
            IoEvent::Flush => format!("{i}:F"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(offset: u64, len: usize, byte: u8) -> IoEvent {
        IoEvent::Write {
            offset,
            data: vec![byte; len],
        }
    }

    #[test]
    fn states_cover_boundaries_subsets_and_torn_writes() {
        let log = vec![
            w(0, 1024, 1),
            w(2048, 512, 2),
            IoEvent::Flush,
            w(512, 512, 3),
            IoEvent::Flush,
        ];
        let states = crash_states(&log, "t", 16);
        let labels: Vec<&str> = states.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels[0], "nothing written");
        assert!(
            labels
                .iter()
                .any(|l| l.starts_with("just before flush at event 2"))
        );
        assert!(
            labels
                .iter()
                .any(|l| l.starts_with("just after flush at event 4"))
        );
        assert!(labels.iter().any(|l| l.contains("torn")));
        // Two pending events before the first flush: 3 proper subsets.
        let first: Vec<_> = states
            .iter()
            .filter(|s| s.label.starts_with("flush at event 2, of pending"))
            .collect();
        assert_eq!(first.len(), 3);
        let torn = states.iter().find(|s| s.label.contains("torn")).unwrap();
        let bytes = materialize(&[0u8; 4096], &torn.events).unwrap();
        assert_eq!(&bytes[..512], &[1u8; 512][..]);
        assert_eq!(&bytes[512..1024], &[0u8; 512][..]);
        assert_eq!(describe(&log[..3]), "0:W0x0+0x400 1:W0x800+0x200 2:F");
    }

    #[test]
    fn tearing_follows_the_atomic_unit() {
        // A 1024-byte write inside one 4 KiB page, and an 8 KiB write across pages.
        let log = vec![w(512, 1024, 1), w(0x1800, 8192, 2), IoEvent::Flush];
        let sector = crash_states(&log, "t", 0);
        let torn = sector.iter().find(|s| s.label.contains("torn")).unwrap();
        assert!(matches!(&torn.events[0], IoEvent::Write { data, .. } if data.len() == 512));
        let page = crash_states_with_unit(&log, "t", 0, 4096);
        let torn = page.iter().find(|s| s.label.contains("torn")).unwrap();
        assert!(torn.label.contains("[1]"), "{}", torn.label);
        assert!(matches!(&torn.events[0], IoEvent::Write { data, .. } if data.len() == 1024));
        // The middle is 0x1800 + 4096 = 0x2800; the next page boundary is 0x3000.
        assert!(matches!(&torn.events[1], IoEvent::Write { data, .. } if data.len() == 0x1800));
    }

    #[test]
    fn subsets_are_bounded_distinct_and_proper() {
        let mut rng = Rng::new("x", 1);
        let masks = subsets(12, 16, &mut rng);
        assert_eq!(masks.len(), 16);
        let distinct: HashSet<_> = masks.iter().collect();
        assert_eq!(distinct.len(), 16);
        assert!(masks.iter().all(|m| !m.iter().all(|k| *k)));
        assert_eq!(subsets(3, 16, &mut rng).len(), 7);
        assert_eq!(subsets(3, 2, &mut rng).len(), 2);
        assert!(subsets(0, 16, &mut rng).is_empty());
    }
}
