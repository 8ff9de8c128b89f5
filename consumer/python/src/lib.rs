//! `claimcheck._native`: the consumer crate's pointer parsing, verification and decoding for
//! Python. The Python package (`python/claimcheck`) fetches objects with boto3 and hands the
//! bodies here; this module reads them in blocks through a `Read` adapter, so an object is
//! never held whole unless the caller chose to (small objects verified before their events).

use std::io::{self, Cursor, Read};
use std::sync::{Arc, Mutex};

use claimcheck_consumer::{Decoder, Error, Event, EventTime, Pointer};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};

mod value;

use value::{to_datetime, to_py};

/// Bytes asked of a Python file object at a time.
const READ_BLOCK: usize = 64 * 1024;

// --- errors -------------------------------------------------------------------------------

/// The crate's error as the exception of the same name in `claimcheck.errors`, with its
/// fields as attributes; `cause` (a Python exception raised by a file object's `read`)
/// becomes `__cause__`.
fn raise(py: Python<'_>, e: Error, cause: Option<PyErr>) -> PyErr {
    match exception(py, &e) {
        Ok(err) => {
            if let Some(cause) = cause {
                err.set_cause(py, Some(cause));
            }
            err
        }
        Err(failed) => failed,
    }
}

fn exception(py: Python<'_>, e: &Error) -> PyResult<PyErr> {
    let kwargs = PyDict::new(py);
    let name = match e {
        Error::MalformedPointer(_) => "MalformedPointer",
        Error::UnsupportedVersion { version } => {
            kwargs.set_item("version", version)?;
            "UnsupportedVersion"
        }
        Error::ObjectMissing { bucket, key } => {
            kwargs.set_item("bucket", bucket)?;
            kwargs.set_item("key", key)?;
            "ObjectMissing"
        }
        Error::ObjectChanged { bucket, key } => {
            kwargs.set_item("bucket", bucket)?;
            kwargs.set_item("key", key)?;
            "ObjectChanged"
        }
        Error::ChecksumMismatch { expected, actual } => {
            kwargs.set_item("expected", expected)?;
            kwargs.set_item("actual", actual)?;
            "ChecksumMismatch"
        }
        Error::SizeMismatch {
            what,
            expected,
            actual,
        } => {
            kwargs.set_item("what", what)?;
            kwargs.set_item("expected", expected)?;
            kwargs.set_item("actual", actual)?;
            "SizeMismatch"
        }
        Error::BodyTooLarge { bytes, limit } => {
            kwargs.set_item("bytes", bytes)?;
            kwargs.set_item("limit", limit)?;
            "BodyTooLarge"
        }
        Error::Decompress(_) => "DecompressError",
        Error::Decode(_) => "DecodeError",
        Error::S3 { .. } => "S3Error",
        // Checkpoints, Kinesis, DynamoDB, local I/O: nothing this module does, but a
        // retryable error is the safe reading of anything new.
        _ => "RetryableError",
    };
    let class = py.import("claimcheck.errors")?.getattr(name)?;
    let value = class.call((e.to_string(),), Some(&kwargs))?;
    Ok(PyErr::from_value(value))
}

fn seconds(t: EventTime) -> f64 {
    t.secs as f64 + f64::from(t.nanos) / 1e9
}

// --- Pointer ------------------------------------------------------------------------------

/// A pointer record: to an S3 object (version 1) or with its body inline (version 2).
#[pyclass(name = "Pointer", module = "claimcheck", frozen)]
struct PyPointer {
    inner: Pointer,
}

