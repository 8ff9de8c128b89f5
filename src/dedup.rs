//! Absorbs requests resent after a lost ack. Fluentd resends a chunk whose ack did not arrive
//! (after `ack_response_timeout`, 190 s by default) with the same `chunk` token; Fluent Bit's
//! token is a hash of the payload. A token already stored from the same sender within the
//! window is acked again without storing its events twice.
//!
//! The window is bounded in time and in tokens. It lives in memory and is rebuilt on start from
//! the token records that the buffer keeps durable with the events ([`crate::buffer::tokens`]):
//! a resend that arrives after a restart is acknowledged without storing it again. A token is
//! remembered for the window from when it was stored, and again from when its chunk was
//! delivered and deleted; after that, a resend is stored again (and the consumer sees those
//! events twice, in a different chunk).
//!
//! Fluent Bit's token is the first 16 bytes of the SHA-512 of the entries (as it holds them:
//! in Message mode, for a dynamic tag, one record's; with `Time_as_Integer`, before its times
//! are cut), so two distinct requests with the same entries (a line repeated within the second
//! its time is parsed to) share a token. It is told from Fluentd's by its form
//! ([`is_fluent_bit_token`]). Fluent Bit resends a request only after the connection that carried it
//! failed (it reuses a connection only when its exchange went without a network error, and
//! our acks arrive whole). So a repeat of a content-hash token is new data when the earlier
//! copy's connection is still open, or read another request or ended in order after
//! answering it (over TLS, with or without a close_notify): it is stored. Only a repeat whose
//! earlier copy's connection failed, or was closed by the sender before the answer went out
//! (or from before a restart), is taken for a resend; it then stands in for that copy, so
//! that the same entries again behind it on its connection (a record repeated in the chunk
//! Fluent Bit resends) are new data.
//!
//! A token is kept as a 128-bit keyed hash of its sender and bytes ([`Key`]): one entry of
//! 64 bytes in the table and 40 in the expiry queue (once more when its chunk is delivered),
//! whatever the token's length, and no allocation of its own. The table keeps room for about
//! twice the tokens it holds, as they come and go: up to 300 bytes a token in all. The
//! hash's key is drawn at random when the window is made (and so on every start, when the
//! window is rebuilt from the records), so that no sender can aim two tokens at one entry;
//! two distinct tokens share one by chance with a probability of about 2^-128 a pair, some
//! 10^-29 for a full window of 100,000 tokens, far below the senders' own chance of drawing a
//! token twice (Fluentd's and Fluent Bit's are 128 bits too).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::sync::watch;

/// A sender's token as the window knows it: a 128-bit keyed hash of the sender's address and
/// the token's bytes ([`Keying`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key(u64, u64);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: the table takes its first half as it is.
        state.write_u64(self.0);
    }
}

/// The hasher of the window's table, which is given [`Key`]s that are hashes already.
#[derive(Debug, Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `Key::hash` feeds this hasher, through `write_u64`.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The key of [`Key`]'s hashes, drawn when the window is made.
#[derive(Debug)]
struct Keying(RandomState);

impl Keying {
    fn new() -> Keying {
        Keying(RandomState::new())
    }

    /// SipHash under one random key of two distinct inputs: two independent halves. An
    /// IPv4-mapped address is its IPv4 address: the same sender whether the listener was
    /// `0.0.0.0` or `[::]` when its token was recorded.
    fn key(&self, sender: IpAddr, token: &[u8]) -> Key {
        let sender = sender.to_canonical();
        let half = |which: u8| {
            let mut h = self.0.build_hasher();
            which.hash(&mut h);
            sender.hash(&mut h);
            token.hash(&mut h);
            h.finish()
        };
        Key(half(0), half(1))
    }
}

/// The tokens seen recently, by sender address.
#[derive(Debug)]
pub struct Dedup {
    window: Duration,
    capacity: usize,
    keying: Keying,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    slots: HashMap<Key, Slot, BuildHasherDefault<KeyHasher>>,
    /// Keys in the order they were stored, to expire them.
    order: VecDeque<(Instant, Key, u64)>,
    next_id: u64,
}

impl Inner {
    /// Puts the slot `make` builds with a fresh id under `key`; returns the id.
    fn insert(&mut self, key: Key, make: impl FnOnce(u64) -> Slot) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.slots.insert(key, make(id));
        id
    }
}

