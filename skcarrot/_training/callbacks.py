"""What happens after each generation besides learning: progress output and checkpoints."""

from __future__ import annotations

import logging
import os
from typing import Any

from .._util.progress import progress_bar
from .checkpoint import write_checkpoint

__all__ = ["Checkpointer", "Progress"]

logger = logging.getLogger("skcarrot")


class Progress:
    """A progress bar over the queries (over the epochs without prompt search), and one line per generation.

    ``verbose=1`` shows the bar (and what ``prompt_tuning="auto"`` chose), ``verbose=2``
    also prints each generation's line; every line goes to the ``skcarrot`` logger at
    DEBUG either way.
    """

    def __init__(self, loop: Any, run: Any, *, verbose: int, by_query: bool, patience: int | None,
                 selection: Any = None) -> None:
        if selection is not None and verbose:
            print(f"prompt_tuning='auto' chose {selection.choice} ({selection.reason}); "
                  f"{loop.counter.n_queries} queries spent so far")
        self.verbose = verbose
        self.by_query = by_query
        self.patience = patience
        self.bar = progress_bar(
            run.planned if by_query else run.n_generations,
            "query" if by_query else "epoch",
            enabled=bool(verbose),
            desc="CarrotClassifier.fit",
        )
        self.bar.update(loop.counter.n_queries if by_query else loop.generation - run.generation0)

    def on_generation(self, loop: Any, run: Any, record: dict) -> None:
        self.bar.update(loop.counter.n_queries - self.bar.n if self.by_query else 1)
        line = (
            f"Generation {record['generation']}, queries = {record['queries']}, "
            f"best fitness = {record['best_fitness']:.4f}, refiner loss = {record['refiner_loss']:.4f}, "
            f"train accuracy = {record['train_accuracy']:.3f}"
        )
        if "validation_accuracy" in record:
            line += f", validation accuracy = {record['validation_accuracy']:.3f}"
        if self.verbose >= 2:
            print(line)
        logger.debug(line)

    def on_end(self, loop: Any, run: Any, stopped: bool) -> None:
        if stopped and self.verbose:
            print(f"Validation loss did not improve for {self.patience} generations; stopped.")

    def close(self) -> None:
        self.bar.close()


class Checkpointer:
    """Save the run every ``every`` generations and when it ends, replacing ``path`` atomically."""

    def __init__(self, path: str | os.PathLike, every: int) -> None:
        self.path = path
        self.every = every

    def save(self, loop: Any, run: Any, finished: bool = False) -> None:
        write_checkpoint(self.path, {"fingerprint": run.fingerprint, "finished": finished, "run": run,
                                     "loop": loop.state()})

    def on_generation(self, loop: Any, run: Any, record: dict) -> None:
        if (loop.generation - run.generation0) % self.every == 0:
            self.save(loop, run)

    def on_end(self, loop: Any, run: Any, stopped: bool) -> None:
        self.save(loop, run, finished=True)

    def close(self) -> None:
        pass
