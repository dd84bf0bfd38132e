"""spattn as a Hugging Face transformers attention implementation.

    import spattn.integrations.transformers as spattn_hf     # registers "spattn"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="spattn")
    print(spattn_hf.describe(model))                          # the pattern of every layer

Importing this module registers two functions with transformers under the name
``"spattn"``: :func:`spattn_attention_forward` in its ``AttentionInterface`` (what
every attention layer calls) and :func:`spattn_mask` in its ``AttentionMaskInterface``
(what the model calls once per forward to build the mask of each layer type).

The mask function builds no dense mask. It returns a :class:`SpattnMask`: the query and
key positions of the call (transformers' cache indices), the padding of each row and the
packed-sequence ids, read from what transformers hands its mask functions. The attention
function then runs the layer's pattern, derived from the model's config
(:func:`layer_pattern`) or chosen by the user (:func:`set_patterns`), conjoined with
``k >= first[b]`` for a left padding, ``keep[k]`` for any other padding and ``same(seg)``
for packed sequences; all of these
enter as runtime inputs of the pattern, so a pattern compiles once however the padding,
the lengths or the cache offsets change.

Positions: inside a pattern ``k`` is the index of the key in the key tensor transformers
passes for that layer (its KV-cache slot) and ``q`` the slot of the query's own key; a
runtime input ``pos`` (supplied by the adapter to patterns that index it) holds each
slot's position in its sequence, i.e. transformers' cache index less the row's left
padding (for packed sequences: the position id).
"""
from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Mapping

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as _fwad

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:                      # the optional extra is not installed
    raise ImportError("spattn.integrations.transformers needs transformers >= 5.0: "
                      "pip install 'spattn[hf]'") from e

from ..dsl.errors import SpattnDenseMaskWarning, SpattnError, SpattnInputError, SpattnParamError
from ..pattern import BACKENDS, Pattern, compile as _compile
from ..runtime.api import MAX_HEAD_DIM as _MAX_D, MIN_HEAD_DIM as _MIN_D
from ..runtime import decode as _decode

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"spattn.integrations.transformers needs transformers >= 5.0, found "
                      f"{transformers.__version__}: pip install 'spattn[hf]'")

__all__ = ["NAME", "LayerPattern", "SpattnMask", "spattn_attention_forward", "spattn_mask",
           "layer_pattern", "layer_patterns", "set_patterns", "describe", "plan_call",
           "with_sinks"]

#: The ``attn_implementation`` name this module registers.
NAME = "spattn"

#: The keywords under which a layer passes attention sinks: one learned logit per query head
#: that joins every row's softmax without a value (GPT-OSS's ``s_aux``).
SINK_KWARGS = ("s_aux", "sinks")

#: Runtime inputs the adapter supplies to a pattern that indexes them (name -> index dims).
SUPPLIED_INPUTS = {"pos": 1}

#: Keyword arguments of transformers' attention call that change the attention itself and
#: that spattn cannot honour: passing one (not None) is an error rather than ignored.
_UNSUPPORTED_KWARGS = {
    "head_mask": "a head mask",
    "block_indices": "block-sparse indices of another attention backend",
    "indices": "sparse indices of another attention backend",
}

# Canonical "what the mask allows" kinds, shared by the config side and the mask side.
_KIND_TEXT = {
    "causal": lambda: "causal",
    "full": lambda: "full (bidirectional)",
    "sliding": lambda w: f"a causal sliding window of {w} keys",
    "local": lambda w: f"a bidirectional window of {w} keys on each side",
    "chunked": lambda c: f"causal chunks of {c} positions",
}


def _kind_text(kind) -> str:
    return "unreadable" if kind is None else _KIND_TEXT[kind[0]](*kind[1:])


def _kind_source(kind) -> str:
    """The spattn pattern of a mask kind, with transformers' exact bounds.

    transformers' sliding window keeps ``q - W < k <= q`` (``sliding_window_overlay`` and
    ``causal_mask_function``): ``window(W)``, which holds W keys, the query's own included.
    Its bidirectional window keeps ``abs(q - k) <= W``: ``local(W, W)``. Its chunks are
    ``(k - left_padding) // C == (q - left_padding) // C`` (``chunked_overlay``), that is
    ``pos[q] // C == pos[k] // C`` with ``pos`` the position less the row's left padding.
    """
    name = kind[0]
    if name == "causal":
        return "causal"
    if name == "full":
        return "full"
    if name == "sliding":
        return f"causal & window({kind[1]})"
    if name == "local":
        return f"local({kind[1]}, {kind[1]})"
    return f"causal & pos[q] // {kind[1]} == pos[k] // {kind[1]}"     # chunked


# ------------------------------------------------------------------ patterns per layer

@dataclass(frozen=True)
class LayerPattern:
    """The pattern one attention layer runs, before padding and packing are conjoined.

    Attributes:
        layer_idx: the layer's index (``module.layer_idx``, or its number in the model's
            order where no module has one); None for a module without one in a model whose
            other layers have one (a vision-language model's vision tower), which
            :func:`set_patterns` reaches by its module path.
        layer_type: the config's ``layer_types`` entry (``"full_attention"``,
            ``"sliding_attention"``, ``"chunked_attention"``), or what transformers infers
            without one (``sliding_window`` set: sliding; ``attention_chunk_size``: chunked).
        pattern: the compiled pattern (``q``, ``k`` are KV-cache slots; ``pos`` positions).
        origin: ``"config"`` (derived from the config) or ``"override"`` (:func:`set_patterns`).
        detail: the config fields a derived pattern comes from (``"sliding_window=4096"``).
        mask_kind: the mask transformers must build for this layer, ``("causal",)``,
            ``("sliding", W)``, ``("chunked", C)``, ``("full",)`` or ``("local", W)``;
            checked at every call. None for an override, which decides on its own.
    """
    layer_idx: int | None
    layer_type: str
    pattern: Pattern
    origin: str
    detail: str = ""
    mask_kind: tuple | None = None


#: (source, backend, score) -> Pattern: every base pattern and padding/packing variant,
#: compiled once per process (the kernels themselves are cached on disk by canonical source).
_PATTERNS: dict[tuple[str, str, str | None], Pattern] = {}


def _pattern(source: str, backend: str, score: str | None = None) -> Pattern:
    key = (source, backend, score)
    pat = _PATTERNS.get(key)
    if pat is None:
        pat = _PATTERNS[key] = _compile(source, backend=backend, score=score)
    return pat


def _score_expression(softcap) -> str | None:
    """The score modification for transformers' logit softcapping, None without one.

    The ``softcap`` a layer passes at call time (Gemma 2's ``attn_logit_softcapping``):
    transformers applies ``softcap * tanh(s / softcap)`` to the scaled scores before the
    mask, which is the prelude's ``softcap(c)`` score (docs/language.md, scores).
    """
    if softcap is None:
        return None
    c = float(softcap)
    if not c > 0 or c != c or c == float("inf"):
        raise SpattnError(f"attention logit softcapping softcap={softcap!r}: expected a "
                          "positive finite number")
    return f"softcap({c!r})"


def _layer_type(config, layer_idx: int | None) -> str:
    types = getattr(config, "layer_types", None)
    if types is not None:
        if layer_idx is None:
            raise SpattnError(f"an attention module without a layer_idx, in a model whose "
                              f"config.layer_types lists a type per layer ({len(types)} "
                              "entries): spattn cannot tell which entry is its own")
        if not 0 <= layer_idx < len(types):
            raise SpattnError(f"layer {layer_idx} has no entry in config.layer_types "
                              f"({len(types)} entries)")
        return types[layer_idx]
    if getattr(config, "sliding_window", None) is not None:
        return "sliding_attention"
    if getattr(config, "attention_chunk_size", None) is not None:
        return "chunked_attention"
    return "full_attention"


