//! `xen-disk-host nbd`: a plugin stack served over the Network Block Device protocol, so
//! that `qemu-img`, `qemu-io`, `nbdcopy`, `nbdinfo`, fio or the kernel's `nbd` driver can
//! read and write any disk the plugins make (filters included).
//!
//! ```text
//!  listener (Unix or TCP) ─▶ one thread per client ─▶ handshake (fixed newstyle options)
//!    ─▶ transmission: a few threads per connection take turns reading requests (every
//!       request buffered, in one recv) and serve them through the GuardedDisk (bounds,
//!       alignment, read-only, emulated FUA and write-zeroes), each reply whole in one
//!       writev under the socket's lock
//! ```
//!
//! - [`wire`]: the protocol's numbers and byte layouts.
//! - [`handshake`]: the option haggling up to `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`).
//! - [`meta`]: the metadata contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`).
//! - [`transmit`]: the request loop.
//! - [`server`]: listening, the limit on clients, the stream type.
//!
//! Every length and offset a client sends is checked before it is used: option payloads
//! are at most [`handshake::MAX_OPTION`] bytes (longer ones are read, dropped and refused
//! with `NBD_REP_ERR_TOO_BIG`), reads and writes at most [`MAX_PAYLOAD`] (a longer write's
//! payload is read and dropped, and the request answered `EINVAL`), and a client that
//! breaks the framing (a wrong magic) is disconnected; the others go on.

pub mod handshake;
pub mod meta;
pub mod server;
pub mod transmit;
pub mod wire;

use crate::plugin::GuardedDisk;
use std::sync::Arc;

pub use meta::DirtyMap;
pub use server::{bind, serve, Bound, Listen, Server};

/// The largest read or write payload served (and advertised as the maximum block size):
/// 32 MiB, the size the protocol says every server should accept.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// The preferred block size advertised: requests of this size and alignment avoid any
/// read-modify-write below.
pub const PREFERRED_BLOCK: u32 = 4096;

/// One export: a disk and what is published about it.
pub struct Export {
    /// The export's name (`LIST` shows it; `GO` takes it or the empty default name).
    pub name: String,
    /// One line for `NBD_INFO_DESCRIPTION` and `LIST`: the plugin stack.
    pub description: String,
    /// The disk, behind the host's guard.
    pub disk: Arc<GuardedDisk>,
    /// Dirty bitmaps published as `qemu:dirty-bitmap:<name>` meta contexts.
    pub bitmaps: Vec<(String, Arc<DirtyMap>)>,
}

impl Export {
    /// True when `name` selects this export: its own name, or the default (empty) name.
    pub fn answers_to(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    /// The transmission flags for this export, from what the disk declares.
    pub fn transmission_flags(&self) -> u16 {
        use wire::*;
        let info = self.disk.info();
        // Every connection reaches the same GuardedDisk, so a flush on one covers the
        // writes completed on all of them: multi-conn is safe for any plugin.
        let mut f = TF_HAS_FLAGS | TF_CAN_MULTI_CONN;
        if info.read_only {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_WRITE_ZEROES;
            if self.disk.can_discard() {
                f |= TF_SEND_TRIM;
            }
        }
        f
    }

    /// (minimum, preferred, maximum) block sizes: the disk's logical sector is the minimum
    /// for writes (reads of any alignment are served).
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let info = self.disk.info();
        let min = info.logical_sector_size;
        let preferred = PREFERRED_BLOCK.max(info.physical_sector_size).max(min);
        (min, preferred, MAX_PAYLOAD)
    }
}
