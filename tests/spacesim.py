"""The app as a Hugging Face Space runs it, on this machine: the environment a Gradio Space sets, a Hub on loopback
that holds the repos the curated entries name (tests/fakehub.py), a memory limit like a CPU Space's, and visitors who
are anonymous or signed in through the Space's OAuth.

Used by tests/ui/test_space.py (behaviour) and scripts/space_check.py (what it listens on, every Hub request and the
token it carried, each refusal, the memory reached).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from fakehub import FakeHub, Repo, safetensors_header

ROOT = Path(__file__).resolve().parent.parent
OWNER, VISITOR, TYPED = "hf_owner_SPACE_SECRET", "hf_oauth_alice", "hf_typed_bob"
SPACE_ID = "owner/steer-space"
CPU_SPACE_MEMORY = "16GB"  # "CPU basic: 2 vCPU, 16 GB" (Spaces hardware)
GEMMA = "google/gemma-3-270m-it"
GEMMA_SCOPE = "google/gemma-scope-2-270m-it"
SAE_RELEASE, SAE_ID = "gemma-scope-2-270m-it-res", "layer_12_width_16k_l0_medium"
WIDE_SAE_ID = "layer_12_width_1m_l0_medium"
LLAMA = "meta-llama/Llama-3.1-8B"
# Gemma 3's chat template, as the -it repo ships it (a system turn joins the first user turn); the embedded GGUF is the
# pretrained model's and has none.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first = messages[0]['content'] + '\n\n' -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set first = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ ((first if loop.first else '') + m['content']) | trim }}<end_of_turn>\n{% endfor -%}"
    "{%- if add_generation_prompt -%}<start_of_turn>model\n{% endif -%}"
)


def _cached(name: str) -> Path:
    from steer_core.constants import cache_dir

    return cache_dir() / "space-sim" / name


def gemma_it_repo() -> Repo:
    """The embedded Gemma 3 270M weights as the Hub repo the curated entry names: bfloat16 safetensors (as Google
    ships them), its tokenizer with the -it chat template. Gated: the Space owner accepted its licence."""
    from steer_core.model import resolve

    folder = _cached("gemma-3-270m-it")
    if not (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file, save_file

        source = Path(resolve("gemma-3-270m")[0])  # the dequantized embedded weights, cached once
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.to(torch.bfloat16) for k, v in load_file(str(source / "model.safetensors")).items()}
        save_file(weights, str(folder / ".model.safetensors"), metadata={"format": "pt"})
        for name in ("config.json", "generation_config.json", "tokenizer.json"):
            (folder / name).write_bytes((source / name).read_bytes())
        config = json.loads((source / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": GEMMA_CHAT_TEMPLATE}))
        os.replace(folder / ".model.safetensors", folder / "model.safetensors")
    files = {p.name: p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    total = sum(v.numel() for v in _header_shapes(folder / "model.safetensors"))
    return Repo("google", files, gated=True, readers={"owner"}, safetensors_total=total)  # type: ignore[arg-type]


def _header_shapes(path: Path) -> list[torch.Size]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return [torch.Size(f.get_slice(k).get_shape()) for k in f.keys()]  # noqa: SIM118


def gemma_scope_repo() -> Repo:
    """Gemma Scope 2's repo layout for the 270M-it model, as sae_lens' `gemma_3` loader reads it: per SAE a folder
    `resid_post/layer_12_width_16k_l0_medium` with `params.safetensors` (w_enc, w_dec, b_enc, b_dec, threshold) and
    `config.json`. The weights are the project's own JumpReLU SAE of the right shapes: unit decoder directions, a tied
    encoder, thresholds at each feature's 99.9th percentile on held-out text (so features are sparse, and labels and
    search have something to read). The 1M-feature SAE beside it is its header alone: a size check reads that much."""
    folder = f"resid_post/{SAE_ID}"
    path = _cached("gemma-scope-2") / "params.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _build_jumprelu(path, d_in=640, d_sae=16_384, layer=12)
    config = {"architecture": "jump_relu", "model_name": "gemma-v3-270m-it",
              "hf_hook_point_in": "model.layers.12.output", "width": 16_384, "l0": 60, "layer": 12,
              "type": "resid_post"}  # fmt: skip
    wide = 2**20
    return Repo("google", {
        f"{folder}/params.safetensors": path,
        f"{folder}/config.json": json.dumps(config).encode(),
        f"resid_post/{WIDE_SAE_ID}/params.safetensors": safetensors_header({
            "w_enc": ("F32", [640, wide]), "w_dec": ("F32", [wide, 640]), "b_enc": ("F32", [wide]),
            "b_dec": ("F32", [640]), "threshold": ("F32", [wide])}),
        f"resid_post/{WIDE_SAE_ID}/config.json": json.dumps({**config, "width": wide}).encode(),
    })  # fmt: skip


def _build_jumprelu(path: Path, *, d_in: int, d_sae: int, layer: int) -> None:
    from safetensors.torch import save_file

    from steer_core.activations import site_activations
    from steer_core.model import load_model
    from steer_core.sites import HookPoint

    generator = torch.Generator().manual_seed(0)
    w_dec = torch.randn(d_sae, d_in, generator=generator)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    lm = load_model("gemma-3-270m")
    x = site_activations(lm.model, lm.tokenizer, HookPoint(layer, "resid_post"), "resid", split="heldout", tokens=2048)
    pre = x @ w_dec.T
    threshold = pre.quantile(0.999, dim=0).clamp_min(1e-3)
    tensors = {"w_enc": w_dec.T.contiguous(), "w_dec": w_dec, "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in),
               "threshold": threshold}  # fmt: skip
    save_file(tensors, str(path.with_suffix(".tmp")))
    os.replace(path.with_suffix(".tmp"), path)


def tiny_repo(folder: Path, owner: str, **kwargs: object) -> Repo:
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import tiny_lm

    lm = tiny_lm("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return Repo(owner, {p.name: p for p in folder.iterdir() if p.is_file()}, **kwargs)  # type: ignore[arg-type]


def fake_hub(tmp: Path) -> FakeHub:
    """The Hub as the Space meets it: the curated Gemma entry and its SAEs, a gated 8B model (its header only: the
    size check must refuse it before anything else downloads), and the owner's private model."""
    hub = FakeHub({OWNER: "owner", VISITOR: "alice", TYPED: "bob"})
    hub.oauth_user = "alice"
    hub.add(GEMMA, gemma_it_repo())
    hub.add(GEMMA_SCOPE, gemma_scope_repo())
    hub.add(LLAMA, Repo("meta-llama", {"config.json": b"{}", "model.safetensors": safetensors_header(
        {"model.embed_tokens.weight": ("BF16", [128_256, 4096])})}, gated=True, readers={"owner"},
        safetensors_total=8_030_261_248))  # fmt: skip
    hub.add("owner/private-model", tiny_repo(tmp / "private-model", "owner", private=True))
    hub.add("someone/public-tiny", tiny_repo(tmp / "public-tiny", "someone"))
    return hub


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def outside_address() -> str | None:
    """An address of this machine that is not loopback: what another machine (the Space's proxy) connects to; None
    on a machine with no route out."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the interface a route would use
            address = str(s.getsockname()[0])
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@dataclass
class Space:
    url: str  # where a visitor reaches it: this machine's outside address
    port: int
    process: subprocess.Popen
    log: Path
    cgroup: Path | None  # the memory cgroup it runs in, where this machine lets the test make one

    def peak_memory(self) -> dict[str, int]:
        """The most memory the Space's process has held (its peak resident set), and where it runs in a cgroup, the
        cgroup's high-water mark, which also counts the page cache of the files it downloaded and wrote."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        peak = {
            "process_peak_rss": int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM"))) * 1024
        }
        if self.cgroup is not None:
            peak["cgroup_peak_with_page_cache"] = int((self.cgroup / "memory.max_usage_in_bytes").read_text())
        return peak


