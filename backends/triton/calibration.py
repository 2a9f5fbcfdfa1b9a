"""Engine profiles: what a replica measured under load, in the reference engine's terms.

`meshctl engine calibrate` measures a real engine (time to first token against prompt length,
decode step time against batch size, KV blocks per request) and fits the reference engine's
step model to it: prefill cost linear in prompt tokens, a decode step with a fixed part and a
part per running request. The reference engine can then run with the measured physics
(`reference_parameters()` are its config.pbtxt parameters) and capacity planning can read
the same file. Pure: the measuring lives in `meshctl/engine.py`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

__all__ = ["EngineProfile", "fit_line", "fit_profile"]


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y against x; needs two distinct x values."""
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        raise ValueError("a line needs measurements at two different x values at least")
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return mean_y - slope * mean_x, slope


@dataclass(frozen=True)
class EngineProfile:
    """One version's measured physics; times in the units the reference engine takes."""

    model: str
    version_id: str
    triton_model_name: str
    prefill_us_per_token: float  # extra time to first token per prompt token
    decode_step_ms: float  # a decode step's fixed cost
    decode_step_ms_per_request: float  # what each running request adds to a step
    max_active_requests: int  # what the engine reports it can run at once
    kv_tokens_per_block: int
    kv_blocks_per_request: float  # measured at `kv_request_tokens` tokens per request
    kv_request_tokens: int
    samples: dict[str, list[list[float]]] = field(default_factory=dict)  # the raw measurements

    def reference_parameters(self) -> dict[str, str]:
        """The reference engine's config.pbtxt parameters that reproduce these physics."""
        return {
            "prefill_us_per_token": f"{self.prefill_us_per_token:.3f}",
            "decode_step_ms": f"{self.decode_step_ms:.3f}",
            "decode_step_ms_per_request": f"{self.decode_step_ms_per_request:.3f}",
            "max_active_requests": str(self.max_active_requests),
        }

    @classmethod
    def from_json(cls, text: str) -> EngineProfile:
        """Reads what `to_json` wrote; ValueError names what is missing or of the wrong schema."""
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("schema") != 1:
            raise ValueError("an engine profile must be a JSON object with schema 1")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(raw) - {"samples"})
        if missing:
            raise ValueError(f"the engine profile lacks {', '.join(missing)}")
        return cls(**{name: raw[name] for name in names if name in raw})

    def token_rates(self) -> tuple[float, float] | None:
        """One replica's capacity on this engine: (prefill tokens/s when it only prefills, decode
        tokens/s with a full inflight batch of `max_active_requests`); None when a fitted cost
        is zero (a flat, noisy measurement says nothing about the limit)."""
        batch = self.max_active_requests
        step_ms = self.decode_step_ms + self.decode_step_ms_per_request * batch
        if self.prefill_us_per_token <= 0 or step_ms <= 0 or batch < 1:
            return None
        return 1e6 / self.prefill_us_per_token, batch * 1e3 / step_ms

    def to_json(self) -> str:
        return json.dumps({"schema": 1, **asdict(self),
                           "reference_parameters": self.reference_parameters()}, indent=2)


def fit_profile(
    *, model: str, version_id: str, triton_model_name: str,
    prefill: Sequence[tuple[int, float]], decode: Sequence[tuple[int, float]],
    max_active_requests: int, kv_tokens_per_block: int, kv_blocks_per_request: float,
    kv_request_tokens: int,
) -> EngineProfile:
    """`prefill`: (prompt tokens, seconds to first token); `decode`: (batch size, seconds per
    step). Negative fitted costs (noise on a flat curve) are clamped to zero."""
    _, prefill_s_per_token = fit_line([(float(n), s) for n, s in prefill])
    step_intercept_s, step_slope_s = fit_line([(float(b), s) for b, s in decode])
    for name, value in (("prefill", prefill_s_per_token), ("step", step_intercept_s)):
        if not math.isfinite(value):
            raise ValueError(f"the {name} fit is not finite")
    return EngineProfile(
        model=model, version_id=version_id, triton_model_name=triton_model_name,
        prefill_us_per_token=max(0.0, prefill_s_per_token * 1e6),
        decode_step_ms=max(0.0, step_intercept_s * 1e3),
        decode_step_ms_per_request=max(0.0, step_slope_s * 1e3),
        max_active_requests=max_active_requests,
        kv_tokens_per_block=kv_tokens_per_block,
        kv_blocks_per_request=kv_blocks_per_request,
        kv_request_tokens=kv_request_tokens,
        samples={"prefill_tokens_seconds": [[float(n), s] for n, s in prefill],
                 "decode_batch_step_seconds": [[float(b), s] for b, s in decode]},
    )  # fmt: skip
