"""The served model as the gateway sees it: name, version, tokenizer and shape facts, read from
the version directory the exporter wrote (metadata.json + tokenizer/)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    vocab_size: int
    max_context: int
    eos_token_id: int
    dtype: str
    source: str
    created: int  # unix seconds, for /v1/models

    @classmethod
    def load(cls, repository: Path, name: str, version: str) -> ServedModel:
        version_dir = repository / name / version
        meta_path = version_dir / "metadata.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: is the gateway's repository the one Triton serves?")
        meta = json.loads(meta_path.read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(version_dir / "tokenizer"))
        return cls(
            name=name,
            version=version,
            tokenizer=tokenizer,
            vocab_size=int(meta["vocab_size"]),
            max_context=int(meta["max_context"]),
            eos_token_id=int(meta["eos_token_id"]),
            dtype=str(meta["dtype"]),
            source=str(meta.get("source", "")),
            created=int(meta_path.stat().st_mtime),
        )