def _size(config, field: str, layer_idx: int, layer_type: str) -> int:
    value = getattr(config, field, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpattnError(f"layer {layer_idx} is a {layer_type} layer, but config.{field} is "
                          f"{value!r}: expected a positive int")
    return value


#: Layer types of hybrid models (an attention block beside a state-space one) whose
#: attention is one of the plain kinds: Falcon-H1's and Zaya's ``hybrid`` layers attend
#: causally to every earlier token, Inkling's ``hybrid`` and ``hybrid_sliding`` as ``full_attention``
#: and ``sliding_attention`` do (the masks transformers builds for them; a call checks
#: the mask it gets against the kind, so a model that masks otherwise is refused).
_TYPE_ALIASES = {"hybrid": "full_attention", "hybrid_sliding": "sliding_attention"}


def _config_kind(config, layer_idx: int, layer_type: str,
                 module_causal: bool = True) -> tuple[tuple, str]:
    """The mask kind transformers builds for a layer of this type, and the fields it reads.

    Bidirectional where the config says so (``config.is_causal = False``: transformers'
    mask builders then build full or bidirectional sliding masks) or the attention module
    does (``module.is_causal = False``: encoders such as BERT's, cross-attention), as
    SDPA's adapter reads it."""
    causal = getattr(config, "is_causal", True) is not False and module_causal is not False
    layer_type = _TYPE_ALIASES.get(layer_type, layer_type)
    if layer_type == "full_attention":
        return (("causal",) if causal else ("full",)), ""
    if layer_type == "sliding_attention":
        w = _size(config, "sliding_window", layer_idx, layer_type)
        return (("sliding", w) if causal else ("local", w)), f"sliding_window={w}"
    if layer_type == "chunked_attention":
        c = _size(config, "attention_chunk_size", layer_idx, layer_type)
        return ("chunked", c), f"attention_chunk_size={c}"
    raise SpattnError(
        f"layer {layer_idx} has layer type {layer_type!r}, which spattn does not map to a "
        "pattern (it maps full_attention, sliding_attention, chunked_attention, hybrid and "
        "hybrid_sliding); give the "
        f"layer a pattern with set_patterns(model, {{{layer_idx}: ...}})")


def layer_pattern(module) -> LayerPattern:
    """The :class:`LayerPattern` of one transformers attention module.

    Derived from ``module.config`` and ``module.layer_idx`` unless :func:`set_patterns`
    gave the layer an override. Raises :class:`SpattnError` for what spattn cannot run
    (an unknown layer type).
    """
    config, idx = module.config, _index(module)
    backend = getattr(module, "_spattn_backend", None) or "auto"
    layer_type = _layer_type(config, idx)
    _score_expression(getattr(config, "attn_logit_softcapping", None))    # checked
    override = getattr(module, "_spattn_override", None)
    if override is not None:
        return LayerPattern(idx, layer_type, _pattern(override.source, backend), "override")
    if _cross(module):
        # its keys are the encoder's, masked for padding only, whatever the decoder's
        # config says of its own layers (T5Gemma's cross-attention shares layer_idx and
        # layer_types with the decoder's self-attention)
        return LayerPattern(idx, "cross_attention", _pattern(_kind_source(("full",)), backend),
                            "config", "cross-attention: every encoder token", ("full",))
    kind, detail = _config_kind(config, idx, layer_type, getattr(module, "is_causal", True))
    return LayerPattern(idx, layer_type, _pattern(_kind_source(kind), backend), "config",
                        detail, kind)


def _cross(module) -> bool:
    """Whether ``module`` is a cross-attention layer: transformers names them
    ``...CrossAttention`` (T5Gemma, Mllama) or flags them ``is_cross_attention``."""
    return getattr(module, "is_cross_attention", False) is True \
        or "CrossAttention" in type(module).__name__


def _where(module) -> str:
    """A layer as a :func:`set_patterns` key: its index where no other layer has it, else
    its module path (quoted: an encoder-decoder's encoder, decoder and cross-attention
    layers share their indices)."""
    idx = _index(module)
    path = module.__dict__.get("_spattn_path")
    if idx is not None and not (path and module.__dict__.get("_spattn_shared")):
        return str(idx)
    return repr(path) if path else "?"


def _layer_of(module) -> LayerPattern:
    """:func:`layer_pattern` of ``module``, kept on the module for its config object: a
    layer's call reads it without the config's attribute reads (about 20 us per call in
    transformers 5). :func:`set_patterns` drops it; a config edited in place is caught by
    the check of the mask kind at every call (:func:`spattn_attention_forward`), which
    derives the pattern again before it refuses."""
    kept = module.__dict__.get("_spattn_layer")
    config = module.config
    if kept is not None and kept[0] is config:
        return kept[1]
    layer = layer_pattern(module)
    module.__dict__["_spattn_layer"] = (config, layer)
    return layer


def _index(module) -> int | None:
    """A layer's index: its ``layer_idx``, else the number :func:`_attention_modules` gave
    it (models that do not number their layers: DistilBERT, ViT), else None."""
    if _numbered(module):
        return module.layer_idx
    return module.__dict__.get("_spattn_index")


def _numbered(module) -> bool:
    """``module.layer_idx`` is an int (a bool is not a layer's number)."""
    idx = getattr(module, "layer_idx", None)
    return isinstance(idx, int) and not isinstance(idx, bool)


def _attention_modules(model) -> list:
    """The attention modules of a transformers model, by layer index.

    Modules named ``...Attention`` with a ``config``, each keeping its path in ``model``
    (``_spattn_path``, a :func:`set_patterns` key). Where any has an int ``layer_idx``:
    those, by index, then the innermost modules without one outside them whose config has
    no ``layer_types`` (a vision-language model's vision tower), in the model's order, with
    no index. Else the innermost ones (a wrapper holding another is left out), numbered in
    the model's order (DistilBERT, ViT: the number is kept on the module, as its index for
    :func:`set_patterns`)."""
    named = []
    for path, m in model.named_modules():
        if type(m).__name__.endswith("Attention") and hasattr(m, "config"):
            named.append(m)
            m.__dict__["_spattn_path"] = path
    ids = {id(m) for m in named}
    inner = [m for m in named if not any(id(c) in ids for c in m.modules() if c is not m)]
    numbered = [m for m in named if _numbered(m)]
    counts = Counter(m.layer_idx for m in numbered)
    for m in numbered:
        m.__dict__["_spattn_shared"] = counts[m.layer_idx] > 1
    if numbered:
        roots = tuple(m._spattn_path + "." for m in numbered)
        rest = [m for m in inner if not _numbered(m) and not m._spattn_path.startswith(roots)
                and getattr(m.config, "layer_types", None) is None]
        for m in rest:
            m.__dict__.pop("_spattn_index", None)
        return sorted(numbered, key=lambda m: m.layer_idx) + rest
    named = inner
    for i, m in enumerate(named):
        m.__dict__["_spattn_index"] = i
    if not named:
        raise SpattnError(f"found no attention module in {type(model).__name__}: spattn looks "
                          "for modules named '...Attention' with a config, as transformers' "
                          "models have")
    return named


def layer_patterns(model) -> list[LayerPattern]:
    """The :class:`LayerPattern` of every attention layer of ``model``, by layer index (a
    layer that ran keeps what it ran: a full-attention layer follows the causal or
    bidirectional mask transformers built)."""
    return _patterns_of(_attention_modules(model))


def _patterns_of(mods: list) -> list[LayerPattern]:
    out = []
    for m in mods:
        layer = _layer_of(m)
        if layer.layer_idx != _index(m):        # it ran before the modules were numbered
            layer = replace(layer, layer_idx=_index(m))
            m.__dict__["_spattn_layer"] = (m.config, layer)
        dense = m.__dict__.get("_spattn_dense")
        if dense and layer.origin != "override":
            layer = replace(layer, detail=f"ran transformers' dense mask: {dense}")
        out.append(layer)
    return out


def _override(key, value) -> Pattern:
    if isinstance(value, str):
        pat = _compile(value)
    elif isinstance(value, Pattern):
        pat = value
    else:
        raise SpattnParamError(f"the pattern for layer {key!r} must be a pattern source (str) "
                               f"or a spattn.Pattern, got {type(value).__name__}")
    extra = sorted(set(pat.inputs) - set(SUPPLIED_INPUTS))
    if extra:
        raise SpattnParamError(
            f"the pattern for layer {key!r} ({pat.source}) has runtime input"
            f"{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}, which the "
            f"transformers adapter cannot supply; it supplies "
            f"{', '.join(map(repr, SUPPLIED_INPUTS))} (the position of each key slot in its "
            "sequence)")
    for name, nd in pat.inputs.items():
        if nd != SUPPLIED_INPUTS[name]:
            raise SpattnParamError(f"the pattern for layer {key!r} indexes {name!r} with {nd} "
                                   f"indices; it is 1-D ({name}[q], {name}[k])")
    return pat


def set_patterns(model, patterns: Mapping | None = None, *,
                 backend: str | None = None) -> list[LayerPattern]:
    """Choose the pattern of some layers; the others keep the pattern of their config.

    Args:
        model: a transformers model (its attention modules are configured in place).
        patterns: ``{layer index, layer type or module path: pattern source or
            spattn.Pattern}``. A string that is not one of the model's layer types is a
            module path, with shell wildcards (``fnmatch``), matched against the attention
            modules' paths in ``model`` (``describe`` lists them where indices repeat or are
            missing: ``"model.vision_tower.*"``, ``"decoder.*.EncDecAttention"``). A path
            wins over an index, an index over a type (``{"sliding_attention": "causal &
            window(512)", 0: "causal"}``); of several paths matching one module, the last
            in the mapping. The patterns may index the runtime input ``pos`` (the position
            of a slot in its sequence) and no other; padding and packing are still added.
            ``None`` or ``{}`` returns every layer to its config's pattern.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for every layer (default: an
            override's own backend, else ``"auto"``).

    Returns the resulting :func:`layer_patterns`. Raises :class:`SpattnParamError` for an
    unknown layer index, a string that is neither a layer type nor matches a module path,
    or a pattern with inputs the adapter cannot supply; a source that does not compile
    raises its own :class:`SpattnError` (line, column, caret).
    """
    if backend is not None and backend not in BACKENDS:
        raise SpattnParamError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, "
                               f"got {backend!r}")
    mods = _attention_modules(model)
    types = {id(m): _layer_type(m.config, _index(m)) for m in mods}
    indices = sorted({i for i in map(_index, mods) if i is not None})
    by_index, by_type, by_path = {}, {}, {}
    for key, value in dict(patterns or {}).items():
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise SpattnParamError(f"set_patterns keys are layer indices (int), layer types or "
                                   f"module paths (str), got {type(key).__name__} {key!r}")
        if isinstance(key, int):
            if key not in indices:
                have = f"its layers are {indices[0]}..{indices[-1]}" if indices else \
                    "its attention modules have no index: name them by module path"
                raise SpattnParamError(f"{type(model).__name__} has no attention layer {key}; "
                                       f"{have}")
            by_index[key] = _override(key, value)
        elif key in types.values():
            by_type[key] = _override(key, value)
        elif any(fnmatchcase(m._spattn_path, key) for m in mods):
            by_path[key] = _override(key, value)
        else:
            known = ", ".join(map(repr, sorted(set(types.values()))))
            raise SpattnParamError(
                f"{type(model).__name__} has no layer of type {key!r} and no attention module "
                f"whose path matches it; its layer types are {known}, and its attention "
                f"modules' paths look like {mods[0]._spattn_path!r}")
    for m in mods:
        paths = [p for k, p in by_path.items() if fnmatchcase(m._spattn_path, k)]
        override = paths[-1] if paths else by_index.get(_index(m), by_type.get(types[id(m)]))
        m._spattn_override = override
        m._spattn_backend = backend or (override.backend if override is not None else None)
        m.__dict__.pop("_spattn_layer", None)
    return layer_patterns(model)


