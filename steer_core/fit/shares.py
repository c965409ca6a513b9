"""Which writers carry each site's vector, and the B each adds: the post-norm writers' shares of v.

Pre-norm models add a writer's output to the residual stream as it is: the site's writer carries all of v, B = v.
Post-norm models (Gemma 2/3) pass it through a norm with gain g first, which shrinks whatever the writer adds; the
layer's attention and MLP writers can then share v where their gains are large (split_shares, B = share ⊘ g), and
their B can be fitted to v where the later layers read the residual stream (fit_shares). What each bought on Gemma 3:
docs/fidelity.md, "What each idea bought".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from steer_core.fit.postnorm import gain, norm_eps, norm_gain, rms_target
from steer_core.sites import Architecture, HookPoint, Kind, architecture_for, num_layers, weight_of
from steer_core.vectors.vector import SteeringVector

# Post-norm writers' shares of v are fitted on this many sampled tokens per writer, with at most this many L-BFGS
# iterations. Gemma-3-270M L9: the loss on 2,048 tokens is 195 fitted on 512 and 183 fitted on 2,048, flat after
# ~100 iterations (from 30,180 at the split).
SHARE_SAMPLE_TOKENS = 1024
SHARE_STEPS = 200


@dataclass(frozen=True)
class Writer:
    """A writer module the adapter is fitted at, and the part of its site's vector it carries."""

    point: HookPoint
    layer: int
    kind: Kind
    share: Tensor  # Float[Tensor, "d_model"] on the CPU: what it should add to the residual stream (after its norm)
    shared: bool  # the site's vector is split between the layer's two writers


def writers(model: nn.Module, vector: SteeringVector, split: bool) -> dict[str, Writer]:
    """The writers of `vector`'s sites, by module name. split (post-norm models, resid sites): share each vector
    between the layer's attention and MLP writers by their norms' gains instead of giving it all to the MLP."""
    arch = architecture_for(model)
    out: dict[str, Writer] = {}
    for point in vector.points:
        layer, kind = point.writer()
        v = vector.directions[point].float().cpu()
        parts = {kind: v}
        if split and arch.post_norm and point.site in ("resid_pre", "resid_post"):
            g = {k: norm_gain(model, arch, layer, k).cpu() for k in ("attn", "mlp")}
            parts = dict(zip(("attn", "mlp"), split_shares(v, g["attn"], g["mlp"]), strict=True))
        for part_kind, share in parts.items():
            name = arch.writer_name(layer, part_kind)
            if name in out:
                raise ValueError(
                    f"{point.tl_name} and {out[name].point.tl_name} are both written by {name}; "
                    "add their vectors into one site instead"
                )
            out[name] = Writer(point, layer, part_kind, share, len(parts) > 1)
    return out


def split_shares(v: Tensor, g_attn: Tensor, g_mlp: Tensor) -> tuple[Tensor, Tensor]:
    """Split v between a post-norm layer's two writers to keep the norms' shrink small (docs/math.md, post-norm).

    A writer whose norm has gain g delivers its share s as (N(z) + s) / sqrt(1 + rms(s ⊘ g)²) for s orthogonal to
    N(z): its own output and s both shrink, and a dimension costs least where the gain is large. Minimising
    rms(a ⊘ g_attn)² + rms(m ⊘ g_mlp)² with a + m = v gives a = v g_attn² / (g_attn² + g_mlp²). The attention
    share also reaches the layer's MLP input, where it is small next to the residual stream it joins.
    """
    wa, wm = g_attn.float().pow(2), g_mlp.float().pow(2)
    # A dimension where both gains are 0 (Gemma-3-270M has them) is out of either writer's reach: split it evenly.
    a = torch.where(wa + wm > 0, v.float() * wa / (wa + wm).clamp_min(1e-30), v.float() / 2)
    return a, v.float() - a


def through_gain(share: Tensor, g: Tensor) -> Tensor:
    """B = share ⊘ g: what the writer adds before its norm so the norm's output gains `share`. Where g = 0 the norm
    zeroes whatever the writer adds, so B is 0 there (the report measures what that costs)."""
    return torch.where(g != 0, share / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(share))


