"""A black box built on any open_clip model, behind both doors.

Weights, image features, text features and token embeddings stay in this
module. Loaded models live in a process-level cache keyed by the backend's
parameters, so cloning or pickling a backend (or an estimator holding one)
never copies weights. :class:`OpenCLIPBackend` offers the embedding door
(``logits``) and the text door (``text_scores``); :class:`OpenCLIPTextBackend`
is a view of it that offers only the text door.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator

from .._util.validation import check_offsets
from .._util.threads import threads_for, torch_threads
from ..exceptions import WeightsUnavailableError
from ..wire import hash_pixels
from ._weights import check_weights_obtainable
from ._base import check_prompt_sets
from ._prefix import encode_pooled_rows, supports_prefix_sharing
from ._template import DEFAULT_TEMPLATE

__all__ = ["OpenCLIPBackend", "WhiteBoxAccess", "register_model_configs"]

_CONFIG_DIR = Path(__file__).with_name("model_configs")
_MODELS: dict[tuple, "_LoadedBox"] = {}
_LOCK = threading.Lock()
_RANDOM_INIT_SEED = 0
_MAX_CACHED_IMAGES = 50_000
_MAX_CACHED_TEXTS = 200_000
_SEQUENCES_PER_CHUNK = 2048
_TEXTS_PER_CHUNK = 1024


def register_model_configs(path: str | os.PathLike | None = None) -> None:
    """Register open_clip model configs (JSON) from a file or folder.

    With no argument, registers the configs shipped with skcarrot. Done once on
    import; call it again for your own configs.

    Examples
    --------
    >>> import open_clip
    >>> from skcarrot.backends import register_model_configs
    >>> register_model_configs()
    >>> "skcarrot-micro-test" in open_clip.list_models()
    True
    """
    import open_clip

    open_clip.add_model_config(Path(path) if path is not None else _CONFIG_DIR)


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init():
    """Random initialisation is what the user asked for: drop open_clip's warning about it."""
    root = logging.getLogger()
    flt = _DropRandomInitNotice()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _image_key(img: Any) -> bytes:
    """The feature cache's key: the exact pixels as held (a fast digest; never leaves the process)."""
    return hash_pixels(hashlib.blake2b(digest_size=20), img, f"{img.mode}{img.size}").digest()


