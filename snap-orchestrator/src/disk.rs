//! `snapctl disk ...`: format detection and dispatch to the backend crates, and output.

use std::path::{Path, PathBuf};

use serde_json::json;
use snap_backend_qcow2::online::{LayerStrategy, OnlineDisk, StreamOptions};
use snap_backend_qcow2::{CheckReport, Qcow2Backend, chain::probe_format, check_path};
use snap_core::io::FileIo;
use snap_core::{
    CreateRequest, DiskBackend, DiskFormat, DiskListing, Error, ErrorKind, Result, Target,
};

use crate::cli::{DiskCommand, FormatArg, OnlineArgs};

/// Runs one `disk` subcommand; returns the exit code.
pub async fn run(cmd: DiskCommand, dry_run: bool) -> Result<u8> {
    match cmd {
        DiskCommand::List {
            image,
            json,
            format,
            online,
        } => {
            if is_rbd(&image, format) {
                refuse_rbd_online(&online)?;
                return list_rbd(&image, json).await;
            }
            if let Some(disk) = connect_online(&online, &image).await? {
                return online_list(&disk, json).await;
            }
            if detect(&image, format)? == DiskFormat::Lvm {
                return list_lvm(&image, json).await;
            }
            let backend = backend_for(&image, format)?;
            let listing = backend.list().await?;
            if json {
                println!("{}", listing_json(&listing));
            } else {
                print_listing(&listing);
            }
            Ok(0)
        }
        DiskCommand::Create {
            image,
            name,
            external,
            overlay,
            size,
            json,
            format,
            online,
        } => {
            snap_core::model::validate_snapshot_name(&name)?;
            if is_rbd(&image, format) {
                refuse_rbd_online(&online)?;
                if size.is_some() {
                    return Err(Error::invalid("--size applies to LVM snapshots only"));
                }
                let overlay = if external { Some(overlay) } else { None };
                return create_rbd(&image, &name, overlay, json, dry_run).await;
            }
            if let Some(disk) = connect_online(&online, &image).await? {
                if size.is_some() {
                    return Err(Error::invalid("--size applies to LVM snapshots only"));
                }
                let overlay = if external { Some(overlay) } else { None };
                return online_create(&disk, &name, overlay, json, dry_run).await;
            }
            if detect(&image, format)? == DiskFormat::Lvm && !external {
                return create_lvm(&image, &name, size.as_deref(), json, dry_run).await;
            }
            if size.is_some() {
                return Err(Error::invalid("--size applies to LVM snapshots only"));
            }
            let backend = backend_for(&image, format)?;
            let request = if external {
                CreateRequest::External {
                    name: name.clone(),
                    overlay: overlay.clone(),
                }
            } else {
                CreateRequest::Internal { name: name.clone() }
            };
            if dry_run && external {
                let overlay = overlay.clone().unwrap_or_else(|| {
                    snap_backend_qcow2::external::default_overlay_path(&image, &name)
                });
                println!(
                    "plan: create overlay {} backed by {} (qcow2); it becomes the active layer (nothing changed: --dry-run)",
                    overlay.display(),
                    image.display()
                );
                return Ok(0);
            }
            if dry_run {
                let listing = backend.list().await?;
                if listing
                    .snapshots
                    .iter()
                    .any(|s| s.name == name || s.id == name)
                {
                    return Err(Error::new(
                        ErrorKind::Exists,
                        format!("a snapshot named {name:?} already exists"),
                    )
                    .with_path(&image));
                }
                println!(
                    "plan: create internal snapshot {name:?} in {} (nothing changed: --dry-run)",
                    image.display()
                );
                return Ok(0);
            }
            let outcome = backend.create(&request).await?;
            if json {
                println!(
                    "{}",
                    json!({"image": image, "active": outcome.active, "snapshot": {"id": outcome.id, "name": name}})
                );
            } else if external {
                println!("{}", outcome.active.display());
            } else {
                println!(
                    "created snapshot {name:?} (id {}) in {}",
                    outcome.id.as_deref().unwrap_or("-"),
                    image.display()
                );
            }
            Ok(0)
        }
        DiskCommand::Revert {
            image,
            name,
            layer,
            format,
            online,
        } => {
            if online.qmp.is_some() {
                return Err(snap_backend_qcow2::online::revert_refusal());
            }
            if is_rbd(&image, format) {
                return revert_rbd(&image, &target(name, layer)?, dry_run).await;
            }
            let backend = backend_for(&image, format)?;
            let target = target(name, layer)?;
            if dry_run {
                plan_existing(&*backend, &image, &target, "revert to").await?;
                return Ok(0);
            }
            if let (Some(lvm), Target::Internal(snapshot)) = (lvm_backend(&image, format)?, &target)
            {
                let outcome = lvm.revert_snapshot(snapshot).await?;
                println!(
                    "{}",
                    outcome.describe(&image.display().to_string(), snapshot)
                );
                return Ok(0);
            }
            backend.revert(&target).await?;
            println!("reverted {} to {}", image.display(), describe(&target));
            if matches!(target, Target::Layer(_)) {
                println!("{} is now an empty overlay on that layer", image.display());
            }
            Ok(0)
        }
        DiskCommand::Delete {
            image,
            name,
            layer,
            commit,
            format,
            online,
        } => {
            if is_rbd(&image, format) {
                refuse_rbd_online(&online)?;
                return delete_rbd(&image, &target(name, layer)?, dry_run).await;
            }
            if let Some(disk) = connect_online(&online, &image).await? {
                let strategy = if commit {
                    LayerStrategy::Commit
                } else {
                    LayerStrategy::Stream
                };
                return online_delete(&disk, &target(name, layer)?, strategy, dry_run).await;
            }
            let backend = backend_for(&image, format)?;
            let target = target(name, layer)?;
            if let Target::Layer(layer) = &target {
                if detect(&image, format)? == DiskFormat::Vhd {
                    return delete_vhd_layer(&image, layer, dry_run).await;
                }
                return delete_layer(&image, layer, dry_run).await;
            }
            if dry_run {
                plan_existing(&*backend, &image, &target, "delete").await?;
                return Ok(0);
            }
            backend.delete(&target).await?;
            println!("deleted {} from {}", describe(&target), image.display());
            Ok(0)
        }
        DiskCommand::Export {
            args,
            layer,
            format,
            since,
            json,
        } => {
            let (image, view, out) = crate::export::parse_export_args(args, layer)?;
            if let Some(since) = since {
                return crate::export::disk_export_diff(image, view, &since, out, json, dry_run)
                    .await;
            }
            let format = match format.unwrap_or(crate::cli::ExportFormatArg::Qcow2) {
                crate::cli::ExportFormatArg::Qcow2 => crate::export::OutputFormat::Qcow2,
                crate::cli::ExportFormatArg::Raw => crate::export::OutputFormat::Raw,
                crate::cli::ExportFormatArg::Vhd => crate::export::OutputFormat::Vhd,
            };
            crate::export::disk_export(image, view, out, format, json, dry_run).await
        }
        DiskCommand::Check {
            image,
            json,
            format,
        } => {
            let fmt = detect(&image, format)?;
            if fmt == DiskFormat::Rbd {
                snap_backend_rbd::RbdSpec::from_path(&image)?;
                return Err(Error::unsupported(
                    "RBD images have no client-side metadata to check: Ceph checks its objects \
                     itself (scrubbing; `ceph pg deep-scrub`)",
                )
                .with_path(&image));
            }
            if fmt == DiskFormat::Vhd {
                return check_vhd(&image, json).await;
            }
            if fmt != DiskFormat::Qcow2 {
                return Err(unsupported_format(&image, fmt));
            }
            let path = image.clone();
            let report = blocking(move || check_path(&path)).await?;
            print_check(&image, &report, json);
            if report.corruptions > 0 {
                return Err(Error::corrupt(format!(
                    "{} errors were found on the image; data may be corrupted",
                    report.corruptions
                ))
                .with_path(&image));
            }
            Ok(if report.leaks > 0 { 3 } else { 0 })
        }
    }
}

