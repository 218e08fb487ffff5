"""Qwen2 byte-level BPE tokenizer (the one BAGEL loads from its checkpoint directory), on the `tokenizers` library.

`Tokenizer.from_dir` reads `tokenizer.json`, or else `vocab.json` + `merges.txt` with the added tokens of
`tokenizer_config.json` (what HF's slow `Qwen2Tokenizer` reads); both give the same ids. `write_tiny_tokenizer`
trains a small tokenizer with the same pipeline and writes a directory with the four files a Qwen2 checkpoint has.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from engine.errors import CheckpointError

# Qwen2's pre-tokenizer split (HF `tokenizer.json`, `Qwen2Tokenizer.PRETOKENIZE_REGEX`).
QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"

# Qwen2.5's added tokens in id order (151643..151664 in the real vocabulary), with their `special` flag.
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    (BOS_TOKEN, True),
    (EOS_TOKEN, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    (VISION_START_TOKEN, True),
    (VISION_END_TOKEN, True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

YES_WORDS = ("Yes", "yes", " Yes", " yes")
NO_WORDS = ("No", "no", " No", " no")


class Tokenizer:
    """Qwen2 tokenizer plus BAGEL's four special ids. `encode` adds no BOS/EOS (Qwen2 has no BOS)."""

    def __init__(self, tok: HFTokenizer) -> None:
        self._tok = tok
        ids = {
            name: tok.token_to_id(name)
            for name in (BOS_TOKEN, EOS_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN)
        }
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise CheckpointError(f"tokenizer lacks special tokens {missing}")
        self.bos_id: int = ids[BOS_TOKEN]
        self.eos_id: int = ids[EOS_TOKEN]
        self.vision_start_id: int = ids[VISION_START_TOKEN]
        self.vision_end_id: int = ids[VISION_END_TOKEN]

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_json = path / "tokenizer.json"
        if tok_json.is_file():
            try:
                return cls(HFTokenizer.from_file(str(tok_json)))
            except Exception as exc:  # the Rust loader raises plain Exception subclasses
                raise CheckpointError(f"cannot load {tok_json}: {exc}") from None
        vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
        missing = [f.name for f in (vocab_file, merges_file) if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: no tokenizer.json, and missing {' and '.join(missing)}")
        vocab = _read_json(vocab_file)
        merges = _read_merges(merges_file)
        config_file = path / "tokenizer_config.json"
        added = _added_from_config(_read_json(config_file)) if config_file.is_file() else []
        try:
            tok = HFTokenizer.from_str(json.dumps(_tokenizer_doc(vocab, merges, added)))
        except Exception as exc:  # the Rust loader raises plain Exception subclasses
            raise CheckpointError(f"{path}: invalid vocab.json/merges.txt: {exc}") from None
        try:
            return cls(tok)
        except CheckpointError as exc:
            if config_file.is_file():
                raise
            raise CheckpointError(
                f"{path}: no tokenizer.json, and missing tokenizer_config.json ({exc})"
            ) from None

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """The tokenizer `to_json` wrote (how a worker hands its tokenizer to API pods without the model)."""
        try:
            return cls(HFTokenizer.from_str(text))
        except CheckpointError:
            raise
        except Exception as exc:  # the Rust loader raises plain Exception subclasses
            raise CheckpointError(f"invalid tokenizer JSON: {exc}") from None

    def to_json(self) -> str:
        """The whole tokenizer as `tokenizer.json` text; `from_json` gives the same ids."""
        return self._tok.to_str()

    def count_tokens(self, prompt: str) -> int:
        """Tokens of a user prompt as the prompt-token limit counts them (RequestLimits.max_prompt_tokens)."""
        return len(self.encode(prompt))

    @property
    def vocab_size(self) -> int:
        """Entries including added tokens (the embedding may have more rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def answer_token_ids(self) -> tuple[list[int], list[int]]:
        """Ids of the yes-words and no-words that are single tokens, for the yes/no judge."""
        yes, no = self._single_ids(YES_WORDS), self._single_ids(NO_WORDS)
        if not yes or not no:
            raise CheckpointError(f"tokenizer has no single-token yes/no answers (yes={yes}, no={no})")
        return yes, no

    def _single_ids(self, words: Iterable[str]) -> list[int]:
        out: list[int] = []
        for word in words:
            ids = self.encode(word)
            if len(ids) == 1 and ids[0] not in out:
                out.append(ids[0])
        return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    merges = []
    for n, line in enumerate(lines, start=1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{path}:{n}: expected two tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _added_from_config(config: dict[str, Any]) -> list[dict[str, Any]]:
    """`added_tokens_decoder` of tokenizer_config.json -> tokenizer.json `added_tokens` entries."""
    entries = []
    for key, spec in config.get("added_tokens_decoder", {}).items():
        if not key.isdigit() or not isinstance(spec, dict) or "content" not in spec:
            raise CheckpointError(f"tokenizer_config.json: bad added_tokens_decoder entry {key!r}: {spec!r}")
        entries.append(
            {
                "id": int(key),
                "content": spec["content"],
                "single_word": spec.get("single_word", False),
                "lstrip": spec.get("lstrip", False),
                "rstrip": spec.get("rstrip", False),
                "normalized": spec.get("normalized", False),
                "special": spec.get("special", True),
            }
        )
    return sorted(entries, key=lambda e: e["id"])


def _byte_level() -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def _tokenizer_doc(
    vocab: dict[str, int], merges: Sequence[tuple[str, str]], added: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The Qwen2 `tokenizer.json` document for this vocabulary. Added tokens keep their explicit ids; merges are
    "a b" strings as in Qwen's files (readable by every `tokenizers` version)."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": list(added),
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                _byte_level(),
            ],
        },
        "post_processor": _byte_level(),
        "decoder": _byte_level(),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }


# Default training text: the RvR prompt strings, the judge question and GenEval/DPG-style vocabulary.
_PROMPTS = (
    "Analyze the potential misalignment between the generated image and the user's prompt. Then, re-generate "
    "the image to precisely align with the user's prompt.\n\nHere is the generated image:\n",
    "Here is the user's prompt: {user_prompt}. ",
    "Does this image show: {prompt}? Answer yes or no.",
    "Answer the question using a single word or phrase.",
    "Yes",
    "No",
    "yes",
    "no",
)
_WORDS = (
    "a an the of and with on in under above below behind in front of next to near left right top bottom middle "
    "center side of the image photo picture of a is are there one two three four five six seven eight nine ten "
    "zero single pair few several many some no each all both red orange yellow green blue purple pink brown black "
    "white gray grey silver gold colorful dark light bright small large big tiny huge tall short long round square "
    "circle circular triangle triangular rectangle rectangular oval sphere cube wooden metal glass plastic person "
    "people man woman boy girl child dog dogs cat cats bird birds horse sheep cow elephant bear zebra giraffe "
    "bicycle car cars motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking meter "
    "bench backpack umbrella handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove "
    "skateboard surfboard tennis racket bottle wine cup cups fork knife spoon bowl banana apple apples sandwich "
    "orange broccoli carrot hot pizza donut cake chair chairs couch potted plant bed dining table toilet tv laptop "
    "mouse remote keyboard cell phone microwave oven toaster sink refrigerator book books clock vase scissors "
    "teddy hair drier toothbrush sitting standing holding wearing looking at beside between inside outside "
    "background foreground street room kitchen park beach sky tree trees grass water snow road field city "
    "sunset night day morning realistic style painting drawing detailed high quality scene view close-up"
)


def default_corpus() -> list[str]:
    # Prompt strings repeated so their words win merges over rarer vocabulary.
    return [*_PROMPTS * 8, *_WORDS.split(), _WORDS]


def _trained_vocab(corpus: Iterable[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    # tokenizers >= 0.20 writes merges as [a, b] pairs, older versions as "a b" strings.
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _force_single_tokens(vocab: dict[str, int], merges: list[tuple[str, str]], words: Iterable[str]) -> None:
    """Append merges (lowest priority) that join each word's final BPE pieces left to right into one token."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for word in words:
        ((mapped, _),) = byte_level.pre_tokenize_str(word)
        pieces = [t.value for t in models.BPE(vocab, merges).tokenize(mapped)]
        cur = pieces[0]
        for piece in pieces[1:]:
            if (cur, piece) not in merges:
                merges.append((cur, piece))
            cur += piece
            vocab.setdefault(cur, len(vocab))


def write_tiny_tokenizer(
    out_dir: str | Path, corpus: Iterable[str] | None = None, vocab_size: int = 512
) -> None:
    """Train a small Qwen2-style byte-level BPE and write tokenizer.json, vocab.json, merges.txt and
    tokenizer_config.json. Qwen2.5's 22 added tokens follow the BPE vocabulary in Qwen's order, and the yes/no
    words are forced to single tokens, so `vocab_size` is a target for the trained part. Deterministic."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _trained_vocab(default_corpus() if corpus is None else corpus, vocab_size)
    _force_single_tokens(vocab, merges, (*YES_WORDS, *NO_WORDS))
    first = len(vocab)
    added = [
        {
            "id": first + i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for i, (content, special) in enumerate(QWEN2_ADDED_TOKENS)
    ]
    doc = _tokenizer_doc(vocab, merges, added)
    (out / "tokenizer.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in added},
        "additional_special_tokens": [
            c for c, special in QWEN2_ADDED_TOKENS if special and c != "<|endoftext|>"
        ],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
    )
