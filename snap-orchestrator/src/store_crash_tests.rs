//! Crash-state exploration of [`DomainLock::save`]: the save runs against a recording stand-in
//! for the file system ([`ReplaceSteps`]); every state a crash could leave is then put in the
//! domain's real folder and read back with [`DomainLock::load`], which must return the old
//! record or the new one, whole — never an error, never a mix.
//!
//! The file-system model: a step that returned is done in memory, but a change to the folder
//! (removing the stale temporary file, creating the temporary file, the rename) is durable only
//! once the folder is synced, so after a crash any subset of the folder changes since the last
//! folder sync may have reached the disk. The temporary file's data is durable once
//! `write_synced` returns; a crash inside it leaves the file missing, empty, or holding a prefix of
//! the bytes. A state may also hold a stale temporary file from an earlier crash. After each
//! state, a new save must succeed and be the one loaded (the next snapctl recovers).
//!
//! Real failures are injected too: each step in turn fails with an I/O error on the real file
//! system; the save must report it, leave the old record and no temporary file.

use super::*;

/// One recorded step.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    RemoveStale,
    WriteSynced(Vec<u8>),
    Rename,
    SyncDir,
    Discard,
}

/// Records the steps of a save and does nothing.
#[derive(Debug, Default)]
struct Recorder {
    steps: Vec<Step>,
}

impl ReplaceSteps for Recorder {
    fn remove_stale(&mut self, _: &Path) -> Result<()> {
        self.steps.push(Step::RemoveStale);
        Ok(())
    }
    fn write_synced(&mut self, _: &Path, bytes: &[u8]) -> Result<()> {
        self.steps.push(Step::WriteSynced(bytes.to_vec()));
        Ok(())
    }
    fn rename(&mut self, _: &Path, _: &Path) -> Result<()> {
        self.steps.push(Step::Rename);
        Ok(())
    }
    fn sync_dir(&mut self, _: &Path) -> Result<()> {
        self.steps.push(Step::SyncDir);
        Ok(())
    }
    fn discard(&mut self, _: &Path) {
        self.steps.push(Step::Discard);
    }
}

/// The real file system, failing step `fail_at` (0-based) with an I/O error.
struct FailAt {
    fail_at: usize,
    done: usize,
}

impl FailAt {
    fn step(&mut self) -> Result<()> {
        let n = self.done;
        self.done += 1;
        if n == self.fail_at {
            Err(Error::io(
                "injected failure",
                std::io::Error::other("injected"),
            ))
        } else {
            Ok(())
        }
    }
}

impl ReplaceSteps for FailAt {
    fn remove_stale(&mut self, tmp: &Path) -> Result<()> {
        self.step()?;
        RealSteps.remove_stale(tmp)
    }
    fn write_synced(&mut self, tmp: &Path, bytes: &[u8]) -> Result<()> {
        self.step()?;
        RealSteps.write_synced(tmp, bytes)
    }
    fn rename(&mut self, tmp: &Path, path: &Path) -> Result<()> {
        self.step()?;
        RealSteps.rename(tmp, path)
    }
    fn sync_dir(&mut self, dir: &Path) -> Result<()> {
        self.step()?;
        RealSteps.sync_dir(dir)
    }
    fn discard(&mut self, tmp: &Path) {
        RealSteps.discard(tmp)
    }
}

/// What a crash leaves in the folder: the record file and the temporary file (`None`: absent).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Folder {
    record: Option<Vec<u8>>,
    tmp: Option<Vec<u8>>,
}

/// A folder change not yet made durable by a folder sync.
#[derive(Debug, Clone)]
enum Pending {
    RemoveTmp,
    CreateTmp(Vec<u8>),
    Rename(Vec<u8>),
}

