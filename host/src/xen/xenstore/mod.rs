//! Xenstore: the client trait, wire protocol and transports.
