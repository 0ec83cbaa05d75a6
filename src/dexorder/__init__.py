"""Dexorder Gateway: a personal MCP agent per user, and chat with it over several channels."""

__version__ = "0.1.0"
