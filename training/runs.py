"""The staged world run, reproducible from one command with fixed seeds:

    python -m training.runs --out runs/world --profile demo

1. data     world dataset (refine pairs, T2I targets, judge samples, held-out prompts), and edit pairs
            (editing.py) for profiles with `edit_per_prompt` > 0;
2. ae       small FLUX-architecture autoencoder on world renders;
3. init     tokenizer trained on the training prompts and fixed strings, random unified model
            (`llm2vae` zero-initialised as in BAGEL training), written as an engine checkpoint;
4. t2i      text-to-image stage                      -> ema.safetensors
   own      samples of the T2I stage on the training prompts, labelled by the checker: judge samples and
            refine pairs <own misaligned sample, aligned render> (profiles with `own_per_prompt` > 0)
5. judge    yes/no alignment judge (+ T2I replay)    -> ema.safetensors
6. rvr      RvR fine-tune, rvr:und:t2i = 2:1:1      -> rvr.safetensors (the base ema is kept)
7. export   the final checkpoint with bfloat16 weights (both weight files) and the held-out prompts
            (eval/heldout.jsonl) into --out/model, the one to ship;
8. eval     mini-GenEval of the exported model on the held-out prompts.

Each stage writes into its own directory under --out and is skipped when its output exists, so an
interrupted run resumes (training stages also resume mid-stage from their `train_state`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import WEIGHT_FILES, save_checkpoint
from engine.config import BagelConfig, ImageTransform, VAEConfig
from engine.loading import load_engine
from engine.model.bagel import Bagel
from engine.prompts import JUDGE_QUESTION, REFINE_PROMPT, REFINE_SYSTEM_PROMPT, REFINE_SYSTEM_PROMPT_TRAIN
from engine.tiny import preset
from engine.tokenizer import Tokenizer, write_tiny_tokenizer
from training.autoencoder import AETrainConfig, train_autoencoder
from training.dataset import (
    build_world_dataset,
    first_prompt,
    parse_image_list,
    read_records,
    read_specs,
    understanding_question,
    write_records,
)
from training.editing import build_edit_records
from training.evaluate import (
    EDIT_MODE,
    MODES,
    autoencoder_ceiling,
    format_summary,
    load_heldout,
    markdown_table,
    mini_geneval,
    prompt_blind,
)
from training.image_use import format_image_use, image_use
from training.own_samples import own_t2i_records, write_own_dataset
from training.pairing import aligned_pools, keep_pairs, pair_nearest
from training.prompts import CATEGORIES
from training.trainer import TOKENIZER_FILES, TrainConfig, train

STAGES = ("data", "ae", "init", "t2i", "own", "judge", "rvr", "export", "eval")
SHIP_FILES = ("config.json", "llm_config.json", "vit_config.json", *TOKENIZER_FILES)


@dataclass
class RunConfig:
    seed: int = 0
    n_prompts: int = 3000
    image_size: int = 64
    model_preset: str = "small"
    vae: VAEConfig = field(
        default_factory=lambda: VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4)
    )
    ae: AETrainConfig = field(default_factory=AETrainConfig)
    stages: dict[str, TrainConfig] = field(default_factory=dict)
    eval_limit: int | None = None
    eval_steps: int = 25
    eval_seeds: tuple[int, ...] = (0,)
    eval_cfg_text: float | None = None  # None: the engine's task defaults
    threads: int = 1
    # the world: GenEval categories in the prompt pool, mixed specs of at most this many dimensions,
    # dimensions left out entirely, and the held-out fraction
    categories: tuple[str, ...] = CATEGORIES
    mixed_max_dims: int = 5
    exclude_dims: tuple[str, ...] = ()
    max_groups: int = 2
    heldout_fraction: float = 0.1
    pairs_per_prompt: int = 1  # refine pairs (and judge samples) per training prompt
    t2i_per_prompt: int = 1
    own_per_prompt: int = 0  # samples of the T2I stage per training prompt (0: no `own` stage)
    caption_noise: float = 0.0  # fraction of T2I pretraining images that break one caption dimension
    # the aligned image of each RvR pair: "random" as drawn, or "nearest" to its misaligned image among the
    # prompt's aligned candidates (pairing.py); only the RvR stage reads refine pairs, so T2I and judge
    # stages are the same either way
    rvr_pairing: str = "random"
    # aligned inputs the RvR stage also learns to keep (pairing.keep_pairs; needs "nearest"): "own" aligned
    # samples of the T2I stage, the "world" pairs' aligned renders
    rvr_keep: tuple[str, ...] = ()
    # > 0: the world's generators have a colour cast (world.random_cast) of this strength: every autoencoder,
    # text-to-image and judge image gets its own, and both images of a refine pair share one (a misaligned
    # and an aligned sample of one generator), so only the input image tells RvR the cast to keep
    world_cast: float = 0.0
    # > 0: edit pairs per training prompt (editing.py), so a stage whose mixture has "edit" trains BAGEL's
    # editing, and the evaluation adds refinement via editing
    edit_per_prompt: int = 0


def _stage_cfgs(
    steps: tuple[int, int, int],
    max_rows: int,
    seed: int,
    judge_ce_weight: float = 0.25,
    timestep_shift: float = TrainConfig.timestep_shift,
    finetune_lr: float = 1e-3,
) -> dict[str, TrainConfig]:
    """T2I from scratch at 1e-3; the judge and RvR stages fine-tune at `finetune_lr`."""
    common = dict(
        timestep_shift=timestep_shift,
        warmup_steps=100,
        ema_decay=0.999,
        ema_warmup=True,
        max_rows=max_rows,
        seed=seed,
        save_every=500,
    )
    t2i, judge, rvr = steps
    return {
        "t2i": TrainConfig(
            steps=t2i, lr=1e-3, mixture={"t2i": 1.0}, init_weights="ema", weights_name="ema", **common
        ),
        "judge": TrainConfig(
            steps=judge,
            lr=finetune_lr,
            mixture={"und": 3.0, "t2i": 1.0},
            init_weights="ema",
            weights_name="ema",
            ce_weight=judge_ce_weight,
            **common,
        ),
        # The demo adds 10 % prompt / image dropout on refine samples (the release has none) so that the
        # engine's cfg_text [SYS][ViT] and cfg_img [SYS][PROMPT] branches are in distribution for a small model.
        "rvr": TrainConfig(
            steps=rvr,
            lr=finetune_lr,
            mixture={"rvr": 2.0, "und": 1.0, "t2i": 1.0},
            init_weights="ema",
            weights_name="rvr",
            refine_prompt_dropout=0.1,
            refine_image_dropout=0.1,
            ce_weight=judge_ce_weight,
            **common,
        ),
    }


def with_world_cast(run: RunConfig, strength: float) -> RunConfig:
    """`run` with RunConfig.world_cast = strength carried into the autoencoder and every stage's mixture."""
    stages = {
        name: replace(cfg, image_cast=strength, refine_pair_cast=strength) for name, cfg in run.stages.items()
    }
    return replace(run, world_cast=strength, ae=replace(run.ae, cast=strength), stages=stages)


