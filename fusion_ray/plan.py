"""`fusion-ray plan`: what each stage asks for and whether it fits, before any work.

No weights are read: each model's shape comes from its config.json (`locations.model_config`:
local dir, object store, HF cache or hub) or, when that cannot be read (offline), from the
config's `arch` numbers. Sizes are in bytes; printed in GB = 10^9 bytes. The arithmetic:

- parameters: per layer q, o (hidden × heads·head_dim each), k, v (hidden × kv_heads·head_dim each),
  MLP (3 matrices hidden × intermediate when gated, 2 when plain; × experts, + a router), two
  norms; plus embedding and LM head (one when tied) and the final norm. Biases are left out.
- logit store (`logits/<model>/`, fusion_ray/schema.py): per stored position an int32 input id
  and end offset, a loss-mask bit, k int32 ids + k float16 log-probs + a float32 gold log-prob,
  and two int32 list offsets: 6·k + 20 bytes uncompressed (Parquet compresses it: 31 B at k = 10
  on the demo). Rows × tokens per row × that.
- vLLM engine, per GPU: weights / (TP·PP) + KV cache, KV = 2 (K and V) × layers/PP ×
  ⌈kv_heads/TP⌉ × head_dim × bytes × tokens. One sequence at max_model_len must fit in
  gpu_memory_utilization × GPU memory (vLLM refuses to start otherwise); the batch the config
  implies (collect.batch_size, serve.max_ongoing_requests sequences) only limits concurrency.
- training rank (Rajbhandari et al., ZeRO): 16-bit weights 2P, 16-bit gradients 2P and AdamW
  states 12P (fp32 master + 2 moments) with bf16; fp32 weights 4P, gradients 4P and moments 8P
  otherwise (DDP here trains in fp32). ZeRO-2 divides gradients and optimizer states by the
  ranks, ZeRO-3 the weights too; optimizer offload moves the states to host memory. Activations
  per layer (Korthikanti et al. 2022, 16-bit, no recomputation): seq × batch × hidden ×
  (34 + 5·heads·seq/hidden) bytes (× 2 in fp32); with gradient checkpointing, each layer's input
  (seq × batch × hidden × bytes) plus one layer's full activations during its recomputation.
  Logits [micro_batch, seq, vocab] in fp32. 2 GB per GPU stay free for the CUDA context, NCCL
  and the allocator.
- the loss (`train.loss_from`): from `logits`, the [micro_batch, seq, vocab] fp32 term above; from
  `hidden` (trainer/losses.py `combined_loss_from_hidden`) no [B, L, V] logits, but per chunk of
  c = max(16, chunk / (4·vocab)) positions (chunk: `train.loss_chunk_mb`, default 128 MiB) one
  float32 [c, vocab] buffer (the chunk's logits, their softmax and gradient written over them)
  plus, for a bf16 head, the bf16 matmul output or
  gradient beside it (counted as 8 bytes an entry), and a float32 [vocab, hidden] accumulator of
  the head's gradient (a bf16 head's; a float32 head's is added into its `.grad` in place once it
  exists, else it becomes `.grad`): 8·min(c, micro_batch·seq)·vocab + 4·vocab·hidden bytes. Under
  ZeRO-3 too (the loss runs as the head's forward, which gathers its weight as the logits would).
- load (trainer/load.py): the weights in the training dtype (bf16 under DeepSpeed with bf16, fp32
  otherwise); under ZeRO-3 built partitioned: params × bytes / ranks, plus the largest tensor
  whole while its module is built (max(vocab·hidden, hidden·intermediate·(2·experts if MoE))).
  The rank needs the larger of its load peak and its training figure.
- LoRA (`lora_trainable_params`) and packing (`packing_mask_bytes`) change the figure as their
  functions say: frozen base weights in the training dtype without gradients or optimizer
  states, those only for the adapters; a packed row's block-diagonal mask [micro_batch, 1,
  seq, seq] unless the attention is variable-length.

This module imports neither torch, ray nor transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from fusion_ray import locations
from fusion_ray.config import FusionConfig, ModelArch, ModelSpec
from fusion_ray.resources import GB, Ask, NodeType, describe, per_node, resource_asks

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRAIN_RESERVE = 2 * GB  # per GPU: CUDA context, NCCL buffers, allocator slack
DEFAULT_ROWS_PER_CORPUS = 100_000  # a training corpus without max_rows (FuseChat-Mixture: 95k)
PLAIN_MLP_TYPES = ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode")


# --- model shapes --------------------------------------------------------------------------------


def arch_from_hf(config: dict) -> ModelArch | None:
    """The shape of an HF `config.json` (Llama/Mistral/Mixtral/Qwen2/InternLM2/GPT-2 keys); None if unknown."""
    c = config.get("text_config") or config

    def first(*keys, default=None):
        return next((c[k] for k in keys if c.get(k) is not None), default)

    hidden, layers, heads = first("hidden_size", "n_embd", "d_model"), first("num_hidden_layers", "n_layer"), \
        first("num_attention_heads", "n_head")
    vocab = first("vocab_size")
    if not all(isinstance(v, int) for v in (hidden, layers, heads, vocab)):
        return None
    return ModelArch(
        hidden_size=hidden, num_layers=layers, num_heads=heads, vocab_size=vocab,
        num_kv_heads=first("num_key_value_heads", default=1 if c.get("multi_query") else heads),
        head_dim=first("head_dim"), intermediate_size=first("intermediate_size", "n_inner", "ffn_dim",
                                                            default=4 * hidden),
        num_experts=first("num_local_experts", "num_experts", "n_routed_experts", default=1),
        mlp="plain" if c.get("model_type") in PLAIN_MLP_TYPES else "gated",
        tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
        max_position_embeddings=first("max_position_embeddings", "n_positions"))


def head_dim(a: ModelArch) -> int:
    return a.head_dim or a.hidden_size // a.num_heads


def kv_heads(a: ModelArch) -> int:
    return a.num_kv_heads or a.num_heads


def param_count(a: ModelArch) -> int:
    """Parameters counted from the shape (biases left out)."""
    h, d = a.hidden_size, head_dim(a)
    attention = h * d * (2 * a.num_heads + 2 * kv_heads(a))
    matrices = 3 if a.mlp == "gated" else 2
    mlp = matrices * h * a.intermediate_size * a.num_experts + (h * a.num_experts if a.num_experts > 1 else 0)
    embeddings = a.vocab_size * h * (1 if a.tie_word_embeddings else 2)
    return a.num_layers * (attention + mlp + 2 * h) + embeddings + h


@dataclass
class Sized:
    """A model's shape, parameter count, where they came from and the config.json dtype."""

    name: str
    arch: ModelArch | None
    params: int
    origin: str
    torch_dtype: str | None = None
    notes: list[str] = field(default_factory=list)


