//! A token record: the ack token of one stored request, as a chunk's token frame holds it
//! (one record per request whose events are in the frame before it) and as the token journal
//! keeps it once the chunk is delivered ([`super::tokens`]).
//!
//! ```text
//! record = ip_len u8 (4 or 16) | ip | token_len u16 LE | token | request u128 LE | parts u16 LE
//! ```

use std::net::IpAddr;

use bytes::Bytes;

/// The token of one stored request, as recorded with each part of its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub sender: IpAddr,
    pub token: Bytes,
    /// Unique per request stored: tells two requests with the same token apart.
    pub request: u128,
    /// Number of chunks (records) the request's events went to.
    pub parts: u16,
}

impl TokenRecord {
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
        out.extend_from_slice(&self.request.to_le_bytes());
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
            let request = u128::from_le_bytes(take(&mut bytes, 16)?.try_into().ok()?);
            let parts = u16::from_le_bytes(take(&mut bytes, 2)?.try_into().ok()?);
            out.push(TokenRecord {
                sender,
                token,
                request,
                parts,
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
        let records: Vec<TokenRecord> = [
            ("10.0.0.1", "a", 1, 1),
            ("::1", "p8n9gmxTQVC8/nh2wlKKeQ==\n", u128::MAX - 7, 2),
            ("10.0.0.1", "", 3, 1),
        ]
        .into_iter()
        .map(|(ip, token, request, parts)| TokenRecord {
            sender: ip.parse().unwrap(),
            token: Bytes::from(token),
            request,
            parts,
        })
        .collect();
        let mut bytes = Vec::new();
        records.iter().for_each(|r| r.encode(&mut bytes));
        assert_eq!(TokenRecord::decode_all(&bytes), Some(records));
        assert_eq!(TokenRecord::decode_all(&bytes[..bytes.len() - 1]), None);
        assert_eq!(TokenRecord::decode_all(&[7]), None);
    }
}
