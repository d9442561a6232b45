"""The few textual changes that turn a GPU kernel source into host C++ for the emulator.

Compile checks use the exact source (Metal: only MLX's explicit-instantiation line loses its
`[[host_name]] [[kernel]]` attributes, which clang refuses there). The emulator changes:
  - Metal `threadgroup T x[N];` and CUDA `__shared__ T x[N];` inside functions become
    `static` (one copy per block, shared by its threads) and are followed by
    `::bbemu::touch_shared(&x, sizeof(x));`, which fills them with 0xff bytes (NaN) when the
    first thread of each block gets there: reading shared memory this block never wrote
    gives garbage, as on the GPU, instead of the previous block's values.
  - CUDA `extern __shared__ T x[];` becomes a static array of the launch's dynamic
    shared-memory size (two different extern names do not alias here as they do on the GPU).
Everything else (the kernel body, helpers, their #ifdefs) compiles as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<pp>\#[^\n]*(?:\\\n[^\n]*)*)
  | (?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
  | (?P<id>[A-Za-z_]\w*)
  | (?P<num>\.?\d[\w.]*(?:[eEpP][+-]\w+)?)
  | (?P<punct>::|->|\+\+|--|<<=|>>=|&&|\|\||[-+*/%&|^!=<>]=|.)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass
class Tok:
    kind: str
    text: str
    start: int
    end: int


def tokenize(src: str) -> list[Tok]:
    """Significant tokens (no whitespace, comments or preprocessor lines)."""
    out = []
    line_start = True
    pos = 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        kind = m.lastgroup
        text = m.group()
        if kind == "pp" and not line_start:
            kind, text = "punct", "#"
            m_end = pos + 1
        else:
            m_end = m.end()
        if kind == "ws":
            if "\n" in text:
                line_start = True
        elif kind == "comment":
            pass
        else:
            if kind != "pp":
                out.append(Tok(kind, text, pos, m_end))
            line_start = kind == "pp"
        pos = m_end
    return out


_TYPE_WORDS = {
    "void", "bool", "char", "short", "int", "long", "float", "double", "signed", "unsigned",
    "half", "bfloat", "uint", "ushort", "uchar", "const", "volatile", "struct", "typename",
    "size_t", "int8_t", "int16_t", "int32_t", "int64_t", "uint8_t", "uint16_t", "uint32_t",
    "uint64_t", "float16_t", "bfloat16_t",
}


def _scope_kinds(toks: list[Tok]) -> list[bool]:
    """For each token, whether it lies inside a function body."""
    inside = [False] * len(toks)
    stack: list[str] = []
    stmt_start = 0
    for i, t in enumerate(toks):
        inside[i] = "code" in stack
        if t.text == "{":
            if "code" in stack:
                kind = "code"
            else:
                head = [x.text for x in toks[stmt_start:i]]
                prev = head[-1] if head else ""
                if head[:1] == ["namespace"] or head[:1] == ["extern"]:
                    kind = "ns"
                elif prev in (")", "const", "noexcept", "override", "final", "mutable") or (
                    "->" in head and "(" in head
                ):
                    kind = "code"
                elif "=" in head:
                    kind = "init"
                elif any(w in head for w in ("struct", "class", "union", "enum")):
                    kind = "class"
                else:
                    kind = "code"
            stack.append(kind)
            stmt_start = i + 1
        elif t.text == "}":
            if stack:
                stack.pop()
            stmt_start = i + 1
        elif t.text == ";":
            stmt_start = i + 1
    return inside


def _statement_end(toks: list[Tok], i: int) -> int:
    """Index of the `;` ending the declaration that starts at or before token i."""
    depth = 0
    while i < len(toks):
        x = toks[i].text
        if x in "([{":
            depth += 1
        elif x in ")]}":
            depth -= 1
        elif x == ";" and depth == 0:
            return i
        i += 1
    return -1


def _declarators(toks: list[Tok], first: int, end: int) -> list[tuple[int, int]]:
    """Split tokens [first, end) at top-level commas."""
    parts, depth, start = [], 0, first
    for i in range(first, end):
        x = toks[i].text
        if x in "([{" or x == "<":
            depth += 1
        elif x in ")]}" or x == ">":
            depth -= 1
        elif x == "," and depth == 0:
            parts.append((start, i))
            start = i + 1
    parts.append((start, end))
    return parts


def _declaration(toks: list[Tok], q: int) -> tuple[int, list[str], list[int]] | None:
    """If the qualifier token at q starts a variable declaration, return (index of `;`,
    declared names, indices of `[]` pairs with no size); None for a pointer/reference use."""
    i = q + 1
    idents: list[int] = []
    angle = 0
    while i < len(toks):
        t = toks[i]
        if t.text == "<":
            angle += 1
        elif t.text == ">" and angle > 0:
            angle -= 1
        elif angle > 0:
            pass
        elif t.kind == "id" or t.text == "::":
            if t.kind == "id":
                idents.append(i)
        elif t.text == "(" and i > 0 and toks[i - 1].text in ("__align__", "alignas", "__attribute__"):
            depth = 0
            while i < len(toks):
                depth += toks[i].text == "("
                depth -= toks[i].text == ")"
                if depth == 0:
                    break
                i += 1
        else:
            break
        i += 1
    if i >= len(toks) or toks[i].text not in ("[", ";", "=", ","):
        return None
    names = [toks[k].text for k in idents if toks[k].text not in ("__align__", "alignas")]
    if len(names) < 2 or names[-1] in _TYPE_WORDS:
        return None
    end = _statement_end(toks, i)
    if end < 0:
        return None
    declared, empty_brackets = [], []
    first_decl = idents[-1]
    for a, b in _declarators(toks, first_decl, end):
        name = next((toks[k].text for k in range(a, b) if toks[k].kind == "id"), None)
        if name:
            declared.append(name)
        for k in range(a, b - 1):
            if toks[k].text == "[" and toks[k + 1].text == "]":
                empty_brackets.append(k)
    return end, declared, empty_brackets


def for_emulation(src: str, backend: str) -> str:
    """Rewrite shared-memory declarations (see module doc) and MLX's instantiation line."""
    src = instantiation_fix(src)
    toks = tokenize(src)
    inside = _scope_kinds(toks)
    qual = "threadgroup" if backend == "metal" else "__shared__"
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement)
    for q, t in enumerate(toks):
        if t.text != qual or not inside[q]:
            continue
        decl = _declaration(toks, q)
        if decl is None:
            continue
        end, names, empties = decl
        is_extern = q > 0 and toks[q - 1].text == "extern"
        if backend == "metal":
            edits.append((t.start, t.start, "static "))
        elif is_extern:
            prev = toks[q - 1]
            edits.append((prev.start, prev.end, "__attribute__((aligned(128)))"))
            for k in empties:
                edits.append((toks[k].end, toks[k].end, "BB_DYN_SMEM_BYTES"))
        touches = "".join(f" ::bbemu::touch_shared(&{n}, sizeof({n}));" for n in names)
        edits.append((toks[end].end, toks[end].end, touches))
    out = []
    pos = 0
    for a, b, text in sorted(edits, key=lambda e: (e[0], e[1])):
        out.append(src[pos:a])
        out.append(text)
        pos = b
    out.append(src[pos:])
    return "".join(out)


_INSTANTIATION = re.compile(r'^template \[\[host_name\("[^"]*"\)\]\] \[\[kernel\]\] decltype\(', re.M)


def instantiation_fix(src: str) -> str:
    """MLX's `template [[host_name("k")]] [[kernel]] decltype(k<...>) k<...>;` is Metal-only
    syntax (clang rejects attributes there): keep the explicit instantiation, drop them."""
    return _INSTANTIATION.sub("template decltype(", src)
