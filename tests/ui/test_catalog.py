import pytest

from steer_core.constants import DEFAULT_MODEL
from steer_core.ui import catalog


def test_curated_models_start_with_the_embedded_default() -> None:
    ids = [v for _, v in catalog.model_choices()]
    assert ids[0] == DEFAULT_MODEL and "gpt2" in ids and "google/gemma-3-270m-it" in ids


def test_every_curated_release_is_in_the_registry() -> None:
    for model in catalog.CURATED_MODELS:
        assert catalog.registry_releases(model.model_id) == list(model.sae_releases), model.model_id


def test_sae_choices_embedded_first_then_registry_with_neuronpedia() -> None:
    embedded = catalog.sae_choices(DEFAULT_MODEL)
    assert embedded[0].label.startswith("embedded: ") and embedded[0].path
    gpt2 = catalog.sae_choices("gpt2")
    assert all(c.release == "gpt2-small-res-jb" for c in gpt2) and len(gpt2) == 13
    assert gpt2[8].neuronpedia_url(5) == "https://www.neuronpedia.org/gpt2-small/8-res-jb/5"
    assert catalog.find_choice("gpt2", gpt2[8].label) == gpt2[8]


def test_uncurated_models_get_residual_releases_of_the_same_model() -> None:
    releases = catalog.registry_releases("gemma-2-2b")
    assert "gemma-scope-2b-pt-res-canonical" in releases
    assert not [r for r in releases if "att" in r or "mlp" in r or "transcoder" in r]
    assert catalog.sae_choices("my/own-model") == []


def test_find_choice_accepts_typed_registry_ids_and_folders_and_names_bad_ones() -> None:
    choice = catalog.find_choice("gpt2", "gemma-scope-2b-pt-res-canonical / layer_3/width_16k/canonical")
    assert choice.trained_on == "gemma-2-2b" and choice.neuronpedia_id == "gemma-2-2b/3-gemmascope-res-16k"
    assert catalog.find_choice("gpt2", "folder: /x/sae").path == "/x/sae"
    with pytest.raises(LookupError, match="sae_id 'nope'"):
        catalog.find_choice("gpt2", "gpt2-small-res-jb / nope")
    with pytest.raises(LookupError, match="not offered"):
        catalog.find_choice("gpt2", "whatever")
    with pytest.raises(ValueError, match="needs either a folder or a registry"):
        catalog.SAEChoice("x", path="/a", release="r", sae_id="i")
