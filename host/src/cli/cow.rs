//! `xen-disk-host cow reset|commit`: offline care of a cow filter's overlay file, for test
//! labs that reuse one gold image (the disk must not be attached while these run).

use super::PluginArgs;
use crate::plugin::open_stack;
use ::cow::overlay::{reset_file, BaseRecord, BaseView, Fingerprint, Overlay};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs, Disk};

#[derive(Args, Debug)]
pub struct CowArgs {
    #[command(subcommand)]
    command: CowCommand,
}

#[derive(Subcommand, Debug)]
enum CowCommand {
    /// Drop every write in the overlay: the disk reads as its base again.
    Reset {
        /// The overlay file.
        #[arg(long)]
        overlay: PathBuf,
    },
    /// Write the overlay down into its base (opened writable), then reset it. The base must
    /// be the one the overlay records (see --trust-base).
    Commit {
        /// The overlay file.
        #[arg(long)]
        overlay: PathBuf,
        /// Commit even if the base is not the one the overlay was made over (its sampled
        /// content differs): the overlay's granules then overwrite another disk's bytes.
        #[arg(long)]
        trust_base: bool,
        /// The base disk, configured as under the cow filter.
        #[command(flatten)]
        base: PluginArgs,
    },
}

pub fn run(args: CowArgs) -> Result<i32> {
    match args.command {
        CowCommand::Reset { overlay } => {
            let n = reset_file(&overlay)?;
            println!("{}: dropped {n} granules", overlay.display());
            Ok(0)
        }
        CowCommand::Commit {
            overlay,
            trust_base,
            base,
        } => commit(overlay, base, trust_base),
    }
}

fn commit(path: PathBuf, base: PluginArgs, trust_base: bool) -> Result<i32> {
    let name = path.display().to_string();
    let mut overlay = Overlay::open_file(&path)?;
    let h = *overlay.header();
    let stack = open_stack(&base.plugin, &base.config()?)?;
    let info = stack.disk.info();
    if info.size != h.base_size {
        bail!(
            "{name} was made over a {}-byte base, {} is {} bytes",
            h.base_size,
            stack.describe(),
            info.size
        );
    }
    if info.read_only {
        bail!(
            "{} opened read-only: commit writes the overlay into it",
            stack.describe()
        );
    }
    let read = |at: u64, buf: &mut [u8]| with_read_bufs(&mut [buf], |b| stack.disk.read(at, b));
    let view = BaseView {
        size: info.size,
        sector: info.logical_sector_size,
        read: &read,
    };
    if h.base.is_none() {
        eprintln!(
            "warning: {name} was made before overlays recorded their base: \
             nothing shows that {} is its base",
            stack.describe()
        );
    } else if let Some(diff) = overlay.base_mismatch(&view)? {
        if !trust_base {
            bail!(
                "{name} was made over another base: {} differs in {diff} \
                 (--trust-base commits anyway)",
                stack.describe()
            );
        }
    }
    // What the base becomes is recorded first, marked as a commit under way: the overlay
    // then opens over the base whether this commit finishes, stops midway or is run again.
    let after = Fingerprint::of(info.size, info.logical_sector_size, |at, buf| {
        overlay.read_merged(at, buf, &view)
    })?;
    overlay.set_base_record(BaseRecord {
        fingerprint: after,
        committing: true,
    })?;
    // Granules go down in order, and the base is flushed before the overlay is emptied: a
    // crash midway leaves the overlay whole, and committing again writes the same bytes.
    let n = overlay.copy_granules(|start, bytes| {
        with_write_bufs(&[bytes], |b| stack.disk.write(start, b))
            .map_err(|e| e.context(format!("{}: write at {start}", stack.describe())))
    })?;
    if info.can_flush {
        stack
            .disk
            .flush()
            .map_err(|e| anyhow::anyhow!("{}: flush: {e}", stack.describe()))?;
    }
    overlay.set_base_record(BaseRecord {
        fingerprint: after,
        committing: false,
    })?;
    drop(stack);
    overlay.reset()?;
    println!(
        "{name}: committed {n} granules ({} bytes) into the base, overlay emptied",
        n * h.granularity
    );
    Ok(0)
}
