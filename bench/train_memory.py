"""Benchmark the training memory levers on CPU: each case in a fresh process, peak RSS per rank.

A Llama-shaped model with random weights (default: hidden 1024, 12 layers, 16 heads, MLP 2816,
vocab 32000, untied: 219.7M parameters), saved once as bf16 safetensors (as real checkpoints are)
to a temporary dir. Cases:

(a) load, 2 gloo ranks (two fresh processes, torch.distributed initialised through DeepSpeed in
    both cases): today's load (`from_pretrained(dtype=float32)` on every rank, the loop before
    trainer/load.py) against the levers (trainer/load.py under DeepSpeed ZeRO-3 with bf16: built
    inside `zero.Init`, each rank reading its slice of each tensor). Figure: the peak RSS the load
    adds above the rank's RSS before it (imports and process group done), the larger rank's.
(b) activations, one process: one forward + backward of the model (fp32, micro-batch 1 × seq
    1024, the fusion loss against a random top-10 teacher), without and with gradient
    checkpointing; the gradients are allocated before the step, so the figure (peak RSS above
    the RSS before the step) is what the step's activations and temporaries add. The children run
    with a fixed glibc mmap threshold (`LIVE_MALLOC`), so RSS follows the live tensors: under
    glibc's default the freed 4–32 MiB temporaries of the recomputed layers stay in the heap and
    the same step read 0.29–0.39 over six runs (0.206 live; `case_b`). The key figure
    uses the shipped default loss (`train.loss_from: hidden`, what a user's DDP or ZeRO-2 run with
    checkpointing trains with; until 2026-12-01 this case ran the loss from logits, whose [1, 1024,
    32k] logits checkpointing cannot cut); the logits path's ratio is shown beside it, not a key
    goal (`checkpointing_activation_ratio_logits`: ZeRO-3 and soft-capped models train that way).
    The key keeps the shipped default chunk (128 MiB: at V 32k one chunk covers all 1,023
    positions, a 125 MiB buffer checkpointing cannot cut); beside it, not a key, what a user who
    wants the least memory gets: checkpointing with `train.loss_chunk_mb: 32` (262 positions a
    chunk) against the same run without checkpointing at the default chunk
    (`checkpointing_activation_ratio_chunk32mib`).
(c) the loss alone at V = 128,256 (Llama-3's vocabulary), hidden = the model's, 4 × 1024
    positions (the shipped 7B config's 2 × 2048): λ·CLM + (1−λ)·fusion from logits (the
    [4096, V] logits, the chunked loss writing its gradient over them, backward through the
    head) against the loss from hidden states (`combined_loss_from_hidden`, its default chunk).
    Both train the head, whose `.grad` is allocated before the step (as on every micro-step of an
    accumulation window but the first, and in a run that keeps its gradients), so the figure (peak
    RSS above the inputs) is what the loss adds beyond the gradients themselves. There the logits
    side's backward builds the head's [V, H] gradient and autograd adds it into `.grad` (a 501 MiB
    temporary); the hidden side, since 2026-12-01, adds it into `.grad` chunk by chunk
    (`losses._grad_in_place`: float32 heads whose `.grad` exists; until then it, too, built a [V, H]
    accumulator). Also shown, not keys: the hidden-state loss with a 16 MiB chunk, and both sides
    with no `.grad` before the step (`*_first_micro_step`: the first micro-step after
    `zero_grad(set_to_none=True)`, where each side's [V, H] buffer becomes `.grad` itself, so the
    figure includes the head's gradient on both sides).

Packing and LoRA figures come from `bench/train_packing.py` (`packing_case()`) and
`bench/train_lora.py` (`lora_case()`) when those files exist: each returns a dict with its keys
(`packing_tokens_per_s_ratio`; `lora_trainable_fraction`, `lora_peak_ratio`), called with
`quick=` when it takes it; absent, the keys are null with a note.

Usage: python bench/train_memory.py [--quick] [--only-b]   (--quick: a 58M model, seq 256, 1 × 1024 loss
rows; --only-b: case (b) alone, its three keys, for the spread between runs)
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHAPES = {
    "default": {"hidden": 1024, "layers": 12, "heads": 16, "inter": 2816, "vocab": 32000, "seq": 1024,
                "loss_rows": (4, 1024)},
    "quick": {"hidden": 512, "layers": 8, "heads": 8, "inter": 1408, "vocab": 32000, "seq": 256,
              "loss_rows": (1, 1024)},
}
BIG_VOCAB = 128_256
SMALL_CHUNK_MB = 32  # case (b)'s `train.loss_chunk_mb` for a user who wants the least memory
# case (b)'s children: every allocation of 128 KiB or more is its own mapping, returned to the
# system when freed (setting the threshold also stops glibc from raising it), so RSS follows the
# live tensors; see case_b
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
MIB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


# ------------------------------------------------------------------------ children
def child_build(shape: dict, out: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["heads"], max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    emit({"params": sum(p.numel() for p in model.parameters())})


def child_load(mode: str, model: str, rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_ray.config import TrainConfig
    from fusion_ray.trainer.load import load_model
    from fusion_ray.trainer.strategies import import_deepspeed

    torch.set_num_threads(1)
    t = TrainConfig(strategy="deepspeed", zero_stage=3, num_workers=2, global_batch_size=2, micro_batch_size=1,
                    bf16=True)
    deepspeed = import_deepspeed(t)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.distributed.barrier()
    base, started = rss(), time.perf_counter()
    if mode == "today":  # the loop's load before trainer/load.py
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, use_safetensors=True)
        held = sum(p.numel() for p in loaded.parameters())
    else:
        loaded = load_model(model, t)
        held = sum(p.ds_tensor.numel() for p in loaded.parameters())
    seconds = time.perf_counter() - started
    torch.distributed.barrier()
    emit({"mode": mode, "rank": rank, "base": base, "peak": peak_rss(), "added": peak_rss() - base, "held": held,
          "s": seconds})


def teacher(n: int, vocab: int, k: int = 10):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, k), generator=g)
    lp = torch.log_softmax(torch.randn(n, k + 1, generator=g), -1)[:, :k].contiguous()
    return ids, lp


def child_activations(model_dir: str, seq: int, checkpointing: bool, loss_from: str = "hidden",
                      chunk_mb: str = "0") -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_ray.trainer.losses import batch_loss

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if checkpointing:  # as the training loop turns it on
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, seq - 1, dtype=torch.bool)
    top, lp = teacher(seq - 1, vocab)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask, "topk_ids": top,
             "topk_logprobs": lp, "transferred": torch.ones(seq - 1, dtype=torch.bool)}
    for p in model.parameters():  # the gradients exist before the step (as after a first one)
        p.grad = torch.zeros_like(p)
    base, started = rss(), time.perf_counter()
    out = batch_loss(model, batch, lam=0.9, tail="bucket", temperature=1.0, fusion_positions="all",
                     loss_from=loss_from, chunk_bytes=int(chunk_mb) * MIB or None)
    out["loss"].backward()
    emit({"checkpointing": checkpointing, "base": base, "peak": peak_rss(), "added": peak_rss() - base,
          "loss": out["loss"].item(), "s": time.perf_counter() - started})


def child_loss(kind: str, hidden_size: int, batch: int, seq: int) -> None:
    import torch

    from fusion_ray.trainer.losses import combined_loss, combined_loss_from_hidden

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    vocab = BIG_VOCAB
    hidden = torch.randn(batch, seq, hidden_size, generator=g).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).requires_grad_(True)
    if not kind.endswith("_nograd"):  # as after a first micro-step
        weight.grad, hidden.grad = torch.zeros_like(weight), torch.zeros_like(hidden)
    kind = kind.removesuffix("_nograd")
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq - 1, dtype=torch.bool)
    top, lp = teacher(batch * (seq - 1), vocab)
    kw = {"lambda_clm": 0.9, "tail": "bucket"}
    base, started = rss(), time.perf_counter()
    if kind == "logits":
        logits = hidden @ weight.T  # the model's [B, L, V] output
        out = combined_loss(logits, ids, mask, top, lp, inplace=True, **kw)
    elif kind == "hidden":
        out = combined_loss_from_hidden(hidden, weight, ids, mask, top, lp, **kw)
    else:  # hidden_16mib
        out = combined_loss_from_hidden(hidden, weight, ids, mask, top, lp, chunk_bytes=16 * MIB, **kw)
    out["loss"].backward()
    emit({"kind": kind, "base": base, "peak": peak_rss(), "added": peak_rss() - base, "loss": out["loss"].item(),
          "grad_norm": weight.grad.norm().item(), "s": time.perf_counter() - started})


# -------------------------------------------------------------------------- driver
def run_child(*args: str, env_extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {})}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_ranks(*args: str) -> list[dict]:
    """Two fresh processes, ranks 0 and 1 of one gloo group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", *args, str(rank), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"rank of {args} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
        out.append(json.loads(lines[-1][len("RESULT "):]))
    return out