COMPARED = ("hidden_size", "num_layers", "num_heads", "vocab_size", "intermediate_size", "num_experts")


def size_model(spec: ModelSpec) -> Sized:
    """Shape from config.json when readable (it wins), else the config's `arch`; notes name disagreements."""
    hf = locations.model_config(spec.path, revision=spec.revision)
    shape = arch_from_hf(hf) if hf else None
    notes = []
    if shape and spec.arch:
        for key in COMPARED + ("num_kv_heads",):
            mine, theirs = getattr(spec.arch, key), getattr(shape, key)
            if mine is not None and mine != theirs:
                notes.append(f"{spec.name}: arch.{key} = {mine} but config.json says {theirs}; using config.json")
    arch = shape or spec.arch
    if arch is None:
        return Sized(spec.name, None, 0, "unknown", notes=notes)
    params = param_count(arch)
    if shape is None and spec.arch.params_b:
        params = int(spec.arch.params_b * 1e9)
    origin = "config.json" if shape else "arch (config.json not readable here)"
    dtype = (hf or {}).get("torch_dtype") or (hf or {}).get("dtype")
    return Sized(spec.name, arch, params, origin, dtype if dtype in DTYPE_BYTES else None, notes)


def dtype_of(asked: str, sized: Sized) -> tuple[str, str]:
    """(dtype, how chosen): `auto` is config.json's torch_dtype, else bfloat16 (assumed)."""
    if asked != "auto":
        return asked, ""
    if sized.torch_dtype:
        return sized.torch_dtype, " (auto: config.json)"
    return "bfloat16", " (auto: assumed)"


# --- the arithmetic ------------------------------------------------------------------------------


def logit_bytes_per_position(top_k: int) -> int:
    """Uncompressed bytes per stored position of `logits/` (see the module docstring)."""
    return 6 * top_k + 20


def kv_bytes_per_token(a: ModelArch, dtype_bytes: int, tp: int = 1, pp: int = 1) -> float:
    """KV cache bytes per token on one GPU: 2 × layers/PP × ⌈kv_heads/TP⌉ × head_dim × bytes."""
    return 2 * (a.num_layers / pp) * math.ceil(kv_heads(a) / tp) * head_dim(a) * dtype_bytes


def engine_memory(a: ModelArch, params: int, dtype_bytes: int, tp: int, pp: int, tokens: int) -> dict[str, float]:
    """Bytes per GPU of a vLLM engine holding `tokens` of KV cache."""
    weights = params * dtype_bytes / (tp * pp)
    kv = kv_bytes_per_token(a, dtype_bytes, tp, pp) * tokens
    return {"weights": weights, "kv": kv, "total": weights + kv}


