//! Grant mapping: the platform trait.
