"""The training loop: ``train(opts) -> TrainResult``, written as small steps.

One call trains (or resumes) one run in ``opts.out_dir``:

1. check the output folder (before anything heavy): not a file, not inside the data, no file under an output's name
   that invpt-train did not write (:func:`written_by_invpt_train` recognises its own by content), and for a new run
   no earlier run's outputs at all (a checkpoint needs --resume; a log or reports without one are refused, never
   appended to);
2. build the model from the config (or the resumed checkpoint's config), load ``--backbone-weights`` into its ViT;
3. Adam and the per-iteration poly schedule; restore model, optimizer, schedule, position and RNG states on resume;
4. the train split through a seeded :class:`~invpt.train.distributed.ResumableSampler` (DistributedSampler order,
   able to start mid-epoch), DDP when several processes train;
5. iterate: forward with intermediate predictions, the official criterion, backward, step; losses averaged over
   processes, checked finite (a NaN/Inf stops the run with :class:`TrainingDivergedError`, the last good checkpoint
   kept), logged to ``train_log.csv`` and TensorBoard;
6. evaluate every ``eval_every`` iterations and at the end (reports ``eval/iter_<N>.json|md``);
7. checkpoints by rank 0, atomically: ``ckpt_<N>.pth`` and ``last.pth`` (weights, config, optimizer, schedule,
   iteration, epoch, position in the epoch, every process's RNG states), and at the end ``final.pth`` (weights and
   config) and ``final_official.pth.tar`` (the official ``{'model': {'module.'+key}}`` layout).

A run that fails (or is interrupted) before its first checkpoint removes what it wrote and the folders it created
(:meth:`Trainer.run`): nothing would resume it, and a later run would otherwise meet its log. After a checkpoint a
failed run keeps its outputs for ``--resume``.

Checkpoints are in invpt's own checkpoint format, so ``invpt.load_model``, ``invpt-export --ckpt`` and
``invpt-eval --ckpt`` read them directly (the training state rides along under ``train_state`` and is ignored there).

Resuming is exact: a run of N iterations and a run stopped at a checkpoint and resumed to N give the same losses and
weights (on the same hardware and software), because the data order is a function of (seed, epoch), the position in
the epoch is stored, and every RNG the step draws from is restored.
"""
from __future__ import annotations

import logging
import math
import os
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from invpt.config import InvPTConfig, load_config
from invpt.errors import CheckpointError, ConfigError, InputError, TrainingDivergedError
from invpt.paths import check_output_dir, is_within
from invpt.timing import PhaseTimer
from invpt.train.distributed import (
    DistContext,
    ResumableSampler,
    cleanup,
    init_distributed,
    wrap_model,
)
from invpt.train.logging_utils import LOG_NAME
from invpt.train.options import RESUME_LAST, TRAJECTORY_OPTIONS, TrainOptions, suggest_lower_lr

_logger = logging.getLogger("invpt.train")

LAST_NAME = "last.pth"
FINAL_NAME = "final.pth"
OFFICIAL_NAME = "final_official.pth.tar"
CKPT_PATTERN = re.compile(r"^ckpt_(\d+)\.pth$")
EVAL_DIR = "eval"
EVAL_PATTERN = re.compile(r"^iter_\d+\.(json|md)$")
TB_DIR = "tensorboard"
TB_EVENTS_PREFIX = "events.out.tfevents."
TRAIN_STATE_VERSION = 1


@dataclass
class TrainResult:
    """What a ``train()`` call did. ``history`` holds the rows logged by this call (losses averaged over processes)."""

    out_dir: Path
    start_iteration: int
    iteration: int
    last_checkpoint: Optional[Path]
    final_checkpoint: Optional[Path]
    official_checkpoint: Optional[Path]
    history: list[dict[str, float]] = field(default_factory=list)
    scores: Optional[dict] = None
    eval_reports: list[Path] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    world_size: int = 1
    config: Optional[InvPTConfig] = None

    @property
    def images_per_second(self) -> float:
        seconds = self.timings.get("seconds", {}).get("train_s", 0.0)
        steps = self.iteration - self.start_iteration
        global_batch = self.timings.get("global_batch", 0)
        return steps * global_batch / seconds if seconds else float("nan")


# ---- paths ----------------------------------------------------------------------------------------------------

def ckpt_name(iteration: int) -> str:
    return f"ckpt_{iteration:06d}.pth"