def activation_bytes(a: ModelArch, seq: int, batch: int, act_bytes: int = 2) -> float:
    """Activations of one layer kept for backward (Korthikanti et al.): s·b·h·(34 + 5·a·s/h), 16-bit."""
    h = a.hidden_size
    return seq * batch * h * (34 + 5 * a.num_heads * seq / h) * act_bytes / 2


HIDDEN_CHUNK_BYTES = 128 << 20  # trainer/losses.py's chunk of the hidden-state loss (not imported: it needs torch)


def largest_tensor(a: ModelArch) -> int:
    """Elements of the largest single parameter: the embedding or LM head, or an MLP matrix (a MoE
    layer's experts fused in one gate/up tensor)."""
    mlp = a.hidden_size * a.intermediate_size * (2 * a.num_experts if a.num_experts > 1 else 1)
    return max(a.vocab_size * a.hidden_size, mlp)


def load_bytes(a: ModelArch, params: int, *, strategy: str, zero_stage: int, ranks: int, bf16: bool) -> float:
    """A rank's peak while it loads the model (trainer/load.py): the weights in the training dtype,
    under ZeRO-3 only its partition plus the largest tensor while its module is built."""
    size = 2 if strategy == "deepspeed" and bf16 else 4
    if strategy == "deepspeed" and zero_stage == 3:
        return params * size / ranks + largest_tensor(a) * size
    return params * size


def hidden_chunk_rows(a: ModelArch, chunk_bytes: int | None = None) -> int:
    """Positions per chunk of the hidden-state loss (trainer/losses.py `combined_loss_from_hidden`)."""
    return max(16, (chunk_bytes or HIDDEN_CHUNK_BYTES) // (4 * a.vocab_size))


def loss_bytes(a: ModelArch, micro_batch: int, seq: int, loss_from: str, chunk_bytes: int | None = None) -> float:
    """The loss's own memory: the fp32 [B, L, V] logits, or the hidden-state loss's chunk temporaries
    and its fp32 head-gradient accumulator (module docstring); `chunk_bytes`: `train.loss_chunk_mb`
    in bytes (None: the default chunk)."""
    if loss_from == "logits":
        return micro_batch * seq * a.vocab_size * 4
    chunk = hidden_chunk_rows(a, chunk_bytes)
    return 8 * min(chunk, micro_batch * seq) * a.vocab_size + 4 * a.vocab_size * a.hidden_size


def lora_trainable_params(a: ModelArch, rank: int, targets: tuple[str, ...] | list[str]) -> int:
    """Parameters of rank-`rank` LoRA adapters (A: rank × in, B: out × rank) on every layer's
    `targets` (Llama names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; "all-linear":
    all of them; MoE experts count once each)."""
    h, d, kv, inter = a.hidden_size, head_dim(a), kv_heads(a), a.intermediate_size
    shapes = {"q_proj": (h, a.num_heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d),
              "o_proj": (a.num_heads * d, h), "gate_proj": (h, inter), "up_proj": (h, inter),
              "down_proj": (inter, h)}
    names = list(shapes) if "all-linear" in targets else list(targets)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"LoRA target(s) {unknown} not known to plan's count (known: {', '.join(shapes)})")
    experts = a.num_experts if a.num_experts > 1 else 1
    per_layer = sum(rank * (shapes[n][0] + shapes[n][1]) * (experts if n in ("gate_proj", "up_proj", "down_proj")
                                                              else 1) for n in names)
    return a.num_layers * per_layer


def packing_mask_bytes(micro_batch: int, seq: int, *, varlen: bool, act_bytes: int = 2) -> float:
    """Packed rows' attention mask: none with variable-length attention (positions restart, the
    kernel gets the boundaries), else a block-diagonal [micro_batch, 1, seq, seq] additive mask."""
    return 0.0 if varlen else micro_batch * seq * seq * act_bytes


