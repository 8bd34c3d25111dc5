"""`smalltalk serve --workers N`: N uvicorn worker processes on one port, each with its own engine.

Each worker loads the mixture (host memory x N) and generates on its own, so N requests run at once
instead of one; the kernel spreads connections over the workers. Counters live in each process, so
/metrics would only show the worker that answers: every worker publishes a snapshot of its counters to
a shared directory once a second (atomically), and /metrics answers the sum over the live workers (its
own counters fresh, the others' at most ~1 s old) with `smalltalk_workers N`. prometheus_client's
multiprocess mode would do the same with one more dependency and a directory of mmap files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from smalltalk.fsutil import pid_alive, write_json

SETTINGS_ENV = "SMALLTALK_SERVE_SETTINGS"  # how the parent hands its settings to the worker processes
PUBLISH_SECONDS = 1.0


class SharedMetrics:
    """One JSON snapshot per worker process in `directory`, named by pid."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, pid: int) -> Path:
        return self.directory / f"worker-{pid}.json"

    def start(self, snapshot: Callable[[], dict]) -> None:
        """Publish `snapshot()` now and then every PUBLISH_SECONDS from a daemon thread."""
        def loop() -> None:
            while True:
                write_json(self._path(os.getpid()), snapshot())
                stop.wait(PUBLISH_SECONDS)

        stop = threading.Event()
        write_json(self._path(os.getpid()), snapshot())
        threading.Thread(target=loop, name="smalltalk-metrics", daemon=True).start()

    def gather(self, own: dict) -> list[dict]:
        """`own` plus the latest snapshot of every other live worker."""
        found = [own]
        for path in sorted(self.directory.glob("worker-*.json")):
            pid = int(path.stem.split("-")[1])
            if pid == os.getpid() or not pid_alive(pid):
                continue
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # replaced or removed while we read: skip this scrape
                continue
        return found


def run_workers(settings: dict, workers: int, host: str, port: int) -> None:
    """The parent: hand the settings to the workers through the environment and let uvicorn fork them."""
    import uvicorn

    directory = tempfile.mkdtemp(prefix="smalltalk-metrics-")
    os.environ[SETTINGS_ENV] = json.dumps({**settings, "metrics_dir": directory})
    try:
        from smalltalk.serving.server import uvicorn_options

        uvicorn.run("smalltalk.serving.workers:worker_app", factory=True, host=host, port=port, workers=workers,
                    **uvicorn_options(settings))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def worker_app():
    """uvicorn's factory in each worker process."""
    from smalltalk.serving.server import app_from_settings

    settings = json.loads(os.environ[SETTINGS_ENV])
    return app_from_settings(settings, SharedMetrics(settings.pop("metrics_dir")))
