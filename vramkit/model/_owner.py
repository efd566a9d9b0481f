"""What a managed model tells whoever owns it (a ``ModelPool``): the contract between the two.

A model belongs to at most one owner. It asks the owner before a load or wake
(admission: the owner may wait for room, evict others, or refuse), tells it
how that load or wake ended, and tells it whenever it gives memory back or
goes idle (so that admissions waiting for room look again). Its keep-alive
expiry runs on the owner's scheduler. Nothing else passes between them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from vramkit._keepalive import KeepAliveScheduler

__all__ = ["ModelOwner"]

M_contra = TypeVar("M_contra", contravariant=True)


class ModelOwner(Protocol[M_contra]):
    """What a model needs of its owner; ``M_contra`` is the model's type (``ManagedModel``)."""

    @property
    def name(self) -> str:
        """The owner's name, for the model's status line and its errors' advice."""
        ...

    @property
    def _scheduler(self) -> KeepAliveScheduler:
        """The keep-alive scheduler the model's expiries run on while it is owned."""
        ...

    def _before_load(self, model: M_contra) -> None:
        """Admit a load or wake, in the loading thread, before it starts.

        Raises:
            BudgetExceededError: No room, even after waiting and evicting.
            ModelStateError: The owner is closed.
        """
        ...

    def _after_load(self, model: M_contra, *, ok: bool) -> None:
        """The load or wake admitted by :meth:`_before_load` ended (``ok``: it succeeded).

        Raises:
            BudgetExceededError: The model, measured, needs more than the whole
                budget: the owner unloaded it again.
        """
        ...

    def _freed(self, model: M_contra) -> None:
        """The model gave memory back (unloaded, offloaded) or its last lease ended."""
        ...
