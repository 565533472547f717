"""The demo profiles: `lkspec demo --profile NAME` presets over DemoConfig's defaults."""
from __future__ import annotations

# `lkspec demo --profile NAME`: DemoConfig fields that differ from its defaults (flags still win).
DEMO_PROFILES: dict[str, dict] = {
    "smollm2": {},  # the embedded SmolLM2-135M target and a MEDUSA head trained over its last hidden state
    "qwen-coder": {
        # Qwen2.5-Coder-1.5B-Instruct target, its 0.5B sibling fine-tuned as the drafter and benched
        # untuned too. Sized for a 2-core CPU with ~15 GiB free: one worker per stage (the 0.5B in
        # fp32 with Adam state is ~10 GiB) and a short fine-tune at a fine-tuning learning rate. Precision
        # is `auto` like every stage's (bf16 only where native: an AVX2 CPU emulates it 36x slower); with
        # fp32 the benchmark's actor (target + three 0.5B drafters) holds ~12 GiB.
        "out": "lkspec-demo-qwen",
        "target": "qwen2.5-coder-1.5b",
        "drafter": "qwen2.5-coder-0.5b",
        "conversations": 32,
        "max_length": 256,
        "k": 32,
        "losses": ("kl", "lk_lambda"),
        "steps": 10,
        "batch_tokens": 512,
        "lr": 5e-5,
        "workers": 1,
        # An independent 0.5B drafter: a 4-token draft per 1.5B target forward, on 2 prompts per domain.
        "bench_limit": 2,
        "draft_k": 4,
        "max_new_tokens": 32,
    },
}
