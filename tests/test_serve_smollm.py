"""Truth on the real SmolLM2-135M: `hotcold serve` through the official `openai` client answers MBPP prompts with
exactly `hotcold run`'s greedy text (chat streamed and not, and a raw completion), on a split placement."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest
from typer.testing import CliRunner

from hotcold.cli import app as cli_app

pytestmark = [pytest.mark.smollm, pytest.mark.slow]

N = 24


@pytest.fixture(scope="module")
def bundle(smollm_source, tmp_path_factory):
    """Exact mode needs no profile: a random split of each layer's neurons between the GPU side and the CPU worker."""
    from hotcold.exporter.export import ExportOptions, export_bundle
    from tests.hybrid_util import make_placement

    cfg = smollm_source.config
    n_hot = list(np.random.default_rng(0).integers(0, cfg.n_ff + 1, cfg.n_layers))
    out = tmp_path_factory.mktemp("serve-smol") / "smollm2-split"
    export_bundle(smollm_source, make_placement(smollm_source, n_hot, seed=1), out, options=ExportOptions(sparsity=None))
    return out


def test_openai_client_equals_hotcold_run_on_smollm2(bundle, mbpp_path):
    from hotcold.runtime import load
    from hotcold.serve.app import background, create_app
    from hotcold.workloads import load_dataset

    prompts = [t.text for t in load_dataset("mbpp", "test", limit=2).tasks]
    runner = CliRunner()
    with background(create_app(load(str(bundle), mode="exact", max_len=2048), "smollm2")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        for prompt in prompts:
            r = runner.invoke(cli_app, ["run", str(bundle), "-p", prompt, "-n", str(N), "--cold-mode", "exact", "--json"])
            assert r.exit_code == 0, r.output
            ref = json.loads(r.stdout[r.stdout.index("{"):])
            msgs = [{"role": "user", "content": prompt}]
            whole = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=N, temperature=0)
            assert whole.choices[0].message.content == ref["text"], prompt
            assert whole.usage.prompt_tokens == ref["prompt_tokens"] and whole.usage.completion_tokens == ref["new_tokens"]
            streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="smollm2", messages=msgs, max_tokens=N, temperature=0, stream=True) if ch.choices)
            assert streamed == ref["text"]
        r = runner.invoke(cli_app, ["run", str(bundle), "-p", "def is_even(n):", "-n", "12", "--cold-mode", "exact",
                                    "--no-chat-template", "--json"])
        ref = json.loads(r.stdout[r.stdout.index("{"):])
        got = c.completions.create(model="smollm2", prompt="def is_even(n):", max_tokens=12, temperature=0)
        assert got.choices[0].text == ref["text"] and "return" in ref["text"]
