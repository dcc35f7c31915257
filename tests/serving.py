"""The real `nemotron serve` process on a free loopback port, for the tests that drive it."""

from nemotron.serve.launch import free_port, running_server  # noqa: F401