def training_memory(a: ModelArch, params: int, *, strategy: str, zero_stage: int, ranks: int, micro_batch: int,
                    seq: int, bf16: bool, offload_optimizer: bool = False, loss_from: str = "logits",
                    trainable: int | None = None, packing_mask: float = 0.0,
                    loss_chunk_bytes: int | None = None) -> dict[str, float]:
    """Bytes per training rank: weights, gradients, optimizer states, activations without
    (`activations`) and with (`activations_ckpt`) gradient checkpointing, the loss's memory
    (`logits`: the [B, L, V] logits, or the hidden-state loss's, see `loss_bytes`), the load
    peak (`load`) and totals (each at least the load peak).

    `trainable`: parameters that train (LoRA's adapters, `lora_trainable_params`; None: all);
    the others are frozen weights in the training dtype without gradients or optimizer states.
    `packing_mask`: the packed rows' attention mask (`packing_mask_bytes`), an activation.
    `loss_chunk_bytes`: the hidden-state loss's chunk (`train.loss_chunk_mb`; None: the default)."""
    mixed = strategy == "deepspeed" and bf16
    size = 2 if mixed else 4
    train = params if trainable is None else trainable
    frozen = params - train
    weights, grads, optim = (2 * train, 2 * train, 12 * train) if mixed else (4 * train, 4 * train, 8 * train)
    weights += frozen * size
    if strategy == "deepspeed":
        grads, optim = grads / ranks, optim / ranks
        if zero_stage == 3:
            weights = weights / ranks
    host_optim = optim if offload_optimizer else 0.0
    optim = 0.0 if offload_optimizer else optim
    act_bytes = 2 if mixed else 4
    layer = activation_bytes(a, seq, micro_batch, act_bytes)
    activations = a.num_layers * layer + packing_mask
    ckpt = a.num_layers * seq * micro_batch * a.hidden_size * act_bytes + layer + packing_mask
    logits = loss_bytes(a, micro_batch, seq, loss_from, loss_chunk_bytes)
    load = load_bytes(a, params, strategy=strategy, zero_stage=zero_stage, ranks=ranks, bf16=bf16)
    states = weights + grads + optim
    return {"weights": weights, "grads": grads, "optimizer": optim, "optimizer_host": host_optim,
            "activations": activations, "activations_ckpt": ckpt, "logits": logits, "load": load,
            "total": max(load, states + activations + logits), "total_ckpt": max(load, states + ckpt + logits)}


def gb(x: float) -> str:
    """Bytes in GB (10^9) with one decimal; below 0.1 GB in MB."""
    return f"{x / GB:.1f} GB" if x >= 0.1 * GB or x == 0 else f"{x / 10**6:.1f} MB"


def billions(n: int) -> str:
    """A parameter count: 7.24B, or 1.5M below a billion."""
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.1f}M"


# --- the plan ------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What `fusion-ray plan` prints: sections of text lines, the problems (one line each)."""

    title: str
    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Unit:
    """One ask with what plan knows of its memory: bytes per GPU needed, budget per node type."""

    ask: Ask
    parallel: str = "-"
    need: float = 0.0  # bytes per GPU
    budget: Callable[[NodeType], float] | None = None  # usable bytes per GPU on a node type
    why: str = ""  # what `need` is made of
    hint: str = ""  # what would make it fit
    batch: dict[str, float] | None = None  # vLLM: bytes per GPU with the whole batch's KV cache


def place(unit: Unit, types: list[NodeType] | None, cluster: str) -> tuple[str, str | None]:
    """(where the unit goes, a problem line or None) on the cluster's node types."""
    ask = unit.ask
    if types is None:
        return "(no --cluster)", None
    bundle = ask.bundle()
    hosts = [t for t in types if per_node(bundle, t.resources) > 0]
    if not hosts:
        return "NO", (f"{ask.stage}: each {ask.what} asks {describe(bundle)}, which no node type of {cluster} "
                      f"has ({'; '.join(f'{t.name}: {describe(t.resources)}' for t in types)})")
    if unit.need and ask.gpus:
        roomy = [t for t in hosts if not t.gpu_bytes or unit.need <= unit.budget(t)]
        if not roomy:
            t = max(hosts, key=lambda t: unit.budget(t))
            return "NO", (f"{ask.stage} {ask.model or ask.what}: needs {gb(unit.need)} per GPU ({unit.why}), but a "
                          f"{t.name} GPU ({t.gpu_type}, {t.gpu_bytes / GB:g} GB) leaves {gb(unit.budget(t))} for it"
                          + (f"; {unit.hint}" if unit.hint else ""))
        hosts = roomy
    capacity = sum(per_node(bundle, t.resources) * t.max_nodes for t in hosts)
    best = max(hosts, key=lambda t: per_node(bundle, t.resources))
    k = per_node(bundle, best.resources)
    where = f"{best.name}: {k} per node, {math.ceil(ask.count / k)} node(s)"
    if capacity < ask.count:
        return "NO", (f"{ask.stage}: {ask.count} × {ask.what} ({describe(bundle)} each) must run at once, but "
                      f"{cluster} holds at most {capacity} ({', '.join(f'{t.name} ≤ {t.max_nodes}' for t in hosts)})")
    return where, None


def row_count(cfg: FusionConfig, rows: int | None) -> tuple[int, str]:
    """Training rows: `--rows`, else the sum of max_rows, with a default for corpora without one."""
    if rows:
        return rows, "--rows"
    missing = [c for c in cfg.data.train if c.max_rows is None]
    total = sum(c.max_rows for c in cfg.data.train if c.max_rows) + DEFAULT_ROWS_PER_CORPUS * len(missing)
    if missing:
        return total, (f"{DEFAULT_ROWS_PER_CORPUS:,} assumed for each of {len(missing)} training corpus(es) "
                       f"without max_rows; pass --rows N")
    return total, "data.train max_rows"


