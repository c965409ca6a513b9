"""Handler-level tests of app.py on a tiny model, one per step a user takes (the logic is tested in steer_core)."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pytest

import app
from fakehub import FakeHub, use
from helpers import build_sae, tiny_lm
from steer_core.corpus import split_texts
from steer_core.sae.feature import load_sae_from_disk
from steer_core.sae.labels import compute_labels, save_labels
from steer_core.ui.form import CONTRASTIVE, SAE_FEATURES, VECTOR_FILE, SteeringForm

POS, NEG = "I love it\nso good", "I hate it\nso bad"
UNIT = "× residual norm"
NO_PROGRESS = {"progress": lambda *a, **k: None}


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A labelled SAE for the tiny llama, as the embedded SAE ships (cfg, weights, labels.json.gz)."""
    folder = build_sae(tmp_path_factory.mktemp("sae") / "sae", d_sae=16, model_name="tiny-llama")
    lm = tiny_lm("llama")
    labels = compute_labels(load_sae_from_disk(folder), lm.model, lm.tokenizer, split_texts("heldout")[:20])
    # A random SAE's features all fire everywhere; a trained one's mostly do not: make the even ones sparse.
    for f in range(0, 16, 2):
        labels.labels[f] = dataclasses.replace(labels.labels[f], density=0.01)
    save_labels(labels, folder / "labels.json.gz")
    return str(folder)


@pytest.fixture(autouse=True)
def tiny_model() -> None:
    app.workspace.forget_model("tiny")
    app._models["tiny"] = tiny_lm("llama")


def contrastive_args(**changes: Any) -> list:
    """The form's values for the contrastive prompts POS and NEG at layer 1, with `changes` by field name."""
    return SteeringForm(
        **{"source": CONTRASTIVE, "unit": UNIT, "positive": POS, "negative": NEG, "layer": 1, **changes}
    ).values()


def sae_args(folder: str, mix: str = "3:8", strength: float = 1.0, unit: str = UNIT) -> list:
    return SteeringForm(SAE_FEATURES, "", folder, mix, strength, unit, POS, NEG, layer=1).values()


# ---- 1 · model ----


def test_model_step_offers_sae_steering_only_when_the_model_has_an_sae() -> None:
    status, sae_pick, _feature, mix, _strength, _unit, source, refine = app.on_model("tiny", **NO_PROGRESS)
    assert "tiny" in status and "layers" in status
    assert sae_pick.choices == [] and source == "Contrastive prompts" and mix == ""
    assert refine.value == 0  # pre-norm: no refinement unless asked for


def test_model_step_sets_refinement_for_a_post_norm_model() -> None:
    from steer_core.fit.refine import DEFAULT_STEPS_POST_NORM

    app.workspace.forget_model("tiny")
    app._models["tiny"] = tiny_lm("gemma3")
    *_, refine = app.on_model("tiny", **NO_PROGRESS)
    assert refine.value == DEFAULT_STEPS_POST_NORM > 0


@pytest.mark.parametrize(
    ("name", "match"),
    [("", "Pick or type a model"), ("/no/such/folder", "Could not load model"), (str(Path(__file__)), "config.json")],
)
def test_unloadable_model_is_a_clear_message(name: str, match: str) -> None:
    with pytest.raises(gr.Error, match=match):
        app.on_model(name, **NO_PROGRESS)


# ---- 2 · feature ----


def test_sae_summary_and_warning_when_trained_on_another_model(tmp_path: Path, sae_folder: str) -> None:
    text = app.on_sae("tiny", "", sae_folder)
    assert "16 features" in text and "blocks.1.hook_resid_post" in text and "⚠️" not in text
    other = build_sae(tmp_path / "other", model_name="some/other-model")
    warned = app.on_sae("tiny", "", str(other))
    assert "⚠️" in warned and "some/other-model" in warned


def test_sae_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    wide = build_sae(tmp_path / "wide", d_in=48)
    with pytest.raises(gr.Error, match="d_in=48"):
        app.on_sae("tiny", "", str(wide))
    deep = build_sae(tmp_path / "deep", hook_name="blocks.7.hook_resid_post")
    with pytest.raises(gr.Error, match="layer 7"):
        list(app.preview("tiny", "hi", 8, 0, 0, "", 1, *sae_args(str(deep))))


