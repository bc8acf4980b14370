"""Sites: where in a model activations are read, and the hooks that read them.

A site is a string, either a TransformerLens hook name as SAELens uses them::

    blocks.{L}.hook_resid_pre    input of decoder layer L (== hidden_states[L])
    blocks.{L}.hook_resid_mid    the residual stream between attention and MLP: the input of
                                 the pre-MLP norm (Gemma's pre_feedforward_layernorm,
                                 Llama's post_attention_layernorm, GPT-2's ln_2); what a
                                 cross-layer transcoder reads
    blocks.{L}.hook_resid_post   output of decoder layer L (== hidden_states[L+1])
    blocks.{L}.hook_mlp_in       input of the MLP (after pre_feedforward_layernorm in Gemma 2)
    blocks.{L}.hook_mlp_out      output of post_feedforward_layernorm (Gemma 2) or of .mlp
    blocks.{L}.attn.hook_z       input of the attention output projection (heads concatenated)

or any module of any Hugging Face model by path: ``"<module.path>:output"`` or
``"<module.path>:input"`` (e.g. ``encoder.layer.3:output`` on a BERT).

Note that HF's ``hidden_states[-1]`` is taken *after* the final norm, so
``blocks.{last}.hook_resid_post`` (the raw layer output) differs from it.

Everything one kind of ``blocks.{L}.<hook>`` site means lives in one row of
:data:`SITE_KINDS` (a :class:`SiteKind`), and :func:`layer_and_kind` is the one parser of
site names: other modules ask the row (its width, whether it can be spliced, its names in
Gemma Scope 2 and in suite releases) instead of matching hook names themselves. To add a
kind, add a row: its hook name, the module inside a decoder layer that it reads (a
tuple of paths, first that exists wins, and whether it reads that module's input or
output) and its width rule; the parser, :func:`resolve_site`, the extractor and the
export names follow from the row.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from gs_lightning.errors import ConfigError

# Where the decoder-layer list lives, by model family; first match wins.
LAYER_LIST_PATHS = (
    "model.layers",  # Gemma, Llama, Mistral, Qwen (ForCausalLM)
    "model.model.layers",
    "model.language_model.layers",  # multimodal Gemma 3
    "layers",  # the bare *Model classes
    "transformer.h",  # GPT-2, GPT-J
    "gpt_neox.layers",
    "model.decoder.layers",  # OPT
    "encoder.layer",  # BERT (AutoModel)
    "bert.encoder.layer",
    "h",
)

TRANSCODER = "transcoder"
"""The kind Gemma Scope 2 folders and suite releases give a transcoder (a pair of sites)."""


def d_model(config: PretrainedConfig) -> int:
    """Width of the residual stream (``hidden_size``; GPT-2's ``n_embd``)."""
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def d_attn_z(config: PretrainedConfig) -> int:
    """Width of the heads concatenated, ``n_heads * d_head`` (Gemma's ``head_dim`` is not
    ``d_model / n_heads``)."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    return int(heads * (getattr(config, "head_dim", None) or d_model(config) // heads))


@dataclass(frozen=True)
class SiteKind:
    """One kind of TransformerLens site, ``blocks.{L}.<hook>``: a row of :data:`SITE_KINDS`."""

    name: str
    """Short name, e.g. ``resid_post`` (:attr:`SiteSpec.hook`)."""
    hook: str
    """The TransformerLens hook after ``blocks.{L}.``, e.g. ``hook_resid_post``, ``attn.hook_z``."""
    label: str
    """The kind in words, for plot titles."""
    release: str
    """Suffix of a suite's release repository, as Gemma Scope names them (``...-2b-pt-res``)."""
    modules: tuple[str, ...]
    """Paths inside a decoder layer of the module hooked, first that exists wins; () is the layer."""
    io: Literal["input", "output"]
    """Whether the hook reads that module's input or its output."""
    width: Callable[[PretrainedConfig], int]
    """The site's width (d_in) from the model's text config."""
    spliceable: bool = True
    """Whether a reconstruction written there reaches the rest of the model (delta LM loss)."""
    transcoder_role: Literal["input", "target"] | None = None
    """Where transcoders meet it: read as their input, or reconstructed as their target."""
    to_residual: Literal["identity", "module_weight"] | None = None
    """How a decoder row becomes a residual-stream direction for logit effects: as it is,
    through the hooked module's weight, or (None) not shown."""
    gemma_scope_2: str | None = None
    """Gemma Scope 2's folder kind (``resid_post``, ``mlp_out``, ``attn_out``); None: it has none."""
    hf_hook_point: str | None = None
    """Gemma Scope 2's Hugging Face name for it (Gemma 3), ``{L}`` standing for the layer."""

    def site(self, layer: int | str) -> str:
        """The site of this kind at ``layer`` (or at a placeholder such as ``{L}``)."""
        return f"blocks.{layer}.{self.hook}"


_KINDS = (
    SiteKind("resid_pre", "hook_resid_pre", "residual stream, layer input", "resid_pre",
             modules=(), io="input", width=d_model),
    # The pre-MLP norm's input: the residual stream after attention. Gemma 2/3 also have a
    # post_attention_layernorm, but there it normalises the attention output: Gemma's name
    # must come first. Rewriting it there would not reach the residual stream.
    SiteKind("resid_mid", "hook_resid_mid", "residual stream, before the MLP", "resid_mid",
             modules=("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2"), io="input",
             width=d_model, spliceable=False, transcoder_role="input"),
    SiteKind("resid_post", "hook_resid_post", "residual stream", "res", modules=(), io="output", width=d_model,
             to_residual="identity", gemma_scope_2="resid_post", hf_hook_point="model.layers.{L}.output"),
    # The MLP's input is after the pre-MLP norm.
    SiteKind("mlp_in", "hook_mlp_in", "MLP input", "mlp_in", modules=("mlp",), io="input", width=d_model,
             transcoder_role="input", hf_hook_point="model.layers.{L}.pre_feedforward_layernorm.output"),
    SiteKind("mlp_out", "hook_mlp_out", "MLP output", "mlp", modules=("post_feedforward_layernorm", "mlp"),
             io="output", width=d_model, transcoder_role="target", to_residual="identity", gemma_scope_2="mlp_out",
             hf_hook_point="model.layers.{L}.post_feedforward_layernorm.output"),
    SiteKind("attn_z", "attn.hook_z", "attention (hook_z)", "att",
             modules=("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attn.out_proj"), io="input",
             width=d_attn_z, to_residual="module_weight", gemma_scope_2="attn_out",
             hf_hook_point="model.layers.{L}.self_attn.o_proj.input"),
)
SITE_KINDS = {kind.name: kind for kind in _KINDS}
"""Every kind of ``blocks.{L}.<hook>`` site, by short name."""

_BY_HOOK = {kind.hook: kind for kind in _KINDS}
_TL_SITE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(map(re.escape, _BY_HOOK)) + r")$")
_MODULE_SITE = re.compile(r"^([A-Za-z_][\w.]*):(input|output)$")
_FORMS = ", ".join(kind.site("{L}") for kind in _KINDS) + ", '<module.path>:output' or '<module.path>:input'"