def _with_rvr_steps(run: RunConfig, steps: int) -> RunConfig:
    return replace(run, stages={**run.stages, "rvr": replace(run.stages["rvr"], steps=steps)})


PROFILES = {
    # seconds: the whole pipeline on a handful of prompts (tests)
    "smoke": lambda: RunConfig(
        n_prompts=16,
        model_preset="tiny",
        ae=AETrainConfig(steps=2, batch_size=2),
        stages=_stage_cfgs((2, 2, 2), 300, 0),
        eval_limit=2,
        eval_steps=3,
        own_per_prompt=2,
    ),
    # about an hour on one share of two busy CPU cores (single thread)
    "demo": lambda: RunConfig(
        n_prompts=2000,
        model_preset="mini",
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=8),
        ae=AETrainConfig(steps=1200, batch_size=8, lr=2e-3),
        stages=_stage_cfgs((4000, 600, 800), 800, 0),
        eval_limit=None,
        eval_steps=20,
    ),
    # ~30 min on two free CPU cores (--threads 2): a simpler world of one object group per prompt and
    # 1-3 dimensions (object, colour, count, size; no position), eight refine pairs and T2I targets per
    # training prompt, the judge's CE at full weight, longer stages, four seeds per held-out prompt.
    "demo-simple": lambda: RunConfig(
        n_prompts=300,
        model_preset="mini",
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=8),
        ae=AETrainConfig(steps=1200, batch_size=8, lr=2e-3),  # the demo's autoencoder (same seed)
        stages=_stage_cfgs((4000, 2000, 2000), 800, 0, judge_ce_weight=1.0),
        eval_limit=None,
        eval_steps=20,
        eval_seeds=(0, 1, 2, 3),
        categories=("single_object", "counting", "colors"),
        mixed_max_dims=3,
        exclude_dims=("position",),
        max_groups=1,
        heldout_fraction=0.2,
        pairs_per_prompt=8,
        t2i_per_prompt=8,
    ),
    # demo-simple's world, a longer T2I stage, then the paper's data loop on the model itself: eight own T2I
    # samples per training prompt, labelled by the checker, feed the judge (on the images it will judge)
    # and RvR (on the failures it will refine).
    "demo-own": lambda: replace(
        PROFILES["demo-simple"](),
        stages=_stage_cfgs((6000, 2000, 2000), 800, 0, judge_ce_weight=1.0),
        own_per_prompt=8,
        eval_seeds=tuple(range(8)),
    ),
    # One object per image (shape, colour, size; no counts or positions): 84 prompts, 15 held out. The
    # timestep shift is 1: an 8x8 latent has none of the redundancy the release's shift of 4 is tuned
    # for at 1024 px (SD3's resolution-dependent shift), so training spends its steps at every noise level.
    # The judge and RvR stages fine-tune at 3e-4: at 1e-3 the judge stage raised the T2I replay's MSE by
    # 40 % (text rows run through the und expert that the judge trains) and RvR weights generated worse.
    "single": lambda: replace(
        PROFILES["demo-simple"](),
        n_prompts=400,
        stages=_stage_cfgs(
            (6000, 2000, 2000), 800, 0, judge_ce_weight=1.0, timestep_shift=1.0, finetune_lr=3e-4
        ),
        categories=("single_object", "colors"),
        exclude_dims=("count", "position"),
        pairs_per_prompt=16,
        t2i_per_prompt=32,
        own_per_prompt=16,
        eval_seeds=tuple(range(16)),
    ),
    # The single-object world with web-like pretraining captions (30 % of T2I images break one caption
    # dimension, unfiltered), as BAGEL's base was pretrained on scraped captions; the judge and RvR data
    # stay checker-verified, as the paper builds them.
    "noisy-captions": lambda: replace(PROFILES["single"](), caption_noise=0.3),
    # b5 in bench/RESULTS.md, the bundled model until session 5: `single` with a 5,000-step RvR stage.
    "bundled": lambda: _with_rvr_steps(PROFILES["single"](), 5000),
    # The bundled model (engine/assets/demo, g1 in bench/RESULTS.md), which reads its input image: `bundled`
    # in a world with casts, a 3,000-step autoencoder, a 9,000-step T2I stage, and an RvR stage of 3,000
    # steps at lr 1e-3 with refine and T2I samples 3:1 (T2I keeps the refine weights a good generator).
    "bundled-cast": lambda: _bundled_cast(),
    # `bundled-cast` whose judge stage also learns BAGEL's editing from 16 edit pairs per training prompt
    # (und:t2i:edit = 3:1:1), so mini-GenEval can compare RvR with refinement via editing.
    "bundled-cast-edit": lambda: with_edit(_bundled_cast(), 16),
}


