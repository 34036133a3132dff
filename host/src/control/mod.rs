//! The control socket: what `xen-disk-host ctl` talks to in a running `connect` or `serve`.
//!
//! One request per connection, one line of words; the answer is text (or one JSON object
//! with `--json`), and an answer starting `error: ` is a refusal:
//!
//! ```text
//! list                                   one line per device
//! stats <dev> [--json]                   counters and latency, per queue and in total
//! swap <dev> <plugin> [--allow-shrink] [key=value]...
//! detach <dev>                           Closing, as Ctrl-C does for `connect`
//! resize <dev>                           re-read the plugin's size and tell the guest
//! ```
//!
//! `<dev>` is a device's id from `list` (`<domid>/<vbd>`, e.g. `3/xvdb`) or its guest's
//! device name when only one guest has it.

pub mod socket;

use crate::backend::device::DeviceStats;
use crate::backend::queue::QueueStats;
use crate::histogram::Histogram;
use crate::plugin::{open_stack, GuardedDisk};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use xen_disk_plugin_api::Config;

/// One device a control socket can act on.
pub struct Entry {
    /// `<domid>/<vbd>`, e.g. `3/xvdb`.
    pub id: String,
    /// The guest's domain id.
    pub domid: u32,
    /// The guest's name, when known.
    pub guest: String,
    /// The guest's device name.
    pub vbd: String,
    /// "cow over vhd" style.
    pub stack: Mutex<String>,
    /// The disk (swappable).
    pub disk: Arc<GuardedDisk>,
    /// Counters and state.
    pub stats: Arc<DeviceStats>,
    /// Asks the device to detach.
    pub stop: Arc<AtomicBool>,
}

impl Entry {
    /// The entry for the device serving `vbd` to guest `domid` (its name read from xenstore).
    pub fn for_device(
        xs: &dyn crate::xen::xenstore::Xenstore,
        domid: u32,
        vbd: crate::backend::vbd::Vbd,
        stack: &str,
        disk: Arc<GuardedDisk>,
        stats: Arc<DeviceStats>,
        stop: Arc<AtomicBool>,
    ) -> Entry {
        let guest = xs
            .read(
                crate::xen::xenstore::NO_TX,
                &format!("/local/domain/{domid}/name"),
            )
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        Entry {
            id: format!("{domid}/{}", vbd.linux_name()),
            domid,
            guest,
            vbd: vbd.linux_name(),
            stack: Mutex::new(stack.to_string()),
            disk,
            stats,
            stop,
        }
    }
}

/// The devices of this process.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<Vec<Arc<Entry>>>,
}

impl Registry {
    /// Adds a device (replacing one with the same id).
    pub fn add(&self, entry: Entry) {
        let mut e = self.lock();
        e.retain(|x| x.id != entry.id);
        e.push(Arc::new(entry));
    }

    /// Forgets a device.
    pub fn remove(&self, id: &str) {
        self.lock().retain(|x| x.id != id);
    }

    /// Records that device `id` now runs `layers` (after a swap made elsewhere).
    pub fn set_stack(&self, id: &str, layers: &str) {
        if let Some(e) = self.lock().iter().find(|x| x.id == id) {
            *e.stack.lock().unwrap_or_else(|p| p.into_inner()) = layers.to_string();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn find(&self, name: &str) -> Result<Arc<Entry>, String> {
        let e = self.lock();
        if let Some(x) = e.iter().find(|x| x.id == name) {
            return Ok(x.clone());
        }
        let by_vbd: Vec<_> = e.iter().filter(|x| x.vbd == name).collect();
        match by_vbd.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(format!("no device {name} (see `ctl list`)")),
            _ => Err(format!(
                "{name} is ambiguous: several guests have it; use <domid>/{name}"
            )),
        }
    }

    /// Answers one request line.
    pub fn handle(&self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let result = match words.as_slice() {
            ["list"] => Ok(self.list()),
            ["stats", dev, rest @ ..] => {
                self.find(dev).map(|e| stats(&e, rest.contains(&"--json")))
            }
            ["swap", dev, plugin, rest @ ..] => self.find(dev).and_then(|e| swap(&e, plugin, rest)),
            ["detach", dev] => self.find(dev).map(|e| {
                e.stop.store(true, Ordering::SeqCst);
                format!("{}: detaching", e.id)
            }),
            ["resize", dev] => self.find(dev).and_then(|e| {
                e.disk
                    .refresh_size()
                    .map(|_| format!("{}: {} bytes", e.id, e.disk.size()))
            }),
            _ => Err(format!(
                "unknown request `{}` (list, stats, swap, detach, resize)",
                line.trim()
            )),
        };
        match result {
            Ok(text) => text,
            Err(e) => format!("error: {e}"),
        }
    }

    fn list(&self) -> String {
        let e = self.lock();
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
                x.stack.lock().unwrap_or_else(|p| p.into_inner())
            ));
        }
        out
    }
}

fn state_name(n: u8) -> &'static str {
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
        self.latency.merge(&o.latency);
    }

    fn json(&self) -> String {
        format!(
            "\"reads\":{},\"writes\":{},\"flushes\":{},\"discards\":{},\"read_bytes\":{},\"write_bytes\":{},\"errors\":{},\"unsupported\":{},\"in_flight\":{},\"lat_p50_us\":{:.3},\"lat_p99_us\":{:.3}",
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
            self.latency.percentile(0.99) as f64 / 1000.0
        )
    }

    fn text(&self) -> String {
        format!(
            "reads {} ({} bytes)  writes {} ({} bytes)  flushes {}  discards {}  errors {}  unsupported {}  in flight {}  p50 {:.1} us  p99 {:.1} us",
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
            self.latency.percentile(0.99) as f64 / 1000.0
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

/// Opens `plugin` with the `key=value` words and swaps it in.
fn swap(e: &Entry, plugin: &str, words: &[&str]) -> Result<String, String> {
    let allow_shrink = words.contains(&"--allow-shrink");
    if let Some(bad) = words
        .iter()
        .find(|w| w.starts_with("--") && **w != "--allow-shrink")
    {
        return Err(format!("swap: unknown option {bad} (only --allow-shrink)"));
    }
    let pairs: Vec<String> = words
        .iter()
        .filter(|w| !w.starts_with("--"))
        .map(|w| w.to_string())
        .collect();
    let config = Config::from_pairs(&pairs)?;
    let stack = open_stack(plugin, &config).map_err(|e| e.to_string())?;
    let layers = stack.describe();
    let swapped = e
        .disk
        .swap(Box::new(stack.disk), allow_shrink)
        .map_err(|why| format!("{}: not swapped: {why}", e.id))?;
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
