"""Surgery (adamba/surgery) and training stages (train/stages.py): every surgery keeps the logits of the model it
started from (the reference: the original model itself, evaluated before the surgery), for attention, hybrid
(Mamba-1, Mamba-2) and looped stacks and every widening init; frozen weights stay bitwise frozen and hold no
optimizer state; surgery checkpoints load with strict key checking; dry-run counts match built models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config, tiny_train_config

from adamba import AdambaLM, ModelConfig
from adamba.checkpoint import load_checkpoint, run_dir
from adamba.cli import main
from adamba.model.cache import InferenceCache
from adamba.model.compute import Compute
from adamba.surgery import INITS, add_mamba, deepen, widen
from adamba.surgery.growth import GROWTH, count_params, record, save_grown
from adamba.surgery.plan import dry_run, load_plan
from adamba.train.optim import build_optimizers
from adamba.train.stages import apply_stage
from adamba.train.trainer import train

LOOP = "prelude=1,recur=2,coda=1"


def trained_like(config: ModelConfig, seed: int = 1, dtype=torch.float32) -> AdambaLM:
    """A model whose every block contributes: the matrices init_weights zeroes (output projections, lm_head)
    get random values, as training would give them, so a surgery that disturbed any block would show."""
    torch.manual_seed(seed)
    model = AdambaLM.build(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.size(1)))
    # params only: Module.to(float32) would also round the float64 rotary tables
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def tokens(config: ModelConfig, n: int = 24) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, n), generator=torch.Generator().manual_seed(7))


HYBRIDS = {
    "transformer-gqa": dict(n_kv_head=2),
    "mamba1-hybrid": dict(block_pattern="TM"),
    "mamba2-hybrid": dict(block_pattern="TM2", mamba2_headdim=16, mamba2_ngroups=2, mamba2_d_state=8),
    "mamba-mlp": dict(block_pattern="MT", mamba_use_mlp=True),
    "looped": dict(n_layer=4, block_pattern="TMTT", loop=LOOP),
    "looped-sandwich": dict(n_layer=4, block_pattern="TM2TT", loop=LOOP + ",sandwich_norm=true", mamba2_headdim=16),
}


# --- add-mamba and deepen: new blocks are exact no-ops ------------------------------------------------------
@pytest.mark.parametrize("overrides,kind,pattern", [
    (dict(), "M", None),  # a Mamba block after every attention block
    (dict(), "M2", None),
    (dict(block_pattern="TM"), "M2", "TM2M"),
    (dict(n_layer=4, block_pattern="TMTT", loop=LOOP), "M", None),  # inserted blocks join their segment
])
@torch.no_grad()
def test_add_mamba_keeps_logits_bitwise(overrides, kind, pattern):
    model = trained_like(tiny_config(**overrides))
    idx = tokens(model.config)
    grown, new = add_mamba(model, pattern, kind)
    kinds = grown.config.block_pattern
    assert all(kinds[i] in ("M", "M2") for i in new) and len(kinds) == model.config.n_layer + len(new)
    assert torch.equal(grown.eval()(idx), model(idx))  # x + 0 is x: the new blocks add exact zeros
    if model.config.loop is not None:
        assert (grown.config.loop.prelude, grown.config.loop.recur, grown.config.loop.coda) == (2, 3, 2)
        assert torch.equal(grown(idx, compute=Compute(loops=3)), model(idx, compute=Compute(loops=3)))
    kept = [i for i in range(len(kinds)) if i not in new]
    for i, j in enumerate(kept):  # old blocks moved unchanged
        for (name, a), (_, b) in zip(model.blocks[i].named_parameters(), grown.blocks[j].named_parameters(),
                                     strict=True):
            assert torch.equal(a, b), name


@torch.no_grad()
def test_deepen_keeps_logits_and_the_old_layers_windows():
    model = trained_like(tiny_config(n_layer=3, block_pattern="TTT", window_pattern="SL", short_window=5))
    idx = tokens(model.config)
    grown, new = deepen(model, "TTMTTT")
    assert new == [2, 4, 5] and "".join(grown.config.block_pattern) == "TTMTTT"  # old blocks: earliest places
    old_windows, new_windows = model.config.attention_windows(), grown.config.attention_windows()
    assert [new_windows[j] for j in (0, 1, 3)] == old_windows == [5, None, None]
    assert grown.config.window_pattern == "SLLLL"  # written per layer: the tiling would have moved
    assert torch.equal(grown.eval()(idx), model(idx))


@pytest.mark.parametrize("overrides,pattern", [
    (dict(block_pattern="TM2", mamba2_headdim=16), "TM2TM2"),
    (dict(block_pattern="MT"), "MMTT"),
    (dict(n_layer=4, block_pattern="TMTT", loop=LOOP), "TMTM2TTM"),
])
@torch.no_grad()
def test_deepen_keeps_logits_of_hybrid_and_looped_stacks(overrides, pattern):
    model = trained_like(tiny_config(**overrides))
    idx = tokens(model.config)
    grown = deepen(model, pattern)[0].eval()
    assert torch.equal(grown(idx), model(idx))
    if model.config.loop is not None:
        assert torch.equal(grown(idx, compute=Compute(loops=2)), model(idx, compute=Compute(loops=2)))


def test_insertion_errors_name_the_problem():
    model = AdambaLM.build(tiny_config(block_pattern="TM"))
    with pytest.raises(ValueError, match="pattern: .*does not contain"):
        add_mamba(model, "MMT")
    with pytest.raises(ValueError, match="pattern: add-mamba may add only Mamba blocks"):
        add_mamba(model, "TTM")
    with pytest.raises(ValueError, match="kind: .*not one Mamba block kind"):
        add_mamba(model, kind="T")
    looped = AdambaLM.build(tiny_config(n_layer=4, block_pattern="TMTT", loop=LOOP + ",sandwich_norm=true"))
    with pytest.raises(ValueError, match="loop.sandwich_norm"):
        add_mamba(looped)
    gated = AdambaLM.build(tiny_config(min_exit_layer=1))
    for grow in (add_mamba, lambda m: widen(m, 128), lambda m: deepen(m, "TTT")):
        with pytest.raises(ValueError, match="min_exit_layer: surgery does not grow early-exit gates"):
            grow(gated)


# --- widen: every init keeps the function, and the old model is the D-wide slice ------------------------------
@pytest.mark.parametrize("init", sorted(INITS))
@pytest.mark.parametrize("name", sorted(HYBRIDS))
@torch.no_grad()
def test_widen_keeps_logits(name, init):
    assert INITS[init]  # every method claims to preserve the function; this test holds each to it
    model = trained_like(tiny_config(**HYBRIDS[name]))
    idx = tokens(model.config)
    grown = widen(model, 128, init, seed=3).eval()
    assert grown.config.n_embd == 128 and grown.config.norm_width == 64
    torch.testing.assert_close(grown(idx), model(idx), atol=1e-5, rtol=0)
    if model.config.loop is not None:
        three = Compute(loops=3)
        torch.testing.assert_close(grown(idx, compute=three), model(idx, compute=three), atol=1e-5, rtol=0)
    # in float64 the only differences left are rounding: the growth is exact, not merely close
    torch.testing.assert_close(widen(model.double(), 128, init, seed=3).eval()(idx), model(idx), atol=1e-12,
                               rtol=0)


@torch.no_grad()
def test_widened_model_holds_the_old_model_as_its_slices():
    model = trained_like(tiny_config(block_pattern="TM2", mamba2_headdim=16))
    idx = tokens(model.config)
    grown = widen(model, 128, "svd").eval()
    assert grown.config.matryoshka_levels == [16, 32, 64, 128]
    torch.testing.assert_close(grown(idx, compute=Compute(64)), model(idx), atol=1e-5, rtol=0)
    for w in (16, 32):
        torch.testing.assert_close(grown(idx, compute=Compute(w)), model(idx, compute=Compute(w)), atol=1e-5, rtol=0)
    again = widen(grown, 192, "copy-scale").eval()  # widening twice keeps the first width's norms
    assert again.config.norm_width == 64 and 128 in again.config.matryoshka_levels
    torch.testing.assert_close(again(idx), model(idx), atol=1e-5, rtol=0)


@torch.no_grad()
def test_widen_places_old_weights_first_and_new_residual_coordinates_stay_zero():
    model = trained_like(tiny_config(n_kv_head=2))
    grown = widen(model, 128, "lora")
    a, b = model.blocks[0], grown.blocks[0]
    assert b.attn.n_head == 8 and b.attn.n_kv_head == 4 and b.mlp.c_fc.out_features == 512
    assert torch.equal(b.attn.c_q.weight[:64, :64], a.attn.c_q.weight)
    assert torch.equal(b.attn.c_k.weight[:32, :64], a.attn.c_k.weight)
    assert torch.equal(b.mlp.c_proj.weight[:64, :256], a.mlp.c_proj.weight)
    assert not b.attn.c_proj.weight[64:].any() and not b.attn.c_proj.weight[:, 64:].any()
    assert b.attn.c_q.weight[64:].any() and b.attn.c_q.weight[:, 64:].any()  # free entries are not all zero
    seen = []
    hooks = [blk.register_forward_hook(lambda m, i, out: seen.append(out)) for blk in grown.blocks]
    grown(tokens(model.config))
    for hook in hooks:
        hook.remove()
    assert all(not out[..., 64:].any() for out in seen)  # nothing writes the new coordinates yet


@torch.no_grad()
def test_widened_hybrid_decodes_like_the_old_model_at_every_width():
    model = trained_like(tiny_config(block_pattern="TM2", n_kv_head=2, mamba2_headdim=16), dtype=torch.float64)
    grown = widen(model, 128, "zero").double().eval()
    idx = tokens(model.config, 16)[:1]
    widths = [16, 16, 16, 128, 32, 128, 64, 16, 128, 32, 64, 128, 16]  # first three prefilled together
    cache_new, cache_old = InferenceCache(grown, 1, 16), InferenceCache(model, 1, 16)
    new = [grown(idx[:, :3], cache=cache_new, compute=Compute(16))]
    old = [model(idx[:, :3], cache=cache_old, compute=Compute(16))]
    for t, w in enumerate(widths[3:], start=3):
        new.append(grown(idx[:, t:t + 1], cache=cache_new, compute=Compute(w)))
        old.append(model(idx[:, t:t + 1], cache=cache_old, compute=Compute(min(w, 64))))
    torch.testing.assert_close(torch.cat(new, 1), torch.cat(old, 1), atol=1e-10, rtol=0)
    cache = InferenceCache(grown, 1, 16)
    steps = [grown(idx[:, :5], cache=cache)] + [grown(idx[:, t:t + 1], cache=cache) for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), grown(idx), atol=1e-10, rtol=0)


def test_widen_errors_name_the_field():
    model = AdambaLM.build(tiny_config(n_kv_head=2))
    for width, match in ((64, "width: must be an integer above"), (100, "not a whole number of heads"),
                         (80, "whole K/V groups")):
        with pytest.raises(ValueError, match=match):
            widen(model, width)
    with pytest.raises(ValueError, match="init: unknown method"):
        widen(model, 128, "net2net")
    with pytest.raises(ValueError, match="norm_width: 128 exceeds n_embd=64"):
        tiny_config(norm_width=128)


# --- checkpoints: written by save_checkpoint, loaded strictly ----------------------------------------------
@torch.no_grad()
def test_surgery_commands_write_checkpoints_that_load_strictly(tmp_path, capsys, tokenizer):
    from tests.test_nanochat import MODEL_CONFIG, random_state, write_nanochat

    folder = write_nanochat(tmp_path / "nc", random_state(MODEL_CONFIG, 0), 5, tokenizer=tokenizer)
    assert main(["surgery", "add-mamba", "--from-nanochat", str(folder), "--kind", "M2", "--out", "hyb"]) == 0
    assert "max |change of logits| on a probe batch: 0" in capsys.readouterr().out
    hybrid = load_checkpoint(run_dir("hyb"))  # load_weights_into: every key, no extra one, every shape
    assert hybrid.meta["extra"][GROWTH]["op"] == "add-mamba" and hybrid.meta["extra"][GROWTH]["new_blocks"] == [1, 3]
    from adamba import load_nanochat

    original, _ = load_nanochat(folder)
    idx = tokens(original.config)
    assert torch.equal(hybrid.model.eval()(idx), original(idx)) and hybrid.tokenizer is not None

    assert main(["surgery", "widen", "hyb", "--width", "128", "--init", "svd", "--out", "wide"]) == 0
    wide = load_checkpoint(run_dir("wide"))
    growth = wide.meta["extra"][GROWTH]
    assert growth["op"] == "widen" and growth["history"] == ["add-mamba(pattern=TM2TM2)"]
    # in float64: these nanochat test weights (every matrix dense, logits near the softcap) amplify float32
    # rounding past 1e-5; test_widen_keeps_logits holds widening to 1e-5 in float32 on trained-like weights
    original.double()
    torch.testing.assert_close(wide.model.double().eval()(idx), original(idx), atol=1e-10, rtol=0)
    assert main(["surgery", "deepen", "wide", "--pattern", "TM2TTM2", "--out", "deep"]) == 0
    deep = load_checkpoint(run_dir("deep")).model.double().eval()
    torch.testing.assert_close(deep(idx), original(idx), atol=1e-10, rtol=0)

    assert main(["surgery", "widen", "wide", "--width", "256", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{count_params(wide.model.config):,}" in out and "| 256 |" in out
    assert main(["surgery", "widen", "wide", "--width", "256"]) == 2
    assert "--out: name the run" in capsys.readouterr().err


# --- stages -----------------------------------------------------------------------------------------------
def _grown_checkpoint(op: str, config: ModelConfig, tokenizer, run: str = "grown") -> tuple[AdambaLM, AdambaLM]:
    """(the model before, the grown model), saved as run `run` with its growth record."""
    model = trained_like(config)
    grown, new = (add_mamba(model) if op == "add-mamba" else (widen(model, 128), []))
    save_grown(run, grown, tokenizer, record(op, model.config, new, None), "test")
    return model, grown


def test_mamba_only_freezes_everything_else_and_gives_it_no_optimizer_state():
    model = _grown_checkpoint("add-mamba", tiny_config(vocab_size=512), None, "g")[1].train()
    growth = load_checkpoint(run_dir("g")).meta["extra"][GROWTH]
    stage = apply_stage(model, "mamba-only", growth)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("blocks.1.", "blocks.3.")) for name in trainable)
    optimizers = build_optimizers(model, tiny_train_config("unused"))
    in_groups = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    idx = tokens(model.config, 16)
    for _ in range(3):
        model(idx, idx).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    state = sum(t.numel() * t.element_size() for opt in optimizers for s in opt.state.values()
                for t in s.values() if isinstance(t, torch.Tensor) and t.ndim > 0)
    assert state == stage.state_bytes < stage.full_state_bytes  # the memory the report says, and less than all
    assert "MiB saved" in stage.describe()
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert model.blocks[1].mixer.out_proj.weight.any()  # the new block left its zero init


def test_new_dims_stage_trains_new_dimensions_and_leaves_the_old_model_bitwise(corpus_dir, tokenizer):
    # attention-only, so the old entries are exactly the leading block of each parameter (old shape, from the
    # model before widening: a reference independent of the stage's masks)
    old, grown = _grown_checkpoint("widen", tiny_config(n_kv_head=2, vocab_size=tokenizer.vocab_size), tokenizer)
    config = tiny_train_config(corpus_dir, run_name="nd", init_from="grown", stage="new-dims", weight_decay=0.1,
                               num_iterations=3)
    result = train(grown.config, config, progress=False)
    after = load_checkpoint(result.checkpoint)
    assert after.meta["extra"][GROWTH]["op"] == "widen"  # the record travels with the run
    assert "new-dims" in result.stage
    before, changed = dict(grown.named_parameters()), 0
    for (name, p), q in zip(after.model.named_parameters(), old.parameters(), strict=True):
        block = tuple(slice(0, n) for n in q.shape)
        assert torch.equal(p[block], q), name  # Muon's spread and weight decay touched no old entry
        changed += not torch.equal(p, before[name])
    assert changed == len(before)  # every parameter has new entries, and they all trained


def test_stages_check_the_growth_record(corpus_dir, tokenizer):
    _grown_checkpoint("widen", tiny_config(vocab_size=tokenizer.vocab_size), tokenizer)
    with pytest.raises(ValueError, match="stage: 'mamba-only' .*latest surgery \\(widen\\) inserted none"):
        train(tiny_config(), tiny_train_config(corpus_dir, init_from="grown", stage="mamba-only"), progress=False)
    plain = AdambaLM.build(tiny_config())
    with pytest.raises(ValueError, match="stage: 'all' needs a grown model"):
        apply_stage(plain, "all", None)
    with pytest.raises(ValueError, match="stage: unknown stage"):
        tiny_train_config(corpus_dir, stage="everything")


# --- plans ------------------------------------------------------------------------------------------------
def test_dry_run_counts_match_the_models_surgery_builds(tmp_path):
    plan_file = tmp_path / "p.toml"
    plan_file.write_text("""
