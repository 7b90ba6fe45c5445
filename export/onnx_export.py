"""PyTorch -> ONNX for InvPT, with graph hygiene built in.

The torch.onnx dynamo exporter gives clean graphs (no shape arithmetic, matmul not Einsum, one
``Resize`` per interpolate call site, ``LayerNormalization`` at opset >= 17). After export, nodes are
renamed after the model module that produced them (``multi_task_decoder.invpt.invpt_stages.1.blocks.0.attn/MatMul``),
so precision policies, Netron and TensorRT's engine inspector all speak in model terms.
"""
from __future__ import annotations

import ast
import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from invpt.artifacts import publish, staging_dir
from invpt.errors import ExportError, ToolError
from invpt.preflight import release_memory
from invpt.export.opsets import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, TRT10_MAX_OPSET  # noqa: F401 (re-exported)

_logger = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)  # protobuf's hard limit is 2 GiB for the whole file
WRAPPER_ATTR = "model"
ExternalData = Literal["auto", "always", "never"]


class OnnxExportWrapper(nn.Module):
    """Flat-tuple view of InvPT for export: ``image`` in, one raw map per task out, in task order.

    ``tasks`` selects heads; the model then skips the compute only other heads need.
    """

    def __init__(self, model: nn.Module, tasks: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.model = model
        self.tasks = tuple(model.resolve_tasks(tasks))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image, tasks=self.tasks)
        return tuple(out[t] for t in self.tasks)


def check_opset(opset: int) -> None:
    """Reject opsets the exporter cannot produce reliably, with the reason and the fix."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"--opset {opset} is not supported: the torch.onnx dynamo exporter produces opsets {MIN_OPSET}-{MAX_OPSET} "
            f"reliably (it exports {MIN_OPSET} natively; converting down to 17 or lower can fail silently, and "
            f"LayerNormalization needs 17+). Use --opset {DEFAULT_OPSET} (TensorRT 10.3+ and 11.x parse it)."
        )
    if opset > TRT10_MAX_OPSET:
        _logger.warning("opset %d is newer than TensorRT 10.x parsers accept (<= %d); only TensorRT 11 will parse it",
                        opset, TRT10_MAX_OPSET)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    batch: int = 1,
    dynamic_batch: bool = False,
    tasks: Optional[Sequence[str]] = None,
    external_data: ExternalData = "auto",
    metadata: Optional[dict[str, str]] = None,
) -> Path:
    """Export ``model`` to ``path`` (a new file; written atomically together with any ``.data`` file).

    Args:
        model: an InvPT in eval mode, built with ``fused_attn=False`` for plain MatMul/Softmax nodes.
        opset: ONNX opset (18-23).
        batch: static batch size (ignored with ``dynamic_batch``).
        dynamic_batch: make dimension 0 of every input/output symbolic (``batch``).
        tasks: subset of heads to export (default all).
        external_data: store weights in ``<file>.data``: always, never, or auto (when over 1.8 GB).
        metadata: string key/values stored in the ONNX ``metadata_props``.

    Raises:
        ExportError: the exporter failed, or the output path cannot be written.
    """
    check_opset(opset)
    path = Path(path)
    wrapper = OnnxExportWrapper(model, tasks).eval()
    h, w = model.cfg.image_size
    # The dynamo exporter specialises size-1 dims, so a dynamic batch needs an example batch of 2.
    example = torch.randn(2 if dynamic_batch else batch, 3, h, w)
    dynamic_shapes = {"image": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None
    use_external = external_data == "always" or (external_data == "auto" and param_bytes(model) > EXTERNAL_DATA_THRESHOLD)

    with staging_dir(path, ExportError) as tmp_dir:
        tmp = tmp_dir / path.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(
                    wrapper,
                    (example,),
                    dynamo=True,
                    opset_version=opset,
                    input_names=["image"],
                    output_names=list(wrapper.tasks),
                    dynamic_shapes=dynamic_shapes,
                    optimize=True,
                    verbose=False,
                )
            except Exception as err:  # the exporter crashed on a model and opset invpt had already checked
                raise ToolError.from_exception(
                    "torch.onnx", f"exporting at opset {opset} (if it is not the default, try --opset {DEFAULT_OPSET})",
                    err, distribution="torch") from err
        proto = program.model_proto
        # The exported program holds the exporter's IR, including the constants its optimizer folded (e.g. transposed
        # weights: ~1.6 GB for ViT-L); released before saving makes one more copy (the serialised bytes).
        del program
        release_memory()
        rename_nodes_by_module(proto)
        for k, v in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        proto.producer_name = "invpt"
        save_onnx(proto, tmp, use_external)
        publish(tmp_dir, path, external_data_files(tmp), error_cls=ExportError)
    return path


def save_onnx(proto, path: Path, external: bool) -> None:
    """Save a ModelProto; with ``external`` all weights go to ``<name>.data`` beside it."""
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def external_data_files(path: str | os.PathLike) -> list[str]:
    """Names of the external-data files an ONNX file refers to (empty for a self-contained file)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    names = set()
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in init.external_data if e.key == "location")
    return sorted(names)


def module_path_of(node) -> Optional[str]:
    """The model module (dotted path) an exported node came from, from the dynamo exporter's metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            modules = [s for s in scopes[:-1] if s]
            if not modules:
                return ""
            scope = modules[-1]
            prefix = WRAPPER_ATTR + "."
            return scope[len(prefix):] if scope.startswith(prefix) else ("" if scope == WRAPPER_ATTR else scope)
    return None


def rename_nodes_by_module(proto) -> None:
    """Rename every node ``<module path>/<OpType>`` (plus ``_k`` for repeats) so names say where nodes come from."""
    seen: Counter[str] = Counter()
    for node in proto.graph.node:
        scope = module_path_of(node)
        if scope is None:
            continue
        base = f"{scope or 'model'}/{node.op_type}"
        node.name = base if seen[base] == 0 else f"{base}_{seen[base]}"
        seen[base] += 1


def op_census(proto) -> dict[str, int]:
    """Count of nodes per op type."""
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))
