//! A blkfront in Rust: the guest's half of the protocol, for the simulator, `check`, `bench`
//! and the tests. It lives in a simulated guest ([`SimDomain`](crate::xen::sim::hypervisor::SimDomain)):
//! its ring pages and data pages are the guest's memory, granted to the backend.
//!
//! - [`handshake`]: the guest's half of the xenbus handshake.
//! - [`pages`]: guest pages lent to requests (data and indirect segment lists).
//! - [`queue`]: one ring — granted ring pages, request ids, out-of-order completions, and
//!   the checks Linux blkfront makes on every response (known id, echoed operation,
//!   no more responses than requests).

pub mod handshake;
pub mod pages;
pub mod queue;

pub use queue::{Completion, FrontQueue, FrontendError};
