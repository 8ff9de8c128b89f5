//! A token record: the ack token of one stored request, as a chunk's token frame holds it
//! (one record per request whose events are in the frame before it) and as the token journal
//! keeps it once the chunk is delivered ([`super::tokens`]).
//!
//! ```text
//! record = ip_len u8 (4 or 16) | ip | token_len u16 LE | token | request u128 LE | parts u16 LE
//! ```
//!
//! `request` is a UUID. A request stored in several chunks (`parts` > 1) has one record per
//! chunk, told apart by a part index: its `request` on disk is a version 8 UUID whose low 16
//! bits are the index. Records written before the index existed hold a version 7 UUID, the
//! same in every part; they are read with no index, and a request of several parts written so
//! never counts as stored again (its parts cannot be told from one part found twice). Both read the same to older versions of
//! the sidecar: the parts of a new record then look like different requests, each incomplete,
//! so that a resend after a downgrade is stored again rather than acknowledged.

use std::net::IpAddr;

use bytes::Bytes;

/// The token of one stored request, as recorded with each part of its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub sender: IpAddr,
    pub token: Bytes,
    /// Unique per request stored: tells two requests with the same token apart. From
    /// [`TokenRecord::new_request`], or, in records written before the part index existed, a
    /// version 7 UUID.
    pub request: u128,
    /// Number of chunks (records) the request's events went to.
    pub parts: u16,
    /// Which of them this record is in, `0..parts`; `None` in records written before the
    /// index existed, whose parts are counted by occurrence.
    pub part: Option<u16>,
}

/// The version field of a UUID as a `u128` (bits 76..80).
const VERSION_MASK: u128 = 0xf << 76;
/// Version 8: a request id carrying a part index in its low 16 bits.
const VERSION_WITH_PART: u128 = 0x8 << 76;
const PART_MASK: u128 = 0xffff;

impl TokenRecord {
    /// A new request id: a version 8 UUID, time-ordered and random as version 7 ones are,
    /// whose low 16 bits are left for the part index.
    pub fn new_request() -> u128 {
        (uuid::Uuid::now_v7().as_u128() & !VERSION_MASK & !PART_MASK) | VERSION_WITH_PART
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self.sender {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(16);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&(self.token.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.token);
        let request = match self.part {
            Some(part) => (self.request & !PART_MASK) | u128::from(part),
            None => self.request,
        };
        out.extend_from_slice(&request.to_le_bytes());
        out.extend_from_slice(&self.parts.to_le_bytes());
    }

    /// Decodes back-to-back records; `None` if they are not exactly that.
    pub fn decode_all(mut bytes: &[u8]) -> Option<Vec<TokenRecord>> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if b.len() < n {
                return None;
            }
            let (head, rest) = b.split_at(n);
            *b = rest;
            Some(head)
        }
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let sender = match take(&mut bytes, 1)?[0] {
                4 => IpAddr::from(<[u8; 4]>::try_from(take(&mut bytes, 4)?).ok()?),
                16 => IpAddr::from(<[u8; 16]>::try_from(take(&mut bytes, 16)?).ok()?),
                _ => return None,
            };
            let len = u16::from_le_bytes(take(&mut bytes, 2)?.try_into().ok()?) as usize;
            let token = Bytes::copy_from_slice(take(&mut bytes, len)?);
            let wire = u128::from_le_bytes(take(&mut bytes, 16)?.try_into().ok()?);
            let parts = u16::from_le_bytes(take(&mut bytes, 2)?.try_into().ok()?);
            let (request, part) = if wire & VERSION_MASK == VERSION_WITH_PART {
                (wire & !PART_MASK, Some((wire & PART_MASK) as u16))
            } else {
                (wire, None)
            };
            out.push(TokenRecord {
                sender,
                token,
                request,
                parts,
                part,
            });
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let request = TokenRecord::new_request();
        let records: Vec<TokenRecord> = [
            ("10.0.0.1", "a", 1, 1, None),
            ("::1", "p8n9gmxTQVC8/nh2wlKKeQ==\n", u128::MAX - 7, 2, None),
            ("10.0.0.1", "", 3, 1, None),
            ("10.0.0.1", "b", request, 3, Some(0)),
            ("10.0.0.1", "b", request, 3, Some(2)),
            ("::1", "c", TokenRecord::new_request(), 1, Some(0)),
        ]
        .into_iter()
        .map(|(ip, token, request, parts, part)| TokenRecord {
            sender: ip.parse().unwrap(),
            token: Bytes::from(token),
            request,
            parts,
            part,
        })
        .collect();
        let mut bytes = Vec::new();
        records.iter().for_each(|r| r.encode(&mut bytes));
        assert_eq!(TokenRecord::decode_all(&bytes), Some(records));
        assert_eq!(TokenRecord::decode_all(&bytes[..bytes.len() - 1]), None);
        assert_eq!(TokenRecord::decode_all(&[7]), None);
    }

    /// Records written before the part index existed (a version 7 UUID, the same in every
    /// part) are read with none; the parts of a new record differ on disk.
    #[test]
    fn the_part_index_is_in_the_request_id_on_disk() {
        let v7 = uuid::Uuid::now_v7().as_u128();
        let old = TokenRecord {
            sender: "10.0.0.1".parse().unwrap(),
            token: Bytes::from("t"),
            request: v7,
            parts: 2,
            part: None,
        };
        let mut bytes = Vec::new();
        old.encode(&mut bytes);
        assert_eq!(TokenRecord::decode_all(&bytes).unwrap()[0].part, None);

        let request = TokenRecord::new_request();
        assert_eq!(uuid::Uuid::from_u128(request).get_version_num(), 8);
        let on_disk = |part| {
            let mut bytes = Vec::new();
            TokenRecord {
                part: Some(part),
                request,
                ..old.clone()
            }
            .encode(&mut bytes);
            bytes
        };
        assert_ne!(on_disk(0), on_disk(1));
        let read = TokenRecord::decode_all(&on_disk(1)).unwrap();
        assert_eq!((read[0].request, read[0].part), (request, Some(1)));
    }
}