def run_outputs(out: Path) -> list[Path]:
    """What in ``out`` bears the name of something a run writes there: ``last.pth``, ``ckpt_<N>.pth``,
    ``final.pth``, ``final_official.pth.tar``, ``train_log.csv``, ``eval/iter_<N>.json|md`` and TensorBoard event
    files (an ``eval`` or ``tensorboard`` that is not a folder counts too: the run would write there)."""
    found = []
    for p in _listdir(out):
        name = p.name
        if name in (LAST_NAME, FINAL_NAME, OFFICIAL_NAME, LOG_NAME) or CKPT_PATTERN.match(name):
            found.append(p)
        elif name in (EVAL_DIR, TB_DIR) and not p.is_dir():
            found.append(p)
        elif name == EVAL_DIR:
            found += [q for q in _listdir(p) if EVAL_PATTERN.match(q.name)]
        elif name == TB_DIR:
            found += [q for q in _listdir(p) if q.name.startswith(TB_EVENTS_PREFIX)]
    return sorted(found)


def _pickle_of(path: Path) -> bytes:
    """The pickle (structure, no tensor data) of a PyTorch zip checkpoint; b"" for anything else."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            return zf.read(names[0]) if names else b""
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return b""


def written_by_invpt_train(path: Path) -> bool:
    """Whether ``path`` (one of :func:`run_outputs`) is what invpt-train writes under that name, recognised by its
    content: checkpoints in invpt's format (``last.pth`` / ``ckpt_<N>.pth`` with a ``train_state``), the official
    layout (``final_official.pth.tar``: ``model`` with ``module.`` keys), the CSV log's header, evaluation reports
    titled "Evaluation at iteration N", TensorBoard event files."""
    from invpt.train.logging_utils import BASE_COLUMNS

    name = path.name
    try:
        if not path.is_file():
            return False
        if name == LOG_NAME:
            with open(path, encoding="utf-8", newline="") as f:
                return f.readline().startswith(",".join(BASE_COLUMNS) + ",total")
        if name == LAST_NAME or CKPT_PATTERN.match(name):
            pkl = _pickle_of(path)
            return all(k in pkl for k in (b"format_version", b"state_dict", b"train_state"))
        if name == FINAL_NAME:
            pkl = _pickle_of(path)
            return b"format_version" in pkl and b"state_dict" in pkl
        if name == OFFICIAL_NAME:
            pkl = _pickle_of(path)
            return b"model" in pkl and b"module." in pkl
        if path.parent.name == EVAL_DIR and name.endswith(".json"):
            import json

            obj = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(obj, dict) and str(obj.get("title", "")).startswith("Evaluation at iteration")
        if path.parent.name == EVAL_DIR and name.endswith(".md"):
            with open(path, encoding="utf-8") as f:
                return "Evaluation at iteration" in f.readline()
        return path.parent.name == TB_DIR and name.startswith(TB_EVENTS_PREFIX)
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: not ours
        return False


def _names(out: Path, paths: list[Path], most: int = 6) -> str:
    names = [str(p.relative_to(out)) for p in paths]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_out_dir(opts: TrainOptions) -> Path:
    """Refuse, before any work, an output folder that is a file, lies inside the data, holds files named like this
    run's outputs that invpt-train did not write, or (for a new run) holds an earlier run's outputs."""
    out = opts.out_dir
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is an existing file; training writes a folder (checkpoints, logs, reports). "
                         "Pass a folder path, e.g. runs/pascal.")
    if opts.data_root.exists() and is_within(out, opts.data_root):
        raise InputError(f"--out '{out}' lies inside the data folder '{opts.data_root}'; invpt never writes into its "
                         "inputs. Pass a folder outside the dataset, e.g. runs/pascal.")
    check_output_dir(out, "--out", "Choose a writable location, e.g. runs/pascal.")
    found = run_outputs(out)
    foreign = [p for p in found if not written_by_invpt_train(p)]
    if foreign:
        raise InputError(
            f"--out '{out}' holds {_names(out, foreign)}, which invpt-train did not write, under the name(s) this run "
            f"writes its outputs to; invpt never replaces files it did not make. Move them out of the folder, or "
            f"choose another --out folder (a new or empty one)."
        )
    if opts.resume is None and found:
        if any(p.name == LAST_NAME or CKPT_PATTERN.match(p.name) for p in found):
            raise InputError(
                f"--out '{out}' already holds a training run ({LAST_NAME} or ckpt_*.pth); a new run would overwrite "
                f"it. Pass --resume to continue it, or choose a new --out folder."
            )
        raise InputError(
            f"--out '{out}' holds outputs of an earlier invpt-train run that stopped before its first checkpoint "
            f"({_names(out, found)}); there is nothing to resume, and a new run never mixes with an earlier run's logs "
            f"and reports. Delete these files to start afresh in this folder, or choose a new --out folder."
        )
    return out


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def resolve_resume(opts: TrainOptions) -> Optional[Path]:
    """The checkpoint a resumed run starts from (None for a fresh run)."""
    from invpt.paths import describe_path_problem

    if opts.resume is None:
        return None
    path = opts.out_dir / LAST_NAME if opts.resume == RESUME_LAST else Path(opts.resume)
    problem = describe_path_problem(path)
    if problem:
        hint = (f"--resume without a path continues '{opts.out_dir / LAST_NAME}' (the --out folder's last checkpoint)"
                if opts.resume == RESUME_LAST else "Pass a ckpt_*.pth or last.pth written by invpt-train")
        raise CheckpointError(f"Resume checkpoint '{path}' {problem}. {hint}; leave out --resume to start a new run.")
    return path


# ---- checkpoints ----------------------------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    """This process's RNG states in a weights_only-loadable form (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            _logger.warning("checkpoint holds CUDA RNG states of %d GPUs, this machine has %d: CUDA RNG not restored",
                            len(cuda), torch.cuda.device_count())


