"""One logging set-up for every process of ours (memory node, master, local cluster, bench
servers): lines on stderr that carry a UTC timestamp, the level, the logger and the process id,
so the logs of several hosts can be merged and read side by side (journald keeps them as they
are). The level comes from ``--log-level`` or ``FUSEE_LOG_LEVEL`` (default INFO).
"""

from __future__ import annotations

import argparse

import logging
import os
import sys
import time

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s[%(process)d]: %(message)s"


class LogLevelError(ValueError):
    """An unknown log level was asked for."""


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once per process (again: replaces the earlier set-up)."""
    name = (level or os.environ.get("FUSEE_LOG_LEVEL") or "INFO").upper()
    if name not in LEVELS:
        raise LogLevelError(f"unknown log level {name!r}: use one of {', '.join(LEVELS)} "
                            "(--log-level or FUSEE_LOG_LEVEL)")
    formatter = logging.Formatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=name, handlers=[handler], force=True)


def add_log_level_option(parser: argparse.ArgumentParser) -> None:
    """The ``--log-level`` option every server's command line has."""
    parser.add_argument("--log-level", type=str.upper, choices=LEVELS,
                        help="DEBUG, INFO (default), WARNING or ERROR; or FUSEE_LOG_LEVEL")
