"""Errors of a training run, by what a retry would do."""

from __future__ import annotations


class FatalTrainingError(RuntimeError):
    """An error that would happen again on every retry (a non-finite loss streak, too little
    data): the run stops at once with it instead of restarting from its last checkpoint."""


class TrainingFailed(RuntimeError):
    """The run stopped (a fatal error, or worker failures beyond max_failures); its checkpoints
    remain, and `--resume` continues it."""
