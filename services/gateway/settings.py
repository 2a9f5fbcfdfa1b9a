"""Gateway settings (env prefix `INFERMESH_`, as every service)."""

from __future__ import annotations

from pydantic import Field, model_validator

from services.common.settings import BlobCacheSettings, ServiceSettings


class GatewaySettings(ServiceSettings, BlobCacheSettings):
    """The models' tokenizer files come from the registry by digest, kept in the blob cache."""

    http_port: int = Field(
        0, ge=0, le=65535,
        description="Port of the OpenAI-compatible HTTP API, on `host` (0: the OS picks).",
    )
    default_timeout_s: float = Field(120.0, description="A generation's deadline when unset.")
    max_timeout_s: float = Field(600.0, description="The longest deadline a client may ask.")
    heartbeat_interval_s: float = Field(
        15.0, description="Idle time after which a stream gets a Heartbeat frame."
    )
    max_generations_per_stream: int = Field(
        64, description="Generations one GenerateStream may run at once."
    )
    stream_buffer_frames: int = Field(
        256, description="Frames queued for a slow client before generations wait for it."
    )
    reauth_interval_s: float = Field(
        0.5, gt=0, description="How often an open GenerateStream checks its key again: a "
        "revoked or expired key ends it (UNAUTHENTICATED) within this, a changed plan applies "
        "to its next generation.")
    max_stream_age_s: float = Field(
        3600.0, gt=0, description="A GenerateStream's longest life: past it new generations are "
        "refused (UNAVAILABLE, reason stream_max_age: open a new stream) and the stream ends "
        "once those in flight finish.")
    max_connection_age_grace_s: float = Field(
        4260.0, ge=0, description="How long calls open at a connection's GOAWAY may still run: "
        "at least max_stream_age_s + max_timeout_s, so a GenerateStream opened just before its "
        "connection's age ran out retires on its own (its last generation ends) and is never "
        "cut mid-generation.")
    max_body_bytes: int = Field(
        4 << 20, gt=0, description="Largest OpenAI HTTP request body; larger ones get 413 "
        "before they are read whole (the field limits fit well inside the default).")
    prompt_workers: int = Field(
        4, ge=1, description="Threads that render and tokenize long inputs, off the event loop.")
    max_attempts: int = Field(2, description="Tries per generation (retries before first token).")
    failover_max_moves: int = Field(
        2, ge=0, le=8, description="Replicas a generation may move to after its first token when "
        "its replica fails (mid-stream failover; 0: never).")
    failover_stall_s: float = Field(
        30.0, gt=0, description="A streaming replica that sends nothing for this long is taken "
        "as failed and the generation moves on (back to it only when no other replica can "
        "take it).")
    failover_first_chunk_s: float = Field(
        120.0, gt=0, description="A moved generation's replica must send its first chunk within "
        "this long (it prefills the prompt and the moved tokens, maybe queued; never past the "
        "request's deadline); missing it moves the generation on without counting as the "
        "replica's failure.")
    zone: str = Field(
        "", max_length=64,
        description="This gateway's zone: the scheduler prefers replicas in it, and the SLI "
        "metrics carry it as their `zone` label (empty: none).",
    )
    max_running: int = Field(
        64, description="Generations this gateway runs at once; the rest wait in fair queues."
    )
    max_queued_per_tenant: int = Field(32, description="Waiting generations per tenant.")
    max_queued: int = Field(512, description="Waiting generations in all.")
    queue_aging_s: float = Field(5.0, description="Waiting this long lifts a class by one.")
    max_queue_wait_s: float = Field(30.0, description="Longest wait before shedding (overload).")
    idempotency_ttl_s: float = Field(
        600.0, description="How long a finished outcome answers repeats of its idempotency key."
    )
    max_choices: int = Field(
        8, ge=1, le=128, description="The most choices (OpenAI's `n`) one request may ask for; "
        "each is a generation of its own, charged as one.")
    response_cache_ttl_s: float = Field(
        60.0, gt=0, description="How long a deterministic answer is replayed to its repeats "
        "(tenants whose plan has response_cache).")
    response_cache_max_tenant_bytes: int = Field(
        8 << 20, gt=0, description="Response-cache memory one tenant may hold (its oldest entry "
        "goes first). Past response_cache_max_bytes the largest tenant loses entries even "
        "below this: it is guaranteed only while response_cache_max_bytes >= tenants × this.")
    response_cache_max_bytes: int = Field(
        64 << 20, gt=0, description="Response-cache memory in all (past it, the largest "
        "tenant's oldest entry goes).")
    shadow_max_in_flight: int = Field(
        4, description="Shadow copies this gateway runs at once; more are dropped, not queued."
    )
    shadow_timeout_s: float = Field(30.0, description="Deadline of one shadow copy.")
    scheduler_budget_s: float = Field(
        1.0, gt=0, description="How long the schedulers get to answer a route (each instance "
        "half of it) before this gateway routes by itself from its own view of the replicas.")
    fallback_retry_s: float = Field(
        0.5, gt=0, description="While routing by itself, how often a route asks the schedulers "
        "again (the first that answers ends the fallback).")
    quota_fail_open: bool = Field(
        True, description="With no ratelimit replica reachable: admit (counted) or refuse."
    )

    @model_validator(mode="after")
    def _streams_fit_their_connections(self) -> GatewaySettings:
        least = self.max_stream_age_s + self.max_timeout_s
        if self.max_connection_age_grace_s < least:
            raise ValueError(
                f"max_connection_age_grace_s ({self.max_connection_age_grace_s:g}) must be >= "
                f"max_stream_age_s + max_timeout_s ({least:g}): a stream would be cut "
                "mid-generation")
        return self
