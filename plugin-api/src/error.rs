//! Errors as plugins report them and as they cross the `.so` boundary.
//!
//! A plugin returns [`Error`] values; the export glue turns each one (and any panic) into an
//! FFI value with a kind, an errno and a message, and the host turns it back. The host maps
//! every error on a guest request to `BLKIF_RSP_ERROR` (or `EOPNOTSUPP` for
//! [`ErrorKind::Unsupported`]) and logs the message.

use std::fmt;

/// What went wrong, coarsely: the host picks its reaction from this.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, abi_stable::StableAbi)]
pub enum ErrorKind {
    /// An I/O error from the backing store (errno says which).
    Io = 0,
    /// The operation is not supported by this disk.
    Unsupported = 1,
    /// A configuration key is missing, unknown or ill-typed.
    Config = 2,
    /// The request reaches outside the disk.
    OutOfRange = 3,
    /// A write to a read-only disk.
    ReadOnly = 4,
    /// The image file is corrupt or uses a feature this plugin refuses.
    Corrupt = 5,
    /// The plugin panicked; the message is the panic's.
    Panic = 6,
    /// Anything else.
    Other = 7,
}

impl ErrorKind {
    /// A short lower-case name, used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Unsupported => "not supported",
            ErrorKind::Config => "bad configuration",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::Corrupt => "corrupt image",
            ErrorKind::Panic => "plugin panicked",
            ErrorKind::Other => "error",
        }
    }
}

/// An error from a plugin: a kind, an optional errno (0 = none) and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    errno: i32,
    message: String,
}

/// The result type of every plugin callback.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            errno: 0,
            message: message.into(),
        }
    }

    /// An I/O error with its errno, e.g. `Error::io(libc::EIO, "short read")`.
    pub fn io(errno: i32, message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Io,
            errno,
            message: message.into(),
        }
    }

    /// A configuration error that names the key.
    pub fn config(key: &str, message: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Config, format!("config key `{key}`: {message}"))
    }

    /// The disk does not do `what` (e.g. "discard").
    pub fn unsupported(what: &str) -> Self {
        Error::new(ErrorKind::Unsupported, format!("{what} is not supported"))
    }

    /// The image is corrupt; the message should name the structure and the offset.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// Any other failure.
    pub fn msg(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Other, message)
    }

    /// Prefixes the message with context, e.g. the file name: `e.context("gold.vhd")`.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// When the OS refused write access (`EACCES`, `EPERM`, `EROFS`: a file mode, an
    /// immutable file, a read-only filesystem), adds which setting opens the disk read-only:
    /// `a.img: Permission denied (os error 13) (open it read-only with readonly=true)`.
    /// Other errors are returned unchanged. For a failed open for writing:
    /// `Error::from(e).context(&name).read_only_hint("readonly=true")`.
    pub fn read_only_hint(mut self, setting: &str) -> Self {
        let refused = self.errno != 0
            && matches!(
                std::io::Error::from_raw_os_error(self.errno).kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            );
        if refused {
            self.message = format!("{} (open it read-only with {setting})", self.message);
        }
        self
    }

    /// Rebuilds an error from its parts (used by the FFI glue).
    pub fn from_parts(kind: ErrorKind, errno: i32, message: String) -> Self {
        Error {
            kind,
            errno,
            message,
        }
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The errno, or 0 when the error did not come from the OS.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            errno: e.raw_os_error().unwrap_or(0),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn write_access_refusals_name_the_read_only_setting() {
        // EPERM (an immutable file), EACCES (a mode), EROFS (a read-only mount).
        for errno in [1, 13, 30] {
            let e = Error::from(io::Error::from_raw_os_error(errno))
                .context("/i/a.img")
                .read_only_hint("readonly=true");
            assert!(
                e.message().starts_with("/i/a.img: ")
                    && e.message()
                        .ends_with(" (open it read-only with readonly=true)"),
                "{errno}: {e}"
            );
            assert_eq!((e.kind(), e.errno()), (ErrorKind::Io, errno));
        }
        // ENOENT, EIO and errors without an errno are left as they are.
        for e in [
            Error::from(io::Error::from_raw_os_error(2)),
            Error::from(io::Error::from_raw_os_error(5)),
            Error::msg("no errno"),
        ] {
            assert_eq!(e.clone().read_only_hint("shared=false"), e);
        }
    }
}
