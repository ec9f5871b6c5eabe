"""Recipes: typed, versioned, strict configs loaded from YAML (or dicts).

A recipe has a ``weights`` section (:class:`quantsink.weights.config.WeightConfig`),
a ``kv_cache`` section (:class:`quantsink.kv.config.KVConfig`) and a ``calibration``
section (:class:`CalibConfig`); either of the first two may be absent. Unknown keys
are rejected, so a typo is an error instead of a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from quantsink.errors import QuantsinkError, check

RECIPE_VERSION = 1
MAX_CALIB_SAMPLES = 4096  # as --calib-samples: more than GPTQ's usual 128 windows is a typo
MAX_CALIB_SEQ_LEN = 2**20  # tokens per window; no released decoder has a longer context


def from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types.

    Nested dataclass fields are built recursively. ``where`` names the section in errors.
    """
    if not isinstance(data, Mapping):
        raise QuantsinkError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    check(not unknown, f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        raise QuantsinkError(f"{where}: {exc}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = ""
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        optional = " or null"
        if value is None:
            check(type(None) in args, f"{where}: expected a value, got null")
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        check(isinstance(value, (list, tuple)), f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, where) for v in value] if args else list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        ok = isinstance(value, hint) and not (hint is not bool and isinstance(value, bool))
        check(ok, f"{where}: expected {hint.__name__}{optional}, got {value!r}")
    return value


def to_dict(obj: Any) -> dict:
    """Plain-dict form of a config dataclass (for JSON / YAML / config.json)."""
    return dataclasses.asdict(obj)


@dataclass
class CalibConfig:
    """How calibration windows are drawn."""

    samples: int = 16
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        check(1 <= self.samples <= MAX_CALIB_SAMPLES,
              f"calibration.samples must be in 1..{MAX_CALIB_SAMPLES}, got {self.samples}")
        check(2 <= self.seq_len <= MAX_CALIB_SEQ_LEN,
              f"calibration.seq_len must be in 2..{MAX_CALIB_SEQ_LEN}, got {self.seq_len} (the model's "
              "context bounds it further)")


@dataclass
class Recipe:
    """A named quantization recipe: weights, KV cache and calibration settings."""

    name: str = "custom"
    version: int = RECIPE_VERSION
    description: str = ""
    weights: Any = None  # WeightConfig | None
    kv_cache: Any = None  # KVConfig | None
    calibration: CalibConfig = field(default_factory=CalibConfig)

    def __post_init__(self) -> None:
        check(self.version == RECIPE_VERSION,
              f"recipe version {self.version} is not supported; allowed: {RECIPE_VERSION}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "recipe") -> "Recipe":
        """Strictly build a recipe from a mapping (the YAML document)."""
        from quantsink.kv.config import KVConfig
        from quantsink.weights.config import WeightConfig

        data = dict(data)
        sections = {"weights": WeightConfig, "kv_cache": KVConfig}
        built = {k: from_dict(c, data.pop(k), f"{where}.{k}")
                 for k, c in sections.items() if data.get(k) is not None}
        for k in sections:
            data.pop(k, None)
        recipe = from_dict(cls, data, where)
        for k, v in built.items():
            setattr(recipe, k, v)
        return recipe

    def to_dict(self) -> dict:
        return to_dict(self)


def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    root = resources.files("quantsink.recipes")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_recipe(spec: "str | Path | Recipe | Mapping[str, Any]") -> Recipe:
    """Resolve a recipe: a :class:`Recipe`, a mapping, a shipped name or a YAML path."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, Mapping):
        return _with_sections(Recipe.from_dict(spec), "recipe")
    text, where = _recipe_text(str(spec))
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).replace('in "<unicode string>", ', "").split())[:160]
        raise QuantsinkError(f"{where}: not valid YAML ({detail}); allowed: a YAML mapping with unique keys "
                             "(see the shipped recipes)") from None
    check(isinstance(data, dict), f"{where}: a recipe must be a YAML mapping")
    return _with_sections(Recipe.from_dict(data, where), where)


def _with_sections(recipe: Recipe, where: str) -> Recipe:
    check(recipe.weights is not None or recipe.kv_cache is not None,
          f"{where}: the recipe has neither a weights nor a kv_cache section; allowed: at least one")
    return recipe


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _recipe_text(spec: str) -> tuple[str, str]:
    if spec.endswith((".yaml", ".yml")) or "/" in spec or Path(spec).exists():
        from quantsink.io import read_text

        return read_text(spec, "recipe file", "a YAML recipe file or a shipped recipe name"), Path(spec).name
    names = available_recipes()
    check(spec in names, f"unknown recipe {spec!r}; available: {', '.join(names)}")
    return resources.files("quantsink.recipes").joinpath(f"{spec}.yaml").read_text("utf-8"), spec