def with_edit(run: RunConfig, per_prompt: int, weight: float = 1.0) -> RunConfig:
    judge = run.stages["judge"]
    judge = replace(judge, mixture={**judge.mixture, "edit": weight})
    return replace(run, edit_per_prompt=per_prompt, stages={**run.stages, "judge": judge})


def _bundled_cast() -> RunConfig:
    run = with_world_cast(PROFILES["bundled"](), 0.25)
    t2i = replace(run.stages["t2i"], steps=9000)
    rvr = replace(run.stages["rvr"], lr=1e-3, mixture={"rvr": 3.0, "t2i": 1.0}, steps=3000)
    return replace(run, ae=replace(run.ae, steps=3000), stages={**run.stages, "t2i": t2i, "rvr": rvr})


def model_config(name: str, vocab_size: int) -> BagelConfig:
    """`mini` (this module's demo size: 128-wide, 4-layer LLM, 3-layer 64-wide ViT) or an engine preset."""
    if name != "mini":
        return preset(name, vocab_size=vocab_size)
    small = preset("small", vocab_size=vocab_size)
    return replace(
        small,
        llm=replace(small.llm, hidden_size=128, intermediate_size=256, num_hidden_layers=4),
        vit=replace(small.vit, hidden_size=64, intermediate_size=128, num_hidden_layers=3),
    )


