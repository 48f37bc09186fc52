"""Issue 15's end-to-end check: the same seeded requests give the same tokens whatever runs beside them.

One phase sends N seeded /v1/completions requests (mixed temperature, top-p, top-k and penalties,
greedy among them; `logprobs: 1`, `ignore_eos`) to a running gateway, `--concurrency` at a time,
while `--other-streams` unseeded streams of other prompts run in a closed loop beside them, and
writes every request's tokens and logprobs to a JSON file. `--compare A.json B.json ...` counts
the requests whose tokens (and logprobs) are identical in every file. Each phase must run against a
freshly started gateway: its result cache is then empty, and no request of a phase can be answered
from it (each seeded request is sent once per phase, and unseeded ones are never cached), which
/v1/completions could not report.

    python -m benchmarks.invariance_check --base-url http://127.0.0.1:8080 --out alone.json
    python -m benchmarks.invariance_check --base-url ... --other-streams 64 --out loaded.json
    python -m benchmarks.invariance_check --compare alone.json loaded.json

`benchmarks/invariance_session.sh` runs the three phases of the issue (alone, under load, across
`--workers 2`) on one exported model and writes the report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

_TEXT = (
    "the of and to in is was for on that with as by at from his her an which be this are were "
    "river city music light winter garden science market history engine ocean letter mountain "
    "quiet early under again after every little between during around answer number people"
)
WORDS = _TEXT.split()


def seeded_requests(n: int, max_tokens: int, model: str) -> list[dict[str, Any]]:
    """N seeded request bodies, the same for a given N (their own generator): prompts of 8-40
    words, a mix of the sampling settings clients send, one in eight greedy."""
    rng = random.Random(15)
    bodies = []
    for i in range(n):
        kind = i % 8
        body: dict[str, Any] = {
            "model": model,
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "logprobs": 1,
            "seed": 1000 + i,
            "temperature": [0.7, 1.0, 0.8, 1.2, 0.7, 0.9, 1.0, 0.0][kind],
            "top_p": [0.9, 1.0, 0.95, 1.0, 0.9, 0.8, 1.0, 1.0][kind],
        }
        if kind in (2, 3, 6):
            body["top_k"] = [0, 0, 50, 20, 0, 0, 100, 0][kind]
        if kind in (4, 5):
            body["presence_penalty"] = 0.5
            body["frequency_penalty"] = 0.3
        if kind == 6:
            body["repetition_penalty"] = 1.1
        bodies.append(body)
    return bodies


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(url, json=body)
    r.raise_for_status()
    data = r.json()
    choice = data["choices"][0]
    lp = choice.get("logprobs") or {}
    return {
        "tokens": lp.get("tokens"),
        "token_logprobs": lp.get("token_logprobs"),
        "text": choice.get("text"),
    }


async def _others(
    client: httpx.AsyncClient, url: str, model: str, stop: asyncio.Event, k: int, done: list[int]
) -> None:
    rng = random.Random(1000 + k)
    while not stop.is_set():
        body = {
            "model": model,
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60))),
            "max_tokens": rng.randint(16, 160),
            "temperature": 0.8,
            "top_k": 50,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            async with client.stream("POST", url, json=body) as r:
                async for _ in r.aiter_lines():
                    if stop.is_set():
                        break
            done[0] += 1
        except httpx.HTTPError:
            await asyncio.sleep(0.1)


async def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    url = args.base_url.rstrip("/") + "/v1/completions"
    bodies = seeded_requests(args.requests, args.max_tokens, args.model)
    limits = httpx.Limits(max_connections=args.concurrency + args.other_streams + 8)
    async with httpx.AsyncClient(timeout=args.timeout_s, limits=limits) as client:
        stop = asyncio.Event()
        finished = [0]
        others = [
            asyncio.create_task(_others(client, url, args.model, stop, k, finished)) for k in range(args.other_streams)
        ]
        if others:
            await asyncio.sleep(args.settle_s)  # the other traffic in full swing first
        gate = asyncio.Semaphore(args.concurrency)

        async def guarded(body: dict[str, Any]) -> dict[str, Any]:
            async with gate:
                return await _one(client, url, body)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(b) for b in bodies))
        wall = time.perf_counter() - t0
        stop.set()
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
    return {
        "phase": args.out.stem,
        "base_url": args.base_url,
        "requests": len(bodies),
        "other_streams": args.other_streams,
        "other_requests_finished": finished[0],
        "concurrency": args.concurrency,
        "wall_s": round(wall, 2),
        "results": {str(b["seed"]): r for b, r in zip(bodies, results, strict=True)},
    }


def compare(paths: list[Path]) -> tuple[str, bool]:
    runs = [json.loads(p.read_text()) for p in paths]
    first = runs[0]["results"]
    same_tokens = same_logprobs = 0
    diverged: list[str] = []
    for key, ref in first.items():
        others = [r["results"].get(key) for r in runs[1:]]
        if all(o is not None and o["tokens"] == ref["tokens"] for o in others):
            same_tokens += 1
            if all(o["token_logprobs"] == ref["token_logprobs"] for o in others):  # type: ignore[index]
                same_logprobs += 1
        else:
            diverged.append(key)
    lines = [
        "| phase | requests | other streams beside them | other requests finished | wall s |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['phase']} | {r['requests']} | {r['other_streams']} | {r['other_requests_finished']} "
            f"| {r['wall_s']} |"
        )
    n = len(first)
    lines += [
        "",
        f"Identical token sequences in every phase: **{same_tokens}/{n}**; "
        f"identical logprobs too: {same_logprobs}/{n}.",
    ]
    if diverged:
        lines.append(f"Diverged (seed): {', '.join(diverged[:20])}{' ...' if len(diverged) > 20 else ''}")
    ok = same_tokens == n
    return "\n".join(lines) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.invariance_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16, help="seeded requests in flight at a time")
    p.add_argument("--other-streams", type=int, default=0, help="unseeded streams running beside them")
    p.add_argument("--settle-s", type=float, default=3.0)
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--out", type=Path, help="this phase's JSON")
    p.add_argument("--compare", type=Path, nargs="+", help="phases' JSON files: identical counts (markdown)")
    args = p.parse_args(argv)
    if args.compare:
        text, ok = compare(args.compare)
        print(text)
        return 0 if ok else 1
    if args.out is None:
        p.error("--out or --compare")
    report = asyncio.run(run_phase(args))
    args.out.write_text(json.dumps(report))
    print(
        f"[invariance] {args.out.stem}: {report['requests']} requests in {report['wall_s']} s beside "
        f"{args.other_streams} streams ({report['other_requests_finished']} finished)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
