"""Self-speculative decoding (infer/speculative.py) against plain decoding, exact enumeration and plain caches."""

import itertools

import pytest
import torch
from conftest import tiny_config
from scipy.stats import chisquare

import adamba.infer.speculative as speculative
from adamba import AdambaLM
from adamba.infer.engine import Engine
from adamba.infer.sampling import SamplingParams, probabilities
from adamba.infer.speculative import Draft
from adamba.model.cache import InferenceCache
from adamba.model.compute import Compute
from adamba.model.exits import Adaptive
from adamba.model.forward_pass import ForwardPass

PATTERNS = {"T": dict(), "M": dict(block_pattern="M"), "M2": dict(block_pattern="M2"),
            "hybrid": dict(block_pattern="TMTM2"),
            # today's recipe (model/recipe.py): smear's previous embedding is decode state that rolls back too
            "recipe": dict(block_pattern="TMTM2", residual_scalars=True, value_embeds="alternating", smear=True,
                           backout=True, qk_scale=1.2)}


def random_model(dtype=torch.float64, **overrides) -> AdambaLM:
    torch.manual_seed(0)
    fields = dict(n_layer=4, sequence_len=96, mamba2_headdim=32)
    fields.update(overrides)
    model = AdambaLM(tiny_config(**fields)).to(dtype).eval()
    for name, p in model.named_parameters():  # random: zero-initialised projections would hide cache errors
        if not name.endswith(("A_log", "dt_proj.bias", "dt_bias", "mixer.D")):  # Mamba timescales keep their init
            torch.nn.init.normal_(p, std=0.3)
    if model.scalars is not None:  # residual scales near nanochat's: a skipped layer must not rescale the stream
        with torch.no_grad():
            model.scalars.resid.uniform_(0.9, 1.1)
            model.scalars.x0.mul_(0.3)
            model.backout.scale.mul_(0.3)
    return model


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4]]


def agreeing(model: AdambaLM, draft: Draft) -> AdambaLM:
    """A random model whose draft agrees with it often, not always: the blocks the draft narrows (attention) or
    skips write less into the residual stream. A plain random draft is rejected nearly every time."""
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            narrowed = draft.width is not None and block.kind == "T"
            skipped = draft.exit_layer is not None and i >= draft.exit_layer
            for name, p in block.named_parameters():
                if name.endswith(("c_proj.weight", "out_proj.weight")):
                    p.mul_(0.005 if narrowed else 0.3 if skipped else 1.0)
    return model


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("draft", [Draft(width="ghost", k=4), Draft(exit_layer=2, k=3),
                                   Draft(width=32, exit_layer=3, k=6)], ids=["ghost", "exit", "both"])
def test_greedy_speculative_output_equals_plain_greedy(pattern, draft):
    model = random_model(**PATTERNS[pattern])
    if pattern in ("M", "M2") and draft.exit_layer is None:  # Matryoshka widths are attention's
        with pytest.raises(ValueError, match="computes the same"):
            Engine(model, speculative=draft)
        return
    model = agreeing(model, draft)
    plain = Engine(model).generate(PROMPTS, 70, SamplingParams(0))
    spec = Engine(model, speculative=draft).generate(PROMPTS, 70, SamplingParams(0))
    assert [c.tokens for c in spec] == [c.tokens for c in plain]
    assert [c.finish_reason for c in spec] == [c.finish_reason for c in plain]
    drafted, accepted = sum(c.drafted for c in spec), sum(c.accepted for c in spec)
    assert 0.1 * drafted < accepted < 0.9 * drafted  # many rejections, many acceptances
    [one] = Engine(model, speculative=draft).generate(PROMPTS[1:2], 70, SamplingParams(0))  # a row alone
    assert one.tokens == plain[1].tokens


def test_greedy_speculative_stops_like_plain_at_stop_tokens_and_the_context_end():
    model = random_model(block_pattern="TMTM2", sequence_len=40)
    prompts = [[1, 2, 3], list(range(1, 30)), [7]]
    plain = Engine(model).generate(prompts, 30, SamplingParams(0))
    assert plain[1].finish_reason == "length" and len(plain[1].tokens) == 12  # 29 + 11 read, the 12th never read
    stops = [plain[0].tokens[4], plain[2].tokens[9]]  # rows 0 and 2 stop mid-generation
    for kwargs in (dict(), dict(stop_tokens=stops)):
        plain = Engine(model).generate(prompts, 30, SamplingParams(0), **kwargs)
        spec = Engine(model).generate(prompts, 30, SamplingParams(0), speculative=Draft(width=16, k=5), **kwargs)
        assert [(c.tokens, c.finish_reason, c.stop_token) for c in spec] == \
            [(c.tokens, c.finish_reason, c.stop_token) for c in plain]
    assert [c.finish_reason for c in plain] == ["stop", "length", "stop"]


