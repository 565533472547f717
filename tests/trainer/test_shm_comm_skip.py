"""Training never compiles DeepSpeed's shared-memory C++ op (minutes of g++ on a 2-core CPU)."""
from __future__ import annotations

import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.comm.torch import build_shm_op

from trainer.loop import skip_shm_comm_build


def test_the_skipped_op_is_the_one_deepspeeds_torch_backend_builds():
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    assert builder is not None and builder.NAME in deepspeed.ops.__compatible_ops__
    saved = dict(deepspeed.ops.__compatible_ops__)
    try:
        skip_shm_comm_build(deepspeed)
        assert deepspeed.ops.__compatible_ops__[builder.NAME] is False
        assert build_shm_op() is None  # what TorchBackend.__init__ calls: nothing is built
    finally:
        deepspeed.ops.__compatible_ops__.clear()
        deepspeed.ops.__compatible_ops__.update(saved)
