"""Load test of `hotcold serve` on localhost: many concurrent clients, mixed streaming, some disconnecting early.

    python bench/bench_serve_load.py (--bundle DIR | --tiny) [--clients 32] [--requests 4] [--max-tokens 24] [--max-queue 8]
                                     [--rounds 2] [--disconnect-every 4] [--retries 20] [--timeout 600]
                                     [--out bench/results/serve_load.json]

What it does:
  1. starts `python -m hotcold serve DIR --port 0` as a subprocess (the real CLI; its RSS read from /proc);
  2. asks every (prompt, endpoint) pair the load will use once, sequentially and greedy: these answers are the
     references, and their tokens/s through one client is the baseline for the throughput ratio;
  3. runs `--rounds` rounds of `--clients` concurrent clients x `--requests` requests each. Request i is chat or
     completion (i even/odd), streamed or not (by pairs), and every `--disconnect-every`-th streamed request
     closes its connection after 2 text events. A 429 is retried after the server's Retry-After (at most
     `--retries` times). Each request must end as: its full answer (equal to the reference: no cross-talk
     between requests), a clean 4xx JSON error, or a deliberate disconnect whose partial text is a prefix of
     the reference; anything else (5xx, a wrong answer, a broken stream, no answer within --timeout) fails;
  4. reads the server's RSS after the references and after each round (memory flat: the growth from the first
     round's end to the last round's end), /health after each round, and /metrics' counters.
Writes one JSON object with the command, the machine and every number; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]

PROMPTS = [
    "Write a python function to check whether a number is even.",
    "Write a function to reverse a string.",
    "Write a python function to find the maximum of three numbers.",
    "Write a function to count the vowels in a string.",
    "Write a python function to compute the factorial of n.",
    "Write a function to remove duplicates from a list while keeping the order.",
    "Write a python function to check whether a string is a palindrome.",
    "Write a function to merge two sorted lists.",
]
# Text events a disconnecting client reads before it closes the connection (its partial text is checked as a
# prefix of the reference).
DISCONNECT_AFTER_EVENTS = 2
# RSS growth (bytes) from the end of the first round to the end of the last that still counts as flat: the
# allocator keeps freed KV caches and tensors around, so a steady state wobbles by a few MiB.
FLAT_RSS_TOLERANCE = 32 * 1024 * 1024


def log(s: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def git_commit() -> str | None:
    r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return r.stdout.strip() if r.returncode == 0 else None


def tiny_bundle(out: Path) -> Path:
    """A tiny random-weight LLaMA (4 layers, dim 64, vocab 512; synthetic: its text is noise) written as a GGUF with
    a byte-level BPE tokenizer and a chat template, exported as a threshold-mode Bundle, as tests/test_serve.py
    builds it. Fast to decode, so the run measures the server (queue, streaming, disconnects), not the model."""
    sys.path.insert(0, str(REPO))
    from hotcold.exporter.export import ExportOptions, export_bundle
    from hotcold.model.config import shape
    from hotcold.model.random import RandomSource
    from hotcold.model.registry import load_source
    from tests.gguf_util import write_gguf
    from tests.hybrid_util import make_placement

    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    out.mkdir(parents=True, exist_ok=True)
    gguf = write_gguf(RandomSource(shape("tiny", max_seq_len=1024)), out / "tiny.gguf", chat_template=template)
    src = load_source(str(gguf))
    export_bundle(src, make_placement(src, [0, 64, 200, 256], seed=1), out / "tiny-bundle",
                  options=ExportOptions(sparsity=None, threshold=0.01))
    return out / "tiny-bundle"


def bundle_summary(bundle: str) -> dict:
    """What the bundle holds (from its manifest): the model, its shape, dtype and the placement's hot neurons."""
    m = json.loads((Path(bundle) / "manifest.json").read_text())
    cfg = m["model"]["config"]
    n_hot = m["placement"]["n_hot"]
    return {"model_source": m["model"].get("source"), "model_name": cfg.get("name"), "n_layers": cfg["n_layers"],
            "dim": cfg["dim"], "n_ff": cfg["n_ff"], "dtype": m.get("dtype"),
            "hot_fraction": round(sum(n_hot) / (cfg["n_ff"] * cfg["n_layers"]), 4),
            "activation_rule": (m.get("activation") or {}).get("rule")}


