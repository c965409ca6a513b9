"""Links that restore the page (steer_core.ui.link): state -> link -> restore gives the same state; a hostile link gives
notes and defaults, quickly; and, in a real browser, the page-load and copy-link wiring the module documents."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import gradio as gr
import pytest
from starlette.datastructures import QueryParams

from steer_core.adapter.served import MAX_ENGINE_SCALE
from steer_core.constants import SITES
from steer_core.ui import gate
from steer_core.ui.form import CONTRASTIVE, FIELDS, SAE_FEATURES, SERVED_VECTOR, SOURCES, VECTOR_FILE
from steer_core.ui.link import (
    DEFAULT,
    LAYER_RANGE,
    MAX_NEW_RANGE,
    PAGE_FIELDS,
    PREVIEW_INPUTS,
    SOURCE_NAMES,
    STEERING_FIELDS,
    TEMPERATURE_RANGE,
    USED_BY,
    PageState,
    apply_pending,
    link_query,
    on_copy,
    on_open,
    restore,
    wait_for_model,
)
from steer_core.ui.mix import SLIDER_RANGE, FeatureMix

REGISTRY_SAE = "gemma-scope-2b-pt-res-canonical / layer_20/width_16k/canonical"
TOKEN = "hf_" + "aB3" * 12  # shaped like a Hub access token (fake)


def state(form: dict[str, Any] | None = None, **page: Any) -> PageState:
    return dataclasses.replace(DEFAULT, **page, form=dataclasses.replace(DEFAULT.form, **(form or {})))


def params(query: str) -> dict[str, str]:
    assert query.startswith("?v=1"), query
    return dict(parse_qsl(query[1:], keep_blank_values=True, strict_parsing=True))


def round_trip(s: PageState) -> tuple[str, PageState, list[str]]:
    """The link of `s`, the page after opening it on a fresh page, and the notes of both ways."""
    query, notes = link_query(s)
    values, read_notes = restore(QueryParams(query[1:]))  # what request.query_params is on page load
    return query, DEFAULT.with_values(values), notes + read_notes


def same_mix(a: PageState, b: PageState) -> bool:
    return FeatureMix.parse(a.form.mix or "", a.form.strength) == FeatureMix.parse(b.form.mix or "", b.form.strength)


@pytest.fixture(scope="module", autouse=True)
def warm() -> None:
    restore({"model": "a/b", "adapter": "c/d"})  # huggingface_hub's repo-id check imports on first use


# ---- round trips ----------------------------------------------------------------------------------------------


def test_a_fresh_page_links_as_v1_alone_and_each_change_adds_only_itself() -> None:
    assert link_query(DEFAULT) == ("?v=1", [])
    assert link_query(DEFAULT.with_values({"temperature": 0.7}))[0] == "?v=1&temp=0.7"
    assert link_query(DEFAULT.with_values({"max_new": 64.0, "seed": 3}))[0] == "?v=1&max_new=64&seed=3"
    # the fields the steering source does not use stay out, however they were left
    assert link_query(state({"positive": "left over", "layer": 3}))[0] == "?v=1"
    assert restore({}) == ({}, [])
    assert restore({"__theme": "dark"}) == ({}, [])  # Gradio's own parameters pass silently


def test_an_sae_feature_mix_round_trips_readably_on_the_default_model_and_another() -> None:
    s = state({"mix": "676:0.5, 2379:-1.25, 12", "strength": 2.5})
    query, back, notes = round_trip(s)
    assert query == "?v=1&mix=676:0.5,+2379:-1.25,+12&strength=2.5" and not notes
    assert back.shared() == s.shared() and same_mix(back, s)

    other = state(
        {"sae_pick": REGISTRY_SAE, "mix": "5:3", "strength": 1.0, "unit": "absolute (× decoder row)"},
        model_name="google/gemma-2-2b",
    )
    query, back, notes = round_trip(other)
    # on another model the per-model fields are all in the link: the page sets its own defaults for them
    assert params(query) == {
        "v": "1", "model": "google/gemma-2-2b", "src": "features", "sae": REGISTRY_SAE, "mix": "5:3",
        "strength": "1", "unit": "abs",
    }  # fmt: skip
    assert "model=google/gemma-2-2b&" in query and not notes
    assert back.shared() == other.shared()


def test_contrastive_prompts_with_newlines_and_unicode_round_trip() -> None:
    pos = "J'aime ça, c'est génial ❤️\n日本語の文も\r\nemoji 👩‍💻 and 👍🏽 & = + ? # %\ttabbed"
    neg = "Je déteste ça 😠\nзлой текст\n\nlast line"
    s = state(
        {"source": CONTRASTIVE, "positive": pos, "negative": neg, "layer": 12.0, "site": "mlp_out",
         "strength": -3.5, "unit": "× writer output norm"},
        prompt="Écris un poème ✍️\nsur deux lignes",
    )  # fmt: skip
    query, back, notes = round_trip(s)
    assert not notes and back.shared() == s.shared()
    assert back.form.positive == pos and back.form.negative == neg and back.prompt == s.prompt
    assert set(params(query)) == {"v", "src", "pos", "neg", "layer", "site", "strength", "unit", "prompt"}


def test_a_served_adapter_with_an_engine_scale_and_generation_settings_round_trip() -> None:
    s = state(served="someone/dog-steer", served_scale=0.45, max_new=96.0, temperature=1.3, seed=123456789)
    query, back, notes = round_trip(s)
    assert query == "?v=1&adapter=someone/dog-steer&scale=0.45&max_new=96&temp=1.3&seed=123456789" and not notes
    assert back.shared() == s.shared()
    assert round_trip(state(served="  someone/dog-steer "))[1].served == "someone/dog-steer"


def test_a_shared_adapter_steering_with_its_own_vector_round_trips() -> None:
    s = state({"source": SERVED_VECTOR, "strength": 4.0}, served="someone/dog-steer", served_scale=1.5)
    query, back, notes = round_trip(s)
    assert query == "?v=1&src=adapter&strength=4&adapter=someone/dog-steer&scale=1.5" and not notes
    assert back.shared() == s.shared()
    assert any("names no adapter" in n for n in restore({"v": "1", "src": "adapter"})[1])


def test_every_steering_source_of_the_form_can_travel() -> None:
    assert set(SOURCE_NAMES.values()) == set(SOURCES) == set(USED_BY)


def test_a_vector_file_cannot_travel_and_its_link_says_so() -> None:
    s = state({"source": VECTOR_FILE, "vector_file": "/tmp/gradio/abc123/vec.safetensors", "layer": 7.0})
    query, notes = link_query(s)
    assert params(query) == {"v": "1", "src": "file", "layer": "7"} and "/tmp" not in query
    assert any("vector file" in n and "cannot carry" in n for n in notes)
    values, notes = restore(QueryParams(query[1:]))
    assert values == {"source": VECTOR_FILE, "layer": 7} and any("upload it" in n for n in notes)


def test_no_server_path_and_no_token_ever_goes_into_a_link(tmp_path: Any) -> None:
    folder = tmp_path / "out" / "dog"
    folder.mkdir(parents=True)
    for s, said in [
        (state(served=str(folder)), "served adapter is a folder"),
        (state(model_name="/models/my-llama"), "model is a folder"),
        (state(model_name="C:\\models\\llama"), "model is a folder"),
        (state(model_name="base.gguf"), "model is a folder or file"),
        (state({"sae_folder": "/home/me/sae"}), "SAE is a folder"),
        (state({"sae_pick": "folder: /home/me/sae"}, model_name="gpt2"), "SAE is a folder"),
        (state(model_name=TOKEN), "access token"),
        (state(prompt=f"my token is {TOKEN} ok"), "access token"),
    ]:
        query, notes = link_query(s)
        assert "home" not in query and "models" not in query and "hf_" not in query, query
        assert any(said in n for n in notes), (said, notes)
    here = os.getcwd()
    os.chdir(tmp_path)  # a relative folder shaped like a repo id
    try:
        query, notes = link_query(state(served="out/dog"))
    finally:
        os.chdir(here)
    assert "out" not in query and any("folder on this server" in n for n in notes)


def test_a_link_leaves_out_what_opening_it_would_refuse() -> None:
    query, notes = link_query(state(temperature=float("nan"), seed=None, prompt="bell\x07"))
    assert query == "?v=1" and len(notes) == 3 and all(n.startswith("left out of the link: ") for n in notes)


def test_a_link_too_long_for_a_url_leaves_out_the_long_prompts_and_says_so() -> None:
    many = "\n".join(f"prompt number {i} with a few more words in it" for i in range(60))
    s = state({"source": CONTRASTIVE, "positive": "é" * 2000 + many, "negative": many}, prompt="short")
    query, back, notes = round_trip(s)
    assert len(query) < 8_000 and "pos=" not in query and back.prompt == "short"
    assert any("contrastive prompts" in n and "8,000" in n for n in notes)


# ---- older, newer and hostile links ---------------------------------------------------------------------------


def test_an_old_link_without_a_version_still_works_and_says_what_it_lacks() -> None:
    values, notes = restore({"src": "contrastive", "pos": "good\nfine", "temp": "0.5"})
    assert values == {"source": CONTRASTIVE, "positive": "good\nfine", "temperature": 0.5}
    assert any("names no version" in n for n in notes)
    assert any("lacks positive or negative prompts" in n for n in notes)


def test_a_newer_link_keeps_what_this_version_understands() -> None:
    values, notes = restore({"v": "2", "mix": "7:1", "glow": "on"})
    assert values == {"mix": "7:1"}
    assert any("newer version" in n and "v=2" in n for n in notes) and "unknown parameter 'glow' ignored" in notes
    assert restore({"v": "one", "seed": "4"})[0] == {"seed": 4}


def test_out_of_range_numbers_keep_the_default_with_a_note() -> None:
    values, notes = restore({"v": "1", "temp": "9", "max_new": "4", "strength": "25", "layer": "2.5"})
    assert values == {}
    assert "temperature 9 is out of range 0–2: kept the default" in notes
    assert "max new tokens 4 is out of range 8–256: kept the default" in notes
    assert "strength 25 is out of range -20–20: kept the default" in notes
    assert "layer 2.5 is not a whole number: kept the default" in notes
    assert restore({"v": "1", "unit": "abs", "strength": "250"})[0] == {"unit": "absolute (× decoder row)",
                                                                        "strength": 250.0}  # fmt: skip


MB = "x" * 2**20
HOSTILE: list[tuple[str, Any, str]] = [
    ("1 MB prompt", {"v": "1", "prompt": MB}, "1,048,576 characters"),
    ("1 MB mix", {"v": "1", "mix": "1:" + MB}, "characters, more than"),
    ("1 MB contrastive", {"v": "1", "pos": MB}, "characters, more than"),
    ("1 MB model", {"v": "1", "model": MB}, "characters, more than"),
    ("1 MB number", {"v": "1", "temp": "1" * 2**20}, "not a number"),
    ("1 MB name", {"v": "1", MB: "1"}, "unknown parameter"),
    ("1 MB version", {"v": MB, "seed": "x"}, "not one this app knows"),
    ("10,000 parameters", {f"p{i}": "1" for i in range(10_000)}, "more than 32 parameters"),
    ("10,000 parameters, a real one among them", {"temp": "1", **{f"p{i}": "1" for i in range(10_000)}}, "none was"),
    ("NaN", {"v": "1", "temp": "nan"}, "not a number"),
    ("inf", {"v": "1", "scale": "inf"}, "not a number"),
    ("1e999", {"v": "1", "seed": "1e999"}, "not a finite number"),
    ("1e308", {"v": "1", "strength": "1e308"}, "out of range"),
    ("a huge seed", {"v": "1", "seed": "9" * 30}, "out of range"),
    ("NaN in a mix", {"v": "1", "mix": "5:nan"}, "finite"),
    ("a huge feature", {"v": "1", "mix": "9" * 900 + ":1"}, "past any SAE"),
    ("17 features", {"v": "1", "mix": ",".join(f"{i}:1" for i in range(17))}, "mixes up to 16"),
    ("65 prompts", {"v": "1", "neg": "\n".join("p" for _ in range(65))}, "up to 64 a side"),
    ("repeated keys", QueryParams("v=1&temp=0.5&temp=1.5&temp=0.1"), "'temp' appears more than once"),
    ("repeated version", QueryParams("v=1&v=2&seed=3"), "version more than once"),
    ("../../etc", {"v": "1", "model": "../../etc"}, "is not a listed model or a Hub model id"),
    ("a/b/c", {"v": "1", "adapter": "a/b/c"}, "is not a Hub adapter repo id"),
    ("a URL", {"v": "1", "model": "https://evil.example/x"}, "is not a listed model or a Hub model id"),
    ("a URL adapter", {"v": "1", "adapter": "file:///etc/passwd"}, "is not a Hub adapter repo id"),
    ("a local .gguf", {"v": "1", "model": "model.gguf"}, ".gguf file"),
    ("an SAE folder", {"v": "1", "sae": "folder: /etc"}, "a folder on a server"),
    ("an unknown SAE", {"v": "1", "sae": "../../x"}, "not one the page lists"),
    ("a NUL in the prompt", {"v": "1", "prompt": "hi\x00there"}, "control characters"),
    ("an escape in a name", {"v": "1", "adapter": "a/b\x1b[31m"}, "control characters"),
    ("a newline in a model", {"v": "1", "model": "a/b\nc"}, "control characters"),
    ("a C1 control", {"v": "1", "pos": "x\x85y"}, "control characters"),
    ("a token", {"v": "1", "adapter": TOKEN}, "access token"),
    ("an unknown source", {"v": "1", "src": "<script>"}, "not one of features"),
    ("an unknown site", {"v": "1", "site": "blocks.0.hook_resid_post"}, "not one of"),
    ("an unknown unit", {"v": "1", "unit": "×" * 1000}, "strength unit"),
    ("not a mapping", object(), "could not be read"),
    ("not strings", {"v": "1", 3: b"x"}, "unknown parameter"),  # type: ignore[dict-item]
]


@pytest.mark.parametrize(("link", "said"), [(q, s) for _, q, s in HOSTILE], ids=[name for name, _, _ in HOSTILE])
def test_a_hostile_link_gives_a_note_and_the_defaults_quickly(link: Any, said: str) -> None:
    start = time.perf_counter()
    values, notes = restore(link)
    took = time.perf_counter() - start
    assert took < 0.1, took
    assert values in ({}, {"seed": 3}), values  # "seed" only where its value is fine and given once
    assert any(said in n for n in notes), notes
    assert all(len(n) < 600 for n in notes) and len(notes) <= 8, notes  # no note repeats the input


def test_many_unknown_parameters_are_named_a_few_at_a_time() -> None:
    values, notes = restore({"v": "1", **{f"x{i}": "" for i in range(20)}})
    assert values == {} and notes == ["unknown parameters 'x0', 'x1', 'x2', 'x3', 'x4' and 15 more ignored"]


# ---- the Gradio handlers --------------------------------------------------------------------------------------


def test_opening_a_link_sets_the_page_now_and_the_steering_after_the_models_defaults() -> None:
    request = gr.Request(query_params={"v": "1", "temp": "0.7", "prompt": "hi", "mix": "5:2", "temp2": "x"})
    pending, note, model, *page = on_open(DEFAULT.model_name, request)
    assert model == gr.skip() and dict(zip(PAGE_FIELDS, page, strict=True))["temperature"] == 0.7
    assert page[PAGE_FIELDS.index("prompt")] == "hi" and page[PAGE_FIELDS.index("seed")] == gr.skip()
    assert "Opened a link" in note and "temp2" in note
    wait_for_model(pending)  # the page's own model: the page-load chain goes on
    state, feature, *steering = apply_pending(pending, DEFAULT.model_name)
    assert feature == 5 and dict(zip(STEERING_FIELDS, steering, strict=True))["mix"] == "5:2"
    assert state["done"] and apply_pending(state, DEFAULT.model_name) == (gr.skip(),) * (2 + len(STEERING_FIELDS))


def test_a_link_to_another_model_loads_it_first_then_sets_its_steering() -> None:
    request = gr.Request(query_params={"v": "1", "model": "gpt2", "mix": "9:40", "unit": "abs", "strength": "40"})
    pending, _, model, *_ = on_open(DEFAULT.model_name, request)
    assert model == "gpt2"  # its change event loads it
    with pytest.raises(gr.Error) as stopped:
        wait_for_model(pending)  # the page-load chain stops: on_page would reset the steering
    assert not stopped.value.visible and not stopped.value.print_exception
    assert apply_pending(pending, DEFAULT.model_name)[0] == gr.skip()  # the old model's defaults: not yet
    state, feature, *steering = apply_pending(pending, "gpt2")
    out = dict(zip(STEERING_FIELDS, steering, strict=True))
    assert feature == 9 and out["mix"] == "9:40" and out["unit"] == "absolute (× decoder row)"
    slider = out["strength"]  # the slider's range follows the unit in the same update
    assert (slider.minimum, slider.maximum, slider.value) == (*SLIDER_RANGE["abs"][:2], 40.0)
    with pytest.raises(gr.Error):
        wait_for_model(state)  # still stopped: a late page-load chain never resets it


def test_a_page_without_a_link_is_left_as_it_is() -> None:
    pending, note, model, *page = on_open(DEFAULT.model_name, gr.Request())
    assert pending is None and note == "" and model == gr.skip() and page == [gr.skip()] * len(PAGE_FIELDS)
    wait_for_model(None)
    assert apply_pending(None, "gpt2") == (gr.skip(),) * (2 + len(STEERING_FIELDS))


def test_the_copy_button_gets_the_query_and_the_notes_in_markdown_that_cannot_link() -> None:
    values = state({"source": SAE_FEATURES, "mix": "3:1"}, served="/tmp/x/[click](https://evil)").values()
    query, note = on_copy(*values)
    assert query == "?v=1&mix=3:1" and "served adapter is a folder" in note and "](https" not in note
    _, note = on_open(DEFAULT.model_name, gr.Request(query_params={"v": "1", "[x](https://evil)": "1"}))[:2]
    assert "](https" not in note and "\\[x\\]" in note
    assert on_copy(*values[:-1])[0] == "" and on_copy(*[*values[: -len(FIELDS)], "bad source", *[""] * 10])[0] == ""


def test_the_defaults_and_bounds_are_the_pages() -> None:
    """The link omits what a fresh page shows and refuses what its components would: both must be app.py's."""
    import app

    preview = next(fn for fn in app.page().fns.values() if fn.fn and fn.fn.__name__ == "preview")
    components = dict(zip(PREVIEW_INPUTS, preview.inputs, strict=True))
    for name, default in zip(PREVIEW_INPUTS, DEFAULT.values(), strict=True):
        assert (components[name].value or "") == (default or ""), name  # type: ignore[attr-defined]
    ranges = {name: (c.minimum, c.maximum) for name, c in components.items() if isinstance(c, gr.Slider)}
    assert ranges["max_new"] == MAX_NEW_RANGE and ranges["temperature"] == TEMPERATURE_RANGE
    assert ranges["layer"] == LAYER_RANGE and ranges["served_scale"] == (0, MAX_ENGINE_SCALE)
    assert ranges["strength"] == SLIDER_RANGE["resid"][:2]
    assert {value for _, value in components["site"].choices} <= set(SITES)  # type: ignore[attr-defined]
    limits = {name: getattr(c, "max_length", None) for name, c in components.items()}
    assert (limits["prompt"], limits["mix"], limits["positive"], limits["served"]) == (
        gate.PROMPT_CHARS, gate.MIX_CHARS, gate.PROMPTS_CHARS, gate.NAME_CHARS
    )  # fmt: skip
    assert DEFAULT.prompt == app.EXAMPLE_PROMPT and DEFAULT.model_name == app.DEFAULT_MODEL


