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
    # aiohttp is only the kubernetes plugin's API client now; its warnings keep our format.
    for name in (_ROOT, "plugin", "aiohttp"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level if name != "aiohttp" else logging.WARNING)
        logger.propagate = False


def core_logger() -> logging.Logger:
    return logging.getLogger(_ROOT)


def plugin_logger(name: str) -> logging.Logger:
    """The logger of plugin ``name``; its lines read ``[LEVEL] plugin/name: ...``."""
    return logging.getLogger(f"plugin.{name}")
