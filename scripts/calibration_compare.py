"""Does a refactor of calibration change any number? Save reference adapters and reports before it, compare after.

    git checkout BEFORE && .venv/bin/python -m scripts.calibration_compare save /tmp/calib_before.pt
    git checkout AFTER && .venv/bin/python -m scripts.calibration_compare save /tmp/calib_after.pt
    .venv/bin/python -m scripts.calibration_compare compare /tmp/calib_before.pt /tmp/calib_after.pt

23 cases on tiny random models (llama, gpt2, gemma3): calibrate() with each of its switches, reused statistics,
refine, and full exports in every mode; tensors, steering.json (less timings) and fidelity numbers. Only public entry
points (steer_core.fit.calibrate.calibrate, steer_core.export.export, steer_core.fit.refine.refine; before #31's
subpackages, steer_core.calibrate and steer_core.refine), so the same script runs on both sides of a refactor. Used
for the calibrate.py split (#19): equal but for cv_rel_rmse at the 14th digit.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from helpers import D_MODEL, tiny_lm  # noqa: E402
from steer_core.export import export  # noqa: E402
from steer_core.fit.calibrate import calibrate  # noqa: E402
from steer_core.fit.refine import refine  # noqa: E402
from steer_core.sites import HookPoint  # noqa: E402
from steer_core.vectors.vector import SteeringVector  # noqa: E402


def cal_record(cal) -> dict:
    return {
        "fits": [
            {
                "point": f.point.tl_name,
                "module": f.module,
                "writer": f.writer,
                "A": f.A.clone(),
                "B": f.B.clone(),
                "target": f.target,
                "ridge": f.ridge,
                "tokens": f.tokens,
                "cv_rel_rmse": f.cv_rel_rmse,
                "b_unscaled_norm": f.b_unscaled_norm,
                "refined_steps": f.refined_steps,
            }
            for f in cal.fits
        ],
        "tokens": cal.tokens,
        "skip_bos": cal.skip_bos,
        "corpus": cal.corpus,
        "refine": cal.refine,
        "first_weight": cal.first_weight,
        "selection_kl": cal.selection_kl,
        "shares": cal.shares,
        "reused_statistics": cal.reused_statistics,
    }


def vec(points, scale: float, seed: int) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({p: torch.randn(D_MODEL, generator=g) * scale for p in points}, {"source": "test"})


R1, R2, P2 = HookPoint(1, "resid_post"), HookPoint(2, "resid_post"), HookPoint(2, "resid_pre")


def run() -> dict:
    out: dict = {}
    # calibrate() directly, several settings; a fresh model per case so the statistics cache starts empty
    cases = {
        "llama_default": ("llama", [R1], 3.0, {}),
        "llama_skip_bos": ("llama", [R1], 3.0, {"skip_bos": True}),
        "llama_one_weight": ("llama", [R1], 3.0, {"first_weights": (1.0,)}),
        "llama_two_sites": ("llama", [R1, HookPoint(0, "attn_out")], 3.0, {}),
        "llama_sink_weights": ("llama", [R1], 8.0, {"first_weights": (1.0, 100.0), "select_tokens": 256}),
        "gpt2_default": ("gpt2", [R1], 3.0, {}),
        "gemma_default": ("gemma3", [R1], 3.0, {}),
        "gemma_skip_bos": ("gemma3", [R1], 3.0, {"skip_bos": True}),
        "gemma_no_share_fit": ("gemma3", [R1], 3.0, {"share_steps": 0}),
        "gemma_no_split": ("gemma3", [R1], 3.0, {"split_writers": False}),
        "gemma_one_weight": ("gemma3", [R1], 3.0, {"first_weights": (1.0,)}),
        "gemma_two_sites": ("gemma3", [HookPoint(0, "resid_post"), R2], 2.0, {}),
        "gemma_mlp_out": ("gemma3", [HookPoint(1, "mlp_out")], 3.0, {}),
        "gemma_resid_pre": ("gemma3", [P2], 3.0, {"first_weights": (1.0, 10.0)}),
    }
    for i, (name, (family, points, scale, kw)) in enumerate(cases.items()):
        lm = tiny_lm(family)
        cal = calibrate(lm.model, lm.tokenizer, vec(points, scale, i), tokens=kw.pop("tokens", 1024), **kw)
        out[name] = cal_record(cal)
        print(name, cal.first_weight, cal.selection_kl, cal.shares.get("used"), flush=True)
        if name in ("llama_default", "gemma_default"):
            # a second vector at the site: statistics reused
            again = calibrate(lm.model, lm.tokenizer, vec(points, 5.0, 100 + i), tokens=1024)
            out[name + "_reused"] = cal_record(again)
            assert again.reused_statistics
            ref = refine(lm.model, lm.tokenizer, vec(points, 5.0, 100 + i), again, steps=3)
            out[name + "_refined"] = cal_record(ref)

    # whole exports: adapter tensors, steering.json (minus timings) and fidelity numbers
    exports = {
        "export_llama_portable": ("llama", [R1], {}),
        "export_gemma_portable": ("gemma3", [R1], {}),
        "export_gemma_portable_refined": ("gemma3", [R1], {"refine_steps": 2}),
        "export_llama_exact": ("llama", [R1], {"mode": "exact"}),
        "export_gemma_ablate": ("gemma3", [R1], {"mode": "ablate"}),
    }
    from safetensors.torch import load_file

    for i, (name, (family, points, kw)) in enumerate(exports.items()):
        lm = tiny_lm(family)
        with tempfile.TemporaryDirectory() as tmp:
            res = export(
                lm, vec(points, 3.0, 50 + i), Path(tmp) / "a", calibration_tokens=1024, verify_tokens=512, **kw
            )
            tensors = load_file(str(res.folder / "adapter_model.safetensors"))
        meta = {k: v for k, v in res.meta.items() if k != "seconds"}
        if "calibration" in meta:
            meta["calibration"] = {k: v for k, v in meta["calibration"].items() if k != "seconds"}
        out[name] = {"tensors": tensors, "meta": meta, "fidelity": res.report.to_dict()}
        print(name, res.report.top1_agreement, res.report.kl_ratio, flush=True)
    return out


def diff(a, b, path: str, problems: list[str]) -> None:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{path}: tensor shape/dtype differs")
        elif not torch.equal(a, b):
            problems.append(f"{path}: max |diff| {float((a.double() - b.double()).abs().max()):.3g}")
    elif isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            problems.append(
                f"{path}: keys differ {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else b}"
            )
            return
        for k in a:
            diff(a[k], b[k], f"{path}.{k}", problems)
    elif isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            problems.append(f"{path}: length differs")
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff(x, y, f"{path}[{i}]", problems)
    elif isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        pass  # both NaN
    elif a != b:
        problems.append(f"{path}: {a!r} != {b!r}")


if __name__ == "__main__":
    if sys.argv[1] == "save":
        torch.save(run(), sys.argv[2])
        print("saved", sys.argv[2])
    else:
        before, after = torch.load(sys.argv[2], weights_only=False), torch.load(sys.argv[3], weights_only=False)
        problems: list[str] = []
        diff(before, after, "", problems)
        print(
            f"{len(before)} cases compared;", "ALL BITWISE EQUAL" if not problems else f"{len(problems)} differences:"
        )
        for p in problems:
            print(" ", p)
        sys.exit(1 if problems else 0)
