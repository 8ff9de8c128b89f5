//! The body of a chunk's object: its frames read back (checking every CRC32C), converted to
//! the configured format and compressed, on a blocking thread that hands the output to the
//! upload through a [`PartSink`].

use std::fs::File;
use std::io::{self, Write};
use std::time::Duration;

use claimcheck_consumer::body::{self, Compression, Counting, Encoder, Format};
use tokio::sync::mpsc;

use super::block::Block;
use super::config::UploaderConfig;
use super::error::UploadError;
use super::sink::{PartSink, Piece};
use crate::backends::MIN_PART_SIZE;
use crate::buffer::chunk::{self, ReadError};
use crate::buffer::SealedChunk;

/// The stored object's size and checksum, and the body size before compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodySummary {
    pub stored_bytes: u64,
    pub crc32c: u32,
    pub body_bytes: u64,
    /// CPU time its compressor took on the compressing thread ([`CodecClock`]); zero without
    /// compression or where Linux does not report a thread's time.
    pub codec_cpu: Duration,
}

/// CPU time of the calling thread so far, from `/proc/thread-self/schedstat` (Linux).
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    Some(Duration::from_nanos(
        stat.split_whitespace().next()?.parse().ok()?,
    ))
}

/// Adds up the CPU time that the compressing thread spends in what it times: the codec's own
/// cost, apart from reading the chunk back and handing the output over. Two reads of `/proc`
/// per call timed, so calls are a whole body or a piece of 1 MiB; without compression,
/// nothing is timed.
#[derive(Debug)]
struct CodecClock {
    compression: Compression,
    spent: Duration,
}

impl CodecClock {
    fn new(compression: Compression) -> Self {
        CodecClock {
            compression,
            spent: Duration::ZERO,
        }
    }

    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        if self.compression == Compression::None {
            return f();
        }
        let start = thread_cpu();
        let out = f();
        if let (Some(start), Some(end)) = (start, thread_cpu()) {
            self.spent += end.saturating_sub(start);
        }
        out
    }

    /// The time spent, counted on `/metrics` too.
    fn finish(self) -> Duration {
        if self.compression != Compression::None {
            crate::metrics::metrics().compressed(self.compression.as_str(), self.spent);
        }
        self.spent
    }
}

pub(super) async fn join(
    build: tokio::task::JoinHandle<Result<BodySummary, UploadError>>,
) -> Result<BodySummary, UploadError> {
    build
        .await
        .map_err(|e| UploadError::Body(io::Error::other(e)))?
}

/// Piece size for reading a chunk back.
const READ_PIECE: usize = 1 << 20;

/// Reads a chunk, builds its body in the configured format and compression, and sends it to
/// `tx` (blocking).
pub(super) fn write_body(
    chunk: &SealedChunk,
    config: &UploaderConfig,
    tx: mpsc::Sender<Piece>,
) -> Result<BodySummary, UploadError> {
    let threshold = config.multipart_threshold.max(1) as usize;
    let part_size = config.part_size.max(MIN_PART_SIZE) as usize;
    let sink = PartSink::new(threshold, part_size, tx);
    if config.compression == Compression::Zstd && config.format == Format::Msgpack {
        if let Some(data_len) = one_call_len(chunk.stats.data_len, threshold) {
            return write_zstd_whole(chunk, data_len, config.compression_level, threshold, sink);
        }
    }
    let encoder = Encoder::new(config.compression, config.compression_level, sink)
        .map_err(UploadError::Body)?;
    let mut body = Counting::new(encoder);
    let mut frames = open_frames(chunk)?;
    let mut piece = Vec::new();
    let mut clock = CodecClock::new(config.compression);
    match config.format {
        Format::Msgpack => {
            while frames.next_piece(&mut piece, READ_PIECE)? {
                clock
                    .time(|| body.write_all(&piece))
                    .map_err(UploadError::Body)?;
            }
        }
        // JSON needs whole entries: read whole frames (each holds whole entries only).
        Format::Json => {
            while frames.next_piece(&mut piece, usize::MAX)? {
                clock
                    .time(|| body::write_json_lines(&chunk.header.tag, &piece, &mut body))
                    .map_err(|e| {
                        UploadError::Body(io::Error::new(io::ErrorKind::InvalidData, e))
                    })?;
            }
        }
    }
    let body_bytes = body.bytes();
    let sink = clock
        .time(|| body.into_inner().finish())
        .map_err(UploadError::Body)?;
    let (stored_bytes, crc32c) = sink.finish().map_err(UploadError::Body)?;
    Ok(BodySummary {
        stored_bytes,
        crc32c,
        body_bytes,
        codec_cpu: clock.finish(),
    })
}

