"""Corefile parsing: tables of valid inputs and of every error with its line number."""

from __future__ import annotations

from pathlib import Path

import pytest

from resolver.config import load
from resolver.corefile import CorefileError, parse, tokenize
from resolver.plugin import Registry
from tests.helpers import TEST_REGISTRY

# -- keys -------------------------------------------------------------------------------

KEY_CASES = [
    (".", [".:53"]),
    (".:1053", [".:1053"]),
    ("example.org", ["example.org.:53"]),
    ("Example.ORG.", ["example.org.:53"]),
    ("example.org:1053", ["example.org.:1053"]),
    ("dns://example.org:53", ["example.org.:53"]),
    ("dns://.", [".:53"]),
    ("example.org example.net:1054", ["example.org.:53", "example.net.:1054"]),
    ("example.org, example.net", ["example.org.:53", "example.net.:53"]),
    ("example.org,example.net", ["example.org.:53", "example.net.:53"]),
    ("10.0.0.0/24", ["0.0.10.in-addr.arpa.:53"]),
    ("10.0.0.0/8", ["10.in-addr.arpa.:53"]),
    ("10.0.0.0/23", ["0.0.10.in-addr.arpa.:53", "1.0.10.in-addr.arpa.:53"]),
    ("10.0.0.0/24:1053", ["0.0.10.in-addr.arpa.:1053"]),
    ("dns://10.1.2.0/24", ["2.1.10.in-addr.arpa.:53"]),
    ("fd00::/64", ["0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.:53"]),
    ("2001:db8::/30", [f"{n}.b.d.0.1.0.0.2.ip6.arpa.:53" for n in "89ab"]),
]


@pytest.mark.parametrize(("key", "expected"), KEY_CASES)
def test_server_block_keys(key: str, expected: list[str]) -> None:
    config = load(f"{key} {{\n  whoami\n}}\n", "Corefile", TEST_REGISTRY)
    assert [str(k) for k in config.blocks[0].keys] == expected


def test_default_port_comes_from_flag() -> None:
    config = load("example.org {\n whoami\n}\n", "Corefile", TEST_REGISTRY, default_port=1053)
    assert [str(k) for k in config.blocks[0].keys] == ["example.org.:1053"]


# -- structure --------------------------------------------------------------------------


def test_directives_arguments_and_nested_blocks() -> None:
    text = """
# a comment line
example.org {   # trailing comment
    erratic {
        drop 3
        delay 2 50ms
    }
    whoami
    report "quoted arg with spaces" plain
}
"""
    (block,) = parse(text)
    assert [k.text for k in block.keys] == ["example.org"]
    names = [d.name for d in block.directives]
    assert names == ["erratic", "whoami", "report"]
    erratic = block.directives[0]
    assert erratic.line == 4
    assert [(c.name, c.args, c.line) for c in erratic.children] == [("drop", ["3"], 5), ("delay", ["2", "50ms"], 6)]
    assert block.directives[2].args == ["quoted arg with spaces", "plain"]


def test_quoted_strings_escape_and_span_lines() -> None:
    tokens = tokenize('a "say \\"hi\\"" "two\nlines" b', "Corefile")
    assert [(t.text, t.line) for t in tokens] == [("a", 1), ('say "hi"', 1), ("two\nlines", 1), ("b", 2)]


def test_hash_inside_a_token_is_not_a_comment() -> None:
    assert [t.text for t in tokenize("a#b c # d", "Corefile")] == ["a#b", "c"]


def test_environment_substitution() -> None:
    environ = {"ZONE": "example.org", "PORT": "1053", "WORD": "two words"}
    text = "{$ZONE}:{$PORT} {\n report {$WORD} {%ZONE%} {$MISSING:fallback} x{$MISSING}y\n}\n"
    (block,) = parse(text, environ=environ)
    assert block.keys[0].text == "example.org:1053"
    # A substituted value stays one token, spaces and all.
    assert block.directives[0].args == ["two words", "example.org", "fallback", "xy"]