#[pymethods]
impl PyPointer {
    /// Parses a Kinesis record (bytes, or str for a version 1 pointer).
    #[staticmethod]
    fn parse(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<Self> {
        let parsed = if let Ok(s) = data.cast::<PyString>() {
            Pointer::from_record(s.to_cow()?.as_bytes())
        } else {
            let bytes: PyBackedBytes = data
                .extract()
                .map_err(|_| PyTypeError::new_err("a pointer record is bytes, bytearray or str"))?;
            Pointer::from_record(&bytes)
        };
        parsed
            .map(|inner| PyPointer { inner })
            .map_err(|e| raise(py, e, None))
    }

    /// The Kinesis record: the JSON, and for an inline pointer a newline and the body.
    fn to_record<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_record())
    }

    /// The JSON part of the record, as a `str`.
    fn to_json(&self) -> String {
        String::from_utf8(self.inner.to_json()).expect("serde_json writes UTF-8")
    }

    #[getter]
    fn v(&self) -> u32 {
        self.inner.v
    }
    #[getter]
    fn chunk_id(&self) -> &str {
        &self.inner.chunk_id
    }
    /// Bucket of the stored object; `""` for an inline pointer.
    #[getter]
    fn bucket(&self) -> &str {
        &self.inner.bucket
    }
    /// Key of the stored object; `""` for an inline pointer.
    #[getter]
    fn key(&self) -> &str {
        &self.inner.key
    }
    #[getter]
    fn tag(&self) -> &str {
        &self.inner.tag
    }
    #[getter]
    fn timekey(&self) -> i64 {
        self.inner.timekey
    }
    /// Earliest event time, in seconds (a float; the exact decimal is in `to_json()`).
    #[getter]
    fn first_time(&self) -> f64 {
        seconds(self.inner.first_time)
    }
    #[getter]
    fn last_time(&self) -> f64 {
        seconds(self.inner.last_time)
    }
    /// Number of events.
    #[getter]
    fn records(&self) -> u64 {
        self.inner.records
    }
    /// Size of the body, decompressed.
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.bytes
    }
    /// Size of the stored (compressed) body.
    #[getter]
    fn stored_bytes(&self) -> u64 {
        self.inner.stored_bytes
    }
    /// `"msgpack"` or `"json"`.
    #[getter]
    fn format(&self) -> &'static str {
        self.inner.format.as_str()
    }
    /// `"zstd"`, `"gzip"` or `"none"`.
    #[getter]
    fn compression(&self) -> &'static str {
        self.inner.compression.as_str()
    }
    /// CRC32C of the stored body.
    #[getter]
    fn crc32c(&self) -> u32 {
        self.inner.checksum.crc32c
    }
    #[getter]
    fn producer(&self) -> &str {
        &self.inner.producer
    }
    #[getter]
    fn created_at(&self) -> &str {
        &self.inner.created_at
    }
    /// Whether the body rides in the record (no S3 object).
    #[getter]
    fn is_inline(&self) -> bool {
        self.inner.is_inline()
    }
    /// `s3://bucket/key` or `inline`.
    #[getter]
    fn location(&self) -> String {
        self.inner.location()
    }

    fn __repr__(&self) -> String {
        format!(
            "Pointer(chunk_id={:?}, tag={:?}, records={}, location={:?})",
            self.inner.chunk_id,
            self.inner.tag,
            self.inner.records,
            self.inner.location()
        )
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<PyPointer>() {
            Ok(o) => o.get().inner == self.inner,
            Err(_) => false,
        }
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.inner.chunk_id.hash(&mut h);
        h.finish()
    }
}

// --- Event --------------------------------------------------------------------------------

/// One event: `tag`, `time` (float seconds), `datetime`, `record` and `metadata` (dicts).
#[pyclass(name = "Event", module = "claimcheck", frozen)]
struct PyEvent {
    inner: Event,
    /// The tag as Python: one string shared by the events of a chunk.
    tag: Py<PyString>,
}

#[pymethods]
impl PyEvent {
    #[getter]
    fn tag(&self, py: Python<'_>) -> Py<PyString> {
        self.tag.clone_ref(py)
    }
    /// Seconds since the Unix epoch, as a float (microsecond precision for today's dates).
    #[getter]
    fn time(&self) -> f64 {
        seconds(self.inner.time())
    }
    /// The time as a timezone-aware UTC `datetime` (microseconds); `ValueError` for a time
    /// outside its years 1 to 9999 (`time_ns` has it).
    #[getter]
    fn datetime<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let t = self.inner.time();
        to_datetime(py, t)?.ok_or_else(|| {
            PyValueError::new_err(format!(
                "the event's time, {} s since the epoch, is outside datetime's years 1 to 9999; time_ns has it",
                t.secs
            ))
        })
    }
    /// Whole seconds since the epoch and nanoseconds: the exact time.
    #[getter]
    fn time_ns(&self) -> (i64, u32) {
        let t = self.inner.time();
        (t.secs, t.nanos)
    }
    /// The record, converted on each access (normally a dict).
    #[getter]
    fn record<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, self.inner.record_msgpack())
    }
    /// Fluent Bit's per-event metadata, or `None`.
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.inner
            .metadata_msgpack()
            .map(|m| to_py(py, m))
            .transpose()
    }
    /// The record's msgpack bytes, as stored.
    #[getter]
    fn record_msgpack<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.record_msgpack())
    }
    /// The event as one JSON line: `{"time","tag","record"[,"metadata"]}`, as
    /// `claimcheck tail` prints it.
    fn to_json(&self) -> String {
        self.inner.to_json().to_string()
    }

    fn __repr__(&self) -> String {
        format!(
            "Event(tag={:?}, time={:?}, record={})",
            self.inner.tag(),
            self.inner.time().to_rfc3339(),
            self.inner.record_json()
        )
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<PyEvent>() {
            Ok(o) => o.get().inner == self.inner,
            Err(_) => false,
        }
    }
}

