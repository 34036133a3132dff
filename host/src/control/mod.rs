//! The control socket: what `xen-disk-host ctl` talks to in a running `connect` or `serve`.
//!
//! One request per connection, one line of words (at most
//! [`socket::MAX_REQUEST`] bytes, sent within [`socket::REQUEST_DEADLINE`]; see [`socket`]
//! for the limits); the answer is text (or one JSON object with `--json`), and an answer
//! starting `error: ` is a refusal:
//!
//! ```text
//! list [--json]                          one line per device (or one JSON object)
//! stats <dev> [--json]                   counters and latency, per queue and in total
//! limit <dev> [key=value... | off]       show or change the disk's I/O limits, live
//! swap <dev> <plugin> [--allow-shrink] [-c key=value | key=value]...
//! detach <dev>                           Closing, as Ctrl-C does for `connect`
//! resize <dev>                           re-read the plugin's size and tell the guest
//! upgrade                                serve: hand every disk over (left connected) and
//!                                        start the binary again in this process, which
//!                                        takes them over: a new build in place
//! snapshot <dev> --nbd unix:PATH|tcp:HOST:PORT [--name NAME] [-c key=value]...
//!                                        freeze under a cow overlay, export the base (backup)
//! commit <dev>                           copy the overlay into the base, live, and drop it
//! ```
//!
//! `<dev>` is a device's id from `list` (`<domid>/<vbd>`, e.g. `3/xvdb`) or its guest's
//! device name when only one guest has it.
//!
//! A swap opens the new plugin with [`open_bounded`]: on a thread of its own, waiting at
//! most 60 s (`XEN_DISK_OPEN_TIMEOUT`, in seconds, sets another), so a plugin that blocks
//! while opening (an image on a hung network filesystem, a FIFO) gets the request answered
//! with an error and holds up nothing else.

pub mod backup;
pub mod socket;

use crate::backend::limits::IoLimits;
use crate::backend::queue::QueueStats;
use crate::backend::registry::{Entry, Registry};
use crate::backend::stack_record;
use crate::histogram::Histogram;
use crate::plugin::open_bounded;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use xen_disk_plugin_api::Config;

impl Registry {
    /// Answers one request line.
    pub fn handle(&self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let result = match words.as_slice() {
            ["list"] => Ok(self.list()),
            ["list", "--json"] => Ok(self.list_json()),
            ["limit", dev, rest @ ..] => self
                .find(dev)
                .map_err(|e| e.to_string())
                .and_then(|e| limit(&e, rest)),
            ["stats", dev, rest @ ..] => self
                .find(dev)
                .map_err(|e| e.to_string())
                .map(|e| stats(&e, rest.contains(&"--json"))),
            ["swap", dev, plugin, rest @ ..] => self
                .find(dev)
                .map_err(|e| e.to_string())
                .and_then(|e| swap(&e, plugin, rest)),
            ["detach", dev] => self.find(dev).map_err(|e| e.to_string()).map(|e| {
                e.stop.store(true, Ordering::SeqCst);
                format!("{}: detaching", e.id)
            }),
            ["resize", dev] => self.find(dev).map_err(|e| e.to_string()).and_then(|e| {
                e.disk
                    .refresh_size()
                    .map(|_| format!("{}: {} bytes", e.id, e.disk.size()))
                    .map_err(|why| why.to_string())
            }),
            ["upgrade"] if self.upgrade.allowed.load(Ordering::SeqCst) => {
                self.upgrade.requested.store(true, Ordering::SeqCst);
                Ok("handing the disks over to a new start of the binary\n".into())
            }
            ["upgrade"] => Err(
                "upgrade: only a serve with journals (--state-dir) can hand its disks over".into(),
            ),
            ["snapshot", dev, rest @ ..] => self
                .find(dev)
                .map_err(|e| e.to_string())
                .and_then(|e| backup::snapshot(&e, rest)),
            ["commit", dev] => self
                .find(dev)
                .map_err(|e| e.to_string())
                .and_then(|e| backup::commit(&e)),
            _ => Err(format!(
                "unknown request `{}` (list, stats, limit, swap, detach, resize, upgrade, snapshot, commit)",
                line.trim()
            )),
        };
        match result {
            Ok(text) => text,
            Err(e) => format!("error: {e}"),
        }
    }

