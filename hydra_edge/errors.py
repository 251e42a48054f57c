"""Errors a user can cause.

A `UserError` is reported by the CLI as one line on stderr with exit code 2 and no traceback;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: a bad flag, a missing file, an incompatible adapter.

    The message must name the file/line/flag and say what to do.
    """


class TemplateOverBudget(UserError):
    """A chat template ran past its time or output budget: the template is at fault, not a row,
    so it stops whatever is rendering instead of being reported once per row."""


class TrainingDiverged(UserError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class LayerCannotTrain(UserError):
    """A base layer would pass wrong gradients (hydra_edge/models/quant.py); training stops, loudly."""


class TrainingStopped(Exception):
    """SIGINT/SIGTERM arrived during training; a resumable checkpoint was saved."""

    def __init__(self, signum: int, step: int, checkpoint) -> None:
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first message line (or its type's name), cut to `limit` characters: what a
    one-line error quotes from a library's failure."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