def merged_cases(quick: bool) -> dict:
    """The packing and LoRA helpers' figures, when their bench files exist on this branch."""
    out = {}
    for module, function, keys in (("train_packing", "packing_case", ("packing_tokens_per_s_ratio",)),
                                   ("train_lora", "lora_case", ("lora_trainable_fraction", "lora_peak_ratio"))):
        if not os.path.exists(os.path.join(HERE, f"{module}.py")):
            print(f"(d) {', '.join(keys)}: null (bench/{module}.py with {function}() is not on this branch)")
            out.update(dict.fromkeys(keys))
            continue
        sys.path.insert(0, HERE)
        fn = getattr(importlib.import_module(module), function)
        result = fn(quick=quick) if "quick" in inspect.signature(fn).parameters else fn()
        print(f"(d) {function}(): " + ", ".join(f"{k} {result.get(k)}" for k in keys))
        out.update({k: result.get(k) for k in keys})
    return out


def case_b(model: str, shape: dict) -> dict:
    """(b): with / without checkpointing for the shipped loss (default chunk) and the logits path;
    and checkpointing with a `SMALL_CHUNK_MB` chunk against the same run without checkpointing.

    Every child runs with `LIVE_MALLOC` (a fixed mmap threshold), so that a freed tensor's pages
    leave RSS and the peak is the step's live memory; the shipped loss is also measured under
    glibc's default (`checkpointing_activation_ratio_glibc_dynamic`, not a key), where the
    threshold rises to 32 MiB after the first large free and the step's 4–32 MiB temporaries,
    freed, stay in the heap: that figure counts the allocator's retention as activations."""
    acts, seq = {}, str(shape["seq"])
    for loss_from in ("hidden", "logits"):
        act = {ckpt: run_child("act", model, seq, "1" if ckpt else "0", loss_from, env_extra=LIVE_MALLOC)
               for ckpt in (False, True)}
        for ckpt, r in act.items():
            print(f"(b) forward + backward, 1 × {shape['seq']}, loss from {loss_from}, "
                  f"{'with' if ckpt else 'without'} checkpointing: +{r['added'] / MIB:.0f} MiB above the "
                  f"step's start, {r['s']:.1f} s, loss {r['loss']:.4f}")
        acts[loss_from] = act[True]["added"] / act[False]["added"]
        print(f"    with / without = {acts[loss_from]:.3f}"
              + (" (goal ≤ 0.35; the shipped loss_from)" if loss_from == "hidden" else " (not a key)"))
        if loss_from == "hidden":
            small = run_child("act", model, seq, "1", "hidden", str(SMALL_CHUNK_MB), env_extra=LIVE_MALLOC)
            acts["small_chunk"] = small["added"] / act[False]["added"]
            print(f"(b) the same with checkpointing and train.loss_chunk_mb: {SMALL_CHUNK_MB}: "
                  f"+{small['added'] / MIB:.0f} MiB, {small['s']:.1f} s, loss {small['loss']:.4f}; "
                  f"/ without checkpointing (default chunk) = {acts['small_chunk']:.3f} (not a key)")
            glibc = {ckpt: run_child("act", model, seq, "1" if ckpt else "0", "hidden") for ckpt in (False, True)}
            acts["glibc_dynamic"] = glibc[True]["added"] / glibc[False]["added"]
            print(f"(b) the shipped loss under glibc's default mmap threshold: +{glibc[False]['added'] / MIB:.0f} "
                  f"/ +{glibc[True]['added'] / MIB:.0f} MiB, with / without = {acts['glibc_dynamic']:.3f} "
                  "(not a key: freed temporaries kept in the heap count as the step's)")
    return acts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and batch (about 2 minutes)")
    parser.add_argument("--only-b", action="store_true", help="case (b) alone (its keys; about 4 minutes)")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "build":
            return child_build(json.loads(rest[0]), rest[1])
        if kind == "load":
            return child_load(rest[0], rest[1], int(rest[2]), int(rest[3]))
        if kind == "act":
            return child_activations(rest[0], int(rest[1]), rest[2] == "1", *rest[3:5])
        return child_loss(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
    shape = SHAPES["quick" if args.quick else "default"]
    tmp = tempfile.mkdtemp(prefix="bench-train-memory-")
    started = time.perf_counter()
    try:
        model = os.path.join(tmp, "model")
        params = run_child("build", json.dumps(shape), model)["params"]
        print(f"model: Llama-shaped, {params / 1e6:.1f}M parameters (hidden {shape['hidden']}, {shape['layers']} "
              f"layers, vocab {shape['vocab']}), random, bf16 safetensors ({time.perf_counter() - started:.0f} s)")
        if args.only_b:  # the spread of (b) between runs, without the other cases
            acts = case_b(model, shape)
            figures = {"checkpointing_activation_ratio": round(acts["hidden"], 3),
                       f"checkpointing_activation_ratio_chunk{SMALL_CHUNK_MB}mib": round(acts["small_chunk"], 3),
                       "checkpointing_activation_ratio_logits": round(acts["logits"], 3),
                       "checkpointing_activation_ratio_glibc_dynamic": round(acts["glibc_dynamic"], 3),
                       "params_m": round(params / 1e6, 1), "seq": shape["seq"], "quick": args.quick,
                       "wall_s": round(time.perf_counter() - started)}
            return print(json.dumps(figures))
        load = {mode: run_ranks("load", mode, model) for mode in ("today", "levers")}
        for mode, ranks in load.items():
            print(f"(a) load, {mode:6}: added peak RSS per rank " + ", ".join(
                f"{r['added'] / MIB:.0f} MiB (peak {r['peak'] / MIB:.0f}, holds {r['held'] / 1e6:.1f}M elements, "
                f"{r['s']:.1f} s)" for r in ranks))
        worst = {mode: max(r["added"] for r in ranks) for mode, ranks in load.items()}
        raw = {mode: max(r["peak"] for r in ranks) for mode, ranks in load.items()}
        load_ratio = worst["levers"] / worst["today"]
        print(f"    levers (bf16, ZeRO-3 partitioned) / today (full fp32) = {load_ratio:.3f} (goal ≤ 0.6); "
              f"whole-process peak RSS {raw['levers'] / MIB:.0f} / {raw['today'] / MIB:.0f} MiB = "
              f"{raw['levers'] / raw['today']:.3f}; the fp32 model alone is {4 * params / MIB:.0f} MiB")
        acts = case_b(model, shape)
        act_ratio = acts["hidden"]
        b, length = shape["loss_rows"]
        loss = {kind: run_child("loss", kind, str(shape["hidden"]), str(b), str(length))
                for kind in ("logits", "hidden", "hidden_16mib", "logits_nograd", "hidden_nograd")}
        for kind, r in loss.items():
            print(f"(c) loss at V={BIG_VOCAB}, {b} × {length} positions, hidden {shape['hidden']}, from {kind}: "
                  f"+{r['added'] / MIB:.0f} MiB, {r['s']:.1f} s, loss {r['loss']:.5f}, head grad norm "
                  f"{r['grad_norm']:.5f}")
        loss_ratio = loss["hidden"]["added"] / loss["logits"]["added"]
        first = loss["hidden_nograd"]["added"] / loss["logits_nograd"]["added"]
        print(f"    hidden / logits = {loss_ratio:.3f} (goal ≤ 0.2); with a 16 MiB chunk "
              f"{loss['hidden_16mib']['added'] / loss['logits']['added']:.3f}; with no .grad before the step "
              f"(the head's gradient counted on both sides) {first:.3f}; logits alone "
              f"{b * length * BIG_VOCAB * 4 / MIB:.0f} MiB")
        figures = {"zero3_load_peak_ratio": round(load_ratio, 3), "checkpointing_activation_ratio": round(act_ratio, 3),
                   "hidden_state_loss_memory_ratio": round(loss_ratio, 3)}
        figures.update(merged_cases(args.quick))
        figures.update({"load_whole_process_peak_ratio": round(raw["levers"] / raw["today"], 3),
                        "checkpointing_activation_ratio_logits": round(acts["logits"], 3),
                        f"checkpointing_activation_ratio_chunk{SMALL_CHUNK_MB}mib": round(acts["small_chunk"], 3),
                        "checkpointing_activation_ratio_glibc_dynamic": round(acts["glibc_dynamic"], 3),
                        "hidden_16mib_loss_memory_ratio":
                            round(loss["hidden_16mib"]["added"] / loss["logits"]["added"], 3),
                        "hidden_state_loss_memory_ratio_first_micro_step": round(first, 3),
                        "params_m": round(params / 1e6, 1), "seq": shape["seq"], "quick": args.quick,
                        "wall_s": round(time.perf_counter() - started)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
