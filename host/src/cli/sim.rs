//! `xen-disk-host sim ...`: the simulated hypervisor's parts, run on their own.

use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

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
}

pub fn run(args: SimArgs) -> Result<i32> {
    match args.command {
        SimCommand::Xenstored { socket } => {
            crate::xen::sim::xenstored::run_xenstored(&socket)?;
            Ok(0)
        }
    }
}
