"""How a steering vector's sources are named in what an export writes (steering.json, the model card).

A push makes both public, so they name a file by its content, never by its path: a path names the server's folders
(a Space's upload folder, an owner's home) and an upload's own name is the uploader's business.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path


def file_provenance(path: str | Path, kind: str) -> dict[str, str]:
    """`{"file": "<kind>-<12 hex>.<suffix>", "sha256": ...}` for a file: a clean name made from its content."""
    p = Path(path)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    suffix = p.suffix.lower() if re.fullmatch(r"\.[a-z0-9]{1,12}", p.suffix.lower()) else ""
    return {"file": f"{kind}-{digest[:12]}{suffix}", "sha256": digest}
