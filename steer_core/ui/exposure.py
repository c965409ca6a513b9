"""Who the app's visitors are: the machine's own user, or anyone who can reach it.

Public is the default, and it fails closed: the app treats its visitors as strangers unless it listens on this
machine's loopback only and shares no link. A public app reads no file of the server's a visitor names, pushes
only with a visitor's own token (never the machine's HF_TOKEN or saved login), and reads the Hub for a visitor with
no token of the machine's. A Space is public whatever it listens on. A local user who serves a trusted network and
wants those powers for its visitors says so with STEER_TRUST_VISITORS=1, and the page says it is on; a Space ignores
it, since its secrets are its owner's and its visitors anyone's.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

TRUST_ENV = "STEER_TRUST_VISITORS"
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Exposure:
    public: bool
    reason: str
    trusted_by_owner: bool = False  # public by where it listens, made trusted by TRUST_ENV

    def banner(self) -> str:
        """What the page says about it, when there is something to say."""
        if self.trusted_by_owner:
            return (
                f"⚠️ **{TRUST_ENV} is on** ({self.reason}): every visitor of this page may read this server's files "
                "and push to the Hub with its saved login."
            )
        return ""


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def exposure(env: Mapping[str, str] = os.environ) -> Exposure:
    """Where the app listens (Gradio's own variables: GRADIO_SERVER_NAME, GRADIO_SHARE), and so who may reach it."""
    if env.get("SYSTEM") == "spaces" and env.get("SPACE_ID"):
        return Exposure(True, "a Hugging Face Space")
    host = env.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    share = env.get("GRADIO_SHARE", "").strip().lower() in _TRUE
    if not share and is_loopback(host):
        return Exposure(False, f"listens on {host} only")
    reason = "shares a public link" if share else f"listens on {host}"
    if env.get(TRUST_ENV, "").strip().lower() in _TRUE:
        return Exposure(False, reason, trusted_by_owner=True)
    return Exposure(True, reason)