fn apply(folder: &Folder, changes: &[Pending]) -> Folder {
    let mut f = folder.clone();
    for change in changes {
        match change {
            Pending::RemoveTmp => f.tmp = None,
            Pending::CreateTmp(bytes) => f.tmp = Some(bytes.clone()),
            Pending::Rename(bytes) => {
                // The rename moves the inode whose data was synced before it: the whole new
                // bytes, whether or not the temporary name itself had reached the disk.
                f.record = Some(bytes.clone());
                f.tmp = None;
            }
        }
    }
    f
}

/// Every folder a crash during `steps` may leave, starting from `start`.
fn crash_states(start: &Folder, steps: &[Step]) -> Vec<(String, Folder)> {
    let mut states = Vec::new();
    let mut durable = start.clone();
    let mut pending: Vec<Pending> = Vec::new();
    let mut written: Option<Vec<u8>> = None;
    // Every subset of the pending changes (in order), plus `extra` changes at the end.
    let mut emit = |label: String, pending: &[Pending], durable: &Folder, extra: &[Pending]| {
        let n = pending.len();
        for mask in 0..(1u32 << n) {
            let mut kept: Vec<Pending> = pending
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, c)| c.clone())
                .collect();
            kept.extend_from_slice(extra);
            states.push((
                format!("{label}, pending folder changes kept {mask:#b} of {n}"),
                apply(durable, &kept),
            ));
        }
    };
    emit("before the first step".into(), &pending, &durable, &[]);
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::RemoveStale => pending.push(Pending::RemoveTmp),
            Step::WriteSynced(bytes) => {
                // A crash inside: the file created (or not) with a prefix of the data.
                let cuts = [0, 1, bytes.len() / 2, bytes.len().saturating_sub(1)];
                for cut in cuts {
                    let partial = bytes.get(..cut).unwrap_or_default().to_vec();
                    emit(
                        format!("inside step {i} (write {cut} of {} bytes)", bytes.len()),
                        &pending,
                        &durable,
                        &[Pending::CreateTmp(partial)],
                    );
                }
                pending.push(Pending::CreateTmp(bytes.clone()));
                written = Some(bytes.clone());
            }
            Step::Rename => {
                let bytes = written.clone().expect("rename before the data was synced");
                pending.push(Pending::Rename(bytes));
            }
            Step::SyncDir => {
                durable = apply(&durable, &pending);
                pending.clear();
            }
            Step::Discard => pending.push(Pending::RemoveTmp),
        }
        emit(
            format!("after step {i} ({step:?})"),
            &pending,
            &durable,
            &[],
        );
    }
    states
}

