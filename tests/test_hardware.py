from pathlib import Path

import pytest
import torch

from steer_core.hardware import Budget, current_budget, format_bytes, memory_limit, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("16G", 16 * 2**30), ("16GB", 16 * 10**9), ("16GiB", 16 * 2**30), ("512m", 512 * 2**20), ("1.5g", 3 * 2**29),
     ("1000", 1000)],
)  # fmt: skip
def test_sizes_are_read_as_docker_and_the_hub_write_them(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "16 parsecs", "-1G", "0"])
def test_a_bad_size_is_named(text: str) -> None:
    with pytest.raises(ValueError, match=f"memory size {text!r} is not valid"):
        parse_size(text)


def _fake_system(tmp_path: Path, cgroup: str, files: dict[str, str], total_kb: int = 24 * 2**20) -> dict[str, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "proc_cgroup").write_text(cgroup)
    for rel, value in files.items():
        (tmp_path / "sys" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sys" / rel).write_text(value)
    (tmp_path / "meminfo").write_text(f"MemTotal:       {total_kb} kB\nMemFree: 1 kB\n")
    return {"proc_cgroup": tmp_path / "proc_cgroup", "root": tmp_path / "sys", "meminfo": tmp_path / "meminfo"}


def test_the_limit_is_the_cgroups_not_the_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Space's container sees the host's memory in /proc/meminfo; the kernel enforces its cgroup's limit."""
    monkeypatch.delenv("STEER_MEMORY_LIMIT", raising=False)
    v2 = _fake_system(tmp_path / "v2", "0::/\n", {"memory.max": str(16 * 2**30)})
    assert memory_limit(**v2) == (16 * 2**30, "cgroup memory.max")
    v1 = _fake_system(tmp_path / "v1", "4:memory:/app/x\n0::/\n", {
        "memory/app/x/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
        "memory/app/memory.limit_in_bytes": str(8 * 2**30),  # an ancestor's limit applies too
    })  # fmt: skip
    assert memory_limit(**v1)[0] == 8 * 2**30
    unlimited = _fake_system(tmp_path / "none", "0::/\n", {"memory.max": "max"}, total_kb=2**20)
    assert memory_limit(**unlimited) == (2**30, "MemTotal")
    monkeypatch.setenv("STEER_MEMORY_LIMIT", "16G")
    assert memory_limit(**v2) == (16 * 2**30, "STEER_MEMORY_LIMIT")


def test_models_that_do_not_fit_are_refused_with_size_and_limit() -> None:
    cpu = Budget(16 * 10**9, "cgroup")
    assert cpu.check_model("gemma", 268_098_176) == 1_072_392_704
    with pytest.raises(ValueError, match=r"Llama has 8.03B parameters: 32.1 GB in float32, more than the 8.0 GB "
                                         r".* \(half of its 16.0 GB memory, cgroup\)"):  # fmt: skip
        cpu.check_model("Llama", 8_030_261_248)
    gpu = Budget(70 * 10**9, "ZeroGPU", "cuda", torch.bfloat16)
    assert gpu.check_model("Llama", 8_030_261_248) == 16_060_522_496  # bfloat16 on a GPU
    with pytest.raises(ValueError, match=r"SAE big has 1342M weights: 5.4 GB in float32, more than the 2.0 GB"):
        cpu.check_sae("big", 640 * 2**20 * 2)
    with pytest.raises(ValueError, match="leave room"):
        Budget(10**9, "x", models_share=0.9, saes_share=0.2)


def test_the_budget_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEER_MEMORY_LIMIT", "16GB")
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.delenv("STEER_GPU_MEMORY", raising=False)
    assert current_budget(gpu=False).dtype == torch.float32
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    zero = current_budget()
    assert (zero.device, zero.dtype, zero.memory) == ("cuda", torch.bfloat16, 16 * 10**9)  # the host holds it first
    assert "ZeroGPU: 70.0 GB" in zero.source and format_bytes(zero.models) == "11.2 GB"  # 70% on a GPU
