//! The Xen block protocol (blkif): ABI structs and the shared ring.
