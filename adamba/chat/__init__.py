"""The chat format and a conversation with a chat model: render.py (nanochat's token rules), session.py."""