def describe(model) -> str:
    """A table of the pattern every attention layer of ``model`` runs, for a person (with
    each module's path where layer indices repeat, an encoder and a decoder, cross-attention,
    or are missing, a vision-language model's vision tower: ``-``)."""
    mods = _attention_modules(model)
    layers = _patterns_of(mods)
    indices = [lp.layer_idx for lp in layers]
    repeated = len(set(indices)) < len(layers) or None in indices
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    rows = [("layer", "type", "from", "pattern")]
    if repeated:
        rows = [("layer", "module", "type", "from", "pattern")]
    for m, lp in zip(mods, layers):
        origin = lp.origin + (f" ({lp.detail})" if lp.detail else "")
        where = (m._spattn_path or "(the model)",) if repeated else ()
        idx = "-" if lp.layer_idx is None else str(lp.layer_idx)
        rows.append((idx, *where, lp.layer_type, origin, lp.pattern.source))
    n = len(rows[0]) - 1
    widths = [max(len(r[i]) for r in rows) for i in range(n)]
    lines = [f"{type(model).__name__}: {len(layers)} attention layers, "
             f"attn_implementation={impl!r}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:n], widths)) + "  " + r[n] for r in rows]
    lines.append("q, k: key slots of the layer's KV cache; pos: a slot's position in its "
                 "sequence. Each call adds '& k >= first[b]' for a left padding, "
                 "'& keep[k] != 0' for any other padding, and "
                 "'& seg[k] == seg[q]' for packed sequences; a layer given T5's position_bias "
                 "scores 's + position_bias[h, q, k]'.")
    return "\n".join(lines)


# ------------------------------------------------------------------------ the mask side

def _closure(fn) -> dict:
    """The variables a function closes over, by name (empty cells left out)."""
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    out = {}
    for name, cell in zip(code.co_freevars if code is not None else (), cells):
        try:
            out[name] = cell.cell_contents
        except ValueError:
            pass
    return out


#: transformers' mask building blocks (``transformers.masking_utils``) that spattn reads:
#: qualified name -> (role, the closure variable that holds its argument).
_MASK_FUNCTIONS = {
    "and_masks.<locals>.and_mask": ("and", "mask_functions"),
    "or_masks.<locals>.or_mask": ("or", "mask_functions"),
    "blockwise_overlay.<locals>.inner_mask": ("blocks", "block_sequence_ids"),
    "causal_mask_function": ("causal", None),
    "bidirectional_mask_function": ("full", None),
    "sliding_window_overlay.<locals>.inner_mask": ("window", "sliding_window"),
    "sliding_window_bidirectional_overlay.<locals>.inner_mask": ("local", "sliding_window"),
    "chunked_overlay.<locals>.inner_mask": ("chunk", "chunk_size"),
    "packed_sequence_mask_function.<locals>.inner_mask": ("packed", "packed_sequence_mask"),
    "remap_positions_for_packed_sequence.<locals>.inner_mask": ("remap", "position_ids"),
}


def _function_name(f) -> str:
    module = getattr(f, "__module__", None) or "?"
    qual = getattr(f, "__qualname__", type(f).__name__)
    name = qual.split(".<locals>")[0] + (".<lambda>" if qual.endswith("<lambda>") else "")
    if module != "transformers.masking_utils":
        name = f"{module}.{name}"
    inner = _closure(f).get("mask_functions")
    if isinstance(inner, tuple):                  # and_masks / or_masks of other functions
        name += "(" + ", ".join(_function_name(g) for g in inner) + ")"
    return name


#: A block of a mask function as a spattn source fragment over key slots ``q``, ``k``
#: (differences of transformers' cache indices are differences of slots), for mask
#: functions with an ``or_masks`` (transformers' ``block_sequence_ids``: image tokens
#: that attend to their whole image, Gemma 3, PaliGemma).
_FRAGMENTS = {
    "causal": lambda _: "q >= k",
    "full": lambda _: "true",
    "window": lambda w: f"q - k < {int(w)}",                 # kv_idx > q_idx - W
    "local": lambda w: f"abs(q - k) <= {int(w)}",
    "chunk": lambda c: f"pos[q] // {int(c)} == pos[k] // {int(c)}",
    "blocks": lambda _: "blocks[q] == blocks[k] & blocks[q] >= 0",
}


def _read_mask_function(fn) -> tuple[tuple | None, torch.Tensor | None, torch.Tensor | None,
                                     tuple[str, ...], tuple | None]:
    """What a transformers mask function means: ``(kind, seg, position_ids, unreadable,
    blockwise)``.

    transformers builds a mask function as an ``and_masks`` of building blocks from
    ``masking_utils`` (causal, sliding window, chunks, packed sequences, whose positions
    may be remapped to the position ids), with an ``or_masks`` of a ``blockwise_overlay``
    where a model passes ``block_sequence_ids`` (tokens of one block, an image, attend to
    each other both ways). The blocks are read from the closures; any other function (an
    ``or_mask_function`` or ``and_mask_function`` a model adds, a block of another
    version) is listed in ``unreadable`` and the call is refused. ``kind`` is read from
    the base blocks (causal, window, chunk, full, local); ``blockwise`` is None, or, for a
    function with an ``or_masks`` or a blockwise block, ``(source, block ids [B, n])``: the
    whole function as a spattn source over key slots (the block ids read as
    ``blocks[q]``), packed sequences left to their conjunct.
    """
    terms: dict[str, object] = {}
    unreadable: list[str] = []

    def walk(f, top: bool) -> str | None:
        role = arg = None
        if getattr(f, "__module__", None) == "transformers.masking_utils":
            role, arg = _MASK_FUNCTIONS.get(getattr(f, "__qualname__", ""), (None, None))
        cells = _closure(f)
        if (role is None or (arg is not None and arg not in cells)
                or (role in terms and role not in ("and", "or"))
                or (role == "remap" and "mask_function" not in cells)
                or (role in ("packed", "remap") and not top)):
            unreadable.append(_function_name(f))
            return None
        if role in ("and", "or"):
            terms[role] = True
            before = len(unreadable)
            parts = [walk(g, top and role == "and") for g in cells[arg]]
            if role == "or" and len(unreadable) > before:
                del unreadable[before:]                 # name the union with its parts
                unreadable.append(_function_name(f))
            parts = [f"({p})" for p in parts if p is not None]
            return (" & " if role == "and" else " | ").join(parts) or None
        terms[role] = cells[arg] if arg is not None else True
        if role == "remap":
            return walk(cells["mask_function"], top)
        return None if role == "packed" else _FRAGMENTS[role](terms[role])

    expr = walk(fn, True)
    base = {name for name in terms if name in ("causal", "full", "window", "local", "chunk")}
    kind = None
    if base == {"causal"}:
        kind = ("causal",)
    elif base == {"full"}:
        kind = ("full",)
    elif base == {"causal", "window"}:
        kind = ("sliding", int(terms["window"]))
    elif base == {"full", "local"}:
        kind = ("local", int(terms["local"]))
    elif base == {"causal", "chunk"}:
        kind = ("chunked", int(terms["chunk"]))
    elif not unreadable:
        unreadable.append("a combination spattn does not know: "
                          + (" & ".join(sorted(base)) or "none"))
    if unreadable:
        return None, terms.get("packed"), terms.get("remap"), tuple(unreadable), None
    blockwise = None
    if "or" in terms or "blocks" in terms:
        if "remap" in terms:
            return None, terms.get("packed"), terms.get("remap"), (
                "an or_masks of sequences whose positions are remapped",), None
        blockwise = (expr, terms.get("blocks"))
    return kind, terms.get("packed"), terms.get("remap"), (), blockwise


class _MaskAsTensor(SpattnInputError, AttributeError):
    """A model read an attribute of its :class:`SpattnMask` as a tensor's (an AttributeError
    too)."""


class _MaskIndexed(SpattnInputError, TypeError):
    """A model indexed its :class:`SpattnMask`, or computed with it, as a tensor (a TypeError
    too)."""


def _as_tensor(what: str) -> str:
    return (f"the model {what} its attention mask as if it were a tensor, but with "
            "attn_implementation='spattn' transformers' mask is a SpattnMask, which describes "
            "the mask for spattn's kernels and holds no dense tensor: this model computes "
            "with its mask itself (a mask of its own, a sparse indexer), so its attention "
            "cannot run on spattn. Use attn_implementation='sdpa' or 'eager' for it")


class SpattnMask:
    """What transformers' mask builder knows about one forward call, for spattn.

    :func:`spattn_mask` returns one per layer type and forward call, in place of a dense
    mask; every layer of that type reads it. Positions are transformers' cache indices:
    query row ``i`` is at ``q_offset + i``, key slot ``j`` at ``kv_offset + j``.

    Attributes:
        batch_size, q_length, kv_length, q_offset, kv_offset: ints.
        kind: the mask transformers asked for (see :class:`LayerPattern`), None if unread.
        keep: bool ``[B, kv_length]``, False for a padding key; None when no key is padding
            or the padding is a left padding.
        first: int64 ``[B]``, the first real key slot of each row when every row's padding
            is a left padding (as in batched generation); None otherwise. Read-only: equal
            paddings share it.
        seg: int ``[B, kv_length]`` packed-sequence ids (equal ids: one sequence), or None.
        blockwise: the whole mask as a spattn source over key slots where transformers
            joined blocks with an ``or_masks`` (``block_sequence_ids``: an image's tokens
            attend to each other), else None; its base blocks give ``kind``.
        blocks: int ``[B, kv_length]`` block id of each key slot (``-1``: in no block),
            read as ``blocks[q]``, ``blocks[k]`` by ``blockwise``; or None.
        unreadable: the mask functions spattn could not read.
        dense: where some are unreadable, transformers' own dense mask of the call (what its
            ``sdpa_mask`` builds from the same functions, padding included), bool
            ``[B, q_length, kv_length]``, which the layers that follow their config run as
            the runtime input of ``allowed[q, k] != 0``; None otherwise (or where
            transformers could not build it either: the call is refused).
    """

    __slots__ = ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "kind", "keep",
                 "first", "seg", "unreadable", "blockwise", "blocks", "dense", "_position_ids",
                 "_left_padding", "_padding", "_device", "_pos", "_reach", "_repeats")

    #: transformers tells a prepared mask from a 2-D padding mask by ``ndim``: ``generate``
    #: with a static cache builds the masks before the forward, which passes them back to
    #: the mask builder (and so to :func:`spattn_mask`, which returns them unchanged).
    ndim = 4

    @property
    def shape(self) -> tuple:
        """``(B, 1, Lq, Lk)``, the shape of the dense mask it stands for: transformers'
        mask builders read the key length of a prepared mask from it where no cache gives
        one (an encoder's bidirectional mask under ``generate`` with a static cache)."""
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def __init__(self, *, batch_size, q_length, kv_length, q_offset, kv_offset, kind, keep,
                 seg, unreadable, first=None, position_ids=None, left_padding=None,
                 padding=None, device=None, blockwise=None, blocks=None, dense=None):
        self.batch_size, self.q_length, self.kv_length = batch_size, q_length, kv_length
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.kind, self.keep, self.seg, self.unreadable = kind, keep, seg, unreadable
        self.first = first
        self.blockwise, self.blocks, self.dense = blockwise, blocks, dense
        self._position_ids, self._left_padding, self._device = position_ids, left_padding, device
        self._padding = padding
        self._pos = self._reach = self._repeats = None

    def positions(self) -> torch.Tensor:
        """int64 ``[B, kv_length]``: each key slot's position in its sequence.

        The cache index less the row's left padding (transformers' chunk positions), or the
        position ids for packed sequences whose positions transformers remaps.
        """
        if self._pos is None:
            if self._position_ids is not None:
                self._pos = self._position_ids.to(torch.int64).expand(self.batch_size, -1)
            else:
                self._pos = self._positions(self.kv_offset, self.kv_length)
        return self._pos

    def _positions(self, first: int, length: int) -> torch.Tensor:
        pos = torch.arange(first, first + length, device=self._device).expand(self.batch_size, -1)
        if self._left_padding is not None:
            pos = pos - self._left_padding.to(pos.device)[:, None]
        return pos

    def __getattr__(self, name):
        # A model that reads its mask as a tensor (adds it to its scores, or builds a mask
        # of its own from it, as Doge does) cannot run with spattn: say so, as an
        # AttributeError still (hasattr and getattr with a default keep working).
        if name.startswith("__"):
            raise AttributeError(name)
        raise _MaskAsTensor(_as_tensor(f"reads attribute {name!r} of"))

    def __getitem__(self, index):
        raise _MaskIndexed(_as_tensor("indexes"))

    def _operand(self, *args, **kwargs):
        raise _MaskIndexed(_as_tensor("computes with"))

    # Python finds operators on the class, never through __getattr__ (Bloom adds its mask
    # to its scores); torch functions given the mask (torch.add, masked_fill) ask the
    # argument's __torch_function__
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = \
        __rtruediv__ = __matmul__ = __rmatmul__ = __and__ = __rand__ = __or__ = __ror__ = \
        __xor__ = __rxor__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = \
        __rpow__ = __invert__ = __neg__ = __pos__ = __abs__ = __lt__ = __le__ = __gt__ = \
        __ge__ = _operand

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise _MaskIndexed(_as_tensor(f"calls {getattr(func, '__name__', func)} on"))

    def __repr__(self):
        return (f"SpattnMask({_kind_text(self.kind)}, B={self.batch_size}, Lq={self.q_length}, "
                f"Lk={self.kv_length}, q_offset={self.q_offset}, kv_offset={self.kv_offset}, "
                f"padding={self.keep is not None or self.first is not None}, "
                f"packed={self.seg is not None})")