def test_feature_card_search_and_prompt_features(sae_folder: str) -> None:
    card = app.show_feature("tiny", "", sae_folder, 3)
    assert card.startswith("### Feature 3") and "**Promotes:**" in card
    assert "does not exist" in app.show_feature("tiny", "", sae_folder, 99)
    with pytest.raises(gr.Error, match="whole number"):
        app.show_feature("tiny", "", sae_folder, 2.5)
    labels = app.workspace.labels(app.catalog.folder_choice(sae_folder), app._models["tiny"])
    word = next(t.strip() for t in labels[5].promoted if t.strip().isalpha())
    rows, note, offer = app.search_features("tiny", "", sae_folder, word)
    assert rows and any(r[0] == 5 for r in rows) and all(r[1] > 0 for r in rows)
    # this SAE anchors no words: whether the top hit is the concept is by its cosine with the word's reading, and
    # where it is not, the word's own reading is offered
    assert f"#{rows[0][0]}" in note and offer.visible and word.strip() in offer.value
    active = app.features_on_prompt("tiny", "", sae_folder, "hello there")
    # dense features (the odd ones here) are left out; each row says which token of the prompt it fired on
    assert active and all(r[0] % 2 == 0 and 0 <= r[0] < 16 and r[1] > 0 for r in active)
    assert all(r[3] in "hello there" for r in active)
    assert app.pick_row(gr.SelectData(None, {"index": [0, 1], "value": 0.4, "row_value": [7, 0.4, "", ""]})) == 7


def test_features_combine_each_with_its_own_strength() -> None:
    assert app.add_feature("3:2", 5, 1.5, UNIT) == "3:2, 5:1.5"
    assert app.add_feature("3:2, 5:1.5", 3, -4, UNIT) == "3:-4, 5:1.5"
    with pytest.raises(gr.Error, match="finite"):
        app.add_feature("", 3, float("nan"), UNIT)
    assert app.on_unit("absolute (× decoder row)", 4.0).maximum == 400


# ---- 3 · preview ----


def test_preview_streams_both_sides_with_the_strength_in_both_units(sae_folder: str) -> None:
    outputs = list(app.preview("tiny", "hello", 8, 0, 0, "", 1, *sae_args(sae_folder, "3:8, 5:-4")))
    base, steered, served, info = outputs[-1]
    assert base and steered and base != steered
    assert len(outputs) > 2 and all(o[0] and o[1] for o in outputs), "both sides stream together, token by token"
    assert served == ""  # no adapter given
    assert "× median residual norm" in info and "vector norm" in info


def test_preview_contrastive_still_works() -> None:
    base, steered, _, _ = list(app.preview("tiny", "hello", 8, 0, 0, "", 1, *contrastive_args(strength=3.0)))[-1]
    assert base and steered


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["tiny", " ", 8, 0, 0, "", 1, *contrastive_args()], "prompt is empty"),
        (["tiny", "hi", 8, 0, 0, "", 1, *contrastive_args(strength=float("nan"))], "finite"),
        (["tiny", "hi", 8, 0, 0, "", 1, *contrastive_args(strength=1e9)], "too large"),
        (["tiny", "hi", 8, 9, 0, "", 1, *contrastive_args()], "temperature"),
        (["", "hi", 8, 0, 0, "", 1, *contrastive_args()], "Pick or type a model"),
        (["tiny", "hi", 8, 0, 0, "", 1, *SteeringForm(mix="1:2", strength=1, unit=UNIT, layer=1).values()], "no SAE"),
    ],
)
def test_bad_inputs_become_clear_ui_errors(args: list, match: str) -> None:
    with pytest.raises(gr.Error, match=match):
        list(app.preview(*args))


@pytest.mark.parametrize(
    ("mix", "match"),
    [("99:2", "out of range"), ("", "no feature chosen"), ("3:abc", "3:abc"), ("3:2, 3:1", "twice")],
)
def test_bad_feature_mixes_are_named(sae_folder: str, mix: str, match: str) -> None:
    with pytest.raises(gr.Error, match=match):
        list(app.preview("tiny", "hi", 8, 0, 0, "", 1, *sae_args(sae_folder, mix)))
    # and the app keeps working
    base, _, _, _ = list(app.preview("tiny", "hi", 4, 0, 0, "", 1, *sae_args(sae_folder)))[-1]
    assert base


# ---- 4 · export ----


