"""nanochat import: logits against an independent float64 implementation of nanochat's forward, step choice,
clear errors, and the `adamba import nanochat` command."""

import json
import math
import pickle

import pytest
import torch

from adamba import load_nanochat
from adamba.checkpoint import CheckpointError, load_checkpoint, run_dir
from adamba.cli import main
from adamba.nanochat import convert_state_dict, find_nanochat_step, nanochat_config

MODEL_CONFIG = {"sequence_len": 32, "vocab_size": 512, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64}
TEXT = "The king and the queen speak of war."


def random_state(cfg: dict, seed: int, prefix: str = "_orig_mod.", bf16=("transformer.wte.weight",
                 "transformer.h.0.attn.c_q.weight", "transformer.h.1.mlp.c_proj.weight")) -> dict:
    """nanochat-format weights, all random (no zero c_proj / lm_head), some stored as bfloat16."""
    g = torch.Generator().manual_seed(seed)
    C, V, hd = cfg["n_embd"], cfg["vocab_size"], cfg["n_embd"] // cfg["n_head"]
    kv = cfg["n_kv_head"] * hd
    shapes = {"transformer.wte.weight": (V, C), "lm_head.weight": (V, C)}
    for i in range(cfg["n_layer"]):
        shapes.update({f"transformer.h.{i}.attn.c_q.weight": (C, C), f"transformer.h.{i}.attn.c_k.weight": (kv, C),
                       f"transformer.h.{i}.attn.c_v.weight": (kv, C), f"transformer.h.{i}.attn.c_proj.weight": (C, C),
                       f"transformer.h.{i}.mlp.c_fc.weight": (4 * C, C),
                       f"transformer.h.{i}.mlp.c_proj.weight": (C, 4 * C)})
    state = {}
    for key, shape in shapes.items():
        std = 1.0 if key in ("transformer.wte.weight", "lm_head.weight") else 1.5 / math.sqrt(shape[1])
        w = torch.randn(shape, generator=g, dtype=torch.float32) * std
        state[prefix + key] = w.to(torch.bfloat16) if key in bf16 else w
    return state


