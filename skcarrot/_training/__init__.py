"""The fit lifecycle: settings, run state, the collaborative loop, early stopping, callbacks, checkpoints.

The estimator resolves its settings (:class:`FitSettings`), builds the loop and
the run state through one path from its :class:`StartingPoint` (new,
warm-started or resumed: :func:`build_run`), the paper's two modules as peers
(:class:`PromptModule`, :class:`RefinerModule` and their null objects), runs the generations (:func:`run_generations`) with its
callbacks (:class:`Progress`, :class:`Checkpointer`), and reads the result.
"""

from .callbacks import Checkpointer, Progress
from .checkpoint import fit_fingerprint, read_checkpoint, requests_named_by
from .early_stopping import EarlyStopping, Snapshot, stratified_holdout
from .loop import CollaborativeLoop, QueryCosts, plan_generations, run_generations
from .modules import NullPrompt, NullRefiner, PromptModule, RefinerModule
from .selection import Selection, start_fit
from .start import StartingPoint
from .state import FitSettings, RunState, build_run
from .views import FreshViews, ViewPool

__all__ = [
    "Checkpointer", "CollaborativeLoop", "EarlyStopping", "FitSettings", "FreshViews", "NullPrompt", "NullRefiner",
    "Progress", "PromptModule", "QueryCosts", "RefinerModule", "RunState", "Selection", "Snapshot", "StartingPoint",
    "ViewPool", "build_run", "fit_fingerprint", "plan_generations", "read_checkpoint", "requests_named_by",
    "run_generations", "start_fit", "stratified_holdout",
]
