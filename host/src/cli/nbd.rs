//! `xen-disk-host nbd`: serve a plugin stack to NBD clients until SIGINT or SIGTERM (then
//! flush the disk and remove the socket).

use super::PluginArgs;
use crate::nbd::{serve, Export, Listen};
use crate::plugin::{open_stack, open_stack_read_only, GuardedDisk};
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("listen").required(true).args(["unix", "tcp"])))]
pub struct NbdArgs {
    #[command(flatten)]
    plugin: PluginArgs,
    /// Listen on a Unix socket at this path (clients: `nbd+unix:///?socket=PATH`).
    #[arg(long, value_name = "PATH")]
    unix: Option<std::path::PathBuf>,
    /// Listen on this TCP address, `HOST:PORT` (clients: `nbd://HOST:PORT`). No TLS and no
    /// authentication: bind to loopback or a trusted network.
    #[arg(long, value_name = "HOST:PORT")]
    tcp: Option<String>,
    /// Serve read-only (the plugin is opened read-only where it has a switch for it).
    #[arg(short, long)]
    read_only: bool,
    /// The export's name (clients may also ask for the default, empty name).
    #[arg(long, default_value = "xen-disk")]
    export_name: String,
}

pub fn run(args: NbdArgs) -> Result<i32> {
    let config = args.plugin.config()?;
    let stack = if args.read_only {
        open_stack_read_only(&args.plugin.plugin, &config)
    } else {
        open_stack(&args.plugin.plugin, &config)
    }
    .map_err(anyhow::Error::msg)?;
    let description = stack.describe();
    let disk = GuardedDisk::new(Box::new(stack.disk), args.read_only)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.plugin.plugin))?;
    let listen = match (args.unix, args.tcp) {
        (Some(p), _) => Listen::Unix(p),
        (_, Some(a)) => Listen::Tcp(a),
        _ => unreachable!("clap requires one"),
    };
    let disk = Arc::new(disk);
    let export = Arc::new(Export {
        name: args.export_name,
        description: description.clone(),
        disk: disk.clone(),
        bitmaps: Vec::new(),
    });
    super::connect::catch_signals();
    let server = serve(&listen, export)
        .map_err(anyhow::Error::msg)
        .context("nbd")?;
    tracing::info!("serving {description} at {}", server.uri());
    eprintln!(
        "nbd: serving {description} ({} bytes) at {}",
        disk.size(),
        server.uri()
    );
    while super::connect::signals() == 0 {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);
    disk.flush()
        .map_err(|e| anyhow::anyhow!("flushing {description}: {e}"))?;
    Ok(0)
}
