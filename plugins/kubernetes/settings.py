"""What a ``kubernetes`` Corefile stanza said, parsed: shared by the plugin, the sources and
the index, so that the API source and the manifests source read one description.

Also the Kubernetes label selector language (``labels``, ``namespace_labels``): the API
source hands the text to the API server as ``labelSelector``, and the index applies the
parsed form itself, so the manifests source (and a watch that ignores selectors) gives
the same answers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

POD_MODES = ("disabled", "insecure", "verified", "local")
#: The modes that look pods up (``insecure`` answers the address a name spells, as CoreDNS,
#: which watches pods for ``verified`` only: a cluster-wide pod watch is not free).
WATCHED_POD_MODES = ("verified", "local")
DEFAULT_TTL = 5
DEFAULT_STARTUP_TIMEOUT = 5.0


@dataclass
class Settings:
    """The parsed stanza; defaults are CoreDNS's."""

    zones: list[str]  # lower-case, final dot
    endpoint: str | None = None  # URL of the API server
    tls: tuple[str, str, str] | None = None  # CERT KEY CACERT paths
    kubeconfig: tuple[str, str | None] | None = None  # FILE [CONTEXT]
    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    namespace_labels: str | None = None  # label selector expression for namespaces
    labels: str | None = None  # label selector for Services/EndpointSlices
    pods: str = "disabled"  # disabled | insecure | verified | local
    pods_node: str | None = None  # NODE for `pods local NODE`
    endpoint_pod_names: bool = False
    ttl: int = DEFAULT_TTL
    noendpoints: bool = False
    fallthrough: list[str] | None = None
    ignore_empty_service: bool = False
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    manifests: str | None = None  # absolute path of the manifests directory
    watch_pods: bool = False  # the pods mode needs them, or autopath asked (connect())

    def __post_init__(self) -> None:
        if self.pods in WATCHED_POD_MODES:
            self.watch_pods = True

    def namespace_listed(self, namespace: str) -> bool:
        """``namespaces`` allows this namespace (no list: every namespace)."""
        return not self.namespaces or namespace in self.namespaces

    @property
    def label_selector(self) -> Selector | None:
        return parse_selector(self.labels) if self.labels else None

    @property
    def namespace_selector(self) -> Selector | None:
        return parse_selector(self.namespace_labels) if self.namespace_labels else None


# -- label selectors ------------------------------------------------------------------------

# One requirement: key [op value | op (values)] with op one of = == != in notin, or
# [!]key alone (exists / does not exist). Keys may carry a DNS prefix: example.com/tier.
_KEY = r"(?:[A-Za-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?"
_KEY_RE = re.compile(_KEY)
_VALUE_RE = re.compile(_VALUE)
_TOKEN = re.compile(r"\s*(\(|\)|,|!=|==|=|!|[^\s(),!=]+)")


class Selector:
    """A parsed label selector: every requirement must hold (they are ANDed)."""

    __slots__ = ("requirements", "text")

    def __init__(self, text: str, requirements: tuple[tuple[str, str, frozenset[str]], ...]) -> None:
        self.text = text
        #: (key, operator, values); operator one of "in", "notin", "exists", "!exists".
        self.requirements = requirements

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        for key, operator, values in self.requirements:
            present = key in labels
            if operator == "exists":
                ok = present
            elif operator == "!exists":
                ok = not present
            elif operator == "in":
                ok = present and labels[key] in values
            else:  # notin: a missing key matches, as in Kubernetes
                ok = not present or labels[key] not in values
            if not ok:
                return False
        return True

    def __repr__(self) -> str:
        return f"Selector({self.text!r})"


@lru_cache(maxsize=32)
def parse_selector(text: str) -> Selector:
    """Parse Kubernetes selector syntax (``app=web,tier in (a,b),!canary``).

    Raises ValueError with a one-line reason; the plugin's setup turns it into a
    Corefile error, so a typo is found at load and not by an empty answer.
    """
    tokens = _tokenize(text)
    requirements: list[tuple[str, str, frozenset[str]]] = []
    position = 0
    while position < len(tokens):
        requirement, position = _requirement(tokens, position)
        requirements.append(requirement)
        if position < len(tokens):
            if tokens[position] != ",":
                raise ValueError(f'expected "," after a requirement, found "{tokens[position]}"')
            position += 1
            if position == len(tokens):
                raise ValueError("a selector may not end with a comma")
    if not requirements:
        raise ValueError("empty selector")
    return Selector(text, tuple(requirements))


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            break
        tokens.append(match.group(1))
        position = match.end()
        while position < len(text) and text[position].isspace():
            position += 1
    return tokens


def _requirement(tokens: list[str], position: int) -> tuple[tuple[str, str, frozenset[str]], int]:
    if tokens[position] == "!":
        key = _key(tokens, position + 1)
        return (key, "!exists", frozenset()), position + 2
    key = _key(tokens, position)
    position += 1
    if position == len(tokens) or tokens[position] == ",":
        return (key, "exists", frozenset()), position
    operator = tokens[position]
    if operator in ("=", "==", "!="):
        if position + 1 >= len(tokens) or tokens[position + 1] in ",()":
            value = ""
            position += 1
        else:
            value = _value(tokens[position + 1])
            position += 2
        return (key, "notin" if operator == "!=" else "in", frozenset((value,))), position
    if operator in ("in", "notin"):
        if position + 1 >= len(tokens) or tokens[position + 1] != "(":
            raise ValueError(f'expected "(" after "{operator}"')
        values, position = _values(tokens, position + 2)
        return (key, operator, frozenset(values)), position
    raise ValueError(f'"{operator}" is not a valid label selector operator')


def _values(tokens: list[str], position: int) -> tuple[set[str], int]:
    """The values of an ``in``/``notin`` set, from just after its ``(`` to past its ``)``.

    As Kubernetes reads them (the API server gets the same text): values are separated
    by commas, and an empty place is the empty value (``()``, ``(a,,b)``, ``(a,)``), but
    two values without a comma between them are an error.
    """
    values: set[str] = set()
    expecting = True  # at the start, or just after a comma
    while True:
        if position >= len(tokens):
            raise ValueError('missing ")"')
        token = tokens[position]
        position += 1
        if token in (",", ")"):
            if expecting:
                values.add("")
            if token == ")":
                return values, position
            expecting = True
        elif expecting:
            values.add(_value(token))
            expecting = False
        else:
            raise ValueError(f'expected "," or ")" after a value, found "{token}"')


def _key(tokens: list[str], position: int) -> str:
    if position >= len(tokens):
        raise ValueError("missing label key")
    key = tokens[position]
    if not _KEY_RE.fullmatch(key) or len(key.rsplit("/", 1)[-1]) > 63:
        raise ValueError(f'invalid label key "{key}"')
    return key


def _value(text: str) -> str:
    if not _VALUE_RE.fullmatch(text) or len(text) > 63:
        raise ValueError(f'invalid label value "{text}"')
    return text
