"""Gateway configuration: one pydantic-settings object, read from GATEWAY_* environment variables.

Built in `create_app()` (never at import time) and passed down; see README "Configuration".
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=".env", extra="ignore")

    environment: str = Field("development", description="development | production")
    host: str = "127.0.0.1"
    port: int = 8080

    # Upstream: the Triton step model and the repository it serves (tokenizer + metadata live there).
    triton_url: str = "127.0.0.1:8001"
    model: str = "gpt2"
    model_version: str = Field("", description="pin a version; empty = the newest READY one")
    repository: Path = Path("model_repository")
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
    default_window: int = Field(64, ge=1, description="top-K window for truncation-free sampling")

    # Request limits (input checks).
    max_new_tokens_limit: int = Field(1024, ge=1)
    max_prompt_chars: int = Field(32_768, ge=1)
    max_batch_requests: int = Field(32, ge=1)
    max_n: int = Field(8, ge=1)
    request_timeout_s: float = Field(300.0, gt=0, description="a whole generation's deadline")

    # Result cache: in-process unless a Redis URL is given.
    cache_url: str | None = None
    cache_max_entries: int = Field(4096, ge=1)
    cache_ttl_s: float = Field(3600.0, gt=0)
    cache_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _production_is_explicit(self) -> Settings:
        if self.environment not in {"development", "production", "test"}:
            raise ValueError("GATEWAY_ENVIRONMENT must be development, test or production")
        return self