def start_server(bundle: str, max_queue: int, extra: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "hotcold", "serve", bundle, "--port", "0", "--max-queue", str(max_queue),
           "--log-level", "warning", *extra]
    errf = open(log_path, "w")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    ready, _, _ = select.select([p.stdout], [], [], 300)
    line = p.stdout.readline().strip() if ready else ""
    if not line.startswith("http://"):
        p.kill()
        raise SystemExit(f"the server did not start: {log_path.read_text()[-2000:]}")
    return p, line


def request_body(model: str, prompt: str, kind: str, stream: bool, max_tokens: int) -> dict:
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def endpoint(kind: str) -> str:
    return "/v1/chat/completions" if kind == "chat" else "/v1/completions"


def answer_text(kind: str, obj: dict) -> str:
    c = obj["choices"][0]
    return c["message"]["content"] if kind == "chat" else c["text"]


def delta_text(kind: str, obj: dict) -> str:
    if not obj.get("choices"):
        return ""
    c = obj["choices"][0]
    return (c["delta"].get("content") or "") if kind == "chat" else (c.get("text") or "")


async def one_request(client: httpx.AsyncClient, url: str, body: dict, kind: str, disconnect: bool) -> dict:
    """One attempt. Returns {status, text, finish_reason, completion_tokens, ttft, events, error?}."""
    t0 = time.perf_counter()
    out: dict = {"status": None, "text": "", "finish_reason": None, "completion_tokens": None, "ttft": None,
                 "events": 0}
    if not body.get("stream"):
        r = await client.post(url + endpoint(kind), json=body)
        out["status"] = r.status_code
        out["retry_after"] = r.headers.get("retry-after")
        obj = r.json()
        if r.status_code == 200:
            out["text"] = answer_text(kind, obj)
            out["finish_reason"] = obj["choices"][0]["finish_reason"]
            out["completion_tokens"] = obj["usage"]["completion_tokens"]
        else:
            out["error"] = obj["error"]
        out["seconds"] = time.perf_counter() - t0
        return out
    async with client.stream("POST", url + endpoint(kind), json=body) as r:
        out["status"] = r.status_code
        out["retry_after"] = r.headers.get("retry-after")
        if r.status_code != 200:
            out["error"] = json.loads(await r.aread())["error"]
            out["seconds"] = time.perf_counter() - t0
            return out
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                out["error"] = obj["error"]
                break
            d = delta_text(kind, obj)
            if d:
                if out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - t0
                out["text"] += d
                out["events"] += 1
            if obj.get("choices") and obj["choices"][0].get("finish_reason"):
                out["finish_reason"] = obj["choices"][0]["finish_reason"]
            if obj.get("usage"):
                out["completion_tokens"] = obj["usage"]["completion_tokens"]
            if disconnect and out["events"] >= DISCONNECT_AFTER_EVENTS:
                out["disconnected"] = True
                break  # leaving the `async with` closes the connection mid-stream
        out["complete_stream"] = done
    out["seconds"] = time.perf_counter() - t0
    return out


def classify(res: dict, ref: dict, disconnect: bool) -> str:
    if res.get("hung"):
        return "hung"
    st = res["status"]
    if st == 429:
        return "rejected_429"
    if st is not None and 400 <= st < 500:
        return "client_error_4xx"
    if st != 200:
        return "server_error"
    if res.get("error"):
        return "stream_error"
    if disconnect and res.get("disconnected"):
        return "disconnected" if ref["text"].startswith(res["text"]) else "mismatch"
    if "complete_stream" in res and not res["complete_stream"]:
        return "broken_stream"
    if (res["text"], res["finish_reason"], res["completion_tokens"]) != (ref["text"], ref["finish_reason"],
                                                                         ref["completion_tokens"]):
        return "mismatch"
    return "full"


