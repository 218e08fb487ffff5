"""Backend registry, shape buckets and artifact cache keys (docs/backends.md §2, §3, §4)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from engine.backends import (
    BACKENDS,
    ArtifactKey,
    BackendUnavailable,
    ShapeBucket,
    artifact_key,
    default_buckets,
    get_backend,
    model_hash,
    select_bucket,
)
from engine.backends.base import device_tag, library_versions, precision_tag
from engine.backends.eager import EagerBackend
from engine.backends.inductor import InductorBackend
from engine.denoise import PackedDenoiser
from engine.errors import CheckpointError
from tests.engine.backends.conftest import fresh_engine

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("torch_tensorrt")


def _key(**changes) -> ArtifactKey:
    base = ArtifactKey(
        "tensorrt",
        "sm_90",
        (("tensorrt", "11.1.0.1"), ("torch", "2.13.0+cu130"), ("torch_tensorrt", "2.13.0")),
        "0123456789abcdef0123456789abcdef",
        "bf16",
        ShapeBucket((1, 1024, 1024), (1, 1024, 8192)).label,
    )
    return replace(base, **changes)


def test_bucket_validation_and_membership():
    b = ShapeBucket((1, 16, 64), (8, 32, 256))
    assert b.contains(1, 8) and b.contains(64, 256) and not b.contains(65, 8) and not b.contains(4, 7)
    assert b.label == "n1-16-64_p8-32-256"
    for bad in (
        ((0, 1, 2), (1, 1, 2)),
        ((4, 2, 8), (1, 1, 2)),
        ((1, 1, 2), (1, 9, 8)),
        ((1, 1, 1), (1, 1, 2)),
    ):
        with pytest.raises(ValueError):
            ShapeBucket(*bad)


def test_select_bucket_picks_tightest():
    small = ShapeBucket((1, 256, 1024), (1, 1024, 8192))
    large = ShapeBucket((1, 4096, 4096), (1, 1024, 8192))
    short = ShapeBucket((1, 4096, 4096), (1, 512, 2048))
    assert select_bucket([large, small, short], 1000, 5000) == small
    assert select_bucket([large, small, short], 2000, 1500) == short
    assert select_bucket([large, small, short], 2000, 5000) == large
    with pytest.raises(ValueError, match="no shape bucket"):
        select_bucket([small], 2000, 10)


def test_default_buckets_cover_every_size_once_per_regime():
    buckets = default_buckets(4096, 8192)
    assert [b.n for b in buckets] == [(1, 1024, 1024), (1025, 4096, 4096)]
    assert all(b.p == (1, 1024, 8192) for b in buckets)
    for n in (1, 1024, 1025, 4096):
        assert select_bucket(buckets, n, 8192).contains(n, 8192)
    assert default_buckets(3, 2) == (ShapeBucket((1, 3, 3), (1, 2, 2)),)


@pytest.mark.parametrize(
    "field, value",
    [
        ("backend", "inductor"),
        ("device", "sm_100"),
        ("versions", (("tensorrt", "11.1.0.2"), ("torch", "2.13.0+cu130"), ("torch_tensorrt", "2.13.0"))),
        ("model_hash", "f" * 32),
        ("precision", "fp8"),
        ("bucket", ShapeBucket((1025, 4096, 4096), (1, 1024, 8192)).label),
        ("graph", "prefill_chunk"),
    ],
)
def test_every_key_field_changes_digest_and_directory(field, value, tmp_path):
    a, b = _key(), _key(**{field: value})
    assert a != b and a.digest != b.digest
    assert a.directory(tmp_path) != b.directory(tmp_path)
    assert _key().digest == a.digest and _key().directory(tmp_path) == a.directory(tmp_path)


def test_key_directory_is_namespaced_and_path_safe(tmp_path):
    d = _key(model_hash="ab/cd" + "0" * 30).directory(tmp_path)
    assert d.relative_to(tmp_path).parts == (
        "tensorrt",
        "sm_90",
        "tensorrt-11.1.0.1_torch-2.13.0+cu130_torch_tensorrt-2.13.0",
        "ab_cd00000000000",
        "bf16",
        "denoise_step",
        "n1-1024-1024_p1-1024-8192",
    )
    long = _key(versions=tuple((f"lib{i}", "1.2.3.4.5.6") for i in range(12))).directory(tmp_path)
    assert len(long.relative_to(tmp_path).parts[2]) == 16  # hashed when too long for a path component


def test_artifact_key_fills_device_and_versions():
    bucket = ShapeBucket((1, 16, 64), (1, 32, 256))
    key = artifact_key("inductor", "cpu", ["numpy", "no-such-dist-rvr"], "h", torch.bfloat16, bucket)
    versions = dict(key.versions)
    assert key.device == "cpu" == device_tag(torch.device("cpu"))
    assert versions["torch"] == torch.__version__ and versions["no-such-dist-rvr"] == "none"
    assert versions["numpy"] != "none"
    assert (key.precision, key.bucket, key.graph) == ("bf16", bucket.label, "denoise_step")
    assert dict(library_versions([]))["torch"] == torch.__version__
    assert [precision_tag(d) for d in (torch.float32, torch.float16, torch.float8_e4m3fn)] == [
        "fp32",
        "fp16",
        "float8_e4m3fn",
    ]


def test_model_hash_tracks_content_dtype_and_names():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert model_hash(a) == model_hash(b) == model_hash(a)
    with torch.no_grad():
        b.weight[1, 2] += 1e-6
    assert model_hash(a) != model_hash(b)
    assert model_hash(a) != model_hash(torch.nn.Linear(4, 3).to(torch.bfloat16))
    assert model_hash(a) != model_hash(torch.nn.Sequential(a))  # names are part of the identity


def test_registry():
    assert BACKENDS == ("exact", "eager", "inductor", "tensorrt")
    assert isinstance(get_backend("eager"), EagerBackend)
    exact = get_backend("exact", graph_buckets=("3x4096", "6x1024"), max_padding=0.1)
    assert [b.label for b in exact.buckets] == ["3x4096", "6x1024"] and exact.max_padding == 0.1
    with pytest.raises(ValueError, match="BRANCHESxLATENT_ROWS"):
        get_backend("exact", graph_buckets=("3by4096",))
    with pytest.raises(ValueError, match="max_padding"):
        get_backend("exact", max_padding=-1.0)
    ind = get_backend("inductor", mode="max-autotune-no-cudagraphs")
    assert isinstance(ind, InductorBackend)
    assert ind.compile_options() == {
        "backend": "inductor",
        "fullgraph": True,
        "dynamic": True,
        "mode": "max-autotune-no-cudagraphs",
    }
    caps = ind.capabilities()
    assert caps.cfg_batching and caps.varlen and not caps.artifacts
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("onnxruntime")
    with pytest.raises(ValueError, match="backend 'eager'"):
        get_backend("eager", mode="default")


def test_cuda_graphs_are_off_unless_asked():
    assert "options" not in get_backend("inductor").compile_options()
    assert get_backend("inductor").compile_options()["mode"] == "default"
    with pytest.raises(ValueError, match="cudagraphs=True"):
        get_backend("inductor", mode="reduce-overhead")
    assert get_backend("inductor", cudagraphs=True).compile_options()["options"] == {
        "triton.cudagraphs": True
    }
    assert get_backend("inductor", mode="reduce-overhead", cudagraphs=True).compile_options()["mode"] == (
        "reduce-overhead"
    )


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_tensorrt_unavailable_is_explicit(tiny_ckpt):
    with pytest.raises(BackendUnavailable, match="cannot be installed from PyPI alone") as info:
        get_backend("tensorrt")
    assert "inductor" in str(info.value)  # says what to use instead
    with pytest.raises(CheckpointError, match=r"backend 'tensorrt'.*cannot be installed from PyPI alone"):
        fresh_engine(tiny_ckpt, "tensorrt")  # the loader names the backend, and builds no engine


def test_eager_engine_runs_the_packed_forward(tiny_ckpt):
    engine = fresh_engine(tiny_ckpt)
    assert isinstance(engine.backend, EagerBackend) and engine.backend.capabilities().varlen
    assert isinstance(engine._denoiser, PackedDenoiser)
    assert engine.info()["backend"] == "eager"
    assert all("pre_attention" not in vars(layer) for layer in engine.weight_sets["rvr"].model.llm.layers)


def test_tensorrt_refuses_cpu_engine(tiny_ckpt):
    pytest.importorskip("tensorrt")
    pytest.importorskip("torch_tensorrt")
    with pytest.raises(CheckpointError, match="CUDA"):
        fresh_engine(tiny_ckpt, "tensorrt")