/// Runs file work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("worker thread failed: {e}")))?
}

/// The disk in a running QEMU when `--qmp SOCKET --node NODE` were given (connected, and checked
/// to hold `image` in its chain); `None` for an offline operation.
async fn connect_online(online: &OnlineArgs, image: &Path) -> Result<Option<OnlineDisk>> {
    let (socket, node) = match (&online.qmp, &online.node) {
        (Some(socket), Some(node)) => (socket, node),
        (None, None) => return Ok(None),
        _ => {
            return Err(Error::invalid(
                "--qmp SOCKET and --node NODE-NAME go together",
            ));
        }
    };
    let disk = OnlineDisk::connect(socket, node).await?;
    disk.check_image(image).await?;
    let active = disk.active_node().await?;
    if active.name != *node {
        eprintln!(
            "snapctl: note: node {node:?} is now a backing layer; working on the active node {:?} ({})",
            active.name,
            active.file.display()
        );
    }
    Ok(Some(disk))
}

/// `disk list --qmp`: what QEMU reports for the node.
async fn online_list(disk: &OnlineDisk, json: bool) -> Result<u8> {
    let listing = disk.list().await?;
    if json {
        println!("{}", listing_json(&listing));
    } else {
        print_listing(&listing);
    }
    Ok(0)
}

/// `disk create --qmp`: an internal snapshot, or (`overlay` given) an external overlay.
async fn online_create(
    disk: &OnlineDisk,
    name: &str,
    overlay: Option<Option<PathBuf>>,
    json: bool,
    dry_run: bool,
) -> Result<u8> {
    if let Some(overlay) = overlay {
        if dry_run {
            let (top, path, node) = disk.plan_external(name, overlay.as_deref()).await?;
            println!(
                "plan: QEMU creates overlay {} (node {node}) on node {} ({}, qcow2); it becomes the active layer \
                 (nothing changed: --dry-run)",
                path.display(),
                top.name,
                top.file.display()
            );
            return Ok(0);
        }
        let backing = disk.active_node().await?;
        let out = disk.create_external(name, overlay.as_deref()).await?;
        if json {
            println!(
                "{}",
                json!({"image": backing.file, "active": out.overlay, "node": out.node,
                       "snapshot": {"id": null, "name": name}})
            );
        } else {
            println!("{}", out.overlay.display());
        }
        return Ok(0);
    }
    let active = disk.active_node().await?;
    if dry_run {
        let listing = disk.list().await?;
        if listing
            .snapshots
            .iter()
            .any(|s| s.name == name || s.id == name)
        {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("a snapshot named {name:?} already exists"),
            )
            .with_path(&active.file));
        }
        println!(
            "plan: create internal snapshot {name:?} of node {} ({}) through QMP (nothing changed: --dry-run)",
            active.name,
            active.file.display()
        );
        return Ok(0);
    }
    let snap = disk.create_internal(name).await?;
    if json {
        println!(
            "{}",
            json!({"image": active.file, "active": active.file, "snapshot": {"id": snap.id, "name": name}})
        );
    } else {
        println!(
            "created snapshot {name:?} (id {}) in {} through QMP",
            snap.id,
            active.file.display()
        );
    }
    Ok(0)
}

