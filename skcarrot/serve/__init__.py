"""The model owner's side: serve a black-box model behind a metered HTTP API.

``skcarrot serve`` runs :func:`create_app` under uvicorn; ``skcarrot keys create``
adds keys to the :class:`Ledger`. Needs the ``serve`` extra:
``pip install 'skcarrot[serve]'``.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import sqlalchemy  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "skcarrot.serve needs the 'serve' extra: pip install 'skcarrot[serve]' "
        f"(missing: {exc.name})"
    ) from exc

from .app import app_from_env, create_app
from .config import Settings
from .ledger import Ledger

__all__ = ["create_app", "app_from_env", "Ledger", "Settings"]
