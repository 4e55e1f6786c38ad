"""The fit lifecycle: settings, run state, the collaborative loop, early stopping, callbacks, checkpoints.

The estimator resolves its settings (:class:`FitSettings`), builds the loop and
the run state through one path for a new, warm-started or resumed fit
(:func:`build_run`), runs the generations (:func:`run_generations`) with its
callbacks (:class:`Progress`, :class:`Checkpointer`), and reads the result.
"""

from .callbacks import Checkpointer, Progress
from .checkpoint import fit_fingerprint, read_checkpoint, requests_named_by
from .early_stopping import EarlyStopping, Snapshot, stratified_holdout
from .loop import CollaborativeLoop, plan_generations, run_generations
from .selection import Selection, start_fit
from .state import FitSettings, PreviousFit, RunState, build_run
from .views import FreshViews, ViewPool

__all__ = [
    "Checkpointer", "CollaborativeLoop", "EarlyStopping", "FitSettings", "FreshViews", "PreviousFit", "Progress",
    "RunState", "Selection", "Snapshot", "ViewPool", "build_run", "fit_fingerprint", "plan_generations",
    "read_checkpoint", "requests_named_by", "run_generations", "start_fit", "stratified_holdout",
]