// --- sources ------------------------------------------------------------------------------

/// A Python file-like object (a boto3 `StreamingBody`, an open file) read in blocks with
/// `read(n)`. Its exception is kept for `__cause__`; the crate sees an I/O error, which it
/// reports as a failed transfer.
struct PyReader {
    file: Py<PyAny>,
    pending: Vec<u8>,
    at: usize,
    failed: Arc<Mutex<Option<PyErr>>>,
}

impl Read for PyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.pending.len() {
            self.at = 0;
            self.pending.clear();
            let want = buf.len().max(READ_BLOCK);
            let got = Python::attach(|py| -> PyResult<()> {
                let data = self.file.bind(py).call_method1("read", (want,))?;
                if let Ok(b) = data.cast::<PyBytes>() {
                    self.pending.extend_from_slice(b.as_bytes());
                } else {
                    let b: PyBackedBytes = data.extract()?;
                    self.pending.extend_from_slice(&b);
                }
                Ok(())
            });
            if let Err(e) = got {
                let message = e.to_string();
                *self.failed.lock().expect("not poisoned") = Some(e);
                return Err(io::Error::other(message));
            }
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Where stored bytes come from.
enum Source {
    /// Bytes already in memory: a `bytes` object, or the body of an inline pointer.
    Memory(Cursor<Body>),
    /// A file-like object, read as needed.
    File(PyReader),
}

enum Body {
    Python(PyBackedBytes),
    Rust(bytes::Bytes),
}

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        match self {
            Body::Python(b) => b,
            Body::Rust(b) => b,
        }
    }
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Memory(c) => c.read(buf),
            Source::File(r) => r.read(buf),
        }
    }
}

/// The source of `pointer`'s stored bytes: `None` for the pointer's inline body, bytes-like,
/// or a file-like object with `read`.
fn source(
    pointer: &Pointer,
    from: Option<&Bound<'_, PyAny>>,
    failed: &Arc<Mutex<Option<PyErr>>>,
) -> PyResult<Source> {
    match from {
        None => match &pointer.inline {
            Some(body) => Ok(Source::Memory(Cursor::new(Body::Rust(body.clone())))),
            None => Err(PyValueError::new_err(
                "this pointer names an S3 object: pass its body (bytes or a file object)",
            )),
        },
        Some(obj) if obj.hasattr("read")? => Ok(Source::File(PyReader {
            file: obj.clone().unbind(),
            pending: Vec::new(),
            at: 0,
            failed: failed.clone(),
        })),
        Some(obj) => {
            let bytes: PyBackedBytes = obj.extract().map_err(|_| {
                PyTypeError::new_err("a body is bytes, bytearray or a file object with read()")
            })?;
            Ok(Source::Memory(Cursor::new(Body::Python(bytes))))
        }
    }
}

fn failure(py: Python<'_>, e: Error, failed: &Mutex<Option<PyErr>>) -> PyErr {
    let cause = failed.lock().expect("not poisoned").take();
    raise(py, e, cause)
}

/// The whole stored body read from `src`: up to the pointer's `stored_bytes`, and the rest
/// only counted, so that a longer object is reported with its size (a shorter one fails the
/// crate's own size check on what was read).
fn read_stored(pointer: &Pointer, mut src: impl Read) -> Result<Vec<u8>, Error> {
    let transport = |e: io::Error| Error::S3 {
        operation: "GetObject body",
        source: Box::new(e),
    };
    let limit = usize::try_from(pointer.stored_bytes).unwrap_or(usize::MAX);
    let mut copy = Vec::with_capacity(limit.min(64 << 20));
    (&mut src)
        .take(pointer.stored_bytes)
        .read_to_end(&mut copy)
        .map_err(transport)?;
    let rest = io::copy(&mut src, &mut io::sink()).map_err(transport)?;
    if rest > 0 {
        return Err(Error::SizeMismatch {
            what: "stored object bytes",
            expected: pointer.stored_bytes,
            actual: copy.len() as u64 + rest,
        });
    }
    Ok(copy)
}

