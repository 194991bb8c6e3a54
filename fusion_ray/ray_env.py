"""Connecting to Ray: the cluster in `cfg.ray.address` / `RAY_ADDRESS`, or a local one.

A local Ray stays on loopback, with token auth off (Ray 2.60 turns it on by
default) and the logical CPU count from the config: on a 2-core machine a
pipeline's actors only all fit with more logical CPUs than cores, or with
fractional CPU requests (silent starvation otherwise).

Off a terminal (output to a file, a pipe, `ray job submit`), progress bars are off in the
driver and in every worker (`fusion_ray.progress`).
"""

from __future__ import annotations

import os

from fusion_ray.config import RayConfig

LOCAL_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def init_ray(cfg: RayConfig | None = None, **kwargs):
    """Initialise Ray once per process; returns the `ray` module.

    Args:
        cfg: the config's `ray` section; None means a local Ray with defaults.
        kwargs: passed to `ray.init` (e.g. `runtime_env`).
    """
    from fusion_ray import progress

    cfg = cfg or RayConfig()
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    progress.quiet_progress()
    import ray

    if ray.is_initialized():
        return ray
    from fusion_ray.locations import worker_env

    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Object-store endpoint and keys, hub settings and the progress settings: every worker needs
    # them. A local Ray started here inherits this process's environment (they are set by now), and
    # a job submitted with `ray job submit` hands its own runtime env to its workers: only a driver
    # joining a running cluster passes them on. (A runtime env makes Ray start workers of their own
    # for it: on a local Ray the same variables once more cost a pool of idle workers, and time.)
    if address:
        env = {} if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ else {**worker_env(), **progress.worker_env()}
        if env:
            runtime_env = dict(kwargs.pop("runtime_env", None) or {})
            runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
            kwargs["runtime_env"] = runtime_env
        ray.init(address=address, **kwargs)
    else:  # "local": never attach by accident to another cluster running on this machine
        from ray._private import ray_constants

        # loopback only: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is first
        # imported, which may have been before LOCAL_ENV was set here
        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(address="local", num_cpus=cfg.num_cpus, **kwargs)
    progress.quiet_ray_data()
    return ray
