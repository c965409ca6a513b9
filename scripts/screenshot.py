"""The README's screenshot of the app (docs/app.png), made the way a newcomer uses the app, reproducibly.

Starts `python app.py` (as `bash run.sh` does) on a free 127.0.0.1 port, opens it in headless Debian chromium through
playwright at 1280 px wide, waits for the default model and its SAE, then: searches the SAE's features for --query
(step 2, "Search by meaning"), clicks the top result (the feature card shows it), makes it the only feature to steer
with (at --strength, or the app's default), sets the preview prompt (--prompt) and a short --max-new-tokens, clicks
Generate (step 3) and waits for the streamed unsteered and steered answers to stop changing; then saves a full-page
screenshot to --out (written to a temporary file beside it, then moved into place). The app is always stopped.

    .venv/bin/python -m scripts.screenshot --out docs/app.png --query dog
    .venv/bin/python -m scripts.screenshot --out /tmp/app.png --query love --strength 0.6 --prompt "Tell me a story."

Never `playwright install` (it downloads a browser): scripts/setup.sh installs Debian's chromium (or set CHROMIUM).
Prints what it did: the feature picked, the mix, and the three preview columns' texts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from scripts.load_test import free_port, stop_app

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1280, 900
STEP_S = 120  # the most one step may wait once the model is loaded (a preview waits up to --timeout)


def _chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise SystemExit("chromium not found: run `bash scripts/setup.sh` (apt-get install chromium) or set CHROMIUM")
    return found


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError as err:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the app did not start; its log ({log}):\n{log.read_text()[-3000:]}") from err
            time.sleep(1)


def _set_number(page: Any, label: str, value: float) -> str:
    """A gr.Slider's number box (Gradio labels it 'number input for LABEL'): type the value, confirm with Enter."""
    box = page.get_by_label(f"number input for {label}", exact=True)
    box.fill(f"{value:g}")
    box.press("Enter")
    box.blur()
    return str(box.input_value())


def _error_toast(page: Any) -> str | None:
    toast = page.locator(".toast-body.error")
    return toast.first.inner_text() if toast.count() else None


def _wait_for_preview(page: Any, deadline: float, settle_s: float) -> tuple[str, str, str]:
    """Until the steered answer is non-empty, no output shows Gradio's 'generating' status, and the texts have not
    changed for settle_s seconds (generation streams token by token)."""
    read = (
        "() => ['#out-base', '#out-steered', '#out-served'].map(id => document.querySelector(id + ' textarea').value)"
    )
    busy = "() => document.querySelector('#out-base .generating, #out-steered .generating, #out-served .generating')"
    last: list[str] | None = None
    since = time.monotonic()
    while True:
        if error := _error_toast(page):
            raise SystemExit(f"the preview failed: {error}")
        texts = page.evaluate(read)
        now = time.monotonic()
        if texts != last:
            last, since = texts, now
        elif texts[1].strip() and not page.evaluate(f"!!({busy})()") and now - since >= settle_s:
            return texts[0], texts[1], texts[2]
        if now > deadline:
            raise SystemExit(f"--timeout reached waiting for the preview; so far: {texts}")
        time.sleep(0.5)


