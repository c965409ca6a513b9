"""steering.json as typed records: exports write them, every reader reads them, older folders still verify."""

import json
from pathlib import Path

import pytest
import torch

from helpers import D_MODEL, tiny_lm
from steer_core.adapter.record import FitRecord, SteeringRecord, read_record
from steer_core.check.verify import verify
from steer_core.constants import STEERING_JSON_FILENAME
from steer_core.export import export
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    lm = tiny_lm("llama")
    vector = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3}, {"source": "test"})
    result = export(lm, vector, tmp_path_factory.mktemp("a") / "adapter", calibration_tokens=1024, verify_tokens=256)
    return lm, result


def test_the_record_is_steering_json_both_ways(exported) -> None:
    _lm, result = exported
    written = json.loads((result.folder / STEERING_JSON_FILENAME).read_text())
    record = read_record(result.folder)
    assert record == result.record and record.to_dict() == written == result.meta
    assert list(written) == list(record.to_dict())  # the key order exports have always written
    assert isinstance(record.fits[0], FitRecord) and record.fits[0].point == "blocks.1.hook_resid_post"
    assert record.calibration is not None and record.calibration.tokens >= 1024
    assert record.top1 == pytest.approx(result.report.top1_agreement)


def test_an_older_folder_loads_and_verifies(exported, tmp_path: Path) -> None:
    """A folder written before some fields existed (and with a key this version does not know) reads, verifies the
    same, and keeps the unknown key when written back."""
    lm, result = exported
    old = tmp_path / "old"
    old.mkdir()
    for f in result.folder.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    data = json.loads((old / STEERING_JSON_FILENAME).read_text())
    for key in ("rank", "target", "serve", "architecture", "files", "target_files", "seconds"):
        data.pop(key)
    data["calibration"].pop("writer_choice")
    for fit in data["fits"]:
        fit.pop("reads_steered")
    data["from_the_future"] = {"x": 1}
    (old / STEERING_JSON_FILENAME).write_text(json.dumps(data))
    record = read_record(old)
    assert (record.rank, record.target, record.files, record.fits[0].reads_steered) == (1, "peft", None, True)
    assert record.to_dict()["from_the_future"] == {"x": 1}
    again = verify(lm.model, lm.tokenizer, old, tokens=256, base_model=lm.base_model_id)
    assert again.top1_agreement == pytest.approx(result.report.top1_agreement, abs=0.02)


@pytest.mark.parametrize(
    ("text", "match"),
    [("{", "not valid JSON"), ('{"mode": "portable"}', "needs at least 'mode' and 'base_model'"),
     ('{"mode": "lora", "base_model": "m", "vector": {}}', "mode 'lora' is not one of portable, exact, ablate"),
     ("[1, 2]", "needs at least")],
)  # fmt: skip
def test_a_damaged_steering_json_is_named(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / STEERING_JSON_FILENAME).write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        read_record(tmp_path)
    assert STEERING_JSON_FILENAME in str(err.value)
    with pytest.raises(FileNotFoundError, match="not an adapter exported by steer_core"):
        read_record(tmp_path / "nowhere")


def test_a_record_without_calibration_writes_none() -> None:
    record = SteeringRecord.from_dict({"mode": "exact", "base_model": "m", "vector": {"points": ["p"], "norms": {}}})
    assert "calibration" not in record.to_dict() and "fits" not in record.to_dict() and record.top1 is None
