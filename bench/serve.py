"""Run a server with the bench registry: ``python -m bench.serve COREFILE``.

Prints ``port N`` once listening (the port of its first listener: the one the kernel
picked when the Corefile says 0). The Corefile should bind 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from resolver.config import load
from resolver.plugin import Registry
from resolver.server import Server


async def main(path: str) -> None:
    registry = Registry(__import__("bench.benchplugins", fromlist=["ORDER"]).ORDER, "bench.benchplugins")
    config = load(Path(path).read_text(), path, registry, default_port=0)
    server = Server()
    await server.apply(config)
    print(f"port {next(iter(server.listeners.values())).bound_port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.shutdown()


if __name__ == "__main__":
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(sys.argv[1]))
