"""What every drafter family shares: the training interface, the resolved spec, options, the family type.

A drafter is an `nn.Module` whose forward maps a batch (token ids, attention mask, the positions of
the trained targets, plus any cache feature columns its family declared) to one `DraftStep` per
draft step: draft logits scored against the batch's target rows. A `Family` (one module or folder
under trainer/drafters/, listed in trainer/drafters/__init__.py) says how `--drafter` values name
it, which cache columns it reads, how its spec is resolved and its module built, how the decoder
drafts with it (new cache, draft, commit of the target's hidden states) and how it is saved and
loaded. Multi-step families align like EAGLE-3: step n at row t predicts x_{t+n+1}, so the batch
target row whose predicting position is p is scored by step n at row t = p − n (`step_rows`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn


class DrafterError(ValueError):
    """A drafter specification that cannot be built (message names the flag)."""


class DrafterMismatchError(ValueError):
    """A drafter was trained for another target (hidden size, vocabulary or layers)."""


class ExportFormatError(ValueError):
    """A directory is not a loadable export of a drafter family (the message names the file and key)."""


@dataclass(frozen=True)
class DraftStep:
    """One draft step's logits `[N, V_draft]` and the batch target rows `[N]` they are scored against."""

    logits: Tensor
    rows: Tensor | None = None  # None: every target row of the batch, in order


class Drafter(nn.Module):
    """Interface of a trainable drafter (see the module docstring)."""

    kind: ClassVar[str] = ""
    required_columns: ClassVar[tuple[str, ...]] = ()  # cache feature columns forward() reads
    num_steps: int = 1
    vocab_map: Tensor | None = None  # [V_draft] target ids of a reduced draft vocabulary (d2t)

    def forward(self, batch: dict[str, Tensor]) -> list[DraftStep]:  # pragma: no cover - interface
        """Per-step draft logits for the batch's trained positions."""
        raise NotImplementedError

    def export(self, out_dir: Path, tokenizer_dir: str | Path | None = None) -> None:  # pragma: no cover
        """Write the drafter in the layout its consumers load (needs full, un-partitioned weights)."""
        raise NotImplementedError

    def reload(self, model_dir: Path, dtype: torch.dtype) -> Drafter:  # pragma: no cover - interface
        """The export in model_dir loaded back as a drafter of this kind (eval mode), for the export check."""
        raise NotImplementedError


@dataclass(frozen=True)
class DrafterSpec:
    """A resolved drafter description: identical on every worker, recorded in run.json."""

    kind: str  # a family name: independent | eagle3 | medusa | mlp
    label: str  # what the user asked for: "tiny", "tiny+layers=3", a directory, "eagle3:steps=4"
    source: str  # "config" (built from hf_config) | "dir" (from_pretrained(path))
    hf_config: dict[str, Any] = field(default_factory=dict)  # the family's model config kwargs (source=config)
    path: str | None = None  # Hugging Face directory (source=dir)
    init_embeddings_path: str | None = None  # target directory whose embeddings / LM head are copied
    settings: dict[str, Any] = field(default_factory=dict)  # family settings: steps, draft_vocab_mass, ...
    draft_vocab: list[int] | None = None  # a reduced draft vocabulary's target ids, ascending

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DrafterSpec:
        return cls(**data)


@dataclass(frozen=True)
class DraftVocabulary:
    """The reduced vocabulary: target ids (ascending) and the mean cached target mass they hold."""

    ids: list[int]
    mass: float  # mean over training positions of Σ_{v in ids} p(v), from the cached top-k (a lower bound)
    positions: int


def draft_vocabulary(reader, size: int, heldout_threshold: int) -> DraftVocabulary:
    """The `size` target ids with the most cached target probability mass over the training positions.

    Summed mass (not top-1 or next-token counts) because α can only be won inside the draft
    vocabulary: the ids with the largest total mass maximize the mean in-vocabulary mass Σ_D p_v,
    the ceiling of α. Held-out sequences are excluded; ties go to the lower id. Reads the core
    columns only (never the hidden-state features).
    """
    import numpy as np

    from trainer.data import is_heldout

    vocab_size = int(reader.manifest["vocab_size"])
    if not 0 < size <= vocab_size:
        raise DrafterError(f"draft_vocab must be in 1..{vocab_size}, got {size}")
    mass = np.zeros(vocab_size, dtype=np.float64)
    positions = 0
    for record in reader.iter_sequences(columns=[]):
        if record.num_positions == 0 or is_heldout(record.sample_id, heldout_threshold):
            continue
        positions += record.num_positions
        mass += np.bincount(record.topk_ids.ravel(), weights=np.exp(record.topk_logprobs.ravel().astype(np.float64)),
                            minlength=vocab_size)
    order = np.lexsort((np.arange(vocab_size), -mass))  # most mass first, then lowest id
    ids = np.sort(order[:size])
    return DraftVocabulary(ids=[int(i) for i in ids], mass=float(mass[ids].sum() / max(positions, 1)),
                           positions=positions)