def exact_distribution(model, prompt, length, params):
    """P(every continuation of `length` tokens) from full forwards over all of them (no cache)."""
    V = model.config.vocab_size
    sequences = torch.tensor(list(itertools.product(range(V), repeat=length)))
    idx = torch.cat([torch.tensor(prompt).expand(len(sequences), -1), sequences], dim=1)
    with torch.no_grad():
        probs = probabilities(model(idx[:, :-1])[:, len(prompt) - 1:], params)  # (N, length, V)
    return probs.gather(-1, sequences[..., None])[..., 0].prod(-1), sequences


@pytest.mark.parametrize("pattern", ["T", "hybrid", "recipe"])
def test_sampled_speculative_tokens_follow_the_full_models_distribution(pattern, monkeypatch):
    model = random_model(torch.float32, vocab_size=4, **PATTERNS[pattern])
    params, prompt, length, n = SamplingParams(1.0, top_k=3), [1, 2], 3, 6000
    expected, sequences = exact_distribution(model, prompt, length, params)
    index = {tuple(s): i for i, s in enumerate(sequences.tolist())}

    def p_value():
        out = Engine(model).generate([prompt] * n, length, params, seed=0, speculative=Draft(width=16, k=2))
        counts = torch.zeros(len(sequences))
        for c in out:
            counts[index[tuple(c.tokens)]] += 1
        seen = expected > 0  # top-k leaves some continuations impossible: none may be drawn
        if counts[~seen].sum() > 0:
            return 0.0
        return chisquare(counts[seen].numpy(), (expected[seen] / expected[seen].sum() * n).numpy()).pvalue

    assert p_value() > 1e-3

    def always_accept(draft_tokens, draft_probs, target, params, generator, forced=None):  # a broken rule
        k = draft_tokens.size(1)
        nxt = torch.multinomial(probabilities(target[:, k], params), 1, generator=generator)[:, 0]
        return torch.full_like(nxt, k), nxt

    monkeypatch.setattr(speculative, "accept", always_accept)
    assert p_value() < 1e-6  # the test can tell the draft's distribution from the model's


def plain_states(model, prompt, tokens, capacity):
    cache = InferenceCache(model, 1, capacity)
    model(torch.tensor([prompt]), cache=cache)
    for token in tokens:
        model(torch.tensor([[token]]), cache=cache)
    return cache


def assert_row_equals(cache, b, reference):
    length = int(reference.lengths[0])
    assert int(cache.lengths[b]) == length
    for state, ref in zip(cache.layer_states(), reference.layer_states(), strict=True):
        if hasattr(state, "k"):
            torch.testing.assert_close(state.k[b, :, :length], ref.k[0, :, :length])
            torch.testing.assert_close(state.v[b, :, :length], ref.v[0, :, :length])
        else:
            torch.testing.assert_close(state.conv[b], ref.conv[0])
            torch.testing.assert_close(state.ssm[b], ref.ssm[0])
    if reference.smear_state is not None:
        torch.testing.assert_close(cache.smear_state.prev[b], reference.smear_state.prev[0])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("stepwise", [False, True], ids=["one-forward", "token-by-token"])
def test_cache_after_a_rollback_equals_a_plain_decode_of_the_kept_prefix(pattern, stepwise):
    """The verifier reads k + 1 tokens in one forward, the draft one per step; both then keep a prefix per row."""
    model = random_model(**PATTERNS[pattern])
    prompt, new = [3, 1, 4, 1, 5], torch.tensor([[9, 2, 6, 5, 3]] * 4)
    keep = torch.tensor([0, 2, 5, 1])
    cache = InferenceCache(model, 4, 40)
    model(torch.tensor([prompt] * 4), cache=cache)
    cache.begin_trail()
    if stepwise:
        for t in range(new.size(1)):
            model(new[:, t:t + 1], cache=cache)
    else:
        model(new, cache=cache)
    cache.rollback(keep)
    for b in range(4):
        assert_row_equals(cache, b, plain_states(model, prompt, new[b, :keep[b]].tolist(), 40))
    # and decoding goes on from there as from the plain cache
    nxt = torch.tensor([[7]] * 4)
    logits = model(nxt, cache=cache)[:, 0]
    for b in range(4):
        reference = plain_states(model, prompt, new[b, :keep[b]].tolist(), 40)
        torch.testing.assert_close(logits[b], model(nxt[:1], cache=reference)[0, 0])


