"""Sharded data-parallel training: `rvr finetune` under torchrun (FSDP2 over gloo, two CPU ranks) trains and
resumes to the same weights as one process accumulating the same two batches per step; CLI errors."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from engine.tiny import make_checkpoint
from training.dataset import build_world_dataset, read_records
from training.trainer import main as finetune


def _records(root):
    return {
        "rvr": read_records(root / "rvr/data/rvr.parquet"),
        "t2i": read_records(root / "t2i/data/t2i.parquet"),
        "und": read_records(root / "und/und.jsonl"),
    }


def _finetune_args(ckpt, root, out, steps: int) -> list[str]:
    args = ["--model", str(ckpt), "--data-root", str(root), "--out", str(out), "--steps", str(steps)]
    args += ["--rvr", str(root / "rvr/data/rvr.parquet"), "--t2i", str(root / "t2i/data/t2i.parquet")]
    args += [
        "--und",
        str(root / "und/und.jsonl"),
        "--lr",
        "1e-3",
        "--warmup-steps",
        "1",
        "--ema-decay",
        "0.5",
    ]
    # Adam's eps well above rounding noise: a key bias has an exactly-zero gradient (softmax ignores it), and
    # with the release's 1e-15 Adam would turn that float noise into full-size updates of either sign.
    return [*args, "--max-rows", "200", "--save-every", "1", "--seed", "3", "--adam-eps", "1e-8"]


def _torchrun(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    cmd += [str(_free_port()), "-m", "training.trainer", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    build_world_dataset(base / "world", n_prompts=8, seed=0, heldout_fraction=0.0)
    return make_checkpoint(base / "ckpt", "tiny", seed=0), base / "world", base


@pytest.mark.slow
def test_two_torchrun_ranks_match_one_process_accumulating_their_batches_and_resume(setup):
    ckpt, root, base = setup
    sharded = base / "sharded"
    # `rvr finetune` under torchrun: step 1 in one launch, step 2 in a second that resumes the sharded state
    for steps in (1, 2):
        _torchrun(_finetune_args(ckpt, root, sharded, steps))
    ref = base / "ref"
    finetune([*_finetune_args(ckpt, root, ref, 2), "--grad-accum", "2"])
    for name in ("rvr.safetensors", "train_state/model.safetensors", "train_state/ema_fp32.safetensors"):
        a, b = load_file(str(sharded / name)), load_file(str(ref / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}:{k}")
    init = load_file(str(ckpt / "ema.safetensors"))
    moved = [k for k, v in load_file(str(ref / "rvr.safetensors")).items() if not torch.equal(v, init[k])]
    assert len(moved) > 20  # the comparison is between trained weights, not two copies of the start


def test_ranks_and_micro_batches_draw_distinct_batches(setup):
    from training.packing import pack
    from training.samples import ImageEncoder, Mixture, MixtureConfig
    from training.trainer import load_for_training

    ckpt, root, _ = setup
    _, vae, tok, cfg = load_for_training(ckpt)
    mix = Mixture(
        tok, ImageEncoder(cfg, vae), root, _records(root), MixtureConfig({"rvr": 2, "und": 1, "t2i": 1})
    )

    def text_ids(shard):
        batch = mix.batch(0, 5, 200, shard=shard)
        return pack(batch, tok.vision_start_id, tok.vision_end_id, torch.Generator().manual_seed(0)).text_ids

    assert torch.equal(text_ids(1), text_ids(1))
    assert not torch.equal(text_ids(0), text_ids(1)) and not torch.equal(text_ids(None), text_ids(1))


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--mixture", "rvr=2,bogus=1"], "bad mixture entry"), (["--mixture", "rvr=1"], "no records")],
)
def test_finetune_cli_rejects_bad_mixtures(setup, tmp_path, capsys, extra, message):
    ckpt, root, _ = setup
    args = ["--model", str(ckpt), "--data-root", str(root), "--out", str(tmp_path / "o")]
    args += ["--t2i", str(root / "t2i/data/t2i.parquet"), *extra]
    with pytest.raises(SystemExit) as exc:
        finetune(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err
