//! Asynchronous reads and writes, for disks whose I/O completes on threads of their own
//! (network storage: an NBD client, librbd).
//!
//! A disk that declares [`ThreadModel::Async`](crate::ThreadModel::Async) gets its reads and
//! writes as [`Submission`]s through [`Disk::submit`](crate::Disk::submit): it starts the I/O
//! and returns at once, and later, from any thread, calls [`Submission::complete`]. The
//! host's ring thread submits every request this way, so one thread keeps as many requests
//! in flight as the guest sends, and no host thread sleeps waiting for a reply. Flush,
//! discard and write-zeroes still come as ordinary (blocking) calls, on worker threads.
//!
//! The buffers are the guest's pages; they stay valid until the submission is completed,
//! and not a moment longer. A submission dropped without `complete` answers the guest with
//! an error, so a lost request never hangs it.

use crate::buffers::{RawBuf, ReadBufs, WriteBufs};
use crate::error::{Error, ErrorKind, Result};
use crate::ffi::{FfiCompletion, FfiError};
use abi_stable::std_types::RResult;

/// What a submission asks for.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, abi_stable::StableAbi)]
pub enum SubmitOp {
    /// Fill the buffers from `offset`.
    Read = 0,
    /// Store the buffers at `offset`.
    Write = 1,
    /// Store the buffers at `offset`, durable when completed.
    WriteFua = 2,
}

/// One read or write in flight. Complete it exactly once with [`Submission::complete`],
/// from any thread; until then its buffers are yours.
pub struct Submission {
    op: SubmitOp,
    offset: u64,
    bufs: BufList,
    done: Option<FfiCompletion>,
}

/// Buffer entries kept inside the submission; longer lists go to the heap.
const INLINE_BUFS: usize = 4;

/// A submission's buffer list. Small requests (a 4 KiB read is one entry) carry theirs
/// inline: a list allocated on the host's ring thread and freed on the plugin's completing
/// thread costs more than the copy, for every request.
enum BufList {
    Inline([RawBuf; INLINE_BUFS], usize),
    Heap(Vec<RawBuf>),
}

impl BufList {
    fn from_slice(bufs: &[RawBuf]) -> Self {
        if bufs.len() <= INLINE_BUFS {
            let mut inline = [RawBuf {
                base: std::ptr::null_mut(),
                len: 0,
            }; INLINE_BUFS];
            inline[..bufs.len()].copy_from_slice(bufs);
            BufList::Inline(inline, bufs.len())
        } else {
            BufList::Heap(bufs.to_vec())
        }
    }

    fn as_slice(&self) -> &[RawBuf] {
        match self {
            BufList::Inline(b, n) => &b[..*n],
            BufList::Heap(v) => v,
        }
    }

    fn take_vec(&mut self) -> Vec<RawBuf> {
        match std::mem::replace(self, BufList::Heap(Vec::new())) {
            BufList::Inline(b, n) => b[..n].to_vec(),
            BufList::Heap(v) => v,
        }
    }
}

// SAFETY: the buffers are guest pages the host keeps mapped until completion, whichever
// thread completes; handing the request to another thread is what a submission is for.
unsafe impl Send for Submission {}

impl Submission {
    /// A submission over `bufs` whose completion is `done`.
    ///
    /// # Safety
    /// The buffers must stay valid (for writes when `op` is `Read`, for reads otherwise), and
    /// untouched by anyone else, until `done` has been called.
    pub unsafe fn from_raw(
        op: SubmitOp,
        offset: u64,
        bufs: Vec<RawBuf>,
        done: FfiCompletion,
    ) -> Self {
        Submission {
            op,
            offset,
            bufs: BufList::Heap(bufs),
            done: Some(done),
        }
    }

    /// As [`Submission::from_raw`], copying the buffer list (kept inline when short).
    ///
    /// # Safety
    /// As [`Submission::from_raw`].
    pub unsafe fn from_raw_slice(
        op: SubmitOp,
        offset: u64,
        bufs: &[RawBuf],
        done: FfiCompletion,
    ) -> Self {
        Submission {
            op,
            offset,
            bufs: BufList::from_slice(bufs),
            done: Some(done),
        }
    }

    /// A submission completed by a Rust closure (for hosts and tests).
    ///
    /// # Safety
    /// As [`Submission::from_raw`].
    pub unsafe fn with_closure(
        op: SubmitOp,
        offset: u64,
        bufs: Vec<RawBuf>,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Self {
        // SAFETY: the caller's contract.
        unsafe { Self::from_raw(op, offset, bufs, FfiCompletion::from_closure(done)) }
    }

    /// Read, write or FUA write.
    pub fn op(&self) -> SubmitOp {
        self.op
    }

    /// Byte offset on the disk (checked by the host, as for `read`/`write`).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.bufs.as_slice().iter().map(|b| b.len).sum()
    }

    /// True for an empty request (the host sends none).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffers as `struct iovec`s, for a C library that fills or sends them itself.
    pub fn raw(&self) -> &[RawBuf] {
        self.bufs.as_slice()
    }

