"""Finding shared adapters: the card's metadata (huggingface_hub's ModelCard reads it back) and find_shared's one
list call to a Hub on loopback (tests/fakehub.py), which derives tags and cardData from each repo's README."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard

from fakehub import FakeHub, Repo, use
from steer_core.adapter.card import model_card, scale_range_text
from steer_core.adapter.merged import MergeFidelity, merged_card
from steer_core.adapter.record import SteeringRecord
from steer_core.adapter.shared import MAX_LIMIT, MAX_WORDS_CHARS, find_shared

BASE_A, BASE_B = "org/base-a", "org/base-b"
OWNER = "hf_owner_token"
MERGED = MergeFidelity(max_abs_logit_diff=1e-5, max_abs_logit=20.0, tolerance=2e-3, top1_agreement=1.0, tokens=64,
                       dtype="float32")  # fmt: skip
SCALES = {
    "checked": [0.25, 0.5, 1.0, 1.5, 2.0],
    "servable": [0.5, 1.5],
    "criterion": "top-1 agreement >= 95%",
    "greedy_tokens": 20,
    "by_scale": {
        s: {"top1_agreement": t, "kl_ratio": 0.05, "greedy_prefix_mean": 15.2, "effect_kept": 0.97, "tokens": 700}
        for s, t in {"0.25": 0.93, "0.5": 0.97, "1": 0.96, "1.5": 0.95, "2": 0.91}.items()
    },
}


def record(base: str = BASE_A, labels: tuple[str, ...] = ("dog",), scales: dict[str, Any] | None = None) -> dict:
    """steering.json of an SAE export, as a dict: the features named `labels`, a by-format fidelity report."""
    fidelity = {
        "top1_agreement": 0.941, "kl_hook_adapter": 0.0107, "kl_hook_base": 2.087, "kl_ratio": 0.00511,
        "greedy_tokens": 20, "greedy_prefix_mean": 9.6, "tokens": 2765, "effect_kept": 0.98,
        "by_format": {"chat": {"top1_agreement": 0.948, "kl_ratio": 0.004, "greedy_prefix_mean": 10.0, "tokens": 700},
                      "system": {"top1_agreement": 0.936, "kl_ratio": 0.005, "greedy_prefix_mean": 9.0, "tokens": 690}},
    }  # fmt: skip
    features = [{"index": 600 + i, "strength": 3.2, "url": None, "label": label} for i, label in enumerate(labels)]
    sae = {"release": "my-saes", "sae_id": "layer_15/width_4k", "hook_name": "blocks.15.hook_resid_post"}
    data = {
        "steer_core_version": "0.1.0", "mode": "portable", "rank": 1, "base_model": base,
        "target_modules": ["model.layers.15.mlp.down_proj"],
        "vector": {"points": ["blocks.15.hook_resid_post"], "norms": {"blocks.15.hook_resid_post": 12.5},
                   "provenance": {"source": "sae", "sae": sae, "features": features, "strength_given": [0.5],
                                  "strength_unit": "resid"}},
        "fidelity": fidelity,
    }  # fmt: skip
    return data | ({"scales": scales} if scales is not None else {})


def card_of(data: dict, repo_id: str | None = None) -> str:
    return model_card(SteeringRecord.from_dict(data), repo_id)


def test_the_card_round_trips_through_huggingface_hub_and_keeps_its_body(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text(card_of(record(scales=SCALES), "me/dog"), encoding="utf-8")
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "peft" and data.base_model == BASE_A and data.base_model_relation == "adapter"
    assert {"steering", "sparse-autoencoder", "lora", "steer-core"} <= set(data.tags)
    facts = data["steer_core"]
    assert facts["sae"] == {
        "release": "my-saes",
        "sae_id": "layer_15/width_4k",
        "hook_name": "blocks.15.hook_resid_post",
    }
    assert facts["features"] == [{"index": 600, "strength": 3.2, "label": "dog"}]
    assert facts["site"] == ["blocks.15.hook_resid_post"] and facts["strength"] == [0.5]
    assert facts["strength_unit"] == "resid" and facts["mode"] == "portable" and facts["rank"] == 1
    assert facts["top1_agreement"] == 0.941 and facts["worst_format"] == "system"
    assert facts["servable_scales"] == [0.5, 1.5] and facts["scales_checked"] == [0.25, 0.5, 1.0, 1.5, 2.0]
    # the body is the one it always was: the fidelity tables, the load snippet with the repo, the label
    text = card.text
    assert "| top-1 next-token agreement with hook steering | 94.10% |" in text
    assert text.index("By input format") < text.index("All formats together")
    assert 'PeftModel.from_pretrained(model, "me/dog")' in text and "labelled `dog`" in text
    # the engine scales: one line, then a row per scale
    assert "Servable at engine scales 0.5–1.5 (the LoRA scale a llama-server request sets" in text
    assert "| 0.25 | 93.00% | 0.05 | 15.2 | 97% | 700 | no |" in text
    assert "| 1.5 | 95.00% | 0.05 | 15.2 | 97% | 700 | yes |" in text


def test_a_card_without_scales_or_a_hub_base_model_still_reads_back() -> None:
    text = card_of(record(base="/home/me/models/local"))
    card = ModelCard(text)
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert card.data["steer_core"]["base_model"] == "/home/me/models/local"
    assert "servable_scales" not in card.data["steer_core"] and "Engine scales" not in text
    assert "library_name: peft" in text


def test_scale_range_text_says_what_was_servable_and_when_nothing_was() -> None:
    assert scale_range_text(SCALES).startswith("Servable at engine scales 0.5–1.5 (")
    assert scale_range_text(SCALES | {"servable": [1.0, 1.0]}).startswith("Servable at engine scale 1 (")
    low = {s: row | {"top1_agreement": 0.9} for s, row in SCALES["by_scale"].items()}
    none = scale_range_text(SCALES | {"servable": None, "by_scale": low})
    assert "no checked scale (0.25, 0.5, 1, 1.5, 2) reached top-1 agreement >= 95%" in none
    below = scale_range_text(SCALES | {"servable": [0.25, 0.5], "by_scale": low})
    assert below.startswith("Servable at engine scales 0.25–0.5 (")
    assert below.endswith("Not at scale 1, the exported strength itself (90.0%): serve it at scales 0.25–0.5.")
    # steering.json may be anyone's: damaged values are left out, never raised on
    assert "Servable at no engine scale" in scale_range_text({"servable": ["x", None], "checked": "zz", "by_scale": 3})


def test_the_merged_card_is_a_finetune_with_the_same_facts() -> None:
    card = ModelCard(merged_card(SteeringRecord.from_dict(record()), MERGED))
    assert card.data.base_model == BASE_A and card.data.base_model_relation == "finetune"
    assert card.data["steer_core"]["features"][0]["label"] == "dog"


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub({OWNER: "owner"}).serve() as server:
        use(server, monkeypatch)

        def add(repo_id: str, readme: str, **kw: Any) -> None:
            files = {"README.md": readme.encode(), "adapter_config.json": b"{}"}
            server.add(repo_id, Repo(repo_id.split("/")[0], files, **kw))

        add("alice/dog-steer", card_of(record(labels=("dog", "puppies")), "alice/dog-steer"), downloads=5, likes=2)
        add("bob/ocean", card_of(record(labels=("Ocean waves",), scales=SCALES)), downloads=9)
        add("bob/cat-b", card_of(record(base=BASE_B, labels=("cat",))), downloads=50)
        add("carol/plain-lora", f"---\nlibrary_name: peft\nbase_model: {BASE_A}\ntags:\n- lora\n---\n# a LoRA\n")
        add("owner/secret-dog", card_of(record(labels=("dog",))), private=True)
        add("alice/dog-merged", merged_card(SteeringRecord.from_dict(record()), MERGED))
        yield server


def test_find_shared_lists_the_steer_core_adapters_of_one_base_model(hub: FakeHub) -> None:
    found = find_shared(BASE_A, token=False)
    assert [a.repo_id for a in found] == ["bob/ocean", "alice/dog-steer"], "most downloaded first; no merge, no B"
    assert [(r.path, r.token) for r in hub.log] == [("/api/models", None)], "one list call, with no token"
    ocean, dog = found
    assert ocean.labels == ("Ocean waves",) and ocean.servable == (0.5, 1.5) and ocean.downloads == 9
    assert dog.labels == ("dog", "puppies") and dog.features == (600, 601) and dog.likes == 2
    assert dog.sae == "my-saes/layer_15/width_4k" and dog.site == ("blocks.15.hook_resid_post",)
    assert dog.strengths == (0.5,) and dog.strength_unit == "resid" and dog.top1 == 0.941 and dog.mode == "portable"
    assert dog.servable is None and dog.last_modified is not None and dog.base_model == BASE_A
    assert [a.repo_id for a in find_shared(BASE_B, token=False)] == ["bob/cat-b"]
    assert find_shared("org/none", token=False) == []
    # the owner's token sees the owner's private adapter too
    assert "owner/secret-dog" in {a.repo_id for a in find_shared(BASE_A, token=OWNER)}
    assert [a.repo_id for a in find_shared(BASE_A, limit=1, token=False)] == ["bob/ocean"]


def test_words_match_labels_and_repo_ids_as_plain_text(hub: FakeHub) -> None:
    assert [a.repo_id for a in find_shared(BASE_A, "PUPPIES", token=False)] == ["alice/dog-steer"]
    assert [a.repo_id for a in find_shared(BASE_A, "wave ocean", token=False)] == ["bob/ocean"]
    assert [a.repo_id for a in find_shared(BASE_A, "alice", token=False)] == ["alice/dog-steer"]
    assert [a.repo_id for a in find_shared(BASE_A, "#601", token=False)] == ["alice/dog-steer"]
    assert find_shared(BASE_A, "dog cat", token=False) == [], "every word must match"
    assert find_shared(BASE_A, ".*", token=False) == [], "a pattern is text, not a regular expression"


@pytest.mark.parametrize(
    ("base", "words", "limit", "match"),
    [
        ("not a repo id", "", 5, "not a base model id"),
        ("org/base-a", "x" * (MAX_WORDS_CHARS + 1), 5, f"at most {MAX_WORDS_CHARS} characters"),
        ("org/base-a", "", 0, "limit must be .* 1 to 100, got 0"),
        ("org/base-a", "", MAX_LIMIT + 1, "got 101"),
        ("org/base-a", "", True, "got True"),
    ],
)
def test_bad_input_is_refused_before_any_request(base: str, words: str, limit: Any, match: str) -> None:
    class NoHub:
        def list_models(self, **kw: Any) -> None:
            raise AssertionError("no request for bad input")

    with pytest.raises(ValueError, match=match):
        find_shared(base, words, limit=limit, api=NoHub())


def test_a_malformed_card_leaves_its_fields_empty(hub: FakeHub) -> None:
    hostile = "---\nbase_model: org/base-a\nlibrary_name: peft\ntags: [steer-core]\nsteer_core:\n  features: 7\n" \
        "  sae: [1]\n  strength: [.nan, x]\n  servable_scales: [1]\n  top1_agreement: yes\n  label: " + "w" * 500 + \
        "\n---\n"  # fmt: skip
    hub.add("eve/odd", Repo("eve", {"README.md": hostile.encode()}, downloads=100))
    odd = find_shared(BASE_A, token=False)[0]
    assert odd.repo_id == "eve/odd" and odd.features == () and odd.sae is None and odd.strengths == ()
    assert odd.servable is None and odd.top1 is None and len(odd.labels[0]) == 200


def test_the_fake_hub_lists_models_as_huggingface_hub_asks(hub: FakeHub) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=False)
    listed = {m.id: m for m in api.list_models(filter="steer-core", full=True)}
    assert set(listed) == {"alice/dog-steer", "bob/ocean", "bob/cat-b", "alice/dog-merged"}, "private: not to others"
    assert "base_model:adapter:org/base-a" in listed["bob/ocean"].tags and "peft" in listed["bob/ocean"].tags
    assert "base_model:finetune:org/base-a" in listed["alice/dog-merged"].tags
    assert listed["bob/ocean"].card_data["steer_core"]["features"][0]["label"] == "Ocean waves"
    assert [m.id for m in api.list_models(search="DOG", author="alice")] == ["alice/dog-steer", "alice/dog-merged"]
    plain = next(iter(api.list_models(filter=["lora", "base_model:adapter:org/base-a"], sort="likes", limit=1)))
    assert plain.id == "alice/dog-steer" and plain.card_data is None, "cardData only when asked for"
    (only,) = api.list_models(search="plain", expand=["likes"])
    assert only.id == "carol/plain-lora" and only.likes == 0 and only.tags is None, "expand: those properties only"