def spattn_mask(batch_size: int, q_length: int | None = None, kv_length: int | None = None,
                q_offset=0, kv_offset: int = 0, mask_function=None, attention_mask=None,
                cache_position=None, device=None, **kwargs) -> SpattnMask:
    """transformers' mask function for ``"spattn"``: a :class:`SpattnMask`, no dense mask.

    Called by ``create_causal_mask`` and its siblings with the query and key lengths and
    offsets of a layer type, its mask function and the 2-D padding mask
    ``attention_mask [B, past + Lq]`` (True: a real token). transformers versions that
    give the query positions as ``cache_position [Lq]`` instead of ``q_length`` and
    ``q_offset`` are read too.
    """
    if isinstance(attention_mask, SpattnMask):
        return _prepared(attention_mask, mask_function)
    if q_length is None:
        q_length = int(cache_position.shape[0])
        q_offset = int(cache_position[0]) if q_length else 0
        device = device if device is not None else cache_position.device
    q_offset = int(q_offset)                  # a 0-dim tensor with static caches
    kind, seg, position_ids, unreadable, blockwise = _read_mask_function(mask_function)
    blocks = None
    if blockwise is not None and blockwise[1] is not None:
        ids = blockwise[1]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 \
                or ids.shape[0] not in (1, batch_size):
            what = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            unreadable += (f"block_sequence_ids of shape {what}, not [B, L]",)
            kind = blockwise = None
        else:
            short = kv_offset + kv_length - ids.shape[-1]    # as maybe_pad_block_sequence_ids
            ids = F.pad(ids, (0, short), value=-1) if short > 0 else ids
            blocks = ids[:, kv_offset: kv_offset + kv_length].expand(batch_size, -1)
    keep = first = left_padding = padded = None
    if attention_mask is not None:
        am = attention_mask.to(torch.bool)
        device = am.device if device is None else device
        short = kv_offset + kv_length - am.shape[-1]
        # as transformers' prepare_padding_mask: keys past the 2-D mask are padding
        padded = F.pad(am, (0, short)) if short > 0 else am
        left_padding = (am.cumsum(-1) == 0).sum(-1)      # as create_chunked_causal_mask
        keep, first = _padding_form(padded[:, kv_offset: kv_offset + kv_length], left_padding,
                                    int(kv_offset))
    dense = None
    if unreadable and mask_function is not None:
        dense = _dense_mask(batch_size, q_length, kv_length, q_offset, int(kv_offset),
                            mask_function, attention_mask, device, kwargs)
    return SpattnMask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                      q_offset=q_offset, kv_offset=int(kv_offset), kind=kind, keep=keep,
                      first=first, seg=seg, unreadable=unreadable, position_ids=position_ids,
                      blockwise=None if blockwise is None else blockwise[0], blocks=blocks,
                      left_padding=left_padding,
                      padding=padded if keep is not None or first is not None else None,
                      device=device, dense=dense)


