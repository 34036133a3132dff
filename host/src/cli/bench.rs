//! `xen-disk-host bench <plugin>`: a plugin's speed through the full ring path in the
//! simulator (or, with `--direct`, through the `.so` boundary alone), with a memcpy
//! reference measured in the same run.

use super::PluginArgs;
use crate::bench::direct::{memcpy_reference, run as run_direct, DirectOptions, Pattern};
use crate::bench::ring::{run as run_ring, RingOptions};
use crate::plugin::{open_stack, with_declared_defaults, GuardedDisk, KeyInfo};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::time::Duration;
use xen_disk_plugin_api::parse_size;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    plugin: PluginArgs,
    /// Drive the plugin directly through its `.so` boundary, without the Xen ring.
    #[arg(long)]
    direct: bool,
    /// Drive an asynchronous plugin (`nbd-client`, `ceph-rbd`) as the fair references drive
    /// their libraries: one thread keeps `--iodepth` submissions in flight through the
    /// plugin's asynchronous entry point, with no ring and no simulated guest. Beside
    /// `--rbd-bench` or `--fio-nbd` it compares the plugin alone with the library's client.
    #[arg(long, conflicts_with = "direct")]
    submit: bool,
    /// Requests in flight (ring path, `--submit`).
    #[arg(long, default_value_t = 32)]
    iodepth: usize,
    /// Worker threads of the device queue (ring path); 0 serves requests on the ring thread
    /// (plugins declaring the non-blocking thread model are served so regardless).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Queues (rings) of the simulated device, each with a ring thread and a driver thread
    /// keeping `--iodepth` requests in flight (ring path).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Microseconds the ring thread (and the simulated guest) poll for work before sleeping;
    /// 0 sleeps at once, as `connect` and `serve` do by default (ring path).
    #[arg(long, default_value_t = 30)]
    poll_us: u64,
    #[command(flatten)]
    pub(super) completion: super::CompletionArgs,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Randread)]
    rw: Pattern,
    /// Block size (e.g. 4k, 1M).
    #[arg(long, default_value = "4k")]
    bs: String,
    /// Bytes of the disk to use, from offset 0 (default: the whole disk, at most 1G).
    #[arg(long)]
    region: Option<String>,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Threads issuing I/O at once.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Also measure nbdkit's null plugin driven by fio's nbd engine with the same pattern,
    /// block size, depth and duration (needs nbdkit and fio).
    #[arg(long)]
    nbdkit: bool,
    /// Also run `qemu-img bench -f FORMAT` (e.g. `qcow2`, `vpc`, `raw`) on the plugin's
    /// `path` image with the same pattern, block size and depth (`--threads`), after the plugin
    /// made one pass over the region (`--direct`, `--rw read|write`; needs qemu-img).
    #[arg(long, value_name = "FORMAT")]
    qemu_img: Option<String>,
    /// Also measure fio's nbd engine against this NBD server URI (default: the plugin's
    /// `uri` key) with the same pattern, block size, depth, region and duration (needs fio),
    /// and the fair reference: a libnbd client writing fresh data on every request.
    #[arg(long, value_name = "URI", num_args = 0..=1, default_missing_value = "")]
    fio_nbd: Option<String>,
    /// Also run `rbd bench` on the same image of the same cluster (a `ceph-rbd` disk) with the
    /// same pattern (`full-seq` for sequential ones) and block size, `--io-threads` = the
    /// requests in flight (`--iodepth` for an asynchronous plugin, else `--workers`), and as
    /// many bytes; and the fair reference: a librbd client writing fresh data on every
    /// request, at the same depth and block size, over the same region and time.
    #[arg(long)]
    rbd_bench: bool,
    /// With `--direct`: run the same pattern on plugin PLUGIN too (opened with its defaults)
    /// and print its per-call cost beside, e.g. a C plugin next to its Rust twin.
    #[arg(long, value_name = "PLUGIN")]
    against: Option<String>,
    /// An I/O limit on the simulated device, as `connect --limit` (ring path): `read-iops=N`,
    /// `write-bps=20M`, `...-burst=N`; repeat for more. The figures then say how close the
    /// run came to the limit.
    #[arg(long = "limit", value_name = "KEY=VALUE")]
    limits: Vec<String>,
    /// Keep the client side of the plugin's run (the simulated guest and the ring thread of
    /// each queue, or the submitting thread with `--submit`) and of the fair references
    /// (their submitting thread) on CPU N; the
    /// storage side (threads a plugin or library starts, the server) stays free. On a
    /// machine with few CPUs it takes out the scheduler's placement of guest and ring
    /// thread, which can halve a 4 KiB figure from one run to the next (ring path).
    #[arg(long, value_name = "N")]
    client_cpu: Option<usize>,
    /// Run the fair reference (`--rbd-bench`, `--fio-nbd`) before the plugin instead of right
    /// after it (the plugin's disk is closed meanwhile and opened again). Same-run pairs
    /// alternate the order (`scripts/pairs.sh`) so that a drift within a run (a cluster
    /// filling, a server warming up) favours neither side.
    #[arg(long)]
    fair_first: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> Result<i32> {
    let bs = parse_size(&args.bs)
        .map_err(anyhow::Error::msg)
        .context("--bs")? as usize;
    if bs == 0 || !bs.is_multiple_of(512) {
        bail!("--bs {bs}: must be a non-zero multiple of 512");
    }
    if !(args.seconds > 0.0 && args.seconds <= 3600.0) {
        bail!("--seconds {}: must be between 0 and 3600", args.seconds);
    }
    if let Some(cpu) = args.client_cpu {
        if args.direct {
            bail!("--client-cpu applies to the ring path, not --direct");
        }
        crate::bench::cpu::check(cpu).map_err(anyhow::Error::msg)?;
    }
    if args.fair_first && (args.direct || !(args.rbd_bench || args.fio_nbd.is_some())) {
        bail!("--fair-first orders a ring or --submit run and its fair reference (--rbd-bench, --fio-nbd)");
    }
    if args.against.is_some() && !args.direct {
        bail!("--against compares --direct runs");
    }
    let config = args.plugin.config()?;
    let mut limits = crate::backend::limits::IoLimits::default();
    limits
        .set_words(args.limits.iter().map(String::as_str))
        .map_err(|e| anyhow::anyhow!("--limit {e}"))?;
    if args.direct && !limits.is_unlimited() {
        bail!("--limit applies to the ring path, not --direct");
    }
    if args.submit && !limits.is_unlimited() {
        bail!("--limit applies to the ring path, not --submit");
    }
    if args.submit && !(1..=4096).contains(&args.iodepth) {
        bail!("--iodepth {}: must be 1 to 4096", args.iodepth);
    }
    // qemu-img's write pass needs the image as it was before the plugin wrote.
    let qemu_image = match &args.qemu_img {
        None => None,
        Some(_) => {
            if !args.direct || !crate::bench::qemu_img::supports(args.rw) {
                bail!("--qemu-img compares --direct runs with --rw read or write (qemu-img bench is sequential)");
            }
            let Ok(Some(path)) = config.opt_str("path") else {
                bail!("--qemu-img: the plugin configuration has no `path` key naming the image");
            };
            let path = std::path::PathBuf::from(path);
            let snapshot = if args.rw == Pattern::Write {
                Some(crate::bench::qemu_img::Snapshot::take(&path).map_err(anyhow::Error::msg)?)
            } else {
                None
            };
            Some((path, snapshot))
        }
    };
    let open = || -> Result<(String, GuardedDisk, Vec<KeyInfo>)> {
        let stack = open_stack(&args.plugin.plugin, &config)?;
        let name = stack.describe();
        let keys = stack.layers[0].keys.clone();
        let disk = GuardedDisk::new(Box::new(stack.disk), false).map_err(anyhow::Error::msg)?;
        Ok((name, disk, keys))
    };
    let (name, mut disk, keys) = open()?;
    // The fair references open their engine with the plugin's settings, defaults included.
    let fair_config = with_declared_defaults(&config, &keys);
    // An asynchronous plugin has every request the guest sends in flight, not one per worker.
    let is_async = disk.is_async();
    if args.submit && !is_async {
        bail!("--submit: {}", crate::bench::submit::NOT_ASYNC);
    }
    let region = match &args.region {
        Some(r) => parse_size(r)
            .map_err(anyhow::Error::msg)
            .context("--region")?,
        None => disk.size().min(1 << 30),
    };
    let opts = DirectOptions {
        pattern: args.rw,
        bs,
        region,
        duration: Duration::from_secs_f64(args.seconds),
        threads: args.threads,
        one_pass: args.qemu_img.is_some(),
    };
    let mode = if args.direct {
        "direct"
    } else if args.submit {
        "submit"
    } else {
        "ring"
    };
    let run_fair = || {
        crate::bench::fair::from_cli(
            args.rbd_bench,
            args.fio_nbd.as_deref(),
            &fair_config,
            (
                args.rw,
                bs,
                ref_depth(&args, is_async),
                region,
                opts.duration,
            ),
            args.client_cpu,
        )
    };
    let fair_before = if args.fair_first {
        // The plugin's disk is closed meanwhile: a second client of the same image open beside
        // the reference is another setup (an idle librbd handle beside it cut its 1 MiB
        // writes to a third), not the one the plugin's run has.
        drop(disk);
        let fair = run_fair()?;
        disk = open()?.1;
        Some(fair)
    } else {
        None
    };
    let f = if args.direct {
        let f = run_direct(&disk, &opts).map_err(anyhow::Error::msg)?;
        // The plugin's disk is closed first: qemu-img takes the image's lock.
        drop(disk);
        f
    } else if args.submit {
        let f = crate::bench::submit::run(
            &disk,
            args.rw,
            bs,
            args.iodepth,
            region,
            opts.duration,
            args.client_cpu,
        )
        .map_err(|e| anyhow::anyhow!("--submit: {e}"))?;
        // Closed before the references run, as after a ring run's.
        drop(disk);
        f
    } else {
        if args.iodepth == 0 || args.workers > 64 {
            bail!("--iodepth must be at least 1 and --workers at most 64");
        }
        let ring = RingOptions {
            pattern: args.rw,
            bs,
            iodepth: args.iodepth,
            region,
            duration: opts.duration,
            workers: args.workers,
            queues: args.queues,
            poll: Duration::from_micros(args.poll_us.min(10_000)),
            answer_on_completion: args.completion.answer_on_completion,
            limits,
            client_cpu: args.client_cpu,
        };
        run_ring(std::sync::Arc::new(disk), &ring).map_err(anyhow::Error::msg)?
    };
    let dst_span = if args.direct {
        bs
    } else if args.submit {
        bs * args.iodepth
    } else {
        bs * args.iodepth * args.queues
    };
    // A one-pass run may end early: the reference gets the time the plugin took. Beside a
    // fair reference (an engine's own client) memcpy is only context, and a rate: a fifth of
    // a second measures it, and same-run pairs do not wait `--seconds` more per run for it.
    let m_time = if opts.one_pass {
        Duration::from_secs_f64(f.seconds).min(opts.duration)
    } else if args.rbd_bench || args.fio_nbd.is_some() {
        opts.duration.min(Duration::from_millis(200))
    } else {
        opts.duration
    };
    let against = match &args.against {
        Some(spec) => Some(
            crate::bench::direct::run_against(spec, &opts)
                .map_err(anyhow::Error::msg)
                .context("--against")?,
        ),
        None => None,
    };
    // The fair references run right after the plugin (or right before it, `--fair-first`),
    // before the engines' own tools.
    let fair = match fair_before {
        Some(fair) => fair,
        None => run_fair()?,
    };
    let nbd = if args.nbdkit {
        Some(
            crate::bench::nbdkit::run(args.rw, bs, args.iodepth, region, opts.duration)
                .map_err(anyhow::Error::msg)
                .context("--nbdkit")?,
        )
    } else {
        None
    };
    let qemu = match (&args.qemu_img, &qemu_image) {
        (Some(format), Some((path, snapshot))) => {
            let image = snapshot.as_ref().map_or(path.as_path(), |s| s.path());
            Some(
                crate::bench::qemu_img::run(format, image, args.rw, bs, f.ops, args.threads)
                    .map_err(anyhow::Error::msg)
                    .context("--qemu-img")?,
            )
        }
        _ => None,
    };
    let fio_nbd = crate::bench::fio_nbd::from_cli(
        args.fio_nbd.as_deref(),
        &config,
        (args.rw, bs, args.iodepth, region, opts.duration),
    )?;
    let rbd = if args.rbd_bench {
        let total = f.ops * bs as u64;
        Some(
            crate::bench::rbd::run(&config, args.rw, bs, ref_depth(&args, is_async), total)
                .map_err(anyhow::Error::msg)
                .context("--rbd-bench")?,
        )
    } else {
        None
    };
    // memcpy last: the references that share the plugin's storage (a cluster, a server)
    // measure it in the state the plugin left it, with nothing run in between.
    let m = memcpy_reference(bs, region, dst_span, m_time, args.threads);
    let pattern = format!("{:?}", args.rw).to_lowercase();
    let limited = limit_fraction(&limits, args.rw, &f, bs);
    if args.json {
        let qemu_fields = qemu
            .map(|q| {
                format!(
                    ",\"qemu_img_ops\":{},\"qemu_img_mbps\":{:.1}",
                    q.ops, q.mbps
                )
            })
            .unwrap_or_default();
        let nbd_fields = nbd
            .map(|n| {
                format!(
                    ",\"nbdkit_iops\":{:.0},\"nbdkit_mbps\":{:.1}",
                    n.iops, n.mbps
                )
            })
            .unwrap_or_default()
            + &crate::bench::fio_nbd::json_fields(fio_nbd);
        let rbd_fields = rbd
            .map(|r| {
                format!(
                    ",\"rbd_bench_iops\":{:.0},\"rbd_bench_mbps\":{:.1}",
                    r.iops, r.mbps
                )
            })
            .unwrap_or_default()
            + &against
                .as_ref()
                .map(crate::bench::direct::against_json)
                .unwrap_or_default()
            + &fair
                .iter()
                .map(|r| r.figures.json(r.prefix))
                .collect::<String>();
        let ring_fields = f.ring.map(|r| r.json()).unwrap_or_default()
            + &f.cpu.map(|c| c.json("")).unwrap_or_default();
        let cpu_field = args
            .client_cpu
            .map(|c| format!(",\"client_cpu\":{c}"))
            .unwrap_or_default()
            + if args.fair_first {
                ",\"fair_first\":true"
            } else {
                ""
            };
        let limit_fields = limited
            .map(|(what, limit, got)| {
                format!(",\"limit\":\"{what}\",\"limit_value\":{limit},\"limit_achieved\":{got:.1},\"limit_ratio\":{:.4}", got / limit as f64)
            })
            .unwrap_or_default();
        println!(
            "{{\"plugin\":\"{}\",\"mode\":\"{mode}\",\"rw\":\"{pattern}\",\"bs\":{bs},\"threads\":{},\"ops\":{},\"failed\":{},\"seconds\":{:.3},\"iops\":{:.0},\"mbps\":{:.1},\"ns_per_op\":{:.1},\"lat_p50_us\":{:.3},\"lat_p99_us\":{:.3},\"memcpy_mbps\":{:.1},\"memcpy_ns_per_op\":{:.1}{cpu_field}{ring_fields}{nbd_fields}{qemu_fields}{rbd_fields}{limit_fields}}}",
            name, args.threads, f.ops, f.failed, f.seconds, f.iops, f.mbps, f.ns_per_op, f.lat_p50_us, f.lat_p99_us, m.mbps, m.ns_per_op
        );
    } else {
        println!(
            "{} {pattern} bs={bs} {} {mode}",
            name,
            if args.direct {
                format!("threads={}", args.threads)
            } else {
                let ring = if args.submit {
                    String::new()
                } else {
                    format!(" queues={} workers={}", args.queues, args.workers)
                };
                format!(
                    "iodepth={}{ring}{}{}",
                    args.iodepth,
                    args.client_cpu
                        .map(|c| format!(" client-cpu={c}"))
                        .unwrap_or_default(),
                    if args.fair_first {
                        " (fair reference first)"
                    } else {
                        ""
                    }
                )
            }
        );
        println!(
            "  plugin: {:>12.0} IOPS {:>10.1} MB/s {:>9.1} ns/op  p50 {:.3} us  p99 {:.3} us",
            f.iops, f.mbps, f.ns_per_op, f.lat_p50_us, f.lat_p99_us
        );
        if let Some(r) = &f.ring {
            println!("{}", r.line());
        }
        if let Some(c) = &f.cpu {
            let client = if args.submit {
                "the submitting thread"
            } else {
                "the client side (guest and ring threads)"
            };
            println!("{}", c.line(client));
        }
        if let Some(a) = &against {
            crate::bench::direct::print_against(a, &f);
        }
        if let Some((what, limit, got)) = limited {
            println!(
                "  limit:  {what} = {limit}/s; got {got:.1}/s over {:.2} s = {:.2}% of the limit",
                f.seconds,
                100.0 * got / limit as f64
            );
        }
        if f.failed > 0 {
            println!(
                "  errors: {} of {} requests failed; the figures above are the {} that succeeded",
                f.failed,
                f.ops + f.failed,
                f.ops
            );
        }
        println!(
            "  memcpy: {:>12.0} ops  {:>10.1} MB/s {:>9.1} ns/op  (same run)",
            m.iops, m.mbps, m.ns_per_op
        );
        println!(
            "  ratio:  {:.1}% of memcpy",
            100.0 * f.mbps / m.mbps.max(1e-9)
        );
        if let Some(n) = nbd {
            println!(
                "  nbdkit: {:>12.0} IOPS {:>10.1} MB/s  (null plugin, fio nbd engine, same run)",
                n.iops, n.mbps
            );
            println!("  ratio:  {:.1}x nbdkit", f.iops / n.iops.max(1e-9));
        }
        if let Some(q) = qemu {
            println!(
                "  qemu-img: {:>10} ops  {:>10.1} MB/s  (qemu-img bench -f {}, same requests, after the plugin)",
                q.ops,
                q.mbps,
                args.qemu_img.as_deref().unwrap_or_default()
            );
            println!("  ratio:  {:.2}x qemu-img", f.mbps / q.mbps.max(1e-9));
        }
        for r in &fair {
            r.figures.print(r.label, r.what, f.iops);
        }
        crate::bench::fio_nbd::print_text(fio_nbd, f.iops);
        if let Some(r) = rbd {
            println!(
                "  rbd:    {:>12.0} IOPS {:>10.1} MB/s  (rbd bench, same image, same run)",
                r.iops, r.mbps
            );
            println!("  ratio:  {:.3} of rbd bench", f.iops / r.iops.max(1e-9));
        }
    }
    if f.failed > 0 {
        // The figures are out; the run still did not go cleanly, and says so in its status.
        eprintln!(
            "xen-disk-host: {} of {} requests failed (first: {})",
            f.failed,
            f.ops + f.failed,
            f.first_error.as_deref().unwrap_or("no message")
        );
        return Ok(1);
    }
    Ok(0)
}

