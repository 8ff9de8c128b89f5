//! The dedup window: the most recent chunk ids, to drop re-published pointers.
//!
//! A pointer is published again when the sidecar crashes after Kinesis accepted it but before
//! the chunk was deleted; the copy carries the same chunk id. Readers remember the last
//! `capacity` chunk ids they handed out and drop a pointer whose id is among them. Ids are
//! kept as 128-bit numbers (the chunk id is 32 hex digits), 16 bytes each plus the set's
//! overhead: about 40 bytes per id.

use std::collections::{HashSet, VecDeque};

/// A chunk id as a number: the 32 hex digits read as one `u128`, or — for ids in another
/// form, which the format does not allow but a foreign producer might write — their FNV-1a
/// 128-bit hash, which is stable across runs and releases.
pub(crate) fn chunk_key(chunk_id: &str) -> u128 {
    if chunk_id.len() == 32 && chunk_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        if let Ok(n) = u128::from_str_radix(chunk_id, 16) {
            return n;
        }
    }
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;
    chunk_id
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u128::from(b)).wrapping_mul(PRIME))
}

/// The last `capacity` ids inserted, oldest forgotten first.
#[derive(Debug, Clone)]
pub(crate) struct RecentIds {
    set: HashSet<u128>,
    order: VecDeque<u128>,
    capacity: usize,
}

impl RecentIds {
    pub(crate) fn new(capacity: usize) -> Self {
        RecentIds {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    pub(crate) fn contains(&self, id: u128) -> bool {
        self.set.contains(&id)
    }

    pub(crate) fn insert(&mut self, id: u128) {
        if self.capacity == 0 || !self.set.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// Oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u128> + '_ {
        self.order.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut r = RecentIds::new(2);
        r.insert(1);
        r.insert(2);
        r.insert(1);
        assert!(r.contains(1) && r.contains(2));
        r.insert(3);
        assert!(!r.contains(1) && r.contains(2) && r.contains(3));
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![2, 3]);
        let mut none = RecentIds::new(0);
        none.insert(1);
        assert!(!none.contains(1));
    }

    #[test]
    fn chunk_ids_are_numbers_and_foreign_ids_hash_stably() {
        assert_eq!(
            chunk_key("0193a1c2e4f87d3e9a5b6c7d8e9f0a1b"),
            0x0193a1c2e4f87d3e9a5b6c7d8e9f0a1b
        );
        assert_eq!(chunk_key("x"), chunk_key("x"));
        assert_ne!(chunk_key("x"), chunk_key("y"));
        // FNV-1a 128 of the empty string is its offset basis.
        assert_eq!(chunk_key(""), 0x6c62272e07bb014262b821756295c58d);
    }
}