#[derive(Debug)]
enum Slot {
    /// Being stored by another request: its outcome (`Some(true)` stored) comes on the channel.
    Pending {
        id: u64,
        outcome: watch::Receiver<Option<bool>>,
        origin: Origin,
    },
    Stored {
        id: u64,
        /// When its window started (stored, or its chunk delivered).
        since: Instant,
        /// Where it arrived; `None` if it was stored before a restart.
        origin: Option<Origin>,
    },
}

impl Slot {
    /// Whether the sender can have no reason to resend this copy (see [`Origin::settled`]).
    fn settled(&self) -> bool {
        match self {
            Slot::Pending { origin, .. } => origin.settled(),
            Slot::Stored { origin, .. } => origin.as_ref().is_some_and(Origin::settled),
        }
    }
}

/// A connection, as far as the window needs it: whether it is open, and how many of its
/// requests had been answered when it last read one. Answers go out in the order requests
/// came in.
#[derive(Debug)]
pub struct Link {
    open: AtomicBool,
    answered_at_last_read: AtomicU64,
}

impl Link {
    pub fn new() -> Arc<Link> {
        Arc::new(Link {
            open: AtomicBool::new(true),
            answered_at_last_read: AtomicU64::new(0),
        })
    }

    /// The connection read a request (or the end of the stream) when `answered` of the
    /// earlier requests had been answered.
    pub fn read_request(&self, answered: u64) {
        self.answered_at_last_read
            .store(answered, Ordering::Relaxed);
    }

    /// The connection reads no more (the sender closed it, or it failed). Released: whoever
    /// sees it closed sees the count read before.
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
    }
}

/// The connection a copy arrived on and the place of its answer among the connection's.
#[derive(Debug, Clone)]
pub struct Origin {
    pub link: Arc<Link>,
    pub answer: u64,
}

impl Origin {
    /// Whether a sender whose tokens hash the content can have no reason to resend this copy:
    /// its connection is still open (such a sender resends only what a failed connection
    /// carried), or the connection read another request, or ended in order, after answering
    /// it (the answer arrived: Fluent Bit sends the next request on a connection, or closes
    /// it, only after reading the previous one's answer).
    fn settled(&self) -> bool {
        self.link.open.load(Ordering::Acquire)
            || self.link.answered_at_last_read.load(Ordering::Relaxed) > self.answer
    }
}

/// Whether `token` has the form of Fluent Bit's, 16 bytes (the start of a SHA-512 of its
/// entries) in base64 (24 characters, since Fluent Bit 5.0.9) or in hex (32, before), rather
/// than Fluentd's (a random id in base64 with a trailing newline, 25 characters). The hash
/// itself cannot be checked: in Message mode (a dynamic tag) Fluent Bit hashes each record as
/// it holds it, `[[time, metadata], record]`, and with `Time_as_Integer` the entries before
/// their times are cut, not what it sends.
pub fn is_fluent_bit_token(token: &[u8]) -> bool {
    let mut decoded = [0u8; 18];
    match token.len() {
        24 => base64::engine::general_purpose::STANDARD.decode_slice(token, &mut decoded) == Ok(16),
        32 => hex::decode_to_slice(token, &mut decoded[..16]).is_ok(),
        _ => false,
    }
}

/// What is known of a request's token.
#[derive(Debug)]
pub enum Seen {
    /// Not seen: store the request, then [`Ticket::finish`].
    New(Ticket),
    /// Already stored: ack without storing.
    Stored,
    /// Being stored by an earlier copy still waiting for its ack: wait for it with
    /// [`wait_stored`].
    Pending(watch::Receiver<Option<bool>>),
}

/// A token being stored for the first time. Dropping it unfinished forgets the token.
#[derive(Debug)]
pub struct Ticket {
    dedup: Arc<Dedup>,
    key: Option<Key>,
    id: u64,
    outcome: watch::Sender<Option<bool>>,
}

impl Dedup {
    /// A window of `window` (zero turns deduplication off) and at most `capacity` tokens.
    pub fn new(window: Duration, capacity: usize) -> Arc<Dedup> {
        Arc::new(Dedup {
            window,
            capacity: capacity.max(1),
            keying: Keying::new(),
            inner: Mutex::new(Inner::default()),
        })
    }

    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// Most tokens remembered.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How long a stored token is remembered.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Remembers `token` from `sender` as stored `age` ago (rebuilding the window on start).
    pub fn remember(&self, sender: IpAddr, token: &[u8], age: Duration) {
        if !self.enabled() || age >= self.window {
            return;
        }
        let now = Instant::now();
        let since = now.checked_sub(age).unwrap_or(now);
        let key = self.keying.key(sender, token);
        let mut inner = self.lock();
        let id = inner.insert(key, |id| Slot::Stored {
            id,
            since,
            origin: None,
        });
        inner.order.push_back((since, key, id));
        self.expire(&mut inner, now);
    }

