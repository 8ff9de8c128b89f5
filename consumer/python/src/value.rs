//! msgpack values as Python objects, built straight from the stored bytes of a record.
//!
//! Records of one stream repeat the same map keys in every event (an access log has the same
//! eight keys in every line), so map keys that are short strings come from a cache shared by
//! every record this module converts: one `str` per distinct key, with its hash already
//! computed, instead of a new `str` per key per record.

use std::collections::HashMap;
use std::sync::Mutex;

use claimcheck_consumer::EventTime;
use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyList, PyString, PyTuple};
use rmp::Marker;

/// Keys longer than this are not cached: names, not data.
const MAX_CACHED_KEY_BYTES: usize = 64;
/// Distinct keys cached at most; past that the cache starts afresh, so that a stream whose
/// keys are data (ids as keys) costs a few lookups, never memory.
const MAX_CACHED_KEYS: usize = 4096;

/// Map keys as stored, and as Python strings.
#[derive(Default)]
struct Keys {
    /// Each key's bytes and string, in the order first seen.
    seen: Vec<(Box<[u8]>, Py<PyString>)>,
    /// Where each key is in `seen`.
    index: HashMap<Box<[u8]>, usize, foldhash::fast::RandomState>,
    /// Where the key after the last one found probably is: the records of a stream list
    /// their keys in the same order, so this is usually right, and one comparison instead of
    /// a hash and a lookup.
    next: usize,
}

impl Keys {
    fn get(&mut self, bytes: &[u8]) -> Option<&Py<PyString>> {
        let at = match self.seen.get(self.next) {
            Some((key, _)) if **key == *bytes => self.next,
            _ => *self.index.get(bytes)?,
        };
        self.next = at + 1;
        Some(&self.seen[at].1)
    }

    fn insert(&mut self, bytes: &[u8], s: Py<PyString>) {
        if self.seen.len() >= MAX_CACHED_KEYS {
            self.seen.clear();
            self.index.clear();
        }
        self.index.insert(bytes.into(), self.seen.len());
        self.seen.push((bytes.into(), s));
        self.next = self.seen.len();
    }
}

/// The map keys seen so far.
static KEYS: Mutex<Option<Keys>> = Mutex::new(None);

struct Cached {
    epoch: Py<PyAny>,
    timedelta: Py<PyAny>,
}

static CACHED: PyOnceLock<Cached> = PyOnceLock::new();

fn cached(py: Python<'_>) -> PyResult<&Cached> {
    CACHED.get_or_try_init(py, || {
        let datetime = py.import("datetime")?;
        let utc = datetime.getattr("timezone")?.getattr("utc")?;
        let epoch = datetime
            .getattr("datetime")?
            .call((1970, 1, 1, 0, 0, 0, 0, utc), None)?;
        Ok(Cached {
            epoch: epoch.unbind(),
            timedelta: datetime.getattr("timedelta")?.unbind(),
        })
    })
}

/// The seconds of `datetime`'s range in UTC: 0001-01-01T00:00:00 to 9999-12-31T23:59:59.
const DATETIME_SECS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

/// A timezone-aware UTC `datetime` (microseconds: the nanoseconds are cut); `None` for a time
/// outside `datetime`'s years 1 to 9999, which any sender may write.
pub(crate) fn to_datetime<'py>(
    py: Python<'py>,
    t: EventTime,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    // Nanoseconds past a whole second (a timestamp's are < 10^9, EventTime's are not checked)
    // may carry the time past the last second.
    let secs = t.secs.checked_add(i64::from(t.nanos / 1_000_000_000));
    if !secs.is_some_and(|s| DATETIME_SECS.contains(&s)) {
        return Ok(None);
    }
    let c = cached(py)?;
    let delta = c.timedelta.bind(py).call1((0, t.secs, t.nanos / 1000))?;
    c.epoch.bind(py).call_method1("__add__", (delta,)).map(Some)
}

/// One msgpack value (a record, or Fluent Bit metadata) as Python: nil → None, bool, int,
/// float, str (invalid UTF-8 replaced), bin → bytes, array → list, map → dict (array keys →
/// tuples, keys that still cannot be dict keys → their `repr`), EventTime and timestamp
/// extensions → UTC `datetime` (within its years 1 to 9999), other extensions →
/// `{"ext": type, "data": bytes}`.
///
/// `msgpack` is one whole value, as the decoder checked it when the event was made (its
/// nesting is bounded, so the recursion is too); anything else raises `ValueError`.
pub(crate) fn to_py<'py>(py: Python<'py>, msgpack: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    // `try_lock`: converting allocates, which may run a finalizer that converts another
    // record on this thread; that one goes without the cache rather than deadlock.
    let mut guard = KEYS.try_lock().ok();
    let keys = guard
        .as_deref_mut()
        .map(|k| k.get_or_insert_with(Keys::default));
    let mut c = Converter { py, keys };
    let mut rest = msgpack;
    let value = c.value(&mut rest)?;
    if !rest.is_empty() {
        return Err(malformed());
    }
    Ok(value)
}

