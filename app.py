"""Gradio app: pick a model and SAE features, preview steered next to unsteered, export a verified LoRA, push it.

Thin wiring over steer_core: every decision lives in the package (catalog: what is offered; mix: features and
strengths; workspace: what is loaded once and shared; explain: the text shown). Run locally with `bash run.sh`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from steer_core.adapter.card import MODE_WHERE
from steer_core.adapter.served import MAX_ENGINE_SCALE, check_engine_scale
from steer_core.adapter.shared import MAX_WORDS_CHARS
from steer_core.constants import CONCEPT_STRENGTH, CONTROL_VECTOR_FILENAME, DEFAULT_MODEL, TARGET_NAMES
from steer_core.fit.refine import default_steps
from steer_core.generate import GenerationConfig, stream_sides
from steer_core.hardware import current_budget, parse_size
from steer_core.hub import Access, on_space, take_owner_token
from steer_core.model import LoadedModel, keep_freed_memory, load_model
from steer_core.sae import concept, search
from steer_core.sae.feature import embedded_sae_for, is_embedded_sae
from steer_core.sae.labels import active_features
from steer_core.template import warm_up
from steer_core.ui import catalog, explain, gate, link, shared
from steer_core.ui.exposure import exposure
from steer_core.ui.form import (
    CONTRASTIVE,
    DEFAULT_UNIT,
    FIELDS,
    SAE_FEATURES,
    SERVED_VECTOR,
    SOURCES,
    VECTOR_FILE,
    SteeringForm,
)
from steer_core.ui.gate import HEAVY, LIGHT, LOAD, PAGE, PREVIEW, PUSH
from steer_core.ui.limits import SERVER_LIMITS as LIMITS
from steer_core.ui.link import EXAMPLE_NEGATIVE, EXAMPLE_POSITIVE, EXAMPLE_PROMPT, MAX_NEW_RANGE, TEMPERATURE_RANGE
from steer_core.ui.mix import SLIDER_RANGE, UNITS, FeatureMix, check_strength, unit_of
from steer_core.ui.workspace import Workspace, make_work_room
from steer_core.vectors.recipe import VectorRecipe

try:  # ZeroGPU on Spaces: a GPU is attached only while a decorated handler runs
    import spaces

    gpu: Callable[..., Any] = spaces.GPU
except ImportError:

    def gpu(fn: Callable[..., Any] | None = None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)


QUEUE_MAX = int(os.environ.get("STEER_QUEUE_MAX", "64"))  # waiting requests past which a new one is refused at once
CSS_PATH = Path(__file__).with_name("app.css")
USER_ERRORS = (ValueError, LookupError, FileNotFoundError, FileExistsError, ImportError, OSError)
PROMPT_TOKENS = 1024  # a preview's prompt; contrastive prompts have their own, smaller limit (steer_core.ui.limits)

# Public unless it listens on loopback only (steer_core.ui.exposure): a Space, a VM on 0.0.0.0, a share link. There
# HF_TOKEN is the owner's secret: out of the environment at once, so no library sends it for a visitor; it reads the
# curated (gated) models only (steer_core.hub).
EXPOSURE = exposure()
PUBLIC = EXPOSURE.public
OWNER_TOKEN = take_owner_token(PUBLIC)
# What this hardware holds: on a GPU (ZeroGPU included) models run in bfloat16, on a CPU in float32.
BUDGET = current_budget()


def _load(name: str, token: str | bool | None = None, **hub: Any) -> LoadedModel:
    """`hub`: the pinned revision and a visitor's own cache folder (steer_core.ui.workspace). On ZeroGPU, CUDA is
    emulated outside the decorated handlers, so the weights can be placed at load time."""
    device_map = "cuda" if BUDGET.device == "cuda" else None
    return load_model(name, dtype=BUDGET.dtype, device_map=device_map, token=token, **hub)


# A Space's disk (50 GB on the free hardware) holds the shared Hub cache: past this, the least recently used
# downloads that nothing loaded holds go. Locally the Hub cache is the user's own and is left alone.
HUB_CACHE_LIMIT = parse_size(os.environ.get("STEER_HUB_CACHE_LIMIT", "20GB")) if PUBLIC else None
workspace = Workspace(_load, budget=BUDGET, pinned=(DEFAULT_MODEL,), disk_budget=HUB_CACHE_LIMIT)
_models = workspace.models  # tests put tiny models here


# Every event runs in a named lane (steer_core.ui.gate: workers, waiting places and a share per visitor of each;
# scripts/load_test.py measures them). Past QUEUE_MAX waiting requests (all lanes together) a new one is refused at
# once: the browser shows Gradio's "This application is currently busy. Please try again.", gradio_client raises
# QueueError, instead of a wait nobody sees the end of or a server that runs out of memory.
GATE = gate.GateLimits()
# ZeroGPU runs @spaces.GPU handlers in a worker process forked from this one (spaces 0.51), which keeps what it
# loads to itself and may have been forked before a load here: there a handler loads what its worker lacks.
INLINE_LOADS = os.environ.get("SPACES_ZERO_GPU") == "true"


def visitor_access(oauth: gr.OAuthToken | None, typed: str = "") -> Access:
    """The Hub access of one request: a token the visitor typed (their explicit choice, say an organisation's), else
    their sign-in; and the owner's token for the curated repos on a Space."""
    return Access(PUBLIC, OWNER_TOKEN, (typed or "").strip() or (oauth.token if oauth else None) or None)


def for_visitor(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The handler as Gradio calls it. Gradio fills in the visitor's sign-in and a progress tracker only for
    positional parameters ahead of *args, so this wrapper takes them there and hands the handler an `access` (and the
    tracker as `progress`, when it takes one). Direct calls (tests, scripts) use the handlers themselves."""
    extra = {"progress"} & set(inspect.signature(fn).parameters)

    def kwargs(oauth: gr.OAuthToken | None, progress: Any) -> dict[str, Any]:
        return {"access": visitor_access(oauth), **({"progress": progress} if extra else {})}

    if inspect.isgeneratorfunction(fn):

        def wrapped(oauth: gr.OAuthToken | None, progress=gr.Progress(), *args: Any) -> Any:
            yield from fn(*args, **kwargs(oauth, progress))
    else:

        def wrapped(oauth: gr.OAuthToken | None, progress=gr.Progress(), *args: Any) -> Any:
            return fn(*args, **kwargs(oauth, progress))

    wrapped.__name__ = wrapped.__qualname__ = fn.__name__  # Gradio names API endpoints after it
    wrapped.__doc__ = fn.__doc__
    return wrapped


@contextlib.contextmanager
def user_errors(what: str) -> Iterator[None]:
    """Errors the user can fix become a message in the UI that names the bad value; the app keeps running."""
    try:
        yield
    except gr.Error:
        raise
    except USER_ERRORS as err:
        raise gr.Error(f"{what}: {err}") from err


def get_model(name: str, access: Access | None = None, *, load: bool = False) -> LoadedModel:
    """The model of a request. Only the load lane (`load=True`) loads: a download in a preview worker would hold up
    every other visitor's preview meanwhile."""
    if not (name or "").strip():
        raise gr.Error("Pick or type a model.")
    with user_errors(f"Could not load model {name.strip()!r}"):
        try:
            return workspace.model(name, access, load=load or INLINE_LOADS)
        except USER_ERRORS:
            raise
        except Exception as err:  # transformers' errors for unsupported architectures are of many types
            raise ValueError(f"{type(err).__name__}: {err}") from err


def _choice(model_name: str, sae_pick: str, sae_folder: str) -> catalog.SAEChoice:
    with user_errors("SAE"):
        if (sae_folder or "").strip():
            choice = catalog.folder_choice(sae_folder)
        elif not (sae_pick or "").strip():
            raise ValueError("no SAE chosen: pick one from the list or type an SAE folder")
        else:
            choice = catalog.find_choice(model_name.strip(), sae_pick)  # "folder: PATH" is a folder too
        if PUBLIC and choice.path and not is_embedded_sae(choice.path):
            raise ValueError("a public Space does not read folders on its own disk: pick an SAE from the list")
        return choice


def _form(values: tuple[Any, ...]) -> SteeringForm:
    """The steering form's values, as Gradio passes them (in FIELDS order)."""
    with user_errors("Bad steering settings"):
        return SteeringForm(*values)


def _recipe(model_name: str, form: SteeringForm, tokenizer: Any = None) -> VectorRecipe:
    """The form's steering settings as a recipe, within this server's limits (steer_core.ui.limits)."""
    with user_errors("Bad steering settings"):
        return form.recipe(lambda: _choice(model_name, form.sae_pick or "", form.sae_folder or ""), LIMITS, tokenizer)


def _vector(lm: LoadedModel, recipe: VectorRecipe, access: Access | None = None, *, load: bool = False):
    with user_errors("Cannot build the steering vector"):
        return workspace.vector(lm, recipe, access, load=load or INLINE_LOADS)


def _steering(
    model_name: str, vector_args: tuple[Any, ...], access: Access | None, *, load: bool = False
) -> tuple[LoadedModel, Any]:
    """The model and the steering vector the form asks for (the model must be loaded; see get_model)."""
    lm = get_model(model_name, access)
    return lm, _vector(lm, _recipe(model_name, _form(vector_args), lm.tokenizer), access, load=load)


# ---- 1 · model ---------------------------------------------------------------------------------------------------


def on_model(
    model_name: str, progress=gr.Progress(), *, access: Access | None = None, load: bool = True
) -> tuple[Any, ...]:
    """Load the model (in the load lane), then offer its SAEs and preselect the embedded SAE's showcase feature."""
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    if load:
        progress(0.1, desc=f"loading {model_name} (the first load of an embedded model takes about a minute)")
    lm = get_model(model_name, access, load=load)
    layers = lm.model.config.get_text_config().num_hidden_layers
    status = (
        f"✅ **{lm.name}** · {lm.arch.family} · {layers} layers · "
        f"{'chat template applied to prompts' if lm.is_chat else 'base model: prompts are continued as text'}"
    )
    choices = catalog.sae_choices(lm.name)
    spec = embedded_sae_for(lm.name)
    first = choices[0] if choices else None
    mix, strength, unit = "", 1.0, DEFAULT_UNIT
    if spec is not None:
        mix, strength = FeatureMix(((spec.default_feature, spec.default_strength),)).format(), spec.default_strength
    if first is not None and first.path and not first.available_offline:
        status += (
            "\n\n⚠️ The embedded SAE is not in this install; pick a registry SAE, type an SAE folder, or use "
            "contrastive prompts."
        )
    return (
        status,
        gr.Dropdown(choices=[c.label for c in choices], value=first.label if first else None),
        gr.Number(value=spec.default_feature if spec else 0),
        mix,
        gr.Slider(value=strength),
        unit,
        SAE_FEATURES if first is not None else CONTRASTIVE,
        gr.Slider(value=default_steps(lm.model)),  # refinement pays on post-norm models (steer_core.fit.refine)
    )


def on_page(model_name: str, progress=gr.Progress(), *, access: Access | None = None) -> tuple[Any, ...]:
    """A page load: what is loaded (the default model, loaded at startup), shown without loading anything. The page
    load is an event like any other, which a request written by hand can send with any model name."""
    return on_model(model_name, progress, access=access, load=False)


@gpu
def on_page_sae(model_name: str, sae_pick: str, sae_folder: str, *, access: Access | None = None) -> str:
    return on_sae(model_name, sae_pick, sae_folder, access=access, load=False)


# ---- 2 · feature -------------------------------------------------------------------------------------------------


@gpu
def on_sae(model_name: str, sae_pick: str, sae_folder: str, *, access: Access | None = None, load: bool = True) -> str:
    """Load the SAE and its labels (in the load lane: a registry SAE downloads, and its labels take a minute)."""
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    if not (sae_pick or sae_folder or "").strip():
        return "No SAE for this model in the registry: type an SAE folder, or steer with contrastive prompts."
    lm = get_model(model_name, access)
    choice = _choice(model_name, sae_pick, sae_folder)
    with user_errors("Cannot use this SAE"):
        sae = workspace.sae(choice, lm, access, load=load or INLINE_LOADS)
        workspace.labels(choice, lm, access, compute=load or INLINE_LOADS)
    return explain.sae_summary(sae.source, lm.base_model_id, url=choice.neuronpedia_url(0))


@gpu
def show_feature(
    model_name: str, sae_pick: str, sae_folder: str, feature: float | None, *, access: Access | None = None
) -> str:
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    if not (sae_pick or sae_folder or "").strip():
        return "No SAE chosen."
    lm = get_model(model_name, access)
    choice = _choice(model_name, sae_pick, sae_folder)
    if feature is None or not math.isfinite(feature) or feature != int(feature):
        raise gr.Error(f"Feature must be a whole number, got {feature!r}.")
    with user_errors("Cannot describe this feature"):
        sae = workspace.sae(choice, lm, access, load=INLINE_LOADS)
        labels = workspace.labels(choice, lm, access, compute=INLINE_LOADS)
    f = int(feature)
    url = choice.neuronpedia_url(f) or sae.source.neuronpedia_url(f)
    return explain.feature_card(f, labels.labels.get(f), d_sae=sae.source.d_sae, url=url)


@gpu
def search_features(
    model_name: str, sae_pick: str, sae_folder: str, query: str, *, access: Access | None = None
) -> tuple[list[list[Any]], str, Any]:
    """The features found for the query; whether the top one is the concept itself (with what search achieves per
    word frequency); and the offer of the model's own reading of the query instead."""
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    with user_errors("Search"):
        LIMITS.check_search(query or "")
    lm = get_model(model_name, access)
    choice = _choice(model_name, sae_pick, sae_folder)
    with user_errors("Search"):
        sae = workspace.sae(choice, lm, access, load=INLINE_LOADS)
        labels = workspace.labels(choice, lm, access, compute=INLINE_LOADS)
        hits = search.search(labels, sae, lm.model, lm.tokenizer, query, k=25)
        found = concept.match(sae, lm.model, lm.tokenizer, query, hits)
    if not hits:
        gr.Warning(f"No feature matches {query!r}; try another word.")
    note = explain.concept_note(found, concept.expected_rates(lm.name))
    # offered whatever the top hit: the word's reading steered more of the benchmark's concepts in every band
    offer = gr.Button(f"Steer with the model's reading of {query.strip()!r}", visible=True)
    return explain.search_rows(hits), note, offer


@gpu
def use_concept(
    model_name: str, sae_pick: str, sae_folder: str, query: str, *, access: Access | None = None
) -> tuple[Any, ...]:
    """Fill the contrastive form with the model's reading of the query at the SAE's layer (steer_core.sae.concept)."""
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    lm = get_model(model_name, access)
    choice = _choice(model_name, sae_pick, sae_folder)
    with user_errors("Steer with the word's reading"):
        LIMITS.check_search(query or "")
        point = workspace.sae(choice, lm, access, load=INLINE_LOADS).source.point
        recipe = concept.concept_recipe(query, point, CONCEPT_STRENGTH)
    return (
        gr.Radio(value=CONTRASTIVE),
        "\n".join(recipe.positive),
        "\n".join(recipe.negative),
        point.layer,
        point.site,
        CONCEPT_STRENGTH,
        DEFAULT_UNIT,
    )


@gpu
def features_on_prompt(
    model_name: str, sae_pick: str, sae_folder: str, prompt: str, *, access: Access | None = None
) -> list[list[Any]]:
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    lm = get_model(model_name, access)
    choice = _choice(model_name, sae_pick, sae_folder)
    with user_errors("Features on your prompt"):
        LIMITS.check_prompt(lm.tokenizer, prompt or "", "the prompt", limit=PROMPT_TOKENS)
        sae = workspace.sae(choice, lm, access, load=INLINE_LOADS)
        labels = workspace.labels(choice, lm, access, compute=INLINE_LOADS)
        return explain.active_rows(active_features(sae, lm.model, lm.tokenizer, prompt), labels)


def pick_row(evt: gr.SelectData) -> int:
    """A click on a search or prompt result selects that row's feature."""
    return int((evt.row_value or [evt.value])[0])


def add_feature(mix: str, feature: float | None, strength: float, unit: str) -> str:
    with user_errors("Cannot add the feature"):
        if feature is None or not math.isfinite(feature) or feature < 0:
            raise ValueError(f"feature must be a whole number 0 or more, got {feature!r}")
        current = FeatureMix.parse(mix or "", strength)
        return current.with_feature(int(feature), check_strength(strength, unit_of(unit))).format()


def show_source(source: str) -> tuple[Any, Any, Any]:
    sae = source == SAE_FEATURES
    return gr.Group(visible=sae), gr.Row(visible=sae), gr.Group(visible=source in (CONTRASTIVE, VECTOR_FILE))


def on_unit(unit: str, strength: float) -> Any:
    lo, hi, step = SLIDER_RANGE[unit_of(unit)]
    return gr.Slider(minimum=lo, maximum=hi, step=step, value=min(max(strength, lo), hi))


# ---- 3 · preview -------------------------------------------------------------------------------------------------


@gpu
def preview(
    model_name: str,
    prompt: str,
    max_new: float,
    temperature: float,
    seed: float,
    served: str,
    scale: float,
    *vector_args: Any,
    access: Access | None = None,
) -> Iterator[tuple[str, str, str, str]]:
    """Unsteered, hook-steered and (given an adapter) served side by side: rows of one batched generation, streamed
    together. Closing the stream removes the steering hooks. `scale` is an engine's per-request LoRA scale: the served
    adapter runs at it, and the hook at that multiple of the strength, which is what it stands for."""
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    lm = get_model(model_name, access)
    with user_errors("Bad generation settings"):
        if not (prompt or "").strip():
            raise ValueError("the prompt is empty; type something for the model to answer")
        LIMITS.check_prompt(lm.tokenizer, prompt, "the prompt", limit=PROMPT_TOKENS)
        new = LIMITS.check_count("max new tokens", max_new, LIMITS.max_new_tokens, at_least=1)
        config = GenerationConfig(new, float(temperature), int(seed))
    with user_errors("Engine scale"):
        scale = check_engine_scale(scale)
    adapter, no_hook = None, ""
    if _form(vector_args).source == SERVED_VECTOR:  # the adapter's own stored vector: no SAE, nothing re-derived
        with user_errors("Served adapter"):
            adapter = read_served((served or "").strip(), access)
            chosen, no_hook = shared.own_vector(adapter, lm)
    else:
        _, chosen = _steering(model_name, vector_args, access)
    vector = chosen.scaled(scale) if chosen is not None and scale != 1 else chosen
    with user_errors("Strength"):
        norms = {p.tl_name: workspace.resid_norm(lm, p) for p in vector.points} if vector is not None else {}
    info = explain.strength_line(vector, norms) + explain.mismatch_note(vector) if vector is not None else no_hook
    if adapter is None and (served or "").strip():
        with user_errors("Served adapter"):
            adapter = read_served(served.strip(), access)
    sides: list[Any] = [None, *([vector] if vector is not None else []), *([adapter.at(scale)] if adapter else [])]
    if adapter is not None:
        info += explain.served_note(adapter, lm.base_model_id, chosen, scale)
    try:
        for texts in stream_sides(lm, prompt, sides, config=config):
            if vector is None:  # a plain LoRA: no hook to steer with, and the hook column says why
                yield texts[0], no_hook, texts[1], info
            else:
                yield texts[0], texts[1], texts[2] if len(texts) > 2 else "", info
    except (ValueError, RuntimeError) as err:
        raise gr.Error(f"Generation failed: {err}") from err


def read_served(source: str, access: Access) -> Any:
    """An adapter to serve beside the hook, within this server's limits (Workspace.served_adapter)."""
    return workspace.served_adapter(source, access, LIMITS)


# ---- 4 · export --------------------------------------------------------------------------------------------------


def app_targets() -> tuple[str, ...]:
    """The targets this server exports: a public one writes no merged model (the whole model, zipped per visitor)."""
    from steer_core.adapter.targets import TARGETS

    return tuple(name for name in TARGET_NAMES if not (PUBLIC and TARGETS[name].merged))


@gpu(duration=300)
def run_export(
    model_name: str,
    mode: str,
    tokens: float,
    refine_steps: float,
    target: str,
    *vector_args: Any,
    progress=gr.Progress(),
    access: Access | None = None,
) -> tuple[Any, ...]:
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    from steer_core.export import export

    with user_errors("Export settings"):
        if (target or "peft") not in app_targets():
            raise ValueError(
                f"target {target!r} is not one of {', '.join(app_targets())} on this server: a merged model is the "
                "whole model (hundreds of MB to GBs to zip and download); make it with `python -m steer_core export "
                f"--target {target}` on your own machine"
            )
        tokens = LIMITS.check_count("calibration tokens", tokens, LIMITS.calibration_tokens, at_least=256)
        refine_steps = LIMITS.check_count("refinement steps", refine_steps, LIMITS.refine_steps)
    progress(0.0, desc="building the steering vector")
    lm, vector = _steering(model_name, vector_args, access)  # the heavy lane loads nothing: the SAE loaded in step 2
    with user_errors("Export"):
        make_work_room()  # earlier exports' folders go after the hour their users had to download or push them
    work = Path(tempfile.mkdtemp(prefix="steer-export-"))
    try:
        with user_errors("Export failed"):
            result = export(
                lm,
                vector,
                work / "adapter",
                mode=mode,
                calibration_tokens=int(tokens),
                refine_steps=int(refine_steps),
                progress=lambda f, m: progress(f, desc=m),
                target=target or "peft",
            )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    archive = shutil.make_archive(str(work / "steering-adapter"), "zip", result.folder)
    import pandas as pd

    rep = result.report
    plot = pd.DataFrame({"position": range(len(rep.kl_by_position)), "KL(hook‖adapter)": rep.kl_by_position})
    card = (result.folder / "README.md").read_text(encoding="utf-8")
    return (
        explain.fidelity_markdown(rep, result.seconds, list(result.record.notes))
        + explain.scales_line(result.record)
        + explain.serve_line(result.record),
        plot,
        gr.DownloadButton(
            f"Download adapter ({Path(archive).stat().st_size / 1024:.0f} KB zip)", value=archive, visible=True
        ),
        card,
        str(result.folder),
        explain.repo_name(result.record),
    )


@gpu(duration=300)
def run_map(
    model_name: str,
    also_sites: list[str] | None,
    *vector_args: Any,
    progress=gr.Progress(),
    access: Access | None = None,
) -> tuple[str, Any]:
    """Predicted fidelity at nearby layers or strengths (a miniature export each), and what is servable; a file or
    contrastive vector also at `also_sites` (an SAE feature's site is its SAE's)."""
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    import pandas as pd

    from steer_core.check.servability import servability_map

    lm = get_model(model_name, access)
    recipe = _recipe(model_name, _form(vector_args), lm.tokenizer)
    with user_errors("Servability map"):
        result = servability_map(
            lm,
            recipe,
            sites=also_sites if recipe.layer is not None else None,
            progress=lambda f, m: progress(f, desc=f"mapping: {m}"),
            build=lambda r: workspace.vector(lm, r, access, load=INLINE_LOADS),  # the workspace's bounds, every cell
        )
    return explain.map_markdown(result), pd.DataFrame(explain.map_rows(result))


def run_control_vector(model_name: str, *vector_args: Any, access: Access | None = None) -> str:
    """The same vector as a llama.cpp control vector, for `llama-cli --control-vector`."""
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    from steer_core.vectors.controlvector import save_control_vector

    lm, vector = _steering(model_name, vector_args, access)
    with user_errors("Control vector"):
        make_work_room()
    path = Path(tempfile.mkdtemp(prefix="steer-cv-")) / CONTROL_VECTOR_FILENAME
    with user_errors("Control vector"):
        return str(save_control_vector(vector, path, model_hint=str(lm.model.config.model_type)))


def run_compare(model_name: str, *vector_args: Any, access: Access | None = None) -> str:
    """The vector's norm against the layer's, and the features of the SAE chosen in step 2 nearest to it by cosine."""
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    from steer_core.sae.feature import top_features_by_cosine

    form = _form(vector_args)
    if not form.sae_chosen:
        raise gr.Error("Choose an SAE in step 2 to compare the vector with its features.")
    choice = _choice(model_name, form.sae_pick or "", form.sae_folder or "")
    lm, vector = _steering(model_name, vector_args, access, load=True)
    with user_errors("Compare"):
        sae = workspace.sae(choice, lm, access)
        lines = []
        for point, v in sorted(vector.directions.items()):
            ref = workspace.resid_norm(lm, point)
            lines.append(
                f"**{point.tl_name}**: norm {float(v.norm()):.4g} = {float(v.norm()) / ref:.3g} × median residual norm"
            )
            lines += [f"- feature {i}: cos {c:+.3f}" for i, c in top_features_by_cosine(sae, v, 10)]
    return "\n".join(lines)


# ---- 5 · push ----------------------------------------------------------------------------------------------------


def run_push(
    folder: str,
    repo_id: str,
    private: bool,
    update_existing: bool,
    token: str,
    oauth: gr.OAuthToken | None = None,
    profile: gr.OAuthProfile | None = None,
) -> str:
    """Push as the visitor: their sign-in or the token they typed. On a Space never with the owner's HF_TOKEN; locally
    HF_TOKEN or the saved login also work (steer_core.hub.Access)."""
    from steer_core.adapter.publish import RepoExistsError, push

    try:
        secret = visitor_access(oauth, token).write_token()
    except PermissionError as err:
        raise gr.Error(f"{str(err)[:1].upper()}{str(err)[1:]}.") from err
    if not folder:
        raise gr.Error("Export an adapter first (step 4): only verified adapters are pushed.")
    if not Path(folder).is_dir():
        raise gr.Error("This export's files were cleaned up (they are kept for an hour): export it again, then push.")
    repo_id = (repo_id or "").strip()
    try:
        if "/" not in repo_id:  # a bare name goes under the pushing user's own namespace
            from huggingface_hub import HfApi

            signed_in = profile is not None and oauth is not None and secret == oauth.token
            user = profile.username if signed_in else HfApi(token=secret).whoami()["name"]
            repo_id = f"{user}/{repo_id}"
        result = push(folder, repo_id, token=secret, private=private, update_existing=update_existing)
    except RepoExistsError as err:
        return f"⚠️ Not pushed yet. {err.plan.describe()} Tick **Update the existing repo** and push again to do so."
    except ValueError as err:
        raise gr.Error(str(err)) from err
    except Exception as err:  # network and permission errors from the Hub; never echo the token
        raise gr.Error(f"Push failed: {type(err).__name__}: {str(err).replace(secret, '***')}") from err
    return f"✅ Pushed: [{result.url}]({result.url}) ({result.describe(private)})"


# ---- shared adapters: find one for the loaded model, open it, verify it here, write it for another engine ------


def list_shared(model_name: str, words: str, *, access: Access | None = None) -> list[list[Any]]:
    """The Hub's steer-core adapters of the loaded model's base, narrowed by words in their labels, read as the
    visitor (anonymous on a Space: public adapters only)."""
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    lm = get_model(model_name, access)
    with user_errors("Shared adapters"):
        found = shared.find(lm.base_model_id, words or "", access)
    if not found:
        gr.Info(f"No shared adapter of {lm.base_model_id} matches {words!r}." if words else
                f"No steer_core adapter of {lm.base_model_id} is shared on the Hub yet.")  # fmt: skip
    return explain.shared_rows(found)


def pick_shared(evt: gr.SelectData) -> str:
    """A click on a row of the shared adapters picks its repo."""
    return str((evt.row_value or [evt.value])[0])


def open_shared(model_name: str, repo: str, *, access: Access | None = None) -> tuple[Any, ...]:
    """Download the adapter (bounded as a served preview's) and fill the page from it: the served box, the engine
    scale, the steering source (its own stored vector), its strength, and its recipe and report."""
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    lm = get_model(model_name, access)
    with user_errors("Open shared adapter"):
        make_work_room()
        opened = shared.open_adapter(workspace, lm, repo, access, LIMITS)
    given = opened.strength()
    return (
        opened.repo,
        1.0,
        SERVED_VECTOR,
        given[0] if given else gr.update(),
        next((label for label, u in UNITS.items() if given and u == given[1]), gr.update()),
        explain.opened_markdown(opened),
        opened,
    )


def open_linked(
    model_name: str, served: str, source: str, opened: shared.Opened | None, *, access: Access | None = None
) -> tuple[Any, Any]:
    """A link to a shared adapter's own vector (`src=adapter&adapter=REPO`) opens it as Open does, keeping the link's
    strength and scale: its recipe and report shown, and Verify here / Export ready. Anything else: no change."""
    repo = (served or "").strip()
    if source != SERVED_VECTOR or not repo or (opened is not None and opened.repo == repo):
        return gr.update(), opened
    *_, report, new = open_shared(model_name, repo, access=access)
    return report, new


def _opened(opened: shared.Opened | None) -> shared.Opened:
    if opened is None:
        raise gr.Error("Open a shared adapter first (list them, then click one, or type its repo).")
    return opened


@gpu(duration=120)
def verify_shared(model_name: str, opened: shared.Opened | None, *, access: Access | None = None) -> str:
    """The held-out report re-run on this server, beside the one its author published."""
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    lm = get_model(model_name, access)
    opened = _opened(opened)
    with user_errors("Verify here"):
        return explain.verified_here_markdown(opened, shared.verify_here(lm, opened))


@gpu
def export_shared(
    model_name: str, opened: shared.Opened | None, target: str, *, access: Access | None = None
) -> tuple[Any, ...]:
    """The opened adapter as it is, written for another engine and zipped; Push (step 5) takes it from there."""
    access = access or visitor_access(None)  # direct calls: an anonymous visitor of this server
    lm = get_model(model_name, access)
    opened = _opened(opened)
    with user_errors("Export for another engine"):
        make_work_room()
        folder, record = shared.derive(lm, opened, target or "")
    archive = Path(shutil.make_archive(str(folder.parent / "steering-adapter"), "zip", folder))
    size = archive.stat().st_size / 1024
    return (
        explain.derived_markdown(record, size),
        gr.DownloadButton(f"Download ({size:.0f} KB zip)", value=str(archive), visible=True),
        str(folder),
        explain.repo_name(record),
    )


# ---- layout ------------------------------------------------------------------------------------------------------


def build_demo() -> gr.Blocks:
    """The page and its events. Built on first use of `demo` (or by main), not on import: a test or script that
    imports this module for its handlers pays for no layout."""
    _default_choices = catalog.sae_choices(DEFAULT_MODEL)
    _default_spec = embedded_sae_for(DEFAULT_MODEL)
    # delete_cache: Gradio's own copies of the files it served (the downloaded zips, uploaded vectors) go after an
    # hour too.
    with gr.Blocks(title="Steering → servable LoRA", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# 🧭 Steering → servable LoRA\n"
            "Pick a model and an SAE feature, compare steered and unsteered answers, then export the steering as a "
            "**verified rank-1 LoRA** that vLLM, PEFT and LoRA-upload services can serve.",
            elem_id="title",
        )
        if EXPOSURE.banner():
            gr.Markdown(EXPOSURE.banner(), elem_id="exposure")
        gr.Markdown("## 1 · Model", elem_classes="step-head")
        with gr.Row(equal_height=True):
            model_name = gr.Dropdown(
                catalog.model_choices(BUDGET, gated_readable=not PUBLIC or bool(OWNER_TOKEN)),
                value=DEFAULT_MODEL,
                allow_custom_value=True,
                scale=4,
                label="Model",
                info="embedded models run offline; or type a Hub id"
                + ("" if PUBLIC else " or a local model folder")
                + f" · this server: {BUDGET.describe()}",
            )
            load_btn = gr.Button("Load model", scale=1)
        model_status = gr.Markdown()
        shared_title = "Adapters others shared for this model: find one, open it, verify it, serve it elsewhere"
        with gr.Accordion(shared_title, open=False, elem_id="shared"):
            with gr.Row(equal_height=True):
                shared_words = gr.Textbox(
                    label="Words in their labels (empty: all)", scale=3, max_length=MAX_WORDS_CHARS
                )
                list_btn = gr.Button("List shared adapters", scale=1)
            shared_df = gr.Dataframe(headers=explain.SHARED_COLUMNS, interactive=False, max_height=260,
                                     label="click a row to open it", elem_id="shared-list")  # fmt: skip
            with gr.Row(equal_height=True):
                shared_repo = gr.Textbox(label="or type a shared adapter's repo", placeholder="namespace/name", scale=3,
                                         max_length=gate.NAME_CHARS)  # fmt: skip
                open_btn = gr.Button("Open", variant="primary", scale=1)
            opened_md = gr.Markdown(elem_id="shared-opened", padding=True)
            opened = gr.State(None)
            with gr.Row(equal_height=True):
                verify_btn = gr.Button("Verify here: its held-out report on this server", scale=2)
                derive_target = gr.Radio(list(shared.derive_targets()), value="llama.cpp", label="Another engine",
                                         scale=2)  # fmt: skip
                derive_btn = gr.Button("Export for another engine (as it is, no refit)", scale=2)
            verified_md = gr.Markdown()
            derived_md = gr.Markdown()
            derived_zip = gr.DownloadButton("Download (zip)", visible=False, variant="primary")

        gr.Markdown("## 2 · Steering vector", elem_classes="step-head")
        source = gr.Radio(SOURCES, value=SAE_FEATURES, label="Steer with", container=False)
        with gr.Group(visible=True) as sae_box:
            with gr.Row():
                sae_pick = gr.Dropdown(
                    [c.label for c in _default_choices],
                    value=_default_choices[0].label if _default_choices else None,
                    allow_custom_value=True,
                    scale=3,
                    label="SAE (release / layer)",
                    info="the embedded SAE works offline; registry SAEs download from the Hub",
                )
                sae_folder = gr.Textbox(
                    label="or an SAE folder (SAE Lens format)",
                    scale=2,
                    placeholder="/path/to/sae",
                    visible=not PUBLIC,
                    max_length=gate.NAME_CHARS,
                )
            sae_info = gr.Markdown(padding=True)
        with gr.Row(visible=True) as feature_box:
            with gr.Column(scale=2):
                with gr.Tab("By index"):
                    feature = gr.Number(
                        _default_spec.default_feature if _default_spec else 0, precision=0, minimum=0, label="Feature"
                    )
                    show_btn = gr.Button("Show feature")
                with gr.Tab("Search by meaning"):
                    query = gr.Textbox(
                        label="Words", placeholder="e.g. dog, rain, king", max_length=LIMITS.search_chars
                    )
                    search_btn = gr.Button("Search")
                    concept_md = gr.Markdown(elem_id="concept-note")
                    concept_btn = gr.Button(visible=False, elem_id="use-concept", size="sm")
                    search_df = gr.Dataframe(
                        elem_id="search-results",
                        headers=explain.SEARCH_COLUMNS,
                        interactive=False,
                        max_height=260,
                        label="click a row to pick it",
                    )
                with gr.Tab("Active on my prompt"):
                    active_btn = gr.Button("Which features fire on the preview prompt?")
                    active_df = gr.Dataframe(
                        headers=explain.ACTIVE_COLUMNS,
                        interactive=False,
                        max_height=260,
                        label="click a row to pick it",
                    )
            with gr.Column(scale=3):
                card_md = gr.Markdown("Pick a feature to see what it means.", elem_id="feature-card", padding=True)
        with gr.Row(equal_height=True):
            strength = gr.Slider(
                *SLIDER_RANGE["resid"][:2],
                value=_default_spec.default_strength if _default_spec else 1.0,
                step=SLIDER_RANGE["resid"][2],
                label="Strength",
                scale=3,
            )
            unit = gr.Radio(list(UNITS), value=DEFAULT_UNIT, label="Strength unit", scale=2)
            add_btn = gr.Button("Add feature ➕", scale=1)
        mix = gr.Textbox(
            FeatureMix(((_default_spec.default_feature, _default_spec.default_strength),)).format()
            if _default_spec
            else "",
            label="Features to steer with (feature:strength, comma-separated; each has its own strength)",
            max_length=gate.MIX_CHARS,
        )
        with gr.Group(visible=False) as other_box:
            with gr.Row():
                pos = gr.Textbox(
                    EXAMPLE_POSITIVE, lines=3, label="Positive prompts (one per line)", max_length=gate.PROMPTS_CHARS
                )
                neg = gr.Textbox(
                    EXAMPLE_NEGATIVE, lines=3, label="Negative prompts (one per line)", max_length=gate.PROMPTS_CHARS
                )
            with gr.Row():
                layer = gr.Slider(0, 40, value=10, step=1, label="Layer (contrastive / file)")
                site = gr.Dropdown(["resid_post", "resid_pre", "mlp_out", "attn_out"], value="resid_post", label="Site")
                vec_file = gr.File(
                    label="Vector file (.safetensors / .pt / .npy, or a llama.cpp control vector .gguf)",
                    type="filepath",
                )
        form = {
            "source": source, "sae_pick": sae_pick, "sae_folder": sae_folder, "mix": mix, "strength": strength,
            "unit": unit, "positive": pos, "negative": neg, "layer": layer, "site": site, "vector_file": vec_file,
        }  # fmt: skip
        vector_inputs = [form[name] for name in FIELDS]  # the order SteeringForm takes them
        sae_inputs = [model_name, sae_pick, sae_folder]

        with gr.Tab("3 · Preview"):
            prompt = gr.Textbox(
                EXAMPLE_PROMPT,
                label="Prompt (the chat template is applied for instruct models)",
                max_length=gate.PROMPT_CHARS,
            )
            with gr.Row():
                max_new = gr.Slider(*MAX_NEW_RANGE, value=48, step=8, label="Max new tokens")
                temperature = gr.Slider(*TEMPERATURE_RANGE, value=0, step=0.1, label="Temperature (0 = greedy)")
                seed = gr.Number(0, label="Seed", precision=0)
            served = gr.Textbox(
                label="Served adapter: an adapter folder or Hub repo (an export fills it in)",
                placeholder="empty: preview the hook only; after an export: also what an endpoint serves",
                elem_id="served-src",
                max_length=gate.NAME_CHARS,
            )
            served_scale = gr.Slider(
                0,
                MAX_ENGINE_SCALE,
                value=1,
                step=0.05,
                label="Engine scale: the LoRA scale a llama-server request sets; the hook column runs at this multiple "
                "of the strength, which is what the scaled adapter stands for",
                elem_id="served-scale",
            )
            with gr.Row(equal_height=True):
                go = gr.Button("Generate", variant="primary", scale=3)
                copy_btn = gr.Button("🔗 Copy link", scale=1, elem_id="copy-link")
            link_box = gr.Textbox(
                label="Link to this page",  # named in the gate's refusals; the box shows the link, not its label
                show_label=False,
                interactive=False,
                buttons=["copy"],
                elem_id="link",
                max_length=link.LINK_CHARS + gate.NAME_CHARS,  # the query and this page's address
            )
            link_note = gr.Markdown(elem_id="link-note")
            pending_link = gr.State(None)  # a link's model and steering, until the model's own defaults are set
            with gr.Row():
                out_base = gr.Textbox(label="Unsteered", lines=7, elem_id="out-base")
                out_steer = gr.Textbox(label="Steered (hook: what the steering means)", lines=7, elem_id="out-steered")
                out_served = gr.Textbox(
                    label="Served adapter (what a LoRA endpoint generates)", lines=7, elem_id="out-served"
                )
            steer_info = gr.Markdown(elem_id="steer-info")

        with gr.Tab("4 · Export"):
            with gr.Row():
                mode = gr.Radio(
                    list(MODE_WHERE),
                    value="portable",
                    label="Mode",
                    info=" · ".join(f"**{k}**: {v}" for k, v in MODE_WHERE.items()),
                    scale=3,
                )
                tokens = gr.Slider(
                    1024, 65536, value=16384, step=1024, label="Calibration tokens", scale=2, elem_id="calibration"
                )
                refine_steps = gr.Slider(
                    0,
                    300,
                    value=0,
                    step=10,
                    scale=2,
                    label="Refinement steps (portable; 2-4 s each on a CPU, more faithful)",
                    info="On a GPU 300 (512 tokens a step); on a CPU 60 on post-norm models (Gemma 2/3), 0 elsewhere",
                )
            with gr.Accordion(
                "Before exporting: which layers or strengths serve faithfully? (~1 min for 5 strengths, ~15 s a layer)",
                open=False,
            ):
                with gr.Row():
                    map_btn = gr.Button("Map the predicted fidelity", scale=2)
                    map_sites = gr.CheckboxGroup(
                        ["attn_out", "resid_post"],
                        value=[],
                        label="Also map at these sites (file and contrastive vectors; doubles the time)",
                        info="attn_out: added between attention and MLP, served exactly by o_proj, whose input is "
                        "nearly constant (docs/fidelity.md)",
                        scale=3,
                    )
                with gr.Row():
                    map_md = gr.Markdown()
                    map_plot = gr.BarPlot(
                        x="cell",
                        y="predicted top-1 (%)",
                        color="servable",
                        y_lim=[0, 100],
                        height=220,
                        label="Servability",
                    )
            target = gr.Radio(
                list(app_targets()),
                value="peft",
                label="Where will you serve it?",
                info="peft: PEFT, vLLM, SGLang, LoRAX, Together · fireworks: rank padded to 4 · llama.cpp: + GGUF LoRA "
                "and control vector"
                + (
                    " · merged weights (Ollama, engines without LoRA): `python -m steer_core export --target merged` "
                    "or `--target ollama` on your machine"
                    if PUBLIC
                    else " · ollama: merged model as GGUF + Modelfile · merged: the base model with the adapter merged"
                ),
            )
            export_btn = gr.Button("Calibrate → build → verify", variant="primary")
            with gr.Row():
                with gr.Column(scale=3):
                    report = gr.Markdown()
                with gr.Column(scale=2):
                    plot = gr.LinePlot(
                        x="position",
                        y="KL(hook‖adapter)",
                        height=220,
                        label="KL(hook ‖ adapter) along the held-out text",
                    )
            download = gr.DownloadButton("Download adapter (zip)", visible=False, variant="primary", elem_id="download")
            with gr.Accordion("Model card (README.md of the adapter)", open=False):
                card = gr.Markdown()
            folder = gr.State("")
            with gr.Accordion("More: llama.cpp control vector, nearest SAE features", open=False):
                with gr.Row():
                    cv_btn = gr.Button("Same vector as a llama.cpp control vector (GGUF, exact, no calibration)")
                    cv_file = gr.File(label=CONTROL_VECTOR_FILENAME)
                compare_btn = gr.Button("Nearest features of the SAE folder (step 2) to this vector, by cosine")
                compared = gr.Markdown()

        with gr.Tab("5 · Push to the Hub"):
            if os.environ.get("SPACE_ID"):  # OAuth exists on Spaces only; locally use a token or HF_TOKEN
                gr.LoginButton()
            with gr.Row():
                repo_id = gr.Textbox(
                    label="Repo (NAME goes under your namespace, or USER/NAME)", scale=3, max_length=gate.NAME_CHARS
                )
                private = gr.Checkbox(True, label="Private (a new repo)")
                update_existing = gr.Checkbox(False, label="Update the existing repo")
                token = gr.Textbox(
                    label="or a write token (used once, never stored)",
                    type="password",
                    scale=2,
                    max_length=gate.NAME_CHARS,
                )
            push_btn = gr.Button("Push verified adapter", variant="primary")
            pushed = gr.Markdown()

        # ---- events, each in its lane (steer_core.ui.gate; a test checks that none is left out) ----
        model_outputs = [model_status, sae_pick, feature, mix, strength, unit, source, refine_steps]
        # A page load shows the default model, loaded at startup (main), and never loads (a raw request can send any
        # model name with it); a visitor's own pick may download for minutes, in the load lane.
        # A link (steer_core.ui.link) sets the page's own fields at once, and the model's steering after the model's
        # defaults (on_page, on_model), which would overwrite it; a link to another model goes on in its load.
        page_inputs = [prompt, max_new, temperature, seed, served, served_scale]
        link_opened = demo.load(
            link.on_open, model_name, [pending_link, link_note, model_name, *page_inputs], api_name=False,
            **PAGE.events,
        ).success(link.wait_for_model, pending_link, None, api_name=False, **PAGE.events)  # fmt: skip
        link_outputs = [pending_link, feature, *(form[n] for n in link.STEERING_FIELDS)]
        apply_link = {"fn": link.apply_pending, "inputs": [pending_link, model_name], "outputs": link_outputs,
                      "api_name": False, **LIGHT.events}  # fmt: skip
        for start, (model_fn, sae_fn), lane, name in (
            (link_opened.success, (on_page, on_page_sae), PAGE, False),
            (partial(gr.on, [load_btn.click, model_name.change]), (on_model, on_sae), LOAD, "load_model"),
        ):
            applied = start(for_visitor(model_fn), model_name, model_outputs, api_name=name, **lane.events)
            applied = applied.success(**apply_link)
            applied.success(
                for_visitor(sae_fn), sae_inputs, sae_info, api_name=name and "load_sae", **lane.events
            ).success(for_visitor(show_feature), [*sae_inputs, feature], card_md, api_name=False, **PREVIEW.events)
            applied.success(
                for_visitor(open_linked), [model_name, served, source, opened], [opened_md, opened], api_name=False,
                **LOAD.events,
            )  # fmt: skip
        copy_btn.click(
            link.on_copy, [model_name, *page_inputs, *vector_inputs], [link_box, link_note], api_name=False,
            **LIGHT.events,
        ).then(None, link_box, link_box, js=link.COPY_JS, api_name=False, **LIGHT.events)  # fmt: skip
        source.change(show_source, source, [sae_box, feature_box, other_box], **LIGHT.events)
        gr.on(
            [sae_pick.input, sae_folder.submit], for_visitor(on_sae), sae_inputs, sae_info, api_name=False,
            **LOAD.events,
        )  # fmt: skip
        gr.on(
            [show_btn.click, feature.submit], for_visitor(show_feature), [*sae_inputs, feature], card_md,
            api_name="show_feature", **PREVIEW.events,
        )  # fmt: skip
        gr.on(
            [search_btn.click, query.submit],
            for_visitor(search_features),
            [*sae_inputs, query],
            [search_df, concept_md, concept_btn],
            api_name="search_features",
            **PREVIEW.events,
        )
        concept_btn.click(
            for_visitor(use_concept), [*sae_inputs, query], [source, pos, neg, layer, site, strength, unit],
            api_name="use_concept", **PREVIEW.events,
        )  # fmt: skip
        active_btn.click(for_visitor(features_on_prompt), [*sae_inputs, prompt], active_df, **PREVIEW.events)
        for table in (search_df, active_df):
            table.select(pick_row, None, feature, **LIGHT.events).then(
                for_visitor(show_feature), [*sae_inputs, feature], card_md, **PREVIEW.events
            )
        add_btn.click(add_feature, [mix, feature, strength, unit], mix, **LIGHT.events)
        unit.change(on_unit, [unit, strength], strength, **LIGHT.events)
        # The endpoints scripts call (gradio_client, scripts/load_test.py) are named here, so a rename cannot break
        # them.
        go.click(
            for_visitor(preview),
            [model_name, *page_inputs, *vector_inputs],
            [out_base, out_steer, out_served, steer_info],
            api_name="preview",
            **PREVIEW.events,
        )
        export_btn.click(
            for_visitor(run_export),
            [model_name, mode, tokens, refine_steps, target, *vector_inputs],
            [report, plot, download, card, folder, repo_id],
            api_name="run_export",
            **HEAVY.events,
        ).success(lambda f: f, folder, served, **LIGHT.events)
        map_btn.click(
            for_visitor(run_map),
            [model_name, map_sites, *vector_inputs],
            [map_md, map_plot],
            api_name="run_map",
            **HEAVY.events,
        )
        cv_btn.click(for_visitor(run_control_vector), [model_name, *vector_inputs], cv_file, **HEAVY.events)
        compare_btn.click(for_visitor(run_compare), [model_name, *vector_inputs], compared, **LOAD.events)
        gr.on(
            [list_btn.click, shared_words.submit], for_visitor(list_shared), [model_name, shared_words], shared_df,
            api_name="list_shared", **PREVIEW.events,
        )  # fmt: skip
        opened_outputs = [served, served_scale, source, strength, unit, opened_md, opened]
        gr.on(
            [open_btn.click, shared_repo.submit], for_visitor(open_shared), [model_name, shared_repo], opened_outputs,
            api_name="open_shared", **LOAD.events,
        )  # fmt: skip
        shared_df.select(pick_shared, None, shared_repo, **LIGHT.events).then(
            for_visitor(open_shared), [model_name, shared_repo], opened_outputs, api_name=False, **LOAD.events
        )
        verify_btn.click(
            for_visitor(verify_shared), [model_name, opened], verified_md, api_name="verify_shared", **HEAVY.events
        )
        derive_btn.click(
            for_visitor(export_shared), [model_name, opened, derive_target], [derived_md, derived_zip, folder, repo_id],
            api_name="export_shared", **HEAVY.events,
        )  # fmt: skip
        push_btn.click(
            run_push, [folder, repo_id, private, update_existing, token], pushed, api_name="push", **PUSH.events
        ).then(
            lambda: False, None, update_existing, api_name=False, **LIGHT.events
        )  # each update of an existing repo is confirmed anew, after its own plan was shown
    return demo


def page() -> gr.Blocks:
    """The page, built once."""
    if "demo" not in globals():
        globals()["demo"] = build_demo()
    return globals()["demo"]


def __getattr__(name: str) -> Any:  # PEP 562: `app.demo` (Gradio's reload mode, tests) builds the page on first use
    if name == "demo":
        return page()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="green", font=["ui-sans-serif", "system-ui", "sans-serif"])


def main() -> None:
    keep_freed_memory()  # process-wide, so here and not on import (tests import this module)
    # Load (and on first run, dequantize and cache) before the first visitor arrives: a curated model, so on a Space
    # the owner's token reads it where it needs one.
    get_model(DEFAULT_MODEL, Access(PUBLIC, OWNER_TOKEN), load=True)
    warm_up()  # the chat-template workers (steer_core.template), so the first visitor does not wait for them
    serve()


def serve(**launch: Any) -> Any:
    """Queue and launch the page as main does (tests pass `prevent_thread_lock` and the like). Where to listen is
    Gradio's own setting: GRADIO_SERVER_NAME (a Space sets 0.0.0.0) and GRADIO_SERVER_PORT; 127.0.0.1:7860 by
    default, so `bash run.sh` serves this machine only. Uploads past the limit are refused by Gradio before they are
    written (steer_core.ui.limits). Every request passes the gate first (steer_core.ui.gate), and no event runs
    outside the queue: api_open=False refuses Gradio's REST routes, which it leaves open off Spaces."""
    gatekeeper = gate.middleware(page, GATE, behind_proxy=on_space())
    return (
        page()
        .queue(default_concurrency_limit=PREVIEW.workers, max_size=QUEUE_MAX, api_open=False)
        .launch(
            theme=THEME,
            css_paths=CSS_PATH,
            max_file_size=LIMITS.upload_bytes,
            max_threads=GATE.threads,
            app_kwargs={"middleware": [gatekeeper]},
            **launch,
        )
    )


if __name__ == "__main__":
    main()
