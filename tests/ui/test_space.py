"""The app run the way a Hugging Face Space runs it (tests/spacesim.py): a Space's environment, a Hub on loopback that
records the token of every request, a CPU Space's memory limit, an anonymous visitor and one signed in through the
Space's OAuth, each driving the app through its public API as a browser would."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio
import httpx
import pytest
from gradio_client import Client

import spacesim
from fakehub import FakeHub
from spacesim import GEMMA, GEMMA_SCOPE, LLAMA, OWNER, SAE_ID, SAE_RELEASE, TYPED, VISITOR, WIDE_SAE_ID, Space
from steer_core.ui.form import SteeringForm

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SAE = f"{SAE_RELEASE} / {SAE_ID}"
UNIT = "× residual norm"


# Long enough that a preview (4-9 s on 2 shared cores, late in a full test run) ends well inside the first download
SLOW_DOWNLOAD = 20.0


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Space, FakeHub]]:
    tmp = tmp_path_factory.mktemp("space")
    hub = spacesim.fake_hub(tmp)
    for i in range(4):
        hub.add(f"someone/slow-{i}", spacesim.tiny_repo(tmp / f"slow-{i}", "someone", delay=SLOW_DOWNLOAD))
    with hub.serve(), spacesim.launch(hub, tmp) as running:
        yield running, hub


def anonymous(space: Space) -> Client:
    return Client(space.url, verbose=False)


def signed_in(space: Space, hub: FakeHub) -> Client:
    return Client(space.url, verbose=False, headers={"Cookie": f"session={spacesim.sign_in(space, hub)}"})


def refused(client: Client, *args: Any, api_name: str) -> str:
    with pytest.raises(Exception) as info:  # gradio_client raises AppError with the gr.Error's message
        client.predict(*args, api_name=api_name)
    return str(info.value)


def vector(sae: str = SAE, mix: str = "5:0.25") -> list[Any]:
    return SteeringForm(sae_pick=sae, mix=mix, strength=0.25, unit=UNIT).values()


def test_it_listens_where_a_space_says_and_serves_the_page(space: tuple[Space, FakeHub]) -> None:
    running, _ = space
    assert spacesim.listening_addresses(running.port) == {"0.0.0.0"}  # GRADIO_SERVER_NAME, not 127.0.0.1
    if spacesim.outside_address() is not None:  # a machine with no interface but loopback cannot show more
        assert not running.url.startswith("http://127.")
    page = httpx.get(running.url, timeout=30)
    assert page.status_code == 200 and "Steering" in page.text
    config = httpx.get(f"{running.url}/config", timeout=30).text
    assert "Sign in with Hugging Face" in config, "hf_oauth: the login button is there"
    # the curated list says what this hardware runs, and the limit is the one the kernel enforces
    assert "this server: 16.0 GB memory (cgroup" in config or "(STEER_MEMORY_LIMIT)" in config
    assert "Llama 3.1 8B + Llama Scope · too large here (32.1 GB in float32)" in config
    assert 'Gemma 3 270M-it + Gemma Scope 2"' in config, "what fits is offered as it is"


def test_the_front_matter_names_what_the_tests_run() -> None:
    front = (ROOT / "README.md").read_text().split("---")[1]
    assert re.search(rf"^sdk_version: {re.escape(gradio.__version__)}$", front, re.M)
    assert re.search(rf'^python_version: "{sys.version_info.major}.{sys.version_info.minor}"$', front, re.M)
    assert f"gradio[oauth]=={gradio.__version__}" in (ROOT / "requirements.txt").read_text()


def test_an_anonymous_visitor_reads_with_no_token_and_is_bounded(space: tuple[Space, FakeHub]) -> None:
    running, hub = space
    client = anonymous(running)
    message = refused(client, "owner/private-model", api_name="/load_model")
    assert "owner/private-model is not a model on the Hub that this server may read" in message
    assert hub.tokens_seen("owner/private-model") == {None}, "the owner's HF_TOKEN did not read it for a visitor"
    message = refused(client, LLAMA, api_name="/load_model")
    assert re.search(r"8.03B parameters: 32.1 GB in float32, more than the 8.0 GB this server holds models in", message)
    assert not [r for r in hub.requests_for(LLAMA) if "/resolve/" in r.path and r.status == 200 and r.method == "GET"]
    status, *_ = client.predict("someone/public-tiny", api_name="/load_model")  # sized from its headers, then loaded
    assert "✅ **someone/public-tiny**" in status and hub.tokens_seen("someone/public-tiny") == {None}
    assert "sign in with Hugging Face, or paste a write token." in refused(
        client, "my-steer", True, False, "", api_name="/push"
    )
    assert "up to 8 words" in refused(client, "smollm2-135m-instruct", "", "", "a " * 40, api_name="/search_features")


def test_slow_downloads_hold_up_no_other_visitors_preview(space: tuple[Space, FakeHub]) -> None:
    """Four visitors' loads at once, each a 20 s download: in the previews' own lane (4 workers) they would hold
    every worker, and the preview would wait for the first to end; in the load lane they queue behind one another."""
    running, _ = space

    def load(i: int) -> None:
        anonymous(running).predict(f"someone/slow-{i}", api_name="/load_model")

    loads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
    for thread in loads:
        thread.start()
    time.sleep(3)  # the first download is under way
    start = time.perf_counter()
    base, steered, _, _ = anonymous(running).predict(
        "smollm2-135m-instruct",
        "Describe something you like.",
        8,
        0,
        0,
        "",
        1,
        *SteeringForm(
            sae_pick="embedded: smollm2-135m-instruct-res-L15 (offline)", mix="676:0.5", strength=0.5
        ).values(),
        api_name="/preview",
    )
    took = time.perf_counter() - start
    assert base and steered and base != steered
    # blocked, it would have ended only after the first download (SLOW_DOWNLOAD of it) and its load did
    assert all(t.is_alive() for t in loads), f"the preview took {took:.0f} s: it waited on other visitors' downloads"
    for thread in loads:
        thread.join(120)


def test_a_signed_in_visitor_runs_the_curated_gemma_entry_end_to_end(space: tuple[Space, FakeHub]) -> None:
    """The curated "Gemma 3 270M-it + Gemma Scope 2" entry over the Hub's HTTP paths: the model as transformers
    downloads it, the SAE by sae_lens' own from_pretrained from the registry's release, repo and path, then a feature
    by index, a preview, an export and a push with the visitor's own token."""
    running, hub = space
    client = signed_in(running, hub)
    status, *_ = client.predict(GEMMA, api_name="/load_model")
    assert f"✅ **{GEMMA}**" in status and "chat template applied" in status
    assert hub.tokens_seen(GEMMA) <= {OWNER, None}, "a curated, gated model: read with the owner's token"
    message = refused(client, GEMMA, f"{SAE_RELEASE} / {WIDE_SAE_ID}", "", api_name="/load_sae")
    assert "has 1344M weights: 5.4 GB in float32, more than the 2.0 GB this server holds SAEs in" in message
    wide = [r for r in hub.requests_for(GEMMA_SCOPE) if f"{WIDE_SAE_ID}/params" in r.path and r.method == "GET"]
    assert wide and all(r.status == 206 for r in wide), "only the header of the 1M-feature SAE was read"
    summary = client.predict(GEMMA, SAE, "", api_name="/load_sae")
    assert "16384 features" in summary and "blocks.12.hook_resid_post" in summary
    card = client.predict(GEMMA, SAE, "", 5, api_name="/show_feature")
    assert card.startswith("### Feature 5")
    base, steered, _, info = client.predict(
        GEMMA, "Describe something you like.", 16, 0, 0, "", 1, *vector(), api_name="/preview"
    )
    assert base and steered and base != steered and "blocks.12.hook_resid_post" in info
    summary, _plot, _download, _card, repo = client.predict(
        GEMMA, "portable", 1024, 0, "peft", *vector(), api_name="/run_export"
    )
    assert "Verified on" in summary and "| top-1 next-token agreement |" in summary
    assert repo.startswith("steer-gemma-3-270m-it-f5-portable")
    pushed = client.predict(repo, True, False, "", api_name="/push")
    assert f"/alice/{repo}]" in pushed and "new private repo" in pushed
    assert hub.tokens_seen(f"alice/{repo}") == {VISITOR}, "the push went out with the visitor's own token"
    files = hub.repos[f"alice/{repo}"].files
    assert {"adapter_config.json", "adapter_model.safetensors", "steering.json", "README.md"} <= set(files)
    assert str(running.log.parent) not in files["steering.json"].decode(), "no server path in what was pushed"
    # the same visitor, typing another account's token instead, pushes as that account
    assert "/bob/" in client.predict(f"{repo}-bob", True, False, TYPED, api_name="/push")


