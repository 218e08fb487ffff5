"""Training a small FLUX-architecture autoencoder on the synthetic world (the engine's `AutoEncoder`).

Loss: L1 + MSE reconstruction of the posterior sample, plus a small KL to N(0, I), as a KL-VAE without the
adversarial and perceptual terms (flat-colour renders do not need them). After training, the latent
scale/shift factors are set from the data so that scaled latents have zero mean and unit variance, which
is what the flow model's noise assumes (FLUX's 0.3611 / 0.1159 play that role for the real VAE); they are
stored through the config's `vae_scale_factor` / `vae_shift_factor` extension keys.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.config import VAEConfig
from engine.model.vae import AutoEncoder
from engine.preprocess import to_tensor
from training.prompts import random_scene
from training.world import DEFAULT_SIZE, color_cast, random_cast, render


@dataclass
class AETrainConfig:
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    kl_weight: float = 1e-6
    image_size: int = DEFAULT_SIZE
    seed: int = 0
    grad_clip: float = 1.0
    stats_images: int = 64  # renders used to set the latent scale/shift
    cast: float = 0.0  # > 0: every render under a random colour cast of this strength (world.random_cast)


def world_batch(rng: np.random.Generator, n: int, size: int, cast: float = 0.0) -> torch.Tensor:
    """(n, 3, size, size) renders of random scenes in [-1, 1], each under its own colour cast if `cast` > 0."""

    def one():
        img = render(random_scene(rng), size, rng, jitter=1.0)
        return color_cast(img, random_cast(rng, cast)) if cast > 0 else img

    return torch.stack([to_tensor(one()) for _ in range(n)])


def ae_losses(ae: AutoEncoder, x: torch.Tensor, generator: torch.Generator, kl_weight: float):
    # x: (B, 3, H, W) -> reconstruction of a posterior sample (unscaled latent space)
    mean, logvar = ae.encoder(x).chunk(2, dim=1)  # (B, z, H/8, W/8) each
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    rec = ae.decoder(z)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
    return rec_loss + kl_weight * kl, rec_loss.detach(), kl.detach()


@torch.no_grad()
def latent_stats(
    ae: AutoEncoder, rng: np.random.Generator, n: int = 64, size: int = DEFAULT_SIZE, cast: float = 0.0
):
    """(scale, shift) with scale·(mean − shift) of zero mean and unit std over world renders."""
    mean, _ = ae.encoder(world_batch(rng, n, size, cast)).chunk(2, dim=1)
    shift = float(mean.mean())
    return 1.0 / float(mean.std()), shift


def train_autoencoder(
    vae_cfg: VAEConfig, cfg: AETrainConfig, progress: bool = True
) -> tuple[AutoEncoder, list[float]]:
    """Train from scratch; returns the autoencoder (config with data scale/shift) and the loss history."""
    torch.manual_seed(cfg.seed)
    ae = AutoEncoder(vae_cfg).train()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    hist = []
    bar = tqdm(range(cfg.steps), disable=not progress, desc="autoencoder")
    for _ in bar:
        t0 = time.perf_counter()
        x = world_batch(rng, cfg.batch_size, cfg.image_size, cfg.cast)
        loss, rec, kl = ae_losses(ae, x, gen, cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), cfg.grad_clip)
        opt.step()
        hist.append(float(rec))
        bar.set_postfix(
            rec=f"{float(rec):.4f}",
            kl=f"{float(kl):.2f}",
            img_s=f"{cfg.batch_size / (time.perf_counter() - t0):.1f}",
        )
    ae.eval()
    scale, shift = latent_stats(ae, rng, cfg.stats_images, cfg.image_size, cfg.cast)
    out = AutoEncoder(replace(vae_cfg, scale_factor=scale, shift_factor=shift))
    out.load_state_dict(ae.state_dict())
    return out.eval(), hist
