"""The manifests source: fill the index from Kubernetes YAML/JSON files, no cluster needed.

``manifests DIR`` reads every ``*.yaml``, ``*.yml`` and ``*.json`` file directly in DIR
(not its subdirectories; names starting with a dot are skipped, so a ConfigMap mounted
as a volume reads as its files). A file may hold several YAML documents, and a document
may be a ``kind: List`` with ``items``. Namespaces, Services, EndpointSlices and Pods
(with their ``status``) are used; other kinds are ignored.

The directory is polled (every ``POLL_INTERVAL`` seconds): when a file's modification
time, size or inode changes (an editor's rename, a ConfigMap update), or files come or
go, the changed files are parsed again (in a thread) and the whole set is applied to the
index as one full list per kind, exactly as the API source relists, so the index's
semantics are the same for both sources. A file that fails to parse is logged in one
line and keeps contributing the objects of its last good version. Applying the whole set
runs on the event loop, in one go (answers never mix two versions): it costs about as
much as a relist of the same objects from the API, which suits the directories this is
for (a laptop, a demo, a few thousand objects), not a copy of a large cluster.

The index counts as synced after the first pass that read the directory: until then
(the directory missing, unreadable, or a ConfigMap not mounted yet), queries that
would be NXDOMAIN get SERVFAIL and ``ready`` says 503, as before an API's first list.

A namespace named by an object but with no Namespace document is created implicitly
(in a cluster it could not be otherwise), so a directory of Services alone answers.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import yaml

from plugins.kubernetes.index import KINDS, Index
from plugins.kubernetes.settings import Settings
from resolver.logs import plugin_logger

log = plugin_logger("kubernetes")

POLL_INTERVAL = 2.0  # seconds between looks at the directory (tests lower it)
SUFFIXES = (".yaml", ".yml", ".json")

Stamp = tuple[int, int, int, int]  # (mtime_ns, ctime_ns, size, inode): any change re-reads
Objects = list[tuple[str, dict[str, Any]]]  # (kind, raw object)

try:  # libyaml's loader is several times faster; the pure-Python one answers the same
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Loader = yaml.SafeLoader


class ManifestsSource:
    """Polls a directory and keeps the index equal to what its files describe."""

    def __init__(self, directory: str, index: Index, interval: float | None = None) -> None:
        self.directory = directory
        self.index = index
        self.interval = POLL_INTERVAL if interval is None else interval
        #: Per file: the stamp last read and the objects of its last good parse.
        self.files: dict[str, tuple[Stamp, Objects]] = {}
        self._unreadable = False

    async def run(self) -> None:
        while True:
            try:
                filled = await self.refresh()
            except Exception:  # never let one bad pass end the source
                log.exception("reading manifests from %s failed", self.directory)
                filled = False
            # Synced only once the directory was read: a directory that is gone, unreadable
            # or not mounted yet must give SERVFAIL and 503 on /ready, not NXDOMAIN for all.
            if filled and not self.index.synced:
                self.index.mark_synced()
            await asyncio.sleep(self.interval)

    async def refresh(self) -> bool:
        """Re-read what changed; True when the index was refilled."""
        stamps = await asyncio.to_thread(scan, self.directory)
        if stamps is None:
            if not self._unreadable:
                log.warning("manifests directory %s cannot be read; keeping the objects last read", self.directory)
                self._unreadable = True
            return False
        self._unreadable = False
        changed = [path for path, stamp in stamps.items() if self.files.get(path, (None,))[0] != stamp]
        gone = [path for path in self.files if path not in stamps]
        if not changed and not gone and self.index.synced:
            return False
        parsed = await asyncio.to_thread(_parse_files, changed)
        for path in gone:
            del self.files[path]
        for path in changed:
            objects, problem = parsed[path]
            if problem is not None:
                log.warning("manifests: %s: %s (keeping its previous objects)", path, problem)
                previous = self.files.get(path)
                # Remember the stamp so the same broken file is not parsed (and logged)
                # on every poll; its last good objects stay.
                self.files[path] = (stamps[path], previous[1] if previous else [])
            else:
                self.files[path] = (stamps[path], objects)
        self._fill()
        return True

    def _fill(self) -> None:
        """Apply every file's objects as one full list per kind (no await in between)."""
        by_kind: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        for _stamp, objects in self.files.values():
            for kind, obj in objects:
                by_kind[kind].append(obj)
        named = {obj["metadata"]["name"] for obj in by_kind["Namespace"] if _has_name(obj)}
        for kind in ("Service", "EndpointSlice", "Pod"):
            for obj in by_kind[kind]:
                namespace = _namespace_of(obj)
                if namespace not in named:
                    named.add(namespace)
                    by_kind["Namespace"].append({"metadata": {"name": namespace}})
        index = self.index
        for kind in KINDS:
            index.begin_list(kind)
            for obj in by_kind[kind]:
                index.apply(kind, "ADDED", obj)
            index.end_list(kind)


