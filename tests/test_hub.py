"""Whose token each Hub request carries, and sizes read from the Hub's metadata (tests/fakehub.py, over HTTP)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from fakehub import FakeHub, Repo, safetensors_header, use
from helpers import tiny_lm
from steer_core.hub import Access, local_parameters, model_size, on_space, sae_size, take_owner_token

OWNER, VISITOR = "hf_owner_SECRET", "hf_visitor"


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub({OWNER: "owner", VISITOR: "alice"}).serve() as server:
        use(server, monkeypatch)
        yield server


def test_on_a_space_the_owners_token_leaves_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", OWNER)
    monkeypatch.delenv("SYSTEM", raising=False)
    assert not on_space() and take_owner_token() is None and __import__("os").environ["HF_TOKEN"] == OWNER
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "owner/steer")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", OWNER)
    assert on_space() and take_owner_token() == OWNER
    from huggingface_hub import get_token

    assert get_token() is None, "no library finds the owner's token by itself any more"


def test_whose_token_reads_and_writes() -> None:
    local = Access()
    assert local.read_token("any/repo", curated=False) is None  # huggingface_hub's default: the user's own
    space = Access(space=True, owner=OWNER)
    assert space.read_token("google/gemma-2-2b", curated=True) == OWNER
    assert space.read_token("someone/private", curated=False) is False  # no token at all, not HF_TOKEN
    signed_in = Access(space=True, owner=OWNER, visitor=VISITOR)
    assert signed_in.read_token("alice/mine", curated=False) == VISITOR
    assert signed_in.write_token() == VISITOR
    with pytest.raises(PermissionError, match="sign in with Hugging Face, or paste a write token$"):
        space.write_token()
    assert space.reader == "" and signed_in.reader.startswith("visitor:") and VISITOR not in signed_in.reader
    assert OWNER not in repr(signed_in) and VISITOR not in repr(signed_in)


def test_a_models_size_comes_from_the_hub_before_its_weights(hub: FakeHub, tmp_path: Path) -> None:
    weights = safetensors_header({"embed": ("BF16", [1000, 64]), "layer": ("BF16", [64, 64])})
    hub.add("org/counted", Repo("org", {"model.safetensors": weights}, safetensors_total=123_456))
    hub.add("org/headers", Repo("org", {"model.safetensors": weights, "config.json": b"{}"}))
    hub.add("org/bin", Repo("org", {"pytorch_model.bin": b"x" * 2000}))
    assert model_size("org/counted").parameters == 123_456  # the Hub's own count: one request
    assert [r.path for r in hub.requests_for("org/counted")] == ["/api/models/org/counted"]
    size = model_size("org/headers")
    assert (size.parameters, size.how) == (1000 * 64 + 64 * 64, "safetensors headers")
    assert not [r for r in hub.requests_for("org/headers") if r.method == "GET" and "resolve" in r.path
                and r.status == 200], "only byte ranges of the header were read"  # fmt: skip
    assert model_size("org/bin").parameters == 1000  # 2 bytes a parameter: an over-estimate for float32 files


def test_private_and_gated_repos_need_the_right_token(hub: FakeHub) -> None:
    hub.add("owner/private", Repo("owner", {"model.safetensors": b""}, private=True, safetensors_total=10))
    hub.add("meta/gated", Repo("meta", {"model.safetensors": b""}, gated=True, readers={"owner"}, safetensors_total=10))
    with pytest.raises(RepositoryNotFoundError):
        model_size("owner/private", token=False)
    assert model_size("owner/private", token=OWNER).private
    with pytest.raises(GatedRepoError):
        model_size("meta/gated", token=VISITOR)
    assert model_size("meta/gated", token=OWNER).gated
    assert hub.tokens_seen("owner/private") == {None, OWNER}


def test_an_saes_size_is_read_from_its_files_headers(hub: FakeHub) -> None:
    d_in, width = 640, 2**20  # a 1M-feature Gemma Scope 2 SAE: 5.4 GB in float32, a few hundred bytes here
    folder = "resid_post/layer_12_width_1m_l0_medium"
    hub.add("google/gemma-scope-2-270m-it", Repo("google", {
        f"{folder}/params.safetensors": safetensors_header({
            "w_enc": ("F32", [d_in, width]), "w_dec": ("F32", [width, d_in]), "b_enc": ("F32", [width]),
            "b_dec": ("F32", [d_in]), "threshold": ("F32", [width])}),
        f"{folder}/config.json": b"{}",
    }))  # fmt: skip
    size = sae_size("gemma-scope-2-270m-it-res", "layer_12_width_1m_l0_medium")
    assert size.parameters == 2 * d_in * width + 2 * width + d_in and size.how == "safetensors headers"
    with pytest.raises(LookupError, match="sae_id 'nope' is not in release"):
        sae_size("gemma-scope-2-270m-it-res", "nope")


def test_local_sizes_are_read_without_loading(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    lm.model.save_pretrained(tmp_path / "m")
    assert local_parameters(tmp_path / "m") == sum(p.numel() for p in lm.model.parameters())
    assert local_parameters(tmp_path) is None


def test_the_shared_hub_cache_stays_under_its_budget(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    import os

    from huggingface_hub import hf_hub_download

    from steer_core.hub import trim_cache

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    for i, name in enumerate(["org/old", "org/curated", "org/new"]):
        hub.add(name, Repo("org", {"w.bin": bytes(1000)}))
        path = hf_hub_download(name, "w.bin")
        os.utime(path, (1000.0 + i, 1000.0 + i))  # accessed in this order
    assert trim_cache(5000, keep={"org/curated"}) == []  # under the budget: nothing goes
    assert trim_cache(1500, keep={"org/curated"}) == ["org/old", "org/new"]  # least recently used first, kept kept
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("models--")) == [
        "models--org--curated"
    ]
