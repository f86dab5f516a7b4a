"""The detached flash-all run that the ``[kflash]`` extra starts.

``python -m kflash.helper --home H [--only-outdated] [--device KEY]``

klippy cannot flash its own MCUs (it holds their ttys, and stopping klipper
kills klippy), so the extra starts this helper out of klipper's reach (see
``kflash.launcher``) and goes on answering G-code while the firmware builds.
The helper runs the engine's flash-all (build, stop klipper, flash, start
klipper, verify) and leaves behind, in ``<home>/helper/``:

``progress.jsonl``
    one JSON event per line: ``{"t", "run_id", "stage", "device",
    "fraction", "level", "message"}`` (the engine's events plus the helper's
    own ``"stage": "helper"`` lines); the extra tails it while klippy is up.
``status.json``
    ``{"version", "run_id", "pid", "state": "running"|"finished", "started",
    "options"}``, written atomically at start and at the end.
``report.json``
    the final report, written atomically once: ``{"version", "run_id", "ok",
    "exit_code", "interrupted", "started", "finished", "options", "result",
    "error", "hint"}`` where ``result`` is the flash-all JSON of DESIGN.md.
``lock``
    held (``flock``) for the helper's whole life: one helper at a time.

Klipper is started again on every path: the engine's stop guard restarts it
when flash-all returns or raises; SIGTERM, SIGHUP and SIGINT raise
``Interrupted`` here so the engine unwinds through that guard; SIGKILL is the
engine's watchdog's business. The exit code is the core's ``ExitStatus``, the
CLI's: 0 all good, 1 some device failed, 2 usage/configuration, 3 refused, 4
the service could not be restarted.

The reading side (``RunFiles``) is used by the extra inside klippy: small,
non-blocking reads of local files only.
"""

import argparse
import errno
import fcntl
import json
import os
import signal
import sys
import threading
import time

__all__ = [
    "Interrupted",
    "RunFiles",
    "default_home",
    "main",
    "new_run_id",
    "pid_alive",
    "read_json",
    "run",
    "write_json_atomic",
]

SCHEMA = 1


class Interrupted(BaseException):
    """Raised by the helper's signal handlers so the engine unwinds."""


def default_home():
    """The state dir the CLI uses (``$KFLASH_HOME``, ``~/printer_data/
    kflash``, ...), as the engine resolves it."""
    import kflash

    return kflash.Engine().state_dir


def new_run_id():
    """A run id: UTC time and pid (sorts by start time)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}-{os.getpid()}"


def write_json_atomic(path, doc):
    """Write ``doc`` as JSON to ``path``: temp file, fsync, rename, fsync dir.
    """
    d = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid):
    """True when ``pid`` runs and is not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            stat = f.read()
    except OSError:
        return True
    # "pid (comm) S ..." -- comm may hold spaces and parentheses
    state = stat[stat.rfind(")") + 2:stat.rfind(")") + 3]
    return state not in ("Z", "X")


