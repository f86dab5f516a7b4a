//! Python face of the status snapshot store: `SnapshotStore` and `SnapshotReader`.
//!
//! `SnapshotStore` keeps the latest published status of one printer object in a
//! [`crate::snapshot::Store`] and serves `get_status(eventtime)` from it without calling into
//! the object: a few atomic loads and one shallow copy of the published top-level dict.
//!
//! Nobody can change what another reader sees:
//! - `publish` copies the status, and replaces nested dicts and lists (at any depth) by
//!   `kflash.snapshot.ReadOnlyDict` / `ReadOnlyList`: dict and list subclasses that read like
//!   their base (json, `==`, iteration, `copy.deepcopy`, Jinja) and raise `TypeError` on any
//!   change. Tuples holding such values are rebuilt (namedtuples keep their type).
//! - `get_status` returns a fresh top-level dict per call (what the stock method returns;
//!   klippy's own readers, such as `PrinterExtruder.get_status`, add keys to it): changing
//!   it touches only the caller's copy, and its nested values refuse changes.
//!   A store configured with a print-time clock recomputes that field in the copy for the
//!   caller's eventtime.
//!
//! Optional: a `fallback` callable consulted when the snapshot is missing, invalidated or older
//! than `max_age` (by eventtime); and a shared-memory mirror (`shm_path`) written on every
//! publish as JSON, read by `SnapshotReader` in any process. A mirror write that fails (a full
//! tmpfs, the file taken over by another process) turns the mirror off: that publish raises
//! the error once, later ones no longer touch the file, and `mirror_error` says why.
//!
//! Thread-safety: the class is frozen; readers never take a lock. Publishers serialise on the
//! mirror's mutex (held while the JSON bytes are written to the file).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::{MutexExt, PyOnceLock};
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple, PyType};

use crate::snapshot::shm::{ShmReader, ShmWriter};
use crate::snapshot::{Snapshot, Store};

/// The shared-memory mirror of a store: its writer while on, why it went off.
struct Mirror {
    writer: Option<ShmWriter>,
    error: Option<String>,
}

/// What a snapshot holds: the published dict and whether it carries the print-time field.
struct Entry {
    dict: Py<PyDict>,
    has_clock_field: bool,
}

/// A field recomputed per call from a Klipper `ClockSync`-like object
/// (`clock_est = (sample_time, clock, freq)`, `mcu_freq`), the way
/// `mcu.estimated_print_time(eventtime)` computes it.
struct PrintClock {
    field: Py<PyString>,
    source: Py<PyAny>,
}

impl PrintClock {
    fn value(&self, py: Python<'_>, eventtime: f64) -> PyResult<f64> {
        let source = self.source.bind(py);
        let est = source.getattr(intern!(py, "clock_est"))?;
        let est = est.cast::<PyTuple>()?;
        let sample_time: f64 = est.get_borrowed_item(0)?.extract()?;
        let clock: f64 = est.get_borrowed_item(1)?.extract()?;
        let freq: f64 = est.get_borrowed_item(2)?.extract()?;
        let mcu_freq: f64 = source.getattr(intern!(py, "mcu_freq"))?.extract()?;
        // Same operations in the same order as Klipper: int(clock + (t - st) * f) / mcu_freq
        // (int() truncates toward zero; the truncated value is exact as a double).
        Ok((clock + (eventtime - sample_time) * freq).trunc() / mcu_freq)
    }
}

/// The read-only container types (`kflash.snapshot`), imported on first use.
static READ_ONLY_DICT: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static READ_ONLY_LIST: PyOnceLock<Py<PyType>> = PyOnceLock::new();

struct ReadOnlyTypes<'py> {
    dict: &'py Bound<'py, PyType>,
    list: &'py Bound<'py, PyType>,
}

impl<'py> ReadOnlyTypes<'py> {
    fn get(py: Python<'py>) -> PyResult<Self> {
        Ok(ReadOnlyTypes {
            dict: READ_ONLY_DICT.import(py, "kflash.snapshot", "ReadOnlyDict")?,
            list: READ_ONLY_LIST.import(py, "kflash.snapshot", "ReadOnlyList")?,
        })
    }

