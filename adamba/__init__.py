"""adamba: elastic-compute small language models, from tokenizer to chat."""

from .config import ModelConfig, TrainConfig
from .model import AdambaLM

__all__ = ["AdambaLM", "ModelConfig", "TrainConfig"]
__version__ = "0.1.0"
