//! An eventfd that workers write to wake a sleeping ring thread, which polls it beside its
//! event channel. A flag keeps the write (a syscall) off the path when the thread is awake.

use super::workers::Wake;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The ring thread's doorbell.
pub struct EventFdWake {
    fd: OwnedFd,
    sleeping: AtomicBool,
}

impl EventFdWake {
    /// A new, unrung doorbell.
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFdWake {
            fd,
            sleeping: AtomicBool::new(false),
        })
    }

    /// The descriptor to poll for readability.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Called by the ring thread just before it re-checks its completions and sleeps: from
    /// here on, a completion rings the bell.
    pub fn about_to_sleep(&self) {
        // SeqCst pairs with the worker's swap: either the worker sees `true` and rings, or the
        // ring thread's re-check after this store sees the completion.
        self.sleeping.store(true, Ordering::SeqCst);
    }

    /// Called by the ring thread when it wakes: clears the flag and, when `rung` (poll saw
    /// the descriptor readable, or the thread did not poll), drains the counter. A ring left
    /// undrained only makes the next poll return at once.
    pub fn awake(&self, rung: bool) {
        self.sleeping.store(false, Ordering::SeqCst);
        if rung {
            let mut value = 0u64;
            // SAFETY: reads 8 bytes into a local u64; EAGAIN (nothing pending) is fine.
            unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
        }
    }
}

impl Wake for EventFdWake {
    fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a local u64 to our own eventfd.
            unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn rings_only_when_the_thread_sleeps() {
        let w = EventFdWake::new().unwrap();
        w.wake();
        assert!(!readable(w.raw_fd()), "an awake thread needs no syscall");
        w.about_to_sleep();
        w.wake();
        assert!(readable(w.raw_fd()));
        w.awake(true);
        assert!(!readable(w.raw_fd()));
        w.wake();
        assert!(!readable(w.raw_fd()));
    }
}
