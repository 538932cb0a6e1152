"""Scale benchmark of the kubernetes plugin's API source, run by hand: ``python -m bench.kubernetes``.

Loads 10,000 Services, 10,000 EndpointSlices and 50,000 Pods (plus their Namespaces) into
the fake API server of ``tests/kubeapi.py`` (in this process, on 127.0.0.1), with the shapes
the real API returns: metadata with labels, annotations (kubectl's last-applied
configuration), ownerReferences and managedFields, full specs and statuses. Then it starts
the real ``resolver`` command as a subprocess with a kubernetes block
(``endpoint http://127.0.0.1:PORT``, ``pods verified``, so all four kinds are watched) and
measures:

* startup: process start until its ready endpoint answers (the API server holds every
  request meanwhile, so nothing has been listed yet);
* RSS before the sync (then: interpreter, plugins, client, an empty index);
* sync: from releasing the held requests until ready says 200 (the first full list of
  every kind, paginated 500 at a time, through the index);
* RSS right after the sync, its peak during the sync (VmHWM), and after settling;
* queries answered correctly afterwards (services, headless endpoints, SRV, pods, PTR,
  NXDOMAIN), over UDP with dnspython;
* relists (``--relists`` rounds, default 2): the fake API compacts its history and cuts
  every watch, so each kind resumes, gets 410 Gone and lists again (at its last
  resourceVersion, unpaged, as from the real server's watch cache). Per round: the time
  until every kind is listed and watching again, the peak RSS during it (VmHWM, reset
  first) and the RSS after, and the latency of DNS queries answered meanwhile, from a
  probe process sending one query every 5 ms (p50, p99, max), beside the same probe on the
  idle server.

The same is done first with an empty cluster, as the baseline. CoreDNS's sizing rule for
this load is (pods + services) / 1000 + 54 MB = 114 MB. Prints a table and writes
bench/results/kubernetes.json. Loopback only; bounded in time; stops what it started, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.kubeapi, when run from elsewhere

from tests.kubeapi import FakeKubeAPI  # noqa: E402

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 60.0
SYNC_TIMEOUT = 240.0
RELIST_TIMEOUT = 240.0
PROBE_IDLE_SECONDS = 3.0
#: The kinds the benchmark's Corefile makes the resolver watch (pods verified: all four).
KINDS = ("/api/v1/namespaces", "/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices", "/api/v1/pods")
#: Attempts at starting the resolver (two free ports picked here may be taken meanwhile).
START_ATTEMPTS = 3
NAMESPACES = 100
NODES = 100
PODS_PER_SERVICE = 5
HEADLESS_EVERY = 10  # every tenth Service is headless

# -- realistic objects ---------------------------------------------------------------------------
# Bulky parts that are the same for every object are shared (one dict, serialized afresh in
# every response), so this process holds 70k objects in a few hundred MB while the client
# receives every byte the real API would send.

_CREATED = "2024-05-01T10:00:00Z"

_SERVICE_MANAGED = [
    {
        "manager": "kubectl-client-side-apply",
        "operation": "Update",
        "apiVersion": "v1",
        "time": _CREATED,
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {
                "f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                "f:labels": {".": {}, "f:app.kubernetes.io/name": {}, "f:app.kubernetes.io/part-of": {}, "f:team": {}},
            },
            "f:spec": {
                "f:internalTrafficPolicy": {},
                "f:ports": {
                    ".": {},
                    'k:{"port":80,"protocol":"TCP"}': {
                        ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}
                    },
                    'k:{"port":9090,"protocol":"TCP"}': {
                        ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}
                    },
                },
                "f:selector": {},
                "f:sessionAffinity": {},
                "f:type": {},
            },
        },
    }
]  # fmt: skip

_POD_MANAGED = [
    {
        "manager": "kube-controller-manager",
        "operation": "Update",
        "apiVersion": "v1",
        "time": _CREATED,
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {
                "f:generateName": {},
                "f:labels": {".": {}, "f:app.kubernetes.io/name": {}, "f:pod-template-hash": {}},
                "f:ownerReferences": {".": {}, 'k:{"uid":"0"}': {}},
            },
            "f:spec": {
                "f:containers": {
                    'k:{"name":"app"}': {
                        ".": {}, "f:image": {}, "f:imagePullPolicy": {}, "f:name": {},
                        "f:ports": {
                            ".": {},
                            'k:{"containerPort":8080,"protocol":"TCP"}': {
                                ".": {}, "f:containerPort": {}, "f:name": {}, "f:protocol": {}
                            },
                        },
                        "f:readinessProbe": {
                            ".": {}, "f:httpGet": {".": {}, "f:path": {}, "f:port": {}, "f:scheme": {}}
                        },
                        "f:resources": {".": {}, "f:limits": {".": {}, "f:memory": {}},
                                        "f:requests": {".": {}, "f:cpu": {}, "f:memory": {}}},
                        "f:terminationMessagePath": {}, "f:terminationMessagePolicy": {},
                    }
                },
                "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {}, "f:schedulerName": {},
                "f:securityContext": {}, "f:terminationGracePeriodSeconds": {},
            },
        },
    },
    {
        "manager": "kubelet",
        "operation": "Update",
        "apiVersion": "v1",
        "time": _CREATED,
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:status": {
                "f:conditions": {
                    'k:{"type":"ContainersReady"}': {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {},
                                                     "f:status": {}, "f:type": {}},
                    'k:{"type":"Initialized"}': {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {},
                                                 "f:status": {}, "f:type": {}},
                    'k:{"type":"Ready"}': {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {},
                                           "f:status": {}, "f:type": {}},
                },
                "f:containerStatuses": {}, "f:hostIP": {}, "f:hostIPs": {}, "f:phase": {}, "f:podIP": {},
                "f:podIPs": {".": {}, 'k:{"ip":"0"}': {".": {}, "f:ip": {}}}, "f:startTime": {},
            }
        },
        "subresource": "status",
    },
]  # fmt: skip

_POD_SPEC_SHARED = {
    "volumes": [
        {
            "name": "kube-api-access",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [
                        {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
                    ]}},
                ],
                "defaultMode": 420,
            },
        }
    ],
    "containers": [
        {
            "name": "app",
            "image": "registry.example.com/shop/app:1.42.0",
            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
            "resources": {"limits": {"memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
            "volumeMounts": [{"name": "kube-api-access", "readOnly": True,
                              "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"}, "timeoutSeconds": 1,
                               "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3},
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
            "imagePullPolicy": "IfNotPresent",
        }
    ],
    "restartPolicy": "Always",
    "terminationGracePeriodSeconds": 30,
    "dnsPolicy": "ClusterFirst",
    "serviceAccountName": "default",
    "serviceAccount": "default",
    "securityContext": {},
    "schedulerName": "default-scheduler",
    "tolerations": [
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 300},
    ],
    "priority": 0,
    "enableServiceLinks": True,
    "preemptionPolicy": "PreemptLowerPriority",
}  # fmt: skip

_POD_CONDITIONS = [
    {"type": kind, "status": "True", "lastProbeTime": None, "lastTransitionTime": _CREATED}
    for kind in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")
]
_CONTAINER_STATUSES = [
    {
        "name": "app",
        "state": {"running": {"startedAt": _CREATED}},
        "lastState": {},
        "ready": True,
        "restartCount": 0,
        "image": "registry.example.com/shop/app:1.42.0",
        "imageID": "registry.example.com/shop/app@sha256:" + "3f" * 32,
        "containerID": "containerd://" + "a1" * 32,
        "started": True,
    }
]
_SLICE_MANAGED = [
    {
        "manager": "endpointslice-controller.k8s.io",
        "operation": "Update",
        "apiVersion": "discovery.k8s.io/v1",
        "time": _CREATED,
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:addressType": {},
            "f:endpoints": {},
            "f:metadata": {
                "f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
                "f:generateName": {},
                "f:labels": {
                    ".": {}, "f:endpointslice.kubernetes.io/managed-by": {}, "f:kubernetes.io/service-name": {}
                },
                "f:ownerReferences": {".": {}, 'k:{"uid":"0"}': {}},
            },
            "f:ports": {},
        },
    }
]  # fmt: skip


def _uid(kind: int, number: int) -> str:
    return f"{kind:08x}-{number >> 16:04x}-4{number & 0xFFF:03x}-8000-{number:012x}"


def service_ip(number: int) -> str:
    return f"10.96.{number // 250}.{number % 250 + 1}"


def pod_ip(number: int) -> str:
    return f"10.128.{number // 250}.{number % 250 + 1}"


def node_ip(number: int) -> str:
    return f"192.168.{number // 250}.{number % 250 + 1}"


def service_name(number: int) -> tuple[str, str]:
    return f"ns-{number % NAMESPACES:03d}", f"svc-{number:05d}"


def cluster(services: int) -> Iterator[dict[str, Any]]:
    """Namespaces, then per Service: the Service, its Pods and its EndpointSlice."""
    for number in range(NAMESPACES):
        yield {
            "kind": "Namespace",
            "metadata": {"name": f"ns-{number:03d}", "labels": {"kubernetes.io/metadata.name": f"ns-{number:03d}"}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
    pod_number = 0
    for number in range(services):
        namespace, name = service_name(number)
        headless = number % HEADLESS_EVERY == 0
        labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "shop", "team": f"team-{number % 7}"}
        ports = [
            {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
            {"name": "metrics", "protocol": "TCP", "port": 9090, "targetPort": 9090},
        ]
        cluster_ip = "None" if headless else service_ip(number)
        spec = {
            "ports": ports,
            "selector": {"app.kubernetes.io/name": name},
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "type": "ClusterIP",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
        }
        applied = json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"labels": labels, "name": name, "namespace": namespace},
                "spec": {"ports": ports, "selector": spec["selector"], "clusterIP": cluster_ip},
            },
            separators=(",", ":"),
        )
        yield {
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": _uid(1, number),
                "creationTimestamp": _CREATED,
                "labels": labels,
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": applied + "\n"},
                "managedFields": _SERVICE_MANAGED,
            },
            "spec": spec,
            "status": {"loadBalancer": {}},
        }
        template_hash = f"{number * 2654435761 % 16**10:010x}"[:10]
        endpoints = []
        for replica in range(PODS_PER_SERVICE):
            node = pod_number % NODES
            ip = pod_ip(pod_number)
            pod_name = f"{name}-{template_hash}-{replica:05d}"
            yield {
                "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "generateName": f"{name}-{template_hash}-",
                    "namespace": namespace,
                    "uid": _uid(2, pod_number),
                    "creationTimestamp": _CREATED,
                    "labels": {"app.kubernetes.io/name": name, "pod-template-hash": template_hash},
                    "ownerReferences": [
                        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{name}-{template_hash}",
                         "uid": _uid(3, number), "controller": True, "blockOwnerDeletion": True}
                    ],
                    "managedFields": _POD_MANAGED,
                },
                "spec": {**_POD_SPEC_SHARED, "nodeName": f"node-{node:03d}"},
                "status": {
                    "phase": "Running",
                    "conditions": _POD_CONDITIONS,
                    "hostIP": node_ip(node),
                    "hostIPs": [{"ip": node_ip(node)}],
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                    "startTime": _CREATED,
                    "containerStatuses": _CONTAINER_STATUSES,
                    "qosClass": "Burstable",
                },
            }  # fmt: skip
            endpoints.append(
                {
                    "addresses": [ip],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": f"node-{node:03d}",
                    "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod_name, "uid": _uid(2, pod_number)},
                    "zone": f"zone-{node % 3}",
                }
            )
            pod_number += 1
        yield {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {
                "name": f"{name}-{template_hash[:5]}",
                "generateName": f"{name}-",
                "namespace": namespace,
                "uid": _uid(4, number),
                "creationTimestamp": _CREATED,
                "labels": {
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "kubernetes.io/service-name": name,
                    **labels,
                },
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": _CREATED},
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Service", "name": name, "uid": _uid(1, number),
                     "controller": True, "blockOwnerDeletion": True}
                ],
                "managedFields": _SLICE_MANAGED,
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}, {"name": "metrics", "protocol": "TCP",
                                                                          "port": 9090}],
        }  # fmt: skip


# -- measuring -----------------------------------------------------------------------------------


def free_port() -> int:
    """A port free right now. The resolver does not say which port it bound, so ports are
    picked here; one taken before the resolver binds it fails that start, which is retried
    (``START_ATTEMPTS``) with other ports."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the highest RSS the process has had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def ready_status(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_ready(session: aiohttp.ClientSession, url: str, wanted: set[int], proc: Any, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"the resolver exited with status {proc.returncode}")
        status = await ready_status(session, url)
        if status in wanted:
            return status
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {sorted(wanted)} within {timeout:.0f}s")


