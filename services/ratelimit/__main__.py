"""Runs the ratelimit service: `python -m services.ratelimit`."""

from services.common.runtime import main
from services.ratelimit.server import setup
from services.ratelimit.settings import RateLimitSettings

if __name__ == "__main__":
    main("ratelimit", RateLimitSettings(), setup)
