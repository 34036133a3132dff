//! Simulated grant tables.
