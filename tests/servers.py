"""Real servers on 127.0.0.1 for the web integrations: uvicorn (ASGI) and waitress (WSGI).

Each is started in a thread on a free port, and stopped, bounded in time, when its block ends.
What the server logs at WARNING or above is collected, so a test can require a clean log (an
error raised after the response was sent shows up nowhere else).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import uvicorn
from waitress.server import create_server

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class ServerLog(logging.Handler):
    """The records of WARNING and above that the server's (and the app's) loggers emit."""

    def __init__(self, *names: str) -> None:
        super().__init__(logging.WARNING)
        self.names = names
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "waitress.queue":
            return  # "Task queue depth is N": more requests than threads, which is load, not harm
        if record not in self.records:  # seen again by a parent logger it propagates to
            self.records.append(record)

    @property
    def errors(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records]

    @contextmanager
    def watching(self) -> Iterator[ServerLog]:
        loggers = [logging.getLogger(name) for name in self.names]
        for logger in loggers:
            logger.addHandler(self)
        try:
            yield self
        finally:
            for logger in loggers:
                logger.removeHandler(self)


def _wait_until(started: Callable[[], bool], thread: threading.Thread, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not started():
        assert thread.is_alive(), f"{what} stopped before it started"
        assert time.monotonic() < deadline, f"{what} did not start within {START_TIMEOUT} s"
        time.sleep(0.01)


@contextmanager
def serving_asgi(app: Any) -> Iterator[tuple[str, ServerLog]]:
    """`app` served by uvicorn (lifespan on) at the URL given; its log collected."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, interface="asgi3", lifespan="on", log_level="warning", backlog=1024
    )
    config.timeout_graceful_shutdown = 5
    server = uvicorn.Server(config)
    log = ServerLog("uvicorn", "uvicorn.error", "fastapi", "ormkit")
    with log.watching():
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            _wait_until(lambda: server.started, thread, "uvicorn")
            yield f"http://127.0.0.1:{port}", log
        finally:
            server.should_exit = True
            thread.join(timeout=STOP_TIMEOUT)
            sock.close()
            assert not thread.is_alive(), f"uvicorn did not stop within {STOP_TIMEOUT} s"


@contextmanager
def serving_wsgi(
    app: Any, *, threads: int = 16, loggers: tuple[str, ...] = ()
) -> Iterator[tuple[str, ServerLog]]:
    """`app` served by waitress with `threads` worker threads; its log, and `loggers`, collected.

    Pass a Flask app's `app.name`: Flask logs an unhandled error of a view on that logger.
    """
    server = create_server(app, host="127.0.0.1", port=0, threads=threads)
    port = server.effective_port  # type: ignore[union-attr]  # one socket, so one port
    log = ServerLog("waitress", "ormkit", *loggers)
    with log.watching():
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{port}", log
        finally:
            # The worker threads first (they finish their task, then stop): one still writing
            # to the server's trigger after it closed would log an error.
            server.task_dispatcher.shutdown(timeout=STOP_TIMEOUT)

            def close_everything() -> None:
                # In the loop's own thread: closing what its select() polls from this thread
                # races it ("Bad file descriptor"). With nothing left to poll, the loop ends.
                for dispatcher in list(server._map.values()):
                    dispatcher.close()

            server.trigger.pull_trigger(close_everything)
            thread.join(timeout=STOP_TIMEOUT)
            assert not thread.is_alive(), f"waitress did not stop within {STOP_TIMEOUT} s"