    /// `value` with every dict and list in it (at any depth up to [`MAX_DEPTH`]) replaced by
    /// its read-only kind; the same object when nothing in it can change.
    fn freeze(&self, value: &Bound<'py, PyAny>, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        let py = value.py();
        if depth >= MAX_DEPTH || value.is_instance(self.dict)? || value.is_instance(self.list)? {
            return Ok(value.clone());
        }
        if let Ok(dict) = value.cast::<PyDict>() {
            let out = PyDict::new(py);
            for (k, v) in dict.iter() {
                out.set_item(k, self.freeze(&v, depth + 1)?)?;
            }
            return self.dict.call1((out,));
        }
        if let Ok(list) = value.cast::<PyList>() {
            let items = list
                .iter()
                .map(|v| self.freeze(&v, depth + 1))
                .collect::<PyResult<Vec<_>>>()?;
            return self.list.call1((PyList::new(py, items)?,));
        }
        if let Ok(tuple) = value.cast::<PyTuple>() {
            let items = tuple
                .iter()
                .map(|v| self.freeze(&v, depth + 1))
                .collect::<PyResult<Vec<_>>>()?;
            if items.iter().zip(tuple.iter()).all(|(a, b)| a.is(&b)) {
                return Ok(value.clone());
            }
            let rebuilt = PyTuple::new(py, items)?;
            let kind = value.get_type();
            if kind.is(py.get_type::<PyTuple>()) {
                return Ok(rebuilt.into_any());
            }
            // A namedtuple (Klipper's Coord) keeps its type.
            return match kind.getattr(intern!(py, "_make")) {
                Ok(make) => make.call1((rebuilt,)),
                Err(_) => Ok(rebuilt.into_any()),
            };
        }
        Ok(value.clone())
    }

    /// A published top-level dict: a plain dict (copied per read) whose values are frozen.
    fn publishable(&self, status: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(status.py());
        for (k, v) in status.iter() {
            out.set_item(k, self.freeze(&v, 1)?)?;
        }
        Ok(out)
    }
}

/// The latest status of one printer object, published by a reactor timer and read in O(1).
///
/// `SnapshotStore(shm_path=None, *, fallback=None, max_age=None, print_time_clock=None,
/// print_time_field="estimated_print_time")`
///
/// - `publish(status, eventtime)` stores a copy of `status` as the new snapshot (version + 1;
///   nested dicts and lists become read-only) and, with `shm_path`, mirrors it as JSON into
///   that shared-memory file (see `mirror_error`).
/// - `get_status(eventtime)` returns a fresh dict of the snapshot's fields (the caller's own;
///   nested dicts and lists in it are shared and read-only). With `print_time_clock` its
///   `print_time_field` is recomputed for `eventtime` from the clock object (Klipper's
///   `ClockSync`: `clock_est`, `mcu_freq`).
/// - With `fallback`, `get_status` calls `fallback(eventtime)` instead when nothing was
///   published, the snapshot was `invalidate()`d, or it is older than `max_age` seconds of
///   eventtime. A dict it returns is published and served; `None` means "serve what you have"
///   (an empty dict if nothing was ever published).
#[pyclass(frozen, module = "kflash._core")]
pub struct SnapshotStore {
    store: Store<Entry>,
    mirror: Mutex<Mirror>,
    shm_path: Option<PathBuf>,
    fallback: Option<Py<PyAny>>,
    max_age: f64,
    clock: Option<PrintClock>,
}

impl SnapshotStore {
    fn is_fresh(&self, snap: &Snapshot<Entry>, eventtime: f64) -> bool {
        self.fallback.is_none()
            || (self.store.is_current(snap) && eventtime - snap.eventtime <= self.max_age)
    }

