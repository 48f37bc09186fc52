"""The token-quota hook of the generation service.

The auth dependency puts the caller's `TokenAccount` in `current_account` (None = no token quota);
`GenerationService.stream` wraps each generation in `account.metered(...)`:

* at admission it reserves prompt + max_new_tokens (429 when that does not fit today's quota);
* when the generation completes it settles to the real prompt + completion tokens;
* when it fails (an error raised by the server side) the whole reservation is refunded;
* when the client goes away early it is charged the prompt plus the tokens generated so far
  (otherwise a client could take long generations for free by disconnecting before the end).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class TokenAccount(Protocol):
    def metered(self, items: AsyncIterator[T], *, prompt_tokens: int, max_new_tokens: int) -> AsyncIterator[T]: ...


current_account: ContextVar[TokenAccount | None] = ContextVar("gateway_token_account", default=None)


class Reservation(Protocol):
    async def settle(self, used: int) -> None: ...


class Reserver(Protocol):
    async def reserve(self, amount: int) -> Reservation: ...


async def metered(
    reserver: Reserver, items: AsyncIterator[Any], *, prompt_tokens: int, max_new_tokens: int
) -> AsyncIterator[Any]:
    """Yield `items`, reserving before the first and settling after the last (see module doc).
    Items with `completion_tokens` are the final result; items with a `token_count` carry tokens."""
    reservation = await reserver.reserve(prompt_tokens + max_new_tokens)
    used = prompt_tokens
    failed = False
    try:
        async with aclosing(items):  # type: ignore[type-var]
            async for item in items:
                if hasattr(item, "completion_tokens"):
                    used = int(item.prompt_tokens) + int(item.completion_tokens)
                else:
                    used += getattr(item, "token_count", 0)  # a merged chunk carries several
                yield item
    except Exception:
        failed = True
        raise
    finally:
        await reservation.settle(0 if failed else min(used, prompt_tokens + max_new_tokens))