def _memory_cgroup(limit: int) -> Path | None:
    """A cgroup (v1) with the memory limit of a CPU Space, where this machine allows one (root, a writable
    hierarchy); else None, and the app is told its limit by STEER_MEMORY_LIMIT instead."""
    root = Path("/sys/fs/cgroup/memory")
    group = root / f"steer-space-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
        return group
    except OSError:
        return None


@contextmanager
def launch(hub: FakeHub, tmp: Path, *, memory: str = CPU_SPACE_MEMORY) -> Iterator[Space]:
    """`python app.py` with a Gradio Space's environment: SYSTEM=spaces, SPACE_ID, SPACE_HOST,
    GRADIO_SERVER_NAME=0.0.0.0, the OAuth variables `hf_oauth: true` brings, the owner's HF_TOKEN secret, and the Hub
    at `hub`."""
    from steer_core.hardware import parse_size

    port = free_port()
    cgroup = _memory_cgroup(parse_size(memory))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GRADIO_", "SPACE", "OAUTH", "STEER_Q"))},
        "SYSTEM": "spaces", "SPACE_ID": SPACE_ID, "SPACE_HOST": "owner-steer-space.hf.space",
        "SPACE_AUTHOR_NAME": "owner", "SPACE_REPO_NAME": "steer-space",
        "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
        "OAUTH_CLIENT_ID": "client-id", "OAUTH_CLIENT_SECRET": "client-secret",
        "OAUTH_SCOPES": "openid profile write-repos manage-repos", "OPENID_PROVIDER_URL": hub.url,
        "HF_TOKEN": OWNER, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp / "hf-home"), "HF_HUB_CACHE": str(tmp / "hf-cache"), "TMPDIR": str(tmp),
        "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    if cgroup is None:
        env["STEER_MEMORY_LIMIT"] = memory
    else:
        env.pop("STEER_MEMORY_LIMIT", None)
    log = tmp / "space.log"

    def enter_cgroup() -> None:  # in the child, before exec: the app reads its limit where the kernel enforces it
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=enter_cgroup,
        )  # fmt: skip
    space = Space(f"http://{outside_address() or '127.0.0.1'}:{port}", port, process, log, cgroup)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the app exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(space.url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            raise TimeoutError(f"the app did not serve its page in 300 s:\n{log.read_text()[-3000:]}")
        yield space
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        if cgroup is not None:
            with suppress(OSError):
                cgroup.rmdir()


def listening_addresses(port: int) -> set[str]:
    """The local addresses a socket listens on at `port`, from the kernel's own table (/proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def sign_in(space: Space, hub: FakeHub) -> str:
    """A visitor's 'Sign in with Hugging Face', as the browser follows it: the Space's login route, the Hub's authorize
    page, the Space's callback (which trades the code for a token at the Hub). Returns the session cookie."""
    with httpx.Client(base_url=f"http://127.0.0.1:{space.port}", follow_redirects=False, timeout=30) as browser:
        start = browser.get("/login/huggingface")
        assert start.status_code in (302, 307), start.text
        session = start.cookies.get("session") or _cookie(start)
        authorize = httpx.get(start.headers["location"], follow_redirects=False, timeout=30)
        callback = urllib.parse.urlsplit(authorize.headers["location"])  # https://SPACE_HOST/login/callback?...
        done = browser.get(f"/login/callback?{callback.query}", headers={"Cookie": f"session={session}"})
        assert done.status_code in (302, 307), done.text
        return _cookie(done)


def _cookie(response: httpx.Response) -> str:
    """The session cookie from Set-Cookie (marked Secure, so an http client's jar would not send it back)."""
    for header in response.headers.get_list("set-cookie"):
        name, _, rest = header.partition("=")
        if name.strip() == "session":
            return rest.split(";", 1)[0]
    raise AssertionError(f"no session cookie in {response.headers}")
