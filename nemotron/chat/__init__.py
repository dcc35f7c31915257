"""Conversations: chat templates (`template`), the per-format tags, detection and tool-call syntax
(`formats`), the streaming parser (`parsers`) and the chat turn that the Python API, the server, the
CLI and GRPO share (`turn`)."""
