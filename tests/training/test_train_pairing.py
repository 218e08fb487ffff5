"""Nearest aligned image per refine pair: the closest checker-verified render of the same prompt."""

import json

import pytest

from training.checker import check
from training.dataset import open_rgb, save_image
from training.pairing import aligned_pools, keep_pairs, pair_nearest
from training.prompts import PromptSpec
from training.runs import PROFILES, _records, parse_args
from training.world import Obj, Scene, render

SPEC = PromptSpec.from_json(
    json.dumps(
        {
            "groups": [{"shape": "square", "color": "red", "size": None, "count": None, "region": None}],
            "relation": None,
            "category": "colors",
        }
    )
)


def _square(root, rel, color, cx, cy):
    return save_image(render(Scene((Obj("square", color, "large", cx, cy),))), root, rel)


def test_keeps_the_aligned_render_at_the_misaligned_layout(tmp_path):
    corners = {"tl": (0.25, 0.25), "tr": (0.75, 0.25), "bl": (0.25, 0.75), "br": (0.75, 0.75)}
    t2i = [
        {
            "image_list": [_square(tmp_path, f"t2i/{k}.png", "red", *xy)],
            "user_prompt": [SPEC.text],
            "noisy": False,
        }
        for k, xy in corners.items()
    ]
    # a mis-captioned image at the very layout must not be chosen: it is not an aligned image
    t2i.append(
        {
            "image_list": [_square(tmp_path, "t2i/noisy.png", "blue", *corners["br"])],
            "user_prompt": [SPEC.text],
            "noisy": True,
        }
    )
    assert all(check(open_rgb(tmp_path / f"t2i/{k}.png"), SPEC)["overall"] for k in corners)
    records = [
        {
            "image_list": [_square(tmp_path, f"mis/{k}.png", "blue", *xy), "t2i/tl.png"],
            "user_prompt": [SPEC.text],
            "labels": json.dumps([{"overall": False}, {"overall": True}]),
            "sources": ["own_t2i", "render"],
        }
        for k, xy in corners.items()
    ]
    paired = pair_nearest(records, aligned_pools(t2i), tmp_path)
    assert [r["image_list"] for r in paired] == [[f"mis/{k}.png", f"t2i/{k}.png"] for k in corners]
    assert paired[0] is records[0]  # already nearest: the record is kept as is
    assert json.loads(paired[3]["labels"])[1] == {"overall": True}
    assert paired[3]["sources"] == ["own_t2i", "render"]
    assert [r["image_list"][0] for r in records] == [r["image_list"][0] for r in paired]


def test_a_prompt_without_pool_keeps_its_pair(tmp_path):
    rec = {
        "image_list": [
            _square(tmp_path, "m.png", "blue", 0.3, 0.3),
            _square(tmp_path, "a.png", "red", 0.7, 0.7),
        ],
        "user_prompt": [SPEC.text],
    }
    assert pair_nearest([rec], {}, tmp_path) == [rec]


def test_runs_rejects_an_unknown_pairing(tmp_path):
    with pytest.raises(ValueError, match="rvr_pairing"):
        _records(tmp_path, "closest")


def test_keep_pairs_pair_an_aligned_image_with_its_nearest_other_render(tmp_path):
    t2i = [
        {"image_list": [_square(tmp_path, f"t2i/{i}.png", "red", x, 0.5)], "user_prompt": [SPEC.text]}
        for i, x in enumerate((0.2, 0.5, 0.65))
    ]
    own = _square(tmp_path, "own/a.png", "red", 0.75, 0.5)
    pools = aligned_pools(t2i)
    kept = keep_pairs([(own, SPEC.text), ("t2i/1.png", SPEC.text), (own, "a blue circle")], pools, tmp_path)
    # the pool image itself is never its own target; a prompt without renders gives no pair
    assert [r["image_list"] for r in kept] == [[own, "t2i/2.png"], ["t2i/1.png", "t2i/2.png"]]
    assert all(json.loads(r["labels"]) == [{"overall": True}] * 2 for r in kept)


def test_runs_rejects_keep_pairs_without_nearest_pairing(tmp_path):
    with pytest.raises(ValueError, match="rvr_keep"):
        _records(tmp_path, "random", ("own",))


def test_run_command_line_overrides_the_rvr_stage():
    out, run, _ = parse_args(
        [
            "--out",
            "x",
            "--profile",
            "bundled",
            "--rvr-pairing",
            "nearest",
            "--rvr-keep",
            "own,world",
            "--rvr-lr",
            "1e-3",
            "--rvr-pair-cast",
            "0.25",
        ]
    )
    base = PROFILES["bundled"]()
    assert (out, run.rvr_pairing, run.rvr_keep) == ("x", "nearest", ("own", "world"))
    assert run.stages["rvr"].lr == 1e-3 and run.stages["rvr"].steps == base.stages["rvr"].steps
    assert run.stages["rvr"].refine_pair_cast == 0.25 and base.stages["rvr"].refine_pair_cast == 0.0
    assert run.stages["t2i"] == base.stages["t2i"] and run.stages["judge"] == base.stages["judge"]
    _, plain, _ = parse_args(["--out", "x", "--profile", "bundled"])
    assert plain == base
