"""Log lines in CoreDNS's style: ``[INFO] message`` and ``[ERROR] plugin/NAME: message``.

Operators grep and alert on these prefixes, so the level names are CoreDNS's (``WARNING``,
``FATAL``) and plugin loggers put ``plugin/NAME:`` before their message. Lines go to
stdout, as CoreDNS's do, so a container runtime collects them unchanged.
"""

from __future__ import annotations

import logging
import sys

FATAL = logging.CRITICAL
logging.addLevelName(FATAL, "FATAL")

_ROOT = "resolver"


class _CoreDNSFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name.startswith("plugin."):
            message = f"plugin/{record.name[7:]}: {message}"
        if record.exc_info and record.levelno >= logging.ERROR:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        return f"[{record.levelname}] {message}"


def configure(level: int = logging.INFO) -> None:
    """Send the server's and the plugins' log lines to stdout in CoreDNS's format."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_CoreDNSFormatter())
    for name in (_ROOT, "plugin", "aiohttp"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level if name != "aiohttp" else logging.WARNING)
        logger.propagate = False


class _OneLine(logging.Filter):
    """aiohttp logs a full traceback for every malformed HTTP request (a 20 kB URL, say):
    anyone who reaches /health could flood the log. Keep one line per bad request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            text = " ".join(str(error).split())[:200]  # its own text may span lines
            record.msg = f"bad HTTP request: {type(error).__name__}: {text}"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_http_errors(logger: logging.Logger) -> None:
    """Make ``logger`` (aiohttp's) write one CoreDNS-style warning line per bad request."""
    if not any(isinstance(existing, _OneLine) for existing in logger.filters):
        logger.addFilter(_OneLine())


def core_logger() -> logging.Logger:
    return logging.getLogger(_ROOT)


def plugin_logger(name: str) -> logging.Logger:
    """The logger of plugin ``name``; its lines read ``[LEVEL] plugin/name: ...``."""
    return logging.getLogger(f"plugin.{name}")