async def client_task(cid: int, args, url: str, model: str, refs: dict, results: list, rng: random.Random) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(None)) as client:
        for r in range(args.requests):
            i = cid * args.requests + r
            kind = "chat" if i % 2 == 0 else "completion"
            stream = (i // 2) % 2 == 0
            disconnect = stream and (i // 4) % args.disconnect_every == 0
            prompt = PROMPTS[i % len(PROMPTS)]
            body = request_body(model, prompt, kind, stream, args.max_tokens)
            t0 = time.perf_counter()
            attempts, first_429 = 0, False
            while True:
                attempts += 1
                try:
                    res = await asyncio.wait_for(one_request(client, url, body, kind, disconnect), args.timeout)
                except asyncio.TimeoutError:
                    res = {"status": None, "hung": True}
                except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
                    res = {"status": None, "error": {"message": f"{type(e).__name__}: {e}"}}
                if res["status"] == 429:
                    first_429 = first_429 or attempts == 1
                    if attempts <= args.retries:
                        wait = float(res.get("retry_after") or 1)
                        await asyncio.sleep(wait * (0.5 + rng.random()))
                        continue
                break
            outcome = classify(res, refs[(prompt, kind)], disconnect) if res["status"] is not None or res.get("hung") \
                else "transport_error"
            results.append({"client": cid, "request": r, "kind": kind, "stream": stream, "disconnect": disconnect,
                            "outcome": outcome, "attempts": attempts, "got_429_first": first_429,
                            "seconds": time.perf_counter() - t0, "ttft": res.get("ttft"),
                            "error": (res.get("error") or {}).get("message") if outcome not in ("full", "disconnected") else None})


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def counter(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="the Bundle to serve")
    src.add_argument("--tiny", action="store_true", help="serve a tiny random-weight bundle built in a temp dir (synthetic)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--disconnect-every", type=int, default=4,
                    help="every N-th streamed request pair disconnects after 2 text events")
    ap.add_argument("--retries", type=int, default=20, help="retries of a 429, after the server's Retry-After")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one attempt may take before it counts as hung")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra argument for `hotcold serve` (repeatable)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_load.json"))
    args = ap.parse_args()

    out_path = Path(args.out)
    server_log = Path(tempfile.gettempdir()) / f"hotcold-serve-load-{os.getpid()}.log"  # the server's stderr
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        args.bundle = str(tiny_bundle(Path(tempfile.mkdtemp(prefix="hotcold-serve-load-"))))
    log(f"starting hotcold serve {args.bundle} (queue {args.max_queue})")
    t_start = time.perf_counter()
    proc, url = start_server(args.bundle, args.max_queue, args.serve_arg, server_log)
    try:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        rss_started = rss(proc.pid)

        # references and the one-client baseline
        pairs = sorted({(PROMPTS[i % len(PROMPTS)], "chat" if i % 2 == 0 else "completion")
                        for i in range(args.clients * args.requests)})
        refs: dict = {}
        t_ref, tok_ref = 0.0, 0
        with httpx.Client(timeout=None) as c:
            for prompt, kind in pairs:
                t0 = time.perf_counter()
                r = c.post(url + endpoint(kind), json=request_body(model, prompt, kind, False, args.max_tokens))
                dt = time.perf_counter() - t0
                r.raise_for_status()
                obj = r.json()
                refs[(prompt, kind)] = {"text": answer_text(kind, obj), "finish_reason": obj["choices"][0]["finish_reason"],
                                        "completion_tokens": obj["usage"]["completion_tokens"]}
                t_ref += dt
                tok_ref += obj["usage"]["completion_tokens"]
        baseline_tps = tok_ref / t_ref
        log(f"{len(refs)} references, one client: {baseline_tps:.1f} completion tokens/s")
        rss_warm = rss(proc.pid)

        rounds = []
        rng = random.Random(0)
        for k in range(args.rounds):
            m0 = metrics(url)
            results: list = []
            t0 = time.perf_counter()
            log(f"round {k + 1}/{args.rounds}: {args.clients} clients x {args.requests} requests")
            asyncio.run(_gather(args, url, model, refs, results, rng))
            wall = time.perf_counter() - t0
            m1 = metrics(url)
            health = httpx.get(url + "/health", timeout=30)
            outcomes: dict[str, int] = {}
            for res in results:
                outcomes[res["outcome"]] = outcomes.get(res["outcome"], 0) + 1
            gen = counter(m1, "hotcold_generation_tokens_total") - counter(m0, "hotcold_generation_tokens_total")
            full = [r for r in results if r["outcome"] == "full"]
            rounds.append({
                "round": k + 1, "wall_seconds": round(wall, 3), "requests": len(results), "outcomes": outcomes,
                "first_attempt_429": sum(r["got_429_first"] for r in results),
                "attempts": sum(r["attempts"] for r in results),
                "server_generated_tokens": gen, "server_tokens_per_s": round(gen / wall, 3),
                "throughput_vs_one_client": round(gen / wall / baseline_tps, 3),
                "full_answer_seconds": {"p50": pct([r["seconds"] for r in full], 0.5),
                                        "p95": pct([r["seconds"] for r in full], 0.95),
                                        "max": max((r["seconds"] for r in full), default=None)},
                "stream_ttft_seconds_p50": pct([r["ttft"] for r in results if r["ttft"] is not None], 0.5),
                "server_counters": {
                    "rejected_429": counter(m1, "hotcold_requests_rejected_total") - counter(m0, "hotcold_requests_rejected_total"),
                    "cancelled": counter(m1, "hotcold_generations_cancelled_total") - counter(m0, "hotcold_generations_cancelled_total"),
                    "completed": counter(m1, "hotcold_generations_completed_total") - counter(m0, "hotcold_generations_completed_total"),
                    "internal_errors": counter(m1, "hotcold_internal_errors_total") - counter(m0, "hotcold_internal_errors_total"),
                    "queue_depth_after": counter(m1, "hotcold_queue_depth")},
                "health_after": {"status": health.status_code, "body": health.json()},
                "rss_after_bytes": rss(proc.pid),
                "problems": [r for r in results if r["outcome"] not in ("full", "disconnected", "rejected_429",
                                                                          "client_error_4xx")][:20],
            })
            log(f"  {outcomes} in {wall:.1f} s; server {gen / wall:.1f} tok/s; RSS {rounds[-1]['rss_after_bytes'] / 2**20:.1f} MiB")
        final_health = httpx.get(url + "/health", timeout=30).status_code
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    bad = {"hung", "server_error", "stream_error", "broken_stream", "mismatch", "transport_error"}
    expected = args.clients * args.requests
    growth = rounds[-1]["rss_after_bytes"] - rounds[0]["rss_after_bytes"]
    checks = {
        "every_request_accounted": all(r["requests"] == expected for r in rounds),
        "none_hung_lost_or_wrong": all(not (set(r["outcomes"]) & bad) for r in rounds),
        "no_internal_errors": all(r["server_counters"]["internal_errors"] == 0 for r in rounds),
        "queue_empty_after_each_round": all(r["server_counters"]["queue_depth_after"] == 0 for r in rounds),
        "health_200_after_each_round": all(r["health_after"]["status"] == 200 for r in rounds) and final_health == 200,
        "rss_flat": abs(growth) <= FLAT_RSS_TOLERANCE,
        "server_stopped_cleanly_on_ctrl_c": proc.returncode == 0,
    }
    ok = all(checks.values())
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_end": loadavg()},
        "bundle": str(args.bundle), "model": model, "bundle_summary": bundle_summary(args.bundle),
        "synthetic": bool(args.tiny) and "random weights: the text is noise; what is measured is the server",
        "server_log": str(server_log),
        "params": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "what": ("all answers greedy (temperature 0); references and the baseline are the same requests sent one "
                 "at a time by one client to the same server in this run; throughput_vs_one_client = server "
                 "tokens/s under load / that baseline"),
        "baseline_one_client_tokens_per_s": round(baseline_tps, 3),
        "rss_bytes": {"started": rss_started, "after_references": rss_warm,
                      "after_rounds": [r["rss_after_bytes"] for r in rounds],
                      "growth_first_to_last_round": growth, "flat_tolerance": FLAT_RSS_TOLERANCE},
        "rounds": rounds,
        "checks": checks, "ok": ok,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out_path)
    log(f"{'ok' if ok else 'FAILED'}: {checks} -> {out_path}")
    print(json.dumps({"ok": ok, "checks": checks, "out": str(out_path)}))
    return 0 if ok else 1


async def _gather(args, url: str, model: str, refs: dict, results: list, rng: random.Random) -> None:
    await asyncio.gather(*(client_task(c, args, url, model, refs, results, random.Random(rng.random()))
                           for c in range(args.clients)))


if __name__ == "__main__":
    sys.exit(main())
