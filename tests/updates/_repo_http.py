"""A TUF repository directory served over a real socket (http.server on 127.0.0.1), with per-path overrides
that play a malicious or broken mirror."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

Override = Callable[[http.server.BaseHTTPRequestHandler], None]


@dataclass
class Server:
    """The repository directory served by http.server on 127.0.0.1; ``overrides`` answer chosen paths instead."""

    url: str
    overrides: dict[str, Override] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)


def serve_directory(root: Path) -> contextlib.AbstractContextManager[Server]:
    @contextlib.contextmanager
    def run() -> Iterator[Server]:
        state = Server("")

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

            def do_GET(self) -> None:
                state.requests.append(self.path)
                override = state.overrides.get(self.path)
                if override is not None:
                    override(self)
                    return
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        state.url = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="test-repo", daemon=True)
        thread.start()
        try:
            yield state
        finally:
            server.shutdown()
            server.server_close()

    return run()


