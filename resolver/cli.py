"""Command line: CoreDNS's flags, startup, signals and reloads.

    resolver [-conf FILE|stdin] [-dns.port N] [-workers N] [-plugins] [-version] [-quiet] [-pidfile FILE]

Flags take one dash, as in CoreDNS (two work as well). Without ``-conf`` the server reads
``./Corefile``. A Corefile problem prints one ``file:line: problem`` line on stderr and
exits 1; SIGTERM or SIGINT shut down gracefully and exit 0; SIGUSR1 reloads the Corefile,
keeping the running configuration if the new one does not load. ``-workers N`` serves
from N processes sharing the ports (``resolver.workers``); signals go to the first
process, which passes stops on and runs reloads for all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import signal
import sys
from pathlib import Path
from typing import TextIO

from resolver import __version__, logs
from resolver.config import DEFAULT_PORT, Config, load
from resolver.corefile import CorefileError, port_number
from resolver.endpoints import EndpointError
from resolver.plugin import Registry
from resolver.runtime import Runtime
from resolver.server import ListenError, Server
from resolver.workers import Link, NoHTTPEndpoints, Supervisor

log = logs.core_logger()

MAX_WORKERS = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="resolver",
        description="A CoreDNS-compatible caching DNS server configured by a Corefile.",
    )

    def flag(name: str, **kwargs: object) -> None:
        parser.add_argument(f"-{name}", f"--{name}", **kwargs)  # type: ignore[arg-type]

    flag("conf", metavar="FILE", default=None, help='Corefile to load, or "stdin" (default: ./Corefile)')
    flag("dns.port", dest="port", metavar="PORT", type=_port, default=DEFAULT_PORT, help="default port (default: 53)")
    flag("plugins", action="store_true", help="list the plugins in execution order and exit")
    flag("version", action="store_true", help="show the version and exit")
    flag("quiet", action="store_true", help="no initialization output")
    flag("pidfile", metavar="FILE", default=None, help="write the process ID to FILE")
    flag(
        "workers",
        metavar="N",
        type=_workers,
        default=1,
        help="serve from N processes sharing the ports (SO_REUSEPORT), each with its own cache (default: 1)",
    )
    return parser.parse_args(argv)


def _workers(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f'invalid number of workers "{text}" (1 to {MAX_WORKERS})')
    return count


def _port(text: str) -> int:
    port = port_number(text)
    if port is None:
        raise argparse.ArgumentTypeError(f'invalid port "{text}" (0 to 65535)')
    return port


def read_corefile(conf: str | None, stdin: TextIO) -> tuple[str, str]:
    """The Corefile's text and the name errors should use for it."""
    if conf == "stdin":
        try:
            return stdin.buffer.read().decode("utf-8"), "stdin"
        except UnicodeDecodeError:
            raise CorefileError("stdin", 0, "the Corefile is not UTF-8 text") from None
    path = conf or "Corefile"
    try:
        return Path(path).read_text(encoding="utf-8"), path
    except OSError as exc:
        raise CorefileError(path, 0, f"cannot read Corefile: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CorefileError(path, 0, "the Corefile is not UTF-8 text") from None


def version_text() -> str:
    return (
        f"corefile-resolver-{__version__}\n"
        f"{platform.system().lower()}/{platform.machine()}, python {platform.python_version()}{_loop_name()}"
    )


def _loop_name() -> str:
    try:
        import uvloop
    except ImportError:
        return ", asyncio"
    return f", uvloop {uvloop.__version__}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    registry = Registry.default()
    if args.plugins:
        print("Plugins, in execution order:")
        for name in registry.order:
            print(f"  {name}")
        return 0
    logs.configure()
    runtime = Runtime(corefile=None if args.conf == "stdin" else (args.conf or "Corefile"))
    try:
        text, file = read_corefile(args.conf, sys.stdin)
        config = load(text, file, registry, args.port, directory=_directory_of(file), runtime=runtime)
    except CorefileError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.workers > 1:
        keys = [(key.zone, key.port) for block in config.blocks for key in block.keys]
        if any(plugin.name == "kubernetes" for plugin in config.plugins()):
            log.warning(
                "kubernetes with -workers %d: each worker watches the Kubernetes API and holds the cluster's "
                "records on its own (%d times the watches, API server load and memory)",
                args.workers,
                args.workers,
            )
        # The supervisor keeps no configuration: each worker loads its own from the text
        # (no plugin instance crosses a fork), and nothing of this one is left in the
        # heap that every worker inherits and that _freeze_heap freezes.
        del config, runtime
        return _supervise(keys, text, file, args, registry)
    return _run(lambda: serve(config, args, registry))


def _supervise(keys: list[tuple[str, int]], text: str, file: str, args: argparse.Namespace, registry: Registry) -> int:
    """Run ``args.workers`` worker processes (the Corefile ``text`` is known to load)."""

    def worker(index: int, corefile: str, link: Link) -> int:
        runtime = Runtime(corefile=None if args.conf == "stdin" else (args.conf or "Corefile"))
        if index > 0:
            runtime.http = NoHTTPEndpoints()  # worker 0 alone serves health, ready, metrics
        try:
            config = load(corefile, file, registry, args.port, directory=_directory_of(file), runtime=runtime)
        except CorefileError as exc:
            print(exc, file=sys.stderr)
            return 1
        return _run(lambda: serve(config, args, registry, link=link))

    def read() -> str:
        return read_corefile(args.conf, sys.stdin)[0]

    _freeze_heap()  # before forking: the workers' collections then leave the shared pages alone
    supervisor = Supervisor(args.workers, worker, text, None if args.conf == "stdin" else read)
    if not supervisor.start():
        return supervisor.status
    try:
        if args.pidfile:
            try:
                Path(args.pidfile).write_text(f"{os.getpid()}\n")
            except OSError as exc:
                print(f"cannot write pidfile {args.pidfile}: {exc.strerror or exc}", file=sys.stderr)
                supervisor.stop(status=1)
                return supervisor.wait()
        if not args.quiet:
            for zone, port in keys:
                print(f"{zone}:{supervisor.ports.get(port, port)}")
            print(f"{version_text()}, {args.workers} workers", flush=True)
        return supervisor.wait()
    finally:
        if args.pidfile:
            Path(args.pidfile).unlink(missing_ok=True)


def _directory_of(file: str) -> Path:
    return Path.cwd() if file == "stdin" else Path(file).resolve().parent


def _run(entry: object) -> int:
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(entry())  # type: ignore[operator]


async def serve(config: Config, args: argparse.Namespace, registry: Registry, link: Link | None = None) -> int:
    """Serve until SIGTERM/SIGINT; return the exit status.

    ``link`` is set in a worker process of ``-workers N``: the ports to bind for ``:0``
    listeners (those worker 0 got), and the channel to the supervisor, which writes the
    pidfile and the banner, handles SIGINT and SIGUSR1, and sends the Corefile to reload.
    """
    pidfile = args.pidfile if link is None else None  # the supervisor's, not a worker's
    server = Server(config.runtime, reuse_port=link is not None, assigned_ports=link.ports if link else None)
    try:
        await server.apply(config)
    except (ListenError, CorefileError, EndpointError, OSError) as exc:
        print(f"{config.file}: {exc}" if isinstance(exc, ListenError) else str(exc), file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_stop(signame: str) -> None:
        if received and link is not None:
            # A worker: the same SIGTERM often comes twice, from whoever signalled the
            # whole group (systemd, timeout) and from the supervisor. Forcing the exit is
            # the supervisor's call.
            return
        if received:
            # A second signal while draining (a long lameduck, say): leave now, as
            # CoreDNS does, with status 2.
            log.info("%s: Force quit", signame)
            if pidfile:
                Path(pidfile).unlink(missing_ok=True)
            os._exit(2)
        received.append(signame)
        stop.set()

    status = 0

    def on_fatal(_message: str) -> None:
        nonlocal status
        status = 1  # the plugin has logged why; shut down as for SIGTERM, exit 1
        stop.set()

    reloading: set[asyncio.Task[None]] = set()

    def request_reload() -> None:
        log.info("Reloading")
        start_reload()

    def start_reload() -> None:
        task = loop.create_task(reload(server, args, registry))
        reloading.add(task)
        task.add_done_callback(reloading.discard)

    def on_sigusr1() -> None:
        log.info("SIGUSR1: Reloading")
        start_reload()

    async def reload_from_supervisor(text: str) -> str | None:
        error = await apply_corefile(server, text, config.file, args, registry)
        if error is None:
            start_refreeze(server)
        return error

    def failed_before_reaching_workers(_why: str) -> None:
        server.stats.reloads_failed += 1  # what coredns_reload_failed_total counts

    # Signals are handled before anyone is told the server is up (banner, pidfile,
    # supervisor): a SIGTERM sent as soon as the banner shows is a graceful stop.
    config.runtime.fatal = on_fatal
    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    if link is None:
        config.runtime.request_reload = request_reload
        loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGUSR1, on_sigusr1)
    else:
        # A worker leaves Ctrl-C (forwarded once as SIGTERM) and reloads to the
        # supervisor: its reload plugin asks the supervisor, which sends every worker
        # the same text.
        config.runtime.request_reload = link.request_reload
    _tune_collector()
    _freeze_heap()
    if pidfile:  # before the banner: whoever waits for the banner may read it next
        try:
            Path(pidfile).write_text(f"{os.getpid()}\n")
        except OSError as exc:
            print(f"cannot write pidfile {pidfile}: {exc.strerror or exc}", file=sys.stderr)
            await server.shutdown()
            return 1
    if link is not None:  # listening, and signals are handled: the supervisor may go on
        await link.ready(
            {port: server.port(port) for port in _zero_ports(config)},
            reload_from_supervisor,
            failed_before_reaching_workers,
        )
    elif not args.quiet:
        _print_banner(server, config)
    try:
        await stop.wait()
        if not status:
            log.info("%s: Shutting down servers then terminating", received[0] if received else "SIGTERM")
        await server.shutdown(lameduck=not status)
    finally:
        if pidfile:
            Path(pidfile).unlink(missing_ok=True)
    return status


async def reload(server: Server, args: argparse.Namespace, registry: Registry) -> bool:
    """Load the Corefile again and serve it; on any failure keep the running config."""
    if args.conf == "stdin":
        log.error("cannot reload a Corefile read from stdin; keeping the running configuration")
        return False
    try:
        text, file = read_corefile(args.conf, sys.stdin)
    except CorefileError as exc:
        server.stats.reloads_failed += 1
        log.error("reload failed, keeping the running configuration: %s", exc)
        return False
    error = await apply_corefile(server, text, file, args, registry)
    if error is not None:
        log.error("reload failed, keeping the running configuration: %s", error)
        return False
    log.info("Reloading complete")
    await _refreeze(server)
    return True


async def apply_corefile(
    server: Server, text: str, file: str, args: argparse.Namespace, registry: Registry
) -> str | None:
    """Load ``text`` and serve it: None once it serves, else why not (counted in
    ``coredns_reload_failed_total``; the running configuration keeps serving)."""
    try:
        config = load(text, file, registry, args.port, directory=_directory_of(file), runtime=server.runtime)
        await server.apply(config)
    except (CorefileError, ListenError, EndpointError, OSError) as exc:
        server.stats.reloads_failed += 1
        return str(exc)
    except Exception as exc:  # a bug, not a user error: still never lose the running config
        server.stats.reloads_failed += 1
        log.error("unexpected error while reloading: %r", exc, exc_info=exc)
        return repr(exc)
    return None


_refreezing: set[asyncio.Task[None]] = set()


def start_refreeze(server: Server) -> None:
    """``_refreeze`` in the background (a worker answers the supervisor first)."""
    task = asyncio.get_running_loop().create_task(_refreeze(server))
    _refreezing.add(task)
    task.add_done_callback(_refreezing.discard)


async def _refreeze(server: Server) -> None:
    """The replaced configuration may hold reference cycles among frozen objects: once
    it is retired, let the collector see everything again, then freeze what is left."""
    if server.retiring:
        await asyncio.wait(set(server.retiring))
    gc.unfreeze()
    _freeze_heap()


#: Net allocations of tracked objects between young-generation collections (CPython's
#: default is 700). See ``_tune_collector``.
YOUNG_COLLECTION_THRESHOLD = 10_000


def _tune_collector() -> None:
    """Collect the young generation after 10,000 net allocations instead of 700.

    At saturation on misses, hundreds of queries are in flight, each holding its Task,
    coroutines, futures and Request: several thousand young objects alive at any moment.
    With the default threshold nearly every young collection found them alive, promoted
    them and walked them again in the middle generation before they died there.
    Measured at saturation (``bench.forward``, 115k misses, ``gc.callbacks`` timing each
    collection): 150 young and 13 middle collections took 135 to 200 ms of the run's
    ~4.8 s of CPU, about 1.5 us a miss; with 10,000, 7 to 38 young and up to 3 middle
    collections took 10 to 20 ms (``perf record``: the collector's share of CPU samples fell from
    3.1% to 0.1%; ``bench.instructions`` cannot show it, as valgrind's slow server holds
    few queries in flight). The price is a longer pause each time: 0.9 to 3.7 ms (0.1 to
    0.2 ms before), about every half second at 25k misses per second; cache hits
    allocate nearly nothing that survives, so they rarely trigger one.
    """
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


def _freeze_heap() -> None:
    """Collect, then move every object alive into the collector's permanent generation.

    What startup builds (modules, plugins, the configuration: tens of thousands of
    objects) lives for the whole run. Left in the oldest generation, every full
    collection walks it again: about 5 ms each time with the bench configuration, and a
    stream of cache misses triggers a full collection every few thousand queries. Frozen,
    a full collection walks only what changed since (the cache's entries).
    """
    gc.collect()
    gc.freeze()


def _zero_ports(config: Config) -> set[int]:
    """The configured port 0 (tests), which the kernel turns into a free port."""
    return {key.port for block in config.blocks for key in block.keys if key.port == 0}


def _print_banner(server: Server, config: Config) -> None:
    for block in config.blocks:
        for key in block.keys:
            port = server.port(key.port) if key.port == 0 else key.port
            print(f"{key.zone}:{port}")
    print(version_text(), flush=True)
