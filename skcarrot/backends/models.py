"""One place turns a model name into a model: the estimator, the benchmark and the server use it alike.

A model name means the same weights everywhere: ``None`` (or
``"skcarrot-micro-clip"``) is the embedded micro CLIP and its shipped weights;
any other open_clip name without a ``pretrained`` is its ``"openai"`` weights,
or the first tag open_clip lists for it when it has no ``"openai"`` tag.
Random weights are had only by asking for them (``pretrained="random"``), with
a warning: a server that answered with an untrained model would say nothing
wrong and be useless.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

# The hand-written prompt around a class name, re-exported here; its home is _template, which openclip
# (imported by open_model) can import without a cycle.
from ._template import DEFAULT_TEMPLATE

__all__ = [
    "DEFAULT_TEMPLATE",
    "EMBEDDED_MODEL",
    "EMBEDDED_WEIGHTS",
    "RANDOM_WEIGHTS",
    "RandomWeightsWarning",
    "open_model",
    "resolve_weights",
]

#: open_clip model name of the embedded model.
EMBEDDED_MODEL = "skcarrot-micro-clip"

#: Path of its shipped fp16 weights.
EMBEDDED_WEIGHTS = str(Path(__file__).resolve().parent.parent / "weights" / f"{EMBEDDED_MODEL}.safetensors")

#: The ``pretrained`` value that asks for a randomly initialised model.
RANDOM_WEIGHTS = "random"

#: The tag a model name alone means, when the model has it.
_DEFAULT_TAG = "openai"


class RandomWeightsWarning(UserWarning):
    """A model with random weights was asked for: its scores mean nothing about images."""


def resolve_weights(model_name: str | None = None, pretrained: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """``(model_name, pretrained)`` of the model a name means; ``pretrained`` None only for random weights.

    Parameters
    ----------
    model_name : str or None, default=None
        An open_clip model name; None for the embedded micro CLIP.
    pretrained : str, path or None, default=None
        A pretrained tag, a local checkpoint file, ``"random"`` (random
        weights, with a :class:`RandomWeightsWarning`) or None for the weights
        the name means (the embedded weights, ``"openai"``, or the model's first tag).

    Returns
    -------
    model_name : str
    pretrained : str or None
        What :class:`~skcarrot.backends.OpenCLIPBackend` loads; None is random weights.

    Raises
    ------
    ValueError
        The model has no pretrained tag and none was given.

    Examples
    --------
    >>> from skcarrot.backends.models import resolve_weights
    >>> resolve_weights()[0], resolve_weights("RN50")
    ('skcarrot-micro-clip', ('RN50', 'openai'))
    >>> resolve_weights("RN50", "/models/rn50.pt")
    ('RN50', '/models/rn50.pt')
    """
    if pretrained is not None:
        pretrained = os.fspath(pretrained)
    if model_name is None or model_name == EMBEDDED_MODEL:
        model_name = EMBEDDED_MODEL
        if pretrained is None:
            return model_name, EMBEDDED_WEIGHTS
    if pretrained == RANDOM_WEIGHTS:
        warnings.warn(
            f"{model_name!r} with random weights (pretrained={RANDOM_WEIGHTS!r}): its scores say nothing "
            "about images; pass a pretrained tag or a checkpoint file for a model that has learned",
            RandomWeightsWarning, stacklevel=2,
        )
        return model_name, None
    if pretrained is not None:
        return model_name, pretrained
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if _DEFAULT_TAG in tags:
        return model_name, _DEFAULT_TAG
    if tags:
        return model_name, tags[0]
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; open_clip.list_models() lists the known ones")
    raise ValueError(
        f"open_clip model {model_name!r} has no pretrained tag: pass pretrained='/path/to/checkpoint', "
        f"or pretrained={RANDOM_WEIGHTS!r} for random weights"
    )


def open_model(
    model_name: str | None = None,
    pretrained: str | os.PathLike | None = None,
    *,
    template: str = DEFAULT_TEMPLATE,
    device: str = "auto",
    check: bool = False,
) -> Any:
    """The :class:`~skcarrot.backends.OpenCLIPBackend` a model name means (see :func:`resolve_weights`).

    Parameters
    ----------
    model_name, pretrained : str or None
        As in :func:`resolve_weights`.
    template : str, default="a photo of a {}."
        Prompt template.
    device : str, default="auto"
        Torch device.
    check : bool, default=False
        Fail now, not at the first query, when the weights can not be had (a
        tag that can not be downloaded offline, a missing file): what a server
        wants before it listens.

    Returns
    -------
    backend : OpenCLIPBackend

    Raises
    ------
    skcarrot.exceptions.WeightsUnavailableError
        With ``check``: a tag whose weights are neither cached nor downloadable.
    FileNotFoundError
        The embedded weights are missing from the installation.

    Examples
    --------
    >>> from skcarrot.backends.models import open_model
    >>> backend = open_model()
    >>> backend.model_name, backend.context_shape
    ('skcarrot-micro-clip', (4, 64))
    """
    from .openclip import OpenCLIPBackend

    model_name, pretrained = resolve_weights(model_name, pretrained)
    if pretrained == EMBEDDED_WEIGHTS and not Path(EMBEDDED_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"the embedded model's weights are missing from the installation ({EMBEDDED_WEIGHTS}); "
            "reinstall skcarrot or regenerate them with 'python -m skcarrot.tools.pretrain'"
        )
    if check and pretrained is not None and not os.path.isfile(pretrained):
        import open_clip

        from ._weights import check_weights_obtainable

        if open_clip.get_pretrained_cfg(model_name, pretrained):
            check_weights_obtainable(model_name, pretrained, None)
        elif os.sep in pretrained or (os.altsep and os.altsep in pretrained):
            raise FileNotFoundError(f"pretrained checkpoint {pretrained!r} of {model_name!r} does not exist")
    return OpenCLIPBackend(model_name=model_name, pretrained=pretrained, template=template, device=device)
