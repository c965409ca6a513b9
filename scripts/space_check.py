"""The app as a CPU Space runs it, measured: where it listens, every request it makes to the Hub and whose token that
carried, each refusal's message, and the memory it reaches with the curated models it offers.

    .venv/bin/python -m scripts.space_check [--json docs/space-check.json]

The Space is simulated as tests/ui/test_space.py does it (tests/spacesim.py): a Gradio Space's environment, a CPU
Space's 16 GB in a memory cgroup where this machine allows one, a Hub on loopback holding the repos the curated
entries name (the embedded weights saved as those repos; Gemma Scope 2-format SAEs the project builds; GPT-2 small and
its SAE at their real shapes with random weights), an anonymous visitor and one signed in through the Space's OAuth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from gradio_client import Client, handle_file  # noqa: E402

import spacesim  # noqa: E402
from fakehub import FakeHub, Repo  # noqa: E402
from steer_core.ui.form import CONTRASTIVE, VECTOR_FILE, SteeringForm  # noqa: E402

UNIT = "× residual norm"


def gpt2_repos(tmp: Path) -> dict[str, Repo]:
    """GPT-2 small's shapes (124M parameters; SmolLM2's BPE tokenizer stands in for its own, which is not on this
    machine) and gpt2-small-res-jb's SAE format (cfg.json + sae_weights.safetensors, 24,576 features at layer 8)."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from steer_core.model import resolve

    model_dir, sae_dir = tmp / "gpt2", tmp / "gpt2-sae" / "blocks.8.hook_resid_pre"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct")[0]).save_pretrained(model_dir)
    meta = SAEMetadata(hook_name="blocks.8.hook_resid_pre", model_name="gpt2-small")
    StandardSAE(StandardSAEConfig(d_in=768, d_sae=24_576, metadata=meta)).save_model(sae_dir)
    model = Repo("openai-community", {p.name: p for p in model_dir.iterdir() if p.is_file()})  # type: ignore[arg-type]
    sae = Repo("jbloom", {f"blocks.8.hook_resid_pre/{p.name}": p for p in sae_dir.iterdir()})  # type: ignore[arg-type]
    return {"gpt2": model, "jbloom/GPT2-Small-SAEs-Reformatted": sae}


