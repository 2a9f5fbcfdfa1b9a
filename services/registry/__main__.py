"""Runs the registry service: `python -m services.registry`."""

from services.common.runtime import main
from services.registry.server import setup
from services.registry.settings import RegistrySettings

if __name__ == "__main__":
    main("registry", RegistrySettings(), setup)