def test_a_truncated_draft_runs_only_its_blocks_and_its_flops():
    model = random_model(block_pattern="TMTM2")
    idx = torch.randint(0, 512, (2, 9))
    x, cos, sin = model.embed(idx)
    reference = model.head(model.run_layers(x, range(2), ForwardPass(model, cos, sin)))
    torch.testing.assert_close(model(idx, compute=Compute(depth=2)), reference)
    # the same count as a model of just those two blocks
    two_blocks = AdambaLM.build(tiny_config(n_layer=2, block_pattern="TM", sequence_len=96, mamba2_headdim=32), "meta")
    assert model.count_flops(compute=Compute(depth=2)).forward == two_blocks.count_flops().forward
    assert model.count_flops(compute=Compute(depth=2)).forward < model.count_flops(exit_layer=2).forward


@pytest.mark.parametrize("text, message", [
    ("exit:x", "whole number"), ("exit:9", "depth"), ("loud", "speculative"), ("exit:0", "depth")])
def test_draft_parse_names_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        Draft.parse(random_model().config, text)


def test_draft_checks():
    config = random_model().config
    assert Draft.parse(config, "ghost", k=6) == Draft(width="ghost", k=6)
    assert Draft.parse(config, "exit:2") == Draft(exit_layer=2)
    assert [d.describe() for d in (Draft(width="ghost"), Draft(exit_layer=2), Draft(width=32, exit_layer=3))] == \
        ["ghost", "exit:2", "32+exit:3"]
    with pytest.raises(ValueError, match="positive integer"):
        Draft(width="ghost", k=0).check(config)
    with pytest.raises(ValueError, match="narrower"):
        Draft().check(config)
    with pytest.raises(ValueError, match="adaptive"):
        Engine(random_model()).generate([[1]], 3, compute=Compute(adaptive=Adaptive()),
                                        speculative=Draft(width="ghost"))


def chain_model(tokenizer, chain: list[int]) -> AdambaLM:
    """A model whose greedy next token after chain[i] is chain[i + 1] (cyclically): the lm_head reads the token's own
    embedding, and the blocks write little into the residual stream. Its replies make tool calls."""
    model = random_model(torch.float32, vocab_size=tokenizer.vocab_size, block_pattern="TMTM2")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "out_proj.weight")):
                p.mul_(0.02)
        model.lm_head.weight.zero_()
        for token, following in zip(chain, chain[1:] + chain[:1], strict=True):
            direction = model.wte.weight[token]
            model.lm_head.weight[following] += 20 * direction / direction.norm() / model.config.n_embd ** 0.5
    return model


@pytest.mark.parametrize("draft", [Draft(width="ghost", k=4), Draft(exit_layer=2, k=3)], ids=["ghost", "exit"])
def test_tool_calls_inside_rounds_force_their_output_as_plain_decoding_does(tokenizer, draft):
    from adamba.tools.calculator import calculate

    special = tokenizer.special_id
    expression, word = tokenizer.encode("7*8"), tokenizer.encode(" so")
    chain = [special("<|python_start|>"), *expression, special("<|python_end|>"), special("<|output_end|>"), *word]
    assert len(set(chain)) == len(chain)
    model = chain_model(tokenizer, chain)
    prompts = [tokenizer.encode("What is 7*8?", bos=True), tokenizer.encode("Hi", bos=True) + word]
    plain = Engine(model, tokenizer).generate(prompts, 40, SamplingParams(0), tool=calculate)
    spec = Engine(model, tokenizer, speculative=draft).generate(prompts, 40, SamplingParams(0), tool=calculate)
    assert len(plain[0].tool_calls) >= 2 and plain[0].tool_calls[0].result == "56"  # the chain calls the tool
    for a, b in zip(spec, plain, strict=True):
        assert (a.tokens, a.forced, a.tool_calls) == (b.tokens, b.forced, b.tool_calls)
        assert a.finish_reason == b.finish_reason
