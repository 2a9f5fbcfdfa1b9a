"""The stream safety filter: a version's `safety.blocked_phrases` end its output.

Text is held back just long enough to catch a phrase split across engine chunks (the longest
phrase's length minus one character), so a blocked phrase is never sent, not even in part; the
text before it is. Without phrases nothing is held back.
"""

from __future__ import annotations

import re


class StreamFilter:
    """One generation's filter: `feed` each piece of engine text, `flush` at the end."""

    def __init__(self, phrases: tuple[str, ...]):
        self._pattern = (re.compile("|".join(re.escape(p) for p in phrases), re.IGNORECASE)
                         if phrases else None)
        self._holdback = max((len(p) for p in phrases), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that may be sent now, whether a blocked phrase came up: then stop)."""
        if self._pattern is None:
            return text, False
        self._pending += text
        found = self._pattern.search(self._pending)
        if found is not None:
            safe, self._pending = self._pending[:found.start()], ""
            return safe, True
        cut = max(len(self._pending) - self._holdback, 0)
        safe, self._pending = self._pending[:cut], self._pending[cut:]
        return safe, False

    def flush(self) -> str:
        """What was held back, once the engine has finished."""
        rest, self._pending = self._pending, ""
        return rest
