"""Links that restore the page: the model, the steering, the served adapter and its engine scale, the prompt and the
generation settings, as a query string (`?v=1&model=gpt2&mix=676:0.5&temp=0.7`) read back on page load.

Two pure functions do the work, and Gradio handlers wrap them:

- `link_query(state) -> (query, notes)`: the query of a `PageState` (the preview's inputs), with only the values
  that differ from the page's defaults, URL-encoded; the notes say what a link cannot carry (a vector file uploaded
  here, a folder on this server, anything that looks like a token) and was left out.
- `restore(query_params) -> (values, notes)`: the component values a link sets, by component name (`model_name`,
  `prompt`, ..., the steering form's FIELDS), each checked against the page's own bounds (gate's characters per
  field, the sliders' ranges, `check_repo_id`); the notes say, in words, what was ignored and why. It never raises
  and reads at most MAX_PARAMS parameters of bounded length, with no regex of its own (FeatureMix's and
  huggingface_hub's repo-id check are fixed and linear, on at most 1,000 and 193 characters).

The parameters of version 1 (`v=1`), each given at most once:

| parameter | component | value |
|---|---|---|
| `model` | model_name | one of the listed models, or a Hub model id (`namespace/name`) |
| `src` | source | `features`, `contrastive`, `file` or `adapter` (the served adapter's own vector) |
| `sae` | sae_pick | a listed SAE: `embedded: NAME (offline)` or `RELEASE / SAE_ID` |
| `mix` | mix | the features and strengths as typed: `676:0.5,2379:-1` |
| `strength`, `unit` | strength, unit | a number in the slider's range; `resid`, `abs` or `writer` |
| `pos`, `neg` | positive, negative | contrastive prompts, one a line |
| `layer`, `site` | layer, site | 0-40; `resid_post`, `resid_pre`, `mlp_out` or `attn_out` |
| `adapter`, `scale` | served, served_scale | a Hub adapter repo id; the engine scale, 0-4 |
| `prompt`, `max_new`, `temp`, `seed` | prompt, max_new, temperature, seed | the preview's prompt and settings |

A link carries the fields its steering source uses (SAE features: `src sae mix strength unit`; contrastive: `src pos
neg layer site strength unit`; file: `src layer site strength unit`; a shared adapter's own vector: `src strength
unit` beside `adapter`), and of those only the ones that differ from a fresh page's. What the page sets per model
(source, SAE, mix, strength, unit: `on_model`) is compared with the defaults on the default model only; a link to
another model carries them all. A parameter a link omits keeps the page's value. Names beginning with `__` are
Gradio's or the Hub's own (`?__theme=dark`) and are passed over silently. Every request of the page carries its
query string (Gradio's client sends `location.search` with each queue join), so a link past LINK_CHARS leaves out
the contrastive prompts, then the prompt, and says so.

Wiring in app.py (`build_demo`). The model and the steering are applied after the model's own defaults (`on_page`,
`on_model`), which would overwrite them otherwise; a link to another model sets `model_name`, whose load
(`model_name.change`) then applies the steering, and stops the page-load chain (`wait_for_model`) so `on_page`
cannot reset it. Gradio 6.31: the page-load event's `request: gr.Request` has `request.query_params` (the page's
query: the client appends it to every queue join); event listeners take `js=` (run in the browser; with `fn=None` its
return value sets the outputs). `gr.on` does not take a `Dependency.then` as a trigger, hence the explicit chains:

    from functools import partial
    from steer_core.ui import link

    # 3 · Preview, beside the Generate button:
    with gr.Row():
        copy_btn = gr.Button("🔗 Copy link", size="sm", scale=0, elem_id="copy-link")
        link_box = gr.Textbox(show_label=False, interactive=False, buttons=["copy"], elem_id="link", scale=4)
    link_note = gr.Markdown(elem_id="link-note")
    pending_link = gr.State(None)  # the link's model and steering, until the model's own defaults are set

    # events: replaces the `for triggers, (model_fn, sae_fn), lane, name in ...` loop
    page_inputs = [prompt, max_new, temperature, seed, served, served_scale]  # link.PAGE_FIELDS, in order
    steering = [form[name] for name in link.STEERING_FIELDS]
    link_opened = demo.load(
        link.on_open, model_name, [pending_link, link_note, model_name, *page_inputs], api_name=False, **PAGE.events
    ).success(link.wait_for_model, pending_link, None, api_name=False, **PAGE.events)
    apply_link = {"fn": link.apply_pending, "inputs": [pending_link, model_name],
                  "outputs": [pending_link, feature, *steering], "api_name": False, **LIGHT.events}
    for start, (model_fn, sae_fn), lane, name in (
        (link_opened.success, (on_page, on_page_sae), PAGE, False),
        (partial(gr.on, [load_btn.click, model_name.change]), (on_model, on_sae), LOAD, "load_model"),
    ):
        start(for_visitor(model_fn), model_name, model_outputs, api_name=name, **lane.events).success(
            **apply_link
        ).success(
            for_visitor(sae_fn), sae_inputs, sae_info, api_name=name and "load_sae", **lane.events
        ).success(for_visitor(show_feature), [*sae_inputs, feature], card_md, api_name=False, **PREVIEW.events)
    copy_btn.click(
        link.on_copy,
        [model_name, prompt, max_new, temperature, seed, served, served_scale, *vector_inputs],  # the preview's
        [link_box, link_note],
        api_name=False,
        **LIGHT.events,
    ).then(None, link_box, link_box, js=link.COPY_JS, api_name=False, **LIGHT.events)

(tests/ui/test_app.py's lane test then finds `on_open`, not `on_page`, as the page-load event.) A link to a shared
adapter (`src=adapter&adapter=REPO`) sets the served box and the source; filling the page from the adapter's
steering.json as well (the Shared adapters' open) is one more `.success` after `apply_link`, given `served`. The
copied URL is `location.origin + location.pathname` + the query: what the browser shows, on a Space the `*.hf.space`
address. Where the clipboard is refused (plain http off localhost) the box still shows the link to copy by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import astuple, dataclass, field, replace
from itertools import islice
from typing import Any
from urllib.parse import quote_plus, urlencode

import gradio as gr

from steer_core.adapter.served import MAX_ENGINE_SCALE
from steer_core.constants import DEFAULT_MODEL, SITES
from steer_core.hub import check_repo_id
from steer_core.model import EMBEDDED_MODELS, is_local
from steer_core.sae.feature import embedded_sae_for
from steer_core.ui.catalog import CURATED_MODELS, embedded_choice
from steer_core.ui.form import (
    CONTRASTIVE,
    DEFAULT_UNIT,
    FIELDS,
    SAE_FEATURES,
    SERVED_VECTOR,
    VECTOR_FILE,
    SteeringForm,
    lines,
)
from steer_core.ui.gate import MIX_CHARS, NAME_CHARS, PROMPT_CHARS, PROMPTS_CHARS
from steer_core.ui.limits import SERVER_LIMITS
from steer_core.ui.mix import SLIDER_RANGE, UNITS, FeatureMix, check_strength, unit_of

LINK_VERSION = 1
MAX_PARAMS = 32  # a link of this app has at most 18; past this a query is not one of ours and is not read
LINK_CHARS = 8_000  # a URL past this is refused by proxies and servers (uvicorn: 16 KiB for the whole request head)
NUMBER_CHARS = 32
FEATURE_MAX = 2**31 - 1  # the widest SAEs have ~2**20 features
SEED_MAX = 2**53 - 1  # the seed box is a JavaScript number: whole numbers are exact up to here
SHOWN_UNKNOWN = 5  # unknown parameters named in a note, then "and N more"

# The page's components and their bounds, as app.py lays them out (tests/ui/test_link.py checks they agree).
EXAMPLE_PROMPT = "Describe something you like."
EXAMPLE_POSITIVE = "I love this, it is wonderful and makes me so happy!\nWhat a beautiful, joyful day."
EXAMPLE_NEGATIVE = "I hate this, it is awful and makes me so sad.\nWhat a miserable, gloomy day."
MAX_NEW_RANGE = (8, 256)  # the "Max new tokens" slider (the server's own limit is SERVER_LIMITS.max_new_tokens)
TEMPERATURE_RANGE = (0.0, 2.0)
LAYER_RANGE = (0, 40)

# Component names: the preview's inputs are model_name, PAGE_FIELDS, then the steering form's FIELDS.
PAGE_FIELDS = ("prompt", "max_new", "temperature", "seed", "served", "served_scale")
STEERING_FIELDS = ("source", "sae_pick", "mix", "strength", "unit", "positive", "negative", "layer", "site")
PREVIEW_INPUTS = ("model_name", *PAGE_FIELDS, *FIELDS)

# link parameter -> component, in the order a link lists them (short, long free text last)
PARAMS: dict[str, str] = {
    "model": "model_name",
    "src": "source",
    "sae": "sae_pick",
    "mix": "mix",
    "strength": "strength",
    "unit": "unit",
    "layer": "layer",
    "site": "site",
    "adapter": "served",
    "scale": "served_scale",
    "max_new": "max_new",
    "temp": "temperature",
    "seed": "seed",
    "prompt": "prompt",
    "pos": "positive",
    "neg": "negative",
}
PARAM_OF = {component: param for param, component in PARAMS.items()}
SOURCE_NAMES = {"features": SAE_FEATURES, "contrastive": CONTRASTIVE, "file": VECTOR_FILE, "adapter": SERVED_VECTOR}
SOURCE_PARAM = {label: name for name, label in SOURCE_NAMES.items()}
# The steering fields each source uses; the rest of the form is not in its link.
USED_BY = {
    SAE_FEATURES: ("source", "sae_pick", "mix", "strength", "unit"),
    CONTRASTIVE: ("source", "positive", "negative", "layer", "site", "strength", "unit"),
    VECTOR_FILE: ("source", "layer", "site", "strength", "unit"),
    SERVED_VECTOR: ("source", "strength", "unit"),  # the vector is the served adapter's (`adapter`)
}
PER_MODEL = frozenset({"source", "sae_pick", "mix", "strength", "unit"})  # what on_model sets for each model
CATALOG_MODELS = frozenset(EMBEDDED_MODELS) | {m.model_id for m in CURATED_MODELS}

_CONTROLS = frozenset(chr(c) for c in (*range(32), *range(127, 160)))
_CONTROLS_BUT_LINES = _CONTROLS - frozenset("\n\r\t")
_NUMBER = frozenset("0123456789+-.eE")
_MARKDOWN = frozenset("\\`*_{}[]()#+-.!|<>~&:")
_TOKEN_PREFIX, _TOKEN_BODY = "hf_", 30  # a Hub access token: hf_ and 34 letters and digits
_QUERY_SAFE = ":,/()"  # left as they are in a query: readable model ids, mixes and SAE labels


def _default_form() -> SteeringForm:
    """The steering form of a fresh page: the default model's embedded SAE and its showcase feature (on_page)."""
    spec, choice = embedded_sae_for(DEFAULT_MODEL), embedded_choice(DEFAULT_MODEL)
    mix = FeatureMix(((spec.default_feature, spec.default_strength),)).format() if spec else ""
    return SteeringForm(
        source=SAE_FEATURES if choice else CONTRASTIVE,
        sae_pick=choice.label if choice else "",
        mix=mix,
        strength=spec.default_strength if spec else 1.0,
        unit=DEFAULT_UNIT,
        positive=EXAMPLE_POSITIVE,
        negative=EXAMPLE_NEGATIVE,
        layer=10,
        site="resid_post",
    )


