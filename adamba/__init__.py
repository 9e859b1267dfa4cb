"""adamba: elastic-compute small language models, from tokenizer to chat."""

from .config import ModelConfig, TrainConfig
from .model import AdambaLM
from .nanochat import load_nanochat

__all__ = ["AdambaLM", "ModelConfig", "TrainConfig", "load_nanochat"]
__version__ = "0.1.0"
