"""The step model's contract: the one place its wire tensors, dtypes, row statuses, request
parameters, config parameters, metadata keys and ONNX graph names are written down.

Imported by the exporter (the graph, config.pbtxt, metadata.json), the Triton model
(`triton_model.py`), the engine and the gateway (its Triton client, its reader of metadata.json
and config.pbtxt), so the three deployables (build time, inside Triton, the gateway) cannot drift
apart; each ships this package (the exporter copies it into every model version, the gateway's
image copies it beside `frontend/`). Pure Python: importing it pulls in neither torch nor ONNX
Runtime, nor anything outside the standard library.

- this module: the Triton wire contract below, config parameter keys, metadata keys, file names;
- `graph_io`: the ONNX graph's own input and output names (exporter and engine);
- `model_config`: config.pbtxt's `parameters`, written and read (exporter, gateway, Triton model).

A step request carries N rows (the batch dimension), one per sequence:

  SEQUENCE_ID uint64 [N,1]  the caller's id of the sequence
  INPUT_IDS   int64  [N,T]  new tokens, right-padded (the prompt on a start row, one token when
                            decoding, none when only fetching or releasing)
  LENGTH      int32  [N,1]  how many of INPUT_IDS[i] are real
  START       bool   [N,1]  the row's tokens are a new sequence's prompt (it takes a KV slot)
  END         bool   [N,1]  free the sequence's slot after this step
  TEMPERATURE fp32   [N,1]  logits are divided by it (1.0 for greedy)
  EXTRA_IDS   int64  [N,E]  optional: per row, token ids whose logits the caller adjusts itself
                            (penalties, logit_bias, banned ids), padded with -1
  DRAW        fp64   [N,4]  optional: per row (u, top_p, top_k, min_p): the caller's uniform and
                            cuts, for a draw on the device when the window cannot hold the cut
                            (step_model/draw.py); u < 0: not asked
  AHEAD_U     fp64   [N,A]  optional, with PARAM_AHEAD: per row, the uniforms of the decodes it runs
                            ahead of its answer (below; entries past the row's own count ignored)

and answers, per row:

  STATUS      int32  [N,1]  RowStatus: OK, or why this row alone was refused (nothing changed
                            for a refused row; the others ran)
  TOPK_LOGITS fp32   [N,K]  the K largest temperature-scaled logits, descending (a row with
                            EXTRA_IDS: the K largest among the other tokens)
  TOPK_IDS    int64  [N,K]  their token ids
  LOGSUMEXP   fp32   [N,1]  log-sum-exp of the whole scaled row
  LOGITS      fp32   [N,V]  the whole scaled row; only when the caller requests this output
  EXTRA_LOGITS fp32  [N,E]  with EXTRA_IDS: the scaled logits of those ids (0 at padding)
  DRAWN_IDS   int64  [N,1]  with DRAW: the token drawn on the device from the whole row, exactly as
                            the caller's own full-row sampler would; -1 where not drawn
  DRAWN_LOGITS fp32  [N,1]  its scaled logit (logprob = it - LOGSUMEXP)
  REST_LOGSUMEXP fp32 [N,1] with EXTRA_IDS: log-sum-exp of the scaled row WITHOUT those ids (computed
                            by masking them, not by subtraction: no cancellation), so the caller
                            can renormalise a row whose EXTRA_IDS logits it changed exactly

Running ahead (PARAM_AHEAD, docs/architecture.md "Multi-token steps"): a decode row may run a >= 0
more decodes in the same execution, each fed the token the model proposes for the one before (from
the window, exactly the caller's selection for that row's cuts and uniform: DRAW's cuts, AHEAD_U's
uniform, u < 0 in DRAW the argmax; drawn from the whole row where the cut is not inside the window).
The answers above (TOPK_*, LOGSUMEXP, DRAWN_*, LOGITS) are then those of the row's LAST decode, and
the a decodes before it answer in

  AHEAD_TOPK_LOGITS fp32 [N,A,K]  each ahead decode's window (A = the request's largest a)
  AHEAD_TOPK_IDS int64  [N,A,K]
  AHEAD_LOGSUMEXP fp32  [N,A]
  AHEAD_IDS   int64  [N,A]  the token the model proposed there and fed to the next decode (-1 past
                            the row's a)
  AHEAD_LOGITS fp32  [N,A]  its scaled logit
  AHEAD_DRAWN bool   [N,A]  it was drawn from the whole row (as DRAWN_IDS: the caller's full-row
                            sampler's token for that uniform), not from the window

The caller keeps its own sampler as the judge: it samples each ahead window with its own uniform and
accepts the proposals up to the first that differs (a drawn one it takes as drawn); the tokens fed
after that are wrong, so its next decode row names PARAM_REWIND, the cached tokens to drop first.

Request parameter `logits_window` (int) sets K. A malformed request (wrong shapes, a sequence
twice) fails as a whole with a Triton error and changes nothing.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from step_model.contract import graph_io, model_config

__all__ = ["graph_io", "model_config"]  # the submodules; the names below are the wire contract

# ------------------------------------------------------------------------ tensors
SEQUENCE_ID: Final = "SEQUENCE_ID"
INPUT_IDS: Final = "INPUT_IDS"
LENGTH: Final = "LENGTH"
START: Final = "START"
END: Final = "END"
TEMPERATURE: Final = "TEMPERATURE"
EXTRA_IDS: Final = "EXTRA_IDS"
DRAW: Final = "DRAW"
AHEAD_U: Final = "AHEAD_U"

STATUS: Final = "STATUS"
TOPK_LOGITS: Final = "TOPK_LOGITS"
TOPK_IDS: Final = "TOPK_IDS"
LOGSUMEXP: Final = "LOGSUMEXP"
LOGITS: Final = "LOGITS"
EXTRA_LOGITS: Final = "EXTRA_LOGITS"
REST_LOGSUMEXP: Final = "REST_LOGSUMEXP"
DRAWN_IDS: Final = "DRAWN_IDS"
DRAWN_LOGITS: Final = "DRAWN_LOGITS"
# Prompt logprobs (OpenAI's `echo` with `logprobs`), for start rows that ask (PARAM_PROMPT_LOGPROBS):
# [N, T]: position t holds log p(token t | tokens < t) of the row's prompt, unscaled (temperature
# 1); position 0 and positions past the prompt hold 0. [N, T, K]: the K most likely tokens there.
AHEAD_TOPK_LOGITS: Final = "AHEAD_TOPK_LOGITS"
AHEAD_TOPK_IDS: Final = "AHEAD_TOPK_IDS"
AHEAD_LOGSUMEXP: Final = "AHEAD_LOGSUMEXP"
AHEAD_IDS: Final = "AHEAD_IDS"
AHEAD_LOGITS: Final = "AHEAD_LOGITS"
AHEAD_DRAWN: Final = "AHEAD_DRAWN"
PROMPT_LOGPROBS: Final = "PROMPT_LOGPROBS"
PROMPT_TOP_IDS: Final = "PROMPT_TOP_IDS"
PROMPT_TOP_LOGPROBS: Final = "PROMPT_TOP_LOGPROBS"

# name -> (Triton data type, dims after the batch dimension; -1 = variable)
INPUTS: Final[dict[str, tuple[str, list[int]]]] = {
    SEQUENCE_ID: ("UINT64", [1]),
    INPUT_IDS: ("INT64", [-1]),
    LENGTH: ("INT32", [1]),
    START: ("BOOL", [1]),
    END: ("BOOL", [1]),
    TEMPERATURE: ("FP32", [1]),
    EXTRA_IDS: ("INT64", [-1]),
    DRAW: ("FP64", [4]),
    AHEAD_U: ("FP64", [-1]),
}
OPTIONAL_INPUTS: Final = frozenset({EXTRA_IDS, DRAW, AHEAD_U})
OUTPUTS: Final[dict[str, tuple[str, list[int]]]] = {
    STATUS: ("INT32", [1]),
    TOPK_LOGITS: ("FP32", [-1]),
    TOPK_IDS: ("INT64", [-1]),
    LOGSUMEXP: ("FP32", [1]),
    LOGITS: ("FP32", [-1]),
    EXTRA_LOGITS: ("FP32", [-1]),
    REST_LOGSUMEXP: ("FP32", [1]),
    DRAWN_IDS: ("INT64", [1]),
    DRAWN_LOGITS: ("FP32", [1]),
    PROMPT_LOGPROBS: ("FP32", [-1]),
    PROMPT_TOP_IDS: ("INT64", [-1, -1]),
    PROMPT_TOP_LOGPROBS: ("FP32", [-1, -1]),
    AHEAD_TOPK_LOGITS: ("FP32", [-1, -1]),
    AHEAD_TOPK_IDS: ("INT64", [-1, -1]),
    AHEAD_LOGSUMEXP: ("FP32", [-1]),
    AHEAD_IDS: ("INT64", [-1]),
    AHEAD_LOGITS: ("FP32", [-1]),
    AHEAD_DRAWN: ("BOOL", [-1]),
}
PROMPT_OUTPUTS: Final = (PROMPT_LOGPROBS, PROMPT_TOP_IDS, PROMPT_TOP_LOGPROBS)
# Outputs of a step that carries EXTRA_IDS.
EXTRA_OUTPUTS: Final = (EXTRA_LOGITS, REST_LOGSUMEXP)
# Outputs of a step that carries DRAW.
DRAW_OUTPUTS: Final = (DRAWN_IDS, DRAWN_LOGITS)
# Outputs of a step whose rows run ahead (PARAM_AHEAD).
AHEAD_OUTPUTS: Final = (AHEAD_TOPK_LOGITS, AHEAD_TOPK_IDS, AHEAD_LOGSUMEXP, AHEAD_IDS, AHEAD_LOGITS, AHEAD_DRAWN)
# Outputs every step asks for; LOGITS only when full rows are needed.
STEP_OUTPUTS: Final = (STATUS, TOPK_LOGITS, TOPK_IDS, LOGSUMEXP)

# ------------------------------------------------------------------------ parameters
PARAM_LOGITS_WINDOW: Final = "logits_window"
# The gateway's request ids of the step's rows, comma-separated in row order ("" for a row without
# one, e.g. a release): a step carries many generations, so Triton's own request id names the
# step and this names its rows (the model's log lines about a row quote its request id).
PARAM_REQUEST_IDS: Final = "request_ids"
# Per row, comma-separated: -1, or k >= 0 to get the row's prompt logprobs with k alternatives
# (start rows only; PROMPT_OUTPUTS must be requested). One extra eager pass over those prompts.
PARAM_PROMPT_LOGPROBS: Final = "prompt_logprobs"
# The KV partition (0 <= p < CONFIG_KV_PARTITIONS) the request's start rows take their slots from
# (any other partition when it is full). A gateway that keeps several steps in flight gives each its
# own partition, so each decode runs over its own contiguous slot range, not the whole pool.
PARAM_KV_PARTITION: Final = "kv_partition"
# Per row, comma-separated 0/1: 1 = the row's outputs must not depend on the other rows of its steps
# (a seeded or greedy generation). With CONFIG_INVARIANT_SLOTS > 0 such a start row takes a slot of
# the reserved invariant range, is prefilled alone, and decodes in that range's own run of a fixed
# row count; without, the flag changes nothing (see docs/architecture.md, "Batch invariance").
PARAM_INVARIANT_ROWS: Final = "invariant_rows"
# Per row, comma-separated: -1, or p >= 1 on a start row: only its first p tokens are the prompt
# (prefilled); the rest were generated before the server lost the sequence and are replayed one
# decode run each, teacher-forced, so the rebuilt cache is the lost one bit for bit. The row's
# answer is the step after its last token.
PARAM_REPLAY_FROM: Final = "replay_from"
# Per row, comma-separated: a >= 0 on a decode row: decodes it runs ahead of its answer, each fed the
# model's proposal (AHEAD_U, AHEAD_OUTPUTS); the row caches 1 + a tokens. 0 elsewhere.
PARAM_AHEAD: Final = "ahead"
# Per row, comma-separated: r >= 0 on a decode row: drop the row's last r cached tokens before its
# input (the tokens fed after a proposal the caller did not accept). 0 elsewhere.
PARAM_REWIND: Final = "rewind"


class RowStatus(IntEnum):
    """Per-row outcome of a step. Anything but OK means the row did not run and changed nothing."""

    OK = 0
    CACHE_FULL = 1  # a start row found no free KV slot: retry it at a later step
    NOT_FOUND = 2  # the sequence is unknown (never started, ended, or evicted as idle)
    ALREADY_EXISTS = 3  # a start row names a live sequence
    INVALID = 4  # the row itself is malformed (empty prompt, too long, bad token id, ...)


# ------------------------------------------------------------------------ request-level errors
class ErrorCode:
    """Triton error codes the model answers a whole failed request with (pb_utils.TritonError)."""

    INVALID_ARG: Final = "INVALID_ARG"
    UNAVAILABLE: Final = "UNAVAILABLE"
    INTERNAL: Final = "INTERNAL"


# ------------------------------------------------------------------------ model config parameters
# config.pbtxt `parameters` (written and read by `model_config`), each overridable at serve time by
# the environment variable `model_config.env_name(key)` (GPT2_<KEY>).
CONFIG_KV_CAPACITY: Final = "kv_capacity"
CONFIG_IDLE_TIMEOUT_S: Final = "idle_timeout_s"
CONFIG_DEFAULT_WINDOW: Final = "default_window"
CONFIG_DEVICE: Final = "device"
CONFIG_STRICT_DEVICE: Final = "strict_device"
CONFIG_CUDA_GRAPHS: Final = "cuda_graphs"
# The KV pool is cut into this many equal contiguous slot ranges (PARAM_KV_PARTITION); default 1.
CONFIG_KV_PARTITIONS: Final = "kv_partitions"
# How rows are drawn on the device (step_model.draw): "auto" (a sort on CUDA, value bins in numpy on
# the CPU), "sort", "bins" (value bins in torch) or "host" (value bins in numpy).
CONFIG_DRAW_METHOD: Final = "draw_method"
# KV slots reserved at the top of the pool for rows flagged invariant (PARAM_INVARIANT_ROWS); 0 = none
# (default). Their decode runs over exactly this many rows whatever the number of live ones.
CONFIG_INVARIANT_SLOTS: Final = "invariant_slots"

# ------------------------------------------------------------------------ metadata.json keys
META_N_LAYER: Final = "n_layer"
META_N_HEAD: Final = "n_head"
META_HEAD_DIM: Final = "head_dim"
META_VOCAB_SIZE: Final = "vocab_size"
META_MAX_CONTEXT: Final = "max_context"
META_DTYPE: Final = "dtype"
META_EOS_TOKEN_ID: Final = "eos_token_id"
META_SOURCE: Final = "source"
# Written for people and tools (the engine and the gateway do not read them):
META_N_EMBD: Final = "n_embd"
META_PARITY: Final = "parity"  # the exporter's parity check against transformers
META_EXPORTED_AT: Final = "exported_at"
META_VERSION: Final = "version"

# Files of a model version (besides the package copy of this directory).
VERSION_ONNX: Final = "model.onnx"
VERSION_METADATA: Final = "metadata.json"
VERSION_TOKENIZER: Final = "tokenizer"
VERSION_ENTRY: Final = "model.py"  # Triton's Python backend loads <version>/model.py
