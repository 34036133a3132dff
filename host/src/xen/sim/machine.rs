//! A simulated host with many guests: one backend view that maps grants and binds event
//! channels of whichever guest a request names, as gntdev and evtchn do on real Xen. What a
//! daemon serving several guests (`serve --sim`, the serve tests) runs on.

use super::hypervisor::{SimBackend, SimDomain};
use crate::xen::evtchn::{EventChannel, EventChannels, EvtchnError};
use crate::xen::grant::{GrantError, GrantMapper, GrantMapping};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The backend domain's view of every simulated guest added to it.
#[derive(Default)]
pub struct SimMachine {
    my_domid: u32,
    guests: Mutex<HashMap<u32, Arc<SimBackend>>>,
}

impl SimMachine {
    /// A host whose backend runs in `my_domid` (0: dom0).
    pub fn new(my_domid: u32) -> SimMachine {
        SimMachine {
            my_domid,
            guests: Mutex::default(),
        }
    }

    /// Makes `domain` reachable (a guest was created).
    pub fn add(&self, domain: &Arc<SimDomain>) {
        self.lock()
            .insert(domain.domid, Arc::new(domain.backend(self.my_domid)));
    }

    /// Forgets guest `domid` (it was destroyed); its mappings stay valid until dropped.
    pub fn remove(&self, domid: u32) {
        self.lock().remove(&domid);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<SimBackend>>> {
        self.guests.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn guest(&self, domid: u32) -> Option<Arc<SimBackend>> {
        self.lock().get(&domid).cloned()
    }
}

impl GrantMapper for SimMachine {
    fn map(&self, domid: u32, refs: &[u32], writable: bool) -> Result<GrantMapping, GrantError> {
        match self.guest(domid) {
            Some(g) => g.map(domid, refs, writable),
            None => Err(GrantError::System(format!("no simulated domain {domid}"))),
        }
    }
}

impl EventChannels for SimMachine {
    fn bind_interdomain(
        &self,
        remote_domid: u32,
        remote_port: u32,
    ) -> Result<Box<dyn EventChannel>, EvtchnError> {
        match self.guest(remote_domid) {
            Some(g) => g.bind_interdomain(remote_domid, remote_port),
            None => Err(EvtchnError(format!("no simulated domain {remote_domid}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::evtchn::EventChannel;

    #[test]
    fn requests_go_to_the_guest_they_name() {
        let m = SimMachine::new(0);
        let (a, b) = (
            SimDomain::new(3, 4, 1).unwrap(),
            SimDomain::new(4, 4, 1).unwrap(),
        );
        m.add(&a);
        m.add(&b);
        let ga = a.grants.grant(1, 0, false).unwrap();
        let gb = b.grants.grant(2, 0, false).unwrap();
        assert!(m.map(3, &[ga], true).is_ok());
        assert!(m.map(4, &[gb], true).is_ok());
        assert!(m.map(5, &[ga], true).is_err());
        let port = b.alloc_unbound().unwrap().local_port();
        assert!(m.bind_interdomain(4, port).is_ok());
        m.remove(4);
        assert!(m.map(4, &[gb], true).is_err());
        assert!(m.bind_interdomain(4, port).is_err());
    }
}
