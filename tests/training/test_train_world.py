"""Renderer and prompt sampling of the synthetic world."""

import numpy as np
import pytest

from training.prompts import (
    CATEGORIES,
    Group,
    PromptSpec,
    is_heldout,
    sample_scene,
    sample_spec,
    scene_truth,
    split_specs,
)
from training.world import BACKGROUND, PALETTE, Obj, Scene, render


def test_render_draws_pure_colours_at_requested_size():
    scene = Scene((Obj("square", "red", "large", 0.5, 0.5),))
    for size in (64, 96, 128):
        img = np.asarray(render(scene, size))
        assert img.shape == (size, size, 3)
        assert tuple(img[size // 2, size // 2]) == PALETTE["red"]
        assert tuple(img[1, 1]) == BACKGROUND


def test_render_is_deterministic_given_rng():
    scene = Scene((Obj("circle", "blue", "small", 0.3, 0.3), Obj("cross", "green", "large", 0.7, 0.7)))
    a = np.asarray(render(scene, 64, np.random.default_rng(3), jitter=1.0))
    b = np.asarray(render(scene, 64, np.random.default_rng(3), jitter=1.0))
    assert (a == b).all()


def test_prompt_text():
    two = PromptSpec((Group("circle", color="red", count=2),))
    assert two.text == "two red circles"
    rel = PromptSpec((Group("square", color="blue"), Group("triangle", color="yellow")), relation="left_of")
    assert rel.text == "a blue square to the left of a yellow triangle"
    assert PromptSpec((Group("cross", color="orange", region="top"),)).text == "an orange cross at the top"
    assert rel.dims == ("object", "color", "position")
    assert PromptSpec.from_json(rel.to_json()) == rel


@pytest.mark.parametrize("n_dims", [1, 2, 3, 4, 5])
def test_mixed_specs_cover_one_to_five_dimensions(n_dims):
    rng = np.random.default_rng(n_dims)
    for _ in range(5):
        assert len(sample_spec(rng, n_dims=n_dims).dims) == n_dims


@pytest.mark.parametrize("category", CATEGORIES)
def test_sampled_scenes_satisfy_or_violate_their_spec(category):
    rng = np.random.default_rng(0)
    for _ in range(10):
        spec = sample_spec(rng, category=category)
        assert scene_truth(sample_scene(spec, rng), spec)["overall"]
        for dim in spec.dims:
            truth = scene_truth(sample_scene(spec, rng, (dim,)), spec)
            assert not truth[dim] and not truth["overall"]


def test_heldout_split_is_deterministic_and_disjoint():
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng) for _ in range(150)]
    train, held = split_specs(specs, fraction=0.2)
    train_text, held_text = {s.text for s in train}, {s.text for s in held}
    assert train_text.isdisjoint(held_text)
    assert held_text and train_text
    assert all(is_heldout(t, 0.2) for t in held_text) and not any(is_heldout(t, 0.2) for t in train_text)
    # the split depends on the text only, not on order or neighbours
    _, held2 = split_specs(list(reversed(specs)), fraction=0.2)
    assert {s.text for s in held2} == held_text
    assert is_heldout("Two  red circles", 0.2) == is_heldout("two red circles", 0.2)
