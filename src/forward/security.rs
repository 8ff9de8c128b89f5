//! The shared-key handshake of the forward protocol (HELO, PING, PONG), configured as Fluentd's
//! in_forward `<security>` section is: `self_hostname`, `shared_key`, `user_auth` with users,
//! and per-client host or network rules with their own shared key and users.
//!
//! ```text
//! S→C ["HELO", {"nonce": bin16, "auth": bin16, "keepalive": bool}]
//! C→S ["PING", hostname, salt, hex(sha512(salt + hostname + nonce + shared_key)),
//!             username, hex(sha512(auth + username + password))]
//! S→C ["PONG", true, "", self_hostname, hex(sha512(salt + self_hostname + nonce + shared_key))]
//!     ["PONG", false, reason, "", ""]   and the connection is closed
//! ```
//!
//! Every field is taken as raw bytes: Fluent Bit's salt is 16 random bytes packed as a msgpack
//! str, which need not be UTF-8.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use claimcheck_consumer::entry;
use ipnet::IpNet;
use rmpv::Value;
use sha2::{Digest, Sha512};

/// The `<security>` settings.
#[derive(Debug, Clone)]
pub struct Security {
    /// Our name in PONG; Fluentd refuses a PONG carrying its own `self_hostname`.
    pub self_hostname: String,
    /// The key every client must prove it knows, unless its `<client>` rule has its own.
    pub shared_key: Secret,
    /// Whether clients must also give a username and password.
    pub user_auth: bool,
    pub users: Vec<User>,
    /// Whether clients that match no `<client>` rule may connect.
    pub allow_anonymous_source: bool,
    pub clients: Vec<ClientRule>,
}

/// A string that is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// A `<user>`: `NAME:PASSWORD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub username: String,
    pub password: Secret,
}

impl FromStr for User {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some((name, password)) if !name.is_empty() && !password.is_empty() => Ok(User {
                username: name.to_string(),
                password: Secret(password.to_string()),
            }),
            _ => Err("a user is NAME:PASSWORD".into()),
        }
    }
}

/// A `<client>` rule: `ADDRESS[,shared_key=KEY][,users=NAME:NAME...]`, where ADDRESS is an
/// IP address, a network (`10.0.0.0/8`) or a host name (resolved when the sidecar starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRule {
    pub source: Source,
    pub shared_key: Option<Secret>,
    /// Users allowed from this client; empty means every user.
    pub users: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Network(IpNet),
    /// A host name and the addresses it resolved to at start.
    Host(String, Vec<IpAddr>),
}

impl FromStr for ClientRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let address = parts.next().unwrap_or_default().trim();
        let address = address
            .strip_prefix("host=")
            .or_else(|| address.strip_prefix("network="))
            .unwrap_or(address);
        if address.is_empty() {
            return Err("a client rule starts with an address, a network or a host name".into());
        }
        let source = if let Ok(net) = address.parse::<IpNet>() {
            Source::Network(canonical_net(net))
        } else if let Ok(ip) = address.parse::<IpAddr>() {
            Source::Network(canonical_net(IpNet::from(ip)))
        } else {
            Source::Host(address.to_string(), Vec::new())
        };
        let mut rule = ClientRule {
            source,
            shared_key: None,
            users: Vec::new(),
        };
        for part in parts {
            match part.trim().split_once('=') {
                Some(("shared_key", key)) if !key.is_empty() => {
                    rule.shared_key = Some(Secret(key.to_string()))
                }
                Some(("users", names)) => {
                    rule.users = names
                        .split(':')
                        .filter(|n| !n.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                _ => {
                    return Err(format!(
                    "unknown client option `{part}` (expected shared_key=KEY or users=NAME:NAME)"
                ))
                }
            }
        }
        Ok(rule)
    }
}

impl ClientRule {
    /// Resolves a host name rule to its addresses, as Fluentd does when it reads its
    /// configuration. A name that does not resolve matches nothing (and is reported).
    pub fn resolve(&mut self) -> Result<(), String> {
        if let Source::Host(name, addrs) = &mut self.source {
            use std::net::ToSocketAddrs;
            *addrs = (name.as_str(), 0)
                .to_socket_addrs()
                .map_err(|e| format!("client host {name}: {e}"))?
                .map(|a| a.ip())
                .collect();
        }
        Ok(())
    }

