//! The admin HTTP endpoint on `--metrics-listen`:
//!
//! | path             | answers                                                               |
//! |------------------|-----------------------------------------------------------------------|
//! | `/metrics`       | every `claimcheck_*` metric, Prometheus/OpenMetrics text              |
//! | `/healthz`       | 200 while the process runs                                            |
//! | `/readyz`        | 200 while it can accept and buffer events (S3 and Kinesis need not be up); 503 when the buffer is full, the disk is full or failing, and while shutting down |
//! | `/api/v1/buffer` | JSON: every chunk in the buffer with its phase, age, size, attempts, last error and next retry |
//!
//! It serves until the sidecar ends, through the delivery at shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::buffer::gauges::BufferCollector;
use crate::buffer::registry::{ChunkInfo, Registry};
use crate::time::AcceptBackoff;

struct State {
    buffer: Arc<Registry>,
    limit: Option<u64>,
    metrics: prometheus_client::registry::Registry,
}

/// Serves the admin endpoint on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    buffer: Arc<Registry>,
    limit: Option<u64>,
    shutdown: CancellationToken,
) {
    let mut metrics = crate::metrics::metrics().registry();
    metrics.register_collector(Box::new(BufferCollector {
        buffer: buffer.clone(),
        limit,
    }));
    let state = Arc::new(State {
        buffer,
        limit,
        metrics,
    });
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics and health endpoint listening");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = AcceptBackoff::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff.reset();
                    a
                }
                Err(e) => {
                    warn!(cause = %e, retry_in = ?backoff.next(), "admin endpoint: cannot accept a connection");
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, max = MAX_CONNECTIONS, "admin endpoint: too many connections; closing this one");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| answer(state.clone(), req));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, cause = %e, "admin endpoint: connection error"),
                Err(_) => debug!(%peer, "admin endpoint: closing a connection open too long"),
            }
        });
    }
}

/// Most admin connections served at once: scrapers and probes need a few; beyond, a new one is
/// closed at once, so that idle ones cannot take the file descriptors the forward port and the
/// chunk files need.
const MAX_CONNECTIONS: usize = 32;

/// A request's headers must arrive within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection is closed after this long, whatever it does (a scraper connects again).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Binds the admin endpoint's listener.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--metrics-listen): {e}"))
}

/// GETs `url` (plain HTTP) within 5 seconds: its status and body. For `claimcheck health`.
pub async fn get(url: &str) -> anyhow::Result<(StatusCode, String)> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let uri: hyper::Uri = url.parse()?;
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), client.get(uri))
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within 5 s"))?
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("a static response is valid")
}

#[derive(Serialize)]
struct BufferView {
    bytes: u64,
    limit: Option<u64>,
    accepting: bool,
    chunks: Vec<ChunkView>,
}

#[derive(Serialize)]
struct ChunkView {
    #[serde(flatten)]
    info: ChunkInfo,
    age_seconds: f64,
    /// Until the next retry of a chunk that failed (negative once overdue, waiting for a worker).
    next_retry_in_seconds: Option<f64>,
}

async fn answer(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n",
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            crate::metrics::encode(&state.metrics),
        ),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => match state.buffer.not_ready_because() {
            None => respond(StatusCode::OK, "text/plain", "ready\n"),
            Some(why) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/api/v1/buffer" => {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let chunks = state
                .buffer
                .snapshot()
                .into_iter()
                .map(|info| ChunkView {
                    age_seconds: (now_ms - info.created_ms).max(0) as f64 / 1000.0,
                    next_retry_in_seconds: info.next_retry_ms.map(|t| (t - now_ms) as f64 / 1000.0),
                    info,
                })
                .collect();
            let view = BufferView {
                bytes: state.buffer.usage(),
                limit: state.limit,
                accepting: state.buffer.accepting(),
                chunks,
            };
            respond(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&view).expect("the view serializes"),
            )
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: /metrics, /healthz, /readyz, /api/v1/buffer\n",
        ),
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Connects and reads until the endpoint closes the connection: true if it did within
    /// `within` (of the test's clock).
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// Idle connections cannot pile up: beyond [`MAX_CONNECTIONS`] a new one is closed at once,
    /// and one that sends no request is closed after [`HEADER_READ_TIMEOUT`], after which
    /// the endpoint answers again.
    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_bounded_in_number_and_time() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(run(
            listener,
            Arc::new(Registry::new()),
            None,
            shutdown.clone(),
        ));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the endpoint take them all.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut extra, Duration::from_secs(1)).await,
            "a connection beyond the limit is closed at once"
        );
        for stream in &mut idle {
            assert!(
                closed_within(stream, HEADER_READ_TIMEOUT + Duration::from_secs(1)).await,
                "an idle connection is closed"
            );
        }
        let mut probe = TcpStream::connect(addr).await.unwrap();
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        probe.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        shutdown.cancel();
    }
}