@dataclass(frozen=True)
class SpecContext:
    """What resolving a `--drafter` value may read: the cache, the target and the flags (filled by plan_run)."""

    vocab_size: int  # the cache's vocabulary
    max_positions: int
    token_ids: dict[str, int | None] = field(default_factory=dict)  # bos / eos / pad of the target's tokenizer
    features: dict[str, dict] = field(default_factory=dict)  # the cache's feature columns (manifest)
    target_path: str | None = None  # the target's local directory (None when not found here)
    target_config: Any = None  # its transformers config
    init_embeddings: tuple[str, int] | None = None  # --init-embeddings-from target: (directory, width)
    overrides: dict[str, Any] = field(default_factory=dict)  # --drafter-config
    draft_vocabulary: Callable[[int], DraftVocabulary] | None = None  # the N ids with the most cached mass

    def vocabulary(self, size: int, flag: str) -> DraftVocabulary:
        """The draft vocabulary of `size` ids (DrafterError naming `flag` when out of range)."""
        if not 0 < size <= self.vocab_size:
            raise DrafterError(f"{flag}: draft_vocab must be in 1..{self.vocab_size}, got {size}")
        if self.draft_vocabulary is None:
            raise DrafterError(f"{flag}: a draft vocabulary needs the cache's targets")
        return self.draft_vocabulary(size)


def require_target(context: SpecContext, why: str):
    """The target's transformers config, or a DrafterError saying why the family needs the target."""
    if context.target_config is None or context.target_path is None:
        raise DrafterError(f"{why}: pass --target MODEL (the cache's target was not found on this machine)")
    return context.target_config


Propose = Callable[[Tensor], tuple[Tensor, Tensor]]  # logits [1, V] -> (token [1], distribution [1, V])


