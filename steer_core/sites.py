"""Where steering happens: hook sites, layer numbering and the module that writes each site.

All layer-index and hook-name conventions live here, and nowhere else.

Layer L counts decoder blocks from 0, as TransformerLens and HF module names do:
- ``resid_pre L``  is the input of block L (HF ``hidden_states[L]``; ``resid_pre 0`` is the embedding output);
- ``resid_post L`` is the output of block L (HF ``hidden_states[L + 1]``, except that HF applies the final norm
  to the last entry, so ``resid_post`` of the last block is *not* ``hidden_states[-1]``);
- ``attn_out L`` / ``mlp_out L`` are what block L's attention / MLP adds to the residual stream (after the
  post-norm on Gemma 2/3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

from torch import Tensor, nn

from steer_core.constants import SITES

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Site = Literal["resid_pre", "resid_post", "mlp_out", "attn_out"]
Kind = Literal["attn", "mlp"]  # which of a block's two writers: its attention (o_proj) or its MLP (down_proj)


@dataclass(frozen=True, order=True)
class HookPoint:
    """One steering site: a block index and what of that block is meant."""

    layer: int
    site: Site

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"site {self.site!r} is not one of {', '.join(SITES)}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a non-negative integer, got {self.layer!r}")

    @property
    def tl_name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.site}"

    def writer(self) -> tuple[int, Kind]:
        """The (block, writer kind) whose output is the last thing added before this site.

        A rank-1 adapter on that writer is the only single-module adapter whose addition reaches the site without
        passing through other computation first (docs/math.md, "Setting").
        """
        if self.site in ("resid_post", "mlp_out"):
            return self.layer, "mlp"
        if self.site == "attn_out":
            return self.layer, "attn"
        if self.layer == 0:
            raise ValueError(
                "resid_pre 0 is the embedding output: no block writes it, so no LoRA on a linear writer can steer "
                "it. Use resid_post or resid_pre of a later layer (resid_pre L equals resid_post L-1)."
            )
        return self.layer - 1, "mlp"


_TL_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|mlp_out|attn_out)$")
# HF-style names as used by some SAE releases, e.g. "model.layers.9.output" or "layers.9.mlp.output".
_HF_RE = re.compile(
    r"^(?:model\.(?:language_model\.)?|transformer\.)?(?:layers|h)\.(\d+)"
    r"(?:\.(mlp|self_attn|attn|post_feedforward_layernorm|post_attention_layernorm))?\.(output|input)$"
)
_HF_SUBMODULE_SITES: dict[str | None, Site] = {
    None: "resid_post",
    "mlp": "mlp_out",
    "post_feedforward_layernorm": "mlp_out",
    "self_attn": "attn_out",
    "attn": "attn_out",
    "post_attention_layernorm": "attn_out",
}


def parse_hook_name(name: str) -> HookPoint:
    """Map a TransformerLens- or HF-style hook name to a HookPoint."""
    m = _TL_RE.match(name)
    if m:
        layer, site = int(m.group(1)), m.group(2)
        # resid_mid L = resid_pre L + attn_out L: adding there is adding to block L's attention output.
        return HookPoint(layer, "attn_out" if site == "resid_mid" else site)  # type: ignore[arg-type]
    m = _HF_RE.match(name)
    if m:
        layer, sub, io = int(m.group(1)), m.group(2), m.group(3)
        if io == "input":
            if sub is not None:
                raise ValueError(f"hook {name!r}: inputs of sub-modules are not residual-stream sites")
            return HookPoint(layer, "resid_pre")
        return HookPoint(layer, _HF_SUBMODULE_SITES[sub])
    raise ValueError(
        f"hook name {name!r} is not a supported residual-stream site; supported: "
        "blocks.L.hook_{resid_pre,resid_mid,resid_post,mlp_out,attn_out} or "
        "model.layers.L[.mlp|.self_attn].{output,input}"
    )


@dataclass(frozen=True)
class Architecture:
    """Where a family keeps its blocks and writers. Paths are relative to the CausalLM / its block."""

    family: str
    layers_path: str
    attn_writer: str
    mlp_writer: str
    # Post-norm families add post_norm(writer(x)) to the residual stream (Gemma 2/3).
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    # GPT-2's Conv1D stores W transposed; PEFT needs to know.
    fan_in_fan_out: bool = False
    final_norm: str = "model.norm"
    # Norms (inside each block) that read the residual stream; used to weigh where a residual change matters.
    reader_norms: tuple[str, ...] = ()

    @property
    def post_norm(self) -> bool:
        return self.mlp_post_norm is not None

    def writer_name(self, layer: int, kind: Kind) -> str:
        return f"{self.layers_path}.{layer}.{self.attn_writer if kind == 'attn' else self.mlp_writer}"

    def block_of(self, module: str) -> int:
        """The block a module of a layer is in: model.layers.15.mlp.down_proj -> 15."""
        head, _, rest = module.partition(f"{self.layers_path}.")
        if head or not rest.split(".")[0].isdigit():
            raise ValueError(f"{module!r} is not inside a block ({self.layers_path}.N)")
        return int(rest.split(".")[0])

    def adds_to_residual_name(self, layer: int, kind: Kind) -> str:
        """The module whose output is added to the residual stream as it is (writer, or its post-norm)."""
        norm = self.attn_post_norm if kind == "attn" else self.mlp_post_norm
        if norm is None:
            return self.writer_name(layer, kind)
        return f"{self.layers_path}.{layer}.{norm}"

    def post_norm_name(self, layer: int, kind: Kind) -> str | None:
        norm = self.attn_post_norm if kind == "attn" else self.mlp_post_norm
        return None if norm is None else f"{self.layers_path}.{layer}.{norm}"


_PRE_NORM = Architecture("pre-norm", "model.layers", "self_attn.o_proj", "mlp.down_proj")
_POST_NORM = Architecture(
    "post-norm",
    "model.layers",
    "self_attn.o_proj",
    "mlp.down_proj",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    reader_norms=("input_layernorm", "pre_feedforward_layernorm"),
)
_GPT2 = Architecture(
    "gpt2", "transformer.h", "attn.c_proj", "mlp.c_proj", fan_in_fan_out=True, final_norm="transformer.ln_f"
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _PRE_NORM,
    "mistral": _PRE_NORM,
    "qwen2": _PRE_NORM,
    "qwen3": _PRE_NORM,
    "gemma": _PRE_NORM,  # Gemma 1 is pre-norm; only Gemma 2/3 moved to post-norms.
    "gemma2": _POST_NORM,
    "gemma3": _POST_NORM,
    "gemma3_text": _POST_NORM,
    "gpt2": _GPT2,
}


def architecture_for(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(str(model_type))
    if arch is None:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Other pre-norm families with model.layers.N.mlp.down_proj can be added to steer_core.sites.ARCHITECTURES."
        )
    return arch


def num_layers(model: nn.Module) -> int:
    return len(blocks(model))


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(architecture_for(model).layers_path)  # type: ignore[return-value]


def weight_of(module: nn.Module) -> Tensor:
    """A linear layer's or a norm's weight. nn.Module types its attributes as Tensor | Module; this one is a Tensor."""
    return cast(Tensor, module.weight)


def pretrained(model: nn.Module) -> PreTrainedModel:
    """`model` as transformers types it (config, embeddings, generate), for the type checker only."""
    return cast("PreTrainedModel", model)