def table(rows: list[list[str]], right: tuple[int, ...] = ()) -> list[str]:
    """Fixed-width lines: columns padded to their widest cell (those in `right` right-aligned)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                             enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]


def models_section(cfg: FusionConfig, sized: dict[str, Sized]) -> list[str]:
    rows = [["model", "params", "layers", "hidden", "heads/kv × dim", "vocab", "experts", "shape from"]]
    for m in cfg.models():
        s = sized[m.name]
        if s.arch is None:
            rows.append([m.name, "?", "", "", "", "", "", f"unknown: no readable config.json and no `arch` ({m.path})"])
            continue
        a = s.arch
        rows.append([m.name, billions(s.params), str(a.num_layers), str(a.hidden_size),
                     f"{a.num_heads}/{kv_heads(a)} × {head_dim(a)}", str(a.vocab_size), str(a.num_experts), s.origin])
    return table(rows, right=(1, 2, 3, 5, 6))


def logit_store_section(cfg: FusionConfig, rows: int, rows_from: str, tokens: int | None) -> list[str]:
    per_pos = logit_bytes_per_position(cfg.collect.top_k)
    t = tokens or cfg.data.max_length
    each = rows * t * per_pos
    n = len(cfg.models())
    return [f"rows {rows:,} ({rows_from})",
            f"× tokens per row {t:,} ({'--tokens' if tokens else 'data.max_length: an upper bound'})",
            f"× {per_pos} B per stored position (6·k + 20, k = {cfg.collect.top_k}; uncompressed Arrow)",
            f"= {gb(each)} per model, × {n} models = {gb(each * n)}"
            + (" (scored_only: top-k kept at scored positions only, so less)" if cfg.collect.scored_only else "")]


def collect_units(cfg: FusionConfig, asks: list[Ask], sized: dict[str, Sized]) -> list[Unit]:
    return engine_units(asks, cfg.models(), sized, cfg.collect.dtype, cfg.collect.batch_size,
                        2 * cfg.data.max_length + 16)


def engine_units(asks: list[Ask], specs: list[ModelSpec], sized: dict[str, Sized], dtype_asked: str,
                 batch_size: int, default_length: int) -> list[Unit]:
    """One unit per engine actor ask (collect's, or the implicit method's sampling engines), with the
    GPU memory one sequence of the model's context needs."""
    units = []
    for ask, spec in zip(asks, specs, strict=True):
        s = sized[spec.name]
        unit = Unit(ask, f"TP {ask.tp} × PP {ask.pp}")
        units.append(unit)
        if not ask.gpus or s.arch is None:
            continue
        dtype, _ = dtype_of(spec.dtype if dtype_asked == "auto" else dtype_asked, s)
        length = spec.max_model_len or default_length
        one = engine_memory(s.arch, s.params, DTYPE_BYTES[dtype], ask.tp, ask.pp, length)
        unit.need, unit.budget = one["total"], (lambda t, u=spec.gpu_memory_utilization: u * t.gpu_bytes)
        unit.why = f"weights {gb(one['weights'])} + KV {gb(one['kv'])} for one {length}-token sequence, {dtype}"
        unit.hint = "raise its tensor_parallel_size (or pipeline_parallel_size), or use GPUs with more memory"
        batch = engine_memory(s.arch, s.params, DTYPE_BYTES[dtype], ask.tp, ask.pp, batch_size * length)
        unit.batch = batch
    return units


def engines_section(units: list[Unit], cfg: FusionConfig, sized: dict[str, Sized]) -> list[str]:
    """The engines' GPU memory per model: collect's (every model), or the implicit method's sampling
    engines (the sources)."""
    implicit = cfg.method == "implicit"
    specs, dtype_asked = (cfg.sources, "auto") if implicit else (cfg.models(), cfg.collect.dtype)
    batch_size = cfg.implicit.batch_size if implicit else cfg.collect.batch_size
    rows = [["model", "dtype", "TP × PP", "max_model_len", "weights/GPU", "KV/token/GPU", "1 sequence",
             f"batch of {batch_size}"]]
    for unit, spec in zip(units, specs, strict=True):
        s = sized[spec.name]
        if not unit.need:
            rows.append([spec.name, "", unit.parallel, "", "", "", "not on GPUs" if s.arch else "size unknown", ""])
            continue
        dtype, how = dtype_of(spec.dtype if dtype_asked == "auto" else dtype_asked, s)
        length = spec.max_model_len or 2 * cfg.data.max_length + 16
        kv = kv_bytes_per_token(s.arch, DTYPE_BYTES[dtype], unit.ask.tp, unit.ask.pp)
        rows.append([spec.name, dtype + how, unit.parallel, str(length), gb(unit.batch["weights"]),
                     f"{kv / 2**10:.0f} KiB", gb(unit.need), gb(unit.batch["total"])])
    return table(rows, right=(3, 4, 5, 6, 7)) + [
        "  per GPU = params × bytes / (TP·PP) + 2 × layers/PP × ⌈kv_heads/TP⌉ × head_dim × bytes × tokens;",
        "  one sequence must fit in gpu_memory_utilization × GPU memory; the batch only limits concurrency"]


