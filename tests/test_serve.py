"""`hotcold serve` on a tiny random LLaMA with a real byte-level BPE tokenizer and a chat template: the official
`openai` client against a running server gets `hotcold run`'s greedy text (chat and completions, streamed and
not); stop strings; a full queue answers 429 at once; a client that goes away frees its slot; a malformed-request
corpus gets 4xx JSON errors; the CLI in a subprocess; a small version of bench/bench_serve_load.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from hotcold.cli import app as cli_app

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["Write a python function to reverse a string.", "def is_even(n):", "hello there, how are you?"]
CONTEXT = 1024  # the tiny model's context in these tests: room for a generation long enough to hold the worker
runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A threshold-mode Bundle of a tiny random LLaMA written as a GGUF with a tokenizer and chat template."""
    from hotcold.exporter.export import ExportOptions, export_bundle
    from hotcold.model.config import shape
    from hotcold.model.random import RandomSource
    from hotcold.model.registry import load_source
    from tests.gguf_util import write_gguf
    from tests.hybrid_util import make_placement

    root = tmp_path_factory.mktemp("serve")
    gguf = write_gguf(RandomSource(shape("tiny", max_seq_len=CONTEXT)), root / "tiny.gguf", chat_template=CHAT_TEMPLATE)
    src = load_source(str(gguf))
    out = root / "tiny-bundle"
    export_bundle(src, make_placement(src, [0, 64, 200, 256], seed=1), out,
                  options=ExportOptions(sparsity=None, threshold=0.01))
    return out


@pytest.fixture(scope="module")
def model(bundle):
    from hotcold.runtime import load

    return load(str(bundle), mode="threshold")


def _serve(model, **kw):
    from hotcold.serve.app import background, create_app

    return background(create_app(model, "tiny-bundle", **kw))


@pytest.fixture(scope="module")
def url(model):
    with _serve(model, max_queue=8) as u:
        yield u