class _LoadedBox:
    """Everything behind the door for one (model, weights, template, device)."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Any,
        tokenizer: Any,
        template: str,
        device: torch.device,
        precision: str = "fp32",
    ):
        self.model = model
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.template = template
        self.lock = threading.Lock()
        tower = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if tower is None or not all(hasattr(tower, n) for n in needed):
            raise ValueError(
                f"{type(model).__name__} has no built-in text transformer; prompt offsets need "
                "an open_clip model whose text tower embeds tokens itself (CLIP-style configs)"
            )
        if getattr(tower, "cls_emb", None) is not None:
            raise ValueError("text towers with a class token (CoCa) are not supported")
        self.tower = tower
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        if self.pool_type not in ("argmax", "eos"):
            raise ValueError(f"text pooling {self.pool_type!r} is not supported (need 'argmax' or 'eos')")
        self.dim = int(tower.token_embedding.weight.shape[1])
        self.share_prefix = supports_prefix_sharing(tower)
        self.n_ctx, self.ctx_tokens = self._context_tokens(template)
        self.image_features: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.string_features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.class_tokens: dict[tuple[str, ...], torch.Tensor] = {}

    def _context_tokens(self, template: str) -> tuple[int, torch.Tensor]:
        if template.count("{}") != 1:
            raise ValueError(f"template must contain '{{}}' exactly once, got {template!r}")
        prefix = template.split("{}")[0].strip()
        if not prefix:
            raise ValueError(
                f"template {template!r} has no context words before '{{}}'; prompt offsets "
                "are added to those words (e.g. 'a photo of a {}.')"
            )
        tokens = self.tokenizer([prefix])[0]
        real = tokens[tokens != 0]
        ctx = real[1:-1]  # drop start and end of text
        return len(ctx), ctx

    def tokens_for(self, class_names: Sequence[str]) -> torch.Tensor:
        key = tuple(class_names)
        toks = self.class_tokens.get(key)
        if toks is None:
            texts = [self.template.format(name) for name in class_names]
            toks = self.tokenizer(texts)
            n = self.n_ctx
            if not torch.equal(toks[:, 1 : 1 + n], self.ctx_tokens.expand(len(texts), n)):
                bad = [t for t, row in zip(texts, toks) if not torch.equal(row[1 : 1 + n], self.ctx_tokens)]
                raise ValueError(f"the template's context words do not tokenize the same in {bad[:3]}")
            too_long = [t for t, row in zip(texts, toks) if row[-1] != 0]
            if too_long:
                raise ValueError(
                    f"{len(too_long)} prompt(s) are longer than the model's context length of {toks.shape[1]} "
                    f"tokens, e.g. {too_long[:3]}; shorten those class names"
                )
            toks = toks.to(self.device)
            self.class_tokens[key] = toks
        return toks

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        keys = [_image_key(img) for img in images]
        missing = list(dict.fromkeys(k for k in keys if k not in self.image_features))
        if missing:
            first = {k: img for k, img in zip(keys, images) if k in set(missing)}
            for start in range(0, len(missing), 256):
                chunk = missing[start : start + 256]
                batch = torch.stack([self.preprocess(first[k]) for k in chunk]).to(self.device)
                feats = self.model.encode_image(batch, normalize=True).float()
                for k, f in zip(chunk, feats):
                    self.image_features[k] = f
        for k in keys:
            self.image_features.move_to_end(k)
        while len(self.image_features) > _MAX_CACHED_IMAGES:
            self.image_features.popitem(last=False)
        return torch.stack([self.image_features[k] for k in keys])

    @torch.inference_mode()
    def encode_prompts(self, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Text features ``(P, C, E)`` of every class under every prompt offset."""
        return self.text_features(tokens, offsets)

    def _end_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of each sequence's pooled (end of text) token."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self.eos_id).int().argmax(dim=-1)

    def text_features(self, tokens: torch.Tensor, offsets: torch.Tensor, share_prefix: bool = True) -> torch.Tensor:
        """As :meth:`encode_prompts`, differentiable in ``offsets`` outside inference mode.

        The sequences are cut to the longest real length in the call (exact under causal
        attention) and, when ``share_prefix``, the start token and context words are
        encoded once per prompt offset and shared by every class (also exact).
        """
        tower = self.tower
        end = self._end_positions(tokens)
        length = int(end.max()) + 1  # exact: causal attention never looks past the end token
        tokens = tokens[:, :length]
        cast = tower.transformer.get_cast_dtype() if hasattr(tower.transformer, "get_cast_dtype") else torch.float32
        base = tower.token_embedding(tokens).to(cast)  # (C, L, D)
        pos = tower.positional_embedding[:length].to(cast)
        mask = tower.attn_mask
        if mask is not None:
            mask = mask[:length, :length].to(cast)
        n_classes = tokens.shape[0]
        per_chunk = max(1, _SEQUENCES_PER_CHUNK // n_classes)
        n_prefix = 1 + self.n_ctx  # start token and context words: the same for every class
        shared = share_prefix and self.share_prefix and n_classes > 1 and length > n_prefix
        out = []
        for start in range(0, offsets.shape[0], per_chunk):
            off = offsets[start : start + per_chunk].to(cast)
            p = off.shape[0]
            if shared:
                prefix = torch.cat([base[:1, :1].expand(p, -1, -1), base[0, 1:n_prefix] + off], dim=1)
                hidden = encode_pooled_rows(
                    tower, prefix + pos[:n_prefix], base[:, n_prefix:] + pos[n_prefix:], end - n_prefix
                )  # (p, C, D): only the pooled row of each sequence
                x = tower.ln_final(hidden.reshape(p * n_classes, -1))
            else:
                ctx = base[:, 1:n_prefix].unsqueeze(0) + off.unsqueeze(1)  # (p, C, n_ctx, D)
                x = torch.cat(
                    [base[:, :1].expand(p, -1, -1, -1), ctx, base[:, n_prefix:].expand(p, -1, -1, -1)], dim=2
                )
                x = x.reshape(p * n_classes, length, -1) + pos
                x = tower.transformer(x, attn_mask=mask)
                x = tower.ln_final(x)
                x = x[torch.arange(x.shape[0], device=x.device), end.repeat(p)]
            proj = tower.text_projection
            if proj is not None:
                x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
            x = torch.nn.functional.normalize(x.float(), dim=-1)
            out.append(x.reshape(p, n_classes, -1))
        return torch.cat(out)

    def encode_strings(self, strings: Sequence[str]) -> torch.Tensor:
        """Normalised text features ``(S, E)`` of full prompt strings, cached per string.

        Called with :attr:`lock` held and in inference mode.
        """
        cache = self.string_features
        missing = [s for s in dict.fromkeys(strings) if s not in cache]
        for start in range(0, len(missing), _TEXTS_PER_CHUNK):
            chunk = missing[start : start + _TEXTS_PER_CHUNK]
            tokens = self.tokenizer(chunk)
            too_long = [s for s, row in zip(chunk, tokens) if int(row[-1]) != 0]
            if too_long:
                raise ValueError(
                    f"{len(too_long)} prompt string(s) are longer than the model's context length "
                    f"({tokens.shape[1]} tokens), e.g. {too_long[0]!r}; shorten them"
                )
            feats = self.model.encode_text(tokens.to(self.device), normalize=True).float()
            for s, f in zip(chunk, feats):
                cache[s] = f
        for s in strings:
            cache.move_to_end(s)
        while len(cache) > _MAX_CACHED_TEXTS:
            cache.popitem(last=False)
        return torch.stack([cache[s] for s in strings])

    def _text_flops(self, n_rows: int) -> float:
        """Operations of the text encoding for ``n_rows`` token rows: ``24 width^2`` per row and block."""
        layers = len(getattr(self.tower.transformer, "resblocks", [None]))
        return 24.0 * n_rows * self.dim * self.dim * layers

    def _prompt_rows(self, tokens: torch.Tensor, n_prompts: int) -> int:
        """Token rows :meth:`text_features` encodes for ``n_prompts`` offsets (cut length, shared prefix)."""
        n_classes, length = tokens.shape[0], int(self._end_positions(tokens).max()) + 1
        n_prefix = 1 + self.n_ctx
        if self.share_prefix and n_classes > 1 and length > n_prefix:
            return n_prompts * (n_prefix + n_classes * (length - n_prefix))
        return n_prompts * n_classes * length

    @contextlib.contextmanager
    def _scoring(self, flops: float):
        """One scoring call: the lock, inference mode, a thread count sized to the text encoding, autocast.

        A call below :data:`skcarrot._util.threads.SMALL_WORK_FLOPS` (e.g. a 40-prompt generation of
        the embedded model, about 0.3 GFLOP in ops of well under a millisecond) runs on one
        thread; bigger ones (e.g. RN50's text tower) on torch's count from outside the fit.
        """
        threads = threads_for(flops) if self.device.type == "cpu" else None
        with self.lock, torch.inference_mode(), torch_threads(threads), self._autocast():
            yield

    def _scaled(self, product: Any) -> np.ndarray:
        """``product(logit_scale)`` plus the model's ``logit_bias``, computed in fp32, as float64."""
        with torch.autocast(device_type=self.device.type, enabled=False):  # the product in fp32
            out = product(self.model.logit_scale.exp().float())
            bias = getattr(self.model, "logit_bias", None)
            if bias is not None:
                out = out + bias.float()
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float64)  # (P, N, C) in order: cheaper downstream

    def logits(self, images: Sequence[Any], class_names: Sequence[str], offsets: np.ndarray) -> np.ndarray:
        tokens = self.tokens_for(class_names)
        rows = self._prompt_rows(tokens, len(offsets)) if self.device.type == "cpu" else 0
        with self._scoring(self._text_flops(rows)):
            img = self.encode_images(images)  # (N, E)
            txt = self.encode_prompts(
                tokens, torch.as_tensor(np.asarray(offsets, dtype=np.float32), device=self.device)
            )  # (P, C, E)
            return self._scaled(lambda scale: scale * torch.einsum("ne,pce->pnc", img.float(), txt.float()))

    def text_scores(self, images: Sequence[Any], sets: Sequence[Sequence[str]]) -> np.ndarray:
        strings = list(dict.fromkeys(s for prompt_set in sets for s in prompt_set))
        column = {s: i for i, s in enumerate(strings)}
        with self._scoring(self._text_flops(16 * len(strings))):  # about 16 tokens per prompt string
            image_features = self.encode_images(images)  # (N, E)
            text_features = self.encode_strings(strings)  # (S, E)
            logits = self._scaled(lambda scale: scale * image_features.float() @ text_features.float().T)  # (N, S)
        columns = np.array([[column[s] for s in prompt_set] for prompt_set in sets])  # (P, L)
        return logits[:, columns].transpose(1, 0, 2)


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    return precision


