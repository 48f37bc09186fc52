"""`TextAssembler`: one generation's events turned into stream items, with no engine and no
clock (TGI's `StoppingCriteria` and incremental detokenizing as one small object).

Tokens are detokenized incrementally (never splitting a character) and cut at stop strings and
stop token ids, both counted only once `min_tokens` were generated (vLLM's order); the
end-of-text token counts as a completion token but is never shown as text (unless `ignore_eos`);
the prompt's logprobs are passed on. `push` answers each event with at most one item; `take`
answers the events a reader found waiting with one text item for all of them (a `MergedChunk` when
several tokens gave text); once `finished`, `completion` gives the whole result.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from frontend.engine.events import FinishEvent, PromptLogprobsEvent, TokenEvent
from frontend.generation.types import (
    Completion,
    GenerationRequest,
    MergedChunk,
    PromptLogprobs,
    StreamItem,
    TextChunk,
)
from frontend.text import IncrementalDecoder, StopMatcher

__all__ = ["TextAssembler"]


class TextAssembler:
    def __init__(
        self, tokenizer: Any, eos_token_id: int, req: GenerationRequest, *, per_token_text: bool = True
    ) -> None:
        """`per_token_text`: every token's `TextChunk` carries the text it released (the result
        cache stores them so). False lets `take` detokenize the plain tokens read together in one
        call, their text carried by the first of them (the others ""); the items' text, and the
        completion's, are the same either way."""
        self.req = req
        self.eos_token_id = eos_token_id
        self.decoder = IncrementalDecoder(tokenizer, req.prompt_ids, skip_special_tokens=req.skip_special_tokens)
        self.matcher = StopMatcher(req.stop, include_stop=req.include_stop_str_in_output)
        self.stop_token_ids = frozenset(req.stop_token_ids)
        # Tokens whose text nothing can cut (no stop string, no stop id) may share one decode.
        self._together = not per_token_text and not req.stop and not req.stop_token_ids
        self.chunks: list[TextChunk] = []
        self.token_ids: list[int] = []
        self.generated = 0  # completion tokens, end-of-text included
        self.prompt_event: PromptLogprobsEvent | None = None
        self.finish_reason = "length"
        self.finished = False  # nothing after this counts: the caller stops reading events

    def push(self, event: TokenEvent | PromptLogprobsEvent | FinishEvent) -> StreamItem | None:
        """The item `event` gives, if any (an ErrorEvent is the caller's to raise)."""
        if type(event) is TokenEvent:
            return self.token(event)
        if isinstance(event, PromptLogprobsEvent):
            self.prompt_event = event
            return PromptLogprobs(event.logprobs, event.top_logprobs)
        assert isinstance(event, FinishEvent)
        return self.finish(event.reason)

    def take(self, events: Iterable[TokenEvent | PromptLogprobsEvent | FinishEvent]) -> list[StreamItem]:
        """The items `events` give, in order, with the text of all of them as ONE item: the events
        that were waiting when the reader pulled (a slow reader, or one in a process behind its
        engine, gets several tokens per chunk; one that keeps up finds one event and gets that
        token's `TextChunk`); plain tokens share one decode unless `per_token_text`. Events after
        the one that finishes the generation (a stop string, a stop id) are not read, as `push`
        callers stop."""
        out: list[StreamItem] = []
        texts: list[TextChunk] = []
        run: list[TokenEvent] = []  # plain tokens to detokenize together (per_token_text=False)
        item: StreamItem | None
        together, eos, shown_eos = self._together, self.eos_token_id, self.req.ignore_eos
        for event in events:
            if self.finished:
                break
            if type(event) is TokenEvent:
                if together and (shown_eos or event.token_id != eos):
                    run.append(event)
                    continue
                if run:
                    texts += self._together_chunks(run)
                    run = []
                item = self.token(event)
            else:
                if run:
                    texts += self._together_chunks(run)
                    run = []
                item = self.push(event)
            if isinstance(item, TextChunk):
                texts.append(item)
            elif item is not None:
                out.append(item)  # the prompt's logprobs: always before any token
        if run:
            texts += self._together_chunks(run)
        if len(texts) == 1:
            out.append(texts[0])
        elif texts:
            out.append(MergedChunk(tuple(texts)))
        return out

    def _together_chunks(self, run: list[TokenEvent]) -> list[TextChunk]:
        """Plain tokens (nothing can cut their text) read together: ONE incremental decode, the
        text carried by the first's chunk."""
        if len(run) == 1:
            return [self.token(run[0])]  # type: ignore[list-item]  # a plain token always gives a chunk
        text = self.decoder.push_many([e.token_id for e in run])
        position = self.generated
        self.generated += len(run)
        chunks = [
            TextChunk(text if i == 0 else "", e.token_id, position + i, e.logprob, e.top_logprobs)
            for i, e in enumerate(run)
        ]
        self.token_ids += [e.token_id for e in run]
        self.chunks += chunks
        return chunks

    def token(self, event: TokenEvent) -> TextChunk | None:
        """The text one generated token adds (None for a hidden end-of-text token)."""
        self.generated += 1
        position = self.generated - 1
        # Stop conditions count only once min_tokens were generated (vLLM's order).
        checking = self.generated >= self.req.min_tokens
        if checking and event.token_id in self.stop_token_ids:
            # Ends here whatever the engine does next; its text only when asked for.
            tail = self.decoder.push(event.token_id) if self.req.include_stop_str_in_output else ""
            tail, _ = self.matcher.push(tail + self.decoder.flush())
            tail += self.matcher.flush()
            self.finish_reason, self.finished = "stop", True
            return self._add(TextChunk(tail, event.token_id, position, event.logprob, event.top_logprobs))
        if event.token_id == self.eos_token_id and not self.req.ignore_eos:
            return None  # counted as a completion token, never shown as text
        text = self.decoder.push(event.token_id)
        text, stopped = self.matcher.push(text) if checking else (text, False)
        if stopped:
            self.finish_reason, self.finished = "stop", True
        return self._add(TextChunk(text, event.token_id, position, event.logprob, event.top_logprobs))

    def finish(self, reason: str) -> TextChunk | None:
        """The engine finished (`reason`): the text held back, unless it ends at a stop string."""
        self.finish_reason, self.finished = reason, True
        tail, stopped = self.matcher.push(self.decoder.flush())
        if stopped:
            self.finish_reason = "stop"
        else:
            tail += self.matcher.flush()
        if not tail:
            return None
        chunk = TextChunk(tail, None, None)
        self.chunks.append(chunk)
        return chunk

    def completion(self, *, time_to_first_token_s: float | None, total_s: float) -> Completion:
        prompt = self.prompt_event
        return Completion(
            text="".join(c.text for c in self.chunks),
            token_ids=self.token_ids,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.req.prompt_ids),
            completion_tokens=self.generated,
            cached=False,
            chunks=self.chunks,
            time_to_first_token_s=time_to_first_token_s,
            total_s=total_s,
            prompt_logprobs=None if prompt is None else prompt.logprobs,
            prompt_top_logprobs=None if prompt is None else prompt.top_logprobs,
        )

    def _add(self, chunk: TextChunk) -> TextChunk:
        assert chunk.token_id is not None
        self.token_ids.append(chunk.token_id)
        self.chunks.append(chunk)
        return chunk
