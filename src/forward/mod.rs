//! The forward protocol input: [`frame`] parses requests without I/O, [`entries`] validates and
//! splits their events by timekey, [`connection`] owns a socket and its acks (resent requests
//! are absorbed by [`crate::dedup`]), [`security`] is the shared-key handshake, [`tls`] builds
//! the TLS listener.

pub mod connection;
pub mod entries;
pub mod frame;
pub mod security;
pub mod tls;

pub use connection::ConnectionConfig;
