//! A fault-injecting HTTP proxy between the sidecar and the emulator, one per service.
//!
//! The sidecar talks to the proxy (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL_KINESIS`), which
//! forwards to moto unless told to misbehave: refuse connections, answer errors, answer
//! slowly, or throttle Kinesis (a whole PutRecords refused, or some of its records failed
//! inside a 200, as Kinesis does). Both proxies share a [`Ledger`] that checks the one order
//! that matters: every pointer that reaches Kinesis names an object S3 has already stored.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

/// What a proxy does to the requests it gets.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Close every connection at once: the service is unreachable.
    Down,
    /// Answer `status` to this fraction of requests, with the service's error body.
    Errors { status: u16, rate: f64 },
    /// Answer every request with `status` and the service's error body of `code` (S3's XML,
    /// Kinesis's JSON), as an account's settings would: AccessDenied, a disabled KMS key...
    Refuse {
        status: u16,
        code: &'static str,
        message: &'static str,
    },
    /// Hold every request this long before forwarding it.
    Slow(Duration),
    /// Forward every request, then close its connection without the answer, as a network
    /// that fails after the write landed does.
    AnswerLost,
    /// Kinesis only: of every `every` PutRecords, answer the first `streak` in a row with
    /// `status` (400: ProvisionedThroughputExceededException; 500, 503: the service's error),
    /// and fail `record_rate` of the records of the others with
    /// ProvisionedThroughputExceededException inside a 200 response. The sidecar sends one
    /// PutRecords at a time, so a streak longer than the SDK's own 3 attempts reaches the
    /// sidecar as a failed call once per cycle, however few calls a run makes: no luck needed.
    Streaks {
        status: u16,
        streak: u64,
        every: u64,
        record_rate: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    S3,
    Kinesis,
}

/// What the proxies saw.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Keys S3 confirmed (PutObject or CompleteMultipartUpload answered 200).
    stored: Mutex<HashSet<String>>,
    /// Pointers that reached Kinesis before their object was stored.
    pub violations: Mutex<Vec<String>>,
    /// When each service last answered a write with success.
    successes: Mutex<Vec<(Service, Instant)>>,
    /// Requests refused or failed on purpose.
    pub injected: Mutex<u64>,
    /// The `x-amz-*` headers of every object write (PutObject, CreateMultipartUpload), in
    /// order: what an object was asked to be stored with.
    pub object_writes: Mutex<Vec<Vec<(String, String)>>>,
}

impl Ledger {
    /// The first successful write to `service` at or after `since`.
    pub fn first_success_after(&self, service: Service, since: Instant) -> Option<Instant> {
        self.successes
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, t)| *s == service && *t >= since)
            .map(|(_, t)| *t)
            .min()
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    pub fn injected(&self) -> u64 {
        *self.injected.lock().unwrap()
    }
}

struct State {
    service: Service,
    upstream: String,
    fault: Mutex<Fault>,
    /// PutRecords requests seen, for [`Fault::Streaks`]' cycle.
    put_records: AtomicU64,
    ledger: Arc<Ledger>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An S3 proxy and a Kinesis proxy in front of one emulator, recording into one ledger.
pub struct Proxies {
    pub s3: Proxy,
    pub kinesis: Proxy,
    pub ledger: Arc<Ledger>,
}

impl Proxies {
    pub async fn start(upstream_port: u16) -> Proxies {
        let ledger = Arc::new(Ledger::default());
        Proxies {
            s3: Proxy::start(Service::S3, upstream_port, ledger.clone()).await,
            kinesis: Proxy::start(Service::Kinesis, upstream_port, ledger.clone()).await,
            ledger,
        }
    }

    /// The endpoint overrides that send the sidecar through the proxies.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("AWS_ENDPOINT_URL_S3", self.s3.url()),
            ("AWS_ENDPOINT_URL_KINESIS", self.kinesis.url()),
        ]
    }
}