def reader_metric(model: nn.Module, arch: Architecture, writer_layer: int) -> Tensor:
    """How much the rest of the model reads each residual dimension written at `writer_layer`: the mean, over every
    later norm that reads the residual stream, of its squared gain (each scaled to mean 1).

    A norm's input dimension i reaches the block as h_i g_i / rms(h), so a change there matters in proportion to
    g_i². On Gemma-3-270M this is the cheap stand-in for the diagonal Fisher information of the residual stream
    (log-correlation 0.98 at layer 9, measured with a backward pass per token), and it is large exactly where the
    post-norm writers' gains are small (log-correlation -0.90): the dimensions steering needs most are the ones the
    writers reach least.
    """
    gains = []
    n = num_layers(model)
    names = [f"{arch.layers_path}.{i}.{r}" for i in range(writer_layer + 1, n) for r in arch.reader_norms]
    for name in [*names, arch.final_norm]:
        try:
            g2 = gain(model.get_submodule(name)).cpu().pow(2)
        except AttributeError:
            continue
        if float(g2.mean()) > 0:
            gains.append(g2 / g2.mean())
    if not gains:
        raise ValueError(f"no residual-reading norms found after layer {writer_layer}")
    return torch.stack(gains).mean(0)


def fit_shares(
    v: Tensor,
    zhat: dict[str, Tensor],
    gains: dict[str, Tensor],
    metric: Tensor,
    init: dict[str, Tensor],
    steps: int = SHARE_STEPS,
) -> tuple[dict[str, Tensor], float, float]:
    """B of each post-norm writer (keyed like `zhat`), fitted so their summed additions come closest to v.

    With A·x = rms(W x), a writer with B = u turns its normalised output n̂ (rms 1) into (n̂ + u) / rms(n̂ + u), so
    it adds g ⊙ ((n̂ + u) / rms(n̂ + u) - n̂) to the residual stream, token by token. The fit minimises the mean over
    the sampled tokens' n̂ of ‖Σ additions - v‖² weighted by `metric` (reader_metric), starting from `init`
    (split_shares). Unlike split_shares it trades the norm's shrink against where the error lands: a dimension the
    later layers barely read can be left unsteered, one they read hard is worth shrinking the writer's output for.
    Returns (B per writer, loss at init, loss after).
    """
    u = {k: init[k].detach().float().clone().requires_grad_(True) for k in zhat}
    # L-BFGS: Adam needed ~3,000 steps (60 s) to leave the split's basin on Gemma-3-270M L9; this takes ~2 s.
    opt = torch.optim.LBFGS(list(u.values()), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        err = -v.float()
        for k, n in zhat.items():
            s = n + u[k]
            err = err + gains[k] * (s / s.pow(2).mean(-1, keepdim=True).sqrt() - n)
        return (err.pow(2) * metric).sum(-1).mean()

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        return value

    with torch.enable_grad():
        before = float(loss().detach())
        if steps > 0:
            opt.step(closure)
        after = float(loss().detach())
    if not after < before:  # never worse than where it started
        return {k: t.detach().float() for k, t in init.items()}, before, before
    return {k: t.detach() for k, t in u.items()}, before, after


@dataclass(frozen=True)
class WriterBs:
    """Each writer's B: as split, and as fitted where a site's vector is shared."""

    split: dict[str, Tensor]  # share ⊘ g on post-norm models, the share itself on pre-norm ones
    fitted: dict[str, Tensor]  # fit_shares' B of the shared writers; empty where none was fitted
    losses: dict[str, dict[str, float]]  # per site: fit_shares' loss at the split and fitted, and its steps


def writer_bs(
    model: nn.Module,
    vector: SteeringVector,
    writers: dict[str, Writer],
    sampled: dict[str, list[Tensor]],
    steps: int = SHARE_STEPS,
) -> WriterBs:
    """B of every writer, and fit_shares' B for each site whose writers' inputs were `sampled`. B does not depend
    on the fit of A. This runs on the CPU: with device_map="auto" the pieces live on different devices."""
    arch = architecture_for(model)
    bs = {
        name: through_gain(w.share, norm_gain(model, arch, w.layer, w.kind).cpu()) if arch.post_norm else w.share
        for name, w in writers.items()
    }
    fitted: dict[str, Tensor] = {}
    losses: dict[str, dict[str, float]] = {}
    for point in vector.points:
        names = [n for n in sampled if writers[n].point == point]
        if not names:
            continue
        layer = writers[names[0]].layer
        zhat, gains = {}, {}
        for n in names:
            kind = writers[n].kind
            z = torch.cat(sampled[n])[:SHARE_SAMPLE_TOKENS] @ weight_of(model.get_submodule(n)).detach().float().cpu().T
            zhat[n] = z / rms_target(z, norm_eps(model, arch, layer, kind)).unsqueeze(-1)
            gains[n] = norm_gain(model, arch, layer, kind).cpu()
        fitted_bs, before, after = fit_shares(
            vector.directions[point].float().cpu(),
            zhat,
            gains,
            reader_metric(model, arch, layer),
            {n: bs[n] for n in names},
            steps,
        )
        fitted.update(fitted_bs)
        losses[point.tl_name] = {"loss_split": before, "loss_fitted": after, "steps": float(steps)}
    return WriterBs(bs, fitted, losses)
