//! Compressed output in anonymous memory maps, kept for reuse once uploaded.

use std::io;
use std::sync::Mutex;

use bytes::Bytes;

/// A transparent huge page on x86-64 and most arm64 kernels.
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

/// Uploaded blocks' maps kept for the next bodies. A fresh map costs the kernel a zeroed page
/// for every page written, about as much CPU as copying the body once more: delivering 1 GB
/// without compression, that zeroing was a quarter of the sidecar's CPU. A reused map's pages
/// are already there. Only maps of whole bodies are pooled (bodies within the multipart
/// threshold: all of them with the default chunk size), and of a zstd body's input, never
/// parts': the pool takes back only maps that were in use at once before, so it never holds
/// more than the busiest moment did, and at most this many maps, holding at most
/// [`POOLED_BYTES`] of memory. Multipart uploads of large chunks, where memory is the
/// concern, keep their bound (see docs/performance.md).
const POOLED_MAPS: usize = 4;
/// Memory the pooled maps may hold (the bytes written in them): three default chunks' entries
/// (an uncompressed body, or a zstd body's input), or a dozen zstd bodies.
const POOLED_BYTES: usize = 24 << 20;

/// A pooled map and how much of it has ever been written (its memory).
struct Kept {
    map: memmap2::MmapMut,
    touched: usize,
}

/// Maps kept for reuse.
pub(super) struct Pool(Mutex<Vec<Kept>>);

/// The process's pool: every upload's blocks come from it.
static POOL: Pool = Pool::new();

impl Pool {
    const fn new() -> Pool {
        Pool(Mutex::new(Vec::new()))
    }

    /// The smallest pooled map of at least `capacity` bytes, if any.
    fn take(&self, capacity: usize) -> Option<Kept> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (i, _) = kept
            .iter()
            .enumerate()
            .filter(|(_, k)| k.map.len() >= capacity)
            .min_by_key(|(_, k)| k.map.len())?;
        Some(kept.swap_remove(i))
    }

    /// Keeps a map for reuse if the pool has room for it; otherwise it is unmapped here.
    fn give_back(&self, map: Kept) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = kept.iter().map(|k| k.touched).sum();
        if kept.len() < POOLED_MAPS && held + map.touched <= POOLED_BYTES {
            kept.push(map);
        }
    }
}

/// Compressed output on its way to S3, in an anonymous memory map rather than on the heap:
/// its memory goes back to the pool (or the system) as soon as the part is uploaded, and the
/// pool is bounded. Multi-MiB heap buffers freed by the blocking threads stayed in malloc's
/// per-thread arenas instead, and peak RSS grew with the chunk size (see
/// docs/performance.md).
pub(super) struct Block {
    map: Pooled,
    len: usize,
    /// What this block may hold: the capacity asked for, even in a larger reused map.
    limit: usize,
}

impl Block {
    /// A block for a whole body, from the pool if it has a map large enough.
    pub(super) fn pooled(capacity: usize) -> io::Result<Block> {
        Block::new_in(Some(&POOL), capacity)
    }

    /// A block whose map is unmapped once uploaded (parts of multipart uploads).
    pub(super) fn new(capacity: usize) -> io::Result<Block> {
        Block::new_in(None, capacity)
    }

    fn new_in(pool: Option<&'static Pool>, capacity: usize) -> io::Result<Block> {
        let capacity = capacity.max(1);
        let kept = match pool.and_then(|p| p.take(capacity)) {
            Some(kept) => kept,
            None => {
                let map = memmap2::MmapMut::map_anon(capacity)?;
                // Transparent huge pages where the system offers them on request: one page
                // fault per 2 MiB written instead of one per 4 KiB (delivering 0.8 GB without
                // compression, 43 k faults instead of 198 k). Memory is still taken only where
                // written (in 2 MiB steps).
                #[cfg(target_os = "linux")]
                if capacity >= HUGE_PAGE {
                    let _ = map.advise(memmap2::Advice::HugePage);
                }
                Kept { map, touched: 0 }
            }
        };
        Ok(Block {
            map: Pooled {
                kept: Some(kept),
                pool,
            },
            len: 0,
            limit: capacity,
        })
    }

    /// Bytes held.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn room(&self) -> usize {
        self.limit - self.len
    }

    /// Copies as much of `data` as fits; returns how much that was.
    pub(super) fn fill(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.room());
        self.map.bytes_mut(self.len + n)[self.len..].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    /// Moves the contents into a block of at least `capacity` bytes.
    pub(super) fn grow(self, capacity: usize) -> io::Result<Block> {
        let mut bigger = Block::new_in(self.map.pool, capacity)?;
        bigger.fill(&self.map.as_ref()[..self.len]);
        Ok(bigger)
    }

    /// The bytes held.
    pub(super) fn as_slice(&self) -> &[u8] {
        &self.map.as_ref()[..self.len]
    }

    /// Lets `write` fill up to `max` bytes of the room left (from the start of it); keeps
    /// what it says it wrote.
    pub(super) fn write_with<E: From<io::Error>>(
        &mut self,
        max: usize,
        write: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let (start, end) = (self.len, self.len + self.room().min(max));
        let room = self.map.unwritten(start, end);
        let n = write(room)?;
        if n > room.len() {
            return Err(io::Error::other("wrote past the room it was given").into());
        }
        // Only what was written counts as the map's memory.
        self.map.touch(start + n);
        self.len += n;
        Ok(n)
    }

    /// This block's map is unmapped once its bytes are dropped, not pooled.
    pub(super) fn unpooled(mut self) -> Block {
        self.map.pool = None;
        self
    }

    /// The contents, as bytes that give the map back when the last slice of them is dropped.
    pub(super) fn freeze(self) -> Bytes {
        let len = self.len;
        Bytes::from_owner(self.map).slice(..len)
    }
}

