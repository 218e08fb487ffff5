"""ONNX opset-23 export of the DenoiseStep: validity, static routing, ORT parity (docs/backends.md §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.backends import ShapeBucket
from engine.backends.export import INPUT_NAMES, export_onnx, forbidden_onnx_ops, onnx_op_counts
from tests.engine.backends.conftest import BUCKET_ARGS, IndexRouted

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def fp32_model(step_module, tmp_path_factory):
    path = export_onnx(step_module, tmp_path_factory.mktemp("onnx") / "step.onnx", ShapeBucket(*BUCKET_ARGS))
    return path, onnx.load(str(path))


def _check(model) -> dict[str, int]:
    onnx.checker.check_model(model, full_check=True)
    assert forbidden_onnx_ops(model) == {}
    counts = onnx_op_counts(model)
    # Opset 23 fuses SDPA into Attention (one per layer) and the hand-written RMSNorms into RMSNormalization.
    assert counts["Attention"] == 2 and counts["RMSNormalization"] > 0
    return counts


def test_fp32_export_is_valid_and_statically_routed(fp32_model):
    _, model = fp32_model
    _check(model)
    assert model.opset_import[0].version == 23
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    assert dims["x"][0] == dims["latent_ids"][0] and isinstance(dims["x"][0], str)  # dynamic N
    assert isinstance(dims["past_k"][1], str) and dims["past_k"][1] == dims["past_v"][1]  # dynamic P
    assert dims["t"] == dims["rope"] == []


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # exporter-internal deprecation
def test_forbidden_op_guard_sees_scatter_routing():
    """The guard is not vacuous: index-based MoT routing (the reference's form) exports to ScatterND."""
    program = torch.onnx.export(
        IndexRouted().eval(), (torch.randn(6, 3), torch.tensor([1, 2, 3])), dynamo=True, opset_version=23
    )
    assert "ScatterND" in forbidden_onnx_ops(program.model_proto)


@pytest.mark.parametrize("n, p", [(24, 68), (1, 1), (7, 250), (64, 3)])
def test_ort_parity_fp32(step_module, fp32_model, n, p):
    ort = pytest.importorskip("onnxruntime")
    path, _ = fp32_model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = step_module.example_inputs(n, p, seed=7 * n + p)
    with torch.no_grad():
        expected = step_module(*inputs).numpy()
    [got] = session.run(None, {k: v.numpy() for k, v in zip(INPUT_NAMES, inputs, strict=True)})
    assert got.shape == expected.shape == (n, step_module.latent_channels)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5


@pytest.mark.slow
def test_bf16_export_is_valid_and_matches_reference_evaluator(step_module, tmp_path):
    """bf16 passes full_check (after the exporter's RMSNormalization typing fix in export_onnx).

    ORT's CPU provider has no bf16 Gemm, so numerics are checked with ONNX's reference evaluator.
    """
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from onnx.reference import ReferenceEvaluator

    path = export_onnx(step_module, tmp_path / "bf16.onnx", ShapeBucket(*BUCKET_ARGS), dtype=torch.bfloat16)
    model = onnx.load(str(path))
    _check(model)
    assert any(t.data_type == onnx.TensorProto.BFLOAT16 for t in model.graph.initializer)
    assert step_module.dtype == torch.float32  # the export cast a copy, not the engine's weights

    bf16 = step_module.cast(torch.bfloat16)
    assert bf16.rotary_emb.inv_freq.dtype == torch.float32
    inputs = bf16.example_inputs(9, 40, seed=3)
    feeds = {
        k: v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy()
        for k, v in zip(INPUT_NAMES, inputs, strict=True)
    }
    [got] = ReferenceEvaluator(str(path)).run(None, feeds)
    with torch.no_grad():
        expected = bf16(*inputs).numpy()
    # bf16 keeps 8 mantissa bits: allow a few ulps at the output's scale.
    assert np.abs(got.astype(np.float32) - expected).max() / np.abs(expected).max() < 3e-2
