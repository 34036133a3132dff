//! The devices a process serves, by id: what the daemon registers as devices come and go,
//! and what the control socket (the `control` module, above this one) lists, inspects and
//! acts on.

use super::device::DeviceStats;

/// Why a name finds no one device.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    /// Neither an id nor a device name any guest has.
    #[error("no device {0} (see `ctl list`)")]
    NoDevice(String),
    /// A device name several guests have.
    #[error("{0} is ambiguous: several guests have it; use <domid>/{0}")]
    Ambiguous(String),
}
use crate::plugin::GuardedDisk;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// One device being served, as the control socket and the daemon see it.
pub struct Entry {
    /// `<domid>/<vbd>`, e.g. `3/xvdb`.
    pub id: String,
    /// The guest's domain id.
    pub domid: u32,
    /// The guest's name, when known.
    pub guest: String,
    /// The guest's device name.
    pub vbd: String,
    /// "cow over vhd" style.
    pub stack: Mutex<String>,
    /// The disk (swappable).
    pub disk: Arc<GuardedDisk>,
    /// Counters and state.
    pub stats: Arc<DeviceStats>,
    /// Asks the device to detach.
    pub stop: Arc<AtomicBool>,
    /// The device's journal, when serve keeps them: swaps and snapshots record beside it
    /// what a serve taking the device over must serve (see
    /// [`super::stack_record`]).
    pub journal: Option<std::path::PathBuf>,
}

impl Entry {
    /// Its plugin stack now ("cow over vhd" style).
    pub fn stack(&self) -> String {
        self.stack.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The entry for the device serving `vbd` to guest `domid` (its name read from xenstore).
    pub fn for_device(
        xs: &dyn crate::xen::xenstore::Xenstore,
        domid: u32,
        vbd: super::vbd::Vbd,
        stack: &str,
        disk: Arc<GuardedDisk>,
        stats: Arc<DeviceStats>,
        stop: Arc<AtomicBool>,
    ) -> Entry {
        let guest = xs
            .read(
                crate::xen::xenstore::NO_TX,
                &format!("/local/domain/{domid}/name"),
            )
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        Entry {
            id: format!("{domid}/{}", vbd.linux_name()),
            domid,
            guest,
            vbd: vbd.linux_name(),
            stack: Mutex::new(stack.to_string()),
            disk,
            stats,
            stop,
            journal: None,
        }
    }
}

/// The devices of this process.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<Vec<Arc<Entry>>>,
    /// `ctl upgrade` is possible (a serve with journals) and was asked for.
    pub upgrade: Upgrade,
}

/// `ctl upgrade`'s two flags: set by serve when it can hand its devices over, and by the
/// request.
#[derive(Default)]
pub struct Upgrade {
    /// The process can hand over (a serve whose devices keep journals).
    pub allowed: std::sync::atomic::AtomicBool,
    /// Asked for.
    pub requested: std::sync::atomic::AtomicBool,
}

impl Registry {
    /// Adds a device (replacing one with the same id).
    pub fn add(&self, entry: Entry) {
        let mut e = self.lock();
        e.retain(|x| x.id != entry.id);
        e.push(Arc::new(entry));
    }

    /// Forgets a device.
    pub fn remove(&self, id: &str) {
        self.lock().retain(|x| x.id != id);
    }

    /// Records that device `id` now runs `layers` after a swap made elsewhere that paused it
    /// for `pause`.
    pub fn set_stack(&self, id: &str, layers: &str, pause: std::time::Duration) {
        if let Some(e) = self.lock().iter().find(|x| x.id == id) {
            *e.stack.lock().unwrap_or_else(|p| p.into_inner()) = layers.to_string();
            e.stats.swapped(pause);
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device `name` names: its id, or its guest device name when only one guest has it.
    pub fn find(&self, name: &str) -> Result<Arc<Entry>, FindError> {
        let e = self.lock();
        if let Some(x) = e.iter().find(|x| x.id == name) {
            return Ok(x.clone());
        }
        let by_vbd: Vec<_> = e.iter().filter(|x| x.vbd == name).collect();
        match by_vbd.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(FindError::NoDevice(name.to_string())),
            _ => Err(FindError::Ambiguous(name.to_string())),
        }
    }
}
