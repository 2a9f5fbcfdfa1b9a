"""Runs the auditor service: `python -m services.auditor`."""

from services.auditor.server import setup
from services.auditor.settings import AuditorSettings
from services.common.runtime import main

if __name__ == "__main__":
    main("auditor", AuditorSettings(), setup)
