"""Workloads: MBPP splits and malformed lines, generic prompt files, the embedded set, prompt formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotcold.errors import InputError
from hotcold.workloads import (
    MBPP_SPLITS,
    Task,
    find_mbpp,
    format_prompt,
    load_dataset,
    load_embedded,
    load_mbpp_file,
    parse_dataset_spec,
    select,
    teacher_forced,
)


def _mbpp_line(tid: int, **over) -> str:
    rec = {"text": f"Write a function number {tid}.", "code": f"def f{tid}():\r\n    return {tid}",
           "task_id": tid, "test_setup_code": "", "test_list": [f"assert f{tid}() == {tid}"] * 3,
           "challenge_test_list": []}
    rec.update(over)
    return json.dumps(rec)


# ---- MBPP ----------------------------------------------------------------------------------------

def test_mbpp_standard_splits(mbpp_path):
    tasks, stats = load_mbpp_file(mbpp_path)
    assert (stats.lines, stats.loaded, stats.skipped) == (974, 974, 0)
    sizes = {name: len(load_dataset(f"mbpp:{mbpp_path}", name)) for name in MBPP_SPLITS}
    assert sizes == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    assert len(load_dataset(f"mbpp:{mbpp_path}", "all")) == 974
    test = load_dataset(f"mbpp:{mbpp_path}")  # default split: test
    assert test.split == "test" and test.tasks[0].id == "mbpp/11" and test.tasks[-1].task_id == 510
    t = test.tasks[0]
    assert len(t.tests) == 3 and t.code and "\r" not in t.code and t.source == "mbpp"


def test_mbpp_setup_code_and_challenge_tests(mbpp_path):
    by_id = {t.task_id: t for t in load_mbpp_file(mbpp_path)[0]}
    assert "root = Node(1)" in by_id[367].setup_code and "class Node" in by_id[367].code  # setup runs after code
    assert by_id[11].setup_code == "" and sum(bool(t.setup_code) for t in by_id.values()) == 2
    assert sum(bool(t.challenge_tests) for t in by_id.values()) == 11


def test_mbpp_path_from_env_and_search(mbpp_path, monkeypatch, tmp_path):
    monkeypatch.setenv("HOTCOLD_MBPP", str(mbpp_path))
    assert len(load_dataset("mbpp", "prompt")) == 10
    monkeypatch.delenv("HOTCOLD_MBPP")
    # the search: shared/data/mbpp.jsonl in the cwd or a parent (the repo's ../shared/data)
    nested = tmp_path / "repo" / "sub"
    nested.mkdir(parents=True)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "mbpp.jsonl").write_text(_mbpp_line(11) + "\n")
    monkeypatch.chdir(nested)
    assert find_mbpp() == tmp_path / "shared" / "data" / "mbpp.jsonl"
    assert [t.id for t in load_dataset("mbpp")] == ["mbpp/11"]
    # a directory holding mbpp.jsonl works as the path too
    assert len(load_dataset(f"mbpp:{tmp_path / 'shared' / 'data'}")) == 1


def test_mbpp_missing_everywhere(monkeypatch, tmp_path):
    monkeypatch.delenv("HOTCOLD_MBPP", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="MBPP not found") as e:
        load_dataset("mbpp")
    assert "embedded" in e.value.fix
    with pytest.raises(InputError, match="not found: .*nope.jsonl"):
        load_dataset(f"mbpp:{tmp_path / 'nope.jsonl'}")


def test_malformed_lines_skipped_and_counted(tmp_path):
    f = tmp_path / "bad.jsonl"
    lines = [
        _mbpp_line(11),
        "{not json",
        "",  # blank lines are not records
        json.dumps([1, 2, 3]),
        _mbpp_line(12, test_list="assert x"),  # wrong type
        json.dumps({"text": "no code", "task_id": 13, "test_list": []}),
        _mbpp_line(11),  # duplicate id
        _mbpp_line(14, task_id="14"),
        _mbpp_line(15),
    ]
    f.write_text("\n".join(lines) + "\n")
    tasks, stats = load_mbpp_file(f)
    assert [t.task_id for t in tasks] == [11, 15]
    assert (stats.lines, stats.loaded, stats.skipped) == (8, 2, 6)
    assert stats.errors[0].startswith(f"{f}:2: invalid JSON")
    assert any(e.startswith(f"{f}:7: duplicate task_id 11") for e in stats.errors)
    assert any(e.startswith(f"{f}:6: missing field(s) code") for e in stats.errors)
    ds = load_dataset(f"mbpp:{f}", "test")
    assert len(ds) == 2 and ds.stats.skipped == 6 and ds.describe()["skipped_lines"] == 6

    with pytest.raises(InputError) as e:
        load_mbpp_file(f, strict=True)
    assert e.value.what.startswith(f"{f}:2: malformed line: invalid JSON")
    assert "--strict" in e.value.fix


def test_not_utf8_names_the_line(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(_mbpp_line(11).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"latin1.jsonl:2: not UTF-8"):
        load_mbpp_file(f)


def test_empty_selection_is_an_error(mbpp_path):
    with pytest.raises(InputError, match="no tasks selected"):
        load_dataset(f"mbpp:{mbpp_path}", "prompt", offset=10)
    with pytest.raises(InputError, match="has no split 'dev'"):
        load_dataset(f"mbpp:{mbpp_path}", "dev")


# ---- specs, slicing, other formats -----------------------------------------------------------------

def test_parse_dataset_spec():
    assert str(parse_dataset_spec("mbpp")) == "mbpp"
    assert parse_dataset_spec("mbpp:/x/y.jsonl").path == "/x/y.jsonl"
    assert parse_dataset_spec("jsonl:C:/odd:name.jsonl").path == "C:/odd:name.jsonl"
    assert parse_dataset_spec("embedded").kind == "embedded"
    for bad, msg in (("squad", "unknown dataset"), ("jsonl", "needs a file"), ("txt:", "needs a file"),
                     ("embedded:x", "takes no path"), ("mbpp:", "empty path")):
        with pytest.raises(InputError, match=msg):
            parse_dataset_spec(bad)


def test_select_offset_limit():
    tasks = [Task(id=str(i), text=str(i)) for i in range(10)]
    assert [t.id for t in select(tasks, limit=3, offset=2)] == ["2", "3", "4"]
    assert len(select(tasks)) == 10 and len(select(tasks, offset=8)) == 2 and select(tasks, offset=20) == []
    with pytest.raises(InputError, match="--limit"):
        select(tasks, limit=0)
    with pytest.raises(InputError, match="--offset"):
        select(tasks, offset=-1)


def test_load_dataset_slicing_and_manifest(mbpp_path):
    ds = load_dataset(f"mbpp:{mbpp_path}", "test", limit=5, offset=10)
    assert [t.task_id for t in ds] == [21, 22, 23, 24, 25]
    d = ds.describe()
    assert d["count"] == 5 and d["offset"] == 10 and d["limit"] == 5 and d["split"] == "test"
    assert d["sha256"] == "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f"


def test_generic_jsonl_and_txt(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text("\n".join([
        json.dumps({"prompt": "Say hi"}),
        json.dumps({"text": "Add numbers", "id": "add", "tests": ["assert add(1, 2) == 3"], "code": "def add(a, b):\r\n    return a + b"}),
        json.dumps({"question": "no prompt field"}),
        "[]",
        json.dumps({"prompt": 5}),
    ]) + "\n")
    ds = load_dataset(f"jsonl:{j}")
    assert [t.id for t in ds] == ["jsonl/1", "jsonl/add"]
    assert ds.tasks[1].tests == ("assert add(1, 2) == 3",) and ds.tasks[1].code == "def add(a, b):\n    return a + b"
    assert ds.stats.skipped == 3 and ds.split == "all"
    with pytest.raises(InputError, match=r"p.jsonl:3: malformed line: no 'prompt' or 'text' field"):
        load_dataset(f"jsonl:{j}", strict=True)
    with pytest.raises(InputError, match="no 'test' split"):
        load_dataset(f"jsonl:{j}", "test")

    t = tmp_path / "p.txt"
    t.write_text("first prompt\n\n  second prompt  \n")
    ds = load_dataset(f"txt:{t}", limit=1, offset=1)
    assert [(x.id, x.text) for x in ds] == [("txt/3", "second prompt")]
    with pytest.raises(InputError, match="dataset file not found"):
        load_dataset(f"txt:{tmp_path / 'missing.txt'}")
    with pytest.raises(InputError, match="not a file"):
        load_dataset(f"txt:{tmp_path}")


def test_embedded_set():
    tasks, stats = load_embedded()
    assert len(tasks) >= 40 and stats.skipped == 0
    assert all(len(t.tests) == 3 and t.code for t in tasks)
    assert len({t.id for t in tasks}) == len(tasks)
    assert len(load_dataset("embedded", "test")) == 24 and len(load_dataset("embedded", "train")) == 24
    assert len(load_dataset("embedded")) == len(tasks)  # default split for embedded: all


def test_embedded_text_is_not_copied_from_mbpp(mbpp_path):
    mbpp_texts = {t.text.strip().lower() for t in load_mbpp_file(mbpp_path)[0]}
    mbpp_code = {t.code.strip() for t in load_mbpp_file(mbpp_path)[0]}
    for t in load_embedded()[0]:
        assert t.text.strip().lower() not in mbpp_texts and t.code.strip() not in mbpp_code


# ---- prompts -------------------------------------------------------------------------------------

TASK = Task(id="x/1", text="Write a function to add two numbers.", tests=("assert add(1, 2) == 3", "assert add(0, 0) == 0"),
            code="def add(a, b):\r\n    return a + b\r\n")


def test_format_prompt_raw_and_chat():
    raw = format_prompt(TASK, "raw")
    assert raw == ("You are an expert Python programmer, and here is your task: Write a function to add two "
                   "numbers. Your code should pass these tests:\n\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n")
    seen = []

    def render(messages):
        seen.append(messages)
        return "<|user|>" + messages[0]["content"] + "<|assistant|>"

    chat = format_prompt(TASK, "chat", render_chat=render)
    assert chat == "<|user|>" + raw[:-1] + "<|assistant|>"
    assert seen == [[{"role": "user", "content": raw[:-1]}]]
    with pytest.raises(InputError, match="chat template"):
        format_prompt(TASK, "chat")
    with pytest.raises(InputError, match="unknown prompt format"):
        format_prompt(TASK, "fancy")
    # a prompt without tests (txt/jsonl) is used as is
    assert format_prompt(Task(id="t", text="Tell me a joke"), "raw") == "Tell me a joke\n"


def test_teacher_forced_pair():
    prompt, cont = teacher_forced(TASK, "raw")
    assert prompt == format_prompt(TASK, "raw") and cont == "def add(a, b):\n    return a + b\n"
    prompt, cont = teacher_forced(TASK, "chat", render_chat=lambda m: m[0]["content"])
    assert cont == "```python\ndef add(a, b):\n    return a + b\n```\n"
    assert teacher_forced(TASK, "raw", fence=True)[1].startswith("```python\n")
    with pytest.raises(InputError, match="no reference solution"):
        teacher_forced(Task(id="t", text="x"), "raw")


def test_no_io_at_import():
    import importlib
    import sys

    for name in [m for m in sys.modules if m.startswith("hotcold.workloads")]:
        del sys.modules[name]
    mod = importlib.import_module("hotcold.workloads")
    assert "torch" not in dir(mod)
    assert Path(mod.__file__).parent.joinpath("embedded_tasks.jsonl").is_file()
