"""Which training failures Ray Train retries: faults a retry can fix, never bad input.

Ray Train's default policy retries every worker error up to `train.max_failures` times from
the last checkpoint. That is right for a dead worker or node (preemption, OOM kill, a lost
connection), and wrong for an error the same input raises on every try (a missing or
malformed shard, a config or schema error: `errors.is_input_error`): each try would start the
worker group again and fail the same way. `Trainer` is a `TorchTrainer` whose controller
raises those at once and leaves every other decision to Ray's policy.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2.api.exceptions import WorkerGroupError

from fusion_ray.errors import is_input_error, root_cause


def worker_died(err: BaseException) -> bool:
    """A worker's actor or its node went away (what retries are for)."""
    from ray.exceptions import RayActorError

    return isinstance(root_cause(err), RayActorError)


class InputErrorsRaise(DefaultFailurePolicy):
    """Ray's default policy, except that a worker-group failure in which some worker raised an
    input error and none died is raised without a retry."""

    def _is_retryable_error(self, training_failed_error) -> bool:
        failures = list(getattr(training_failed_error, "worker_failures", {}).values())
        if (isinstance(training_failed_error, WorkerGroupError) and any(map(is_input_error, failures))
                and not any(map(worker_died, failures))):
            return False
        return super()._is_retryable_error(training_failed_error)


class Trainer(TorchTrainer):
    """`TorchTrainer` with the `InputErrorsRaise` failure policy."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if "failure_policy" in controller_init_kwargs:  # Ray 2.60's keyword (tests/test_train_failures.py)
            controller_init_kwargs["failure_policy"] = InputErrorsRaise(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