class Family:
    """One drafter family: how the trainer, the decoder and the bench build, run and load its drafters."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # for messages: "EAGLE-3", "MEDUSA"
    example: ClassVar[str] = ""  # a `--drafter` value with options, for messages
    columns: ClassVar[tuple[str, ...]] = ()  # cache feature columns its drafters read
    reads: ClassVar[str] = ""  # what those columns hold, for the refusal of a cache without them
    default_eta: ClassVar[float] = 3.0  # LK^λ η when --eta is not given
    # Whether `--init-embeddings-from target` applies (copies, or checks the width of, what the family takes
    # from the target); False: the family takes nothing from the target and the flag is ignored with a warning.
    init_embeddings: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ()  # KEY of `--drafter NAME:KEY=VALUE,...`

    def matches(self, drafter: str) -> bool:
        """Whether a `--drafter` value names this family (`NAME` or `NAME:KEY=VALUE,...`)."""
        return drafter == self.name or drafter.startswith(self.name + ":")

    def parse(self, drafter: str) -> dict[str, Any]:
        """The typed options of a `--drafter` value of this family (DrafterError naming a bad one)."""
        return parse_options(drafter, self.name, self.options)

    def run_prefix(self) -> str:
        """Prefix of default run names, so sweeps of different families share a runs directory."""
        return f"{self.name}-"

    # --- training -------------------------------------------------------------------------------
    def resolve(self, drafter: str, context: SpecContext) -> DrafterSpec:  # pragma: no cover - interface
        """The DrafterSpec of a `--drafter` value for this cache and target."""
        raise NotImplementedError

    def build(self, spec: DrafterSpec) -> Drafter:  # pragma: no cover - interface
        """The trainable module of a resolved spec, fp32 on CPU (random weights from torch's RNG)."""
        raise NotImplementedError

    # --- files ----------------------------------------------------------------------------------
    def is_export(self, path: Path) -> bool:  # pragma: no cover - interface
        """Whether a directory holds an export of this family."""
        raise NotImplementedError

    def load(self, path: Path, dtype: torch.dtype) -> nn.Module:  # pragma: no cover - interface
        """An export loaded as the model the decoder drafts with (eval mode); its config is `model.config`."""
        raise NotImplementedError

    def read_config(self, path: Path) -> Any:  # pragma: no cover - interface
        """An export's config (what `load(path).config` would be), read without its weights."""
        raise NotImplementedError

    # --- decoding (trainer/drafters/*: the decoder in eval/speculative.py calls these) ----------
    def owns(self, model: nn.Module) -> bool:  # pragma: no cover - interface
        """Whether `model` is a decoding model of this family."""
        raise NotImplementedError

    def check_target(self, config: Any, target_config) -> None:
        """Raise DrafterMismatchError unless a drafter of this config was trained for a target of this shape."""

    def target_layers(self, model: nn.Module) -> tuple[int, ...]:
        """The target hidden_states indices the drafter reads, concatenated (none: it reads only tokens)."""
        return ()

    def new_cache(self, model: nn.Module) -> Any:  # pragma: no cover - interface
        """The drafter's empty decoding state."""
        raise NotImplementedError

    def draft(self, model: nn.Module, cache: Any, tokens: Tensor, k: int, propose: Propose,
              vocab: int) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - interface
        """Up to k chained drafts after the committed `tokens`: (target ids [n], distributions [n, vocab])."""
        raise NotImplementedError

    def commit(self, cache: Any, states: Tensor) -> None:
        """Hand over the target states [n, ·] of the newly committed positions (in order)."""


# --- helpers the families share ---------------------------------------------------------------

def option_value(key: str, value: Any, flag: str = "--drafter-config") -> Any:
    """One option as its type: true/false for *_embeddings / tie / scale_input keys, a float rope_theta, else an int > 0."""
    if key.endswith("_embeddings") or key in BOOL_OPTIONS:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes"):
            return True
        if str(value).lower() in ("0", "false", "no"):
            return False
        raise DrafterError(f"{flag} {key} must be true or false, got {value!r}")
    try:
        number = float(value) if key == "rope_theta" else int(value)
    except (TypeError, ValueError):
        raise DrafterError(f"{flag} {key} must be a number, got {value!r}") from None
    if number <= 0:
        raise DrafterError(f"{flag} {key} must be > 0, got {value!r}")
    return number


BOOL_OPTIONS = ("tie", "scale_input")


def parse_options(drafter: str, name: str, options: tuple[str, ...]) -> dict[str, Any]:
    """`NAME:a=1,b=2` -> {"a": 1, "b": 2}, typed by option_value; unknown keys and bad values refused."""
    if not (drafter == name or drafter.startswith(name + ":")):
        raise DrafterError(f"--drafter {drafter!r} is not a {name} drafter ({name}[:KEY=VALUE,...])")
    flag = f"--drafter {name}"
    parsed: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in drafter.partition(":")[2].split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in options:
            raise DrafterError(f"{flag}: bad option {item!r}; expected KEY=VALUE with KEY in {', '.join(options)}")
        parsed[key] = option_value(key, value.strip(), flag=flag)
    return parsed


def step_rows(target_batch: Tensor, target_pos: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Step n's scored target rows [N_n] and the (batch, position) of the drafter row t = p − n of each."""
    rows = torch.nonzero(target_pos >= n).view(-1)
    return rows, target_batch[rows], target_pos[rows] - n


def shifted_tokens(input_ids: Tensor, n: int) -> Tensor:
    """x_{t+n} at every row t of input_ids [B, T] (zeros past the end)."""
    size, length = input_ids.shape
    return torch.cat([input_ids[:, n:], input_ids.new_zeros(size, min(n, length))], dim=1)


def on_target_vocab(logits: Tensor, draft_ids: Tensor | None, vocab: int) -> Tensor:
    """Draft-vocabulary logits [.., Vd] -> target-vocabulary logits [.., vocab], -inf outside draft_ids."""
    if draft_ids is None:
        return logits[..., :vocab]
    full = logits.new_full((*logits.shape[:-1], vocab), float("-inf"))
    return full.index_copy_(-1, draft_ids, logits)


def load_input_embeddings(model_dir: str | Path) -> Tensor:
    """The input token-embedding matrix `[V, d]` of a Hugging Face model, read alone from its safetensors."""
    return load_embeddings(model_dir, output=False)


def load_embeddings(model_dir: str | Path, *, output: bool) -> Tensor:
    """The input (or output: the LM head's) embedding matrix `[V, d]` of a Hugging Face model, from its safetensors."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    matrix = (skeleton.get_output_embeddings() if output else skeleton.get_input_embeddings()).weight
    name = next(n for n, p in skeleton.named_parameters() if p is matrix)  # tied: the input embeddings' name
    what = "the LM head" if output else "the input embeddings"
    files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = [model_dir / json.loads(index.read_text())["weight_map"][name]]
    for weights in files:
        with safe_open(weights, framework="pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name).float()
    raise DrafterError(f"{model_dir}: no tensor {name!r} ({what}) in its safetensors files")


WEIGHTS = "model.safetensors"


def write_export(out_dir: Path, config: dict, tensors: dict[str, Tensor]) -> None:
    """config.json and model.safetensors of an export (out_dir created; the caller makes it atomic)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(out_dir / WEIGHTS),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def read_export(model_dir: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """model.safetensors of an export, checked to hold exactly the `expected` names and shapes."""
    from safetensors.torch import load_file

    path = Path(model_dir) / WEIGHTS
    if not path.is_file():
        raise ExportFormatError(f"{path}: missing (the export keeps its weights there)")
    tensors = load_file(str(path))
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise ExportFormatError(f"{path}: missing tensors {missing}, unexpected tensors {unknown}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ExportFormatError(f"{path}: {name} has shape {tuple(tensor.shape)}, config.json implies "
                                    f"{tuple(expected[name])}")
    return tensors


def read_json(path: Path) -> dict:
    """A JSON object file (ExportFormatError naming the file otherwise)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ExportFormatError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise ExportFormatError(f"{path}: not a JSON object")
    return data


def read_export_config(path: Path, architectures: tuple[str, ...], weights: str = WEIGHTS) -> dict | None:
    """config.json of a directory whose architectures include one of `architectures` and that holds `weights`."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    names = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(names, list) and set(names) & set(architectures) and (Path(path) / weights).is_file():
        return config
    return None


def save_tokenizer(tokenizer_dir: str | Path | None, out_dir: Path) -> None:
    """Copy the target's tokenizer next to an export (nothing when tokenizer_dir is None)."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
