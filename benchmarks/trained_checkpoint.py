"""`python -m benchmarks.trained_checkpoint OUT_DIR --minutes M`: a GPT-2 checkpoint with realistic
entropy, made here: GPT-2's shape trained for a few minutes on English that every machine has
offline (the docstrings of Python's standard library and of the installed packages: Python's own
documentation and its ecosystem's), with a byte-level BPE tokenizer of GPT-2's vocabulary size
trained on the same text.

Random weights are the worst case for top-p (the nucleus is most of the vocabulary at every
step); a trained model's nucleus is narrow after most tokens and wide at a sentence's start. So the
benchmarks report top-p against top-k on this checkpoint too (issue 16), and this script reports
the nucleus sizes it sees on held-out text, before training (random weights) and after: the
tokens in the top-p nucleus at temperature 0.7 (the seed's request), and how often that is wider
than the gateway's logits window (64 entries).

OUT_DIR gets what `save_pretrained` writes (`python -m export --model OUT_DIR` exports it) and
`training.json` / `training.md` (corpus, tokens seen, losses, nucleus sizes). The weights are made
by this script whenever they are needed and never committed.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import site
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from export.checkpoint import RANDOM_CONFIGS
from export.tokenizer_builder import build_tokenizer

WINDOW = 64  # the gateway's default logits window (GATEWAY_DEFAULT_WINDOW)
NUCLEUS_TEMPERATURE, NUCLEUS_TOP_P = 0.7, 0.9  # the seed's request


def docstrings(roots: list[Path], limit_chars: int) -> Iterator[str]:
    """English prose from Python sources under `roots`: module, class and function docstrings
    (parsed, never imported), in a stable order, until `limit_chars`."""
    total = 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
            except (SyntaxError, ValueError, OSError, RecursionError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    text = ast.get_docstring(node)
                    if text and len(text) >= 40:  # a sentence or more
                        yield text
                        total += len(text)
                        if total >= limit_chars:
                            return


def default_roots() -> list[Path]:
    """The standard library's sources, then the installed packages'."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    for extra in [sysconfig.get_paths()["purelib"], *site.getsitepackages()]:
        path = Path(extra)
        if path.is_dir() and path not in roots:
            roots.append(path)
    return roots


def held_out(model: GPT2LMHeadModel, windows: torch.Tensor, batch: int) -> dict[str, Any]:
    """The loss on `windows` and the tokens in the top-p nucleus (temperature 0.7, top_p 0.9) at
    every position of them, from one forward pass per batch."""
    losses, sizes = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            out = model(input_ids=windows[i : i + batch], labels=windows[i : i + batch])
            losses.append(float(out.loss))
            probs = torch.softmax(out.logits.float() / NUCLEUS_TEMPERATURE, dim=-1).sort(dim=-1, descending=True).values
            before = torch.cumsum(probs, dim=-1) - probs  # mass before each token, in order
            sizes.append((before < NUCLEUS_TOP_P).sum(dim=-1).flatten().cpu().numpy())
    model.train()
    return {"val_loss": float(np.mean(losses)), "nucleus": summarise(np.concatenate(sizes))}


