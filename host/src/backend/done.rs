//! A result left by whichever thread finishes a piece of work, for another to wait on: what a
//! `JoinHandle` is for work that stays on one thread, for work that moves between threads
//! (a ring that sleeps parked with no thread of its own, devices that share a loop).

use std::any::Any;
use std::sync::{Arc, Condvar, Mutex};

type Outcome<T> = std::thread::Result<T>;

struct Slot<T> {
    outcome: Mutex<Option<Outcome<T>>>,
    set: Condvar,
}

/// The waiting side.
pub struct DoneHandle<T>(Arc<Slot<T>>);

/// The finishing side. Dropped without a result (the work was lost: its thread could not be
/// started, or it panicked), it leaves a panic's result, so nobody waits forever.
pub struct DoneSetter<T>(Option<Arc<Slot<T>>>);

/// A new pair.
pub fn done_pair<T>() -> (DoneSetter<T>, DoneHandle<T>) {
    let slot = Arc::new(Slot {
        outcome: Mutex::new(None),
        set: Condvar::new(),
    });
    (DoneSetter(Some(slot.clone())), DoneHandle(slot))
}

impl<T> DoneSetter<T> {
    /// Leaves the result.
    pub fn set(mut self, value: T) {
        self.leave(Ok(value));
    }

    /// Leaves a panic's payload as the result.
    pub fn panicked(mut self, payload: Box<dyn Any + Send>) {
        self.leave(Err(payload));
    }

    fn leave(&mut self, outcome: Outcome<T>) {
        if let Some(slot) = self.0.take() {
            *slot.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
            slot.set.notify_all();
        }
    }
}

impl<T> Drop for DoneSetter<T> {
    fn drop(&mut self) {
        self.leave(Err(Box::new("the work ended without a result")));
    }
}

impl<T> DoneHandle<T> {
    /// Whether the result is there.
    pub fn is_finished(&self) -> bool {
        self.0
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Waits for the result: `Err` with the payload if the work panicked or was lost, as
    /// `JoinHandle::join`.
    pub fn join(self) -> Outcome<T> {
        let mut outcome = self.0.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(o) = outcome.take() {
                return o;
            }
            outcome = self.0.set.wait(outcome).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_set_on_another_thread_is_joined() {
        let (setter, handle) = done_pair::<u32>();
        assert!(!handle.is_finished());
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            setter.set(7);
        });
        assert_eq!(handle.join().unwrap(), 7);
        t.join().unwrap();
    }

    #[test]
    fn a_lost_setter_is_a_panic_not_a_wait_forever() {
        let (setter, handle) = done_pair::<u32>();
        drop(setter);
        assert!(handle.is_finished());
        assert!(handle.join().is_err());
        let (setter, handle) = done_pair::<u32>();
        setter.panicked(Box::new("boom"));
        assert!(handle.join().is_err());
    }
}
