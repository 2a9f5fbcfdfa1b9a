"""Runs the scheduler service: `python -m services.scheduler`."""

from services.common.runtime import main
from services.scheduler.server import setup
from services.scheduler.settings import SchedulerSettings

if __name__ == "__main__":
    main("scheduler", SchedulerSettings(), setup)
