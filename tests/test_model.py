import platform
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_lm
from steer_core.model import EMBEDDED_MODELS, load_model, resolve


def test_local_folder_loads(tmp_path: Path) -> None:
    lm = tiny_lm("gemma3")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.arch.post_norm and not loaded.model.training
    # named by its folder alone: the id goes into what a push makes public, and this machine's paths do not
    assert loaded.base_model_id == loaded.public_name == "m" and loaded.name == str(tmp_path / "m")


def test_bad_model_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(LookupError, match="(?s)could not load model 'no-such/model-xyz'.*smollm2-135m-instruct"):
        load_model("no-such/model-xyz")


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    from transformers import BloomConfig, BloomForCausalLM

    from helpers import byte_tokenizer

    BloomForCausalLM(BloomConfig(vocab_size=96, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "b")
    byte_tokenizer().save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="'bloom' is not supported; supported: gemma, gemma2"):
        load_model(str(tmp_path / "b"))


def test_embedded_models_fall_back_to_the_hub_without_their_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STEER_CORE_CACHE", str(tmp_path))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    source, kwargs, base = resolve("smollm2-135m-instruct")
    assert source == base == EMBEDDED_MODELS["smollm2-135m-instruct"].hub_id and kwargs == {}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_stops_refaulting_vocabulary_sized_buffers_in_worker_threads() -> None:
    script = """
import resource, sys, threading, torch
if sys.argv[1] == "kept":
    from steer_core.model import keep_freed_memory
    assert keep_freed_memory()

def work():  # in a thread, as the app's requests run
    x, w = torch.randn(512, 64), torch.randn(49152, 64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(24):
        y = torch.log_softmax(x @ w.T, -1)  # 100 MB, like a batch of SmolLM2's logits
        del y
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

t = threading.Thread(target=work)
t.start()
t.join()
"""

    def page_faults(how: str) -> int:
        root = Path(__file__).parent.parent
        out = subprocess.run([sys.executable, "-c", script, how], capture_output=True, text=True, check=True, cwd=root)
        return int(out.stdout.split()[-1])

    # Measured: kept 75-150k (the first buffers, once), default 1.18M (49k for every buffer).
    assert page_faults("kept") < page_faults("default") / 4
