"""Corefile lexer and parser: text in, server blocks of directives out.

The syntax is CoreDNS's (inherited from Caddy 1):

    # comment
    (snippet) {            # a reusable group of lines
        errors
    }
    example.org:1053 10.0.0.0/24 {
        import snippet     # or: import other/*.conf
        forward . "{$UPSTREAM}" {
            max_fails 3
        }
    }

Tokens are separated by white space; ``"..."`` quotes a token (spaces, newlines and
``\\"`` allowed); ``#`` starts a comment at the start of a token. The first token of a
line is a directive, the rest of that line its arguments, and a ``{`` ending the line
opens its block. ``{$NAME}`` (or ``{%NAME%}``) inside a token is replaced by the
environment variable, ``{$NAME:default}`` with a default. A single server block may omit
its braces. Every error carries the file and line it is about: ``Corefile:12: ...``.

This module knows syntax only; which directives exist and what their arguments mean is
the plugins' business (``resolver.config``).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

MAX_IMPORT_DEPTH = 32
MAX_NESTING = 64  # blocks inside blocks; deeper is surely a mistake (and would exhaust the stack)


class CorefileError(Exception):
    """A problem a user can fix in the Corefile; ``str()`` is the one-line message."""

    def __init__(self, file: str, line: int, problem: str) -> None:
        # Line 0 means the file as a whole (it cannot be read, say).
        super().__init__(f"{file}:{line}: {problem}" if line else f"{file}: {problem}")
        self.file = file
        self.line = line
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    file: str
    line: int
    quoted: bool = False
    #: Which pasting of a snippet or file this token came from: two imports of the same
    #: snippet carry the same file and line, and must still be two separate lines.
    origin: int = 0

    def error(self, problem: str) -> CorefileError:
        return CorefileError(self.file, self.line, problem)

    def same_line(self, other: Token) -> bool:
        return self.line == other.line and self.file == other.file and self.origin == other.origin


@dataclass(slots=True)
class Directive:
    """One line of a server block (or of a nested block): a name and its arguments."""

    name: str
    args: list[str]
    file: str
    line: int
    block: list[Directive] | None = None  # the lines inside ``{ }``, when there is one

    def error(self, problem: str, line: int | None = None) -> CorefileError:
        """A ``CorefileError`` pointing at this directive, prefixed with its name."""
        return CorefileError(self.file, self.line if line is None else line, f"{self.name}: {problem}")

    @property
    def children(self) -> list[Directive]:
        return self.block or []


@dataclass(slots=True)
class ServerBlockSpec:
    """A server block as written: its keys and its directive lines."""

    keys: list[Token]
    directives: list[Directive] = field(default_factory=list)

    @property
    def file(self) -> str:
        return self.keys[0].file

    @property
    def line(self) -> int:
        return self.keys[0].line


def port_number(text: str) -> int | None:
    """A port as a Corefile or a flag writes it (ASCII digits, 0 to 65535), else None.

    ``str.isdigit`` alone accepts digits such as "²" that ``int`` then rejects.
    """
    if text.isascii() and text.isdigit() and int(text) <= 65535:
        return int(text)
    return None


# -- lexing -------------------------------------------------------------------------------


def tokenize(text: str, file: str) -> list[Token]:
    """Split Corefile text into tokens that remember where they came from."""
    tokens: list[Token] = []
    line = 1
    i = 0
    size = len(text)
    while i < size:
        char = text[i]
        if char == "\n":
            line += 1
            i += 1
        elif char.isspace():
            i += 1
        elif char == "#":
            while i < size and text[i] != "\n":
                i += 1
        elif char == '"':
            start_line = line
            i += 1
            chars: list[str] = []
            while True:
                if i >= size:
                    raise CorefileError(file, start_line, "unterminated quoted string")
                char = text[i]
                if char == "\\" and i + 1 < size and text[i + 1] in '"\\':
                    chars.append(text[i + 1])
                    i += 2
                    continue
                if char == '"':
                    i += 1
                    break
                if char == "\n":
                    line += 1
                chars.append(char)
                i += 1
            tokens.append(Token("".join(chars), file, start_line, quoted=True))
        else:
            start = i
            while i < size and not text[i].isspace() and text[i] != '"':
                i += 1
            tokens.append(Token(text[start:i], file, line))
    return tokens


_ENV = re.compile(r"\{\$([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}|\{%([A-Za-z_][A-Za-z0-9_]*)%\}")


def substitute_env(text: str, environ: Mapping[str, str]) -> str:
    """Replace ``{$NAME}``, ``{$NAME:default}`` and ``{%NAME%}`` with environment values."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        return environ.get(name, default if default is not None else "")

    return _ENV.sub(value, text) if "{" in text else text


