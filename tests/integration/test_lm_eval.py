"""lm-evaluation-harness against the gateway: its `local-completions` model (OpenAI completions
with echo + logprobs, the prompt as token ids) gives the same per-request loglikelihoods as its
own `hf` backend on the same checkpoint, and its generation requests run.

The requests are lm-eval `Instance`s of the three request types its tasks are made of
(`loglikelihood` for multiple-choice tasks, `loglikelihood_rolling` for perplexity tasks,
`generate_until`), built here instead of through a task file (a task needs a dataset on disk and
the `datasets` loader; the model classes are what talks to the server).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedded_triton import TritonServer
from tests.conftest import TINY
from tests.integration.conftest import serve_gateway

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHOICES = [
    ("The capital of France is", " Paris."),
    ("The capital of France is", " a city by the sea."),
    ("Two plus two equals", " four"),
    ("Two plus two equals", " five hundred"),
]
TEXTS = ["The quick brown fox jumps over the lazy dog. It was a sunny day in the park."]


@pytest.fixture(scope="module")
def gateway(triton: TritonServer, model_repository: Path) -> Iterator[str]:
    yield from serve_gateway(triton, model_repository)


def _instances(request_type: str, arguments: list[tuple[Any, ...]]) -> list[Any]:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=request_type, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)]


def test_local_completions_match_lm_evals_own_hf_backend(gateway: str, tiny_checkpoint: Path) -> None:
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    served = LocalCompletionsAPI(
        base_url=f"{gateway}/v1/completions",
        model=TINY,
        tokenizer=str(tiny_checkpoint),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        max_length=256,  # the tiny model's context
        num_concurrent=1,
        max_retries=1,
    )
    reference = HFLM(pretrained=str(tiny_checkpoint), device="cpu", batch_size=1, max_length=256)

    # Multiple choice: each (context, continuation)'s loglikelihood and whether it is the greedy
    # one; the last continuation is the model's own greedy token, so `is_greedy` is seen True too.
    context = "Once upon a time"
    ids = reference.tok_encode(context)
    with torch.no_grad():
        best = int(reference.model(torch.tensor([ids])).logits[0, -1].argmax())
    choices = [*CHOICES, (context, reference.tok_decode([best]))]
    ours = served.loglikelihood(_instances("loglikelihood", choices))
    theirs = reference.loglikelihood(_instances("loglikelihood", choices))
    for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, theirs, strict=True):
        assert ll == pytest.approx(ref_ll, abs=1e-3)
        assert greedy == ref_greedy
    assert theirs[-1][1] is True

    # Perplexity: the loglikelihood of a whole text.
    ours_rolling = served.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in TEXTS]))
    theirs_rolling = reference.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in TEXTS]))
    assert ours_rolling == pytest.approx(theirs_rolling, abs=1e-3)

    # Generation runs (greedy, until a newline or 8 tokens).
    gen = served.generate_until(
        _instances("generate_until", [("Once upon a time", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False})])
    )
    assert len(gen) == 1 and isinstance(gen[0], str)