def _dense_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                attention_mask, device, kwargs) -> torch.Tensor | None:
    """transformers' own dense mask of a call whose mask functions spattn cannot read (a
    model's ``or_mask_function`` / ``and_mask_function``: EmbeddingGemma's bidirectional
    window, a function that returns True): bool ``[B, q_length, kv_length]``, True where a
    query may read a key, as ``sdpa_mask`` builds it for SDPA (every pair evaluated, padding
    included); None where transformers cannot build it either."""
    from transformers.masking_utils import sdpa_mask
    try:
        m = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                      q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                      attention_mask=attention_mask, allow_is_causal_skip=False,
                      allow_is_bidirectional_skip=False,
                      use_vmap=bool(kwargs.get("use_vmap", False)),
                      device=device if device is not None else "cpu")
    except Exception:       # (the refusal names the functions: transformers' error would not)
        return None
    if not isinstance(m, torch.Tensor) or m.is_floating_point() or m.is_complex() \
            or m.dim() != 4 or m.shape[1] != 1 or m.shape[2:] != (q_length, kv_length):
        return None             # (a function of ints and bools gives an int mask: taken)
    return m[:, 0].to(torch.bool).expand(batch_size, -1, -1)


#: The ``first [B]`` tensors of :func:`_padding_form`, by value and device: a batch decoding
#: token after token keeps its left padding, and so passes the same tensor at every step
#: (decode plans are keyed by their inputs' identity: one plan serves the whole generation).
_FIRSTS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
FIRSTS_KEPT = 64


def _padding_form(keep: torch.Tensor, left_padding: torch.Tensor, kv_offset: int):
    """``(keep, first)`` of the key slots' padding ``keep [B, Lk]`` (False: padding): both
    None when no key is padding; ``(None, first)`` when every row's padding is a left
    padding (its slots real from ``first[b]`` on, int64 ``[B]``, a tensor shared by equal
    paddings); else ``(keep, None)``. One read on the host."""
    Lk = keep.shape[-1]
    first = (left_padding.to(torch.int64) - kv_offset).clamp_(0, Lk)
    slots = torch.arange(Lk, device=keep.device)
    left = (keep == (slots >= first[:, None])).all()
    *firsts, is_left = torch.cat([first, left.view(1).to(torch.int64)]).tolist()
    if not is_left:
        return keep, None
    if not any(firsts):
        return None, None
    key = (keep.device, tuple(firsts))
    t = _FIRSTS.get(key)
    if t is None:
        t = _FIRSTS[key] = first
        while len(_FIRSTS) > FIRSTS_KEPT:
            _FIRSTS.popitem(last=False)
    else:
        _FIRSTS.move_to_end(key)
    return None, t


def _prepared(mask: SpattnMask, mask_function) -> SpattnMask:
    """A mask built ahead of the forward (by ``generate`` with a static cache, or by a
    vision-language model around its language model), checked against the forward's own
    kind; it is returned as it is, as transformers returns a prepared 4-D mask (with the
    image blocks a vision-language model or'd in)."""
    kind = _read_mask_function(mask_function)[0]
    if kind != mask.kind:
        raise SpattnError(
            f"the mask prepared before this forward is {_kind_text(mask.kind)}, but the model "
            f"asks for {_kind_text(kind)}: pass the 2-D padding mask instead of a prepared "
            "mask (generate() with a static cache prepares a causal one: a model configured "
            "as an encoder, such as BERT with is_decoder=False, generates with "
            "is_decoder=True or with a dynamic cache)")
    return mask


# ------------------------------------------------------------------- the attention side

def _check_mask(mask, module) -> SpattnMask:
    where = f"layer {_where(module)} ({type(module).__name__})"
    if isinstance(mask, SpattnMask):
        return mask
    if mask is None:
        raise SpattnError(
            f"{where} received no attention mask: transformers did not call spattn's mask "
            "function for this forward (a paged cache, or an attention module called on its "
            "own). spattn needs it for the query and key positions; call the model itself")
    if isinstance(mask, torch.Tensor):
        raise SpattnInputError(
            f"{where} received a prepared mask tensor of shape {tuple(mask.shape)}: spattn "
            "cannot read a dense mask as a pattern. Pass the 2-D padding mask attention_mask "
            "[B, L] (1: a token, 0: padding), and give other patterns with set_patterns()")
    raise SpattnInputError(f"{where} received an attention mask of type "
                           f"{type(mask).__name__}, not one built by spattn's mask function")


def _packed_from_cu_seqlens(cu_q, cu_k, mask: SpattnMask, Lq: int, Lk: int):
    """``seg``, ``pos [1, L]`` from the flash-attention style ``cu_seq_lens`` of one flat row."""
    cu_k = cu_k.to(torch.int64).flatten()
    ok = (mask.batch_size == 1 and Lq == Lk and mask.q_offset == mask.kv_offset
          and cu_k.numel() >= 2 and int(cu_k[0]) == 0 and int(cu_k[-1]) == Lk
          and bool((cu_k[1:] >= cu_k[:-1]).all())
          and (cu_q is None or torch.equal(cu_q.to(torch.int64).flatten().cpu(), cu_k.cpu())))
    if not ok:
        raise SpattnInputError(
            f"cu_seq_lens_k {cu_k.tolist()} does not describe this call (batch "
            f"{mask.batch_size}, Lq={Lq}, Lk={Lk}, cache offset {mask.q_offset}): spattn takes "
            "cu_seq_lens for one flattened row without a cache, starting at 0 and ending at "
            "the length, with cu_seq_lens_q equal to cu_seq_lens_k")
    j = torch.arange(Lk, device=cu_k.device)
    seg = torch.searchsorted(cu_k[1:], j, right=True)
    return seg[None], (j - cu_k[seg])[None]


