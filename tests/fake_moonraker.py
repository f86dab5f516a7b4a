"""A fake Moonraker for the tests: HTTP on 127.0.0.1, Moonraker's traps included.

Real Moonraker reads query arguments with Tornado's ``get_argument``: only the LAST
value of a repeated argument counts (``webhooks=state&webhooks=state_message`` asks
for ``state_message`` alone). An object argument names its fields comma-separated
(``webhooks=state,state_message``; empty: every field); unknown objects and fields
are left out of the answer. Every ``/printer/*`` path answers HTTP 503 while klippy
is disconnected. Answers are ``{"result": ...}``; errors
``{"error": {"code": ..., "message": ...}}``.

Subclass and override ``klippy_state`` (``ready``, ``startup``, ``disconnected``, ...),
``printer_object(name)`` (a dict of fields, or None) and ``route(method, path, args,
body)`` (the result of any other endpoint, or raise ``Answer``).
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlparse


class Answer(Exception):
    """An HTTP error answer (raise it from ``route``)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class FakeMoonraker:
    def __init__(self):
        self.requests = []  # (method, path with query, body)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                self._handle("GET")

            def do_POST(self):  # noqa: N802
                self._handle("POST")

            def _handle(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fake.requests.append((method, self.path, raw))
                try:
                    result = fake.answer(method, self.path, raw)
                except Answer as e:
                    body = {"error": {"code": e.code, "message": e.message}}
                    code = e.code
                else:
                    body, code = {"result": result}, 200
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # --- what a test overrides ---------------------------------------------

    def klippy_state(self):
        return "ready"

    def printer_object(self, name):
        if name == "webhooks":
            state = self.klippy_state()
            return {"state": state, "state_message": f"Printer is {state}"}
        return None

    def route(self, method, path, args, body):
        raise Answer(404, "Not Found")

    # --- Moonraker's behaviour ---------------------------------------------

    def answer(self, method, target, raw):
        url = urlparse(target)
        # dict() keeps the last value of a repeated key, like Tornado's get_argument.
        args = dict(parse_qsl(url.query, keep_blank_values=True))
        body = json.loads(raw) if raw else {}
        state = self.klippy_state()
        if url.path == "/server/info":
            return {
                "klippy_connected": state != "disconnected",
                "klippy_state": state,
            }
        if url.path.startswith("/printer/") and state == "disconnected":
            raise Answer(503, "Klippy Host not connected")
        if url.path == "/printer/objects/query":
            status = {}
            for name, fields in args.items():
                value = self.printer_object(name)
                if value is None:
                    continue
                if fields:
                    wanted = fields.split(",")
                    value = {k: v for k, v in value.items() if k in wanted}
                status[name] = value
            return {"eventtime": 1.0, "status": status}
        return self.route(method, url.path, args, body)

    def close(self):
        self.server.shutdown()
        self.server.server_close()

