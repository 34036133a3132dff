//! The command line: one module per subcommand, all parsed here with clap.

mod bench;
mod check;
mod connect;
mod cow;
mod ctl;
mod logging;
mod manpage;
mod nbd;
mod plugins;
mod serve;
mod sim;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use xen_disk_plugin_api::Config;

/// A userspace Xen virtual-disk backend whose disks are plugins.
#[derive(Parser, Debug)]
#[command(name = "xen-disk-host", version, about)]
pub struct Cli {
    /// More log lines: -v one level more (serve and connect: debug), -vv more still.
    /// `XEN_DISK_LOG` or `RUST_LOG`, when set, choose instead (e.g. `RUST_LOG=debug`).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List and inspect plugins on the search path.
    Plugins(plugins::PluginsArgs),
    /// Attach a disk to a running guest and serve it until Ctrl-C.
    Connect(connect::ConnectArgs),
    /// Serve configured disks and the toolstack's devices until SIGTERM (the daemon).
    Serve(serve::ServeArgs),
    /// Talk to a running `serve` or `connect`: list devices, statistics, swap a plugin, detach.
    Ctl(ctl::CtlArgs),
    /// Run the conformance suite against a plugin (it only reads unless --destructive).
    Check(check::CheckArgs),
    /// Measure a plugin's I/O speed.
    Bench(bench::BenchArgs),
    /// The simulated hypervisor (no Xen needed).
    Sim(sim::SimArgs),
    /// Serve a plugin stack to NBD clients (qemu-img, nbdcopy, nbdinfo, the kernel's nbd).
    Nbd(nbd::NbdArgs),
    /// Offline care of a cow overlay file: reset it, or commit it into its base.
    Cow(cow::CowArgs),
    /// Print this program's manual page (roff), made from this command line; the package
    /// build installs it.
    #[command(hide = true)]
    Manpage,
}

/// How a plugin is named and configured on the command line (shared by every subcommand).
#[derive(clap::Args, Debug, Clone)]
pub struct PluginArgs {
    /// Plugin name (`mmap`, looked up on the search path) or path to a `.so`.
    pub plugin: String,
    /// Plugin configuration, `key=value`; repeat for more keys.
    #[arg(short = 'c', long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
    /// A TOML file whose `[plugin-config]` table configures the plugin (`-c` pairs override it).
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<std::path::PathBuf>,
}

impl PluginArgs {
    /// The configuration table: the file's `[plugin-config]`, then the `-c` pairs on top.
    pub fn config(&self) -> Result<Config> {
        let mut config = match &self.config_file {
            Some(path) => read_plugin_config(path)?,
            None => Config::new(),
        };
        let pairs = Config::from_pairs(&self.config)
            .map_err(anyhow::Error::msg)
            .context("bad -c option")?;
        for (k, v) in pairs.table() {
            config.set(k, v.clone()).map_err(anyhow::Error::msg)?;
        }
        Ok(config)
    }
}

/// Who answers an asynchronous plugin's completions (shared by `connect`, `serve`, `sim`
/// and `bench`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct CompletionArgs {
    /// Whether an asynchronous plugin's completing thread answers the guest itself while the
    /// ring thread sleeps (as Linux blkback answers from the I/O's completion) rather than
    /// waking the ring thread for it: one wake-up less per request. On by default;
    /// `--answer-on-completion=false` hands every completion to the ring thread, which
    /// answers a burst with one notification (better for nbd-client with
    /// `libnbd-commands=true`, whose reader completes one reply at a time: +10%).
    #[arg(
        long,
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub answer_on_completion: bool,
}

/// Reads the `[plugin-config]` table of a TOML file.
pub fn read_plugin_config(path: &std::path::Path) -> Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let doc = crate::backend::disks_config::parse_toml(path, &text).map_err(anyhow::Error::msg)?;
    match doc.get("plugin-config") {
        Some(toml::Value::Table(t)) => Ok(Config::from_table(t.clone())),
        Some(_) => anyhow::bail!("{}: `plugin-config` must be a table", path.display()),
        None => anyhow::bail!("{}: no [plugin-config] table", path.display()),
    }
}

/// Parses the process arguments and runs the command; returns the exit code.
pub fn main() -> Result<i32> {
    let cli = Cli::parse();
    // The daemons log their lifecycle events (attach, detach, swap...) by default.
    let default = match cli.command {
        Command::Serve(_) | Command::Connect(_) => tracing::Level::INFO,
        _ => tracing::Level::WARN,
    };
    logging::init(default, cli.verbose);
    match cli.command {
        Command::Plugins(a) => plugins::run(a),
        Command::Connect(a) => connect::run_connect(a),
        Command::Serve(a) => serve::run_serve(a),
        Command::Ctl(a) => ctl::run(a),
        Command::Check(a) => check::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Sim(a) => sim::run(a),
        Command::Cow(a) => cow::run(a),
        Command::Nbd(a) => nbd::run(a),
        Command::Manpage => {
            use std::io::Write;
            let page = manpage::render(&Cli::command());
            std::io::stdout().write_all(page.as_bytes())?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod answer_on_completion_tests {
    use super::*;

    fn parsed(args: &[&str]) -> Result<bool, clap::Error> {
        let cli = Cli::try_parse_from(args)?;
        Ok(match cli.command {
            Command::Bench(b) => b.completion.answer_on_completion,
            Command::Connect(c) => c.completion.answer_on_completion,
            Command::Serve(s) => s.completion.answer_on_completion,
            _ => unreachable!("only these are asked"),
        })
    }

    #[test]
    fn on_by_default_bare_flag_means_on_and_false_turns_it_off() {
        for (cmd, rest) in [
            ("bench", &["mmap"][..]),
            ("connect", &["7", "--plugin", "mmap"][..]),
            ("serve", &[][..]),
        ] {
            let with = |extra: &[&str]| {
                let mut a = vec!["xen-disk-host", cmd];
                a.extend(extra);
                a.extend(rest);
                parsed(&a)
            };
            assert!(with(&[]).unwrap(), "{cmd}: default");
            assert!(
                with(&["--answer-on-completion"]).unwrap(),
                "{cmd}: bare flag"
            );
            assert!(
                !with(&["--answer-on-completion=false"]).unwrap(),
                "{cmd}: =false"
            );
            // A bare flag never swallows the next word (the plugin name, for one).
            assert!(
                with(&["--answer-on-completion", "--poll-us", "0"]).unwrap(),
                "{cmd}"
            );
            let e = with(&["--answer-on-completion=maybe"])
                .unwrap_err()
                .to_string();
            assert!(e.contains("maybe"), "{cmd}: {e}");
        }
    }
}
