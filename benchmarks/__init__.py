"""Benchmark tooling for the GPT-2 text-generation service.

- `python -m benchmarks.load`: asyncio + httpx load generator against a running gateway.
- `python -m benchmarks.baseline`: the plain-transformers `generate()` baseline the service must beat.
- `benchmarks.report`: pure helpers both use (percentiles, summaries, markdown/CSV, machine info).

Importing this package has no side effects; nothing runs until a module's `main()` is called.
"""
