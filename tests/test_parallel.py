"""`run_parts`: a stage's independent parts in driver threads, a limit, timings, first error raised."""

import threading
import time

import pytest

from fusion_ray.parallel import run_parts


def overlap(a, b) -> bool:
    return max(a.started_at, b.started_at) < min(a.finished_at, b.finished_at)


def sleeper(seconds: float, value):
    def run():
        time.sleep(seconds)
        return {"status": "done", "value": value}
    return run


def test_parts_run_together_and_keep_their_order_and_times():
    out = run_parts({"b": sleeper(0.3, 1), "a": sleeper(0.1, 2)})
    assert list(out) == ["b", "a"] and [o.result["value"] for o in out.values()] == [1, 2]
    assert overlap(out["a"], out["b"])
    assert out["a"].result == {"status": "done", "value": 2}
    assert out["a"].started_at < out["a"].finished_at


def test_limit_1_is_one_after_the_other():
    out = run_parts({"a": sleeper(0.1, 1), "b": sleeper(0.1, 2), "c": sleeper(0.1, 3)}, limit=1)
    a, b, c = out.values()
    assert a.finished_at <= b.started_at and b.finished_at <= c.started_at


def test_limit_bounds_how_many_run_at_once():
    lock, now, peak = threading.Lock(), [0], [0]

    def part():
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.1)
        with lock:
            now[0] -= 1
        return {}

    run_parts({str(i): part for i in range(5)}, limit=2)
    assert peak[0] == 2


def test_a_failure_stops_parts_not_started_lets_running_ones_finish_and_is_raised():
    finished = []

    def bad():
        raise ValueError("arm b: bad input")

    def slow():
        time.sleep(0.3)
        finished.append("a")
        return {}

    def never():
        finished.append("c")
        return {}

    with pytest.raises(ValueError, match="arm b: bad input"):
        run_parts({"a": slow, "b": bad, "c": never}, limit=2)
    assert finished == ["a"]
    with pytest.raises(ValueError, match="arm b"):  # sequential: stops at the first error, as the old loop
        run_parts({"b": bad, "c": never}, limit=1)
    assert finished == ["a"]


def test_how_many_run_at_once_changes_no_fingerprint(tiny_models, tmp_path):
    from helpers import make_config

    from fusion_ray.collect.stage import model_fingerprint
    from fusion_ray.trainer.fit import result_fields

    def cfg(**limits):
        return make_config(tmp_path, tiny_models(), {"s": tiny_models()}, [tmp_path],
                           collect={"max_concurrent_models": limits.get("models")},
                           train={"max_concurrent_arms": limits.get("arms")})

    one, free = cfg(models=1, arms=1), cfg()
    assert model_fingerprint(one, one.pivot, "p") == model_fingerprint(free, free.pivot, "p")
    assert result_fields(one) == result_fields(free)