def shoot(url: str, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    from playwright.sync_api import expect, sync_playwright

    def left_ms() -> float:
        return max(1.0, deadline - time.monotonic()) * 1000

    done: dict[str, Any] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT}, device_scale_factor=1)
            page.set_default_timeout(left_ms())
            expect.set_options(timeout=left_ms())
            page.goto(url)

            # 1 · the default model loaded, then its SAE, then the showcase feature's card (the page-load chain)
            expect(page.get_by_text("layers ·").first).to_be_visible()
            expect(page.get_by_text("features · reads").first).to_be_visible()
            expect(page.locator("#feature-card")).to_contain_text("Feature ")
            page.set_default_timeout(min(left_ms(), STEP_S * 1000))  # loaded: each later step is quick
            expect.set_options(timeout=min(left_ms(), STEP_S * 1000))

            # 2 · search by meaning, pick the top result
            page.get_by_role("tab", name="Search by meaning").click()
            words = page.get_by_label("Words", exact=True)
            words.fill(args.query)
            page.get_by_role("button", name="Search", exact=True).click()
            first = page.locator("#search-results").get_by_role("gridcell").first
            expect(first).not_to_have_text("")
            picked = first.inner_text().strip()
            first.click()
            expect(page.locator("#feature-card")).to_contain_text(f"Feature {picked}")
            done["feature"] = int(picked)

            # steer with that feature alone (the page preselects the embedded SAE's showcase feature)
            if args.strength is not None:
                done["strength_set"] = _set_number(page, "Strength", args.strength)
            done["strength"] = page.get_by_label("number input for Strength", exact=True).input_value()
            mix = page.get_by_label("Features to steer with")
            mix.fill("")
            page.get_by_role("button", name="Add feature").click()
            expect(mix).to_have_value(re.compile(rf"^{picked}:[^,]*$"))
            done["mix"] = mix.input_value()

            # 3 · preview
            prompt = page.get_by_label("Prompt (")  # "Prompt (the chat template ...)"; not "Positive prompts ("
            if args.prompt is not None:
                prompt.fill(args.prompt)
            done["prompt"] = prompt.input_value()
            done["max_new_tokens"] = _set_number(page, "Max new tokens", args.max_new_tokens)
            page.get_by_role("button", name="Generate", exact=True).click()
            expect(page.locator("#steer-info")).to_contain_text("vector norm")
            base, steered, served = _wait_for_preview(page, deadline, args.settle)
            done.update(unsteered=base, steered=steered, served=served)
            done["steer_info"] = page.locator("#steer-info").inner_text().strip()

            # the screenshot: full page, top of the page first (the app scrolls to the outputs)
            page.evaluate("window.scrollTo(0, 0)")
            page.mouse.move(0, 0)  # no hover highlight on the picked row or a button
            args.out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{args.out.stem}-", suffix=".png", dir=args.out.parent)
            os.close(fd)
            try:
                page.screenshot(path=tmp, full_page=True, animations="disabled", caret="hide")
                os.replace(tmp, args.out)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except BaseException:
            with contextlib.suppress(Exception):
                debug = Path(tempfile.gettempdir()) / "screenshot-failed.png"
                page.screenshot(path=str(debug), full_page=True)
                print(f"failed after: {done}; the page then: {debug}", file=sys.stderr)
            raise
        finally:
            browser.close()
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "app.png", help="the PNG to write")
    p.add_argument("--query", default="dog", help="words typed into step 2's search; the top result is steered with")
    p.add_argument("--strength", type=float, help="the feature's strength (default: the app's default)")
    p.add_argument("--prompt", help="the preview prompt (default: the app's)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens each preview column generates (8..256)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds the answers must stay unchanged to be done")
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole run, the app's start included")
    args = p.parse_args()
    if not 8 <= args.max_new_tokens <= 256:
        p.error("--max-new-tokens must be 8..256")
    if args.out.suffix.lower() != ".png":
        p.error("--out must end in .png")

    start = time.monotonic()
    deadline = start + args.timeout
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}  # fmt: skip  # loopback only, offline
    log = tempfile.NamedTemporaryFile("w+", prefix="screenshot-app-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, proc, Path(log.name), deadline)
        print(f"app up at {url} after {time.monotonic() - start:.0f} s (log: {log.name})", flush=True)
        done = shoot(url, args, deadline)
    finally:
        stop_app(proc)
        log.close()
    print(f"query {args.query!r} → feature {done['feature']} (top search result)")
    print(f"strength {done['strength']} · mix {done['mix']!r} · {done['max_new_tokens']} new tokens")
    print(f"prompt: {done['prompt']!r}")
    for key in ("unsteered", "steered", "served"):
        print(f"--- {key}:\n{done[key] or '(empty)'}")
    print(f"--- {done['steer_info']}")
    width, height = struct.unpack(">II", args.out.read_bytes()[16:24])  # the PNG's IHDR
    print(f"wrote {args.out} ({width}×{height} px) in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
