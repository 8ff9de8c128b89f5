//! Turns claimcheck pointer records back into Fluentd events.
//!
//! The claimcheck sidecar stores each chunk of events as one S3 object and publishes a small
//! JSON [`Pointer`] to a Kinesis stream. This crate owns those formats (the sidecar imports
//! them from here, so the two cannot disagree) and reads them back:
//!
//! * [`pointer`] — the pointer record (versioned JSON).
//! * [`body`] — chunk body formats (`msgpack`, `json`) and compressions.
//! * [`Event`] — one event, with its record as borrowed msgpack, JSON or your own type.
//! * [`entry`] — the msgpack `[time, record]` entry scanner shared with the sidecar.
//! * [`Resolver`] — pointer → S3 GetObject → decompress → events, streamed, with size and
//!   CRC32C checks before any event is handed out.
//! * [`StreamReader`] — every shard of a stream from TRIM_HORIZON or LATEST, resolving
//!   pointers and dropping chunk ids it has already yielded.
//!
//! ```no_run
//! # async fn run() -> Result<(), claimcheck_consumer::Error> {
//! use claimcheck_consumer::{Resolver, StartPosition, StreamReader};
//! let config = aws_config::load_from_env().await;
//! let resolver = Resolver::new(aws_sdk_s3::Client::new(&config));
//! let kinesis = aws_sdk_kinesis::Client::new(&config);
//! let mut reader = StreamReader::open(kinesis, resolver, "logs", StartPosition::TrimHorizon).await?;
//! loop {
//!     for chunk in reader.poll().await? {
//!         for event in chunk?.events {
//!             println!("{} {} {}", event.tag(), event.time(), event.record_json());
//!         }
//!     }
//! }
//! # }
//! ```

pub mod body;
mod decode;
pub mod entry;
mod error;
mod event;
pub mod pointer;
mod reader;
mod resolve;
mod source;

pub use body::{Compression, Format};
pub use decode::verify_and_decode;
pub use entry::EventTime;
pub use error::{BoxError, Error};
pub use event::{Event, MAX_NESTING};
pub use pointer::Pointer;
pub use reader::{StartPosition, StreamReader};
pub use resolve::{EventStream, ResolveStats, ResolvedChunk, Resolver, Verification};
