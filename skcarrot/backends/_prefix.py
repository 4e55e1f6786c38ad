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

__all__ = ["supports_prefix_sharing", "encode_pooled_rows"]


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


def encode_pooled_rows(tower: nn.Module, prefix: torch.Tensor, suffix: torch.Tensor,
                       rows: torch.Tensor) -> torch.Tensor:
    """Hidden state, after the last block, of the token each class's prompt is pooled at.

    Parameters
    ----------
    tower : module with ``transformer.resblocks`` (see :func:`supports_prefix_sharing`)
    prefix : Tensor (P, Lp, D)
        Embeddings (positions added) of the shared tokens, one row per prompt offset.
    suffix : Tensor (C, Ls, D)
        Embeddings (positions added) of each class's remaining tokens.
    rows : Tensor (C,)
        The position in each class's suffix of the token the tower pools (end of text).

    Returns
    -------
    hidden : Tensor (P, C, D)

    The last block needs every row's keys and values but only the pooled row's attention
    output, residual stream and MLP, so it computes those for that row alone; the prefix's own
    output of the last block is never used, so it is not computed. The keys and values shared
    by every class are copied once, straight into place. The result equals the plain forward
    pass up to float rounding.
    """
    p, lp, d = prefix.shape
    c, ls, _ = suffix.shape
    xp = prefix
    xs = suffix.unsqueeze(0).expand(p, c, ls, d).reshape(p * c, ls, d)
    # suffix query i sees every prefix key and suffix keys 0..i
    mask = torch.ones(ls, lp + ls, dtype=torch.bool, device=prefix.device)
    mask[:, lp:] = torch.tril(mask[:, lp:])
    blocks = list(tower.transformer.resblocks)
    for block in blocks:
        qs, ks, vs = _qkv(block, xs)
        qp, kp, vp = _qkv(block, xp)
        h, hd = kp.shape[1], kp.shape[3]
        k = torch.cat([kp.unsqueeze(1).expand(p, c, h, lp, hd), ks.view(p, c, h, ls, hd)], 3)
        v = torch.cat([vp.unsqueeze(1).expand(p, c, h, lp, hd), vs.view(p, c, h, ls, hd)], 3)
        os_ = F.scaled_dot_product_attention(qs, k.view(p * c, h, lp + ls, hd), v.view(p * c, h, lp + ls, hd),
                                             attn_mask=mask)
        if block is blocks[-1]:
            seq, row = torch.arange(p * c, device=prefix.device), rows.repeat(p)
            return _finish(block, xs[seq, row].unsqueeze(1), os_[seq, :, row].unsqueeze(2)).view(p, c, d)
        op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
        xs = _finish(block, xs, os_)
        xp = _finish(block, xp, op)
    raise ValueError("the text tower has no blocks")