    /// Restarts the window of stored tokens (their chunk was delivered now).
    pub fn touch<'a>(&self, keys: impl IntoIterator<Item = (IpAddr, &'a [u8])>) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        for (sender, token) in keys {
            let key = self.keying.key(sender, token);
            if let Some(Slot::Stored { id, since, .. }) = inner.slots.get_mut(&key) {
                *since = now;
                let id = *id;
                inner.order.push_back((now, key, id));
            }
        }
        self.expire(&mut inner, now);
    }

    /// Tokens remembered now.
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Looks up `token` from `sender`, arrived at `origin`, registering it as being stored if
    /// it is new. `fluent_bit` tells whether the token is Fluent Bit's, a hash of the
    /// request's entries ([`is_fluent_bit_token`]): then a repeat whose earlier copy is
    /// [settled](Origin::settled) is new data.
    pub fn check(
        self: &Arc<Self>,
        sender: IpAddr,
        token: &[u8],
        origin: Origin,
        fluent_bit: bool,
    ) -> Seen {
        let (tx, rx) = watch::channel(None);
        if !self.enabled() {
            return Seen::New(Ticket {
                dedup: self.clone(),
                key: None,
                id: 0,
                outcome: tx,
            });
        }
        let key = self.keying.key(sender, token);
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
        // A resend of a content-hash token takes the place of the copy it resends: the sender
        // resends a whole chunk, and in it a later request with the same entries (a line
        // repeated within its second, in Message mode) is new data once this one is answered
        // on a connection that goes on, not a resend of the failed copy's.
        match inner.slots.get_mut(&key) {
            Some(slot) if fluent_bit && slot.settled() => {}
            Some(Slot::Stored {
                origin: earlier, ..
            }) => {
                if fluent_bit {
                    *earlier = Some(origin);
                }
                return Seen::Stored;
            }
            // An earlier copy whose connection is gone without an outcome is forgotten.
            Some(Slot::Pending {
                outcome,
                origin: earlier,
                ..
            }) if outcome.has_changed().is_ok() => {
                if fluent_bit {
                    *earlier = origin;
                }
                return Seen::Pending(outcome.clone());
            }
            _ => {}
        }
        let id = inner.insert(key, |id| Slot::Pending {
            id,
            outcome: rx,
            origin,
        });
        Seen::New(Ticket {
            dedup: self.clone(),
            key: Some(key),
            id,
            outcome: tx,
        })
    }

    fn expire(&self, inner: &mut Inner, now: Instant) {
        while let Some((at, _, _)) = inner.order.front() {
            let old = now.duration_since(*at) > self.window;
            if !old && inner.slots.len() <= self.capacity {
                break;
            }
            let (_, key, id) = inner.order.pop_front().expect("front exists");
            // A token touched since has a later entry in `order`: only the capacity evicts it
            // now.
            let evict = match inner.slots.get(&key) {
                Some(Slot::Stored { id: s, since, .. }) if *s == id => {
                    inner.slots.len() > self.capacity || now.duration_since(*since) > self.window
                }
                _ => false,
            };
            if evict {
                inner.slots.remove(&key);
            }
        }
    }
}

impl Ticket {
    /// Records the outcome: a stored token is remembered for the window; a failed one is
    /// forgotten, so that the sender's next resend is stored.
    pub fn finish(mut self, stored: bool) {
        let _ = self.outcome.send(Some(stored));
        let Some(key) = self.key.take() else {
            return;
        };
        let dedup = self.dedup.clone();
        let mut inner = dedup.lock();
        let origin = match inner.slots.get(&key) {
            Some(Slot::Pending { id, origin, .. }) if *id == self.id => origin.clone(),
            _ => return,
        };
        if stored {
            let since = Instant::now();
            inner.slots.insert(
                key,
                Slot::Stored {
                    id: self.id,
                    since,
                    origin: Some(origin),
                },
            );
            inner.order.push_back((since, key, self.id));
        } else {
            inner.slots.remove(&key);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut inner = self.dedup.lock();
            if matches!(inner.slots.get(&key), Some(Slot::Pending { id, .. }) if *id == self.id) {
                inner.slots.remove(&key);
            }
        }
    }
}

