//! Turns claimcheck pointer records back into Fluentd events.
//!
//! The claimcheck sidecar stores each chunk of events as one S3 object and publishes a small
//! JSON [`Pointer`] to a Kinesis stream. This crate owns those formats (the sidecar imports
//! them from here, so the two cannot disagree) and reads them back:
//!
//! * [`pointer`] — the pointer record (versioned JSON).
//! * [`body`] — chunk body formats (`msgpack`, `json`), compressions and [`Event`].
//! * [`entry`] — the msgpack `[time, record]` entry scanner shared with the sidecar.
//! * [`Resolver`] — pointer → S3 GetObject → size and CRC32C checks → decompress → events.
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
//!             println!("{} {} {}", event.tag, event.time, event.record_json());
//!         }
//!     }
//! }
//! # }
//! ```

pub mod body;
pub mod entry;
mod error;
pub mod pointer;
mod reader;
mod resolve;

pub use body::{Compression, Event, Format};
pub use entry::EventTime;
pub use error::Error;
pub use pointer::Pointer;
pub use reader::{StartPosition, StreamReader};
pub use resolve::{verify_and_decode, ResolvedChunk, Resolver};
