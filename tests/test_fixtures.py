"""The shared fixtures work: a real Ray cluster on loopback, the embedded model resolves."""
import pytest

from pipeline.resolve.models import ModelNotFoundError, resolve_model


@pytest.mark.slow
def test_ray_cluster_runs_remote_tasks_on_loopback(ray_address):
    import ray

    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 4

    @ray.remote
    def square(x):
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]


def test_unknown_model_alias_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        resolve_model("nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no .safetensors"):
        resolve_model(str(tmp_path))


def test_embedded_model_resolves_to_a_loadable_directory(smollm2_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_path)
    assert config.vocab_size == 49152 and config.num_hidden_layers == 30
    assert resolve_model("smollm2-135m").identity["source"] == "gguf"
