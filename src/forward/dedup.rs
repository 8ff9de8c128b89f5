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

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

type Key = (IpAddr, Bytes);

/// The tokens seen recently, by sender address.
#[derive(Debug)]
pub struct Dedup {
    window: Duration,
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    slots: HashMap<Key, Slot>,
    /// Keys in the order they were stored, to expire them.
    order: VecDeque<(Instant, Key, u64)>,
    next_id: u64,
}

#[derive(Debug)]
enum Slot {
    /// Being stored by another request: its outcome (`Some(true)` stored) comes on the channel.
    Pending {
        id: u64,
        outcome: watch::Receiver<Option<bool>>,
    },
    Stored {
        id: u64,
        /// When its window started (stored, or its chunk delivered).
        since: Instant,
    },
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
    pub fn remember(&self, sender: IpAddr, token: Bytes, age: Duration) {
        if !self.enabled() || age >= self.window {
            return;
        }
        let now = Instant::now();
        let since = now.checked_sub(age).unwrap_or(now);
        let key = (sender, token);
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.slots.insert(key.clone(), Slot::Stored { id, since });
        inner.order.push_back((since, key, id));
        self.expire(&mut inner, now);
    }

    /// Restarts the window of stored tokens (their chunk was delivered now).
    pub fn touch(&self, keys: impl IntoIterator<Item = (IpAddr, Bytes)>) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        for key in keys {
            if let Some(Slot::Stored { id, since }) = inner.slots.get_mut(&key) {
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

    /// Looks up `token` from `sender`, registering it as being stored if it is new.
    pub fn check(self: &Arc<Self>, sender: IpAddr, token: &Bytes) -> Seen {
        let (tx, rx) = watch::channel(None);
        if !self.enabled() {
            return Seen::New(Ticket {
                dedup: self.clone(),
                key: None,
                id: 0,
                outcome: tx,
            });
        }
        let key = (sender, token.clone());
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
        match inner.slots.get(&key) {
            Some(Slot::Stored { .. }) => return Seen::Stored,
            // An earlier copy whose connection is gone without an outcome is forgotten.
            Some(Slot::Pending { outcome, .. }) if outcome.has_changed().is_ok() => {
                return Seen::Pending(outcome.clone())
            }
            _ => {}
        }
        inner.next_id += 1;
        let id = inner.next_id;
        inner
            .slots
            .insert(key.clone(), Slot::Pending { id, outcome: rx });
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
                Some(Slot::Stored { id: s, since }) if *s == id => {
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
        let ours =
            matches!(inner.slots.get(&key), Some(Slot::Pending { id, .. }) if *id == self.id);
        if !ours {
            return;
        }
        if stored {
            let since = Instant::now();
            inner
                .slots
                .insert(key.clone(), Slot::Stored { id: self.id, since });
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
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_stored_token_is_seen_from_the_same_sender_only() {
        let d = Dedup::new(Duration::from_secs(300), 10);
        let token = Bytes::from_static(b"p8n9gmxTQVC8/nh2wlKKeQ==\n");
        let Seen::New(ticket) = d.check(ip("10.0.0.1"), &token) else {
            panic!("new token")
        };
        // A resend while the first copy is still being stored waits for it.
        let Seen::Pending(rx) = d.check(ip("10.0.0.1"), &token) else {
            panic!("pending")
        };
        ticket.finish(true);
        assert!(wait_stored(rx).await);
        assert!(matches!(d.check(ip("10.0.0.1"), &token), Seen::Stored));
        assert!(matches!(d.check(ip("10.0.0.2"), &token), Seen::New(_)));
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_token_is_forgotten() {
        let d = Dedup::new(Duration::from_secs(300), 10);
        let token = Bytes::from_static(b"t");
        let Seen::New(ticket) = d.check(ip("10.0.0.1"), &token) else {
            panic!()
        };
        let Seen::Pending(rx) = d.check(ip("10.0.0.1"), &token) else {
            panic!()
        };
        ticket.finish(false);
        assert!(!wait_stored(rx).await);
        let Seen::New(ticket) = d.check(ip("10.0.0.1"), &token) else {
            panic!("a failed token is stored again")
        };
        drop(ticket);
        assert!(matches!(d.check(ip("10.0.0.1"), &token), Seen::New(_)));
    }

    #[test]
    fn the_window_is_bounded_in_tokens_and_time() {
        let d = Dedup::new(Duration::from_secs(300), 3);
        for i in 0..10u8 {
            let Seen::New(t) = d.check(ip("10.0.0.1"), &Bytes::from(vec![i])) else {
                panic!()
            };
            t.finish(true);
        }
        assert!(d.len() <= 4, "{} tokens kept", d.len());
        assert!(matches!(
            d.check(ip("10.0.0.1"), &Bytes::from(vec![0])),
            Seen::New(_)
        ));

        let off = Dedup::new(Duration::ZERO, 3);
        let Seen::New(t) = off.check(ip("10.0.0.1"), &Bytes::from_static(b"x")) else {
            panic!()
        };
        t.finish(true);
        assert!(matches!(
            off.check(ip("10.0.0.1"), &Bytes::from_static(b"x")),
            Seen::New(_)
        ));
        assert!(off.is_empty());
    }
}