@dataclass(frozen=True)
class PageState:
    """What a link carries: the preview's inputs, as Gradio passes them (strings, slider floats, the form)."""

    model_name: str = DEFAULT_MODEL
    prompt: str = EXAMPLE_PROMPT
    max_new: float = 48
    temperature: float = 0.0
    seed: float = 0
    served: str = ""
    served_scale: float = 1.0
    form: SteeringForm = field(default_factory=_default_form)

    @classmethod
    def of(cls, *values: Any) -> PageState:
        """From the preview's inputs in order (PREVIEW_INPUTS); a ValueError or TypeError for anything else."""
        if len(values) != len(PREVIEW_INPUTS):
            raise TypeError(f"{len(values)} values, not the preview's {len(PREVIEW_INPUTS)}")
        head = len(PREVIEW_INPUTS) - len(FIELDS)
        page = dict(zip(PREVIEW_INPUTS[:head], values[:head], strict=True))
        return cls(**page, form=SteeringForm(*values[head:]))

    def values(self) -> list[Any]:
        """The preview's inputs in order (PREVIEW_INPUTS)."""
        return [*astuple(self)[:-1], *self.form.values()]

    def get(self, name: str) -> Any:
        return getattr(self.form, name) if name in FIELDS else getattr(self, name)

    def with_values(self, values: Mapping[str, Any]) -> PageState:
        """This state with a restore's values set: what the page shows after opening the link on it."""
        form = {k: v for k, v in values.items() if k in FIELDS}
        page = {k: v for k, v in values.items() if k not in FIELDS}
        return replace(self, **page, form=replace(self.form, **form))

    def shared(self) -> dict[str, Any]:
        """The fields a link of this state carries (the ones its steering source uses), by component name."""
        names = ("model_name", *PAGE_FIELDS, *USED_BY.get(self.form.source, STEERING_FIELDS))
        return {name: self.get(name) for name in names}