name = "p"
[start]
model = { vocab_size = 512, n_layer = 2, n_embd = 64, n_head = 4, sequence_len = 32 }
[[stage]]
surgery = "add-mamba"
pattern = "TM2TM"
[[stage]]
train = "mamba-only"
[[stage]]
surgery = "widen"
width = 128
[[stage]]
surgery = "deepen"
pattern = "TTM2TM"
""")
    rows = dry_run(load_plan(plan_file))
    model = AdambaLM.build(ModelConfig(vocab_size=512, n_layer=2, n_embd=64, n_head=4, sequence_len=32))
    built = [model.num_params()]
    model = add_mamba(model, "TM2TM")[0]
    built += [model.num_params()] * 2
    model = widen(model, 128)
    built.append(model.num_params())
    built.append(deepen(model, "TTM2TM")[0].num_params())
    assert [r["params"] for r in rows] == built
    assert rows[-1]["flops_per_token"] == deepen(model, "TTM2TM")[0].count_flops().forward  # the one FLOP counter
    plan_file.write_text(plan_file.read_text().replace('width = 128', 'width = 128\nparams = 5'))
    with pytest.raises(ValueError, match="stage 3 \\(widen\\): the plan says params = 5"):
        dry_run(load_plan(plan_file))


def test_shipped_plans_parse_and_their_counts_hold():
    rows = dry_run(load_plan("configs/plans/seeds_gpu.toml"))  # raises if a stated count is wrong
    assert [r["n_embd"] for r in rows if r["what"].startswith("surgery")] == [2048, 2560, 4096]
    assert rows[0]["params"] == 1_879_048_192  # nanochat d32
    assert len(dry_run(load_plan("configs/plans/tiny_cpu.toml"))) > 3


def test_progressive_runs_a_plan_and_reports_each_stage(tmp_path, corpus_dir, adamba_home):
    from adamba.surgery.plan import load_plan
    from adamba.train.progressive import run_plan

    plan_file = tmp_path / "mini.toml"
    plan_file.write_text(f"""
