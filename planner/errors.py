"""Errors a user can cause, each with a message that says what to do. No torch here."""

from __future__ import annotations


class VramplanError(Exception):
    """Base class of every error vramplan raises on purpose."""


class UnsupportedModelError(VramplanError, TypeError):
    """A model or pipeline class without an adapter."""


class UnsupportedArgumentError(VramplanError, NotImplementedError):
    """A forward argument the planned forward cannot reproduce exactly."""


class PlanMismatchError(VramplanError, ValueError):
    """A plan made for another model, config or sample shape."""


class PlanFormatError(VramplanError, ValueError):
    """A plan file that is corrupt, invalid or from an unknown schema version."""


class InvalidPlanError(VramplanError, ValueError):
    """A plan whose groups or slice counts the runtime cannot execute as written."""


class UnknownGPUError(VramplanError, KeyError):
    """A GPU name that matches no profile."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InfeasibleError(VramplanError, ValueError):
    """No plan fits the target: says the smallest reachable peak and the unit that sets it."""


class PlanConflictError(VramplanError, RuntimeError):
    """A second plan applied to a model that already carries one: remove the first plan's handle first."""


class InvalidArgumentError(VramplanError, ValueError):
    """An argument of the wrong type or out of range (negative steps, nan VRAM, ...): says the valid range."""


class UnsupportedGPUFeatureError(VramplanError, ValueError):
    """A setting the target GPU cannot run, such as bf16 on a GPU without bf16."""


class ProfileCacheError(VramplanError, OSError):
    """The profile cache folder cannot be written (read-only, or a file where the folder should be)."""


class InputFileError(VramplanError, ValueError):
    """An input file (image, plan, output folder) that is missing, unreadable or of the wrong kind."""


class VerificationError(VramplanError, RuntimeError):
    """A verify run whose measured peak is off the prediction by more than the tolerance, or misses a part."""


class PlanIntegrityError(PlanFormatError):
    """A plan file that disagrees with itself or with its model: a stated prediction that the profile
    does not give, a slice count beyond its axis, a streamed block of a resident component, ... (one
    line naming the field)."""
