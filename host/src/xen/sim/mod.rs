//! The simulated hypervisor: xenstored over a unix socket, guest memory in a memfd with
//! grant references naming its pages, event channels over eventfd.

pub mod evtchn;
pub mod grant;
pub mod hypervisor;
pub mod machine;
pub mod memory;
pub mod remote;
pub mod xenstored;
