"""The shared local Ray: real, on loopback, fractional CPUs schedule on 2 cores."""

import pytest


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_local_ray_runs_fractional_tasks_and_actors(ray_local):
    ray = ray_local
    assert ray.cluster_resources()["CPU"] == 4

    @ray.remote(num_cpus=0.5)
    def square(x):
        return x * x

    @ray.remote(num_cpus=0.5)
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self, k):
            self.n += k
            return self.n

    counters = [Counter.remote() for _ in range(4)]  # 2 CPUs of actors on a 4-CPU Ray
    assert ray.get([square.remote(i) for i in range(8)], timeout=60) == [i * i for i in range(8)]
    assert ray.get([c.add.remote(3) for c in counters], timeout=60) == [3, 3, 3, 3]
    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]  # loopback only


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_workers_of_the_local_ray_see_the_progress_settings(ray_local):
    """The local Ray was started off a terminal (pytest captures stdout): its workers inherit the
    progress settings from the driver's environment, with no runtime env."""
    from fusion_ray import progress

    @ray_local.remote(num_cpus=0.1)
    def env():
        import os

        return {k: os.environ.get(k) for k in progress.QUIET_ENV}

    assert ray_local.get(env.remote(), timeout=30) == progress.QUIET_ENV
