"""`serve`: many of our adapters in one stock engine, chosen per request.

Unit: the engines' commands exactly, the refusals, vLLM's names and strength variants. End to end (e2e): one
llama-server, started from `serve`'s own plan with three exported adapters, answers concurrent requests that mix the
adapters, their scales and no adapter, each as PEFT answers with that adapter scaled (lora_B × s); and vLLM's own
LoRA loader takes the set, strength variants included, with max_loras.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_llama_cpp import base_gguf, llama_cpp  # noqa: F401  (its fixtures: the built engine, the base GGUF)

from steer_core.cli import main
from steer_core.serve import plan, sanitize, start, write_variants

ROOT = Path(__file__).resolve().parents[2]
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _folder(path: Path, base: str = BASE, gguf: bool = True) -> Path:
    path.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["down_proj"],
              "base_model_name_or_path": base}  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.model.layers.3.mlp.down_proj.lora_A.weight": torch.randn(1, 8),
               "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight": torch.randn(4, 1)},
              str(path / "adapter_model.safetensors"))  # fmt: skip
    if gguf:
        (path / "adapter.gguf").write_bytes(b"GGUF")
    return path


def test_llama_cpp_plan_loads_each_gguf_once_in_order(tmp_path: Path) -> None:
    a, b = _folder(tmp_path / "dog"), _folder(tmp_path / "cat")
    p = plan("llama.cpp", [a, b], base="base.gguf", port=9000, binary="llama-server")
    assert p.argv == ("llama-server", "-m", "base.gguf", "--lora", str(a / "adapter.gguf"), "--lora",
                      str(b / "adapter.gguf"), "--lora-init-without-apply", "-np", "1", "--host", "127.0.0.1",
                      "--port", "9000")  # fmt: skip
    assert [x.key for x in p.adapters] == [0, 1]
    # every id listed in the example body, each with its scale
    assert '"lora": [{"id": 0, "scale": 0.5}, {"id": 1, "scale": 0.0}]' in p.examples
    assert "extra_body" in p.examples and "/v1/chat/completions" in p.examples


def test_vllm_plan_names_and_strength_variants(tmp_path: Path) -> None:
    a, b = _folder(tmp_path / "my dog!", gguf=False), _folder(tmp_path / "cat", gguf=False)
    out = tmp_path / "variants"
    p = plan("vllm", [a, b], scales=[0.5, 1, 2], variants_dir=out, binary="vllm")
    names = [x.key for x in p.adapters]
    assert names == [
        "my-dog@0.5", "my-dog", "my-dog@2", "cat@0.5", "cat", "cat@2"]  # fmt: skip
    modules = [f"{x.key}={x.folder}" for x in p.adapters]
    assert p.argv == ("vllm", "serve", BASE, "--enable-lora", "--max-lora-rank", "1", "--max-loras", "6",
                      "--lora-modules", *modules, "--host", "127.0.0.1", "--port", "8000")  # fmt: skip
    assert p.adapters[1].folder == a and p.adapters[0].folder == out / "my-dog@0.5"
    assert '"model": "my-dog@0.5"' in p.examples
    write_variants(p)
    src = load_file(str(a / "adapter_model.safetensors"))
    for v in p.variants:
        got = load_file(str(v.folder / "adapter_model.safetensors"))
        orig = load_file(str(v.source / "adapter_model.safetensors"))
        for k, t in orig.items():
            assert torch.equal(got[k], t * v.scale if ".lora_B." in k else t), (v.key, k)
        assert json.loads((v.folder / "adapter_config.json").read_text()) == json.loads(
            (v.source / "adapter_config.json").read_text())  # fmt: skip
    assert src  # the source folder is left as it was
    assert sanitize("a=b,c d/é") == "a-b-c-d" and sanitize("!!") == "adapter"


def test_refusals_name_the_bad_folder(tmp_path: Path) -> None:
    a = _folder(tmp_path / "a")
    b = _folder(tmp_path / "b", base="google/gemma-3-270m-it")
    with pytest.raises(ValueError, match="different base models.*SmolLM2.*gemma-3-270m-it"):
        plan("vllm", [a, b])
    c = _folder(tmp_path / "c", gguf=False)
    with pytest.raises(ValueError, match=r"c/adapter.gguf is missing.*--target llama.cpp"):
        plan("llama.cpp", [a, c], base="base.gguf")
    with pytest.raises(ValueError, match="--base BASE.gguf"):
        plan("llama.cpp", [a])
    with pytest.raises(ValueError, match="engine 'sglang' is not one of llama.cpp, vllm"):
        plan("sglang", [a])


def test_cli_prints_the_plan_and_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = _folder(tmp_path / "dog"), _folder(tmp_path / "cat")
    args = ["serve", "--engine", "llama.cpp", str(a), str(b), "--base", "m.gguf", "--port", "8091", "--print-only"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--lora-init-without-apply -np 1 --host 127.0.0.1 --port 8091" in out
    assert f"id 0: {a}" in out and f"id 1: {b}" in out and '"lora": [{"id": 0' in out
    assert main(["serve", "--engine", "llama.cpp", str(a)]) == 1
    assert "--base BASE.gguf" in capsys.readouterr().err
    assert main(["serve", "--engine", "vllm", str(a), "--scales", "0.5,1", "--variants-dir", str(tmp_path / "v"),
                 "--print-only"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "--max-loras 2" in out and f"dog@0.5={tmp_path / 'v' / 'dog@0.5'}" in out


# ---- end to end: the engines' own code -------------------------------------------------------------------------

FEATURES = (676, 1743, 2379)  # the embedded SAE's "dog" and two others, each at 0.5 × the residual norm
SCALES = (1.0, 0.5, 2.0)


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Any]]:
    """(folder, hook vector) of each feature's export, its engine scales checked as the app's are."""
    from steer_core.export import export
    from steer_core.vectors.recipe import VectorRecipe

    root = tmp_path_factory.mktemp("serve")
    out = []
    for f in FEATURES:
        vector = VectorRecipe("sae", (0.5,), "resid", features=(f,)).build(smollm2)
        result = export(smollm2, vector, root / f"f{f}", target="llama.cpp", calibration_tokens=1024,
                        verify_tokens=256, writer="own")  # fmt: skip
        out.append((result.folder, vector))
    return out


@pytest.fixture(scope="module")
def three(exported: list[tuple[Path, Any]]) -> list[Path]:
    return [folder for folder, _ in exported]


def _complete(url: str, ids: list[int], lora: list | None) -> list[int]:
    import urllib.request

    from test_llama_cpp import NEW_TOKENS

    body = {"prompt": ids, "n_predict": NEW_TOKENS, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
            "return_tokens": True}  # fmt: skip
    if lora is not None:
        body["lora"] = lora
    req = urllib.request.Request(f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return list(json.loads(r.read())["tokens"])


@pytest.mark.e2e
def test_one_llama_server_serves_three_adapters_chosen_and_scaled_per_request(
    smollm2,
    llama_cpp: Path,  # noqa: F811
    base_gguf: Path,  # noqa: F811
    three: list[Path],
    exported: list[tuple[Path, Any]],
    tmp_path: Path,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from test_llama_cpp import NEW_TOKENS, _free_port, _ours, _prefix, _prompt_ids

    from steer_core.adapter.record import read_record
    from steer_core.check.verify import load_peft
    from steer_core.serve import lora_field
    from steer_core.steer import steering

    served = plan("llama.cpp", three, base=str(base_gguf), port=_free_port(),
                  binary=str(llama_cpp / "build/bin/llama-server"),
                  extra=["-c", "1024", "-t", "2"])  # fmt: skip
    prompts = _prompt_ids(smollm2)[:2]  # 2 prompts × 24 tokens: 10 PEFT references stay within minutes on 2 cores
    pad = smollm2.tokenizer.pad_token_id or 0
    # PEFT's answers: each adapter with lora_B × s, written as vLLM's variants are
    scaled = plan("vllm", three, scales=SCALES, variants_dir=tmp_path)
    write_variants(scaled)
    reference: dict[tuple[int | None, float], list[list[int]]] = {
        (None, 0.0): [_ours(smollm2.model, p, pad) for p in prompts]
    }
    hook: dict[tuple[int, float], list[list[int]]] = {}  # the hook at s × the exported strength
    for a in scaled.adapters:
        model = load_peft(smollm2.model, a.folder)
        i = three.index(a.source)
        reference[(i, a.scale)] = [_ours(model, p, pad) for p in prompts]
        del model
        with steering(smollm2.model, exported[i][1].scaled(a.scale)):
            hook[(i, a.scale)] = [_ours(smollm2.model, p, pad) for p in prompts]
    cases: list[tuple[int | None, float]] = [(i, s) for i in range(len(three)) for s in SCALES] + [(None, 0.0)]
    cases += [(i, 0.0) for i in range(len(three))]  # an adapter named at scale 0, the others at 0 too
    url = f"http://127.0.0.1:{served.port}"
    proc = start(served.argv, url)
    try:
        jobs = []
        for i, s in cases:
            lora = lora_field(served, {} if i is None else {i: s})  # every id listed, as the printed example does
            jobs += [((i, s), n, lora) for n in range(len(prompts))]
        with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: 26 concurrent requests, queued by the one slot
            got = list(pool.map(lambda j: _complete(url, prompts[j[1]], j[2]), jobs))
        # what llama-server does with ids a request leaves out, and with "lora": []
        only_first = [_complete(url, p, [{"id": 0, "scale": 1.0}]) for p in prompts]
        empty = [_complete(url, p, []) for p in prompts]
        absent = [_complete(url, p, None) for p in prompts]
        every = [_complete(url, p, lora_field(served, dict.fromkeys(range(len(three)), 1.0))) for p in prompts]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    agreement: dict[str, float] = {}
    with_hook: dict[str, float] = {}
    for ((i, s), n, _), tokens in zip(jobs, got, strict=True):
        key = "none" if i is None or s == 0 else f"#{FEATURES[i]} ×{s:g}"
        ref = reference[(None, 0.0)] if s == 0 else reference[(i, s)]
        agreement[key] = agreement.get(key, 0) + _prefix(tokens, ref[n]) / (NEW_TOKENS * len(prompts))
        if key != "none":
            with_hook[key] = with_hook.get(key, 0) + _prefix(tokens, hook[(i, s)][n]) / (NEW_TOKENS * len(prompts))
    agreement = {k: v / (len(three) + 1 if k == "none" else 1) for k, v in agreement.items()}
    print("llama-server vs PEFT (lora_B × s; scale 0: the unsteered model) and vs the hook at s × the strength, "
          "share of tokens before the first difference; the range each export recorded:")  # fmt: skip
    for k, v in agreement.items():
        print(f"  {k:>14}: PEFT {v:.1%}" + (f", hook {with_hook[k]:.1%}" if k in with_hook else ""))
    for i, folder in enumerate(three):
        scales = read_record(folder).scales
        assert scales is not None and scales["checked"] == [0.25, 0.5, 1.0, 1.5, 2.0], scales
        top1 = ", ".join(f"{s} {row['top1_agreement']:.1%}" for s, row in scales["by_scale"].items())
        print(f"  #{FEATURES[i]}: servable at {scales['servable']} (top-1 by scale: {top1})")
    for k, v in agreement.items():
        assert v >= 0.95, (k, agreement)
    for i in range(len(three)):
        assert reference[(i, 1.0)] != reference[(None, 0.0)], f"#{FEATURES[i]} must change the answers to mean much"

    def share(a: list[list[int]], b: list[list[int]]) -> float:
        return sum(_prefix(x, y) for x, y in zip(a, b, strict=True)) / (NEW_TOKENS * len(prompts))

    # measured on the b11434 build: an id left out of a non-empty list is at 0; an empty list, or none, is every
    # adapter at 1.0 (llama.cpp #28674), which is why every request here and in serve's examples lists every id
    left_out = share(only_first, reference[(0, 1.0)])
    print(f"a request listing only id 0 at 1: {left_out:.1%} as PEFT #{FEATURES[0]} alone (the others at 0); "
          f'"lora": []: {share(empty, every):.1%}, no "lora": {share(absent, every):.1%} '
          "as every id listed at 1")  # fmt: skip
    assert left_out >= 0.95
    assert share(empty, every) >= 0.95 and share(absent, every) >= 0.95
    assert share(empty, reference[(None, 0.0)]) < 0.5, '"lora": [] left the adapters off: update serve\'s examples'


@pytest.mark.e2e
def test_vllms_loader_takes_the_set_serve_starts_strength_variants_included(tmp_path: Path) -> None:
    from helpers import D_MODEL, tiny_lm
    from steer_core.export import export
    from steer_core.sites import HookPoint
    from steer_core.vectors.vector import SteeringVector

    lm = tiny_lm("llama")
    folders = []
    for name in ("dog", "cat"):
        vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3}, {"source": "test"})
        folders.append(export(lm, vec, tmp_path / name, calibration_tokens=512, verify_tokens=256).folder)
    served = plan("vllm", folders, scales=[0.5, 1, 2], variants_dir=tmp_path / "variants")
    write_variants(served)
    argv = served.argv
    rank, loras = argv[argv.index("--max-lora-rank") + 1], argv[argv.index("--max-loras") + 1]
    venv = subprocess.run(["bash", str(ROOT / "scripts/vllm_venv.sh")], check=True, capture_output=True, text=True)
    out = subprocess.run(
        [f"{venv.stdout.strip()}/bin/python", str(ROOT / "scripts/vllm_load.py"),
         *(str(a.folder) for a in served.adapters), "--max-lora-rank", rank, "--max-loras", loras],
        check=True, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    results = json.loads(out.stdout.strip().splitlines()[-1])
    print(rank, loras, json.dumps(results, indent=1))
    assert (rank, loras) == ("1", "6") and len(results) == 6
    assert [r["id"] for r in results] == [1, 2, 3, 4, 5, 6]
    for a, r in zip(served.adapters, results, strict=True):
        # the very weights each folder holds: the variants' lora_B times their scale (test above: equal to s × B)
        assert r["loaded"] and r["rank"] == 1 and r["scaling"] == 1.0, (a.key, r)
        assert all(m["a_equal"] and m["b_equal"] for m in r["modules"].values()), (a.key, r)
