"""bench/engine_refine.py (the GPU sizing benchmark) runs on CPU at tiny shapes: N jobs pack into one step."""

import pytest

from bench.engine_refine import main


def test_batch_of_jobs_with_both_weight_sets(tmp_path):
    out = tmp_path / "r.json"
    args = ["--preset", "tiny", "--device", "cpu", "--size", "64", "--steps", "3", "--jobs", "2"]
    r = main([*args, "--weight-sets", "2", "--out", str(out)])
    assert out.is_file()
    assert (r["jobs"], r["weight_sets"], r["steps"]) == (2, 2, 2)
    latents = (64 // 16) ** 2
    assert r["packed_rows_per_step"] == 2 * 3 * (latents + 2)  # every branch of both jobs in one forward
    assert r["jobs_per_min"] == pytest.approx(2 * 60 / r["total_s"], rel=0.01)
    assert r["output_size"] == [64, 64]
