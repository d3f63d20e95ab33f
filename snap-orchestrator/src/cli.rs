//! The command line, as ../shared/DESIGN.md's CLI contract fixes it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use snap_core::Result;

use crate::clone;
use crate::disk;
use crate::domain::{self, Ctx};
use crate::export;
use crate::snapshot;
use crate::store::Store;

/// snapctl — snapshots of VM disks and domains on Xen and QEMU/KVM hosts.
///
/// Disk snapshots work on qcow2 images directly (internal snapshots, offline: the image must not
/// be open in a running QEMU). Every change is validated first and committed atomically: a refused
/// operation leaves the image byte-identical, and a crash leaves either the old or the new image.
#[derive(Debug, Parser)]
#[command(
    name = "snapctl",
    version,
    propagate_version = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// Hypervisor driver for domain commands (default: xen on a Xen dom0, else qemu).
    #[arg(long, global = true, value_enum)]
    pub hypervisor: Option<Hypervisor>,
    /// Where domain snapshot metadata lives.
    #[arg(
        long,
        global = true,
        env = "SNAPCTL_STATE_DIR",
        default_value = "/var/lib/snapctl"
    )]
    pub state_dir: PathBuf,
    /// Print what would be done and change nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// Seconds a domain command waits for another snapctl working on the same domain (0: fail
    /// at once with a clear error). Disk commands never wait: a held image lock fails at once.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30)]
    pub wait: u64,
    /// More diagnostics on stderr (-v, -vv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// Hypervisor drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Hypervisor {
    /// Xen through libxl.
    Xen,
    /// QEMU/KVM through QMP.
    Qemu,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Snapshots of one disk image.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Start, list and destroy domains (not implemented yet).
    #[command(subcommand)]
    Domain(DomainCommand),
    /// Snapshots of a whole domain: all disks plus memory (not implemented yet).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

/// Disk formats for `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// QEMU qcow2 (v2 or v3).
    Qcow2,
    /// Microsoft VHD.
    Vhd,
    /// LVM logical volume (/dev/VG/LV or VG/LV).
    Lvm,
    /// Ceph RBD image (rbd:POOL/IMAGE).
    Rbd,
}

/// Options naming a disk that is open in a running QEMU.
#[derive(Debug, Clone, Args)]
pub struct OnlineArgs {
    /// QMP socket of the QEMU that has the disk open (online operation).
    #[arg(long, value_name = "SOCKET", requires = "node")]
    pub qmp: Option<PathBuf>,
    /// Block node name of the disk in that QEMU.
    #[arg(long, value_name = "NODE-NAME", requires = "qmp")]
    pub node: Option<String>,
}