def layer_and_kind(site: str) -> tuple[int | None, SiteKind | None]:
    """``(layer, kind)`` of a ``blocks.{L}.<hook>`` site; ``(None, None)`` for anything else
    (a module path, a typo). The one place site names are taken apart."""
    m = _TL_SITE.match(site)
    return (int(m.group(1)), _BY_HOOK[m.group(2)]) if m else (None, None)


def site_layer(site: str | None) -> int | None:
    """The layer of a ``blocks.{L}.<hook>`` site; None for module paths and no site."""
    return layer_and_kind(site or "")[0]


@dataclass(frozen=True)
class SiteSpec:
    """A parsed site: ``layer`` and ``kind`` are set for TransformerLens names, ``path`` for module paths."""

    site: str
    kind: SiteKind | None
    layer: int | None = None
    path: str | None = None
    io: Literal["input", "output"] = "output"

    @property
    def hook(self) -> str:
        """The kind's short name (``resid_post``, ``attn_z``, ...), or ``module`` for a module path."""
        return self.kind.name if self.kind is not None else "module"


def parse_site(site: str) -> SiteSpec:
    """Parse a site string (syntax only; see :func:`resolve_site` for the module)."""
    layer, kind = layer_and_kind(site)
    if kind is not None:
        return SiteSpec(site, kind, layer=layer, io=kind.io)
    m = _MODULE_SITE.match(site)
    if m:
        return SiteSpec(site, None, path=m.group(1), io=m.group(2))  # type: ignore[arg-type]
    raise ConfigError(f"site={site!r} is not a site; expected one of: {_FORMS}")


def num_layers(config: PretrainedConfig) -> int | None:
    """Number of decoder layers according to a config (None if the config does not say)."""
    config = config.get_text_config()
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def check_site_config(config: PretrainedConfig, site: str) -> SiteSpec:
    """Parse ``site`` and check its layer index against ``config``, without any weights."""
    spec = parse_site(site)
    n = num_layers(config)
    if spec.layer is not None and n is not None and spec.layer >= n:
        raise _no_such_layer(site, spec.layer, n)
    return spec


def _no_such_layer(site: str, layer: int, n: int) -> ConfigError:
    return ConfigError(f"site={site!r}: layer {layer} does not exist; the model has {n} layers")