    fn matches(&self, ip: IpAddr) -> bool {
        // IPv4-mapped IPv6 addresses as IPv4, so that rules match on dual-stack listeners.
        let ip = ip.to_canonical();
        match &self.source {
            Source::Network(net) => net.contains(&ip),
            Source::Host(_, addrs) => addrs.iter().any(|a| a.to_canonical() == ip),
        }
    }
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 network it maps, as peers'
/// addresses are compared ([`IpAddr::to_canonical`]).
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        net => net,
    }
}

/// The server's side of one handshake: what it sent in HELO.
#[derive(Debug)]
pub struct Handshake {
    nonce: [u8; 16],
    auth: [u8; 16],
}

/// A client that proved it knows the key.
#[derive(Debug)]
pub struct Accepted {
    /// The hostname the client gave in PING.
    pub hostname: String,
    pub pong: Vec<u8>,
}

/// A refused PING: the reason sent in PONG (also logged), and the PONG to send before closing.
#[derive(Debug)]
pub struct Refused {
    pub reason: String,
    /// A fixed label for the metric.
    pub kind: &'static str,
    pub hostname: String,
    pub username: String,
    pub pong: Vec<u8>,
}

impl Security {
    /// Starts a handshake: fresh nonce and auth salt, and the HELO to send.
    pub fn helo(&self, keepalive: bool) -> (Handshake, Vec<u8>) {
        let handshake = Handshake {
            nonce: rand::random(),
            auth: rand::random(),
        };
        let helo = Value::Array(vec![
            "HELO".into(),
            Value::Map(vec![
                ("nonce".into(), Value::Binary(handshake.nonce.to_vec())),
                ("auth".into(), Value::Binary(handshake.auth.to_vec())),
                ("keepalive".into(), keepalive.into()),
            ]),
        ]);
        (handshake, pack(&helo))
    }

    /// Checks a PING (one whole msgpack value) from `peer`, as Fluentd's in_forward does.
    pub fn check_ping(
        &self,
        handshake: &Handshake,
        ping: &[u8],
        peer: IpAddr,
    ) -> Result<Accepted, Refused> {
        let fields = parse_ping(ping);
        let (hostname, username) = fields.as_ref().map_or((String::new(), String::new()), |f| {
            (lossy(f.hostname), lossy(f.username))
        });
        let refuse = |kind: &'static str, reason: String| Refused {
            pong: pack(&Value::Array(vec![
                "PONG".into(),
                false.into(),
                reason.as_str().into(),
                "".into(),
                "".into(),
            ])),
            reason,
            kind,
            hostname: hostname.clone(),
            username: username.clone(),
        };
        let Some(ping) = fields else {
            return Err(refuse("invalid_ping", "invalid ping message".into()));
        };
        let client = self.clients.iter().find(|c| c.matches(peer));
        if client.is_none() && !self.allow_anonymous_source {
            return Err(refuse(
                "anonymous_denied",
                format!("anonymous source host '{}' denied", peer.to_canonical()),
            ));
        }
        let key = client
            .and_then(|c| c.shared_key.as_ref())
            .unwrap_or(&self.shared_key)
            .0
            .as_bytes();
        let expected = sha512_hex(&[ping.salt, ping.hostname, &handshake.nonce, key]);
        if !constant_time_eq(expected.as_bytes(), ping.digest) {
            return Err(refuse("shared_key_mismatch", "shared_key mismatch".into()));
        }
        if self.user_auth {
            let permitted = |u: &&User| {
                client.is_none_or(|c| c.users.is_empty() || c.users.contains(&u.username))
            };
            let authenticated = self.users.iter().filter(permitted).any(|u| {
                let digest = sha512_hex(&[
                    &handshake.auth,
                    u.username.as_bytes(),
                    u.password.0.as_bytes(),
                ]);
                u.username.as_bytes() == ping.username
                    && constant_time_eq(digest.as_bytes(), ping.password_digest)
            });
            if !authenticated {
                return Err(refuse("user_mismatch", "username/password mismatch".into()));
            }
        }
        let proof = sha512_hex(&[
            ping.salt,
            self.self_hostname.as_bytes(),
            &handshake.nonce,
            key,
        ]);
        let pong = pack(&Value::Array(vec![
            "PONG".into(),
            true.into(),
            "".into(),
            self.self_hostname.as_str().into(),
            proof.into(),
        ]));
        Ok(Accepted { hostname, pong })
    }
}

