"""An EleutherAI lm-evaluation-harness model for adamba checkpoints (`pip install lm-eval`, the optional extra).

    import lm_eval
    from adamba.eval.lm_eval_adapter import AdambaEvalModel
    lm_eval.simple_evaluate(model=AdambaEvalModel("demo", mode="ghost"), tasks=["hellaswag"])

or from the harness's command line, which knows the model once this module is imported (it registers "adamba"):

    python -c "import adamba.eval.lm_eval_adapter, lm_eval.__main__ as m; m.cli_evaluate()" \
        --model adamba --model_args checkpoint=demo,mode=ghost --tasks hellaswag
`mode` is a compute mode or widths (full width by default). Log-likelihoods come from the same scorer as CORE
(`eval/core.score_continuations`); generation goes through the engine.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, resolve_run
from ..common import pick_device
from ..infer.engine import Engine
from ..infer.sampling import SamplingParams
from ..model.compute import Compute
from .core import score_continuations


@register_model("adamba")
class AdambaEvalModel(LM):
    def __init__(self, checkpoint: str, mode: str = "", batch_size: int | str = 16, device: str = "auto",
                 max_gen_toks: int = 256):
        super().__init__()
        loaded = load_checkpoint(resolve_run(checkpoint), pick_device(device))
        if loaded.tokenizer is None:
            raise ValueError(f"checkpoint: {loaded.path} has no tokenizer.pkl; lm-eval requests are text")
        self.model, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self.compute = Compute.parse(self.model.config, width=mode or None, names={"width": "mode"})
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        self.context = self.model.config.sequence_len

    def _pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(tokens, start): context and continuation tokenized together (a merge across the boundary goes to the
        continuation), cropped from the left to the model's context."""
        head = self.tokenizer.encode(context, bos=True)
        whole = self.tokenizer.encode(context + continuation, bos=True)
        start = len(head)
        while start > 1 and whole[:start] != head[:start]:
            start -= 1
        if len(whole) > self.context:
            cut = len(whole) - self.context
            whole, start = whole[cut:], max(1, start - cut)
        return whole, min(start, len(whole) - 1)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*request.args) for request in tqdm(requests, disable=disable_tqdm, desc="tokenize")]
        return [(s.logprob, s.greedy) for s in score_continuations(self.model, pairs, self.compute, self.batch_size)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole string's log-likelihood, in disjoint windows of the model's context (each window after the
        first conditioned on nothing but <|bos|>: the harness's rolling windows with no overlap)."""
        totals = []
        for request in tqdm(requests, disable=disable_tqdm, desc="rolling"):
            tokens = self.tokenizer.encode(request.args[0])
            size = self.context - 1
            windows = [([self.tokenizer.bos_id, *tokens[i:i + size]], 1) for i in range(0, len(tokens), size)]
            totals.append(sum(s.logprob for s in score_continuations(self.model, windows, self.compute,
                                                                     self.batch_size)))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        engine, outputs = Engine(self.model, self.tokenizer), []
        for request in tqdm(requests, disable=disable_tqdm, desc="generate"):
            context, options = request.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = self.tokenizer.encode(context, bos=True)
            budget = int(options.get("max_gen_toks", self.max_gen_toks))
            prompt = prompt[-max(1, self.context - budget):]
            greedy = not options.get("do_sample", False) or not options.get("temperature", 0)
            params = SamplingParams(0.0 if greedy else float(options["temperature"]))
            [done] = engine.generate([prompt], max(1, min(budget, self.context - len(prompt))), params,
                                     stop_tokens=[self.tokenizer.bos_id], stop_strings=until, compute=self.compute)
            text = self.tokenizer.decode(done.tokens)
            cut = min((text.find(s) for s in until if s in text), default=len(text))
            outputs.append(text[:cut])
        return outputs
