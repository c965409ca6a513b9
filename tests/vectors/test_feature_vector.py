from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import D_MODEL, build_sae
from steer_core.sae.feature import check_fits, load_sae_from_disk, load_sae_from_registry
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector, from_features, from_file, read_vector_file


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sae(tmp_path_factory.mktemp("sae") / "sae", hook_name="blocks.1.hook_resid_post")


def test_load_sae_from_disk_keeps_provenance(sae_dir: Path) -> None:
    sae = load_sae_from_disk(sae_dir)
    assert sae.source.point == HookPoint(1, "resid_post")
    assert (sae.source.d_in, sae.source.d_sae) == (D_MODEL, 16)
    assert sae.source.path == str(sae_dir)
    assert sae.decoder.shape == (16, D_MODEL)


def test_hf_style_hook_names(tmp_path: Path) -> None:
    sae = load_sae_from_disk(build_sae(tmp_path / "s", hook_name="model.layers.2.output"))
    assert sae.source.point == HookPoint(2, "resid_post")


def test_missing_sae_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae_from_disk(tmp_path)


def test_sae_must_fit_the_model(sae_dir: Path) -> None:
    sae = load_sae_from_disk(sae_dir)
    with pytest.raises(ValueError, match="d_in=32.*hidden size is 64"):
        check_fits(sae.source, 64, 3)
    with pytest.raises(ValueError, match="layer 1.*0..0"):
        check_fits(sae.source, D_MODEL, 1)
    check_fits(sae.source, D_MODEL, 3)


def test_registry_lookup_errors_name_the_bad_value() -> None:
    with pytest.raises(LookupError, match="no-such-release"):
        load_sae_from_registry("no-such-release", "x")
    with pytest.raises(LookupError, match="sae_id 'nope'.*gpt2-small-res-jb"):
        load_sae_from_registry("gpt2-small-res-jb", "nope")


def test_from_features_sums_scaled_decoder_rows(sae_dir: Path) -> None:
    sae = load_sae_from_disk(sae_dir)
    vec = from_features(sae, [3, 5], [2.0, -0.5])
    expected = 2.0 * sae.decoder[3] - 0.5 * sae.decoder[5]
    torch.testing.assert_close(vec.directions[HookPoint(1, "resid_post")], expected.float())
    assert [f["index"] for f in vec.provenance["features"]] == [3, 5]
    assert vec.provenance["sae"]["hook_name"] == "blocks.1.hook_resid_post"


@pytest.mark.parametrize(
    ("features", "strengths", "match"),
    [
        ([16], [1.0], "feature 16 is out of range.*0..15"),
        ([1, 2], [1.0, 2.0, 3.0], "2 features but 3"),
        ([1], [float("inf")], "finite"),
        ([], [1.0], "at least one"),
    ],
)
def test_from_features_rejects(sae_dir: Path, features: list, strengths: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_features(load_sae_from_disk(sae_dir), features, strengths)


def test_vector_files(tmp_path: Path) -> None:
    v = torch.randn(D_MODEL)
    save_file({"v": v}, str(tmp_path / "v.safetensors"))
    torch.save(v, tmp_path / "v.pt")
    np.save(tmp_path / "v.npy", v.numpy())
    for name in ("v.safetensors", "v.pt", "v.npy"):
        torch.testing.assert_close(read_vector_file(tmp_path / name), v)
    vec = from_file(tmp_path / "v.npy", 2, "resid_pre", strength=3.0)
    torch.testing.assert_close(vec.directions[HookPoint(2, "resid_pre")], 3.0 * v)


def test_vector_file_errors(tmp_path: Path) -> None:
    save_file({"a": torch.randn(4), "b": torch.randn(4)}, str(tmp_path / "two.safetensors"))
    torch.save(torch.randn(2, 4), tmp_path / "m.pt")
    (tmp_path / "v.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="holds 2 tensors"):
        read_vector_file(tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match=r"1-D tensor.*\(2, 4\)"):
        read_vector_file(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="unsupported extension"):
        read_vector_file(tmp_path / "v.txt")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        read_vector_file(tmp_path / "missing.npy")


def test_steering_vector_roundtrip_and_checks(tmp_path: Path) -> None:
    vec = SteeringVector(
        {HookPoint(1, "resid_post"): torch.randn(8), HookPoint(0, "attn_out"): torch.randn(8)}, {"a": 1}
    )
    vec.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(tmp_path / "v.safetensors")
    assert back.points == vec.points and back.provenance == {"a": 1}
    for p in vec.points:
        torch.testing.assert_close(back.directions[p], vec.directions[p])
    with pytest.raises(ValueError, match="non-finite"):
        SteeringVector({HookPoint(1, "resid_post"): torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="one width"):
        SteeringVector({HookPoint(1, "resid_post"): torch.randn(3), HookPoint(2, "resid_post"): torch.randn(4)})
    with pytest.raises(ValueError, match="at least one"):
        SteeringVector({})


def test_vectors_add_per_site() -> None:
    a = SteeringVector({HookPoint(1, "resid_post"): torch.ones(4)}, {"source": "a"})
    b = SteeringVector(
        {HookPoint(1, "resid_post"): torch.ones(4), HookPoint(2, "attn_out"): torch.ones(4)}, {"source": "b"}
    )
    c = a + b
    torch.testing.assert_close(c.directions[HookPoint(1, "resid_post")], 2 * torch.ones(4))
    assert c.points == [HookPoint(1, "resid_post"), HookPoint(2, "attn_out")]
    assert c.provenance == {"combined": [{"source": "a"}, {"source": "b"}]}
