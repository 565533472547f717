"""Sizing before a run, from a model config alone: GPUs per target worker, cache bytes, GPU-hours.

Pure maths on a Hugging Face `config.json` (no weights, no Ray) plus a token count of the dataset.
The placement planner is shared with the cache build (`--gpus-per-worker auto`). The cache-size
model uses bytes per stored item measured on real builds of the embedded SmolLM2 target
(`python bench/plan.py --measure`; `bench/plan.py` checks the estimate against real builds).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

GIB = 2**30
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "targets"  # shipped config.json files by name
DTYPE_BYTES = {"bf16": 2, "fp32": 4}

# ---------------------------------------------------------------------------------- measured bytes
# `python bench/plan.py --measure` on 2026-11-30, a 2-core Intel Xeon (AVX-512/AMX), torch 2.13 CPU,
# cache format 2: SmolLM2-135M-Instruct (bf16, vocab 49,152) over ShareGPT conversations 1000-1127
# (123 with trained tokens, 99,563 tokens, 78,262 trained positions, max length 1024), exact top-256
# sliced to each k, encoded by cache.shard.core_columns in shards of 64 sequences, each column
# compressed as Arrow compresses it (zstd level 3).
# k -> (top-k ids incl. the shard's id table, top-k log-probs) compressed bytes per entry. Log-probs
# are deltas along k, so their cost per entry falls with k; ids further down the ranking cost more.
MEASURED_VOCAB = 49152
TOPK_ENTRY_BYTES = {
    1: (1.176, 1.830), 8: (1.404, 1.123), 16: (1.451, 0.872), 32: (1.506, 0.640),
    64: (1.569, 0.474), 128: (1.626, 0.356), 256: (1.677, 0.269),
}
TOKEN_BYTES = 1.234  # input ids + loss mask, compressed, per token
ROW_BYTES = 22.7  # per sequence per shard file: sample id, counts, offsets
FILE_BYTES = 2323.0  # per shard file: Arrow schema, metadata, footer
MANIFEST_BYTES = 2000.0  # manifest.json + stats.json of a one-shard cache; plus MANIFEST_SHARD_BYTES per shard
MANIFEST_SHARD_BYTES = 560.0
# compressed / raw bf16 bytes of the hidden-state features (zstd level 1 over byte planes)
FEATURE_RATIO = {"last": 0.692, "aux": 0.704}

# ----------------------------------------------------------------------------- placement constants
GPU_RESERVED_BYTES = int(1.5 * GIB)  # CUDA context, cuBLAS workspace, allocator slack, per GPU
GPU_RESERVED_FRACTION = 0.05  # of each GPU's memory, on top: fragmentation
LOGITS_CHUNK = 1024  # rows per lm_head chunk in the worker (pipeline.target_pass.LOGITS_CHUNK)
DEFAULT_GPU_TFLOPS = 989.0  # H100/H200 SXM dense bf16
DEFAULT_UTILIZATION = 0.4


class PlanError(ValueError):
    """The model config or the planning inputs cannot be used; the message names the field."""


# ------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelShape:
    """What sizing needs of a decoder-only transformer, read from its config.json."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width
    vocab_size: int
    tie_embeddings: bool = False
    num_experts: int = 0  # routed experts per MoE layer (0: dense)
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_intermediate_size: int = 0  # always-on shared expert(s) width in MoE layers
    moe_layers: int = 0  # layers whose MLP is a mixture of experts
    mla: tuple[int, int, int, int, int] | None = None  # (q_lora, kv_lora, qk_nope, qk_rope, v_head) of MLA

    @property
    def qk_dim(self) -> int:
        """Query/key width per head in the attention scores."""
        return self.mla[2] + self.mla[3] if self.mla else self.head_dim

    @property
    def v_dim(self) -> int:
        """Value width per head."""
        return self.mla[4] if self.mla else self.head_dim

    def attention_params(self) -> int:
        """Parameters of one attention block (projections; norms are negligible)."""
        d, h = self.hidden_size, self.num_heads
        if self.mla:
            q_lora, kv_lora, nope, rope, v = self.mla
            q = d * h * (nope + rope) if q_lora == 0 else d * q_lora + q_lora * h * (nope + rope)
            return q + d * (kv_lora + rope) + kv_lora * h * (nope + v) + h * v * d
        return d * h * self.head_dim * 2 + 2 * d * self.num_kv_heads * self.head_dim

    def mlp_params(self, moe: bool, active: bool) -> int:
        """Parameters of one gated MLP block: all experts, or those one token uses when `active`."""
        d = self.hidden_size
        if not moe:
            return 3 * d * self.intermediate_size
        experts = self.experts_per_token if active else self.num_experts
        return 3 * d * (experts * self.expert_intermediate_size + self.shared_intermediate_size) + d * self.num_experts

    def layer_params(self, moe: bool, active: bool = False) -> int:
        """Parameters of one decoder layer (attention + MLP + two norms)."""
        return self.attention_params() + self.mlp_params(moe, active) + 2 * self.hidden_size

    def embedding_params(self) -> int:
        """Input embedding table."""
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """LM head (0 extra when tied to the embeddings) plus the final norm."""
        return (0 if self.tie_embeddings else self.vocab_size * self.hidden_size) + self.hidden_size

    def body_params(self, active: bool = False) -> int:
        """Every decoder layer (active: the parameters one token passes through)."""
        dense = self.num_layers - self.moe_layers
        return dense * self.layer_params(False) + self.moe_layers * self.layer_params(True, active)

    def total_params(self) -> int:
        """All parameters (what the GPUs hold)."""
        return self.embedding_params() + self.body_params() + self.head_params()

    def active_params(self) -> int:
        """Parameters one token passes through, with the LM head (embeddings are a lookup)."""
        return self.body_params(active=True) + self.vocab_size * self.hidden_size

    def module_bytes(self, dtype_bytes: int) -> list[tuple[str, int]]:
        """(module, bytes) in execution order, the units a device map places."""
        moe_from = self.num_layers - self.moe_layers  # dense layers first (DeepSeek); see read_model_shape
        modules = [("embed_tokens", self.embedding_params() * dtype_bytes)]
        modules += [(f"layers.{i}", self.layer_params(i >= moe_from) * dtype_bytes) for i in range(self.num_layers)]
        modules.append(("norm+lm_head", self.head_params() * dtype_bytes))
        return modules