struct Ping<'a> {
    hostname: &'a [u8],
    salt: &'a [u8],
    digest: &'a [u8],
    username: &'a [u8],
    password_digest: &'a [u8],
}

/// The six fields of `["PING", ...]`, each a str or bin; `None` if it is anything else.
fn parse_ping(bytes: &[u8]) -> Option<Ping<'_>> {
    let (count, mut pos) = entry::array_header(bytes).ok()??;
    if count != 6 {
        return None;
    }
    let mut fields = [&bytes[..0]; 6];
    for field in &mut fields {
        let (header, len) = entry::str_or_bin(&bytes[pos..]).ok()??;
        *field = bytes.get(pos + header..pos + header + len)?;
        pos += header + len;
    }
    match fields {
        [b"PING", hostname, salt, digest, username, password_digest] => Some(Ping {
            hostname,
            salt,
            digest,
            username,
            password_digest,
        }),
        _ => None,
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pack(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("writing to a Vec cannot fail");
    out
}

/// Lowercase hex SHA-512 of the concatenated parts.
pub fn sha512_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Sha512::new();
    for part in parts {
        hasher.update(part);
    }
    hex::encode(hasher.finalize().as_slice())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn security() -> Security {
        Security {
            self_hostname: "sidecar".into(),
            shared_key: Secret("secret".into()),
            user_auth: false,
            users: vec!["alice:wonderland".parse().unwrap()],
            allow_anonymous_source: true,
            clients: Vec::new(),
        }
    }

    /// HELO's nonce and auth salt, read back as a client would.
    fn helo_fields(helo: &[u8]) -> (Vec<u8>, Vec<u8>, bool) {
        let v = rmpv::decode::read_value(&mut &helo[..]).unwrap();
        let opts = v[1].as_map().unwrap();
        let get = |k: &str| {
            opts.iter()
                .find(|(key, _)| key.as_str() == Some(k))
                .unwrap()
                .1
                .clone()
        };
        (
            get("nonce").as_slice().unwrap().to_vec(),
            get("auth").as_slice().unwrap().to_vec(),
            get("keepalive").as_bool().unwrap(),
        )
    }

    /// A PING as a client computes it; the salt is raw bytes in a str, as Fluent Bit sends it.
    fn ping(nonce: &[u8], auth: &[u8], key: &str, user: Option<(&str, &str)>) -> Vec<u8> {
        let salt: &[u8] = &[0xff, 0x00, 0x80, b'a'];
        let digest = sha512_hex(&[salt, b"client-1", nonce, key.as_bytes()]);
        let (name, pass) = user.unwrap_or(("", ""));
        let pass_digest = match user {
            Some(_) => sha512_hex(&[auth, name.as_bytes(), pass.as_bytes()]),
            None => String::new(),
        };
        let mut out = vec![0x96];
        rmp::encode::write_str(&mut out, "PING").unwrap();
        rmp::encode::write_str(&mut out, "client-1").unwrap();
        rmp::encode::write_str_len(&mut out, salt.len() as u32).unwrap();
        out.extend_from_slice(salt);
        rmp::encode::write_str(&mut out, &digest).unwrap();
        rmp::encode::write_bin(&mut out, name.as_bytes()).unwrap();
        rmp::encode::write_str(&mut out, &pass_digest).unwrap();
        out
    }

    fn pong(bytes: &[u8]) -> Vec<Value> {
        rmpv::decode::read_value(&mut &bytes[..])
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    #[test]
    fn the_right_key_gets_a_pong_that_proves_ours() {
        let s = security();
        let (hs, helo) = s.helo(true);
        let (nonce, auth, keepalive) = helo_fields(&helo);
        assert_eq!((nonce.len(), auth.len(), keepalive), (16, 16, true));
        let ok = s
            .check_ping(
                &hs,
                &ping(&nonce, &auth, "secret", None),
                "10.0.0.1".parse().unwrap(),
            )
            .unwrap();
        assert_eq!(ok.hostname, "client-1");
        let p = pong(&ok.pong);
        assert_eq!((p[0].as_str(), p[1].as_bool()), (Some("PONG"), Some(true)));
        assert_eq!(p[3].as_str(), Some("sidecar"));
        let salt: &[u8] = &[0xff, 0x00, 0x80, b'a'];
        let expected = sha512_hex(&[salt, b"sidecar", &nonce, b"secret"]);
        assert_eq!(p[4].as_str(), Some(expected.as_str()));
    }

    #[test]
    fn refusals_carry_fluentd_reasons() {
        let mut s = security();
        let (hs, helo) = s.helo(false);
        let (nonce, auth, _) = helo_fields(&helo);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let err = s
            .check_ping(&hs, &ping(&nonce, &auth, "wrong", None), peer)
            .unwrap_err();
        assert_eq!(err.reason, "shared_key mismatch");
        let p = pong(&err.pong);
        assert_eq!(
            (p[1].as_bool(), p[2].as_str()),
            (Some(false), Some("shared_key mismatch"))
        );
        let err = s.check_ping(&hs, b"\x92\xa4PING\xa1x", peer).unwrap_err();
        assert_eq!(err.reason, "invalid ping message");

        s.user_auth = true;
        let good = ping(&nonce, &auth, "secret", Some(("alice", "wonderland")));
        assert!(s.check_ping(&hs, &good, peer).is_ok());
        let bad = ping(&nonce, &auth, "secret", Some(("alice", "looking-glass")));
        assert_eq!(
            s.check_ping(&hs, &bad, peer).unwrap_err().reason,
            "username/password mismatch"
        );

        s.allow_anonymous_source = false;
        s.clients = vec!["192.168.0.0/16,shared_key=other,users=bob".parse().unwrap()];
        let err = s.check_ping(&hs, &good, peer).unwrap_err();
        assert_eq!(err.reason, "anonymous source host '10.0.0.1' denied");
        // A matching client uses its own key, and only its users.
        let inside: IpAddr = "::ffff:192.168.3.4".parse().unwrap();
        assert_eq!(
            s.check_ping(&hs, &good, inside).unwrap_err().reason,
            "shared_key mismatch"
        );
        let with_own_key = ping(&nonce, &auth, "other", Some(("alice", "wonderland")));
        assert_eq!(
            s.check_ping(&hs, &with_own_key, inside).unwrap_err().reason,
            "username/password mismatch"
        );
        s.clients[0].users.clear();
        assert!(s.check_ping(&hs, &with_own_key, inside).is_ok());
    }

    #[test]
    fn client_rules_parse() {
        let r: ClientRule = "10.1.2.3".parse().unwrap();
        assert_eq!(r.source, Source::Network("10.1.2.3/32".parse().unwrap()));
        let r: ClientRule = "network=10.0.0.0/8,users=a:b".parse().unwrap();
        assert_eq!(r.users, vec!["a", "b"]);
        let r: ClientRule = "host=web-1,shared_key=k".parse().unwrap();
        assert_eq!(r.shared_key, Some(Secret("k".into())));
        assert!("10.0.0.0/8,colour=blue".parse::<ClientRule>().is_err());
        // Written as IPv4-mapped IPv6, a rule matches the IPv4 peers it maps.
        let r: ClientRule = "::ffff:10.1.2.3".parse().unwrap();
        assert!(r.matches("10.1.2.3".parse().unwrap()));
        let r: ClientRule = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(r.matches("10.9.8.7".parse().unwrap()));
        assert!(r.matches("::ffff:10.9.8.7".parse().unwrap()));
        assert!(!r.matches("11.0.0.1".parse().unwrap()));
        assert!("alice".parse::<User>().is_err());
        assert_eq!(format!("{:?}", Secret("x".into())), "<secret>");
    }
}
