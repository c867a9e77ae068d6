"""What a request costs beyond its one forward pass per image, and the one rule that caps it.

Each CAM method declares its own cost (:meth:`service.engine.cam.methods.CamMethod.cost`), as
the faithfulness scores do (:meth:`service.engine.faithfulness.scores.ScoreOptions.cost`);
:func:`check_cost` refuses, before anything is queued, a request whose count passes a cap. A
new method that runs the model on perturbed inputs declares its passes and is capped with no
further code.

Costly work runs in chunks and calls a :data:`Checkpoint` before each one, so that the runtime
can stop it when nobody waits for it and serve other callers in between.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.errors import InvalidParameterError


@dataclass(frozen=True)
class Cost:
    """Work on top of the forward pass every image gets.

    ``forward_passes``: the model run on perturbed inputs (masked, blurred, imputed), one image
    each. ``backward_passes``: gradient rounds (one per target class; one serves a whole batch
    and every layer). ``cpu_solves``: ROAD's sparse linear solves, CPU work whatever the
    device, which a fast accelerator does not shorten.
    """

    forward_passes: int = 0
    backward_passes: int = 0
    cpu_solves: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.forward_passes + other.forward_passes,
            self.backward_passes + other.backward_passes,
            self.cpu_solves + other.cpu_solves,
        )


@dataclass(frozen=True)
class CostLimits:
    """The caps of one kind of work (a method's, the scores'); None: uncapped."""

    max_forward_passes: int | None = None
    max_cpu_solves: int | None = None


def check_cost(
    cost: Cost,
    limits: CostLimits,
    *,
    subject: str,
    code: str,
    advice: str,
    breakdown: str = "",
) -> None:
    """Refuse (:class:`InvalidParameterError` with ``code``) ``cost`` past ``limits``: a
    sentence saying what (``subject``) would need how much (with ``breakdown``), the limit, and
    what to change (``advice``)."""
    if limits.max_forward_passes is not None and cost.forward_passes > limits.max_forward_passes:
        raise InvalidParameterError(
            f"{subject} would need {cost.forward_passes} forward passes for this request"
            f"{breakdown}; the limit is {limits.max_forward_passes}. {advice}",
            code=code,
        )
    if limits.max_cpu_solves is not None and cost.cpu_solves > limits.max_cpu_solves:
        raise InvalidParameterError(
            f"{subject} would need {cost.cpu_solves} imputations (sparse linear solves on the"
            f" CPU) for this request{breakdown}; the limit is {limits.max_cpu_solves}. {advice}",
            code=code,
        )


class WorkAbandoned(Exception):  # noqa: N818 (a signal, not a failure)
    """Raised by a :data:`Checkpoint` to stop costly work that nobody waits for any more (its
    caller gave up or its deadline passed); what was computed so far is dropped."""


#: Called by the engine before each chunk of costly work (a batch of perturbed inputs, a
#: set of ROAD solves) with what that chunk costs. It may raise :class:`WorkAbandoned` to stop
#: the work, and it may run other work in between: the engine holds no hooks, no autocast
#: and no inference mode across it.
Checkpoint = Callable[[Cost], None]


def no_checkpoint(_chunk: Cost) -> None:
    """The checkpoint of work that runs to its end (local commands, tests)."""
