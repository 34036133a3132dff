//! Simulated event channels.
