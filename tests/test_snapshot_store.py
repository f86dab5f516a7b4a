"""kflash.SnapshotStore and the shared-memory mirror, from Python."""

import collections
import json
import multiprocessing
import threading
import time

import pytest
from klippy.clocksync import ClockSync

import kflash
from kflash import snapshot

Coord = collections.namedtuple("Coord", ("x", "y", "z", "e"))


def status(version, width=8):
    """A status whose consistency a reader can check: every field == version."""
    return {f"f{i}": version for i in range(width)}


def test_get_status_serves_the_latest_publish():
    store = kflash.SnapshotStore()
    assert store.version == 0
    assert store.age is None and store.eventtime is None
    assert store.get_status(1.0) == {}
    assert store.publish({"position": (1.0, 2.0, 3.0, 0.0)}, 10.0) == 1
    assert store.publish({"position": (4.0, 5.0, 6.0, 0.0)}, 10.1) == 2
    assert store.get_status(10.2) == {"position": (4.0, 5.0, 6.0, 0.0)}
    assert store.version == 2
    assert store.eventtime == 10.1
    assert 0.0 <= store.age < 5.0


def test_the_publisher_cannot_change_a_published_status():
    store = kflash.SnapshotStore()
    source = {"homed_axes": "", "limits": [0.0, 200.0], "info": {"layer": 1}}
    store.publish(source, 1.0)
    source["homed_axes"] = "xyz"  # the object mutates its own dict later
    source["limits"].append(300.0)
    source["info"]["layer"] = 2
    assert store.get_status(3.0) == {
        "homed_axes": "",
        "limits": [0.0, 200.0],
        "info": {"layer": 1},
    }, "a publish is a deep enough copy"
    store.publish(source, 4.0)
    assert store.get_status(4.0)["homed_axes"] == "xyz"


def test_a_reader_cannot_change_what_other_readers_see():
    """Stock toolhead returns a fresh dict per call: a reader may change its copy
    (klippy's own PrinterExtruder.get_status adds keys to its heater's status); it
    must never reach the next reader, nor webhooks' copy."""
    store = kflash.SnapshotStore()
    store.publish(
        {
            "position": Coord(1.0, 2.0, 3.0, 0.0),
            "available": ["extruder", "heater_bed"],
            "info": {"layers": [1, 2], "name": "x"},
        },
        1.0,
    )
    mine = store.get_status(2.0)
    mine["position"] = (9.0, 9.0, 9.0, 9.0)  # the caller's own copy
    mine["can_extrude"] = True
    del mine["info"]
    theirs = store.get_status(2.0)
    assert theirs is not mine
    assert theirs["position"] == (1.0, 2.0, 3.0, 0.0)
    assert "can_extrude" not in theirs and "info" in theirs
    # Nested values are shared, so they refuse every change.
    nested_changes = [
        lambda s: s["available"].append("x"),
        lambda s: s["available"].__setitem__(0, "x"),
        lambda s: s["available"].sort(),
        lambda s: s["available"].extend(["x"]),
        lambda s: s["available"].pop(),
        lambda s: s["available"].__iadd__(["x"]),
        lambda s: s["info"].__setitem__("name", "y"),
        lambda s: s["info"].update(name="y"),
        lambda s: s["info"].pop("name"),
        lambda s: s["info"].setdefault("new", 1),
        lambda s: s["info"].clear(),
        lambda s: s["info"]["layers"].remove(1),
    ]
    for change in nested_changes:
        with pytest.raises(TypeError, match="read-only"):
            change(theirs)
    assert store.get_status(3.0) == {
        "position": (1.0, 2.0, 3.0, 0.0),
        "available": ["extruder", "heater_bed"],
        "info": {"layers": [1, 2], "name": "x"},
    }


