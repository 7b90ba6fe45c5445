"""Precision policy in model terms, mapped to ONNX nodes.

invpt-export names every node ``<module path>/<OpType>[_k]``, so a model term such as "decoder
attention scores" or "normals head" is a pattern over node names. A policy is a named set of terms
(and op types) kept in high precision; everything else gets the low precision (FP16) or, for the
quantizable op types Conv/MatMul/Gemm, INT8 Q/DQ.

Terms (``invpt-quantize --list-terms`` prints them with node counts for a given model):

* ``backbone.patch_embed``, ``backbone.block.<i>``: ViT pieces;
* ``backbone.attention_scores``: q@k^T, scale, softmax and attn@v of every ViT block;
* ``decoder.attention_scores``: the same for the InvPT stages plus the ``fuse_attn`` message fusion and the
  message upsampling (pre-softmax scores flow across stages, so error compounds there);
* ``decoder.preliminary``, ``decoder.scale_embed``, ``decoder.mix_proj``, ``decoder.stage<i>``,
  ``decoder.aggregation``: decoder pieces;
* ``head.<task>``: ``mt_proj`` and the final 1x1 conv of one task (e.g. ``head.normals``);
* ``op.<OpType>``: every node of one op type (``op.LayerNormalization``, ``op.Softmax``, ``op.Resize``).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from invpt.errors import ConfigError
from invpt.onnx_summary import GraphSummary

_logger = logging.getLogger(__name__)

QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")
_DEC = r"multi_task_decoder"
_STAGE = _DEC + r"\.invpt\.invpt_stages\.{i}"


def term_patterns(tasks: Sequence[str], depth: int) -> dict[str, str]:
    """Every model term -> regex over node names, for a model with ``tasks`` and a ViT of ``depth`` blocks."""
    terms = {
        "backbone.patch_embed": r"^backbone\.(patch_embed|pos_embed|cls_token)|^backbone/",
        **{f"backbone.block.{i}": rf"^backbone\.blocks\.{i}[./]" for i in range(depth)},
        "backbone.attention_scores": r"^backbone\.blocks\.\d+\.attn/(MatMul|Mul|Softmax|Div)",
        "decoder.attention_scores": rf"^{_DEC}\.invpt\.invpt_stages\.\d\.blocks\.0\.attn(\.fuse_attn)?/"
                                    r"(MatMul|Mul|Softmax|Conv|Resize|Concat|Transpose|Reshape|Slice)",
        "decoder.preliminary": rf"^{_DEC}\.(preliminary_decoder|intermediate_head)\.",
        "decoder.scale_embed": rf"^{_DEC}\.scale_embed\.",
        "decoder.mix_proj": rf"^{_DEC}\.invpt\.mix_proj\.",
        **{f"decoder.stage{i}": "^" + _STAGE.format(i=i) + r"[./]" for i in range(3)},
        "decoder.aggregation": rf"^{_DEC}\.invpt\.(norm_mts|redu_chan)\.",
        **{f"head.{t}": rf"^({_DEC}\.invpt\.mt_proj\.{t}|heads\.{t})[./]" for t in tasks},
    }
    return terms


# Blocks the sensitivity analysis toggles one at a time (every quantizable node belongs to exactly one).
def block_terms(tasks: Sequence[str], depth: int) -> list[str]:
    return (["backbone.patch_embed"] + [f"backbone.block.{i}" for i in range(depth)]
            + ["decoder.preliminary", "decoder.scale_embed", "decoder.mix_proj", "decoder.stage0", "decoder.stage1",
               "decoder.stage2", "decoder.aggregation"] + [f"head.{t}" for t in tasks])


@dataclass(frozen=True)
class Policy:
    """A named precision policy: model terms and op types kept in high precision (FP32)."""

    name: str
    description: str
    keep_terms: tuple[str, ...]
    keep_op_types: tuple[str, ...]


FP16_POLICIES = {
    "default": Policy("default", "FP32 for LayerNorm, Softmax and the attention-score path (ViT and InvPT); "
                      "FP16 elsewhere. I/O stays FP32.", ("backbone.attention_scores", "decoder.attention_scores"),
                      ("LayerNormalization", "Softmax")),
    "layernorm-only": Policy("layernorm-only", "FP32 for LayerNorm only (fastest; watch the attention scores).",
                             (), ("LayerNormalization",)),
}
INT8_POLICIES = {
    "default": Policy("default", "INT8 Q/DQ on Conv/MatMul/Gemm (per-channel weights) except the attention-score "
                      "path (q@k^T, attn@v, fuse_attn); LayerNorm, Softmax and Resize are never quantized.",
                      ("backbone.attention_scores", "decoder.attention_scores"), ()),
    "backbone-only": Policy("backbone-only", "INT8 only in the ViT backbone (outside its attention scores); the whole "
                            "InvPT decoder and the heads stay in high precision.",
                            ("backbone.attention_scores", "decoder.attention_scores", "decoder.preliminary",
                             "decoder.scale_embed", "decoder.mix_proj", "decoder.stage0", "decoder.stage1",
                             "decoder.stage2", "decoder.aggregation", "head.*"), ()),
}


def get_policy(precision: str, name: str) -> Policy:
    table = FP16_POLICIES if precision == "fp16" else INT8_POLICIES
    if name not in table:
        raise ConfigError(f"Unknown {precision} policy '{name}'. Policies: {', '.join(table)}.")
    return table[name]


@dataclass
class NodeSelection:
    """Which nodes a policy keeps in high precision, and why (term -> node names)."""

    policy: Policy
    extra_terms: tuple[str, ...]
    kept: dict[str, list[str]]

    @property
    def kept_nodes(self) -> list[str]:
        return sorted({n for names in self.kept.values() for n in names})

    def to_dict(self) -> dict:
        return {
            "name": self.policy.name,
            "description": self.policy.description,
            "keep_terms": list(self.policy.keep_terms) + list(self.extra_terms),
            "keep_op_types": list(self.policy.keep_op_types),
            "kept_node_counts": {k: len(v) for k, v in self.kept.items()},
            "kept_nodes": self.kept_nodes,
        }


def graph_nodes(onnx_path: str | os.PathLike) -> list[tuple[str, str]]:
    """(name, op_type) of every node, without loading weights."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return [(n.name, n.op_type) for n in proto.graph.node]


