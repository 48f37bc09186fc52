"""Build a local, GPT-2-shaped byte-level BPE tokenizer without any network access.

Machines in this project cannot download GPT-2's tokenizer, so models exported with random
weights get a tokenizer made here instead. :func:`build_tokenizer` trains a byte-level BPE (the
GPT-2 pipeline: GPT-2 split regex, byte-to-unicode alphabet, no normaliser, no prefix space) on a
small corpus generated in code and saves it in the standard Hugging Face layout.

Contract of the result, for any ``vocab_size >= 257``:

* exactly ``vocab_size`` ids; ``<|endoftext|>`` is the last id (``vocab_size - 1``) and is the
  bos, eos and unk token, as in GPT-2;
* all 256 byte symbols are in the vocabulary, so every Unicode string (without lone surrogates,
  which cannot be UTF-8 encoded) round-trips: ``tok.decode(tok.encode(s)) == s``;
* every id in ``[0, vocab_size)`` decodes to a deterministic string;
* ``out_dir`` holds ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``
  (when transformers writes one), ``vocab.json`` and ``merges.txt``, so
  ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads a fast GPT-2 tokenizer;
* the same ``(vocab_size, seed)`` gives byte-identical files.

Building is fast (well under a second for a 50257 vocabulary): the corpus is a few hundred lines.

Command line: ``python -m export.tokenizer_builder OUT_DIR [--vocab-size N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = ["EOS_TOKEN", "MIN_VOCAB_SIZE", "build_corpus", "build_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
#: 256 byte symbols plus ``<|endoftext|>``.
MIN_VOCAB_SIZE = 257
#: Class name written to tokenizer_config.json; resolves to the fast GPT-2 tokenizer in
#: transformers v5 (and to GPT2TokenizerFast in v4, which prefers fast tokenizers).
_TOKENIZER_CLASS = "GPT2Tokenizer"

# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------

_EN_SUBJECTS = [
    "The cat",
    "A small dog",
    "My neighbour",
    "The old engineer",
    "Our team",
    "The teacher",
    "Every student",
    "The server",
    "This function",
    "The weather",
    "Alice",
    "Bob",
    "The city",
    "A young girl",
    "The committee",
    "Nobody",
    "The river",
    "Your browser",
    "The model",
    "The market",
]
_EN_VERBS = [
    "runs",
    "jumps over",
    "writes",
    "reads",
    "builds",
    "watches",
    "finds",
    "loves",
    "ignores",
    "explains",
    "returns",
    "computes",
    "opens",
    "closes",
    "visits",
    "remembers",
    "sends",
    "receives",
    "carries",
    "paints",
]
_EN_OBJECTS = [
    "the lazy fox",
    "a long letter",
    "the red house",
    "three new books",
    "the final report",
    "an empty box",
    "the mountain road",
    "a cup of coffee",
    "the error message",
    "the old bridge",
    "a bright idea",
    "the evening news",
    "every request",
    "the last train",
    "a quiet garden",
    "the main branch",
    "a strange noise",
    "the first chapter",
    "our shared memory",
    "the answer",
]
_EN_TAILS = [
    "every morning",
    "before lunch",
    "in the park",
    "without a word",
    "at night",
    "on Monday",
    "as usual",
    "again and again",
    "for the first time",
    "with great care",
    "near the station",
    "after the meeting",
    "in 2023",
    "quite slowly",
    "under the table",
    "because it rained",
]
_EN_FREE = [
    "It's a beautiful day, isn't it?",
    "I don't know what you mean.",
    'She said: "Let\'s go home."',
    "Why would anyone do that?!",
    "Well... maybe tomorrow.",
    "They're not here; they've already left.",
    "Hello, world!",
    "Once upon a time, there was a little village by the sea.",
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be: that is the question.",
    "Please read the instructions carefully (all of them).",
    "Wait - what happened here?",
]

_CODE_NAMES = [
    "value",
    "count",
    "index",
    "result",
    "items",
    "config",
    "buffer",
    "token",
    "request",
    "response",
    "data",
    "key",
    "path",
    "name",
    "size",
    "offset",
    "logits",
    "batch",
]
_CODE_FUNCS = [
    "get",
    "load",
    "parse",
    "compute",
    "update",
    "encode",
    "decode",
    "process",
    "render",
    "check",
]


def _nm(r: random.Random) -> str:
    return r.choice(_CODE_NAMES)


def _fn(r: random.Random) -> str:
    return r.choice(_CODE_FUNCS)


_CODE_TEMPLATES: list[Callable[[random.Random], str]] = [
    lambda r: f"def {_fn(r)}_{_nm(r)}(self, {_nm(r)}):",
    lambda r: f"    return {_nm(r)} + {r.randint(0, 99)}",
    lambda r: f"    {_nm(r)} = {_nm(r)}[{r.randint(0, 9)}]",
    lambda r: f"for {r.choice('ijk')} in range(len({_nm(r)})):",
    lambda r: f"        if {_nm(r)} is None:",
    lambda r: f'            raise ValueError("invalid {_nm(r)}: {{!r}}")',
    lambda r: f"import {r.choice(['os', 'sys', 'json', 'numpy as np', 'torch'])}",
    lambda r: f"from {r.choice(['typing', 'pathlib'])} import {r.choice(['Any', 'Path'])}",
    lambda r: f"class {_nm(r).capitalize()}{_fn(r).capitalize()}er:",
    lambda r: f'{{"{_nm(r)}": {r.randint(0, 1000)}, "{_nm(r)}": [{r.randint(0, 9)}], "ok": true}}',
    lambda r: f"const {_nm(r)} = await fetch(`/v1/{_nm(r)}`);",
    lambda r: f"int {_nm(r)} = {_nm(r)} * {r.randint(2, 64)};",
    lambda r: f'\tprintf("%d\\n", {_nm(r)}[{r.choice("ijk")}]);',
    lambda r: f"$ curl -s http://localhost:{r.randint(8000, 8999)}/health | jq .{_nm(r)}",
    lambda r: f"# NOTE: {_fn(r)} the {_nm(r)} lazily",
    lambda r: f"x_{r.randint(0, 9)} = np.zeros(({r.randint(1, 8)}, {r.randint(1, 1024)}))",
    lambda r: f'<div class="{_nm(r)}">{_nm(r)}</div>',
    lambda r: "}",
    lambda r: "    }",
    lambda r: "",
]

_JA_HIRAGANA_WORDS = [
    "ねこ",
    "いぬ",
    "さくら",
    "ありがとう",
    "こんにちは",
    "おはよう",
    "すし",
    "やま",
    "うみ",
    "ともだち",
    "たべもの",
    "おちゃ",
    "きょう",
    "あした",
    "ひらがな",
]
_JA_KATAKANA_WORDS = [
    "コンピューター",
    "プログラム",
    "データ",
    "サーバー",
    "テスト",
    "カメラ",
    "コーヒー",
    "ラーメン",
    "ホテル",
    "テレビ",
    "インターネット",
    "モデル",
    "トークン",
    "カタカナ",
]
_JA_KANJI_WORDS = [
    "日本",
    "東京",
    "学校",
    "先生",
    "学生",
    "電車",
    "会社",
    "天気",
    "時間",
    "世界",
    "言語",
    "漢字",
    "大学",
    "友人",
    "仕事",
    "新聞",
    "図書館",
    "病院",
    "駅",
    "雨",
    "山",
    "川",
    "花",
]
_JA_TEMPLATES = [
    "{a}は{b}が好きです。",
    "私は{a}で{b}を見ました。",
    "{a}に行きたいです。",
    "きのう、{a}と{b}について話しました。",
    "{a}の{b}はとても大きいです！",
    "「{a}」と書いてください。",
    "{a}、{b}、そして{c}。",
    "これは{a}ですか？",
    "今日は{a}で{b}を食べます。",
    "{a}を使って{b}を作りました。",
]

_PUNCT_TEMPLATES: list[Callable[[random.Random], str]] = [
    lambda r: f"{r.randint(1990, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
    lambda r: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}",
    lambda r: f"${r.randint(0, 999)}.{r.randint(0, 99):02d}",
    lambda r: f"{r.randint(0, 100)}% of {r.randint(1, 10000)} requests",
    lambda r: f"{r.randint(1, 99)} + {r.randint(1, 99)} = {r.randint(1, 200)}",
    lambda r: f"({r.randint(1, 9)} * {r.randint(1, 9)}) / {r.randint(1, 9)} - {r.random():.3f}",
    lambda r: f"+1 ({r.randint(100, 999)}) {r.randint(100, 999)}-{r.randint(1000, 9999)}",
    lambda r: f"{r.randint(1, 9)}. {r.choice(_EN_OBJECTS)}; {r.randint(1, 9)}. {_nm(r)}.",
    lambda r: f"https://example.com/{_nm(r)}?id={r.randint(0, 99999)}&page={r.randint(1, 50)}",
    lambda r: f"{_nm(r)}.{_nm(r)}@example.org",
    lambda r: f"{r.randint(0, 10**9):,} / {r.random() * 1000:.2f} ~ {r.random():.2e}",
    lambda r: r.choice(["...", "!!", "??", "?!", "--", "***", "###", "==="]) * r.randint(1, 3),
    lambda r: f"[{r.randint(0, 9)}] ({r.randint(0, 9)}) {{{r.randint(0, 9)}}} <{r.randint(0, 9)}>",
    lambda r: f"v{r.randint(0, 3)}.{r.randint(0, 30)}.{r.randint(0, 9)}",
    lambda r: f"{r.randint(1, 12)}月{r.randint(1, 28)}日 {r.randint(0, 23)}時",
]


def _english_line(r: random.Random) -> str:
    if r.random() < 0.2:
        return r.choice(_EN_FREE)
    sentence = f"{r.choice(_EN_SUBJECTS)} {r.choice(_EN_VERBS)} {r.choice(_EN_OBJECTS)}"
    if r.random() < 0.7:
        sentence += f" {r.choice(_EN_TAILS)}"
    sentence += r.choice([".", ".", ".", "!", "?", ",", ";"])
    if r.random() < 0.3:
        sentence = sentence.lower() if r.random() < 0.5 else sentence.upper()
    if r.random() < 0.15:
        sentence = " " + sentence
    return sentence


def _japanese_line(r: random.Random) -> str:
    pool = _JA_HIRAGANA_WORDS + _JA_KATAKANA_WORDS + _JA_KANJI_WORDS
    template = r.choice(_JA_TEMPLATES)
    return template.format(a=r.choice(pool), b=r.choice(pool), c=r.choice(pool))


def build_corpus(seed: int = 0, n_lines: int = 600) -> list[str]:
    """Return ``n_lines`` lines of varied, deterministic training text for ``seed``.

    Roughly 30 % English, 20 % code-like, 15 % digits and punctuation, 35 % Japanese
    (hiragana, katakana, kanji). Lines are sometimes joined with newlines so the BPE also sees
    ``"\\n"`` and indentation runs inside a training example.
    """
    r = random.Random(seed)
    lines: list[str] = []
    while len(lines) < n_lines:
        roll = r.random()
        if roll < 0.30:
            line = _english_line(r)
        elif roll < 0.50:
            line = r.choice(_CODE_TEMPLATES)(r)
        elif roll < 0.65:
            line = r.choice(_PUNCT_TEMPLATES)(r)
        else:
            line = _japanese_line(r)
        if lines and r.random() < 0.1:
            lines[-1] = lines[-1] + "\n" + line
        else:
            lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _new_byte_level_bpe() -> Tokenizer:
    """An untrained tokenizer with GPT-2's pipeline (as in GPT-2's own tokenizer.json)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _filler_tokens(trained: list[str], count: int, seed: int, taken: set[str]) -> list[str]:
    """`count` new vocab entries, each the concatenation of two trained tokens (seeded order).

    No merge produces them, so encoding never emits them; decoding one gives text that looks
    like the corpus (words, Japanese fragments) rather than a placeholder, which makes a
    random-weight model's output read like text and exercises multi-byte detokenization.
    """
    rng = random.Random(seed ^ 0x5EED)
    out: list[str] = []
    seen = set(taken)
    while len(out) < count:
        candidate = rng.choice(trained) + rng.choice(trained)
        if candidate not in seen:
            seen.add(candidate)
            out.append(candidate)
    return out


