"""The outside stand-ins' server: HTTP on every address of its namespace, one thread per port.

Run as a script inside the outside namespace: outside_server.py PORT [PORT...]. Each answer
says which address was reached and whom the request came from (after the host's NAT)."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        here = self.connection.getsockname()[0]
        body = f"reached {here} from {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main(ports: list[int]) -> None:
    servers = [ThreadingHTTPServer(("0.0.0.0", port), _Answer) for port in ports]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == "__main__":
    main([int(p) for p in sys.argv[1:]])
