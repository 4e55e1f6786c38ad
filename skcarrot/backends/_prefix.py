"""Exact shared-prefix text encoding for causal CLIP text transformers.

Every class prompt of one prompt offset starts with the same tokens: the start token and
the context words. Under causal attention their hidden states do not depend on what
follows, so they are computed once per prompt offset and their keys and values reused by
every class suffix. The result equals the plain forward pass up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["supports_prefix_sharing", "encode_shared_prefix"]


def supports_prefix_sharing(tower: nn.Module) -> bool:
    """True for open_clip's standard causal text transformer blocks."""
    transformer = getattr(tower, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or getattr(tower, "attn_mask", None) is None or not getattr(transformer, "batch_first", True):
        return False
    for b in blocks:
        attn = getattr(b, "attn", None)
        if (
            type(b).__name__ != "ResidualAttentionBlock"
            or not isinstance(attn, nn.MultiheadAttention)
            or not attn.batch_first
            or not attn._qkv_same_embed_dim
            or attn.in_proj_bias is None
            or hasattr(b, "ln_1_kv")
        ):
            return False
    return True


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, length, d = t.shape
    return t.view(b, length, n_heads, d // n_heads).transpose(1, 2)


def _qkv(block: nn.Module, x: torch.Tensor):
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    h = attn.num_heads
    return _heads(q, h), _heads(k, h), _heads(v, h)


def _finish(block: nn.Module, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    b, h, length, hd = o.shape
    o = o.transpose(1, 2).reshape(b, length, h * hd)
    x = x + block.ls_1(F.linear(o, block.attn.out_proj.weight, block.attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def encode_shared_prefix(tower: nn.Module, prefix: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
    """Hidden states of the suffix tokens after the last block.

    Parameters
    ----------
    tower : module with ``transformer.resblocks`` (see :func:`supports_prefix_sharing`)
    prefix : Tensor (P, Lp, D)
        Embeddings (positions added) of the shared tokens, one row per prompt offset.
    suffix : Tensor (C, Ls, D)
        Embeddings (positions added) of each class's remaining tokens.

    Returns
    -------
    hidden : Tensor (P, C, Ls, D)
    """
    p, lp, d = prefix.shape
    c, ls, _ = suffix.shape
    xp = prefix
    xs = suffix.unsqueeze(0).expand(p, c, ls, d).reshape(p * c, ls, d)
    # suffix query i sees every prefix key and suffix keys 0..i
    mask = torch.ones(ls, lp + ls, dtype=torch.bool, device=prefix.device)
    mask[:, lp:] = torch.tril(mask[:, lp:])
    for block in tower.transformer.resblocks:
        qp, kp, vp = _qkv(block, xp)
        qs, ks, vs = _qkv(block, xs)
        h, hd = kp.shape[1], kp.shape[3]
        kp_all = kp.unsqueeze(1).expand(p, c, h, lp, hd).reshape(p * c, h, lp, hd)
        vp_all = vp.unsqueeze(1).expand(p, c, h, lp, hd).reshape(p * c, h, lp, hd)
        os_ = F.scaled_dot_product_attention(qs, torch.cat([kp_all, ks], 2), torch.cat([vp_all, vs], 2), attn_mask=mask)
        op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
        xs = _finish(block, xs, os_)
        xp = _finish(block, xp, op)
    return xs.view(p, c, ls, d)
