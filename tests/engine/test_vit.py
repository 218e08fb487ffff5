import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import ViTConfig
from engine.model.vit import SiglipVisionModel
from engine.preprocess import patchify_vit

CFG = ViTConfig(
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_hidden_layers=3,
    patch_size=2,
    image_size=16,
)
MAX_SIDE = CFG.image_size // CFG.patch_size  # 8


@pytest.fixture(scope="module")
def model() -> SiglipVisionModel:
    torch.manual_seed(0)
    m = SiglipVisionModel(CFG).eval()
    # Non-trivial norms so post_layernorm's affine part is exercised.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return m


def _image(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed))
    patches, ids, _ = patchify_vit(x, CFG.patch_size, MAX_SIDE)
    return patches, ids


def test_key_names_layers_run_only(model):
    keys = set(model.state_dict())
    layer = [f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")] + [
        "layer_norm1",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    ]
    expected = {
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.patch_embedding.bias",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.post_layernorm.weight",
        "vision_model.post_layernorm.bias",
    }
    for i in range(CFG.layers_run):
        expected |= {f"vision_model.encoder.layers.{i}.{m}.{t}" for m in layer for t in ("weight", "bias")}
    assert keys == expected
    assert CFG.layers_run == 2
    sd = model.state_dict()
    assert sd["vision_model.embeddings.patch_embedding.weight"].shape == (32, 2 * 2 * 3)
    assert sd["vision_model.embeddings.position_embedding.weight"].shape == (MAX_SIDE**2, 32)


def test_full_size_parameter_count():
    # docs/model.md §3: ViT (26 layers + embeddings + post-LN) is about 0.4026 B parameters.
    with torch.device("meta"):
        m = SiglipVisionModel(ViTConfig())
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 0.4026e9) < 0.0005e9
    assert "vision_model.encoder.layers.25.mlp.fc2.weight" in m.state_dict()
    assert "vision_model.encoder.layers.26.mlp.fc2.weight" not in m.state_dict()


def test_packed_equals_separate(model):
    pa, ia = _image(6, 8, seed=1)  # 3x4 grid = 12 tokens
    pb, ib = _image(4, 4, seed=2)  # 2x2 grid = 4 tokens
    with torch.no_grad():
        packed = model(torch.cat([pa, pb]), torch.cat([ia, ib]), [0, 12, 16])
        alone_a = model(pa, ia, [0, 12])
        alone_b = model(pb, ib, [0, 4])
        as_one = model(torch.cat([pa, pb]), torch.cat([ia, ib]), [0, 16])
    torch.testing.assert_close(packed, torch.cat([alone_a, alone_b]), atol=1e-5, rtol=1e-5)
    # Attention across images would change the result: cu_seqlens is really used.
    assert not torch.allclose(packed, as_one, atol=1e-3)


def _reference(model: SiglipVisionModel, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Plain-math SigLIP forward for one image (explicit softmax attention, tanh-GELU formula)."""
    vm = model.vision_model
    x = patches @ vm.embeddings.patch_embedding.weight.T + vm.embeddings.patch_embedding.bias
    x = x + vm.embeddings.position_embedding.weight[ids]
    h, d = CFG.num_attention_heads, CFG.head_dim
    for layer in vm.encoder.layers:
        a = F.layer_norm(x, (CFG.hidden_size,), layer.layer_norm1.weight, layer.layer_norm1.bias, 1e-6)
        att = layer.self_attn
        q, k, v = (lin(a).view(-1, h, d).transpose(0, 1) for lin in (att.q_proj, att.k_proj, att.v_proj))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        x = x + att.out_proj((w @ v).transpose(0, 1).reshape(-1, h * d))
        m = F.layer_norm(x, (CFG.hidden_size,), layer.layer_norm2.weight, layer.layer_norm2.bias, 1e-6)
        u = layer.mlp.fc1(m)
        gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        x = x + layer.mlp.fc2(gelu)
    return F.layer_norm(x, (CFG.hidden_size,), vm.post_layernorm.weight, vm.post_layernorm.bias, 1e-6)


def test_matches_plain_math_reference(model):
    patches, ids = _image(6, 4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            model(patches, ids, [0, len(ids)]), _reference(model, patches, ids), atol=1e-5, rtol=1e-5
        )


def test_patch_embedding_equals_permuted_conv(model):
    # The checkpoint's Linear weight is the Conv2d weight permuted (out, C, p, q) -> (out, p, q, C), flattened.
    lin = model.vision_model.embeddings.patch_embedding
    p = CFG.patch_size
    conv_w = lin.weight.detach().reshape(CFG.hidden_size, p, p, 3).permute(0, 3, 1, 2)
    x = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(4))
    patches, _, (gh, gw) = patchify_vit(x, p, MAX_SIDE)
    with torch.no_grad():
        via_linear = lin(patches)
        # conv: (1, hidden, gh, gw) -> (gh*gw, hidden) in (row, col) order
        via_conv = F.conv2d(x[None], conv_w, lin.bias, stride=p)[0].flatten(1).T
    torch.testing.assert_close(via_linear, via_conv, atol=1e-5, rtol=1e-5)
    assert (gh, gw) == (3, 4)


def test_input_validation(model):
    patches, ids = _image(4, 4, seed=5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(patches, ids, [0, 3])
    with pytest.raises(ValueError, match="increasing"):
        model(patches, ids, [0, 0, 4])
    with pytest.raises(ValueError, match="position_ids"):
        model(patches, ids[:3], [0, 4])
