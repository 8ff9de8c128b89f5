//! Turns claimcheck pointer records back into Fluentd events.
//!
//! The claimcheck sidecar stores each chunk of events as one S3 object and publishes a small
//! JSON [`Pointer`] to a Kinesis stream; a chunk small enough rides inside its record instead
//! (an inline pointer), and no object is written. This crate owns those formats (the sidecar imports
//! them from here, so the two cannot disagree) and makes the pointer disappear: callers see
//! events, verified, each chunk once.
//!
//! # Layout
//!
//! * [`pointer`] — the pointer record (versioned JSON; version 2 carries the body inline).
//! * [`body`] — chunk body formats (`msgpack`, `json`) and compressions; [`entry`] — the msgpack
//!   `[time, record]` entry scanner shared with the sidecar.
//! * [`Event`] — one event, with its record as borrowed msgpack, JSON or your own type.
//! * [`Decoder`] — a stored body from any [`std::io::Read`] → verified events, pulled one at
//!   a time with no async runtime; [`verify`] checks a body without keeping its events.
//! * [`Resolver`] — pointer → S3 GetObject (or the inline body) → decompress → events,
//!   streamed in bounded memory,
//!   with sizes and CRC32C checked before any event is handed out ([`Verification`]).
//! * [`StreamReader`] ([`reader`]) — every shard of a stream, following resharding, from
//!   TRIM_HORIZON, LATEST, a timestamp or a [`checkpoint`]; several pointers resolved at once,
//!   per-shard order kept, duplicate chunk ids dropped.
//! * `lambda` (feature `lambda`) — Lambda's `KinesisEvent` into pointers and events, with
//!   batch item failures and duplicates dropped across warm invocations.
//! * Feature `aws` (on by default) — [`Resolver`], [`StreamReader`] and checkpoints: the parts
//!   that read from AWS. Without it the crate has no AWS SDK and no async runtime.
//! * [`crc`] — the CRC32C that every format's checksum is.
//! * [`Error`] — the one error type; [`Error::is_chunk_error`] tells a pointer that can be
//!   skipped from a call that may be retried.
//!
//! The formats are specified for readers in other languages in `docs/pointer-format.md`, with
//! test vectors under `consumer/tests/vectors/`; the crate's `README.md` has more examples.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), claimcheck_consumer::Error> {
//! use claimcheck_consumer::{Resolver, StartPosition, StreamReader};
//!
//! let config = aws_config::load_from_env().await;
//! let resolver = Resolver::new(aws_sdk_s3::Client::new(&config));
//! let kinesis = aws_sdk_kinesis::Client::new(&config);
//! let mut reader = StreamReader::open(kinesis, resolver, "logs", StartPosition::TrimHorizon).await?;
//! while let Some(mut delivery) = reader.next().await? {
//!     for event in delivery.events().await? {
//!         println!("{} {} {}", event.tag(), event.time(), event.record_json());
//!     }
//!     reader.commit(delivery.position());
//! }
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod body;
#[cfg(feature = "aws")]
pub mod checkpoint;
pub mod crc;
mod decode;
#[cfg(feature = "aws")]
mod dedup;
pub mod entry;
mod error;
mod event;
#[cfg(feature = "aws")]
pub mod kinesis;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod pointer;
#[cfg(feature = "aws")]
pub mod reader;
#[cfg(feature = "aws")]
mod resolve;
#[cfg(feature = "aws")]
pub mod source;

pub use body::{Compression, Format};
#[cfg(feature = "aws")]
pub use checkpoint::{Checkpoint, CheckpointStore, FileCheckpointStore};
pub use decode::{verify, verify_and_decode, Decoder};
pub use entry::EventTime;
pub use error::{BoxError, Error};
pub use event::{Event, EventBlock, EventRef, EventRefs, MAX_NESTING};
pub use pointer::Pointer;
#[cfg(feature = "aws")]
pub use reader::{Delivery, Position, StartPosition, StreamReader};
#[cfg(feature = "aws")]
pub use resolve::{EventStream, ResolveStats, ResolvedChunk, Resolver, Verification};

/// The README's examples, compiled as doctests so that they stay true (its Lambda example
/// needs the `lambda` feature, which `scripts/test` turns on).
#[cfg(all(doctest, feature = "lambda"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
