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
/// are already there. The pool takes back only what was in use at once before, so it never
/// holds more than the busiest moment did, and at most this many maps.
const POOLED_MAPS: usize = 4;

static POOL: Mutex<Vec<memmap2::MmapMut>> = Mutex::new(Vec::new());

/// The smallest pooled map of at least `capacity` bytes, if any.
fn take_pooled(capacity: usize) -> Option<memmap2::MmapMut> {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let (i, _) = pool
        .iter()
        .enumerate()
        .filter(|(_, m)| m.len() >= capacity)
        .min_by_key(|(_, m)| m.len())?;
    Some(pool.swap_remove(i))
}

/// Keeps `map` for reuse unless the pool is full; otherwise it is unmapped here.
fn give_back(map: memmap2::MmapMut) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < POOLED_MAPS {
        pool.push(map);
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
    pub(super) fn new(capacity: usize) -> io::Result<Block> {
        let capacity = capacity.max(1);
        let map = match take_pooled(capacity) {
            Some(map) => map,
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
                map
            }
        };
        Ok(Block {
            map: Pooled(Some(map)),
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
        self.map.bytes_mut()[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    /// Moves the contents into a block of at least `capacity` bytes.
    pub(super) fn grow(self, capacity: usize) -> io::Result<Block> {
        let mut bigger = Block::new(capacity)?;
        bigger.fill(&self.map.as_ref()[..self.len]);
        Ok(bigger)
    }

    /// The contents, as bytes that give the map back when the last slice of them is dropped.
    pub(super) fn freeze(self) -> Bytes {
        let len = self.len;
        Bytes::from_owner(self.map).slice(..len)
    }
}

/// A map that goes back to the pool when dropped.
struct Pooled(Option<memmap2::MmapMut>);

impl Pooled {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().expect("taken only on drop")
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.0.as_deref().expect("taken only on drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(map) = self.0.take() {
            give_back(map);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_holds_what_was_asked_for_even_in_a_larger_reused_map() {
        // Leaves a 3 MiB map in the pool (others may be there too: the pool is shared).
        let mut big = Block::new(3 << 20).unwrap();
        big.fill(&[7; 1000]);
        drop(big.freeze());

        let mut block = Block::new(100).unwrap();
        assert_eq!(block.room(), 100);
        assert_eq!(block.fill(&[1; 150]), 100);
        assert_eq!(block.room(), 0);
        let bytes = block.freeze();
        // Only what was written, never what an earlier body left in the map.
        assert_eq!(&bytes[..], &[1; 100][..]);
    }

    #[test]
    fn bytes_keep_their_map_until_the_last_slice_is_dropped() {
        let mut block = Block::new(1 << 20).unwrap();
        block.fill(&[5; 4096]);
        let bytes = block.freeze();
        let tail = bytes.slice(4000..);
        drop(bytes);
        // Another block now cannot be handed the map `tail` still reads.
        let mut other = Block::new(1 << 20).unwrap();
        other.fill(&[9; 4096]);
        assert_eq!(&tail[..], &[5; 96][..]);
        let moved = other.grow(2 << 20).unwrap();
        assert_eq!(moved.len(), 4096);
        assert_eq!(&moved.freeze()[..], &[9; 4096][..]);
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_maps() {
        let blocks: Vec<_> = (0..POOLED_MAPS + 3)
            .map(|_| Block::new(64 << 10).unwrap())
            .collect();
        drop(blocks);
        assert!(POOL.lock().unwrap().len() <= POOLED_MAPS);
    }
}
