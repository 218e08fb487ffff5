"""Run-to-completion on top of the step API: rounds, and the `run` / `run_batch` / `refine` / `generate` /
`edit` calls (bound as `Engine` methods, so `engine.refine(...)` works).

A round ends with `Engine.finish`; whether another follows is `next_round`: refine with `rounds > 1` feeds
each output back as the next input (continuing the seed's noise stream), and `until_score` stops early once
the judge's p(yes) reaches it. The server's worker applies the same rule to its own batch.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import TYPE_CHECKING

from engine.errors import InvalidRequestError
from engine.types import FinishedRound, GenerationRequest, RoundOutput, SamplingParams

if TYPE_CHECKING:
    from PIL import Image

    from engine.core import Engine, StepCallback


def next_round(finished: FinishedRound, score: float | None) -> GenerationRequest | None:
    """The request of the round after `finished`, or None when the request is done.

    `score` is the judge's p(yes) of the finished image; it is needed (and only then used) when the
    request has `until_score`.
    """
    req = finished.request
    if req.round_index >= req.rounds:
        return None
    if req.until_score is not None:
        if score is None:
            raise ValueError("a request with until_score needs the judge's score of its round")
        if score >= req.until_score:
            return None
    return replace(req, image=finished.image, round_index=req.round_index + 1, generator=finished.generator)


def conclude_round(engine: Engine, finished: FinishedRound) -> RoundOutput:
    """Judge the round when the request asks for `until_score`, and decide on the next one."""
    req = finished.request
    score = engine.judge([(finished.image, req.prompt)])[0] if req.until_score is not None else None
    following = next_round(finished, score)
    return RoundOutput(
        finished.request_id,
        finished.image,
        finished.round_index,
        finished.seed,
        score,
        following is None,
        following,
        finished.timings,
    )


def run(engine: Engine, request: GenerationRequest, on_step: StepCallback | None = None) -> list[RoundOutput]:
    """Run one request through every round with the step API; returns one output per round.

    `on_step(event, preview)` is called after every denoising step; `preview(max_side=256)` decodes the
    current x0 estimate on demand (it costs a VAE decode, so call it only when a preview is wanted).
    """
    outputs: list[RoundOutput] = []
    req: GenerationRequest | None = request
    while req is not None:
        [state] = engine.prepare([req])
        try:
            while not state.done:
                [event] = engine.step([state]).events
                if on_step is not None:
                    on_step(event, functools.partial(engine.preview, state))
        except BaseException:
            engine.release(state)
            raise
        outputs.append(conclude_round(engine, engine.finish(state)))
        req = outputs[-1].next_request
    return outputs


def run_batch(
    engine: Engine, requests: list[GenerationRequest], batch_size: int = 32
) -> list[list[RoundOutput]]:
    """Run many requests in lockstep batches of at most `batch_size`; one list of rounds per request.

    Offline work (dataset construction, evaluation) gets the packed step's throughput; each request's
    images are the ones `run` gives it alone, since noise comes from the request's own generator.
    """
    outputs: list[list[RoundOutput]] = [[] for _ in requests]
    pending = list(enumerate(requests))
    while pending:
        chunk, pending = pending[:batch_size], pending[batch_size:]
        states = engine.prepare([req for _, req in chunk])
        try:
            while not all(s.done for s in states):
                engine.step(states)
        except BaseException:
            for state in states:
                engine.release(state)
            raise
        for (i, _), state in zip(chunk, states, strict=True):
            out = conclude_round(engine, engine.finish(state))
            outputs[i].append(out)
            if out.next_request is not None:
                pending.append((i, out.next_request))
    return outputs


def _params(task: str, overrides: dict) -> SamplingParams:
    try:
        return SamplingParams.for_task(task, **overrides)
    except TypeError as exc:
        raise InvalidRequestError(f"unknown sampling parameter: {exc}") from None


def refine(
    engine: Engine,
    image: Image.Image,
    prompt: str,
    *,
    rounds: int = 1,
    until_score: float | None = None,
    seed: int | None = None,
    height: int | None = None,
    width: int | None = None,
    on_step: StepCallback | None = None,
    **params,
) -> RoundOutput:
    """RvR: regenerate `image` to match `prompt` (released defaults; `params` override SamplingParams).

    With `rounds > 1` each output is fed back as the next input; `until_score` stops early once the
    judge's p(yes) reaches it. Returns the last round's output (`run` returns every round).
    """
    req = GenerationRequest(
        "refine", prompt, image, _params("refine", params), seed, height, width, rounds, until_score
    )
    return run(engine, req, on_step)[-1]


def generate(
    engine: Engine,
    prompt: str,
    height: int | None = None,
    width: int | None = None,
    *,
    seed: int | None = None,
    on_step: StepCallback | None = None,
    **params,
) -> RoundOutput:
    """BAGEL text-to-image with its notebook defaults (cfg_text 4, interval [0.4, 1], global renorm)."""
    req = GenerationRequest("generate", prompt, None, _params("generate", params), seed, height, width)
    return run(engine, req, on_step)[-1]


def edit(
    engine: Engine,
    image: Image.Image,
    instruction: str,
    *,
    seed: int | None = None,
    height: int | None = None,
    width: int | None = None,
    on_step: StepCallback | None = None,
    **params,
) -> RoundOutput:
    """BAGEL editing (VAE + ViT blocks of the input): the refinement-via-editing baseline."""
    req = GenerationRequest("edit", instruction, image, _params("edit", params), seed, height, width)
    return run(engine, req, on_step)[-1]
