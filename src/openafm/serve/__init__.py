"""The server tier: an OpenAI-compatible HTTP API over the runtime's continuous batcher, with
feature adapters as models and a private mode that keeps no user data."""

from openafm.serve.app import create_app
from openafm.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
