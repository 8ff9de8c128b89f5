//! `claimcheck tail` and `claimcheck resolve`: the consumer crate on the command line. Events
//! go to stdout, as JSON lines `{"time","tag","record"}` (plus `"metadata"` when present) or as
//! msgpack forward messages; the log goes to stderr.
//!
//! A pointer whose object is missing, damaged or undecodable is logged and skipped (and, with
//! `--checkpoint`, counted as processed); a failure to reach AWS stops the command, so that a
//! checkpointed `tail` started again resumes where it stopped.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use claimcheck_consumer::{
    Event, EventTime, FileCheckpointStore, Pointer, Resolver, StartPosition, StreamReader,
};
use tracing::{error, info};

use crate::aws::{self, settings::AccessArgs};
use crate::config::parse_duration;

/// How events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One JSON object per line: `{"time","tag","record"}` (+ `"metadata"`).
    Json,
    /// Concatenated msgpack forward messages `[tag, time, record]`, the time slot as stored.
    Msgpack,
}

/// `claimcheck tail`: follow a stream and print its events.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// Kinesis stream of pointer records (name or ARN).
    #[arg(long, env = "CLAIMCHECK_KINESIS_STREAM")]
    pub kinesis_stream: String,
    /// Where to start in shards without a checkpoint: `trim-horizon`, `latest`, or an RFC 3339
    /// time such as `2026-11-21T16:00:00Z`.
    #[arg(long, value_parser = parse_start, default_value = "trim-horizon")]
    pub from: StartPosition,
    /// Resume from this checkpoint file and keep it up to date (created if missing).
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// Only print chunks whose tag matches this glob (`*`, `?`, `[a-z]`, `{a,b}`); repeat for
    /// more. Other pointers are skipped without reading their objects.
    #[arg(long = "tag", value_name = "GLOB")]
    pub tags: Vec<String>,
    /// Exit after this long without new records (default: follow forever).
    #[arg(long, value_parser = parse_duration)]
    pub until_idle: Option<Duration>,
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    pub format: OutputFormat,
    /// How long to wait between reads when the stream has nothing new.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub poll_interval: Duration,
    #[command(flatten)]
    pub access: AccessArgs,
}

/// `claimcheck resolve`: print the events of pointers given as an argument or on stdin.
#[derive(Debug, clap::Args)]
pub struct ResolveArgs {
    /// A pointer record: JSON, or any record (inline ones too) as base64, as
    /// `aws kinesis get-records` prints its `Data`; `-` or nothing reads them from stdin, one
    /// per line.
    pub pointer: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    pub format: OutputFormat,
    #[command(flatten)]
    pub access: AccessArgs,
}

fn parse_start(s: &str) -> Result<StartPosition, String> {
    match s {
        "trim-horizon" => Ok(StartPosition::TrimHorizon),
        "latest" => Ok(StartPosition::Latest),
        _ => {
            let t = EventTime::parse_rfc3339(s).ok_or_else(|| {
                format!(
                    "{s:?} is not trim-horizon, latest or an RFC 3339 time like 2026-11-21T16:00:00Z"
                )
            })?;
            let since_epoch = u64::try_from(t.secs)
                .map(|secs| Duration::new(secs, t.nanos))
                .map_err(|_| format!("{s:?} is before 1970"))?;
            Ok(StartPosition::AtTimestamp(
                SystemTime::UNIX_EPOCH + since_epoch,
            ))
        }
    }
}