/// `disk delete --qmp`: an internal snapshot, or a backing layer streamed into its child (or,
/// with `--commit`, committed into its own backing).
async fn online_delete(
    disk: &OnlineDisk,
    target: &Target,
    strategy: LayerStrategy,
    dry_run: bool,
) -> Result<u8> {
    let active = disk.active_node().await?;
    match target {
        Target::Internal(name) => {
            if dry_run {
                let listing = disk.list().await?;
                let Some(s) = listing
                    .snapshots
                    .iter()
                    .find(|s| &s.name == name)
                    .or_else(|| listing.snapshots.iter().find(|s| &s.id == name))
                else {
                    return Err(Error::not_found(format!("no snapshot named {name:?}"))
                        .with_path(&active.file));
                };
                println!(
                    "plan: delete snapshot {:?} (id {}) of node {} ({}) through QMP (nothing changed: --dry-run)",
                    s.name,
                    s.id,
                    active.name,
                    active.file.display()
                );
                return Ok(0);
            }
            let snap = disk.delete_internal(name).await?;
            println!(
                "deleted snapshot {:?} (id {}) from {} through QMP",
                snap.name,
                snap.id,
                active.file.display()
            );
        }
        Target::Layer(layer) if strategy == LayerStrategy::Commit => {
            return online_commit(disk, layer, dry_run).await;
        }
        Target::Layer(layer) => {
            if dry_run {
                let chain = disk.chain_nodes().await?;
                let Some(i) = chain.iter().position(|n| {
                    std::fs::canonicalize(&n.file).ok() == std::fs::canonicalize(layer).ok()
                        || n.file == *layer
                }) else {
                    return Err(Error::not_found(format!(
                        "{} is not a layer of the node's chain",
                        layer.display()
                    ))
                    .with_path(layer));
                };
                let child = i.checked_sub(1).and_then(|c| chain.get(c)).ok_or_else(|| {
                    Error::invalid("this is the active layer, not a backing layer").with_path(layer)
                })?;
                println!(
                    "plan: QEMU streams {} into {} (node {}), which then reads from {}; the file is kept \
                     (nothing changed: --dry-run)",
                    layer.display(),
                    child.file.display(),
                    child.name,
                    chain
                        .get(i + 1)
                        .map(|b| b.file.display().to_string())
                        .unwrap_or_else(|| "no backing file".into())
                );
                return Ok(0);
            }
            let bar = progress_bar();
            let result = disk
                .delete_layer(
                    layer,
                    &StreamOptions::default(),
                    show_progress(&bar),
                    ctrl_c(),
                )
                .await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let done = result?;
            println!(
                "merged {} into {} ({} bytes processed) through QMP; {} now reads from {}",
                done.layer.display(),
                done.child.file.display(),
                done.bytes,
                done.child.file.display(),
                done.new_backing
                    .as_ref()
                    .map(|b| b.file.display().to_string())
                    .unwrap_or_else(|| "no backing file".into())
            );
            println!(
                "kept {}: online operations never remove files; remove it once no QEMU has it open",
                done.layer.display()
            );
        }
    }
    Ok(0)
}

/// `disk delete --qmp --layer PATH --commit`: the layer committed into its own backing.
async fn online_commit(disk: &OnlineDisk, layer: &Path, dry_run: bool) -> Result<u8> {
    let plan = disk.plan_layer(layer).await?;
    if let Some(why) = &plan.commit_refusal {
        return Err(Error::new(
            ErrorKind::InUse,
            format!("cannot commit {}: {why}", layer.display()),
        )
        .with_path(layer));
    }
    let parent = plan
        .parent
        .as_ref()
        .map(|p| format!("{} (node {})", p.file.display(), p.name))
        .unwrap_or_default();
    if dry_run {
        let bytes = |b: Option<u64>| {
            b.map(|b| format!("at most about {b} bytes"))
                .unwrap_or_else(|| "unknown bytes".into())
        };
        println!(
            "plan: QEMU commits {} into {parent} ({}); {} (node {}) then reads from it; the file is kept \
             (nothing changed: --dry-run)",
            layer.display(),
            bytes(plan.commit_bytes),
            plan.child.file.display(),
            plan.child.name,
        );
        println!(
            "  stream instead (without --commit): {} into {}",
            bytes(plan.stream_bytes),
            plan.child.file.display()
        );
        return Ok(0);
    }
    let bar = progress_bar();
    let result = disk
        .commit_layer(
            layer,
            &StreamOptions::default(),
            show_progress(&bar),
            ctrl_c(),
        )
        .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let done = result?;
    println!(
        "committed {} into {} ({} bytes processed) through QMP; {} now reads from {}",
        done.layer.file.display(),
        done.into.file.display(),
        done.bytes,
        plan.child.file.display(),
        done.into.file.display(),
    );
    println!(
        "kept {}: online operations never remove files; remove it once no QEMU has it open",
        done.layer.file.display()
    );
    Ok(0)
}

fn target(name: Option<String>, layer: Option<PathBuf>) -> Result<Target> {
    match (name, layer) {
        (Some(name), None) => Ok(Target::Internal(name)),
        (None, Some(layer)) => Ok(Target::Layer(layer)),
        _ => Err(Error::invalid(
            "give either a snapshot NAME or --layer PATH",
        )),
    }
}

fn describe(target: &Target) -> String {
    match target {
        Target::Internal(name) => format!("snapshot {name:?}"),
        Target::Layer(path) => format!("layer {}", path.display()),
    }
}

