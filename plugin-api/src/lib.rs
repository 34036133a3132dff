//! # Writing a xen-disk plugin
//!
//! A plugin is a Rust `cdylib` that serves one kind of virtual disk to Xen guests:
//! `xen-disk-host` speaks the Xen block protocol to the guest and calls your plugin to
//! read and write bytes. You implement two small traits and export them with one macro;
//! you write no `unsafe`, no abi_stable types and no Xen code.
//!
//! ## A complete plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "ramdisk-plugin"
//! version = "0.1.0"
//! edition = "2021"
//!
//! [lib]
//! name = "ramdisk"            # the file is libramdisk.so; users type --plugin ramdisk
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! # Until the crate is on crates.io, point at a copy of the xen-disk sources, either a
//! # checkout on disk:
//! xen-disk-plugin-api = { path = "/src/xen-disk/plugin-api" }
//! # or the repository, pinned to the revision of the host you serve with:
//! # xen-disk-plugin-api = { git = "https://…/xen-disk.git", rev = "…" }
//! # Once published: xen-disk-plugin-api = "0.1"
//! ```
//!
//! Cargo finds the crate by its package name inside a git repository's workspace, so the
//! `git` form needs no `package =` key. The crate's version is the interface's: 1.3.0
//! builds plugins for ABI 1.3 ([`ABI_MAJOR`].[`ABI_MINOR`]), which every host that speaks
//! 1.3 or later loads (see [Compatibility](#compatibility)); `xen-disk-host plugins inspect`
//! shows the version a plugin was built for.
//!
//! `src/lib.rs`:
//!
//! ```no_run
//! use std::sync::RwLock;
//! use xen_disk_plugin_api::*;
//!
//! struct RamDisk(RwLock<Vec<u8>>);
//!
//! impl Disk for RamDisk {
//!     fn info(&self) -> DiskInfo {
//!         DiskInfo::new(self.0.read().unwrap().len() as u64)
//!     }
//!     fn read(&self, offset: u64, bufs: &mut ReadBufs) -> Result<()> {
//!         let data = self.0.read().unwrap();
//!         bufs.copy_from(&data[offset as usize..][..bufs.len()]);
//!         Ok(())
//!     }
//!     fn write(&self, offset: u64, bufs: &WriteBufs) -> Result<()> {
//!         let mut data = self.0.write().unwrap();
//!         bufs.copy_to(&mut data[offset as usize..][..bufs.len()]);
//!         Ok(())
//!     }
//! }
//!
//! struct RamDiskPlugin;
//!
//! impl Plugin for RamDiskPlugin {
//!     type Disk = RamDisk;
//!     const NAME: &'static str = "ramdisk";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     const DESCRIPTION: &'static str = "A disk in memory, lost on detach";
//!     const CONFIG_KEYS: &'static [ConfigKey] =
//!         &[ConfigKey::optional("size", KeyType::Size, "64M", "Disk size")];
//!
//!     fn open(config: &Config) -> Result<RamDisk> {
//!         Ok(RamDisk(RwLock::new(vec![0; config.size("size")? as usize])))
//!     }
//! }
//!
//! export_plugin!(RamDiskPlugin);
//! ```
//!
//! Build it and try it without Xen:
//!
//! ```text
//! cargo build --release
//! xen-disk-host plugins inspect ./target/release/libramdisk.so
//! xen-disk-host check --destructive ./target/release/libramdisk.so -c size=16M
//! ```
//!
//! `check` is the conformance suite: it writes and reads back patterns, probes the edges,
//! runs concurrent I/O and checks error handling. Pass it before you ship. The cases that
//! write run only with `--destructive`, as they overwrite the disk: point it at a scratch image. Then serve a real
//! guest: `xen-disk-host connect guest1 --plugin ./target/release/libramdisk.so -c size=1G`.
//!
//! ## Compatibility
//!
//! **The promise.** A plugin built for plugin ABI 1.x loads and works, without a rebuild, in
//! every host that speaks 1.y with y ≥ x, whatever Rust compiler either side was built with.
//! Build against the oldest minor version that has what you need, and one binary serves
//! every host from that release on.
//!
//! - **Newer minor than the host** (a plugin built for 1.3 in a 1.1 host): it loads, and the
//!   host uses only what 1.1 knows. What the plugin declares through later additions is not
//!   asked for, so the host falls back as for a plugin that lacks it (it emulates the call or
//!   does not advertise the feature). `plugins inspect` says so on the `abi version` line.
//! - **Another major** (2.x, or the numbering before 1.0: versions 1 to 3): refused on load,
//!   with one line naming the file, the plugin's version and the host's, and exit code 2.
//!
//! The version a plugin was built for is [`ABI_VERSION`] (major in the high 16 bits), which
//! the export macro returns from the plain C symbol [`ABI_VERSION_SYMBOL`]; the host reads it
//! before anything else.
//!
//! **How it is kept.** The boundary is abi_stable's: a root module ([`ffi::PluginMod`]) and a
//! trait object for each open disk ([`ffi::FfiDisk`]), whose layouts abi_stable checks on
//! load. abi_stable's own way to extend a prefix type (add fields at the end) works only one
//! way round: its check refuses a library whose module has *fewer* fields than the loader
//! expects, i.e. an older plugin in a newer host, which is the direction that matters here.
//! So the 1.0 layouts are frozen, field for field and method for method, and each carries
//! one *extension call*, `extension(id, input, output)`. What a later minor version adds
//! travels through it under a new id ([`ffi::ext`]): a fact the host asks a disk for (1.1's
//! discard alignment), or a new operation. A plugin built before the id existed answers
//! "unsupported" (its SDK knows no such id) and the host falls back, exactly as
//! [`DiskInfo`]'s flags already make it for flush, discard, write-zeroes and FUA. Each id's
//! encoding is size-prefixed in effect: the asker passes a buffer of the size it knows, the
//! answer fills what the plugin knows of it and says how many bytes that was, so an encoding
//! may grow at its end without a new id. Both sides of every extension call live in this
//! crate: plugin authors see new [`Disk`] methods and [`DiskInfo`] fields, never ids.
//! The other designs considered: versioned entry points with a full copy of every type per
//! minor version (each release would have to keep and test all the old layouts), or a
//! hand-made C vtable for Rust plugins too (losing abi_stable's layout check, which catches
//! a mismatch the version number would not). The C SDK ([below](#plugins-in-c)) is the
//! size-prefixed vtable, because C has no abi_stable.
//!
//! **Rules for future changes.** A change to this crate may:
//!
//! - add a [`Disk`] method with a default that keeps today's behaviour, or a [`DiskInfo`]
//!   field whose default (from [`DiskInfo::new`]) does; carry it across with a new extension
//!   id (`ext::id(minor, n)`) served in `extension.rs`, and bump [`ABI_MINOR`] and the
//!   crate's minor version together (abi_stable records the crate's version in every type's
//!   layout and refuses another major: the crate stays 1.x for as long as the ABI does);
//! - grow an existing id's answer at its end, never change what is there;
//! - add keys, messages, helpers and anything else that does not cross the boundary.
//!
//! It may not: change, reorder or remove anything in [`ffi`]'s 1.0 types (`PluginMod`,
//! `FfiDisk`, `FfiDiskInfo`, `FfiDescriptor`, `FfiConfigKey`, `FfiError`, `FfiCompletion`,
//! `RawBuf`) or the enums that cross in them (`ThreadModel`, `KeyType`, `ErrorKind`,
//! `SubmitOp`, `PluginKind`: abi_stable compares their variants too); give a published id
//! another meaning; or make a host require an extension (the host must work when every
//! extension answers "unsupported"). A change that must break one of these is ABI 2.0, and
//! 1.x plugins are then refused in one line. `tests/fixtures/fossil-1.0` holds a plugin
//! built against a frozen copy of the 1.0 crate: CI checks that the current host loads it,
//! passes `check` on it and serves it, so a change that breaks the promise fails there.
//!
//! **Testing against several host versions.** Build once, against the oldest minor you
//! support, then run the same `.so` through each host release you promise to work with:
//!
//! ```text
//! for host in /opt/xen-disk/1.1/bin/xen-disk-host /opt/xen-disk/1.4/bin/xen-disk-host; do
//!     $host plugins inspect ./libyours.so            # loads; shows "abi version: 1.1"
//!     $host check --destructive ./libyours.so -c path=scratch.img
//! done
//! ```
//!
//! A newer host must pass every case the older one passed; a case that is new in the newer
//! host's `check` tests what that host adds, and a skip there means you do not declare it.
//!
//! ## Lifecycle
//!
//! ```text
//!  load .so ─▶ check ABI ─▶ describe (NAME, VERSION, DESCRIPTION, CONFIG_KEYS)
//!    ─▶ config checked against CONFIG_KEYS, defaults filled
//!    ─▶ Plugin::open(&Config) ─▶ Disk::info
//!    ─▶ read / write / flush / discard / write_zeroes … (from many threads if Parallel)
//!    ─▶ drop(Disk)            (detach, guest gone, or hot swap to another plugin)
//! ```
//!
//! - **`open`** is called once per disk attach, with a [`Config`] already checked against
//!   [`Plugin::CONFIG_KEYS`]: unknown keys, ill-typed values and missing required keys never
//!   reach you. Open files here; return an [`Error`] naming the file on failure.
//! - **`info`** says what the disk is ([`DiskInfo`]). It may be called again at any time:
//!   if `size` grows the host tells the guest (online resize).
//! - **I/O** calls come with offsets and lengths in bytes, already checked by the host to be
//!   inside the disk and aligned to the logical sector size. Buffers are the guest's own
//!   mapped pages ([`ReadBufs`], [`WriteBufs`]): no copy was made, and none is needed.
//! - **drop** closes the disk. A library is never unloaded once loaded.
//!
//! ## Required and optional
//!
//! Required: [`Disk::info`], [`Disk::read`], [`Disk::write`], and the [`Plugin`] constants
//! and `open`. Optional, each only called when [`DiskInfo`] declares it:
//!
//! | capability | declare with | if you don't |
//! |---|---|---|
//! | [`Disk::flush`] | `.flush(true)` (you have a volatile cache) | the guest is told the disk is write-through and sends no flushes |
//! | [`Disk::write_fua`] | `.fua(true)` | host emulates: write, then flush |
//! | [`Disk::discard`] | `.discard(true)` | not advertised to the guest |
//! | [`Disk::write_zeroes`] | `.write_zeroes(true)` | host emulates by writing zero buffers |
//! | [`Disk::extents`] (1.2) | implement it | every range reports as data |
//! | [`Disk::attach_completions`] (1.3) | implement it (asynchronous disks) | your threads complete every submission |
//!
//! ## Block status
//!
//! Since ABI 1.2 a disk may say which ranges are holes (not allocated in its backing store)
//! or read as zeroes, by implementing [`Disk::extents`]. The host publishes the answer to
//! NBD clients as the `base:allocation` context (`xen-disk-host nbd`), so `qemu-img map`,
//! `nbdinfo --map`, `nbdcopy` and backup tools skip what holds nothing. An answer is a list
//! of consecutive [`Extent`]s starting at the asked offset; give a prefix when the whole
//! range would cost too much (the host asks again for the rest), but at least one extent,
//! each a whole number of sectors long. "Data" is always a safe answer, and the default.
//!
//! ```no_run
//! # use xen_disk_plugin_api::*;
//! # struct Sparse { block: u64, present: Vec<bool> }
//! # impl Disk for Sparse {
//! # fn info(&self) -> DiskInfo { DiskInfo::new(1 << 20) }
//! # fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> Result<()> { Ok(()) }
//! # fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> { Ok(()) }
//! fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
//!     // One extent per block touched; the host merges neighbours that are alike.
//!     let mut out = Vec::new();
//!     let mut pos = offset;
//!     while pos < offset + len {
//!         let n = (self.block - pos % self.block).min(offset + len - pos);
//!         let stored = self.present[(pos / self.block) as usize];
//!         out.push(if stored { Extent::data(n) } else { Extent::hole(n) });
//!         pos += n;
//!     }
//!     Ok(out)
//! }
//! # }
//! ```
//!
//! The plugins in this repository answer from what they already know: `file` from the
//! filesystem (`SEEK_DATA`/`SEEK_HOLE`), `qcow2` from its L2 tables (zero clusters and
//! unallocated clusters are holes reading zeroes; a backing file answers for what it
//! holds), `vhd` from its block table (and a differencing image's sector bitmaps), and the
//! `cow` filter reports its overlay's granules as data and asks its base for the rest, as a
//! filter should: call [`ForeignDisk::extents`](Disk::extents) on the base. A plugin built
//! for 1.0 or 1.1 is asked too and answers "unsupported" (its SDK knows no such call), so
//! it reads as all data; C plugins report none yet.
//!
//! ## Thread model
//!
//! [`ThreadModel::Parallel`] (the default) lets the host call a disk from several worker
//! threads at once; `Disk: Sync`, so the compiler already holds you to it. Choose
//! [`ThreadModel::Serialized`] when the backing store wants one request at a time; the host
//! then serializes calls with a lock. [`ThreadModel::NonBlocking`] is for disks that never
//! wait (memory only): the host calls them on the ring thread, without a worker hand-off.
//!
//! [`ThreadModel::Async`] is for storage behind a network, whose client library already
//! works asynchronously (libnbd, librbd): reads and writes arrive through [`Disk::submit`]
//! as a [`Submission`]; start the I/O, return, and call [`Submission::complete`] from
//! whatever thread learns the result. The ring thread then keeps every request the guest
//! sends in flight, and no host thread sleeps per request. The buffers are yours until you
//! complete; a submission you drop answers the guest with an error. `complete` returns
//! within microseconds and never blocks on I/O, but the host (`--answer-on-completion`, its
//! default) answers the guest right there when its ring thread sleeps (the response on the
//! ring, an event-channel notification): call it outside locks your `submit` path takes, or
//! the ring thread waits on them. Flush, discard and write-zeroes still arrive as blocking
//! calls on host workers, and `read`/`write` must still work (the host uses them for
//! emulated FUA, `check` and `bench --direct`).
//!
//! ```no_run
//! # use xen_disk_plugin_api::*;
//! # struct Net;
//! # impl Net { fn start(&self, _: Submission) {} }
//! # struct NetDisk(Net);
//! impl Disk for NetDisk {
//!     fn info(&self) -> DiskInfo {
//!         DiskInfo::new(1 << 30).thread_model(ThreadModel::Async)
//!     }
//!     # fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> Result<()> { Ok(()) }
//!     # fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> { Ok(()) }
//!     fn submit(&self, submission: Submission) {
//!         // Hand it to the library; its callback later calls submission.complete(result).
//!         self.0.start(submission);
//!     }
//! }
//! ```
//!
//! ### Completions taken by the host (ABI 1.3)
//!
//! An asynchronous disk usually has a thread of its own that waits for replies (on a
//! socket, say) and completes submissions. On a busy dom0 with few CPUs that thread is a
//! third one woken per request, beside the guest's and the host's ring thread. Since ABI
//! 1.3 the ring thread can read the replies itself: implement
//! [`Disk::attach_completions`] to hand it a descriptor, [`Disk::take_completions`] to take
//! what is ready, and [`Disk::detach_completions`]. The ring thread then watches the
//! descriptor beside the guest's event channel, calls `take_completions` once per pass
//! (replies in, answers out, new requests taken, all on one thread), and detaches when its
//! ring goes idle or stops, or when a hot swap replaces the disk.
//!
//! - Offer one attachment at a time; answer `None` to a second (another ring of the same
//!   disk), and whenever you cannot (the default: nothing changes).
//! - `take_completions` must not block: read what is there, complete, return. If your own
//!   thread is reading at that moment, skip (`try_lock`), don't wait.
//! - While attached, stop watching the descriptor on your own thread, but keep looking every
//!   few milliseconds whether replies wait and the host took nothing since the last look,
//!   and take them then. The ring thread may be held up (a hot swap holds new requests
//!   while it drains the disk, and the drain needs the replies), and other callers (`check`,
//!   the NBD export, host workers' flushes) use the disk too. No completion may depend on
//!   the host calling you.
//! - After `detach_completions`, watch the descriptor again at once: replies may be
//!   waiting.
//! - The attached thread calls `take_completions` after every pass in which it submitted,
//!   before it sleeps or detaches. So what it submits may wait there to go out together
//!   (one system call and one server wake-up for a burst); your stand-in sends it too.
//! - A descriptor that stays readable with nothing to take (a dead connection) is let go by
//!   the host after a thousand such wake-ups in a row; your own thread completes from then
//!   on.
//!
//! `nbd-client` is the model: its first connection (the one small requests share) is
//! offered, `take_completions` reads the socket without blocking, and its reader thread
//! stands in every 5 ms.
//!
//! ```no_run
//! # use xen_disk_plugin_api::*;
//! # use std::sync::atomic::{AtomicBool, Ordering};
//! # struct Conn { socket: i32, attached: AtomicBool }
//! # impl Conn { fn read_ready_replies_if_free(&self) {} }
//! # struct NetDisk(Conn);
//! impl Disk for NetDisk {
//!     # fn info(&self) -> DiskInfo { DiskInfo::new(1 << 30).thread_model(ThreadModel::Async) }
//!     # fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> Result<()> { Ok(()) }
//!     # fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> { Ok(()) }
//!     # fn submit(&self, _: Submission) {}
//!     fn attach_completions(&self) -> Option<i32> {
//!         // Your reader thread sees the flag and stops polling the socket (it keeps a
//!         // slow look-out for replies nobody took).
//!         (!self.0.attached.swap(true, Ordering::AcqRel)).then_some(self.0.socket)
//!     }
//!     fn take_completions(&self) {
//!         self.0.read_ready_replies_if_free(); // non-blocking read, try_lock
//!     }
//!     fn detach_completions(&self) {
//!         self.0.attached.store(false, Ordering::Release); // and wake your reader
//!     }
//! }
//! ```
//!
//! ## Errors and panics
//!
//! Return [`Error`] values: [`Error::io`] with an errno, [`Error::config`] naming the key,
//! [`Error::corrupt`] for a bad image, [`Error::unsupported`]. The guest sees
//! `BLKIF_RSP_ERROR` (`EOPNOTSUPP` for unsupported) and the host logs your message.
//!
//! `Error` converts from [`std::io::Error`], keeping the errno (`ErrorKind::Unsupported`
//! becomes [`ErrorKind::Unsupported`], everything else [`ErrorKind::Io`]), so `?` works on
//! the standard library's I/O calls. Add the file name with [`Error::context`], and when an
//! open for writing may be refused, [`Error::read_only_hint`] tells the user which key opens
//! the image read-only:
//!
//! ```no_run
//! # use xen_disk_plugin_api::*;
//! use std::fs::{File, OpenOptions};
//! use std::path::Path;
//!
//! fn open_image(path: &Path, readonly: bool) -> Result<File> {
//!     let file = OpenOptions::new()
//!         .read(true)
//!         .write(!readonly)
//!         .open(path)
//!         .map_err(|e| Error::from(e).context(path.display()).read_only_hint("readonly=true"))?;
//!     // A bare `?` converts too; the message is then the OS's alone ("No such file…").
//!     let _len = file.metadata()?.len();
//!     Ok(file)
//! }
//! ```
//!
//! A panic
//! is caught on your side of the boundary and becomes an error carrying the panic message;
//! it never unwinds into the host. (Keep `panic = "unwind"`, Rust's default: with
//! `panic = "abort"` a panic would end the whole host process.)
//!
//! ## Filters
//!
//! A filter is a disk opened over another disk, its base: `cow` over `vhd`, `delay` over
//! `file`. Implement [`Filter`] instead of [`Plugin`] and export it with [`export_filter!`];
//! `open` gets the base already opened, as a [`ForeignDisk`] that is itself a [`Disk`]. The
//! user names the base with the host's `base` key (`-c base=file -c base.path=disk.img`),
//! which never reaches your `open`; `xen-disk-host plugins inspect` lists it for you.
//!
//! ```no_run
//! use xen_disk_plugin_api::*;
//!
//! /// Serves its base unchanged, counting reads.
//! struct Counting {
//!     base: ForeignDisk,
//!     reads: std::sync::atomic::AtomicU64,
//! }
//!
//! impl Disk for Counting {
//!     fn info(&self) -> DiskInfo {
//!         // What this disk forwards below, and nothing more (see the warning that follows).
//!         let b = self.base.info();
//!         DiskInfo::new(b.size)
//!             .sector_size(b.logical_sector_size)
//!             .physical_sector_size(b.physical_sector_size)
//!             .read_only(b.read_only)
//!             .flush(b.can_flush)
//!     }
//!     fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
//!         self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
//!         self.base.read(offset, bufs)
//!     }
//!     fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
//!         self.base.write(offset, bufs)
//!     }
//!     fn flush(&self) -> Result<()> {
//!         self.base.flush()
//!     }
//! }
//!
//! struct CountingFilter;
//!
//! impl Filter for CountingFilter {
//!     type Disk = Counting;
//!     const NAME: &'static str = "counting";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     const DESCRIPTION: &'static str = "Its base, counting reads";
//!     const CONFIG_KEYS: &'static [ConfigKey] = &[];
//!
//!     fn open(_config: &Config, base: ForeignDisk) -> Result<Counting> {
//!         Ok(Counting { base, reads: Default::default() })
//!     }
//! }
//!
//! export_filter!(CountingFilter);
//! ```
//!
//! **Returning `base.info()` unchanged claims everything the base can do**, and the host
//! then sends your filter those calls, which the trait's defaults do not forward:
//!
//! - `can_discard` / `can_write_zeroes`: the defaults of [`Disk::discard`] and
//!   [`Disk::write_zeroes`] answer "not supported", so the guest's discards fail (`check`'s
//!   discard and write-zeroes cases catch this, but better not to ship it).
//! - `can_flush`: the default [`Disk::flush`] does nothing and succeeds, so the guest's
//!   flushes would never reach the base: no check can see durability lost. Forward `flush`
//!   whenever you forward `can_flush`, and `write_fua` with `can_fua`.
//! - `thread_model`: over an asynchronous base (nbd-client, ceph-rbd, delay) it is
//!   [`ThreadModel::Async`], and reads and writes then arrive through [`Disk::submit`], whose
//!   default serves them with your blocking `read`/`write` on the host's ring thread,
//!   one at a time. Forward `submit` (`self.base.submit(submission)`), or declare your own
//!   thread model.
//!
//! Either build your [`DiskInfo`] from what you forward, as above, or forward every call
//! whose capability you pass on. Then run `xen-disk-host check` over each kind of base you
//! support.
//!
//! ## Surviving a crash of the host
//!
//! `serve` with a state directory takes a dead backend's disks over without the guest
//! noticing (see the README, "When serve crashes"), so a write the guest saw succeed must
//! read back after a `kill -9` of the host. Data you `pwrite` to a file is safe: the page
//! cache outlives the process. Metadata you keep in memory and write back at `flush` is
//! not. Log it with [`crash_log`] before you answer: the host names a directory on a tmpfs
//! in `XEN_DISK_STATE_DIR` ([`crash_log::state_dir`]), [`crash_log::CrashLog::open`] gives
//! back what a dead process left, and [`crash_log::CrashLog::append`] is one small `write`.
//! The `qcow2` and `cow` plugins do this; their sources show both a strict write order
//! (record classes replayed with a sync between) and a plain bitmap. A plugin in C can
//! do the same with the variable and a file of its own.
//!
//! ## Plugins in C
//!
//! The same host loads plugins written in C: `plugin-api/include/xen_disk_plugin.h` declares
//! a struct of callbacks (its size and API version first, then the name, the thread model,
//! `config`, `open`, `close`, `get_size`, `pread`, `pwrite`, `flush`, `trim`, `zero`) that
//! the library returns from `xen_disk_plugin_init`. Errors are negative errno values; a
//! wrong byte count or an unknown code fails that request with EIO. The guide is
//! `docs/c-plugins.md`; `examples/c-file-plugin` is a complete plugin. C plugins follow the
//! same promise (API 1.x), kept by the struct's size: fields are only added at its end.
//!
//! ## Naming and finding plugins
//!
//! `--plugin NAME` looks for `lib<NAME>.so` (with `-` spelled `_`) on
//! `$XEN_DISK_PLUGIN_PATH`, the host binary's directory, the plugin directory of the binary's
//! own prefix (`<prefix>/lib/xen-disk/plugins`, where the package installs them), and
//! `/usr/lib/xen-disk/plugins`; `--plugin ./path/libx.so` loads a file.
//! `xen-disk-host plugins` lists what it finds.