    fn serve<'py>(
        &self,
        py: Python<'py>,
        snap: &Snapshot<Entry>,
        eventtime: f64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let dict = snap.payload.dict.bind(py).copy()?;
        if let Some(clock) = &self.clock {
            if snap.payload.has_clock_field {
                let value = clock.value(py, eventtime)?;
                dict.set_item(clock.field.bind(py), PyFloat::new(py, value))?;
            }
        }
        Ok(dict)
    }

    fn publish_dict(
        &self,
        py: Python<'_>,
        status: &Bound<'_, PyDict>,
        eventtime: f64,
        generation: u64,
    ) -> PyResult<u64> {
        let dict = ReadOnlyTypes::get(py)?.publishable(status)?;
        let has_clock_field = match &self.clock {
            Some(clock) => dict.contains(clock.field.bind(py))?,
            None => false,
        };
        let entry = Entry {
            dict: dict.unbind(),
            has_clock_field,
        };
        // Serialise before taking the lock: str() of a value may run Python code.
        let mirror_on = self
            .mirror
            .lock_py_attached(py)
            .unwrap_or_else(PoisonError::into_inner)
            .writer
            .is_some();
        let json = if mirror_on {
            let mut out = String::with_capacity(1024);
            write_json(&mut out, status.as_any(), 0)?;
            Some(out)
        } else {
            None
        };
        // The mirror lock also orders publishes, so the file never goes back a version. It
        // is waited for with the GIL released (no deadlock with a holder that needs it), and
        // the snapshot it replaces is dropped only after it is released (a dict dealloc can
        // run Python code).
        let mut mirror = self
            .mirror
            .lock_py_attached(py)
            .unwrap_or_else(PoisonError::into_inner);
        let previous = self.store.latest();
        let snap = self.store.publish_as_of(entry, eventtime, generation);
        let written = match (mirror.writer.as_mut(), json) {
            (Some(writer), Some(json)) => writer.publish(snap.version, eventtime, json.as_bytes()),
            _ => Ok(()),
        };
        if let Err(e) = &written {
            // The mirror turns itself off: the in-process store goes on, the file is no
            // longer touched, and this publish tells the caller (once).
            mirror.writer = None;
            mirror.error = Some(e.to_string());
        }
        drop(mirror);
        drop(previous);
        written?;
        Ok(snap.version)
    }

    fn status_without_eventtime<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if let Some(fallback) = &self.fallback {
            let fresh = fallback.bind(py).call1((py.None(),))?;
            if !fresh.is_none() {
                return Ok(fresh);
            }
        }
        Ok(match self.store.latest() {
            Some(snap) => snap.payload.dict.bind(py).copy()?.into_any(),
            None => PyDict::new(py).into_any(),
        })
    }

    fn refresh<'py>(&self, py: Python<'py>, eventtime: f64) -> PyResult<Bound<'py, PyDict>> {
        if let Some(fallback) = &self.fallback {
            let generation = self.store.generation();
            let fresh = fallback.bind(py).call1((eventtime,))?;
            if !fresh.is_none() {
                let fresh = fresh.cast_into::<PyDict>().map_err(|e| {
                    PyTypeError::new_err(format!(
                        "snapshot fallback must return a dict or None, not {}",
                        e.into_inner().get_type()
                    ))
                })?;
                self.publish_dict(py, &fresh, eventtime, generation)?;
            }
        }
        match self.store.latest() {
            Some(snap) => self.serve(py, &snap, eventtime),
            None => Ok(PyDict::new(py)),
        }
    }
}