def test_snippets_and_import() -> None:
    text = """
(common) {
    erratic
    report
}
example.org {
    import common
}
example.net {
    import common
    whoami
}
"""
    blocks = parse(text)
    assert [d.name for d in blocks[0].directives] == ["erratic", "report"]
    assert [d.name for d in blocks[1].directives] == ["erratic", "report", "whoami"]
    # Imported lines keep the line numbers of the snippet, so errors point into it.
    assert blocks[0].directives[0].line == 3


def test_import_files_by_glob(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.conf").write_text("whoami\n")
    (tmp_path / "conf.d" / "b.conf").write_text("erratic\n")
    (tmp_path / "zones.conf").write_text("example.net {\n  whoami\n}\n")
    text = ".:1053 {\n  import conf.d/*.conf\n}\nimport zones.conf\n"
    blocks = parse(text, "Corefile", directory=tmp_path)
    assert [d.name for d in blocks[0].directives] == ["whoami", "erratic"]
    assert [k.text for k in blocks[1].keys] == ["example.net"]
    assert blocks[1].directives[0].file.endswith("zones.conf")


def test_import_glob_matching_nothing_is_allowed(tmp_path: Path) -> None:
    (block,) = parse(". {\n import nothing/*.conf\n whoami\n}\n", directory=tmp_path)
    assert [d.name for d in block.directives] == ["whoami"]


def test_single_block_without_braces() -> None:
    config = load(".:1053\nwhoami\n", "Corefile", TEST_REGISTRY)
    assert [p.name for p in config.blocks[0].plugins] == ["whoami"]


def test_plugin_order_is_the_registry_order_not_the_corefile_order() -> None:
    config = load(". {\n report\n second\n first\n}\n", "Corefile", TEST_REGISTRY)
    assert [p.name for p in config.blocks[0].plugins] == ["first", "second", "report"]


def test_sha512_of_the_text() -> None:
    config = load(". {\n whoami\n}\n", "Corefile", TEST_REGISTRY)
    assert len(config.sha512) == 128


# -- errors: every one names file and line ----------------------------------------------

ERROR_CASES = [
    ("unknown directive", ". {\n  whoami\n  whoamii\n}\n", 3, 'unknown directive "whoamii" (did you mean "whoami"?)'),
    ("unknown, no suggestion", ". {\n  zzzz\n}\n", 2, 'unknown directive "zzzz"'),
    ("unclosed block", ". {\n  whoami\n", 1, 'unclosed "{"'),
    ("unclosed nested", ". {\n erratic {\n  drop 2\n}\n", 1, 'unclosed "{"'),
    ("stray closing brace", "}\n", 1, 'unexpected "}"'),
    ("stray closing brace in block", ". {\n whoami\n}\n}\n", 4, 'unexpected "}"'),
    ("unterminated quote", '. {\n  report "abc\n}\n', 2, "unterminated quoted string"),
    ("same zone in two blocks", ". {\n whoami\n}\n.:53 {\n whoami\n}\n", 4, 'zone "." on port 53 is already served'),
    ("same zone twice in one block", "example.org example.org {\n whoami\n}\n", 1, "listed twice in this server block"),
    ("bad port", "example.org:99999 {\n whoami\n}\n", 1, 'invalid port "99999"'),
    ("unsupported transport", "tls://example.org {\n whoami\n}\n", 1, 'transport "tls" is not supported'),
    ("bad network", "10.0.0.0/40 {\n whoami\n}\n", 1, 'invalid network "10.0.0.0/40"'),
    ("bad zone", "a..b {\n whoami\n}\n", 1, 'invalid zone name "a..b"'),
    ("directive twice", ". {\n whoami\n whoami\n}\n", 3, "whoami: given twice in one server block (first at line 2)"),
    ("arguments not taken", ". {\n whoami extra\n}\n", 2, "whoami: takes no arguments"),
    ("bad duration", ". {\n erratic {\n  delay 2 soon\n }\n}\n", 3, 'delay: invalid duration "soon"'),
    ("bad number", ". {\n erratic {\n  drop many\n }\n}\n", 3, 'drop: "many" is not a number'),
    ("unknown option", ". {\n erratic {\n  jitter 2\n }\n}\n", 3, 'erratic: unknown option "jitter"'),
    ("bind needs an address", ". {\n bind\n whoami\n}\n", 2, "bind: expected at least 1 argument, got 0"),
    ("bind bad address", ". {\n bind eth9x\n}\n", 2, '"eth9x" is neither an IP address nor'),
    ("import missing file", ". {\n import nope.conf\n}\n", 2, 'import: no snippet or file named "nope.conf"'),
    ("import without argument", ". {\n import\n}\n", 2, "import takes exactly one argument"),
    ("snippet importing itself", "(loop) {\n import loop\n}\n. {\n import loop\n}\n", 2, "imports itself"),
    ("snippet without brace", "(broken)\n. {\n whoami\n}\n", 1, 'snippet "broken" must be followed by "{"'),
    ("empty Corefile", "# nothing here\n", 1, "no server blocks"),
    ("block opened on its own line", ". {\n whoami\n {\n}\n", 3, 'unexpected "{"'),
    ("second block missing brace", ". {\n whoami\n}\nexample.org\n", 4, 'expected "{" after the server block keys'),
    ("empty quoted key", '"" {\n whoami\n}\n', 1, "empty server block key"),
    ("key that is only a comma", ", {\n whoami\n}\n", 1, "empty server block key"),
    ("non-ASCII digit port", "example.org:\u00b2 {\n whoami\n}\n", 1, "invalid port"),
    ("two ports", "example.org:53:54 {\n whoami\n}\n", 1, 'invalid zone name "example.org:53:54"'),
    ("bracketed address as key", "[::1]:53 {\n whoami\n}\n", 1, "invalid zone name"),
    ("blocks nested too deep", ". {\n" + "x {\n" * 100 + "}\n" * 101, 66, "blocks nested more than 64 deep"),
    ("snippet imported twice", "(s) {\n whoami\n}\n. {\n import s\n import s\n}\n", 2, "whoami: given twice"),
]


@pytest.mark.parametrize(("text", "line", "problem"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors_name_file_line_and_problem(text: str, line: int, problem: str) -> None:
    with pytest.raises(CorefileError) as caught:
        load(text, "Corefile", TEST_REGISTRY)
    message = str(caught.value)
    assert message.startswith(f"Corefile:{line}: "), message
    assert problem in message
    assert "\n" not in message


def test_error_inside_imported_file_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "extra.conf").write_text("whoami\nbogus\n")
    with pytest.raises(CorefileError) as caught:
        load(". {\n import extra.conf\n}\n", "Corefile", TEST_REGISTRY, directory=tmp_path)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "extra.conf") + ":2: unknown directive"), message