/// `disk check` of a VHD chain: every layer's structures (BAT in range, no overlapping blocks,
/// footer copies equal, checksums). Space no structure uses (left behind by a relink on
/// purpose) is reported, not an error.
async fn check_vhd(image: &Path, json: bool) -> Result<u8> {
    let path = image.to_path_buf();
    let report = blocking(move || snap_backend_vhd::check_path(&path, Default::default())).await?;
    if json {
        println!(
            "{}",
            json!({
                "image": image,
                "format": "vhd",
                "corruptions": report.corruptions,
                "leaked_bytes": report.leaked_bytes,
                "allocated_blocks": report.allocated_blocks,
                "total_blocks": report.total_blocks,
                "messages": report.messages,
            })
        );
    } else {
        for m in &report.messages {
            println!("{m}");
        }
        if report.corruptions == 0 {
            println!("No errors were found on the image.");
        }
        if report.leaked_bytes > 0 {
            println!(
                "{} bytes of the file are unused (harmless).",
                report.leaked_bytes
            );
        }
        println!(
            "{}/{} blocks allocated",
            report.allocated_blocks, report.total_blocks
        );
    }
    if report.corruptions > 0 {
        return Err(Error::corrupt(format!(
            "{} errors were found on the image; data may be corrupted",
            report.corruptions
        ))
        .with_path(image));
    }
    Ok(0)
}

/// `disk delete IMAGE --layer PATH` for VHD chains: coalesce into the child (progress bar),
/// reparent.
async fn delete_vhd_layer(image: &Path, layer: &Path, dry_run: bool) -> Result<u8> {
    let (image, layer) = (image.to_path_buf(), layer.to_path_buf());
    if dry_run {
        let listing = {
            let image = image.clone();
            blocking(move || snap_backend_vhd::list_path(&image, Default::default())).await?
        };
        let want = std::fs::canonicalize(&layer)
            .map_err(|e| Error::io("open layer", e).with_path(&layer))?;
        let Some(index) = listing
            .chain
            .iter()
            .position(|l| std::fs::canonicalize(&l.path).ok().as_deref() == Some(want.as_path()))
        else {
            return Err(Error::not_found(format!(
                "{} is not a backing layer of this image",
                layer.display()
            ))
            .with_path(&image));
        };
        let child = index
            .checked_sub(1)
            .and_then(|i| listing.chain.get(i))
            .map(|l| l.path.clone())
            .unwrap_or(image);
        let parent = listing
            .chain
            .get(index + 1)
            .map(|l| l.path.display().to_string());
        println!(
            "plan: coalesce {} into {}, then reparent {} to {}, then remove {} unless other disks in its folder use it \
             (nothing changed: --dry-run)",
            layer.display(),
            child.display(),
            child.display(),
            parent.unwrap_or_else(|| "nothing (it becomes a dynamic disk)".into()),
            layer.display()
        );
        return Ok(0);
    }
    let out = blocking(move || {
        let bar = progress_bar();
        let mut show = show_progress(&bar);
        let result = snap_backend_vhd::delete_layer_with_progress(
            &image,
            &layer,
            Default::default(),
            |done, total| {
                show(done, total);
                true
            },
        );
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        result.map(|o| (o, layer))
    })
    .await?;
    let (outcome, layer) = out;
    println!(
        "merged {} into {} ({} bytes copied){}",
        layer.display(),
        outcome.child.display(),
        outcome.sectors_copied * 512,
        if outcome.child_now_dynamic {
            "; it is now a dynamic disk with no parent"
        } else {
            ""
        }
    );
    if outcome.removed {
        println!("removed {}", layer.display());
    } else {
        let users: Vec<String> = outcome
            .kept_for
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        println!(
            "kept {}: it is still the parent of {}",
            layer.display(),
            users.join(", ")
        );
    }
    Ok(0)
}

/// `disk delete IMAGE --layer PATH` (qcow2 chains): plan, progress bar, and what was kept.
async fn delete_layer(image: &Path, layer: &Path, dry_run: bool) -> Result<u8> {
    let (image, layer) = (image.to_path_buf(), layer.to_path_buf());
    if dry_run {
        let plan =
            blocking(move || snap_backend_qcow2::external::plan_delete_layer(&image, &layer))
                .await?;
        print_layer_plan(&plan);
        println!("(nothing changed: --dry-run)");
        return Ok(0);
    }
    let done = blocking(move || {
        let bar = progress_bar();
        let result = snap_backend_qcow2::external::delete_layer(&image, &layer, |done, total| {
            if let Some(bar) = &bar {
                bar.set_length(total);
                bar.set_position(done);
            }
            true
        });
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        result
    })
    .await?;
    let plan = &done.plan;
    let reads_from = plan
        .new_backing
        .as_ref()
        .map(|b| b.path.display().to_string())
        .unwrap_or_else(|| "no backing file".into());
    if plan.folds() {
        println!(
            "folded {} into {} ({} bytes copied) and put it in the child's place; {} now reads \
             from {}",
            plan.child.display(),
            plan.layer.display(),
            plan.fold_bytes.unwrap_or_default(),
            plan.child.display(),
            reads_from
        );
    } else {
        println!(
            "merged {} into {} ({} bytes copied); {} now reads from {}",
            plan.layer.display(),
            plan.child.display(),
            plan.stream_bytes,
            plan.child.display(),
            reads_from
        );
    }
    if done.removed {
        println!("removed {}", plan.layer.display());
    } else {
        let users: Vec<String> = plan
            .other_users
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        println!(
            "kept {}: it is still the backing file of {}",
            plan.layer.display(),
            users.join(", ")
        );
    }
    Ok(0)
}