fn malformed() -> PyErr {
    PyValueError::new_err("malformed msgpack value")
}

struct Converter<'py, 'k> {
    py: Python<'py>,
    keys: Option<&'k mut Keys>,
}

/// The first `n` bytes of `rd`, which moves past them.
fn take<'a>(rd: &mut &'a [u8], n: usize) -> PyResult<&'a [u8]> {
    if rd.len() < n {
        return Err(malformed());
    }
    let (head, tail) = rd.split_at(n);
    *rd = tail;
    Ok(head)
}

fn be<const N: usize>(rd: &mut &[u8]) -> PyResult<[u8; N]> {
    Ok(take(rd, N)?.try_into().expect("N bytes"))
}

/// A length of 1, 2 or 4 bytes.
fn len(rd: &mut &[u8], bytes: usize) -> PyResult<usize> {
    Ok(match bytes {
        1 => usize::from(be::<1>(rd)?[0]),
        2 => usize::from(u16::from_be_bytes(be(rd)?)),
        _ => u32::from_be_bytes(be(rd)?) as usize,
    })
}

/// A msgpack string as Python: invalid UTF-8 is replaced (U+FFFD), as `bytes.decode(errors=
/// "replace")` does. CPython's decoder checks and converts in one pass.
fn new_str<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let len = ffi::Py_ssize_t::try_from(bytes.len()).map_err(|_| malformed())?;
    // SAFETY: the pointer and length describe `bytes`, which CPython only reads; the errors
    // argument is a NUL-terminated string; the result is a new reference or NULL with an
    // exception set, which `from_owned_ptr_or_err` takes either way.
    unsafe {
        let s = ffi::PyUnicode_DecodeUTF8(bytes.as_ptr().cast(), len, c"replace".as_ptr());
        Bound::from_owned_ptr_or_err(py, s)
    }
}