def test_import_cycle_between_files(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text("import b.conf\n")
    (tmp_path / "b.conf").write_text("import a.conf\n")
    with pytest.raises(CorefileError) as caught:
        parse(". {\n import a.conf\n}\n", "Corefile", directory=tmp_path)
    assert "import cycle" in str(caught.value)


def test_same_zone_on_different_ports_is_fine() -> None:
    config = load(". {\n whoami\n}\n.:1053 {\n whoami\n}\n", "Corefile", TEST_REGISTRY)
    assert len(config.blocks) == 2


def test_same_zone_same_port_on_different_bind_addresses_is_fine() -> None:
    text = ". {\n bind 127.0.0.1\n whoami\n}\n. {\n bind 127.0.0.2\n whoami\n}\n"
    assert len(load(text, "Corefile", TEST_REGISTRY).blocks) == 2


def test_real_registry_lists_whoami() -> None:
    registry = Registry.default()
    assert "whoami" in registry
    assert registry.suggest("whoam") == "whoami"


def test_import_of_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "binary.conf").write_bytes(b"\xff\xfe whoami\n")
    with pytest.raises(CorefileError) as caught:
        parse(". {\n import binary.conf\n}\n", "Corefile", directory=tmp_path)
    assert str(caught.value) == 'Corefile:2: import: "' + str(tmp_path / "binary.conf") + '" is not UTF-8 text'