fn print_layer_plan(plan: &snap_backend_qcow2::external::LayerPlan) {
    println!("plan: delete layer {}", plan.layer.display());
    println!(
        "  stream: copy {} bytes (clusters it has that {} lacks) into {}, then relink {} to {}",
        plan.stream_bytes,
        plan.child.display(),
        plan.child.display(),
        plan.child.display(),
        plan.new_backing
            .as_ref()
            .map(|b| b.path.display().to_string())
            .unwrap_or_else(|| "no backing file".into())
    );
    match plan.fold_bytes {
        Some(bytes) if plan.folds() => println!(
            "  fold (chosen: copies less): copy the {bytes} bytes {} has into {}, which then takes \
             its place under its name, owner and mode (the layer has no other user)",
            plan.child.display(),
            plan.layer.display()
        ),
        Some(bytes) => println!(
            "  fold (alternative): copy the {bytes} bytes {} has into {} and put it in its place \
             — not cheaper here",
            plan.child.display(),
            plan.layer.display()
        ),
        None => {}
    }
    match plan.commit_bytes {
        Some(bytes) => println!(
            "  commit (alternative): copy {bytes} bytes into {} — writes the parent; snapctl streams instead, which copies {} and never writes the parent",
            plan.new_backing
                .as_ref()
                .map(|b| b.path.display().to_string())
                .unwrap_or_default(),
            if plan.stream_bytes <= bytes {
                "no more"
            } else {
                "more but"
            }
        ),
        None => println!("  commit: not possible (the layer is the base of the chain)"),
    }
    if plan.folds() {
        println!(
            "  then {} is gone (renamed over {})",
            plan.layer.display(),
            plan.child.display()
        );
    } else if plan.other_users.is_empty() {
        println!("  then remove {}", plan.layer.display());
    } else {
        let users: Vec<String> = plan
            .other_users
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        println!(
            "  then keep {}: still the backing file of {}",
            plan.layer.display(),
            users.join(", ")
        );
    }
}

/// Resolves on Ctrl-C (never, when no handler can be installed): what cancels a QMP job.
async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A progress callback that moves `bar`, if there is one, to (done, total).
fn show_progress(bar: &Option<indicatif::ProgressBar>) -> impl FnMut(u64, u64) + '_ {
    move |done, total| {
        if let Some(bar) = bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    }
}

/// A progress bar on stderr when it is a terminal.
fn progress_bar() -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

async fn plan_existing(
    backend: &dyn DiskBackend,
    image: &Path,
    target: &Target,
    verb: &str,
) -> Result<()> {
    let listing = backend.list().await?;
    if let Target::Internal(name) = target {
        let Some(s) = listing
            .snapshots
            .iter()
            .find(|s| &s.name == name)
            .or_else(|| listing.snapshots.iter().find(|s| &s.id == name))
        else {
            return Err(Error::not_found(format!("no snapshot named {name:?}")).with_path(image));
        };
        println!(
            "plan: {verb} snapshot {:?} (id {}) of {} (nothing changed: --dry-run)",
            s.name,
            s.id,
            image.display()
        );
        return Ok(());
    }
    if let Target::Layer(layer) = target {
        let want = std::fs::canonicalize(layer)
            .map_err(|e| Error::io("open layer", e).with_path(layer))?;
        let in_chain = listing
            .chain
            .iter()
            .any(|l| std::fs::canonicalize(&l.path).ok().as_deref() == Some(want.as_path()));
        if !in_chain {
            return Err(Error::not_found(format!(
                "{} is not a backing layer of this image",
                layer.display()
            ))
            .with_path(image));
        }
        println!(
            "plan: {verb} layer {}: {} becomes an empty overlay on it and its current data is dropped (nothing changed: --dry-run)",
            layer.display(),
            image.display()
        );
    }
    Ok(())
}

/// Decides the disk's format: `--format`, else probed from the file's content.
pub(crate) fn detect(image: &Path, format: Option<FormatArg>) -> Result<DiskFormat> {
    if let Some(f) = format {
        return Ok(match f {
            FormatArg::Qcow2 => DiskFormat::Qcow2,
            FormatArg::Vhd => DiskFormat::Vhd,
            FormatArg::Lvm => DiskFormat::Lvm,
            FormatArg::Rbd => DiskFormat::Rbd,
        });
    }
    let text = image.to_string_lossy();
    if text.starts_with("rbd:") {
        return Ok(DiskFormat::Rbd);
    }
    // An LV is named, not probed: /dev/VG/LV, or VG/LV when no such file exists — unless the
    // name ends like an image file (a mistyped `vms/disk.qcow2` should say "no such file", not
    // "no volume group vms").
    let image_like = image.extension().is_some_and(|e| {
        ["qcow2", "qcow", "vhd", "vpc", "img", "raw"].contains(&e.to_string_lossy().as_ref())
    });
    if snap_backend_lvm::LvRef::looks_like(&text)
        && (text.starts_with("/dev/") || (!image.exists() && !image_like))
    {
        return Ok(DiskFormat::Lvm);
    }
    let io = FileIo::open(image, false)?;
    if std::fs::metadata(image)
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        return Err(Error::invalid("is a directory, not a disk image").with_path(image));
    }
    probe_format(&io).map_err(|e| e.with_path(image))
}

