"""The smallest Kubernetes API server Helm's ``lookup`` can read Secrets from.

Helm renders a chart "cluster-aware" (``helm_python.Config.render``, as ``helm upgrade``
does) by asking the API server for each ``lookup``: first the discovery document of the
group version (``GET /api/v1``) to find the resource, then the object itself. This server
answers those two with Secrets it holds in memory, 404 with a ``Status`` to anything else,
and records every path it was asked for, so a test can show that the values came from it.
It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

DISCOVERY = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": "v1",
    "resources": [
        {
            "name": "secrets",
            "singularName": "secret",
            "namespaced": True,
            "kind": "Secret",
            "verbs": ["get", "list"],
        }
    ],
}


class FakeApiServer:
    """Secrets by (namespace, name), served over HTTP on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                server.requests.append(path)
                parts = path.strip("/").split("/")
                if path == "/api/v1":
                    self._answer(200, DISCOVERY)
                elif len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"]:
                    found = server.secrets.get((parts[3], parts[5]))
                    if parts[4] == "secrets" and found is not None:
                        self._answer(200, found)
                    else:
                        self._not_found(path)
                else:
                    self._not_found(path)

            def _not_found(self, path: str) -> None:
                status = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": f"{path} not found",
                    "reason": "NotFound",
                    "code": 404,
                }
                self._answer(404, status)

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the requests are recorded instead

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def kubeconfig(self, namespace: str) -> str:
        """A kubeconfig that points at this server."""
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: fake, user: {token: fake}}]\n"
            f"contexts: [{{name: fake, context: {{cluster: fake, user: fake, "
            f"namespace: {namespace}}}}}]\n"
            "current-context: fake\n"
        )

    def apply(self, obj: dict[str, Any]) -> None:
        """Store a Secret the way an install would have created it."""
        assert obj["kind"] == "Secret", obj["kind"]
        meta = obj["metadata"]
        self.secrets[(meta["namespace"], meta["name"])] = obj
