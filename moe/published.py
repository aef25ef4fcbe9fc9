"""The published MMoE matcher's sizes and weights: build it, and load a published state dict into it.

:func:`published_matcher` builds our :class:`MMoEMatcher` at the paper's sizes (dt 512, dv 96,
h 96, c 96, 4 experts ``d -> 4d -> out``). With ``compat=True`` it is the published computation,
defects included (``compat: published``); with ``compat=False`` it is the default model, whose
parameters have the same names and shapes, so published weights load into either.

:func:`load_published_matcher` maps the published matcher's parameter names (Lightning checkpoint
keys, with or without the ``matcher.`` prefix) onto ours; :func:`load_published_model` does the
same for a whole checkpoint (``encoder.*`` too). The mapping, published -> ours:

    text_cls_layernorm / text_tokens_layernorm       text_global_norm / text_token_norm
    image_cls_layernorm / image_tokens_layernorm     image_global_norm / image_token_norm
    {text,vision}_module.fc_query / fc_key / fc_value / layer_norm
                                                      units.{text,vision}.wq / wk / wv / norm
    cross_module.text_fc / image_fc / gate_fc / gate_layer_norm
                                                      units.cross.text_fc / image_fc / gate_fc / gate_norm
    {unit}_module.moe_layer.gate.w_gate               units.{unit}.moe.wg
    {unit}_module.moe_layer.experts.{e}.ff.0.0        units.{unit}.moe.w1[e] = W^T, b1[e]
    {unit}_module.moe_layer.experts.{e}.ff.2          units.{unit}.moe.w2[e] = W^T, b2[e]
    cross_module.context_layer_norm                   (never used by the published code: dropped)
    encoder.image_cls_fc / image_tokens_fc            encoder.image_global_proj / image_token_proj
    encoder.clip.*                                    encoder.clip.*

nn.Linear stores weights as [out, in]; our stacked experts hold [in, out], hence the transposes.
Our matcher's learned "no image" vectors have no published counterpart and keep their values
(the published model, and ``compat: published``, feed zero pixels through CLIP instead).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from moe.matcher import MatcherSettings, MMoEMatcher
from moe.units import MoESettings

PUBLISHED_TOP_K = {"wikimel": 3, "richpediamel": 4, "wikidiverse": 2}

_NORMS = {"text_cls_layernorm": "text_global_norm", "text_tokens_layernorm": "text_token_norm",
          "image_cls_layernorm": "image_global_norm", "image_tokens_layernorm": "image_token_norm"}
_UNITS = {"text_module": "text", "vision_module": "vision", "cross_module": "cross"}
_UNIT_LAYERS = {"fc_query": "wq", "fc_key": "wk", "fc_value": "wv", "layer_norm": "norm", "text_fc": "text_fc",
                "image_fc": "image_fc", "gate_fc": "gate_fc", "gate_layer_norm": "gate_norm"}
_UNUSED = ("cross_module.context_layer_norm.",)
_EXPERT = re.compile(r"^(\w+)\.moe_layer\.experts\.(\d+)\.ff\.(0\.0|2)\.(weight|bias)$")
_ENCODER = {"encoder.image_cls_fc.": "encoder.image_global_proj.", "encoder.image_tokens_fc.": "encoder.image_token_proj."}


def published_matcher(top_k: int = 3, compat: bool = True, **moe: object) -> MMoEMatcher:
    """Our matcher at the published sizes: top-k 3 (WikiMEL), 4 (RichpediaMEL), 2 (WikiDiverse).
    ``compat=True``: the published computation, defects included; False: our default model."""
    settings = MatcherSettings(text_dim=512, image_dim=96, hidden=96, cross_dim=96,
                               compat="published" if compat else "none",
                               moe=MoESettings(num_experts=4, top_k=top_k, expert_mult=4, **moe))
    return MMoEMatcher(settings)


class PublishedWeightsError(ValueError):
    """A state dict that does not fit the matcher (names or shapes), with the keys that differ."""


def published_to_ours(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a published matcher state dict (no prefix) to ours (local layout). Returns the mapped
    tensors and the published keys that were dropped (the unused ``context_layer_norm``)."""
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    experts: dict[tuple[str, str], dict[int, Tensor]] = {}
    for key, value in state.items():
        if key.startswith(_UNUSED):
            dropped.append(key)
            continue
        head, _, rest = key.partition(".")
        if head in _NORMS:
            out[f"{_NORMS[head]}.{rest}"] = value
            continue
        if head not in _UNITS:
            raise PublishedWeightsError(f"unknown published matcher key {key!r}")
        unit = _UNITS[head]
        m = _EXPERT.match(key)
        if m:
            layer = "1" if m.group(3) == "0.0" else "2"
            name = ("w" if m.group(4) == "weight" else "b") + layer
            experts.setdefault((unit, name), {})[int(m.group(2))] = value.t() if name.startswith("w") else value
            continue
        if rest.startswith("moe_layer.gate.w_gate."):
            out[f"units.{unit}.moe.wg.{rest.rsplit('.', 1)[1]}"] = value
            continue
        layer, _, param = rest.partition(".")
        if layer not in _UNIT_LAYERS:
            raise PublishedWeightsError(f"unknown published matcher key {key!r}")
        out[f"units.{unit}.{_UNIT_LAYERS[layer]}.{param}"] = value
    for (unit, name), per_expert in experts.items():
        ids = sorted(per_expert)
        if ids != list(range(len(ids))):
            raise PublishedWeightsError(f"published {unit} experts are not numbered 0..E-1: {ids}")
        out[f"units.{unit}.moe.{name}"] = torch.stack([per_expert[e] for e in ids]).contiguous()
    return out, dropped


