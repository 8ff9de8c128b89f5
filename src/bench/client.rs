//! The forward client: a TCP or TLS connection to the receiver, and the shared-key handshake
//! when the receiver asks for one.

use anyhow::Context;
use claimcheck_consumer::entry::ValueScanner;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::args::BenchArgs;
use crate::forward::security::sha512_hex;

/// A connection to the receiver: TCP or TLS.
pub(super) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Connects, with TLS if asked, and answers the receiver's HELO if given a shared key.
pub(super) async fn connect(
    args: &BenchArgs,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> anyhow::Result<Box<dyn Stream>> {
    let tcp = TcpStream::connect(args.target)
        .await
        .context("cannot connect")?;
    let _ = tcp.set_nodelay(true);
    let mut stream: Box<dyn Stream> = match tls {
        None => Box::new(tcp),
        Some(connector) => {
            let name = match &args.tls_server_name {
                Some(name) => ServerName::try_from(name.clone())
                    .with_context(|| format!("{name:?} is not a server name"))?,
                None => ServerName::IpAddress(args.target.ip().into()),
            };
            Box::new(
                connector
                    .connect(name, tcp)
                    .await
                    .context("TLS handshake failed")?,
            )
        }
    };
    if let Some(key) = &args.shared_key {
        handshake(&mut stream, args, key).await?;
    }
    Ok(stream)
}

/// The forward protocol's handshake as a client: HELO in, PING out, PONG in and checked.
async fn handshake(
    stream: &mut Box<dyn Stream>,
    args: &BenchArgs,
    key: &str,
) -> anyhow::Result<()> {
    use rmpv::Value;
    let helo = read_value(stream)
        .await
        .context("no HELO (does the receiver have a shared key?)")?;
    let options = match helo.as_array().map(Vec::as_slice) {
        Some([kind, options]) if kind.as_str() == Some("HELO") => options,
        _ => anyhow::bail!("expected HELO, got {helo}"),
    };
    let field = |name: &str| -> Vec<u8> {
        let v = options
            .as_map()
            .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name)))
            .map(|(_, v)| v);
        match v {
            Some(Value::Binary(b)) => b.clone(),
            Some(Value::String(s)) => s.as_bytes().to_vec(),
            _ => Vec::new(),
        }
    };
    let (nonce, auth) = (field("nonce"), field("auth"));
    let salt: [u8; 16] = rand::random();
    let hostname = args.self_hostname.as_bytes();
    let digest = sha512_hex(&[&salt, hostname, &nonce, key.as_bytes()]);
    let (user, password_digest) = match (&args.user, auth.is_empty()) {
        (Some(user), false) => {
            let (name, password) = user
                .split_once(':')
                .context("--user must be user:password")?;
            let digest = sha512_hex(&[&auth, name.as_bytes(), password.as_bytes()]);
            (name.to_string(), digest)
        }
        (None, false) => anyhow::bail!("the receiver asks for a user (give --user)"),
        (_, true) => (String::new(), String::new()),
    };
    let ping = Value::Array(vec![
        "PING".into(),
        args.self_hostname.clone().into(),
        Value::Binary(salt.to_vec()),
        digest.into(),
        user.into(),
        password_digest.into(),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &ping).expect("writing to a Vec cannot fail");
    stream.write_all(&out).await?;
    let pong = read_value(stream).await.context("no PONG")?;
    match pong.as_array().map(Vec::as_slice) {
        Some([kind, ok, reason, server, digest]) if kind.as_str() == Some("PONG") => {
            if ok.as_bool() != Some(true) {
                anyhow::bail!("handshake refused: {}", reason.as_str().unwrap_or("?"));
            }
            let server = server.as_str().unwrap_or_default().as_bytes();
            let want = sha512_hex(&[&salt, server, &nonce, key.as_bytes()]);
            if digest.as_str() != Some(want.as_str()) {
                anyhow::bail!("the receiver's PONG digest is wrong: is its shared key the same?");
            }
            Ok(())
        }
        _ => anyhow::bail!("expected PONG, got {pong}"),
    }
}

/// Reads one msgpack value (a handshake message) from the stream.
async fn read_value(stream: &mut Box<dyn Stream>) -> anyhow::Result<rmpv::Value> {
    let mut buf = Vec::with_capacity(512);
    let mut scanner = ValueScanner::default();
    loop {
        if let Some(len) = scanner.advance(&buf)? {
            anyhow::ensure!(
                len == buf.len(),
                "unexpected bytes after a handshake message"
            );
            return Ok(rmpv::decode::read_value(&mut &buf[..])?);
        }
        anyhow::ensure!(buf.len() < 64 << 10, "handshake message too long");
        let mut piece = [0u8; 4096];
        let n = stream.read(&mut piece).await?;
        anyhow::ensure!(n > 0, "closed by the receiver");
        buf.extend_from_slice(&piece[..n]);
    }
}
