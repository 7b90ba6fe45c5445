"""Model configuration: one frozen dataclass, read from YAML, a dict, or a shipped preset name.

The config is the single description of an InvPT variant. It travels with our checkpoints and inside
every manifest, so later stages (export, calib, engines, runtime) never re-guess sizes from flags.

YAML form (every key but ``dataset`` is optional; defaults are the official ViT-L values)::

    dataset: pascal_context        # or nyud_v2: sets tasks, channels, class names, default size
    tasks: [semseg, human_parts, sal, normals, edge]   # default: the dataset's official order
    image_size: [512, 512]         # H, W; both multiples of 64
    backbone: {name: vit_large_patch16_384, depth: 24, embed_dim: 1024, num_heads: 16, taps: [6, 12, 18]}
    decoder: {embed_dim: 512, pred_channels: 64}   # pred_channels = PRED_OUT_NUM_CONSTANT
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Union

import yaml

from invpt.errors import ConfigError
from invpt.tasks import DatasetSpec, TaskSpec, get_dataset

_logger = logging.getLogger(__name__)

PATCH_SIZE = 16
SIZE_MULTIPLE = 64  # H and W must be multiples of 64: the stride-2 query grid and the message-passing h//4.


@dataclass(frozen=True)
class BackboneConfig:
    """The timm ViT encoder. ``taps`` are the 1-based blocks whose raw outputs feed the decoder."""

    name: str = "vit_large_patch16_384"
    depth: int = 24
    embed_dim: int = 1024
    num_heads: int = 16
    taps: tuple[int, int, int] = (6, 12, 18)
    drop_path_rate: float = 0.15


@dataclass(frozen=True)
class DecoderConfig:
    """The InvPT decoder. Stage widths are E, E/2, E/4 with E = embed_dim + pred_channels."""

    embed_dim: int = 512
    pred_channels: int = 64
    num_heads: int = 2
    mlp_ratio: float = 4.0

    @property
    def final_embed_dim(self) -> int:
        return self.embed_dim + self.pred_channels


@dataclass(frozen=True)
class InvPTConfig:
    """A complete InvPT variant. Build from YAML/dict/preset with :func:`load_config`."""

    dataset: str = "pascal_context"
    tasks: tuple[str, ...] = ()
    image_size: tuple[int, int] = (512, 512)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    name: str = ""

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def dataset_spec(self) -> DatasetSpec:
        return get_dataset(self.dataset)

    @property
    def task_specs(self) -> tuple[TaskSpec, ...]:
        spec = self.dataset_spec
        return tuple(spec.task(t) for t in self.tasks)

    @property
    def task_channels(self) -> dict[str, int]:
        return {t.name: t.channels for t in self.task_specs}

    @property
    def token_grid(self) -> tuple[int, int]:
        """ViT patch grid (H/16, W/16)."""
        return self.image_size[0] // PATCH_SIZE, self.image_size[1] // PATCH_SIZE

    @property
    def stage_dims(self) -> tuple[int, int, int]:
        e = self.decoder.final_embed_dim
        return e, e // 2, e // 4

    @property
    def stage_grids(self) -> tuple[tuple[int, int], ...]:
        """Resolution of InvPT stages 0, 1, 2: H/32, H/16, H/8 (stage 0 = ``mtt_resolution``)."""
        h, w = self.image_size
        return tuple((h // (32 >> i), w // (32 >> i)) for i in range(3))

    @property
    def feature_size(self) -> tuple[int, int]:
        """Resolution of the aggregated task features and ``mt_proj``: H/4 x W/4."""
        return self.image_size[0] // 4, self.image_size[1] // 4

    # ---- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (lists, not tuples) for YAML, JSON and ``weights_only`` checkpoints."""
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        d["image_size"] = list(self.image_size)
        d["backbone"]["taps"] = list(self.backbone.taps)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> "InvPTConfig":
        """Return a validated copy with top-level fields changed."""
        return _validate(dataclasses.replace(self, **changes))


ConfigLike = Union[InvPTConfig, Mapping[str, Any], str, Path]


def preset_names() -> list[str]:
    """Names of the presets shipped in ``invpt/presets`` (usable wherever a config is accepted)."""
    files = resources.files("invpt").joinpath("presets").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def load_config(config: ConfigLike) -> InvPTConfig:
    """Turn a config object, dict, YAML path or preset name into a validated :class:`InvPTConfig`."""
    if isinstance(config, InvPTConfig):
        return _validate(config)
    if isinstance(config, Mapping):
        return from_dict(config)
    path = Path(config)
    is_preset = str(config) in preset_names()
    if path.is_file() or (not is_preset and (path.suffix in (".yaml", ".yml") or os.path.lexists(path))):
        from invpt.paths import describe_path_problem

        problem = describe_path_problem(path)
        if problem:
            raise ConfigError(
                f"Config file '{path}' {problem}. Pass an existing YAML file or one of the preset "
                f"names: {', '.join(preset_names())}."
            )
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"Config file '{path}' is not readable YAML ({err}). Fix the file's syntax.") from err
        if not isinstance(data, Mapping):
            raise ConfigError(f"Config file '{path}' must hold a YAML mapping (keys like dataset:, image_size:).")
        return from_dict(data, source=str(path), default_name=path.stem)
    name = str(config)
    if is_preset:
        text = resources.files("invpt").joinpath("presets", f"{name}.yaml").read_text()
        return from_dict(yaml.safe_load(text), source=f"preset '{name}'", default_name=name)
    raise ConfigError(
        f"'{config}' is neither a config file nor a preset name. Presets: {', '.join(preset_names())}; "
        "or pass the path of a YAML config."
    )


