"""Runs the registry service: `python -m services.registry`."""

from services.common.runtime import main
from services.common.settings import ServiceSettings
from services.registry.server import setup

if __name__ == "__main__":
    main("registry", ServiceSettings(), setup)
