"""YAML read with bounds, and the size of parsed data as JSON.

Every YAML file or override value fusion_ray reads (the pipeline config, merge specs, cluster
configs) goes through `load_yaml` / `read_yaml_file`. `json_size` and `biggest_key` measure a
parsed structure without building its JSON, for input bounds checked before validation walks it.

Imports yaml and `fusion_ray.errors` only (not `fusion_ray.config`, which builds on it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from fusion_ray.errors import ConfigError, one_line

# --- YAML, read with bounds ------------------------------------------------------------------
# Every YAML file or override value fusion_ray reads goes through `load_yaml`: SafeLoader
# (no python/ tags), and bounds on the input (`MAX_YAML_BYTES`) and on what aliases expand it
# to (`MAX_YAML_NODES`, `MAX_YAML_CHARS`, `MAX_YAML_DEPTH`), checked on the composed node
# graph before any Python object is built: a "billion laughs" file is 1 KB of text whose
# aliases expand to 10^9 values, which everything downstream (validation, repr, JSON) would
# walk. A real config is a few hundred nodes and a few KB.

MAX_YAML_BYTES = 1 << 20  # a YAML file (config, merge spec, cluster config)
MAX_YAML_NODES = 100_000  # scalars + collections after alias expansion
MAX_YAML_CHARS = 1 << 20  # scalar text after alias expansion
MAX_YAML_DEPTH = 64  # nesting after alias expansion
# what SafeLoader constructs, plus merge keys (`<<`) and `=` keys, which it resolves itself
_SAFE_TAGS = frozenset(t for t in yaml.SafeLoader.yaml_constructors if t is not None) | {
    "tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"}


class _YamlBound(yaml.YAMLError):
    def __init__(self, message: str, mark: yaml.Mark | None):
        self.message, self.mark = message, mark


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts composed nodes and depth as it goes (pure Python: libyaml's
    composer recurses in C without a depth bound)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self.last_node: yaml.Node | None = None

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YamlBound(f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
            if self._nodes > MAX_YAML_NODES:
                raise _YamlBound(f"more than {MAX_YAML_NODES:,} nodes", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        self.last_node = node  # where a failing scalar constructor (int, timestamp) is
        return super().construct_object(node, deep)


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag


def _check_expansion(root: yaml.Node) -> None:
    """Raise `_YamlBound` when aliases expand the node graph past the bounds, when an alias
    refers to a collection that contains it, or at a tag SafeLoader would not construct.

    Each distinct node is visited once (iterative, memoised by identity): O(nodes in the text).
    """
    memo: dict[int, tuple[int, int, int]] = {}  # id → (expanded nodes, scalar chars, depth)
    open_: set[int] = set()  # collections whose children are being measured (the DFS path)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        kids = ([] if isinstance(node, yaml.ScalarNode) else
                node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv])
        if not children_done:
            if key in memo:
                continue
            if key in open_:
                raise _YamlBound("an alias refers to a collection that contains it (a recursive structure)",
                                 node.start_mark)
            if node.tag not in _SAFE_TAGS:
                raise _YamlBound(f"tag {_short_tag(node.tag)} is not allowed (plain YAML only: SafeLoader tags)",
                                 node.start_mark)
            open_.add(key)
            stack.append((node, True))
            stack.extend((kid, False) for kid in kids if id(kid) not in memo)
            continue
        open_.discard(key)
        nodes = 1 + sum(memo[id(k)][0] for k in kids)
        chars = len(node.value) if isinstance(node, yaml.ScalarNode) else sum(memo[id(k)][1] for k in kids)
        depth = 1 + max((memo[id(k)][2] for k in kids), default=0)
        if nodes > MAX_YAML_NODES:
            raise _YamlBound(f"aliases expand it to more than {MAX_YAML_NODES:,} nodes", node.start_mark)
        if chars > MAX_YAML_CHARS:
            raise _YamlBound(f"aliases expand it to more than {MAX_YAML_CHARS // 2**20} MiB of text",
                             node.start_mark)
        if depth > MAX_YAML_DEPTH:
            raise _YamlBound(f"aliases expand it deeper than {MAX_YAML_DEPTH} levels", node.start_mark)
        memo[key] = (nodes, chars, depth)


def _where(mark: yaml.Mark | None) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with SafeLoader, within the bounds above.

    Aliases are allowed; what they expand to counts against the bounds.

    Raises:
        ConfigError: one line naming `source`, the line and column, and the problem
            (not valid YAML, a python/ or unknown tag, a bound passed).
    """
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(source, [f"larger than {MAX_YAML_BYTES // 2**20} MiB (the bound on YAML input)"])
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader refuses control characters at once
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except _YamlBound as err:
        raise ConfigError(source, [f"refused YAML{_where(err.mark)}: {err.message}"]) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem, context = err.problem or "", err.context or ""
        if problem.startswith("but ") and context:  # "expected X" + "but found Y"
            problem, context = f"{context}, {problem}", ""
        message = f"{problem} ({context})" if problem and context else problem or context or "unreadable"
        raise ConfigError(source, [f"not valid YAML{_where(mark)}: {one_line(message)}"]) from None
    except yaml.reader.ReaderError as err:
        char = f"U+{err.character:04X}" if isinstance(err.character, int) else repr(err.character)
        line = text.count("\n", 0, err.position)
        column = err.position - (text.rfind("\n", 0, err.position) + 1)
        raise ConfigError(source, [f"not valid YAML at line {line + 1}, column {column + 1}: "
                                   f"{one_line(err.reason)} (character {char})"]) from None
    except yaml.YAMLError as err:
        raise ConfigError(source, [f"not valid YAML: {one_line(str(err))}"]) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as err:  # a scalar's constructor
        node = loader.last_node if loader is not None else None
        mark = node.start_mark if node is not None else None
        raise ConfigError(source, [f"not valid YAML{_where(mark)}: {one_line(str(err))}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml_file(path: str | os.PathLike[str], what: str = "config file") -> Any:
    """`load_yaml` of a file of at most `MAX_YAML_BYTES` (checked before reading it whole).

    Raises:
        FileNotFoundError: `what not found: path`.
        ConfigError: too large, not UTF-8, not readable, or what `load_yaml` refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as fh:
            blob = fh.read(MAX_YAML_BYTES + 1)
    except OSError as err:
        raise ConfigError(str(path), [f"cannot read: {err.strerror or err}"]) from None
    if len(blob) > MAX_YAML_BYTES:
        raise ConfigError(str(path), [f"larger than {MAX_YAML_BYTES // 2**20} MiB (the bound on YAML files)"])
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(str(path), [f"not valid UTF-8 at byte {err.start}"]) from None
    return load_yaml(text, str(path))


# --- the size of parsed data -----------------------------------------------------------------

def json_size(obj: Any, budget: int) -> int:
    """About how many bytes `json.dumps(obj)` would take; stops counting (and walking) once past
    `budget`, so a structure of shared or cyclic references costs O(budget), not its expansion."""
    total, stack = 0, [obj]
    while stack and total <= budget:
        x = stack.pop()
        if isinstance(x, dict):
            total += 2
            for k, v in x.items():
                total += _scalar_size(k) + 2
                stack.append(v)
                if total > budget:
                    break
        elif isinstance(x, list | tuple | set | frozenset):
            total += 2 + len(x)
            if total <= budget:
                stack.extend(x)
        else:
            total += _scalar_size(x)
    return total


def _scalar_size(x: Any) -> int:
    if isinstance(x, str):
        return len(x) + 2 if x.isascii() and x.isprintable() and '"' not in x and "\\" not in x else len(json.dumps(x))
    if isinstance(x, bytes):
        return 2 * len(x) + 2
    if isinstance(x, bool) or x is None:
        return 5
    if isinstance(x, int):
        return x.bit_length() * 30103 // 100000 + 2  # digits, without building them
    return 24


def biggest_key(data: Any, budget: int) -> str:
    """Dotted path of the key that holds most of `data`'s size: descend through mappings while one
    child holds at least half the budget (a list is named, not entered)."""
    path: list[str] = []
    node = data
    while isinstance(node, dict) and node and len(path) < 12:
        best: tuple[int, Any, Any] | None = None
        seen = 0
        for k, v in node.items():
            size = json_size(v, budget)
            if best is None or size > best[0]:
                best = (size, k, v)
            seen += size
            if seen > 2 * budget:
                break
        if best is None or best[0] * 2 < budget:
            break
        path.append(one_line(str(best[1]), 80))
        node = best[2]
    return ".".join(path) or "(top level)"
