import json
import shutil
from pathlib import Path

import pytest

from engine.errors import CheckpointError
from engine.tokenizer import QWEN2_ADDED_TOKENS, Tokenizer, write_tiny_tokenizer

SYSTEM_PROMPT = (
    "Analyze the potential misalignment between the generated image and the user's prompt. Then, re-generate the "
    "image to precisely align with the user's prompt.\n\nHere is the generated image:\n"
)
TEXTS = [
    SYSTEM_PROMPT,
    "Here is the user's prompt: a photo of two red apples on a wooden table. ",
    "Does this image show: three blue cubes left of a sphere? Answer yes or no.",
    "  leading spaces, trailing\ttabs\t and\r\nwindows newlines\n\n",
    "numbers 1234567 and punctuation!!! ... ??? (ok) [x] {y}",
    "unicode: café naïve 東京 😀 Ωmega",
    "<|im_start|>inline special<|im_end|> and <|vision_start|><|vision_end|>",
    "",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tiny_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


def test_writes_qwen2_directory(tiny_dir):
    assert {p.name for p in tiny_dir.iterdir()} == {
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
    }
    vocab = json.loads((tiny_dir / "vocab.json").read_text())
    assert sorted(vocab.values()) == list(range(len(vocab)))
    merges = (tiny_dir / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and all(len(m.split(" ")) == 2 for m in merges[1:])
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and cfg["bos_token"] is None
    decoder = {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()}
    # Added tokens follow the BPE vocabulary in Qwen2.5's order (151643.. in the real file).
    assert decoder == {len(vocab) + i: c for i, (c, _) in enumerate(QWEN2_ADDED_TOKENS)}
    doc = json.loads((tiny_dir / "tokenizer.json").read_text())
    assert doc["normalizer"]["type"] == "NFC"
    assert [p["type"] for p in doc["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]


def test_deterministic(tiny_dir, tmp_path):
    write_tiny_tokenizer(tmp_path)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes(), name


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_nfc_normalization(tok):
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


def test_special_ids(tok, tiny_dir):
    first = len(json.loads((tiny_dir / "vocab.json").read_text()))
    # Same offsets as the real vocabulary: 151643 + 1, + 2, + 9, + 10.
    assert (tok.bos_id, tok.eos_id, tok.vision_start_id, tok.vision_end_id) == (
        first + 1,
        first + 2,
        first + 9,
        first + 10,
    )
    assert tok.encode("<|im_start|>") == [tok.bos_id]
    ids = tok.encode("<|vision_start|>x<|vision_end|>")
    assert ids[0] == tok.vision_start_id and ids[-1] == tok.vision_end_id
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "<|im_start|>hi<|im_end|>"
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id], skip_special_tokens=True) == "hi"


def test_encode_adds_no_bos_or_eos(tok):
    assert tok.encode("") == []
    ids = tok.encode("a red car")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == "a red car"


def test_prompts_tokenize_compactly(tok):
    # The real Qwen2 tokenizer needs about 35-40 tokens for this 187-char prompt.
    assert len(tok.encode(SYSTEM_PROMPT)) <= 60


def test_answer_token_ids(tok):
    yes, no = tok.answer_token_ids()
    assert yes and no and not set(yes) & set(no)
    for word in ("Yes", "No", "yes", "no"):
        assert len(tok.encode(word)) == 1
    assert {tok.decode([i]).strip() for i in yes} == {"Yes", "yes"}
    assert {tok.decode([i]).strip() for i in no} == {"No", "no"}


def test_vocab_merges_path_matches_tokenizer_json(tok, tiny_dir, tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    slow = Tokenizer.from_dir(tmp_path)
    assert slow.vocab_size == tok.vocab_size
    assert (slow.bos_id, slow.eos_id, slow.vision_start_id, slow.vision_end_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.vision_start_id,
        tok.vision_end_id,
    )
    for text in TEXTS:
        assert slow.encode(text) == tok.encode(text)
    assert slow.answer_token_ids() == tok.answer_token_ids()


def test_custom_corpus_still_has_single_answers(tmp_path):
    write_tiny_tokenizer(tmp_path, corpus=["the quick brown fox jumps over the lazy dog"] * 3, vocab_size=300)
    yes, no = Tokenizer.from_dir(tmp_path).answer_token_ids()
    assert len(yes) == 4 and len(no) == 4


def test_missing_files_raise(tmp_path):
    with pytest.raises(CheckpointError, match=r"vocab\.json and merges\.txt"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"missing merges\.txt"):
        Tokenizer.from_dir(tmp_path)


def test_missing_special_tokens_raise(tiny_dir, tmp_path):
    # vocab + merges without tokenizer_config.json: no added tokens, so BAGEL's special ids are missing.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    with pytest.raises(CheckpointError, match=r"<\|im_start\|>"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json_raises(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