fn unsupported_format(image: &Path, format: DiskFormat) -> Error {
    let message = match format {
        DiskFormat::Raw => "not a snapshot-capable image: the content is neither qcow2 nor VHD (a raw file or \
                            junk). Raw images have no snapshots; convert with `qemu-img convert -O qcow2` first"
            .to_string(),
        other => format!("{other} disks are not supported yet"),
    };
    Error::new(ErrorKind::Unsupported, message).with_path(image)
}

/// The LVM backend when `image` names an LV.
fn lvm_backend(
    image: &Path,
    format: Option<FormatArg>,
) -> Result<Option<snap_backend_lvm::LvmBackend>> {
    match detect(image, format)? {
        DiskFormat::Lvm => Ok(Some(snap_backend_lvm::LvmBackend::new(image)?)),
        _ => Ok(None),
    }
}

/// `disk list` of an LV: its snapshots with size, type and fill; warnings on stderr.
async fn list_lvm(image: &Path, json: bool) -> Result<u8> {
    let lvm = snap_backend_lvm::LvmBackend::new(image)?;
    let listing = lvm.list_detailed().await?;
    for warning in &listing.warnings {
        eprintln!("snapctl: warning: {warning}");
    }
    if json {
        println!("{}", listing_json(&listing.to_disk_listing()));
        return Ok(0);
    }
    println!(
        "image: {} (lvm{}, size {} = {} bytes)",
        listing.image,
        if listing.thin { ", thin" } else { "" },
        human_size(listing.size),
        listing.size
    );
    if listing.snapshots.is_empty() {
        println!("no snapshots");
    }
    for s in &listing.snapshots {
        let fill = s
            .fill_percent
            .map(|f| format!("{f:.1}% full"))
            .unwrap_or_else(|| "fill unknown".into());
        println!(
            "  {}  {:?}  {}  {}{}{}",
            s.name,
            s.kind,
            human_size(s.size),
            fill,
            if s.invalid == Some(true) {
                "  INVALID"
            } else {
                ""
            },
            if s.merging { "  merging" } else { "" }
        );
    }
    Ok(0)
}

/// `disk create` of an LV: a thin snapshot of a thin origin, else a classic one of `size`.
async fn create_lvm(
    image: &Path,
    name: &str,
    size: Option<&str>,
    json: bool,
    dry_run: bool,
) -> Result<u8> {
    let mut lvm = snap_backend_lvm::LvmBackend::new(image)?;
    if let Some(size) = size {
        lvm = lvm.with_snapshot_size(parse_lvm_size(size)?);
    }
    if dry_run {
        let listing = lvm.list_detailed().await?;
        if listing.snapshot(name).is_some() {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("a snapshot named {name:?} already exists"),
            )
            .with_path(image));
        }
        println!(
            "plan: create {} snapshot LV {name:?} of {} (nothing changed: --dry-run)",
            if listing.thin {
                "a thin"
            } else {
                "a classic (COW)"
            },
            image.display()
        );
        return Ok(0);
    }
    let info = lvm.create_snapshot(name).await?;
    if json {
        println!(
            "{}",
            json!({"image": image, "active": image, "snapshot": {"id": info.lv, "name": name}})
        );
    } else {
        println!(
            "created {:?} snapshot {}{}",
            info.kind,
            info.lv,
            info.size
                .map(|s| format!(" ({})", human_size(s)))
                .unwrap_or_default()
        );
        if info.skip_activation {
            println!(
                "it is skipped on normal activation: use `lvchange -ay -K {}` to activate it",
                info.lv
            );
        }
    }
    Ok(0)
}

/// `--size`: bytes with an optional K/M/G/T suffix (powers of 1024), or `N%` of the origin.
fn parse_lvm_size(text: &str) -> Result<snap_backend_lvm::SnapshotSize> {
    let bad = || {
        Error::invalid(format!(
            "--size {text:?}: expected bytes with an optional K/M/G/T suffix, or N%"
        ))
    };
    if let Some(p) = text.strip_suffix('%') {
        let p: u32 = p.parse().map_err(|_| bad())?;
        if p == 0 || p > 100 {
            return Err(bad());
        }
        return Ok(snap_backend_lvm::SnapshotSize::PercentOfOrigin(p));
    }
    let suffixed = [('K', 10), ('M', 20), ('G', 30), ('T', 40)]
        .into_iter()
        .find_map(|(unit, shift)| {
            text.strip_suffix([unit, unit.to_ascii_lowercase()])
                .map(|d| (d, shift))
        });
    let (digits, shift) = suffixed.unwrap_or((text, 0));
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .filter(|b| *b > 0)
        .ok_or_else(bad)?;
    Ok(snap_backend_lvm::SnapshotSize::Bytes(bytes))
}

fn backend_for(image: &Path, format: Option<FormatArg>) -> Result<Box<dyn DiskBackend>> {
    match detect(image, format)? {
        DiskFormat::Qcow2 => Ok(Box::new(Qcow2Backend::new(image))),
        DiskFormat::Vhd => Ok(Box::new(snap_backend_vhd::VhdBackend::new(image))),
        DiskFormat::Lvm => Ok(Box::new(snap_backend_lvm::LvmBackend::new(image)?)),
        DiskFormat::Rbd => Ok(Box::new(snap_backend_rbd::RbdBackend::new(image)?)),
        other => Err(unsupported_format(image, other)),
    }
}

/// The contract's `disk list --json` object.
pub fn listing_json(listing: &DiskListing) -> serde_json::Value {
    json!({
        "image": listing.image,
        "format": listing.format.as_str(),
        "virtual_size": listing.virtual_size,
        "snapshots": listing.snapshots.iter().map(|s| json!({
            "id": s.id,
            "name": s.name,
            "vm_state_size": s.vm_state_size,
            "date": s.date_rfc3339(),
            "vm_clock_ns": s.vm_clock_ns,
        })).collect::<Vec<_>>(),
        "chain": listing.chain.iter().map(|l| json!({"path": l.path, "format": l.format.as_str()})).collect::<Vec<_>>(),
    })
}

