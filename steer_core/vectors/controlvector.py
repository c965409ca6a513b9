"""llama.cpp / repeng control vectors (GGUF): read them into a SteeringVector, write a SteeringVector as one.

The format: `general.architecture = "controlvector"`, one F32 1-D tensor `direction.N` (length n_embd) per layer.

Layer numbering, as llama.cpp applies it:
- common/common.cpp, common_control_vector_load_one: `direction.N` is stored at
  `result.data.data() + result.n_embd * (layer_idx - 1)  // layer 1 at [0]`, and `direction.0` is rejected;
- src/llama-adapter.cpp, llama_adapter_cvec::apply: `off = n_embd * (il - 1)` goes into `tensors[il]`;
- every model graph (e.g. src/models/llama.cpp) ends block `il` of `for (int il = 0; il < n_layer; ++il)` with
  `cur = build_cvec(cur, il)`, which adds `tensors[il]`.
So `direction.N` is added to the output of block N counted from 0, which is `resid_post N` here (HF
`model.layers[N]`'s output). Block 0's output cannot be steered in this format. llama.cpp adds it at every position,
BOS included, and `--control-vector-scaled FILE S` multiplies it by S.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from steer_core.provenance import file_provenance
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector

ARCH = "controlvector"
_NAME = re.compile(r"^direction\.(\d+)$")


def _gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("control vectors need the gguf package: pip install gguf") from err
    return gguf


def layer_of(point: HookPoint) -> int:
    """The llama.cpp direction index for a site: resid_post N and mlp_out N -> N; resid_pre N -> N - 1."""
    if point.site in ("resid_post", "mlp_out"):
        n = point.layer  # adding at mlp_out N and at resid_post N is the same intervention
    elif point.site == "resid_pre":
        n = point.layer - 1
    else:
        raise ValueError(f"{point.tl_name}: llama.cpp control vectors only add to block outputs, not to attn_out")
    if n < 1:
        raise ValueError(
            f"{point.tl_name} is the output of block {n}: llama.cpp never applies direction.0, so it cannot be "
            "written as a control vector"
        )
    return n


def save_control_vector(vector: SteeringVector, path: str | Path, *, model_hint: str = "llama") -> Path:
    """Write `vector` as a llama.cpp control vector. Sites that land on the same block output are summed."""
    gguf = _gguf()
    directions: dict[int, np.ndarray] = {}
    for point, v in sorted(vector.directions.items()):
        n = layer_of(point)
        arr = v.detach().float().cpu().numpy().astype(np.float32)
        directions[n] = directions[n] + arr if n in directions else arr
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    writer.add_string(f"{ARCH}.model_hint", model_hint)
    writer.add_uint32(f"{ARCH}.layer_count", len(directions))
    for n, arr in sorted(directions.items()):
        writer.add_tensor(f"direction.{n}", arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def load_control_vector(path: str | Path, strength: float = 1.0) -> SteeringVector:
    """Read a llama.cpp / repeng control vector as resid_post steering, scaled like --control-vector-scaled."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"control vector {str(path)!r} does not exist")
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    if arch != ARCH:
        raise ValueError(f"{path.name}: general.architecture is {arch!r}, not {ARCH!r}: not a control vector")
    directions: dict[HookPoint, torch.Tensor] = {}
    for tensor in reader.tensors:
        m = _NAME.match(tensor.name)
        if not m or int(m.group(1)) == 0:
            raise ValueError(f"{path.name}: tensor {tensor.name!r} is not direction.N with N >= 1")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise ValueError(f"{path.name}: {tensor.name} must be a 1-D F32 tensor")
        point = HookPoint(int(m.group(1)), "resid_post")
        v = torch.from_numpy(np.array(tensor.data, dtype=np.float32)) * strength
        directions[point] = directions[point] + v if point in directions else v  # llama.cpp sums repeats
    if not directions:
        raise ValueError(f"{path.name} holds no direction tensors")
    hint_field = reader.fields.get(f"{ARCH}.model_hint")
    hint = bytes(hint_field.parts[hint_field.data[0]]).decode() if hint_field is not None else None
    provenance = {"source": "control_vector", **file_provenance(path, "control-vector"), "strength": strength,
                  "model_hint": hint}  # fmt: skip
    return SteeringVector(directions, provenance)
