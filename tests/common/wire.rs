//! Forward requests built byte by byte, for what the client libraries do not send, and
//! reading acks the way Fluent Bit does (one read).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use claimcheck_consumer::entry::{encode, EventTime};
use rmpv::Value;

use super::TestEvent;

pub fn pack(v: &Value) -> Vec<u8> {
    let mut b = Vec::new();
    rmpv::encode::write_value(&mut b, v).unwrap();
    b
}

pub fn record(source: &str, i: usize) -> Value {
    Value::Map(vec![
        ("source".into(), source.into()),
        ("seq".into(), (i as u64).into()),
    ])
}

pub fn expected(tag: &str, source: &str, base: i64, n: usize) -> Vec<TestEvent> {
    (0..n)
        .map(|i| TestEvent {
            tag: tag.into(),
            secs: base + i as i64,
            nanos: Some(i as u32),
            record: serde_json::json!({"source": source, "seq": i}),
        })
        .collect()
}

/// Entries `[EventTime, record]` (or Fluent Bit's `[[EventTime, {}], record]`), back to back.
pub fn entries(source: &str, base: i64, n: usize, fluent_bit: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let t = EventTime::new(base + i as i64, i as u32);
        if fluent_bit {
            out.push(0x92);
            out.push(0x92);
            encode::event_time(&mut out, t);
            out.extend(pack(&Value::Map(vec![("pod".into(), "web-1".into())])));
        } else {
            // Non-minimal array32 header, as Fluent Bit writes without metadata.
            out.extend_from_slice(&[0xdd, 0, 0, 0, 2]);
            encode::event_time(&mut out, t);
        }
        out.extend(pack(&record(source, i)));
    }
    out
}

/// `[tag, str32(entries), {"size", "compressed", "chunk"}]`, exactly as Fluentd's out_forward.
pub fn fluentd_request(
    tag: &str,
    entries: &[u8],
    n: usize,
    compressed: &str,
    token: &str,
) -> Vec<u8> {
    let mut out = vec![0x93];
    out.extend(pack(&tag.into()));
    out.push(0xdb);
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    out.extend_from_slice(entries);
    out.extend(pack(&Value::Map(vec![
        ("size".into(), (n as u64).into()),
        ("compressed".into(), compressed.into()),
        ("chunk".into(), token.into()),
    ])));
    out
}

/// `[tag, array(entries), {"chunk", "size", "fluent_signal"}]`, as Fluent Bit's out_forward
/// sends with `Require_ack_response` (with `gzip`, `[tag, bin(gzip(entries)), {…,
/// "compressed": "gzip", …}]`, as with `Compress gzip`): the token is base64 of the first 16
/// bytes of the SHA-512 of the entries before compression, so requests with the same entries
/// share it. Returns the request and its token.
/// Fluent Bit's ack token for `hashed`, the entries as it holds them: base64 of the first 16
/// bytes of their SHA-512.
pub fn fluent_bit_token(hashed: &[u8]) -> String {
    use base64::Engine;
    use sha2::{Digest, Sha512};
    base64::engine::general_purpose::STANDARD.encode(&Sha512::digest(hashed)[..16])
}

pub fn fluent_bit_request(tag: &str, entries: &[u8], n: usize, gzip: bool) -> (Vec<u8>, String) {
    let token = fluent_bit_token(entries);
    let mut out = vec![0x93];
    out.extend(pack(&tag.into()));
    let mut options = vec![
        ("chunk".into(), token.as_str().into()),
        ("size".into(), (n as u64).into()),
    ];
    if gzip {
        out.extend(pack(&Value::Binary(gzip_members(entries, 1))));
        options.push(("compressed".into(), "gzip".into()));
    } else {
        rmp::encode::write_array_len(&mut out, n as u32).unwrap();
        out.extend_from_slice(entries);
    }
    options.push(("fluent_signal".into(), 0.into()));
    out.extend(pack(&Value::Map(options)));
    (out, token)
}

pub fn gzip_members(data: &[u8], members: usize) -> Vec<u8> {
    let step = data.len().div_ceil(members);
    data.chunks(step)
        .flat_map(|part| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).unwrap();
            e.finish().unwrap()
        })
        .collect()
}

