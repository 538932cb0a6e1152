"""reload: a changed Corefile is served without a restart; a broken one is not."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest

from plugins.reload import Reload, Watcher, parsed_sha512
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from resolver.runtime import Runtime
from tests.conftest import StartServer
from tests.test_cli import Process, processes  # noqa: F401 - the fixture is used by name

REGISTRY = Registry.default()


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_interval_and_jitter_limits() -> None:
    for text, problem in (
        ("reload 1s", "interval value must be greater or equal to 2s"),
        ("reload 10s 500ms", "jitter value must be 0 or greater or equal to 1s"),
        ("reload soon", 'invalid duration "soon"'),
        ("reload 10s 2s 3s", "expected 0 to 2 arguments"),
    ):
        with pytest.raises(CorefileError) as caught:
            load(f". {{\n {text}\n}}\n", "Corefile", REGISTRY)
        assert str(caught.value).startswith("Corefile:2: reload: ") and problem in str(caught.value)


def test_jitter_is_capped_at_half_the_interval() -> None:
    config = load(". {\n reload 4s 30s\n}\n", "Corefile", REGISTRY)
    (plugin,) = config.blocks[0].plugins
    assert isinstance(plugin, Reload)
    assert 3.0 <= plugin.interval <= 5.0  # 4s shifted by at most +-1s (half of the capped 2s)


def test_changed_corefile_is_served_and_a_broken_one_is_not(tmp_path: Path, processes: list[Process]) -> None:  # noqa: F811
    corefile = tmp_path / "Corefile"
    text = ".:0 {\n bind 127.0.0.1\n reload 2s 1s\n whoami\n}\n"
    corefile.write_text(text)
    process = Process(corefile)
    processes.append(process)
    process.wait_for_line(rf"^\[INFO\] plugin/reload: Running configuration SHA512 = {parsed_sha512(text, corefile)}$")
    assert not process.query("example.org").answer  # whoami answers in the additional section

    metrics_port = free_tcp_port()
    changed = (
        f".:{process.port} {{\n bind 127.0.0.1\n reload 2s 1s\n prometheus 127.0.0.1:{metrics_port}\n erratic\n}}\n"
    )
    corefile.write_text(changed)
    process.wait_for_line(r"^\[INFO\] Reloading$", timeout=15)
    process.wait_for_line(rf"Running configuration SHA512 = {parsed_sha512(changed, corefile)}$")
    process.wait_for_line(r"^\[INFO\] Reloading complete$")
    assert process.query("example.org").answer[0][0].address == "192.0.2.53"

    corefile.write_text(changed.replace(" erratic\n", " erratic\n cahce\n"))
    failure = process.wait_for_line(r"^\[ERROR\] reload failed, keeping the running configuration: (.*)$", timeout=15)
    assert failure.group(1).startswith(f'{corefile}:6: unknown directive "cahce"')
    assert process.query("example.org").answer[0][0].address == "192.0.2.53"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert "coredns_reload_failed_total 1.0" in metrics
    sha512 = parsed_sha512(changed, corefile)
    assert f'coredns_reload_version_info{{hash="sha512",value="{sha512}"}} 1.0' in metrics
    # The broken file is not retried at every interval: no second error line appears.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert process.query("example.org").answer[0][0].address == "192.0.2.53"
        time.sleep(0.5)
    assert process.stop() == 0
    assert sum("reload failed" in line for line in process.lines) == 1


async def test_one_watch_per_process_carried_across_reloads(start_server: StartServer, tmp_path: Path) -> None:
    two_blocks = "example.org {\n bind 127.0.0.1\n reload\n whoami\n}\n. {\n bind 127.0.0.1\n reload 5s\n erratic\n}\n"
    running = await start_server(two_blocks, registry=REGISTRY)
    runtime = running.server.runtime
    runtime.corefile = str(tmp_path / "Corefile")  # something to watch (content does not matter here)
    await running.reconfigure(two_blocks)
    watcher = runtime.shared("reload", lambda: Watcher(runtime))
    assert watcher.task is not None and not watcher.task.done()
    first_task = watcher.task
    assert len({id(instance.config) for instance in watcher.instances}) <= 2
    await running.reconfigure(two_blocks.replace("reload 5s", "reload 7s"))
    await _settle(running)
    assert watcher.task is first_task  # the same watch went on across the reload
    assert len(watcher.instances) == 2 and all(i.config is running.server.config for i in watcher.instances)
    await running.reconfigure(". {\n bind 127.0.0.1\n whoami\n}\n")
    await _settle(running)
    assert watcher.task is None and first_task.cancelled()  # no reload plugin left: no watch
    assert watcher.instances == []


async def _settle(running) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import wait_for

    await wait_for(lambda: not running.server.retiring)


def test_jitter_zero_is_accepted() -> None:
    config = load(". {\n reload 10s 0\n}\n", "Corefile", REGISTRY)
    assert config.blocks[0].plugins[0].interval == 10.0  # type: ignore[attr-defined]


def test_hash_covers_imports_and_ignores_comments(tmp_path: Path) -> None:
    corefile = tmp_path / "Corefile"
    (tmp_path / "extra.conf").write_text("whoami\n")
    text = ". {\n import extra.conf\n}\n"
    first = parsed_sha512(text, corefile)
    assert parsed_sha512("# a comment\n" + text.replace("\n import", "\n    import"), corefile) == first
    (tmp_path / "extra.conf").write_text("erratic\n")
    assert parsed_sha512(text, corefile) != first  # an edit to the imported file is a change
    # ... and the running configuration's hash is computed the same way.
    config = load(text, str(corefile), REGISTRY, directory=tmp_path)
    assert config.sha512 == parsed_sha512(text, corefile)


def test_a_failed_corefile_is_retried_after_a_revert_and_a_second_try() -> None:
    runtime = Runtime()
    runtime.config_sha512 = "A"
    watcher = Watcher(runtime)
    watcher.last_seen = "A"
    decisions = [watcher.should_reload(sha) for sha in ("A", "B", "B", "A", "B")]
    # B fails (the running configuration stays A): not retried while unchanged, but
    # after going back to A and then to B again it is tried once more.
    assert decisions == [False, True, False, False, True]
