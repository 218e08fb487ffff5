"""TensorRT backend on a GPU with TensorRT installed (skipped elsewhere: not installable from PyPI alone)."""

from __future__ import annotations

import pytest
import torch

from engine.backends import ShapeBucket
from tests.engine.backends.conftest import BUCKET_ARGS, run_refine

pytest.importorskip("tensorrt")
pytest.importorskip("torch_tensorrt")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _engine(ckpt, backend: str = "eager", **backend_options):
    from engine.loading import load_engine

    return load_engine(
        ckpt, "cuda", "bfloat16", attention="reference", backend=backend, backend_options=backend_options
    )


def test_tensorrt_refine_matches_eager_and_reuses_cached_engines(tiny_ckpt, tmp_path):
    expected = run_refine(_engine(tiny_ckpt))
    buckets = [ShapeBucket(*BUCKET_ARGS)]
    engine = _engine(tiny_ckpt, "tensorrt", cache_dir=tmp_path, buckets=buckets)
    built = sorted(tmp_path.rglob("denoise_step.ep"))
    assert len(built) == len(engine.weight_sets)  # one bf16 engine per weight set and bucket
    assert all("sm_" in str(p.relative_to(tmp_path)) and "/bf16/" in str(p) for p in built)
    got = run_refine(engine)
    # bf16 end to end (3 denoise steps): a loose bound; drift over 50 steps is a GPU benchmark's job.
    assert ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item() < 5e-2

    again = _engine(tiny_ckpt, "tensorrt", cache_dir=tmp_path, buckets=buckets)  # loads, builds nothing new
    assert sorted(tmp_path.rglob("denoise_step.ep")) == built
    torch.testing.assert_close(run_refine(again), got, rtol=1e-3, atol=1e-3)