/// `snapctl disk ...`
#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// List a disk's snapshots and backing chain.
    ///
    /// Example: snapctl disk list vm.qcow2 --json
    List {
        /// The disk image.
        image: PathBuf,
        /// Print one JSON object (image, format, virtual_size, snapshots, chain).
        #[arg(long)]
        json: bool,
        /// Do not probe the format; use this one.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        #[command(flatten)]
        online: OnlineArgs,
    },
    /// Take a snapshot: internal (in the image) or, with --external, a new active layer.
    ///
    /// Example: snapctl disk create vm.qcow2 before-upgrade
    Create {
        /// The disk image.
        image: PathBuf,
        /// Name of the new snapshot (unique in the image).
        name: String,
        /// Make a new active layer on top of IMAGE instead of an internal snapshot.
        #[arg(long)]
        external: bool,
        /// Path of the new active layer (default DIR/STEM.NAME.EXT).
        #[arg(long, requires = "external")]
        overlay: Option<PathBuf>,
        /// LVM: size of a classic (COW) snapshot, in bytes with an optional K/M/G/T suffix, or a
        /// percentage of the origin like `25%` (default 20% of the origin). Thin snapshots take none.
        #[arg(long, value_name = "SIZE", conflicts_with = "external")]
        size: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Do not probe the format; use this one.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        #[command(flatten)]
        online: OnlineArgs,
    },
    /// Return the disk to a snapshot; its current state is dropped.
    ///
    /// Example: snapctl disk revert vm.qcow2 before-upgrade
    Revert {
        /// The disk image.
        image: PathBuf,
        /// The snapshot (name, or id).
        #[arg(required_unless_present = "layer", conflicts_with = "layer")]
        name: Option<String>,
        /// Revert to a backing layer: IMAGE becomes an empty overlay on it.
        #[arg(long, value_name = "PATH")]
        layer: Option<PathBuf>,
        /// Do not probe the format; use this one.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        #[command(flatten)]
        online: OnlineArgs,
    },
    /// Delete a snapshot; the disk's current state is kept.
    ///
    /// Example: snapctl disk delete vm.qcow2 before-upgrade
    Delete {
        /// The disk image.
        image: PathBuf,
        /// The snapshot (name, or id).
        #[arg(required_unless_present = "layer", conflicts_with = "layer")]
        name: Option<String>,
        /// Merge this backing layer into its child and remove it.
        #[arg(long, value_name = "PATH")]
        layer: Option<PathBuf>,
        /// Online (--qmp) only: commit the layer down into its own backing instead of streaming
        /// it into its child (refused when anything else in QEMU uses that backing).
        #[arg(long, requires_all = ["layer", "qmp"], conflicts_with = "name")]
        commit: bool,
        /// Do not probe the format; use this one.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        #[command(flatten)]
        online: OnlineArgs,
    },
    /// Check a disk's metadata: rebuild refcounts and compare (exit 0 clean, 3 leaks only,
    /// 1 corruption).
    ///
    /// Example: snapctl disk check vm.qcow2 --json
    Check {
        /// The disk image.
        image: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Do not probe the format; use this one.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
    },
    /// Export a flat, standalone, sparse copy of a guest view: internal snapshot NAME, backing
    /// layer --layer PATH (the view through it), or the current view. The input format is
    /// probed (qcow2, VHD) or an RBD image (rbd:POOL/IMAGE...); --format names the output's.
    /// Prints a checksum of the guest view.
    ///
    /// Example: snapctl disk export vm.qcow2 before-upgrade backup.qcow2
    #[command(
        override_usage = "snapctl disk export IMAGE [NAME] OUT [--layer PATH] [--format qcow2|raw|vhd] [--json]\n       snapctl disk export rbd:POOL/IMAGE [NAME] OUT --since SNAP [--json]"
    )]
    Export {
        /// IMAGE [NAME] OUT: the image, the internal snapshot (optional) and the new file.
        #[arg(num_args = 2..=3, required = true, value_names = ["IMAGE", "NAME", "OUT"])]
        args: Vec<PathBuf>,
        /// Export the view through this backing layer of IMAGE's chain.
        #[arg(long, value_name = "PATH")]
        layer: Option<PathBuf>,
        /// The output format (default qcow2).
        #[arg(long, value_enum)]
        format: Option<ExportFormatArg>,
        /// RBD images only: an incremental backup, the changes since snapshot SNAP up to NAME (or
        /// the image now) in rbd's diff format (`rbd export-diff`; apply with `rbd import-diff`).
        #[arg(long, value_name = "SNAP", conflicts_with_all = ["layer", "format"])]
        since: Option<String>,
        /// Print one JSON object (output, sizes, checksum).
        #[arg(long)]
        json: bool,
    },
}

/// Output formats of `disk export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormatArg {
    /// A standalone qcow2 v3 image.
    Qcow2,
    /// A sparse raw file.
    Raw,
    /// A dynamic VHD.
    Vhd,
}

/// `snapctl domain ...` (later work).
#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// Start a domain from an xl.cfg file.
    Start {
        /// The domain configuration (xl.cfg syntax).
        cfg: PathBuf,
    },
    /// List domains.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a domain (it stays defined with its snapshots).
    Destroy {
        /// Domain name.
        name: String,
    },
}