    /// The devices now, in the order they were added: what `list`, `list --json` and the
    /// metrics endpoint all read.
    pub fn devices(&self) -> Vec<Arc<Entry>> {
        self.lock().clone()
    }

    fn list_json(&self) -> String {
        let items: Vec<String> = self
            .devices()
            .iter()
            .map(|x| {
                format!(
                    "{{\"id\":{},\"domid\":{},\"guest\":{},\"vbd\":{},\"state\":\"{}\",\"size\":{},\"stack\":{},\"limits\":{}}}",
                    json_str(&x.id),
                    x.domid,
                    json_str(&x.guest),
                    json_str(&x.vbd),
                    state_name(x.stats.state.load(Ordering::Relaxed)),
                    x.disk.size(),
                    json_str(&x.stack()),
                    json_str(&x.stats.limiter.limits().describe()),
                )
            })
            .collect();
        format!("{{\"devices\":[{}]}}", items.join(","))
    }

    fn list(&self) -> String {
        let e = self.devices();
        let mut out = String::new();
        for x in e.iter() {
            out.push_str(&format!(
                "{} domain={} guest={} vbd={} state={} size={} stack={}\n",
                x.id,
                x.domid,
                if x.guest.is_empty() { "-" } else { &x.guest },
                x.vbd,
                state_name(x.stats.state.load(Ordering::Relaxed)),
                x.disk.size(),
                x.stack()
            ));
        }
        out
    }
}

/// A JSON string literal (quotes, backslashes and control characters escaped).
pub(crate) fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `limit <dev>`: the limits in force; `limit <dev> key=value...` changes them (the rest
/// stay), `limit <dev> off` lifts them all. Rings pick a change up at their next request.
fn limit(e: &Entry, words: &[&str]) -> Result<String, String> {
    let limiter = &e.stats.limiter;
    if words == ["off"] {
        limiter.set(IoLimits::default());
    } else if !words.is_empty() {
        let mut l = limiter.limits();
        l.set_words(words.iter().copied())
            .map_err(|why| format!("limit: {why}; nothing changed"))?;
        limiter.set(l);
    }
    let now = limiter.limits().describe();
    if !words.is_empty() {
        tracing::info!(id = %e.id, "limits now {now}");
    }
    Ok(format!("{}: {now}", e.id))
}

/// The name of xenbus state `n`.
pub(crate) fn state_name(n: u8) -> &'static str {
    match n {
        1 => "Initialising",
        2 => "InitWait",
        3 => "Initialised",
        4 => "Connected",
        5 => "Closing",
        6 => "Closed",
        _ => "Unknown",
    }
}

/// One queue's counters, read once.
#[derive(Default)]
struct Counts {
    reads: u64,
    writes: u64,
    flushes: u64,
    discards: u64,
    read_bytes: u64,
    write_bytes: u64,
    errors: u64,
    unsupported: u64,
    in_flight: u64,
    sleeps: u64,
    parks: u64,
    notifies: u64,
    handoffs: u64,
    latency: Histogram,
}

