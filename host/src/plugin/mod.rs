//! Finding, loading and checking plugins.
