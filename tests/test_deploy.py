"""The shipped deployment: manifests that agree with each other, a Corefile the server
accepts, and the node setup script run for real inside a network namespace.

The namespace tests change interfaces and iptables rules, so they run only as root with
``ip netns`` and ``iptables`` available, inside a namespace this test creates and deletes;
the host's own network is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from resolver.config import load
from resolver.plugin import Registry
from resolver.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCRIPT = DEPLOY / "nodelocal-setup.sh"
LOCAL_DNS_IP = "169.254.20.10"


def documents() -> dict[str, dict]:
    """Every object in deploy/*.yaml by "Kind/name"."""
    found: dict[str, dict] = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found[f"{document['kind']}/{document['metadata']['name']}"] = document
    return found


def test_manifests_refer_to_each_other() -> None:
    objects = documents()
    pod = objects["DaemonSet/corefile-resolver"]["spec"]["template"]["spec"]
    assert f"ServiceAccount/{pod['serviceAccountName']}" in objects
    config_map = pod["volumes"][0]["configMap"]["name"]
    assert f"ConfigMap/{config_map}" in objects
    binding = objects["ClusterRoleBinding/corefile-resolver"]
    assert f"ClusterRole/{binding['roleRef']['name']}" in objects
    # The init container runs the script from the image: the Dockerfile must ship it.
    assert "COPY deploy deploy" in (ROOT / "Dockerfile").read_text()
    assert pod["initContainers"][0]["command"][-1].endswith("deploy/nodelocal-setup.sh")


def test_rbac_allows_every_resource_the_plugin_watches() -> None:
    rules = documents()["ClusterRole/corefile-resolver"]["rules"]
    granted = {(group, resource) for rule in rules for group in rule["apiGroups"] for resource in rule["resources"]}
    for needed in [("", "namespaces"), ("", "services"), ("", "pods"), ("discovery.k8s.io", "endpointslices")]:
        assert needed in granted
    assert all(set(rule["verbs"]) == {"list", "watch"} for rule in rules)


def test_the_configmap_corefile_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "node-a")
    corefile = documents()["ConfigMap/corefile-resolver"]["data"]["Corefile"]
    config = load(corefile, "Corefile", Registry.default(), default_port=53, runtime=Runtime())
    names = [[plugin.name for plugin in block.plugins] for block in config.blocks]
    assert "kubernetes" in names[0] and "autopath" in names[0]
    assert all(block.hosts == [LOCAL_DNS_IP] for block in config.blocks)


# -- the setup script, inside a network namespace ---------------------------------------------


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian: iproute2, iptables)"
    return None


needs_netns = pytest.mark.skipif(_netns_missing() is not None, reason=_netns_missing() or "")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"cr-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def inside(netns: str, *command: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in the test's network namespace."""
    return subprocess.run(["ip", "netns", "exec", netns, *command], capture_output=True, text=True, timeout=30)


def rules(netns: str) -> list[str]:
    raw = inside(netns, "iptables", "-w", "-t", "raw", "-S").stdout.splitlines()
    accept = inside(netns, "iptables", "-w", "-t", "filter", "-S").stdout.splitlines()
    return [line for line in raw + accept if LOCAL_DNS_IP in line]


@needs_netns
def test_setup_is_idempotent_and_teardown_removes_everything(netns: str) -> None:
    for _ in range(2):
        result = inside(netns, "sh", str(SCRIPT))
        assert result.returncode == 0, result.stderr
    found = rules(netns)
    assert sorted(line for line in found if "NOTRACK" in line) == sorted(
        f"-A {chain} -{direction} {LOCAL_DNS_IP}/32 -p {proto} -m {proto} --{port} 53 -j NOTRACK"
        for proto in ("udp", "tcp")
        for chain, direction, port in (("PREROUTING", "d", "dport"), ("OUTPUT", "s", "sport"))
    )
    assert len(found) == 8  # and the four ACCEPT rules, each once
    assert f" {LOCAL_DNS_IP}/32 " in inside(netns, "ip", "-o", "addr").stdout

    result = inside(netns, "sh", str(SCRIPT), "teardown")
    assert result.returncode == 0, result.stderr
    assert rules(netns) == []
    assert LOCAL_DNS_IP not in inside(netns, "ip", "-o", "addr").stdout


@needs_netns
def test_the_server_answers_on_the_untracked_address(netns: str, tmp_path: Path) -> None:
    assert inside(netns, "sh", str(SCRIPT)).returncode == 0
    corefile = tmp_path / "Corefile"
    corefile.write_text(f".:53 {{\n    bind {LOCAL_DNS_IP}\n    whoami\n}}\n")
    server = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "resolver", "-conf", str(corefile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = (
            "import dns.message, dns.query;"
            f"r = dns.query.udp(dns.message.make_query('probe.example.', 'A'), '{LOCAL_DNS_IP}', timeout=2);"
            "print(r.additional[0][0].address)"
        )
        deadline = time.monotonic() + 10
        while True:  # until the server listens (a query before that gets no answer)
            answer = inside(netns, sys.executable, "-c", query)
            if answer.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip() == LOCAL_DNS_IP  # whoami: the client came from the node address
    finally:
        server.terminate()
        server.wait(timeout=10)