def test_a_served_status_reads_like_the_dict_it_replaces():
    """What klippy's readers do with a status: webhooks' field diff and json
    encoding, Jinja macros (through copy.deepcopy, as kalico's wrapper does),
    dict(...), .copy(), `in`, iteration, pickling."""
    import copy
    import pickle

    import jinja2

    status = {
        "position": Coord(1.5, 2.0, 3.0, 0.0),
        "homed_axes": "xy",
        "available_heaters": ["extruder"],
        "info": {"total_layer": 10, "current_layer": 3, "names": ["a", "b"]},
        "pair": (1, [2, 3]),
    }
    store = kflash.SnapshotStore()
    store.publish(status, 1.0)
    served = store.get_status(2.0)
    assert type(served) is dict
    assert isinstance(served["info"], dict)
    assert isinstance(served["info"]["names"], list)
    assert type(served["position"]) is Coord and served["position"].x == 1.5
    assert served == status and not (served != status)
    # webhooks: per-field `!=` against the previous tick, then json.dumps.
    again = store.get_status(2.25)
    assert not any(served[k] != again[k] for k in served)
    assert json.loads(json.dumps(served, separators=(",", ":"))) == json.loads(
        json.dumps(status)
    )
    assert "info" in served and "layers" not in served["info"]
    assert sorted(served) == sorted(status) and list(served["info"]) == list(
        status["info"]
    )
    for copied in (
        dict(served["info"]),
        served["info"].copy(),
        copy.copy(served["info"]),
        copy.deepcopy(served)["info"],
        pickle.loads(pickle.dumps(served))["info"],
    ):
        assert type(copied) is dict and copied == status["info"]
        copied["names"] = []  # a copy is the caller's own
    deep = copy.deepcopy(served)
    deep["info"]["names"].append("c")
    assert type(deep["info"]["names"]) is list
    assert store.get_status(3.0)["info"]["names"] == ["a", "b"]
    template = jinja2.Environment().from_string(
        "{{ p.position.x }} {{ p.info.names|join(',') }} {{ p.info.current_layer }}"
        " {{ 'extruder' in p.available_heaters }}"
    )
    assert template.render(p=copy.deepcopy(served)) == "1.5 a,b 3 True"
    assert template.render(p=served) == "1.5 a,b 3 True"


def test_tuples_holding_lists_are_rebuilt_read_only_and_keep_their_type():
    store = kflash.SnapshotStore()
    store.publish({"plain": (1, [2]), "coord": Coord(1, [2], 3, 4), "flat": (1, 2)}, 1)
    got = store.get_status(1.0)
    assert type(got["plain"]) is tuple and type(got["coord"]) is Coord
    for value in (got["plain"][1], got["coord"].y):
        with pytest.raises(TypeError):
            value.append(3)
    flat = (1, 2)
    store.publish({"flat": flat}, 2)
    assert store.get_status(2.0)["flat"] is flat, "nothing to freeze: not copied"


def test_fallback_refreshes_missing_invalidated_and_old_snapshots():
    calls = []

    def real(eventtime):
        calls.append(eventtime)
        return {"x": len(calls)}

    store = kflash.SnapshotStore(fallback=real, max_age=1.0)
    assert store.get_status(5.0) == {"x": 1}, "nothing published: ask"
    assert store.version == 1, "the fallback's answer is published"
    assert store.get_status(5.9) == {"x": 1}
    assert calls == [5.0]
    store.invalidate()
    assert not store.current
    assert store.get_status(6.0) == {"x": 2}
    assert store.current
    assert store.get_status(7.0) == {"x": 2}, "exactly max_age old is fresh"
    assert store.get_status(7.01) == {"x": 3}, "older than max_age"
    assert calls == [5.0, 6.0, 7.01]


def test_a_fallback_returning_none_keeps_the_old_snapshot():
    store = kflash.SnapshotStore(fallback=lambda e: None, max_age=0.1)
    assert store.get_status(1.0) == {}
    store.publish({"a": 1}, 1.0)
    store.invalidate()
    assert store.get_status(100.0) == {"a": 1}


