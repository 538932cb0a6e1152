"""The kubernetes stanza: CoreDNS's syntax and defaults, one-line errors, label selectors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from plugins.kubernetes import Kubernetes
from plugins.kubernetes.settings import Settings, parse_selector
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from resolver.runtime import Runtime
from resolver.server import Server

REGISTRY = Registry.default()
ROOT = Path(__file__).resolve().parent.parent


def settings_of(body: str, keys: str = "cluster.local:0", file: str = "Corefile", environ=None) -> Settings:
    config = load(f"{keys} {{\n{body}\n}}\n", file, REGISTRY, default_port=0, environ=environ or {})
    plugin = config.blocks[0].find("kubernetes")
    assert isinstance(plugin, Kubernetes)
    return plugin.settings


def error_of(body: str, keys: str = "cluster.local:0") -> str:
    with pytest.raises(CorefileError) as caught:
        load(f"{keys} {{\n{body}\n}}\n", "Corefile", REGISTRY, default_port=0, environ={})
    return str(caught.value)


def test_defaults_are_coredns_defaults() -> None:
    settings = settings_of("kubernetes", keys="cluster.local:0 in-addr.arpa:0")
    assert settings.zones == ["cluster.local.", "in-addr.arpa."]
    assert settings.ttl == 5
    assert settings.pods == "disabled" and not settings.watch_pods
    assert settings.startup_timeout == 5.0
    assert settings.fallthrough is None
    assert settings.namespaces == [] and settings.labels is None and settings.namespace_labels is None
    assert not settings.endpoint_pod_names and not settings.noendpoints and not settings.ignore_empty_service
    assert settings.manifests is None and settings.endpoint is None and settings.kubeconfig is None


def test_every_option(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    body = """\
    kubernetes cluster.local 10.0.0.0/16 {
        endpoint https://10.0.0.1:6443
        tls cert.pem key.pem ca.pem
        kubeconfig kube.conf ctx
        namespaces Demo other
        labels app in (web, db), !canary
        pods local node-7
        endpoint_pod_names
        ttl 0
        noendpoints
        fallthrough in-addr.arpa
        ignore empty_service
        startup_timeout 1m30s
        manifests m
    }"""
    settings = settings_of(body, keys=".:0", file=str(tmp_path / "Corefile"))
    assert settings.zones == ["cluster.local.", "0.10.in-addr.arpa."]
    assert settings.endpoint == "https://10.0.0.1:6443"
    assert settings.tls == (str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), str(tmp_path / "ca.pem"))
    assert settings.kubeconfig == (str(tmp_path / "kube.conf"), "ctx")
    assert settings.namespaces == ["demo", "other"]
    assert settings.labels == "app in (web, db), !canary"
    assert settings.pods == "local" and settings.pods_node == "node-7" and settings.watch_pods
    assert settings.endpoint_pod_names and settings.noendpoints and settings.ignore_empty_service
    assert settings.ttl == 0
    assert settings.fallthrough == ["in-addr.arpa."]
    assert settings.startup_timeout == 90.0
    assert settings.manifests == str(tmp_path / "m")  # relative to the Corefile's directory


def test_fallthrough_without_zones_is_everything_and_pods_local_takes_the_environment() -> None:
    settings = settings_of(
        "kubernetes {\n fallthrough\n pods local {$NODE_NAME}\n namespace_labels team=a\n}",
        environ={"NODE_NAME": "worker-3"},
    )
    assert settings.fallthrough == ["."]
    assert settings.pods_node == "worker-3"
    assert settings.namespace_labels == "team=a"


@pytest.mark.parametrize(
    ("mode", "watched"), [("disabled", False), ("insecure", False), ("verified", True), ("local node-1", True)]
)
def test_pods_are_watched_only_by_the_modes_that_look_them_up(mode: str, watched: bool) -> None:
    """As CoreDNS (its pod watch is for verified only): insecure answers the address a
    name spells, so it needs no cluster-wide pod watch; autopath may still ask for one."""
    assert settings_of(f"kubernetes {{\n pods {mode}\n}}").watch_pods is watched
    assert Settings(zones=["cluster.local."], pods=mode.split()[0]).watch_pods is watched


def test_several_endpoints_use_the_first() -> None:
    assert settings_of("kubernetes {\n endpoint http://a:1 http://b:2\n}").endpoint == "http://a:1"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("kubernetes in-addr.arpa", "Corefile:2: kubernetes: non-reverse zone name must be used"),
        ("kubernetes bad..zone", 'Corefile:2: kubernetes: invalid zone "bad..zone"'),
        ("kubernetes {\n endpoint\n}", "Corefile:3: endpoint: expected at least 1 argument"),
        ("kubernetes {\n endpoint 10.0.0.1\n}", 'Corefile:3: endpoint: "10.0.0.1" is not a URL'),
        ("kubernetes {\n tls a b\n}", "Corefile:3: tls: expected exactly 3 arguments, got 2"),
        ("kubernetes {\n kubeconfig\n}", "Corefile:3: kubeconfig: expected 1 to 2 arguments, got 0"),
        ("kubernetes {\n kubeconfig a b c\n}", "Corefile:3: kubeconfig: expected 1 to 2 arguments, got 3"),
        ("kubernetes {\n namespaces\n}", "Corefile:3: namespaces: expected at least 1 argument"),
        ("kubernetes {\n labels\n}", "Corefile:3: labels: expected at least 1 argument"),
        ("kubernetes {\n labels app in web\n}", "Corefile:3: labels: unable to parse label selector value"),
        ("kubernetes {\n namespace_labels a=b=c\n}", "Corefile:3: namespace_labels: unable to parse"),
        ("kubernetes {\n pods bogus\n}", "Corefile:3: pods: wrong value for pods: bogus, must be one of"),
        ("kubernetes {\n pods\n}", "Corefile:3: pods: expected 1 to 2 arguments, got 0"),
        ("kubernetes {\n pods local\n}", "Corefile:3: pods: pods local needs the NODE name"),
        ("kubernetes {\n pods verified x\n}", "Corefile:3: pods: pods verified takes no other argument"),
        ("kubernetes {\n endpoint_pod_names yes\n}", "Corefile:3: endpoint_pod_names: expected exactly 0 arguments"),
        ("kubernetes {\n ttl\n}", "Corefile:3: ttl: expected exactly 1 argument, got 0"),
        ("kubernetes {\n ttl abc\n}", 'Corefile:3: ttl: "abc" is not a number'),
        ("kubernetes {\n ttl -1\n}", "Corefile:3: ttl: ttl must be in range [0, 3600]: -1"),
        ("kubernetes {\n ttl 3601\n}", "Corefile:3: ttl: ttl must be in range [0, 3600]: 3601"),
        ("kubernetes {\n noendpoints now\n}", "Corefile:3: noendpoints: expected exactly 0 arguments, got 1"),
        ("kubernetes {\n ignore\n}", "Corefile:3: ignore: expected exactly 1 argument, got 0"),
        ("kubernetes {\n ignore empty\n}", "Corefile:3: ignore: unable to parse ignore value: 'empty'"),
        ("kubernetes {\n startup_timeout soon\n}", 'Corefile:3: startup_timeout: invalid duration "soon"'),
        ("kubernetes {\n manifests\n}", "Corefile:3: manifests: expected exactly 1 argument, got 0"),
        ("kubernetes {\n manifests /nonexistent/dir\n}", "Corefile:3: manifests: manifests directory /nonexistent"),
        ("kubernetes {\n resyncperiod 30s\n}", 'Corefile:3: kubernetes: unknown option "resyncperiod"'),
        ("kubernetes {\n ttl 5\n ttl 6\n}", "Corefile:4: ttl: given twice (first at line 3)"),
        ("kubernetes {\n ttl 5 {\n }\n}", "Corefile:3: ttl: takes no block"),
        (
            "kubernetes {\n namespaces a\n namespace_labels x=y\n}",
            "Corefile:2: kubernetes: namespaces and namespace_labels cannot both be set",
        ),
        ("kubernetes\nkubernetes", "Corefile:3: kubernetes: given twice in one server block (first at line 2)"),
    ],
)
def test_errors_are_one_line_with_file_and_line(body: str, message: str) -> None:
    error = error_of(body)
    assert error.startswith(message), error
    assert "\n" not in error


def test_manifests_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert "is not a directory" in error_of(f"kubernetes {{\n manifests {tmp_path / 'file'}\n}}")


# -- label selectors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "labels", "matches"),
    [
        ("app=web", {"app": "web"}, True),
        ("app==web", {"app": "db"}, False),
        ("app!=web", {"app": "db"}, True),
        ("app!=web", {}, True),  # a missing key is not equal to anything
        ("app in (web, db)", {"app": "db"}, True),
        ("app in (web,db)", {"app": "cache"}, False),
        ("app notin (web)", {}, True),
        ("app notin (web)", {"app": "web"}, False),
        ("app", {"app": ""}, True),
        ("app", {}, False),
        ("!app", {}, True),
        ("!app", {"app": "x"}, False),
        ("app=web,tier=front", {"app": "web", "tier": "front"}, True),
        ("app=web, tier=front", {"app": "web"}, False),
        ("example.com/team=a", {"example.com/team": "a"}, True),
        ("app=", {"app": ""}, True),
        # As Kubernetes parses sets: an empty place in one is the empty value
        ("app in (a,,b)", {"app": ""}, True),
        ("app in (a,,b)", {"app": "b"}, True),
        ("app in (a,)", {"app": ""}, True),
        ("app in ()", {"app": ""}, True),
        ("app in ()", {"app": "a"}, False),
        ("app notin (,a)", {"app": ""}, False),
    ],
)
def test_selector_semantics(text: str, labels: dict[str, str], matches: bool) -> None:
    assert parse_selector(text).matches(labels) is matches


@pytest.mark.parametrize(
    "text", ["app in web", "app in (", "=web", "app=web,", "app >= 3", "a=b=c", ",", "app in (web db)", "app in (a,b"]
)
def test_selector_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_selector(text)


# -- which source ---------------------------------------------------------------------------------


def test_manifests_only_never_imports_the_kubernetes_client(tmp_path: Path) -> None:
    """Startup time and memory: a manifests Corefile must not load kubernetes_asyncio."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from resolver.config import load
        from resolver.plugin import Registry
        from resolver.server import Server
        from resolver.runtime import Runtime

        async def main():
            runtime = Runtime()
            text = ".:0 {{\\n bind 127.0.0.1\\n kubernetes cluster.local {{\\n manifests {tmp_path}\\n }}\\n}}\\n"
            config = load(text, "Corefile", Registry.default(), default_port=0, runtime=runtime)
            server = Server(runtime)
            await server.apply(config)
            await server.shutdown()
            print("kubernetes_asyncio" in sys.modules)

        asyncio.run(main())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


async def test_a_client_that_cannot_be_configured_is_a_one_line_error_at_start(tmp_path: Path) -> None:
    text = f".:0 {{\n bind 127.0.0.1\n kubernetes cluster.local {{\n  kubeconfig {tmp_path / 'missing'}\n }}\n}}\n"
    runtime = Runtime()
    config = load(text, "Corefile", REGISTRY, default_port=0, runtime=runtime)
    server = Server(runtime)
    try:
        with pytest.raises(CorefileError) as caught:
            await server.apply(config)
    finally:
        await server.shutdown()
    assert str(caught.value).startswith("Corefile:3: kubernetes: kubeconfig ")
    assert "\n" not in str(caught.value)
