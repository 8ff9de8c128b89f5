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
//! * [`Resolver`] — pointer → S3 GetObject (or the inline body) → decompress → events,
//!   streamed in bounded memory,
//!   with sizes and CRC32C checked before any event is handed out ([`Verification`]).
//! * [`StreamReader`] ([`reader`]) — every shard of a stream, following resharding, from
//!   TRIM_HORIZON, LATEST, a timestamp or a [`checkpoint`]; several pointers resolved at once,
//!   per-shard order kept, duplicate chunk ids dropped.
//! * `lambda` (feature `lambda`) — Lambda's `KinesisEvent` into pointers and events, with
//!   batch item failures and duplicates dropped across warm invocations.
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

pub mod body;
pub mod checkpoint;
mod decode;
mod dedup;
pub mod entry;
mod error;
mod event;
mod kinesis;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod pointer;
pub mod reader;
mod resolve;
mod source;

pub use body::{Compression, Format};
pub use checkpoint::{Checkpoint, CheckpointStore, FileCheckpointStore};
pub use decode::verify_and_decode;
pub use entry::EventTime;
pub use error::{BoxError, Error};
pub use event::{Event, MAX_NESTING};
pub use pointer::Pointer;
pub use reader::{Delivery, Position, StartPosition, StreamReader};
pub use resolve::{EventStream, ResolveStats, ResolvedChunk, Resolver, Verification};

/// The README's examples, compiled as doctests so that they stay true (its Lambda example
/// needs the `lambda` feature, which `scripts/test` turns on).
#[cfg(all(doctest, feature = "lambda"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
