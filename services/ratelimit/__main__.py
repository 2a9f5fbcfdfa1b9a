"""Runs the ratelimit service: `python -m services.ratelimit`."""

from services.common.runtime import main
from services.common.settings import ServiceSettings
from services.ratelimit.server import setup

if __name__ == "__main__":
    main("ratelimit", ServiceSettings(), setup)