fn put(dir: &Path, folder: &Folder) {
    for (name, content) in [(RECORD_FILE, &folder.record), (RECORD_TMP, &folder.tmp)] {
        let path = dir.join(name);
        match content {
            Some(bytes) => fs::write(&path, bytes).unwrap(),
            None => {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

fn record(snapshots: &[&str]) -> DomainRecord {
    let config = DomainConfig {
        name: "vm1".to_string(),
        memory_mib: 256,
        vcpus: 1,
        ..DomainConfig::default()
    };
    let mut rec = DomainRecord::new("vm1", "qemu", config.clone(), None);
    let mut parent: Option<String> = None;
    for name in snapshots {
        rec.add_snapshot(SnapshotRecord {
            name: name.to_string(),
            parent: parent.clone(),
            created: "2026-01-02T03:04:05Z".to_string(),
            description: Some("x".repeat(300)),
            state: DomainState::Running,
            memory: None,
            consistency: Consistency::Crash,
            pause_window_ms: Some(12.5),
            config: config.clone(),
            disks: Vec::new(),
        })
        .unwrap();
        parent = Some(name.to_string());
    }
    rec.current = parent;
    rec
}

/// Explores one save of `new` over a folder holding `old` (and maybe a stale temporary file);
/// returns the number of crash states checked.
fn explore(old: Option<&DomainRecord>, stale_tmp: Option<&[u8]>, new: &DomainRecord) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    let lock = store.lock("vm1").unwrap();
    if let Some(old) = old {
        lock.save(old).unwrap();
    }
    let start = Folder {
        record: fs::read(lock.record_path()).ok(),
        tmp: stale_tmp.map(<[u8]>::to_vec),
    };
    let mut recorder = Recorder::default();
    lock.save_with(new, &mut recorder).unwrap();
    assert_eq!(
        recorder
            .steps
            .iter()
            .map(std::mem::discriminant)
            .collect::<Vec<_>>(),
        [
            Step::RemoveStale,
            Step::WriteSynced(Vec::new()),
            Step::Rename,
            Step::SyncDir
        ]
        .iter()
        .map(std::mem::discriminant)
        .collect::<Vec<_>>(),
        "a save is remove-stale, write+sync, rename, sync-dir"
    );
    let states = crash_states(&start, &recorder.steps);
    let (mut saw_old, mut saw_new) = (false, false);
    let recovery = {
        let mut r = new.clone();
        r.current = None;
        r.snapshots.clear();
        r.hypervisor = "xen".into();
        r
    };
    for (label, folder) in &states {
        put(lock.dir(), folder);
        let loaded = lock
            .load()
            .unwrap_or_else(|e| panic!("crash state [{label}]: load failed: {e} ({folder:?})"));
        match loaded {
            Some(rec) if &rec == new => saw_new = true,
            Some(rec) if Some(&rec) == old => saw_old = true,
            None if old.is_none() => saw_old = true,
            other => panic!(
                "crash state [{label}]: loaded neither the old nor the new record: {other:?}"
            ),
        }
        // The next snapctl saves over whatever the crash left.
        lock.save(&recovery)
            .unwrap_or_else(|e| panic!("crash state [{label}]: the next save failed: {e}"));
        assert_eq!(lock.load().unwrap().as_ref(), Some(&recovery), "[{label}]");
        assert!(
            !lock.dir().join(RECORD_TMP).exists(),
            "[{label}]: temporary file left"
        );
    }
    assert!(saw_old && saw_new, "both sides must be reachable");
    states.len()
}

#[test]
fn every_crash_state_of_a_save_loads_the_old_or_the_new_record() {
    let empty = record(&[]);
    let two = record(&["s1", "s2"]);
    let three = record(&["s1", "s2", "s3"]);
    let mut total = 0;
    // First save (no record yet), a replacing save, one with a stale temporary file (garbage and
    // a whole record of another tree), and a save that shrinks the record.
    total += explore(None, None, &empty);
    total += explore(Some(&two), None, &three);
    total += explore(Some(&two), Some(b"{ half a rec"), &three);
    total += explore(
        Some(&two),
        Some(&serde_json::to_vec_pretty(&empty).unwrap()),
        &three,
    );
    total += explore(Some(&three), None, &empty);
    eprintln!("metadata store: {total} crash states of DomainLock::save checked");
    assert!(total > 100);
}

#[test]
fn a_failed_step_leaves_the_old_record_and_no_temporary_file() {
    let old = record(&["s1"]);
    let new = record(&["s1", "s2"]);
    for fail_at in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let lock = store.lock("vm1").unwrap();
        lock.save(&old).unwrap();
        fs::write(lock.dir().join(RECORD_TMP), b"stale").unwrap();
        let mut steps = FailAt { fail_at, done: 0 };
        let result = lock.save_with(&new, &mut steps);
        let err = result.expect_err("the injected failure must be reported");
        assert_eq!(err.kind(), ErrorKind::Io, "step {fail_at}: {err}");
        let loaded = lock.load().unwrap();
        // A failure of the folder sync comes after the rename: the new record is in place.
        let want = if fail_at == 3 { &new } else { &old };
        assert_eq!(loaded.as_ref(), Some(want), "step {fail_at}");
        let tmp = lock.dir().join(RECORD_TMP);
        // The first step failing leaves the stale file as it was (nothing was done).
        assert_eq!(tmp.exists(), fail_at == 0, "step {fail_at}: temporary file");
        lock.save(&new).unwrap();
        assert!(!tmp.exists());
    }
}