def test_without_an_eventtime_the_real_method_answers():
    """Klipper modules call e.g. gcode_move.get_status() for their own logic: they
    get the object's own answer, not a snapshot."""
    asked = []

    def real(eventtime):
        asked.append(eventtime)
        return {"gcode_position": (7.0, 8.0)}

    store = kflash.SnapshotStore(fallback=real, max_age=1.0)
    store.publish({"gcode_position": (1.0, 2.0)}, 1.0)
    assert store.get_status() == {"gcode_position": (7.0, 8.0)}
    assert store.get_status(None) == {"gcode_position": (7.0, 8.0)}
    assert asked == [None, None]
    assert store.version == 1, "an answer without eventtime is not published"
    assert store.get_status(1.5) == {"gcode_position": (1.0, 2.0)}
    plain = kflash.SnapshotStore()
    plain.publish({"a": 1}, 1.0)
    assert plain.get_status() == {"a": 1}
    declining = kflash.SnapshotStore(fallback=lambda e: None)
    declining.publish({"a": 2}, 1.0)
    assert declining.get_status() == {"a": 2}


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError):
        kflash.SnapshotStore(fallback=42)
    with pytest.raises(ValueError):
        kflash.SnapshotStore(max_age=-1.0)
    store = kflash.SnapshotStore(fallback=lambda e: [1, 2])
    with pytest.raises(TypeError, match="dict or None"):
        store.get_status(1.0)
    with pytest.raises(TypeError):
        kflash.SnapshotStore().publish([("a", 1)], 1.0)
    with pytest.raises(ValueError, match="finite"):
        kflash.SnapshotStore().publish({}, float("nan"))


class FakeReactor:
    def register_timer(self, callback, waketime=None):
        return object()


@pytest.mark.parametrize(
    "clock_est, mcu_freq",
    [
        ((1234.5678, 1_000_000_007, 72_000_123.25), 72e6),
        ((0.0, 0.0, 72e6), 72e6),  # file-output start
        ((17.25, 123456789, 12e6), 12e6),  # clock_avg still an int
        ((987654.321, 2**40 + 17.5, 400_000_000.125), 400e6),
    ],
)
def test_print_time_is_exactly_klippys_for_the_callers_eventtime(clock_est, mcu_freq):
    """The recomputed field equals klippy's own ClockSync.estimated_print_time."""
    sync = ClockSync(FakeReactor())
    sync.clock_est = clock_est
    sync.mcu_freq = mcu_freq
    store = kflash.SnapshotStore(print_time_clock=sync)
    store.publish({"estimated_print_time": -1.0, "position": (1, 2)}, clock_est[0])
    for dt in (0.0, 0.1, 0.123456789, 1.5, 37.77, 1e4 + 0.3):
        eventtime = clock_est[0] + dt
        got = store.get_status(eventtime)
        assert got["estimated_print_time"] == sync.estimated_print_time(eventtime)
        assert got["position"] == (1, 2)
    # The clock moves on (clock sync update): the next read follows it.
    sync.clock_est = (clock_est[0] + 1.0, clock_est[1] + mcu_freq, clock_est[2] * 1.01)
    eventtime = clock_est[0] + 2.0
    assert store.get_status(eventtime)["estimated_print_time"] == (
        sync.estimated_print_time(eventtime)
    )


def test_objects_without_the_print_time_field_get_it_not_added():
    sync = ClockSync(FakeReactor())
    store = kflash.SnapshotStore(print_time_clock=sync)
    store.publish({"temperature": 21.5}, 1.0)
    assert store.get_status(2.0) == store.get_status(3.0) == {"temperature": 21.5}
    assert store.get_status(2.0) is not store.get_status(2.0), "one copy per read"


def test_readers_in_threads_see_whole_snapshots_in_order():
    store = kflash.SnapshotStore()
    store.publish(status(1), 0.0)
    stop = threading.Event()
    errors = []
    reads = []

    def reader():
        last = 0
        n = 0
        try:
            while not stop.is_set():
                floor = store.version
                got = store.get_status(0.0)
                values = set(got.values())
                assert len(values) == 1, f"torn snapshot {got}"
                (version,) = values
                assert version >= last, "went backwards"
                assert version >= floor, "older than an earlier publish"
                last = version
                n += 1
        except AssertionError as e:
            errors.append(e)
        reads.append(n)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for version in range(2, 20001):
        store.publish(status(version), version / 10.0)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(reads) == 4 and all(n > 0 for n in reads)
    assert store.version == 20000