def tokenizer_corpus(prompts: list[str]) -> list[str]:
    fixed = [REFINE_SYSTEM_PROMPT, REFINE_SYSTEM_PROMPT_TRAIN, REFINE_PROMPT, JUDGE_QUESTION, "Yes", "No"]
    return (
        fixed
        + [JUDGE_QUESTION.format(prompt=p) for p in prompts]
        + [REFINE_PROMPT.format(user_prompt=p) for p in prompts]
    )


def init_checkpoint(out: Path, run: RunConfig, ae_dir: Path, prompts: list[str]) -> Path:
    """Tokenizer + random unified model + the trained autoencoder, as an engine checkpoint (ema only)."""
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(out, tokenizer_corpus(prompts))
    vocab = -(-Tokenizer.from_dir(out).vocab_size // 64) * 64  # padded like Qwen2's embedding
    ae_meta = json.loads((ae_dir / "vae.json").read_text())
    vae_cfg = VAEConfig(**{**ae_meta, "ch_mult": tuple(ae_meta["ch_mult"])})
    s = run.image_size
    cfg = replace(
        model_config(run.model_preset, vocab),
        vae=vae_cfg,
        # the world's images keep their size through both rules (64 px -> 64 for the VAE, 70 for the ViT)
        vae_transform=ImageTransform(2 * s, s, 16, max_pixels=4 * s * s),
    )
    torch.manual_seed(run.seed)
    model = Bagel(cfg)
    torch.nn.init.zeros_(model.llm2vae.weight)  # BAGEL initialises llm2vae to zero for training
    torch.nn.init.zeros_(model.llm2vae.bias)
    save_checkpoint(
        out, cfg, {"ema": model.state_dict()}, load_file(str(ae_dir / "ae.safetensors")), torch.float32
    )
    return out


def export_checkpoint(
    src: Path, dst: Path, dtype: torch.dtype = torch.bfloat16, serve_size: int | None = None
) -> Path:
    """Copy an engine checkpoint without its train state, weight files cast to `dtype` (the VAE stays float32).

    With `serve_size`, the VAE resize rule of the copy caps images at that side (the size the model was
    trained at), so inputs of any size and generations without a size come out at it."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SHIP_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if serve_size is not None:
        cfg = json.loads((dst / "config.json").read_text())
        rule = {"max_size": serve_size, "min_size": serve_size // 2, "max_pixels": serve_size * serve_size}
        cfg["vae_transform"] = {**cfg["vae_transform"], **rule}
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copyfile(src / "ae.safetensors", dst / "ae.safetensors")
    for name in WEIGHT_FILES.values():
        if (src / name).is_file():
            state = load_file(str(src / name))
            save_file(
                {k: v.to(dtype).contiguous() for k, v in state.items()},
                str(dst / name),
                metadata={"format": "pt"},
            )
    return dst


def _records(data: Path, pairing: str = "random", keep: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """The world's records, plus the `own` stage's refine pairs and judge samples when it ran."""
    if pairing not in ("random", "nearest"):
        raise ValueError(f"rvr_pairing must be 'random' or 'nearest', got {pairing!r}")
    if keep and (pairing != "nearest" or not set(keep) <= {"own", "world"}):
        raise ValueError(f"rvr_keep must be a subset of ('own', 'world') with nearest pairing, got {keep!r}")

    def own(name: str) -> list[dict]:
        path = data / "own" / name
        return read_records(path) if path.is_file() else []

    t2i, world, own_und = (
        read_records(data / "t2i/data/t2i.parquet"),
        read_records(data / "rvr/json/parquet_info.json"),
        own("und.jsonl"),
    )
    rvr = world + own("rvr.parquet")
    if pairing == "nearest":
        pools = aligned_pools(t2i)
        rvr = pair_nearest(rvr, pools, data)
        aligned = []
        if "own" in keep:
            prompt_of = {
                understanding_question(s.text): s.text for s in read_specs(data / "train_specs.jsonl")
            }
            aligned += [(r["image"], prompt_of[r["question"]]) for r in own_und if r["answer"] == "Yes"]
        if "world" in keep:
            aligned += [(parse_image_list(r["image_list"])[1], first_prompt(r["user_prompt"])) for r in world]
        rvr += keep_pairs(aligned, pools, data)
    edit = data / "edit/edit.jsonl"
    return {
        "rvr": rvr,
        "t2i": t2i,
        "und": read_records(data / "und/und.jsonl") + own_und,
        "edit": read_records(edit) if edit.is_file() else [],
    }


def own_stage(data: Path, t2i_dir: Path, run: RunConfig) -> dict:
    """Sample the T2I stage on every training prompt and write its labelled records under data/own."""
    engine = load_engine(t2i_dir, device="cpu", dtype="float32")
    refine, judge, stats = own_t2i_records(
        engine,
        read_specs(data / "train_specs.jsonl"),
        read_records(data / "t2i/data/t2i.parquet"),
        data,
        run.seed,
        run.own_per_prompt,
        run.image_size,
        params={"steps": run.eval_steps},
        white_balance_samples=run.world_cast > 0,
    )
    write_own_dataset(data, refine, judge)
    return stats


def run_all(out: str | Path, run: RunConfig, stages: tuple[str, ...] = STAGES, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(run.threads)
    report_path = out / "run_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["config"] = json.loads(json.dumps(asdict(run), default=str))
    data, ae_dir, init = out / "data", out / "ae", out / "init"

    def done(stage: str, **info) -> None:
        report.setdefault("stages", {})[stage] = info
        report_path.write_text(json.dumps(report, indent=2))

    if "data" in stages and not (data / "stats.json").is_file():
        t0 = time.time()
        stats = build_world_dataset(
            data,
            run.n_prompts,
            run.seed,
            run.image_size,
            run.heldout_fraction,
            categories=run.categories,
            mixed_max_dims=run.mixed_max_dims,
            exclude_dims=run.exclude_dims,
            max_groups=run.max_groups,
            pairs_per_prompt=run.pairs_per_prompt,
            t2i_per_prompt=run.t2i_per_prompt,
            caption_noise=run.caption_noise,
        )
        done("data", seconds=time.time() - t0, **stats)
    edit_file = data / "edit/edit.jsonl"
    if "data" in stages and run.edit_per_prompt and not edit_file.is_file():
        t0 = time.time()
        edits, stats = build_edit_records(
            read_specs(data / "train_specs.jsonl"),
            data,
            run.seed,
            run.image_size,
            per_prompt=run.edit_per_prompt,
        )
        write_records(edits, edit_file)
        done("edit_data", seconds=time.time() - t0, **stats)
    if "ae" in stages and not (ae_dir / "ae.safetensors").is_file():
        t0 = time.time()
        ae, hist = train_autoencoder(
            run.vae, replace(run.ae, image_size=run.image_size, seed=run.seed), progress
        )
        ae_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(ae_dir / "ae.safetensors"))
        (ae_dir / "vae.json").write_text(json.dumps(asdict(ae.cfg)))
        done("ae", seconds=time.time() - t0, first_rec=hist[0], last_rec=sum(hist[-20:]) / len(hist[-20:]))
    if "init" in stages and not (init / "ema.safetensors").is_file():
        prompts = [r["user_prompt"][0] for r in read_records(data / "t2i/data/t2i.parquet")]
        init_checkpoint(init, run, ae_dir, prompts)
        done("init")
    prev = init
    records = None
    for stage in ("t2i", "judge", "rvr"):
        if (
            stage == "judge"
            and "own" in stages
            and run.own_per_prompt
            and not (data / "own/und.jsonl").is_file()
        ):
            t0 = time.time()
            stats = own_stage(data, prev, run)
            done("own", seconds=time.time() - t0, **stats)
            records = None  # reread: the judge and RvR stages train on the own samples just written
        cfg = run.stages[stage]
        stage_dir = out / stage
        if stage in stages:
            state = stage_dir / "train_state" / "state.json"
            if not state.is_file() or json.loads(state.read_text())["step"] < cfg.steps:
                records = records or _records(data, run.rvr_pairing, run.rvr_keep)
                t0 = time.time()
                _, hist = train(prev, data, records, stage_dir, cfg, progress=progress)
                if hist:
                    tail = hist[-20:]
                    done(
                        stage,
                        seconds=time.time() - t0,
                        steps=cfg.steps,
                        first={k: hist[0][k] for k in ("loss", "mse", "ce")},
                        last={k: sum(h[k] for h in tail) / len(tail) for k in ("loss", "mse", "ce")},
                    )
        prev = stage_dir
    if "export" in stages:
        prev = export_checkpoint(prev, out / "model", serve_size=run.image_size)
        # the held-out prompts travel with the model, so `rvr eval` on it needs no dataset
        (prev / "eval").mkdir(exist_ok=True)
        shutil.copyfile(data / "eval/heldout.jsonl", prev / "eval/heldout.jsonl")
        files = sorted(f for f in prev.rglob("*") if f.is_file())
        done(
            "export",
            bytes=sum(f.stat().st_size for f in files),
            files=[str(f.relative_to(prev)) for f in files],
        )
    if "eval" in stages:
        engine = load_engine(prev, device="cpu", dtype="float32")
        specs = load_heldout(data)[: run.eval_limit]
        rvr_engine = load_engine(prev, device="cpu", dtype="float32", weights="rvr")
        params = {"steps": run.eval_steps}
        if run.eval_cfg_text is not None:
            params["cfg_text"] = run.eval_cfg_text
        seeds = tuple(run.seed + s for s in run.eval_seeds)
        sampling = {"generate_params": params, "refine_params": params, "rvr_weights_engine": rvr_engine}
        modes = (*MODES, EDIT_MODE) if run.edit_per_prompt else MODES
        t0 = time.time()
        summary = mini_geneval(
            engine, specs, seeds, run.image_size, modes=modes, edit_params=params, **sampling
        )
        summary["autoencoder_ceiling"] = autoencoder_ceiling(engine.vae, specs, run.seed, run.image_size)
        summary["prompt_blind"] = prompt_blind(specs, run.seed, run.image_size)
        summary["image_use"] = image_use(engine, specs, seeds, run.image_size, **sampling)
        (out / "eval.json").write_text(json.dumps(summary, indent=2))
        (out / "eval.md").write_text(markdown_table(summary) + "\n")
        if progress:
            print(format_summary(summary))
            print(format_image_use(summary["image_use"]))
        done("eval", seconds=time.time() - t0, **{k: v for k, v in summary.items() if k != "rows"})
    return report


def parse_args(argv: list[str] | None = None) -> tuple[str, RunConfig, tuple[str, ...]]:
    """(output directory, the profile's run config with the command line's overrides, stages)."""
    ap = argparse.ArgumentParser(
        description="Staged synthetic-world run: data, autoencoder, T2I, judge, RvR, eval."
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    ap.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--rvr-pairing", choices=("random", "nearest"), default=None, help="override the profile's"
    )
    ap.add_argument(
        "--rvr-keep",
        default=None,
        help="comma-separated keep-pair sources (own, world); needs nearest pairing",
    )
    ap.add_argument("--rvr-lr", type=float, default=None, help="override the RvR stage's learning rate")
    ap.add_argument(
        "--rvr-prompt-dropout",
        type=float,
        default=None,
        help="override the RvR stage's refine prompt dropout",
    )
    ap.add_argument(
        "--world-cast",
        type=float,
        default=None,
        help="colour-cast strength of the world's generators, in every stage (RunConfig.world_cast)",
    )
    ap.add_argument(
        "--rvr-pair-cast",
        type=float,
        default=None,
        help="colour-cast strength shared by both images of a refine pair (0: none)",
    )
    a = ap.parse_args(argv)
    run = replace(PROFILES[a.profile](), threads=a.threads)
    if a.rvr_pairing is not None:
        run = replace(run, rvr_pairing=a.rvr_pairing)
    if a.rvr_keep is not None:
        run = replace(run, rvr_keep=tuple(k for k in a.rvr_keep.split(",") if k))
    if a.world_cast is not None:
        run = with_world_cast(run, a.world_cast)
    rvr_overrides = {
        "lr": a.rvr_lr,
        "refine_prompt_dropout": a.rvr_prompt_dropout,
        "refine_pair_cast": a.rvr_pair_cast,
    }
    rvr_overrides = {k: v for k, v in rvr_overrides.items() if v is not None}
    if rvr_overrides:
        run = replace(run, stages={**run.stages, "rvr": replace(run.stages["rvr"], **rvr_overrides)})
    return a.out, run, tuple(a.stages.split(","))


def main(argv: list[str] | None = None) -> None:
    run_all(*parse_args(argv))


if __name__ == "__main__":
    main()