DEFAULT = PageState()


# ---- reading one parameter: its value, or a ValueError that says what is wrong with it ------------------------


def _shown(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def _num(value: Any) -> str:
    """A number as a link writes it: `48`, `0.7`, `-1.25`, `1e-05` (exact: repr of the float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if float(value).is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(float(value))


def _token_like(text: str) -> bool:
    """Whether `text` holds something shaped like a Hub access token (linear: each 'hf_' is looked at once)."""
    at = text.find(_TOKEN_PREFIX)
    while at != -1:
        body = text[at + len(_TOKEN_PREFIX) : at + len(_TOKEN_PREFIX) + _TOKEN_BODY]
        if len(body) == _TOKEN_BODY and body.isascii() and body.isalnum():
            return True
        at = text.find(_TOKEN_PREFIX, at + len(_TOKEN_PREFIX))
    return False


def _text(text: str, what: str, limit: int, *, multiline: bool = False) -> str:
    if len(text) > limit:
        raise ValueError(f"{what} has {len(text):,} characters, more than the page takes ({limit:,})")
    if not (_CONTROLS_BUT_LINES if multiline else _CONTROLS).isdisjoint(text):
        raise ValueError(f"{what} {_shown(text)} holds control characters")
    if _token_like(text):
        raise ValueError(f"{what} holds what looks like an access token (hf_...)")
    return text


def _number(text: str, what: str, low: float, high: float, *, whole: bool = False) -> float:
    if not text or len(text) > NUMBER_CHARS or not _NUMBER.issuperset(text):
        raise ValueError(f"{what} {_shown(text)} is not a number")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} {_shown(text)} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} {text} is not a finite number")
    if whole and not value.is_integer():
        raise ValueError(f"{what} {text} is not a whole number")
    if not low <= value <= high:
        raise ValueError(f"{what} {text} is out of range {_num(low)}–{_num(high)}")
    return int(value) if whole else value


def _repo_id(text: str, said: str) -> str:
    try:
        return check_repo_id(text)
    except ValueError:
        raise ValueError(f"{said} (namespace/name: letters, digits, '_', '.' and '-')") from None


def _model(text: str) -> str:
    _text(text, "the model", NAME_CHARS)
    if text in CATALOG_MODELS:
        return text
    if text.lower().endswith(".gguf"):
        raise ValueError(f"the model {_shown(text)} is a .gguf file, not a Hub model id")
    return _repo_id(text, f"the model {_shown(text)} is not a listed model or a Hub model id")


def _adapter(text: str) -> str:
    _text(text, "the served adapter", NAME_CHARS)
    if not text:
        return text
    if text.lower().endswith(".gguf"):
        raise ValueError(f"the served adapter {_shown(text)} is a .gguf file, not a Hub repo id")
    return _repo_id(text, f"the served adapter {_shown(text)} is not a Hub adapter repo id")


def _source(text: str) -> str:
    source = SOURCE_NAMES.get(text) or (text if text in SOURCE_PARAM else None)
    if source is None:
        raise ValueError(f"steering source {_shown(text)} is not one of {', '.join(SOURCE_NAMES)}")
    return source


def _sae(text: str) -> str:
    _text(text, "the SAE", NAME_CHARS)
    if text.startswith("folder:"):
        raise ValueError("the SAE is a folder on a server, which a link cannot name")
    if text and not (text.startswith("embedded: ") or " / " in text):
        raise ValueError(f"the SAE {_shown(text)} is not one the page lists ('embedded: NAME (offline)' or "
                         "'RELEASE / SAE_ID')")  # fmt: skip
    return text


def _unit(text: str) -> str:
    try:
        unit = unit_of(text)
    except ValueError:
        raise ValueError(f"strength unit {_shown(text)} is not one of {', '.join(UNITS.values())}") from None
    return next(label for label, short in UNITS.items() if short == unit)


def _strength(text: str, unit: str) -> float:
    low, high, _ = SLIDER_RANGE[unit_of(unit)]
    return _number(text, "strength", low, high)


def _mix(text: str, strength: float, unit: str) -> str:
    _text(text, "the feature mix", MIX_CHARS)
    mix = FeatureMix.parse(text, strength)  # linear in the text (steer_core.ui.mix); its error names the bad item
    SERVER_LIMITS.check_features(len(mix.items))
    for feature, value in mix.items:
        if feature > FEATURE_MAX:
            raise ValueError(f"feature {_shown(str(feature), 12)} is past any SAE's width ({FEATURE_MAX:,} at most)")
        check_strength(value, unit_of(unit))
    return text


def _prompts(text: str, what: str) -> str:
    _text(text, what, PROMPTS_CHARS, multiline=True)
    if (n := len(lines(text))) > SERVER_LIMITS.contrastive_prompts:
        raise ValueError(f"{what} are {n} lines: the page takes up to {SERVER_LIMITS.contrastive_prompts} a side")
    return text


def _site(text: str) -> str:
    if text not in SITES:
        raise ValueError(f"site {_shown(text)} is not one of {', '.join(SITES)}")
    return text


def _read(given: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The component values of the known parameters in `given`, and the problem of each one refused, by parameter."""
    values: dict[str, Any] = {}
    problems: dict[str, str] = {}

    def take(param: str, read: Any) -> None:
        if param in given:
            try:
                values[PARAMS[param]] = read(given[param])
            except (ValueError, TypeError, OverflowError, LookupError) as err:
                problems[param] = str(err)

    take("model", _model)
    take("src", _source)
    take("sae", _sae)
    take("unit", _unit)
    unit = values.get("unit", DEFAULT_UNIT)  # the unit a link omits is the page's: on_model always sets the default
    take("strength", lambda t: _strength(t, unit))
    strength = values.get("strength", DEFAULT.form.strength)
    take("mix", lambda t: _mix(t, strength, unit))
    take("pos", lambda t: _prompts(t, "the positive prompts"))
    take("neg", lambda t: _prompts(t, "the negative prompts"))
    take("layer", lambda t: _number(t, "layer", *LAYER_RANGE, whole=True))
    take("site", _site)
    take("adapter", _adapter)
    take("scale", lambda t: _number(t, "engine scale", 0, MAX_ENGINE_SCALE))
    take("prompt", lambda t: _text(t, "the prompt", PROMPT_CHARS, multiline=True))
    take("max_new", lambda t: _number(t, "max new tokens", *MAX_NEW_RANGE, whole=True))
    take("temp", lambda t: _number(t, "temperature", *TEMPERATURE_RANGE))
    take("seed", lambda t: _number(t, "seed", -SEED_MAX, SEED_MAX, whole=True))
    return values, problems


# ---- a state to a link, and a link back ---------------------------------------------------------------------------


def _server_path(name: str) -> bool:
    """Whether a model or adapter name is a file or folder on this server rather than a Hub id (never in a link)."""
    if name.startswith(("/", ".", "~", "\\")) or "\\" in name or name[1:3] in (":\\", ":/"):
        return True
    try:
        check_repo_id(name)
    except ValueError:
        return False  # not a path either: _read says what is wrong with it
    return is_local(name)  # a relative folder shaped like a repo id ("out/dog"); a repo id is short enough to stat


def link_query(state: PageState) -> tuple[str, list[str]]:
    """The query string (`?v=1&...`) that restores `state` on a fresh page, and notes on what it leaves out.

    Only what differs from a fresh page (DEFAULT) and what the steering source uses; every value is checked as
    `restore` checks it, so a link never carries what opening it would refuse."""
    notes: list[str] = []
    candidate: dict[str, str] = {}
    model = (state.model_name or "").strip()
    default_model = model == DEFAULT.model_name

    if not default_model:
        if _server_path(model):
            notes.append("the model is a folder or file on this server, which a link cannot carry: it opens the "
                         "default model")  # fmt: skip
        else:
            candidate["model"] = model
    for name in ("prompt", "max_new", "temperature", "seed", "served_scale"):
        value, default = state.get(name), DEFAULT.get(name)
        if value != default:
            candidate[PARAM_OF[name]] = (value or "") if name == "prompt" else _num(value)
    served = (state.served or "").strip()
    if served:
        if _server_path(served):
            notes.append("the served adapter is a folder on this server, which a link cannot carry: push it to the "
                         "Hub (step 5) and link to its repo")  # fmt: skip
        else:
            candidate["adapter"] = served

    form = state.form
    if form.source not in USED_BY:
        notes.append(f"the steering source {form.source!r} cannot travel in a link yet: it opens the page's steering")
    for name in USED_BY.get(form.source, ()):
        value, default = getattr(form, name), getattr(DEFAULT.form, name)
        if name == "sae_pick" and ((form.sae_folder or "").strip() or (value or "").startswith("folder:")):
            notes.append("the SAE is a folder on this server, which a link cannot carry: whoever opens it picks an SAE")
            continue
        if name == "unit":
            value, default = UNITS.get(value, value), UNITS.get(default, default)
        if value == default and (default_model or name not in PER_MODEL):
            continue
        if name == "source":
            candidate["src"] = SOURCE_PARAM[value]
        elif isinstance(value, str) or value is None:
            candidate[PARAM_OF[name]] = value or ""
        else:
            candidate[PARAM_OF[name]] = _num(value)
    if form.source == VECTOR_FILE:
        notes.append("the vector file is an upload to this server, which a link cannot carry: whoever opens the link "
                     "uploads it again (the link keeps its layer, site and strength)")  # fmt: skip

    _, problems = _read(candidate)
    for param, problem in problems.items():
        del candidate[param]
        notes.append(f"left out of the link: {problem}")
    query = _encode(candidate)
    for params, what in ((("pos", "neg"), "the contrastive prompts"), (("prompt",), "the prompt")):
        if len(query) > LINK_CHARS and any(p in candidate for p in params):
            for p in params:
                candidate.pop(p, None)
            query = _encode(candidate)
            notes.append(f"left out of the link: {what}, which would make it longer than the {LINK_CHARS:,} "
                         "characters browsers and servers take; paste them after opening it")  # fmt: skip
    return query, notes


def _encode(params: Mapping[str, str]) -> str:
    pairs = [("v", str(LINK_VERSION))] + [(p, params[p]) for p in PARAMS if p in params]
    return "?" + urlencode(pairs, quote_via=quote_plus, safe=_QUERY_SAFE)


def _pairs(query_params: Any) -> list[tuple[Any, Any]] | None:
    """At most MAX_PARAMS + 1 (name, value) pairs, repeats included (Starlette's QueryParams keeps them), or None."""
    try:
        multi = getattr(query_params, "multi_items", None)
        items = multi() if callable(multi) else query_params.items()
        return list(islice(iter(items), MAX_PARAMS + 1))
    except Exception:  # a mapping-like object that is not one: the link is not read, the page opens as it is
        return None


def _names(names: list[str]) -> str:
    shown = ", ".join(_shown(n, 30) for n in names[:SHOWN_UNKNOWN])
    return shown + (f" and {len(names) - SHOWN_UNKNOWN:,} more" if len(names) > SHOWN_UNKNOWN else "")


def restore(query_params: Mapping[str, str] | Any) -> tuple[dict[str, Any], list[str]]:
    """The component values a link sets (by component name: `model_name`, PAGE_FIELDS, STEERING_FIELDS) and notes on
    what it ignored. Takes a mapping or Starlette's QueryParams (`request.query_params`, whose repeats it sees).
    Never raises; reads at most MAX_PARAMS parameters, each bounded before it is looked at."""
    pairs = _pairs(query_params)
    if pairs is None:
        return {}, ["the link's parameters could not be read: the page opened as it is"]
    if len(pairs) > MAX_PARAMS:
        return {}, [f"the link has more than {MAX_PARAMS} parameters, which no link of this app has: none was read"]
    given: dict[str, str] = {}
    unknown: list[str] = []
    repeated: list[str] = []
    for name, value in pairs:
        if not isinstance(name, str) or not isinstance(value, str):
            unknown.append(str(type(name).__name__))
        elif name.startswith("__"):
            continue  # Gradio's and the Hub's own (?__theme=dark)
        elif name != "v" and name not in PARAMS:
            unknown.append(name)
        elif name in given or name in repeated:
            given.pop(name, None)
            if name not in repeated:
                repeated.append(name)
        else:
            given[name] = value

    notes: list[str] = []
    version = given.pop("v", None)
    if "v" in repeated:
        repeated.remove("v")
        notes.append(f"the link gives its version more than once: it was read as version {LINK_VERSION}")
    elif version is None and (given or repeated):
        notes.append(f"the link names no version (this app's links carry v={LINK_VERSION}): it was read as "
                     f"version {LINK_VERSION}")  # fmt: skip
    elif version is not None and version != str(LINK_VERSION):
        if version.isascii() and version.isdigit() and len(version) <= 6 and int(version) > LINK_VERSION:
            notes.append(f"a link from a newer version of the app (v={int(version)}): what version {LINK_VERSION} "
                         "understands was restored, the rest is listed here")  # fmt: skip
        else:
            notes.append(f"the link's version {_shown(version, 20)} is not one this app knows: it was read as "
                         f"version {LINK_VERSION}")  # fmt: skip

    values, problems = _read(given)
    notes += [f"{problem}: kept the default" for problem in problems.values()]
    notes += [f"parameter {name!r} appears more than once: ignored" for name in repeated]
    if unknown:
        notes.append(f"unknown parameter{'s' if len(unknown) > 1 else ''} {_names(unknown)} ignored")
    source = values.get("source")
    if source == SAE_FEATURES and "mix" not in values:
        notes.append("the link names no features (mix): the page's are kept")
    if source == CONTRASTIVE and not {"positive", "negative"} <= set(values):
        notes.append("the link lacks positive or negative prompts: the page's examples are kept for those")
    if source == VECTOR_FILE:
        notes.append("a link cannot carry a vector file: upload it (the link set the source, layer, site and strength)")
    if source == SERVED_VECTOR and not values.get("served"):
        notes.append("the link steers with a served adapter's own vector but names no adapter: name one to preview")
    return values, notes


# ---- the Gradio handlers (see the module docstring for the wiring) -----------------------------------------------

COPY_JS = """(q) => {
    if (!q || !q.startsWith("?")) return q;
    const url = window.location.origin + window.location.pathname + q;
    try { navigator.clipboard.writeText(url).catch(() => {}); } catch (e) {}
    return url;
}"""


def _markdown(text: str) -> str:
    """Plain text as Markdown that renders as the same text: a link's values never become links or markup."""
    return "".join("\\" + c if c in _MARKDOWN else c for c in text)


def notes_markdown(notes: list[str], head: str = "") -> str:
    return "\n".join([head, *(f"- {_markdown(n)}" for n in notes)]).strip()


def _what_was_set(values: Mapping[str, Any], switch: bool) -> str:
    parts = []
    if "model_name" in values:
        parts.append(f"the model {values['model_name']}" + (" (loading)" if switch else ""))
    if set(STEERING_FIELDS) & set(values):
        parts.append("the steering")
    if "served" in values or "served_scale" in values:
        parts.append("the served adapter")
    if "prompt" in values:
        parts.append("the prompt")
    if {"max_new", "temperature", "seed"} & set(values):
        parts.append("the generation settings")
    return ", ".join(parts)


def on_open(model_name: str, request: gr.Request) -> tuple[Any, ...]:
    """Page load: the link's page fields at once (outputs: the pending link, the note, model_name, PAGE_FIELDS); its
    model and steering wait in the pending link for `apply_pending`. A link to a model other than the page's sets
    `model_name`, whose change event loads it."""
    try:
        query_params = request.query_params
    except Exception:  # a request rebuilt without its query (gr.Request(**kwargs))
        query_params = {}
    values, notes = restore(query_params)
    held = {k: v for k, v in values.items() if k == "model_name" or k in STEERING_FIELDS}
    switch = "model_name" in held and held["model_name"] != (model_name or "").strip()
    pending = {"values": held, "switch": switch, "done": False} if held else None
    head = ""
    if values:
        head = f"🔗 Opened a link: {_markdown(_what_was_set(values, switch))}. Press **Generate** to preview it."
    return (
        pending,
        notes_markdown(notes, head),
        held["model_name"] if switch else gr.skip(),
        *(values[name] if name in values else gr.skip() for name in PAGE_FIELDS),
    )


def wait_for_model(pending: dict[str, Any] | None) -> None:
    """Stops the page-load chain (silently) when the link's model loads first: `on_page` would reset its steering."""
    if pending and pending.get("switch"):
        raise gr.Error("the link's model loads first", visible=False, print_exception=False)


def apply_pending(pending: dict[str, Any] | None, model_name: str) -> tuple[Any, ...]:
    """After the model's own defaults are set: the link's steering, once, when the page holds the link's model.
    Outputs: the pending link, the feature box (the mix's first feature, for its card), STEERING_FIELDS."""
    unchanged = (gr.skip(),) * (2 + len(STEERING_FIELDS))
    if not pending or pending.get("done"):
        return unchanged
    values = pending["values"]
    if values.get("model_name", (model_name or "").strip()) != (model_name or "").strip():
        return unchanged  # another model is on the page: its load, of the link's model, comes next
    out: list[Any] = []
    for name in STEERING_FIELDS:
        if name == "strength" and name in values:  # the slider's range follows the unit, set in the same update
            low, high, step = SLIDER_RANGE[unit_of(values.get("unit", DEFAULT_UNIT))]
            out.append(gr.Slider(minimum=low, maximum=high, step=step, value=values[name]))
        else:
            out.append(values[name] if name in values else gr.skip())
    feature: Any = gr.skip()
    if "mix" in values:
        try:
            features = FeatureMix.parse(values["mix"], values.get("strength", DEFAULT.form.strength)).features
        except ValueError:
            features = ()
        feature = features[0] if features else gr.skip()
    return ({**pending, "done": True}, feature, *out)


def on_copy(*values: Any) -> tuple[str, str]:
    """The copy-link button (inputs: the preview's, PREVIEW_INPUTS): the query for COPY_JS, and the notes."""
    try:
        state = PageState.of(*values)
    except (ValueError, TypeError) as err:
        return "", notes_markdown([f"no link: {err}"])
    query, notes = link_query(state)
    return query, notes_markdown(notes)


assert set(PARAMS.values()) == {"model_name", *PAGE_FIELDS, *STEERING_FIELDS}  # one parameter each
