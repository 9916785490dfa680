"""Pull the Python program out of a model's answer.

Handles, in this order: end-of-turn markers (cut there); MBPP's few-shot `[BEGIN] ... [DONE]`;
markdown fences (```python, ```py, untagged ```; an unclosed fence runs to the end); otherwise
unfenced code with prose before and/or after it. Whatever is chosen is dedented and then cut back,
line by line from the end, until `ast.parse` accepts it — so a generation truncated by the token limit
loses only its unfinished tail. Returns "" when nothing parses.
"""

from __future__ import annotations

import ast
import builtins
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<|EOT|>", "</s>", "<end_of_turn>")
PYTHON_TAGS = {"python", "python3", "py", "py3", "ipython", "python3.10", "python3.11"}
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w.+#-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
_BEGIN = re.compile(r"\[BEGIN\]\s*(.*?)\s*(?:\[DONE\]|\Z)", re.S)
_CODE_START = re.compile(r"^(?:def |async def |class |import |from [\w.]+ import |@\w)")
_DEFINITION = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
               ast.AnnAssign)


@dataclass(frozen=True)
class Extraction:
    code: str
    method: str  # "begin-done" | "fence" | "unfenced" | "empty"


def extract_code(answer: str, entry_point: str | None = None) -> str:
    """The program in `answer` ("" if none). `entry_point` (the function the tests call) picks the
    right block when an answer has several."""
    return extract(answer, entry_point).code


def extract(answer: str, entry_point: str | None = None) -> Extraction:
    text = _cut_end_markers(answer.replace("\r\n", "\n").replace("\r", "\n"))

    m = _BEGIN.search(text)
    if m:
        code = _parseable_prefix(_unquote(m.group(1)))
        if code:
            return Extraction(code, "begin-done")

    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    if blocks:
        tagged = [b for t, b in blocks if t in PYTHON_TAGS]
        untagged = [b for t, b in blocks if not t]
        for group in (tagged, untagged):
            code = _choose_block([_parseable_prefix(b) for b in group], entry_point)
            if code:
                return Extraction(code, "fence")
        text = _FENCE.sub("", text) if not (tagged or untagged) else text  # only e.g. ```text blocks

    code = _unfenced(text)
    return Extraction(code, "unfenced" if code else "empty")


def entry_point(tests: Sequence[str]) -> str | None:
    """The function the tests call: the first call of a non-builtin name in the first test."""
    for test in tests:
        try:
            tree = ast.parse(test)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not hasattr(builtins, node.func.id):
                return node.func.id
    return None


def defines(code: str, name: str) -> bool:
    """Whether `code` defines `name` at top level (def, class, or assignment)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def definitions_only(code: str) -> str:
    """`code` without its top-level statements that run things: keep imports, function and class
    definitions (with their decorators) and assignments whose value calls nothing; drop asserts,
    prints, example calls and `if __name__ == "__main__":` blocks (as EvalPlus's sanitizer does: an
    answer's own example usage is not the program under test). Code that does not parse is returned
    as is."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    lines = code.split("\n")
    kept: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            if node.value is None or any(isinstance(n, ast.Call) for n in ast.walk(node.value)):
                continue
        elif not isinstance(node, _DEFINITION):
            continue
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        kept.append("\n".join(lines[first - 1:node.end_lineno]))
    return "\n".join(kept) + "\n" if kept else ""


# ---- helpers -------------------------------------------------------------------------------------

def _cut_end_markers(text: str) -> str:
    cut = min((i for i in (text.find(m) for m in END_MARKERS) if i >= 0), default=len(text))
    return text[:cut]


def _unquote(code: str) -> str:
    """MBPP few-shot prompts sometimes wrap the code in quotes: [BEGIN] 'def f(): ...' [DONE]."""
    s = code.strip()
    for q in ('"""', "'''", "'", '"'):
        if len(s) > 2 * len(q) and s.startswith(q) and s.endswith(q):
            return s[len(q):-len(q)]
    return s


def _parseable_prefix(code: str) -> str:
    """The longest prefix of whole lines that parses (after dedent), stripped; "" if none."""
    lines = textwrap.dedent(code).rstrip().split("\n")
    while lines:
        src = "\n".join(lines).strip("\n")
        if not src.strip():
            return ""
        try:
            ast.parse(src)
            return src + "\n"
        except SyntaxError as e:
            n = len(lines) - 1
            if e.lineno is not None and 1 < e.lineno <= n:  # the error's own line cannot be kept
                n = e.lineno - 1
            lines = lines[:n]
        except (ValueError, MemoryError, RecursionError):  # null bytes, absurd nesting
            lines = lines[:-1]
    return ""


def _only_definitions(code: str) -> bool:
    try:
        return all(isinstance(n, _DEFINITION) for n in ast.parse(code).body)
    except SyntaxError:
        return False


def _choose_block(blocks: list[str], entry: str | None) -> str:
    """The first block defining `entry`, preceded by earlier blocks that only define things (imports,
    helpers); without a match, the definition-only blocks joined, else the first non-empty block."""
    blocks = [b for b in blocks if b]
    if not blocks:
        return ""
    if entry:
        for i, b in enumerate(blocks):
            if defines(b, entry):
                helpers = [h for h in blocks[:i] if _only_definitions(h)]
                return "\n".join([*helpers, b])
    defs = [b for b in blocks if _only_definitions(b)]
    return "\n".join(defs) if defs else blocks[0]


def _unfenced(text: str) -> str:
    """Code without fences: start at the first line that begins a definition or import (or at the top
    when none does), and keep the longest prefix that parses (prose after the code falls away)."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if _CODE_START.match(line)), None)
    if start is None:
        start = next((i for i, line in enumerate(lines) if _CODE_START.match(line.lstrip())), 0)
    return _parseable_prefix("\n".join(lines[start:]))
