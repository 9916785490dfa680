"""Code extraction from model answers: fences, prose, MBPP's [BEGIN]/[DONE], truncation, end markers."""

from __future__ import annotations

import ast

from hotcold.quality.extract import defines, entry_point, extract, extract_code

CODE = "def add(a, b):\n    return a + b\n"


def test_python_fence_with_prose_around():
    ans = f"Sure! Here is the function:\n\n```python\n{CODE}```\n\nIt adds `a` and `b`. Hope this helps!"
    assert extract(ans) == extract(ans, "add")
    assert extract_code(ans) == CODE and extract(ans).method == "fence"


def test_untagged_and_other_tags():
    assert extract_code(f"```\n{CODE}```") == CODE
    assert extract_code(f"```py\n{CODE}```") == CODE
    assert extract_code(f"```Python3 \n{CODE}```") == CODE
    # a shell block is not the answer; the python block is
    assert extract_code(f"Install nothing:\n```bash\npip install x\n```\n```python\n{CODE}```") == CODE
    # only a text block: fall back to unfenced code elsewhere in the answer
    assert extract_code(f"```text\noutput: 3\n```\n{CODE}") == CODE


def test_several_blocks_pick_the_entry_point():
    ans = ("First an example:\n```python\nprint(add(1, 2))\n```\nThe helper:\n```python\nimport math\n\n"
           "def _twice(x):\n    return 2 * x\n```\nAnd the solution:\n```python\ndef add(a, b):\n    return a + b\n```\n"
           "Test it:\n```python\nassert add(1, 2) == 3\n```")
    code = extract_code(ans, "add")
    assert "def _twice" in code and "import math" in code and "def add" in code
    assert "print(" not in code and "assert" not in code
    # without an entry point: the blocks that only define things
    assert extract_code(ans).count("def ") == 2


def test_unclosed_fence_truncated_generation():
    ans = "```python\ndef add(a, b):\n    total = a + b\n    return total\n\ndef sub(a, b):\n    return (a -"
    code = extract_code(ans)
    assert code == "def add(a, b):\n    total = a + b\n    return total\n"


def test_unfenced_code_with_prose_before_and_after():
    ans = f"The idea is simple: sum both.\n\n{CODE}\nThis runs in O(1) time and handles negative numbers."
    assert extract_code(ans) == CODE and extract(ans).method == "unfenced"
    # pure code as a raw completion
    assert extract_code(CODE) == CODE
    # indented code (e.g. inside a markdown list) is dedented
    assert extract_code("    " + CODE.replace("\n    ", "\n        ")) == CODE


def test_begin_done_mbpp_style():
    assert extract_code(f"[BEGIN]\n{CODE}[DONE]\nmore text [BEGIN] junk") == CODE
    assert extract_code(f"[BEGIN]\n '{CODE}' \n[DONE]") == CODE
    assert extract(f"[BEGIN]\n{CODE}").method == "begin-done"  # [DONE] never generated


def test_end_of_turn_markers_cut():
    assert extract_code(f"```python\n{CODE}```<|im_end|>\n```python\ndef other(): pass\n```") == CODE
    assert extract_code(f"{CODE}<|endoftext|>garbage (((") == CODE


def test_nothing_parses():
    assert extract_code("I cannot help with that.") == ""
    assert extract("").method == "empty"
    assert extract_code("```python\ndef f(:\n```") == ""
    assert extract_code("def f(x):\n    '''never closed") == ""


def test_result_always_parses():
    for ans in ("```python\nx = [1,\n", "def f():\n  return 1\n   bad indent", "a = 1\nb = (\n", "\x00\x00"):
        code = extract_code(ans)
        ast.parse(code)


def test_crlf_answers():
    assert extract_code("```python\r\ndef add(a, b):\r\n    return a + b\r\n```") == CODE


def test_entry_point_from_tests():
    assert entry_point(["assert min_cost([[1, 2]], 2, 2) == 8"]) == "min_cost"
    assert entry_point(["assert set(similar((3, 4), (5, 4))) == set((4,))"]) == "similar"
    assert entry_point(["assert math.isclose(area(2), 12.56, rel_tol=0.01)"]) == "area"
    assert entry_point(["assert x == 1"]) is None and entry_point([]) is None
    assert entry_point(["not python (", "assert f(1) == 2"]) == "f"


def test_defines():
    assert defines(CODE, "add") and not defines(CODE, "sub")
    assert defines("class Stack:\n    pass\n", "Stack") and defines("f = lambda x: x\n", "f")
    assert not defines("def f(:", "f")