def _save(obj: Mapping[str, Any], path: Path) -> None:
    from invpt.atomic import write_atomic

    write_atomic(path, lambda f: torch.save(obj, f), "Checkpoint", CheckpointError)


def _link_or_copy_atomic(src: Path, dst: Path) -> None:
    """Make ``dst`` name the same data as ``src`` atomically: a hard link renamed over ``dst`` (no second copy on
    disk), or a copy where the file system has no hard links."""
    import shutil

    from invpt.atomic import atomic_path

    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``invpt-train`` (weights_only), with its weights unwrapped and checked finite."""
    from invpt.checkpoint import FORMAT_NAME, FORMAT_VERSION, check_finite, checkpoint_filter_fn

    try:
        # Memory-mapped (private, copy on write): a ViT-L training checkpoint (weights + Adam state, ~5 GB) is paged in
        # as it is copied into the model and optimizer instead of being read whole first.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for unreadable files
        raise CheckpointError(
            f"Resume checkpoint '{path}' could not be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "It is truncated or not a PyTorch checkpoint; resume from another ckpt_*.pth of the run."
        ) from err
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT_NAME or "train_state" not in obj:
        keys = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"'{path}' is not a training checkpoint of invpt-train (it has no train_state; top-level keys: {keys}). "
            "--resume continues a run from its last.pth or ckpt_*.pth. To start training from these weights instead, "
            "use them as --backbone-weights (ViT only) or convert them with invpt-init."
        )
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"Checkpoint '{path}' is invpt format version {obj.get('format_version')}; this invpt "
                              f"reads version {FORMAT_VERSION}.")
    state = obj["train_state"]
    if state.get("version") != TRAIN_STATE_VERSION:
        raise CheckpointError(f"Checkpoint '{path}' has training-state version {state.get('version')}; this invpt "
                              f"resumes version {TRAIN_STATE_VERSION}.")
    sd = checkpoint_filter_fn(obj["state_dict"])
    check_finite(sd, path)
    return {"config": obj["config"], "state_dict": sd, "train_state": state}


def config_differences(a: InvPTConfig, b: InvPTConfig) -> list[str]:
    """``field: a vs b`` for every config field (but the name) that differs."""
    da, db = a.to_dict(), b.to_dict()
    out = []
    for key in da:
        if key == "name":
            continue
        if isinstance(da[key], dict):
            out += [f"{key}.{k}: {da[key][k]!r} vs {db[key].get(k)!r}" for k in da[key] if da[key][k] != db[key].get(k)]
        elif da[key] != db[key]:
            out.append(f"{key}: {da[key]!r} vs {db[key]!r}")
    return out


def resolve_config(opts: TrainOptions, resumed: Optional[Mapping[str, Any]], resume_path: Optional[Path]) -> InvPTConfig:
    """The run's config: ``--config``, or the resumed checkpoint's; both given must agree (tasks above all)."""
    given = load_config(opts.config) if opts.config is not None else None
    if resumed is None:
        assert given is not None  # TrainOptions requires one of them
        return given
    stored = load_config(resumed["config"])
    if given is not None:
        diff = config_differences(stored, given)
        if diff:
            what = "the tasks differ" if stored.tasks != given.tasks else "the model differs"
            raise ConfigError(
                f"--config differs from the config stored in the resumed checkpoint '{resume_path}': {what} "
                f"({'; '.join(diff)}; checkpoint vs --config). A resumed run keeps its model: leave out --config to "
                "use the stored one, or start a new run (new --out) for the new config."
            )
    return stored


def load_backbone_weights(backbone: nn.Module, path: Path) -> dict[str, Any]:
    """Load a local timm ViT checkpoint into ``backbone`` (ImageNet pre-training; nothing is downloaded).

    Formats: a PyTorch file (a state_dict, or one under ``model``/``state_dict``), ``.safetensors``, or a JAX
    ``.npz`` (timm's loader). Keys and the position embedding go through timm's ``checkpoint_filter_fn`` (prefix
    stripping, CLIP/DINOv2-style renames, pos_embed resampled to this model's patch grid). Classifier weights are
    dropped. Every backbone tensor must be present with the right shape, else CheckpointError and nothing is loaded.
    """
    from invpt.checkpoint import check_finite
    from invpt.paths import require_file

    fix = ("Pass a timm ViT checkpoint file of the config's backbone (e.g. the vit_large_patch16_384 weights as "
           ".safetensors or .pth).")
    path = require_file(path, "Backbone weights", fix, InputError)
    if path.suffix == ".npz":
        try:
            backbone.load_pretrained(str(path))
        except Exception as err:  # timm's npz loader raises KeyError/ValueError/RuntimeError on a foreign file
            raise CheckpointError(f"Backbone weights '{path}' could not be loaded by timm's .npz loader "
                                  f"({type(err).__name__}: {err}). {fix}") from err
        return {"path": str(path), "format": "npz", "loaded": len(backbone.state_dict()), "ignored": []}
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"Backbone weights '{path}' could not be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}). {fix}") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"Backbone weights '{path}' hold a {type(obj).__name__}, not a state_dict. {fix}")
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = dict(obj.get("model", obj.get("state_dict", obj)))
    if any(k.startswith("module.") for k in sd):
        sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # a whole InvPT checkpoint: take its ViT
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    try:
        sd = checkpoint_filter_fn(sd, backbone)
    except Exception as err:
        raise CheckpointError(f"Backbone weights '{path}' could not be mapped onto the ViT by timm "
                              f"({type(err).__name__}: {err}). {fix}") from err
    want = backbone.state_dict()
    ignored = sorted(k for k in sd if k not in want)
    missing = sorted(k for k in want if k not in sd)
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or shapes:
        parts = ([f"{len(missing)} missing: {', '.join(missing[:5])}"] if missing else []) + (
            [f"{len(shapes)} of another shape (file vs model): {', '.join(shapes[:4])}"] if shapes else [])
        raise CheckpointError(
            f"Backbone weights '{path}' do not fit the config's ViT ({'; '.join(parts)}). The file is another ViT "
            f"variant (width, depth or patch size) than the config's backbone. {fix} Nothing was loaded."
        )
    sd = {k: sd[k] for k in want}
    check_finite(sd, path)
    backbone.load_state_dict(sd, strict=True)
    if ignored:
        _logger.info("backbone weights: ignored %d tensor(s) the ViT has no use for (%s)", len(ignored),
                     ", ".join(ignored[:4]) + (" ..." if len(ignored) > 4 else ""))
    return {"path": str(path), "format": path.suffix.lstrip(".") or "pth", "loaded": len(sd), "ignored": ignored}


# ---- the trainer ---------------------------------------------------------------------------------------------

def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def check_bf16(device: torch.device) -> None:
    """Refuse --bf16 where bfloat16 autocast is not supported."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"--bf16 was requested but GPU '{torch.cuda.get_device_name(device)}' has no bfloat16 "
                         "support (it needs compute capability 8.0+, e.g. A100, H100, RTX 30xx). Leave out --bf16.")
    if device.type not in ("cuda", "cpu"):
        raise InputError(f"--bf16 autocast is supported on CUDA and CPU only, not on '{device}'. Leave out --bf16.")


def _freeze_bn_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class Trainer:
    """One run's state and its steps; :func:`train` drives it. Exposed for tests and for notebooks that step it."""

    def __init__(self, opts: TrainOptions, ctx: DistContext) -> None:
        self.opts = opts
        self.ctx = ctx
        self.timer = PhaseTimer()
        self.history: list[dict[str, float]] = []
        self.eval_reports: list[Path] = []
        self.scores: Optional[dict] = None
        self.csv = None
        self.tb = None
        self.val_dataset = None
        self.evaluator = None
        self.resume_path: Optional[Path] = None
        self.checkpointed = False

    # -- setup ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        opts, ctx = self.opts, self.ctx
        check_out_dir(opts)
        ctx.barrier()  # every process has checked the folder before rank 0 writes into it (train_log.csv)
        if opts.bf16:
            check_bf16(ctx.device)
        self.resume_path = resolve_resume(opts)
        resumed = load_training_checkpoint(self.resume_path) if self.resume_path is not None else None
        self.cfg = resolve_config(opts, resumed, self.resume_path)
        self._build_data()
        self._build_model(resumed)
        if resumed is not None:
            self._restore(resumed)
        else:
            self.iteration, self.epoch, self.batch_in_epoch = 0, 0, 0
            self._seed_streams()
        self.start_iteration = self.iteration
        self.model = wrap_model(self.bare, ctx, opts.sync_bn)
        from invpt.train.losses import build_criterion

        self.criterion = build_criterion(self.cfg).to(ctx.device)
        if ctx.is_main:
            self._open_logs()
        ctx.barrier()

    def _seed_streams(self) -> None:
        """Seeds of the training streams: each process draws its own dropout / drop-path masks."""
        seed = self.opts.seed + 1000 * self.ctx.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build_data(self) -> None:
        from invpt.data.multitask import MultiTaskDataset

        opts, ctx = self.opts, self.ctx
        self.train_dataset = MultiTaskDataset(opts.data_root, self.cfg, split=opts.train_split,
                                              transforms="train" if opts.augment else "eval", seed=opts.seed)
        n = len(self.train_dataset)
        global_batch = opts.batch * ctx.world_size
        if n < global_batch:
            raise InputError(
                f"The '{opts.train_split}' split of '{opts.data_root}' has {n} image(s), fewer than one global batch "
                f"({opts.batch} per process x {ctx.world_size} process(es) = {global_batch}). Pass a smaller --batch "
                "or use more data."
            )
        self.sampler = ResumableSampler(n, ctx.world_size, ctx.rank, seed=opts.seed, shuffle=True, drop_last=True)
        self.iters_per_epoch = len(self.sampler) // opts.batch
        if opts.eval_every or opts.final_eval:
            self.val_dataset = MultiTaskDataset(opts.data_root, self.cfg, split=opts.val_split, transforms="eval",
                                                seed=opts.seed)

    def _build_model(self, resumed: Optional[Mapping[str, Any]]) -> None:
        import invpt

        opts, ctx = self.opts, self.ctx
        torch.manual_seed(opts.seed)  # the same initial weights in every process (DDP also broadcasts rank 0's)
        model = invpt.build_model(self.cfg)
        self.backbone_report = None
        if resumed is not None:
            from invpt.checkpoint import check_compatible

            check_compatible(model, resumed["state_dict"], self.resume_path)
            model.load_state_dict(resumed["state_dict"], strict=True)
            if opts.backbone_weights is not None and ctx.is_main:
                _logger.warning("--backbone-weights ignored: a resumed run continues from its checkpoint's weights")
        elif opts.backbone_weights is not None:
            self.backbone_report = load_backbone_weights(model.backbone, opts.backbone_weights)
            if ctx.is_main:
                _logger.info("backbone weights loaded from %s (%d tensors)", opts.backbone_weights,
                             self.backbone_report["loaded"])
        if opts.grad_checkpointing:
            model.backbone.set_grad_checkpointing(True)
        self.bare = model.to(ctx.device)
        params = [p for p in self.bare.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, opts.schedule_factor)

    def _restore(self, resumed: Mapping[str, Any]) -> None:
        opts, ctx = self.opts, self.ctx
        state = resumed["train_state"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = int(state["iteration"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        old = state.get("options", {})
        changed = [f"{k} {old[k]!r} -> {getattr(opts, k)!r}" for k in TRAJECTORY_OPTIONS
                   if k in old and old[k] != getattr(opts, k)]
        old_world = int(state.get("world_size", 1))
        if old_world != ctx.world_size:
            changed.append(f"processes {old_world} -> {ctx.world_size}")
        if changed and ctx.is_main:
            _logger.warning("resuming with changed settings (%s): training continues, but not as the uninterrupted "
                            "run would have", "; ".join(changed))
        # The schedule follows this run's --lr / --max-iter / --poly-power / --weight-decay (a lower --lr after a
        # divergence takes effect), evaluated at the resumed iteration.
        self.scheduler.base_lrs = [opts.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = opts.lr
            group["weight_decay"] = opts.weight_decay
            group["lr"] = opts.lr * opts.schedule_factor(self.iteration)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.iteration >= opts.max_iter and ctx.is_main:
            _logger.warning("the resumed checkpoint is at iteration %d, already at --max-iter %d: nothing to train",
                            self.iteration, opts.max_iter)
        # Data position: batches already consumed in the current epoch (in units of the stored global batch).
        old_global = int(state.get("global_batch", opts.batch * ctx.world_size))
        new_global = opts.batch * ctx.world_size
        if old_global != new_global:
            self.batch_in_epoch = (self.batch_in_epoch * old_global) // new_global
        if self.batch_in_epoch >= self.iters_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        rng = state.get("rng", [])
        if len(rng) == ctx.world_size:
            _set_rng_state(rng[ctx.rank])
        else:
            self._seed_streams()
            if ctx.is_main:
                _logger.warning("checkpoint holds RNG states of %d process(es), this run has %d: streams reseeded",
                                len(rng), ctx.world_size)
        if ctx.is_main:
            _logger.info("resumed from %s at iteration %d (epoch %d, batch %d of %d)", self.resume_path,
                         self.iteration, self.epoch, self.batch_in_epoch, self.iters_per_epoch)

    def _open_logs(self) -> None:
        from invpt.train.logging_utils import LOG_NAME, CsvLog, TensorBoardLog, truncate_log

        out = self.opts.out_dir
        out.mkdir(parents=True, exist_ok=True)
        log_path = out / LOG_NAME
        if self.opts.resume is not None:
            dropped = truncate_log(log_path, self.iteration)
            if dropped:
                _logger.info("dropped %d log row(s) written after the resumed checkpoint", dropped)
        columns = ["total"] + list(self.cfg.tasks) + [f"inter_{t}" for t in self.cfg.tasks]
        self.csv = CsvLog(log_path, columns)
        self.tb = TensorBoardLog(out / "tensorboard", self.opts.tensorboard,
                                 purge_step=self.iteration + 1 if self.opts.resume is not None else None)

    # -- steps ---------------------------------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[int, int, dict]]:
        """(epoch, batch index in the epoch, batch) from the current position on, epoch after epoch."""
        from torch.utils.data import DataLoader

        from invpt.data.multitask import collate_multitask
        from invpt.train.evaluate import iterate_loader

        opts, ctx = self.opts, self.ctx
        while True:
            self.sampler.set_epoch(self.epoch)
            self.sampler.set_start(self.batch_in_epoch * opts.batch)
            if hasattr(self.train_dataset, "set_epoch"):
                self.train_dataset.set_epoch(self.epoch)
            # A generator per (seed, epoch, rank) seeds the workers, so the data pipeline never draws from (or
            # depends on) the global RNG that the checkpoints restore.
            gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + self.epoch * 1009 + ctx.rank)
            loader = DataLoader(self.train_dataset, batch_size=opts.batch, sampler=self.sampler, drop_last=True,
                                num_workers=opts.workers, collate_fn=collate_multitask, generator=gen,
                                pin_memory=ctx.device.type == "cuda", persistent_workers=False)
            start = self.batch_in_epoch
            for i, batch in enumerate(iterate_loader(loader), start=start):
                yield self.epoch, i, batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One optimizer step on ``batch``; returns the losses averaged over processes (as floats)."""
        opts, ctx = self.opts, self.ctx
        dev = ctx.device
        images = batch["image"].to(dev, non_blocking=True)
        targets = {t: batch[t].to(dev, non_blocking=True) for t in self.cfg.tasks}
        lr = self.optimizer.param_groups[0]["lr"]
        with _autocast(dev, opts.bf16):
            outputs = self.model(images, return_intermediate=True)
        losses = self.criterion(outputs, targets)
        keys = ["total"] + list(self.cfg.tasks) + [f"inter_{t}" for t in self.cfg.tasks]
        reduced = ctx.all_reduce_mean(torch.stack([losses[k].detach().float() for k in keys]))
        values = dict(zip(keys, reduced.tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            self._diverged(values)
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        self.optimizer.step()
        self.scheduler.step()
        values["lr"] = lr
        return values

    def _diverged(self, values: Mapping[str, float]) -> None:
        bad = ", ".join(f"{k} {v}" for k, v in values.items() if not math.isfinite(v))
        opts = self.opts
        last = opts.out_dir / LAST_NAME
        lr = f"--lr {suggest_lower_lr(opts.lr):g}{' and without --bf16' if opts.bf16 else ''}"
        if last.exists():
            advice = (f"The last good checkpoint is '{last}'. Continue from it with a lower learning rate "
                      f"(--resume {lr})")
        elif self.resume_path is not None:
            advice = (f"No checkpoint of this run was written to '{opts.out_dir}' yet. Continue from the resumed "
                      f"checkpoint with a lower learning rate (--resume {self.resume_path} {lr})")
        else:
            advice = (f"No checkpoint was written yet, so there is nothing to resume (the run's partial outputs are "
                      f"removed). Start the run again with a lower learning rate ({lr})")
        raise TrainingDivergedError(
            f"Training diverged at iteration {self.iteration + 1}: the loss is not finite ({bad}); the step was not "
            f"applied. {advice}, or check the labels of this run's data."
        )

    def train_mode(self) -> None:
        self.model.train()
        if self.opts.freeze_bn_stats:
            _freeze_bn_stats(self.model)

    # -- evaluation -----------------------------------------------------------------------------------------
    def evaluate_now(self) -> dict:
        """Evaluate the current weights on the validation split (all processes); rank 0 writes the report."""
        from invpt.train.evaluate import evaluate, write_report
        from invpt.train.metrics import build_evaluator

        opts, ctx = self.opts, self.ctx
        if self.evaluator is None:
            self.evaluator = build_evaluator(self.cfg)
        with self.timer.phase("eval"):
            scores = evaluate(self.bare, self.val_dataset, self.evaluator, batch_size=opts.eval_batch,
                              workers=opts.workers, ctx=ctx, bf16=opts.bf16,
                              progress=ctx.is_main and self.progress.mode == "bar")
        self.train_mode()
        if ctx.is_main:
            name = f"iter_{self.iteration:06d}"
            report = {"title": f"Evaluation at iteration {self.iteration}", "iteration": self.iteration,
                      "split": opts.val_split, "images": len(self.val_dataset),
                      "data_root": str(opts.data_root), "config": self.cfg.to_dict(), "scores": scores}
            paths = write_report(report, opts.out_dir / "eval" / f"{name}.json")
            self.eval_reports.append(paths[0])
            flat = {f"{t}/{m}": v for t, ms in scores.items() for m, v in ms.items()}
            self.tb.scalars("val", flat, self.iteration)
            self.progress.write(f"eval at iteration {self.iteration}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in flat.items() if isinstance(v, (int, float))))
        self.scores = scores
        return scores

    # -- checkpoints --------------------------------------------------------------------------------------
    def checkpoint(self, final: bool = False) -> Optional[Path]:
        """Write ``ckpt_<N>.pth`` and ``last.pth`` (rank 0; every process contributes its RNG state)."""
        from invpt.checkpoint import FORMAT_NAME, FORMAT_VERSION

        ctx, opts = self.ctx, self.opts
        rng = ctx.all_gather_object(_rng_state())
        if not ctx.is_main:
            return None
        with self.timer.phase("checkpoint"):
            obj = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "config": self.cfg.to_dict(),
                "state_dict": {k: v.detach().cpu() for k, v in self.bare.state_dict().items()},
                "train_state": {
                    "version": TRAIN_STATE_VERSION,
                    "iteration": self.iteration,
                    "epoch": self.epoch,
                    "batch_in_epoch": self.batch_in_epoch,
                    "iters_per_epoch": self.iters_per_epoch,
                    "global_batch": opts.batch * ctx.world_size,
                    "world_size": ctx.world_size,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rng,
                    "options": opts.recorded(),
                },
            }
            path = opts.out_dir / ckpt_name(self.iteration)
            _save(obj, path)
            _link_or_copy_atomic(path, opts.out_dir / LAST_NAME)
            self.checkpointed = True  # from here on the run is resumable: a failure keeps its outputs
            self._prune_checkpoints()
            if final:
                from invpt.checkpoint import save_checkpoint, save_official_checkpoint

                save_checkpoint(self.bare, opts.out_dir / FINAL_NAME, self.cfg)
                save_official_checkpoint(self.bare, opts.out_dir / OFFICIAL_NAME)
        return path

    def _prune_checkpoints(self) -> None:
        keep = self.opts.keep_checkpoints
        if keep <= 0:
            return
        found = sorted((int(m.group(1)), p) for p in _listdir(self.opts.out_dir) if (m := CKPT_PATTERN.match(p.name)))
        for _, p in found[:-keep]:
            p.unlink(missing_ok=True)

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train; a run that fails before its first checkpoint removes what it wrote (see :meth:`_remove_partial`)."""
        self._note_existing_outputs()
        try:
            return self._run()
        except BaseException:
            for log in (self.csv, self.tb):
                if log is not None:
                    log.close()
            if self.ctx.is_main and not self.checkpointed:
                self._remove_partial()
            raise

    def _note_existing_outputs(self) -> None:
        """Remember what of the output folder exists before the run writes anything."""
        out = self.opts.out_dir
        self._outputs_before = set(run_outputs(out))
        self._dirs_before = {d for d in (out / EVAL_DIR, out / TB_DIR) if os.path.lexists(d)}
        top = None  # the outermost folder of the --out path this run creates (None: --out exists)
        p = Path(os.path.abspath(out))
        while not os.path.lexists(p) and p != p.parent:
            top, p = p, p.parent
        self._created_top = top

    def _remove_partial(self) -> None:
        """Remove what this run wrote (nothing that existed before it): a run that failed before its first checkpoint
        cannot be resumed, and its log, reports and TensorBoard events would only be misread by a later run (or
        refused by it). Folders this run created go too, when empty."""
        out = self.opts.out_dir
        removed = []
        try:
            for p in run_outputs(out):
                if p not in self._outputs_before and p.is_file():
                    p.unlink()
                    removed.append(p)
            dirs = [d for d in (out / EVAL_DIR, out / TB_DIR) if d not in self._dirs_before]
            if self._created_top is not None:
                p = Path(os.path.abspath(out))
                dirs.append(p)
                while p != self._created_top and p != p.parent:
                    p = p.parent
                    dirs.append(p)
            for d in dirs:
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
        except OSError as err:
            _logger.warning("could not remove the partial outputs of the failed run in %s (%s)", out, err)
            return
        if removed:
            _logger.info("removed the partial outputs of the failed run (no checkpoint was written): %s",
                         _names(out, removed))

    def _run(self) -> TrainResult:
        from invpt.train.logging_utils import Progress

        opts, ctx = self.opts, self.ctx
        with self.timer.phase("setup"):
            self.setup()
        self.progress = Progress(opts.progress, opts.max_iter, self.iteration, opts.log_every, ctx.is_main)
        if ctx.is_main:
            _logger.info("training %s on %s: iterations %d -> %d, batch %d x %d process(es), %d iterations per epoch",
                         self.cfg.name or self.cfg.dataset, ctx.device, self.iteration, opts.max_iter, opts.batch,
                         ctx.world_size, self.iters_per_epoch)
        last_ckpt = None
        try:
            self.train_mode()
            batches = self.batches()
            while self.iteration < opts.max_iter:
                t0 = time.perf_counter()
                with self.timer.phase("train"):  # data loading and the step; evaluation and checkpoints apart
                    epoch, index, batch = next(batches)
                    values = self.step(batch)
                self.iteration += 1
                self.batch_in_epoch = index + 1
                row = {"iteration": self.iteration, "epoch": epoch, "lr": values.pop("lr"),
                       "seconds": round(time.perf_counter() - t0, 4), **values}
                self.history.append(row)
                if ctx.is_main:
                    self.csv.append(row)
                    self.tb.scalars("train", {k: v for k, v in row.items() if k not in ("iteration", "epoch")},
                                    self.iteration)
                    self.progress.update(self.iteration, values["total"], row["lr"])
                done = self.iteration >= opts.max_iter
                if opts.eval_every and self.iteration % opts.eval_every == 0 and not done:
                    self.evaluate_now()
                if done or (opts.checkpoint_every and self.iteration % opts.checkpoint_every == 0):
                    last_ckpt = self.checkpoint(final=done) or last_ckpt
            batches.close()  # ends the epoch's DataLoader (and its workers) now
            self.progress.close()
            if opts.final_eval and self.val_dataset is not None:
                self.evaluate_now()
        finally:
            self.progress.close()
            if self.csv is not None:
                self.csv.close()
            if self.tb is not None:
                self.tb.close()
        ctx.barrier()
        timings = self.timer.to_dict()
        timings["global_batch"] = opts.batch * ctx.world_size
        out = opts.out_dir
        finished = self.iteration >= opts.max_iter
        return TrainResult(
            out_dir=out, start_iteration=self.start_iteration, iteration=self.iteration,
            last_checkpoint=(out / LAST_NAME) if (out / LAST_NAME).exists() else last_ckpt,
            final_checkpoint=(out / FINAL_NAME) if finished and (out / FINAL_NAME).exists() else None,
            official_checkpoint=(out / OFFICIAL_NAME) if finished and (out / OFFICIAL_NAME).exists() else None,
            history=self.history, scores=self.scores, eval_reports=self.eval_reports, timings=timings,
            world_size=ctx.world_size, config=self.cfg,
        )


def train(opts: TrainOptions) -> TrainResult:
    """Train (or resume) one InvPT run as ``opts`` describes; see the module docstring for the steps and outputs.

    Under ``torchrun`` every process calls this; the process group is joined here and left at the end.

    Raises:
        InputError / ConfigError / CheckpointError: bad data folder, output folder, config or resume checkpoint
            (before any training step).
        TrainingDivergedError: the loss became NaN/Inf (the last good checkpoint is kept).
    """
    ctx = init_distributed(opts.device)
    try:
        return Trainer(opts, ctx).run()
    finally:
        cleanup(ctx)
