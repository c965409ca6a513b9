"""Human-readable text for the app: what a feature means, which features fire on a prompt, what an SAE is, how
strong a vector is, and how faithful an exported adapter measured. Markdown in, nothing computed here."""

from __future__ import annotations

import math
import re
from typing import Any

from steer_core.adapter.card import by_format_table, feature_label, record_scales, scale_range_text, servable_range
from steer_core.adapter.record import SteeringRecord
from steer_core.sae.concept import ConceptMatch
from steer_core.sae.feature import SAESource, same_model
from steer_core.sae.labels import FeatureLabel, FeatureLabels, TokenFeatures, strongest_on
from steer_core.vectors.vector import SteeringVector

SEARCH_COLUMNS = ["feature", "score", "fires on", "promotes"]
ACTIVE_COLUMNS = ["feature", "activation ÷ its max", "activation", "fired on", "promotes"]


def _escape(text: str) -> str:
    """Keep model text from turning into Markdown (a stray '*' or '#' in a context)."""
    text = text.replace("\n", "⏎")
    for ch in "\\`*_[]<>#|":
        text = text.replace(ch, "\\" + ch)
    return text


def _tokens(tokens: tuple[str, ...], n: int) -> str:
    return ", ".join(f"`{t.strip() or repr(t)}`" for t in tokens[:n])


def feature_card(feature: int, label: FeatureLabel | None, *, d_sae: int, url: str | None = None) -> str:
    """A feature's meaning: promoted tokens, top contexts with the firing token in bold, density, Neuronpedia link."""
    if not 0 <= feature < d_sae:
        return f"⚠️ Feature {feature} does not exist: this SAE has features 0..{d_sae - 1}."
    link = f" · [Neuronpedia]({url})" if url else ""
    if label is None:
        return f"### Feature {feature}{link}\nNo label: it never fired on the labelling text."
    named = f' · the word "{_escape(label.word)}"' if label.word else ""
    lines = [f"### Feature {feature}{named}{link}"]
    if label.contexts:
        lines.append(f"fires on {label.density:.2%} of tokens · max activation {label.max_activation:.3g}")
    elif label.word:
        # a rare word's feature may never fire, yet its row stays on the word ("bird", #802: silent, steered 3 of 6)
        lines.append(f'never fired on the labelling text; its decoder row is kept on "{_escape(label.word)}", so it '
                     "can still steer toward it")  # fmt: skip
    else:
        lines.append("never fired on the labelling text (its promoted tokens still say what it writes)")
    if label.promoted:
        lines.append(f"\n**Promotes:** {_tokens(label.promoted, 10)}")
    if label.contexts:
        lines.append("\n**Top contexts** (firing token in bold):")
        for c in label.contexts:
            # Bold must hug the word: a token's leading space goes outside the asterisks.
            word = c.token.lstrip()
            lead = " " if len(word) < len(c.token) else ""
            shown = f"{lead}**{_escape(word.rstrip())}**" if word.strip() else "**␣**"
            lines.append(f"- …{_escape(c.left)}{shown}{_escape(c.right)}… `{c.activation:.3g}`")
    return "\n".join(lines)


def search_rows(results: list[tuple[FeatureLabel, float]]) -> list[list[Any]]:
    return [
        [label.feature, score, label.contexts[0].render("").strip() if label.contexts else "", _plain(label.promoted)]
        for label, score in results
    ]


def concept_note(found: ConceptMatch, expected: str) -> str:
    """Above the search results: whether the top hit is the concept itself, and what to expect of search."""
    if found.carries:
        head = f"The top hit, #{found.feature}, is a feature for {found.query!r}."
    else:
        head = f"⚠️ {found.message()}"
    return f"{head}\n\n{expected}" if expected else head


def _plain(tokens: tuple[str, ...], n: int = 6) -> str:
    return " ".join(repr(t.strip() or t)[1:-1] for t in tokens[:n])


def active_rows(active: list[TokenFeatures], labels: FeatureLabels | None, k: int = 15) -> list[list[Any]]:
    """The features most active on the prompt, relative to their own maximum, with the token each fired on."""
    rows = []
    for hit in strongest_on(active, k, labels):
        label = labels.labels.get(hit.feature) if labels else None
        promoted = _plain(label.promoted) if label else ""
        rows.append([hit.feature, hit.relative, hit.activation, repr(hit.token)[1:-1], promoted])
    return rows


