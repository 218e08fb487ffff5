"""Shape buckets of a replayable denoising step: which captured graph a step runs in, and its padding.

A bucket holds up to `branches` CFG-branch sequences with up to `latent_rows` latents each. A step fits a
bucket when it has at most that many branches and at most `branches * latent_rows` latent rows in total;
it runs padded to the bucket's shape (extra two-row marker sequences and one sequence of spare latent
rows that attend only to themselves). Padding costs what it computes, so a step whose padded latent rows
would exceed its own by more than `max_padding` runs eagerly instead. Nothing here touches a device.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_SPEC = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class GraphBucket:
    branches: int  # CFG-branch sequences of the step
    latent_rows: int  # latent rows per branch

    def __post_init__(self) -> None:
        if self.branches < 1 or self.latent_rows < 1:
            raise ValueError(f"a graph bucket needs branches >= 1 and latent_rows >= 1, got {self}")

    @classmethod
    def parse(cls, spec: str) -> GraphBucket:
        """`"3x4096"`: 3 branches of up to 4096 latents (one 1024x1024 refine with all CFG branches)."""
        m = _SPEC.match(spec) if isinstance(spec, str) else None
        if m is None:
            raise ValueError(f"graph bucket {spec!r} is not BRANCHESxLATENT_ROWS (e.g. 3x4096)")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def gen_rows(self) -> int:
        return self.branches * self.latent_rows

    @property
    def und_rows(self) -> int:
        return 2 * self.branches  # the <|vision_start|>, <|vision_end|> markers of every branch

    @property
    def rows(self) -> int:
        return self.gen_rows + self.und_rows

    @property
    def label(self) -> str:
        return f"{self.branches}x{self.latent_rows}"


def parse_buckets(specs: Iterable[str]) -> tuple[GraphBucket, ...]:
    """Distinct buckets from their specs, smallest first."""
    return tuple(sorted({GraphBucket.parse(s) for s in specs}))


@dataclass(frozen=True)
class StepShape:
    """What a step packs: branch sequences and latent rows over all of them."""

    branches: int
    gen_rows: int

    @classmethod
    def of(cls, latent_rows: Iterable[int]) -> StepShape:
        """From the latent rows of each branch sequence."""
        rows = list(latent_rows)
        return cls(len(rows), sum(rows))


def choose_bucket(buckets: Iterable[GraphBucket], shape: StepShape, max_padding: float) -> GraphBucket | None:
    """The bucket with the fewest rows that holds `shape`, or None when none does or when its padded latent
    rows exceed the step's by more than the fraction `max_padding`."""
    fits = [b for b in buckets if b.branches >= shape.branches and b.gen_rows >= shape.gen_rows]
    if not fits or shape.gen_rows == 0:
        return None
    best = min(fits, key=lambda b: (b.rows, b.branches))
    if best.gen_rows - shape.gen_rows > max_padding * shape.gen_rows:
        return None
    return best