def hotcold_run(bundle: Path, prompt: str, n: int, *extra: str) -> dict:
    """`hotcold run --json` through the real CLI."""
    r = runner.invoke(cli_app, ["run", str(bundle), "-p", prompt, "-n", str(n), "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout[r.stdout.index("{"):])


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def chat_text(c: openai.OpenAI, prompt: str, stream: bool, **kw):
    msgs = [{"role": "user", "content": prompt}]
    if not stream:
        r = c.chat.completions.create(model="tiny-bundle", messages=msgs, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, finish, usage = "", None, None
    for ch in c.chat.completions.create(model="tiny-bundle", messages=msgs, stream=True,
                                        stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
    return text, finish, usage


def completion_text(c: openai.OpenAI, prompt: str, stream: bool, **kw):
    if not stream:
        r = c.completions.create(model="tiny-bundle", prompt=prompt, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    text, finish, usage = "", None, None
    for ch in c.completions.create(model="tiny-bundle", prompt=prompt, stream=True,
                                   stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        if ch.choices:
            text += ch.choices[0].text
            finish = ch.choices[0].finish_reason or finish
    return text, finish, usage


# ---- the same text as `hotcold run` ---------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_client_gets_hotcold_runs_greedy_text(bundle, url, stream):
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny-bundle"]
    for prompt in PROMPTS:
        ref = hotcold_run(bundle, prompt, 24)
        text, finish, usage = chat_text(c, prompt, stream, max_tokens=24, temperature=0)
        assert text == ref["text"], prompt
        assert (usage.prompt_tokens, usage.completion_tokens) == (ref["prompt_tokens"], ref["new_tokens"])
        assert finish == ("length" if ref["stop_reason"] == "length" else "stop")

        ref = hotcold_run(bundle, prompt, 20, "--no-chat-template")
        text, finish, usage = completion_text(c, prompt, stream, max_tokens=20, temperature=0)
        assert text == ref["text"], prompt
        assert (usage.prompt_tokens, usage.completion_tokens) == (ref["prompt_tokens"], ref["new_tokens"])


def test_sampling_seed_and_top_p(bundle, model, url):
    c = client(url)
    prompt = PROMPTS[0]
    ref = hotcold_run(bundle, prompt, 16, "-t", "0.9", "--seed", "7")
    assert chat_text(c, prompt, False, max_tokens=16, temperature=0.9, seed=7)[0] == ref["text"]
    assert chat_text(c, prompt, True, max_tokens=16, temperature=0.9, seed=7)[0] == ref["text"]
    assert chat_text(c, prompt, False, max_tokens=16, temperature=0.9, seed=8)[0] != ref["text"]
    # top_p against the library (hotcold run has no --top-p), on the model the server is not using now
    tok = model.bundle.tokenizer
    ids = tok.encode(prompt)
    g = model.generate(ids, 16, temperature=1.0, seed=3, top_p=0.5)
    assert completion_text(c, prompt, False, max_tokens=16, temperature=1.0, seed=3, top_p=0.5)[0] == tok.decode(g.new_ids)


def test_stop_strings(bundle, url):
    c = client(url)
    prompt = PROMPTS[1]
    full = hotcold_run(bundle, prompt, 40, "--no-chat-template")["text"]
    stop = full[12:15]
    want = full[:full.find(stop)]
    for stream in (False, True):
        text, finish, usage = completion_text(c, prompt, stream, max_tokens=40, temperature=0, stop=[stop, "\x00never"])
        assert (text, finish) == (want, "stop"), stream
        assert usage.completion_tokens < 40


def test_text_stream_holds_partial_characters_and_stop_prefixes(model):
    from hotcold.serve.text import TextStream

    tok = model.bundle.tokenizer
    text = "naïve café ✓ — done; then more text"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # a byte-level vocabulary of 512: multi-byte characters span tokens
    ts = TextStream(tok)
    deltas = [ts.push(t) for t in ids] + [ts.finish()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    ts = TextStream(tok, stop=["; then"])
    deltas = [ts.push(t) for t in ids] + [ts.finish()]
    assert "".join(deltas) == "naïve café ✓ — done" and ts.stopped
    assert not any(";" in d for d in deltas)  # the start of a stop string is held back, then dropped


# ---- the queue --------------------------------------------------------------------------------------
def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _wait(cond, what: str, timeout: float = 60.0) -> None:
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)


def _long_prompt(url: str) -> tuple[str, int]:
    """A prompt whose greedy continuation runs to the context's end (no EOS), to keep the worker busy."""
    for p in PROMPTS:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny-bundle", "prompt": p, "temperature": 0,
                                                      "max_tokens": CONTEXT - 64}, timeout=120).json()
        if r["choices"][0]["finish_reason"] == "length":
            return p, CONTEXT - 64
    pytest.fail("every prompt's greedy continuation hits EOS: pick other prompts")


def test_full_queue_answers_429_and_a_gone_client_frees_its_slot(model):
    with _serve(model, max_queue=1) as url:
        prompt, n = _long_prompt(url)
        tokens0 = _metric(url, "hotcold_generation_tokens_total")
        body = {"model": "tiny-bundle", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as a:
            with a.stream("POST", url + "/v1/completions", json=body) as first:
                assert first.status_code == 200
                lines = first.iter_lines()  # held: a dropped line iterator closes the response
                assert next(line for line in lines if line.startswith("data: "))  # A is generating
                waiting = {}

                def second():
                    waiting["r"] = httpx.post(url + "/v1/completions", timeout=120, json={
                        "model": "tiny-bundle", "prompt": "hi", "max_tokens": 3, "temperature": 0})

                t = threading.Thread(target=second)
                t.start()
                _wait(lambda: httpx.get(url + "/health").json()["queue_depth"] == 1, "B to wait in the queue")
                third = httpx.post(url + "/v1/chat/completions", json={
                    "model": "tiny-bundle", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
                assert third.status_code == 429 and third.headers["retry-after"] == "1"
                err = third.json()["error"]
                assert err["code"] == "rate_limit_exceeded" and "--max-queue 1" in err["message"]
                assert t.is_alive() and httpx.get(url + "/health").json()["running"] == 1  # answered while A runs
            # A's connection is closed here: the worker stops A at its next token and takes B
            t.join(60)
        assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 3
        _wait(lambda: _metric(url, "hotcold_generations_cancelled_total") == 1, "A to be counted as cancelled")
        a_tokens = _metric(url, "hotcold_generation_tokens_total") - tokens0 - 3
        assert 1 <= a_tokens < n  # A stopped early, not at its max_tokens
        assert _metric(url, "hotcold_requests_rejected_total") == 1

        # a client that gives up while still waiting leaves the queue at once (it never generates)
        done0 = _metric(url, "hotcold_generations_completed_total")
        with httpx.Client(timeout=60) as a, a.stream("POST", url + "/v1/completions", json=body) as first:
            lines = first.iter_lines()  # held: a dropped line iterator closes the response (and so the connection)
            assert next(line for line in lines if line.startswith("data: "))
            gave_up = {}

            def impatient():
                try:
                    gave_up["r"] = httpx.post(url + "/v1/completions", timeout=0.5, json={
                        "model": "tiny-bundle", "prompt": "hi", "max_tokens": 3, "temperature": 0})
                except httpx.TimeoutException:
                    gave_up["yes"] = True

            t = threading.Thread(target=impatient)
            t.start()
            t.join(30)
            assert gave_up.get("yes"), (gave_up, httpx.get(url + "/health").json())
            _wait(lambda: httpx.get(url + "/health").json()["queue_depth"] == 0, "the impatient client to leave")
        _wait(lambda: httpx.get(url + "/health").json()["running"] == 0, "the worker to be idle")
        assert _metric(url, "hotcold_generations_completed_total") == done0  # neither A nor the impatient one finished
        assert _metric(url, "hotcold_queue_depth") == 0


# ---- bad requests -------------------------------------------------------------------------------------
def _chat(**kw) -> bytes:
    return json.dumps({"model": "tiny-bundle", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                       **kw}).encode()


def _comp(**kw) -> bytes:
    return json.dumps({"model": "tiny-bundle", "prompt": "hi", "max_tokens": 4, **kw}).encode()


KEY = "sk-test-123"
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MALFORMED = [  # (name, method, path, body, headers, status, code)
    ("no key", "POST", CHAT, _chat(), {"authorization": None}, 401, "invalid_api_key"),
    ("wrong key", "POST", CHAT, _chat(), {"authorization": "Bearer sk-wrong"}, 401, "invalid_api_key"),
    ("not bearer", "POST", CHAT, _chat(), {"authorization": f"Basic {KEY}"}, 401, "invalid_api_key"),
    ("metrics without key", "GET", "/metrics", None, {"authorization": None}, 401, "invalid_api_key"),
    ("bad json", "POST", CHAT, b'{"model": "tiny-bundle", "messages": [', {}, 400, "invalid_json"),
    ("json array", "POST", CHAT, b"[1, 2]", {}, 400, "invalid_json"),
    ("empty body", "POST", COMP, b"", {}, 400, "invalid_json"),
    ("not utf-8", "POST", COMP, b'{"model": "\xff\xfe"}', {}, 400, "invalid_json"),
    ("body too large", "POST", COMP, b"{" + b" " * (17 * 2**20) + b"}", {}, 413, "request_too_large"),
    ("unknown model", "POST", CHAT, _chat(model="gpt-4o"), {}, 404, "model_not_found"),
    ("missing model", "POST", COMP, json.dumps({"prompt": "hi"}).encode(), {}, 400, "missing_required_parameter"),
    ("missing messages", "POST", CHAT, json.dumps({"model": "tiny-bundle"}).encode(), {}, 400, "missing_required_parameter"),
    ("messages not a list", "POST", CHAT, _chat(messages="hi"), {}, 400, "invalid_type"),
    ("empty messages", "POST", CHAT, _chat(messages=[]), {}, 400, "invalid_type"),
    ("bad role", "POST", CHAT, _chat(messages=[{"role": "wizard", "content": "hi"}]), {}, 400, "invalid_value"),
    ("content a number", "POST", CHAT, _chat(messages=[{"role": "user", "content": 5}]), {}, 400, "invalid_type"),
    ("image part", "POST", CHAT, _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     {}, 400, "unsupported_parameter"),
    ("prompt missing", "POST", COMP, json.dumps({"model": "tiny-bundle"}).encode(), {}, 400, "missing_required_parameter"),
    ("prompt empty", "POST", COMP, _comp(prompt=""), {}, 400, "invalid_value"),
    ("prompt a dict", "POST", COMP, _comp(prompt={"text": "hi"}), {}, 400, "invalid_type"),
    ("token id out of vocab", "POST", COMP, _comp(prompt=[1, 2, 99999]), {}, 400, "invalid_value"),
    ("batch of prompts", "POST", COMP, _comp(prompt=["a", "b"]), {}, 400, "unsupported_parameter"),
    ("prompt longer than the context", "POST", COMP, _comp(prompt="x" * (CONTEXT + 10)), {}, 400, "context_length_exceeded"),
    ("negative max_tokens", "POST", CHAT, _chat(max_tokens=-5), {}, 400, "invalid_value"),
    ("zero max_tokens", "POST", COMP, _comp(max_tokens=0), {}, 400, "invalid_value"),
    ("absurd max_tokens", "POST", CHAT, _chat(max_tokens=10**12), {}, 400, "context_length_exceeded"),
    ("max_tokens a string", "POST", CHAT, _chat(max_tokens="ten"), {}, 400, "invalid_type"),
    ("max_tokens a float", "POST", COMP, _comp(max_tokens=4.5), {}, 400, "invalid_type"),
    ("negative temperature", "POST", CHAT, _chat(temperature=-1), {}, 400, "invalid_value"),
    ("temperature a string", "POST", CHAT, _chat(temperature="hot"), {}, 400, "invalid_type"),
    ("top_p zero", "POST", COMP, _comp(top_p=0), {}, 400, "invalid_value"),
    ("top_p above one", "POST", COMP, _comp(top_p=1.5), {}, 400, "invalid_value"),
    ("n = 2", "POST", CHAT, _chat(n=2), {}, 400, "unsupported_parameter"),
    ("five stop strings", "POST", COMP, _comp(stop=["a", "b", "c", "d", "e"]), {}, 400, "invalid_value"),
    ("stop a number", "POST", COMP, _comp(stop=7), {}, 400, "invalid_type"),
    ("empty stop", "POST", COMP, _comp(stop=[""]), {}, 400, "invalid_value"),
    ("stream a string", "POST", CHAT, _chat(stream="yes"), {}, 400, "invalid_type"),
    ("stream_options without stream", "POST", CHAT, _chat(stream_options={"include_usage": True}), {}, 400, "invalid_value"),
    ("seed a string", "POST", COMP, _comp(seed="x"), {}, 400, "invalid_type"),
    ("seed too large", "POST", COMP, _comp(seed=2**70), {}, 400, "invalid_value"),
    ("logprobs", "POST", COMP, _comp(logprobs=5), {}, 400, "unsupported_parameter"),
    ("tools", "POST", CHAT, _chat(tools=[{"type": "function", "function": {"name": "f"}}]), {}, 400, "unsupported_parameter"),
    ("unknown path", "GET", "/v1/engines", None, {}, 404, "not_found"),
    ("wrong method", "GET", CHAT, None, {}, 405, "method_not_allowed"),
    ("unknown model card", "GET", "/v1/models/gpt-4o", None, {}, 404, "model_not_found"),
]


def test_malformed_request_corpus(model):
    assert len(MALFORMED) >= 15
    with _serve(model, api_key=KEY, max_queue=4) as url, httpx.Client(base_url=url, timeout=60) as h:
        for name, method, path, body, headers, status, code in MALFORMED:
            hdrs = {"authorization": f"Bearer {KEY}", "content-type": "application/json", **headers}
            hdrs = {k: v for k, v in hdrs.items() if v is not None}
            r = h.request(method, path, content=body, headers=hdrs)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            assert r.headers["content-type"].startswith("application/json"), name
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, (name, err)
            assert err["message"] and "\n" not in err["message"] and "Traceback" not in r.text, (name, err)
            assert h.get("/health").status_code == 200, name  # still up
        # the server still answers a good request, and counted every refusal
        ok = h.post(COMP, headers={"authorization": f"Bearer {KEY}"}, json={"model": "tiny-bundle", "prompt": "hi",
                                                                             "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        m = h.get("/metrics", headers={"authorization": f"Bearer {KEY}"}).text
        refused = sum(float(line.rsplit(" ", 1)[1]) for line in m.splitlines()
                      if line.startswith("hotcold_requests_total{") and 'status="4' in line)
        assert refused == len(MALFORMED)
        with pytest.raises(openai.AuthenticationError):
            client(url, "sk-wrong").models.list()
        assert client(url, KEY).completions.create(model="tiny-bundle", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_metrics_in_prometheus_text(url):
    import re

    client(url).completions.create(model="tiny-bundle", prompt="hi", max_tokens=5, temperature=0)
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*(\\.[^"\\]*)*",?)*\})? '
                        r'(-?[0-9.e+-]+|NaN)$')
    names = set()
    for line in r.text.strip().splitlines():
        if line.startswith("# TYPE"):
            names.add(line.split()[2])
        elif not line.startswith("# HELP"):
            assert sample.match(line), line
    assert {"hotcold_tokens_per_second", "hotcold_decode_tokens_per_second", "hotcold_queue_depth",
            "hotcold_gpu_share", "hotcold_generation_tokens_total", "process_resident_memory_bytes"} <= names
    assert _metric(url, "hotcold_generation_tokens_total") >= 5 and _metric(url, "hotcold_tokens_per_second") > 0
    assert 0 < _metric(url, "hotcold_gpu_share") < 1  # hot neurons on the "GPU" side (the CPU here), cold ones not
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny-bundle" and h["queue_capacity"] == 8


# ---- the CLI in a subprocess -------------------------------------------------------------------------
def _start(bundle: Path, *args: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "hotcold", "serve", str(bundle), "--port", "0", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    line = p.stdout.readline().strip()
    assert line.startswith("http://127.0.0.1:"), (line, p.stderr.read() if p.poll() is not None else "")
    return p, line


def test_cli_serves_until_ctrl_c(bundle):
    p, url = _start(bundle, "--api-key", KEY, "--max-queue", "2", "--model-name", "tiny", "--log-level", "warning")
    try:
        c = client(url, KEY)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        ref = hotcold_run(bundle, PROMPTS[0], 12)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12,
                                      temperature=0)
        assert r.choices[0].message.content == ref["text"]
        assert httpx.get(url + "/health").json()["queue_capacity"] == 2
    finally:
        p.send_signal(signal.SIGINT)
        _, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert "stopped: 1 generations completed" in stderr and "Traceback" not in stderr


def test_cli_bad_input(tmp_path, bundle):
    import socket

    cases = [
        (["serve", str(tmp_path / "nope")], "does not exist"),
        (["serve", str(bundle), "--max-queue", "0"], "--max-queue"),
        (["serve", str(bundle), "--port", "70000"], "--port"),
        (["serve", str(bundle), "--log-level", "loud"], "not a log level"),
        (["serve", str(bundle), "--cold-mode", "fast"], "unknown mode"),
        (["serve", str(bundle), "--host", "no-such-host.invalid"], "does not resolve"),
    ]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        cases.append((["serve", str(bundle), "--port", str(held.getsockname()[1])], "cannot listen"))
        for args, words in cases:
            r = runner.invoke(cli_app, args)
            assert r.exit_code not in (0, 1), (args, r.output)
            assert words in r.output and "Traceback" not in r.output, (args, r.output)
    r = runner.invoke(cli_app, ["serve", "--help"])
    assert r.exit_code == 0
    for flag in ("--host", "--port", "--api-key", "--max-queue"):
        assert flag in r.output


# ---- the load test, small --------------------------------------------------------------------------------
def test_load_small(bundle, tmp_path):
    """bench/bench_serve_load.py with 8 clients: every request ends as its full answer, a clean 4xx or a deliberate
    disconnect; none hangs, none gets another's answer; /health answers after; RSS flat between rounds."""
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench_serve_load.py"), "--bundle", str(bundle),
                        "--clients", "8", "--requests", "4", "--max-queue", "2", "--max-tokens", "16", "--rounds", "2",
                        "--disconnect-every", "2", "--timeout", "120", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and all(res["checks"].values())
    for rnd in res["rounds"]:
        assert rnd["requests"] == 32 and set(rnd["outcomes"]) <= {"full", "disconnected", "rejected_429"}
        assert rnd["outcomes"].get("full", 0) >= 16
        assert rnd["attempts"] >= rnd["requests"]


def test_bundle_without_a_tokenizer_serves_token_ids(tmp_path):
    """A random model has no tokenizer: completions take token ids and answer them space-separated (as `hotcold run
    --token-ids` prints them); chat, which needs a template, is refused with a 400."""
    from hotcold.exporter.export import ExportOptions, export_bundle
    from hotcold.model.registry import load_source
    from hotcold.runtime import load
    from tests.hybrid_util import make_placement

    src = load_source("random:tiny")
    export_bundle(src, make_placement(src, [0, 64, 200, 256], seed=1), tmp_path / "b",
                  options=ExportOptions(sparsity=None))
    r = runner.invoke(cli_app, ["run", str(tmp_path / "b"), "--token-ids", "1,30,40,50", "-n", "6", "--cold-mode", "exact",
                                "--json"])
    ref = json.loads(r.stdout[r.stdout.index("{"):])
    with _serve(load(str(tmp_path / "b"), mode="exact")) as url:
        got = httpx.post(url + "/v1/completions", json={"model": "tiny-bundle", "prompt": [1, 30, 40, 50],
                                                        "max_tokens": 6, "temperature": 0}).json()
        assert got["choices"][0]["text"] == " ".join(map(str, ref["new_ids"]))
        bad = httpx.post(url + "/v1/completions", json={"model": "tiny-bundle", "prompt": "hi"})
        assert bad.status_code == 400 and "token ids" in bad.json()["error"]["message"]
        chat = httpx.post(url + "/v1/chat/completions", json={"model": "tiny-bundle",
                                                              "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "no tokenizer" in chat.json()["error"]["message"]
