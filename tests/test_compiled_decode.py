"""The compiled decode step (Engine(compile=True)): the same tokens and logits as eager decoding, one graph per
batch size and width."""

import torch

from adamba.infer.engine import Engine
from adamba.infer.sampling import SamplingParams
from adamba.model.cache import InferenceCache
from adamba.model.compute import Compute
from tests.test_engine import random_model

GREEDY = SamplingParams(temperature=0)
HYBRID = dict(block_pattern="TMM2", n_layer=3, n_kv_head=2, sequence_len=48, mamba2_headdim=16,
              mamba2_ngroups=2, mamba2_d_state=8, mamba2_chunk_size=8)


@torch.no_grad()
def test_compiled_engine_matches_the_full_recompute_for_batched_rows_at_a_mode_and_at_full_width():
    torch._dynamo.reset()
    model = random_model(**HYBRID)
    engine = Engine(model, compile=True)
    prompts = [[1, 2, 3], [7], [9, 8, 7, 6, 5, 4, 3, 2]]
    for width in ("ghost", None):
        for prompt, row in zip(prompts, engine.generate(prompts, 8, GREEDY, compute=Compute(width)), strict=True):
            ids = list(prompt)
            for _ in range(8):  # the reference: recompute the whole sequence for every token, eagerly
                ids.append(int(model(torch.tensor([ids]), compute=Compute(width))[0, -1].argmax()))
            assert row.tokens == ids[len(prompt):]
    # a new generation (new cache, other prompts) at a compiled batch size and width reuses the graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        engine.generate([[4, 4], [5], [6, 6, 6]], 4, GREEDY, compute=Compute("ghost"))


@torch.no_grad()
def test_compiled_step_logits_equal_eager_decode_with_widths_going_up_and_down():
    torch._dynamo.reset()
    model = random_model(**HYBRID).double()  # float64: the compiled graph rounds differently, not less exactly
    step = torch.compile(model, dynamic=False)
    widths = [16, 16, 16, 64, 64, 32, 16, 32, 64]  # prefill the first three at 16, then widen, narrow, widen
    idx = torch.randint(0, 512, (2, len(widths)))
    eager, static = InferenceCache(model, 2, 16), InferenceCache(model, 2, 48, static=True)
    model(idx[:, :3], cache=eager, compute=Compute(16))
    model(idx[:, :3], cache=static, compute=Compute(16))
    for t in range(3, len(widths)):
        expected = model(idx[:, t:t + 1], cache=eager, compute=Compute(widths[t]))
        got = step(idx[:, t:t + 1], cache=static, compute=Compute(widths[t]))
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
