"""The RvR training loop (docs/training.md §5): AdamW, warm-up, clipping, EMA, resumable checkpoints.

Checkpoints are engine checkpoint directories: configs, tokenizer, `ae.safetensors` and the EMA weights
under the stage's file name (`ema.safetensors` for the base/T2I stage, `rvr.safetensors` for RvR), so a
run's output loads straight into `load_engine`. Weight files of the initial checkpoint that the run does
not train are carried over (an RvR run keeps the base `ema.safetensors`). `train_state/` beside them
holds what resuming needs: raw weights, the float32 EMA, the optimizer and scheduler, the step.

Data and noise are drawn from (seed, step), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from engine.checkpoint import WEIGHT_FILES, load_bagel, load_vae, read_config, save_checkpoint, weight_files
from engine.model.bagel import Bagel
from engine.prompts import REFINE_SYSTEM_PROMPT, REFINE_SYSTEM_PROMPT_TRAIN
from engine.tokenizer import Tokenizer
from training.dataset import read_records
from training.distributed import DistEnv, full_tensor, init_from_env, like, load_sharded, mesh_for
from training.forward import TrainForward, losses
from training.packing import PackedBatch, pack
from training.samples import ImageEncoder, Mixture, MixtureConfig

SYSTEM_PROMPTS = {"inference": REFINE_SYSTEM_PROMPT, "train": REFINE_SYSTEM_PROMPT_TRAIN}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
STATE_DIR = "train_state"
# optimizer state as whole tensors keyed by parameter name, whatever the sharding it was saved under
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
# AdamW keeps no state for a parameter that never had a gradient (a T2I-only mixture leaves the text expert's
# last layers without one), so the saved state may lack it; it gets none on resume either, as it had none
RESUME_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)


@dataclass
class TrainConfig:
    """Defaults are the release's (docs/training.md §5); small runs shorten warm-up and EMA."""

    steps: int = 1000
    lr: float = 1e-4
    warmup_steps: int = 2500
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    # decay min(ema_decay, (1 + step) / (10 + step)): lets the EMA follow a model trained from scratch in a
    # short run; the release fine-tunes a trained model with a constant 0.9999 (off).
    ema_warmup: bool = False
    timestep_shift: float = 4.0
    mse_weight: float = 1.0
    ce_weight: float = 0.25
    max_rows: int = 40000  # packed rows per step (expected_num_tokens)
    min_samples: int = 1
    save_every: int = 1000
    seed: int = 0
    init_weights: str = "ema"  # weight file of the initial checkpoint to start from ("ema" or "rvr")
    weights_name: str = "rvr"  # weight file the trained EMA is written to
    save_dtype: str = "float32"  # "bfloat16" halves the shipped size
    freeze_vit: bool = False
    freeze_llm: bool = False
    mixture: dict[str, float] = field(default_factory=lambda: {"rvr": 2.0, "und": 1.0, "t2i": 1.0})
    text_dropout: float = 0.1
    refine_prompt_dropout: float = 0.0
    refine_image_dropout: float = 0.0
    refine_pair_cast: float = 0.0  # colour-cast strength shared by a refine pair (MixtureConfig)
    image_cast: float = 0.0  # colour-cast strength of each t2i / und image (MixtureConfig)
    edit_text_dropout: float = 0.1  # edit samples: instruction dropped (cfg_text branch)
    edit_image_dropout: float = 0.1  # edit samples: both source images dropped (cfg_img branch)
    # "inference": the 187-char prompt the engine (and the released app) uses at refine time, so a model
    # trained here matches serving; "train": the release's 157-char training variant (docs/rvr.md §2).
    system_prompt: str = "inference"
    # 7B-scale memory savers: recompute LLM layers in backward; run the forward under bfloat16 autocast
    # (weights, gradients, optimizer state and EMA stay float32)
    gradient_checkpointing: bool = False
    autocast_bf16: bool = False
    grad_accum: int = 1  # packed batches of max_rows per step and rank, losses averaged


def trainable_names(model: Bagel, cfg: TrainConfig) -> list[str]:
    """Everything but the frozen sin-cos position tables (and the ViT or LLM when frozen)."""
    names = []
    for name, _ in model.named_parameters():
        if name.endswith("pos_embed.pos_embed"):
            continue
        if cfg.freeze_vit and name.startswith("vit_model."):
            continue
        if cfg.freeze_llm and name.startswith("language_model."):
            continue
        names.append(name)
    return names


