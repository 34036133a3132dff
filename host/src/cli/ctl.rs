//! `xen-disk-host ctl [--socket PATH] <request>...`: talks to a running `serve` or `connect`
//! through its control socket (see [`crate::control`] for the requests).

use crate::control::socket::{request, DEFAULT_SERVE};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The control socket (default: serve's, /run/xen-disk/serve.sock).
    #[arg(long, default_value = DEFAULT_SERVE)]
    socket: PathBuf,
    /// With `stats`: print again every second until interrupted.
    #[arg(long)]
    watch: bool,
    /// The request: `list [--json]`, `stats <dev> [--json]`, `limit <dev> [key=value... |
    /// off]`, `swap <dev> <plugin> [--allow-shrink] [-c key=value]...` (bare `key=value`
    /// works too), `detach <dev>`, `resize <dev>`, `upgrade` (serve hands its disks over to
    /// a new start of its binary, in place), `snapshot <dev> --nbd unix:PATH|tcp:HOST:PORT
    /// [--name NAME] [-c key=value]...` (live backup: freeze under a cow overlay, export the
    /// base over NBD), `commit <dev>` (copy the overlay back, live).
    /// At most 64 KiB in all.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    request: Vec<String>,
}

pub fn run(args: CtlArgs) -> Result<i32> {
    let line = args.request.join(" ");
    if args.watch && args.request.first().map(String::as_str) != Some("stats") {
        bail!("--watch goes with `stats`");
    }
    loop {
        let answer = request(&args.socket, &line).map_err(anyhow::Error::msg)?;
        if let Some(why) = answer.strip_prefix("error: ") {
            bail!("{}", why.trim());
        }
        print!("{answer}");
        if !args.watch {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