def _load_box(
    model_name: str,
    pretrained: str | None,
    template: str,
    device: torch.device,
    cache_dir: str | None,
    precision: str = "fp32",
) -> _LoadedBox:
    import open_clip

    is_schema = model_name.startswith(("hf-hub:", "local-dir:"))
    if not is_schema and model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {model_name!r}; list the valid names with "
            "open_clip.list_models() (or register a config with "
            "skcarrot.backends.register_model_configs)"
        )
    kwargs: dict[str, Any] = {"device": device, "cache_dir": cache_dir}
    if pretrained is None or is_schema:
        with torch.random.fork_rng(devices=[]), _quiet_random_init():
            torch.manual_seed(_RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, **kwargs)
    elif open_clip.get_pretrained_cfg(model_name, pretrained):
        check_weights_obtainable(model_name, pretrained, cache_dir)  # fails fast offline
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, **kwargs)
        except RuntimeError as exc:
            if "download" not in str(exc).lower():
                raise
            raise WeightsUnavailableError(
                f"could not download the pretrained weights {pretrained!r} of {model_name!r} "
                f"({exc}). Offline? Pass a local checkpoint instead: "
                f"OpenCLIPBackend(model_name={model_name!r}, pretrained='/path/to/checkpoint')"
            ) from exc
    elif os.path.isfile(pretrained):
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, **kwargs)
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            raise ValueError(
                f"cannot load checkpoint {pretrained!r} into open_clip model {model_name!r}: {exc}"
            ) from exc
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"pretrained={pretrained!r} is neither a known tag of {model_name!r} "
            f"(known: {tags or 'none'}) nor an existing checkpoint file"
        )
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    return _LoadedBox(model, preprocess, tokenizer, template, device, precision)


