"""Runs the gateway: `python -m services.gateway`."""

from services.common.runtime import main
from services.gateway.server import setup
from services.gateway.settings import GatewaySettings

if __name__ == "__main__":
    main("gateway", GatewaySettings(), setup, public=True)
