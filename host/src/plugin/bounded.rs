//! Opening a plugin stack with a time limit, off the caller's thread: for the control
//! socket's swaps and the daemon's reloads and toolstack devices, so a plugin that blocks
//! while opening (an image on a hung network filesystem, a FIFO) holds up nothing else.

use super::{open_stack, open_stack_read_only, PluginError, Stack};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use xen_disk_plugin_api::Config;

/// Why a bounded open gave no stack. Each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum BoundedError {
    /// `XEN_DISK_OPEN_TIMEOUT` is not a number of seconds.
    #[error("XEN_DISK_OPEN_TIMEOUT={0}: not a number of seconds (up to 86400)")]
    BadTimeout(String),
    /// Too many opens still running (slow or hung ones count until they end).
    #[error("{0} plugin opens are still running (slow or hung); try again later")]
    TooMany(usize),
    /// No thread could be started for the open.
    #[error("cannot start a thread to open the plugin: {0}")]
    Thread(std::io::Error),
    /// The open did not finish in time; its thread is left to finish.
    #[error("not opened within {} s (XEN_DISK_OPEN_TIMEOUT sets the limit)", .0.as_secs_f64())]
    Timeout(Duration),
    /// The open panicked.
    #[error("the plugin's open panicked")]
    Panicked,
    /// The plugin refused to load or open.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// Opens `spec` with `config` (read-only when asked, as [`open_stack_read_only`] does) on a
/// thread of its own, waiting at most [`OPEN_TIMEOUT`] (or `XEN_DISK_OPEN_TIMEOUT`
/// seconds).
pub fn open_bounded(spec: &str, config: &Config, read_only: bool) -> Result<Stack, BoundedError> {
    let (spec, config) = (spec.to_string(), config.clone());
    bounded(&OPENING, MAX_OPENING, open_timeout()?, move || {
        if read_only {
            open_stack_read_only(&spec, &config)
        } else {
            open_stack(&spec, &config)
        }
    })?
    .map_err(BoundedError::from)
}

/// How long an open may take, unless `XEN_DISK_OPEN_TIMEOUT` says.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(60);

/// Plugin opens that may run at once, abandoned ones included.
pub const MAX_OPENING: usize = 4;

/// Plugin opens running now (see [`bounded`]).
static OPENING: AtomicUsize = AtomicUsize::new(0);

/// [`OPEN_TIMEOUT`], or `XEN_DISK_OPEN_TIMEOUT` seconds when set.
pub fn open_timeout() -> Result<Duration, BoundedError> {
    let Ok(v) = std::env::var("XEN_DISK_OPEN_TIMEOUT") else {
        return Ok(OPEN_TIMEOUT);
    };
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 && *s <= 86400.0)
        .map(Duration::from_secs_f64)
        .ok_or(BoundedError::BadTimeout(v))
}

/// Gives back a place under [`MAX_OPENING`] when the open ends, however it ends.
struct Opening(&'static AtomicUsize);

impl Drop for Opening {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `open` on a thread of its own and waits at most `timeout` for it. Nothing can
/// interrupt a thread blocked in `open(2)` or `dlopen`, so when the time is up the request
/// is answered and the thread left to finish: what it opens then is dropped (closed) on it.
/// `running` counts such threads; beyond `limit`, a new open is refused at once.
fn bounded<T: Send + 'static>(
    running: &'static AtomicUsize,
    limit: usize,
    timeout: Duration,
    open: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BoundedError> {
    if running.fetch_add(1, Ordering::SeqCst) >= limit {
        running.fetch_sub(1, Ordering::SeqCst);
        return Err(BoundedError::TooMany(limit));
    }
    let place = Opening(running);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("xen-disk-open".into())
        .spawn(move || {
            let opened = open();
            // The place is given back before the answer goes out: a caller that opens the
            // next plugin as soon as it has this one must find it free, however late this
            // thread gets to run again (200 disks opened in a row on a loaded dom0 ran out).
            drop(place);
            let _ = tx.send(opened);
        })
        .map_err(BoundedError::Thread)?;
    rx.recv_timeout(timeout).map_err(|e| match e {
        std::sync::mpsc::RecvTimeoutError::Timeout => BoundedError::Timeout(timeout),
        std::sync::mpsc::RecvTimeoutError::Disconnected => BoundedError::Panicked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    #[test]
    fn finished_opens_never_count_against_the_next() {
        // A daemon opens its disks one after another: with a limit of one, each open must
        // find the previous one's place given back.
        static RUNNING: AtomicUsize = AtomicUsize::new(0);
        for i in 0..500 {
            assert_eq!(
                bounded(&RUNNING, 1, Duration::from_secs(5), move || i).unwrap(),
                i
            );
        }
    }

    #[test]
    fn an_open_that_does_not_return_is_answered_at_its_timeout() {
        static RUNNING: AtomicUsize = AtomicUsize::new(0);
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let started = Instant::now();
        let e = bounded(&RUNNING, 4, Duration::from_millis(300), move || {
            let _ = wait.recv();
            7
        })
        .unwrap_err();
        assert!(e.to_string().contains("not opened within 0.3 s"), "{e}");
        // Answered, not held until the open ends (never, here): any bound tells, so one a
        // loaded machine cannot reach.
        assert!(started.elapsed() < Duration::from_secs(10));
        // The abandoned open still counts until it ends.
        assert_eq!(RUNNING.load(Ordering::SeqCst), 1);
        drop(release);
        let deadline = Instant::now() + Duration::from_secs(30);
        while RUNNING.load(Ordering::SeqCst) != 0 {
            assert!(
                Instant::now() < deadline,
                "the open never gave its place back"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            bounded(&RUNNING, 4, Duration::from_secs(5), || 8).unwrap(),
            8
        );
    }

    /// Opens one after another never find their predecessor's place still taken, even
    /// with room for one.
    #[test]
    fn an_answered_open_has_given_its_place_back() {
        static RUNNING: AtomicUsize = AtomicUsize::new(0);
        for i in 0..500 {
            assert_eq!(
                bounded(&RUNNING, 1, Duration::from_secs(10), move || i).unwrap(),
                i
            );
        }
    }

    #[test]
    fn hung_opens_are_capped() {
        static RUNNING: AtomicUsize = AtomicUsize::new(0);
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = Arc::new(Mutex::new(wait));
        for _ in 0..2 {
            let w = wait.clone();
            let e = bounded(&RUNNING, 2, Duration::from_millis(50), move || {
                let _ = w.lock().map(|w| w.recv());
            });
            assert!(e.is_err());
        }
        // Refused at once: a refusal that waited would take its 60 s timeout; half a minute
        // leaves a loaded machine room.
        let started = Instant::now();
        let e = bounded(&RUNNING, 2, Duration::from_secs(60), || ()).unwrap_err();
        assert!(
            e.to_string().contains("2 plugin opens are still running"),
            "{e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "refused at once"
        );
        drop(release);
        let deadline = Instant::now() + Duration::from_secs(30);
        while bounded(&RUNNING, 2, Duration::from_secs(5), || ()).is_err() {
            assert!(Instant::now() < deadline, "places never given back");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