def test_export_gives_report_plot_zip_card_and_repo_name(sae_folder: str) -> None:
    summary, plot, download, card, folder, repo = app.run_export(
        "tiny", "exact", 1024, 0, "peft", *sae_args(sae_folder, "3:8, 5:-4"), **NO_PROGRESS
    )
    assert "Verified on" in summary and "| top-1 next-token agreement | **100.0%** |" in summary
    assert "**Strength dial**: Servable at engine scales 0.25–2" in summary
    assert len(plot) > 0 and "library_name: peft" in card
    names = zipfile.ZipFile(download.value["path"]).namelist()
    assert {"adapter_config.json", "adapter_model.safetensors", "steering.json", "README.md"} <= set(names)
    meta = json.loads(Path(folder, "steering.json").read_text())
    assert [f["index"] for f in meta["vector"]["provenance"]["features"]] == [3, 5]
    assert repo == "steer-tiny-llama-f3-5-exact"


def test_the_preview_serves_the_exported_adapter_beside_the_hook(sae_folder: str) -> None:
    *_, folder, _ = app.run_export("tiny", "exact", 1024, 0, "peft", *sae_args(sae_folder), **NO_PROGRESS)
    outputs = list(app.preview("tiny", "hello", 8, 0, 0, folder, 1, *sae_args(sae_folder)))
    base, steered, served, info = outputs[-1]
    assert served == steered != base  # exact mode: what an endpoint serves is the hook's steering
    assert all(o[2] for o in outputs[1:]), "the served side streams with the others"
    assert "Served adapter" in info and "top-1 agreement with the hook" in info and "another vector" not in info
    *_, other = list(app.preview("tiny", "hello", 8, 0, 0, folder, 1, *sae_args(sae_folder, "5:8")))[-1]
    assert "exported from another vector than the one selected now" in other
    with pytest.raises(gr.Error, match="Served adapter: .*not a PEFT LoRA adapter"):
        list(app.preview("tiny", "hello", 8, 0, 0, str(Path(folder).parent), 1, *sae_args(sae_folder)))
    # the engine scale: the adapter at s and the hook at s × the strength, which it stands for (exact: the same)
    base2, steered2, served2, info2 = list(app.preview("tiny", "hello", 8, 0, 0, folder, 2, *sae_args(sae_folder)))[-1]
    assert served2 == steered2 != steered and base2 == base
    assert "at engine scale 2" in info2 and "Servable at engine scales 0.25–2" in info2
    assert list(app.preview("tiny", "hello", 8, 0, 0, folder, 0, *sae_args(sae_folder)))[-1][1:3] == (base, base)
    for bad in (4.5, -1, float("nan"), "2"):
        with pytest.raises(gr.Error, match=r"Engine scale: the engine scale must be a number from 0 to 4, got"):
            list(app.preview("tiny", "hello", 8, 0, 0, folder, bad, *sae_args(sae_folder)))


def test_the_servability_map_shows_each_cell_and_a_recommendation(sae_folder: str) -> None:
    text, frame = app.run_map("tiny", [], *sae_args(sae_folder, "3:8"), **NO_PROGRESS)
    assert list(frame["cell"]) == ["2×", "4×", "8×", "16×", "32×"]  # the chosen strength's multiples
    assert set(frame["servable"]) <= {"yes", "no"} and frame["predicted top-1 (%)"].between(0, 100).all()
    assert "predicted top-1" in text and "| layer | site | strength |" in text


def test_export_for_llama_cpp_zips_the_gguf_files_and_says_how_to_serve(sae_folder: str) -> None:
    summary, _, download, card, _, _ = app.run_export(
        "tiny", "portable", 1024, 0, "llama.cpp", *sae_args(sae_folder), **NO_PROGRESS
    )
    names = set(zipfile.ZipFile(download.value["path"]).namelist())
    assert {"adapter.gguf", "control_vector.gguf", "adapter_model.safetensors"} <= names
    assert "**Serve it (llama.cpp)**" in summary and "--lora" in summary and "Exported for **llama.cpp**" in card
    with pytest.raises(gr.Error, match="cannot load"):
        app.run_export("tiny", "exact", 1024, 0, "ollama", *sae_args(sae_folder), **NO_PROGRESS)


def test_export_bad_calibration_size_is_a_message() -> None:
    with pytest.raises(gr.Error, match="calibration tokens"):
        app.run_export("tiny", "portable", 10, 0, "peft", *contrastive_args(), **NO_PROGRESS)


def test_control_vector_download() -> None:
    path = app.run_control_vector("tiny", *contrastive_args())
    assert path.endswith(".gguf") and Path(path).stat().st_size > 0