pub fn expect_ack(conn: &mut TcpStream, token: &[u8]) {
    let mut want = vec![0x81, 0xa3, b'a', b'c', b'k'];
    rmp::encode::write_str_len(&mut want, token.len() as u32).unwrap();
    want.extend_from_slice(token);
    // One read, as Fluent Bit does it: the ack must arrive in one piece.
    let mut buf = [0u8; 512];
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let n = conn.read(&mut buf).expect("an ack arrives");
    assert_eq!(
        &buf[..n],
        &want[..],
        "ack for token {:?}",
        String::from_utf8_lossy(token)
    );
}

pub fn connect(port: u16) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_nodelay(true).unwrap();
    c
}

/// Reads one msgpack value from `conn` (a HELO, a PONG).
pub fn read_value(conn: &mut TcpStream) -> Value {
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    rmpv::decode::read_value(conn).expect("a msgpack value arrives")
}

/// Whether the peer closed `conn` without sending anything more.
pub fn closed_silently(conn: &mut TcpStream) -> bool {
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 64];
    matches!(conn.read(&mut buf), Ok(0) | Err(_))
}

/// Lowercase hex SHA-512 of the concatenated parts, as the handshake's digests.
pub fn sha512_hex(parts: &[&[u8]]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha512::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(h.finalize().as_slice())
}

/// What the server sent in HELO.
pub struct Helo {
    pub nonce: Vec<u8>,
    pub auth: Vec<u8>,
    pub keepalive: bool,
}

pub fn read_helo(conn: &mut TcpStream) -> Helo {
    let helo = read_value(conn);
    assert_eq!(helo[0].as_str(), Some("HELO"), "{helo}");
    let field = |k: &str| {
        helo[1]
            .as_map()
            .unwrap()
            .iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("HELO has {k}: {helo}"))
    };
    Helo {
        nonce: field("nonce").as_slice().expect("nonce is bin").to_vec(),
        auth: field("auth").as_slice().expect("auth is bin").to_vec(),
        keepalive: field("keepalive").as_bool().unwrap(),
    }
}

/// A PING as Fluent Bit builds it: the salt is 16 raw bytes in a msgpack str.
pub fn ping(helo: &Helo, hostname: &str, key: &str, user: Option<(&str, &str)>) -> Vec<u8> {
    let salt: [u8; 16] = [
        0xff, 0xfe, 0, 1, 0x80, b'x', 7, 9, 200, 13, 10, 0, 99, 42, 0xc1, 5,
    ];
    let digest = sha512_hex(&[&salt, hostname.as_bytes(), &helo.nonce, key.as_bytes()]);
    let (name, password) = user.unwrap_or(("", ""));
    let password_digest = match user {
        Some(_) => sha512_hex(&[&helo.auth, name.as_bytes(), password.as_bytes()]),
        None => String::new(),
    };
    let mut out = vec![0x96];
    rmp::encode::write_str(&mut out, "PING").unwrap();
    rmp::encode::write_str(&mut out, hostname).unwrap();
    rmp::encode::write_str_len(&mut out, salt.len() as u32).unwrap();
    out.extend_from_slice(&salt);
    rmp::encode::write_str(&mut out, &digest).unwrap();
    rmp::encode::write_str(&mut out, name).unwrap();
    rmp::encode::write_str(&mut out, &password_digest).unwrap();
    out
}

/// The digest a PONG must carry for `ping` (built by [`ping`]) from a server named `server`.
pub fn pong_digest(helo: &Helo, server: &str, key: &str) -> String {
    let salt: [u8; 16] = [
        0xff, 0xfe, 0, 1, 0x80, b'x', 7, 9, 200, 13, 10, 0, 99, 42, 0xc1, 5,
    ];
    sha512_hex(&[&salt, server.as_bytes(), &helo.nonce, key.as_bytes()])
}

/// Connects to a sidecar that has a shared key and answers its HELO with a PING for `key`
/// (and `user`); returns the connection, the HELO and the PONG.
pub fn handshake(port: u16, key: &str, user: Option<(&str, &str)>) -> (TcpStream, Helo, Value) {
    let mut conn = connect(port);
    let helo = read_helo(&mut conn);
    conn.write_all(&ping(&helo, "fluent-bit", key, user))
        .unwrap();
    let pong = read_value(&mut conn);
    assert_eq!(pong[0].as_str(), Some("PONG"), "{pong}");
    (conn, helo, pong)
}