def trainable_params(t, sized: Sized) -> int | None:
    """The parameters that train under `train.peft` (LoRA: `lora_trainable_params`); None (all of
    them) for full fine-tuning or a model without architecture numbers."""
    if t.peft is None or sized.arch is None:
        return None
    targets = t.peft.target_modules
    return lora_trainable_params(sized.arch, t.peft.rank, (targets,) if isinstance(targets, str) else tuple(targets))


def packing_mask(t, seq: int) -> float:
    """The attention mask packed rows add (`packing_mask_bytes`): 0 while the config has no
    `train.packing` (or it is off), and with variable-length attention (`packing.varlen`, or a
    flash-attention implementation named in `packing.attention`)."""
    packing = getattr(t, "packing", None)
    if not packing or not getattr(packing, "enabled", True):
        return 0.0
    varlen = bool(getattr(packing, "varlen", False)) or "flash" in str(getattr(packing, "attention", ""))
    return packing_mask_bytes(t.micro_batch_size, seq, varlen=varlen, act_bytes=2 if t.bf16 else 4)


def train_unit(cfg: FusionConfig, ask: Ask, sized: Sized, loss_from: str | None = None) -> tuple[Unit, list[str]]:
    """The training rank of `ask`; `loss_from` overrides `train.loss_from` (DPO takes the logits)."""
    t = cfg.train
    unit = Unit(ask, f"{t.strategy}" + (f" ZeRO-{t.zero_stage}" if t.strategy == "deepspeed" else "")
                + f" × {t.num_workers}")
    if sized.arch is None:
        return unit, ["  pivot size unknown"]
    loss = loss_from or t.loss_from
    m = training_memory(sized.arch, sized.params, strategy=t.strategy, zero_stage=t.zero_stage,
                        ranks=t.num_workers, micro_batch=t.micro_batch_size, seq=cfg.data.max_length,
                        bf16=t.bf16, offload_optimizer=t.offload_optimizer, loss_from=loss,
                        trainable=trainable_params(t, sized), packing_mask=packing_mask(t, cfg.data.max_length),
                        loss_chunk_bytes=t.loss_chunk_mb << 20 if t.loss_chunk_mb else None)
    ckpt = t.gradient_checkpointing
    chosen = m["total_ckpt"] if ckpt else m["total"]
    if ask.gpus:
        unit.need, unit.budget = chosen, (lambda node: node.gpu_bytes - TRAIN_RESERVE)
        unit.why = (f"states {gb(m['weights'] + m['grads'] + m['optimizer'])} + activations "
                    f"{gb(m['activations_ckpt'] if ckpt else m['activations'])} "
                    f"({'with' if ckpt else 'without'} gradient checkpointing) + "
                    + ("logits " if loss == "logits" else "loss from hidden states ") + gb(m["logits"]))
        unit.hint = ("turn on train.gradient_checkpointing, " if not ckpt else "") + \
            "lower train.micro_batch_size, add ranks (ZeRO-3) or use GPUs with more memory"
    precision = "bf16 mixed precision" if t.bf16 and t.strategy == "deepspeed" else "fp32"
    lines = [f"  {cfg.pivot.name}: {billions(sized.params)} parameters, micro-batch {t.micro_batch_size} × "
             f"{cfg.data.max_length} tokens, {precision}",
             *table([["weights", "gradients", "optimizer", "activations", "logits" if loss == "logits" else "loss",
                      "total"],
                     [gb(m["weights"]), gb(m["grads"]), gb(m["optimizer"]), gb(m["activations"]), gb(m["logits"]),
                      gb(m["total"]) + " without checkpointing" + ("" if ckpt else " (chosen)")],
                     ["", "", "", gb(m["activations_ckpt"]), "", gb(m["total_ckpt"]) + " with checkpointing"
                      + (" (chosen)" if ckpt else "")]], right=(0, 1, 2, 3, 4))]
    if m["optimizer_host"]:
        lines.append(f"  optimizer states offloaded to host memory: {gb(m['optimizer_host'])} per rank")
    lines += ["  activations per layer = seq × batch × hidden × (34 + 5 × heads × seq / hidden) bytes (16-bit);",
              "  checkpointed: seq × batch × hidden × bytes per layer, plus one layer's during its recomputation",
              f"  loss from {loss}"
              + (": [micro-batch, seq, vocab] fp32 logits" if loss == "logits" else
                 f": no [B, L, V] logits; fp32 [chunk, vocab] temporaries, chunk = "
                 f"{hidden_chunk_rows(sized.arch, t.loss_chunk_mb << 20 if t.loss_chunk_mb else None)} positions "
                 f"(train.loss_chunk_mb: {t.loss_chunk_mb or HIDDEN_CHUNK_BYTES >> 20} MiB) "
                 "+ the fp32 head-gradient accumulator"),
              f"  load peak {gb(m['load'])} per rank: weights in the training dtype"
              + (", built partitioned (ZeRO-3): 1/ranks of them plus the largest tensor"
                 if t.strategy == "deepspeed" and t.zero_stage == 3 else ", whole")]
    if m["load"] >= chosen:
        lines.append("  the load peak is this rank's largest figure (the totals above are at least it)")
    return unit, lines


