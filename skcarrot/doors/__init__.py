"""The doors a black box may offer, as strategies the estimator picks once per fit.

A *door* is everything the estimator needs to know about one kind of access to
a black-box model: what a prompt is, how it is scored and counted, which prompt
search moves it, what "auto" means for the budget, and which fitted attributes
describe the learned prompt. :class:`~skcarrot.CarrotClassifier` holds no
branch on the door: it asks :func:`pick_door` for one and delegates.

- ``"embedding"`` (:class:`EmbeddingDoor`): prompt offsets added to the context
  word embeddings, searched by CMA-ES (the paper's door).
- ``"text"`` (:class:`TextDoor`): prompt strings, one per class, searched word
  by word (what hosted endpoints offer).
- ``"chat"`` (:class:`ChatDoor`): an instruction and one option text per class,
  scored by a chat model's letter log-probabilities (what chat APIs offer).

A new door is one module with a :class:`Door` subclass and a call to
:func:`register_door`.
"""

from ._base import Door, door_named, fitted_attribute_names, pick_door, register_door
from .embedding import EmbeddingDoor
from .chat import ChatDoor
from .text import TextDoor

register_door(EmbeddingDoor)
register_door(TextDoor)
register_door(ChatDoor)

__all__ = ["Door", "ChatDoor", "EmbeddingDoor", "TextDoor", "door_named", "fitted_attribute_names", "pick_door", "register_door"]