def test_compare_with_sae_features(sae_folder: str) -> None:
    args = contrastive_args(sae_folder=sae_folder)  # the SAE chosen in step 2, whatever the vector's source
    text = app.run_compare("tiny", *args)
    assert "× median residual norm" in text and text.count("- feature") == 10
    with pytest.raises(gr.Error, match="Choose an SAE"):
        app.run_compare("tiny", *contrastive_args())


# ---- 5 · push (through huggingface_hub's client, to a Hub on loopback) ----

OWNER, VISITOR, TYPED = "hf_owner_SECRET", "hf_visitor_oauth", "hf_typed_by_visitor"


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub({OWNER: "owner", VISITOR: "alice", TYPED: "bob"}).serve() as server:
        use(server, monkeypatch)
        yield server


@pytest.fixture()
def on_a_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """As app.py starts on a Space (or any public server): the owner's token taken out of the environment into
    OWNER_TOKEN."""
    monkeypatch.setattr(app, "PUBLIC", True)
    monkeypatch.setattr(app, "OWNER_TOKEN", OWNER)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="module")
def exported(sae_folder: str) -> str:
    app.workspace.forget_model("tiny")
    app._models["tiny"] = tiny_lm("llama")
    return app.run_export("tiny", "exact", 1024, 0, "peft", *sae_args(sae_folder), **NO_PROGRESS)[4]


def oauth(token: str) -> gr.OAuthToken:
    return gr.OAuthToken(token=token, scope="openid profile write-repos", expires_at=2**40)


def test_push_one_commit_under_the_users_namespace(hub: FakeHub, exported: str) -> None:
    text = app.run_push(exported, "steer-x", True, False, TYPED)
    assert text.startswith(f"✅ Pushed: [{hub.url}/bob/steer-x]") and "new private repo" in text
    assert len(hub.commits["bob/steer-x"]) == 1 and hub.repos["bob/steer-x"].private
    assert hub.tokens_seen() == {TYPED}
    with pytest.raises(gr.Error, match="not valid"):
        app.run_push(exported, "bad id!!/x", True, False, TYPED)


def test_on_a_space_a_push_is_the_visitors_never_the_owners(
    hub: FakeHub, exported: str, on_a_space: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", OWNER)  # even if it were still in the environment
    with pytest.raises(gr.Error, match="sign in with Hugging Face, or paste a write token"):
        app.run_push(exported, "steer-anon", True, False, "")
    assert hub.log == [], "an anonymous visitor's push reaches nothing"
    text = app.run_push(exported, "steer-signed", False, False, "", oauth(VISITOR))
    assert f"{hub.url}/alice/steer-signed" in text
    text = app.run_push(exported, "steer-typed", False, False, TYPED)
    assert f"{hub.url}/bob/steer-typed" in text
    assert OWNER not in hub.tokens_seen() and hub.tokens_seen() == {VISITOR, TYPED}
    assert "owner/steer-anon" not in hub.repos and "owner/steer-signed" not in hub.repos


def test_a_push_into_an_existing_repo_asks_first_and_reports_its_real_visibility(hub: FakeHub, exported: str) -> None:
    app.run_push(exported, "bob/steer-again", False, False, TYPED)
    text = app.run_push(exported, "bob/steer-again", True, False, TYPED)
    assert text.startswith("⚠️ Not pushed yet. bob/steer-again exists already (public).") and "Tick" in text
    assert len(hub.commits["bob/steer-again"]) == 1
    text = app.run_push(exported, "bob/steer-again", True, True, TYPED)
    assert "updated public repo" in text and "is PUBLIC" in text and len(hub.commits["bob/steer-again"]) == 2


def test_push_refuses_without_an_export_or_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(gr.Error, match="write token, or set HF_TOKEN"):
        app.run_push("", "me/x", True, False, "")
    with pytest.raises(gr.Error, match="Export an adapter first"):
        app.run_push("", "me/x", True, False, "tok")
    with pytest.raises(gr.Error, match="cleaned up .*export it again"):  # pruned after an hour (prune_work_folders)
        app.run_push(str(tmp_path / "pruned"), "me/x", True, False, "tok")
    with pytest.raises(gr.Error, match="not verified|no steering.json"):
        app.run_push(str(tmp_path), "me/x", True, False, "tok")


def test_push_error_never_echoes_the_token(hub: FakeHub, exported: str) -> None:
    hub.fail = {"commit": 500}
    with pytest.raises(gr.Error) as err:
        app.run_push(exported, "bob/x", False, False, TYPED)
    assert TYPED not in str(err.value) and "failed the push (500" in str(err.value)


# ---- a shared server's bounds ----


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: list(app.preview("tiny", "hi", 100_000, 0, 0, "", 1, *contrastive_args())), "max new tokens .* 256"),
        (
            lambda: list(app.preview("tiny", "x" * 20_000, 8, 0, 0, "", 1, *contrastive_args())),
            r"the prompt has .* 1024",
        ),
        (lambda: app.search_features("tiny", "", "", " ".join(["dog"] * 50)), "up to 8 words"),
        (lambda: app.run_export("tiny", "portable", 10**7, 0, "peft", *contrastive_args(), **NO_PROGRESS),
         "calibration tokens must be between 256 and 65536"),
        (lambda: app.run_export("tiny", "portable", 1024, 10**5, "peft", *contrastive_args(), **NO_PROGRESS),
         "refinement steps must be between 0 and 300"),
    ],
)  # fmt: skip
def test_what_one_request_may_ask_for_is_bounded(call: Any, match: str) -> None:
    with pytest.raises(gr.Error, match=match):
        call()