def sae_summary(source: SAESource, model_id: str, *, url: str | None = None) -> str:
    """What the SAE reads, and a visible warning when it was trained on another model than the loaded one."""
    lines = [f"**{source.describe()}** · {source.d_sae} features · reads `{source.point.tl_name}`"]
    if url:
        lines[0] += f" · [Neuronpedia]({url.rsplit('/', 1)[0]})"
    if source.model_name and not same_model(source.model_name, model_id):
        lines.append(
            f"\n⚠️ This SAE was trained on `{source.model_name}`, not on `{model_id}`. Steering with it is allowed; "
            "its features may mean something slightly different here, and the export's fidelity report and model "
            "card record how well it fits this model."
        )
    return "\n".join(lines)


def strength_line(vector: SteeringVector, resid_norms: dict[str, float]) -> str:
    """The vector's norm at each site, absolute and as a multiple of the median residual norm there."""
    parts = []
    for point, norm in vector.norms().items():
        ref = resid_norms.get(point)
        rel = f" = {norm / ref:.3g} × median residual norm" if ref else ""
        parts.append(f"`{point}`: vector norm {norm:.4g}{rel}")
    return " · ".join(parts)


def mismatch_note(vector: SteeringVector) -> str:
    prov = vector.provenance
    if prov.get("source") != "sae" or prov.get("sae_model_matches", True):
        return ""
    fvu = prov.get("sae_fvu_on_this_model", float("nan"))
    return (
        f"\n\n⚠️ SAE trained on `{prov['sae'].get('model_name')}`; on this model it leaves {fvu:.1%} of the "
        "activations' variance unexplained."
    )


def served_note(adapter: Any, model_id: str, vector: SteeringVector | None = None, scale: float = 1.0) -> str:
    """What the served column shows: which adapter, how faithful its own report says it is, for which model, and
    whether it was exported from the vector now selected (a user may have changed the selection since); at an engine
    scale other than 1, whether its export found that scale servable."""
    record = adapter.record
    line = f"\n\n**Served adapter** `{adapter.source}`" + (f" at engine scale {scale:g}" if scale != 1 else "")
    fid = (record and record.fidelity) or {}
    if fid:
        worst = fid.get("worst_format")
        figures = fid.get("by_format", {}).get(worst, fid) if worst else fid
        where = f" on {worst} text (its worst format)" if worst else ""
        mode = record.mode if record else "?"
        line += (
            f" ({mode} mode): top-1 agreement with the hook {figures['top1_agreement']:.1%}{where}. "
            "One early disagreement changes the rest of a greedy answer, so the served text can part from the "
            "hook's after a few words even at high agreement."
        )
    if adapter.base_model and model_id and adapter.base_model != model_id:
        line += f" ⚠️ Made for `{adapter.base_model}`, previewed on `{model_id}`."
    saved = adapter.vector
    if vector is not None and saved is not None and not vector.same_as(saved):
        line += " ⚠️ It was exported from another vector than the one selected now: export again to compare."
    return line + _scale_note(record, scale)


def _scale_note(record: SteeringRecord | None, scale: float) -> str:
    """Whether the engine scale asked for is inside the run its export measured servable (card.scale_range_text)."""
    scales = record_scales(record) if record else None
    if scale == 1 and not scales:
        return ""
    if not scales:
        return f" Its export checked no engine scales, so scale {scale:g} is unmeasured."
    servable = servable_range(scales)
    inside = servable is not None and servable[0] <= scale <= servable[1]
    return f" {'' if inside or scale == 0 else '⚠️ '}{scale_range_text(scales)}"


def scales_line(record: SteeringRecord) -> str:
    """The export's engine-scale check in one line (empty for an ablation, which has no strength to scale)."""
    scales = record_scales(record)
    return f"\n\n**Strength dial**: {scale_range_text(scales)}" if scales else ""


