"""benchmarks.trained_checkpoint: English gathered offline, a tokenizer trained on it, a model that
trains, and a directory the exporter loads (the GPU run trains GPT-2's shape for minutes; here the
tiny shape for seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.trained_checkpoint import default_roots, docstrings, main
from export.checkpoint import load_pretrained

pytestmark = pytest.mark.unit


def test_the_corpus_is_python_documentation_gathered_without_importing_it() -> None:
    texts = list(docstrings(default_roots()[:1], 200_000))  # the standard library alone
    assert 200_000 <= sum(map(len, texts)) < 260_000
    assert all(len(t) >= 40 for t in texts)
    assert any("Return" in t for t in texts)  # prose, as docstrings are


def test_a_short_run_writes_a_checkpoint_the_exporter_loads(tmp_path: Path) -> None:
    out = tmp_path / "trained"
    argv = [str(out), "--shape", "tiny", "--minutes", "0.02", "--corpus-mb", "0.3", "--batch", "4"]
    assert main([*argv, "--seq-len", "64", "--eval-windows", "4", "--device", "cpu"]) == 0
    report = json.loads((out / "training.json").read_text())
    assert report["training"]["steps"] >= 1 and report["corpus"]["tokens"] > 10_000
    for weights in ("random_weights", "trained"):
        nucleus = report[weights]["nucleus"]
        assert nucleus["positions"] == 4 * 64 and 1 <= nucleus["median"] <= 1024
    checkpoint = load_pretrained(str(out))
    assert checkpoint.model.config.vocab_size == len(checkpoint.tokenizer) == 1024
    text = "Return the number of items in a container."
    assert checkpoint.tokenizer.decode(checkpoint.tokenizer.encode(text)) == text