def serve_unit(cfg: FusionConfig, ask: Ask, sized: Sized) -> tuple[Unit, list[str]]:
    s = cfg.serve
    unit = Unit(ask, f"TP {ask.tp} × PP {ask.pp}")
    if not ask.gpus or sized.arch is None:
        return unit, []
    dtype = s.dtype if s.dtype != "auto" else (cfg.merge.out_dtype or cfg.merge.dtype)
    length = s.max_model_len or sized.arch.max_position_embeddings or cfg.data.max_length
    one = engine_memory(sized.arch, sized.params, DTYPE_BYTES[dtype], ask.tp, ask.pp, length)
    util = float(s.engine_options.get("gpu_memory_utilization", 0.9))
    unit.need, unit.budget = one["total"], (lambda node: util * node.gpu_bytes)
    unit.why = f"weights {gb(one['weights'])} + KV {gb(one['kv'])} for one {length}-token sequence, {dtype}"
    unit.hint = "raise serve.engine_options.tensor_parallel_size, or lower serve.max_model_len"
    full = engine_memory(sized.arch, sized.params, DTYPE_BYTES[dtype], ask.tp, ask.pp,
                         s.max_ongoing_requests * length)
    return unit, [f"  merged model ({cfg.pivot.name} shape), {dtype}, max_model_len {length}: "
                  f"{gb(one['total'])} per GPU for one sequence,",
                  f"  {gb(full['total'])} for {s.max_ongoing_requests} at once "
                  f"(max_ongoing_requests; what does not fit only limits concurrency)"]


def node_section(types: list[NodeType]) -> list[str]:
    rows = [["node type", "instance", "max nodes", "CPU", "GPU", "GPU memory"]]
    for t in types:
        gpu = f"{t.gpus:g}" + (f" × {t.gpu_type}" if t.gpu_type and t.gpus else "")
        rows.append([t.name, t.instance or "-", str(t.max_nodes), f"{t.resources.get('CPU', 0):g}", gpu,
                     f"{t.gpu_bytes / GB:g} GB" if t.gpu_bytes else "-"])
    return table(rows, right=(2, 3))