def write_nanochat(folder, state: dict, step: int, model_config: dict = MODEL_CONFIG, tokenizer=None):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / f"model_{step:06d}.pt")
    meta = {"step": step, "model_config": model_config, "val_bpb": 0.81,
            "user_config": {"depth": 2, "run": "dummy"}, "device_batch_size": 4}
    (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    (folder / f"optim_{step:06d}_rank0.pt").write_bytes(b"not a torch file: must be ignored")
    if tokenizer is not None:
        with open(folder / "tokenizer.pkl", "wb") as f:
            pickle.dump(tokenizer.enc, f)
    return folder


def today_state(cfg: dict, seed: int) -> dict:
    """Weights in the format of today's nanochat (March 2026 and later): the October tables padded to a multiple of
    64 tokens, plus value embeddings and their gates on alternating layers (the last included), residual and x0
    lambdas, the smear gate and lambda and the backout lambda -- all random, none at its neutral value."""
    g = torch.Generator().manual_seed(seed + 100)
    V, C, L = cfg["vocab_size"], cfg["n_embd"], cfg["n_layer"]
    padded = -(-V // 64) * 64
    kv = cfg["n_kv_head"] * (C // cfg["n_head"])
    state = random_state({**cfg, "vocab_size": padded}, seed, prefix="", bf16=())
    for i in range(L):
        if i % 2 == (L - 1) % 2:
            state[f"value_embeds.{i}.weight"] = torch.randn(padded, kv, generator=g)
            state[f"transformer.h.{i}.attn.ve_gate.weight"] = torch.randn(cfg["n_kv_head"], 12, generator=g)
    state |= {"resid_lambdas": 1 + 0.2 * torch.randn(L, generator=g), "x0_lambdas": 0.3 * torch.randn(L, generator=g),
              "smear_gate.weight": torch.randn(1, 24, generator=g), "smear_lambda": torch.tensor([0.7]),
              "backout_lambda": torch.tensor([0.4])}
    return state


# --- an independent implementation of nanochat's forward, straight from the equations ------------------------
def reference_logits(state: dict, cfg: dict, idx: torch.Tensor, short_window: int | None = None,
                     window_pattern: str = "L", today: bool = False) -> torch.Tensor:
    """October 2025's forward, or with `today` that of nanochat since March 2026 (smear, residual lambdas, value
    embeddings, QK scale 1.2, rotary base 100000, backout, padded vocabulary)."""
    w = {k.removeprefix("_orig_mod."): v.to(torch.float64) for k, v in state.items()}
    H, KV, C = cfg["n_head"], cfg["n_kv_head"], cfg["n_embd"]
    D, L = C // H, cfg["n_layer"]
    B, T = idx.shape

    def norm(x):
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + torch.finfo(x.dtype).eps)

    inv_freq = (100000.0 if today else 10000.0) ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    theta = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    cos, sin = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]

    def rotate(x):  # (B, T, heads, D), half-split pairs (x_i, x_{i + D/2})
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)

    pos = torch.arange(T)
    x = norm(w["transformer.wte.weight"][idx])
    if today:  # smear: position t >= 1 adds lambda sigmoid(x_t[:24] . g) x_{t-1}
        gate = w["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ w["smear_gate.weight"].T)
        x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
    x0, backout = x, None
    for i in range(L):
        p = f"transformer.h.{i}."
        if today:
            x = w["resid_lambdas"][i] * x + w["x0_lambdas"][i] * x0
        h = norm(x)
        q = rotate((h @ w[p + "attn.c_q.weight"].T).view(B, T, H, D))
        k = rotate((h @ w[p + "attn.c_k.weight"].T).view(B, T, KV, D))
        v = (h @ w[p + "attn.c_v.weight"].T).view(B, T, KV, D)
        if f"value_embeds.{i}.weight" in w:  # ResFormer: v += 3 sigmoid(h[:12] . Wg) E[token], per K/V head
            gate = 3 * torch.sigmoid(h[..., :12] @ w[p + "attn.ve_gate.weight"].T)  # (B, T, KV)
            v = v + gate[..., None] * w[f"value_embeds.{i}.weight"][idx].view(B, T, KV, D)
        q, k = norm(q), norm(k)
        if today:
            q, k = 1.2 * q, 1.2 * k
        allowed = pos[None, :] <= pos[:, None]  # key j <= query i
        short = window_pattern[i % len(window_pattern)] == "S" and i != L - 1
        if short:  # flash-attention window (left, 0): i - left <= j
            allowed = allowed & (pos[:, None] - pos[None, :] <= short_window)
        heads = []
        for head in range(H):
            g = head // (H // KV)  # query heads [g*H/KV, (g+1)*H/KV) share kv head g
            scores = q[:, :, head] @ k[:, :, g].transpose(1, 2) / math.sqrt(D)  # (B, T, T)
            scores = scores.masked_fill(~allowed, float("-inf"))
            heads.append(scores.softmax(dim=-1) @ v[:, :, g])
        x = x + torch.cat(heads, dim=-1) @ w[p + "attn.c_proj.weight"].T
        hidden = torch.relu(norm(x) @ w[p + "mlp.c_fc.weight"].T) ** 2
        x = x + hidden @ w[p + "mlp.c_proj.weight"].T
        if today and i == L // 2:
            backout = x
    if backout is not None:
        x = x - w["backout_lambda"] * backout
    logits = (norm(x) @ w["lm_head.weight"].T)[..., :cfg["vocab_size"]]  # nanochat crops its padded vocabulary
    return 15.0 * torch.tanh(logits / 15.0)


def tokens(batch=2, length=24, vocab=512, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- tests ----------------------------------------------------------------------------------------------------
def test_logits_match_an_independent_nanochat_forward(tmp_path, tokenizer):
    state = random_state(MODEL_CONFIG, seed=0)
    assert any(v.dtype == torch.bfloat16 for v in state.values()) and all(k.startswith("_orig_mod.") for k in state)
    folder = write_nanochat(tmp_path / "d2", state, step=650, tokenizer=tokenizer)
    model, tok = load_nanochat(folder)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    idx = tokens()
    with torch.no_grad():
        got = model(idx)
    want = reference_logits(state, MODEL_CONFIG, idx)
    assert got.shape == (2, 24, 512)
    assert want.abs().max() > 5  # the softcap and every weight matter
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    assert tok is not None and tok.vocab_size == 512
    assert tok.encode(TEXT) == tokenizer.encode(TEXT)

    without_tokenizer = write_nanochat(tmp_path / "bare", state, step=1)
    assert load_nanochat(without_tokenizer)[1] is None


def test_window_pattern_maps_to_nanochat_sliding_windows(tmp_path):
    cfg = {**MODEL_CONFIG, "window_pattern": "SSL", "n_layer": 3}
    config = nanochat_config({"model_config": cfg})
    assert config.window_pattern == "SSL" and config.attention_windows() == [17, 17, None]
    state = random_state(cfg, seed=3, prefix="")
    model, _ = load_nanochat(write_nanochat(tmp_path / "swa", state, step=5, model_config=cfg))
    idx = tokens(batch=1, length=32)  # longer than the short window, so the windows matter
    with torch.no_grad():
        got = model(idx)
    want = reference_logits(state, cfg, idx, short_window=32 // 2, window_pattern="SSL")
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    full = reference_logits(state, cfg, idx)
    assert (full - want).abs().max() > 1e-2


TODAY_CONFIG = {"sequence_len": 1024, "vocab_size": 500, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 64,
                "window_pattern": "SSSL"}


def test_todays_checkpoints_import_exactly_and_decode_through_the_cache(tmp_path):
    state = today_state(TODAY_CONFIG, seed=5)
    assert state["transformer.wte.weight"].shape == (512, 64) and "value_embeds.3.weight" in state
    folder = write_nanochat(tmp_path / "today", state, step=7, model_config=TODAY_CONFIG)
    model, _ = load_nanochat(folder)
    config = model.config
    assert (config.smear, config.residual_scalars, config.backout, config.backout_at, config.value_embed_layers,
            config.qk_scale, config.rope_base) == (True, True, True, 2, [1, 3], 1.2, 100000.0)
    # today's short window: ceil(1024 / 4 / 128) * 128 = 256 tokens to the left, so 300 tokens reach past it
    assert config.attention_windows() == [257, 257, 257, None]
    idx = tokens(batch=2, length=300, vocab=500, seed=2)
    with torch.no_grad():
        got = model(idx).double()
    want = reference_logits(state, TODAY_CONFIG, idx, short_window=256, window_pattern="SSSL", today=True)
    assert got.shape == (2, 300, 500) and want.abs().max() > 5
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    for option in ("smear_lambda", "backout_lambda", "x0_lambdas"):  # each new weight matters
        zeroed = {**state, option: torch.zeros_like(state[option])}
        other = reference_logits(zeroed, TODAY_CONFIG, idx[:, :40], 256, "SSSL", today=True)
        assert (other - want[:, :40]).abs().max() > 1e-2, option
    # decode through the cache (smear's previous embedding included) equals the full forward
    from adamba.model.cache import InferenceCache

    cache = InferenceCache(model, 2, 300)
    with torch.no_grad():
        steps = [model(idx[:, :280], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(280, 300)]
    torch.testing.assert_close(torch.cat(steps, 1).double(), want, atol=1e-4, rtol=0)


def test_checkpoints_between_the_two_generations_are_refused_by_name(tmp_path):
    state = today_state(TODAY_CONFIG, seed=5)
    del state["smear_gate.weight"], state["smear_lambda"], state["backout_lambda"]  # as in January 2026
    with pytest.raises(CheckpointError, match=r"without smear_gate\.weight: a checkpoint from nanochat's "
                                              r"January-March 2026 code"):
        load_nanochat(write_nanochat(tmp_path / "between", state, step=1, model_config=TODAY_CONFIG))
    odd = {**today_state(TODAY_CONFIG, seed=5), "engram.weight": torch.ones(2)}
    with pytest.raises(CheckpointError, match=r"unrecognised key\(s\) \['engram\.weight'\] \(expected, for "
                                              r"nanochat's 2026-03 architecture"):
        load_nanochat(write_nanochat(tmp_path / "odd", odd, step=1, model_config=TODAY_CONFIG))


def test_latest_step_by_default_and_step_picks_another(tmp_path):
    early, late = random_state(MODEL_CONFIG, seed=1, prefix=""), random_state(MODEL_CONFIG, seed=2)
    folder = write_nanochat(tmp_path / "run", early, step=99)
    write_nanochat(folder, late, step=1000)
    assert find_nanochat_step(folder) == 1000 and find_nanochat_step(folder, 99) == 99
    idx = tokens(batch=1, length=16)
    with torch.no_grad():
        latest = load_nanochat(folder)[0](idx).double()
        picked = load_nanochat(folder, step=99)[0](idx).double()
    torch.testing.assert_close(latest, reference_logits(late, MODEL_CONFIG, idx), atol=1e-4, rtol=0)
    torch.testing.assert_close(picked, reference_logits(early, MODEL_CONFIG, idx), atol=1e-4, rtol=0)
    assert (latest - picked).abs().max() > 1e-2


def test_bad_checkpoints_give_clear_errors(tmp_path):
    good = random_state(MODEL_CONFIG, seed=0)

    with pytest.raises(CheckpointError) as err:
        convert_state_dict({**good, "_orig_mod.resid_lambdas": torch.ones(2),
                            "transformer.h.2.mlp.c_fc.weight": torch.ones(256, 64)}, n_layer=2)
    assert "_orig_mod.resid_lambdas" in str(err.value) and "transformer.h.2.mlp.c_fc.weight" in str(err.value)

    extra = write_nanochat(tmp_path / "extra", {**good, "transformer.h.0.attn.gate.weight": torch.ones(2, 32)}, 1)
    with pytest.raises(CheckpointError, match=r"unrecognised key\(s\) \['transformer\.h\.0\.attn\.gate\.weight'\]"):
        load_nanochat(extra)

    wrong = dict(good)
    wrong["_orig_mod.transformer.h.1.attn.c_k.weight"] = torch.randn(64, 64)  # as if n_kv_head == n_head
    with pytest.raises(CheckpointError) as err:
        load_nanochat(write_nanochat(tmp_path / "shape", wrong, 1))
    assert "blocks.1.attn.c_k.weight: (64, 64) vs model (32, 64)" in str(err.value)
    assert "model_000001.pt" in str(err.value)

    missing = {k: v for k, v in good.items() if "lm_head" not in k}
    with pytest.raises(CheckpointError, match=r"missing keys \['lm_head.weight'\]"):
        load_nanochat(write_nanochat(tmp_path / "missing", missing, 1))

    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rope_theta'\]"):
        nanochat_config({"model_config": {**MODEL_CONFIG, "rope_theta": 1e5}})
    odd = write_nanochat(tmp_path / "odd", good, 1, model_config={**MODEL_CONFIG, "n_experts": 8})
    with pytest.raises(ValueError, match=r"meta_000001\.json.*unknown field\(s\) \['n_experts'\]"):
        load_nanochat(odd)
    with pytest.raises(ValueError, match="n_kv_head: 3 does not divide n_head=4"):
        nanochat_config({"model_config": {**MODEL_CONFIG, "n_kv_head": 3}})

    with pytest.raises(FileNotFoundError, match="no-such-folder: no such folder"):
        load_nanochat(tmp_path / "no-such-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no model_NNNNNN\.pt files"):
        find_nanochat_step(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no model_000007\.pt; the steps there are \[1\]"):
        load_nanochat(extra, step=7)
    (extra / "meta_000001.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta_000001\.json: missing"):
        load_nanochat(extra)
    corrupt = write_nanochat(tmp_path / "corrupt", good, 1)
    (corrupt / "model_000001.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model_000001\.pt: unreadable nanochat weights file"):
        load_nanochat(corrupt)


def test_import_command_writes_an_equivalent_adamba_checkpoint(tmp_path, tokenizer, capsys):
    folder = write_nanochat(tmp_path / "nc", random_state(MODEL_CONFIG, seed=4), step=42, tokenizer=tokenizer)
    assert main(["import", "nanochat", str(folder), "--tag", "imported"]) == 0
    assert "checkpoints/imported/step_000042" in capsys.readouterr().out
    ckpt = load_checkpoint(run_dir("imported"))
    assert ckpt.step == 42 and ckpt.meta["extra"]["imported_from"] == str(folder)
    model, _ = load_nanochat(folder)
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(ckpt.model(idx), model(idx))
    assert ckpt.tokenizer is not None and ckpt.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)

    assert main(["import", "nanochat", str(tmp_path / "nowhere"), "--tag", "x"]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    assert main(["import", "nanochat", str(folder), "--tag", "x", "--step", "3"]) == 2
    assert "no model_000003.pt" in capsys.readouterr().err
    assert main(["import", "nanochat", str(folder), "--tag", "../escape"]) == 2
    assert "--tag: '../escape' is not a valid folder name" in capsys.readouterr().err
