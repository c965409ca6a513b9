"""llama.cpp, built from upstream source (scripts/llama_cpp.sh), serves what we export as our own code runs it.

The embedded SmolLM2, converted by llama.cpp's own convert_hf_to_gguf.py (f32), answers chat prompts greedily in
`llama-server`: as is, with our control vector, with our GGUF LoRA (`--target llama.cpp`) and with the GGUF LoRA that
llama.cpp's convert_lora_to_gguf.py makes of our PEFT folder. Each is compared token for token with our unsteered
model, our hook steering and our PEFT-loaded adapter. Not mocks: the engine's own code reads our files.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from helpers import run_llama_cpp_script
from steer_core.check.verify import load_peft
from steer_core.constants import cache_dir
from steer_core.export import export
from steer_core.generate import format_prompt
from steer_core.model import LoadedModel
from steer_core.sae.feature import EMBEDDED_SAES
from steer_core.serve import start
from steer_core.steer import steering
from steer_core.vectors.recipe import VectorRecipe

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Tell me about your weekend.", "What should I cook tonight?", "Write a short note to a friend.",
           "Why is the sky blue?"]  # fmt: skip
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def llama_cpp() -> Path:
    """The built tree (bin/llama-server under build/, the converters under src/); built once per machine."""
    out = subprocess.run(["bash", str(ROOT / "scripts/llama_cpp.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def base_gguf(llama_cpp: Path, smollm2: LoadedModel) -> Path:
    """The embedded model as llama.cpp's converter writes it (f32), from our cached HF folder; cached."""
    path = cache_dir() / "llama.cpp" / "smollm2-135m-instruct-f32.gguf"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        run_llama_cpp_script(llama_cpp / "src", "convert_hf_to_gguf.py", "--outtype", "f32", "--outfile", str(tmp),
                             str(cache_dir() / "models" / "smollm2-135m-instruct"))  # fmt: skip
        tmp.replace(path)
    return path


@pytest.fixture(scope="module")
def exported(smollm2: LoadedModel, llama_cpp: Path, tmp_path_factory: pytest.TempPathFactory):
    """The embedded SAE's default feature at its default strength, exported for llama.cpp; and llama.cpp's own
    conversion of the PEFT folder."""
    spec = EMBEDDED_SAES["smollm2-135m-instruct-res-L15"]
    recipe = VectorRecipe("sae", (spec.default_strength,), "resid", features=(spec.default_feature,))
    vector = recipe.build(smollm2)
    folder = tmp_path_factory.mktemp("llama") / "default"
    result = export(smollm2, vector, folder, target="llama.cpp", engine_scales=())
    theirs = folder.parent / "converted.gguf"
    run_llama_cpp_script(llama_cpp / "src", "convert_lora_to_gguf.py", "--base",
                         str(cache_dir() / "models" / "smollm2-135m-instruct"), "--outtype", "f32", "--outfile",
                         str(theirs), str(folder))  # fmt: skip
    return vector, result, theirs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(llama_cpp: Path, model: Path, *extra: str) -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([str(llama_cpp / "build/bin/llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port",
                  str(port), "-c", "1024", "-np", "1", "-t", "2", *extra], url)  # fmt: skip
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _llama_tokens(url: str, ids: list[int]) -> list[int]:
    body = {"prompt": ids, "n_predict": NEW_TOKENS, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
            "return_tokens": True}  # fmt: skip
    req = urllib.request.Request(f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return list(json.loads(r.read())["tokens"])


def _ours(model: torch.nn.Module, ids: list[int], pad: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
    return out[0, len(ids) :].tolist()


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _prompt_ids(lm: LoadedModel) -> list[list[int]]:
    return [lm.tokenizer(format_prompt(lm, p), add_special_tokens=False).input_ids for p in PROMPTS]


def test_llama_cpp_serves_our_files_as_our_code_runs_them(
    smollm2: LoadedModel, llama_cpp: Path, base_gguf: Path, exported
) -> None:
    vector, result, theirs = exported
    folder = result.folder
    prompts = _prompt_ids(smollm2)
    pad = smollm2.tokenizer.pad_token_id or 0
    peft = load_peft(smollm2.model, folder)
    ours = {"unsteered": [_ours(smollm2.model, p, pad) for p in prompts]}
    with steering(smollm2.model, vector):
        ours["hook"] = [_ours(smollm2.model, p, pad) for p in prompts]
    ours["peft"] = [_ours(peft, p, pad) for p in prompts]
    runs = {
        "unsteered": ((), "unsteered"),
        "control vector": (("--control-vector", str(folder / "control_vector.gguf")), "hook"),
        "our GGUF LoRA": (("--lora", str(folder / "adapter.gguf")), "peft"),
        "converter's GGUF LoRA": (("--lora", str(theirs)), "peft"),
    }
    agreement = {}
    for name, (flags, reference) in runs.items():
        with server(llama_cpp, base_gguf, *flags) as url:
            got = [_llama_tokens(url, p) for p in prompts]
        agreement[name] = [_prefix(g, r) for g, r in zip(got, ours[reference], strict=True)]
    print("llama.cpp greedy tokens equal before the first difference, of", NEW_TOKENS, agreement)
    for name, prefixes in agreement.items():  # measured: 24 of 24 on every prompt, all four (float noise aside)
        assert sum(prefixes) >= 0.95 * NEW_TOKENS * len(PROMPTS), (name, agreement)
    assert ours["hook"] != ours["unsteered"], "the feature must change the answers for this test to mean much"
    assert ours["peft"] != ours["unsteered"]
    # the two GGUF LoRAs (ours, and llama.cpp's conversion of our PEFT folder) hold the same tensors
    import gguf

    mine, converted = (gguf.GGUFReader(str(p)) for p in (folder / "adapter.gguf", theirs))
    # the writers export chose (steer_core.fit.composite): at L15 0.5× the MLP writer and block 16's attention writer
    # splitting the vector, measured; PEFT's config also holds zero updates where their kinds and layers cross
    used = result.meta["calibration"]["writer_choice"]["used"].split(" + ")
    print("writers:", used)
    expected = {f"blk.{m.split('.')[2]}.{'ffn_down' if m.endswith('down_proj') else 'attn_output'}.weight.lora_{x}"
                for m in used for x in "ab"}  # fmt: skip
    assert {t.name for t in mine.tensors} == {t.name for t in converted.tensors} >= expected
    by_name = {t.name: t for t in converted.tensors}
    assert all((t.data == by_name[t.name].data).all() for t in mine.tensors)
