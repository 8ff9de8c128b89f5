//! The forward protocol input: [`frame`] parses requests without I/O, [`entries`] validates and
//! splits their events by timekey, [`connection`] owns a socket and its acks.

pub mod connection;
pub mod entries;
pub mod frame;

pub use connection::ConnectionConfig;
