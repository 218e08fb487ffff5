"""Does the refiner read its input image? Mini-GenEval scores cannot tell refinement from regeneration.

A refiner that uses the misaligned image's ViT tokens should keep an image that already satisfies the prompt,
keep its layout, and change what is wrong. One that ignores them behaves like a fresh text-to-image sample
whatever it is given. Per (prompt, seed), one RvR round (the refine weights, the same seed for every input)
runs from three inputs with known answers, rendered by the world (never by the model):

- `aligned`     a render that satisfies the prompt;
- `misaligned`  a render that breaks one of its dimensions;
- `blank`       the empty background: nothing to keep;
- `cast`        the aligned render under a random tint (world.casts, world.color_cast): its tinted background is
                something the prompt never states, so only a refiner that reads the image can keep it.

and is compared with a fresh text-to-image sample of the refine weights (`fresh`). Reported: the checker's
acceptance of each output; for the misaligned input, how often the output still breaks the dimension the
input broke (`kept_error`, against the same dimension failing in the fresh sample); and the thumbnail
distance from the aligned input to its output and to the fresh sample (`layout`, pairing.py's distance);
and the RGB distance between the cast input's background and the background of its output and of the fresh
sample (`cast`, border medians as the checker estimates them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from engine.types import GenerationRequest, SamplingParams
from training.checker import background, check
from training.pairing import thumbnail_distance
from training.prompts import PromptSpec, sample_scene, sample_violation
from training.world import BACKGROUND, DEFAULT_SIZE, casts, color_cast, render

INPUTS = ("aligned", "misaligned", "blank", "cast")
PROBE_CAST = 0.25  # strength of the `cast` input's tint (one of the six non-neutral world.casts)


def probe_inputs(spec: PromptSpec, seed: int, size: int) -> tuple[dict[str, Image.Image], str]:
    """The three inputs of one (prompt, seed) and the dimension the misaligned one breaks."""
    rng = np.random.default_rng([seed, 7])
    aligned = render(sample_scene(spec, rng), size, rng, 1.0)
    broken = sample_violation(spec, rng, max_dims=1)
    misaligned = render(sample_scene(spec, rng, broken), size, rng, 1.0)
    return {
        "aligned": aligned,
        "misaligned": misaligned,
        "blank": Image.new("RGB", (size, size), BACKGROUND),
        "cast": color_cast(aligned, casts(PROBE_CAST)[1 + int(rng.integers(6))]),
    }, broken[0]


def image_use(
    engine,
    specs: Sequence[PromptSpec],
    seeds: Sequence[int] = (0,),
    size: int = DEFAULT_SIZE,
    refine_params: dict | None = None,
    generate_params: dict | None = None,
    rvr_weights_engine=None,
    batch_size: int = 64,
) -> dict:
    """Acceptance per input and of the fresh sample, kept errors and layout distances (module docstring).

    `rvr_weights_engine` draws the fresh sample from the refine weights (RvR checkpoints carry two weight
    sets); without it the fresh sample comes from `engine`."""
    fresh_engine = rvr_weights_engine or engine
    cases = [(spec, seed, *probe_inputs(spec, seed, size)) for spec in specs for seed in seeds]
    refine = SamplingParams.for_task("refine", **(refine_params or {}))
    generate = SamplingParams.for_task("generate", **(generate_params or {}))
    outputs = {
        name: [
            rounds[-1].image
            for rounds in engine.run_batch(
                [
                    GenerationRequest("refine", spec.text, inputs[name], refine, seed, size, size)
                    for spec, seed, inputs, _ in cases
                ],
                batch_size,
            )
        ]
        for name in INPUTS
    }
    fresh = [
        rounds[-1].image
        for rounds in fresh_engine.run_batch(
            [
                GenerationRequest("generate", spec.text, None, generate, seed, size, size)
                for spec, seed, _, _ in cases
            ],
            batch_size,
        )
    ]
    outputs["fresh"] = fresh
    labels = {
        name: [check(img, c[0]) for img, c in zip(outs, cases, strict=True)] for name, outs in outputs.items()
    }
    aligned_inputs = [inputs["aligned"] for _, _, inputs, _ in cases]
    broken = [dim for *_, dim in cases]
    n = len(cases)

    def still_broken(name: str) -> float:
        return sum(not lab[dim] for lab, dim in zip(labels[name], broken, strict=True)) / n

    def layout(name: str) -> float:
        return float(
            np.mean([thumbnail_distance(a, o) for a, o in zip(aligned_inputs, outputs[name], strict=True)])
        )

    def cast(name: str) -> float:
        pairs = zip(cases, outputs[name], strict=True)
        return float(np.mean([_bg_distance(c[2]["cast"], out) for c, out in pairs]))

    return {
        "n": n,
        "accepted": {name: sum(lab["overall"] for lab in labs) / n for name, labs in labels.items()},
        "kept_error": {"rvr_from_misaligned": still_broken("misaligned"), "fresh": still_broken("fresh")},
        "layout": {"rvr_from_aligned": layout("aligned"), "fresh": layout("fresh")},
        "cast": {"rvr_from_cast": cast("cast"), "fresh": cast("fresh")},
    }


def _bg_distance(a: Image.Image, b: Image.Image) -> float:
    """RGB distance between the border-median backgrounds of two images."""
    bg = [background(np.asarray(x.convert("RGB"), dtype=np.float64)) for x in (a, b)]
    return float(np.linalg.norm(bg[0] - bg[1]))


def format_image_use(r: dict) -> str:
    a, k, lay, cast = r["accepted"], r["kept_error"], r["layout"], r["cast"]
    return "\n".join(
        [
            f"image use: one RvR round from world renders, {r['n']} (prompt, seed) pairs",
            "  accepted after RvR from: "
            + ", ".join(f"{name} input {a[name]:.3f}" for name in INPUTS)
            + f"; fresh T2I sample {a['fresh']:.3f}",
            f"  input's broken dimension still broken: RvR {k['rvr_from_misaligned']:.3f}, fresh {k['fresh']:.3f}",
            f"  layout distance from the aligned input: RvR {lay['rvr_from_aligned']:.2f}, fresh {lay['fresh']:.2f}",
            f"  background distance from the cast input: RvR {cast['rvr_from_cast']:.1f}, fresh {cast['fresh']:.1f}",
        ]
    )