def fidelity_markdown(report: Any, seconds: dict[str, float], notes: list[str]) -> str:
    """The export's verdict, in the words of the model card (report: a check.verify.FidelityReport), judged on
    the worst input format: a user whose traffic is all in that format gets that fidelity."""
    worst = report.by_format.get(report.worst_format) if report.worst_format else None
    top1, ratio = (worst["top1_agreement"], worst["kl_ratio"]) if worst else (report.top1_agreement, report.kl_ratio)
    verdict = "✅" if top1 >= 0.9 and ratio <= 0.1 else "⚠️"
    per_format = by_format_table(report.to_dict()) + "\n\nAll formats together:\n\n" if worst else ""
    return (
        f"### {verdict} Verified on {report.tokens} held-out tokens (adapter vs hook steering)\n"
        + per_format
        + "| measure | value |\n|---|---|\n"
        f"| top-1 next-token agreement | **{report.top1_agreement:.1%}** |\n"
        f"| KL(hook ‖ adapter) | {report.kl_hook_adapter:.4g} nats/token |\n"
        f"| KL(hook ‖ unsteered) | {report.kl_hook_base:.4g} nats/token |\n"
        f"| KL ratio (0 = identical to hook, 1 = no steering) | {report.kl_ratio:.3g} |\n"
        f"| greedy tokens before first divergence | {report.greedy_prefix_mean:.1f} / {report.greedy_tokens} |\n"
        f"| steering effect kept (log-probability gain on the tokens the hook promotes) | {report.effect_kept:.0%} |\n"
        f"| time | {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())} |\n"
        + _dtype_row(report)
        + "".join(f"\n> {n}\n" for n in notes)
    )


def _dtype_row(report: Any) -> str:
    """Measured in bfloat16 (the app on a GPU): both the hook and the adapter run with bfloat16's rounding, so the
    figures carry that noise too; a float32 run (the command line, a CPU) gives the adapter's own fidelity."""
    dtype = getattr(report, "dtype", "float32")
    if dtype == "float32":
        return ""
    return (
        f"| measured in | **{dtype}** (the GPU's dtype): the hook and the adapter both round in it, so agreement "
        "is a little below a float32 measurement (docs/space.md); `python -m steer_core verify` re-measures in "
        "float32 |\n"
    )


def serve_line(record: SteeringRecord) -> str:
    """Where the export will be served and how to load it (steer_core.adapter.targets)."""
    files = "".join(f" + `{f}`" for f in record.target_files)
    return f"\n\n**Serve it ({record.target})**: the adapter folder{files}. {record.serve}"


def map_rows(result: Any) -> list[dict[str, Any]]:
    """A servability map (steer_core.check.servability.ServabilityMap) as plot rows, in map order."""
    unit = "" if result.unit == "abs" else "×"
    several = len({c.site for c in result.cells}) > 1
    return [
        {
            "cell": (f"L{c.layer}" + (f" {c.site}" if several else ""))
            if result.varies == "layer"
            else f"{c.strength:g}{unit}",
            "predicted top-1 (%)": round(100 * c.top1, 1),
            "servable": "yes" if c.servable else "no",
        }
        for c in result.cells
    ]


def map_markdown(result: Any) -> str:
    rows = "\n".join(
        f"| {c.layer} | {c.site} | {c.strength:g} | {c.top1:.1%} | {c.kl_ratio:.3g} | {'✅' if c.servable else '—'} |"
        for c in result.cells
    )
    return (
        f"{result.recommendation()}\n\n| layer | site | strength | predicted top-1 | KL ratio | servable |\n"
        f"|---|---|---|---|---|---|\n{rows}\n\n*Each cell: a portable adapter calibrated on "
        f"{result.calibration_tokens} tokens, measured against the hook on {result.eval_tokens} held-out tokens "
        f"of every format ({result.seconds:.0f} s in all).*"
    )


def repo_name(record: SteeringRecord) -> str:
    """A Hub repo name that says what the adapter steers, e.g. steer-smollm2-135m-instruct-f123-portable."""
    model = (record.base_model or "model").rsplit("/", 1)[-1].lower()
    prov = record.vector.provenance
    if prov.get("source") == "sae":
        what = "f" + "-".join(str(f["index"]) for f in prov.get("features", [])[:3])
    else:
        what = str(prov.get("source", "vector")).replace("_", "-")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"steer-{model}-{what}-{record.mode}")[:96].strip("-.")


# ---- shared adapters (steer_core.ui.shared) ----------------------------------------------------------------------

SHARED_COLUMNS = ["repo", "labels", "features", "strength", "site", "top-1", "servable engine scales", "likes",
                  "downloads"]  # fmt: skip
UNIT_NAMES = {"resid": "× residual norm", "abs": "absolute", "writer": "× writer output norm"}
SOURCE_NAMES = {"sae": "SAE features", "contrastive": "contrastive prompts", "file": "a vector file",
                "control_vector": "a llama.cpp control vector"}  # fmt: skip


