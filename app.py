"""Gradio app: steer a model, preview steered next to unsteered, export a verified LoRA adapter, push it to the Hub.

Thin wiring over steer_core: every decision lives in the package. Run locally with `bash run.sh`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from steer_core.card import MODE_WHERE
from steer_core.constants import DEFAULT_MODEL
from steer_core.export import export
from steer_core.generate import GenerationConfig, stream
from steer_core.model import EMBEDDED_MODELS, LoadedModel, load_model
from steer_core.publish import push
from steer_core.recipe import VectorRecipe

CURATED = [*EMBEDDED_MODELS, "google/gemma-3-270m-it", "google/gemma-2-2b", "gpt2", "meta-llama/Llama-3.1-8B-Instruct"]
EXAMPLE_POSITIVE = "I love this, it is wonderful and makes me so happy!\nWhat a beautiful, joyful day."
EXAMPLE_NEGATIVE = "I hate this, it is awful and makes me so sad.\nWhat a miserable, gloomy day."
UNITS = {"× residual norm": "resid", "× writer output norm": "writer", "absolute": "abs"}

_models: dict[str, LoadedModel] = {}
_load_lock = threading.Lock()


def get_model(name: str) -> LoadedModel:
    """One loaded copy per model, shared by all requests (steering hooks are per-request; see steer_core.steer)."""
    name = (name or "").strip()
    if not name:
        raise gr.Error("Pick or type a model.")
    with _load_lock:
        if name not in _models:
            try:
                _models[name] = load_model(name)
            except (ValueError, LookupError, OSError) as err:
                raise gr.Error(str(err)) from err
        return _models[name]


def _recipe(source: str, pos: str, neg: str, layer: float, site: str, sae_path: str, release: str, sae_id: str,
            features: str, vec_file: str | None, strength: float, unit: str) -> VectorRecipe:  # fmt: skip
    try:
        if source == "Contrastive prompts":
            return VectorRecipe(
                "contrastive", (float(strength),), UNITS[unit], layer=int(layer), site=site,  # type: ignore[arg-type]
                positive=tuple(pos.splitlines()), negative=tuple(neg.splitlines()),
            )  # fmt: skip
        if source == "SAE feature":
            idx = tuple(int(f) for f in features.replace(",", " ").split())
            return VectorRecipe(
                "sae", (float(strength),), UNITS[unit], path=sae_path.strip() or None,
                sae_release=release.strip() or None, sae_id=sae_id.strip() or None, features=idx,
            )  # fmt: skip
        if vec_file and vec_file.lower().endswith(".gguf"):  # a llama.cpp / repeng control vector: layers inside
            return VectorRecipe("control_vector", (float(strength),), "abs", path=vec_file)
        return VectorRecipe("file", (float(strength),), UNITS[unit], path=vec_file, layer=int(layer), site=site)  # type: ignore[arg-type]
    except ValueError as err:
        raise gr.Error(f"Bad steering settings: {err}") from err


def _build(lm: LoadedModel, recipe: VectorRecipe):
    try:
        return recipe.build(lm)
    except (ValueError, LookupError, FileNotFoundError, ImportError) as err:
        raise gr.Error(str(err)) from err


def preview(
    model_name: str, prompt: str, max_new: float, temperature: float, seed: float, *vector_args: object
) -> Iterator[tuple[str, str]]:
    lm = get_model(model_name)
    vector = _build(lm, _recipe(*vector_args))
    try:
        config = GenerationConfig(int(max_new), float(temperature), int(seed))
        base = ""
        for base in stream(lm, prompt, config=config):
            yield base, ""
        for steered in stream(lm, prompt, vector=vector, config=config):
            yield base, steered
    except ValueError as err:
        raise gr.Error(str(err)) from err


def run_export(model_name: str, mode: str, tokens: float, refine_steps: float, *vector_args, progress=gr.Progress()):
    lm = get_model(model_name)
    vector = _build(lm, _recipe(*vector_args))
    work = Path(tempfile.mkdtemp(prefix="steer-export-"))
    try:
        result = export(lm, vector, work / "adapter", mode=mode, calibration_tokens=int(tokens),
                        refine_steps=int(refine_steps), progress=lambda f, m: progress(f, desc=m))  # fmt: skip
    except (ValueError, FileExistsError) as err:
        shutil.rmtree(work, ignore_errors=True)
        raise gr.Error(str(err)) from err
    archive = shutil.make_archive(str(work / "steering-adapter"), "zip", result.folder)
    rep = result.report
    summary = (
        f"### Fidelity (held-out text, adapter vs hook)\n"
        f"- top-1 next-token agreement: **{rep.top1_agreement:.1%}**\n"
        f"- KL(hook‖adapter) {rep.kl_hook_adapter:.4g} vs KL(hook‖base) {rep.kl_hook_base:.4g} "
        f"(ratio {rep.kl_ratio:.3g}; 0 = identical)\n"
        f"- greedy continuation: {rep.greedy_prefix_mean:.1f}/{rep.greedy_tokens} tokens before first divergence\n"
        f"- time: {', '.join(f'{k} {v:.0f}s' for k, v in result.seconds.items())}\n"
        + "".join(f"\n> {n}" for n in result.meta["notes"])
    )
    import pandas as pd

    plot = pd.DataFrame({"position": range(len(rep.kl_by_position)), "KL(hook‖adapter)": rep.kl_by_position})
    card = (result.folder / "README.md").read_text(encoding="utf-8")
    return summary, plot, archive, card, str(result.folder)


def run_control_vector(model_name: str, *vector_args: object) -> str:
    """The same vector as a llama.cpp control vector, for `llama-cli --control-vector`."""
    from steer_core.controlvector import save_control_vector

    lm = get_model(model_name)
    vector = _build(lm, _recipe(*vector_args))  # type: ignore[arg-type]
    path = Path(tempfile.mkdtemp(prefix="steer-cv-")) / "control_vector.gguf"
    try:
        return str(save_control_vector(vector, path, model_hint=str(lm.model.config.model_type)))
    except ValueError as err:
        raise gr.Error(str(err)) from err


def run_compare(model_name: str, *vector_args: object) -> str:
    """The vector's norm against the layer's, and the SAE features (SAE folder field) nearest to it by cosine."""
    from steer_core.activations import median_norm
    from steer_core.feature import load_sae_from_disk, top_features_by_cosine

    sae_path = str(vector_args[5]).strip()
    if not sae_path:
        raise gr.Error("Fill in the SAE folder to compare the vector with its features.")
    lm = get_model(model_name)
    vector = _build(lm, _recipe(*vector_args))  # type: ignore[arg-type]
    try:
        sae = load_sae_from_disk(sae_path)
    except (ValueError, FileNotFoundError) as err:
        raise gr.Error(str(err)) from err
    lines = []
    for point, v in sorted(vector.directions.items()):
        ref = median_norm(lm.model, lm.tokenizer, point, "resid")
        lines.append(
            f"**{point.tl_name}**: norm {float(v.norm()):.4g} = {float(v.norm()) / ref:.3g} × median residual norm"
        )
        lines += [f"- feature {i}: cos {c:+.3f}" for i, c in top_features_by_cosine(sae, v, 10)]
    return "\n".join(lines)


def run_push(folder: str, repo_id: str, private: bool, token: str, oauth: gr.OAuthToken | None = None) -> str:
    if not folder:
        raise gr.Error("Export an adapter first.")
    secret = (oauth.token if oauth else None) or token.strip() or os.environ.get("HF_TOKEN")
    if not secret:
        raise gr.Error("Log in with Hugging Face, paste a write token, or set HF_TOKEN.")
    try:
        url = push(folder, repo_id.strip(), token=secret, private=private)
    except ValueError as err:
        raise gr.Error(str(err)) from err
    except Exception as err:  # network and permission errors from the Hub; never echo the token
        raise gr.Error(f"Push failed: {type(err).__name__}: {str(err).replace(secret, '***')}") from err
    return f"Pushed: [{url}]({url})"


with gr.Blocks(title="SAE steering → LoRA") as demo:
    gr.Markdown(
        "# Steering → servable LoRA\nPick a model and a steering vector, compare steered and unsteered "
        "generations, then export the steering as a verified rank-1 PEFT LoRA that any LoRA endpoint can serve."
    )
    model_name = gr.Dropdown(CURATED, value=DEFAULT_MODEL, allow_custom_value=True, label="Model (or any Hub id)")
    with gr.Row():
        source = gr.Radio(["Contrastive prompts", "SAE feature", "Vector file"], value="Contrastive prompts",
                          label="Steering vector from")  # fmt: skip
        layer = gr.Slider(0, 40, value=10, step=1, label="Layer (contrastive / file)")
        site = gr.Dropdown(["resid_post", "resid_pre", "mlp_out", "attn_out"], value="resid_post", label="Site")
    with gr.Row():
        pos = gr.Textbox(EXAMPLE_POSITIVE, lines=3, label="Positive prompts (one per line)")
        neg = gr.Textbox(EXAMPLE_NEGATIVE, lines=3, label="Negative prompts (one per line)")
    with gr.Row():
        sae_path = gr.Textbox(label="SAE folder (SAE Lens format)")
        release = gr.Textbox(label="or sae_lens release")
        sae_id = gr.Textbox(label="sae id")
        features = gr.Textbox(label="Feature index(es)")
    vec_file = gr.File(
        label="Vector file (.safetensors / .pt / .npy at the layer above, or a llama.cpp control vector .gguf)",
        type="filepath",
    )
    with gr.Row():
        strength = gr.Number(0.3, label="Strength")
        unit = gr.Radio(list(UNITS), value="× residual norm", label="Strength unit")
    vector_inputs = [source, pos, neg, layer, site, sae_path, release, sae_id, features, vec_file, strength, unit]

    with gr.Tab("Preview"):
        prompt = gr.Textbox("Tell me about your weekend.", label="Prompt (chat template applied for instruct models)")
        with gr.Row():
            max_new = gr.Slider(8, 256, value=48, step=8, label="Max new tokens")
            temperature = gr.Slider(0, 2, value=0, step=0.1, label="Temperature (0 = greedy)")
            seed = gr.Number(0, label="Seed", precision=0)
        go = gr.Button("Generate", variant="primary")
        with gr.Row():
            out_base = gr.Textbox(label="Unsteered", lines=8)
            out_steer = gr.Textbox(label="Steered", lines=8)
        go.click(preview, [model_name, prompt, max_new, temperature, seed, *vector_inputs], [out_base, out_steer])

    with gr.Tab("Export"):
        with gr.Row():
            mode = gr.Radio(list(MODE_WHERE), value="portable", label="Mode",
                            info=" | ".join(f"{k}: {v}" for k, v in MODE_WHERE.items()))  # fmt: skip
            tokens = gr.Slider(1024, 65536, value=16384, step=1024, label="Calibration tokens")
            refine_steps = gr.Slider(
                0, 300, value=0, step=10, label="End-to-end refinement steps (portable; slower, more faithful)"
            )
        export_btn = gr.Button("Calibrate, build and verify", variant="primary")
        report = gr.Markdown()
        plot = gr.LinePlot(x="position", y="KL(hook‖adapter)", label="KL along held-out text, by position")
        archive = gr.File(label="Adapter (zip)")
        with gr.Accordion("Model card", open=False):
            card = gr.Markdown()
        folder = gr.State("")
        export_btn.click(
            run_export, [model_name, mode, tokens, refine_steps, *vector_inputs], [report, plot, archive, card, folder]
        )
        with gr.Row():
            cv_btn = gr.Button("Also as a llama.cpp control vector (GGUF, exact, no calibration)")
            cv_file = gr.File(label="control_vector.gguf")
        cv_btn.click(run_control_vector, [model_name, *vector_inputs], cv_file)

    with gr.Tab("Compare with SAE features"):
        compare_btn = gr.Button("Nearest features of the SAE folder above, by cosine")
        compared = gr.Markdown()
        compare_btn.click(run_compare, [model_name, *vector_inputs], compared)

    with gr.Tab("Push to the Hub"):
        if os.environ.get("SPACE_ID"):  # OAuth exists on Spaces only; locally use a token or HF_TOKEN
            gr.LoginButton()
        with gr.Row():
            repo_id = gr.Textbox(label="Repo id (user/name)")
            private = gr.Checkbox(True, label="Private")
            token = gr.Textbox(label="or a write token (never stored)", type="password")
        push_btn = gr.Button("Push verified adapter")
        pushed = gr.Markdown()
        push_btn.click(run_push, [folder, repo_id, private, token], pushed)


if __name__ == "__main__":
    get_model(DEFAULT_MODEL)  # load (and on first run, dequantize and cache) before the first visitor arrives
    demo.queue(default_concurrency_limit=4).launch(server_name=os.environ.get("HOST", "127.0.0.1"))