def resolve_terms(terms: Iterable[str], nodes: Sequence[tuple[str, str]], tasks: Sequence[str], depth: int) -> dict[str, list[str]]:
    """Expand model terms (``head.*`` style globs and ``op.<Type>`` allowed) into node names; unknown terms error."""
    patterns = term_patterns(tasks, depth)
    out: dict[str, list[str]] = {}
    for term in terms:
        if term.startswith("op."):
            op = term[3:]
            out[term] = [n for n, t in nodes if t == op]
            continue
        matched_terms = [k for k in patterns if re.fullmatch(term.replace(".", r"\.").replace("*", ".*"), k)]
        if not matched_terms:
            raise ConfigError(
                f"Unknown model term '{term}'. Terms: {', '.join(patterns)}, or op.<OpType> (e.g. op.Resize)."
            )
        for k in matched_terms:
            rx = re.compile(patterns[k])
            out[k] = [n for n, _ in nodes if rx.search(n)]
    return out


def select_nodes(onnx_path: str | os.PathLike, precision: str, policy_name: str, extra_terms: Sequence[str],
                 tasks: Sequence[str], depth: int, *, summary: Optional[GraphSummary] = None) -> NodeSelection:
    """Apply a policy plus ``extra_terms`` to a graph: the high-precision node set, grouped by reason.

    The selection needs only the node names and op types: ``summary`` is ``onnx_path``'s
    :class:`~invpt.onnx_summary.GraphSummary` when the caller holds it (the file is then not read; a caller holding
    the graph's ``ModelProto`` passes ``GraphSummary.from_proto(proto)``).
    """
    policy = get_policy(precision, policy_name)
    nodes = list(summary.nodes) if summary is not None else graph_nodes(onnx_path)
    kept = resolve_terms(list(policy.keep_terms) + list(extra_terms), nodes, tasks, depth)
    for op in policy.keep_op_types:
        kept[f"op.{op}"] = [n for n, t in nodes if t == op]
    for term, names in kept.items():
        _logger.debug("policy %s keeps %d node(s) for %s", policy.name, len(names), term)
    unnamed = [n for n, _ in nodes if "/" not in n]
    if len(unnamed) > len(nodes) // 2:
        _logger.warning("most nodes of %s carry no module path (not exported by invpt-export?); model terms will "
                        "match little", onnx_path)
    return NodeSelection(policy, tuple(extra_terms), kept)


def exact_name_regexes(names: Iterable[str]) -> list[str]:
    """Anchored regexes matching exactly these node names (ModelOpt takes regexes)."""
    return [f"^{re.escape(n)}$" for n in names]


def quantizable_nodes(nodes: Sequence[tuple[str, str]], excluded: Optional[Iterable[str]] = None) -> list[str]:
    """Conv/MatMul/Gemm nodes not in ``excluded``."""
    skip = set(excluded or ())
    return [n for n, t in nodes if t in QUANTIZABLE_OPS and n not in skip]
