"""The DFlash block-diffusion drafter.

One pass over the block [root, MASK, ..., MASK] predicts every masked position at once. Context
comes from the target: its hidden features at `target_layer_ids` for every accepted token are
projected by `fc`, RMS-normed and used by every drafter layer as extra keys and values (cached).
Block queries see all context and the whole block (no causal mask). Token embeddings and the
output head are the target's own; with a draft vocabulary, the head is only the target's rows
for the K tokens the drafter may propose (a `draft_vocab` index stored with its weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from caddtree.models.kv_buffer import joined
from caddtree.models import packed_linear


@dataclass
class DrafterConfig:
    """The fields of a published DFlash `config.json` that the drafter uses."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    target_layer_ids: list[int]
    num_target_layers: int
    block_size: int = 16
    mask_token_id: int | None = None
    draft_vocab_size: int | None = None  # K: the drafter scores only K target tokens (None: all)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    vocab_size: int | None = None
    extra: dict = field(default_factory=dict)  # other fields of config.json, written back unchanged

    @property
    def draft_len(self) -> int:
        """D: how many future positions one block predicts."""
        return self.block_size - 1


def default_target_layer_ids(num_drafter_layers: int, num_target_layers: int) -> list[int]:
    """DFlash's spread of feature layers over the target (DESIGN §3)."""
    if num_drafter_layers == 1:
        return [num_target_layers // 2]
    step = (num_target_layers - 4) / (num_drafter_layers - 1)
    return [round(1 + i * step) for i in range(num_drafter_layers)]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Rotary(NamedTuple):
    """cos and sin of the rotary angles at a pass's positions, made once for all its layers."""

    cos: torch.Tensor  # (seq, half), or (batch, 1, seq, half) for per-row positions
    sin: torch.Tensor

    @classmethod
    def at(cls, positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> "Rotary":
        """Tables for absolute positions (seq,) shared by the batch, or (batch, seq) per batch row."""
        half = head_dim // 2
        inv_freq = theta ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
        angles = positions.float()[..., None] * inv_freq  # (..., seq, half)
        if positions.dim() > 1:
            angles = angles.unsqueeze(-3)  # broadcast over heads
        return cls(angles.cos().to(dtype), angles.sin().to(dtype))


def rotate(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotary embedding (half-split layout) of x (..., heads, seq, head_dim)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * rotary.cos - x2 * rotary.sin, x2 * rotary.cos + x1 * rotary.sin], dim=-1)


class DrafterAttention(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(config.hidden_size, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(..., seq, heads*head_dim) -> (..., heads, seq, head_dim)"""
        return x.unflatten(-1, (heads, self.head_dim)).transpose(-3, -2)

    def keys_values(self, x: torch.Tensor, rotary: Rotary):
        """Rotated, normed keys and values (..., kv_heads, seq, head_dim) of inputs x (..., seq, H)."""
        keys = rotate(self.k_norm(self._split(self.k_proj(x), self.kv_heads)), rotary)
        return keys, self._split(self.v_proj(x), self.kv_heads)

    def forward(self, x, rotary: Rotary, context_keys, context_values, attn_mask=None):
        """x: block hidden states (..., b, H); context keys/values (..., kv_heads, c, head_dim), as
        tensors or as KVBuffers (decoding: the block is appended in place for this pass only)."""
        queries = rotate(self.q_norm(self._split(self.q_proj(x), self.heads)), rotary)
        block_keys, block_values = self.keys_values(x, rotary)
        with joined(context_keys, block_keys) as keys, joined(context_values, block_values) as values:
            out = _attention(queries, keys, values, attn_mask, self.heads != self.kv_heads)
        return self.o_proj(out.transpose(-3, -2).flatten(-2))


def _attention(queries, keys, values, attn_mask, grouped: bool) -> torch.Tensor:
    """SDPA over (..., heads, seq, head_dim); an unbatched (3-D) pass is given a batch axis, since
    the CPU's fused kernel takes only 4-D inputs (without it: the unfused path, twice as slow)."""
    if queries.dim() == 3:
        return _attention(queries[None], keys[None], values[None], attn_mask, grouped)[0]
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=attn_mask, enable_gqa=grouped)


class DrafterMLP(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DrafterAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DrafterMLP(config)

    def forward(self, x, rotary: Rotary, context_keys, context_values, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), rotary, context_keys, context_values, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    """The drafter's own weights; embedding and head are borrowed from the target at call time."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        feature_size = len(config.target_layer_ids) * config.hidden_size
        self.fc = nn.Linear(feature_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(DrafterLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        size = config.draft_vocab_size
        # (K,) target token id of each draft-vocabulary entry, increasing; None: the whole vocabulary
        self.register_buffer("draft_vocab", None if size is None else torch.zeros(size, dtype=torch.long))

    @property
    def dtype(self) -> torch.dtype:
        """The precision its weights (and so its passes) are in."""
        return self.fc.weight.dtype

    def context(self, target_features: torch.Tensor) -> torch.Tensor:
        """Target features (..., c, n_layers*H) -> drafter context states (..., c, H)."""
        return self.hidden_norm(self.fc(target_features))

    def context_keys_values(self, target_features: torch.Tensor, positions: torch.Tensor):
        """Per layer, the keys and values that context tokens at `positions` contribute."""
        context = self.context(target_features)
        rotary = self.rotary(positions)
        return [layer.self_attn.keys_values(context, rotary) for layer in self.layers]

    def block_hidden(self, block_embeds, positions, context_kv, attn_mask=None) -> torch.Tensor:
        """Final normed hidden states (..., b, H) of a block given per-layer context keys/values
        (tensors, or KVBuffers that the pass leaves as it found them)."""
        x = block_embeds
        rotary = self.rotary(positions)
        for layer, (keys, values) in zip(self.layers, context_kv):
            x = layer(x, rotary, keys, values, attn_mask)
        return self.norm(x)

    def rotary(self, positions: torch.Tensor) -> Rotary:
        """In the drafter's precision: that of the queries and keys it rotates, autocast or not."""
        return Rotary.at(positions, self.config.head_dim, self.config.rope_theta, self.dtype)



class DraftHead:
    """The target's output head over the drafter's draft vocabulary (all of the target's, without one).

    Outputs index the draft vocabulary; `target_tokens` maps them back to target token ids.
    """

    def __init__(self, drafter: DFlashDrafter, target_head: nn.Linear):
        self.vocab = drafter.draft_vocab  # (K,) or None
        weight, bias = target_head.weight.detach(), getattr(target_head, "bias", None)
        self.weight = self._rows(weight, drafter.dtype)  # (K, H)
        self.bias = None if bias is None else self._rows(bias.detach(), drafter.dtype)
        if self.vocab is not None:  # (V,) draft index of every target token, -1 outside
            self._index_of = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
            self._index_of[self.vocab] = torch.arange(len(self.vocab), device=weight.device)

    def _rows(self, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The draft vocabulary's entries of a head tensor, gathered once, in the drafter's precision
        (a copy only where either differs)."""
        return (table if self.vocab is None else table[self.vocab]).to(dtype)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., K) of hidden states (..., H)."""
        return packed_linear.linear(hidden, self.weight, self.bias)

    def target_tokens(self, draft_tokens: torch.Tensor) -> torch.Tensor:
        return draft_tokens if self.vocab is None else self.vocab[draft_tokens]

    def draft_indices(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary index of each target token id, -1 for a token outside it."""
        return token_ids if self.vocab is None else self._index_of[token_ids]