/// A byte count for people: `512 B`, `1.5 GiB`.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let name = UNITS.get(unit).copied().unwrap_or("B");
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {name}")
    }
}

fn print_listing(listing: &DiskListing) {
    println!(
        "image: {} ({}, virtual size {} = {} bytes)",
        listing.image.display(),
        listing.format,
        human_size(listing.virtual_size),
        listing.virtual_size
    );
    if listing.snapshots.is_empty() {
        println!("no snapshots");
    } else {
        let name_width = listing
            .snapshots
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(4)
            .clamp(4, 64);
        let id_width = listing
            .snapshots
            .iter()
            .map(|s| s.id.len())
            .max()
            .unwrap_or(2)
            .clamp(2, 16);
        println!(
            "{:<id_width$}  {:<name_width$}  {:>9}  {:<20}  VM CLOCK",
            "ID", "NAME", "VM SIZE", "DATE"
        );
        for s in &listing.snapshots {
            let clock = s.vm_clock_ns / 1_000_000;
            println!(
                "{:<id_width$}  {:<name_width$}  {:>9}  {:<20}  {:02}:{:02}:{:02}.{:03}",
                s.id,
                s.name,
                human_size(s.vm_state_size),
                s.date_rfc3339(),
                clock / 3_600_000,
                clock / 60_000 % 60,
                clock / 1000 % 60,
                clock % 1000
            );
        }
    }
    if listing.chain.is_empty() {
        println!("backing chain: none");
    } else {
        println!("backing chain (parent first):");
        for layer in &listing.chain {
            println!("  {} ({})", layer.path.display(), layer.format);
        }
    }
}

fn print_check(image: &Path, report: &CheckReport, json: bool) {
    if json {
        println!(
            "{}",
            json!({
                "image": image,
                "format": "qcow2",
                "corruptions": report.corruptions,
                "leaks": report.leaks,
                "allocated_clusters": report.allocated_clusters,
                "total_clusters": report.total_clusters,
                "image_end_offset": report.image_end_offset,
                "messages": report.messages,
            })
        );
        return;
    }
    for m in &report.messages {
        println!("{m}");
    }
    if report.is_clean() {
        println!("No errors were found on the image.");
    }
    if report.leaks > 0 {
        println!(
            "{} leaked clusters were found on the image. This wastes space but harms no data.",
            report.leaks
        );
    }
    println!(
        "{}/{} clusters allocated; image end offset {}",
        report.allocated_clusters, report.total_clusters, report.image_end_offset
    );
}

// ---------------------------------------------------------------------------------------------
// RBD

/// Whether `image` is an RBD disk (`--format rbd`, or a name starting `rbd:`); names are
/// checked when the backend is made.
fn is_rbd(image: &Path, format: Option<FormatArg>) -> bool {
    match format {
        Some(f) => f == FormatArg::Rbd,
        None => image
            .to_string_lossy()
            .starts_with(snap_backend_rbd::name::PREFIX),
    }
}

/// `--qmp` is for QEMU's qcow2 nodes: Ceph coordinates RBD snapshots with the QEMU that has the
/// image open, so they need no QMP.
fn refuse_rbd_online(online: &OnlineArgs) -> Result<()> {
    if online.qmp.is_some() || online.node.is_some() {
        return Err(Error::invalid(
            "--qmp/--node do not apply to RBD disks: Ceph coordinates snapshots with the QEMU that \
             has the image open; run without them",
        ));
    }
    Ok(())
}

fn rbd_backend(image: &Path) -> Result<snap_backend_rbd::RbdBackend> {
    snap_backend_rbd::RbdBackend::new(image)
}

/// RFC 3339 of a time in seconds, or `-`.
fn rbd_date(time: Option<i64>) -> String {
    time.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".to_string())
}

/// `disk list` of an RBD image: snapshots with protection, the clone chain, who has it open.
async fn list_rbd(image: &Path, json: bool) -> Result<u8> {
    let backend = rbd_backend(image)?;
    if json {
        println!("{}", listing_json(&backend.list().await?));
        return Ok(0);
    }
    let l = backend.list_detailed().await?;
    println!(
        "image: {} (rbd, size {} = {} bytes)",
        l.image,
        human_size(l.size),
        l.size
    );
    if l.snapshots.is_empty() {
        println!("no snapshots");
    } else {
        let width = l
            .snapshots
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(4)
            .clamp(4, 64);
        println!(
            "{:>6}  {:<width$}  {:>9}  {:<20}  PROTECTED",
            "ID", "NAME", "SIZE", "DATE"
        );
        for s in &l.snapshots {
            println!(
                "{:>6}  {:<width$}  {:>9}  {:<20}  {}",
                s.id,
                s.name,
                human_size(s.size),
                rbd_date(s.time),
                if s.protected { "yes" } else { "no" }
            );
        }
    }
    if l.chain.is_empty() {
        println!("clone parents: none");
    } else {
        println!("clone parents (nearest first):");
        for c in &l.chain {
            println!("  {c}");
        }
    }
    match l.watchers.as_deref() {
        Some([]) | None => println!("open by: nobody"),
        Some(w) => println!("open by: {}", w.join(", ")),
    }
    Ok(0)
}

