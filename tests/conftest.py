"""Shared fixtures: a real private Ray cluster (token auth, loopback only) and tiny random-weight models."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `--dtype auto` resolves as on an AVX2-only CPU (fp32): the suite takes CI's path on every machine and
# never times emulated bf16. Ray workers started by the tests inherit it. tests/trainer/test_precision.py
# sets other kinds explicitly.
os.environ.setdefault("LKSPEC_ASSUME_CPU", "avx2")


@pytest.fixture(scope="session")
def ray_address() -> str:
    """A private Ray cluster for the session, as lkspec starts one (pipeline.ray_session); its GCS address.

    While it runs, this process's environment holds its token, so a subprocess given the address joins it.
    """
    from pipeline.ray_session import private_cluster

    with private_cluster(num_cpus=4, object_store_memory=256 * 1024 * 1024) as address:
        yield address


@pytest.fixture(scope="session")
def smollm2_path():
    """Local HF directory of the embedded SmolLM2-135M-Instruct (converted from GGUF once)."""
    from pipeline.resolve.models import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_path):
    """A tiny random-weight Llama sharing SmolLM2's tokenizer, saved as a HF directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
