"""The tests' fake Moonraker keeps real Moonraker's traps."""

import json
import urllib.error
import urllib.request

from fake_moonraker import FakeMoonraker


def test_the_last_repeated_argument_wins_and_503_while_klippy_is_down():
    class Fake(FakeMoonraker):
        state = "ready"

        def klippy_state(self):
            return self.state

    fake = Fake()
    try:
        def get(path):
            with urllib.request.urlopen(fake.url + path, timeout=5) as r:
                return json.load(r)["result"]

        got = get("/printer/objects/query?webhooks=state&webhooks=state_message")
        assert got["status"] == {"webhooks": {"state_message": "Printer is ready"}}
        got = get("/printer/objects/query?webhooks=state,state_message&nothing")
        assert got["status"]["webhooks"]["state"] == "ready"
        assert "nothing" not in got["status"]
        fake.state = "disconnected"
        try:
            get("/printer/info")
        except urllib.error.HTTPError as e:
            assert e.code == 503
        else:
            raise AssertionError("no 503 while klippy is down")
        assert get("/server/info")["klippy_connected"] is False
    finally:
        fake.close()
