//! `xen-disk-host cow reset|commit`: offline care of a cow filter's overlay file, for test
//! labs that reuse one gold image (the disk must not be attached while these run).

use super::PluginArgs;
use crate::plugin::open_stack;
use ::cow::overlay::{reset_file, Overlay};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use xen_disk_plugin_api::{with_write_bufs, Disk};

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
    /// Write the overlay down into its base (opened writable), then reset it.
    Commit {
        /// The overlay file.
        #[arg(long)]
        overlay: PathBuf,
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
        CowCommand::Commit { overlay, base } => commit(overlay, base),
    }
}

fn commit(path: PathBuf, base: PluginArgs) -> Result<i32> {
    let name = path.display().to_string();
    let overlay = Overlay::open_file(&path)?;
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
    // Granules go down in order, and the base is flushed before the overlay is emptied: a
    // crash midway leaves the overlay whole, and committing again writes the same bytes.
    let mut buf = vec![0u8; h.granularity as usize];
    let mut n = 0u64;
    for g in overlay.bitmap().iter_set().collect::<Vec<_>>() {
        let start = g * h.granularity;
        let len = (h.base_size - start).min(h.granularity) as usize;
        overlay.read_at(start, &mut buf[..len])?;
        with_write_bufs(&[&buf[..len]], |b| stack.disk.write(start, b))
            .map_err(|e| anyhow::anyhow!("{}: write at {start}: {e}", stack.describe()))?;
        n += 1;
    }
    if info.can_flush {
        stack
            .disk
            .flush()
            .map_err(|e| anyhow::anyhow!("{}: flush: {e}", stack.describe()))?;
    }
    drop(stack);
    overlay.reset()?;
    println!(
        "{name}: committed {n} granules ({} bytes) into the base, overlay emptied",
        n * h.granularity
    );
    Ok(0)
}
