"""Token demand per model, measured from the routes the scheduler releases.

`DemandMeter.on_release` is the callback the scheduler servicer calls when a route is released
(the model is the Triton model name it was routed for). It adds the request's prompt tokens
(prefill work) and completion tokens (decode work) to one-second buckets; `rates(model, window)`
averages them over a sliding window. A request's tokens count at its release, so a long
generation shows up at once rather than spread over its life: windows of tens of seconds and
more (the autoscaler's) smooth that out.

The hot path costs a dict lookup and two additions; memory is bounded by the longest window
(one bucket per second per model) and by `max_models`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common import errors
from services.scheduler.autoscale import TokenRates

DEFAULT_MAX_MODELS = 1_024


@dataclass
class _Buckets:
    by_second: OrderedDict[int, list[int]] = field(default_factory=OrderedDict)  # → [prompt, out]


class DemandMeter:
    """Sliding-window prefill and decode tokens/s per model, fed by released routes."""

    def __init__(
        self, max_window_s: float, clock: Callable[[], float] = time.monotonic,
        max_models: int = DEFAULT_MAX_MODELS,
    ):
        if max_window_s < 1:
            raise ValueError("max_window_s: must be >= 1")
        self._keep_s = int(max_window_s) + 1
        self._clock = clock
        self._started = clock()
        self._max_models = max_models
        self._models: OrderedDict[str, _Buckets] = OrderedDict()
        # Called when a model starts to have demand (e.g. a version asked for by id that no
        # replica serves): the publisher tells the placement leader at once, not next period.
        self.on_new_model: Callable[[], None] = lambda: None

    def on_release(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Counts one finished request's tokens against `model` (its Triton model name)."""
        if prompt_tokens < 0:
            raise errors.InvalidArgument("prompt_tokens", "must be >= 0")
        if completion_tokens < 0:
            raise errors.InvalidArgument("completion_tokens", "must be >= 0")
        second = int(self._clock())
        buckets = self._models.get(model)
        if buckets is None:
            if len(self._models) >= self._max_models:
                self._models.popitem(last=False)  # the model released least recently
            buckets = self._models[model] = _Buckets()
            self.on_new_model()
        else:
            self._models.move_to_end(model)
        counts = buckets.by_second.get(second)
        if counts is None:
            counts = buckets.by_second[second] = [0, 0]
            self._prune(buckets, second)
        counts[0] += prompt_tokens
        counts[1] += completion_tokens

    def rates(self, model: str, window_s: float) -> TokenRates:
        """Mean tokens/s over the last `window_s` (over the meter's age while it is younger)."""
        now = self._clock()
        span = max(1.0, min(window_s, now - self._started))
        oldest = now - span
        prompt = completion = 0
        buckets = self._models.get(model)
        if buckets is not None:
            for second, (p, c) in buckets.by_second.items():
                if second + 1 > oldest:  # the bucket [second, second + 1) overlaps the window
                    prompt += p
                    completion += c
        return TokenRates(prompt / span, completion / span)

    def models(self) -> list[str]:
        """Models with any release inside the longest window."""
        horizon = int(self._clock()) - self._keep_s
        return sorted(m for m, b in self._models.items()
                      if b.by_second and next(reversed(b.by_second)) > horizon)

    def _prune(self, buckets: _Buckets, second: int) -> None:
        while buckets.by_second:
            first = next(iter(buckets.by_second))
            if first > second - self._keep_s:
                return
            del buckets.by_second[first]
