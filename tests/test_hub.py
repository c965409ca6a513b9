"""Whose token each Hub request carries, and sizes read from the Hub's metadata (tests/fakehub.py, over HTTP)."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    from huggingface_hub import constants

    # take_owner_token also stops huggingface_hub sending a token it finds by itself: restored after this test
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "")
    monkeypatch.setenv("HF_TOKEN", OWNER)
    monkeypatch.delenv("SYSTEM", raising=False)
    assert not on_space() and take_owner_token() is None and __import__("os").environ["HF_TOKEN"] == OWNER
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "owner/steer")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", OWNER)
    assert on_space() and take_owner_token() == OWNER
    from huggingface_hub import get_token

    assert get_token() is None, "no library finds the owner's token by itself any more"
    assert constants.HF_HUB_DISABLE_IMPLICIT_TOKEN, "nor a saved login"


def test_a_public_server_off_spaces_keeps_the_machines_token_from_visitors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM on 0.0.0.0 is as public as a Space (steer_core.ui.exposure): its HF_TOKEN is the owner's alone."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "")
    monkeypatch.setenv("HF_TOKEN", OWNER)
    monkeypatch.delenv("SYSTEM", raising=False)
    assert take_owner_token(public=True) == OWNER and "HF_TOKEN" not in __import__("os").environ
    assert constants.HF_HUB_DISABLE_IMPLICIT_TOKEN
    with pytest.raises(PermissionError, match="sign in with Hugging Face, or paste a write token"):
        Access(True, OWNER).write_token()


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


# ---- admission: what a repo will cost, read before its weights download ----


def _llama_config(**overrides: Any) -> bytes:
    """A Llama config: by default 6.74B parameters (Llama 2 7B's shapes), a few hundred bytes."""
    from transformers import LlamaConfig

    shape: dict[str, Any] = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
                             "vocab_size": 32000, "num_attention_heads": 32} | overrides  # fmt: skip
    return LlamaConfig(**shape).to_json_string().encode()


def _weight_gets(hub: FakeHub, repo_id: str, file: str) -> list[str]:
    """Whole-file downloads of `file` (a header's byte range is not one)."""
    return [r.path for r in hub.requests_for(repo_id) if r.method == "GET" and r.path.endswith(f"/{file}")
            and r.status == 200]  # fmt: skip


def test_a_config_that_declares_a_6b_model_is_refused_before_any_weight_downloads(hub: FakeHub) -> None:
    """A 1 kB model.safetensors beside a config of 6.74B parameters: transformers would allocate and initialise the
    missing 27 GB. Its config is built on the meta device and the repo refused on what it ships per parameter."""
    import time

    from steer_core.hub import admit_model

    tiny = safetensors_header({"model.norm.weight": ("F32", [256])})
    hub.add("evil/config-only", Repo("evil", {"config.json": _llama_config(), "model.safetensors": tiny}))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"evil/config-only's config.json declares 6.74B parameters, but its weight "
                       r"files hold .* B \(at least 3.4 GB even in 4-bit\)"):  # fmt: skip
        admit_model("evil/config-only")
    assert time.perf_counter() - start < 10
    assert not _weight_gets(hub, "evil/config-only", "model.safetensors")


def test_a_huge_file_beside_the_weights_is_refused_before_it_downloads(hub: FakeHub) -> None:
    from steer_core.hub import admit_model

    weights = safetensors_header({"w": ("F32", [8, 8])})
    hub.add("evil/tokenizer", Repo("evil", {"config.json": _llama_config(), "model.safetensors": weights},
                                    declared={"tokenizer.json": 2 * 10**9}))  # fmt: skip
    with pytest.raises(ValueError, match=r"evil/tokenizer's tokenizer.json is 2.0 GB: this server downloads such a "
                       r"file up to 67.1 MB"):  # fmt: skip
        admit_model("evil/tokenizer")
    assert not [r for r in hub.requests_for("evil/tokenizer") if "/resolve/" in r.path and r.method == "GET"
                and r.status == 200], "nothing downloaded, not even the config"  # fmt: skip
    hub.add("evil/config", Repo("evil", {"model.safetensors": weights}, declared={"config.json": 5 * 10**6}))
    with pytest.raises(ValueError, match=r"config.json is 5.0 MB: this server downloads such a file up to 1.0 MB"):
        admit_model("evil/config")
    many = {f"added_{i}.json": 60 * 2**20 for i in range(3)}
    hub.add("evil/many", Repo("evil", {"model.safetensors": weights, "config.json": b"{}"}, declared=many))
    with pytest.raises(ValueError, match=r"files besides its weights come to 188.7 MB \(4 files\): this server "
                       r"downloads up to 134.2 MB"):  # fmt: skip
        admit_model("evil/many")