#![warn(missing_docs)]

mod buffers;
mod config;
pub mod crash_log;
mod disk;
mod error;
mod export;
mod extension;
#[allow(non_local_definitions)] // emitted by #[sabi_trait]
pub mod ffi;
pub mod submit;

pub use buffers::{with_read_bufs, with_write_bufs, RawBuf, ReadBufs, WriteBufs};
pub use config::{parse_size, value_from_cli, Config, ConfigKey, KeyType};
pub use disk::{Disk, DiskInfo, Extent, Filter, Plugin, ThreadModel};
pub use error::{Error, ErrorKind, Result};
pub use export::{export_disk, ForeignDisk};
pub use submit::{Submission, SubmitOp};

#[doc(hidden)]
pub use export::{filter_root_module as __filter_root_module, root_module as __root_module};

/// The major version of the plugin interface this crate builds: a host loads plugins of its
/// own major version only.
pub const ABI_MAJOR: u16 = 1;

/// The minor version of the plugin interface this crate builds. A host that speaks 1.y
/// loads every plugin built for 1.x with x <= y, and one built for a newer minor too,
/// using only what it knows (see [the compatibility promise](crate#compatibility)).
///
/// 0: the frozen interface.
/// 1: [`DiskInfo::discard_alignment`] (extension [`ffi::ext::DISCARD_LIMITS`]).
/// 2: block status, [`Disk::extents`] (extension [`ffi::ext::BLOCK_STATUS`]).
/// 3: completions taken by the host, [`Disk::attach_completions`] (extension
///    [`ffi::ext::COMPLETIONS`]).
pub const ABI_MINOR: u16 = 3;

