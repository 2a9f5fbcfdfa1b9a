"""Runs the scheduler service: `python -m services.scheduler`."""

from services.common.runtime import main
from services.common.settings import ServiceSettings
from services.scheduler.server import setup

if __name__ == "__main__":
    main("scheduler", ServiceSettings(), setup)
