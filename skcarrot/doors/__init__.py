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
- ``"chat"`` (:class:`ChatDoor`): a multiple-choice question per image to a chat
  model that returns log-probabilities, its instruction and class descriptions
  searched by successive halving then a local search.

A new door is one module with a :class:`Door` subclass and a call to
:func:`register_door`.
"""

from ._base import Door, door_named, fitted_attribute_names, pick_door, register_door
from .embedding import EmbeddingDoor
from .text import TextDoor
from .chat import ChatDoor

register_door(EmbeddingDoor)
register_door(TextDoor)
register_door(ChatDoor)

__all__ = ["ChatDoor", "Door", "EmbeddingDoor", "TextDoor", "door_named", "fitted_attribute_names", "pick_door", "register_door"]