impl Proxy {
    /// Starts a proxy for `service` in front of moto on `upstream_port`.
    pub async fn start(service: Service, upstream_port: u16, ledger: Arc<Ledger>) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            service,
            upstream: format!("http://127.0.0.1:{upstream_port}"),
            fault: Mutex::new(Fault::None),
            put_records: AtomicU64::new(0),
            ledger,
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if *s.fault.lock().unwrap() == Fault::Down {
                    *s.ledger.injected.lock().unwrap() += 1;
                    drop(stream);
                    continue;
                }
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Proxy { port, state, task }
    }

    pub fn set(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

fn chance(rate: f64) -> bool {
    rate > 0.0 && rand::random::<f64>() < rate
}

fn error_response(service: Service, status: u16) -> Response<Full<Bytes>> {
    let code = match (service, status) {
        (Service::S3, 503) => "SlowDown",
        (Service::S3, _) => "InternalError",
        (Service::Kinesis, 400) => "ProvisionedThroughputExceededException",
        (Service::Kinesis, 503) => "ServiceUnavailable",
        (Service::Kinesis, _) => "InternalFailure",
    };
    coded_error(service, status, code, "injected by the test proxy")
}

/// The service's error response of `code`.
fn coded_error(service: Service, status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let (body, content_type) = match service {
        Service::S3 => (
            format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>"),
            "application/xml",
        ),
        Service::Kinesis => (
            json!({"__type": code, "message": message}).to_string(),
            "application/x-amz-json-1.1",
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// Answers one request; an error closes the connection without an answer, as a backend that
/// went down does to a connection it had accepted.
async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    if *state.fault.lock().unwrap() == Fault::Down {
        *state.ledger.injected.lock().unwrap() += 1;
        return Err(std::io::Error::other("the backend is down"));
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if state.service == Service::S3 {
        let query = parts.uri.query().unwrap_or_default();
        let writes = (parts.method == hyper::Method::PUT && !query.contains("partNumber"))
            || (parts.method == hyper::Method::POST
                && query.split('&').any(|q| q == "uploads" || q == "uploads="));
        if writes {
            let headers = parts
                .headers
                .iter()
                .filter(|(k, _)| k.as_str().starts_with("x-amz-"))
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            state.ledger.object_writes.lock().unwrap().push(headers);
        }
    }
    let fault = state.fault.lock().unwrap().clone();
    let is_put_records = parts
        .headers
        .get("x-amz-target")
        .is_some_and(|t| t.as_bytes().ends_with(b".PutRecords"));
    let inject = || *state.ledger.injected.lock().unwrap() += 1;
    match &fault {
        Fault::Slow(delay) => tokio::time::sleep(*delay).await,
        Fault::Errors { status, rate } if chance(*rate) => {
            inject();
            return Ok(error_response(state.service, *status));
        }
        Fault::Refuse {
            status,
            code,
            message,
        } => {
            inject();
            return Ok(coded_error(state.service, *status, code, message));
        }
        Fault::Streaks {
            status,
            streak,
            every,
            ..
        } if is_put_records
            && state.put_records.fetch_add(1, Ordering::Relaxed) % every < *streak =>
        {
            inject();
            return Ok(error_response(state.service, *status));
        }
        _ => {}
    }
    let record_rate = match fault {
        Fault::Streaks { record_rate, .. } if is_put_records => record_rate,
        _ => 0.0,
    };
    if is_put_records {
        return Ok(put_records(&state, parts, body, record_rate).await);
    }
    let response = forward(&state, parts.clone(), body).await;
    if fault == Fault::AnswerLost {
        inject();
        return Err(std::io::Error::other("the answer is lost"));
    }
    if state.service == Service::S3 && response.status().is_success() {
        let query = parts.uri.query().unwrap_or_default();
        let completes = (parts.method == hyper::Method::PUT && !query.contains("partNumber"))
            || (parts.method == hyper::Method::POST && query.contains("uploadId"));
        if completes {
            // Path style: /<bucket>/<key>.
            let path = parts.uri.path().trim_start_matches('/');
            if let Some((_, key)) = path.split_once('/') {
                let key = percent_encoding::percent_decode_str(key)
                    .decode_utf8_lossy()
                    .into_owned();
                state.ledger.stored.lock().unwrap().insert(key);
                state
                    .ledger
                    .successes
                    .lock()
                    .unwrap()
                    .push((Service::S3, Instant::now()));
            }
        }
    }
    Ok(response)
}

/// Forwards PutRecords, checking each pointer's object (or inline body) and failing
/// `record_rate` of the records inside a 200 response.
async fn put_records(
    state: &State,
    parts: hyper::http::request::Parts,
    body: Bytes,
    record_rate: f64,
) -> Response<Full<Bytes>> {
    let mut request: Value = serde_json::from_slice(&body).expect("PutRecords is JSON");
    let records = request["Records"].as_array().cloned().unwrap_or_default();
    for r in &records {
        let data = base64::engine::general_purpose::STANDARD
            .decode(r["Data"].as_str().unwrap_or_default())
            .unwrap_or_default();
        // An inline record carries its body (checked whole here); any other names an object.
        let key = match claimcheck_consumer::Pointer::from_record(&data) {
            Ok(p) if p.is_inline() => {
                let body = p.inline.clone().unwrap_or_default();
                match claimcheck_consumer::verify_and_decode(&p, &body) {
                    Ok(_) => continue,
                    Err(e) => Some(format!("inline record {}: {e}", p.chunk_id)),
                }
            }
            Ok(p) => Some(p.key),
            Err(_) => None,
        };
        match key {
            Some(key) if state.ledger.stored.lock().unwrap().contains(&key) => {}
            other => state
                .ledger
                .violations
                .lock()
                .unwrap()
                .push(format!("pointer published before its object: {other:?}")),
        }
    }
    let failed: Vec<bool> = records.iter().map(|_| chance(record_rate)).collect();
    let kept: Vec<Value> = records
        .iter()
        .zip(&failed)
        .filter(|(_, f)| !**f)
        .map(|(r, _)| r.clone())
        .collect();
    if kept.len() < records.len() {
        *state.ledger.injected.lock().unwrap() += 1;
    }
    let mut upstream_results = Vec::new();
    let mut upstream_failed = 0;
    if !kept.is_empty() {
        request["Records"] = Value::Array(kept);
        let response = forward(state, parts, Bytes::from(request.to_string())).await;
        if !response.status().is_success() {
            return response;
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let answer: Value = serde_json::from_slice(&body).expect("PutRecords answers JSON");
        upstream_failed = answer["FailedRecordCount"].as_u64().unwrap_or(0);
        upstream_results = answer["Records"].as_array().cloned().unwrap_or_default();
        state
            .ledger
            .successes
            .lock()
            .unwrap()
            .push((Service::Kinesis, Instant::now()));
    }
    let mut from_upstream = upstream_results.into_iter();
    let results: Vec<Value> = failed
        .iter()
        .map(|f| match f {
            true => json!({"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "Rate exceeded for shard (injected)"}),
            false => from_upstream.next().unwrap_or(Value::Null),
        })
        .collect();
    let count = failed.iter().filter(|f| **f).count() as u64 + upstream_failed;
    let body = json!({"FailedRecordCount": count, "Records": results});
    Response::builder()
        .status(200)
        .header("content-type", "application/x-amz-json-1.1")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn forward(
    state: &State,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = Request::builder()
        .method(parts.method)
        .uri(format!("{}{path}", state.upstream));
    for (name, value) in &parts.headers {
        if name != "content-length" && name != "transfer-encoding" {
            req = req.header(name, value);
        }
    }
    let req = req.body(Full::new(body)).unwrap();
    match state.client.request(req).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut out = Response::builder().status(parts.status);
            for (name, value) in &parts.headers {
                if name != "content-length" && name != "transfer-encoding" {
                    out = out.header(name, value);
                }
            }
            out.body(Full::new(body)).unwrap()
        }
        Err(e) => Response::builder()
            .status(502)
            .body(Full::new(Bytes::from(format!("proxy: {e}"))))
            .unwrap(),
    }
}
