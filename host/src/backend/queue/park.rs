//! Idle rings without threads. A ring idle for its [`super::QueueParts::park_after`] hands
//! itself here, armed exactly as its thread would be for a sleep (the doorbell's flag up,
//! the guest asked to notify); one waiter thread for the whole process watches every parked
//! ring's two descriptors with epoll, and gives a ring whose descriptor turns readable a new
//! thread, which acknowledges what rang and goes on where the old one stopped. So a dom0
//! serving hundreds of idle disks holds one thread for their rings, not one per ring.

use super::{drive, QueueError, RingState};
use crate::backend::done::DoneSetter;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, OnceLock};

/// A ring with no thread: what [`drive`] needs to go on.
pub(super) struct Parked {
    pub state: Box<RingState>,
    pub done: DoneSetter<Result<(), QueueError>>,
    pub span: tracing::Span,
    /// Its threads' name.
    pub name: String,
}

struct Waiter {
    epoll: OwnedFd,
    parked: Mutex<Parking>,
}

#[derive(Default)]
struct Parking {
    rings: HashMap<u64, Parked>,
    next: u64,
}

/// The process's waiter, started by the first ring that parks (an error if it could not
/// be: rings then keep their threads).
fn waiter() -> Result<&'static Waiter, String> {
    static WAITER: OnceLock<Result<&'static Waiter, String>> = OnceLock::new();
    WAITER
        .get_or_init(|| {
            // SAFETY: epoll_create1 takes no pointers; the result is checked.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if fd < 0 {
                return Err(format!("epoll: {}", std::io::Error::last_os_error()));
            }
            let waiter: &'static Waiter = Box::leak(Box::new(Waiter {
                // SAFETY: a fresh descriptor nothing else owns.
                epoll: unsafe { OwnedFd::from_raw_fd(fd) },
                parked: Mutex::default(),
            }));
            std::thread::Builder::new()
                .name("xen-disk-parked".into())
                .spawn(move || waiter.run())
                .map_err(|e| format!("starting the parked rings' waiter: {e}"))?;
            Ok(waiter)
        })
        .clone()
}

/// Parks `ring`: no thread runs it until its event channel or doorbell rings. Gives the
/// ring back, with why, when it cannot be parked.
pub(super) fn park(ring: Parked) -> Result<(), (Parked, String)> {
    let waiter = match waiter() {
        Ok(w) => w,
        Err(why) => return Err((ring, why)),
    };
    let fds = ring.state.wakers();
    let mut parking = waiter.parked.lock().unwrap_or_else(|p| p.into_inner());
    let key = parking.next;
    parking.next += 1;
    // In the table before it is watched: the waiter may see it ready at once (a request
    // that came while it was being parked), and takes it under the same lock.
    parking.rings.insert(key, ring);
    for (i, fd) in fds.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: key,
        };
        // SAFETY: a live epoll descriptor, a descriptor the parked ring owns (it stays open
        // while the ring is in the table), a live event struct.
        let r =
            unsafe { libc::epoll_ctl(waiter.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, *fd, &mut ev) };
        if r != 0 {
            let why = format!(
                "watching a parked ring: {}",
                std::io::Error::last_os_error()
            );
            unwatch(waiter, &fds[..i]);
            let ring = parking.rings.remove(&key).expect("inserted above");
            return Err((ring, why));
        }
    }
    Ok(())
}

fn unwatch(waiter: &Waiter, fds: &[std::os::fd::RawFd]) {
    for fd in fds {
        // SAFETY: removes a descriptor this waiter watches; the ring still owns it.
        unsafe {
            libc::epoll_ctl(
                waiter.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                *fd,
                std::ptr::null_mut(),
            )
        };
    }
}

impl Waiter {
    fn run(&self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: a live epoll descriptor and a buffer of 64 events.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    -1,
                )
            };
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                tracing::error!(
                    "the parked rings' waiter failed: {}",
                    std::io::Error::last_os_error()
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
            for ev in &events[..n as usize] {
                let key = ev.u64;
                // Both descriptors of a ring may be ready: the second finds it gone.
                let Some(ring) = self
                    .parked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .rings
                    .remove(&key)
                else {
                    continue;
                };
                unwatch(self, &ring.state.wakers());
                wake(ring);
            }
        }
    }
}

/// Gives a parked ring a thread again.
fn wake(ring: Parked) {
    let name = ring.name.clone();
    let started = std::thread::Builder::new().name(name).spawn(move || {
        ring.state.resumed();
        drive(ring)
    });
    if let Err(e) = started {
        // The ring is dropped with the closure: its result says so, and its device closes
        // (as when its thread could not be started at connect).
        tracing::error!("a parked ring could not get a thread back: {e}");
    }
}
