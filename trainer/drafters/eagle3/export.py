"""EAGLE-3 drafters on disk, in the layout vLLM and SGLang load (`LlamaForCausalLMEagle3`).

    <dir>/config.json        Llama config of the one-layer drafter plus the EAGLE-3 keys:
                             draft_vocab_size, target_hidden_size,
                             eagle_aux_hidden_state_layer_ids  (vLLM: input of target layer i)
                             eagle_config.eagle_aux_hidden_state_layer_ids  (SGLang/SpecForge: output
                             of layer i, i.e. ours − 1), and an "lkspec" block for our own loader
    <dir>/model.safetensors  fc.weight [d, 3·d_target], midlayer.* (q/k/v_proj take 2d inputs),
                             norm.weight, lm_head.weight [draft_vocab, d], embed_tokens.weight,
                             d2t int64 [draft_vocab] (target id − draft id), t2d bool [vocab]

Convention sources: vLLM `vllm/model_executor/models/llama_eagle3.py` (load_weights renames
`midlayer.` to `layers.0.`, `d2t` to `draft_id_to_target_id`, skips `t2d`, embed_tokens optional;
compute_logits maps draft id i to target id i + d2t[i]) and `vllm/v1/worker/gpu/spec_decode/eagle/
eagle3_utils.py` (reads `eagle_aux_hidden_state_layer_ids`); SGLang
`python/sglang/srt/models/llama_eagle3.py` (hot_token_id = d2t + arange) and its target models'
`set_eagle3_layers_to_capture` (captures layer id + 1's input, hence ours − 1 in `eagle_config`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from trainer.drafters.base import ExportFormatError, read_export_config
from trainer.drafters.eagle3.model import Eagle3Config, Eagle3Model

ARCHITECTURE = "LlamaForCausalLMEagle3"
# Architecture names other EAGLE-3 exporters write for the same layout.
ARCHITECTURES = (ARCHITECTURE, "Eagle3LlamaForCausalLM", "LlamaForCausalLMEagle3Model")
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
# Buffers of Eagle3Model that are not checkpoint tensors (the draft vocabulary is written as d2t/t2d).
_NOT_WEIGHTS = ("draft_ids",)


class Eagle3FormatError(ExportFormatError):
    """A directory is not a loadable EAGLE-3 drafter (the message names the file and key)."""


def export_config(config: Eagle3Config, metadata: dict | None = None) -> dict:
    """config.json of an EAGLE-3 drafter (the keys vLLM / SGLang read, plus our `lkspec` block)."""
    layers = [int(i) for i in config.aux_layers]
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "eagle_aux_hidden_state_layer_ids": layers,
        "eagle_config": {"use_aux_hidden_state": True,
                         "eagle_aux_hidden_state_layer_ids": [i - 1 for i in layers]},
        "lkspec": {
            "format": "eagle3",
            "format_version": FORMAT_VERSION,
            "aux_layers": layers,
            "aux_layers_meaning": "target hidden_states[i] = input of decoder layer i, concatenated in this order",
            **(metadata or {}),
        },
    }


def export_tensors(model: Eagle3Model) -> dict[str, torch.Tensor]:
    """The checkpoint tensors: parameters under their EAGLE-3 names, d2t (offsets) and t2d (mask)."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()
               if name not in _NOT_WEIGHTS}
    draft_ids = model.draft_ids.detach().cpu().long()
    tensors["d2t"] = (draft_ids - torch.arange(draft_ids.numel())).contiguous()
    t2d = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    t2d[draft_ids] = True
    tensors["t2d"] = t2d
    return tensors


