"""The OpenAI-compatible server (needs the `serve` extra: fastapi, uvicorn, prometheus-client)."""

from .app import ApiError, Server, create_app, default_model_name
from .settings import AccessSettings, RaySettings, ServerSettings, ServeSettings

__all__ = ["AccessSettings", "ApiError", "RaySettings", "Server", "ServerSettings", "ServeSettings", "create_app",
           "default_model_name"]
