"""A refine figure from a finished run: held-out prompts where the T2I sample failed the checker and one
RvR round fixed it, as rows of (prompt, T2I image, RvR image).

    python -m training.figure --run runs/world --out bench/figures/refine_demo.png

The images are regenerated with the run's evaluation settings and seeds (the samplers are seeded, so they
are the images `eval.json` scored) and re-checked before they are drawn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from engine.loading import load_engine
from engine.types import GenerationRequest, SamplingParams
from training.checker import check
from training.evaluate import load_heldout


def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def refine_examples(run: Path, n: int = 4) -> list[tuple[str, Image.Image, Image.Image]]:
    """Up to n (prompt, t2i, rvr1) of held-out rows with ok_t2i False and ok_rvr1 True, re-verified."""
    ev = json.loads((run / "eval.json").read_text())
    cfg = json.loads((run / "run_report.json").read_text())["config"]
    size = cfg["image_size"]
    params = {"steps": cfg["eval_steps"]}
    if cfg.get("eval_cfg_text") is not None:
        params["cfg_text"] = cfg["eval_cfg_text"]
    specs = {s.text: s for s in load_heldout(run / "data")}
    engine = load_engine(run / "model", device="cpu", dtype="float32")
    out, seen = [], set()
    for row in ev["rows"]:
        if row["ok_t2i"] or not row["ok_rvr1"] or row["prompt"] in seen:
            continue
        spec, seed = specs[row["prompt"]], row["seed"]
        t2i = engine.generate(spec.text, size, size, seed=seed, **params).image
        req = GenerationRequest(
            "refine", spec.text, t2i, SamplingParams.for_task("refine", **params), seed, size, size, rounds=1
        )
        rvr = engine.run(req)[0].image
        if check(t2i, spec)["overall"] or not check(rvr, spec)["overall"]:
            continue
        out.append((spec.text, t2i, rvr))
        seen.add(spec.text)
        if len(out) == n:
            break
    return out


def paired_caption(run: Path) -> str:
    """What one RvR round did to all held-out samples, so the chosen examples are read in proportion."""
    ev = json.loads((run / "eval.json").read_text())
    n, vs = ev["n"], ev["vs_t2i"]["rvr1"]
    failed = sum(not r["ok_t2i"] for r in ev["rows"])
    caption = (
        f"RvR x1 on all {n} held-out samples:\n"
        f"fixed {vs['fixed']} of {failed} rejected T2I images, broke {vs['broke']} of {n - failed} accepted"
    )
    cast = ev.get("image_use", {}).get("cast")
    if cast:
        caption += (
            f"\nbackground vs a tinted input: RvR {cast['rvr_from_cast']:.1f}, "
            f"fresh T2I {cast['fresh']:.1f} (RGB distance)"
        )
    return caption


def draw_grid(
    rows: list[tuple[str, Image.Image, Image.Image]], scale: int = 3, caption: str | None = None
) -> Image.Image:
    """Rows of (prompt, T2I image, RvR image); `caption` (e.g. the run's fixed/broke counts) goes on top."""
    cell = rows[0][1].width * scale
    text_w, pad, head = 300, 10, 30
    top = 22 * len(caption.splitlines()) + 8 if caption else 0
    W = text_w + 2 * (cell + pad) + pad
    H = top + head + len(rows) * (cell + pad) + pad
    fig = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(fig)
    f, fb = _font(16), _font(18)
    if caption:
        d.multiline_text((pad, 6), caption, fill="black", font=f, spacing=4)
    d.text((pad, top + 6), "held-out prompt", fill="black", font=fb)
    d.text((text_w, top + 6), "T2I: rejected", fill="black", font=fb)
    d.text((text_w + cell + pad, top + 6), "RvR x1: accepted", fill="black", font=fb)
    for i, (prompt, t2i, rvr) in enumerate(rows):
        y = top + head + i * (cell + pad)
        d.text((pad, y + cell // 2 - 10), f'"{prompt}"', fill="black", font=f)
        fig.paste(t2i.resize((cell, cell), Image.NEAREST), (text_w, y))
        fig.paste(rvr.resize((cell, cell), Image.NEAREST), (text_w + cell + pad, y))
    return fig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Grid of held-out prompts that one RvR round fixed.")
    ap.add_argument("--run", required=True, help="a finished run directory (with eval.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = refine_examples(Path(a.run), a.n)
    if not rows:
        raise SystemExit("no held-out prompt where RvR fixed the T2I image")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    draw_grid(rows, caption=paired_caption(Path(a.run))).save(a.out)
    print(f"{len(rows)} rows -> {a.out}")


if __name__ == "__main__":
    main()