def _check_reach(pattern: Pattern, mask: SpattnMask, num_heads: int) -> None:
    """Refuse a pattern that needs keys the layer's cache no longer holds.

    A sliding-window cache keeps the last ``sliding_window - 1`` keys (``kv_offset > 0``:
    the keys before position ``kv_offset`` are gone). A config's pattern never reaches them
    (transformers sizes the cache for it); an override might (a sink, a wider window), and
    would then run on the keys that are left. The dropped keys are evaluated as if present:
    tile classes first (EMPTY is a proof), the exact mask where a tile may be non-empty.
    """
    dropped = mask.kv_offset
    if dropped == 0:
        return
    B, Lq = mask.batch_size, mask.q_length
    inputs = {}
    if "pos" in pattern.inputs:
        inputs["pos"] = mask._positions(0, dropped + mask.kv_length)
    classes = pattern.tiles(Lq, dropped, Lq, dropped, num_heads=num_heads, batch=B,
                            q_offset=mask.q_offset, **inputs)
    if not bool(classes.any()):
        return
    reach = pattern.mask(Lq, dropped, num_heads=num_heads, batch=B, q_offset=mask.q_offset,
                         **inputs)
    if mask._padding is not None:
        reach = reach & mask._padding[:, None, None, :dropped].to(reach.device)
    if bool(reach.any()):
        raise SpattnError(
            f"the pattern {pattern.source} reaches keys this layer's cache has dropped: the "
            f"cache keeps {mask.kv_length - Lq} keys before the new ones, those before position "
            f"{dropped} are gone (a sliding-window cache holds sliding_window - 1 keys). Use a "
            "pattern within the layer's window, or a config whose window covers the pattern")


def _keys_up_to_query(ir) -> bool:
    """Whether a pattern's IR allows no key past its query (``k <= q`` for every allowed
    pair): a conjunct of it reads ``q - k >= c`` with ``c >= 0`` (causal, sliding windows,
    chunks, any ``causal & ...``). A structural proof, so False may also mean "not shown"."""
    from ..ir.nodes import And, Range, Var
    for c in (ir.args if isinstance(ir, And) else (ir,)):
        if not isinstance(c, Range) or not hasattr(c.x, "terms") or len(c.x.terms) != 2:
            continue
        coeff = {t.name: a for t, a in c.x.terms if isinstance(t, Var)}
        if coeff == {"q": 1, "k": -1} and c.lo is not None and c.lo - c.x.const >= 0:
            return True
        if coeff == {"q": -1, "k": 1} and c.hi is not None and c.hi - c.x.const <= 0:
            return True
    return False


def _reach_padding(mask: SpattnMask):
    """``(keep, first)`` of the padding of the key slots a pattern with ``k <= q`` can reach
    (up to the last query's slot), or None where that is every slot. A static cache hands
    every layer all its slots, those past the tokens written so far marked as padding; read
    up to the queries, its padding is a left padding again (``first[b]``: one plan per
    generation, where ``keep[k]`` would be a new input at every token). Once per mask."""
    if mask._reach is None:
        reach = mask.q_offset + mask.q_length - mask.kv_offset
        form = ()
        if mask._padding is not None and 0 < reach < mask.kv_length:
            lo = mask.kv_offset
            form = _padding_form(mask._padding[:, lo:lo + reach], mask._left_padding, lo)
            if form[0] is not None:
                form = ()           # holes: keep[k] over every slot, as the mask has it
        mask._reach = form
    return mask._reach or None


def _with_conjuncts(base: Pattern, keep: bool, seg: bool, first: bool = False) -> Pattern:
    if not (keep or seg or first):
        return base
    src = f"({base.source})" + (" & keep[k]" if keep else "") \
        + (" & k >= first[b]" if first else "") + (" & same(seg)" if seg else "")
    return _pattern(src, base.backend)


def _check_sizes(mask: SpattnMask, Lq: int, Lk: int) -> None:
    """The layer's queries and keys are the ones transformers sized the mask for."""
    if (Lq, Lk) != (mask.q_length, mask.kv_length):
        kind = mask.kind or ()
        hint = ""
        if len(kind) == 2 and kind[0] in ("sliding", "chunked") and kind[1] == 1:
            hint = (f"; with {'sliding_window' if kind[0] == 'sliding' else 'attention_chunk_size'}"
                    "=1, transformers' cache keeps every key while its mask announces one: "
                    "use a window of 2 or more, or a static cache")
        raise SpattnInputError(
            f"queries ({Lq}) and keys ({Lk}) do not match the mask transformers sized for "
            f"Lq={mask.q_length}, Lk={mask.kv_length} (the cache returned more or fewer keys "
            f"than it announced{hint})")


def plan_call(base: Pattern, mask: SpattnMask, Lq: int, Lk: int, *, cu_seq_lens_q=None,
              cu_seq_lens_k=None) -> tuple[Pattern, dict, int]:
    """What one attention call runs: ``(pattern, runtime inputs, q_offset)``.

    ``base`` is the layer's pattern; padding adds ``keep[k]`` (``keep [B, Lk]``), packed
    sequences add ``same(seg)`` (``seg [B, Lk]``; from the mask transformers built, else
    from flash-attention style ``cu_seq_lens``), and ``pos [B, Lk]`` is supplied when the
    pattern indexes it. ``q_offset`` places query row 0 on its own key slot,
    ``q_offset - kv_offset`` in transformers' terms: with a static cache the keys run past
    the queries, and with a sliding-window cache slot 0 is not position 0.
    """
    q_offset = mask.q_offset - mask.kv_offset
    if _cacheless_full(mask, Lq, Lk) and "pos" not in base.inputs:
        q_offset = Lk - Lq              # the cache's keys, the queries the newest of them
    else:
        _check_sizes(mask, Lq, Lk)
    seg, pos = mask.seg, None
    if seg is None and cu_seq_lens_k is not None:
        seg, pos = _packed_from_cu_seqlens(cu_seq_lens_q, cu_seq_lens_k, mask, Lq, Lk)
    keep, first = mask.keep, mask.first
    if keep is not None and _keys_up_to_query(base.ir):
        keep, first = _reach_padding(mask) or (keep, first)
    pat = _with_conjuncts(base, keep is not None, seg is not None, first is not None)
    inputs = {}
    if keep is not None:
        inputs["keep"] = keep
    if first is not None:
        inputs["first"] = first
    if seg is not None:
        inputs["seg"] = seg
    if "pos" in pat.inputs:
        inputs["pos"] = pos if pos is not None else mask.positions()
    if "blocks" in pat.inputs:
        inputs["blocks"] = mask.blocks
    return pat, inputs, q_offset


def _cacheless_full(mask: SpattnMask, Lq: int, Lk: int) -> bool:
    """A bidirectional mask without padding that transformers sized for the call's queries
    alone while the layer reads more keys from a cache: an encoder's (BERT with
    ``is_decoder=False``) under ``generate``, whose mask builder is not given the cache.
    Such a mask allows every key of any length, as eager reads it (no mask)."""
    return (mask.kind == ("full",) and Lk > Lq == mask.q_length == mask.kv_length
            and mask.q_offset == mask.kv_offset == 0 and mask.keep is None
            and mask.first is None and mask.seg is None and mask.blockwise is None
            and mask.dense is None and not mask.unreadable)


