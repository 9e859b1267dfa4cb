import pytest
import torch
from conftest import tiny_config

from adamba import AdambaLM
from adamba.infer.engine import Engine
from adamba.infer.sampling import SamplingParams, sample
from adamba.model.cache import InferenceCache


def random_model(**overrides) -> AdambaLM:
    torch.manual_seed(0)
    model = AdambaLM(tiny_config(**overrides)).eval()
    for name, p in model.named_parameters():  # random: zero-initialised projections would hide cache errors
        if not name.endswith(("A_log", "dt_proj.bias", "dt_bias", "mixer.D")):  # Mamba timescales keep their init
            torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("overrides", [
    dict(sequence_len=320),
    dict(sequence_len=320, n_kv_head=2, window_pattern="SL", short_window=7),
], ids=["full", "gqa-window"])
@torch.no_grad()
def test_cached_decode_equals_full_forward_for_every_prompt_length(overrides):
    model = random_model(**overrides)
    seq = torch.randint(0, 512, (1, 304))
    reference = model(seq)
    for prompt_len in range(1, 301):
        cache = InferenceCache(model, 1, 304)
        logits = model(seq[:, :prompt_len], cache=cache)
        torch.testing.assert_close(logits, reference[:, :prompt_len], atol=1e-5, rtol=1e-5)
        for t in range(prompt_len, min(prompt_len + 3, 304)):
            step = model(seq[:, t:t + 1], cache=cache)
            torch.testing.assert_close(step[:, 0], reference[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(n_kv_head=2, window_pattern="SSL", short_window=5),
    dict(block_pattern="MTM", n_layer=3),  # Mamba state must not absorb the right padding
    dict(block_pattern="M2", mamba2_headdim=16, mamba2_ngroups=2, mamba2_d_state=8, mamba2_chunk_size=8),
    dict(block_pattern="TMM2", n_layer=3, mamba2_headdim=16, mamba2_ngroups=2, mamba2_d_state=8,
         mamba2_chunk_size=8),
    # today's recipe: smear's previous embedding must come from each row's last real token
    dict(block_pattern="TMT", n_layer=3, n_kv_head=2, window_pattern="SL", short_window=5, residual_scalars=True,
         value_embeds="alternating", smear=True, backout=True, qk_scale=1.2),
], ids=["attention-window", "hybrid", "mamba2", "T-M-M2", "recipe"])
@pytest.mark.parametrize("static", [False, True], ids=["cache", "static-cache"])
@torch.no_grad()
def test_batched_rows_of_different_lengths_match_their_own_full_forward(overrides, static):
    # float64: rows batched together and rows run alone take different float32 rounding paths (kernels pick
    # vector widths by shape), which puts single elements at the 1e-5 edge; in float64 the padding logic
    # itself is checked to 1e-10. Float32 decode against a full forward is tested above and in test_mamba.
    model = random_model(sequence_len=64, **overrides).double()
    lengths = [5, 17, 1, 30]
    seqs = [torch.randint(0, 512, (n + 12,)) for n in lengths]
    cache = InferenceCache(model, 4, 64, static=static)
    padded = torch.zeros(4, max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        padded[b, :n] = seqs[b][:n]
    cache.valid = torch.tensor(lengths)
    prefill = model(padded, cache=cache)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(prefill[b, :n], model(seqs[b][None, :n])[0], atol=1e-10, rtol=1e-10)
    for t in range(12):
        step = torch.stack([seqs[b][n + t] for b, n in enumerate(lengths)])[:, None]
        out = model(step, cache=cache)
        for b, n in enumerate(lengths):
            full = model(seqs[b][None, :n + t + 1])[0, -1]
            torch.testing.assert_close(out[b, 0], full, atol=1e-10, rtol=1e-10)


@torch.no_grad()
def test_engine_greedy_matches_full_recompute_and_batching():
    model = random_model(sequence_len=64)
    prompts = [[1, 2, 3], [7], [9, 8, 7, 6, 5, 4, 3, 2]]
    engine = Engine(model)
    batched = engine.generate(prompts, 10, SamplingParams(temperature=0))
    for prompt, completion in zip(prompts, batched, strict=True):
        ids = list(prompt)
        for _ in range(10):  # the reference: recompute the whole sequence for every token
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert completion.tokens == ids[len(prompt):] and completion.finish_reason == "length"
        assert engine.generate([prompt], 10, SamplingParams(temperature=0))[0].tokens == completion.tokens


def test_streaming_equals_non_streaming_with_the_same_seed():
    engine = Engine(random_model(sequence_len=64))
    params = SamplingParams(temperature=1.0, top_k=100, top_p=0.9)
    streamed = list(engine.stream([1, 2, 3], 20, params, seed=7))
    [whole] = engine.generate([[1, 2, 3]], 20, params, seed=7)
    assert streamed == whole.tokens and len(streamed) == 20
    assert list(engine.stream([1, 2, 3], 20, params, seed=8)) != streamed


def test_context_limits(tokenizer):
    model = random_model(sequence_len=16)
    engine = Engine(model, tokenizer)
    with pytest.raises(ValueError, match="prompt 0 has 17 tokens, more than the model's context of 16"):
        engine.generate([list(range(17))], 4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], 4)
    # a row that reaches the context stops with "length" while a shorter row keeps going; the last token
    # predicted from position 15 is kept (it is never fed back)
    rows = engine.generate([list(range(14)), [5]], 8, SamplingParams(temperature=0))
    assert len(rows[0].tokens) == 3 and rows[0].finish_reason == "length"  # fed at positions 14, 15
    assert len(rows[1].tokens) == 8
    cache = InferenceCache(model, 1, 16)
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="beyond the cache's capacity of 16"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_stop_tokens_and_strings(tokenizer):
    model = random_model(sequence_len=64)
    engine = Engine(model, tokenizer)
    [free] = engine.generate([[1, 2]], 12, SamplingParams(temperature=0))
    stop_at = free.tokens[4]
    first = free.tokens.index(stop_at)
    [stopped] = engine.generate([[1, 2]], 12, SamplingParams(temperature=0), stop_tokens=[stop_at])
    assert stopped.tokens == free.tokens[:first] and stopped.finish_reason == "stop"
    greedy = SamplingParams(temperature=0)
    full = engine.complete("The king", 12, greedy)
    assert len(full) >= 6
    needle = full[3:6]
    assert engine.complete("The king", 12, greedy, stop_strings=[needle]) == full[:full.find(needle)]


def test_sampling_filters_keep_the_right_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)

    def support(**kw):
        draws = torch.stack([sample(logits, SamplingParams(**kw), g) for _ in range(400)])
        return sorted(set(draws.flatten().tolist()))

    assert support() == [0, 1, 2, 3]
    assert support(top_k=2) == [0, 1]
    assert support(top_p=0.5) == [0]
    assert support(top_p=0.8) == [0, 1]
    assert support(top_p=0.81) == [0, 1, 2]
    assert support(min_p=0.5) == [0, 1]  # 0.15 < 0.5 * 0.5
    assert support(temperature=0) == [0]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
