import pytest
import torch
import torch.nn.functional as F

from engine.config import VAEConfig
from engine.errors import CheckpointError
from engine.model.vae import AutoEncoder, Downsample, posterior_shape, vae_config_from_shapes

SMALL = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, scale_factor=0.5, shift_factor=0.25)


def _resblock(prefix: str, shortcut: bool) -> list[str]:
    names = [f"{prefix}.{m}" for m in ("norm1", "conv1", "norm2", "conv2")]
    return [*names, f"{prefix}.nin_shortcut"] if shortcut else names


def _mid(prefix: str) -> list[str]:
    attn = [f"{prefix}.attn_1.{m}" for m in ("norm", "q", "k", "v", "proj_out")]
    return [*_resblock(f"{prefix}.block_1", False), *attn, *_resblock(f"{prefix}.block_2", False)]


def _modules(sd: dict[str, torch.Tensor]) -> set[str]:
    names = {k.rsplit(".", 1)[0] for k in sd}
    assert all(k.endswith((".weight", ".bias")) for k in sd)
    return names


@pytest.fixture(scope="module")
def small() -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder(SMALL).eval()


def test_key_names_match_flux(small):
    # ch=32, ch_mult (1, 2): encoder levels 32 -> 32 (downsample) and 32 -> 64 (shortcut, no downsample);
    # decoder up.1 = 64 channels (deepest, upsample), up.0 = 64 -> 32 (shortcut), num_res_blocks + 1 = 2 blocks.
    expected = {
        "encoder.conv_in",
        *_resblock("encoder.down.0.block.0", False),
        "encoder.down.0.downsample.conv",
        *_resblock("encoder.down.1.block.0", True),
        *_mid("encoder.mid"),
        "encoder.norm_out",
        "encoder.conv_out",
        "decoder.conv_in",
        *_mid("decoder.mid"),
        *_resblock("decoder.up.1.block.0", False),
        *_resblock("decoder.up.1.block.1", False),
        "decoder.up.1.upsample.conv",
        *_resblock("decoder.up.0.block.0", True),
        *_resblock("decoder.up.0.block.1", False),
        "decoder.norm_out",
        "decoder.conv_out",
    }
    sd = small.state_dict()
    assert _modules(sd) == expected
    assert sd["encoder.conv_out.weight"].shape == (8, 64, 3, 3)  # 2 * z_channels (mean, logvar)
    assert sd["decoder.conv_in.weight"].shape == (64, 4, 3, 3)
    assert sd["decoder.up.0.block.0.conv1.weight"].shape == (32, 64, 3, 3)
    assert sd["decoder.up.1.block.0.conv1.weight"].shape == (64, 64, 3, 3)
    assert sd["decoder.conv_out.weight"].shape == (3, 32, 3, 3)


def test_full_flux_config_size():
    # The spec quotes about 83.8 M parameters for BAGEL's ae.safetensors.
    with torch.device("meta"):
        ae = AutoEncoder(VAEConfig())
    n = sum(p.numel() for p in ae.parameters())
    assert 83.7e6 < n < 83.9e6
    assert vae_config_from_shapes({k: v.shape for k, v in ae.state_dict().items()}) == VAEConfig()


@pytest.mark.parametrize(
    "cfg",
    [SMALL, VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=3, in_channels=3, out_ch=4)],
)
def test_config_from_shapes_round_trip(cfg):
    with torch.device("meta"):
        ae = AutoEncoder(cfg)
    shapes = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    got = vae_config_from_shapes(shapes, scale_factor=cfg.scale_factor, shift_factor=cfg.shift_factor)
    assert got == cfg


def test_config_from_shapes_errors():
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoEncoder(SMALL).state_dict().items()}
    with pytest.raises(CheckpointError, match=r"encoder\.conv_in\.weight"):
        vae_config_from_shapes({k: v for k, v in shapes.items() if k != "encoder.conv_in.weight"})
    no_block = {k: v for k, v in shapes.items() if not k.startswith("decoder.up.0.block.1.")}
    with pytest.raises(CheckpointError, match="blocks per level"):
        vae_config_from_shapes(no_block)


def test_encode_decode_shapes(small):
    x = torch.rand(2, 3, 32, 16) * 2 - 1
    with torch.no_grad():
        z = small.encode(x)
        assert z.shape == (2, 4, 16, 8) == (2, *posterior_shape(SMALL, 32, 16))
        assert small.decode(z).shape == (2, 3, 32, 16)


def test_encode_mean_and_noise(small):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, logvar = small.encoder(x).chunk(2, dim=1)
        z0 = small.encode(x)
        assert torch.equal(z0, small.encode(x))  # noise=None is deterministic
        torch.testing.assert_close(z0, SMALL.scale_factor * (mean - SMALL.shift_factor))
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
        z1 = small.encode(x, noise)
    assert not torch.allclose(z1, z0)
    # z1 - z0 = scale * std * noise: the posterior sample, scaled
    torch.testing.assert_close(z1 - z0, SMALL.scale_factor * torch.exp(0.5 * logvar) * noise)
    with pytest.raises(ValueError, match="noise shape"):
        small.encode(x, torch.randn(1, 4, 4, 4))


def test_decode_unscales_latent(small):
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = small.decode(z)
        raw = small.decoder(z / SMALL.scale_factor + SMALL.shift_factor)
        assert torch.equal(out, raw)
        # A decoder fed the scaled latent directly gives a different image, so the shift/scale is not a no-op.
        assert not torch.allclose(small.decoder(z), out)


def test_downsample_pads_right_and_bottom_only():
    torch.manual_seed(0)
    down = Downsample(4)
    x = torch.randn(1, 4, 8, 8)
    out = down(x)
    assert out.shape == (1, 4, 4, 4)
    # Output (0, 0) sees input rows/cols 0..2 (padding on the far side); symmetric padding would see -1..1.
    x2 = x.clone()
    x2[..., 2, 2] += 1.0
    assert not torch.allclose(down(x2)[..., 0, 0], out[..., 0, 0])
    torch.testing.assert_close(
        out, F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    )


def test_invalid_configs():
    with pytest.raises(ValueError, match="multiple of 32"):
        AutoEncoder(VAEConfig(ch=48))
    with pytest.raises(ValueError, match="multiples of 2"):
        posterior_shape(SMALL, 15, 16)