/// `disk create` of an RBD image: `rbd snap create`, or with `--external` a protected snapshot
/// cloned into a new image that becomes the active one.
async fn create_rbd(
    image: &Path,
    name: &str,
    overlay: Option<Option<PathBuf>>,
    json: bool,
    dry_run: bool,
) -> Result<u8> {
    let backend = rbd_backend(image)?;
    let spec = backend.spec().clone();
    if let Some(overlay) = overlay {
        let overlay = overlay
            .as_deref()
            .map(snap_backend_rbd::RbdSpec::from_path)
            .transpose()?;
        if dry_run {
            let target = backend.plan_clone(name, overlay.as_ref()).await?;
            println!(
                "plan: snapshot {spec}@{name}, protect it, clone it into {target}; {target} becomes the \
                 active image (nothing changed: --dry-run)"
            );
            return Ok(0);
        }
        let clone = backend.create_clone(name, overlay.as_ref()).await?;
        if json {
            println!(
                "{}",
                json!({"image": spec.to_string(), "active": clone.to_string(),
                       "snapshot": {"id": null, "name": name}})
            );
        } else {
            println!("{clone}");
        }
        return Ok(0);
    }
    if dry_run {
        let listing = backend.list().await?;
        if listing.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("a snapshot named {name:?} already exists"),
            )
            .with_path(image));
        }
        snap_backend_rbd::validate_snapshot_name(name)?;
        println!("plan: rbd snapshot {spec}@{name} (nothing changed: --dry-run)");
        return Ok(0);
    }
    let snap = backend.create_snapshot(name).await?;
    if json {
        println!(
            "{}",
            json!({"image": spec.to_string(), "active": spec.to_string(),
                   "snapshot": {"id": snap.id.to_string(), "name": name}})
        );
    } else {
        println!("created snapshot {name:?} (id {}) of {spec}", snap.id);
    }
    Ok(0)
}

/// `disk revert` of an RBD image: `rbd snap rollback` (refused while clients have it open), or
/// with `--layer` the image replaced by an empty clone of that parent.
async fn revert_rbd(image: &Path, target: &Target, dry_run: bool) -> Result<u8> {
    let backend = rbd_backend(image)?;
    let spec = backend.spec().clone();
    match target {
        Target::Internal(name) => {
            if dry_run {
                let s = backend.plan_revert_snapshot(name).await?;
                println!(
                    "plan: roll {spec} back to snapshot {:?} (id {}); its current data is dropped \
                     (nothing changed: --dry-run)",
                    s.name, s.id
                );
                return Ok(0);
            }
            let s = backend.revert_snapshot(name).await?;
            println!("reverted {spec} to snapshot {:?}", s.name);
        }
        Target::Layer(layer) => {
            if dry_run {
                let base = backend.plan_revert_to_layer(layer).await?;
                println!(
                    "plan: replace {spec} by an empty clone of {base}; its current data is dropped \
                     (nothing changed: --dry-run)"
                );
                return Ok(0);
            }
            let base = backend.revert_to_layer(layer).await?;
            println!("reverted {spec} to layer {}", layer.display());
            println!("{spec} is now an empty clone of {base}");
        }
    }
    Ok(0)
}

/// `disk delete` of an RBD image: `rbd snap rm` (refused while clones depend on it), or with
/// `--layer` the layer's child flattened and the layer removed unless something still uses it.
async fn delete_rbd(image: &Path, target: &Target, dry_run: bool) -> Result<u8> {
    let backend = rbd_backend(image)?;
    let spec = backend.spec().clone();
    match target {
        Target::Internal(name) => {
            if dry_run {
                let s = backend.plan_delete_snapshot(name).await?;
                println!(
                    "plan: remove snapshot {:?} (id {}) of {spec}{} (nothing changed: --dry-run)",
                    s.name,
                    s.id,
                    if s.protected {
                        ", unprotecting it first"
                    } else {
                        ""
                    }
                );
                return Ok(0);
            }
            let s = backend.delete_snapshot(name).await?;
            println!("deleted snapshot {:?} from {spec}", s.name);
        }
        Target::Layer(layer) => {
            if dry_run {
                let plan = backend.plan_delete_layer(layer).await?;
                println!(
                    "plan: flatten {} (it copies the data it reads through {}@{}), then {} \
                     (nothing changed: --dry-run)",
                    plan.child,
                    plan.layer,
                    plan.snapshot,
                    match plan.keep_reason() {
                        Some(why) => format!("keep {}: {why}", plan.layer),
                        None => format!("remove {}", plan.layer),
                    }
                );
                return Ok(0);
            }
            let done = backend.delete_layer(layer).await?;
            println!(
                "flattened {}: it no longer reads through {}",
                done.plan.child, done.plan.layer
            );
            match &done.kept_because {
                None => println!("removed {}", done.plan.layer),
                Some(why) => println!("kept {}: {why}", done.plan.layer),
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvm_sizes() {
        use snap_backend_lvm::SnapshotSize;
        assert_eq!(parse_lvm_size("1G").unwrap(), SnapshotSize::Bytes(1 << 30));
        assert_eq!(
            parse_lvm_size("512m").unwrap(),
            SnapshotSize::Bytes(512 << 20)
        );
        assert_eq!(parse_lvm_size("4096").unwrap(), SnapshotSize::Bytes(4096));
        assert_eq!(
            parse_lvm_size("25%").unwrap(),
            SnapshotSize::PercentOfOrigin(25)
        );
        for bad in ["", "G", "0", "-1G", "101%", "0%", "1.5G", "99999999999T"] {
            assert!(parse_lvm_size(bad).is_err(), "{bad}");
        }
    }
}