def test_the_owners_token_only_ever_read_what_the_owner_curated(space: tuple[Space, FakeHub]) -> None:
    _, hub = space
    with_owner = [r for r in hub.log if r.token == OWNER]
    assert with_owner, "the curated gated model needed it"
    assert {r.repo for r in with_owner} <= {GEMMA, GEMMA_SCOPE, LLAMA}
    assert all(r.method in ("GET", "HEAD") or "/paths-info/" in r.path for r in with_owner), "reads only"
    writes = [r for r in hub.log if r.path.startswith(("/api/repos/", "/api/validate-yaml")) or "/commit/" in r.path
              or "/preupload/" in r.path]  # fmt: skip
    assert writes and {r.token for r in writes} <= {VISITOR, TYPED}


def test_a_cpu_space_holds_what_it_offers(space: tuple[Space, FakeHub]) -> None:
    """After all of the above (Gemma 3 270M-it, its SAE and an export among it) the app is alive under a CPU Space's
    16 GB, which the cgroup enforces where the machine let the test make one (the kernel kills past it)."""
    running, _ = space
    assert running.process.poll() is None, "the app died (the kernel's OOM killer, past the cgroup's limit?)"
    peak = running.peak_memory()
    assert peak["process_peak_rss"] < 16 * 10**9, f"the app's own memory peaked at {peak}"