name = "mini"
eval_tokens = 256
[start]
model = {{ vocab_size = 512, n_layer = 1, n_embd = 32, n_head = 2, sequence_len = 32 }}
train = {{ num_iterations = 2 }}
[train]
data = "{corpus_dir}"
tokenizer_vocab_size = 512
device_batch_size = 4
total_batch_size = 128
eval_every = 0
val_fraction = 0.1
device = "cpu"
[[stage]]
surgery = "add-mamba"
kind = "M2"
[[stage]]
train = "mamba-only"
num_iterations = 2
[[stage]]
surgery = "widen"
width = 64
init = "lora"
[[stage]]
train = "new-dims"
num_iterations = 1
""")
    rows = run_plan(load_plan(plan_file), progress=False)
    assert [r["what"] for r in rows] == ["start", "surgery add-mamba", "train mamba-only", "surgery widen",
                                         "train new-dims"]
    assert all(r["val_bpb"] > 0 and r["flops_per_token"] > 0 for r in rows)
    assert rows[1]["val_bpb"] == pytest.approx(rows[0]["val_bpb"], abs=1e-5)  # surgery: the same model
    assert rows[3]["val_bpb"] == pytest.approx(rows[2]["val_bpb"], abs=1e-5)
    assert rows[2]["tokens"] == 2 * 128 and "MiB saved" in rows[2]["note"]
    # through the trainer: the frozen stack is bitwise what the surgery wrote, and has no optimizer state
    grown, trained = load_checkpoint(rows[1]["checkpoint"]), load_checkpoint(rows[2]["checkpoint"], with_optimizer=True)
    new = [f"blocks.{i}." for i in grown.meta["extra"][GROWTH]["new_blocks"]]
    after = dict(trained.model.named_parameters())
    for name, p in grown.model.named_parameters():
        assert torch.equal(p, after[name]) != name.startswith(tuple(new)), name
    kept = sum(len(g["params"]) for opt in trained.optimizer_state["optimizers"] for g in opt["param_groups"])
    assert kept == sum(1 for name in after if name.startswith(tuple(new)))
    report = (adamba_home / "reports" / "mini" / "progressive.md").read_text()
    assert "surgery widen" in report and "val bpb" in report