def read_json(path):
    """A JSON file's content, or None when missing or malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class RunFiles:
    """The helper's files in ``<home>/helper/`` and how to read them."""

    def __init__(self, home):
        self.home = str(home)
        self.dir = os.path.join(self.home, "helper")
        self.lock = os.path.join(self.dir, "lock")
        self.status = os.path.join(self.dir, "status.json")
        self.progress = os.path.join(self.dir, "progress.jsonl")
        self.report = os.path.join(self.dir, "report.json")
        self.request = os.path.join(self.dir, "request.json")
        self.log = os.path.join(self.dir, "helper.log")
        self.posted = os.path.join(self.dir, "posted")
        self.prompt_open = os.path.join(self.dir, "prompt_open")
        self.engine_lock = os.path.join(self.home, "lock")

    def ensure_dir(self):
        os.makedirs(self.dir, exist_ok=True)

    def read_status(self):
        """status.json as a dict, or None."""
        return read_json(self.status)

    def read_report(self):
        """report.json as a dict, or None."""
        return read_json(self.report)

    def read_events(self, cursor=None):
        """New complete JSON lines of progress.jsonl after ``cursor``.

        ``cursor`` is ``(inode, offset)`` from an earlier call or
        ``end_cursor()``, or None for the start of the file. Returns
        ``(events, new_cursor)``; a partly written last line is left for the
        next call; a new file (a new run: new inode) is read from its start.
        """
        try:
            with open(self.progress, "rb") as f:
                st = os.fstat(f.fileno())
                offset = 0
                if cursor is not None and cursor[0] == st.st_ino:
                    offset = min(cursor[1], st.st_size)
                f.seek(offset)
                data = f.read(max(0, st.st_size - offset))
        except OSError:
            return [], cursor
        end = data.rfind(b"\n")
        if end < 0:
            return [], (st.st_ino, offset)
        events = []
        for line in data[:end].split(b"\n"):
            try:
                ev = json.loads(line.decode("utf-8", "replace"))
            except ValueError:
                continue
            if isinstance(ev, dict):
                events.append(ev)
        return events, (st.st_ino, offset + end + 1)

    def end_cursor(self):
        """A cursor past everything progress.jsonl holds now."""
        try:
            st = os.stat(self.progress)
        except OSError:
            return None
        return (st.st_ino, st.st_size)

    def _lock_held(self, path):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def busy(self):
        """Why a new run cannot start now, or None.

        A helper holding ``helper/lock``, a live helper pid in status.json,
        or another kflash run holding the state dir's ``lock``.
        """
        if self._lock_held(self.lock):
            return "a kflash helper is running"
        st = self.read_status()
        if (st and st.get("state") == "running"
                and pid_alive(st.get("pid"))
                and st.get("pid") != os.getpid()):
            return f"a kflash helper is running (pid {st.get('pid')})"
        if self._lock_held(self.engine_lock):
            return (f"another kflash run holds {self.engine_lock} (a "
                    "`kflash flash-all` in a shell?)")
        return None

    def interrupted_run(self):
        """status.json of a run whose helper died without a report, or None.
        """
        st = self.read_status()
        if not st or st.get("state") != "running":
            return None
        if pid_alive(st.get("pid")) or self._lock_held(self.lock):
            return None
        rep = self.read_report()
        if rep and rep.get("run_id") == st.get("run_id"):
            return None
        if self.read_posted() == st.get("run_id"):
            return None  # already reported as interrupted
        return st

    def read_posted(self):
        try:
            with open(self.posted, encoding="utf-8") as f:
                return f.read().strip()
        except OSError:
            return None

    def mark_posted(self, run_id):
        self.ensure_dir()
        tmp = self.posted + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{run_id}\n")
        os.replace(tmp, self.posted)


class _Progress:
    """Append-only JSON-lines writer; callable from any thread."""

    def __init__(self, path, run_id):
        self._lock = threading.Lock()
        self._run_id = run_id
        # A new file per run, created while the old one still exists (so
        # its inode differs) and renamed over it: readers see a new run.
        tmp = path + ".new"
        self._f = open(tmp, "w", encoding="utf-8")
        os.replace(tmp, path)

    def __call__(self, ev):
        if not isinstance(ev, dict):
            ev = {k: getattr(ev, k, None) for k in
                  ("stage", "device", "fraction", "level", "message")}
        line = {"t": round(time.time(), 3), "run_id": self._run_id,
                "stage": ev.get("stage"), "device": ev.get("device"),
                "fraction": ev.get("fraction"),
                "level": ev.get("level") or "info",
                "message": ev.get("message") or ""}
        data = json.dumps(line, sort_keys=True) + "\n"
        with self._lock:
            if self._f.closed:
                return
            self._f.write(data)
            self._f.flush()

    def close(self):
        with self._lock:
            self._f.close()


def _exit_code(outcome):
    """The core's exit status of a report or of an exception, as an int."""
    from kflash import ExitStatus

    return int(ExitStatus.of(outcome))


