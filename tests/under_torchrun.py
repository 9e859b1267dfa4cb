"""Fine-tuning under torchrun, for the FSDP-against-DDP tests (test_fsdp.py, test_rl.py):

    python -m torch.distributed.run ... tests/under_torchrun.py sft|rl RUN BASE FSDP(0|1)

Both score replies with a rigged checker that depends on every reply's text (its length's parity), so two runs
agree only if they decode the same, and RL's groups see both outcomes. SFT: echo conversations (test_sft.py), a
validation loss and a chat evaluation every 2 steps. RL: two passes of two minibatches with a KL penalty, so the
old and the reference log-probabilities are both used."""

import sys

from test_sft import echo_conversations

from adamba.config import RL_TRAIN_DEFAULTS, SFT_TRAIN_DEFAULTS, RLConfig, SFTConfig, TrainConfig
from adamba.tasks.base import Items
from adamba.tasks.mixtures import chat_eval_callback
from adamba.train.rl import rl
from adamba.train.sft import sft


class EvenLength(Items):
    def evaluate(self, conversation: dict, answer: str) -> bool:
        return len(answer) % 2 == 0


what, run, base, fsdp = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
even = EvenLength("even", "generative", echo_conversations(12, seed=2))
if what == "sft":
    train = TrainConfig.from_dict({**SFT_TRAIN_DEFAULTS, "run_name": run, "device_batch_size": 2,
                                   "total_batch_size": 2 * 2 * 32, "eval_every": 2, "device": "cpu", "seed": 5,
                                   "fsdp": fsdp})
    sft(SFTConfig(base=base, num_iterations=4, init_lr_frac=1.0, chat_eval_every=2), train, echo_conversations(64),
        echo_conversations(16, seed=1), chat_eval=chat_eval_callback([even], 12), progress=False)
else:
    train = TrainConfig.from_dict({**RL_TRAIN_DEFAULTS, "run_name": run, "device": "cpu", "seed": 3, "fsdp": fsdp})
    rl(RLConfig(base=base, num_steps=2, prompts_per_step=4, samples_per_prompt=4, max_new_tokens=4, eval_every=0,
                eval_items=6, eval_samples=2, init_lr_frac=1.0, ppo_epochs=2, minibatches=2, kl_coef=0.1),
       train, even, even, progress=False)
