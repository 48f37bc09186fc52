"""The served model as the gateway sees it: name, version, tokenizer and shape facts, read from
the version directory the exporter wrote (metadata.json + tokenizer/; names and keys are the
contract's, `step_model.contract`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from step_model import contract


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
        meta_path = version_dir / contract.VERSION_METADATA
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: is the gateway's repository the one Triton serves?")
        meta = json.loads(meta_path.read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(version_dir / contract.VERSION_TOKENIZER))
        return cls(
            name=name,
            version=version,
            tokenizer=tokenizer,
            vocab_size=int(meta[contract.META_VOCAB_SIZE]),
            max_context=int(meta[contract.META_MAX_CONTEXT]),
            eos_token_id=int(meta[contract.META_EOS_TOKEN_ID]),
            dtype=str(meta[contract.META_DTYPE]),
            source=str(meta.get(contract.META_SOURCE, "")),
            created=int(meta_path.stat().st_mtime),
        )