/// A map that goes back to the pool when dropped.
struct Pooled {
    kept: Option<Kept>,
    pool: Option<&'static Pool>,
}

impl Pooled {
    /// Bytes `start..end` to be written, without counting them as written yet.
    fn unwritten(&mut self, start: usize, end: usize) -> &mut [u8] {
        &mut self.kept.as_mut().expect("taken only on drop").map[start..end]
    }

    /// Counts the first `end` bytes as written: the map's memory.
    fn touch(&mut self, end: usize) {
        let kept = self.kept.as_mut().expect("taken only on drop");
        kept.touched = kept.touched.max(end);
    }

    /// The first `end` bytes, to be written.
    fn bytes_mut(&mut self, end: usize) -> &mut [u8] {
        self.touch(end);
        self.unwritten(0, end)
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.kept.as_ref().expect("taken only on drop").map
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let (Some(kept), Some(pool)) = (self.kept.take(), self.pool) {
            pool.give_back(kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_holds_what_was_asked_for_even_in_a_larger_reused_map() {
        static POOL: Pool = Pool::new();
        let mut big = Block::new_in(Some(&POOL), 3 << 20).unwrap();
        big.fill(&[7; 1000]);
        drop(big.freeze());

        let mut block = Block::new_in(Some(&POOL), 100).unwrap();
        assert_eq!(POOL.0.lock().unwrap().len(), 0, "the 3 MiB map was reused");
        assert_eq!(block.room(), 100);
        assert_eq!(block.fill(&[1; 150]), 100);
        assert_eq!(block.room(), 0);
        let bytes = block.freeze();
        // Only what was written, never what an earlier body left in the map.
        assert_eq!(&bytes[..], &[1; 100][..]);
    }

    #[test]
    fn bytes_keep_their_map_until_the_last_slice_is_dropped() {
        static POOL: Pool = Pool::new();
        let mut block = Block::new_in(Some(&POOL), 1 << 20).unwrap();
        block.fill(&[5; 4096]);
        let bytes = block.freeze();
        let tail = bytes.slice(4000..);
        drop(bytes);
        assert_eq!(POOL.0.lock().unwrap().len(), 0, "the map is still read");
        let mut other = Block::new_in(Some(&POOL), 1 << 20).unwrap();
        other.fill(&[9; 4096]);
        assert_eq!(&tail[..], &[5; 96][..]);
        drop(tail);
        assert_eq!(
            POOL.0.lock().unwrap().len(),
            1,
            "back once the last slice is gone"
        );
        let moved = other.grow(2 << 20).unwrap();
        assert_eq!(moved.len(), 4096);
        assert_eq!(&moved.freeze()[..], &[9; 4096][..]);
    }

    #[test]
    fn written_in_place_counts_only_what_was_written() {
        static POOL: Pool = Pool::new();
        let mut block = Block::new_in(Some(&POOL), 8 << 20).unwrap();
        let n = block
            .write_with(4 << 20, |room| {
                assert_eq!(room.len(), 4 << 20, "the room, up to max");
                room[..10].copy_from_slice(&[4; 10]);
                io::Result::Ok(10)
            })
            .unwrap();
        assert_eq!((n, block.as_slice()), (10, &[4u8; 10][..]));
        let too_much = block.write_with(100, |room| io::Result::Ok(room.len() + 1));
        assert!(too_much.is_err());
        assert_eq!(block.len(), 10);
        drop(block.freeze());
        assert_eq!(POOL.0.lock().unwrap()[0].touched, 10);
    }

    #[test]
    fn unpooled_blocks_are_not_kept() {
        static POOL: Pool = Pool::new();
        let mut part = Block::new_in(None, 1 << 20).unwrap();
        part.fill(&[1; 10]);
        drop(part.freeze());
        let mut split = Block::new_in(Some(&POOL), 1 << 20).unwrap().unpooled();
        split.fill(&[2; 10]);
        drop(split.freeze());
        assert_eq!(POOL.0.lock().unwrap().len(), 0);
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_maps_and_bytes() {
        static POOL: Pool = Pool::new();
        let small: Vec<_> = (0..POOLED_MAPS + 3)
            .map(|_| {
                let mut b = Block::new_in(Some(&POOL), 64 << 10).unwrap();
                b.fill(&[1; 1000]);
                b
            })
            .collect();
        drop(small);
        assert_eq!(POOL.0.lock().unwrap().len(), POOLED_MAPS);
        POOL.0.lock().unwrap().clear();

        let big: Vec<_> = (0..3)
            .map(|_| {
                let mut b = Block::new_in(Some(&POOL), 16 << 20).unwrap();
                b.fill(&vec![3; 10 << 20]);
                b
            })
            .collect();
        drop(big);
        let kept = POOL.0.lock().unwrap();
        // Two of 10 MiB fit in the byte bound; the third is unmapped.
        assert_eq!(kept.len(), 2);
        assert!(kept.iter().map(|k| k.touched).sum::<usize>() <= POOLED_BYTES);
    }
}