def summarise(sizes: np.ndarray) -> dict[str, float]:
    return {
        "positions": int(sizes.size),
        "median": float(np.median(sizes)),
        "p90": float(np.percentile(sizes, 90)),
        "mean": float(sizes.mean()),
        "wider_than_window": float((sizes > WINDOW).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trained_checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--shape", choices=sorted(RANDOM_CONFIGS), default="gpt2")
    p.add_argument("--minutes", type=float, default=3.0, help="training time (default %(default)s)")
    p.add_argument("--corpus-mb", type=float, default=20.0, help="English text to gather, MB (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows for loss and nucleus sizes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(args.seed)
    started = time.time()

    texts = list(docstrings(default_roots(), int(args.corpus_mb * 1e6)))
    dims = RANDOM_CONFIGS[args.shape]
    vocab = dims["vocab_size"]
    tokenizer = build_tokenizer(args.out_dir, vocab, seed=args.seed, corpus=texts)
    eos = vocab - 1
    encoded = tokenizer.backend_tokenizer.encode_batch(texts)
    flat: list[int] = []
    for e in encoded:
        flat += e.ids
        flat.append(eos)  # documents apart, as GPT-2 was trained
    ids = np.array(flat, dtype=np.int64)
    seq = min(args.seq_len, dims["n_positions"])
    n_held = min(len(ids) // 10, args.eval_windows * (seq + 1))
    train_ids, val_ids = torch.from_numpy(ids[:-n_held]), torch.from_numpy(ids[-n_held:])
    n_val = n_held // seq
    if n_val < 1 or len(train_ids) <= seq + 1:
        raise SystemExit(f"too little text: {len(ids)} tokens for windows of {seq}")
    val = val_ids[: n_val * seq].view(n_val, seq).to(device)
    prepared_s = time.time() - started

    config = GPT2Config(**dims, bos_token_id=eos, eos_token_id=eos)
    model: Any = GPT2LMHeadModel(config)  # transformers' `.to` is typed loosely
    model.to(device)
    before = held_out(model, val, args.batch)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda"
    )
    autocast: Any = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    generator = torch.Generator().manual_seed(args.seed)
    budget_s, warmup, step, losses = args.minutes * 60.0, 50, 0, []
    train_started = time.time()
    model.train()
    while (elapsed := time.time() - train_started) < budget_s:
        # Linear warm-up, then a cosine over the time budget (the step count is not known ahead).
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed / budget_s)))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * max(scale, 0.05)
        starts = torch.randint(0, len(train_ids) - seq - 1, (args.batch,), generator=generator)
        batch = torch.stack([train_ids[s : s + seq] for s in starts.tolist()]).to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            losses.append(float(loss.detach()))
    train_s = time.time() - train_started
    after = held_out(model, val, args.batch)
    model.cpu().save_pretrained(args.out_dir)

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.node(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": args.shape,
        "corpus": {"documents": len(texts), "chars": sum(map(len, texts)), "tokens": len(ids)},
        "training": {
            "steps": step,
            "tokens_seen": step * args.batch * seq,
            "seconds": round(train_s, 1),
            "batch": args.batch,
            "seq_len": seq,
            "lr": args.lr,
            "last_losses": losses[-5:],
        },
        "prepare_seconds": round(prepared_s, 1),
        "random_weights": before,
        "trained": after,
        "nucleus_request": {"temperature": NUCLEUS_TEMPERATURE, "top_p": NUCLEUS_TOP_P, "window": WINDOW},
    }
    (args.out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [("random weights", before), ("trained", after)]
    table = "\n".join(
        f"| {name} | {r['val_loss']:.2f} | {r['nucleus']['median']:.0f} | {r['nucleus']['p90']:.0f} | "
        f"{100 * r['nucleus']['wider_than_window']:.0f}% |"
        for name, r in rows
    )
    md = (
        f"# A trained GPT-2 checkpoint ({args.shape} shape, {report['device']}, {report['date']})\n\n"
        f"{len(texts):,} docstrings ({report['corpus']['chars'] / 1e6:.1f} MB, {len(ids):,} tokens); "
        f"{step:,} steps of {args.batch} x {seq} tokens in {train_s:.0f} s.\n\n"
        f"Nucleus at temperature {NUCLEUS_TEMPERATURE}, top_p {NUCLEUS_TOP_P}, over {after['nucleus']['positions']:,} "
        f"held-out positions:\n\n"
        "| weights | held-out loss | nucleus median | nucleus p90 | wider than the 64-entry window |\n"
        "|---|---|---|---|---|\n" + table + "\n"
    )
    (args.out_dir / "training.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
