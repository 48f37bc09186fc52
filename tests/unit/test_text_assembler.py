"""`TextAssembler` fed events by hand: text, stops and counts without an engine or a clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from export.tokenizer_builder import build_tokenizer
from frontend.engine.events import FinishEvent, PromptLogprobsEvent, TokenEvent
from frontend.generation.assembler import TextAssembler
from frontend.generation.types import GenerationRequest, MergedChunk, PromptLogprobs, TextChunk
from frontend.sampling import SamplingParams

pytestmark = pytest.mark.unit

VOCAB_SIZE = 1000
EOS = VOCAB_SIZE - 1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    tok = build_tokenizer(Path(tmp_path_factory.mktemp("tok")), VOCAB_SIZE)
    assert tok.eos_token_id == EOS
    return tok


def ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def request(tokenizer: PreTrainedTokenizerFast, **options: object) -> GenerationRequest:
    return GenerationRequest(tuple(ids(tokenizer, "Once")), 50, SamplingParams(), request_id=None, **options)  # type: ignore[arg-type]


def feed(text: TextAssembler, events: list[TokenEvent | FinishEvent | PromptLogprobsEvent]) -> list[object]:
    """The items the events give, read as `generate` reads them: until the assembler is finished."""
    items = []
    for event in events:
        if text.finished:
            break
        item = text.push(event)
        if item is not None:
            items.append(item)
    return items


def tokens(token_ids: list[int]) -> list[TokenEvent]:
    return [TokenEvent(t, -0.5, ()) for t in token_ids]


def test_tokens_become_text_and_the_finish_its_reason(tokenizer: PreTrainedTokenizerFast) -> None:
    generated = ids(tokenizer, " upon a time")
    text = TextAssembler(tokenizer, EOS, request(tokenizer))
    items = feed(text, [*tokens(generated), FinishEvent("length")])
    assert text.finished and all(isinstance(i, TextChunk) for i in items)
    done = text.completion(time_to_first_token_s=0.1, total_s=0.5)
    assert done.text == " upon a time" and done.token_ids == generated
    assert (done.finish_reason, done.completion_tokens) == ("length", len(generated))
    assert done.prompt_tokens == len(ids(tokenizer, "Once"))
    assert [c.position for c in done.chunks if c.token_id is not None] == list(range(len(generated)))


def test_a_stop_string_cuts_the_text_and_ends_it(tokenizer: PreTrainedTokenizerFast) -> None:
    text = TextAssembler(tokenizer, EOS, request(tokenizer, stop=(" a",)))
    feed(text, [*tokens(ids(tokenizer, " upon a time")), FinishEvent("length")])
    done = text.completion(time_to_first_token_s=None, total_s=0.0)
    assert done.text == " upon" and done.finish_reason == "stop"


def test_end_of_text_counts_but_is_never_text(tokenizer: PreTrainedTokenizerFast) -> None:
    text = TextAssembler(tokenizer, EOS, request(tokenizer))
    items = feed(text, [*tokens([*ids(tokenizer, " upon"), EOS]), FinishEvent("stop")])
    done = text.completion(time_to_first_token_s=None, total_s=0.0)
    assert done.text == " upon" and done.finish_reason == "stop"
    assert done.completion_tokens == len(ids(tokenizer, " upon")) + 1 and EOS not in done.token_ids
    assert EOS not in [i.token_id for i in items if isinstance(i, TextChunk)]


def test_a_stop_token_ends_it_only_after_min_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    stop = ids(tokenizer, " time")[0]
    events = tokens([stop, *ids(tokenizer, " upon"), stop, *ids(tokenizer, " again")])
    text = TextAssembler(tokenizer, EOS, request(tokenizer, stop_token_ids=(stop,), min_tokens=2))
    feed(text, [*events, FinishEvent("length")])
    done = text.completion(time_to_first_token_s=None, total_s=0.0)
    assert done.finish_reason == "stop" and done.token_ids[-1] == stop
    # The first stop id came before min_tokens: text like any other; the second ended it unseen.
    assert done.text == tokenizer.decode([stop]) + " upon"


def test_the_prompts_logprobs_come_first_and_stay_in_the_completion(tokenizer: PreTrainedTokenizerFast) -> None:
    event = PromptLogprobsEvent((None,), ((),))
    text = TextAssembler(tokenizer, EOS, request(tokenizer))
    items = feed(text, [event, *tokens(ids(tokenizer, " upon")), FinishEvent("length")])
    assert items[0] == PromptLogprobs((None,), ((),))
    done = text.completion(time_to_first_token_s=None, total_s=0.0)
    assert done.prompt_logprobs == (None,) and done.prompt_top_logprobs == ((),)


# ------------------------------------------------------------- take: the events a reader found waiting
def test_take_merges_waiting_tokens_into_the_per_token_chunks(tokenizer: PreTrainedTokenizerFast) -> None:
    """A reader that fell behind gets ONE item for every event waiting: the chunks, text and
    completion are exactly those of the same events read one by one."""
    events = [*tokens(ids(tokenizer, " upon a time there was")), FinishEvent("length")]
    one_by_one = TextAssembler(tokenizer, EOS, request(tokenizer))
    singles = [i for i in feed(one_by_one, events) if isinstance(i, TextChunk)]
    merged = TextAssembler(tokenizer, EOS, request(tokenizer))
    (item,) = merged.take(events)
    assert isinstance(item, MergedChunk) and item.chunks == tuple(singles)
    assert item.text == "".join(c.text for c in singles) == " upon a time there was"
    assert item.token_count == len(events) - 1
    done_1, done_n = (a.completion(time_to_first_token_s=None, total_s=0.0) for a in (one_by_one, merged))
    assert done_n == done_1


def test_take_of_one_token_is_its_chunk(tokenizer: PreTrainedTokenizerFast) -> None:
    """A reader that keeps up finds one event and gets that token's own TextChunk (no merge)."""
    text = TextAssembler(tokenizer, EOS, request(tokenizer))
    first = ids(tokenizer, " upon")[0]
    piece = tokenizer.decode([first])
    assert text.take(tokens([first])) == [TextChunk(piece, first, 0, -0.5, ())]
    assert text.take([]) == []


def test_take_cuts_at_a_stop_string_across_the_merged_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    """A stop string that spans tokens of one merged item cuts exactly where it would one by one,
    and the events after the one that ends the generation are not read."""
    generated = ids(tokenizer, " upon a time there was")
    stop = (" a ti",)  # ends inside " time", begins in " a"
    one_by_one = TextAssembler(tokenizer, EOS, request(tokenizer, stop=stop))
    feed(one_by_one, [*tokens(generated), FinishEvent("length")])
    merged = TextAssembler(tokenizer, EOS, request(tokenizer, stop=stop))
    (item,) = merged.take([*tokens(generated), FinishEvent("length")])
    done_1, done_n = (a.completion(time_to_first_token_s=None, total_s=0.0) for a in (one_by_one, merged))
    assert item.text == done_n.text == done_1.text == " upon"
    assert done_n.finish_reason == done_1.finish_reason == "stop"
    assert done_n.completion_tokens == done_1.completion_tokens < len(generated)


def test_take_gives_the_prompts_logprobs_before_the_merged_text(tokenizer: PreTrainedTokenizerFast) -> None:
    text = TextAssembler(tokenizer, EOS, request(tokenizer))
    items = text.take([PromptLogprobsEvent((None,), ((),)), *tokens(ids(tokenizer, " upon a"))])
    assert items[0] == PromptLogprobs((None,), ((),))
    assert isinstance(items[1], MergedChunk) and items[1].text == " upon a" and len(items) == 2