/// Waits for an earlier copy's outcome: true once it is stored, false if it failed.
pub async fn wait_stored(mut outcome: watch::Receiver<Option<bool>>) -> bool {
    match outcome.wait_for(Option::is_some).await {
        Ok(v) => v.unwrap_or(false),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha512};

    use super::*;
    use bytes::Bytes;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn origin() -> Origin {
        Origin {
            link: Link::new(),
            answer: 0,
        }
    }

    #[tokio::test]
    async fn a_stored_token_is_seen_from_the_same_sender_only() {
        let d = Dedup::new(Duration::from_secs(300), 10);
        let token = Bytes::from_static(b"p8n9gmxTQVC8/nh2wlKKeQ==\n");
        let Seen::New(ticket) = d.check(ip("10.0.0.1"), &token, origin(), false) else {
            panic!("new token")
        };
        // A resend while the first copy is still being stored waits for it.
        let Seen::Pending(rx) = d.check(ip("10.0.0.1"), &token, origin(), false) else {
            panic!("pending")
        };
        ticket.finish(true);
        assert!(wait_stored(rx).await);
        assert!(matches!(
            d.check(ip("10.0.0.1"), &token, origin(), false),
            Seen::Stored
        ));
        assert!(matches!(
            d.check(ip("10.0.0.2"), &token, origin(), false),
            Seen::New(_)
        ));
        // The same sender through a listener on `[::]` (recorded so before a restart, say).
        assert!(matches!(
            d.check(ip("::ffff:10.0.0.1"), &token, origin(), false),
            Seen::Stored
        ));
        d.remember(ip("::ffff:10.0.0.3"), &token, Duration::ZERO);
        assert!(matches!(
            d.check(ip("10.0.0.3"), &token, origin(), false),
            Seen::Stored
        ));
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_token_is_forgotten() {
        let d = Dedup::new(Duration::from_secs(300), 10);
        let token = Bytes::from_static(b"t");
        let Seen::New(ticket) = d.check(ip("10.0.0.1"), &token, origin(), false) else {
            panic!()
        };
        let Seen::Pending(rx) = d.check(ip("10.0.0.1"), &token, origin(), false) else {
            panic!()
        };
        ticket.finish(false);
        assert!(!wait_stored(rx).await);
        let Seen::New(ticket) = d.check(ip("10.0.0.1"), &token, origin(), false) else {
            panic!("a failed token is stored again")
        };
        drop(ticket);
        assert!(matches!(
            d.check(ip("10.0.0.1"), &token, origin(), false),
            Seen::New(_)
        ));
    }

    #[test]
    fn a_content_hash_repeat_is_new_data_while_its_earlier_copy_is_settled() {
        let d = Dedup::new(Duration::from_secs(300), 10);
        let entries = b"\x92\x01\x80";
        let token = Bytes::from(
            base64::engine::general_purpose::STANDARD.encode(&Sha512::digest(entries)[..16]),
        );
        assert!(is_fluent_bit_token(&token));
        // Fluent Bit before 5.0.9: the same 16 bytes in hex.
        let hex_token = hex::encode(&Sha512::digest(entries)[..16]);
        assert!(is_fluent_bit_token(hex_token.as_bytes()));
        // Fluentd's: base64 of a random id, with a newline.
        assert!(!is_fluent_bit_token(b"ZmQtY2h1bmstaWQtMDAwMQ==\n"));
        for other in [
            &b"r1"[..],
            b"ZmQtY2h1bmstaWQtMDAwMQ",
            b"0123456789abcdef0123456789abcdeg",
        ] {
            assert!(!is_fluent_bit_token(other), "{other:?}");
        }
        let hashed = is_fluent_bit_token(&token);
        let sender = ip("10.0.0.1");
        let link = Link::new();
        let at = |answer| Origin {
            link: link.clone(),
            answer,
        };
        let Seen::New(first) = d.check(sender, &token, at(0), hashed) else {
            panic!("new")
        };
        // The first copy's connection is open: a repeat, even before its ack, is new data.
        let Seen::New(second) = d.check(sender, &token, at(1), hashed) else {
            panic!("new data while the earlier copy's connection is open")
        };
        first.finish(true);
        second.finish(true);
        // Closed after reading a request once both were answered: their acks arrived.
        link.read_request(2);
        link.close();
        let Seen::New(third) = d.check(sender, &token, at(2), hashed) else {
            panic!("new data: the connection read on after answering")
        };
        third.finish(true);
        // The third copy's connection closed without reading on: its ack may be lost.
        assert!(matches!(
            d.check(sender, &token, origin(), hashed),
            Seen::Stored
        ));
        // A token that is not the entries' hash is a resend even on an open connection.
        assert!(matches!(
            d.check(sender, &token, origin(), false),
            Seen::Stored
        ));
    }

    /// Fluent Bit resends a whole chunk after a failed connection. In Message mode each record
    /// is a request, hashed alone: two identical records of one chunk share a token. If the
    /// failed connection stored only the first, its resend is acked, and the second, behind it
    /// on the new connection, is new data: it must be stored, not taken for a resend.
    #[test]
    fn a_content_hash_repeat_behind_a_resend_on_a_new_connection_is_new_data() {
        let d = Dedup::new(Duration::from_secs(300), 10);
        let token = Bytes::from(
            base64::engine::general_purpose::STANDARD
                .encode(&Sha512::digest(b"\x92\x01\x80")[..16]),
        );
        let sender = ip("10.0.0.1");
        let at = |link: &Arc<Link>, answer| Origin {
            link: link.clone(),
            answer,
        };
        // Stored and acked on a connection that then failed before reading the second record.
        let failed = Link::new();
        let Seen::New(first) = d.check(sender, &token, at(&failed, 0), true) else {
            panic!("new")
        };
        first.finish(true);
        failed.close();
        // Or stored before a restart.
        let restarted = Dedup::new(Duration::from_secs(300), 10);
        restarted.remember(sender, &token, Duration::ZERO);
        for d in [&d, &restarted] {
            let retry = Link::new();
            assert!(
                matches!(d.check(sender, &token, at(&retry, 0), true), Seen::Stored),
                "the resend of the first record"
            );
            let Seen::New(second) = d.check(sender, &token, at(&retry, 1), true) else {
                panic!("the second record is new data")
            };
            second.finish(true);
        }

        // The same behind a resend that waits for the first copy to be stored.
        let d = Dedup::new(Duration::from_secs(300), 10);
        let failed = Link::new();
        let Seen::New(first) = d.check(sender, &token, at(&failed, 0), true) else {
            panic!("new")
        };
        failed.close();
        let retry = Link::new();
        let Seen::Pending(_) = d.check(sender, &token, at(&retry, 0), true) else {
            panic!("waits for the first copy")
        };
        first.finish(true);
        assert!(matches!(
            d.check(sender, &token, at(&retry, 1), true),
            Seen::New(_)
        ));
    }

    #[test]
    fn tokens_of_any_length_are_told_apart() {
        let d = Dedup::new(Duration::from_secs(300), 1_000);
        // Each token a prefix of the next, the last 300 bytes long.
        let long: Vec<u8> = (0..300u32).map(|i| b"ab"[(i % 2) as usize]).collect();
        for len in 0..=long.len() {
            let token = Bytes::copy_from_slice(&long[..len]);
            let Seen::New(t) = d.check(ip("10.0.0.1"), &token, origin(), false) else {
                panic!("a token of {len} bytes taken for a shorter one")
            };
            t.finish(true);
        }
        for len in 0..=long.len() {
            assert!(matches!(
                d.check(ip("10.0.0.1"), &long[..len], origin(), false),
                Seen::Stored
            ));
        }
        assert_eq!(d.len(), long.len() + 1);
    }

    #[test]
    fn the_window_is_bounded_in_tokens_and_time() {
        let d = Dedup::new(Duration::from_secs(300), 3);
        for i in 0..10u8 {
            let Seen::New(t) = d.check(ip("10.0.0.1"), &Bytes::from(vec![i]), origin(), false)
            else {
                panic!()
            };
            t.finish(true);
        }
        assert!(d.len() <= 4, "{} tokens kept", d.len());
        assert!(matches!(
            d.check(ip("10.0.0.1"), &Bytes::from(vec![0]), origin(), false),
            Seen::New(_)
        ));

        let off = Dedup::new(Duration::ZERO, 3);
        let Seen::New(t) = off.check(ip("10.0.0.1"), &Bytes::from_static(b"x"), origin(), false)
        else {
            panic!()
        };
        t.finish(true);
        assert!(matches!(
            off.check(ip("10.0.0.1"), &Bytes::from_static(b"x"), origin(), false),
            Seen::New(_)
        ));
        assert!(off.is_empty());
    }
}
