//! `xen-disk-host sim ...`: the simulated hypervisor's parts, run on their own.

use super::PluginArgs;
use crate::plugin::{open_stack, open_stack_read_only, GuardedDisk};
use crate::simulation::{SimOptions, SimulatedDisk};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct SimArgs {
    #[command(subcommand)]
    command: SimCommand,
}

#[derive(Subcommand, Debug)]
enum SimCommand {
    /// Run the simulated xenstored alone (Xen's C tools work with it: XENSTORED_PATH=SOCKET).
    Xenstored {
        /// Unix socket to listen on.
        #[arg(long)]
        socket: PathBuf,
    },
    /// A simulated guest copies the whole disk into FILE, through the full path. The disk is
    /// opened read-only (`readonly=true`, or `shared=false` for mmap) unless `-c` sets that key.
    Read {
        #[command(flatten)]
        plugin: PluginArgs,
        /// Where to put the disk's bytes.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        completion: super::CompletionArgs,
    },
    /// A simulated guest copies FILE onto the disk from its start, through the full path.
    Write {
        #[command(flatten)]
        plugin: PluginArgs,
        /// The bytes to write (at most the disk's size; a partial last sector is padded with zeroes).
        #[arg(long = "in")]
        input: PathBuf,
        #[command(flatten)]
        completion: super::CompletionArgs,
    },
}

/// Bytes moved per step (the guest keeps 4 requests of 1 MiB in flight within it).
const STEP: usize = 16 << 20;

/// Opens the disk (read-only when the guest only reads) and connects a simulated guest.
fn start(
    plugin: &PluginArgs,
    answer_on_completion: bool,
    read_only: bool,
) -> Result<SimulatedDisk> {
    let config = plugin.config()?;
    let stack = if read_only {
        open_stack_read_only(&plugin.plugin, &config)?
    } else {
        open_stack(&plugin.plugin, &config)?
    };
    let disk = GuardedDisk::new(Box::new(stack.disk), read_only).map_err(anyhow::Error::msg)?;
    let opts = SimOptions {
        answer_on_completion,
        ..SimOptions::default()
    };
    SimulatedDisk::start_with(Arc::new(disk), &opts)
        .map_err(anyhow::Error::msg)
        .context("simulated guest")
}

fn report(what: &str, bytes: u64, started: Instant) {
    let s = started.elapsed().as_secs_f64();
    println!(
        "{what} {bytes} bytes in {s:.3} s: {:.1} MB/s",
        bytes as f64 / s.max(1e-9) / 1e6
    );
}

fn read(plugin: PluginArgs, out: PathBuf, answer_on_completion: bool) -> Result<i32> {
    let mut sim = start(&plugin, answer_on_completion, true)?;
    let mut file = std::fs::File::create(&out).with_context(|| out.display().to_string())?;
    let size = sim.size();
    let mut buf = vec![0u8; STEP];
    let started = Instant::now();
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(STEP as u64) as usize;
        sim.read(at, &mut buf[..n]).map_err(anyhow::Error::msg)?;
        file.write_all(&buf[..n])
            .with_context(|| out.display().to_string())?;
        at += n as u64;
    }
    report("read", size, started);
    sim.shutdown().map_err(anyhow::Error::msg)?;
    Ok(0)
}

fn write(plugin: PluginArgs, input: PathBuf, answer_on_completion: bool) -> Result<i32> {
    let mut file = std::fs::File::open(&input).with_context(|| input.display().to_string())?;
    let len = file
        .metadata()
        .with_context(|| input.display().to_string())?
        .len();
    let mut sim = start(&plugin, answer_on_completion, false)?;
    if len > sim.size() {
        bail!(
            "{}: {len} bytes do not fit the {}-byte disk",
            input.display(),
            sim.size()
        );
    }
    let mut buf = vec![0u8; STEP];
    let started = Instant::now();
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(STEP as u64) as usize;
        file.read_exact(&mut buf[..n])
            .with_context(|| input.display().to_string())?;
        let padded = n.div_ceil(512) * 512;
        buf[n..padded].fill(0);
        sim.write(at, &buf[..padded]).map_err(anyhow::Error::msg)?;
        at += n as u64;
    }
    sim.flush().map_err(anyhow::Error::msg)?;
    report("wrote", len, started);
    sim.shutdown().map_err(anyhow::Error::msg)?;
    Ok(0)
}

pub fn run(args: SimArgs) -> Result<i32> {
    match args.command {
        SimCommand::Xenstored { socket } => {
            crate::xen::sim::xenstored::run_xenstored(&socket)?;
            Ok(0)
        }
        SimCommand::Read {
            plugin,
            out,
            completion,
        } => read(plugin, out, completion.answer_on_completion),
        SimCommand::Write {
            plugin,
            input,
            completion,
        } => write(plugin, input, completion.answer_on_completion),
    }
}