/// Requests the references keep in flight: as many as the plugin had (`--iodepth` for an
/// asynchronous plugin, else `--workers`; `--threads` with `--direct`).
fn ref_depth(args: &BenchArgs, is_async: bool) -> usize {
    if args.direct {
        args.threads
    } else if is_async || args.submit {
        args.iodepth
    } else {
        args.workers
    }
}

/// The limit that binds this run's pattern, if one does: its name, its value per second and
/// what the run got of it per second (requests, or bytes). The run's total includes the
/// burst, a tenth of a second's worth by default.
fn limit_fraction(
    limits: &crate::backend::limits::IoLimits,
    rw: Pattern,
    f: &crate::bench::direct::Figures,
    bs: usize,
) -> Option<(&'static str, u64, f64)> {
    let write = matches!(rw, Pattern::Write | Pattern::Randwrite);
    let (iops, bps, names) = if write {
        (
            limits.write_iops,
            limits.write_bps,
            ("write-iops", "write-bps"),
        )
    } else {
        (limits.read_iops, limits.read_bps, ("read-iops", "read-bps"))
    };
    let by_iops = iops.map(|r| (names.0, r.per_second, f.iops));
    let by_bps = bps.map(|r| (names.1, r.per_second, f.iops * bs as f64));
    // The tighter one binds: the one the run came closest to.
    match (by_iops, by_bps) {
        (Some(a), Some(b)) => Some(if a.2 / a.1 as f64 >= b.2 / b.1 as f64 {
            a
        } else {
            b
        }),
        (a, b) => a.or(b),
    }
}
