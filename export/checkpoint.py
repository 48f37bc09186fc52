"""Where a model comes from: a real checkpoint through transformers' `from_pretrained`, or a
locally built one with random weights (the real GPT-2 shape, or a tiny one for tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from export.graph import GraphError, check_config

# Random-weight shapes. "gpt2" is the real 124M shape: compute and memory equal the real weights.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 256, "vocab_size": 1024},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257},
}


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded (missing, not GPT-2, unreadable)."""


@dataclass
class Checkpoint:
    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # what to record in metadata: a path, a hub id, or "random:<shape>:seed=<n>"


def load_pretrained(path_or_id: str) -> Checkpoint:
    """Load a GPT-2-family checkpoint and its tokenizer with transformers' real loaders."""
    local = Path(path_or_id)
    if (path_or_id.startswith((".", "/")) or local.exists()) and not local.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path_or_id}")
    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load a config from {path_or_id!r}: {_first_line(err)}") from err
    if getattr(config, "model_type", None) != "gpt2":
        raise GraphError(f"{path_or_id!r} is not a GPT-2 checkpoint (model_type={config.model_type!r})")
    check_config(config)  # before the weights: a setting the graph cannot express ends here
    try:
        model = GPT2LMHeadModel.from_pretrained(path_or_id, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load {path_or_id!r}: {_first_line(err)}") from err
    model.eval()
    return Checkpoint(model, tokenizer, source=path_or_id)


def build_random(shape: str, seed: int, workdir: Path) -> Checkpoint:
    """A GPT-2 with random weights of a named shape and a byte-level BPE tokenizer made here."""
    from export.tokenizer_builder import build_tokenizer

    if shape not in RANDOM_CONFIGS:
        raise CheckpointError(f"unknown random config {shape!r}; choose from {sorted(RANDOM_CONFIGS)}")
    dims = RANDOM_CONFIGS[shape]
    tokenizer = build_tokenizer(workdir / "tokenizer", dims["vocab_size"], seed=seed)
    eos = dims["vocab_size"] - 1
    config = GPT2Config(**dims, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.eval()
    return Checkpoint(model, tokenizer, source=f"random:{shape}:seed={seed}")


def state_dict_numpy(model: GPT2LMHeadModel) -> dict[str, Any]:
    return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
