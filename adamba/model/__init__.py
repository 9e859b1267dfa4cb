from .model import AdambaLM

__all__ = ["AdambaLM"]
