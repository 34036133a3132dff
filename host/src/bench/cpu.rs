//! `bench --client-cpu`: the client side of each measurement on one CPU.
//!
//! On a machine with few CPUs the scheduler decides where the simulated guest and the ring
//! thread run, and that decides the figure: on 2 CPUs beside `nbdkit`, the two on one CPU
//! served 4 KiB random writes at 227-247k IOPS, on two CPUs (waking each other across them)
//! at 120-136k. A single-threaded reference (the fair libnbd and librbd clients) has no such
//! luck to have. Pinning the client side of both to the same CPU compares like with like:
//! the guest and the ring thread for the plugin, the submitting thread for the fair
//! reference; the storage side (plugin threads created at open, the library's threads, the
//! server) stays where the scheduler puts it.

/// Checks that `cpu` is one this process may run on.
pub fn check(cpu: usize) -> Result<(), String> {
    let allowed = allowed()?;
    if cpu >= libc::CPU_SETSIZE as usize || !cpu_isset(cpu, &allowed) {
        let list: Vec<String> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| cpu_isset(c, &allowed))
            .map(|c| c.to_string())
            .collect();
        return Err(format!(
            "--client-cpu {cpu}: this process may run on CPUs {} only",
            list.join(",")
        ));
    }
    Ok(())
}

fn cpu_isset(cpu: usize, set: &libc::cpu_set_t) -> bool {
    // SAFETY: CPU_ISSET reads the set; `cpu` is below CPU_SETSIZE (callers check).
    unsafe { libc::CPU_ISSET(cpu, set) }
}

/// The calling thread's CPU mask.
fn allowed() -> Result<libc::cpu_set_t, String> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size and pointer are of a live set.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if r != 0 {
        return Err(format!(
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(set)
}

fn set(mask: &libc::cpu_set_t) -> Result<(), String> {
    // SAFETY: pid 0 is the calling thread; the size and pointer are of a live set.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(mask), mask) };
    if r != 0 {
        return Err(format!(
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The calling thread kept on one CPU until dropped; then back on the CPUs it had.
pub struct Pinned {
    before: libc::cpu_set_t,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // Back to a mask the thread had a moment ago: cannot fail for a reason we could act on.
        let _ = set(&self.before);
    }
}

/// Keeps the calling thread on `cpu` (None: leaves it alone) until the result is dropped.
pub fn pin_here(cpu: Option<usize>) -> Result<Option<Pinned>, String> {
    let Some(cpu) = cpu else { return Ok(None) };
    check(cpu)?;
    let before = allowed()?;
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes into the live set; `cpu` was checked below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    set(&one)?;
    Ok(Some(Pinned { before }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU this thread runs on now.
    fn here() -> usize {
        // SAFETY: no preconditions.
        unsafe { libc::sched_getcpu() as usize }
    }

    #[test]
    fn a_pinned_thread_runs_there_and_gets_its_cpus_back() {
        let before = allowed().unwrap();
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .rev()
            .find(|&c| cpu_isset(c, &before))
            .unwrap();
        {
            let _p = pin_here(Some(cpu)).unwrap();
            std::thread::yield_now();
            assert_eq!(here(), cpu);
            let now = allowed().unwrap();
            // SAFETY: CPU_COUNT reads a live set.
            assert_eq!(unsafe { libc::CPU_COUNT(&now) }, 1);
        }
        let after = allowed().unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::CPU_COUNT(&after) }, unsafe {
            libc::CPU_COUNT(&before)
        });
        assert!(pin_here(None).unwrap().is_none());
    }

    #[test]
    fn a_cpu_outside_the_mask_is_one_line_naming_the_flag() {
        let e = check(libc::CPU_SETSIZE as usize + 3).unwrap_err();
        assert!(e.starts_with("--client-cpu"), "{e}");
        assert!(e.contains("CPUs"), "{e}");
    }
}