def test_contrastive_prompts_and_features_are_bounded(sae_folder: str) -> None:
    many = "\n".join(f"I love thing {i}" for i in range(65))
    with pytest.raises(gr.Error, match="65 positive prompts: this server takes up to 64 per side"):
        list(app.preview("tiny", "hi", 8, 0, 0, "", 1, *contrastive_args(positive=many)))
    args = contrastive_args(positive="I love it " * 100)
    with pytest.raises(gr.Error, match=r"positive prompt 1 has \d+ tokens: this server takes up to 256"):
        list(app.preview("tiny", "hi", 8, 0, 0, "", 1, *args))
    with pytest.raises(gr.Error, match="17 features mixed: this server mixes up to 16"):
        list(app.preview("tiny", "hi", 8, 0, 0, "", 1, *sae_args(sae_folder, ", ".join(f"{f}:1" for f in range(17)))))


def test_an_upload_past_the_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.npy"
    big.write_bytes(b"\0" * (app.LIMITS.upload_bytes + 1))
    args = contrastive_args(source=VECTOR_FILE, vector_file=str(big))
    with pytest.raises(gr.Error, match=r"the vector file is 16.8 MB: this server takes files up to 16.8 MB"):
        list(app.preview("tiny", "hi", 8, 0, 0, "", 1, *args))


def test_on_a_space_no_visitor_reads_the_servers_disk(on_a_space: None, sae_folder: str, exported: str) -> None:
    with pytest.raises(gr.Error, match="does not read folders on its own disk"):
        list(app.preview("tiny", "hi", 8, 0, 0, "", 1, *sae_args(sae_folder)))
    with pytest.raises(gr.Error, match="is a path on this server"):
        list(app.preview("tiny", "hi", 8, 0, 0, str(Path(__file__).parent), 1, *contrastive_args()))
    *_, served, _ = list(app.preview("tiny", "hello", 8, 0, 0, exported, 1, *contrastive_args()))[-1]
    assert served, "an adapter this app exported is served"
    with pytest.raises(gr.Error, match="a path on this server, which a public Space does not read"):
        app.on_model(str(Path(exported)), **NO_PROGRESS, access=app.visitor_access(None))


def test_a_preview_never_loads_a_model_the_load_lane_has_not() -> None:
    with pytest.raises(gr.Error, match="not loaded yet: load it first"):
        list(app.preview("some/other-model", "hi", 8, 0, 0, "", 1, *contrastive_args()))


def test_on_a_gpu_models_load_onto_it_in_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    """ZeroGPU: CUDA is emulated outside the decorated handlers, so the weights are placed when they load."""
    import torch

    from steer_core.hardware import Budget

    seen: dict[str, Any] = {}
    monkeypatch.setattr(app, "BUDGET", Budget(70 * 10**9, "ZeroGPU", "cuda", torch.bfloat16))
    monkeypatch.setattr(app, "load_model", lambda name, **kwargs: seen.update(kwargs) or tiny_lm("llama"))
    app._load("some/model", token=False)
    assert seen == {"dtype": torch.bfloat16, "device_map": "cuda", "token": False}


def test_on_a_space_a_map_reads_no_folder_and_loads_nothing(on_a_space: None, sae_folder: str) -> None:
    with pytest.raises(gr.Error, match="does not read folders on its own disk"):
        app.run_map("tiny", [], *sae_args(f"folder: {sae_folder}"), **NO_PROGRESS)  # typed as a list label
    registry = SteeringForm(sae_pick="gpt2-small-res-jb / blocks.1.hook_resid_pre", mix="3:1", layer=1).values()
    with pytest.raises(gr.Error, match="not loaded yet: pick it in step 2"):
        app.run_map("tiny", [], *registry, **NO_PROGRESS)


