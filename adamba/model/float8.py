"""Float8 training matmuls through torchao (`--float8 tensorwise | rowwise | rowwise_with_gw_hp`, nanochat's
`--fp8`; optional extra `adamba[fp8]`).

torchao's usual entry point swaps `nn.Linear` modules for `Float8Linear`. adamba's blocks multiply by *slices*
of their weights (a Matryoshka width uses the leading rows and columns), which a module swap does not reach, so
the blocks' projections all go through `linear` below, and `enable_float8` marks the layers it may run in float8;
`linear` then calls torchao's autograd matmul (the one `Float8Linear.forward` calls) on the slice: the input and
the weight slice are scaled and cast to float8 (e4m3; gradients e5m2) per call, their product accumulates in
higher precision, and the weight's gradient reaches the whole parameter through the slice.

Where it applies: the attention projections (q, k, v, out), the MLP's two matrices and Mamba's in/out
projections, whose dimensions and slices are multiples of 16 (what the hardware's float8 matmul needs); the
embeddings, lm_head, the small gates and Mamba's x/dt projections stay in the compute dtype. Only in training
mode: evaluation and inference run in the compute dtype (as nanochat evaluates in bf16), so every exactness
property of the model (decode = forward, slices = standalone models) is untouched. Off by default; it needs a GPU
with float8 tensor cores (compute capability 8.9: Ada, Hopper and later) -- on the CPU torch's `_scaled_mm`
emulates it slowly, which the tests use.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MULTIPLE = 16  # float8 matmuls take dimensions that are multiples of 16
MIN_CAPABILITY = (8, 9)


class Float8Matmul:
    """torchao's float8 matmul with one recipe's configuration, shared by every marked layer."""

    def __init__(self, recipe: str):
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
        from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

        self.recipe, self.config = recipe, Float8LinearConfig.from_recipe_name(recipe)
        self.matmul = matmul_with_hp_or_float8_args
        gemm = lambda g: ScaledMMConfig(False, g.use_fast_accum, False, self.config.pad_inner_dim)  # noqa: E731
        self.mm_config = LinearMMConfig(gemm(self.config.gemm_config_output), gemm(self.config.gemm_config_grad_input),
                                        gemm(self.config.gemm_config_grad_weight))

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # as F.linear under autocast: the product in the compute dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return self.matmul.apply(x, weight.t(), self.mm_config, self.config)


def linear(x: torch.Tensor, layer: nn.Linear, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """x @ layer.weight[:rows, :cols].T (+ bias[:rows]): a block's projection, at a Matryoshka slice when rows or
    cols are given -- in float8 while training if `enable_float8` marked the layer and the slice's dimensions are
    multiples of 16, else as F.linear."""
    weight = layer.weight if rows is None and cols is None else layer.weight[:rows, :cols]
    bias = None if layer.bias is None else layer.bias[:rows]
    float8 = getattr(layer, "float8", None)
    if float8 is None or not layer.training or weight.shape[0] % MULTIPLE or weight.shape[1] % MULTIPLE:
        return F.linear(x, weight, bias)
    out = float8(x, weight)
    return out if bias is None else out + bias.to(out.dtype)


def float8_layers(model: nn.Module) -> list[nn.Linear]:
    """The projections `linear` may run in float8: those of the blocks (named in the module docstring)."""
    names = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "mixer.in_proj",
             "mixer.out_proj")
    return [module for name, module in model.blocks.named_modules()
            if isinstance(module, nn.Linear) and name.split(".", 1)[-1] in names]


def check_float8(recipe: str, device: torch.device) -> None:
    """A clear error at start-up where float8 cannot run: torchao missing, or a GPU without float8 matmuls."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError as error:
        raise ValueError(f"float8: needs torchao ({error}); pip install 'adamba[fp8]', or leave float8 off") from None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"float8: this GPU ({torch.cuda.get_device_name(device)}, compute capability "
                         f"{major}.{minor}) has no float8 matmuls; they need 8.9 or later (Ada, Hopper, Blackwell) "
                         "-- leave float8 off")


def enable_float8(model: nn.Module, recipe: str, device: torch.device) -> str:
    """Mark the model's float8-capable projections (before compile and FSDP/DDP wrapping); a one-line summary."""
    check_float8(recipe, device)
    matmul = Float8Matmul(recipe)
    layers = float8_layers(model)
    marked = [layer for layer in layers if layer.in_features % MULTIPLE == 0 and layer.out_features % MULTIPLE == 0]
    for layer in marked:
        layer.float8 = matmul
    return (f"float8 ({recipe} scaling, torchao): {len(marked)} of {len(layers)} block projections in training "
            "passes; evaluation and inference in the compute dtype")
