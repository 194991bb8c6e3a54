"""Every merge method, declared once: its name, parameters, input contract and tensor function.

`METHODS` maps a method's name to its `MergeMethod`. The pipeline config's `merge.method`
(fusion_ray.config), the mergekit-style spec (`spec.MergeSpec`: known methods and parameter
names, defaults, input counts) and the engine's dispatch (`engine.apply_method`) all read
it, so a method added here is accepted, checked and run everywhere.

Parameters: name → default, or `REQUIRED` (a number the YAML must give); a parameter is
`shared` (one value for the merge) or `per_input` (one per input model, the base excluded
where the method uses one). Names and defaults are mergekit 0.1.5's; `varm` is FuseChat v1's.

Pure Python at import: a tensor function imports torch (fusion_ray.merge.methods) when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

REQUIRED: Any = object()  # a parameter without default: the YAML must give it


@dataclass(frozen=True)
class TensorInputs:
    """One weight's merge inputs, parameters resolved for that tensor.

    `tensors` are the K input tensors (same shape, compute dtype) in the spec's input
    order; `base` the index of the base among them (None for methods without one);
    `per_input` the per-input parameters of every non-base input, by index.
    """

    tensors: list[Tensor]
    base: int | None
    shared: dict[str, Any]
    per_input: dict[int, dict[str, Any]]
    name: str  # the tensor's name (seeds DARE's masks)
    seed: int
    variant: str  # sce: "fusechat" or "mergekit" (merge/methods.py)
    sort: bool  # top-k selections by torch's sort, as mergekit (`selection: sort`)

    def others(self) -> list[int]:
        """Indices of the inputs other than the base, in order."""
        return [i for i in range(len(self.tensors)) if i != self.base]

    def each(self, parameter: str) -> list[Any]:
        """One per-input parameter over `others()`."""
        return [self.per_input[i][parameter] for i in self.others()]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its parameters (name → default or REQUIRED), input contract and tensor function."""

    name: str
    run: Callable[[TensorInputs], Tensor]
    shared: dict[str, Any] = field(default_factory=dict)
    per_input: dict[str, Any] = field(default_factory=dict)
    needs_base: bool = True
    min_inputs: int = 2  # models, the base included
    max_inputs: int | None = None

    def parameters(self) -> set[str]:
        """Every parameter name the method knows."""
        return set(self.shared) | set(self.per_input)


METHODS: dict[str, MergeMethod] = {}


def register(name: str, **contract: Any) -> Callable[[Callable[[TensorInputs], Tensor]], Callable]:
    """Declare the decorated tensor function as merge method `name` (see `MergeMethod` for `contract`)."""
    def add(run: Callable[[TensorInputs], Tensor]) -> Callable[[TensorInputs], Tensor]:
        if name in METHODS:
            raise ValueError(f"merge method {name} is declared twice")
        METHODS[name] = MergeMethod(name, run, **contract)
        return run

    return add


@register("linear", shared={"normalize": True}, per_input={"weight": REQUIRED}, needs_base=False, min_inputs=1)
def _linear(x: TensorInputs) -> Tensor:
    from fusion_ray.merge import methods

    return methods.linear(x.tensors, x.each("weight"), x.shared["normalize"])


def _task_arithmetic(sparsify: str | None, consensus: bool) -> Callable[[TensorInputs], Tensor]:
    """mergekit's generalised task arithmetic with one sparsification and sign election."""
    def run(x: TensorInputs) -> Tensor:
        from fusion_ray.merge import methods

        others = x.others()
        return methods.task_arithmetic_family(
            x.tensors[x.base], [x.tensors[i] for i in others], x.each("weight"), x.each("density"),
            sparsify=sparsify, consensus=consensus, normalize=x.shared["normalize"], rescale=x.shared["rescale"],
            lambda_=x.shared["lambda"], seeds=[methods.stable_seed(x.seed, x.name, i) for i in others], sort=x.sort)

    return run


# name: (sparsify, sign consensus, normalize default, rescale default)
for _name, (_sparsify, _consensus, _normalize, _rescale) in {
        "task_arithmetic": (None, False, False, False),
        "ties": ("magnitude", True, True, False),
        "dare_ties": ("random", True, False, True),
        "dare_linear": ("random", False, False, True)}.items():
    register(_name, shared={"int8_mask": False, "normalize": _normalize, "rescale": _rescale, "lambda": 1.0},
             per_input={"weight": REQUIRED, "density": 1.0})(_task_arithmetic(_sparsify, _consensus))


@register("slerp", shared={"t": REQUIRED}, min_inputs=2, max_inputs=2)
def _slerp(x: TensorInputs) -> Tensor:
    from fusion_ray.merge import methods

    return methods.slerp(x.shared["t"], x.tensors[x.base], x.tensors[x.others()[0]])


@register("model_stock", shared={"filter_wise": False}, min_inputs=3)
def _model_stock(x: TensorInputs) -> Tensor:
    from fusion_ray.merge import methods

    return methods.model_stock(x.tensors[x.base], [x.tensors[i] for i in x.others()], x.shared["filter_wise"])


@register("sce", shared={"int8_mask": False, "select_topk": 1.0})
def _sce(x: TensorInputs) -> Tensor:
    from fusion_ray.merge import methods

    return methods.sce(x.tensors[x.base], [x.tensors[i] for i in x.others()], x.shared["select_topk"], x.variant,
                       x.sort)


@register("varm")
def _varm(x: TensorInputs) -> Tensor:
    from fusion_ray.merge import methods

    return methods.varm(x.tensors[x.base], [x.tensors[i] for i in x.others()])


def unknown_method(name: object) -> str:
    """The message for a method name not in `METHODS`."""
    return f"unknown merge method {name!r}; known: {', '.join(METHODS)}"
