import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import D_MODEL, build_sae, tiny_lm
from steer_core.cli import build_parser, main, recipe_from_args
from steer_core.vectors.recipe import VectorRecipe


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    lm = tiny_lm("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vec") / "v.safetensors"
    save_file({"v": torch.randn(D_MODEL)}, str(path))
    return path


def test_export_then_verify_json(
    model_dir: Path, vector_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "adapter"
    argv = [
        "export",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--vector",
        str(vector_file),
        "--layer",
        "1",
        "--strength",
        "4",
        "--calibration-tokens",
        "1024",
        "--verify-tokens",
        "256",
    ]
    assert main(argv) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    assert main(["verify", "--model", str(model_dir), "--adapter", str(out), "--tokens", "1024", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"top1_agreement", "kl_hook_adapter", "kl_hook_base"} <= report.keys()
    # every input format the chat model is served in, measured on its own held-out tokens, the worst named
    assert set(report["by_format"]) == {"chat", "system", "multiturn", "plain"}
    assert sum(g["tokens"] for g in report["by_format"].values()) == report["tokens"]
    assert report["worst_format"] == min(report["by_format"], key=lambda f: report["by_format"][f]["top1_agreement"])
    assert set(report["by_source"]) <= {"generated", "wordnet", "fortunes", "jargon"} and report["by_source"]
    meta = json.loads((out / "steering.json").read_text())
    assert meta["vector"]["provenance"]["strength"] == 4.0
    assert meta["calibration"]["refine"] is None  # pre-norm: no refinement unless asked for


def test_export_refines_a_post_norm_model_by_default(
    tmp_path: Path, vector_file: Path, capsys: pytest.CaptureFixture
) -> None:
    from steer_core.fit.refine import DEFAULT_STEPS_POST_NORM, LR_POST_NORM

    folder = tmp_path / "tiny-gemma3"
    lm = tiny_lm("gemma3")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    common = ["--model", str(folder), "--vector", str(vector_file), "--layer", "1", "--calibration-tokens", "512"]
    common += ["--verify-tokens", "128"]
    assert main(["export", "--out", str(tmp_path / "a"), *common]) == 0
    refine = json.loads((tmp_path / "a" / "steering.json").read_text())["calibration"]["refine"]
    assert refine["steps"] == DEFAULT_STEPS_POST_NORM and refine["lr"] == LR_POST_NORM
    assert main(["export", "--out", str(tmp_path / "b"), "--refine-steps", "0", *common]) == 0
    assert json.loads((tmp_path / "b" / "steering.json").read_text())["calibration"]["refine"] is None


def test_export_from_sae_with_relative_strength(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sae = build_sae(tmp_path / "sae", hook_name="blocks.1.hook_resid_post")
    out = tmp_path / "adapter"
    argv = [
        "export",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--sae-path",
        str(sae),
        "--feature",
        "3",
        "5",
        "--strength",
        "1",
        "--strength-unit",
        "resid",
        "--calibration-tokens",
        "512",
        "--verify-tokens",
        "256",
        "--mode",
        "exact",
        "--json",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["top1_agreement"] == 1.0
    # the user sees what the unit made of the strength, on the one scale that compares across units
    note = re.search(r"steering \(strength unit 'resid'\) blocks\.1\.hook_resid_post: norm \S+ = (\S+)×", printed.err)
    assert note is not None, printed.err
    meta = json.loads((out / "steering.json").read_text())
    assert [f["index"] for f in meta["vector"]["provenance"]["features"]] == [3, 5]


def test_generate_with_adapter_and_with_hooks(
    model_dir: Path, vector_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "adapter"
    main(
        [
            "export",
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--vector",
            str(vector_file),
            "--layer",
            "1",
            "--mode",
            "exact",
            "--verify-tokens",
            "256",
        ]
    )
    capsys.readouterr()
    assert (
        main(["generate", "--model", str(model_dir), "--adapter", str(out), "--prompt", "hi", "--max-new-tokens", "5"])
        == 0
    )
    with_adapter = capsys.readouterr().out
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--vector",
                str(vector_file),
                "--layer",
                "1",
                "--prompt",
                "hi",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    with_hooks = capsys.readouterr().out
    assert "--- unsteered ---" in with_adapter
    # exact mode: the adapter's greedy text equals the hook's
    assert with_adapter.split("---\n")[-1] == with_hooks.split("---\n")[-1]
    vector_args = ["--vector", str(vector_file), "--layer", "1", "--prompt", "hi", "--max-new-tokens", "5"]
    assert main(["generate", "--model", str(model_dir), "--adapter", str(out), *vector_args]) == 0
    sections = capsys.readouterr().out.split("--- ")[1:]
    assert [s.split(" ")[0] for s in sections] == ["unsteered", "steered", "served"]
    texts = [s.split("---\n", 1)[1] for s in sections]
    assert texts[1] == texts[2] == with_hooks.split("---\n")[-1]  # one batch, the same three texts as alone
    assert texts[0] == with_adapter.split("---\n")[1].split("--- with adapter")[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "--out", "x"], "give a vector source"),
        (["export", "--out", "x", "--vector", "v.safetensors"], "--vector needs --layer"),
        (["export", "--out", "x", "--sae-path", "s"], "needs --feature"),
        (["export", "--out", "x", "--sae-release", "r"], "go together"),
        (["export", "--out", "x", "--vector", "v", "--layer", "1", "--sae-path", "s"], "one vector source"),
        (["export", "--out", "x", "--vector", "v", "--layer", "1", "--strength", "nan"], "finite"),
        (["export", "--out", "x", "--vector", "v", "--layer", "1", "--mode", "nope"], "invalid choice: 'nope'"),
        (["export", "--out", "x", "--vector", "v", "--layer", "1", "--site", "resid_mid"], "invalid choice"),
        # an SAE or control vector fixes its own sites: a --layer there would be silently ignored
        (["export", "--out", "x", "--feature", "639", "--layer", "99"], "--layer 99 only applies to --vector"),
        (["export", "--out", "x", "--sae-path", "s", "--feature", "1", "--site", "attn_out"], "--site attn_out only"),
        (["generate", "--prompt", "p", "--control-vector", "c.gguf", "--layer", "3"], "--layer 3 only applies"),
        (["generate", "--prompt", "p", "--vector", "c.GGUF", "--layer", "3"], "a .gguf control vector carries"),
        (["serve", "--engine", "sglang", "d"], "invalid choice: 'sglang'"),
        (["serve", "--engine", "vllm"], "the following arguments are required: DIR"),
        (["serve", "--engine", "vllm", "d", "--scales", "0.5,x"], "--scales '0.5,x': give comma-separated numbers"),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_message(argv: list, message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_runtime_errors_are_clear(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "export",
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "o"),
        "--vector",
        str(tmp_path / "missing.npy"),
        "--layer",
        "1",
    ]
    assert main(argv) == 1
    assert "missing.npy" in capsys.readouterr().err
    assert main(["verify", "--model", str(model_dir), "--adapter", str(tmp_path)]) == 1
    assert "steering.json" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "nope.gguf"), "--out", "o", "--vector", "v", "--layer", "1"]) == 1
    assert "nope.gguf" in capsys.readouterr().err
    sae = build_sae(tmp_path / "sae", d_in=16)
    assert (
        main(
            [
                "export",
                "--model",
                str(model_dir),
                "--out",
                str(tmp_path / "o"),
                "--sae-path",
                str(sae),
                "--feature",
                "1",
            ]
        )
        == 1
    )
    assert "d_in=16" in capsys.readouterr().err


def test_contrastive_to_control_vector_and_back(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """CAA prompts -> llama.cpp GGUF -> imported again as a vector source -> exact adapter."""
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"positive": ["I love it", "so good"], "negative": ["I hate it", "so bad"]}))
    gguf_path = tmp_path / "cv.gguf"
    argv = ["control-vector", "--model", str(model_dir), "--out", str(gguf_path), "--contrastive", str(pairs),
            "--layer", "1", "--strength", "2"]  # fmt: skip
    assert main(argv) == 0
    assert "direction.1" in capsys.readouterr().out
    out = tmp_path / "adapter"
    argv = ["export", "--model", str(model_dir), "--out", str(out), "--control-vector", str(gguf_path),
            "--mode", "exact", "--verify-tokens", "256", "--json"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["top1_agreement"] == 1.0
    note = re.search(r"steering \(strength unit 'abs'\) blocks\.1\.hook_resid_post: norm \S+ = (\S+)×", printed.err)
    assert note is not None, printed.err
    meta = json.loads((out / "steering.json").read_text())
    assert meta["vector"]["points"] == ["blocks.1.hook_resid_post"]
    assert meta["vector"]["provenance"]["source"] == "control_vector"
    # --vector reads a .gguf as the app's upload does: a control vector, its layers from the file
    args = build_parser().parse_args(["export", "--out", "o", "--vector", str(gguf_path), "--strength", "2"])
    assert recipe_from_args(args) == VectorRecipe("control_vector", (2.0,), "abs", path=str(gguf_path))


def test_control_vector_refuses_unwritable_sites(
    model_dir: Path, vector_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["control-vector", "--model", str(model_dir), "--out", str(tmp_path / "x.gguf"), "--vector",
            str(vector_file), "--layer", "0"]  # fmt: skip
    assert main(argv) == 1
    assert "direction.0" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_features_lists_nearest_sae_features(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sae_dir = build_sae(tmp_path / "sae", hook_name="blocks.1.hook_resid_post")
    from steer_core.sae.feature import load_sae_from_disk

    row = load_sae_from_disk(sae_dir).decoder[4].float()
    path = tmp_path / "v.safetensors"
    save_file({"v": row.contiguous()}, str(path))
    argv = ["features", "--model", str(model_dir), "--compare-sae", str(sae_dir), "--vector", str(path), "--layer", "1",
            "--top", "3"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "× the median residual norm" in out
    assert out.splitlines()[1].split()[:4] == ["feature", "4", "cos", "+1.000"]


def test_search_by_words_and_by_prompt(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from steer_core.sae.feature import load_sae_from_disk
    from steer_core.sae.labels import compute_labels, save_labels

    sae_dir = build_sae(tmp_path / "sae", d_sae=24)
    lm = tiny_lm("llama")
    labels = compute_labels(load_sae_from_disk(sae_dir), lm.model, lm.tokenizer, ["hello there world", "a b c d e"])
    save_labels(labels, sae_dir / "labels.json.gz")
    word = next(label.promoted[0] for label in labels.labels.values() if label.promoted[0].strip().isalpha())
    assert main(["search", "--model", str(model_dir), "--sae-path", str(sae_dir), word.strip()]) == 0
    out = capsys.readouterr().out
    assert f"matching {word.strip()!r}" in out and "promotes" in out
    assert main(["search", "--model", str(model_dir), "--sae-path", str(sae_dir), "--active", "hello"]) == 0
    assert "most active on the prompt" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["search", "--model", str(model_dir), "--sae-path", str(sae_dir)])
    assert "either search words or --active" in capsys.readouterr().err


def test_feature_without_sae_needs_an_embedded_sae(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--feature", "3"]) == 1
    err = capsys.readouterr().err
    assert "has no embedded SAE" in err and "smollm2-135m-instruct" in err


def test_export_and_push_as_the_users_token_and_an_existing_repo_refused_before_the_export(
    model_dir: Path, vector_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fakehub import FakeHub, use

    args = ["export", "--model", str(model_dir), "--vector", str(vector_file), "--layer", "1", "--mode", "exact",
            "--verify-tokens", "256", "--push", "me/cli-steer", "--private"]  # fmt: skip
    with FakeHub({"hf_cli_user": "me"}).serve() as hub:
        use(hub, monkeypatch)
        monkeypatch.setenv("HF_TOKEN", "hf_cli_user")
        assert main([*args, "--out", str(tmp_path / "a")]) == 0
        assert "pushed to" in capsys.readouterr().out and hub.repos["me/cli-steer"].private
        assert main([*args, "--out", str(tmp_path / "b")]) != 0
        assert "me/cli-steer exists already" in capsys.readouterr().err
        assert not (tmp_path / "b").exists(), "refused before a minute of export, not after"
        assert main([*args, "--out", str(tmp_path / "c"), "--update-existing"]) == 0
        assert "updated private repo" in capsys.readouterr().out
        assert hub.tokens_seen("me/cli-steer") == {"hf_cli_user"}


def test_a_concept_is_steered_with_the_models_reading_of_it(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from steer_core.cli import _check_steering_args, build_parser, recipe_from_args
    from steer_core.sae.concept import TEMPLATES

    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "hi", "--model", "smollm2-135m-instruct", "--concept", "volcano"])
    _check_steering_args(parser, args, required=True)
    recipe = recipe_from_args(args)
    # the embedded SAE's layer, and the measured strength in the residual-norm unit, unless given
    assert (recipe.source, recipe.layer, recipe.site) == ("contrastive", 15, "resid_post")
    assert (recipe.strengths, recipe.strength_unit) == ((0.5,), "resid")
    assert recipe.positive == tuple(t.format(w="volcano") for t in TEMPLATES)
    given = parser.parse_args(
        [
            "generate",
            "--prompt",
            "hi",
            "--concept",
            "volcano",
            "--layer",
            "2",
            "--strength",
            "2",
            "--strength-unit",
            "abs",
        ]
    )
    _check_steering_args(parser, given, required=True)
    chosen = recipe_from_args(given)
    assert (chosen.layer, chosen.strengths, chosen.strength_unit) == (2, (2.0,), "abs")
    assert main(["generate", "--model", str(model_dir), "--concept", "volcano", "--layer", "1", "--prompt", "hi",
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    assert "blocks.1.hook_resid_post" in capsys.readouterr().out
    for argv, message in [
        (
            ["generate", "--prompt", "hi", "--model", str(model_dir), "--concept", "volcano"],
            "--concept needs --layer L",
        ),
        (["generate", "--prompt", "hi", "--concept", "volcano", "--feature", "3"], "does not combine"),
        (
            ["generate", "--prompt", "hi", "--concept", "volcano", "--vector", "v.npy", "--layer", "1"],
            "give one vector source",
        ),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
