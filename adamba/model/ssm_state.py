"""The decoding state of a state-space mixer (Mamba-1, Mamba-2): per row, the last d_conv-1 inputs of the causal
conv and the SSM state -- and the trail that lets speculative decoding take back tokens it has already read.

A KV cache forgets a token by moving its length back; a running summary cannot, since h_t has absorbed every token.
Speculative decoding (infer/speculative.py) feeds tokens that may then be rejected, so while a trail is on the
state keeps the SSM state after each new token and the new conv inputs (`record`), and `rollback(keep)` sets each
row to its state after its first keep[b] tokens -- exactly the state a decode of only those tokens leaves, with
no recompute. The memory is (tokens fed while the trail is on + 1) copies of the SSM state per row and layer (k + 2
for a draft of k tokens, e.g. 7 x 1024 x 16 floats = 460 KB per row for a Mamba-1 layer at d_inner 1024, k = 5),
held only until the rollback, plus as many conv columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def ssm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The SSM state is kept in at least float32, whatever the weights' dtype: it sums up every token read, and
    rounding it to bf16 at each decoding step would compound (the conv window holds plain inputs: the cache's dtype)."""
    return torch.promote_types(dtype, torch.float32)


def keep_conv_window(conv: torch.Tensor, window: torch.Tensor, valid: torch.Tensor | None) -> None:
    """Store in `conv` (B, channels, d_conv - 1) the last conv inputs of `window` (B, channels, d_conv - 1 + L):
    the history the next token's conv reads. With right padding, each row's history ends at its last real
    token (`valid` of them), not at the padding."""
    k = conv.size(-1)
    if valid is None:
        conv.copy_(window[:, :, window.size(-1) - k:])
        return
    idx = (valid + k)[:, None] - torch.arange(k, 0, -1, device=window.device)[None, :]
    conv.copy_(window.gather(2, idx[:, None, :].expand(-1, window.size(1), -1)))


@dataclass
class _Trail:
    ssm: list[torch.Tensor] = field(default_factory=list)  # (B, L_i, *state) per forward, the first: L = 1, start
    conv: list[torch.Tensor] = field(default_factory=list)  # (B, channels, L_i), the first: the history at start


class ConvSSMState:
    """conv (B, channels, d_conv - 1) and ssm (B, *state) of one layer; a mixer's forward reads and updates both."""

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor):
        self.conv, self.ssm = conv, ssm
        self.trail: _Trail | None = None

    def load_row(self, slot: int, source: ConvSSMState, row: int = 0) -> None:
        """Row `slot` takes over row `row` of `source` (see InferenceCache.load_row)."""
        self.conv[slot], self.ssm[slot] = source.conv[row], source.ssm[row]

    def first_rows(self, n: int) -> ConvSSMState:
        """A state over rows [0, n) sharing this one's tensors (see InferenceCache.first_rows)."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.conv, view.ssm, view.trail = self.conv[:n], self.ssm[:n], None
        return view

    def absorb(self, view: ConvSSMState) -> None:
        """Nothing to take back: conv and ssm are shared."""

    # --- speculative decoding: keep what is needed to take tokens back -------------------------------------------
    def begin_trail(self) -> None:
        self.trail = _Trail([self.ssm.clone()[:, None]], [self.conv.clone()])

    def record(self, states: torch.Tensor, inputs: torch.Tensor, valid: torch.Tensor | None) -> None:
        """After a forward: `states` (B, L, *state), the SSM state after each new token; `inputs` (B, channels, L),
        the new conv inputs. Does nothing without a trail."""
        if self.trail is None:
            return
        if valid is not None:  # a padded token would sit in the trail as if it had been read
            raise ValueError("a trail (speculative decoding) takes whole rows of new tokens, not right-padded ones")
        # copies: a decoding step updates the state it was given in place
        self.trail.ssm.append(states.to(self.ssm.dtype, copy=True))
        self.trail.conv.append(inputs.to(self.conv.dtype, copy=True))

    def rollback(self, keep: torch.Tensor) -> None:
        """Row b goes back to its state after the first keep[b] tokens read since `begin_trail`; the trail ends.
        A layer that read nothing meanwhile (past a truncated draft's depth) stays as it is."""
        if len(self.trail.ssm) == 1:
            self.trail = None
            return
        states = torch.cat(self.trail.ssm, dim=1)  # (B, 1 + tokens, *state): index t = after t tokens
        self.ssm.copy_(states[torch.arange(states.size(0), device=keep.device), keep])
        keep_conv_window(self.conv, torch.cat(self.trail.conv, dim=-1), keep)
        self.trail = None
