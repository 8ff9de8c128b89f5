//! Measures the memory of resolving one large body: generates a `msgpack` body of ~1 KiB
//! events, stores it in S3, resolves it with the crate's streaming resolver, and prints the
//! crate's own accounting and the process's peak resident set (Linux `VmHWM`, reset before the
//! resolution starts).
//!
//! ```sh
//! .venv/bin/moto_server -p 5050 &
//! AWS_ENDPOINT_URL=http://127.0.0.1:5050 AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=x \
//! AWS_SECRET_ACCESS_KEY=x cargo run --release -p claimcheck-consumer --example memory -- 256 none
//! ```
//!
//! Arguments: body size in MiB (default 256) and compression (`zstd`, `gzip` or `none`).

use std::io::Write;
use std::time::Instant;

use claimcheck_consumer::body::{Compression, Encoder, Format};
use claimcheck_consumer::entry::encode;
use claimcheck_consumer::pointer::Checksum;
use claimcheck_consumer::{EventTime, Pointer, Resolver};

/// A size in KiB from /proc/self/status (Linux): `VmRSS` (resident now) or `VmHWM` (peak).
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets the peak to the current resident set (Linux 4.0+).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Writes and counts body bytes.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(Ok(256), |a| a.parse())?;
    let compression: Compression = args.next().as_deref().unwrap_or("zstd").parse()?;

    // The stored object goes to a temporary file, never into memory.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("object");
    let mut body = Counting {
        inner: Encoder::new(compression, None, std::fs::File::create(&path)?)?,
        bytes: 0,
    };
    let filler = "lorem ipsum dolor sit amet ".repeat(37);
    let mut records = 0u64;
    let mut entry = Vec::with_capacity(1200);
    while body.bytes < mib << 20 {
        entry.clear();
        entry.push(0x92);
        encode::event_time(&mut entry, EventTime::new(1_795_276_800, 0));
        let record = rmpv::Value::Map(vec![
            ("i".into(), records.into()),
            ("msg".into(), format!("{records:012} {filler}").into()),
        ]);
        rmpv::encode::write_value(&mut entry, &record)?;
        body.write_all(&entry)?;
        records += 1;
    }
    let bytes = body.bytes;
    body.inner.finish()?.sync_all()?;
    let mut stored = (0u64, 0u32);
    let mut file = std::fs::File::open(&path)?;
    let mut block = vec![0; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut file, &mut block)?;
        if n == 0 {
            break;
        }
        stored = (
            stored.0 + n as u64,
            claimcheck_consumer::crc::crc32c_append(stored.1, &block[..n]),
        );
    }

    let config = aws_config::load_from_env().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&config)
            .force_path_style(true)
            .build(),
    );
    let bucket = "claimcheck-memory";
    let _ = s3.create_bucket().bucket(bucket).send().await;
    let chunk_id = "0193a1c2e4f87d3e9a5b6c7d8e9f0a1b".to_string();
    let pointer = Pointer {
        v: 1,
        key: format!("memory/{chunk_id}"),
        chunk_id,
        bucket: bucket.into(),
        tag: "memory".into(),
        timekey: 1_795_276_800,
        first_time: EventTime::new(1_795_276_800, 0),
        last_time: EventTime::new(1_795_276_800, 0),
        records,
        bytes,
        stored_bytes: stored.0,
        format: Format::Msgpack,
        compression,
        checksum: Checksum { crc32c: stored.1 },
        producer: "memory".into(),
        created_at: "2026-11-21T16:01:02.345Z".into(),
        inline: None,
    };
    s3.put_object()
        .bucket(bucket)
        .key(&pointer.key)
        .body(aws_sdk_s3::primitives::ByteStream::from_path(&path).await?)
        .send()
        .await?;
    drop(dir);

    let resolver = Resolver::new(s3);
    let before = status_kib("VmRSS:");
    reset_peak_rss();
    let started = Instant::now();
    let mut stream = resolver.stream(pointer.clone());
    let mut events = 0u64;
    while let Some(batch) = stream.next_batch().await {
        events += batch?.len() as u64;
    }
    let elapsed = started.elapsed();
    let stats = stream.stats();
    println!(
        "body {} MiB ({records} events), stored {:.1} MiB ({}), {} GetObject",
        bytes >> 20,
        stored.0 as f64 / f64::from(1 << 20),
        compression.as_str(),
        stats.object_reads
    );
    println!(
        "resolved {events} events in {:.1} s; crate peak buffered {} KiB",
        elapsed.as_secs_f64(),
        stats.peak_buffered_bytes >> 10
    );
    match (before, status_kib("VmHWM:")) {
        (Some(before), Some(peak)) => println!(
            "process peak RSS while resolving: {} MiB (resident before: {} MiB)",
            peak >> 10,
            before >> 10
        ),
        _ => println!("process peak RSS: not available on this system"),
    }
    Ok(())
}