    /// The buffers to fill, for a read.
    pub fn read_bufs(&mut self) -> Option<ReadBufs<'_>> {
        // SAFETY: the host's from_raw contract keeps them valid and ours until completion,
        // and `&mut self` makes this the only view.
        (self.op == SubmitOp::Read).then(|| unsafe { ReadBufs::from_raw(self.bufs.as_slice()) })
    }

    /// The buffers to store, for a write.
    pub fn write_bufs(&self) -> Option<WriteBufs<'_>> {
        // SAFETY: as in read_bufs; a write's buffers are only read.
        (self.op != SubmitOp::Read).then(|| unsafe { WriteBufs::from_raw(self.bufs.as_slice()) })
    }

    /// Answers the request. The buffers must not be touched afterwards (they are unmapped).
    /// Returns within microseconds; by default (the host's `--answer-on-completion`) it may
    /// answer the guest on this thread, so call it outside locks that `submit` takes.
    pub fn complete(mut self, result: Result<()>) {
        if let Some(done) = self.done.take() {
            done.call(result);
        }
    }

    /// Serves the submission with `disk`'s blocking `read`/`write` and completes it (what a
    /// disk that does not override `submit` does).
    pub fn run_blocking<D: crate::Disk + ?Sized>(mut self, disk: &D) {
        let offset = self.offset;
        let result = match self.op {
            SubmitOp::Read => {
                let mut b = self.read_bufs().expect("a read has read buffers");
                disk.read(offset, &mut b)
            }
            SubmitOp::Write => disk.write(offset, &self.write_bufs().expect("write buffers")),
            SubmitOp::WriteFua => {
                disk.write_fua(offset, &self.write_bufs().expect("write buffers"))
            }
        };
        self.complete(result);
    }

    /// Takes the submission apart (the host passes it across the plugin boundary this way).
    pub fn into_parts(mut self) -> (SubmitOp, u64, Vec<RawBuf>, FfiCompletion) {
        let done = self.done.take().expect("a submission completes once");
        (self.op, self.offset, self.bufs.take_vec(), done)
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done.call(Err(Error::new(
                ErrorKind::Io,
                "the disk dropped a request without completing it",
            )));
        }
    }
}

impl FfiCompletion {
    /// A completion that runs `f` (once). One allocation: the closure, behind a trampoline
    /// made for its type.
    pub fn from_closure<F: FnOnce(Result<()>) + Send + 'static>(f: F) -> Self {
        extern "C" fn trampoline<F: FnOnce(Result<()>) + Send + 'static>(
            ctx: *mut (),
            result: RResult<(), FfiError>,
        ) {
            // SAFETY: ctx is the Box<F> leaked below, and a completion is called once
            // (FfiCompletion::call consumes it).
            let f = unsafe { Box::from_raw(ctx as *mut F) };
            let result = result.into_result().map_err(Error::from);
            // A panic must not unwind through extern "C": it is caught and dropped.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || f(result)));
        }
        FfiCompletion {
            ctx: Box::into_raw(Box::new(f)) as *mut (),
            complete: trampoline::<F>,
        }
    }

    /// Calls the completion with `result`.
    pub fn call(self, result: Result<()>) {
        let r = match result {
            Ok(()) => RResult::ROk(()),
            Err(e) => RResult::RErr(e.into()),
        };
        (self.complete)(self.ctx, r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn submission(op: SubmitOp, buf: &mut [u8]) -> (Submission, mpsc::Receiver<Result<()>>) {
        let (tx, rx) = mpsc::channel();
        // SAFETY: the buffer outlives every use in these tests (they wait for completion).
        let s = unsafe {
            Submission::with_closure(op, 0, vec![RawBuf::from_mut(buf)], move |r| {
                let _ = tx.send(r);
            })
        };
        (s, rx)
    }

    #[test]
    fn completes_once_from_another_thread() {
        let mut buf = vec![0u8; 8];
        let (mut s, rx) = submission(SubmitOp::Read, &mut buf);
        s.read_bufs().unwrap().fill(7);
        assert!(s.write_bufs().is_none());
        std::thread::spawn(move || s.complete(Ok(())))
            .join()
            .unwrap();
        assert!(rx.recv().unwrap().is_ok());
        assert!(rx.try_recv().is_err(), "completed twice");
        assert_eq!(buf, [7; 8]);
    }

    #[test]
    fn short_and_long_buffer_lists_read_and_take_apart_alike() {
        for n in [1usize, INLINE_BUFS, INLINE_BUFS + 3] {
            let mut mem = vec![0u8; n * 8];
            let list: Vec<RawBuf> = mem.chunks_mut(8).map(RawBuf::from_mut).collect();
            let (tx, rx) = mpsc::channel();
            // SAFETY: `mem` outlives the submission, completed below.
            let mut s = unsafe {
                Submission::from_raw_slice(
                    SubmitOp::Read,
                    0,
                    &list,
                    FfiCompletion::from_closure(move |r| {
                        let _ = tx.send(r);
                    }),
                )
            };
            assert_eq!(s.len(), n * 8);
            assert_eq!(s.raw().len(), n);
            assert!(s.raw().iter().zip(&list).all(|(a, b)| a.base == b.base));
            s.read_bufs().unwrap().fill(3);
            let (_, _, back, done) = s.into_parts();
            assert_eq!(back.len(), n);
            done.call(Ok(()));
            assert!(rx.recv().unwrap().is_ok());
            assert!(mem.iter().all(|&b| b == 3), "{n} buffers");
        }
    }

    #[test]
    fn dropped_submission_answers_with_an_error() {
        let mut buf = vec![0u8; 8];
        let (s, rx) = submission(SubmitOp::Write, &mut buf);
        drop(s);
        let e = rx.recv().unwrap().unwrap_err();
        assert!(e.message().contains("without completing"), "{e}");
    }

    #[test]
    fn a_panicking_completion_does_not_unwind_into_the_caller() {
        let mut buf = vec![0u8; 8];
        // SAFETY: the buffer outlives the call.
        let s = unsafe {
            Submission::with_closure(SubmitOp::Read, 0, vec![RawBuf::from_mut(&mut buf)], |_| {
                panic!("host bug")
            })
        };
        s.complete(Ok(()));
    }
}
