"""The terminal shows raydistill's own lines (stages, progress bars, step lines) and problems; the
engines' INFO streams (Ray, Ray Train, Ray Data, DeepSpeed) and Python warnings go to a log file.

`engine_logs_to(path)` runs in each process that does the work: the driver of `raydistill run`
(DIR/run.log) and every Ray Train worker (DIR/<stage>/logs/train-rank<R>.log). Each engine logger
keeps its console handlers for WARNING and worse and gains the file, which takes INFO and worse.
Ray Train's controller runs in its own actor; its console is held to WARNING through the run's
LoggingConfig, and all of its lines stay in Ray's session logs (locally
/tmp/ray/session_latest/logs).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

#: the root logger ("": Ray Train points it at the console on its workers), the engines' own
#: non-propagating loggers, and the logger Python warnings go to once captured
ENGINE_LOGGERS = ("", "ray", "ray.train", "ray.data", "DeepSpeed", "py.warnings")
FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"


@contextlib.contextmanager
def engine_logs_to(path: str) -> Iterator[None]:
    """While inside, send the engines' INFO lines and Python's warnings to `path` (appended);
    their consoles keep only WARNING and worse (also afterwards)."""
    import ray.data  # noqa: F401  (Ray Data configures its loggers on import: adjust them after)

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    logging.captureWarnings(True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    touched = []
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if name and logger.propagate and name != "py.warnings":
            continue                          # its lines reach the root logger's file already
        if name == "py.warnings":             # warnings: to the file only
            logger.handlers, logger.propagate = [], False
        for console in logger.handlers:
            if isinstance(console, logging.StreamHandler) and \
                    not isinstance(console, logging.FileHandler):
                console.setLevel(max(console.level, logging.WARNING))
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        touched.append(logger)
    try:
        yield
    finally:
        for logger in touched:
            logger.removeHandler(handler)
        handler.close()
        logging.captureWarnings(False)


def without_ray_data_bars(context) -> None:
    """Ray Data's progress bars off (raydistill draws its own), and its notice that they are off
    counted as given (it is a WARNING, so it would reach the terminal)."""
    from ray.util.debug import log_once

    context.enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")