impl Counts {
    fn of(q: &QueueStats) -> Counts {
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            reads: l(&q.reads),
            writes: l(&q.writes),
            flushes: l(&q.flushes),
            discards: l(&q.discards),
            read_bytes: l(&q.read_bytes),
            write_bytes: l(&q.write_bytes),
            errors: l(&q.errors),
            unsupported: l(&q.unsupported),
            in_flight: l(&q.in_flight),
            sleeps: l(&q.sleeps),
            parks: l(&q.parks),
            notifies: l(&q.notifies),
            handoffs: l(&q.handoffs),
            latency: q.latency.snapshot(),
        }
    }

    fn add(&mut self, o: &Counts) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.flushes += o.flushes;
        self.discards += o.discards;
        self.read_bytes += o.read_bytes;
        self.write_bytes += o.write_bytes;
        self.errors += o.errors;
        self.unsupported += o.unsupported;
        self.in_flight += o.in_flight;
        self.sleeps += o.sleeps;
        self.parks += o.parks;
        self.notifies += o.notifies;
        self.handoffs += o.handoffs;
        self.latency.merge(&o.latency);
    }

    fn json(&self) -> String {
        format!(
            "\"reads\":{},\"writes\":{},\"flushes\":{},\"discards\":{},\"read_bytes\":{},\"write_bytes\":{},\"errors\":{},\"unsupported\":{},\"in_flight\":{},\"lat_p50_us\":{:.3},\"lat_p99_us\":{:.3},\"lat_timed\":{},\"sleeps\":{},\"notifies\":{},\"handoffs\":{},\"parks\":{}",
            self.reads,
            self.writes,
            self.flushes,
            self.discards,
            self.read_bytes,
            self.write_bytes,
            self.errors,
            self.unsupported,
            self.in_flight,
            self.latency.percentile(0.5) as f64 / 1000.0,
            self.latency.percentile(0.99) as f64 / 1000.0,
            self.latency.count(),
            self.sleeps,
            self.notifies,
            self.handoffs,
            self.parks
        )
    }

    fn text(&self) -> String {
        format!(
            "reads {} ({} bytes)  writes {} ({} bytes)  flushes {}  discards {}  errors {}  unsupported {}  in flight {}  p50 {:.1} us  p99 {:.1} us (of {} timed)  sleeps {}  notifies {}  hand-offs {}  parks {}",
            self.reads,
            self.read_bytes,
            self.writes,
            self.write_bytes,
            self.flushes,
            self.discards,
            self.errors,
            self.unsupported,
            self.in_flight,
            self.latency.percentile(0.5) as f64 / 1000.0,
            self.latency.percentile(0.99) as f64 / 1000.0,
            self.latency.count(),
            self.sleeps,
            self.notifies,
            self.handoffs,
            self.parks
        )
    }
}

/// The device's counters since it connected (a reconnect starts them again).
fn stats(e: &Entry, json: bool) -> String {
    let queues: Vec<Counts> = e
        .stats
        .queues
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|q| Counts::of(q))
        .collect();
    let mut total = Counts::default();
    queues.iter().for_each(|q| total.add(q));
    if json {
        let per: Vec<String> = queues.iter().map(|q| format!("{{{}}}", q.json())).collect();
        format!(
            "{{\"device\":\"{}\",{},\"queues\":[{}]}}",
            e.id,
            total.json(),
            per.join(",")
        )
    } else {
        let mut out = format!("{}: {}\n", e.id, total.text());
        for (i, q) in queues.iter().enumerate() {
            out.push_str(&format!("  queue {i}: {}\n", q.text()));
        }
        out
    }
}

/// Opens `plugin` with the `key=value` words (bare or after `-c`) and swaps it in.
fn swap(e: &Entry, plugin: &str, words: &[&str]) -> Result<String, String> {
    let mut allow_shrink = false;
    let mut pairs = Vec::new();
    let mut words = words.iter();
    while let Some(&w) = words.next() {
        match w {
            "--allow-shrink" => allow_shrink = true,
            "-c" | "--config" => match words.next() {
                Some(pair) => pairs.push(pair.to_string()),
                None => return Err(format!("swap: {w} needs a key=value after it")),
            },
            _ if w.starts_with('-') => {
                return Err(format!(
                    "swap: unknown option {w} (--allow-shrink, -c key=value)"
                ))
            }
            _ => pairs.push(w.to_string()),
        }
    }
    let config = Config::from_pairs(&pairs)?;
    // A read-only device's new plugin is opened read-only too: its image may be one the
    // host cannot write.
    let read_only = e.disk.info().read_only;
    let stack = open_bounded(plugin, &config, read_only)
        .map_err(|why| format!("{}: not swapped: {plugin}: {why}", e.id))?;
    let layers = stack.describe();
    // Recorded before the switch, so a serve taking the device over after a crash serves
    // what the guest writes to from now on; put back if the swap fails.
    let recorded = match &e.journal {
        Some(j) => Some(
            record_swap(j, plugin, &pairs)
                .map_err(|why| format!("{}: not swapped: {why}", e.id))?,
        ),
        None => None,
    };
    let swapped = e
        .disk
        .swap(Box::new(stack.disk), allow_shrink)
        .map_err(|why| {
            tracing::error!(id = %e.id, "swap to {plugin} failed: {why}");
            if let (Some(j), Some(before)) = (&e.journal, &recorded) {
                before.restore(j);
            }
            format!("{}: not swapped: {why}", e.id)
        })?;
    if let (Some(j), Some(before)) = (&e.journal, &recorded) {
        before.swapped(j);
    }
    e.stats.swapped(swapped.pause);
    tracing::info!(id = %e.id, pause_us = swapped.pause.as_micros() as u64, "swapped: now {layers}");
    *e.stack.lock().unwrap_or_else(|p| p.into_inner()) = layers.clone();
    Ok(format!(
        "{}: now {layers}; paused {} us{}",
        e.id,
        swapped.pause.as_micros(),
        swapped
            .new_size
            .map(|s| format!("; size now {s} bytes"))
            .unwrap_or_default()
    ))
}