def ours_to_published(matcher: MMoEMatcher) -> dict[str, Tensor]:
    """The inverse mapping: our matcher's weights under the published names (local-layout layers)."""
    inverse_units = {v: k for k, v in _UNITS.items()}
    inverse_layers = {v: k for k, v in _UNIT_LAYERS.items()}
    inverse_norms = {v: k for k, v in _NORMS.items()}
    out: dict[str, Tensor] = {}
    for key, value in matcher.state_dict().items():
        head, _, rest = key.partition(".")
        if head in inverse_norms:
            out[f"{inverse_norms[head]}.{rest}"] = value
        elif head == "units":
            unit, _, rest = rest.partition(".")
            prefix = inverse_units[unit]
            layer, _, param = rest.partition(".")
            if layer == "moe":
                if param.startswith("wg."):
                    out[f"{prefix}.moe_layer.gate.w_gate.{param[3:]}"] = value
                else:
                    ff = "0.0" if param[1] == "1" else "2"
                    kind = "weight" if param[0] == "w" else "bias"
                    for e in range(value.shape[0]):
                        out[f"{prefix}.moe_layer.experts.{e}.ff.{ff}.{kind}"] = value[e].t() if kind == "weight" else value[e]
            else:
                out[f"{prefix}.{inverse_layers[layer]}.{param}"] = value
    return out


def _strip(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_published_matcher(matcher: MMoEMatcher, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Load a published matcher state dict (keys with or without the ``matcher.`` prefix; other
    prefixes such as ``encoder.`` are ignored) into ``matcher``. Every published tensor must find its
    place with the right shape, and every parameter of the enabled units must be given. Returns the
    published keys that were dropped (the never-used ``context_layer_norm``)."""
    prefixed = any(k.startswith("matcher.") for k in state_dict)
    state = _strip(state_dict, "matcher.") if prefixed else {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
    if prefixed and not state:
        raise PublishedWeightsError("no matcher.* keys in the state dict")
    mapped, dropped = published_to_ours(state)
    own = matcher.state_dict()
    # Units that are switched off in our matcher are skipped, as are our own extras ("no image").
    skip_units = tuple(f"units.{u}." for u in ("text", "vision", "cross") if u not in matcher.unit_names)
    mapped = {k: v for k, v in mapped.items() if not k.startswith(skip_units)}
    extras = ("no_image_global", "no_image_token")
    unexpected = sorted(set(mapped) - set(own))
    missing = sorted(k for k in set(own) - set(mapped) if k not in extras)
    # The DeepSpeed backend keeps its experts under other names and accepts this (local) layout on load.
    ds_layers = {k.split(".deepspeed_moe.")[0] for k in own if ".deepspeed_moe." in k}
    missing = [k for k in missing if not any(k.startswith(p + ".deepspeed_moe.") for p in ds_layers)]
    unexpected = [k for k in unexpected if not any(k.startswith(p + ".") for p in ds_layers)]
    if missing or unexpected:
        raise PublishedWeightsError(f"published weights do not fit this matcher: missing {missing[:8]}, "
                                    f"unexpected {unexpected[:8]}")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise PublishedWeightsError(f"published weights have other shapes than this matcher (check top-k is not the "
                                    f"issue, and the widths dt/dv/h/c): {bad[:6]}")
    for name in extras:
        mapped[name] = own[name]
    matcher.load_state_dict(mapped, strict=True)
    return dropped


def load_published_model(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """A whole published checkpoint's ``state_dict`` (``encoder.*`` and ``matcher.*``) into our
    ``MMoEModel``. Returns the published keys that were dropped."""
    dropped = load_published_matcher(model.matcher, state_dict)
    encoder: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith("encoder."):
            continue
        for old, new in _ENCODER.items():
            if key.startswith(old):
                key = new + key[len(old):]
        encoder[key[len("encoder."):]] = value
    own = model.encoder.state_dict()
    # Buffers whose persistence differs between transformers versions (position ids) are not weights.
    ignorable = [k for k in set(encoder) ^ set(own) if k.endswith("position_ids")]
    for k in ignorable:
        encoder.pop(k, None)
    for k in ignorable:
        if k in own:
            encoder[k] = own[k]
    missing, unexpected = sorted(set(own) - set(encoder)), sorted(set(encoder) - set(own))
    if missing or unexpected:
        raise PublishedWeightsError(f"published encoder weights do not fit this CLIP: missing {missing[:8]}, "
                                    f"unexpected {unexpected[:8]}")
    model.encoder.load_state_dict(encoder, strict=True)
    return dropped + ignorable