def _first(config: dict, *names: str, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def read_model_shape(config: dict, name: str = "model") -> ModelShape:
    """A ModelShape from a config.json mapping (multimodal configs: their `text_config`)."""
    if isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "tie_word_embeddings": config.get(
            "tie_word_embeddings", config["text_config"].get("tie_word_embeddings", False))}
    required = {"hidden_size": ("hidden_size", "n_embd", "d_model"),
                "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
                "num_heads": ("num_attention_heads", "n_head"),
                "vocab_size": ("vocab_size",)}
    values = {}
    for key, names in required.items():
        value = _first(config, *names)
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"{name}: config field {names[0]!r} must be a positive integer, got {value!r}")
        values[key] = value
    d, layers, heads = values["hidden_size"], values["num_layers"], values["num_heads"]
    intermediate = _first(config, "intermediate_size", "ffn_dim", "n_inner", default=4 * d)
    experts = int(_first(config, "num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", default=0))
    per_token = int(_first(config, "num_experts_per_tok", "experts_per_token", "moe_topk", default=0))
    moe_layers = 0
    expert_width = shared_width = 0
    if experts > 0:
        if per_token < 1:
            raise PlanError(f"{name}: a mixture-of-experts config needs 'num_experts_per_tok', got {per_token!r}")
        expert_width = int(_first(config, "moe_intermediate_size", default=intermediate))
        shared_width = int(config.get("shared_expert_intermediate_size") or 0) \
            + int(config.get("n_shared_experts") or 0) * expert_width
        dense = set(config.get("mlp_only_layers") or [])
        step = int(config.get("decoder_sparse_step") or 1)
        first_dense = int(config.get("first_k_dense_replace") or 0)
        moe_layers = sum(1 for i in range(layers)
                         if i not in dense and i >= first_dense and (i + 1) % step == 0)
    mla = None
    if config.get("kv_lora_rank"):
        mla = tuple(int(config.get(key) or 0) for key in
                    ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    return ModelShape(
        name=name, hidden_size=d, num_layers=layers, num_heads=heads,
        num_kv_heads=int(_first(config, "num_key_value_heads", "num_kv_heads", default=heads)),
        head_dim=int(_first(config, "head_dim", default=d // heads)), intermediate_size=int(intermediate),
        vocab_size=values["vocab_size"], tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        num_experts=experts, experts_per_token=per_token, expert_intermediate_size=expert_width,
        shared_intermediate_size=shared_width, moe_layers=moe_layers, mla=mla,
    )


def shipped_configs() -> dict[str, Path]:
    """Names of the config.json files in configs/targets/ (paper targets and our aliases)."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.json"))}


def config_path(spec: str) -> Path:
    """The config.json of a target given as a shipped name, a config.json file or a model directory."""
    shipped = shipped_configs()
    if spec in shipped:
        return shipped[spec]
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    if path.is_file() and path.suffix == ".json":
        return path
    raise PlanError(f"unknown target {spec!r}: expected a name from configs/targets ({', '.join(shipped)}), "
                    "a config.json file or a model directory holding one")


def load_model_shape(spec: str) -> ModelShape:
    """read_model_shape of a shipped name, config.json file or model directory (weights never read)."""
    path = config_path(spec)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: not a readable config.json ({exc})") from None
    if not isinstance(config, dict):
        raise PlanError(f"{path}: config.json must hold a JSON object")
    return read_model_shape(config, name=spec)


# -------------------------------------------------------------------------------- the dataset
@dataclass(frozen=True)
class TokenCounts:
    """Tokens the build would run: sequences, tokens, trained positions (estimates when sampled)."""

    sequences: int
    tokens: float
    positions: float  # trained positions (loss mask 1 at t >= 1)
    sum_squared_lengths: float  # Σ L², for the attention FLOPs
    sampled: int  # conversations tokenized
    population: int  # conversations considered (valid rows, up to the limit)
    positions_stderr: float = 0.0  # standard error of `positions` from sampling (0 when exact)
    skipped: dict = field(default_factory=dict)  # reason -> rows the build would skip
    tokenizer: str = ""

    @property
    def exact(self) -> bool:
        return self.sampled == self.population


def evenly_spaced(count: int, size: int) -> list[int]:
    """`size` indices spread evenly over range(count) (all of them when size >= count)."""
    if size >= count:
        return list(range(count))
    return sorted({(2 * i + 1) * count // (2 * size) for i in range(size)})


def count_tokens(conversations: list, tokenizer, *, max_length: int, sample: int, tokenizer_name: str = "",
                 skipped: dict | None = None) -> TokenCounts:
    """Tokenize every conversation (or an evenly spaced sample of `sample`) and extrapolate the sums."""
    from pipeline.resolve.chat import ChatTemplateError, tokenize_conversation

    chosen = evenly_spaced(len(conversations), sample)
    lengths, positions = [], []
    unusable: dict[str, int] = {}
    for i in chosen:
        try:
            tokens = tokenize_conversation(tokenizer, conversations[i].messages, max_length)
        except ChatTemplateError:
            unusable["chat template"] = unusable.get("chat template", 0) + 1
            continue
        if tokens.num_positions == 0:
            reason = "no assistant tokens within max length"
            unusable[reason] = unusable.get(reason, 0) + 1
            continue
        lengths.append(len(tokens.input_ids))
        positions.append(tokens.num_positions)
    if not lengths:
        raise PlanError("no usable conversation in the dataset (or its sample)")
    scale = len(conversations) / len(chosen)  # 1 when every conversation was tokenized
    usable = round(len(lengths) * scale)
    mean_p = sum(positions) / len(positions)
    var_p = sum((p - mean_p) ** 2 for p in positions) / max(1, len(positions) - 1)
    finite = max(0.0, 1.0 - len(chosen) / len(conversations))  # finite-population correction
    skipped = {**(skipped or {}), **{reason: round(rows * scale) for reason, rows in unusable.items()}}
    return TokenCounts(
        sequences=usable, tokens=sum(lengths) * scale, positions=sum(positions) * scale,
        sum_squared_lengths=sum(length * length for length in lengths) * scale, sampled=len(chosen),
        population=len(conversations), positions_stderr=usable * math.sqrt(var_p / len(positions) * finite), skipped=skipped,
        tokenizer=tokenizer_name,
    )


def read_conversations(dataset, limit: int | None) -> tuple[list, dict]:
    """The dataset's valid conversations in order (first `limit`), and invalid rows by reason."""
    from pipeline.resolve.datasets import InvalidSampleError

    conversations, skipped = [], {}
    for item in dataset.conversations():
        if limit is not None and len(conversations) >= limit:
            break
        if isinstance(item, InvalidSampleError):
            skipped[item.reason] = skipped.get(item.reason, 0) + 1
            continue
        conversations.append(item)
    return conversations, skipped


# ------------------------------------------------------------------------------ cache size
def _interpolate(table: dict[int, tuple[float, ...]], k: int) -> tuple[float, ...]:
    """Linear interpolation in log2 k between measured points (the end values outside them)."""
    ks = sorted(table)
    if k <= ks[0]:
        return table[ks[0]]
    if k >= ks[-1]:
        return table[ks[-1]]
    hi = next(i for i, x in enumerate(ks) if x >= k)
    lo_k, hi_k = ks[hi - 1], ks[hi]
    w = (math.log2(k) - math.log2(lo_k)) / (math.log2(hi_k) - math.log2(lo_k))
    return tuple(a + w * (b - a) for a, b in zip(table[lo_k], table[hi_k]))


def id_scale(vocab_size: int) -> float:
    """Bytes of a compressed input token id relative to the measured vocabulary: bits per id, log2 V."""
    return math.log2(max(vocab_size, 2)) / math.log2(MEASURED_VOCAB)


def entry_bytes(k: int) -> float:
    """Compressed bytes per top-k entry (id + log-prob) at this k.

    Top-k ids are stored as ranks in a per-shard table of the ids that occur (cache format 2), so
    their cost follows how concentrated the target's top-k ids are, not the vocabulary size.
    """
    ids, logprobs = _interpolate(TOPK_ENTRY_BYTES, k)
    return ids + logprobs


@dataclass(frozen=True)
class CacheSize:
    """Estimated bytes on disk of one cache, by part."""

    topk: float
    tokens: float  # input ids + loss mask
    overhead: float  # rows, shard files, manifest
    features: dict[str, float]

    @property
    def core(self) -> float:
        return self.topk + self.tokens + self.overhead

    @property
    def total(self) -> float:
        return self.core + sum(self.features.values())


def feature_dims(shape: ModelShape, features: Iterable[str]) -> dict[str, int]:
    """Stored width per feature: `last` = d, `aux` = 3·d (low/mid/high layers)."""
    return {name: {"last": 1, "aux": 3}[name] * shape.hidden_size for name in features}


def cache_size(shape: ModelShape, counts: TokenCounts, *, k: int, features: Iterable[str] = (),
               shard_size: int = 64) -> CacheSize:
    """Bytes of the cache a build would write: top-k per trained position, ids per token, features per token."""
    features = tuple(features)
    shards = math.ceil(counts.sequences / shard_size)
    files = shards * (1 + len(features))
    overhead = (counts.sequences * (1 + len(features)) * ROW_BYTES + files * FILE_BYTES
                + MANIFEST_BYTES + shards * MANIFEST_SHARD_BYTES)
    # features are stored for every token of a sequence (not only trained ones), bf16 then zstd
    feats = {name: counts.tokens * dim * 2 * FEATURE_RATIO[name] for name, dim in feature_dims(shape, features).items()}
    return CacheSize(topk=counts.positions * k * entry_bytes(k),
                     tokens=counts.tokens * TOKEN_BYTES * id_scale(shape.vocab_size), overhead=overhead,
                     features=feats)


# ------------------------------------------------------------------------------------- compute
def forward_flops(shape: ModelShape, counts: TokenCounts) -> float:
    """FLOPs of the build's target pass: 2·active body params per token, causal attention, LM head at trained positions."""
    body = 2.0 * shape.body_params(active=True) * counts.tokens
    # scores and weighted values: 2·(qk + v)·heads FLOPs per (query, key) pair, L(L+1)/2 pairs per sequence
    pairs = (counts.sum_squared_lengths + counts.tokens) / 2
    attention = 2.0 * shape.num_layers * shape.num_heads * (shape.qk_dim + shape.v_dim) * pairs
    head = 2.0 * shape.hidden_size * shape.vocab_size * counts.positions
    return body + attention + head


def gpu_hours(flops: float, *, gpu_tflops: float = DEFAULT_GPU_TFLOPS,
              utilization: float = DEFAULT_UTILIZATION) -> float:
    """GPU-hours for `flops` at a stated fraction of the GPU's peak dense throughput."""
    if gpu_tflops <= 0 or not 0 < utilization <= 1:
        raise PlanError(f"need gpu_tflops > 0 and 0 < utilization <= 1, got {gpu_tflops}, {utilization}")
    return flops / (gpu_tflops * 1e12 * utilization) / 3600


# ----------------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class Placement:
    """How a target worker holds the model: GPUs per worker, workers per node, memory per GPU."""

    gpus_per_worker: int
    workers_per_node: int
    gpu_memory_bytes: int
    weight_bytes: int  # all of them, over the worker's GPUs
    activation_bytes: int  # transient, per GPU, for one batch
    topk_buffer_bytes: int  # on the GPU holding the LM head
    feature_bytes: int  # captured hidden states of one batch
    reserved_bytes: int  # per GPU
    max_memory_bytes: int  # the weight budget per GPU handed to the device map

    def to_dict(self) -> dict:
        """JSON-friendly copy."""
        return asdict(self)


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """Peak transient bytes of one decoder layer on a batch of `tokens` (memory-efficient attention)."""
    d = shape.hidden_size
    qkv = shape.num_heads * (shape.qk_dim + shape.v_dim) + shape.num_kv_heads * shape.head_dim * 2
    mlp = shape.intermediate_size if shape.moe_layers < shape.num_layers else 0
    if shape.moe_layers:
        mlp = max(mlp, shape.experts_per_token * shape.expert_intermediate_size + shape.shared_intermediate_size)
    return tokens * dtype_bytes * (4 * d + qkv + 3 * mlp)


def topk_buffer_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, k: int) -> int:
    """The worker's LM-head working set: selected states, one chunk of logits (model dtype + fp32), top-k out."""
    chunk = min(tokens, LOGITS_CHUNK)
    return tokens * shape.hidden_size * dtype_bytes + chunk * shape.vocab_size * (dtype_bytes + 4 + 4) \
        + tokens * k * 12


def plan_placement(shape: ModelShape, *, gpu_memory_bytes: int, gpus_per_node: int, token_budget: int = 8192,
                   dtype: str = "bf16", k: int = 64, features: Iterable[str] = (),
                   gpus: int | None = None) -> Placement:
    """The fewest GPUs (on one node) whose memory holds the weights, one batch's activations and the top-k buffers.

    With `gpus`, only that many are tried (a user's --gpus-per-worker), and PlanError says if they are too few.
    """
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if gpu_memory_bytes <= 0 or gpus_per_node < 1:
        raise PlanError(f"need GPU memory > 0 and gpus per node >= 1, got {gpu_memory_bytes}, {gpus_per_node}")
    size = DTYPE_BYTES[dtype]
    modules = shape.module_bytes(size)
    acts = activation_bytes(shape, token_budget, size)
    buffers = topk_buffer_bytes(shape, token_budget, size, k)
    feats = sum(feature_dims(shape, features).values()) * token_budget * size
    reserved = GPU_RESERVED_BYTES + int(GPU_RESERVED_FRACTION * gpu_memory_bytes)
    weights = sum(b for _, b in modules)
    if gpus is not None and not 1 <= gpus <= gpus_per_node:
        raise PlanError(f"{gpus} GPUs per worker: the nodes have {gpus_per_node}")
    for n in range(1, gpus_per_node + 1) if gpus is None else [gpus]:
        budgets = [gpu_memory_bytes - reserved - acts - feats // n for _ in range(n)]
        budgets[-1] -= buffers  # the last GPU holds the LM head and runs the top-k
        if min(budgets) > 0 and _fits_in_order(modules, budgets):
            return Placement(n, gpus_per_node // n, gpu_memory_bytes, weights, acts, buffers, feats, reserved,
                             max(budgets))
    raise PlanError(
        f"{shape.name}: {weights / GIB:.1f} GiB of {dtype} weights plus {(acts + buffers) / GIB:.1f} GiB of "
        f"working memory do not fit in {gpus or gpus_per_node} GPUs of {gpu_memory_bytes / GIB:.0f} GiB on one node: "
        "use GPUs with more memory, more GPUs per node, or a smaller --token-budget")


def _fits_in_order(modules: list[tuple[str, int]], budgets: list[int]) -> bool:
    """Whether modules, in order, fill the GPUs one after the other (a sequential device map)."""
    gpu, used = 0, 0
    for _, size in modules:
        while used + size > budgets[gpu]:
            gpu, used = gpu + 1, 0
            if gpu == len(budgets):
                return False
        used += size
    return True


# ------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class RunPlan:
    """Everything `lkspec plan` prints."""

    target: str
    vocab_size: int
    params_total: int
    params_active: int
    k: int
    features: tuple[str, ...]
    counts: TokenCounts
    size: CacheSize
    placement: Placement
    flops: float
    gpu_hours: float
    gpu_tflops: float
    utilization: float

    @property
    def gpu_hours_held(self) -> float:
        """GPU-hours the workers hold: a layer-split worker's GPUs take turns, so N GPUs are held N times as long."""
        return self.gpu_hours * self.placement.gpus_per_worker

    def to_dict(self) -> dict:
        """The plan as JSON-friendly data (bytes as integers)."""
        return {
            "target": self.target, "vocab_size": self.vocab_size, "params_total": self.params_total, "params_active": self.params_active,
            "k": self.k, "features": list(self.features),
            "data": {**asdict(self.counts), "exact": self.counts.exact},
            "cache_bytes": {"topk": round(self.size.topk), "tokens": round(self.size.tokens),
                            "overhead": round(self.size.overhead), "core": round(self.size.core),
                            "features": {n: round(b) for n, b in self.size.features.items()},
                            "total": round(self.size.total),
                            "per_trained_position_core": self.size.core / self.counts.positions,
                            "per_token_core": self.size.core / self.counts.tokens},
            "placement": self.placement.to_dict(),
            "target_pass": {"flops": self.flops, "gpu_hours": self.gpu_hours,
                            "gpu_hours_held": self.gpu_hours_held, "gpu_tflops": self.gpu_tflops,
                            "utilization": self.utilization},
        }


def make_plan(shape: ModelShape, counts: TokenCounts, *, k: int, features: Iterable[str] = (),
              gpu_memory_gib: float = 80.0, gpus_per_node: int = 8, token_budget: int = 8192,
              dtype: str = "bf16", shard_size: int = 64, gpu_tflops: float = DEFAULT_GPU_TFLOPS,
              utilization: float = DEFAULT_UTILIZATION) -> RunPlan:
    """Size a cache build of `shape` over data with `counts` tokens."""
    if not isinstance(k, int) or not 1 <= k <= shape.vocab_size:
        raise PlanError(f"k must be an integer in 1..{shape.vocab_size} (the vocabulary), got {k!r}")
    features = tuple(features)
    placement = plan_placement(shape, gpu_memory_bytes=int(gpu_memory_gib * GIB), gpus_per_node=gpus_per_node,
                               token_budget=token_budget, dtype=dtype, k=k, features=features)
    flops = forward_flops(shape, counts)
    return RunPlan(target=shape.name, vocab_size=shape.vocab_size, params_total=shape.total_params(), params_active=shape.active_params(),
                   k=k, features=features, counts=counts,
                   size=cache_size(shape, counts, k=k, features=features, shard_size=shard_size),
                   placement=placement, flops=flops,
                   gpu_hours=gpu_hours(flops, gpu_tflops=gpu_tflops, utilization=utilization),
                   gpu_tflops=gpu_tflops, utilization=utilization)
