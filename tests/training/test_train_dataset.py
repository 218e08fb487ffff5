"""Dataset construction: one misaligned and one aligned image per prompt, in the release's format."""

import json

import numpy as np
from PIL import Image

from training.checker import check
from training.dataset import (
    build_refine_records,
    build_t2i_records,
    build_understanding_records,
    build_world_dataset,
    hook_source,
    load_refine_sample,
    open_rgb,
    read_records,
    sample_prompt_pool,
    write_parquet_info,
    write_records,
)
from training.prompts import PromptSpec, is_heldout, sample_scene, sample_spec
from training.world import render


def test_refine_pairs_are_one_misaligned_one_aligned(tmp_path):
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng) for _ in range(12)]
    records, stats = build_refine_records(specs, tmp_path, seed=1)
    assert stats["kept"] + stats["skipped"] == 12 and stats["kept"] >= 10
    for rec in records:
        assert len(rec["image_list"]) == 2 and not rec["image_list"][0].startswith("/")
        mis, ali, prompt = load_refine_sample(rec, tmp_path)
        spec = PromptSpec.from_json(rec["spec"])
        assert prompt == spec.text == rec["user_prompt"][0]
        assert not check(mis, spec)["overall"] and check(ali, spec)["overall"]
        assert np.asarray(mis).shape != np.asarray(ali).shape or (np.asarray(mis) != np.asarray(ali)).any()


def test_records_roundtrip_parquet_jsonl_and_index(tmp_path):
    rng = np.random.default_rng(2)
    records, _ = build_refine_records([sample_spec(rng) for _ in range(4)], tmp_path)
    pq_file = write_records(records, tmp_path / "rvr/data/part0.parquet")
    jl_file = write_records(records, tmp_path / "rvr.jsonl")
    info = write_parquet_info([pq_file], tmp_path / "rvr/json/parquet_info.json")
    assert json.loads(info.read_text())[str(pq_file)]["num_row_groups"] == 1
    for src in (pq_file, jl_file, info, tmp_path / "rvr/data"):
        assert read_records(src) == records
    # the official reader also accepts the string repr of the list
    rec = dict(records[0], image_list=str(records[0]["image_list"]))
    assert load_refine_sample(rec, tmp_path)[2] == records[0]["user_prompt"][0]


def test_understanding_answers_follow_checker(tmp_path):
    rng = np.random.default_rng(3)
    records, _ = build_refine_records([sample_spec(rng) for _ in range(3)], tmp_path)
    und = build_understanding_records(records)
    assert [u["answer"] for u in und] == ["No", "Yes"] * len(records)
    assert und[0]["question"] == f"Does this image show: {records[0]['user_prompt'][0]}? Answer yes or no."


def test_model_hook_is_a_candidate_source(tmp_path):
    spec = sample_spec(np.random.default_rng(4), category="colors")
    calls = []

    def t2i(prompt, seed):
        calls.append(seed)
        r = np.random.default_rng(seed)
        return render(sample_scene(spec, r, ("color",) if len(calls) == 1 else ()), 64, r, 1.0)

    records, _ = build_refine_records([spec], tmp_path, sources={"model": hook_source(t2i)})
    assert len(records) == 1 and records[0]["sources"] == ["model", "model"] and len(set(calls)) == len(calls)


def test_world_dataset_keeps_heldout_prompts_out_of_training(tmp_path):
    stats = build_world_dataset(tmp_path, n_prompts=40, seed=0, heldout_fraction=0.3)
    held = {r["user_prompt"][0] for r in read_records(tmp_path / "eval/heldout.jsonl")}
    train = {r["user_prompt"][0] for r in read_records(tmp_path / "rvr/json/parquet_info.json")}
    train |= {r["user_prompt"][0] for r in read_records(tmp_path / "t2i/data/t2i.parquet")}
    assert held and train and held.isdisjoint(train)
    assert all(is_heldout(t, 0.3) for t in held)
    assert stats["heldout_prompts"] == len(held)
    with Image.open(tmp_path / read_records(tmp_path / "und/und.jsonl")[0]["image"]) as im:
        assert im.size == (64, 64)


def test_simple_world_pool_and_several_pairs_per_prompt(tmp_path):
    pool = sample_prompt_pool(20, 0, ("single_object", "colors"), 2, ("position",), max_groups=1)
    assert len({s.text for s in pool}) == len(pool) >= 10
    assert all(len(s.groups) == 1 and len(s.dims) <= 2 and "position" not in s.dims for s in pool)
    records, stats = build_refine_records(pool[:2], tmp_path, seed=0, pairs_per_prompt=3)
    assert stats["prompts"] == 2 and stats["kept"] + stats["skipped"] == 6 and stats["kept"] >= 5
    paths = [p for r in records for p in r["image_list"]]
    assert len(set(paths)) == len(paths)  # every pair has its own images
    assert len({r["user_prompt"][0] for r in records}) == 2


def test_caption_noise_breaks_one_dimension_of_that_fraction_of_t2i_images(tmp_path):
    specs = sample_prompt_pool(12, 0, ("colors",), 3, ("count", "position"), max_groups=1)
    clean = build_t2i_records(specs, tmp_path / "clean", seed=0, per_prompt=8)
    assert clean and not any(r["noisy"] for r in clean)
    noisy = build_t2i_records(specs, tmp_path / "noisy", seed=0, per_prompt=8, caption_noise=0.3)
    by_text = {s.text: s for s in specs}
    flags = [r["noisy"] for r in noisy]
    assert 0.15 < sum(flags) / len(flags) < 0.45
    for r in noisy:
        labels = check(open_rgb(tmp_path / "noisy" / r["image_list"][0]), by_text[r["user_prompt"][0]])
        # a clean image satisfies its caption; a noisy one breaks at least one of the caption's dimensions
        broken = [d for d in by_text[r["user_prompt"][0]].dims if not labels[d]]
        assert labels["overall"] if not r["noisy"] else len(broken) >= 1
