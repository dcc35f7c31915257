"""`nemotron serve`: an OpenAI-compatible HTTP server over the continuous-batching engine."""

from nemotron.serve.app import Server, ServerConfig, build_app, serve

__all__ = ["Server", "ServerConfig", "build_app", "serve"]
