"""A receiver for Apoptosis job notifications: verifies each with the tenant's secret (Standard
Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`) and prints one line per
event; a request that does not verify gets 401 and is not printed.

    APOPTOSIS_WEBHOOK_SECRET=$(apoptosis webhooks secret) python examples/webhook_receiver.py 9000
"""

import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

VERIFIER = Webhook(os.environ["APOPTOSIS_WEBHOOK_SECRET"])


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            event = VERIFIER.verify(body, dict(self.headers.items()))
        except WebhookVerificationError:
            self.send_response(401)
            self.end_headers()
            return
        # Deliveries are retried until answered 2xx: the same webhook-id can arrive twice.
        print(event["type"], event["data"]["id"], self.headers["webhook-id"], flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: object) -> None:  # one line per event, nothing else
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    ThreadingHTTPServer(("127.0.0.1", port), Receiver).serve_forever()