// --- functions ----------------------------------------------------------------------------

/// Reads a stored body to its end and makes every check (stored size, CRC32C, decompressed
/// size, event count), keeping no event. `body`: `None` for an inline pointer's own body,
/// bytes, or a file object (read in 64 KiB blocks).
#[pyfunction]
#[pyo3(signature = (pointer, body=None))]
fn verify(py: Python<'_>, pointer: &PyPointer, body: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    let failed = Arc::new(Mutex::new(None));
    let src = source(&pointer.inner, body, &failed)?;
    let p = &pointer.inner;
    py.detach(|| claimcheck_consumer::verify(p, src))
        .map_err(|e| failure(py, e, &failed))
}

/// Events of a stored body as they are decoded; the checks are made when the body ends and a
/// failure is raised then, after the events before it. `release`: an object whose `close()`
/// is called once the events end or are closed (the S3 response body).
#[pyfunction]
#[pyo3(signature = (pointer, body=None, *, release=None))]
fn decode(
    py: Python<'_>,
    pointer: Bound<'_, PyPointer>,
    body: Option<&Bound<'_, PyAny>>,
    release: Option<Py<PyAny>>,
) -> PyResult<Events> {
    let failed = Arc::new(Mutex::new(None));
    let src = source(&pointer.get().inner, body, &failed)?;
    Events::new(py, pointer, src, failed, release)
}

/// Verifies a stored body read once from `body`, keeping a copy of it, and returns its
/// events decoded from that copy: the object is read once and no event comes from a damaged
/// one. For bodies small enough to hold (the caller checks `stored_bytes`).
#[pyfunction]
fn verify_then_decode(
    py: Python<'_>,
    pointer: Bound<'_, PyPointer>,
    body: &Bound<'_, PyAny>,
) -> PyResult<Events> {
    let failed = Arc::new(Mutex::new(None));
    let p = &pointer.get().inner;
    let src = source(p, Some(body), &failed)?;
    let copy = py
        .detach(|| {
            let copy = read_stored(p, src)?;
            claimcheck_consumer::verify(p, &copy[..]).map(|()| copy)
        })
        .map_err(|e| failure(py, e, &failed))?;
    let body = Body::Rust(copy.into());
    Events::new(py, pointer, Source::Memory(Cursor::new(body)), failed, None)
}

/// Reads a stored body once, makes every check and decodes it in the same pass: the events
/// are handed out only if every check passed, and are held (with the decompressed body) until
/// they are. The quickest way through a body that fits in memory; `body` as for `verify`.
#[pyfunction]
#[pyo3(signature = (pointer, body=None))]
fn verified(
    py: Python<'_>,
    pointer: Bound<'_, PyPointer>,
    body: Option<&Bound<'_, PyAny>>,
) -> PyResult<Events> {
    let failed = Arc::new(Mutex::new(None));
    let p = &pointer.get().inner;
    let src = source(p, body, &failed)?;
    let events = py
        .detach(|| match src {
            Source::Memory(c) => claimcheck_consumer::verify_and_decode(p, c.get_ref().as_ref()),
            Source::File(file) => read_stored(p, file)
                .and_then(|copy| claimcheck_consumer::verify_and_decode(p, &copy)),
        })
        .map_err(|e| failure(py, e, &failed))?;
    Ok(Events::held(pointer, events, failed))
}

/// The events of one chunk, as a lazy iterator of `Event`.
///
/// `pointer` is the chunk's pointer. Iterate once; `close()` stops reading early (the rest
/// of an S3 object is then not read). Also a context manager that closes it.
#[pyclass(name = "Events", module = "claimcheck")]
struct Events {
    pointer: Py<PyPointer>,
    state: Mutex<State>,
    failed: Arc<Mutex<Option<PyErr>>>,
}

struct State {
    decoder: Option<Decoder<Source>>,
    batch: std::vec::IntoIter<Event>,
    spare: Vec<Event>,
    /// The last tag made into a Python string (the events of a chunk share one tag).
    tag: Option<(Box<str>, Py<PyString>)>,
    /// Closed once the events end (`close()` on a boto3 `StreamingBody`).
    release: Option<Py<PyAny>>,
    /// Every event was handed out and the body checked to its end.
    done: bool,
    /// The iteration ended (at the end, on an error or by `close()`): later calls end it
    /// again and leave `done` as it was.
    ended: bool,
}

