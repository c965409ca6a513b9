from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from helpers import D_MODEL, tiny_model
from steer_core.sites import HookPoint
from steer_core.steer import steering
from steer_core.vectors.controlvector import layer_of, load_control_vector, save_control_vector
from steer_core.vectors.vector import SteeringVector


def test_gguf_round_trip_is_bit_exact(tmp_path: Path) -> None:
    vec = SteeringVector(
        {HookPoint(1, "resid_post"): torch.randn(D_MODEL), HookPoint(3, "resid_post"): torch.randn(D_MODEL)}
    )
    path = save_control_vector(vec, tmp_path / "cv.gguf", model_hint="llama")
    back = load_control_vector(path)
    assert back.points == vec.points
    for p in vec.points:
        assert torch.equal(back.directions[p], vec.directions[p])
    assert back.provenance["model_hint"] == "llama"
    reader = gguf.GGUFReader(str(path))
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.3"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1 for t in reader.tensors)


def test_layer_numbering_follows_llama_cpp() -> None:
    """direction.N is added after block N (0-based): resid_post N, i.e. HF hidden_states[N + 1]."""
    assert layer_of(HookPoint(5, "resid_post")) == 5
    assert layer_of(HookPoint(5, "mlp_out")) == 5
    assert layer_of(HookPoint(5, "resid_pre")) == 4
    with pytest.raises(ValueError, match="direction.0"):
        layer_of(HookPoint(0, "resid_post"))
    with pytest.raises(ValueError, match="attn_out"):
        layer_of(HookPoint(3, "attn_out"))


def test_imported_vector_steers_where_llama_cpp_would(tmp_path: Path) -> None:
    """A file written by hand in llama.cpp's format moves hidden_states[N + 1] by exactly direction.N × strength."""
    v = np.random.default_rng(0).standard_normal(D_MODEL).astype(np.float32)
    path = tmp_path / "hand.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_tensor("direction.1", v)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vec = load_control_vector(path, strength=0.5)
    model = tiny_model("llama", layers=3)
    ids = torch.randint(3, 90, (1, 6))
    base = model(ids, output_hidden_states=True).hidden_states
    with steering(model, vec):
        steered = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(steered[1], base[1])
    torch.testing.assert_close(steered[2] - base[2], torch.from_numpy(0.5 * v).expand_as(base[2]), atol=1e-5, rtol=1e-5)


def test_bad_control_vectors(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("direction.1", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="not a control vector"):
        load_control_vector(path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_control_vector(tmp_path / "missing.gguf")