# ---- in a browser: the wiring the module's docstring gives app.py, on a page of stand-ins -----------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stand_in_page() -> gr.Blocks:
    """app.py's components for a link, and its page-load chain as the module docstring wires it; on_page / on_model
    reset the steering to the model's defaults, as app.py's do, and a load takes a while."""
    from functools import partial

    from steer_core.ui import link
    from steer_core.ui.gate import LIGHT, LOAD, PAGE, PREVIEW

    loaded = {DEFAULT.model_name}

    def on_model(name: str, *, load: bool = True) -> tuple[Any, ...]:
        if name not in loaded and not load:
            raise gr.Error(f"model {name!r} is not loaded yet")
        if name not in loaded:
            time.sleep(1.0)
            loaded.add(name)
        ours = name == DEFAULT.model_name
        return (
            f"loaded {name}",
            DEFAULT.form.sae_pick if ours else "other / sae",
            676 if ours else 0,
            DEFAULT.form.mix if ours else "",
            DEFAULT.form.strength if ours else 1.0,
            DEFAULT.form.unit,
            SAE_FEATURES,
        )

    def on_page(name: str) -> tuple[Any, ...]:
        return on_model(name, load=False)

    def on_sae(name: str, pick: str, folder: str) -> str:
        return f"SAE {pick} of {name}"

    with gr.Blocks() as demo:
        f = DEFAULT.form
        model_name = gr.Dropdown([DEFAULT.model_name, "gpt2"], value=DEFAULT.model_name, allow_custom_value=True,
                                 label="Model")  # fmt: skip
        load_btn = gr.Button("Load model")
        model_status = gr.Markdown(elem_id="status")
        source = gr.Radio(["SAE features", "Contrastive prompts", "Vector file"], value=f.source, label="Steer with")
        sae_pick = gr.Dropdown([f.sae_pick], value=f.sae_pick, allow_custom_value=True, label="SAE")
        sae_folder = gr.Textbox(label="SAE folder")
        sae_info = gr.Markdown(elem_id="sae-info")
        feature = gr.Number(676, precision=0, label="Feature")
        card_md = gr.Markdown()
        strength = gr.Slider(*SLIDER_RANGE["resid"][:2], value=f.strength, step=0.1, label="Strength")
        unit = gr.Radio(["× residual norm", "absolute (× decoder row)", "× writer output norm"], value=f.unit,
                        label="Strength unit")  # fmt: skip
        mix = gr.Textbox(f.mix, label="Mix", max_length=gate.MIX_CHARS)
        pos = gr.Textbox(f.positive, lines=3, label="Positive", max_length=gate.PROMPTS_CHARS)
        neg = gr.Textbox(f.negative, lines=3, label="Negative", max_length=gate.PROMPTS_CHARS)
        layer = gr.Slider(0, 40, value=10, step=1, label="Layer")
        site = gr.Dropdown(list(SITES), value="resid_post", label="Site")
        vec_file = gr.File(label="Vector file", type="filepath")
        form = {
            "source": source, "sae_pick": sae_pick, "sae_folder": sae_folder, "mix": mix, "strength": strength,
            "unit": unit, "positive": pos, "negative": neg, "layer": layer, "site": site, "vector_file": vec_file,
        }  # fmt: skip
        vector_inputs = [form[name] for name in FIELDS]
        sae_inputs = [model_name, sae_pick, sae_folder]
        prompt = gr.Textbox(DEFAULT.prompt, label="Prompt", max_length=gate.PROMPT_CHARS)
        max_new = gr.Slider(8, 256, value=48, step=8, label="Max new tokens")
        temperature = gr.Slider(0, 2, value=0, step=0.1, label="Temperature")
        seed = gr.Number(0, label="Seed", precision=0)
        served = gr.Textbox(label="Served adapter", max_length=gate.NAME_CHARS)
        served_scale = gr.Slider(0, MAX_ENGINE_SCALE, value=1, step=0.05, label="Engine scale")
        # -- as the module docstring says --
        with gr.Row():
            copy_btn = gr.Button("🔗 Copy link", size="sm", scale=0, elem_id="copy-link")
            link_box = gr.Textbox(show_label=False, interactive=False, buttons=["copy"], elem_id="link", scale=4)
        link_note = gr.Markdown(elem_id="link-note")
        pending_link = gr.State(None)

        model_outputs = [model_status, sae_pick, feature, mix, strength, unit, source]
        page_inputs = [prompt, max_new, temperature, seed, served, served_scale]
        steering = [form[name] for name in link.STEERING_FIELDS]
        link_opened = demo.load(
            link.on_open, model_name, [pending_link, link_note, model_name, *page_inputs], api_name=False,
            **PAGE.events,
        ).success(link.wait_for_model, pending_link, None, api_name=False, **PAGE.events)  # fmt: skip
        apply_link = {"fn": link.apply_pending, "inputs": [pending_link, model_name],
                      "outputs": [pending_link, feature, *steering], "api_name": False, **LIGHT.events}  # fmt: skip
        start: Callable[..., Any]
        for start, (model_fn, sae_fn), lane, name in (
            (link_opened.success, (on_page, on_sae), PAGE, False),
            (partial(gr.on, [load_btn.click, model_name.change]), (on_model, on_sae), LOAD, "load_model"),
        ):
            start(model_fn, model_name, model_outputs, api_name=name, **lane.events).success(**apply_link).success(
                sae_fn, sae_inputs, sae_info, api_name=name and "load_sae", **lane.events
            ).success(lambda f: f"card {f}", feature, card_md, api_name=False, **PREVIEW.events)
        copy_btn.click(
            link.on_copy,
            [model_name, prompt, max_new, temperature, seed, served, served_scale, *vector_inputs],
            [link_box, link_note],
            api_name=False,
            **LIGHT.events,
        ).then(None, link_box, link_box, js=link.COPY_JS, api_name=False, **LIGHT.events)
    return demo