def _sub(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping for '{cls.__name__}', got {data!r}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed keys are {sorted(known)}.")
    kwargs = dict(data)
    if "taps" in kwargs:
        kwargs["taps"] = tuple(int(t) for t in kwargs["taps"])
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any], source: str = "config", default_name: str = "") -> InvPTConfig:
    """Build a validated config from a plain mapping (the YAML form); unknown keys are errors."""
    known = {f.name for f in dataclasses.fields(InvPTConfig)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)}; allowed top-level keys are {sorted(known)}.")
    dataset = str(data.get("dataset", "pascal_context"))
    spec = get_dataset(dataset)
    tasks = data.get("tasks") or spec.task_names
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    size = data.get("image_size", spec.image_size)
    if isinstance(size, int):
        size = (size, size)
    try:
        image_size = (int(size[0]), int(size[1]))
        if len(size) != 2:
            raise ValueError
    except (TypeError, ValueError, IndexError):
        raise ConfigError(f"{source}: image_size must be [H, W], got {size!r}.") from None
    cfg = InvPTConfig(
        dataset=dataset,
        tasks=tuple(str(t) for t in tasks),
        image_size=image_size,
        backbone=_sub(BackboneConfig, data.get("backbone"), source),
        decoder=_sub(DecoderConfig, data.get("decoder"), source),
        name=str(data.get("name") or default_name),
    )
    return _validate(cfg, source)


def _validate(cfg: InvPTConfig, source: str = "config") -> InvPTConfig:
    """Check every constraint the architecture imposes; reorder tasks into the official order."""
    spec = get_dataset(cfg.dataset)
    if not cfg.tasks:
        cfg = dataclasses.replace(cfg, tasks=spec.task_names)
    unknown = [t for t in cfg.tasks if t not in spec.task_names]
    if unknown:
        raise ConfigError(
            f"{source}: task(s) {unknown} do not exist for dataset '{cfg.dataset}'. Its tasks are "
            f"{list(spec.task_names)}; remove the others or pick the dataset that has them."
        )
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise ConfigError(f"{source}: duplicate task in {list(cfg.tasks)}.")
    ordered = tuple(t for t in spec.task_names if t in cfg.tasks)
    if ordered != cfg.tasks:
        _logger.info("tasks reordered to the official decoder order: %s", ", ".join(ordered))
        cfg = dataclasses.replace(cfg, tasks=ordered)
    h, w = cfg.image_size
    if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        lo = (max(h // SIZE_MULTIPLE, 1) * SIZE_MULTIPLE, max(w // SIZE_MULTIPLE, 1) * SIZE_MULTIPLE)
        raise ConfigError(
            f"{source}: image_size {h}x{w} is not supported: InvPT needs H and W to be positive multiples of "
            f"{SIZE_MULTIPLE} (its stride-2 queries and attention-message upsampling need (H/16)/2 to be even). "
            f"Use e.g. {lo[0]}x{lo[1]} and pad or resize images to it."
        )
    b = cfg.backbone
    if b.depth < 1 or b.embed_dim < 1 or b.num_heads < 1 or b.embed_dim % b.num_heads:
        raise ConfigError(
            f"{source}: backbone embed_dim {b.embed_dim} must be a positive multiple of num_heads {b.num_heads}, "
            f"and depth ({b.depth}) positive."
        )
    if len(b.taps) != 3 or list(b.taps) != sorted(set(b.taps)) or b.taps[0] < 1 or b.taps[-1] > b.depth:
        raise ConfigError(
            f"{source}: backbone.taps must be three increasing 1-based block numbers within 1..{b.depth}, "
            f"got {list(b.taps)} (the official ViT-L uses [6, 12, 18]; depth 4 uses [1, 2, 3])."
        )
    d = cfg.decoder
    e = d.final_embed_dim
    if d.embed_dim < 1 or d.pred_channels < 0 or d.num_heads < 1 or e % (4 * d.num_heads):
        raise ConfigError(
            f"{source}: decoder embed_dim + pred_channels = {e} must be divisible by 4 x num_heads "
            f"({4 * d.num_heads}): the last stage works at width E/4 split into {d.num_heads} heads."
        )
    return cfg
