"""`fusion-ray plan`: the arithmetic against hand-computed values, placement on node types, the CLI
on the shipped GPU config (offline, from its `arch` numbers), validate's reachability checks and
the live preflight of `run_stages`."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusion_ray.config import ModelArch, load_config
from fusion_ray.plan import (
    activation_bytes,
    arch_from_hf,
    engine_memory,
    kv_bytes_per_token,
    largest_tensor,
    load_bytes,
    logit_bytes_per_position,
    lora_trainable_params,
    loss_bytes,
    packing_mask_bytes,
    param_count,
    size_model,
    trainable_params,
    training_memory,
)
from fusion_ray.resources import INSTANCE_TYPES, Ask, load_cluster, resource_asks, unplaceable

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIG = REPO / "jobs" / "configs" / "fusechat_7b.yaml"
TINY = REPO / "jobs" / "configs" / "tiny_cpu.yaml"
# Llama-2-7B: 32 layers, hidden 4096, 32 heads (no GQA), MLP 11008, vocab 32000, untied head.
LLAMA_7B = ModelArch(hidden_size=4096, num_layers=32, num_heads=32, vocab_size=32000, intermediate_size=11008)
P7 = 6_738_415_616  # 32 × (4·4096² + 3·4096·11008 + 2·4096) + 2·32000·4096 + 4096: Llama-2-7B's known count
MISTRAL_7B = ModelArch(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, vocab_size=32000,
                       intermediate_size=14336)


def test_parameter_counts_of_known_models():
    assert param_count(LLAMA_7B) == P7
    assert P7 * 2 / 1e9 == pytest.approx(13.48, abs=0.01)  # bf16 weights: 13.5 GB
    mixtral = MISTRAL_7B.model_copy(update={"num_experts": 8})
    # 32 × (4096·128·(2·32 + 2·8) + 8·3·4096·14336 + 4096·8 + 2·4096) + 2·32000·4096 + 4096
    assert param_count(mixtral) == 46_702_792_704
    assert param_count(mixtral) * 2 / 1e9 == pytest.approx(93.4, abs=0.05)


def test_shape_from_hf_config_json():
    mixtral = arch_from_hf({"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                            "num_local_experts": 8, "vocab_size": 32002, "tie_word_embeddings": False})
    assert (mixtral.num_experts, mixtral.num_kv_heads, mixtral.mlp) == (8, 8, "gated")
    gpt2 = arch_from_hf({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
                         "n_positions": 1024})
    assert (gpt2.mlp, gpt2.intermediate_size, gpt2.tie_word_embeddings) == ("plain", 3072, True)
    # GPT-2 small: 124.4M with biases and position embeddings; without them 12·(4·768² + 2·768·3072 + 2·768)
    # + 50257·768 + 768
    assert param_count(gpt2) == 12 * (4 * 768**2 + 2 * 768 * 3072 + 2 * 768) + 50257 * 768 + 768
    assert arch_from_hf({"architectures": ["X"]}) is None


def test_kv_cache_of_a_gqa_model():
    # 2 (K, V) × 32 layers × 8 kv heads × 128 dims × 2 bytes = 128 KiB per token
    assert kv_bytes_per_token(MISTRAL_7B, 2) == 131_072
    assert kv_bytes_per_token(MISTRAL_7B, 2, tp=2) == 65_536
    assert kv_bytes_per_token(MISTRAL_7B, 2, tp=16) == 16_384  # 8 kv heads on 16 GPUs: one head each
    assert kv_bytes_per_token(MISTRAL_7B, 2, pp=2) == 65_536
    mem = engine_memory(MISTRAL_7B, 7_000_000_000, 2, tp=2, pp=1, tokens=64 * 2048)
    assert mem["weights"] == 7e9 and mem["kv"] == 64 * 2048 * 65_536
    assert logit_bytes_per_position(10) == 80  # 10·(4 + 2) ids + log-probs, 4 gold, 8 list offsets, 8 id/offset


def test_training_memory_under_each_strategy():
    common = dict(micro_batch=1, seq=2048, bf16=True)
    z3 = training_memory(LLAMA_7B, P7, strategy="deepspeed", zero_stage=3, ranks=8, **common)
    assert z3["optimizer"] == 12 * P7 / 8  # fp32 master + 2 moments, partitioned over 8 ranks
    assert z3["weights"] == 2 * P7 / 8 and z3["grads"] == 2 * P7 / 8
    z2 = training_memory(LLAMA_7B, P7, strategy="deepspeed", zero_stage=2, ranks=8, **common)
    assert z2["weights"] == 2 * P7 and z2["grads"] == 2 * P7 / 8 and z2["optimizer"] == 12 * P7 / 8
    ddp = training_memory(LLAMA_7B, P7, strategy="ddp", zero_stage=2, ranks=8, **common)
    assert (ddp["weights"], ddp["grads"], ddp["optimizer"]) == (4 * P7, 4 * P7, 8 * P7)  # fp32, whole
    off = training_memory(LLAMA_7B, P7, strategy="deepspeed", zero_stage=3, ranks=8, offload_optimizer=True,
                          **common)
    assert off["optimizer"] == 0 and off["optimizer_host"] == 12 * P7 / 8
    # activations: 2048 × 1 × 4096 × (34 + 5·32·2048/4096) = 956,301,312 bytes per layer, × 32 layers
    assert activation_bytes(LLAMA_7B, 2048, 1) == 956_301_312
    assert z3["activations"] == 32 * 956_301_312
    # checkpointed: each layer's 16-bit input (2048 × 4096 × 2 bytes) + one layer's full activations
    assert z3["activations_ckpt"] == 32 * 2048 * 4096 * 2 + 956_301_312
    assert z3["logits"] == 2048 * 32000 * 4
    assert z3["total"] == 16 * P7 / 8 + 32 * 956_301_312 + 2048 * 32000 * 4


# A small model for the training levers, by hand: hidden 64, 2 layers, 4 heads of 16 (no GQA),
# MLP 128, vocab 1000, untied. 2·(64·16·(2·4 + 2·4) + 3·64·128 + 2·64) + 2·1000·64 + 64 = 210,240.
SMALL = ModelArch(hidden_size=64, num_layers=2, num_heads=4, vocab_size=1000, intermediate_size=128,
                  tie_word_embeddings=False)
P_SMALL = 210_240


def test_training_levers_by_hand():
    assert param_count(SMALL) == P_SMALL
    assert largest_tensor(SMALL) == 64_000  # the embedding 1000 × 64 beats an MLP matrix 64 × 128
    # load: ZeRO-3 in bf16 over 2 ranks: its half (2 B × P / 2) plus the embedding while it is built;
    # ZeRO-2 bf16: the whole model in bf16; DDP: the whole model in fp32 (it trains in fp32)
    assert load_bytes(SMALL, P_SMALL, strategy="deepspeed", zero_stage=3, ranks=2, bf16=True) == P_SMALL + 128_000
    assert load_bytes(SMALL, P_SMALL, strategy="deepspeed", zero_stage=2, ranks=2, bf16=True) == 2 * P_SMALL
    assert load_bytes(SMALL, P_SMALL, strategy="ddp", zero_stage=2, ranks=2, bf16=True) == 4 * P_SMALL
    # the loss at micro-batch 2 × 16: logits 2·16·1000·4 = 128,000 B; from hidden states, a chunk
    # (max(16, 2^27 / 4000) = 33,554 rows) covers all 32 positions: one fp32 [32, 1000] buffer and a
    # bf16 one beside it, 8 B an entry (256,000 B) + the fp32 [1000, 64] head-gradient accumulator (256,000 B)
    assert loss_bytes(SMALL, 2, 16, "logits") == 128_000
    assert loss_bytes(SMALL, 2, 16, "hidden") == 256_000 + 256_000
    # V = 128,256, 8 × 1024 positions: the chunk is 2^27 / (4·128,256) = 261 rows
    big = SMALL.model_copy(update={"vocab_size": 128_256})
    assert loss_bytes(big, 8, 1024, "hidden") == 8 * 261 * 128_256 + 4 * 128_256 * 64
    assert loss_bytes(big, 8, 1024, "logits") == 8 * 1024 * 128_256 * 4
    common = dict(ranks=2, micro_batch=2, seq=16, bf16=True)
    z2 = training_memory(SMALL, P_SMALL, strategy="deepspeed", zero_stage=2, loss_from="hidden", **common)
    z3 = training_memory(SMALL, P_SMALL, strategy="deepspeed", zero_stage=3, loss_from="hidden", **common)
    assert z2["logits"] == z3["logits"] == 512_000  # ZeRO-3 too: the loss runs as the head's forward
    assert (z2["load"], z3["load"]) == (2 * P_SMALL, P_SMALL + 128_000)
    # activations per layer: 16 · 2 · 64 · (34 + 5·4·16/64) = 79,872 B (16-bit)
    states3 = 2 * P_SMALL / 2 + 2 * P_SMALL / 2 + 12 * P_SMALL / 2
    assert z3["total"] == states3 + 2 * 79_872 + 512_000


def test_lora_and_packing_hooks_by_hand():
    # rank 4 on q and v (64 → 64 each): 4·(64 + 64) per matrix, 2 per layer, 2 layers
    assert lora_trainable_params(SMALL, 4, ["q_proj", "v_proj"]) == 2 * 2 * 4 * 128
    # all-linear: q, k, v, o 4·128 each, gate and up 4·(64 + 128), down 4·(128 + 64); × 2 layers
    assert lora_trainable_params(SMALL, 4, ["all-linear"]) == 2 * (4 * 4 * 128 + 3 * 4 * 192)
    with pytest.raises(ValueError, match="c_attn"):
        lora_trainable_params(SMALL, 4, ["c_attn"])
    lora = 2048
    m = training_memory(SMALL, P_SMALL, strategy="deepspeed", zero_stage=2, ranks=2, micro_batch=2, seq=16,
                        bf16=True, trainable=lora)
    # frozen weights in bf16, no gradients or optimizer states for them; the adapters' over 2 ranks
    assert (m["weights"], m["grads"], m["optimizer"]) == (2 * P_SMALL, 2 * lora / 2, 12 * lora / 2)
    # a packed micro-batch's block-diagonal mask, 2 × 16 × 16 in bf16; none with varlen attention
    assert packing_mask_bytes(2, 16, varlen=False) == 1024 and packing_mask_bytes(2, 16, varlen=True) == 0
    packed = training_memory(SMALL, P_SMALL, strategy="deepspeed", zero_stage=2, ranks=2, micro_batch=2, seq=16,
                             bf16=True, packing_mask=1024)
    plain = training_memory(SMALL, P_SMALL, strategy="deepspeed", zero_stage=2, ranks=2, micro_batch=2, seq=16,
                            bf16=True)
    assert packed["activations"] - plain["activations"] == 1024
    assert packed["activations_ckpt"] - plain["activations_ckpt"] == 1024


def test_config_json_wins_over_arch_and_disagreements_are_named(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "intermediate_size": 11008, "vocab_size": 32000, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    cfg = load_config(TINY, [f"pivot.path={model}", "pivot.arch={hidden_size: 4096, num_layers: 30, num_heads: 32, "
                             "vocab_size: 32000, intermediate_size: 11008}"])
    sized = size_model(cfg.pivot)
    assert sized.params == P7 and sized.origin == "config.json" and sized.torch_dtype == "bfloat16"
    assert sized.notes == ["pivot: arch.num_layers = 30 but config.json says 32; using config.json"]


def test_arch_rejects_unknown_keys():
    from fusion_ray.config import ConfigError

    with pytest.raises(ConfigError, match="pivot.arch.layers: unknown key"):
        load_config(TINY, ["pivot.arch={hidden_size: 8, num_layers: 1, num_heads: 1, vocab_size: 8, "
                           "intermediate_size: 8, layers: 2}"])


def test_node_types_of_cluster_yaml():
    name, types = load_cluster(REPO / "cluster.yaml")
    by = {t.name: t for t in types}
    assert by["head"].resources["CPU"] == 0 and by["head"].max_nodes == 1
    worker = by["gpu_worker"]
    assert INSTANCE_TYPES[worker.instance].gpus == 8
    assert (worker.gpus, worker.gpu_type, worker.gpu_bytes) == (8, "A100", 40 * 10**9)
    assert worker.resources["accelerator_type:A100"] == 1


def test_engines_ask_tp_times_pp_gpus():
    cfg = load_config(GPU_CONFIG, ["sources.0.tensor_parallel_size=2", "sources.0.pipeline_parallel_size=2"])
    asks = {a.model: a for a in resource_asks(cfg)["collect"]}
    assert asks["mixtral"].gpus == 4 and asks["openchat"].gpus == 1 and asks["internlm"].gpus == 2
    cpu = load_config(TINY)
    assert all(a.gpus == 0 and a.cpus == 0.5 for a in resource_asks(cpu)["collect"])
    assert resource_asks(cpu)["train"][0].gpus == 0


def test_chat_eval_asks_engines_per_arm_and_lm_eval_tasks(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "turns": ["hi"]}\n')
    cfg = load_config(GPU_CONFIG, [f"eval.chat.questions={questions}", "eval.chat.num_gpus=1",
                                   "eval.chat.concurrency=2", "eval.lm_eval.tasks=[t]", "eval.lm_eval.arms=[merged]",
                                   "eval.lm_eval.num_gpus=1", "pivot.tensor_parallel_size=2"])
    chat, lm = resource_asks(cfg)["eval"][1:]
    assert (chat.count, chat.gpus, chat.tp) == (2, 2, 2), "a vLLM answer engine holds TP GPUs, as the pivot's"
    assert (lm.count, lm.gpus) == (1, 1)
    hf = load_config(GPU_CONFIG, [f"eval.chat.questions={questions}", "eval.chat.engine=hf", "eval.chat.num_gpus=1",
                                  "pivot.tensor_parallel_size=2"])
    assert resource_asks(hf)["eval"][1].gpus == 1 and len(resource_asks(hf)["eval"]) == 2
    assert len(resource_asks(load_config(GPU_CONFIG))["eval"]) == 1, "no chat section: no chat asks"


def test_serve_replicas_ask_tp_gpus():
    from fusion_ray.serve.app import ServeArgs, deployment_options

    args = ServeArgs(model_dir="x", num_gpus=1, engine_options={"tensor_parallel_size": 2})
    assert deployment_options(args)["ray_actor_options"]["num_gpus"] == 2
    assert deployment_options(args.model_copy(update={"engine": "hf"}))["ray_actor_options"]["num_gpus"] == 1


def test_unplaceable_is_pure_over_asks_and_nodes():
    cpu_node = {"CPU": 4.0, "memory": 1e9}
    gpu_node = {"CPU": 96.0, "GPU": 4.0, "accelerator_type:A100": 1.0}
    assert unplaceable([Ask("collect", "engine actor (p)", 2, 0.5)], [cpu_node]) == []  # fractional CPUs
    lines = unplaceable([Ask("collect", "engine actor (p)", 1, 0.5, 1.0)], [cpu_node])
    assert lines == ["collect: each engine actor (p) asks CPU 0.5, GPU 1, but no node of the Ray cluster has that "
                     "(1 node(s); at most CPU 4, GPU 0 on one; accelerator types: none)"]
    assert unplaceable([Ask("collect", "engine actor (m)", 1, 4, 8.0, tp=8)], [cpu_node, gpu_node])
    assert not unplaceable([Ask("train", "rank", 8, 8, 1.0, "A100")], [gpu_node])
    assert unplaceable([Ask("train", "rank", 8, 8, 1.0, "H100")], [gpu_node])


def test_import_plan_loads_no_engine():
    probe = ("import sys, fusion_ray.plan, fusion_ray.resources; "
             "print([m for m in ('torch', 'ray', 'transformers', 'vllm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- the command line, offline -----------------------------------------------------------------


def cli(*args, env=None, cwd=REPO):
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "fusion_ray.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=full)


@pytest.fixture
def offline(tmp_path):
    """An empty, offline HF cache: the shipped GPU config can only be sized from its `arch` numbers."""
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}


def test_plan_accepts_the_shipped_gpu_config(offline):
    out = cli("plan", "jobs/configs/fusechat_7b.yaml", "--cluster", "cluster.yaml", env=offline)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "plan: OK, every stage fits"
    assert "arch (config.json not readable here)" in out.stdout
    mixtral = next(line for line in lines if "engine actor (mixtral)" in line)
    assert "TP 4 × PP 1" in mixtral and "23.4 GB" in mixtral and "gpu_worker" in mixtral
    assert "= 16.4 GB per model, × 4 models = 65.5 GB" in out.stdout  # 100,000 × 2048 × 80 B


def test_plan_names_mixtral_at_tp2_and_training_without_checkpointing(offline):
    out = cli("plan", "jobs/configs/fusechat_7b.yaml", "--cluster", "cluster.yaml",
              "sources.0.tensor_parallel_size=2", env=offline)
    assert out.returncode == 2, out.stdout + out.stderr
    problems = out.stdout.split("\ncannot fit\n")[1].splitlines()[:-2]
    assert len(problems) == 1 and problems[0].startswith("  collect mixtral: needs 46.8 GB per GPU"), problems
    assert "leaves 36.0 GB" in problems[0]
    out = cli("plan", "jobs/configs/fusechat_7b.yaml", "--cluster", "cluster.yaml",
              "train.gradient_checkpointing=false", env=offline)
    # the loss from hidden states: 0.8 GB
    assert out.returncode == 2 and "train openchat: needs 76.5 GB per GPU" in out.stdout
    # ZeRO-2 over 8 ranks: whole bf16 weights (2 × 7.24B = 14.5 GB, also the load peak); the loss
    # from hidden states: 8 B × 1048 × 32000 + 4 × 32000 × 4096 B = 0.79 GB
    out = cli("plan", "jobs/configs/fusechat_7b.yaml", "train.zero_stage=2", env=offline)
    assert "loss from hidden: no [B, L, V] logits" in out.stdout and "load peak 14.5 GB per rank" in out.stdout
    assert "14.5 GB     1.8 GB    10.9 GB      61.2 GB  0.8 GB" in out.stdout
    out = cli("plan", "jobs/configs/fusechat_7b.yaml", env=offline)  # ZeRO-3: the loss from hidden states too
    assert "loss from hidden: no [B, L, V] logits" in out.stdout and "load peak 2.1 GB per rank" in out.stdout
    assert "falls back" not in out.stdout


def test_plan_sizes_the_implicit_recipe_stage_by_stage(offline):
    out = cli("plan", "jobs/configs/fusechat3_8b.yaml", "--cluster", "cluster.yaml", env=offline)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "plan: OK, every stage fits"
    stages = out.stdout.split("\nstages ")[1].split("\n\n")[0].splitlines()[2:]
    assert [line.split()[0] for line in stages] == ["sample"] * 4 + ["reward", "sft", "dpo", "dpo", "eval", "eval",
                                                                 "serve"]
    assert "logit store" not in out.stdout and "collect" not in out.stdout  # no explicit-method stage
    # Qwen2.5-72B at TP 4: 72.7B × 2 B / 4 = 36.4 GB of weights per GPU, over 0.9 × 40 GB
    out = cli("plan", "jobs/configs/fusechat3_8b.yaml", "--cluster", "cluster.yaml",
              "sources.2.tensor_parallel_size=4", env=offline)
    assert out.returncode == 2, out.stdout + out.stderr
    problems = out.stdout.split("\ncannot fit\n")[1].splitlines()[:-2]
    assert len(problems) == 1 and problems[0].startswith("  sample qwen25_72b: needs 36.7 GB per GPU"), problems


def test_plan_bad_input_is_one_line_not_a_traceback(offline, tmp_path):
    out = cli("plan", "jobs/configs/fusechat_7b.yaml", "--cluster", str(tmp_path / "nope.yaml"), env=offline)
    assert out.returncode == 2 and "cluster config not found" in out.stderr and "Traceback" not in out.stderr
    out = cli("plan", "jobs/configs/tiny_cpu.yaml", env=offline)  # no cluster: nothing to place on
    assert out.returncode == 0 and "no --cluster" in out.stdout, out.stdout + out.stderr


def test_validate_names_a_missing_bucket(s3_server, offline):
    s3_server("present-bucket")
    out = cli("validate", "jobs/configs/tiny_cpu.yaml", "workdir=s3://missing-bucket/x", env=offline)
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["jobs/configs/tiny_cpu.yaml: workdir s3://missing-bucket/x is not writable: "
                                       "bucket missing-bucket does not exist"]
    ok = cli("validate", "jobs/configs/tiny_cpu.yaml", "workdir=s3://present-bucket/x", env=offline)
    assert ok.returncode == 0, ok.stderr


def test_validate_names_a_hub_id_missing_from_the_offline_cache(offline, tmp_path):
    out = cli("validate", "jobs/configs/tiny_cpu.yaml", "sources.1.path=someorg/missing-model",
              f"workdir={tmp_path}/w", env=offline)
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["jobs/configs/tiny_cpu.yaml: english: hub id someorg/missing-model not found "
                                       "in the offline HF cache (HF_HUB_OFFLINE=1)"]
    assert not (tmp_path / "w").exists(), "validate writes nothing"


# --- the live preflight ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_run_stages_fails_fast_when_no_node_has_a_gpu(ray_local, tmp_path, monkeypatch):
    from fusion_ray.pipeline import Unplaceable, preflight, run_stages

    monkeypatch.setenv("FUSION_RAY_AUTOSCALING_CONFIG", str(tmp_path / "none.yaml"))
    cpu = load_config(TINY, [f"workdir={tmp_path}/w"])
    preflight(cpu, ["collect", "align", "fuse", "train", "merge", "eval"])  # fractional CPUs fit 4 logical CPUs
    cfg = load_config(TINY, ["collect.num_gpus_per_actor=1", f"workdir={tmp_path}/w"])
    started = time.monotonic()
    with pytest.raises(Unplaceable) as err:
        run_stages(cfg, ["collect"])
    assert time.monotonic() - started < 30
    lines = str(err.value).splitlines()
    assert lines[0] == "cannot place on the connected Ray:"
    assert len(lines) == 2, lines  # one line for the one bundle all three models ask
    assert lines[1].startswith("  collect: each engine actor (pivot) asks CPU 0.5, GPU 1, but no node")
    assert not (tmp_path / "w").exists()


def test_plan_reads_train_peft_of_the_config(offline):
    # the shipped 7B config with LoRA r 8 on q and v: plan's training line counts only the adapters'
    # gradients and optimizer states (OpenChat-3.5, a Mistral shape: 32 layers, q 4096 → 4096, v 4096 → 8 × 128)
    full = cli("plan", "jobs/configs/fusechat_7b.yaml", "--cluster", "cluster.yaml", env=offline)
    lora = cli("plan", "jobs/configs/fusechat_7b.yaml", "--cluster", "cluster.yaml",
               "train.peft={rank: 8, target_modules: [q_proj, v_proj]}", env=offline)
    assert full.returncode == 0 and lora.returncode == 0, lora.stdout + lora.stderr

    def states(out: str) -> list[float]:  # weights, gradients, optimizer (GB) of the training table
        lines = out.splitlines()
        row = lines[next(i for i, line in enumerate(lines) if line.split()[:3] == ["weights", "gradients",
                                                                                  "optimizer"]) + 1]
        scale = {"B": 1e-9, "kB": 1e-6, "MB": 1e-3, "GB": 1}
        return [float(x) * scale[u] for x, u in re.findall(r"([\d.]+) (B|kB|MB|GB)\b", row)[:3]]

    (w, g, o), (lw, lg, lo) = states(full.stdout), states(lora.stdout)
    assert lw == w and g > 1 and o > 10  # the frozen weights stay; full fine-tuning's states are GBs
    assert lg < 0.01 and lo < 0.1, lora.stdout  # r 8 on q, v: 3.4M parameters over 8 ranks
    assert trainable_params(load_config(REPO / "jobs" / "configs" / "fusechat_7b.yaml",
                                        ["train.peft={rank: 8, target_modules: [q_proj, v_proj]}"]).train,
                            size_model(load_config(REPO / "jobs" / "configs" / "fusechat_7b.yaml").pivot)) \
        == 32 * 8 * ((4096 + 4096) + (4096 + 1024))


def test_plan_sizes_the_loss_with_the_chunk():
    # V 32,000, H 1024, micro-batch 1 × 1024 (bench/train_memory.py's model): the default chunk is
    # 2^27 / 128,000 = 1,048 rows, more than the 1,024 positions; 32 MiB is 2^25 / 128,000 = 262 rows.
    # 8 B an entry of [chunk, V] + the fp32 [V, H] head-gradient accumulator
    arch = ModelArch(hidden_size=1024, num_layers=12, num_heads=16, vocab_size=32_000, intermediate_size=2816)
    head = 4 * 32_000 * 1024
    assert loss_bytes(arch, 1, 1024, "hidden") == 8 * 1024 * 32_000 + head
    assert loss_bytes(arch, 1, 1024, "hidden", 32 << 20) == 8 * 262 * 32_000 + head
    assert loss_bytes(arch, 1, 1024, "hidden", 1 << 20) == 8 * 16 * 32_000 + head  # at least 16 rows
    assert loss_bytes(arch, 1, 1024, "logits", 32 << 20) == 1024 * 32_000 * 4  # the logits path: no chunk
    common = dict(strategy="deepspeed", zero_stage=2, ranks=2, micro_batch=1, seq=1024, bf16=True, loss_from="hidden")
    default, small = training_memory(arch, 10**8, **common), training_memory(arch, 10**8, **common,
                                                                              loss_chunk_bytes=32 << 20)
    assert default["total_ckpt"] - small["total_ckpt"] == 8 * (1024 - 262) * 32_000


def test_plan_cli_reads_train_loss_chunk_mb(offline):
    # the shipped 7B config under ZeRO-2: OpenChat-3.5, V 32,000 (+2), micro-batch 2 × 2048
    runs = {mb: cli("plan", "jobs/configs/fusechat_7b.yaml", "--cluster", "cluster.yaml", "train.zero_stage=2",
                    *([f"train.loss_chunk_mb={mb}"] if mb else []), env=offline) for mb in (None, 32)}
    for mb, run in runs.items():
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"(train.loss_chunk_mb: {mb or 128} MiB)" in run.stdout, run.stdout

    def loss_gb(out: str) -> float:  # the training table's loss column
        lines = out.splitlines()
        header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["weights", "gradients", "optimizer"])
        assert lines[header].split()[4] == "loss"
        found = re.findall(r"([\d.]+) (MB|GB)\b", lines[header + 1])[4]
        return float(found[0]) * (1 if found[1] == "GB" else 1e-3)

    # (1,048 − 262) rows · 32,000 · 8 B ≈ 0.2 GB less (the one-decimal GB figures: 0.8 → 0.6)
    assert loss_gb(runs[None].stdout) - loss_gb(runs[32].stdout) == pytest.approx(0.2, abs=0.051)