def test_an_admitted_model_is_pinned_and_sized_by_the_larger_count(hub: FakeHub, tmp_path: Path) -> None:
    """Files a load never reads (Llama's original/ folder, a README's images) cost nothing; the commit checked is
    the one to load."""
    from spacesim import tiny_repo
    from steer_core.hub import admit_model

    repo = tiny_repo(tmp_path / "m", "org", sha="b" * 40)
    repo.declared = {"original/consolidated.00.pth": 16 * 10**9, "banner.png": 300 * 2**20}
    hub.add("org/tiny", repo)
    lm = tiny_lm("llama")
    admitted = admit_model("org/tiny")
    assert admitted.revision == "b" * 40
    assert admitted.declared == sum(p.numel() for p in lm.model.parameters()) + sum(
        b.numel() for b in lm.model.buffers()
    )
    assert admitted.parameters == max(admitted.declared, admitted.shipped) and admitted.vocab == 96
    assert {r.path.split("/resolve/")[1].split("/")[0] for r in hub.requests_for("org/tiny")
            if "/resolve/" in r.path} == {"b" * 40}  # fmt: skip


def test_a_config_is_bounded_before_anything_is_built_from_it(hub: FakeHub) -> None:
    import time

    from steer_core.hub import admit_model

    weights = safetensors_header({"w": ("F32", [8, 8])})
    for i, (key, value) in enumerate([("vocab_size", 10**9), ("num_hidden_layers", 10**6), ("hidden_size", 2**40)]):
        config = json.loads(_llama_config(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=1))  # fmt: skip
        hub.add(f"evil/bounds{i}", Repo("evil", {"config.json": json.dumps({**config, key: value}).encode(),
                                                  "model.safetensors": weights}))  # fmt: skip
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"declares {key}={value}: this server builds models with .* up to"):
            admit_model(f"evil/bounds{i}")
        assert time.perf_counter() - start < 5
    hub.add("evil/remote", Repo("evil", {"config.json": b'{"model_type": "evil", "auto_map": {"AutoConfig": "x.C"}}',
                                         "model.safetensors": weights}))  # fmt: skip
    with pytest.raises(ValueError, match="does not describe a causal language model transformers builds without"):
        admit_model("evil/remote")


def test_repo_ids_are_checked_before_any_request() -> None:
    from steer_core.hub import check_repo_id

    assert check_repo_id("google/gemma-3-270m-it") == "google/gemma-3-270m-it" and check_repo_id("gpt2") == "gpt2"
    for bad in ["a" * 97 + "/b", "a/" + "b" * 200, "a/b/c", "a b/c", "a--b/c", "../x", "x" * 10**6, "é/x", ""]:
        with pytest.raises(ValueError, match="is not a Hub model id: a Hub model id is namespace/name"):
            check_repo_id(bad)


def test_an_sae_that_does_not_fit_the_model_is_refused_before_its_weights_download(hub: FakeHub) -> None:
    from steer_core.hub import admit_sae

    folder = "resid_post/layer_12_width_16k_l0_medium"
    config = {"architecture": "jump_relu", "hf_hook_point_in": "model.layers.12.output", "layer": 12}
    hub.add("google/gemma-scope-2-270m-it", Repo("google", {
        f"{folder}/params.safetensors": safetensors_header({
            "w_enc": ("F32", [640, 16384]), "w_dec": ("F32", [16384, 640]), "b_enc": ("F32", [16384]),
            "b_dec": ("F32", [640]), "threshold": ("F32", [16384])}),
        f"{folder}/config.json": json.dumps(config).encode(),
    }, sha="c" * 40))  # fmt: skip
    release, sae_id = "gemma-scope-2-270m-it-res", "layer_12_width_16k_l0_medium"
    admitted = admit_sae(release, sae_id, d_model=640, n_layers=18)
    assert (admitted.d_in, admitted.layer, admitted.revision) == (640, 12, "c" * 40)
    with pytest.raises(ValueError, match=rf"SAE {release} / {sae_id} has d_in=640, but the model's hidden size is 32"):
        admit_sae(release, sae_id, d_model=32, n_layers=18)
    with pytest.raises(ValueError, match=r"is at layer 12; the model has 0..3"):
        admit_sae(release, sae_id, d_model=640, n_layers=4)
    assert not _weight_gets(hub, "google/gemma-scope-2-270m-it", "params.safetensors")
    hub.repos["google/gemma-scope-2-270m-it"].declared = {f"{folder}/notes.txt": 3 * 10**9}
    with pytest.raises(ValueError, match=r"notes.txt is 3.0 GB: this server downloads such a file up to 67.1 MB"):
        admit_sae(release, sae_id)
