//! Event channels: the platform trait.
