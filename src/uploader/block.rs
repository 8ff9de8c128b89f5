//! Compressed output in an anonymous memory map.

use std::io;

use bytes::Bytes;

/// A transparent huge page on x86-64 and most arm64 kernels.
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

/// Compressed output on its way to S3, in an anonymous memory map rather than on the heap:
/// its memory goes back to the system as soon as the part is uploaded. Multi-MiB heap buffers
/// freed by the blocking threads stayed in malloc's per-thread arenas instead, and peak RSS grew
/// with the chunk size (see docs/performance.md).
pub(super) struct Block {
    map: memmap2::MmapMut,
    len: usize,
}

impl Block {
    pub(super) fn new(capacity: usize) -> io::Result<Block> {
        let map = memmap2::MmapMut::map_anon(capacity.max(1))?;
        // Transparent huge pages where the system offers them on request: one page fault per
        // 2 MiB written instead of one per 4 KiB (delivering 0.8 GB without compression, 43 k
        // faults instead of 198 k). Memory is still taken only where written (in 2 MiB steps).
        #[cfg(target_os = "linux")]
        if capacity >= HUGE_PAGE {
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Block { map, len: 0 })
    }

    /// Bytes held.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn room(&self) -> usize {
        self.map.len() - self.len
    }

    /// Copies as much of `data` as fits; returns how much that was.
    pub(super) fn fill(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.room());
        self.map[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    /// Moves the contents into a block of at least `capacity` bytes.
    pub(super) fn grow(self, capacity: usize) -> io::Result<Block> {
        let mut bigger = Block::new(capacity)?;
        bigger.fill(&self.map[..self.len]);
        Ok(bigger)
    }

    pub(super) fn freeze(self) -> Bytes {
        let len = self.len;
        Bytes::from_owner(self.map).slice(..len)
    }
}