impl State {
    fn event(&mut self, py: Python<'_>, inner: Event) -> PyEvent {
        let tag = match &self.tag {
            Some((name, tag)) if **name == *inner.tag() => tag.clone_ref(py),
            _ => {
                let tag = PyString::new(py, inner.tag()).unbind();
                self.tag = Some((inner.tag().into(), tag.clone_ref(py)));
                tag
            }
        };
        PyEvent { inner, tag }
    }

    /// Ends the iteration; what to close, once the lock is let go.
    fn end(&mut self) -> Option<Py<PyAny>> {
        self.ended = true;
        self.decoder = None;
        self.batch = Vec::new().into_iter();
        self.release.take()
    }
}

/// Closes a finished or broken stream; its errors do not matter any more.
fn release(py: Python<'_>, body: Option<Py<PyAny>>) {
    if let Some(body) = body {
        let _ = body.bind(py).call_method0("close");
    }
}

impl Events {
    fn new(
        py: Python<'_>,
        pointer: Bound<'_, PyPointer>,
        src: Source,
        failed: Arc<Mutex<Option<PyErr>>>,
        release: Option<Py<PyAny>>,
    ) -> PyResult<Events> {
        let decoder =
            Decoder::new(&pointer.get().inner, src).map_err(|e| failure(py, e, &failed))?;
        Ok(Events {
            pointer: pointer.unbind(),
            state: Mutex::new(State {
                decoder: Some(decoder),
                batch: Vec::new().into_iter(),
                spare: Vec::new(),
                tag: None,
                release,
                done: false,
                ended: false,
            }),
            failed,
        })
    }

    /// Events already decoded (and checked).
    fn held(
        pointer: Bound<'_, PyPointer>,
        events: Vec<Event>,
        failed: Arc<Mutex<Option<PyErr>>>,
    ) -> Events {
        Events {
            pointer: pointer.unbind(),
            state: Mutex::new(State {
                decoder: None,
                batch: events.into_iter(),
                spare: Vec::new(),
                tag: None,
                release: None,
                done: false,
                ended: false,
            }),
            failed,
        }
    }
}

#[pymethods]
impl Events {
    #[getter]
    fn pointer(&self, py: Python<'_>) -> Py<PyPointer> {
        self.pointer.clone_ref(py)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyEvent>> {
        // The lock is held while the GIL is released: another thread would wait for it
        // holding the GIL, which a file object's read may need. Refuse, as generators do.
        let Ok(mut state) = self.state.try_lock() else {
            return Err(PyValueError::new_err("events iterator already executing"));
        };
        let ended = loop {
            if let Some(event) = state.batch.next() {
                return Ok(Some(state.event(py, event)));
            }
            if state.ended {
                // After an error or `close()` the iteration stays short of done.
                return Ok(None);
            }
            let State { decoder, spare, .. } = &mut *state;
            let Some(d) = decoder.as_mut() else {
                break Ok(None);
            };
            spare.clear();
            match py.detach(|| d.next_batch(spare)) {
                Ok(true) => {
                    let batch = std::mem::take(spare);
                    state.batch = batch.into_iter();
                }
                Ok(false) => break Ok(None),
                Err(e) => break Err(failure(py, e, &self.failed)),
            }
        };
        state.done = matches!(ended, Ok(None));
        let body = state.end();
        drop(state);
        release(py, body);
        ended
    }

    /// True once the iteration reached its end: every event handed out, the body checked to
    /// its end. False before, after an error, and after `close()`.
    #[getter]
    fn done(&self) -> bool {
        self.state.try_lock().is_ok_and(|state| state.done)
    }

    /// Stops reading: the rest of the body is not read and nothing more is checked.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let Ok(mut state) = self.state.try_lock() else {
            return Err(PyValueError::new_err("events iterator already executing"));
        };
        let body = state.end();
        drop(state);
        release(py, body);
        Ok(())
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.close(py)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("Events({})", self.pointer.bind(py).repr()?))
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPointer>()?;
    m.add_class::<PyEvent>()?;
    m.add_class::<Events>()?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    m.add_function(wrap_pyfunction!(verify_then_decode, m)?)?;
    m.add_function(wrap_pyfunction!(verified, m)?)?;
    Ok(())
}