# -- snippets and imports -----------------------------------------------------------------


class _Source:
    """Expands ``import`` lines and collects snippets while walking the tokens."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.snippets: dict[str, list[Token]] = {}
        self.pastes = 0

    def read_file(self, token: Token, path: Path, display: str, importing: tuple[str, ...]) -> list[Token]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise token.error(f'import: "{display}" is not UTF-8 text') from None
        except OSError as exc:
            raise token.error(f'import: cannot read "{display}": {exc.strerror or exc}') from None
        return self.expand(self._pasted(tokenize(text, display)), path.parent, (*importing, str(path.resolve())))

    def _pasted(self, tokens: list[Token]) -> list[Token]:
        """The tokens of one pasting, marked so they never join lines of another one."""
        self.pastes += 1
        return [Token(t.text, t.file, t.line, t.quoted, self.pastes) for t in tokens]

    def expand(self, tokens: list[Token], directory: Path, importing: tuple[str, ...]) -> list[Token]:
        """Substitute the environment, record snippets, and splice in imports."""
        out: list[Token] = []
        depth = 0  # snippets may only be defined at the top level
        i = 0
        while i < len(tokens):
            token = tokens[i]
            starts_line = i == 0 or not token.same_line(tokens[i - 1])
            if starts_line and depth == 0 and not token.quoted and _is_snippet_name(token.text):
                i = self._define_snippet(tokens, i)
                continue
            if starts_line and not token.quoted and token.text == "import":
                args = [t for t in tokens[i + 1 :] if t.same_line(token)]
                if len(args) != 1:
                    raise token.error("import takes exactly one argument: a snippet name or a file pattern")
                out.extend(self._import(token, substitute_env(args[0].text, self.environ), directory, importing))
                i += 1 + len(args)
                continue
            if not token.quoted and token.text == "{":
                depth += 1
            elif not token.quoted and token.text == "}":
                depth -= 1
            elif "{" in token.text:
                token = Token(substitute_env(token.text, self.environ), token.file, token.line, token.quoted)
            out.append(token)
            i += 1
        return out

    def _define_snippet(self, tokens: list[Token], i: int) -> int:
        head = tokens[i]
        name = head.text[1:-1]
        if i + 1 >= len(tokens) or tokens[i + 1].text != "{" or not tokens[i + 1].same_line(head):
            raise head.error(f'snippet "{name}" must be followed by "{{" on the same line')
        end = _matching_brace(tokens, i + 1)
        if name in self.snippets:
            raise head.error(f'snippet "{name}" is defined twice')
        self.snippets[name] = tokens[i + 2 : end]
        return end + 1

    def _import(self, token: Token, pattern: str, directory: Path, importing: tuple[str, ...]) -> list[Token]:
        if len(importing) > MAX_IMPORT_DEPTH:
            raise token.error("imports nested too deeply (is there an import cycle?)")
        if pattern in self.snippets:
            key = f"snippet:{pattern}"
            if key in importing:
                raise token.error(f'snippet "{pattern}" imports itself')
            return self.expand(self._pasted(self.snippets[pattern]), directory, (*importing, key))
        full = pattern if os.path.isabs(pattern) else str(directory / pattern)
        matches = sorted(glob.glob(full))
        if not matches:
            if glob.has_magic(pattern):
                return []  # a glob matching nothing is allowed, as in CoreDNS
            raise token.error(f'import: no snippet or file named "{pattern}"')
        out: list[Token] = []
        for match in matches:
            path = Path(match)
            if str(path.resolve()) in importing:
                raise token.error(f'import cycle: "{pattern}" imports itself')
            if path.is_dir():
                continue
            out.extend(self.read_file(token, path, _display_path(match), importing))
        return out


def _is_snippet_name(text: str) -> bool:
    return len(text) > 2 and text.startswith("(") and text.endswith(")")


def _display_path(path: str) -> str:
    """How error messages name an imported file: relative to the working directory when
    it lies below it, else absolute (never a confusing ``../../`` path)."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative.startswith("..") else relative


def _matching_brace(tokens: list[Token], open_index: int) -> int:
    depth = 0
    for index in range(open_index, len(tokens)):
        token = tokens[index]
        if token.quoted:
            continue
        if token.text == "{":
            depth += 1
        elif token.text == "}":
            depth -= 1
            if depth == 0:
                return index
    raise tokens[open_index].error('unclosed "{"')


# -- parsing ------------------------------------------------------------------------------