fn write_events(
    out: &mut impl Write,
    events: &[Event],
    format: OutputFormat,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for event in events {
        match format {
            OutputFormat::Json => {
                serde_json::to_writer(&mut buf, &event.to_json())?;
                buf.push(b'\n');
            }
            OutputFormat::Msgpack => event.write_forward_message(&mut buf),
        }
    }
    out.write_all(&buf)?;
    out.flush()
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("cannot install the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

pub async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let (s3_access, kinesis_access) = args.access.destinations().map_err(anyhow::Error::msg)?;
    let kinesis_access = kinesis_access
        .for_stream(&args.kinesis_stream)
        .map_err(anyhow::Error::msg)?;
    let (s3, kinesis) = aws::load_configs(&s3_access, &kinesis_access).await;
    let resolver = Resolver::new(aws::s3_client(&s3));
    // Emulators such as moto never end a closed shard with a null iterator; Kinesis does, and
    // there an empty page proves nothing.
    let mut builder = StreamReader::builder(
        aws::kinesis_client(&kinesis),
        resolver,
        &args.kinesis_stream,
    )
    .start(args.from)
    .closed_shards_end_when_caught_up(aws::kinesis_endpoint_is_emulator(&kinesis));
    if let Some(path) = &args.checkpoint {
        builder = builder.checkpoints(FileCheckpointStore::new(path));
    }
    if !args.tags.is_empty() {
        let mut globs = globset::GlobSetBuilder::new();
        for tag in &args.tags {
            globs.add(
                globset::Glob::new(tag)
                    .map_err(|e| anyhow::anyhow!("--tag {tag:?} is not a glob: {e}"))?,
            );
        }
        let globs = globs.build()?;
        builder = builder.filter(move |p: &Pointer| globs.is_match(&p.tag));
    }
    let mut reader = builder.open().await?;
    let mut counts = (0u64, 0u64);
    let outcome = tokio::select! {
        result = follow(&mut reader, &args, &mut counts) => result,
        _ = stop_signal() => {
            info!("signal received; exiting");
            Ok(())
        }
    };
    // Whatever was printed and committed goes into the checkpoint, even after an error.
    let saved = reader.checkpoint().await;
    let stats = reader.stats();
    info!(
        chunks = counts.0,
        events = counts.1,
        duplicates_dropped = stats.duplicates_dropped,
        filtered = stats.filtered,
        "tail done"
    );
    outcome?;
    Ok(saved?)
}

/// Prints deliveries until the stream has been idle for `--until-idle` (or forever).
async fn follow(
    reader: &mut StreamReader,
    args: &TailArgs,
    (chunks, events): &mut (u64, u64),
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let mut last_record = tokio::time::Instant::now();
    loop {
        let Some(mut delivery) = reader.next().await? else {
            // Throttled, the stream is not idle: there is more to read.
            if reader.is_behind() {
                last_record = tokio::time::Instant::now();
            } else if args
                .until_idle
                .is_some_and(|idle| last_record.elapsed() >= idle)
            {
                info!("idle; exiting");
                return Ok(());
            }
            tokio::time::sleep(args.poll_interval).await;
            continue;
        };
        last_record = tokio::time::Instant::now();
        match delivery.events().await {
            Ok(list) => {
                write_events(&mut stdout, &list, args.format)?;
                *chunks += 1;
                *events += list.len() as u64;
                tracing::debug!(position = %delivery.position(), events = list.len(), "chunk printed");
            }
            Err(e) if e.is_chunk_error() => {
                error!(cause = %e, position = %delivery.position(), "cannot resolve a pointer; skipping it")
            }
            Err(e @ claimcheck_consumer::Error::UnsupportedVersion { .. }) => {
                anyhow::bail!(
                    "{e}, at {}: a newer claimcheck reads it (not skipped: that would lose it)",
                    delivery.position()
                )
            }
            Err(e) => return Err(e.into()),
        }
        reader.commit(delivery.position());
    }
}

pub async fn resolve(args: ResolveArgs) -> anyhow::Result<()> {
    let pointers: Vec<String> = match args.pointer.as_deref() {
        Some(p) if p != "-" => vec![p.to_string()],
        _ => std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .collect(),
    };
    let (s3_access, _) = args.access.destinations().map_err(anyhow::Error::msg)?;
    let sdk = aws::load_config(&s3_access).await;
    let resolver = Resolver::new(aws::s3_client(&sdk));
    let mut stdout = std::io::stdout().lock();
    let mut failed = 0;
    for text in pointers {
        let pointer = match parse_pointer_line(&text) {
            Ok(p) => p,
            Err(e) => {
                error!(cause = %e, "cannot resolve pointer");
                failed += 1;
                continue;
            }
        };
        // Streamed: a body of any size is printed as it is decoded, after it was verified.
        let mut stream = resolver.stream(pointer);
        while let Some(batch) = stream.next_batch().await {
            match batch {
                Ok(events) => write_events(&mut stdout, &events, args.format)?,
                Err(e) => {
                    error!(cause = %e, body = %stream.pointer().location(), "cannot resolve pointer");
                    failed += 1;
                }
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} pointer(s) could not be resolved");
    Ok(())
}

/// A pointer given on the command line: JSON (a pointer to an S3 object), or any record as
/// base64, as `aws kinesis get-records` prints its `Data` (inline records hold binary bytes).
fn parse_pointer_line(text: &str) -> Result<Pointer, claimcheck_consumer::Error> {
    use base64::Engine;
    let text = text.trim();
    if text.starts_with('{') {
        return Pointer::from_record(text.as_bytes());
    }
    match base64::engine::general_purpose::STANDARD.decode(text) {
        Ok(record) => Pointer::from_record(&record),
        // Neither: report it as the JSON it was probably meant to be.
        Err(_) => Pointer::from_record(text.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_are_taken_as_json_or_as_base64_records() {
        use base64::Engine;
        let json = r#"{"v":1,"chunk_id":"0193a1c2e4f87d3e9a5b6c7d8e9f0a1b","bucket":"b","key":"k","tag":"t","timekey":1,"first_time":1.5,"last_time":1.5,"records":1,"bytes":1,"stored_bytes":1,"format":"msgpack","compression":"none","checksum":{"crc32c":"00000000"},"producer":"p","created_at":"c"}"#;
        let p = parse_pointer_line(json).unwrap();
        assert_eq!(p.key, "k");
        let inline = p.clone().into_inline(bytes::Bytes::from_static(b"\xc0"));
        let b64 = base64::engine::general_purpose::STANDARD.encode(inline.to_record());
        assert_eq!(parse_pointer_line(&b64).unwrap(), inline);
        let b64_v1 = base64::engine::general_purpose::STANDARD.encode(json);
        assert_eq!(parse_pointer_line(&b64_v1).unwrap(), p);
        assert!(parse_pointer_line("not a pointer").is_err());
    }

    #[test]
    fn start_positions_parse() {
        assert_eq!(parse_start("latest"), Ok(StartPosition::Latest));
        assert_eq!(parse_start("trim-horizon"), Ok(StartPosition::TrimHorizon));
        assert_eq!(
            parse_start("2026-11-21T16:00:00.5Z"),
            Ok(StartPosition::AtTimestamp(
                SystemTime::UNIX_EPOCH + Duration::new(1_795_276_800, 500_000_000)
            ))
        );
        let err = parse_start("yesterday").unwrap_err();
        assert!(err.contains("RFC 3339"), "{err}");
    }
}