/// What kind of value a map key is, once converted.
enum Key<'py> {
    Str(Bound<'py, PyAny>),
    Other(Bound<'py, PyAny>),
}

impl<'py> Converter<'py, '_> {
    fn value(&mut self, rd: &mut &[u8]) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let marker = Marker::from_u8(be::<1>(rd)?[0]);
        Ok(match marker {
            Marker::Null | Marker::Reserved => py.None().into_bound(py),
            Marker::True => true.into_pyobject(py)?.to_owned().into_any(),
            Marker::False => false.into_pyobject(py)?.to_owned().into_any(),
            Marker::FixPos(n) => n.into_pyobject(py)?.into_any(),
            Marker::FixNeg(n) => n.into_pyobject(py)?.into_any(),
            Marker::U8 => be::<1>(rd)?[0].into_pyobject(py)?.into_any(),
            Marker::U16 => u16::from_be_bytes(be(rd)?).into_pyobject(py)?.into_any(),
            Marker::U32 => u32::from_be_bytes(be(rd)?).into_pyobject(py)?.into_any(),
            Marker::U64 => u64::from_be_bytes(be(rd)?).into_pyobject(py)?.into_any(),
            Marker::I8 => i8::from_be_bytes(be(rd)?).into_pyobject(py)?.into_any(),
            Marker::I16 => i16::from_be_bytes(be(rd)?).into_pyobject(py)?.into_any(),
            Marker::I32 => i32::from_be_bytes(be(rd)?).into_pyobject(py)?.into_any(),
            Marker::I64 => i64::from_be_bytes(be(rd)?).into_pyobject(py)?.into_any(),
            Marker::F32 => PyFloat::new(py, f32::from_be_bytes(be(rd)?).into()).into_any(),
            Marker::F64 => PyFloat::new(py, f64::from_be_bytes(be(rd)?)).into_any(),
            Marker::FixStr(n) => new_str(self.py, take(rd, n.into())?)?,
            Marker::Str8 => self.str_of(rd, 1)?,
            Marker::Str16 => self.str_of(rd, 2)?,
            Marker::Str32 => self.str_of(rd, 4)?,
            Marker::Bin8 => self.bin_of(rd, 1)?,
            Marker::Bin16 => self.bin_of(rd, 2)?,
            Marker::Bin32 => self.bin_of(rd, 4)?,
            Marker::FixArray(n) => self.list(rd, n.into())?.into_any(),
            Marker::Array16 => {
                let n = len(rd, 2)?;
                self.list(rd, n)?.into_any()
            }
            Marker::Array32 => {
                let n = len(rd, 4)?;
                self.list(rd, n)?.into_any()
            }
            Marker::FixMap(n) => self.dict(rd, n.into())?,
            Marker::Map16 => {
                let n = len(rd, 2)?;
                self.dict(rd, n)?
            }
            Marker::Map32 => {
                let n = len(rd, 4)?;
                self.dict(rd, n)?
            }
            Marker::FixExt1 => self.ext(rd, 1)?,
            Marker::FixExt2 => self.ext(rd, 2)?,
            Marker::FixExt4 => self.ext(rd, 4)?,
            Marker::FixExt8 => self.ext(rd, 8)?,
            Marker::FixExt16 => self.ext(rd, 16)?,
            Marker::Ext8 => {
                let n = len(rd, 1)?;
                self.ext(rd, n)?
            }
            Marker::Ext16 => {
                let n = len(rd, 2)?;
                self.ext(rd, n)?
            }
            Marker::Ext32 => {
                let n = len(rd, 4)?;
                self.ext(rd, n)?
            }
        })
    }

    fn str_of(&self, rd: &mut &[u8], len_bytes: usize) -> PyResult<Bound<'py, PyAny>> {
        let n = len(rd, len_bytes)?;
        new_str(self.py, take(rd, n)?)
    }

    fn bin_of(&self, rd: &mut &[u8], len_bytes: usize) -> PyResult<Bound<'py, PyAny>> {
        let n = len(rd, len_bytes)?;
        Ok(PyBytes::new(self.py, take(rd, n)?).into_any())
    }

    fn list(&mut self, rd: &mut &[u8], n: usize) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(self.py);
        for _ in 0..n {
            list.append(self.value(rd)?)?;
        }
        Ok(list)
    }

    fn dict(&mut self, rd: &mut &[u8], n: usize) -> PyResult<Bound<'py, PyAny>> {
        let dict = PyDict::new(self.py);
        for _ in 0..n {
            let key = self.key(rd)?;
            let value = self.value(rd)?;
            match key {
                Key::Str(key) => dict.set_item(key, value)?,
                Key::Other(key) if key.hash().is_ok() => dict.set_item(key, value)?,
                Key::Other(key) => dict.set_item(key.repr()?, value)?,
            }
        }
        Ok(dict.into_any())
    }

    /// A map key: strings from the cache, arrays as tuples (hashable when their items are).
    fn key(&mut self, rd: &mut &[u8]) -> PyResult<Key<'py>> {
        let py = self.py;
        let first = *rd.first().ok_or_else(malformed)?;
        let n = match Marker::from_u8(first) {
            Marker::FixStr(n) => {
                *rd = &rd[1..];
                usize::from(n)
            }
            Marker::Str8 => {
                *rd = &rd[1..];
                len(rd, 1)?
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let list = self.value(rd)?;
                let tuple = PyTuple::new(py, list.cast::<PyList>()?.iter())?;
                return Ok(Key::Other(tuple.into_any()));
            }
            _ => return Ok(Key::Other(self.value(rd)?)),
        };
        let bytes = take(rd, n)?;
        let Some(keys) = self.keys.as_deref_mut() else {
            return Ok(Key::Str(new_str(py, bytes)?));
        };
        if let Some(s) = keys.get(bytes) {
            return Ok(Key::Str(s.bind(py).clone().into_any()));
        }
        let s = new_str(py, bytes)?;
        if n <= MAX_CACHED_KEY_BYTES {
            // The hash is computed once here, and kept by the string.
            s.hash()?;
            keys.insert(bytes, s.cast::<PyString>()?.clone().unbind());
        }
        Ok(Key::Str(s))
    }

    fn ext(&self, rd: &mut &[u8], n: usize) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let ty = i8::from_be_bytes(be(rd)?);
        let data = take(rd, n)?;
        // A time outside `datetime`'s range stays an extension, as any other.
        match ext_time(ty, data)
            .map(|t| to_datetime(py, t))
            .transpose()?
            .flatten()
        {
            Some(datetime) => Ok(datetime),
            None => {
                let dict = PyDict::new(py);
                dict.set_item("ext", ty)?;
                dict.set_item("data", PyBytes::new(py, data))?;
                Ok(dict.into_any())
            }
        }
    }
}

/// Fluentd's EventTime (ext 0, 8 bytes) or the msgpack timestamp (ext -1, 4, 8 or 12 bytes).
fn ext_time(ty: i8, data: &[u8]) -> Option<EventTime> {
    match (ty, data.len()) {
        (0, 8) => Some(EventTime::new(
            i64::from(u32::from_be_bytes(data[..4].try_into().ok()?)),
            u32::from_be_bytes(data[4..].try_into().ok()?),
        )),
        (-1, 4) => Some(EventTime::new(
            i64::from(u32::from_be_bytes(data.try_into().ok()?)),
            0,
        )),
        (-1, 8) => {
            let v = u64::from_be_bytes(data.try_into().ok()?);
            Some(EventTime::new((v & 0x3_ffff_ffff) as i64, (v >> 34) as u32))
        }
        (-1, 12) => Some(EventTime::new(
            i64::from_be_bytes(data[4..].try_into().ok()?),
            u32::from_be_bytes(data[..4].try_into().ok()?),
        )),
        _ => None,
    }
}
