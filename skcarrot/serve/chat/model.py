"""A micro generative vision-language model: an image tower, visual prefix tokens, a causal decoder.

The image goes through the embedded micro CLIP's image tower; its embedding becomes
:data:`N_PREFIX` prefix vectors in the decoder's input space; the chat text follows as
open_clip BPE tokens (the real tokenizer: it lowercases, a letter such as ``b`` is one token
and ``ankle boot`` two); a small pre-norm causal transformer with input and output
embeddings tied gives the next token's logits over the whole 49,408-token vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MicroChatVLM", "CHAT_MODEL", "chat_text", "CONFIG", "build"]

#: The model id the server answers to.
CHAT_MODEL = "skcarrot-micro-chat"

#: The network's shape (what the shipped weights were trained with).
CONFIG = dict(vocab_size=49408, width=64, layers=3, heads=4, n_prefix=4, context=128, image_dim=64)
N_PREFIX = CONFIG["n_prefix"]


def chat_text(messages) -> str:
    """The text the decoder reads for ``messages`` (``[(role, text)]``), up to where the answer starts.

    Examples
    --------
    >>> from skcarrot.serve.chat.model import chat_text
    >>> chat_text([("system", "be brief."), ("user", "which digit?")])
    'system: be brief. user: which digit? assistant:'
    """
    return " ".join(f"{role}: {text.strip()}" for role, text in messages) + " assistant:"


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class MicroChatVLM(nn.Module):
    """Image tower -> prefix vectors -> causal decoder; ``forward`` gives next-token logits.

    Parameters
    ----------
    visual : torch.nn.Module
        An image tower mapping ``(B, 3, 32, 32)`` to ``(B, image_dim)`` (the micro CLIP's).
    vocab_size, width, layers, heads, n_prefix, context, image_dim : int
        The decoder's shape (see :data:`CONFIG`).
    """

    def __init__(self, visual: nn.Module, vocab_size: int = 49408, width: int = 64, layers: int = 3,
                 heads: int = 4, n_prefix: int = 4, context: int = 128, image_dim: int = 64) -> None:
        super().__init__()
        self.visual = visual
        self.n_prefix, self.width, self.context = n_prefix, width, context
        self.prefix = nn.Linear(image_dim, n_prefix * width)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.01)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def image_prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, n_prefix, width)`` prefix vectors of ``(B, 3, 32, 32)`` images."""
        features = F.normalize(self.visual(pixels).float(), dim=-1)
        return self.prefix(features * math.sqrt(features.shape[-1])).view(-1, self.n_prefix, self.width)

    def hidden(self, prefix: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``(B, P + T, width)``; ``prefix`` ``(B, P, width)`` (P may be 0), ``tokens`` ``(B, T)``.

        ``lengths`` (the real tokens of each row, right-padded) masks the padding.
        """
        x = torch.cat([prefix, self.token_embedding(tokens)], dim=1)
        n = x.shape[1]
        if n > self.context:
            raise ValueError(f"{n} positions exceed the model's context of {self.context}")
        x = x + self.positional_embedding[:n]
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        padding = None
        if lengths is not None:
            padding = torch.arange(n, device=x.device)[None, :] >= (prefix.shape[1] + lengths)[:, None]
        for block in self.blocks:
            x = block(x, mask, padding)
        return self.ln_final(x)

    def logits_at(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits over the vocabulary (tied embeddings)."""
        return hidden @ self.token_embedding.weight.T


def _visual():
    import open_clip

    from ...backends.models import EMBEDDED_MODEL, EMBEDDED_WEIGHTS
    from ...backends.openclip import register_model_configs

    register_model_configs()
    return open_clip.create_model(EMBEDDED_MODEL, pretrained=EMBEDDED_WEIGHTS), open_clip.get_tokenizer(EMBEDDED_MODEL)


def build(weights: str | None = None) -> MicroChatVLM:
    """The network; with ``weights`` (a safetensors file) loaded, else the recipe's initial state."""
    clip, _ = _visual()
    model = MicroChatVLM(clip.visual, **CONFIG)
    if weights is None:
        with torch.no_grad():
            model.token_embedding.weight.copy_(clip.token_embedding.weight[:, : CONFIG["width"]])
    else:
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(weights).items()}
        model.load_state_dict(state)
    return model
