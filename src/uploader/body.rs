//! The body of a chunk's object: its frames read back (checking every CRC32C), converted to
//! the configured format and compressed, on a blocking thread that hands the output to the
//! upload through a [`PartSink`].

use std::fs::File;
use std::io::{self, Write};

use claimcheck_consumer::body::{self, Counting, Encoder, Format};
use tokio::sync::mpsc;

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
    let encoder = Encoder::new(config.compression, config.compression_level, sink)
        .map_err(UploadError::Body)?;
    let mut body = Counting::new(encoder);
    let mut data = File::open(&chunk.paths.data).map_err(ReadError::Io)?;
    let (_, start) = chunk::read_header(&mut data)?;
    let mut frames =
        chunk::FrameReader::new(data, start, chunk.stats.data_len).map_err(ReadError::Io)?;
    let mut piece = Vec::new();
    match config.format {
        Format::Msgpack => {
            while frames.next_piece(&mut piece, READ_PIECE)? {
                body.write_all(&piece).map_err(UploadError::Body)?;
            }
        }
        // JSON needs whole entries: read whole frames (each holds whole entries only).
        Format::Json => {
            while frames.next_piece(&mut piece, usize::MAX)? {
                body::write_json_lines(&chunk.header.tag, &piece, &mut body).map_err(|e| {
                    UploadError::Body(io::Error::new(io::ErrorKind::InvalidData, e))
                })?;
            }
        }
    }
    let body_bytes = body.bytes();
    let sink = body.into_inner().finish().map_err(UploadError::Body)?;
    let (stored_bytes, crc32c) = sink.finish().map_err(UploadError::Body)?;
    Ok(BodySummary {
        stored_bytes,
        crc32c,
        body_bytes,
    })
}
