"""Streaming text helpers for the gateway: incremental detokenization and stop strings.

Both classes are pure (no I/O) and hold per-request state; create one of each per request.

* :class:`IncrementalDecoder` turns generated token ids into final text chunks that never split
  a multi-byte character; concatenating every ``push`` and the final ``flush`` gives exactly
  ``tokenizer.decode(generated_ids)``.
* :class:`StopMatcher` cuts the text stream at the first stop string (not emitted, OpenAI
  semantics), holding back only text that could still start a stop string.

Typical use per request::

    decoder = IncrementalDecoder(tokenizer, prompt_ids)
    matcher = StopMatcher(stop)
    for token_id in generated:                 # stop generating once `stopped` is True
        chunk, stopped = matcher.push(decoder.push(token_id))
        send(chunk)
        if stopped:
            break
    else:                                      # eos / length: release everything held back
        chunk, stopped = matcher.push(decoder.flush())
        send(chunk if stopped else chunk + matcher.flush())
"""

from frontend.text.detokenize import REPLACEMENT_CHAR, IncrementalDecoder, SupportsDecode
from frontend.text.stop import StopMatcher

__all__ = ["REPLACEMENT_CHAR", "IncrementalDecoder", "StopMatcher", "SupportsDecode"]
