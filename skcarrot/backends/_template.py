"""The default prompt template, in a module of its own so every backend module can import it.

:mod:`skcarrot.backends.models` re-exports it (``skcarrot.backends.models.DEFAULT_TEMPLATE``);
:mod:`~skcarrot.backends.openclip` imports it from here, because ``models`` imports ``openclip``.
"""

__all__ = ["DEFAULT_TEMPLATE"]

#: The hand-written prompt around a class name: the zero-shot prompt of every door.
DEFAULT_TEMPLATE = "a photo of a {}."