class Slow:
    """A status value whose str() runs Python code that lets other threads run."""

    def __init__(self, n):
        self.n = n

    def __str__(self):
        time.sleep(0)  # releases the GIL
        return str(self.n * 3)


def test_concurrent_publishers_with_a_mirror_do_not_deadlock(tmp_path):
    path = tmp_path / "status"
    store = kflash.SnapshotStore(path)
    reader = snapshot.Reader(str(path))

    def publisher(k):
        for i in range(500):
            store.publish({"who": k, "value": Slow(i), "f": [Slow(i)] * 5}, i)

    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "publishers deadlocked"
    assert store.version == 1500
    doc = reader.read()
    assert doc["version"] == 1500, "the mirror holds the last version"
    assert doc["status"]["value"] == str(Slow(int(doc["eventtime"])))


def test_the_mirror_holds_the_latest_status_as_json(tmp_path):
    path = tmp_path / "status"
    store = kflash.SnapshotStore(path)
    assert store.shm_path == path
    assert snapshot.read(path) == {
        "version": 0,
        "eventtime": None,
        "age": None,
        "status": {},
    }
    store.publish({"toolhead": {"position": (1.5, 2.0), "homed_axes": "xy"}}, 12.5)
    doc = snapshot.read(str(path))
    assert doc["version"] == 1
    assert doc["eventtime"] == 12.5
    assert 0.0 <= doc["age"] < 5.0
    assert doc["status"] == {"toolhead": {"position": [1.5, 2.0], "homed_axes": "xy"}}


def test_a_mirror_that_grows_is_followed_by_open_readers(tmp_path):
    path = tmp_path / "status"
    store = kflash.SnapshotStore(path)
    reader = snapshot.Reader(str(path))
    store.publish({"small": 1}, 1.0)
    assert reader.read()["status"] == {"small": 1}
    big = {f"key{i}": "x" * 100 for i in range(2000)}
    store.publish(big, 2.0)
    assert reader.read()["status"] == big


def test_reading_something_else_is_a_clear_error(tmp_path):
    other = tmp_path / "other"
    other.write_bytes(b"not a mirror" * 10)
    with pytest.raises(kflash.KflashError, match="not a kflash status snapshot"):
        snapshot.read(other)
    with pytest.raises(kflash.KflashError, match="missing"):
        snapshot.read(tmp_path / "missing")


def _read_in_child(path, published, done, result):
    reader = snapshot.Reader(path)
    reader.read()
    result.put(("ready", 0))
    last = 0
    count = 0
    try:
        while not done.is_set():
            floor = published.value
            doc = reader.read()
            values = set(doc["status"].values())
            assert len(values) == 1, "torn"
            assert values == {doc["version"]}
            assert doc["version"] >= last
            assert doc["version"] >= floor, "stale"
            last = doc["version"]
            count += 1
        result.put(("ok", count))
    except Exception as e:  # reported to the parent
        result.put(("error", repr(e)))


def test_readers_in_other_processes_never_see_torn_or_stale_status(tmp_path):
    path = str(tmp_path / "status")
    store = kflash.SnapshotStore(path)
    store.publish(status(1, 64), 0.0)
    ctx = multiprocessing.get_context("spawn")
    published = ctx.Value("Q", 1, lock=False)
    done = ctx.Event()
    result = ctx.Queue()
    children = [
        ctx.Process(target=_read_in_child, args=(path, published, done, result))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    assert [result.get(timeout=60) for _ in children] == [("ready", 0)] * 2
    version = 1
    for _ in range(20000):  # publish while the children read
        version = store.publish(status(version + 1, 64), 0.0)
        published.value = version
    done.set()
    outcomes = [result.get(timeout=30) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    assert all(count > 0 for _, count in outcomes), outcomes
    assert json.loads(json.dumps(snapshot.read(path)))["version"] == version
