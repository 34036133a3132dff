//! Where log lines go: stderr, through `tracing`, one line per event.
//!
//! - The level: `XEN_DISK_LOG` or `RUST_LOG` (the usual `EnvFilter` directives, e.g.
//!   `info,xen_disk_host::backend::queue=debug`) when set; else `-v` raises the default
//!   one step per `v` (`serve` and `connect` log lifecycle events at `info` by default, the
//!   other commands only warnings). Per-request lines are `debug` and `trace`: off unless
//!   asked for.
//! - Under systemd, when stderr is the journal's stream (`JOURNAL_STREAM` names stderr's
//!   device and inode), each line starts with its syslog priority (`<3>` error ... `<7>`
//!   debug) for journald to file it under, and carries no timestamp or colour of its own.

use std::os::fd::AsRawFd;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The syslog priority journald files a line of `level` under.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether `journal_stream` (`JOURNAL_STREAM`'s value, `<device>:<inode>`) names the file
/// `fd` is open on.
pub fn is_journal(journal_stream: &str, fd: &impl AsRawFd) -> bool {
    let Some((dev, ino)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: an all-zero stat is a valid value to be overwritten; fstat writes only it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to a live stat.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// The default format with the line's priority in front.
struct WithPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The filter: the environment's when set, else `default` raised by `verbose` steps.
pub fn filter(default: Level, verbose: u8) -> EnvFilter {
    for var in ["XEN_DISK_LOG", "RUST_LOG"] {
        if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
            if let Ok(f) = EnvFilter::try_from_env(var) {
                return f;
            }
            eprintln!("xen-disk-host: warning: {var} does not parse; using the default level");
        }
    }
    let levels = [
        Level::ERROR,
        Level::WARN,
        Level::INFO,
        Level::DEBUG,
        Level::TRACE,
    ];
    let at = levels.iter().position(|l| *l == default).unwrap_or(1);
    let level = levels[(at + usize::from(verbose)).min(levels.len() - 1)];
    EnvFilter::new(level.as_str().to_ascii_lowercase())
}

/// Sets the process's subscriber up (once).
pub fn init(default: Level, verbose: u8) {
    let filter = filter(default, verbose);
    let journal = std::env::var("JOURNAL_STREAM").is_ok_and(|v| is_journal(&v, &std::io::stderr()));
    // Colours only for a person at a terminal, never into a file or the journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if journal {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_ansi(false)
            .with_target(false);
        builder
            .with_ansi(false)
            .event_format(WithPriority(format))
            .try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_is_recognised_by_device_and_inode() {
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let m = f.metadata().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(is_journal(&format!("{}:{}", m.dev(), m.ino()), &f));
        assert!(!is_journal(&format!("{}:{}", m.dev(), m.ino() + 1), &f));
        assert!(!is_journal("garbage", &f));
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::INFO), 6);
    }
}
