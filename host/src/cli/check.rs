//! `xen-disk-host check <plugin> [-c k=v]... [--destructive]`: the conformance suite, which
//! only reads unless `--destructive` is given.

use super::PluginArgs;
use crate::check::{run as run_suite, CheckOptions, Outcome};
use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    plugin: PluginArgs,
    /// Threads in the concurrency case.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Random writes in the pattern case.
    #[arg(long, default_value_t = 200)]
    ops: usize,
    /// Seed for offsets and data.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// The disk stores nothing (e.g. `discard`): make every call but compare no contents.
    #[arg(long)]
    no_data: bool,
    /// Also run the cases that write, zero and discard. They overwrite the disk's data: give
    /// it a scratch image. Without this flag check only reads, and the image is left as it was.
    #[arg(long)]
    destructive: bool,
}

pub fn run(args: CheckArgs) -> Result<i32> {
    let config = args.plugin.config()?;
    let opts = CheckOptions {
        threads: args.threads,
        ops: args.ops,
        seed: args.seed,
        no_data: args.no_data,
        destructive: args.destructive,
    };
    let report = run_suite(
        &args.plugin.plugin,
        &config,
        &opts,
        |name, outcome| match outcome {
            // A disk that does not open is bad input, reported as one error line below.
            Outcome::Fail(_) if name == "open" => {}
            Outcome::Pass(d) if name == "open" => {
                println!("checking {}", args.plugin.plugin);
                println!("ok    {name:<13} {d}");
            }
            Outcome::Pass(d) => println!("ok    {name:<13} {d}"),
            Outcome::Skip(d) => println!("skip  {name:<13} {d}"),
            Outcome::Fail(d) => println!("FAIL  {name:<13} {d}"),
        },
    );
    if let [("open", Outcome::Fail(why))] = report.results.as_slice() {
        // The disk did not open: bad input (a missing file, a bad key), not a failed check.
        anyhow::bail!("{why}");
    }
    println!(
        "check: {} passed, {} failed, {} skipped",
        report.passed(),
        report.failed(),
        report.skipped()
    );
    if report.writes_skipped {
        println!(
            "check: read-only run, the disk's data was not touched; --destructive runs the \
             write cases too, over the data"
        );
    }
    Ok(if report.failed() == 0 { 0 } else { 1 })
}
