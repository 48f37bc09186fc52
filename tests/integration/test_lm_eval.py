"""lm-evaluation-harness against the gateway, through real lm-eval task files.

The tasks are tests/integration/lm_eval_tasks/ (YAML configs that lm-eval's TaskManager loads,
JSONL data read by the `datasets` json loader): a `multiple_choice` task (one `loglikelihood`
request per choice), a `loglikelihood_rolling` perplexity task (one of its texts is longer than
the tiny model's context, so it is scored in two windows) and a greedy `generate_until` task.
`lm_eval.simple_evaluate` runs them twice on the same locally built checkpoint (random weights,
the locally trained byte-level BPE tokenizer): model `local-completions` against the gateway
(OpenAI completions, the prompts as token ids; echo + logprobs for loglikelihoods) and lm-eval's
own `hf` backend on CPU. Per sample and per request the loglikelihoods agree within 1e-3 (and
whether the choice is the greedy continuation), the tasks' metrics agree, and the generations are
the same text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedded_triton import TritonServer
from tests.conftest import TINY
from tests.integration.conftest import serve_gateway

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
CHOICE, PERPLEXITY, GENERATION = "tiny_choice", "tiny_perplexity", "tiny_generation"
TASKS = [CHOICE, PERPLEXITY, GENERATION]
MAX_LENGTH = 256  # the tiny model's context
# local-completions keeps one position for the token every completion generates (its max_length is
# MAX_LENGTH - 1) and its loglikelihood_rolling takes one more off for the window's context token:
# its windows score MAX_LENGTH - 2 tokens, in prompts of MAX_LENGTH - 1. The hf backend's windows
# score max_length tokens, so it is given MAX_LENGTH - 2 to cut a long text at the same places.
HF_MAX_LENGTH = MAX_LENGTH - 2


@pytest.fixture(scope="module")
def gateway(triton: TritonServer, model_repository: Path) -> Iterator[str]:
    yield from serve_gateway(triton, model_repository)


@pytest.fixture
def task_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """lm-eval's TaskManager over a folder of task files that each include one of lm_eval_tasks/
    and give its data file's absolute path (the checked-in files' data paths are relative to the
    repository root: the `datasets` json loader resolves them against the working directory), with
    the `datasets` cache in tmp_path. Offline: nothing is fetched from the Hugging Face Hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in TASKS:
        dataset_kwargs = {"data_files": {"test": str(TASKS_DIR / f"{name}.jsonl")}, "cache_dir": str(tmp_path / "hf")}
        config = {"include": str(TASKS_DIR / f"{name}.yaml"), "dataset_kwargs": dataset_kwargs}
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return TaskManager(include_path=str(tasks), include_defaults=False)


def _evaluate(model: str, model_args: dict[str, Any], task_manager: Any, **kwargs: Any) -> dict[str, Any]:
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        task_manager=task_manager,
        log_samples=True,
        bootstrap_iters=0,  # no stderr resampling: the metrics are compared, not their spread
        **kwargs,
    )
    assert results is not None
    return dict(results)


def _samples(results: dict[str, Any], task: str) -> dict[int, dict[str, Any]]:
    return {sample["doc_id"]: sample for sample in results["samples"][task]}


def _docs(task: str) -> list[str]:
    return [line for line in (TASKS_DIR / f"{task}.jsonl").read_text().splitlines() if line.strip()]


def test_lm_eval_tasks_through_local_completions_match_its_hf_backend(
    gateway: str, tiny_checkpoint: Path, task_manager: Any
) -> None:
    from transformers import AutoTokenizer

    served = _evaluate(
        "local-completions",
        {
            "base_url": f"{gateway}/v1/completions",
            "model": TINY,
            "tokenizer": str(tiny_checkpoint),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "max_length": MAX_LENGTH,
            "num_concurrent": 1,
            "max_retries": 1,
        },
        task_manager,
    )
    hf_args = {"pretrained": str(tiny_checkpoint), "max_length": HF_MAX_LENGTH}
    reference = _evaluate("hf", hf_args, task_manager, device="cpu", batch_size=1)

    # Every document of every task has a sample, with the same requests on both, one response each.
    for task in TASKS:
        ours, theirs = _samples(served, task), _samples(reference, task)
        assert sorted(ours) == sorted(theirs) == list(range(len(_docs(task)))), task
        for doc_id, sample in ours.items():
            assert sample["arguments"] == theirs[doc_id]["arguments"], (task, doc_id)
            assert len(sample["resps"]) == len(sample["arguments"]), (task, doc_id)

    # Multiple choice: per ending, the loglikelihood of " <ending>" after the context, and whether
    # it is the greedy continuation (true for one ending: see tiny_choice.yaml).
    greedy_seen = False
    for doc_id, sample in _samples(served, CHOICE).items():
        ref = _samples(reference, CHOICE)[doc_id]
        for ((ll, greedy),), ((ref_ll, ref_greedy),) in zip(sample["resps"], ref["resps"], strict=True):
            assert ll == pytest.approx(ref_ll, abs=1e-3), (doc_id, sample["resps"], ref["resps"])
            assert greedy == ref_greedy, (doc_id, sample["resps"], ref["resps"])
            greedy_seen |= greedy
    assert greedy_seen
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"][CHOICE][metric] == reference["results"][CHOICE][metric], metric

    # Perplexity: each text's loglikelihood, summed over its windows (the last text needs two).
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert max(len(tokenizer(sample["target"]).input_ids) for sample in served["samples"][PERPLEXITY]) > MAX_LENGTH
    for doc_id, sample in _samples(served, PERPLEXITY).items():
        ((ll,),) = sample["resps"]
        ((ref_ll,),) = _samples(reference, PERPLEXITY)[doc_id]["resps"]
        assert ll == pytest.approx(ref_ll, abs=1e-3), doc_id
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        ours_metric, their_metric = served["results"][PERPLEXITY][metric], reference["results"][PERPLEXITY][metric]
        assert ours_metric == pytest.approx(their_metric, rel=1e-3), metric

    # Generation: greedy (the task says do_sample false, temperature 0; local-completions sends
    # temperature 0 and, as `stop`, the task's `until` plus the eos token's text, and takes the text
    # as the gateway returns it: the gateway applies the stop strings). The hf backend cuts
    # transformers' greedy text before the first stop string itself; the texts are the same (the
    # last prompt's generation stops at its first token: "").
    for doc_id, sample in _samples(served, GENERATION).items():
        ((text,),) = sample["resps"]
        ((ref_text,),) = _samples(reference, GENERATION)[doc_id]["resps"]
        assert isinstance(text, str) and text == ref_text, (doc_id, text, ref_text)
    assert served["results"][GENERATION]["exact_match,none"] == reference["results"][GENERATION]["exact_match,none"]