#[pymethods]
impl SnapshotStore {
    #[new]
    #[pyo3(signature = (shm_path=None, *, fallback=None, max_age=None, print_time_clock=None,
                        print_time_field="estimated_print_time"))]
    fn new(
        py: Python<'_>,
        shm_path: Option<PathBuf>,
        fallback: Option<Py<PyAny>>,
        max_age: Option<f64>,
        print_time_clock: Option<Py<PyAny>>,
        print_time_field: &str,
    ) -> PyResult<Self> {
        if let Some(f) = &fallback {
            if !f.bind(py).is_callable() {
                return Err(PyTypeError::new_err("fallback must be callable"));
            }
        }
        let max_age = match max_age {
            Some(a) if a.is_nan() || a < 0.0 => {
                return Err(PyValueError::new_err(format!(
                    "max_age must be a non-negative number of seconds, got {a}"
                )))
            }
            Some(a) => a,
            None => f64::INFINITY,
        };
        let writer = shm_path.as_ref().map(ShmWriter::create).transpose()?;
        let mirror = Mirror {
            writer,
            error: None,
        };
        let clock = print_time_clock.map(|source| PrintClock {
            field: PyString::intern(py, print_time_field).unbind(),
            source,
        });
        Ok(SnapshotStore {
            store: Store::new(),
            mirror: Mutex::new(mirror),
            shm_path,
            fallback,
            max_age,
            clock,
        })
    }

    /// Publishes a copy of `status` (taken at `eventtime`) as the new snapshot and returns its
    /// version. The caller may keep using `status`; the store never mutates it. Raises
    /// `KflashError` (once) when the mirror cannot be written; the mirror is then off.
    fn publish(&self, py: Python<'_>, status: &Bound<'_, PyDict>, eventtime: f64) -> PyResult<u64> {
        if !eventtime.is_finite() {
            return Err(PyValueError::new_err(format!(
                "eventtime must be a finite number, got {eventtime}"
            )));
        }
        let generation = self.store.generation();
        self.publish_dict(py, status, eventtime, generation)
    }

    /// The latest status for `eventtime`: a fresh dict of the published fields (with a
    /// print-time clock, that field recomputed). See the class doc for `fallback`.
    ///
    /// `get_status()` / `get_status(None)` (Klipper modules call some objects' method that
    /// way for their own logic) asks `fallback(None)` and returns its answer unpublished;
    /// without a fallback, or if it answers None, the snapshot is returned as published.
    #[pyo3(signature = (eventtime=None))]
    fn get_status<'py>(
        &self,
        py: Python<'py>,
        eventtime: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let Some(eventtime) = eventtime else {
            return self.status_without_eventtime(py);
        };
        let served = self.store.peek(|snap| match snap {
            Some(snap) if self.is_fresh(snap, eventtime) => Some(self.serve(py, snap, eventtime)),
            _ => None,
        });
        match served {
            Some(result) => result.map(Bound::into_any),
            None => self.refresh(py, eventtime).map(Bound::into_any),
        }
    }

    /// Marks the snapshot outdated: the next `get_status` consults the fallback (if any).
    fn invalidate(&self) {
        self.store.invalidate();
    }

    /// Version of the latest snapshot (0 before the first publish).
    #[getter]
    fn version(&self) -> u64 {
        self.store.version()
    }

    /// Seconds since the latest publish (monotonic clock), None before the first.
    #[getter]
    fn age(&self) -> Option<f64> {
        self.store.age().map(|d| d.as_secs_f64())
    }

    /// The eventtime of the latest snapshot, None before the first.
    #[getter]
    fn eventtime(&self) -> Option<f64> {
        self.store.peek(|s| s.map(|s| s.eventtime))
    }

    /// Whether the latest snapshot exists and was not invalidated since it was taken.
    #[getter]
    fn current(&self) -> bool {
        self.store
            .peek(|s| s.is_some_and(|s| self.store.is_current(s)))
    }

    /// The shared-memory mirror file, if any.
    #[getter]
    fn shm_path(&self) -> Option<PathBuf> {
        self.shm_path.clone()
    }

    /// Why the mirror turned itself off (None while it works, or without a mirror).
    #[getter]
    fn mirror_error(&self, py: Python<'_>) -> Option<String> {
        self.mirror
            .lock_py_attached(py)
            .unwrap_or_else(PoisonError::into_inner)
            .error
            .clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "SnapshotStore(version={}, shm_path={:?})",
            self.store.version(),
            self.shm_path
        )
    }
}

/// Reads a status snapshot mirror file written by a `SnapshotStore(shm_path=...)`, possibly in
/// another process. `read()` returns `(version, eventtime, age_seconds, json_bytes)` or None
/// when nothing was published yet; it never blocks the writer.
#[pyclass(frozen, module = "kflash._core")]
pub struct SnapshotReader {
    reader: Mutex<ShmReader>,
}