def spattn_attention_forward(module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, softcap: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention function for ``attn_implementation="spattn"``.

    ``query [B, Hq, Lq, D]``, ``key`` and ``value [B, Hk, Lk, D]`` (``Hq % Hk == 0``:
    grouped-query attention runs without repeating k and v), ``attention_mask`` the
    :class:`SpattnMask` of the layer's type. Returns ``(attn_output [B, Lq, Hq, D], None)``
    as transformers' attention functions do (no attention weights are formed).
    """
    if type(attention_mask) is SpattnMask and attention_mask._repeats is not None:
        out = _repeated(module, query, key, value, attention_mask, dropout, scaling, softcap,
                        kwargs)
        if out is not None:
            return out, None
    if dropout:
        raise SpattnError(
            f"attention dropout {dropout} (layer {_where(module)}): spattn "
            "has no dropout; call model.eval(), or set config.attention_dropout = 0.0 to train")
    score = _score_expression(softcap)
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise SpattnError(f"layer {_where(module)} passes {name}= "
                              f"({what}), which spattn does not support")
    if kwargs.get("output_attentions"):
        warnings.warn("attn_implementation='spattn' forms no attention weights, so "
                      "output_attentions returns none; attn_implementation='eager' returns "
                      "them", stacklevel=2)
    if attention_mask is None and _bidirectional(module):
        return _unmasked(module, query, key, value, scaling, score, kwargs)
    mask = _check_mask(attention_mask, module)
    layer = _layer_of(module)
    if mask.unreadable and layer.origin != "override":
        return _dense(module, layer, mask, query, key, value, scaling, score, kwargs)
    if layer.mask_kind is not None and layer.mask_kind != mask.kind:
        module.__dict__.pop("_spattn_layer", None)      # the config may have changed
        layer = _layer_of(module)
        if _direction_only(layer.mask_kind, mask.kind) or _inferred(module.config, mask):
            layer = _as_masked(module, layer, mask.kind)
    if layer.mask_kind is not None and layer.mask_kind != mask.kind:
        at = _where(module)
        raise SpattnError(
            f"layer {at} ({layer.layer_type}): transformers masks this layer as "
            f"{_kind_text(mask.kind)}, but its pattern from the config "
            f"({layer.detail or layer.layer_type}) is {layer.pattern.source}: the model does "
            "not build its masks from the config as spattn expects. Give the layer its "
            f"pattern with set_patterns(model, {{{at}: ...}})")
    base = layer.pattern
    if mask.blockwise is not None and layer.mask_kind is not None:
        base = _pattern(mask.blockwise, base.backend)   # the config's blocks, or'd with blocks
    try:
        if layer.mask_kind is None:
            _check_reach(layer.pattern, mask, query.shape[1])
        pat, inputs, q_offset = plan_call(base, mask, query.shape[2], key.shape[2],
                                          cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
                                          cu_seq_lens_k=kwargs.get("cu_seq_lens_k"))
    except SpattnError as e:
        raise type(e)(f"layer {_where(module)}: {e}") from None
    if q_offset == key.shape[2] - query.shape[2]:
        q_offset = None             # bottom-right, the default: the calls' fast entries take it
    out = _run(module, pat, score, query, key, value, scaling, q_offset, inputs, kwargs)
    if score is None and query.is_cpu and not mask.unreadable:
        _remember(mask, layer, pat, query, key, value, scaling, q_offset, inputs, kwargs)
    return out


#: The keywords of a layer's call that the attention function reads (beside ``dropout``,
#: ``scaling``, ``softcap`` and ``output_attentions``): a call repeated from the forward's
#: memo passes each as None (anything else, ``False`` too, is the full path's to judge).
_READ_KWARGS = ("position_bias", "cu_seq_lens_q", "cu_seq_lens_k", *SINK_KWARGS,
                *_UNSUPPORTED_KWARGS)


def _reads_none(kwargs) -> bool:
    """The call passes each keyword of :data:`_READ_KWARGS` as None (or not at all) and
    ``output_attentions`` as None or False: the keywords change nothing the memo kept."""
    for name in _READ_KWARGS:
        if kwargs.get(name) is not None:
            return False
    shown = kwargs.get("output_attentions")
    return shown is None or shown is False


def _remember(mask: SpattnMask, layer: LayerPattern, pat: Pattern, query, key, value,
              scaling, q_offset, inputs: dict, kwargs) -> None:
    """Keep in ``mask`` (one forward's, shared by the layers of its type) the one kernel
    call that this layer's CPU decode step made (:func:`spattn.runtime.decode.one_call`),
    for the layers after it: every input of that call is then fixed by the mask, the
    layer's pattern and the tensors' shapes, so :func:`_repeated` checks those and makes
    the call. A decode step's other layers otherwise pay the path from the mask to the
    kernel again (about 60-130 us of Python on a 2-core VM after the previous layer has
    evicted the caches, against a 700 us step; docs/integrations.md, "A forward's layers
    repeat one kernel call")."""
    if not _reads_none(kwargs) or _runnable(pat, None, query, value) is not pat:
        return
    one = _decode.one_call(pat, query, key, value, scaling, inputs, q_offset)
    if one is None:
        return
    a, z, m, scale = one
    B, Hq, Lq, D = query.shape
    Hk = key.shape[1]
    rows = None if Hq == Hk else (B, Hk, Hq // Hk * Lq, D)
    held = tuple((t, t._version) for t in inputs.values() if isinstance(t, torch.Tensor))
    if mask._repeats is None:
        mask._repeats = {}
    mask._repeats[id(layer.pattern)] = (layer.pattern, layer.mask_kind, query.shape,
                                        key.shape, query.dtype, scaling, held,
                                        None if a == 0 and z == key.shape[2] else (a, z),
                                        m, scale, rows)


_TENSOR = torch.Tensor
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_any_autocast = torch._C._is_any_autocast_enabled
_transforms_active = torch._C._are_functorch_transforms_active
_is_compiling = torch.compiler.is_dynamo_compiling
_sdpa = F.scaled_dot_product_attention


def _repeated(module, query, key, value, mask: SpattnMask, dropout, scaling, softcap,
              kwargs) -> torch.Tensor | None:
    """The output ``[B, Lq, Hq, D]`` of a layer whose call repeats one that
    :func:`_remember` kept in this forward's ``mask``: the same pattern, the tensors'
    shapes and dtype, CPU tensors of the exact type ``torch.Tensor`` with a unit last
    stride, none requiring grad, no keyword the full path reads, autocast, forward-mode AD
    and torch.func transforms off, not traced, the runtime inputs unchanged: the kernel call
    the full path would make, made here. Else None (the full path). The checks sit in this
    one frame: it runs from caches the previous layer evicted."""
    if _is_compiling() or dropout or softcap is not None:
        return None
    kept = module.__dict__.get("_spattn_layer")
    if kept is None or kept[0] is not module.config:
        return None
    layer = kept[1]
    entry = mask._repeats.get(id(layer.pattern))
    if entry is None:
        return None
    pattern, kind, qs, ks, dt, sc, held, run, m, scale, rows = entry
    if pattern is not layer.pattern or kind != layer.mask_kind or scaling != sc:
        return None
    T = _TENSOR
    if type(query) is not T or type(key) is not T or type(value) is not T or _any_autocast() \
            or _transforms_active() or _fwad._current_level >= 0 or _wrapped(query) \
            or _wrapped(key) or _wrapped(value):
        return None
    if query.shape != qs or key.shape != ks or value.shape != ks or query.dtype is not dt \
            or key.dtype is not dt or value.dtype is not dt or not query.is_cpu \
            or not key.is_cpu or not value.is_cpu or query.requires_grad \
            or key.requires_grad or value.requires_grad or query.stride(-1) != 1 \
            or key.stride(-1) != 1 or value.stride(-1) != 1 or not query.is_contiguous() \
            or query.is_neg() or key.is_neg() or value.is_neg():
        return None
    if not _reads_none(kwargs):
        return None
    for t, version in held:
        if t._version != version:
            return None
    if run is not None:
        key, value = key[:, :, run[0]:run[1]], value[:, :, run[0]:run[1]]
    if rows is None:
        o = _sdpa(query, key, value, m, scale=scale)
    else:
        o = _sdpa(query.reshape(rows), key, value, m, scale=scale).view(qs)
    return o.transpose(1, 2).contiguous()


def _run(module, pat: Pattern, score: str | None, query, key, value, scaling, q_offset,
         inputs: dict, kwargs) -> tuple[torch.Tensor, None]:
    """The layer's call of ``pat`` with its score (softcapping, T5's position bias) and
    attention sinks: ``(attn_output [B, Lq, Hq, Dv], None)``."""
    score = _with_bias(module, score, kwargs.get("position_bias"), query, key, inputs,
                       q_offset)
    pat = _runnable(pat, score, query, value)
    sinks = _sink_logits(module, kwargs, query.shape[1])
    if sinks is None:
        out = pat(query, key, value, scale=scaling, q_offset=q_offset, **inputs)
    else:
        out, lse = pat(query, key, value, scale=scaling, q_offset=q_offset, return_lse=True,
                       **inputs)
        out = with_sinks(out, lse, sinks)
    return out.transpose(1, 2).contiguous(), None


_CAUSAL_OR_FULL = {("causal",), ("full",)}


def _direction_only(a: tuple | None, b: tuple | None) -> bool:
    """Mask kinds ``a`` and ``b`` differ in direction alone: causal and full, or a causal
    sliding window and a bidirectional one of the same size."""
    if {a, b} == _CAUSAL_OR_FULL:
        return True
    return a is not None and b is not None and {a[0], b[0]} == {"sliding", "local"} \
        and a[1:] == b[1:]

#: The pattern of a layer that runs transformers' dense mask (:attr:`SpattnMask.dense`).
DENSE_SOURCE = "allowed[q, k] != 0"


def _dense(module, layer: LayerPattern, mask: SpattnMask, query, key, value, scaling, score,
           kwargs):
    """A layer whose mask transformers built from functions spattn cannot read runs
    transformers' own dense mask of the call as a runtime input (``allowed [B, Lq, Lk]``,
    query row ``i`` at position ``i``): the answer SDPA gives, with no tile skipped that the
    mask does not empty. Warned once per module and functions; :func:`set_patterns` gives
    the layer a pattern spattn compiles instead (the padding is then added as usual)."""
    if mask.dense is None:
        raise SpattnError(
            f"layer {_where(module)} ({type(module).__name__}): transformers built this "
            f"layer's mask from functions spattn cannot read: {'; '.join(mask.unreadable)}, "
            "and could not build the dense mask from them either (its sdpa_mask failed). "
            "spattn reads causal, sliding-window, chunked, padding, packed-sequence and "
            "image-block masks; give the layer its pattern with "
            f"set_patterns(model, {{{_where(module)}: ...}})")
    try:
        _check_sizes(mask, query.shape[2], key.shape[2])
    except SpattnError as e:
        raise type(e)(f"layer {_where(module)}: {e}") from None
    what = "; ".join(mask.unreadable)
    if module.__dict__.get("_spattn_dense") != what:
        module.__dict__["_spattn_dense"] = what
        warnings.warn(
            f"spattn: layer {_where(module)} ({layer.layer_type}) runs transformers' dense mask, "
            f"built from functions spattn cannot read ({what}): every tile the mask leaves "
            "non-empty is computed. Give the layer its pattern with "
            f"set_patterns(model, {{{_where(module)}: ...}}) for a compiled sparse one",
            SpattnDenseMaskWarning, stacklevel=3)
    pat = _pattern(DENSE_SOURCE, layer.pattern.backend)
    return _run(module, pat, score, query, key, value, scaling, 0, {"allowed": mask.dense},
                kwargs)


def _inferred(config, mask: SpattnMask) -> bool:
    """The layer's type is spattn's guess of what transformers infers (the config lists no
    ``layer_types``), and transformers masks it causally or bidirectionally: a config that
    carries a ``sliding_window`` or ``attention_chunk_size`` its model does not read (a
    Llama-family model whose config holds a ``sliding_window``) gets causal masks, and that
    mask, not the guess, is what the model computes. A window or chunk of another size
    stays refused (docs/decisions.md, "A layer's kind from its mask")."""
    return getattr(config, "layer_types", None) is None and mask.kind in _CAUSAL_OR_FULL


def _as_masked(module, layer: LayerPattern, kind: tuple) -> LayerPattern:
    """A layer whose mask transformers builds otherwise than its config and module say:
    in the other direction (:func:`_direction_only`: CLIP's text model shares its attention
    module, ``is_causal = False``, with the vision model and builds causal masks; a
    bidirectional Gemma 3 is masked causally in ``generate``), or another kind where the
    layer's type was inferred (:func:`_inferred`). The layer runs what the mask says, as
    SDPA and eager attention do, and keeps that pattern (:func:`layer_patterns` reports
    it)."""
    layer = replace(layer, pattern=_pattern(_kind_source(kind), layer.pattern.backend),
                    detail="as transformers masks it", mask_kind=kind)
    module.__dict__["_spattn_layer"] = (module.config, layer)
    return layer


def _bidirectional(module) -> bool:
    return getattr(module, "is_causal", True) is False \
        or getattr(module.config, "is_causal", True) is False


def _unmasked(module, query, key, value, scaling, score, kwargs):
    """A bidirectional layer that transformers gives no mask (vision encoders, a
    cross-attention without an encoder mask): every query reads every key, as SDPA's
    adapter then computes, unless :func:`set_patterns` gave the layer a pattern, which runs
    over the positions ``0 .. Lk-1`` (``pos`` too), the queries aligned to the last keys."""
    layer = _layer_of(module)
    if layer.mask_kind not in (None, ("full",)):
        raise SpattnError(
            f"layer {_where(module)} ({layer.layer_type}) received no attention mask, but "
            f"its config makes it {_kind_text(layer.mask_kind)}: transformers did not call "
            "spattn's mask function for it. Give the layer its pattern with "
            f"set_patterns(model, {{{_where(module)}: ...}})")
    inputs = {}
    if "pos" in layer.pattern.inputs:
        inputs["pos"] = torch.arange(key.shape[2], device=key.device).expand(key.shape[0], -1)
    return _run(module, layer.pattern, score, query, key, value, scaling, None, inputs, kwargs)


def _runnable(pat: Pattern, score: str | None, query, value) -> Pattern:
    """The layer's pattern with its score, on the torch backend where ``"auto"`` would pick
    the Triton kernels for head dims they do not take (Gemma 4's global layers: 512; the
    kernels take 16..256 after padding the narrower of q and v to the wider)."""
    backend = pat.backend
    if backend == "auto" and not _MIN_D <= max(query.shape[-1], value.shape[-1]) <= _MAX_D:
        backend = "torch"
    if score is None and backend == pat.backend:
        return pat
    return _pattern(pat.source, backend, score)


def _with_bias(module, score: str | None, bias, query, key, inputs: dict,
               q_offset: int | None) -> str | None:
    """The layer's score with T5's additive ``position_bias`` (``[1 or B, 1 or Hq, Lq,
    Lk]``, float: T5's bucketed relative positions, or zeros), which it adds to the scores
    as eager attention does: ``s + position_bias[h, q - Lk + Lq, k]`` (a leading ``b`` for
    a bias per batch row), the table a runtime input of the score (gradients reach it, and
    through it T5's relative-attention embedding). Query row ``i`` of the bias is the
    query at key slot ``q_offset + i``: the last keys (``q_offset`` None: decoding with a
    dynamic cache) or the first (0: an encoder, cross-attention); a single query reads row
    0 wherever it sits (a decoding step over a static cache). Several queries at another
    offset would make a new score at every step and are refused."""
    if bias is None:
        return score
    B, Hq, Lq, _ = query.shape
    Lk = key.shape[2]
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.dim() != 4 \
            or bias.shape[0] not in (1, B) or bias.shape[1] not in (1, Hq) \
            or tuple(bias.shape[2:]) != (Lq, Lk):
        what = (f"shape {tuple(bias.shape)} {bias.dtype}" if isinstance(bias, torch.Tensor)
                else type(bias).__name__)
        raise SpattnInputError(
            f"layer {_where(module)} passes position_bias= ({what}): spattn adds a float "
            f"position bias [1 or {B}, 1 or {Hq}, {Lq}, {Lk}] ([batch, heads, queries, keys])")
    if score is not None:
        raise SpattnError(f"layer {_where(module)} passes both a softcap and a position_bias, "
                          "whose order transformers does not define for spattn")
    if Lq > 1 and q_offset not in (None, 0):
        raise SpattnError(
            f"layer {_where(module)} passes position_bias= with its {Lq} queries at key slot "
            f"{q_offset} of {Lk} (a static cache): spattn indexes the bias by the query's row "
            "counted from the first or the last key, or reads row 0 for one query; use a "
            "dynamic cache")
    lead = "b, " if B > 1 and bias.shape[0] == B else ""
    head = "h" if bias.shape[1] == Hq else "0"
    row = "0" if Lq == 1 else "q - Lk + Lq" if q_offset is None else "q"
    inputs["position_bias"] = bias if lead else bias[0]
    return f"s + position_bias[{lead}{head}, {row}, k]"


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The output of attention whose softmax has one more logit per head, ``sinks [Hq]``,
    that carries no value (attention sinks as in GPT-OSS).

    ``out [B, Hq, Lq, D]`` and ``lse [B, Hq, Lq]`` (natural log) are those of the softmax
    without the sink: adding ``exp(sink)`` to each row's sum scales the row by
    ``exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink)``, computed in fp32 and
    applied in the output's dtype (one pass over the output). A row that allows no key
    (``lse = -inf``) stays 0, as it is with the sink alone. The scale is differentiable in
    ``lse`` and ``sinks``, so training reaches the sink logits.
    """
    factor = torch.sigmoid(lse - sinks.to(lse.dtype).view(1, -1, 1))
    return out * factor.unsqueeze(-1).to(out.dtype)


def _sink_logits(module, kwargs, num_heads: int) -> torch.Tensor | None:
    """The layer's attention sinks (a keyword of :data:`SINK_KWARGS`), checked: ``[Hq]``."""
    for name in SINK_KWARGS:
        sinks = kwargs.get(name)
        if sinks is None:
            continue
        if not isinstance(sinks, torch.Tensor) or sinks.numel() != num_heads \
                or not sinks.is_floating_point():
            what = (f"shape {tuple(sinks.shape)} {sinks.dtype}" if isinstance(sinks, torch.Tensor)
                    else type(sinks).__name__)
            raise SpattnInputError(
                f"layer {_where(module)} passes {name}= ({what}): attention "
                f"sinks are one float logit per query head, [{num_heads}]")
        return sinks.reshape(num_heads)
    return None


AttentionInterface.register(NAME, spattn_attention_forward)
AttentionMaskInterface.register(NAME, spattn_mask)
