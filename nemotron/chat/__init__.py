"""Conversations: chat templates, the per-format tags and tool-call syntax, the streaming parser and
the chat turn."""