def test_a_served_adapter_from_the_hub_is_the_visitors_alone(
    hub: FakeHub, exported: str, on_a_space: None, tmp_path: Path
) -> None:
    from fakehub import Repo

    app.run_push(exported, "alice/private-steer", True, False, VISITOR)
    assert hub.repos["alice/private-steer"].private
    alice = app.visitor_access(oauth(VISITOR))
    *_, served, info = list(app.preview("tiny", "hello", 8, 0, 0, "alice/private-steer", 1, *contrastive_args(),
                                        access=alice))[-1]  # fmt: skip
    assert served and "Served adapter" in info
    with pytest.raises(gr.Error, match="Served adapter: .*alice/private-steer"):  # though it was downloaded here
        list(app.preview("tiny", "hello", 8, 0, 0, "alice/private-steer", 1, *contrastive_args()))
    huge = tmp_path / "adapter_model.safetensors"
    with huge.open("wb") as f:
        f.truncate(app.LIMITS.adapter_bytes + 1)  # sparse: sized by the Hub's metadata, never downloaded
    hub.add("bob/huge", Repo("bob", {"adapter_config.json": b"{}", "adapter_model.safetensors": huge}))
    with pytest.raises(gr.Error, match="weights are 67.1 MB: this server previews adapters up to 67.1 MB"):
        list(app.preview("tiny", "hello", 8, 0, 0, "bob/huge", 1, *contrastive_args()))
    assert not [r for r in hub.requests_for("bob/huge") if "/resolve/" in r.path]


def test_a_word_without_a_feature_offers_its_reading_and_it_steers(sae_folder: str) -> None:
    from steer_core.sae.concept import NEUTRAL, TEMPLATES

    source, pos, neg, layer, site, strength, unit = app.use_concept("tiny", "", sae_folder, "volcano")
    assert source.value == "Contrastive prompts" and (layer, site) == (1, "resid_post")  # the SAE's own hook point
    assert pos.splitlines() == [t.format(w="volcano") for t in TEMPLATES]
    assert len(neg.splitlines()) == len(TEMPLATES) * len(NEUTRAL) and strength == 0.5 and unit == UNIT
    form = SteeringForm(source.value, strength=strength, unit=unit, positive=pos, negative=neg, layer=layer, site=site)
    recipe, args = app._recipe("tiny", form), form.values()
    assert recipe.source == "contrastive" and recipe.positive[0].endswith("volcano")
    base, steered, _served, info = list(app.preview("tiny", "hi", 6, 0, 0, "", 1, *args))[-1]
    assert "blocks.1.hook_resid_post" in info and base and steered
    with pytest.raises(gr.Error, match="no words"):
        app.use_concept("tiny", "", sae_folder, " 42 ")


def test_every_event_runs_in_a_named_lane_and_the_page_load_loads_nothing() -> None:
    """Gradio gives an event with no concurrency id a group of its own: an event left out would have its own workers
    beside the lanes (steer_core.ui.gate), and a raw request can send any event by its index."""
    from steer_core.ui.gate import LANES

    fns = list(app.page().fns.values())
    assert fns and {fn.concurrency_id for fn in fns} <= set(LANES), {fn.name: fn.concurrency_id for fn in fns}
    assert all(fn.concurrency_limit == LANES[fn.concurrency_id].workers for fn in fns)
    with pytest.raises(gr.Error, match="not loaded yet: load it first"):
        app.on_page("someone/any-model", **NO_PROGRESS)
    page_load = next(fn for fn in fns if "load" in [t[1] for t in fn.targets])
    assert (page_load.name, page_load.concurrency_id) == ("on_open", "page")  # a link; on_page follows it


def test_a_public_server_exports_no_merged_model(on_a_space: None, sae_folder: str) -> None:
    """A merged model is the whole model: hundreds of MB per visitor's zip on a CPU Space. Made locally instead."""
    assert "merged" not in app.app_targets() and "ollama" not in app.app_targets() and "peft" in app.app_targets()
    with pytest.raises(gr.Error, match="python -m steer_core export --target merged"):
        app.run_export("tiny", "portable", 1024, 0, "merged", *sae_args(sae_folder), **NO_PROGRESS)