def _raise_interrupted(signum, _frame):
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def run(home, only_outdated=False, device=None, run_id=None,
        engine_factory=None):
    """One detached run; returns the exit code. See the module doc."""
    files = RunFiles(home)
    files.ensure_dir()
    lock_fd = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock_fd)
        print(f"kflash helper: another helper is running in {files.dir}",
              file=sys.stderr)
        from kflash import ExitStatus

        return int(ExitStatus.REFUSED)
    run_id = run_id or new_run_id()
    options = {"only_outdated": bool(only_outdated), "device": device}
    started = time.time()
    status = {"version": SCHEMA, "run_id": run_id, "pid": os.getpid(),
              "state": "running", "started": started, "options": options}
    try:
        os.unlink(files.report)
    except FileNotFoundError:
        pass
    progress = _Progress(files.progress, run_id)
    write_json_atomic(files.status, status)
    progress({"stage": "helper", "message":
              f"started (pid {os.getpid()})"})
    result = None
    error = None
    hint = None
    interrupted = False
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _raise_interrupted)
    try:
        import kflash

        factory = engine_factory or kflash.Engine
        engine = factory(home=home)
        keys = [device] if device else None
        result = engine.flash_all(keys=keys,
                                  only_outdated=bool(only_outdated and
                                                     not device),
                                  yes=True, on_event=progress)
        code = _exit_code(result)
    except Interrupted as e:
        # the engine re-raises what interrupted it with the run's report
        result = getattr(e, "report", None)
        interrupted = True
        error = f"the run was interrupted ({e})"
        svc = (result or {}).get("service") or {}
        if not svc.get("stopped"):
            hint = "klipper was not stopped; run KFLASH_ALL again"
        elif svc.get("restarted"):
            hint = ("klipper was started again; run KFLASH_PLAN to see "
                    "where each MCU stands")
        else:
            hint = "klipper could not be started again: start it by hand"
        code = _exit_code(e)
    except Exception as e:  # noqa: BLE001 - every failure goes in the report
        error = f"{type(e).__name__}: {e}"
        result = getattr(e, "report", None)
        hint = getattr(e, "hint", None)
        code = _exit_code(e)
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    if result is not None and not isinstance(result, dict):
        result = {"ok": bool(getattr(result, "ok", False))}
    ok = code == 0
    progress({"stage": "helper",
              "level": "info" if ok else "error",
              "message": f"finished (exit {code})"
              + (f" ({error})" if error else "")})
    progress.close()
    finished = time.time()
    report = {"version": SCHEMA, "run_id": run_id, "ok": ok,
              "exit_code": code, "interrupted": interrupted,
              "started": started, "finished": finished,
              "options": options, "result": result, "error": error,
              "hint": hint}
    write_json_atomic(files.report, report)
    status.update(state="finished", finished=finished, exit_code=code)
    write_json_atomic(files.status, status)
    os.close(lock_fd)
    return code


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m kflash.helper",
        description="The detached flash-all run started by klippy's "
        "[kflash] extra.")
    p.add_argument("--home", help="kflash state dir (default: the usual)")
    p.add_argument("--only-outdated", action="store_true",
                   help="flash only the devices whose firmware is outdated")
    p.add_argument("--device", metavar="KEY", help="flash this device only")
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    p.add_argument("--pending", action="store_true",
                   help="take the options from <home>/helper/request.json "
                   "(the kflash-helper.service unit)")
    a = p.parse_args(argv)
    home = a.home or default_home()
    if a.pending:
        files = RunFiles(home)
        req = read_json(files.request)
        if not isinstance(req, dict):
            print(f"kflash helper: no request in {files.request}",
                  file=sys.stderr)
            from kflash import ExitStatus

            return int(ExitStatus.USAGE)
        try:
            os.unlink(files.request)
        except OSError:
            pass
        a.only_outdated = bool(req.get("only_outdated"))
        a.device = req.get("device") or None
        a.run_id = req.get("run_id") or a.run_id
    return run(home, a.only_outdated, a.device, a.run_id)


if __name__ == "__main__":
    sys.exit(main())
