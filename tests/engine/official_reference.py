"""An independent float64 re-implementation of BAGEL/RvR inference in the *official* code's structure.

It follows `InterleaveInferencer.interleave_inference` / `Bagel.generate_image` as the specs describe them:
every text segment and image block is its own prefill call (text causal, bottom-right aligned; image blocks
bidirectional at one RoPE position), CFG contexts are deep copies, every CFG branch is its own forward,
experts are routed with index lists (`packed_text_indexes` / `packed_vae_token_indexes`), merged K/V are
built by concatenation, and the guidance code mirrors `_forward_flow`. It shares only the *weights* (and
the already-validated ViT/VAE modules and preprocessing) with the engine, none of its forward code.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from engine.model.bagel import Bagel
from engine.preprocess import latent_position_ids, patchify_latent, patchify_vit, to_tensor
from engine.prompts import REFINE_PROMPT, REFINE_SYSTEM_PROMPT
from engine.requests import context_image

F64 = torch.float64


@dataclass
class Ctx:
    kv_len: int = 0
    rope: int = 0
    keys: list = field(default_factory=list)  # per layer (L, Hkv, D)
    values: list = field(default_factory=list)


class Reference:
    def __init__(self, engine, weights: str) -> None:
        self.engine = engine
        # The weights by their checkpoint names, in the official module layout (the engine's own modules
        # may be restructured, e.g. concatenated projections).
        served = engine.weight_sets[weights].model
        self.model = Bagel(served.config).to(served.vae2llm.weight.dtype)
        self.model.load_state_dict(served.state_dict())
        self.model.eval()
        self.cfg = engine.cfg
        self.tok = engine.tokenizer
        c = self.cfg.llm
        self.hq, self.hkv, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps, self.theta = c.rms_norm_eps, c.rope_theta
        self.layers = self.model.language_model.model.layers

    # -- primitives, written from the spec
    def w(self, module):
        return module.weight.detach().to(F64)

    def lin(self, module, x):
        y = x @ self.w(module).T
        return y + module.bias.detach().to(F64) if module.bias is not None else y

    def rms(self, module, x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.w(module)

    def rope(self, x, pos):
        # x: (L, H, D); rotate-half RoPE
        inv = 1.0 / (self.theta ** (torch.arange(0, self.d, 2, dtype=F64) / self.d))
        f = pos.to(F64)[:, None] * inv[None]
        emb = torch.cat([f, f], -1)[:, None]
        x1, x2 = x[..., : self.d // 2], x[..., self.d // 2 :]
        return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()

    def attend(self, q, k, v, causal):
        # q: (Lq, Hq, D), k/v: (Lk, Hkv, D) merged [cache ; new]; flash-attn semantics (bottom-right causal)
        lq, lk, g = q.shape[0], k.shape[0], self.hq // self.hkv
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(self.d)
        if causal:
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            s = s.masked_fill(~allowed[None], float("-inf"))
        return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)

    # -- one official-style forward: und or gen mode, over the query rows of ONE sample
    def forward(self, ctx: Ctx, x, pos, gen_idx, causal, update_cache):
        """x: (L, hidden) float64; gen_idx: indexes of latent rows (gen expert), the rest use und weights."""
        n = x.shape[0]
        und_idx = torch.tensor([i for i in range(n) if i not in set(gen_idx)], dtype=torch.long)
        gen_idx = torch.tensor(gen_idx, dtype=torch.long)
        new_keys, new_values = [], []
        for li, layer in enumerate(self.layers):
            a = layer.self_attn
            h = torch.zeros_like(x)
            h[und_idx] = self.rms(layer.input_layernorm, x[und_idx])
            h[gen_idx] = self.rms(layer.input_layernorm_moe_gen, x[gen_idx])
            q = torch.zeros(n, self.hq * self.d, dtype=F64)
            k = torch.zeros(n, self.hkv * self.d, dtype=F64)
            v = torch.zeros(n, self.hkv * self.d, dtype=F64)
            for idx, qp, kp, vp in (
                (und_idx, a.q_proj, a.k_proj, a.v_proj),
                (gen_idx, a.q_proj_moe_gen, a.k_proj_moe_gen, a.v_proj_moe_gen),
            ):
                q[idx], k[idx], v[idx] = self.lin(qp, h[idx]), self.lin(kp, h[idx]), self.lin(vp, h[idx])
            q, k, v = q.view(n, self.hq, self.d), k.view(n, self.hkv, self.d), v.view(n, self.hkv, self.d)
            q[und_idx], k[und_idx] = self.rms(a.q_norm, q[und_idx]), self.rms(a.k_norm, k[und_idx])
            q[gen_idx], k[gen_idx] = (
                self.rms(a.q_norm_moe_gen, q[gen_idx]),
                self.rms(a.k_norm_moe_gen, k[gen_idx]),
            )
            q, k = self.rope(q, pos), self.rope(k, pos)
            ck = ctx.keys[li] if ctx.keys else k[:0]
            cv = ctx.values[li] if ctx.values else v[:0]
            o = self.attend(q, torch.cat([ck, k]), torch.cat([cv, v]), causal).reshape(n, -1)
            new_keys.append(k)
            new_values.append(v)
            out = torch.zeros_like(x)
            out[und_idx] = self.lin(a.o_proj, o[und_idx])
            out[gen_idx] = self.lin(a.o_proj_moe_gen, o[gen_idx])
            x = x + out
            h = torch.zeros_like(x)
            h[und_idx] = self.rms(layer.post_attention_layernorm, x[und_idx])
            h[gen_idx] = self.rms(layer.post_attention_layernorm_moe_gen, x[gen_idx])
            m = torch.zeros_like(x)
            for idx, mlp in ((und_idx, layer.mlp), (gen_idx, layer.mlp_moe_gen)):
                hh = h[idx]
                m[idx] = self.lin(
                    mlp.down_proj,
                    torch.nn.functional.silu(self.lin(mlp.gate_proj, hh)) * self.lin(mlp.up_proj, hh),
                )
            x = x + m
        if update_cache:
            for li in range(len(self.layers)):
                if ctx.keys:
                    ctx.keys[li] = torch.cat([ctx.keys[li], new_keys[li]])
                    ctx.values[li] = torch.cat([ctx.values[li], new_values[li]])
            if not ctx.keys:
                ctx.keys, ctx.values = new_keys, new_values
        fin = torch.zeros_like(x)
        lm = self.model.language_model.model
        fin[und_idx] = self.rms(lm.norm, x[und_idx])
        fin[gen_idx] = self.rms(lm.norm_moe_gen, x[gen_idx])
        return fin

    def embed(self, ids):
        return self.model.language_model.model.embed_tokens.weight.detach().to(F64)[torch.tensor(ids)]

    def timestep(self, t, n):
        te = self.model.time_embedder
        half = te.frequency_size // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, dtype=F64) / half)
        args = torch.full((n,), float(t), dtype=F64)[:, None] * f[None]
        e = torch.cat([torch.cos(args), torch.sin(args)], -1)
        return self.lin(te.mlp[2], torch.nn.functional.silu(self.lin(te.mlp[0], e)))

    def latent_rows(self, x, t, ids):
        pe = self.model.latent_pos_embed.pos_embed.detach().to(F64)
        return self.lin(self.model.vae2llm, x.to(F64)) + self.timestep(t, x.shape[0]) + pe[ids]

    # -- context updates (update_context_text / update_context_image)
    def update_text(self, ctx: Ctx, text: str) -> None:
        ids = [self.tok.bos_id, *self.tok.encode(text), self.tok.eos_id]
        pos = torch.arange(ctx.rope, ctx.rope + len(ids))
        self.forward(ctx, self.embed(ids), pos, [], causal=True, update_cache=True)
        ctx.kv_len += len(ids)
        ctx.rope += len(ids)

    def markers(self):
        return self.embed([self.tok.vision_start_id, self.tok.vision_end_id])

    def update_vit(self, ctx: Ctx, image) -> None:
        ci = context_image(image, self.cfg)
        patches, ids, _ = patchify_vit(
            to_tensor(ci.vit_image), self.cfg.vit.patch_size, self.cfg.vit_max_num_patch_per_side
        )
        m = self.model
        with torch.no_grad():
            feats = m.vit_model(patches.to(m.connector.fc1.weight.dtype), ids, [0, patches.shape[0]]).to(F64)
        h = self.lin(
            m.connector.fc2, torch.nn.functional.gelu(self.lin(m.connector.fc1, feats), approximate="tanh")
        )
        h = h + m.vit_pos_embed.pos_embed.detach().to(F64)[ids]
        mk = self.markers()
        x = torch.cat([mk[:1], h, mk[1:]])
        self.forward(ctx, x, torch.full((x.shape[0],), ctx.rope), [], causal=False, update_cache=True)
        ctx.kv_len += x.shape[0]
        ctx.rope += 1

    def update_vae(self, ctx: Ctx, image, generator) -> None:
        ci = context_image(image, self.cfg)
        xin = to_tensor(ci.vae_image)[None]
        z_c, d = self.cfg.vae.z_channels, self.cfg.vae.downsample
        noise = torch.randn(1, z_c, xin.shape[2] // d, xin.shape[3] // d, generator=generator)
        with torch.no_grad():
            z = self.engine.vae.encode(xin, noise)[0]
        p = self.cfg.latent_patch_size
        tokens = patchify_latent(z, p)
        ids = latent_position_ids(z.shape[1] // p, z.shape[2] // p, self.cfg.max_latent_size)
        mk = self.markers()
        x = torch.cat([mk[:1], self.latent_rows(tokens, 0.0, ids), mk[1:]])
        n = tokens.shape[0]
        self.forward(
            ctx, x, torch.full((n + 2,), ctx.rope), list(range(1, n + 1)), causal=False, update_cache=True
        )
        ctx.kv_len += n + 2
        ctx.rope += 1

    # -- the three contexts, as interleave_inference builds them
    def refine_contexts(self, image, prompt):
        gen, cfg_text, cfg_img = Ctx(), Ctx(), Ctx()
        self.update_text(gen, REFINE_SYSTEM_PROMPT)  # align_output: system prompt to gen and cfg_img
        self.update_text(cfg_img, REFINE_SYSTEM_PROMPT)
        self.update_vit(gen, image)  # wo_vae: ViT block only, gen only; then cfg_text <- deepcopy(gen)
        cfg_text = copy.deepcopy(gen)
        text = REFINE_PROMPT.format(user_prompt=prompt)
        self.update_text(gen, text)
        self.update_text(cfg_img, text)
        return {"gen": gen, "cfg_text": cfg_text, "cfg_img": cfg_img}

    def edit_contexts(self, image, instruction, generator):
        gen, cfg_img = Ctx(), Ctx()
        self.update_vae(gen, image, generator)
        self.update_vit(gen, image)
        cfg_text = copy.deepcopy(gen)
        self.update_text(gen, instruction)
        self.update_text(cfg_img, instruction)
        return {"gen": gen, "cfg_text": cfg_text, "cfg_img": cfg_img}

    def generate_contexts(self, prompt):
        gen, cfg_img = Ctx(), Ctx()
        cfg_text = copy.deepcopy(gen)
        self.update_text(gen, prompt)
        self.update_text(cfg_img, prompt)
        return {"gen": gen, "cfg_text": cfg_text, "cfg_img": cfg_img}

    # -- generate_image with _forward_flow's CFG code structure
    def velocity(self, ctx: Ctx, x, t, ids):
        n = x.shape[0]
        mk = self.markers()
        rows = torch.cat([mk[:1], self.latent_rows(x, t, ids), mk[1:]])
        h = self.forward(
            ctx, rows, torch.full((n + 2,), ctx.rope), list(range(1, n + 1)), causal=False, update_cache=False
        )
        return self.lin(self.model.llm2vae, h[1 : n + 1])

    def sample(self, contexts, x, h, w, params):
        T, s = params.steps, params.shift
        ts = torch.linspace(1, 0, T, dtype=torch.float32)
        ts = s * ts / (1 + (s - 1) * ts)
        dts = ts[:-1] - ts[1:]
        ids = latent_position_ids(h, w, self.cfg.max_latent_size)
        x = x.to(F64)
        for i in range(T - 1):
            t = float(ts[i])
            lo, hi = params.cfg_interval
            cfg_text_scale = params.cfg_text if lo < t <= hi else 1.0
            cfg_img_scale = params.cfg_img if lo < t <= hi else 1.0
            v_t = self.velocity(contexts["gen"], x, t, ids)
            if cfg_text_scale > 1.0:
                cfg_text_v_t = self.velocity(contexts["cfg_text"], x, t, ids)
                if cfg_img_scale > 1.0:
                    cfg_img_v_t = self.velocity(contexts["cfg_img"], x, t, ids)
                if params.renorm == "text_channel":
                    v_t_text_ = cfg_text_v_t + cfg_text_scale * (v_t - cfg_text_v_t)
                    norm_v_t = torch.norm(v_t, dim=-1, keepdim=True)
                    norm_v_t_text_ = torch.norm(v_t_text_, dim=-1, keepdim=True)
                    scale = (norm_v_t / (norm_v_t_text_ + 1e-8)).clamp(min=params.renorm_min, max=1.0)
                    v_t_text = v_t_text_ * scale
                    v_t = (
                        cfg_img_v_t + cfg_img_scale * (v_t_text - cfg_img_v_t)
                        if cfg_img_scale > 1.0
                        else v_t_text
                    )
                else:
                    v_t_text_ = cfg_text_v_t + cfg_text_scale * (v_t - cfg_text_v_t)
                    v_t_ = (
                        cfg_img_v_t + cfg_img_scale * (v_t_text_ - cfg_img_v_t)
                        if cfg_img_scale > 1.0
                        else v_t_text_
                    )
                    if params.renorm == "global":
                        norm_v_t, norm_v_t_ = torch.norm(v_t), torch.norm(v_t_)
                    else:
                        norm_v_t = torch.norm(v_t, dim=-1, keepdim=True)
                        norm_v_t_ = torch.norm(v_t_, dim=-1, keepdim=True)
                    scale = (norm_v_t / (norm_v_t_ + 1e-8)).clamp(min=params.renorm_min, max=1.0)
                    v_t = v_t_ * scale
            x = x - v_t * float(dts[i])
        return x
