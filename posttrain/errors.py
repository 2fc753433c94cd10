"""User-facing errors.

Every error a user can cause (bad data, bad recipe, missing model) is a
`PosttrainError`: it says what is wrong, where (file:line, or the recipe key),
and what to do. The CLI prints it as one paragraph and exits non-zero; `--debug`
shows the traceback as well.
"""

from __future__ import annotations


class PosttrainError(Exception):
    """An error caused by the user's input, with a location and a fix."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.fix = fix

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.fix:
            text += f"\nFix: {self.fix}"
        return text

    def __str__(self) -> str:
        return self.render()


class ConfigError(PosttrainError):
    """A recipe or override is invalid (unknown key, wrong type, bad value)."""


class DataError(PosttrainError):
    """A data file is malformed or a record breaks the expected schema."""


class ModelError(PosttrainError):
    """A model or tokenizer cannot be loaded or lacks what the job needs."""


class BackendUnavailable(PosttrainError):
    """An optional backend (CUDA, vLLM, bitsandbytes, Ray) is configured but missing."""


class TrainingAnomaly(PosttrainError):
    """Training stopped on purpose (NaN loss, blow-up); a checkpoint was written first."""

    exit_code = 3