def site_dim_from_config(config: PretrainedConfig, site: str) -> int | None:
    """Width of a TransformerLens site from the config alone; None for module-path sites."""
    kind = parse_site(site).kind
    return None if kind is None else kind.width(config.get_text_config())


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder (or encoder) layers, found by known paths."""
    for path in LAYER_LIST_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(
        f"cannot find the layer list of {type(model).__name__} "
        f"(tried {', '.join(LAYER_LIST_PATHS)}); use a '<module.path>:output' site"
    )


def _first_submodule(layer: nn.Module, paths: tuple[str, ...], site: str) -> nn.Module:
    for path in paths:
        module = _get(layer, path)
        if module is not None:
            return module
    raise ConfigError(
        f"site={site!r}: the layer has none of {list(paths)}; use a module-path site instead"
    )


def resolve_site(model: nn.Module, site: str) -> tuple[nn.Module, Literal["input", "output"]]:
    """The module a site hooks and whether it reads the module's input or output."""
    spec = parse_site(site)
    if spec.kind is None:
        module = _get(model, spec.path)
        if module is None:
            hint = _path_hint(model, spec.path)
            name = type(model).__name__
            raise ConfigError(f"site={site!r}: {name} has no module {spec.path!r}; {hint}")
        return module, spec.io
    layers = decoder_layers(model)
    if spec.layer >= len(layers):
        raise _no_such_layer(site, spec.layer, len(layers))
    layer, kind = layers[spec.layer], spec.kind
    return (_first_submodule(layer, kind.modules, site) if kind.modules else layer), kind.io


def _path_hint(model: nn.Module, path: str) -> str:
    """List the children of the deepest existing prefix of ``path``, to show what exists."""
    parts = path.split(".")
    for k in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:k])
        parent = _get(model, prefix) if prefix else model
        if parent is not None:
            children = [n for n, _ in parent.named_children()][:20]
            where = f"{prefix!r}" if prefix else "the model"
            return f"{where} has children {children}"
    return ""


def _first_tensor(value: Any) -> torch.Tensor:
    """Tuple outputs (older HF layers return ``(hidden, attn_weights, ...)``) take element 0."""
    while isinstance(value, (tuple, list)):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"hooked value is a {type(value).__name__}, not a tensor")
    return value


class _StopForward(Exception):
    """Raised by the last hook to fire, so layers after the last site never run."""


class ActivationExtractor:
    """Read several sites in one forward pass, stopping it once all have fired.

    Use as a context manager, or call :meth:`close` to remove the hooks::

        with ActivationExtractor(model, ["blocks.3.hook_resid_post"]) as extract:
            acts = extract(input_ids, attention_mask)  # {site: [batch, seq, d]}
    """

    def __init__(self, model: nn.Module, sites: list[str]) -> None:
        if not sites:
            raise ConfigError("ActivationExtractor needs at least one site")
        self.model = model
        self.sites = list(dict.fromkeys(sites))
        self._captured: dict[str, torch.Tensor] = {}
        # Hooks act only during this extractor's own call, so several extractors (or a
        # plain forward) on one model do not capture for, or stop, each other.
        self._active = False
        self._handles = [self._register(site) for site in self.sites]
        params = inspect.signature(model.forward).parameters
        self._forward_kwargs = {"use_cache": False} if "use_cache" in params else {}

    def _register(self, site: str) -> torch.utils.hooks.RemovableHandle:
        module, io = resolve_site(self.model, site)
        if io == "output":
            return module.register_forward_hook(lambda _m, _a, out: self._store(site, out))

        def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            # A decoder layer may be called with hidden_states as a keyword (hook_resid_pre).
            self._store(site, args if args else kwargs.get("hidden_states", next(iter(kwargs.values()))))

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def _store(self, site: str, value: Any) -> None:
        if not self._active:
            return
        self._captured[site] = _first_tensor(value).detach()
        if len(self._captured) == len(self.sites):
            raise _StopForward

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Run one forward pass; return ``{site: [batch, seq, d]}`` for every site."""
        self._captured, self._active = {}, True
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, **self._forward_kwargs)
        except _StopForward:
            pass
        finally:
            self._active = False
        captured, self._captured = self._captured, {}
        missing = [s for s in self.sites if s not in captured]
        if missing:
            name = type(self.model).__name__
            raise ConfigError(f"sites {missing} were never reached in a forward pass of {name}")
        return captured

    def close(self) -> None:
        """Remove the hooks; the model is left as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ActivationExtractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def site_dim(model: nn.Module, site: str) -> int:
    """Width of a site's activations: from the config, or a 1-token probe for module paths."""
    resolve_site(model, site)  # raises ConfigError early for unknown layers or paths
    config = getattr(model, "config", None)
    dim = site_dim_from_config(config, site) if config is not None else None
    if dim is not None:
        return dim
    device = next(model.parameters()).device
    probe = torch.zeros(1, 1, dtype=torch.long, device=device)
    with ActivationExtractor(model, [site]) as extract:
        return int(extract(probe, torch.ones_like(probe))[site].shape[-1])


def site_span(sites: list[str]) -> str:
    """A list of sites in a few words: ``blocks.0.hook_mlp_out .. blocks.3.hook_mlp_out (4 sites)``."""
    return sites[0] if len(sites) == 1 else f"{sites[0]} .. {sites[-1]} ({len(sites)} sites)"
