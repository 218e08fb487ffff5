"""The pixel-only checker agrees with known scenes and rejects wrong colours, counts and positions."""

import numpy as np

from training.checker import check, detect, validate_checker
from training.prompts import Group, PromptSpec, sample_scene, sample_spec, sample_violation
from training.world import Obj, Scene, color_cast, random_cast, render


def _objs(scene):
    return sorted((o.shape, o.color, o.size) for o in scene.objects)


def test_detects_every_shape_colour_and_size():
    scene = Scene(
        (
            Obj("circle", "red", "small", 0.2, 0.2),
            Obj("square", "orange", "large", 0.75, 0.25),
            Obj("triangle", "yellow", "large", 0.25, 0.75),
            Obj("cross", "purple", "small", 0.75, 0.75),
            Obj("circle", "green", "large", 0.5, 0.5),
        )
    )
    for size in (64, 128):
        found = detect(render(scene, size, np.random.default_rng(0), jitter=1.0))
        assert sorted((o.shape, o.color, o.size) for o in found) == _objs(scene)
        for o in scene.objects:
            m = min(found, key=lambda f: abs(f.cx - o.cx) + abs(f.cy - o.cy))
            assert abs(m.cx - o.cx) < 1 / size and abs(m.cy - o.cy) < 1 / size


def test_rejects_wrong_colour_count_and_position():
    spec = PromptSpec((Group("circle", color="red"), Group("square", color="blue")), relation="left_of")
    good = Scene((Obj("circle", "red", "small", 0.25, 0.5), Obj("square", "blue", "small", 0.75, 0.5)))
    assert check(render(good), spec) == {"object": True, "color": True, "position": True, "overall": True}
    wrong_colour = Scene(
        (Obj("circle", "green", "small", 0.25, 0.5), Obj("square", "blue", "small", 0.75, 0.5))
    )
    res = check(render(wrong_colour), spec)
    assert not res["color"] and res["position"] and not res["overall"]
    swapped = Scene((Obj("circle", "red", "small", 0.75, 0.5), Obj("square", "blue", "small", 0.25, 0.5)))
    res = check(render(swapped), spec)
    assert res["color"] and not res["position"] and not res["overall"]

    three = PromptSpec((Group("triangle", color="yellow", count=3),))
    tris = [Obj("triangle", "yellow", "small", x, 0.5) for x in (0.2, 0.5, 0.8)]
    assert check(render(Scene(tuple(tris))), three)["overall"]
    assert not check(render(Scene(tuple(tris[:2]))), three)["count"]
    assert not check(render(Scene((*tris, Obj("triangle", "yellow", "small", 0.5, 0.2)))), three)["count"]

    region = PromptSpec((Group("cross", region="top"),))
    assert check(render(Scene((Obj("cross", "green", "large", 0.5, 0.18),))), region)["overall"]
    assert not check(render(Scene((Obj("cross", "green", "large", 0.5, 0.8),))), region)["position"]


def test_validation_accuracy_on_clean_renders():
    r = validate_checker(n=40, seed=123)
    assert r["aligned_accept"] >= 0.95 and r["misaligned_reject"] >= 0.95
    for d, v in r["dims"].items():
        assert v["accuracy"] >= 0.95, (d, v)


def test_a_colour_cast_does_not_change_the_verdict():
    """A generator's white balance (world.color_cast) tints the background and every object alike; the
    checker neutralises it on the background, so its verdicts on cast renders match the plain ones."""
    rng = np.random.default_rng(11)
    cats = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    tints = []
    for i in range(120):
        spec = sample_spec(rng, category=cats[i % len(cats)])
        img = render(sample_scene(spec, rng, sample_violation(spec, rng) if i % 2 else ()), 64, rng, 1.0)
        cast = color_cast(img, random_cast(rng, 0.25))
        tints.append(np.abs(np.asarray(cast, float)[0, 0] - np.asarray(img, float)[0, 0]).max())
        assert check(cast, spec) == check(img, spec), spec.text
    assert np.median(tints) > 20  # the casts are visible, not a rounding error