def parse(
    text: str, file: str = "Corefile", environ: Mapping[str, str] | None = None, directory: Path | None = None
) -> list[ServerBlockSpec]:
    """Parse Corefile ``text`` into server blocks; raise ``CorefileError`` on any problem."""
    source = _Source(os.environ if environ is None else environ)
    base = directory if directory is not None else Path(file).resolve().parent
    tokens = source.expand(tokenize(text, file), base, (str(Path(file).resolve()),))
    return _Parser(tokens, file).server_blocks()


def parse_file(path: str, environ: Mapping[str, str] | None = None) -> list[ServerBlockSpec]:
    """Read and parse a Corefile; unreadable files are reported like syntax errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CorefileError(path, 0, f"cannot read Corefile: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CorefileError(path, 0, "the Corefile is not UTF-8 text") from None
    return parse(text, path, environ)


class _Parser:
    def __init__(self, tokens: list[Token], file: str) -> None:
        self.tokens = tokens
        self.file = file
        self.pos = 0

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def server_blocks(self) -> list[ServerBlockSpec]:
        blocks: list[ServerBlockSpec] = []
        while self.peek() is not None:
            keys = self.keys()
            brace = self.peek()
            if brace is not None and brace.text == "{" and not brace.quoted:
                self.take()
                directives = self.lines(closing=brace)
            elif not blocks:
                # A lone server block may leave out its braces: the rest of the file is its body.
                directives = self.lines(closing=None)
                if self.peek() is not None:
                    raise self.peek().error("unexpected token after server block")  # type: ignore[union-attr]
            else:
                raise keys[-1].error('expected "{" after the server block keys')
            blocks.append(ServerBlockSpec(keys, directives))
        return blocks

    def keys(self) -> list[Token]:
        first = self.take()
        if first.text in ("{", "}") and not first.quoted:
            raise first.error(f'unexpected "{first.text}" where a server block key was expected')
        keys = [first]
        # Keys go on while they are on the same line, or the previous one ended in a comma.
        while (token := self.peek()) is not None and not (token.text == "{" and not token.quoted):
            if not (token.same_line(keys[-1]) or keys[-1].text.endswith(",")):
                break
            keys.append(self.take())
        split = _split_commas(keys)
        if not split:
            raise first.error("empty server block key")
        return split

    def lines(self, closing: Token | None, depth: int = 0) -> list[Directive]:
        if depth > MAX_NESTING:
            raise (closing or self.tokens[0]).error(f"blocks nested more than {MAX_NESTING} deep")
        directives: list[Directive] = []
        while True:
            token = self.peek()
            if token is None:
                if closing is not None:
                    raise closing.error('unclosed "{"')
                return directives
            if token.text == "}" and not token.quoted:
                if closing is None:
                    raise token.error('unexpected "}"')
                self.take()
                return directives
            if token.text == "{" and not token.quoted:
                raise token.error('unexpected "{": a block must follow a directive on the same line')
            directives.append(self.directive(depth))

    def directive(self, depth: int = 0) -> Directive:
        head = self.take()
        args: list[str] = []
        block: list[Directive] | None = None
        while (token := self.peek()) is not None and token.same_line(head):
            if token.text == "{" and not token.quoted:
                self.take()
                block = self.lines(closing=token, depth=depth + 1)
                break
            if token.text == "}" and not token.quoted:
                break
            args.append(self.take().text)
        return Directive(head.text, args, head.file, head.line, block)


def _split_commas(keys: list[Token]) -> list[Token]:
    out: list[Token] = []
    for key in keys:
        for part in key.text.split(","):
            if part:
                out.append(Token(part, key.file, key.line, key.quoted))
    return out


def iter_directives(directives: list[Directive]) -> Iterator[Directive]:
    """Every directive and nested directive, depth first (for tools and tests)."""
    for directive in directives:
        yield directive
        yield from iter_directives(directive.children)


def canonical(blocks: list[ServerBlockSpec]) -> str:
    """The parsed Corefile as one text: imports and environment expanded, comments,
    layout and quoting gone. Its hash says whether a reload would change anything (an
    edit to an imported file does; a comment does not), as CoreDNS's reload compares."""
    lines: list[str] = []

    def emit(directives: list[Directive], depth: int) -> None:
        for directive in directives:
            lines.append("  " * depth + " ".join(repr(word) for word in (directive.name, *directive.args)))
            if directive.block is not None:
                lines.append("  " * depth + "{")
                emit(directive.block, depth + 1)
                lines.append("  " * depth + "}")

    for block in blocks:
        lines.append(" ".join(repr(key.text) for key in block.keys) + " {")
        emit(block.directives, 1)
        lines.append("}")
    return "\n".join(lines) + "\n"