@pytest.fixture(scope="module")
def page_url() -> Iterator[str]:
    demo = stand_in_page()
    port = _free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.mark.e2e
def test_in_a_browser_a_copied_link_opens_the_same_state_even_on_another_model(page_url: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.fail("chromium not found: run `bash scripts/setup.sh` (apt-get install chromium) or set CHROMIUM")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context()
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=page_url.rstrip("/"))
        page = context.new_page()
        page.set_default_timeout(30_000)
        expect.set_options(timeout=30_000)

        def box(label: str) -> Any:
            return page.get_by_label(label, exact=True)

        def number(on: Any, label: str) -> Any:  # a slider's number box
            return on.get_by_label(f"number input for {label}", exact=True)

        # a link on the page's own model: page fields at once, the mix after on_page set its defaults
        page.goto(page_url + "?v=1&mix=7:1.5,+12:-2&temp=0.7&prompt=Hello+%E2%9C%8D%EF%B8%8F+%26+bye&seed=5")
        expect(page.locator("#sae-info")).to_contain_text("SAE embedded")  # the chain ran through on_sae
        expect(box("Mix")).to_have_value("7:1.5, 12:-2")
        expect(box("Prompt")).to_have_value("Hello ✍️ & bye")
        expect(number(page, "Temperature")).to_have_value("0.7")
        expect(page.locator("#link-note")).to_contain_text("Opened a link")

        # a link to another model: it loads (on_model resets the mix to ""), then the link's steering is set
        query = "?v=1&model=gpt2&src=contrastive&pos=g%C3%BCt%0Afine+%F0%9F%91%8D&neg=bad&layer=3&unit=abs&strength=150"
        page.goto(page_url + query)
        expect(page.locator("#status")).to_contain_text("loaded gpt2")
        expect(page.locator("#sae-info")).to_contain_text("of gpt2")
        expect(box("Positive")).to_have_value("güt\nfine 👍")
        expect(page.get_by_label("Contrastive prompts")).to_be_checked()
        expect(number(page, "Layer")).to_have_value("3")
        expect(number(page, "Strength")).to_have_value("150")  # past resid's ±20: the slider took abs's range

        # copy: the link is this page's address and the state's query; a fresh page opens it to the same state
        number(page, "Temperature").fill("1.2")
        number(page, "Temperature").blur()
        expect(number(page, "Temperature")).to_have_value("1.2")
        page.locator("#copy-link").click()
        expect(page.locator("#link textarea")).to_have_value(re.compile(re.escape(page_url + "?v=1&model=gpt2&")))
        link = page.locator("#link textarea").input_value()
        assert link == page.evaluate("navigator.clipboard.readText()")
        assert dict(parse_qsl(urlsplit(link).query))["temp"] == "1.2"
        fresh = context.new_page()
        fresh.goto(link)
        expect(fresh.locator("#status")).to_contain_text("loaded gpt2")
        expect(fresh.get_by_label("Positive", exact=True)).to_have_value("güt\nfine 👍")
        for label in ("Positive", "Negative", "Prompt", "Served adapter"):
            expect(fresh.get_by_label(label, exact=True)).to_have_value(box(label).input_value())
        for label in ("Layer", "Strength", "Temperature", "Max new tokens", "Engine scale"):
            expect(number(fresh, label)).to_have_value(number(page, label).input_value())
        expect(fresh.get_by_label("Contrastive prompts")).to_be_checked()
        expect(fresh.get_by_label("absolute (× decoder row)")).to_be_checked()

        # a hostile link: a note, and the page as a fresh one
        page.goto(page_url + "?v=1&temp=nan&model=..%2F..%2Fetc&" + "&".join(f"x{i}=1" for i in range(5)))
        expect(page.locator("#link-note")).to_contain_text("temperature 'nan' is not a number")
        expect(page.locator("#status")).to_contain_text(f"loaded {DEFAULT.model_name}")
        expect(box("Mix")).to_have_value(DEFAULT.form.mix)
        browser.close()
