//! The hand-over from the compressing thread to the upload: the whole body within the
//! multipart threshold, or one part at a time above it.

use std::io::{self, Write};

use bytes::Bytes;
use claimcheck_consumer::crc;
use tokio::sync::{mpsc, oneshot};

use super::block::Block;

/// A piece of a body on its way from the compressing thread to the upload.
pub(super) enum Piece {
    /// The whole body, within the multipart threshold.
    Whole(Bytes),
    /// The next part of a multipart upload, and the signal that it has been uploaded.
    Part(Bytes, PartDone),
}

/// Dropped once a part has been uploaded (or the upload gave up on it).
pub(super) type PartDone = oneshot::Sender<()>;

/// Collects compressed output, checksums it, and hands it to the upload in parts.
pub(super) struct PartSink {
    /// Output not yet handed over: until the body passes `threshold`, all of it.
    block: Option<Block>,
    threshold: usize,
    part_size: usize,
    multipart: bool,
    tx: mpsc::Sender<Piece>,
    /// Resolves when the last part sent has been uploaded.
    uploaded: Option<oneshot::Receiver<()>>,
    len: u64,
    crc: u32,
}

impl PartSink {
    /// A sink for one body: whole up to `threshold` bytes, else in parts of `part_size`.
    pub(super) fn new(threshold: usize, part_size: usize, tx: mpsc::Sender<Piece>) -> PartSink {
        PartSink {
            block: None,
            threshold,
            part_size,
            multipart: false,
            tx,
            uploaded: None,
            len: 0,
            crc: 0,
        }
    }

    fn send(&self, piece: Piece) -> io::Result<()> {
        self.tx
            .blocking_send(piece)
            .map_err(|_| io::Error::other("the upload stopped"))
    }

    /// Waits until the last part handed over has been uploaded.
    fn wait_uploaded(&mut self) {
        if let Some(uploaded) = self.uploaded.take() {
            // Err means the sender was dropped: uploaded, or the upload stopped (then the
            // next send fails).
            let _ = uploaded.blocking_recv();
        }
    }

    /// Hands over the next part once the one before it is uploaded, so that an upload holds
    /// a bounded number of parts whatever the chunk size.
    fn send_part(&mut self, part: Bytes) -> io::Result<()> {
        self.wait_uploaded();
        let (done, uploaded) = oneshot::channel();
        self.uploaded = Some(uploaded);
        self.send(Piece::Part(part, done))
    }

    /// The body passed the threshold: what was collected goes out as parts (slices of one
    /// block, no copy), all but the tail, which starts the next part's block.
    fn start_multipart(&mut self, collected: Block) -> io::Result<()> {
        self.multipart = true;
        // Its parts are uploaded one at a time while the rest of the body is compressed:
        // memory is what matters here, so the map is unmapped, not pooled, once they are.
        let mut bytes = collected.unpooled().freeze();
        while bytes.len() >= self.part_size {
            let part = bytes.split_to(self.part_size);
            self.send_part(part)?;
        }
        let mut tail = Block::new(self.part_size)?;
        tail.fill(&bytes);
        self.block = Some(tail);
        Ok(())
    }

    /// Hands over a whole body made elsewhere (nothing may have been written to the sink):
    /// returns its size and CRC32C.
    pub(super) fn finish_whole(self, body: Block) -> io::Result<(u64, u32)> {
        debug_assert!(self.len == 0 && self.block.is_none());
        let len = body.len() as u64;
        let crc = crc::crc32c(body.as_slice());
        self.send(Piece::Whole(body.freeze()))?;
        Ok((len, crc))
    }

    /// Hands over what is left; returns the stored size and its CRC32C.
    pub(super) fn finish(mut self) -> io::Result<(u64, u32)> {
        let rest = self.block.take().map_or_else(Bytes::new, Block::freeze);
        if self.multipart {
            if !rest.is_empty() {
                self.send_part(rest)?;
            }
        } else {
            self.send(Piece::Whole(rest))?;
        }
        Ok((self.len, self.crc))
    }
}

/// Thresholds below this get their whole block at once (address space, not memory).
const RESERVE_UP_TO: usize = 1 << 30;
/// First block of a body under a larger threshold; it doubles as the body grows.
const FIRST_BLOCK: usize = 1 << 20;

impl Write for PartSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.len += data.len() as u64;
        self.crc = crc::crc32c_append(self.crc, data);
        let mut rest = data;
        while !rest.is_empty() {
            let mut block = match self.block.take() {
                Some(b) => b,
                None if self.multipart => {
                    // The next part is compressed once the last one is uploaded: an upload
                    // holds one part at a time (the workers overlap each other instead).
                    self.wait_uploaded();
                    Block::new(self.part_size)?
                }
                // Room for the whole threshold at once: a map takes memory only where it is
                // written, and growing by copies would hold two blocks for a while.
                None if self.threshold < RESERVE_UP_TO => Block::pooled(self.threshold + 1)?,
                None => Block::new(FIRST_BLOCK)?,
            };
            if block.room() == 0 {
                if self.multipart {
                    self.send_part(block.freeze())?;
                    continue;
                }
                if block.len() > self.threshold {
                    self.start_multipart(block)?;
                    continue;
                }
                // Below the threshold: double, up to just past it.
                let capacity = (block.len() * 2)
                    .min(self.threshold + 1)
                    .max(block.len() + 1);
                block = block.grow(capacity)?;
            }
            let n = block.fill(rest);
            rest = &rest[n..];
            self.block = Some(block);
        }
        // A body that just passed the threshold goes multipart now, not on the next write.
        if !self.multipart
            && self
                .block
                .as_ref()
                .is_some_and(|b| b.len() > self.threshold)
        {
            let block = self.block.take().expect("checked above");
            self.start_multipart(block)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
