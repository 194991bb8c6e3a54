"""Where engines run: collect engine actors and Serve replicas get TP × PP GPUs (pure functions)."""

import pytest
from helpers import make_config

from fusion_ray.config import CollectConfig, ConfigError, ModelSpec, ServeConfig
from fusion_ray.placement import collect_placement, engine_placement, ray_data_args, serve_placement

GPU = {"engine": "vllm", "num_gpus_per_actor": 1, "num_cpus_per_actor": 4}


def model(tp: int = 1, pp: int = 1) -> ModelSpec:
    return ModelSpec(name="m", path="org/model", tensor_parallel_size=tp, pipeline_parallel_size=pp)


def test_no_gpus_keeps_the_configured_resources_whatever_the_parallel_sizes():
    for tp, pp in ((1, 1), (2, 1), (2, 2)):
        placement = collect_placement(model(tp, pp), CollectConfig(num_cpus_per_actor=0.5))
        assert placement.actor_options() == {"num_cpus": 0.5, "num_gpus": 0}
        assert placement.engine_options() == {} and placement.bundles == ()
    assert ray_data_args(collect_placement(model(), CollectConfig(num_cpus_per_actor=0.5))) == \
        {"num_cpus": 0.5, "num_gpus": None}  # what collect passed to map_batches before


def test_one_gpu_engine_gets_the_configured_share():
    placement = collect_placement(model(), CollectConfig(engine="vllm", num_gpus_per_actor=0.5))
    assert placement.actor_options() == {"num_cpus": 1, "num_gpus": 0.5} and placement.executor == "uni"


def test_tensor_parallel_2_gets_2_gpus_on_one_node_with_the_mp_executor():
    placement = collect_placement(model(tp=2), CollectConfig(**GPU))
    assert placement.actor_options() == {"num_cpus": 4, "num_gpus": 2}
    assert placement.bundles == () and placement.engine_options() == {"distributed_executor_backend": "mp"}
    assert ray_data_args(placement) == {"num_cpus": 4, "num_gpus": 2}


def test_pipeline_parallel_gets_one_bundle_per_gpu_that_may_span_nodes():
    placement = collect_placement(model(tp=2, pp=2), CollectConfig(**GPU))
    assert placement.devices == 4 and placement.num_gpus == 0
    assert placement.bundles == ({"GPU": 1, "CPU": 4}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1})
    assert placement.strategy == "PACK" and placement.engine_options() == {"distributed_executor_backend": "ray"}
    args = ray_data_args(placement)
    assert args["num_cpus"] == 4 and args["num_gpus"] is None
    assert args["ray_remote_args_fn"].bundles == [dict(b) for b in placement.bundles]


def test_accelerator_type_goes_on_the_actor_and_every_bundle():
    one = collect_placement(model(), CollectConfig(**GPU, accelerator_type="A100"))
    assert one.actor_options() == {"num_cpus": 4, "num_gpus": 1, "accelerator_type": "A100"}
    assert ray_data_args(one)["accelerator_type"] == "A100"
    pp = collect_placement(model(pp=2), CollectConfig(**GPU, accelerator_type="A100"))
    assert all(b["accelerator_type:A100"] == 0.001 for b in pp.bundles)


def test_the_hf_engine_never_shards():
    placement = collect_placement(model(tp=2), CollectConfig(engine="hf", num_gpus_per_actor=1))
    assert placement.actor_options() == {"num_cpus": 1, "num_gpus": 1} and placement.engine_options() == {}


def test_bad_parallel_sizes_are_refused_with_their_names():
    with pytest.raises(ValueError, match="parallel sizes must be at least 1"):
        engine_placement(tensor_parallel=0, pipeline_parallel=1, gpus=1, cpus=1)
    with pytest.raises(ValueError, match=r"engine_options.tensor_parallel_size must be a whole number ≥ 1, got '2'"):
        ServeConfig(engine_options={"tensor_parallel_size": "2"})
    with pytest.raises(ConfigError, match="serve: .*pipeline_parallel_size must be a whole number ≥ 1, got 0"):
        make_config("/tmp/w", "org/pivot", {"s": "org/src"}, ["org/corpus"],
                    serve={"engine_options": {"pipeline_parallel_size": 0}})


def test_serve_replica_with_tensor_parallel_2_asks_for_2_gpus():
    from fusion_ray.serve.app import ChatServer, ServeArgs, deployment_options

    args = ServeArgs(model_dir="x", num_gpus=1, accelerator_type="H100", engine_options={"tensor_parallel_size": 2})
    opts = deployment_options(args)
    assert opts["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 2, "accelerator_type": "H100"}
    assert "placement_group_bundles" not in opts
    assert serve_placement(args).engine_options() == {"distributed_executor_backend": "mp"}
    ChatServer.options(**opts)  # Serve accepts them


def test_serve_replica_with_pipeline_parallel_gets_placement_group_bundles():
    from fusion_ray.serve.app import ChatServer, ServeArgs, deployment_options

    args = ServeArgs(model_dir="x", num_gpus=1, num_cpus=2, accelerator_type="A100",
                     engine_options={"tensor_parallel_size": 2, "pipeline_parallel_size": 2})
    opts = deployment_options(args)
    acc = {"accelerator_type:A100": 0.001}
    assert opts["placement_group_bundles"] == [{"GPU": 1, "CPU": 2, **acc}] + [{"GPU": 1, **acc}] * 3
    assert opts["placement_group_strategy"] == "PACK"
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0, "accelerator_type": "A100"}
    ChatServer.options(**opts)  # the replica's own resources fit its bundle 0
    cpu = deployment_options(ServeArgs(model_dir="x", engine_options={"tensor_parallel_size": 2}))
    assert cpu["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0} and "placement_group_bundles" not in cpu


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_placement_groups_schedule_the_actor_in_bundle_0_and_are_removed(ray_local):
    from ray.util import placement_group_table

    fn = ray_data_args(collect_placement(model(pp=2), CollectConfig(**GPU)))["ray_remote_args_fn"]
    strategy = fn()["scheduling_strategy"]  # no GPU here: the group stays pending, which is fine
    assert strategy.placement_group_bundle_index == 0 and strategy.placement_group_capture_child_tasks
    group = strategy.placement_group
    assert placement_group_table(group)["strategy"] == "PACK"
    fn.remove()
    assert fn.groups == [] and placement_group_table(group)["state"] == "REMOVED"



@pytest.mark.integration
@pytest.mark.timeout(180)
def test_ray_data_engine_actors_run_in_their_own_placement_group(ray_local):
    """The Ray Data side of the PP path, with CPU bundles in place of GPUs (none here)."""
    import ray
    from ray.util import placement_group_table

    from fusion_ray.placement import PlacementGroups

    class InGroup:  # defined here: Ray workers cannot import test modules
        def __call__(self, batch: dict) -> dict:
            import numpy as np
            from ray.util import get_current_placement_group

            group = get_current_placement_group()
            batch["group"] = np.array([group.id.hex() if group else ""] * len(batch["id"]))
            return batch

    groups = PlacementGroups(({"CPU": 0.5}, {"CPU": 0.25}), "PACK")
    ds = ray.data.range(8, override_num_blocks=4).map_batches(
        InGroup, batch_size=2, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5,
        ray_remote_args_fn=groups)
    seen = {row["group"] for row in ds.iter_rows()}
    made = {g.id.hex() for g in groups.groups}
    assert len(made) == 2 and seen <= made and "" not in seen, (seen, made)  # one group per actor, no spare
    kept = list(groups.groups)
    groups.remove()
    assert all(placement_group_table(g)["state"] == "REMOVED" for g in kept)