def rss(space: spacesim.Space) -> float:
    status = Path(f"/proc/{space.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024 / 1e9


def attempt(client: Client, *args: Any, api_name: str) -> str:
    try:
        return str(client.predict(*args, api_name=api_name))
    except Exception as err:  # gradio_client's AppError carries the app's message
        return f"refused: {err}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    out: dict[str, Any] = {"refusals": {}, "memory_gb": {}}
    with TemporaryDirectory() as folder:
        tmp = Path(folder)
        hub: FakeHub = spacesim.fake_hub(tmp)
        pt_scope = spacesim.gemma_scope_repo()
        hub.add("google/gemma-scope-2-270m-pt", pt_scope)
        for repo_id, repo in gpt2_repos(tmp).items():
            hub.add(repo_id, repo)
        names = {spacesim.OWNER: "the owner's HF_TOKEN", spacesim.VISITOR: "alice's sign-in (OAuth)",
                 spacesim.TYPED: "bob's typed token", None: "no token"}  # fmt: skip
        with hub.serve(), spacesim.launch(hub, tmp) as space:
            out["listening"] = sorted(spacesim.listening_addresses(space.port))
            out["memory_limit_from"] = "a 16 GB memory cgroup" if space.cgroup else "STEER_MEMORY_LIMIT=16GB"
            print(f"listening on {out['listening']} port {space.port}; reached at {space.url}; limit from "
                  f"{out['memory_limit_from']}")  # fmt: skip
            out["memory_gb"]["idle, default model loaded"] = round(rss(space), 2)
            anonymous = Client(space.url, verbose=False)
            refusals = out["refusals"]
            refusals["a visitor's private-repo id (anonymous)"] = attempt(
                anonymous, "owner/private-model", api_name="/load_model"
            )
            refusals["Llama 3.1 8B on a CPU Space"] = attempt(anonymous, spacesim.LLAMA, api_name="/load_model")
            refusals["push, not signed in"] = attempt(anonymous, "x", True, False, "", api_name="/push")
            refusals["search of 40 words"] = attempt(
                anonymous, "smollm2-135m-instruct", "", "", "a " * 40, api_name="/search_features"
            )
            many = "\n".join(f"I love thing {i}" for i in range(65))
            refusals["65 contrastive prompts"] = attempt(
                anonymous,
                "smollm2-135m-instruct",
                "hi",
                8,
                0,
                0,
                "",
                1,
                *SteeringForm(CONTRASTIVE, positive=many, negative="I hate it").values(),
                api_name="/preview",
            )
            big = tmp / "big.npy"
            big.write_bytes(b"\0" * (17 * 2**20))
            refusals["17 MB upload"] = attempt(
                anonymous,
                "smollm2-135m-instruct",
                "hi",
                8,
                0,
                0,
                "",
                *SteeringForm(VECTOR_FILE, vector_file=handle_file(str(big))).values(),
                api_name="/preview",
            )
            alice = Client(space.url, verbose=False, headers={"Cookie": f"session={spacesim.sign_in(space, hub)}"})
            refusals["Gemma Scope 2, 1M features"] = attempt(
                alice, spacesim.GEMMA, f"{spacesim.SAE_RELEASE} / {spacesim.WIDE_SAE_ID}", "", api_name="/load_sae"
            )  # needs the model first: loaded below, so this line runs again after it
            for model, sae in (
                ("gemma-3-270m", "gemma-scope-2-270m-pt-res / layer_12_width_16k_l0_medium"),
                (spacesim.GEMMA, f"{spacesim.SAE_RELEASE} / {spacesim.SAE_ID}"),
                ("gpt2", "gpt2-small-res-jb / blocks.8.hook_resid_pre"),
            ):
                start = time.perf_counter()
                status = attempt(alice, model, api_name="/load_model")
                loaded = attempt(alice, model, sae, "", api_name="/load_sae")
                print(f"{model}: {status[:90]} | {loaded[:90]} ({time.perf_counter() - start:.0f} s)")
                out["memory_gb"][f"+ {model} and {sae.split(' / ')[0]}"] = round(rss(space), 2)
            refusals["Gemma Scope 2, 1M features"] = attempt(
                alice, spacesim.GEMMA, f"{spacesim.SAE_RELEASE} / {spacesim.WIDE_SAE_ID}", "", api_name="/load_sae"
            )
            vector = SteeringForm(sae_pick=f"{spacesim.SAE_RELEASE} / {spacesim.SAE_ID}", mix="5:0.25", strength=0.25)
            vector = vector.values()
            start = time.perf_counter()
            _summary, _plot, _zip, _card, repo = alice.predict(
                spacesim.GEMMA, "portable", 16384, 0, "peft", *vector, api_name="/run_export"
            )
            out["gemma_export_seconds"] = round(time.perf_counter() - start)
            out["memory_gb"]["after a Gemma 3 270M-it export (16k calibration tokens)"] = round(rss(space), 2)
            out["push"] = alice.predict(repo, True, False, "", api_name="/push")
            peak = space.peak_memory()
            out["memory_gb"]["peak resident (VmHWM)"] = round(peak["process_peak_rss"] / 1e9, 2)
            if "cgroup_peak_with_page_cache" in peak:
                cgroup_peak = peak["cgroup_peak_with_page_cache"] / 1e9
                out["memory_gb"]["cgroup peak, page cache included"] = round(cgroup_peak, 2)
        requests = Counter((r.method, r.repo or r.path, names.get(r.token, "another token"), r.status) for r in hub.log)
        out["hub_requests"] = [
            {"method": m, "repo": repo_, "token": who, "status": status, "count": n}
            for (m, repo_, who, status), n in sorted(requests.items(), key=lambda kv: (str(kv[0][1]), kv[0][0]))
        ]
    print("\nEvery request to the Hub, by repo, with the token it carried:")
    for r in out["hub_requests"]:
        print(f"  {r['count']:3d} × {r['method']:4s} {r['repo']:45s} {r['status']}  {r['token']}")
    print("\nRefusals:")
    for what, message in out["refusals"].items():
        print(f"  {what}: {message[:400]}")
    print("\nMemory (GB):")
    for what, gb in out["memory_gb"].items():
        print(f"  {what}: {gb}")
    print(f"\nGemma 3 270M-it export: {out['gemma_export_seconds']} s; push: {out['push']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
