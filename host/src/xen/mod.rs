//! The Xen platform: xenstore, grant tables and event channels, behind traits that the real
//! hypervisor ([`linux`]) and the simulator ([`sim`]) both implement.

pub mod evtchn;
pub mod grant;
mod gref_table;
pub mod linux;
pub mod sim;
pub mod xenbus;
pub mod xenstore;
