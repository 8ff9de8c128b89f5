//! `claimcheck bench-floor`: a bare forward receiver, the floor under any durable receiver's
//! cost per request. For each request it does only what every receiver that acks after
//! storing must: read it, find its end and its ack token, write its entries to a file (one
//! file, overwritten round and round from its start, as the sidecar overwrites delivered
//! chunks' files), `fdatasync` it (unless told not to), and send the ack. No chunks, no
//! timekeys, no validation of events, no compression, no S3 or Kinesis.
//!
//! `scripts/bench-e2e` loads it with the same requests as the sidecar, in the same run, and
//! reports what the sidecar spends beyond it and the codec. Requests from several
//! connections are synced one by one, with no group commit: a floor for one connection.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use claimcheck_consumer::entry::ValueScanner;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::forward::frame::{self, Entries, Request};

#[derive(clap::Args, Debug, Clone)]
pub struct FloorArgs {
    /// Address to listen on for forward connections.
    #[arg(long, default_value = "127.0.0.1:24225")]
    pub listen: SocketAddr,
    /// The file the entries are written to (created, and written whole once before any
    /// request, so that requests overwrite blocks it has).
    #[arg(long)]
    pub file: PathBuf,
    /// How much of the file is written before starting again from its start.
    #[arg(long, value_parser = crate::config::parse_size, default_value = "64MiB")]
    pub span: u64,
    /// Do not fdatasync before each ack (the floor under the sidecar's `--sync none`).
    #[arg(long)]
    pub no_sync: bool,
}

/// Where requests' entries go.
struct Sink {
    /// The file and the offset of the next write.
    file: Mutex<(File, u64)>,
    span: u64,
    sync: bool,
}

impl Sink {
    fn open(args: &FloorArgs) -> io::Result<Sink> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&args.file)?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = args.span;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        file.sync_all()?;
        Ok(Sink {
            file: Mutex::new((file, 0)),
            span: args.span,
            sync: !args.no_sync,
        })
    }

    /// Stores one whole request; returns its ack, if it asks for one.
    fn store(&self, request: Bytes) -> io::Result<Option<Vec<u8>>> {
        let message = match frame::parse(request) {
            Request::Events(message) => message,
            Request::Nop => return Ok(None),
            Request::Broken(why) => return Err(io::Error::other(why)),
        };
        let entries = match &message.entries {
            Entries::Single(b) | Entries::Packed(b) | Entries::Array { bytes: b, .. } => b,
        };
        {
            let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
            let (file, next) = &mut *guard;
            let len = entries.len() as u64;
            let at = if *next + len <= self.span { *next } else { 0 };
            file.seek(SeekFrom::Start(at))?;
            file.write_all(entries)?;
            *next = at + len;
            if self.sync {
                file.sync_data()?;
            }
        }
        Ok(message.options.chunk.map(|token| frame::encode_ack(&token)))
    }
}

/// Serves forward connections until the process is stopped.
pub async fn run(args: FloorArgs) -> anyhow::Result<()> {
    let sink = Arc::new(Sink::open(&args)?);
    let listener = TcpListener::bind(args.listen).await?;
    info!(listen = %listener.local_addr()?, file = %args.file.display(), sync = sink.sync,
          "bench-floor is listening");
    loop {
        let (conn, peer) = listener.accept().await?;
        let sink = sink.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(conn, &sink).await {
                warn!(%peer, cause = %e, "bench-floor: connection closed");
            }
        });
    }
}

/// Reads requests whole (into one buffer, as the sidecar does), stores and acks each.
async fn serve(mut conn: TcpStream, sink: &Sink) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(256 << 10);
    let mut scanner = ValueScanner::default();
    loop {
        while let Some(len) = scanner
            .advance(&buf)
            .map_err(|e| io::Error::other(format!("not msgpack: {e:?}")))?
        {
            let request = buf.split_to(len).freeze();
            scanner = ValueScanner::default();
            // The write and the fsync block this thread, as they would a receiver's.
            if let Some(ack) = sink.store(request)? {
                conn.write_all(&ack).await?;
            }
        }
        // Room for the rest of the request as far as its headers say, at least 64 KiB.
        buf.reserve(scanner.wanted().saturating_sub(buf.len()).max(64 << 10));
        if conn.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stores_entries_and_acks_each_request() {
        let dir = tempfile::tempdir().unwrap();
        let args = FloorArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            file: dir.path().join("floor.data"),
            span: 1 << 20,
            no_sync: false,
        };
        let sink = Arc::new(Sink::open(&args).unwrap());
        let listener = TcpListener::bind(args.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_sink = sink.clone();
        tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            serve(conn, &server_sink).await.unwrap();
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        let entries = crate::bench::sample_entries(3, 200, 0, crate::bench::Payload::Logs);
        for token in ["t1", "t2"] {
            let mut request = Vec::new();
            rmpv::encode::write_value(
                &mut request,
                &rmpv::Value::Array(vec![
                    "app".into(),
                    rmpv::Value::Binary(entries.clone()),
                    rmpv::Value::Map(vec![("chunk".into(), token.into())]),
                ]),
            )
            .unwrap();
            // Split, so that a request arrives in pieces.
            let (a, b) = request.split_at(request.len() / 2);
            client.write_all(a).await.unwrap();
            client.flush().await.unwrap();
            client.write_all(b).await.unwrap();
            let ack = frame::encode_ack(token.as_bytes());
            let mut got = vec![0u8; ack.len()];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, ack);
        }
        drop(client);
        let written = std::fs::read(&args.file).unwrap();
        assert_eq!(written.len(), 1 << 20, "the file keeps its span");
        assert_eq!(&written[..entries.len()], &entries[..]);
        assert_eq!(&written[entries.len()..2 * entries.len()], &entries[..]);
    }
}
