"""Gateway configuration: one pydantic-settings object, read from GATEWAY_* environment variables.

Built in `create_app()` (never at import time) and passed down; see README "Configuration".
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # An empty variable means unset (`make run MODEL=x` passes GATEWAY_CHAT_TEMPLATE= empty: read
    # as the path "." it crashed the start with "Is a directory").
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=".env", extra="ignore", env_ignore_empty=True)

    environment: str = Field("development", description="development | production")
    host: str = "127.0.0.1"
    port: int = 8080

    # Upstream: the Triton step model and the repository it serves (tokenizer + metadata live there).
    triton_url: str = "127.0.0.1:8001"
    model: str = "gpt2"
    model_version: str = Field("", description="pin a version; empty = the newest READY one")
    repository: Path = Path("model_repository")
    model_instances: int = Field(
        1,
        ge=1,
        description="Triton models serving `model` (it, then <model>_1 ...: one KV pool each, one per GPU); "
        "each new sequence goes to the one with the most free slots and stays there",
    )
    step_timeout_s: float = Field(30.0, gt=0, description="deadline of one Triton step call")
    startup_timeout_s: float = Field(120.0, gt=0, description="how long to wait for Triton at start")

    # Engine core: with `python -m frontend --workers N` (N > 1) one engine-core process runs the
    # scheduler and the HTTP workers reach it over ZeroMQ at this address (set by the launcher);
    # unset = the scheduler runs inside this process.
    engine_core_url: str | None = Field(None, description="ipc:// address of the engine core; unset = in-process")
    engine_core_heartbeat_s: float = Field(1.0, gt=0, description="how often a worker tells the core it is alive")
    engine_core_timeout_s: float = Field(
        5.0, gt=0, description="silence after which the core cancels a worker's generations (and vice versa)"
    )

    # Continuous batching and backpressure (per scheduler: the gateway process, or the engine core).
    max_running: int = Field(256, ge=1, description="sequences stepping together")
    max_waiting: int = Field(1024, ge=0, description="generations queued beyond max_running")
    queue_timeout_s: float = Field(30.0, gt=0)
    prefill_batch: int = Field(
        16, ge=1, description="while sequences decode, new ones start together once this many wait"
    )
    resume_timeout_s: float = Field(
        30.0, ge=0, description="a generation Triton lost (restart) waits this long to start again on it; 0 = fail"
    )
    prefill_hold_ms: float = Field(
        20.0, ge=0, description="...or once the oldest has waited this long (0 = start each at once)"
    )
    default_window: int = Field(64, ge=1, description="top-K window for truncation-free sampling")
    engine_lanes: int = Field(
        0,
        ge=0,
        description="steps in flight at once, each for its own share of the sequences; 0 = the model's kv_partitions",
    )
    decode_ahead: int = Field(
        0,
        ge=0,
        le=16,
        description="decodes a sampled or greedy row runs ahead per step on the model, each fed the model's "
        "proposal, every one judged by the gateway's own sampler (tokens refused are rewound): 1 + this many "
        "tokens per step and round trip; 0 = one token per step",
    )
    batch_invariant: Literal["auto", "on", "off"] = Field(
        "auto",
        description="rows whose tokens must not depend on the rest of the batch: auto = greedy and seeded "
        "generations, on = all, off = none. Flagged rows go to the model's reserved invariant slots (when it "
        "has any) and are resumed after a Triton restart by replaying their tokens, token for token",
    )

    # Request limits (input checks).
    max_new_tokens_limit: int = Field(1024, ge=1)
    max_prompt_chars: int = Field(32_768, ge=1)
    max_batch_requests: int = Field(32, ge=1)
    max_n: int = Field(8, ge=1)
    request_timeout_s: float = Field(
        300.0, gt=0, description="a whole generation's deadline: the default and the most a request's `timeout` gets"
    )

    # Client hygiene and hostile input (frontend/api/client_hygiene.py, docs/security.md).
    max_stop_sequences: int = Field(4, ge=0, description="most stop strings in one request")
    max_stop_chars: int = Field(256, ge=1, description="longest stop string, in characters")
    max_stop_token_ids: int = Field(64, ge=0, description="most stop token ids (stop_token_ids) in one request")
    max_body_bytes: int | None = Field(
        None, ge=1024, description="largest request body; unset = room for the largest legal request (body_limit)"
    )
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within this (else 408)")
    header_timeout_s: float = Field(10.0, gt=0, description="a request head must arrive within this")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after this")
    sse_send_timeout_s: float = Field(
        15.0, gt=0, description="a stream whose reader takes nothing for this long is dropped"
    )

    # Resilience against Triton (frontend.engine.breaker, frontend.engine.triton_client) and lifecycle.
    probe_timeout_s: float = Field(0.5, gt=0, description="deadline of readiness and repository-index calls")
    reconnect_backoff_ms: int = Field(500, ge=50, description="most gRPC waits between reconnect attempts")
    connect_retries: int = Field(2, ge=0, description="re-sends of a token-less step refused as UNAVAILABLE")
    breaker_failures: int = Field(3, ge=1, description="consecutive failed steps that open the circuit breaker")
    breaker_reset_s: float = Field(1.0, gt=0, description="open breaker: seconds between probe steps")
    drain_timeout_s: float = Field(10.0, ge=0, description="SIGTERM: how long in-flight generations may finish")

    # Chat: the Jinja chat template for /v1/chat/completions (Hugging Face format, as vLLM's
    # --chat-template); unset = the checkpoint's own `chat_template`, if it has one.
    chat_template: Path | None = Field(
        None, description="chat template file; wins over the checkpoint's (example: examples/chat_template.jinja)"
    )

    # Result cache: in-process unless a Redis URL is given.
    cache_url: str | None = None
    cache_max_entries: int = Field(4096, ge=1)
    cache_ttl_s: float = Field(3600.0, gt=0)
    cache_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)

    # API keys and rate limits (frontend/security, docs/security.md). A key store turns auth on.
    keys_path: Path | None = Field(None, description="SQLite key store (a file); set it or keys_url to require keys")
    keys_url: str | None = Field(None, description="Redis key store shared by several gateways (wins over keys_path)")
    auth_protect: str = Field("", description="comma list of health, metrics, docs that need an admin key")
    default_key_rpm: int = Field(600, ge=0, description="requests/minute of a key without its own limit; 0 = none")
    default_key_tokens_per_day: int = Field(
        1_000_000, ge=0, description="tokens/UTC day of a key without its own limit; 0 = none"
    )
    ip_rpm: int = Field(600, ge=0, description="requests/minute per client IP while auth is off; 0 = none")
    auth_failures_per_ip: int = Field(20, ge=0, description="failed authentications/minute per IP, then 429")
    ratelimit_url: str | None = Field(None, description="Redis for limits and quotas; unset = this process's memory")
    ratelimit_fail_open: bool = Field(False, description="let requests through unmetered when that Redis is down")
    trusted_proxies: str = Field("", description="comma list of proxy addresses/CIDRs whose X-Forwarded-For counts")
    security_timeout_s: float = Field(0.5, gt=0, le=1.0, description="deadline of one key-store or limit call")

    # Observability (frontend/observability, README "Operations").
    log_format: Literal["text", "json"] = Field("text", description="text, or json: one JSON object per log line")
    access_log: bool = Field(True, description="one access-log line per request on the gateway.access logger")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); unset = no tracing"
    )
    otel_service_name: str = Field("gpt2-gateway", description="service.name of the exported spans")

    @property
    def body_limit(self) -> int:
        """`max_body_bytes`, or room for the largest legal request: `max_batch_requests` prompts of
        `max_prompt_chars` characters, each written as a 6-byte JSON escape, plus 64 KiB."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return self.max_batch_requests * self.max_prompt_chars * 6 + 64 * 1024

    @field_validator("keys_path", "keys_url", "ratelimit_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("otlp_endpoint", mode="before")
    @classmethod
    def _blank_endpoint_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _production_is_explicit(self) -> Settings:
        if self.environment not in {"development", "production", "test"}:
            raise ValueError("GATEWAY_ENVIRONMENT must be development, test or production")
        if self.environment == "production" and not (self.keys_url or self.keys_path):
            raise ValueError(
                "GATEWAY_ENVIRONMENT=production requires API keys: set GATEWAY_KEYS_PATH (SQLite) or GATEWAY_KEYS_URL"
            )
        return self