#[pymethods]
impl SnapshotReader {
    #[new]
    fn new(path: PathBuf) -> PyResult<Self> {
        Ok(SnapshotReader {
            reader: Mutex::new(ShmReader::open(path)?),
        })
    }

    /// `(version, eventtime, age_seconds, json_bytes)` of the latest snapshot, or None.
    #[allow(clippy::type_complexity)]
    fn read<'py>(&self, py: Python<'py>) -> PyResult<Option<(u64, f64, f64, Bound<'py, PyBytes>)>> {
        let reading = py.detach(|| {
            let mut reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
            reader.read()
        })?;
        Ok(reading.map(|r| {
            (
                r.version,
                r.eventtime,
                r.age().as_secs_f64(),
                PyBytes::new(py, &r.payload),
            )
        }))
    }

    /// The mirror file this reader maps.
    #[getter]
    fn path(&self) -> PathBuf {
        self.reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .path()
            .to_path_buf()
    }
}

/// Deepest nesting the mirror serialises (deeper values become their `str()`).
const MAX_DEPTH: usize = 32;

fn write_json_str(out: &mut String, s: &str) {
    // serde_json's escaping; writing into a String cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

/// Serialises a status value as JSON: dicts, lists, tuples (Klipper's `Coord`), str, int,
/// float (non-finite -> null), bool, None; anything else as its `str()`.
fn write_json(out: &mut String, obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<()> {
    if obj.is_none() {
        out.push_str("null");
    } else if let Ok(b) = obj.cast::<PyBool>() {
        out.push_str(if b.is_true() { "true" } else { "false" });
    } else if let Ok(f) = obj.cast::<PyFloat>() {
        let v = f.value();
        if v.is_finite() {
            let _ = write!(out, "{v:?}");
        } else {
            out.push_str("null");
        }
    } else if obj.is_instance_of::<PyInt>() {
        if let Ok(v) = obj.extract::<i64>() {
            let _ = write!(out, "{v}");
        } else {
            out.push_str(&obj.str()?.to_cow()?);
        }
    } else if let Ok(s) = obj.cast::<PyString>() {
        write_json_str(out, &s.to_cow()?);
    } else if depth >= MAX_DEPTH {
        write_json_str(out, &obj.str()?.to_cow()?);
    } else if let Ok(d) = obj.cast::<PyDict>() {
        out.push('{');
        for (i, (k, v)) in d.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            match k.cast::<PyString>() {
                Ok(s) => write_json_str(out, &s.to_cow()?),
                Err(_) => write_json_str(out, &k.str()?.to_cow()?),
            }
            out.push(':');
            write_json(out, &v, depth + 1)?;
        }
        out.push('}');
    } else if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        out.push('[');
        for (i, item) in obj.try_iter()?.enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_json(out, &item?, depth + 1)?;
        }
        out.push(']');
    } else {
        write_json_str(out, &obj.str()?.to_cow()?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(py: Python<'_>, code: &std::ffi::CStr) -> (String, serde_json::Value) {
        let value = py.eval(code, None, None).unwrap();
        let mut out = String::new();
        write_json(&mut out, &value, 0).unwrap();
        let parsed = serde_json::from_str(&out).unwrap();
        (out, parsed)
    }

    #[test]
    fn status_values_serialise_as_json() {
        Python::initialize();
        Python::attach(|py| {
            let (raw, v) = json_of(
                py,
                c"{'a': (1.5, -2, True), 'b': None, 'c': 'x\"y', 'd': float('nan'), 7: [2**70]}",
            );
            assert_eq!(v["a"], serde_json::json!([1.5, -2, true]));
            assert!(v["b"].is_null());
            assert_eq!(v["c"], "x\"y");
            assert!(v["d"].is_null());
            assert!(v["7"].is_array());
            assert!(raw.contains("[1180591620717411303424]"), "{raw}");
        });
    }
}