def save_eagle3(model: Eagle3Model, out_dir: str | Path, *, metadata: dict | None = None) -> None:
    """Write `model` as an EAGLE-3 drafter directory (config.json + model.safetensors), replacing out_dir."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.eagle3-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = next(model.parameters()).dtype
    config = export_config(model.config, metadata)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(export_tensors(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def is_eagle3_dir(path: str | Path) -> bool:
    """Whether path holds an EAGLE-3 drafter (config.json naming an EAGLE-3 architecture, and weights)."""
    return read_export_config(Path(path), ARCHITECTURES, WEIGHTS) is not None


def read_config(model_dir: str | Path) -> Eagle3Config:
    """The Eagle3Config of an EAGLE-3 directory's config.json (ours or any exporter's with the same keys)."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise Eagle3FormatError(f"{path}: cannot read an EAGLE-3 config ({exc})") from None

    def need(key: str):
        if key not in data:
            raise Eagle3FormatError(f"{path}: missing key {key!r} (not an EAGLE-3 drafter config)")
        return data[key]

    if int(data.get("num_hidden_layers", 1)) != 1:
        raise Eagle3FormatError(f"{path}: num_hidden_layers={data['num_hidden_layers']}; only one-layer "
                                "EAGLE-3 drafters are supported")
    if data.get("hidden_act", "silu") != "silu" or data.get("attention_bias") or data.get("mlp_bias"):
        raise Eagle3FormatError(f"{path}: only silu MLPs without biases are supported")
    if data.get("rope_scaling"):
        raise Eagle3FormatError(f"{path}: rope_scaling {data['rope_scaling']!r} is not supported")
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    if data.get("head_dim") not in (None, hidden // heads):
        raise Eagle3FormatError(f"{path}: head_dim={data['head_dim']} differs from hidden_size / heads")
    layers = data.get("eagle_aux_hidden_state_layer_ids")
    if layers is None and isinstance(data.get("eagle_config"), dict):
        nested = data["eagle_config"].get("eagle_aux_hidden_state_layer_ids")
        layers = [int(i) + 1 for i in nested] if nested else None
    vocab = int(need("vocab_size"))
    try:
        return Eagle3Config(
            vocab_size=vocab, draft_vocab_size=int(data.get("draft_vocab_size") or vocab), hidden_size=hidden,
            target_hidden_size=int(data.get("target_hidden_size") or hidden),
            intermediate_size=int(need("intermediate_size")), num_attention_heads=heads,
            num_key_value_heads=int(data.get("num_key_value_heads") or heads),
            aux_layers=tuple(int(i) for i in layers or ()), rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
            rope_theta=float(data.get("rope_theta", 10000.0)),
            max_position_embeddings=int(data.get("max_position_embeddings", 2048)))
    except (TypeError, ValueError) as exc:
        raise Eagle3FormatError(f"{path}: {exc}") from None


def load_eagle3(model_dir: str | Path) -> Eagle3Model:
    """Load an EAGLE-3 drafter directory into an fp32 Eagle3Model in eval mode (weights checked by name and shape)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    weights_path = model_dir / WEIGHTS
    if not weights_path.is_file():
        raise Eagle3FormatError(f"{weights_path}: missing (an EAGLE-3 drafter keeps its weights there)")
    tensors = load_file(str(weights_path))
    model = Eagle3Model(config)
    d2t, t2d = tensors.pop("d2t", None), tensors.pop("t2d", None)
    expected = {name: p for name, p in model.state_dict().items() if name not in _NOT_WEIGHTS}
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise Eagle3FormatError(f"{weights_path}: missing tensors {missing}, unexpected tensors {unknown}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise Eagle3FormatError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, "
                                    f"config.json implies {tuple(expected[name].shape)}")
    model.load_state_dict({**tensors, "draft_ids": model.draft_ids}, strict=True)
    if d2t is not None:
        draft_ids = d2t.long() + torch.arange(d2t.numel())
        try:
            model.set_draft_vocab(draft_ids)
        except ValueError as exc:
            raise Eagle3FormatError(f"{weights_path}: d2t: {exc}") from None
        if t2d is not None and (t2d.numel() != config.vocab_size or not torch.equal(
                t2d.bool().nonzero().view(-1), draft_ids.sort().values)):
            raise Eagle3FormatError(f"{weights_path}: t2d does not mark exactly the target ids of d2t")
    elif config.draft_vocab_size != config.vocab_size:
        raise Eagle3FormatError(f"{weights_path}: no d2t tensor for draft_vocab_size={config.draft_vocab_size} "
                                f"< vocab_size={config.vocab_size}")
    return model.float().eval()
