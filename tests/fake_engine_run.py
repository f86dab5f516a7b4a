"""Test double: run kflash.helper.run with a recording fake engine.

``python fake_engine_run.py HOME MARKS [--device KEY]``. The fake's flash_all
emits events, "stops klipper" (touches MARKS/stopped), waits for MARKS/go,
and "restarts klipper" in a finally block (touches MARKS/restarted) -- the
way the engine's stop guard does -- then returns a flash-all result.
"""

import os
import sys
import time

from kflash import helper


class FakeEngine:
    def __init__(self, home=None):
        self.home = home

    def flash_all(self, keys=None, only_outdated=False, yes=False,
                  on_event=None):
        marks = sys.argv[2]
        on_event({"stage": "build", "device": "mcu", "fraction": 1.0,
                  "level": "info", "message": "built"})
        try:
            on_event({"stage": "stop", "device": None, "fraction": None,
                      "level": "info", "message": "klipper stopped"})
            open(os.path.join(marks, "stopped"), "w").close()
            while not os.path.exists(os.path.join(marks, "go")):
                time.sleep(0.02)
        except BaseException as e:
            # like the engine: re-raise with the run's report attached
            e.report = {"ok": False, "cancelled": True, "devices": [],
                        "service": {"stopped": True, "restarted": True}}
            raise
        finally:
            open(os.path.join(marks, "restarted"), "w").close()
        return {"ok": True, "target_version": "v1",
                "service": {"stopped": True, "restarted": True,
                            "downtime_s": 1.5},
                "devices": [{"key": k, "action": "flash", "build": "pass",
                             "flash": "pass", "verify": "pass",
                             "version_before": "v0", "version_target": "v1",
                             "version_after": "v1", "error": None,
                             "hint": None} for k in keys or ["mcu"]],
                "keys": keys, "only_outdated": only_outdated, "yes": yes}


if __name__ == "__main__":
    dev = sys.argv[4] if len(sys.argv) > 4 else None
    sys.exit(helper.run(sys.argv[1], device=dev, run_id="RUN1",
                        engine_factory=FakeEngine))
