"""Instructions per query under callgrind, run by hand: ``python -m bench.instructions``.

Queries per second on a shared machine move by 15% or more from one run to the next;
the instructions the server executes per query do not (the same code, queries and
interpreter give the same count within 0.1% for misses and 3% for hits, whatever else
runs: what varies is how many queries share a pass of the event loop).
So this is the figure to compare two versions of the hot path by; ``bench.compare``
gives the throughput and latency that users see.

It starts ``bench.serve`` with ``static`` as the upstream (any name, one A record;
loopback only), then the project under ``valgrind --tool=callgrind`` with the
node-local chain (``errors``, ``prometheus``, ``cache`` of 512 + 512 entries,
``forward``), fills the cache past its capacity (so that misses evict, as a full cache
does), and counts, with the instrumentation switched on only around them:

* ``hits``: 2,000 cache hits (100 names, each asked 20 times: the memo answers them);
* ``misses``: 2,000 misses (unique names), forwarded, stored, each evicting an entry.

dnsperf sends at 200 queries per second (valgrind runs the server ~50 times slower),
so each query also pays a pass of the event loop that a saturated server shares among
many: the counts include that fixed cost. Only user-space instructions are counted,
not the kernel's work for the sockets. Needs valgrind and dnsperf (Debian). The
interpreter is the one running this script (``.venv312/bin/python -m bench.instructions``
counts Python 3.12). About a minute.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.compare import Processes, free_port, wait_answering, which

RATE = 200  # queries per second sent to the server under valgrind
COUNT = 2000  # queries counted per scenario
FILL = 1100  # unique names asked before counting: more than the cache holds

PROJECT_COREFILE = """\
.:{port} {{
    bind 127.0.0.1
    errors
    prometheus 127.0.0.1:{metrics}
    cache {{
        success 512
        denial 512
    }}
    forward . 127.0.0.1:{upstream}
}}
"""
UPSTREAM_COREFILE = ".:{port} {{\n    bind 127.0.0.1\n    static\n}}\n"


def dnsperf(port: int, queries: Path) -> int:
    """Send every query of the file once at RATE; the number answered."""
    command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-n", "1", "-t", "10"]
    command += ["-Q", str(RATE)]
    output = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    match = re.search(r"Queries completed:\s+(\d+)", output)
    return int(match.group(1)) if match else 0


def control(pid: int, *option: str) -> None:
    subprocess.run(["callgrind_control", *option, str(pid)], capture_output=True, check=True, timeout=60)


def counted(workdir: Path, pid: int, dumps: int) -> int:
    """The instructions of dump number ``dumps`` (callgrind zeroes its counters at each dump)."""
    path = workdir / f"callgrind.{pid}.{dumps}"
    for _ in range(50):
        if path.exists() and (match := re.search(r"^totals: (\d+)", path.read_text(), re.M)):
            return int(match.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"no callgrind dump at {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="copy the callgrind dumps here (for callgrind_annotate)")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("valgrind", "callgrind_control", "dnsperf") if which(tool) is None]
    if missing:
        print(f"missing: {', '.join(missing)} (Debian: apt-get install valgrind dnsperf)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir)
        try:
            return run(workdir, procs, args.keep)
        finally:
            procs.stop_all()


def run(workdir: Path, procs: Processes, keep: Path | None = None) -> int:
    files = {
        "hot": "".join(f"h{i}.bench. A\n" for i in range(100)),
        "fill": "".join(f"fill{i}.bench. A\n" for i in range(FILL)),
        "hits": "".join(f"h{i % 100}.bench. A\n" for i in range(COUNT)),
        "misses": "".join(f"miss{i}.bench. A\n" for i in range(COUNT)),
    }
    paths = {}
    for name, text in files.items():
        paths[name] = workdir / f"{name}.queries"
        paths[name].write_text(text)
    upstream = free_port()
    (workdir / "upstream.Corefile").write_text(UPSTREAM_COREFILE.format(port=upstream))
    serve = [sys.executable, "-m", "bench.serve", str(workdir / "upstream.Corefile")]
    upstream_proc = procs.start("upstream", serve, None)
    wait_answering(upstream_proc, upstream, "probe.bench.")
    port = free_port()
    corefile = workdir / "Corefile"
    corefile.write_text(PROJECT_COREFILE.format(port=port, metrics=free_port(), upstream=upstream))
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={workdir}/callgrind.%p"]
    server = procs.start("project", [*valgrind, sys.executable, "-m", "resolver", "-conf", str(corefile)], None)
    wait_answering(server, port, "probe.bench.", timeout=120)
    dnsperf(port, paths["hot"])
    dnsperf(port, paths["fill"])
    print(f"Python {sys.version.split()[0]}, {COUNT} queries each, {RATE} per second")
    for dump, scenario in enumerate(("hits", "misses"), start=1):
        control(server.pid, "-i", "on")
        answered = dnsperf(port, paths[scenario])
        control(server.pid, "-i", "off")
        control(server.pid, "-d")
        instructions = counted(workdir, server.pid, dump)
        print(f"{scenario}: {instructions / max(answered, 1):,.0f} instructions per query ({answered} answered)")
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(workdir / f"callgrind.{server.pid}.{dump}", keep / f"callgrind.{scenario}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
