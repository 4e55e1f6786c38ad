"""Prompt generation modules: derivative-free searches over prompts, behind one protocol.

Every search offers :class:`PromptSearch`: ``ask`` candidates, ``tell`` their
fitness, read the ``current`` prompt and its ``coordinates``, and save or
restore its ``state``. The training loop drives any of them the same way.

- :class:`CMAESPromptSearch` (embedding door): CMA-ES over ``z``, the prompt
  offset being ``A z`` through a fixed random projection.
- :class:`TextPromptSearch` (text door): a policy gradient over each class's
  wording, after screening candidate words.
"""

from ._base import PromptSearch
from .cmaes import CMAESPromptSearch, projection_matrix
from .words import TextPromptSearch, tokenizer_words

__all__ = ["PromptSearch", "CMAESPromptSearch", "TextPromptSearch", "projection_matrix", "tokenizer_words"]
