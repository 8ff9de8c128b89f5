//! `claimcheck tail` and `claimcheck resolve`: the consumer crate on the command line. Events
//! go to stdout as JSON lines `{"time","tag","record"}` (plus `"metadata"` when present);
//! problems with single pointers go to the log on stderr and do not stop the command.

use std::io::{BufRead, Write};
use std::time::Duration;

use claimcheck_consumer::{Event, Pointer, Resolver, StartPosition, StreamReader};
use tracing::{error, info};

use crate::aws;
use crate::config::parse_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum From {
    TrimHorizon,
    Latest,
}

/// `claimcheck tail`: follow a stream and print its events.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// Kinesis stream of pointer records.
    #[arg(long, env = "CLAIMCHECK_KINESIS_STREAM")]
    pub kinesis_stream: String,
    /// Where to start in each shard.
    #[arg(long, value_enum, default_value = "trim-horizon")]
    pub from: From,
    /// Exit after this long without new records (default: follow forever).
    #[arg(long, value_parser = parse_duration)]
    pub until_idle: Option<Duration>,
    /// How long to wait between reads when a stream has nothing new.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub poll_interval: Duration,
}

/// `claimcheck resolve`: print the events of pointers given as an argument or on stdin.
#[derive(Debug, clap::Args)]
pub struct ResolveArgs {
    /// A pointer record (JSON); `-` or nothing reads pointers from stdin, one per line.
    pub pointer: Option<String>,
}

fn print_events(out: &mut impl Write, events: &[Event]) -> std::io::Result<()> {
    for event in events {
        serde_json::to_writer(&mut *out, &event.to_json())?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

pub async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let sdk = aws::load_config().await;
    let resolver = Resolver::new(aws::s3_client(&sdk));
    let start = match args.from {
        From::TrimHorizon => StartPosition::TrimHorizon,
        From::Latest => StartPosition::Latest,
    };
    let mut reader = StreamReader::open(
        aws::kinesis_client(&sdk),
        resolver,
        &args.kinesis_stream,
        start,
    )
    .await?;
    let mut stdout = std::io::stdout().lock();
    let mut last_record = tokio::time::Instant::now();
    let (mut chunks, mut events) = (0u64, 0u64);
    loop {
        let Some(mut delivery) = reader.next().await? else {
            if let Some(idle) = args.until_idle {
                if last_record.elapsed() >= idle {
                    let stats = reader.stats();
                    info!(
                        chunks,
                        events,
                        duplicates_dropped = stats.duplicates_dropped,
                        "idle; exiting"
                    );
                    return Ok(());
                }
            }
            tokio::time::sleep(args.poll_interval).await;
            continue;
        };
        last_record = tokio::time::Instant::now();
        match delivery.events().await {
            Ok(list) => {
                print_events(&mut stdout, &list)?;
                chunks += 1;
                events += list.len() as u64;
                tracing::debug!(position = %delivery.position(), events = list.len(), "chunk resolved");
            }
            Err(e) => {
                error!(cause = %e, position = %delivery.position(), "cannot resolve a pointer; skipping it")
            }
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
    let sdk = aws::load_config().await;
    let resolver = Resolver::new(aws::s3_client(&sdk));
    let mut stdout = std::io::stdout().lock();
    let mut failed = 0;
    for text in pointers {
        let resolved = match Pointer::from_json(text.as_bytes()) {
            Ok(p) => resolver.resolve(&p).await,
            Err(e) => Err(e),
        };
        match resolved {
            Ok(chunk) => print_events(&mut stdout, &chunk.events)?,
            Err(e) => {
                error!(cause = %e, "cannot resolve pointer");
                failed += 1;
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} pointer(s) could not be resolved");
    Ok(())
}
