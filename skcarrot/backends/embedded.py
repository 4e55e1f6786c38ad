"""The embedded default model: a micro CLIP pretrained by skcarrot and shipped in the package.

It is loaded through the same path as any open_clip model: a registered config
(``skcarrot-micro-clip``) and a local checkpoint file. See the model card in the
documentation and :mod:`skcarrot.pretrain` for how it was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .openclip import OpenCLIPBackend

__all__ = ["EMBEDDED_MODEL", "EMBEDDED_WEIGHTS", "embedded_backend", "resolve_backend"]

#: open_clip model name of the embedded model.
EMBEDDED_MODEL = "skcarrot-micro-clip"

#: Path of its shipped fp16 weights.
EMBEDDED_WEIGHTS = str(Path(__file__).resolve().parent.parent / "weights" / f"{EMBEDDED_MODEL}.safetensors")


def embedded_backend(template: str = "a photo of a {}.", device: str = "auto") -> OpenCLIPBackend:
    """The default black box: the embedded micro CLIP, loaded offline.

    Parameters
    ----------
    template : str, default="a photo of a {}."
        Prompt template.
    device : str, default="auto"
        Torch device.

    Returns
    -------
    backend : OpenCLIPBackend

    Examples
    --------
    >>> from skcarrot.backends import embedded_backend
    >>> embedded_backend().context_shape
    (4, 64)
    """
    if not Path(EMBEDDED_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"the embedded model's weights are missing from the installation ({EMBEDDED_WEIGHTS}); "
            "reinstall skcarrot or regenerate them with 'python -m skcarrot.pretrain'"
        )
    return OpenCLIPBackend(model_name=EMBEDDED_MODEL, pretrained=EMBEDDED_WEIGHTS, template=template, device=device)


def resolve_backend(backend: Any) -> Any:
    """The backend an estimator uses: ``backend`` itself, or the embedded model for None.

    Examples
    --------
    >>> from skcarrot.backends import ToyBackend
    >>> from skcarrot.backends.embedded import resolve_backend
    >>> resolve_backend(None).model_name, type(resolve_backend(ToyBackend())).__name__
    ('skcarrot-micro-clip', 'ToyBackend')
    """
    return embedded_backend() if backend is None else backend
