"""Tree verification attention: the model is handed only the tree's own (q x q) mask, since every
tree token sees the whole cached context.

Installed as a transformers attention implementation: a 4-D mask narrower than the keys (only the
tree's columns) selects the paths below; anything else (prefill, batched generation) goes to
transformers' SDPA as before, which would repeat every key/value head under a mask.

Two paths, by measurement. On the CPU with up to ONE_CALL_KEYS keys, one fused call over the whole
context with grouped-query heads and a (q, context + q) boolean mask: per layer, at q = 6, 30 us
against the two-part form's 70 at context 100 and 90 against 125 at 500; the two-part form's
dozen small operations cost more than the context's columns of mask. Elsewhere (longer contexts,
CUDA) the context part takes the fast unmasked kernel, only the tree part is masked, and the two
are merged exactly through their log-sum-exps: no dense mask is built, moved or read.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

NAME = "caddtree_tree"
# One call wins up to ~1,000 keys for a 16-node tree (q = 17) and ~1,700 for a 5-node one (q = 6), on
# the 2-core CPU; larger trees, which that CPU never verifies, were not measured.
ONE_CALL_KEYS = 1024


def install(model: torch.nn.Module) -> bool:
    """Route `model`'s attention through `tree_attention`; False where this transformers lacks
    the hooks (then callers pass the full mask to the default attention)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False  # eager or flash kernels chosen on purpose: leave them
    AttentionInterface.register(NAME, tree_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (AttributeError, ValueError, KeyError):  # a transformers that refuses custom implementations
        return False
    return True


def tree_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention signature; query (B, Hq, q, d), key/value (B, Hkv, k, d)."""
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-1] >= key.shape[-2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    if query.device.type == "cpu" and key.shape[-2] <= ONE_CALL_KEYS:
        output = masked_tree_attention(query, key, value, attention_mask[0, 0], scale)
    else:
        output = context_and_tree_attention(query, key, value, attention_mask[0, 0], scale)
    return output.transpose(1, 2).contiguous(), None


def masked_tree_attention(query, key, value, tree_visible: torch.Tensor, scale: float) -> torch.Tensor:
    """What `context_and_tree_attention` computes, in one masked call (grouped-query heads unrepeated)."""
    context_len = key.shape[-2] - query.shape[-2]
    visible = torch.cat([tree_visible.new_ones(tree_visible.shape[0], context_len), tree_visible], dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=scale,
                                          enable_gqa=query.shape[1] != key.shape[1])


def context_and_tree_attention(query, key, value, tree_visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of q tree queries over context keys (all visible) and the last q keys (the tree,
    visible where `tree_visible` (q, q) says). Returns (B, Hq, q, d).

    Grouped-query heads are folded into the query axis, so no key or value is ever repeated.
    """
    batch, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    folded = query.reshape(batch, kv_heads, groups * queries, dim)  # query head h reads kv head h // groups
    context_len = key.shape[-2] - queries
    context_out, context_lse = _attend(folded, key[:, :, :context_len], value[:, :, :context_len], scale)
    tree_out, tree_lse = _attend(folded, key[:, :, context_len:], value[:, :, context_len:], scale,
                                 tree_visible.repeat(groups, 1))
    merged = _merge(context_out, context_lse, tree_out, tree_lse)
    return merged.reshape(batch, heads, queries, dim).to(query.dtype)


def _merge(out_a, lse_a, out_b, lse_b) -> torch.Tensor:
    """Softmax over the union of two key sets from each set's normalised output and log-sum-exp."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a.float() * torch.exp(lse_a - lse)[..., None] + out_b.float() * torch.exp(lse_b - lse)[..., None]


def _attend(query, key, value, scale, visible=None):
    """Attention and its log-sum-exp (B, H, q); `visible` (q, k) masks keys. Fused kernels where
    they return the log-sum-exp: on the CPU always, on CUDA for the unmasked context part."""
    if query.device.type == "cpu":
        mask = None if visible is None else torch.zeros((), dtype=query.dtype).masked_fill(~visible, -math.inf)[None, None]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, attn_mask=mask, scale=scale)
        return out, lse.float()
    if query.device.type == "cuda" and visible is None and not _FUSED_CUDA_FAILED:
        try:
            return _attend_fused_cuda(query, key, value, scale)
        except RuntimeError as error:  # a private kernel this GPU or PyTorch build lacks
            _disable_fused_cuda(error)
    return _attend_plain(query, key, value, scale, visible)


def _attend_fused_cuda(query, key, value, scale):
    if query.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, scale=scale)[:2]
    return out, lse[..., : query.shape[-2]].float()  # the efficient kernel pads lse to 32 rows


_FUSED_CUDA_FAILED = False


def _disable_fused_cuda(error: RuntimeError) -> None:
    global _FUSED_CUDA_FAILED
    _FUSED_CUDA_FAILED = True
    warnings.warn(f"fused CUDA attention unavailable, using the unfused form ({str(error).splitlines()[0]})")


def _attend_plain(query, key, value, scale, visible=None):
    """Unfused attention (any device); output and log-sum-exp."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse[..., None])
    return torch.matmul(weights, value.float()), lse
