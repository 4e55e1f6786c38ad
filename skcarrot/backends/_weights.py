"""Whether an open_clip pretrained tag's weights can be had, asked before open_clip tries.

Without a network, open_clip's download of a pretrained tag goes through the
Hugging Face hub's retries (tens of seconds of retry warnings) before it fails.
:func:`check_weights_obtainable` answers first, from the local cache and at
most one quick request without retries, and fails at once with what to do.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from ..exceptions import WeightsUnavailableError

__all__ = ["check_weights_obtainable"]

#: Seconds the one reachability request may take.
REACH_TIMEOUT = 5.0

_TRUE = {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    """Whether the hub is told to stay offline (``HF_HUB_OFFLINE``, read now or at its import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - open_clip depends on it
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _source(cfg: dict) -> tuple[str, str, list[str]]:
    """``(kind, where, files)``: what open_clip downloads a tag from, as it chooses.

    ``kind`` is ``"hub"`` (``where`` the repository id, ``files`` the names it
    tries) or ``"url"`` (``where`` the URL).
    """
    from open_clip.pretrained import _get_safe_alternatives, has_hf_hub
    from open_clip.constants import HF_WEIGHTS_NAME

    if cfg.get("hf_hub") and has_hf_hub():
        repo, filename = os.path.split(cfg["hf_hub"])  # as open_clip splits it
        filename = filename or HF_WEIGHTS_NAME
        return "hub", repo, [*_get_safe_alternatives(filename), filename]
    return "url", cfg.get("url", ""), [os.path.basename(cfg.get("url", ""))]


def _cached(kind: str, where: str, files: list[str], cache_dir: str | None) -> bool:
    if kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(where, f, cache_dir=cache_dir), str) for f in files)
    folder = cache_dir or os.path.expanduser("~/.cache/clip")
    return bool(files[0]) and os.path.isfile(os.path.join(folder, files[0]))


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _unreachable(url: str) -> str | None:
    """Why ``url``'s server cannot be reached (one request, no retries), or None when it answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=REACH_TIMEOUT):
            return None
    except urllib.error.HTTPError:
        return None  # the server answered, whatever it said
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{urlsplit(url).netloc or url} is unreachable ({reason})"


def check_weights_obtainable(model_name: str, pretrained: str, cache_dir: str | None) -> None:
    """Raise :class:`WeightsUnavailableError` at once when a tag's weights are neither cached nor downloadable.

    Cached weights (or a tag naming a local file) pass without a request, as
    does a reachable download server; open_clip then loads as usual.

    Parameters
    ----------
    model_name, pretrained : str
        The open_clip model and its pretrained tag.
    cache_dir : str or None
        Where open_clip keeps downloads.

    Examples
    --------
    >>> from skcarrot.backends._weights import check_weights_obtainable
    >>> check_weights_obtainable("RN50", "/models/RN50.pt", None) is None  # not a tag: open_clip's to load
    True
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg or cfg.get("file"):
        return
    kind, where, files = _source(cfg)
    if _cached(kind, where, files, cache_dir):
        return
    source = f"{_hub_endpoint().rstrip('/')}/{where}" if kind == "hub" else where
    if _offline():
        reason, fix = "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to let open_clip download them"
    else:
        reason = _unreachable(_hub_endpoint() if kind == "hub" else where)
        if reason is None:
            return
        fix = "check the network (or the proxy settings)"
    raise WeightsUnavailableError(
        f"the pretrained weights {pretrained!r} of {model_name!r} are not on this machine and cannot be "
        f"downloaded: {reason}. Pass a local checkpoint file instead: "
        f"OpenCLIPBackend(model_name={model_name!r}, pretrained='/path/to/checkpoint') "
        f"(copy it from {source}), or {fix}"
    )