/// [`ABI_MAJOR`] and [`ABI_MINOR`] in one number, as the version symbol returns it.
pub const ABI_VERSION: u32 = abi_version(ABI_MAJOR, ABI_MINOR);

/// Packs a major and a minor version: the major in the high 16 bits. Interfaces before 1.0
/// were numbered 1 to 3, which read as major 0.
pub const fn abi_version(major: u16, minor: u16) -> u32 {
    ((major as u32) << 16) | minor as u32
}

/// The major version of a packed [`abi_version`].
pub const fn abi_major(version: u32) -> u16 {
    (version >> 16) as u16
}

/// The minor version of a packed [`abi_version`].
pub const fn abi_minor(version: u32) -> u16 {
    version as u16
}

/// The name of the plain C symbol, exported by every Rust plugin, that returns its
/// [`ABI_VERSION`]. The host reads it before anything else.
pub const ABI_VERSION_SYMBOL: &str = "xen_disk_plugin_abi_version";

/// Exports a [`Plugin`] from a `cdylib`: `export_plugin!(MyPlugin);` once, at the crate root.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        $crate::__export_root_module!($crate::__root_module::<$plugin>);
    };
}

/// Exports a [`Filter`] from a `cdylib`: `export_filter!(MyFilter);` once, at the crate root.
#[macro_export]
macro_rules! export_filter {
    ($filter:ty) => {
        $crate::__export_root_module!($crate::__filter_root_module::<$filter>);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_root_module {
    ($root:expr) => {
        /// The plugin interface version this library was built for.
        #[no_mangle]
        pub extern "C" fn xen_disk_plugin_abi_version() -> u32 {
            $crate::ABI_VERSION
        }

        // The symbol name is abi_stable's mangled name for a library's root-module header
        // (what its #[export_root_module] attribute emits), spelled out so plugin crates need
        // not depend on abi_stable themselves.
        #[doc(hidden)]
        #[no_mangle]
        #[allow(non_upper_case_globals)]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::ffi::__private::LibHeader = {
            extern "C" fn constructor() -> $crate::ffi::__private::RootModuleResult {
                $crate::ffi::__private::__call_root_module_loader($root)
            }
            // SAFETY: the constructor returns the PluginModRef built by the root-module
            // builder, the same module type named here.
            unsafe {
                $crate::ffi::__private::LibHeader::from_constructor::<$crate::ffi::PluginModRef>(
                    constructor,
                    $crate::ffi::__private::CheckTypeLayout::Yes,
                )
            }
        };
    };
}