class Trainer:
    """One optimisation step at a time. `root` is the module whose call runs the training forward: the
    FSDP root when the model is sharded (`distributed.load_sharded`), else a plain `TrainForward`."""

    def __init__(self, model: Bagel, cfg: TrainConfig, root: nn.Module | None = None) -> None:
        self.model, self.cfg = model.train(), cfg
        self.root = (root or TrainForward(model)).train()
        self.env = DistEnv.current()
        train = set(trainable_names(model, cfg))
        params = []
        for name, p in model.named_parameters():
            p.requires_grad_(name in train)
            if name in train:
                params.append(p)
        self.params = params
        self.opt = torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        warm = max(cfg.warmup_steps, 1)
        # constant schedule after a linear warm-up (the release's `constant` with 2500 warm-up steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        self.ema = {n: p.detach().float().clone() for n, p in model.named_parameters() if n in train}
        self.step = 0
        model.language_model.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.device_type = next(model.parameters()).device.type

    def train_step(self, batch: PackedBatch | Sequence[PackedBatch]) -> dict[str, float]:
        """One optimiser step on a packed batch, or on the mean loss of several (gradient accumulation)."""
        t0 = time.perf_counter()
        micro = [batch] if isinstance(batch, PackedBatch) else list(batch)
        self.opt.zero_grad(set_to_none=True)
        parts = []
        for b in micro:
            with torch.autocast(self.device_type, torch.bfloat16, enabled=self.cfg.autocast_bf16):
                out = self.root(b)
            loss = losses(out, self.cfg.mse_weight, self.cfg.ce_weight)
            (loss.total / len(micro)).backward()
            parts.append(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self._update_ema()
        self.step += 1
        dt = time.perf_counter() - t0
        return {
            "loss": sum(float(p.total.detach()) for p in parts) / len(parts),
            "mse": sum(float(p.mse) for p in parts) / len(parts),
            "ce": sum(float(p.ce) for p in parts) / len(parts),
            "grad_norm": float(full_tensor(grad_norm)),
            "lr": self.sched.get_last_lr()[0],
            "rows_per_s": sum(b.num_rows for b in micro) / dt,
        }

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.cfg.ema_decay
        if self.cfg.ema_warmup:
            d = min(d, (1 + self.step) / (10 + self.step))
        for n, p in self.model.named_parameters():
            if n in self.ema:
                self.ema[n].mul_(d).add_(p.detach().float(), alpha=1 - d)

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state dict with trained parameters replaced by their EMA (gathered when sharded:
        every rank must call it)."""
        return {k: full_tensor(self.ema.get(k, v)) for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ checkpoints

    def save(self, out_dir: str | Path, init_dir: str | Path, vae_state: dict[str, torch.Tensor]) -> Path:
        """Write an engine checkpoint (EMA weights) plus the resume state. Sharded, every rank gathers and
        only rank 0 writes."""
        out, init = Path(out_dir), Path(init_dir)
        dtype = getattr(torch, self.cfg.save_dtype)
        # each sharded tensor is gathered once: the raw weights, and the EMA of the trained ones
        raw = {
            k: full_tensor(v).detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()
        }
        ema_fp32 = {k: full_tensor(v).cpu().contiguous() for k, v in self.ema.items()}
        ema = {k: ema_fp32.get(k, v) for k, v in raw.items()}
        opt = get_optimizer_state_dict(self.root, self.opt, options=FULL_STATE)
        if not self.env.main:
            dist.barrier()
            return out
        out.mkdir(parents=True, exist_ok=True)
        for name, path in weight_files(init).items():
            if name != self.cfg.weights_name and out.resolve() != init.resolve():
                shutil.copyfile(path, out / path.name)
        for f in TOKENIZER_FILES:
            if (init / f).is_file() and out.resolve() != init.resolve():
                shutil.copyfile(init / f, out / f)
        save_checkpoint(out, self.model.config, {self.cfg.weights_name: ema}, vae_state, dtype)
        state = out / STATE_DIR
        state.mkdir(exist_ok=True)
        save_file(raw, str(state / "model.safetensors"))
        save_file(ema_fp32, str(state / "ema_fp32.safetensors"))
        torch.save({"opt": opt, "sched": self.sched.state_dict()}, state / "optimizer.pt")
        (state / "state.json").write_text(
            json.dumps({"step": self.step, "config": asdict(self.cfg)}, indent=2)
        )
        if self.env.sharded:
            dist.barrier()
        return out

    def load_state(self, out_dir: str | Path) -> bool:
        """Resume from `out_dir/train_state` if present; returns whether it did."""
        state = Path(out_dir) / STATE_DIR
        if not (state / "state.json").is_file():
            return False
        raw = load_file(str(state / "model.safetensors"))
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(like(raw[k].to(v.dtype), v))
        params = dict(self.model.named_parameters())
        ema = load_file(str(state / "ema_fp32.safetensors"))
        self.ema = {k: like(v, params[k]) for k, v in ema.items()}
        opt = torch.load(state / "optimizer.pt", weights_only=True)
        set_optimizer_state_dict(self.root, self.opt, opt["opt"], options=RESUME_STATE)
        self.sched.load_state_dict(opt["sched"])
        self.step = json.loads((state / "state.json").read_text())["step"]
        return True


def weights_path(model_dir: Path, init_weights: str) -> Path:
    files = weight_files(model_dir)
    if init_weights not in files:
        raise FileNotFoundError(f"{model_dir} has no {WEIGHT_FILES[init_weights]}")
    return files[init_weights]


def load_for_training(model_dir: str | Path, init_weights: str = "ema", device: str = "cpu"):
    """(model in float32 with trainable parameters, frozen VAE, tokenizer, config) from a checkpoint dir."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    dev = torch.device(device)
    model = load_bagel(weights_path(model_dir, init_weights), cfg, dev, torch.float32)
    vae = load_vae(model_dir, cfg, dev, torch.float32)
    vae.requires_grad_(False)
    return model, vae, Tokenizer.from_dir(model_dir), cfg


def train(
    model_dir: str | Path,
    data_root: str | Path,
    records: dict[str, Sequence[dict]],
    out_dir: str | Path,
    cfg: TrainConfig,
    resume: bool = True,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[Trainer, list[dict[str, float]]]:
    """Train from checkpoint `model_dir` on `records` ({"rvr"|"t2i"|"und": records}) into `out_dir`.

    Returns the trainer and the per-step metrics of this invocation."""
    env, device = init_from_env(device)
    if env.sharded:
        model_dir = Path(model_dir)
        mcfg = read_config(model_dir)
        root = load_sharded(
            weights_path(model_dir, cfg.init_weights), mcfg, device, mesh_for(device), TrainForward
        )
        model = root.model
        vae = load_vae(model_dir, mcfg, torch.device(device), torch.float32).requires_grad_(False)
        tok = Tokenizer.from_dir(model_dir)
    else:
        model, vae, tok, mcfg = load_for_training(model_dir, cfg.init_weights, device)
        root = None
    trainer = Trainer(model, cfg, root)
    if resume:
        trainer.load_state(out_dir)
    mix = Mixture(
        tok,
        ImageEncoder(mcfg, vae),
        data_root,
        records,
        MixtureConfig(
            cfg.mixture,
            cfg.text_dropout,
            cfg.refine_prompt_dropout,
            cfg.refine_image_dropout,
            SYSTEM_PROMPTS[cfg.system_prompt],
            cfg.refine_pair_cast,
            cfg.image_cast,
            cfg.edit_text_dropout,
            cfg.edit_image_dropout,
        ),
    )
    vae_state = vae.state_dict()
    history: list[dict[str, float]] = []
    bar = tqdm(
        range(trainer.step, cfg.steps),
        initial=trainer.step,
        total=cfg.steps,
        disable=not progress or not env.main,
    )
    # Every micro-batch of every rank is its own draw; one process without accumulation keeps shard None.
    shards = [env.rank * cfg.grad_accum + i for i in range(cfg.grad_accum)]
    split = env.sharded or cfg.grad_accum > 1
    for step in bar:
        batches = []
        for shard in shards:
            samples = mix.batch(cfg.seed, step, cfg.max_rows, cfg.min_samples, shard if split else None)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + (shard << 40))
            batches.append(pack(samples, tok.vision_start_id, tok.vision_end_id, gen, cfg.timestep_shift))
        m = trainer.train_step(batches)
        history.append(m)
        bar.set_postfix(
            loss=f"{m['loss']:.4f}",
            mse=f"{m['mse']:.4f}",
            ce=f"{m['ce']:.3f}",
            tok_s=f"{m['rows_per_s']:.0f}",
        )
        if trainer.step % cfg.save_every == 0 or trainer.step == cfg.steps:
            trainer.save(out_dir, model_dir, vae_state)
    if not history and not (Path(out_dir) / STATE_DIR).is_dir():
        trainer.save(out_dir, model_dir, vae_state)
    return trainer, history


RECORD_GROUPS = ("rvr", "t2i", "und", "edit")


def _mixture(text: str) -> dict[str, float]:
    """ "rvr=2,und=1,t2i=1" -> {"rvr": 2.0, "und": 1.0, "t2i": 1.0}"""
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in RECORD_GROUPS or not weight:
            raise argparse.ArgumentTypeError(f"bad mixture entry {part!r} (use rvr=W,und=W,t2i=W,edit=W)")
        out[name] = float(weight)
    return out


def main(argv: list[str] | None = None) -> None:
    """Fine-tune a checkpoint on release-format records; under `torchrun` the model is sharded over ranks:

    torchrun --nproc-per-node 8 -m training.trainer --model BAGEL-7B-MoT --data-root data \\
        --rvr data/rvr/json/parquet_info.json --out runs/rvr --device cuda --bf16 --gradient-checkpointing
    """
    d = TrainConfig()
    ap = argparse.ArgumentParser(
        description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="engine checkpoint directory to start from")
    ap.add_argument(
        "--out", required=True, help="output checkpoint directory (resumes if it has a train state)"
    )
    ap.add_argument("--data-root", required=True, help="image paths in records are relative to this")
    ap.add_argument("--rvr", help="refine records: parquet, jsonl, parquet_info.json or a directory")
    ap.add_argument("--t2i", help="text-to-image records (image_list = [image], user_prompt)")
    ap.add_argument("--und", help="understanding records (image, question, answer)")
    ap.add_argument("--edit", help="edit records (image_list = [source, edited], instruction)")
    ap.add_argument(
        "--mixture", type=_mixture, default=d.mixture, help="group weights, e.g. rvr=2,und=1,t2i=1"
    )
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    ap.add_argument("--adam-eps", type=float, default=d.eps)
    ap.add_argument("--max-rows", type=int, default=d.max_rows, help="packed rows per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step and rank")
    ap.add_argument("--ema-decay", type=float, default=d.ema_decay)
    ap.add_argument("--save-every", type=int, default=d.save_every)
    ap.add_argument("--save-dtype", default=d.save_dtype, choices=("float32", "bfloat16"))
    ap.add_argument("--init-weights", default=d.init_weights, choices=("ema", "rvr"))
    ap.add_argument("--weights-name", default=d.weights_name, choices=("ema", "rvr"))
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument(
        "--refine-pair-cast",
        type=float,
        default=d.refine_pair_cast,
        help="colour-cast strength shared by both images of a refine pair (0: none)",
    )
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (float32 master weights)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (each torchrun rank takes cuda:LOCAL_RANK)")
    a = ap.parse_args(argv)
    records = {k: read_records(getattr(a, k)) for k in RECORD_GROUPS if getattr(a, k)}
    if not any(records.get(k) and a.mixture.get(k, 0) > 0 for k in records):
        ap.error(
            "no records for any group with a positive mixture weight (pass --rvr, --t2i, --und or --edit)"
        )
    cfg = TrainConfig(
        steps=a.steps,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        eps=a.adam_eps,
        max_rows=a.max_rows,
        grad_accum=a.grad_accum,
        ema_decay=a.ema_decay,
        save_every=a.save_every,
        save_dtype=a.save_dtype,
        init_weights=a.init_weights,
        weights_name=a.weights_name,
        seed=a.seed,
        mixture=a.mixture,
        gradient_checkpointing=a.gradient_checkpointing,
        autocast_bf16=a.bf16,
        refine_pair_cast=a.refine_pair_cast,
    )
    try:
        train(a.model, a.data_root, records, a.out, cfg, device=a.device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