def checks(services: int) -> list[tuple[str, str, set[str] | None]]:
    """(name, type, expected answers); None expects NXDOMAIN."""
    wanted: list[tuple[str, str, set[str] | None]] = []
    for number in (1, services // 2 + 1, services - 1):
        namespace, name = service_name(number)
        if number % HEADLESS_EVERY == 0:
            continue
        fqdn = f"{name}.{namespace}.svc.cluster.local"
        wanted.append((fqdn, "A", {service_ip(number)}))
        ptr = ".".join(reversed(service_ip(number).split("."))) + ".in-addr.arpa"
        wanted.append((ptr, "PTR", {f"{fqdn}."}))
        wanted.append((f"_http._tcp.{fqdn}", "SRV", {f"0 100 80 {fqdn}."}))
    number = HEADLESS_EVERY * 3  # headless: the A records are its pods' addresses
    namespace, name = service_name(number)
    first_pod = number * PODS_PER_SERVICE
    wanted.append(
        (f"{name}.{namespace}.svc.cluster.local", "A", {pod_ip(first_pod + r) for r in range(PODS_PER_SERVICE)})
    )
    last_pod = services * PODS_PER_SERVICE - 1
    namespace = service_name(services - 1)[0]
    wanted.append((f"{pod_ip(last_pod).replace('.', '-')}.{namespace}.pod.cluster.local", "A", {pod_ip(last_pod)}))
    wanted.append((f"svc-99999.{namespace}.svc.cluster.local", "A", None))
    return wanted


# The latency probe: a separate process (this one also runs the fake API server, whose JSON
# encoding must not count as the resolver's latency). One query every 5 ms until its stdin
# closes (or 300 s pass); prints percentiles in milliseconds as JSON.
_PROBE = """
import json, select, socket, sys, time
import dns.message
port, name = int(sys.argv[1]), sys.argv[2]
wire = dns.message.make_query(name, "A").to_wire()
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(2.0)
latencies, lost, end = [], 0, time.monotonic() + 300
while time.monotonic() < end and not select.select([sys.stdin], [], [], 0)[0]:
    sent = time.monotonic()
    sock.sendto(wire, ("127.0.0.1", port))
    try:
        sock.recv(4096)
        latencies.append(time.monotonic() - sent)
    except OSError:  # a timeout, or refused
        lost += 1
    time.sleep(0.005)
latencies.sort()
def at(share):
    return round(latencies[min(len(latencies) - 1, int(len(latencies) * share))] * 1000, 2) if latencies else None
print(json.dumps({"queries": len(latencies) + lost, "lost": lost, "p50_ms": at(0.5), "p99_ms": at(0.99),
                  "max_ms": round(latencies[-1] * 1000, 1) if latencies else None}))
"""


class Probe:
    """Queries the resolver from another process while something happens."""

    def __init__(self, port: int, name: str) -> None:
        self.port, self.name = port, name
        self.proc: Any = None

    async def __aenter__(self) -> Probe:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PROBE, str(self.port), self.name,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        return self

    async def result(self) -> dict[str, Any]:
        """Stop the probe (close its stdin) and read what it measured."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = await asyncio.wait_for(self.proc.stdout.read(), 30)
        await self.proc.wait()
        return json.loads(out) if out else {}

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/PID/clear_refs``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def relisted(api: FakeKubeAPI, since: int) -> bool:
    """Every kind has listed again since log entry ``since`` and opened its watch after."""
    entries = api.log[since:]
    for path in KINDS:
        listed = [number for number, entry in enumerate(entries) if entry.path == path and not entry.watch]
        if not listed or not any(entry.path == path and entry.watch for entry in entries[listed[-1] :]):
            return False
    return True


async def measure_relists(api: FakeKubeAPI, proc: Any, dns_port: int, rounds: int, probe_name: str) -> list[Any]:
    """Force ``rounds`` relists of every kind; what each cost (see the module docstring)."""
    results: list[Any] = []
    for number in range(rounds):
        deadline = time.monotonic() + RELIST_TIMEOUT
        while api.open_watches() < len(KINDS):
            if time.monotonic() > deadline:
                raise TimeoutError("the watches did not all open again")
            await asyncio.sleep(0.05)
        reset_peak_rss(proc.pid)
        since = len(api.log)
        async with Probe(dns_port, probe_name) as probe:
            started = time.monotonic()
            # Cut the watches, then move on and forget the history: every kind resumes from
            # before the compaction (the new Namespace reaches no watch), so every kind gets 410.
            api.drop_watches()
            api.add({"kind": "Namespace", "metadata": {"name": f"relist-{number}"}})
            api.compact()
            while not relisted(api, since):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"relist {number + 1} did not finish within {RELIST_TIMEOUT:.0f}s")
                await asyncio.sleep(0.02)
            seconds = time.monotonic() - started
            latency = await probe.result()
        peak = peak_rss_mb(proc.pid)
        await asyncio.sleep(1.0)
        results.append(
            {
                "relist_s": round(seconds, 2),
                "rss_peak_mb": round(peak, 1),
                "rss_after_mb": round(rss_mb(proc.pid), 1),
                "latency_during": latency,
            }
        )
        print(f"  relist {number + 1}: {results[-1]}", file=sys.stderr)
    return results


async def ask(port: int, name: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return await dns.asyncquery.udp(query, LOOPBACK, port=port, timeout=3)


async def correct_answers(port: int, services: int) -> tuple[int, int, list[str]]:
    ok, problems = 0, []
    wanted = checks(services)
    for name, rdtype, expected in wanted:
        reply = await ask(port, name, rdtype)
        got = {rdata.to_text() for rrset in reply.answer for rdata in rrset}
        if expected is None:
            good = reply.rcode() == dns.rcode.NXDOMAIN
        else:
            good = reply.rcode() == dns.rcode.NOERROR and got == expected
        ok += good
        if not good:
            problems.append(f"{name} {rdtype}: {dns.rcode.to_text(reply.rcode())} {sorted(got)[:3]}")
    return ok, len(wanted), problems


async def measure(services: int, workdir: Path, relists: int) -> dict[str, Any]:
    """One run: load the fake API, start the resolver held, release, measure."""
    api = FakeKubeAPI()
    built_at = time.monotonic()
    objects = api.load(cluster(services))
    # The fake server's 70k objects are permanent: keep the collector from walking them on
    # every response it encodes (this process must not be the bottleneck being measured).
    gc.collect()
    gc.freeze()
    counts = {plural: len(store) for plural, store in api.objects.items()}
    build_seconds = time.monotonic() - built_at
    await api.start()
    log_path = workdir / f"resolver.{services}.log"
    api.hold()
    result: dict[str, Any] = {"services": counts["services"], "endpointslices": counts["endpointslices"],
                              "pods": counts["pods"], "namespaces": counts["namespaces"]}  # fmt: skip
    proc: Any = None
    try:
        async with aiohttp.ClientSession() as session:
            for attempt in range(START_ATTEMPTS):
                dns_port, ready_port = free_port(), free_port()
                url = f"http://{LOOPBACK}:{ready_port}/ready"
                corefile = write_corefile(workdir / f"Corefile.{services}", api.url, dns_port, ready_port)
                started = time.monotonic()
                with open(log_path, "wb") as log_file:
                    proc = await asyncio.create_subprocess_exec(
                        *(sys.executable, "-m", "resolver", "-conf", str(corefile)),
                        cwd=ROOT,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                    )
                try:
                    await wait_ready(session, url, {200, 503}, proc, START_TIMEOUT)
                    break
                except RuntimeError:  # exited: a port taken meanwhile? Try other ports.
                    if attempt + 1 == START_ATTEMPTS:
                        raise RuntimeError(f"the resolver did not start; see {log_path}") from None
            startup = time.monotonic() - started
            deadline = time.monotonic() + START_TIMEOUT
            while api.held < len(KINDS):  # every kind's first list is in, held
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{api.held} of {len(KINDS)} first lists arrived; see {log_path}")
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # let the process settle
            before = rss_mb(proc.pid)
            released = time.monotonic()
            api.release()
            await wait_ready(session, url, {200}, proc, SYNC_TIMEOUT)
            sync = time.monotonic() - released
            after = rss_mb(proc.pid)
            peak = peak_rss_mb(proc.pid)
            ok, total, problems = await correct_answers(dns_port, services) if services else (0, 0, [])
            await asyncio.sleep(2.0)
            settled = rss_mb(proc.pid)
        served = sum(1 for entry in api.log if not entry.watch)
        probe_name = f"{service_name(1)[1]}.{service_name(1)[0]}.svc.cluster.local"
        async with Probe(dns_port, probe_name) as probe:
            await asyncio.sleep(PROBE_IDLE_SECONDS)
            idle = await probe.result()
        relist_rounds = await measure_relists(api, proc, dns_port, relists, probe_name) if services else []
        result.update(
            {
                "startup_s": round(startup, 2),
                "sync_s": round(sync, 2),
                "start_to_sync_s": round(startup + sync, 2),
                "list_requests": served,
                "rss_before_sync_mb": round(before, 1),
                "rss_after_sync_mb": round(after, 1),
                "rss_peak_mb": round(peak, 1),
                "rss_settled_mb": round(settled, 1),
                "rss_growth_mb": round(settled - before, 1),
                "queries_ok": f"{ok}/{total}",
                "latency_idle": idle,
            }
        )
        if relist_rounds:
            result["relists"] = relist_rounds
        if problems:
            result["query_problems"] = problems
        log_text = log_path.read_text(errors="replace")
        result["log_warnings"] = sum(1 for line in log_text.splitlines() if line.startswith(("[WARNING]", "[ERROR]")))
        print(f"  loaded {objects} objects in {build_seconds:.1f}s; resolver log: {log_path}", file=sys.stderr)
        return result
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await api.stop()
        gc.unfreeze()


def write_corefile(path: Path, api_url: str, dns_port: int, ready_port: int) -> Path:
    path.write_text(
        f"cluster.local:{dns_port} in-addr.arpa:{dns_port} {{\n"
        f"    bind {LOOPBACK}\n"
        f"    ready {LOOPBACK}:{ready_port}\n"
        "    kubernetes cluster.local in-addr.arpa {\n"
        f"        endpoint {api_url}\n"
        "        pods verified\n"
        "        startup_timeout 0s\n"
        "    }\n"
        "}\n"
    )
    return path


async def run(services: int, keep_logs: bool, relists: int) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-kubernetes-"))
    results = []
    for size in (0, services):
        print(f"measuring {size} services ...", file=sys.stderr)
        results.append(await measure(size, workdir, relists))
    if not keep_logs:
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=10_000, help="Services (Pods: 5 each, one EndpointSlice each)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the resolver's log files")
    parser.add_argument("--relists", type=int, default=2, help="forced relists of every kind to measure (0: none)")
    args = parser.parse_args()
    results = asyncio.run(run(args.services, args.keep_logs, max(0, min(args.relists, 10))))
    nested = ("query_problems", "relists", "latency_idle")
    columns = [key for key in results[-1] if key not in nested]
    print(" | ".join(f"{column:>18}" for column in columns))
    for row in results:
        print(" | ".join(f"{row.get(column, '')!s:>18}" for column in columns))
    for row in results:
        idle = row.get("latency_idle", {})
        print(
            f"{row['services']} services, DNS latency idle: p50 {idle.get('p50_ms')} ms, p99 {idle.get('p99_ms')} ms,"
            f" max {idle.get('max_ms')} ms ({idle.get('queries')} queries, {idle.get('lost')} lost)"
        )
        for number, relist in enumerate(row.get("relists", []), 1):
            during = relist["latency_during"]
            print(
                f"  relist {number}: {relist['relist_s']} s, RSS peak {relist['rss_peak_mb']} MB, after"
                f" {relist['rss_after_mb']} MB; DNS latency meanwhile: p50 {during.get('p50_ms')} ms, p99"
                f" {during.get('p99_ms')} ms, max {during.get('max_ms')} ms ({during.get('queries')} queries,"
                f" {during.get('lost')} lost)"
            )
    pods, services = results[-1]["pods"], results[-1]["services"]
    coredns = (pods + services) / 1000 + 54
    print(f"CoreDNS sizing rule for this load: ({pods} + {services}) / 1000 + 54 = {coredns:.0f} MB")
    for row in results:
        for problem in row.get("query_problems", []):
            print(f"wrong answer: {problem}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    document = {
        "python": sys.version.split()[0],
        "coredns_sizing_mb": round(coredns),
        "runs": results,
        "note": "RSS in MiB of the resolver process; sync = first full list of every kind after release;"
        " relists: compact + cut watches, until every kind listed and watches again",
    }
    (out / "kubernetes.json").write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