def stage_rows(units: list[Unit], types: list[NodeType] | None, cluster: str, plan: Plan) -> list[str]:
    rows = [["stage", "unit", "count", "CPU", "GPU", "parallel", "need/GPU", "usable/GPU", "placed on"]]
    for unit in units:
        ask = unit.ask
        where, problem = place(unit, types, cluster)
        if problem:
            plan.problems.append(problem)
        host = next((t for t in types or [] if where.startswith(t.name + ":")), None)
        usable = gb(unit.budget(host)) if unit.need and host and host.gpu_bytes else "-"
        batch = unit.batch
        if batch and host and host.gpu_bytes and batch["total"] > unit.budget(host):
            kv_one = unit.need - batch["weights"]
            fit = int((unit.budget(host) - batch["weights"]) // kv_one) if kv_one > 0 else 0
            plan.notes.append(f"{ask.stage} {ask.model}: KV for the whole batch needs {gb(batch['total'])} per GPU; "
                              f"vLLM will hold about {fit} sequences at max_model_len at once")
        count = f"{ask.count}" if not ask.upto or ask.upto == ask.count else f"{ask.count}..{ask.upto}"
        rows.append([ask.stage, ask.what, count, f"{ask.cpus:g}", f"{ask.gpus:g}", unit.parallel,
                     gb(unit.need) if unit.need else "-", usable, where])
    return table(rows, right=(2, 3, 4, 6, 7))


def make_plan(cfg: FusionConfig, *, source: str = "config", cluster_path: str | None = None,
              rows: int | None = None, tokens: int | None = None) -> Plan:
    """The whole plan of `cfg` on the cluster YAML at `cluster_path` (none: placement not checked)."""
    from fusion_ray.resources import load_cluster

    cluster, types = load_cluster(cluster_path) if cluster_path else ("", None)
    where = f" on cluster {cluster} ({cluster_path})" if cluster_path else ", no --cluster: placement not checked"
    plan = Plan(f"fusion-ray plan: {cfg.name} ({source}){where}")
    sized = {m.name: size_model(m) for m in cfg.models()}
    for s in sized.values():
        plan.notes.extend(s.notes)
    asks = resource_asks(cfg)
    if cfg.method == "implicit":
        return implicit_plan(cfg, plan, asks, sized, types, cluster, cluster_path)
    n_rows, rows_from = row_count(cfg, rows)
    collect = collect_units(cfg, asks["collect"], sized)
    train, train_lines = train_unit(cfg, asks["train"][0], sized[cfg.pivot.name])
    serve, serve_lines = serve_unit(cfg, asks["serve"][0], sized[cfg.pivot.name])
    units = [*collect, *(Unit(a) for s in ("align", "fuse") for a in asks[s]), train,
             *(Unit(a) for s in ("merge", "eval") for a in asks[s]), serve]
    head_sections(plan, cfg, units, sized, types, cluster, cluster_path, driver_stage="prepare")
    plan.sections.append(("logit store (logits/<model>/)", ["  " + x for x in
                                                            logit_store_section(cfg, n_rows, rows_from, tokens)]))
    plan.sections.append(("collect engines (vLLM, per GPU)", engines_section(collect, cfg, sized)))
    plan.sections.append((f"training (per rank, {cfg.train.num_workers} ranks)", train_lines))
    if serve_lines:
        plan.sections.append(("serve (per replica GPU)", serve_lines))
    return plan


def head_sections(plan: Plan, cfg: FusionConfig, units: list[Unit], sized: dict[str, Sized], types, cluster: str,
                  cluster_path: str | None, driver_stage: str) -> None:
    """The models, node types and stage placement sections, and the models that cannot be sized."""
    for unit in units:
        model = unit.ask.model
        if unit.ask.gpus and model and sized[model].arch is None:
            plan.problems.append(f"{unit.ask.stage} {model}: cannot size the model (no readable config.json, "
                                 f"no `arch` in the config), so its GPU memory cannot be checked")
    plan.sections.append(("models (parameters counted from the shape)", models_section(cfg, sized)))
    if types is not None:
        plan.sections.append((f"node types ({cluster_path})", node_section(types)))
        plan.notes.extend(n for t in types for n in t.notes)
    plan.sections.append((f"stages (each unit; {driver_stage} runs in the driver; GB = 10^9 bytes)",
                          stage_rows(units, types, cluster, plan)))


def implicit_plan(cfg: FusionConfig, plan: Plan, asks: dict, sized: dict[str, Sized], types, cluster: str,
                  cluster_path: str | None) -> Plan:
    """The implicit method's plan: sampling engines per source, reward scorers, SFT and DPO ranks,
    the evaluation's answering engines and scorers."""
    imp = cfg.implicit
    sample = engine_units(asks["sample"], cfg.sources, sized, "auto", imp.batch_size,
                          2 * cfg.data.max_length + 16)
    sft, train_lines = train_unit(cfg, asks["sft"][0], sized[cfg.pivot.name])
    dpo, _ = train_unit(cfg, asks["dpo"][1], sized[cfg.pivot.name], loss_from="logits")  # DPO: log-probs of logits
    serve, serve_lines = serve_unit(cfg, asks["serve"][0], sized[cfg.pivot.name])
    # eval: an engine of the target's size per arm answers the held-out prompts, then the scorers
    answers = engine_units(asks["eval"][:1], [cfg.pivot], sized, "auto", imp.batch_size,
                           2 * cfg.data.max_length + 16)
    units = [*sample, *(Unit(a) for a in asks["reward"]), sft, Unit(asks["dpo"][0]), dpo, *answers,
             *(Unit(a) for a in asks["eval"][1:]), serve]
    head_sections(plan, cfg, units, sized, types, cluster, cluster_path, driver_stage="pairs")
    plan.sections.append(("sampling engines (vLLM, per GPU)", engines_section(sample, cfg, sized)))
    plan.sections.append((f"training: sft and dpo (per rank, {cfg.train.num_workers} ranks)", train_lines))
    if serve_lines:
        plan.sections.append(("serve (per replica GPU)", serve_lines))
    return plan


def render(plan: Plan) -> str:
    """Plain fixed-width text; the last line says whether everything fits."""
    out = [plan.title]
    for title, lines in plan.sections:
        out += ["", title, *lines]
    if plan.notes:
        out += ["", "notes", *(f"  {n}" for n in plan.notes)]
    if plan.problems:
        out += ["", "cannot fit", *(f"  {p}" for p in plan.problems)]
    out += ["", "plan: OK, every stage fits" if plan.ok else f"plan: {len(plan.problems)} problem(s), see above"]
    return "\n".join(out)
