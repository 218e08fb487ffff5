"""Engine commands of the `rvr` CLI: refine, generate, edit, judge, make-checkpoint, check-model.

Importing this module imports only the standard library; torch loads when a command runs.
Bad input (unreadable image, missing files, invalid sizes) exits 1 with one `rvr: error:` line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMANDS = ("refine", "generate", "edit", "judge", "make-checkpoint", "check-model")
# engine.backends.BACKENDS, spelled out: that module imports torch.
BACKEND_NAMES = ("exact", "eager", "inductor", "tensorrt")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: bundled model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on GPU)"
    )
    p.add_argument(
        "--weights", default="auto", choices=("auto", "both", "rvr", "ema"), help="weight files to load"
    )
    p.add_argument(
        "--backend",
        default="exact",
        choices=BACKEND_NAMES,
        help="engine backend (exact: the default fast path)",
    )


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the task's released values)")
    g.add_argument("--steps", type=int, help="official num_timesteps T (T-1 model evaluations)")
    g.add_argument("--seed", type=int, help="noise seed (default: random, printed)")
    g.add_argument("--cfg-text", type=float)
    g.add_argument("--cfg-img", type=float)
    g.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"))
    g.add_argument("--renorm", choices=("global", "channel", "text_channel"))
    g.add_argument("--renorm-min", type=float)
    g.add_argument("--shift", type=float)
    g.add_argument("--height", type=int, help="output height (multiple of 16)")
    g.add_argument("--width", type=int, help="output width (multiple of 16)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("refine", help="RvR: regenerate an image to match its prompt")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=1, help="iterative refinement rounds")
    p.add_argument("--until-score", type=float, help="stop once the judge's p(yes) reaches this")
    _model_args(p)
    _sampling_args(p)

    p = subparsers.add_parser("generate", help="BAGEL text-to-image")
    p.add_argument("--prompt", required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    _model_args(p)
    _sampling_args(p)

    p = subparsers.add_parser("edit", help="BAGEL image editing (the refinement-via-editing baseline)")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--prompt", required=True, help="editing instruction")
    p.add_argument("-o", "--output", type=Path, required=True)
    _model_args(p)
    _sampling_args(p)

    p = subparsers.add_parser("judge", help="p(yes) that an image shows a prompt")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--prompt", required=True)
    _model_args(p)

    p = subparsers.add_parser("make-checkpoint", help="write a random checkpoint in the official layout")
    p.add_argument("output", type=Path)
    p.add_argument("--preset", default="tiny", choices=("tiny", "small", "bagel-7b"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="ema,rvr", help="comma-separated: ema, rvr")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))

    p = subparsers.add_parser(
        "check-model", help="verify a checkpoint directory (files, keys, shapes, dtypes, sha256); no GPU"
    )
    p.add_argument("model_dir", type=Path, metavar="DIR")
    p.add_argument(
        "--weights", default="auto", choices=("auto", "both", "rvr", "ema"), help="weight files to expect"
    )
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 digests (they read every byte)")


def run(args: argparse.Namespace) -> int:
    """Run an engine command; returns the exit code. Engine and input errors become one line on stderr."""
    from PIL import UnidentifiedImageError

    from engine.errors import EngineError

    try:
        return _COMMANDS[args.command](args)
    except (EngineError, OSError, UnidentifiedImageError, ValueError) as exc:
        print(f"rvr: error: {exc}", file=sys.stderr)
        return 1


def _open_image(path: Path):
    from PIL import Image

    from engine.errors import InvalidRequestError

    if not path.is_file():
        raise InvalidRequestError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Exception as exc:  # PIL raises many types for corrupt files
        raise InvalidRequestError(f"cannot read image {path}: {exc}") from None


def _engine(args):
    from engine.loading import load_engine

    return load_engine(args.model, args.device, args.dtype, weights=args.weights, backend=args.backend)


def _params(args) -> dict:
    names = ("steps", "cfg_text", "cfg_img", "cfg_interval", "renorm", "renorm_min", "shift")
    params = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if "cfg_interval" in params:
        params["cfg_interval"] = tuple(params["cfg_interval"])
    return params


def _progress(args, total_rounds: int = 1):
    """A tqdm bar over denoising steps (stderr), or None."""
    if args.no_progress:
        return None, lambda: None
    from tqdm import tqdm

    bars: list = []  # created on the first step, so nothing prints if validation fails

    def on_step(event, _preview) -> None:
        if not bars:
            bars.append(tqdm(unit="step", file=sys.stderr, leave=False))
        bar = bars[0]
        bar.total = event.total
        desc = f"round {event.round_index}/{event.rounds}" if event.rounds > 1 else "denoising"
        bar.set_description(desc)
        bar.n = event.step
        bar.refresh()

    return on_step, lambda: bars and bars[0].close()


def _check_output(path: Path) -> None:
    """Fail before any work when the output format is unknown or its directory does not exist (a typo in
    a path is not silently created)."""
    from PIL import Image

    from engine.errors import InvalidRequestError

    if not path.parent.is_dir():
        raise InvalidRequestError(f"output directory does not exist: {path.parent}")
    if path.suffix.lower() not in Image.registered_extensions():
        raise InvalidRequestError(f"unknown output image format {path.suffix!r} (use .png, .jpg or .webp)")


def _image_command(args, call) -> int:
    """Load the engine, run `call(engine, on_step)` with a progress bar, save and report the image."""
    engine = _engine(args)
    on_step, close = _progress(args)
    try:
        out = call(engine, on_step)
    finally:
        close()
    out.image.save(args.output)
    line = f"{args.output} {out.image.width}x{out.image.height} seed={out.seed}"
    if args.command == "refine":
        line += f" rounds={out.round_index}" + (f" score={out.score:.4f}" if out.score is not None else "")
    print(line)
    return 0


def _refine(args) -> int:
    _check_output(args.output)
    image = _open_image(args.image)
    return _image_command(
        args,
        lambda engine, on_step: engine.refine(
            image, args.prompt, rounds=args.rounds, until_score=args.until_score, seed=args.seed,
            height=args.height, width=args.width, on_step=on_step, **_params(args),
        ),
    )  # fmt: skip


def _generate(args) -> int:
    _check_output(args.output)
    return _image_command(
        args,
        lambda engine, on_step: engine.generate(
            args.prompt, args.height, args.width, seed=args.seed, on_step=on_step, **_params(args)
        ),
    )


def _edit(args) -> int:
    _check_output(args.output)
    image = _open_image(args.image)
    return _image_command(
        args,
        lambda engine, on_step: engine.edit(
            image, args.prompt, seed=args.seed, height=args.height, width=args.width, on_step=on_step,
            **_params(args),
        ),
    )  # fmt: skip


def _judge(args) -> int:
    image = _open_image(args.image)
    score = _engine(args).judge([(image, args.prompt)])[0]
    print(f"{score:.6f}")
    return 0


def _make_checkpoint(args) -> int:
    import torch

    from engine.tiny import make_checkpoint

    weights = tuple(w.strip() for w in args.weights.split(",") if w.strip())
    if not weights or any(w not in ("ema", "rvr") for w in weights):
        raise ValueError(f"--weights must list ema and/or rvr, got {args.weights!r}")
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    path = make_checkpoint(args.output, args.preset, seed=args.seed, weights=weights, dtype=dtype)
    print(path)
    return 0


def _check_model(args) -> int:
    from engine.model_check import check_model, format_report

    report = check_model(args.model_dir, weights=args.weights, hashes=not args.no_hash)
    for line in format_report(report):
        print(line)
    for problem in report.problems:
        print(f"rvr: error: {problem}", file=sys.stderr)
    return 0 if report.ok else 1


_COMMANDS = {
    "refine": _refine,
    "generate": _generate,
    "edit": _edit,
    "judge": _judge,
    "make-checkpoint": _make_checkpoint,
    "check-model": _check_model,
}


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m engine.cli`); the `rvr` command adds the server commands."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="rvr")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
