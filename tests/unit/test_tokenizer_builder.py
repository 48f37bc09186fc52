"""Unit tests for export.tokenizer_builder: size, eos, round trip, loading, determinism."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from export.tokenizer_builder import EOS_TOKEN, build_corpus, build_tokenizer

pytestmark = pytest.mark.unit

SIZES = (1024, 50257)
Built = dict[int, tuple[Path, PreTrainedTokenizerFast]]

TRICKY = [
    "",
    "こんにちは、世界！",
    "🙂",
    "  two spaces",
    "\n\n",
    " leading space",
    "trailing space ",
    "\t\ttabs\tand\r\nCRLF\r\n",
    "カタカナとひらがなと漢字",
    "👩\u200d👩\u200d👧 family, 🇯🇵 flag, e\u0301 combining",
    "Hello<|endoftext|>world",
    "<|unused_1000|>",
    "def f(x):\n    return x  # comment\n",
    "\x00\x01\x7f\x80\xff nul and controls",
    "Ünïcödé ßtraße, ελληνικά, русский, עברית, العربية",
    "\ufffd literal replacement char",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀 astral",
    " " * 17,
]


def random_unicode(rng: random.Random, max_len: int = 40) -> str:
    """A random mix of ASCII, whitespace, Japanese, emoji and any non-surrogate code point."""
    ranges = [
        (0x20, 0x7E),  # printable ASCII
        (0x3040, 0x309F),  # hiragana
        (0x30A0, 0x30FF),  # katakana
        (0x4E00, 0x9FFF),  # CJK ideographs
        (0x1F300, 0x1FAFF),  # emoji
        (0x00A0, 0x07FF),  # 2-byte UTF-8
        (0x0000, 0x10FFFF),  # anything (surrogates skipped below)
    ]
    chars: list[str] = []
    for _ in range(rng.randint(0, max_len)):
        roll = rng.random()
        if roll < 0.1:
            chars.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", "\n\n"]))
            continue
        lo, hi = rng.choice(ranges)
        cp = rng.randint(lo, hi)
        if 0xD800 <= cp <= 0xDFFF:  # lone surrogates cannot be UTF-8 encoded
            cp = 0xFFFD
        chars.append(chr(cp))
    return "".join(chars)


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[int, tuple[Path, PreTrainedTokenizerFast]]:
    out: dict[int, tuple[Path, PreTrainedTokenizerFast]] = {}
    for size in SIZES:
        path = tmp_path_factory.mktemp(f"tok{size}")
        out[size] = (path, build_tokenizer(path, size))
    return out


@pytest.mark.parametrize("size", SIZES)
def test_exact_vocab_size_and_eos_last(built: Built, size: int) -> None:
    _, tok = built[size]
    assert len(tok) == size
    assert tok.eos_token == tok.bos_token == tok.unk_token == EOS_TOKEN
    assert tok.eos_token_id == tok.bos_token_id == tok.unk_token_id == size - 1
    assert tok.convert_ids_to_tokens(size - 1) == EOS_TOKEN
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(size))
    # no id beyond the end
    assert tok.convert_tokens_to_ids(EOS_TOKEN) == size - 1


@pytest.mark.parametrize("size", SIZES)
def test_every_id_decodes_deterministically(built: Built, size: int) -> None:
    path, tok = built[size]
    texts = [tok.decode([i]) for i in range(size)]
    assert all(isinstance(t, str) and t for t in texts)
    again = AutoTokenizer.from_pretrained(str(path))
    assert [again.decode([i]) for i in range(0, size, 97)] == texts[::97]


@pytest.mark.parametrize("size", SIZES)
def test_all_256_byte_symbols_in_vocab(built: Built, size: int) -> None:
    _, tok = built[size]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256
    assert set(alphabet) <= set(tok.get_vocab())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(built: Built, size: int, text: str) -> None:
    _, tok = built[size]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_random_unicode(built: Built, size: int) -> None:
    _, tok = built[size]
    rng = random.Random(1234)
    for _ in range(500):
        text = random_unicode(rng)
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert all(0 <= i < size for i in ids)


@pytest.mark.parametrize("size", SIZES)
def test_loads_via_auto_tokenizer_as_fast_gpt2(built: Built, size: int) -> None:
    path, tok = built[size]
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (path / name).is_file(), name
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "GPT2Tokenizer"
    assert config["add_prefix_space"] is False
    assert config["eos_token"] == config["bos_token"] == EOS_TOKEN

    loaded = AutoTokenizer.from_pretrained(str(path))
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert loaded.is_fast
    assert len(loaded) == size
    assert loaded.eos_token_id == size - 1

    # The transformers wrapper and the raw tokenizer.json agree.
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    rng = random.Random(7)
    for text in TRICKY + [random_unicode(rng) for _ in range(50)]:
        assert loaded.encode(text) == raw.encode(text).ids == tok.encode(text)


def test_no_prefix_space_like_gpt2(built: Built) -> None:
    _, tok = built[1024]
    assert tok.decode(tok.encode("hello")) == "hello"
    assert tok.encode("hello") != tok.encode(" hello")
    assert tok.encode("hello world")[-1] == tok.encode(" world")[-1]
    # encode() adds no bos/eos, like GPT-2
    assert tok.eos_token_id not in tok.encode("hello world")


def test_filler_ids_are_never_produced_by_encoding(
    built: Built,
) -> None:
    """The 50257 vocab is padded; the padding decodes to text but encode never yields it."""
    _, tok = built[50257]
    state = json.loads(tok.backend_tokenizer.to_str())
    n_trained = 256 + len(state["model"]["merges"])  # byte alphabet + one token per merge
    fillers = set(range(n_trained, 50257 - 1))
    assert fillers, "expected filler ids in a 50257 vocab trained on a small corpus"
    texts = [tok.decode([i]) for i in sorted(fillers)]
    assert all(texts) and len(set(state["model"]["vocab"])) == 50257 - 1
    produced: set[int] = set()
    for line in build_corpus(0):
        produced.update(tok.encode(line))
    produced.update(tok.encode("".join(texts[:200])))  # the fillers' own text re-encodes to trained ids
    assert not produced & fillers


def test_deterministic_for_same_seed(tmp_path: Path) -> None:
    build_tokenizer(tmp_path / "a", 1024, seed=5)
    build_tokenizer(tmp_path / "b", 1024, seed=5)
    build_tokenizer(tmp_path / "c", 1024, seed=6)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    a = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert a != (tmp_path / "c" / "tokenizer.json").read_bytes()
    assert build_corpus(5) == build_corpus(5) != build_corpus(6)


def test_corpus_mixes_scripts() -> None:
    text = "\n".join(build_corpus(0))
    assert len(build_corpus(0)) >= 300
    assert any("\u3040" <= c <= "\u309f" for c in text)  # hiragana
    assert any("\u30a0" <= c <= "\u30ff" for c in text)  # katakana
    assert any("\u4e00" <= c <= "\u9fff" for c in text)  # kanji
    assert any(c.isdigit() for c in text) and "def " in text and "the " in text.lower()


def test_full_size_builds_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    tok = build_tokenizer(tmp_path, 50257, seed=1)
    elapsed_s = time.perf_counter() - start
    assert len(tok) == 50257
    assert elapsed_s < 30.0, f"50257 vocab took {elapsed_s:.1f} s"


@pytest.mark.parametrize("size", [0, 1, 256])
def test_rejects_too_small_vocab(tmp_path: Path, size: int) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(tmp_path, size)


def test_smallest_vocab_is_bytes_plus_eos(tmp_path: Path) -> None:
    tok = build_tokenizer(tmp_path, 257)
    assert len(tok) == 257 and tok.eos_token_id == 256
    text = "こんにちは 🙂"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # no merges: one token per byte
    assert tok.decode(ids) == text