/// The records a swap replaces (see [`stack_record`]): the stack recorded before, and an
/// open snapshot's, whose overlay the swap takes out.
struct BeforeSwap {
    stack: Option<stack_record::Stack>,
    snapshot: Option<std::path::PathBuf>,
}

impl BeforeSwap {
    /// Puts the records back: the swap failed and the old stack serves on.
    fn restore(&self, journal: &Path) {
        let _ = stack_record::restore_stack(journal, self.stack.as_ref());
        if let Some(overlay) = &self.snapshot {
            let _ = stack_record::write_snapshot(journal, overlay);
        }
    }

    /// The swap is done: a snapshot's overlay, unplugged, is not needed any more.
    fn swapped(&self, journal: &Path) {
        if self.snapshot.is_some() {
            let _ = stack_record::remove_snapshot(journal);
        }
    }
}

/// Records `plugin` with `pairs` as the device's stack and forgets an open snapshot's record
/// (a swap replaces the overlay), returning what was there.
fn record_swap(journal: &Path, plugin: &str, pairs: &[String]) -> Result<BeforeSwap, String> {
    let before = BeforeSwap {
        stack: stack_record::read_stack(journal).unwrap_or(None),
        snapshot: stack_record::read_snapshot(journal).unwrap_or(None),
    };
    stack_record::write_stack(
        journal,
        &stack_record::Stack {
            plugin: plugin.to_string(),
            pairs: pairs.to_vec(),
        },
    )?;
    if before.snapshot.is_some() {
        if let Err(why) = std::fs::remove_file(stack_record::snapshot_path(journal)) {
            before.restore(journal);
            return Err(why.to_string());
        }
    }
    Ok(before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::DeviceStats;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    #[test]
    fn swap_takes_pairs_bare_or_after_c() {
        let registry = Registry::default();
        registry.add(Entry {
            id: "1/xvdb".into(),
            domid: 1,
            guest: String::new(),
            vbd: "xvdb".into(),
            stack: Mutex::new("x".into()),
            disk: Arc::new(crate::plugin::GuardedDisk::new(Box::new(Blank), false).unwrap()),
            stats: Arc::new(DeviceStats::default()),
            stop: Arc::new(AtomicBool::new(false)),
            journal: None,
        });
        // Malformed pairs are refused before any plugin is looked for, naming the word.
        for (req, want) in [
            ("swap 1/xvdb p -c", "-c needs a key=value"),
            ("swap 1/xvdb p --config", "--config needs a key=value"),
            (
                "swap 1/xvdb p -x",
                "unknown option -x (--allow-shrink, -c key=value)",
            ),
            ("swap 1/xvdb p -c novalue", "novalue"),
            ("swap 1/xvdb p novalue", "novalue"),
        ] {
            let out = registry.handle(req);
            assert!(
                out.starts_with("error: ") && out.contains(want),
                "{req}: {out}"
            );
        }
        // Both forms reach the plugin search with the same configuration.
        let bare = registry.handle("swap 1/xvdb no-such-plugin-xyz a=1 b=2");
        let with_c = registry.handle("swap 1/xvdb no-such-plugin-xyz -c a=1 --config b=2");
        assert!(bare.contains("no-such-plugin-xyz"), "{bare}");
        assert_eq!(bare, with_c);
    }

    use crate::test_disks::Blank;
}