def _train(vocab_size: int, seed: int, corpus: Sequence[str] | None = None) -> Tokenizer:
    """Train on `corpus` (the built-in one by default), pad to ``vocab_size - 1`` and append
    ``<|endoftext|>``."""
    n_regular = vocab_size - 1
    tok = _new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=n_regular,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    if corpus is None:
        corpus = build_corpus(seed)
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))

    state = json.loads(tok.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    if len(vocab) < MIN_VOCAB_SIZE - 1 or sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("BPE training produced an unexpected vocabulary")
    # Pad with plain vocab entries that no merge produces (see _filler_tokens).
    trained = sorted(vocab, key=vocab.__getitem__)
    for token_id, filler in enumerate(
        _filler_tokens(trained, n_regular - len(vocab), seed, set(vocab)), start=len(vocab)
    ):
        vocab[filler] = token_id
    tok = Tokenizer.from_str(json.dumps(state, ensure_ascii=False))
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError("tokenizer has the wrong vocabulary size")
    if tok.token_to_id(EOS_TOKEN) != vocab_size - 1:
        raise RuntimeError(f"{EOS_TOKEN} is not the last id")
    return tok


def build_tokenizer(
    out_dir: Path,
    vocab_size: int,
    *,
    seed: int = 0,
    model_max_length: int = 1024,
    corpus: Sequence[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train, save to ``out_dir`` and return a GPT-2-style fast tokenizer of ``vocab_size`` ids.

    ``corpus``: texts to train the merges on instead of the built-in corpus (e.g. the English of
    ``benchmarks.trained_checkpoint``); the contract above holds either way.

    ``out_dir`` is created if needed; existing tokenizer files in it are overwritten. The
    returned object is what ``AutoTokenizer.from_pretrained(out_dir)`` gives, so callers see the
    same tokenizer as a later loader would. ``model_max_length`` only goes into the config
    (GPT-2's context is 1024).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        msg = f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + eos), got {vocab_size}"
        raise ValueError(msg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    backend = _train(vocab_size, seed, corpus)
    # Called through an Any alias: transformers' constructor is untyped (mypy --strict).
    tokenizer_cls: Any = PreTrainedTokenizerFast
    hf_tok = tokenizer_cls(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # keep decode exact (no " ." -> "." rewriting)
        add_prefix_space=False,
    )
    hf_tok.save_pretrained(str(out_dir))
    backend.model.save(str(out_dir))  # vocab.json + merges.txt for slow/legacy loaders

    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = _TOKENIZER_CLASS
    config["add_bos_token"] = False
    config["add_prefix_space"] = False
    config["clean_up_tokenization_spaces"] = False
    config["errors"] = "replace"
    config["model_max_length"] = model_max_length
    config_text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    config_path.write_text(config_text, encoding="utf-8")

    loaded = AutoTokenizer.from_pretrained(str(out_dir))
    if not isinstance(loaded, PreTrainedTokenizerFast):
        raise TypeError(f"AutoTokenizer loaded {type(loaded).__name__}, not a fast tokenizer")
    if len(loaded) != vocab_size or loaded.eos_token_id != vocab_size - 1:
        raise RuntimeError("saved tokenizer does not reload with the expected vocabulary")
    return loaded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-max-length", type=int, default=1024)
    args = parser.parse_args(argv)
    tok = build_tokenizer(
        args.out_dir,
        args.vocab_size,
        seed=args.seed,
        model_max_length=args.model_max_length,
    )
    print(f"wrote {type(tok).__name__} with {len(tok)} ids to {args.out_dir}")


if __name__ == "__main__":
    main()
