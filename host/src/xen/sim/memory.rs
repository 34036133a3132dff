//! Simulated guest memory.