/// `snapctl snapshot ...` (later work).
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a domain.
    Create {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        name: String,
        /// Save memory while the guest runs.
        #[arg(long)]
        live: bool,
        /// Save no memory.
        #[arg(long)]
        disk_only: bool,
        /// External disk snapshots.
        #[arg(long)]
        external: bool,
        /// Freeze guest file systems first.
        #[arg(long)]
        quiesce: bool,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
    },
    /// Revert a domain to a snapshot.
    Revert {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        name: String,
        /// Leave it running.
        #[arg(long, conflicts_with = "paused")]
        running: bool,
        /// Leave it paused.
        #[arg(long)]
        paused: bool,
    },
    /// Delete a domain snapshot.
    Delete {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        name: String,
        /// Also delete its children.
        #[arg(long, conflicts_with = "children_only")]
        children: bool,
        /// Delete only its children.
        #[arg(long)]
        children_only: bool,
        /// Forget the metadata, keep the disks.
        #[arg(long)]
        metadata_only: bool,
    },
    /// List a domain's snapshots.
    List {
        /// Domain name.
        domain: String,
        /// Show the tree.
        #[arg(long)]
        tree: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot.
    Info {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Clone a snapshot into new domains (gold image): thin overlays on its frozen layers, the
    /// snapshot's config with a new name, UUID and MACs; with memory, resumed from it.
    ///
    /// Example: snapctl snapshot clone web gold web-clone --count 3
    Clone {
        /// Domain name.
        domain: String,
        /// Snapshot name (an external snapshot: its layers are shared by the clones).
        name: String,
        /// Name of the new domain (with --count: NEW-1 .. NEW-N).
        new: String,
        /// Make N clones.
        #[arg(long, value_name = "N")]
        count: Option<u32>,
        /// Leave the clones running.
        #[arg(long, conflicts_with_all = ["paused", "shutoff"])]
        running: bool,
        /// Leave the clones paused.
        #[arg(long, conflicts_with = "shutoff")]
        paused: bool,
        /// Define the clones without starting them.
        #[arg(long)]
        shutoff: bool,
    },
    /// Export a snapshot into DIR (new or empty): each disk's view as a standalone VDEV.qcow2,
    /// the memory image, the config (domain.cfg) and the record (snapshot.json). Works while the
    /// domain runs.
    ///
    /// Example: snapctl snapshot export web gold /backup/web-gold
    Export {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        name: String,
        /// The export folder.
        dir: PathBuf,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Define a new domain from an export folder, with the exported snapshot as its snapshot
    /// (shut off; `snapshot revert NEW NAME` starts it from there).
    ///
    /// Example: snapctl snapshot import /backup/web-gold web2
    Import {
        /// The export folder.
        dir: PathBuf,
        /// Name of the new domain (default: the exported domain's).
        new: Option<String>,
        /// Print the new domain's snapshot list as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a parsed command line; returns the exit code for success paths (errors become exit 1).
pub async fn run(cli: Cli) -> Result<u8> {
    let ctx = context(&cli);
    match cli.command {
        Command::Disk(cmd) => disk::run(cmd, cli.dry_run).await,
        Command::Domain(cmd) => match cmd {
            DomainCommand::Start { cfg } => domain::start(&ctx, &cfg).await,
            DomainCommand::List { json } => domain::list(&ctx, json).await,
            DomainCommand::Destroy { name } => domain::destroy(&ctx, &name).await,
        },
        Command::Snapshot(cmd) => match cmd {
            SnapshotCommand::Create {
                domain,
                name,
                live,
                disk_only,
                external,
                quiesce,
                description,
            } => {
                let opts = snapshot::CreateOptions {
                    live,
                    disk_only,
                    external,
                    quiesce,
                    description,
                };
                snapshot::create(&ctx, &domain, &name, &opts).await
            }
            SnapshotCommand::Revert {
                domain,
                name,
                running,
                paused,
            } => {
                let end = if running {
                    snapshot::EndState::Running
                } else if paused {
                    snapshot::EndState::Paused
                } else {
                    snapshot::EndState::Snapshot
                };
                snapshot::revert(&ctx, &domain, &name, end).await
            }
            SnapshotCommand::Delete {
                domain,
                name,
                children,
                children_only,
                metadata_only,
            } => {
                let opts = snapshot::DeleteOptions {
                    children,
                    children_only,
                    metadata_only,
                };
                snapshot::delete(&ctx, &domain, &name, opts).await
            }
            SnapshotCommand::List { domain, tree, json } => {
                snapshot::list(&ctx, &domain, tree, json).await
            }
            SnapshotCommand::Clone {
                domain,
                name,
                new,
                count,
                running,
                paused,
                shutoff,
            } => {
                let state = if running {
                    clone::CloneState::Running
                } else if paused {
                    clone::CloneState::Paused
                } else if shutoff {
                    clone::CloneState::Shutoff
                } else {
                    clone::CloneState::Snapshot
                };
                clone::clone(&ctx, &domain, &name, &new, count, state).await
            }
            SnapshotCommand::Info { domain, name, json } => {
                snapshot::info(&ctx, &domain, &name, json).await
            }
            SnapshotCommand::Export {
                domain,
                name,
                dir,
                json,
            } => export::snapshot_export(&ctx, &domain, &name, &dir, json).await,
            SnapshotCommand::Import { dir, new, json } => {
                export::snapshot_import(&ctx, &dir, new.as_deref(), json).await
            }
        },
    }
}

fn context(cli: &Cli) -> Ctx {
    Ctx {
        store: Store::new(&cli.state_dir),
        hypervisor: cli.hypervisor,
        dry_run: cli.dry_run,
        lock_timeout: std::time::Duration::from_secs(cli.wait),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn contract_forms_parse() {
        for args in [
            vec!["snapctl", "disk", "list", "a.qcow2", "--json"],
            vec!["snapctl", "disk", "create", "a.qcow2", "s1"],
            vec![
                "snapctl",
                "disk",
                "create",
                "a.qcow2",
                "s1",
                "--external",
                "--overlay",
                "b.qcow2",
            ],
            vec!["snapctl", "disk", "revert", "a.qcow2", "s1"],
            vec!["snapctl", "disk", "revert", "a.qcow2", "--layer", "b.qcow2"],
            vec!["snapctl", "disk", "delete", "a.qcow2", "s1"],
            vec!["snapctl", "disk", "create", "vg/lv", "s1", "--size", "1G"],
            vec!["snapctl", "disk", "delete", "a.qcow2", "--layer", "b.qcow2"],
            vec!["snapctl", "disk", "check", "a.qcow2", "--json"],
            vec!["snapctl", "--dry-run", "disk", "create", "a.qcow2", "s1"],
            vec![
                "snapctl", "disk", "list", "a.qcow2", "--qmp", "/s", "--node", "n",
            ],
            vec![
                "snapctl",
                "snapshot",
                "create",
                "d",
                "n",
                "--live",
                "--disk-only",
            ],
            vec![
                "snapctl",
                "snapshot",
                "delete",
                "d",
                "n",
                "--children",
                "--metadata-only",
            ],
            vec![
                "snapctl",
                "--state-dir",
                "/tmp/x",
                "snapshot",
                "list",
                "d",
                "--tree",
                "--json",
            ],
            vec!["snapctl", "disk", "export", "a.qcow2", "out.qcow2"],
            vec![
                "snapctl", "disk", "export", "a.qcow2", "s1", "out.raw", "--format", "raw",
            ],
            vec![
                "snapctl", "disk", "export", "a.vhd", "o.vhd", "--layer", "b.vhd", "--format",
                "vhd", "--json",
            ],
            vec!["snapctl", "snapshot", "export", "d", "n", "/tmp/dir"],
            vec!["snapctl", "snapshot", "import", "/tmp/dir"],
            vec![
                "snapctl",
                "--dry-run",
                "snapshot",
                "import",
                "/tmp/dir",
                "d2",
            ],
        ] {
            assert!(Cli::try_parse_from(&args).is_ok(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["snapctl", "disk", "revert", "a.qcow2"]).is_err());
        for bad in [
            &["snapctl", "disk", "export", "a.qcow2"][..],
            &["snapctl", "disk", "export", "a", "b", "c", "d"],
            &["snapctl", "disk", "export", "a", "b", "--format", "lvm"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        assert!(
            Cli::try_parse_from(["snapctl", "disk", "revert", "a", "s", "--layer", "b"]).is_err()
        );
        assert!(Cli::try_parse_from(["snapctl", "disk", "list", "a", "--qmp", "/s"]).is_err());
        // --commit: online layer deletes only.
        let commit = ["snapctl", "disk", "delete", "a", "--layer", "b", "--commit"];
        assert!(Cli::try_parse_from(commit).is_err());
        let online = [&commit[..], &["--qmp", "/s", "--node", "n"]].concat();
        assert!(Cli::try_parse_from(online).is_ok());
        let named = [
            "snapctl", "disk", "delete", "a", "s1", "--commit", "--qmp", "/s", "--node", "n",
        ];
        assert!(Cli::try_parse_from(named).is_err());
    }
}