/// The chunk's data length if its body is compressed in one call: it and its compressed form,
/// whatever it is, fit within the multipart threshold (all chunks of the default size do).
fn one_call_len(data_len: u64, threshold: usize) -> Option<usize> {
    usize::try_from(data_len)
        .ok()
        .filter(|&len| zstd::zstd_safe::compress_bound(len) <= threshold)
}

/// The frames of a sealed chunk's data file, from just after its header.
fn open_frames(chunk: &SealedChunk) -> Result<chunk::FrameReader, UploadError> {
    let mut data = File::open(&chunk.paths.data).map_err(ReadError::Io)?;
    let (_, frames) = chunk::read_header(&mut data)?;
    Ok(chunk::FrameReader::new(data, frames, chunk.stats.data_len).map_err(ReadError::Io)?)
}

/// Input blocks are sized in steps of this, so that the pool's maps fit the next chunks too.
const INPUT_STEP: usize = 2 << 20;

thread_local! {
    /// The compressing thread's zstd context and its level, kept from one chunk to the next
    /// (a new context would allocate and fault in its tables for every chunk).
    static ZSTD: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// A zstd body in one call: the chunk's entries read into one block, compressed into another.
/// zstd's streaming encoder copies its input into a window that wraps around and compresses
/// most of it in its slower external-dictionary mode; one call on one buffer does neither
/// (1.2–1.3× faster at level 3 on 8 MiB of access-log events; see
/// docs/performance-history.md). Same format: one zstd frame (which also records the body's
/// size).
fn write_zstd_whole(
    chunk: &SealedChunk,
    data_len: usize,
    level: Option<i32>,
    threshold: usize,
    sink: PartSink,
) -> Result<BodySummary, UploadError> {
    let mut frames = open_frames(chunk)?;
    let mut input =
        Block::pooled(data_len.div_ceil(INPUT_STEP) * INPUT_STEP).map_err(UploadError::Body)?;
    // The entries are read straight into the block, in no more than the chunk's length.
    let mut input_room = data_len;
    while !frames.at_end()? {
        if input_room == 0 {
            return Err(ReadError::BadFrame {
                offset: chunk.stats.data_len,
                why: "more entries than the chunk's length",
            }
            .into());
        }
        input_room -= input.write_with(input_room, |room| frames.read_into(room))?;
    }
    let mut output = Block::pooled(threshold + 1).map_err(UploadError::Body)?;
    let level = level.unwrap_or(body::ZSTD_DEFAULT_LEVEL);
    let mut clock = CodecClock::new(Compression::Zstd);
    clock
        .time(|| {
            output.write_with(threshold, |room| {
                ZSTD.with(|slot| {
                    let mut slot = slot.borrow_mut();
                    if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                        *slot = Some((level, zstd::bulk::Compressor::new(level)?));
                    }
                    let (_, compressor) = slot.as_mut().expect("just set");
                    compressor.compress_to_buffer(input.as_slice(), room)
                })
            })
        })
        .map_err(UploadError::Body)?;
    let body_bytes = input.len() as u64;
    drop(input);
    let (stored_bytes, crc32c) = sink.finish_whole(output).map_err(UploadError::Body)?;
    Ok(BodySummary {
        stored_bytes,
        crc32c,
        body_bytes,
        codec_cpu: clock.finish(),
    })
}
