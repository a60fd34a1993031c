"""The OpenAI-compatible server (needs the `serve` extra: fastapi, uvicorn, prometheus-client)."""

from .app import ApiError, Server, create_app, default_model_name

__all__ = ["ApiError", "Server", "create_app", "default_model_name"]