def shared_rows(found: list[Any]) -> list[list[Any]]:
    """adapter.shared.SharedAdapter entries as the table's rows (SHARED_COLUMNS); the first cell is the repo opened."""
    rows = []
    for a in found:
        unit = UNIT_NAMES.get(a.strength_unit or "", a.strength_unit or "")
        strength = ", ".join(f"{s:g}" for s in a.strengths) + (f" {unit}" if a.strengths and unit else "")
        lo, hi = a.servable or (None, None)
        servable = "" if lo is None else f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"
        top1 = "" if a.top1 is None else f"{a.top1:.1%}"
        features = ", ".join(f"#{f}" for f in a.features)
        rows.append([a.repo_id, ", ".join(a.labels), features, strength, ", ".join(a.site), top1, servable, a.likes,
                     a.downloads])  # fmt: skip
    return rows


def _finite(value: Any) -> float | None:
    """A finite number, else None: steering.json may come from anyone's repo."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _figure(report: dict[str, Any] | None, key: str) -> float | None:
    return _finite((report or {}).get(key))


def _code(value: Any) -> str:
    """Anyone's text inside a Markdown code span: on one line, bounded, without backticks (nothing else is read
    as Markdown there)."""
    return " ".join(str(value).split())[:200].replace("`", "'")


def _text(value: Any) -> str:
    return _escape(_code(value))


def recipe_lines(record: SteeringRecord) -> list[str]:
    """What the adapter steers with, from steering.json's provenance: source, SAE, features with their labels,
    strength and site."""
    prov = record.vector.provenance if isinstance(record.vector.provenance, dict) else {}
    source = prov.get("source")
    points = ", ".join(f"`{_code(p)}`" for p in record.vector.points) or "unknown"
    lines = [f"- vector: {SOURCE_NAMES.get(str(source), _text(source or 'unknown'))}, added at {points}"]
    sae = prov["sae"] if isinstance(prov.get("sae"), dict) else {}
    if sae:
        named = " / ".join(_code(sae[k]) for k in ("release", "sae_id") if sae.get(k)) or _code(sae.get("folder", ""))
        lines.append(f"- SAE: `{named}`" + (f" at `{_code(sae['hook_name'])}`" if sae.get("hook_name") else ""))
    features: list[Any] = prov["features"] if isinstance(prov.get("features"), list) else []
    for f in [f for f in features if isinstance(f, dict)][:16]:
        label = feature_label(f)
        strength = _figure(f, "strength")
        lines.append(
            f"- feature {_text(f.get('index'))}"
            + (f", strength {strength:.3g}" if strength is not None else "")
            + (f", labelled “{_escape(label)}”" if label else "")
        )
    listed = prov.get("strength_given")
    given = [g for g in map(_finite, listed) if g is not None] if isinstance(listed, list) else []
    unit = UNIT_NAMES.get(str(prov.get("strength_unit")), _text(prov.get("strength_unit") or ""))
    if given:
        lines.append(f"- strength {', '.join(f'{g:g}' for g in given)} {unit}".rstrip())
    lines.append(f"- mode `{_code(record.mode)}`, rank {_text(record.rank)}, target modules "
                 + (", ".join(f"`{_code(m)}`" for m in record.target_modules[:8]) or "unknown"))  # fmt: skip
    return lines


def opened_markdown(opened: Any) -> str:
    """The panel of an opened shared adapter (steer_core.ui.shared.Opened): its recipe and its author's report, or
    what it lacks and what the page can still do with it."""
    head = f"### Opened `{opened.repo}` · commit `{opened.commit[:12]}`"
    if opened.kind == "plain":
        return (
            f"{head}\n\nℹ️ **A plain LoRA, not exported by steer_core**: it has no steering.json and no hook vector, "
            "so it has no recipe or fidelity report, and no steering to compare it with. The preview (step 3) shows "
            "it served beside the unsteered model, and its hook column says why it is empty. Verify here and Export "
            "for another engine need a steer_core adapter."
        )
    if opened.kind == "no_record":
        hook = (
            "Its stored hook vector is there, so the preview (step 3) still shows its hook beside it served."
            if opened.has_vector
            else "It has no hook vector either: the preview (step 3) shows it served only."
        )
        return (
            f"{head}\n\n⚠️ **Shared as a steer_core adapter, but its steering.json is missing**: its recipe and its "
            f"author's fidelity report are unknown, and it cannot be verified or exported here. {hook}"
        )
    record = opened.record
    rep = record.fidelity if isinstance(record.fidelity, dict) else {}
    made = f"Made for `{_code(record.base_model)}` by steer_core {_text(record.steer_core_version or '?')}"
    lines = [head, made, "", "#### Recipe", *recipe_lines(record), "", "#### Its author's report (held-out text)"]
    if isinstance(rep.get("by_format"), dict) and rep["by_format"]:
        try:
            lines += [by_format_table(rep), ""]
        except (AttributeError, KeyError, TypeError, ValueError):  # a damaged table is left out, not raised on
            lines.append("(its per-format table is damaged)")
    top1, ratio, greedy = (_figure(rep, k) for k in ("top1_agreement", "kl_ratio", "greedy_prefix_mean"))
    if top1 is None:
        lines.append("⚠️ Not verified: steering.json holds no fidelity report.")
    else:
        lines.append(
            f"All formats: top-1 agreement **{top1:.1%}**"
            + (f", KL ratio {ratio:.3g}" if ratio is not None else "")
            + (f", greedy tokens before divergence {greedy:.1f}" if greedy is not None else "")
            + f", on {_text(rep.get('tokens', '?'))} held-out tokens in {_text(rep.get('dtype', 'float32'))}."
        )
    scales = record_scales(record)
    if scales:
        lines.append(f"\n**Strength dial**: {scale_range_text(scales)}")
    hook = (
        "steers with this adapter's own stored vector (not re-derived: no SAE needed)"
        if opened.has_vector
        else "has no stored vector to steer with (steering_vector.safetensors is missing)"
    )
    lines.append(f"\nThe preview (step 3) {hook}, beside the adapter served; the engine scale is its strength dial.")
    return "\n".join(lines)


def verified_here_markdown(opened: Any, here: dict[str, Any]) -> str:
    """The held-out report re-run here beside the one the author published, measure by measure."""
    published = opened.record.fidelity if opened.record and isinstance(opened.record.fidelity, dict) else {}

    def cell(report: dict[str, Any], key: str, fmt: str) -> str:
        value = _figure(report, key)
        return "n/a" if value is None else format(value, fmt)

    def worst(report: dict[str, Any]) -> str:
        fmt, by_format = report.get("worst_format"), report.get("by_format")
        row = by_format.get(fmt) if isinstance(by_format, dict) and isinstance(fmt, str) else None
        top1 = _figure(row, "top1_agreement") if isinstance(row, dict) else None
        return "n/a" if top1 is None else f"{top1:.1%} ({_text(fmt)})"

    def greedy(report: dict[str, Any]) -> str:
        return f"{cell(report, 'greedy_prefix_mean', '.1f')} / {cell(report, 'greedy_tokens', '.0f')}"

    rows = [
        ("top-1 next-token agreement, all formats", cell(published, "top1_agreement", ".1%"),
         cell(here, "top1_agreement", ".1%")),
        ("top-1 in the worst format", worst(published), worst(here)),
        ("KL ratio (0 = the hook, 1 = no steering)", cell(published, "kl_ratio", ".3g"), cell(here, "kl_ratio", ".3g")),
        ("greedy tokens before first divergence", greedy(published), greedy(here)),
        ("steering effect kept", cell(published, "effect_kept", ".0%"), cell(here, "effect_kept", ".0%")),
        ("held-out tokens", cell(published, "tokens", ".0f"), cell(here, "tokens", ".0f")),
        ("measured in", _text(published.get("dtype", "float32")) if published else "n/a", _text(here.get("dtype"))),
    ]  # fmt: skip
    table = "\n".join(f"| {name} | {theirs} | {ours} |" for name, theirs, ours in rows)
    return (
        f"### Verified here: `{opened.repo}` against its stored hook vector, on held-out text\n"
        f"| measure | published by its author | measured on this server |\n|---|---|---|\n{table}\n\n"
        "Both runs draw held-out text from the same corpus; a different dtype, or a different version of steer_core, "
        "moves the figures a little."
    )


def derived_markdown(record: SteeringRecord, archive_kb: float) -> str:
    """What 'Export for another engine' wrote, where it came from, and how to serve it."""
    derived = record.extra.get("derived_from") or {}
    return (
        f"### ✅ Written for **{record.target}** from `{_code(derived.get('repo'))}` (commit "
        f"`{_code(derived.get('commit', ''))[:12]}`), as it is: no refit\n"
        f"The zip ({archive_kb:.0f} KB) holds the adapter folder and what {record.target} loads; steering.json keeps "
        "its author's fidelity report (the function is the same) and records `derived_from`, which its card says "
        "too. Push (step 5) pushes it." + serve_line(record)
    )
