//! The Xen block protocol (blkif): the byte-exact ABI, requests and their validation, and
//! the shared ring.
//!
//! ```text
//!  ring pages ─▶ ring::BackRing::take (copied once) ─▶ request::Request::decode
//!    ─▶ request::validate (every field bounded) ─▶ Valid byte ranges for the device
//!    ◀─ ring::Response (padding zeroed) ◀─ BackRing::push_responses (hold-off notify)
//! ```

pub mod abi;
pub mod keys;
pub mod request;
pub mod ring;

#[cfg(test)]
mod ring_tests;