class WhiteBoxAccess:
    """What white-box methods may read from an open_clip model (the black-box door stays closed).

    Attributes
    ----------
    context_shape : tuple of (int, int)
    logit_scale : float

    Examples
    --------
    >>> from skcarrot.backends import OpenCLIPBackend
    >>> from skcarrot.images import to_pil_images
    >>> import numpy as np
    >>> wb = OpenCLIPBackend(model_name="skcarrot-micro-test", pretrained=None).white_box()
    >>> wb.image_features(to_pil_images(np.zeros((2, 8, 8), dtype=np.uint8))).shape
    torch.Size([2, 32])
    """

    def __init__(self, box: _LoadedBox) -> None:
        self._box = box
        self.context_shape = (box.n_ctx, box.dim)
        self.logit_scale = float(box.model.logit_scale.exp())

    def image_features(self, images: Sequence[Any]) -> torch.Tensor:
        """L2-normalised image features ``(N, E)`` (cached per distinct image), no gradient."""
        with self._box.lock, self._box._autocast():
            return self._box.encode_images(images).detach().clone().float().cpu()

    def text_features(self, class_names: Sequence[str], offsets: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features ``(P, C, E)``, differentiable in ``offsets`` ``(P, n_ctx, dim)``."""
        tokens = self._box.tokens_for(list(class_names))
        with self._box._autocast():
            return self._box.text_features(tokens, offsets.to(self._box.device)).float().cpu()


class OpenCLIPBackend(BaseEstimator):
    """A black-box vision-language model served by open_clip.

    Parameters
    ----------
    model_name : str, default="RN50"
        Any name from ``open_clip.list_models()``.
    pretrained : str or None, default="openai"
        A pretrained tag (``open_clip.list_pretrained_tags_by_model(model_name)``;
        open_clip downloads it), a local checkpoint path, or None for a random
        initialisation from a fixed seed (the same model in every process).
    template : str, default="a photo of a {}."
        Prompt template; the words before ``{}`` are the context words that
        prompt offsets are added to.
    device : str, default="auto"
        ``"auto"`` (CUDA when available, else CPU), or any torch device string.
    cache_dir : str or None, default=None
        Where open_clip keeps downloaded weights.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        Arithmetic inside the box (autocast). ``"auto"``: bf16 (fp16 where bf16 is not
        supported) on CUDA, fp32 on CPU. Logits are returned as float64 either way.

    Attributes
    ----------
    context_shape : tuple of (int, int)
        ``(n_ctx, dim)`` of the offsets accepted (loads the model on first use).
    returns : str
        ``"logits"``: :meth:`text_scores` makes this a text-level black box too
        (see :class:`skcarrot.backends.TextBlackBox`).

    Notes
    -----
    The weights are loaded on first use into a process-level cache keyed by the
    parameters, and image features are cached there per distinct image (text
    features per distinct prompt string). A copy made by
    :func:`sklearn.base.clone`, pickle or joblib holds only parameters.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends import OpenCLIPBackend
    >>> box = OpenCLIPBackend(model_name="skcarrot-micro-test", pretrained=None)
    >>> box.context_shape
    (4, 32)
    >>> imgs = [np.zeros((8, 8, 3), dtype=np.uint8)]
    >>> from skcarrot.images import to_pil_images
    >>> box.logits(to_pil_images(imgs), ["cat", "dog"], np.zeros((3, 4, 32))).shape
    (3, 1, 2)
    """

    returns = "logits"

    def __init__(
        self,
        model_name: str = "RN50",
        pretrained: str | None = "openai",
        template: str = DEFAULT_TEMPLATE,
        device: str = "auto",
        cache_dir: str | None = None,
        precision: str = "auto",
    ) -> None:
        self.model_name = model_name
        self.pretrained = pretrained
        self.template = template
        self.device = device
        self.cache_dir = cache_dir
        self.precision = precision

    def _box(self) -> _LoadedBox:
        pretrained = os.fspath(self.pretrained) if self.pretrained is not None else None
        if pretrained is not None and os.path.isfile(pretrained):
            pretrained = os.path.abspath(pretrained)
        device = _resolve_device(self.device)
        precision = _resolve_precision(self.precision, device)
        key = (self.model_name, pretrained, self.template, str(device), self.cache_dir, precision)
        box = _MODELS.get(key)
        if box is None:
            with _LOCK:
                box = _MODELS.get(key)
                if box is None:
                    box = _load_box(self.model_name, pretrained, self.template, device, self.cache_dir, precision)
                    _MODELS[key] = box
        return box

    @property
    def context_shape(self) -> tuple[int, int]:
        box = self._box()
        return (box.n_ctx, box.dim)

    def white_box(self) -> "WhiteBoxAccess":
        """Open the box: features and differentiable text encoding, for white-box baselines.

        :class:`skcarrot.CarrotClassifier` never calls this; the white-box baselines in
        :mod:`skcarrot.tools.baselines` (CoOp, linear probe, Tip-Adapter) do, and say so.

        Returns
        -------
        access : WhiteBoxAccess

        Examples
        --------
        >>> import torch
        >>> from skcarrot.backends import OpenCLIPBackend
        >>> wb = OpenCLIPBackend(model_name="skcarrot-micro-test", pretrained=None).white_box()
        >>> wb.text_features(["cat", "dog"], torch.zeros(1, 4, 32)).shape
        torch.Size([1, 2, 32])
        """
        return WhiteBoxAccess(self._box())

    def logits(self, images: Sequence[Any], class_names: Sequence[str], offsets: np.ndarray) -> np.ndarray:
        """Logits ``(P, n_images, n_classes)``: every image against every class, per prompt.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
        class_names : sequence of str
        offsets : ndarray of shape (P, n_ctx, dim)
            Added to the token embeddings of the template's context words.

        Returns
        -------
        logits : ndarray of shape (P, n_images, n_classes)
        """
        offsets = check_offsets(offsets, self.context_shape)
        return self._box().logits(images, list(class_names), offsets)

    def text_scores(self, images: Sequence[Any], prompts: Sequence[Sequence[str]]) -> np.ndarray:
        """Logits of every image against every string of each prompt set (the text door).

        Every distinct string is encoded once (and cached across calls, as are the
        image features), so ``P`` prompt sets that share most strings cost little
        more than one. The ``template`` plays no part: the strings are full prompts.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
        prompts : sequence of sequence of str
            ``P`` prompt sets of ``L`` strings each.

        Returns
        -------
        logits : ndarray of shape (P, n_images, L)
            ``logit_scale * cos(image, text)`` (plus the model's ``logit_bias``), float64.

        Examples
        --------
        >>> from PIL import Image
        >>> from skcarrot.backends import embedded_backend
        >>> sets = [["a photo of a one.", "a photo of a two."], ["a one.", "a two."]]
        >>> embedded_backend().text_scores([Image.new("RGB", (8, 8))] * 3, sets).shape
        (2, 3, 2)
        """
        return self._box().text_scores(images, check_prompt_sets(prompts))


register_model_configs()
