"""Serving: continuous batching (scheduler.py) behind an OpenAI-compatible HTTP API (api.py), `adamba serve`."""
