"""The RvR training loop (rvr.md §2.4): AdamW, warm-up, gradient clipping, EMA, resumable checkpoints.

Checkpoints are engine checkpoint directories: configs, tokenizer, `ae.safetensors` and the EMA weights
under the stage's file name (`ema.safetensors` for the base/T2I stage, `rvr.safetensors` for RvR), so a
run's output loads straight into `load_engine`. Weight files of the initial checkpoint that the run does
not train are carried over (an RvR run keeps the base `ema.safetensors`). `train_state/` beside them
holds what resuming needs: raw weights, the float32 EMA, the optimizer and scheduler, the step.

Data and noise are drawn from (seed, step), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine.checkpoint import WEIGHT_FILES, load_bagel, load_vae, read_config, save_checkpoint, weight_files
from engine.model.bagel import Bagel
from engine.prompts import REFINE_SYSTEM_PROMPT, REFINE_SYSTEM_PROMPT_TRAIN
from engine.tokenizer import Tokenizer
from engine.train.forward import forward, losses
from engine.train.packing import PackedBatch, pack
from engine.train.samples import ImageEncoder, Mixture, MixtureConfig

SYSTEM_PROMPTS = {"inference": REFINE_SYSTEM_PROMPT, "train": REFINE_SYSTEM_PROMPT_TRAIN}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
STATE_DIR = "train_state"


@dataclass
class TrainConfig:
    """Defaults are the release's (rvr.md §2.4); small runs shorten warm-up and EMA."""

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
    # "inference": the 187-char prompt the engine (and the released app) uses at refine time, so a model
    # trained here matches serving; "train": the release's 157-char training variant (rvr.md §5.2).
    system_prompt: str = "inference"
    # 7B-scale memory savers: recompute LLM layers in backward; run the forward under bfloat16 autocast
    # (weights, gradients, optimizer state and EMA stay float32)
    gradient_checkpointing: bool = False
    autocast_bf16: bool = False


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
    def __init__(self, model: Bagel, cfg: TrainConfig) -> None:
        self.model, self.cfg = model.train(), cfg
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

    def train_step(self, batch: PackedBatch) -> dict[str, float]:
        t0 = time.perf_counter()
        with torch.autocast(self.device_type, torch.bfloat16, enabled=self.cfg.autocast_bf16):
            out = forward(self.model, batch)
        loss = losses(out, self.cfg.mse_weight, self.cfg.ce_weight)
        self.opt.zero_grad(set_to_none=True)
        loss.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self._update_ema()
        self.step += 1
        dt = time.perf_counter() - t0
        return {
            "loss": float(loss.total.detach()),
            "mse": float(loss.mse),
            "ce": float(loss.ce),
            "grad_norm": float(grad_norm),
            "lr": self.sched.get_last_lr()[0],
            "rows_per_s": batch.num_rows / dt,
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
        """The model's state dict with trained parameters replaced by their EMA."""
        return {k: self.ema.get(k, v) for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ checkpoints

    def save(self, out_dir: str | Path, init_dir: str | Path, vae_state: dict[str, torch.Tensor]) -> Path:
        """Write an engine checkpoint (EMA weights) plus the resume state."""
        out, init = Path(out_dir), Path(init_dir)
        dtype = getattr(torch, self.cfg.save_dtype)
        out.mkdir(parents=True, exist_ok=True)
        for name, path in weight_files(init).items():
            if name != self.cfg.weights_name and out.resolve() != init.resolve():
                shutil.copyfile(path, out / path.name)
        for f in TOKENIZER_FILES:
            if (init / f).is_file() and out.resolve() != init.resolve():
                shutil.copyfile(init / f, out / f)
        save_checkpoint(
            out, self.model.config, {self.cfg.weights_name: self.ema_state_dict()}, vae_state, dtype
        )
        state = out / STATE_DIR
        state.mkdir(exist_ok=True)
        raw = {k: v.detach().float().contiguous() for k, v in self.model.state_dict().items()}
        save_file(raw, str(state / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in self.ema.items()}, str(state / "ema_fp32.safetensors"))
        torch.save({"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}, state / "optimizer.pt")
        (state / "state.json").write_text(
            json.dumps({"step": self.step, "config": asdict(self.cfg)}, indent=2)
        )
        return out

    def load_state(self, out_dir: str | Path) -> bool:
        """Resume from `out_dir/train_state` if present; returns whether it did."""
        state = Path(out_dir) / STATE_DIR
        if not (state / "state.json").is_file():
            return False
        raw = load_file(str(state / "model.safetensors"))
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(raw[k].to(v.dtype))
        self.ema = {k: v for k, v in load_file(str(state / "ema_fp32.safetensors")).items()}
        opt = torch.load(state / "optimizer.pt", weights_only=True)
        self.opt.load_state_dict(opt["opt"])
        self.sched.load_state_dict(opt["sched"])
        self.step = json.loads((state / "state.json").read_text())["step"]
        return True


def load_for_training(model_dir: str | Path, init_weights: str = "ema", device: str = "cpu"):
    """(model in float32 with trainable parameters, frozen VAE, tokenizer, config) from a checkpoint dir."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    files = weight_files(model_dir)
    if init_weights not in files:
        raise FileNotFoundError(f"{model_dir} has no {WEIGHT_FILES[init_weights]}")
    dev = torch.device(device)
    model = load_bagel(files[init_weights], cfg, dev, torch.float32)
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
    model, vae, tok, mcfg = load_for_training(model_dir, cfg.init_weights, device)
    trainer = Trainer(model, cfg)
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
        ),
    )
    vae_state = vae.state_dict()
    history: list[dict[str, float]] = []
    bar = tqdm(range(trainer.step, cfg.steps), initial=trainer.step, total=cfg.steps, disable=not progress)
    for step in bar:
        samples = mix.batch(cfg.seed, step, cfg.max_rows, cfg.min_samples)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        batch = pack(samples, tok.vision_start_id, tok.vision_end_id, gen, cfg.timestep_shift)
        m = trainer.train_step(batch)
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
