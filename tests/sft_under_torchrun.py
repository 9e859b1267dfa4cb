"""`sft(...)` under torchrun, for tests/test_fsdp.py: python -m torch.distributed.run ... sft_under_torchrun.py
RUN BASE FSDP(0|1). Echo conversations (test_sft.py), a validation loss and a chat evaluation every 2 steps whose
score depends on every reply's text (its length's parity), so two runs agree only if they decode the same."""

import sys

from test_sft import echo_conversations

from adamba.config import SFT_TRAIN_DEFAULTS, SFTConfig, TrainConfig
from adamba.tasks.base import Items
from adamba.tasks.mixtures import chat_eval_callback
from adamba.train.sft import sft


class EvenLength(Items):
    def evaluate(self, conversation: dict, answer: str) -> bool:
        return len(answer) % 2 == 0


run, base, fsdp = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
train = TrainConfig.from_dict({**SFT_TRAIN_DEFAULTS, "run_name": run, "device_batch_size": 2,
                               "total_batch_size": 2 * 2 * 32, "eval_every": 2, "device": "cpu", "seed": 5,
                               "fsdp": fsdp})
even = EvenLength("even", "generative", echo_conversations(12, seed=2))
sft(SFTConfig(base=base, num_iterations=4, init_lr_frac=1.0, chat_eval_every=2), train, echo_conversations(64),
    echo_conversations(16, seed=1), chat_eval=chat_eval_callback([even], 12), progress=False)
