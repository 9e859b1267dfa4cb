"""Tool calls in the engine: a row's <|python_start|> expr <|python_end|> runs the tool, whose result is forced into
that row (and only that row) as <|output_start|> result <|output_end|>, fed to the model like any token."""

import torch
from conftest import tiny_config

from adamba import AdambaLM
from adamba.infer import engine as engine_module
from adamba.infer.engine import Engine


def scripted_sampler(scripts: list[list[int]], filler: int):
    """Replaces sampling: row b emits scripts[b] in order, then `filler`; records the logits it was given."""
    cursor = [0] * len(scripts)
    seen = []

    def sample(logits, params, generator):
        seen.append(logits.clone())
        out = []
        for b, script in enumerate(scripts):
            out.append(script[cursor[b]] if cursor[b] < len(script) else filler)
            cursor[b] += 1
        return torch.tensor(out)
    return sample, seen, cursor


def test_a_tool_call_forces_its_result_into_its_own_row_and_the_model_reads_it(tokenizer, monkeypatch):
    torch.manual_seed(0)
    model = AdambaLM(tiny_config(vocab_size=tokenizer.vocab_size, sequence_len=64)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    special = tokenizer.special_id
    start, end = special("<|python_start|>"), special("<|python_end|>")
    out_start, out_end, stop = special("<|output_start|>"), special("<|output_end|>"), special("<|assistant_end|>")
    expr = tokenizer.encode("2+3")
    word = tokenizer.encode(" so")[0]
    # row 0 calls the tool; while its output is forced its sampler keeps going (those samples are discarded);
    # row 1 never calls it.
    result = tokenizer.encode("5")
    forced_len = len(result) + 2
    scripts = [[start, *expr, end, *[word] * forced_len, word, stop], [word, word, word, stop]]
    sample, seen, _ = scripted_sampler(scripts, filler=stop)
    monkeypatch.setattr(engine_module, "sample", sample)
    calls = []

    def calculator(text: str) -> str | None:
        calls.append(text)
        return {"2+3": "5"}.get(text)

    prompts = [tokenizer.encode("What is 2+3?", bos=True), tokenizer.encode("Hi", bos=True)]
    [first, second] = Engine(model, tokenizer).generate(prompts, 40, stop_tokens=[stop], tool=calculator)

    want = [start, *expr, end, out_start, *result, out_end, word]
    assert first.tokens == want and first.finish_reason == "stop"
    assert first.forced == [False] * (len(expr) + 2) + [True] * forced_len + [False]
    assert calls == ["2+3"] and [(c.expression, c.result) for c in first.tool_calls] == [("2+3", "5")]
    assert second.tokens == [word] * 3 and not any(second.forced) and not second.tool_calls

    # the logits after each token equal a full forward over prompt + completion: the forced tokens were fed
    with torch.no_grad():
        full = model(torch.tensor([prompts[0] + want]))[0]
    for t in range(len(want)):
        torch.testing.assert_close(seen[t + 1][0], full[len(prompts[0]) + t], atol=1e-4, rtol=1e-4)


def test_without_a_tool_nothing_is_forced_and_a_refused_call_forces_nothing(tokenizer, monkeypatch):
    model = AdambaLM(tiny_config(vocab_size=tokenizer.vocab_size, sequence_len=64)).eval()
    special = tokenizer.special_id
    start, end, stop = special("<|python_start|>"), special("<|python_end|>"), special("<|assistant_end|>")
    expr, word = tokenizer.encode("1/0"), tokenizer.encode(" so")[0]
    script = [start, *expr, end, word, stop]
    prompt = [tokenizer.encode("x", bos=True)]
    for tool in (None, lambda text: None):
        sample, _, _ = scripted_sampler([script], filler=stop)
        monkeypatch.setattr(engine_module, "sample", sample)
        [done] = Engine(model, tokenizer).generate(prompt, 20, stop_tokens=[stop], tool=tool)
        assert done.tokens == script[:-1] and not any(done.forced)
        assert len(done.tool_calls) == (0 if tool is None else 1)