def manifests_source(settings: Settings, index: Index, interval: float | None = None) -> ManifestsSource:
    if settings.manifests is None:
        raise ValueError("no manifests directory configured")
    return ManifestsSource(settings.manifests, index, interval)


# -- in a thread: the directory and the files ----------------------------------------------------


def scan(directory: str) -> dict[str, Stamp] | None:
    """The manifest files directly in ``directory`` with their stamps; None if unreadable."""
    stamps: dict[str, Stamp] = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return None
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.lower().endswith(SUFFIXES):
            continue
        try:
            status = os.stat(entry.path)  # through symlinks (ConfigMap volumes)
        except OSError:
            continue
        if not os.path.isfile(entry.path):
            continue
        stamps[entry.path] = (status.st_mtime_ns, status.st_ctime_ns, status.st_size, status.st_ino)
    # The directory may have gone while it was read (files then seem to vanish one by
    # one): that is an unreadable directory, whose objects are kept, not an empty one.
    if not os.path.isdir(directory):
        return None
    return stamps


def _parse_files(paths: list[str]) -> dict[str, tuple[Objects, str | None]]:
    return {path: parse_file(path) for path in paths}


def parse_file(path: str) -> tuple[Objects, str | None]:
    """The objects a file holds, and a one-line problem when it cannot be used at all."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        return [], f"cannot read: {getattr(exc, 'strerror', None) or exc}"
    try:
        if path.lower().endswith(".json"):
            documents: list[Any] = [json.loads(text)]
        else:
            documents = list(yaml.load_all(text, Loader=_Loader))
    except json.JSONDecodeError as exc:
        return [], f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
    except yaml.YAMLError as exc:
        return [], _yaml_problem(exc)
    except (ValueError, RecursionError) as exc:  # libyaml can raise these on odd input
        return [], f"invalid YAML: {exc}"
    objects: Objects = []
    for number, document in enumerate(documents, 1):
        for obj in _flatten(document):
            kind = obj.get("kind")
            if kind in KINDS:
                objects.append((kind, obj))
            elif kind is None and obj:
                log.warning("manifests: %s: document %d has no kind, ignored", path, number)
    return objects, None


def _flatten(document: Any) -> Iterator[dict[str, Any]]:
    """The objects of a document: itself, or the items of a ``kind: List`` (or of an
    API list such as ``ServiceList``, whose items carry no kind of their own)."""
    if not isinstance(document, dict):
        return
    kind = document.get("kind")
    if isinstance(kind, str) and kind.endswith("List"):
        implied = kind[: -len("List")] or None
        items = document.get("items")
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict):
                yield item if "kind" in item or implied is None else {**item, "kind": implied}
        return
    yield document


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: where, and what."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is not None:
        return f"invalid YAML at line {mark.line + 1} column {mark.column + 1}: {problem}"
    return f"invalid YAML: {problem}"


def _has_name(obj: dict[str, Any]) -> bool:
    meta = obj.get("metadata")
    return isinstance(meta, dict) and isinstance(meta.get("name"), str)


def _namespace_of(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata")
    namespace = meta.get("namespace") if isinstance(meta, dict) else None
    return namespace.lower() if isinstance(namespace, str) and namespace else "default"
