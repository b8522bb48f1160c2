"""A webhook receiver that checks every request with the reference Standard Webhooks
library (the `standardwebhooks` package), as a customer's receiver would.

    python3 webhook_receiver.py PORT SECRET LOG [--fail-first]

Verified requests are answered 204, others 401 (a receiver that rejects what it cannot
verify). With --fail-first, the first request of each webhook-id is answered 503 without
being checked, so the sender must retry it. Each request is appended to LOG as one JSON
line: {"outcome": "verified" | "rejected" | "failed_on_purpose", "id", "body", "why"}.
Prints "listening PORT" once it accepts connections.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from standardwebhooks.webhooks import Webhook

port, secret, log_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
fail_first = "--fail-first" in sys.argv[4:]
webhook = Webhook(secret)
seen = set()
lock = threading.Lock()


def log(entry):
    with lock, open(log_path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        msg_id = self.headers.get("webhook-id")
        if fail_first and msg_id not in seen:
            seen.add(msg_id)
            log({"outcome": "failed_on_purpose", "id": msg_id})
            self.send_response(503)
            self.end_headers()
            return
        try:
            payload = webhook.verify(body, dict(self.headers.items()))
        except Exception as e:  # the library's verification errors
            log({"outcome": "rejected", "id": msg_id, "why": str(e)})
            self.send_response(401)
            self.end_headers()
            return
        log({"outcome": "verified", "id": msg_id, "body": payload})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", port), Handler)
print(f"listening {server.server_address[1]}", flush=True)
server.serve_forever()
