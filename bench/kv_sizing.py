"""GPU sizing arithmetic from the real config and context planner: no weights are allocated, no GPU needed.

    python bench/kv_sizing.py                                   # BAGEL-7B-MoT shapes, text lengths estimated
    python bench/kv_sizing.py --model models/RvR-7B-MoT         # that checkpoint's config and tokenizer
    python bench/kv_sizing.py --measured bench/gpu/h200-2026-11-26/engine_kernel.json --json sizing.json

Reports (1) parameters and bytes of one weight set and of the autoencoder, from the model built on the meta
device; (2) KV bytes per cached token; (3) per job, for refine / generate / edit at 512² and 1024²: the ViT
and latent tokens, the KV-pool slots its contexts take (shared prefixes stored once, as the planner lays
them out), the query rows of its CFG branches, and the units it costs against `token_budget` (what
`Engine.kv_tokens` returns: slots + 3 x (latents + 2)); (4) with `--measured`, the activation memory a
measured run left above weights and KV, per packed row. Without `--model`, text segments are sized at
`--chars-per-token` (an estimate: the real Qwen2 tokenizer is in the checkpoint directory, not here).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from engine.config import BagelConfig
from engine.contexts import plan_contexts
from engine.denoise import BRANCHES
from engine.kvcache import KVPool
from engine.requests import RequestLimits, context_token_counts, task_contexts, validate_request
from engine.sampler import guidance_at, schedule
from engine.tiny import preset
from engine.types import GenerationRequest, SamplingParams

PROMPT = "three red apples and a blue cup on a wooden table"
SIZES = (512, 1024)
TASKS = ("refine", "generate", "edit")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


class EstimatedTokenizer:
    """Token counts from text length alone (`chars_per_token`), with BAGEL's segment markers.

    Only for sizing without a checkpoint: text is < 2 % of a 1024² job's KV, so the estimate moves
    totals by a few tokens. Pass `--model` for exact counts.
    """

    bos_id, eos_id = 151644, 151645

    def __init__(self, chars_per_token: float) -> None:
        self.chars_per_token = chars_per_token

    def encode(self, text: str) -> list[int]:
        return [0] * math.ceil(len(text) / self.chars_per_token)


@dataclass
class JobSize:
    task: str
    side: int  # input side (refine, edit) and output side, pixels
    vit_tokens: int
    vae_context_tokens: int
    latents: int
    kv_slots: int  # KV-pool rows its contexts occupy
    query_rows: int  # rows of all three branches' query blocks
    budget_tokens: int  # what the job costs against token_budget (Engine.kv_tokens)
    kv_bytes: int
    rows_per_step: float  # packed rows it adds to a step, averaged over its steps at the task defaults


def job_size(task: str, side: int, cfg: BagelConfig, tok, kv_bytes_per_token: int) -> JobSize:
    """The footprint of one job of `task` at side x side, by the engine's own planner."""
    image = Image.new("RGB", (side, side)) if task in ("refine", "edit") else None
    req = validate_request(
        GenerationRequest(
            task, PROMPT, image, SamplingParams.for_task(task), seed=0, height=side, width=side
        ),
        cfg,
        tok,
        RequestLimits(),
    )
    vit, vae = context_token_counts(image.size, cfg) if image is not None else (0, 0)
    plan = plan_contexts(task_contexts(req, tok, vit, vae))
    d = cfg.latent_downsample
    n = (req.height // d) * (req.width // d)
    query = len(BRANCHES) * (n + 2)
    times, _ = schedule(req.params.steps, req.params.shift)
    branches = [
        1 + guidance_at(req.params, t).use_text_branch + guidance_at(req.params, t).use_img_branch
        for t in times
    ]
    return JobSize(
        task=task,
        side=side,
        vit_tokens=vit,
        vae_context_tokens=vae if task == "edit" else 0,
        latents=n,
        kv_slots=plan.total_slots,
        query_rows=query,
        budget_tokens=plan.total_slots + query,
        kv_bytes=plan.total_slots * kv_bytes_per_token,
        rows_per_step=sum(b * (n + 2) for b in branches) / len(branches),
    )


def grown_capacity(slots: int, start: int = 4096, jobs: int = 1) -> int:
    """Rows a growable KV pool (no `kv_capacity_tokens`) holds after `jobs` allocations of `slots` rows into an
    empty pool of `start` rows: the real `KVPool` on the meta device (it grows when full, never shrinks)."""
    pool = KVPool(1, 1, 1, torch.bfloat16, "meta", capacity=start)
    for _ in range(jobs):
        pool.allocate(slots)
    return pool.capacity


def parameter_counts(cfg: BagelConfig) -> tuple[int, int]:
    """(parameters of one BAGEL weight set, parameters of the autoencoder), from meta-device modules."""
    from engine.model.bagel import Bagel
    from engine.model.vae import AutoEncoder

    with torch.device("meta"):
        bagel = sum(t.numel() for t in Bagel(cfg).state_dict().values())
        vae = sum(t.numel() for t in AutoEncoder(cfg.vae).state_dict().values())
    return bagel, vae


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the bagel-7b preset shapes)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="weights and KV dtype")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="square sides in pixels")
    ap.add_argument("--chars-per-token", type=float, default=4.0, help="text estimate without --model")
    ap.add_argument("--measured", type=Path, help="a bench/engine_refine.py JSON (1 refine, peak memory)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)

    if args.model is not None:
        from engine.checkpoint import read_config
        from engine.tokenizer import Tokenizer

        cfg, tok, text = (
            read_config(args.model),
            Tokenizer.from_dir(args.model),
            "tokenizer of the checkpoint",
        )
    else:
        cfg = preset("bagel-7b")
        tok, text = (
            EstimatedTokenizer(args.chars_per_token),
            f"estimated at {args.chars_per_token} chars/token",
        )
    width = DTYPE_BYTES[args.dtype]
    llm = cfg.llm
    kv_per_token = llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.head_dim * width
    bagel, vae = parameter_counts(cfg)
    jobs = [job_size(task, side, cfg, tok, kv_per_token) for side in args.sizes for task in TASKS]

    gib = 2**30
    print(f"# Sizing: {args.model or 'bagel-7b preset'}, {args.dtype}, text {text}\n")
    print(
        f"- one weight set: {bagel:,} parameters = {bagel * width / gib:.2f} GiB ({bagel * width / 1e9:.2f} GB)"
    )
    print(f"- both weight sets (ema + rvr): {2 * bagel * width / gib:.2f} GiB")
    print(f"- autoencoder: {vae:,} parameters = {vae * width / gib:.2f} GiB (one copy, shared)")
    print(
        f"- KV per cached token: {llm.num_hidden_layers} layers x 2 x {llm.num_key_value_heads} heads x "
        f"{llm.head_dim} x {width} B = {kv_per_token:,} B ({kv_per_token / 1024:.0f} KiB)\n"
    )
    print(
        "| job | ViT tokens | latents | KV slots | KV memory | query rows | token_budget units | rows/step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for j in jobs:
        print(
            f"| {j.task} {j.side}² | {j.vit_tokens:,} | {j.latents:,} | {j.kv_slots:,} | "
            f"{j.kv_bytes / 2**20:,.0f} MiB | {j.query_rows:,} | {j.budget_tokens:,} | {j.rows_per_step:,.0f} |"
        )
    result: dict = {
        "model": str(args.model or "bagel-7b preset"),
        "dtype": args.dtype,
        "text_tokens": text,
        "params_per_weight_set": bagel,
        "params_autoencoder": vae,
        "kv_bytes_per_token": kv_per_token,
        "jobs": [vars(j) for j in jobs],
    }
    if args.measured is not None:
        m = json.loads(args.measured.read_text())
        n_jobs, sets = m.get("jobs", 1), m.get("weight_sets", 1)
        job = job_size("refine", m["size"], cfg, tok, kv_per_token)
        weights = (sets * bagel + vae) * width / gib
        rows_cap = grown_capacity(job.kv_slots, jobs=n_jobs)  # the refines' pool grew during the warm-up run
        pool = (
            (rows_cap + (sets - 1) * 4096) * kv_per_token / gib
        )  # an unused second set keeps its first 4096
        left = m["peak_gpu_mem_gb"] - weights - pool
        per_row = left * gib / (n_jobs * job.query_rows)
        print(
            f"\nMeasured ({m['device']}, {m['date']}, {n_jobs} refine(s) {m['size']}², {sets} weight set(s), peak "
            f"allocated after warm-up): {m['peak_gpu_mem_gb']:.2f} GiB = weights {weights:.2f} + KV pools "
            f"{pool:.2f} ({rows_cap:,} rows) + activations {left:.2f} GiB ({per_row / 2**20:.2f} MiB per packed "
            f"query row at {n_jobs * job.query_rows:,} rows)"
        )
        result["measured"] = {
            "file": str(args.measured),
            "peak_gib": m["peak_gpu_mem_gb"],
            "kv_pool_gib": pool,
            "activations_gib": left,
            "bytes_per_row": per_row,
        }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
