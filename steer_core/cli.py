"""Command line: `python -m steer_core {search,generate,map,export,verify,control-vector,features,serve}` (docs/cli.md).

The argument names are a contract; keep them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steer_core.constants import (
    CONCEPT_STRENGTH,
    DEFAULT_CALIBRATION_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_VERIFY_TOKENS,
    ENGINE_SCALES,
    MAP_CALIBRATION_TOKENS,
    MAP_EVAL_TOKENS,
    MODES,
    SITES,
    STRENGTH_UNITS,
    TARGET_NAMES,
    WRITERS,
)

if TYPE_CHECKING:  # the model code loads only when a command runs, so --help stays fast
    from steer_core.sites import HookPoint, Site
    from steer_core.vectors.recipe import VectorRecipe

log = logging.getLogger("steer_core")


def _steering_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("steering vector (one source)")
    g.add_argument(
        "--vector",
        help="a .safetensors (one 1-D tensor), .pt or .npy file of length d_model; a .gguf is read as --control-vector",
    )
    g.add_argument("--layer", type=int, help="with --vector/--contrastive: the block (0-based, as in model.layers.L)")
    g.add_argument("--site", choices=SITES, help="with --vector/--contrastive (default resid_post)")
    g.add_argument(
        "--contrastive",
        metavar="JSON",
        help='prompts {"positive": [...], "negative": [...]} or [{"positive": .., "negative": ..}]: CAA vector',
    )
    g.add_argument(
        "--concept",
        metavar="WORD",
        help="the model's own reading of a word (for a concept the SAE has no feature for; docs/concept-bands.md): "
        "a contrastive vector at --layer, by default the embedded SAE's layer, strength unit resid by default",
    )
    g.add_argument("--contrastive-method", choices=["mean", "pca"], default="mean")
    g.add_argument("--contrastive-position", choices=["last", "mean"], default="last")
    g.add_argument("--control-vector", metavar="GGUF", help="a llama.cpp / repeng control vector (direction.N)")
    g.add_argument("--sae-release", help="sae_lens registry release, e.g. gemma-scope-2b-pt-res-canonical")
    g.add_argument("--sae-id", help="with --sae-release: the SAE id within the release")
    g.add_argument("--sae-path", help="a local SAE Lens folder (cfg.json + sae_weights.safetensors)")
    g.add_argument(
        "--feature",
        type=int,
        nargs="+",
        default=[],
        help="SAE feature index(es); without --sae-path/--sae-release, of the model's embedded SAE",
    )
    g.add_argument("--strength", type=float, nargs="+", help="one, or one per feature (default 1; 0.5 for --concept)")
    g.add_argument(
        "--strength-unit",
        choices=STRENGTH_UNITS,
        help="abs (the default; resid for --concept): coefficient on the decoder row / multiplier of --vector "
        "(Neuronpedia convention); resid: the "
        "vector's norm as a multiple of the site's median residual norm; writer: of the median norm of what the "
        "site's writer adds (better for Gemma, whose residual norm is dominated by a few massive dimensions)",
    )
    g.add_argument("--skip-bos", action="store_true", help="leave the leading BOS token unsteered")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, Hub id, local folder or .gguf file")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument(
        "--device-map", choices=["auto"], default=None, help="auto: spread a large model over the available devices"
    )


def _load(args: argparse.Namespace):
    from steer_core.model import load_model

    return load_model(args.model, dtype=args.dtype, device_map=args.device_map)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steer_core", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="calibrate, build, verify and save (optionally push) a LoRA adapter")
    _model_args(e)
    e.add_argument("--out", required=True, help="the adapter folder to create")
    e.add_argument("--mode", choices=MODES, default="portable")
    e.add_argument(
        "--target",
        choices=TARGET_NAMES,
        default="peft",
        help="where it will be served: peft (vLLM, SGLang, LoRAX, Together), fireworks (rank padded to 4), llama.cpp "
        "(+ adapter.gguf, control_vector.gguf), ollama (+ adapter.gguf, Modelfile)",
    )
    _steering_args(e)
    e.add_argument("--calibration-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS)
    e.add_argument("--verify-tokens", type=int, default=DEFAULT_VERIFY_TOKENS)
    e.add_argument(
        "--engine-scales",
        default=",".join(f"{s:g}" for s in ENGINE_SCALES),
        metavar="LIST",
        help="the LoRA scales (a llama-server request's per-adapter scale) to check against the hook at that multiple "
        "of the strength; the run around 1 that stays servable goes into steering.json and the card. '' skips it",
    )
    e.add_argument(
        "--refine-steps",
        type=int,
        help="portable mode: then train A and B end to end on KL(hook‖adapter) for N steps (about 2-4 s a step on a "
        "CPU). Default: 300 steps of 512 tokens on a GPU; on a CPU 60 steps of 128 tokens on post-norm models, 0 on "
        "others (what they buy: docs/fidelity.md)",
    )
    e.add_argument(
        "--writer",
        choices=WRITERS,
        default="auto",
        help="portable mode, one-site vectors on pre-norm models: which module serves the vector. auto (default): the "
        "lowest held-in KL of the site's own MLP writer (own), block L+1's attention writer (next) and the two "
        "splitting the vector (split); docs/fidelity.md",
    )
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.add_argument("--push", metavar="USER/REPO", help="push to the Hub after verification (token: HF_TOKEN)")
    e.add_argument("--private", action="store_true", help="with --push: create a private repo")
    e.add_argument(
        "--update-existing",
        action="store_true",
        help="with --push: push into a repo that exists (replaces our files there, removes what an earlier export "
        "wrote and this one does not, keeps the rest); without it such a push is refused with what it would do",
    )
    e.add_argument("--json", action="store_true", help="print the fidelity report as JSON")

    v = sub.add_parser("verify", help="re-measure an adapter folder against hook steering")
    _model_args(v)
    v.add_argument("--adapter", required=True)
    v.add_argument("--tokens", type=int, default=DEFAULT_VERIFY_TOKENS)
    v.add_argument("--json", action="store_true", help="print the report as one JSON object")

    g = sub.add_parser("generate", help="generate with an adapter or with hook steering, next to the unsteered")
    _model_args(g)
    g.add_argument(
        "--adapter", help="an adapter folder or Hub repo; with a vector source too: unsteered, hook and served together"
    )
    _steering_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-baseline", action="store_true", help="skip the unsteered generation")

    m = sub.add_parser(
        "map",
        help="before an export: the predicted fidelity of the portable adapter at nearby layers (file and "
        "contrastive vectors) or strengths (SAE features, control vectors), and what is servable",
    )
    _model_args(m)
    _steering_args(m)
    m.add_argument("--layers", type=int, nargs="+", help="layers to map (default: every n/8th and the chosen one)")
    m.add_argument(
        "--sites",
        nargs="+",
        choices=SITES,
        help="also map these sites at each layer, e.g. attn_out: the attention writer's exact site (--vector and "
        "--contrastive)",
    )
    m.add_argument("--calibration-tokens", type=int, default=MAP_CALIBRATION_TOKENS)
    m.add_argument("--eval-tokens", type=int, default=MAP_EVAL_TOKENS)
    m.add_argument("--json", action="store_true", help="print the map as one JSON object")

    c = sub.add_parser("control-vector", help="write the steering vector as a llama.cpp control vector (GGUF)")
    _model_args(c)
    c.add_argument("--out", required=True, help="the .gguf file to write")
    _steering_args(c)

    s = sub.add_parser("search", help="find SAE features: by words in their labels, or active on a prompt")
    _model_args(s)
    s.add_argument("query", nargs="?", help="words to look for in the features' promoted tokens and top contexts")
    s.add_argument("--active", metavar="PROMPT", help="instead: the features that fire most on this prompt")
    s.add_argument("--sae-path", help="an SAE Lens folder (default: the model's embedded SAE)")
    s.add_argument("--sae-release", help="or a sae_lens registry release (labelled here on the shipped text)")
    s.add_argument("--sae-id")
    s.add_argument("--top", type=int, default=10)

    f = sub.add_parser("features", help="the SAE features nearest (by cosine) to a steering vector, and its norm")
    _model_args(f)
    f.add_argument("--compare-sae", required=True, metavar="DIR", help="an SAE Lens folder at the vector's site")
    f.add_argument("--top", type=int, default=10)
    _steering_args(f)

    v = sub.add_parser("serve", help="start llama-server or vLLM with several adapters, each chosen per request")
    v.add_argument("--engine", required=True, choices=["llama.cpp", "vllm"])
    v.add_argument("folders", nargs="+", metavar="DIR", help="adapter folders made for one base model")
    v.add_argument(
        "--base", metavar="PATH_OR_ID", help="llama.cpp: the base GGUF (required); vLLM: default the folders'"
    )
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, help="default 8080 (llama.cpp), 8000 (vLLM)")
    v.add_argument(
        "--scales",
        default="1",
        help="comma-separated strengths, e.g. 0.5,1,2: vLLM gets each as its own adapter (NAME@0.5: lora_B × 0.5); "
        "llama.cpp takes a scale per request, so there they only shape the printed example",
    )
    v.add_argument("--variants-dir", metavar="DIR", help="where vLLM's strength variants go (default: the cache)")
    v.add_argument("--print-only", action="store_true", help="print the command and examples; start nothing")
    return parser


def _check_steering_args(parser: argparse.ArgumentParser, args: argparse.Namespace, required: bool) -> bool:
    if args.strength is None:
        args.strength = [CONCEPT_STRENGTH if args.concept is not None else 1.0]
    sources = [
        args.vector is not None,
        args.sae_release is not None or args.sae_id is not None,
        args.sae_path is not None,
        args.contrastive is not None,
        args.concept is not None,
        args.control_vector is not None,
    ]
    if sum(sources) > 1:
        parser.error(
            "give one vector source: --vector, --sae-release/--sae-id, --sae-path, --contrastive, --concept or "
            "--control-vector"
        )
    positioned = args.vector is not None or args.contrastive is not None or args.concept is not None
    if (args.layer is not None or args.site is not None) and not positioned:
        # An SAE feature lives at the SAE's hook and a control vector names its layers: a silently ignored --layer
        # would export something other than what the user asked for.
        given = " ".join(f"--{k} {v}" for k, v in (("layer", args.layer), ("site", args.site)) if v is not None)
        parser.error(
            f"{given} only applies to --vector/--contrastive/--concept; an SAE feature is added at the SAE's own hook "
            "point and a control vector carries its layers"
        )
    if sum(sources) == 0 and args.feature:
        return _check_values(parser, args)  # features of the model's embedded SAE
    if sum(sources) == 0:
        if required:
            parser.error(
                "give a vector source: --feature N (the embedded SAE), --sae-release R --sae-id ID --feature N, "
                "--sae-path DIR --feature N, --vector FILE --layer L, --contrastive JSON --layer L, "
                "or --control-vector GGUF"
            )
        return False
    gguf = args.vector is not None and args.vector.lower().endswith(".gguf")  # read as a control vector
    if gguf and args.layer is not None:
        parser.error(f"--layer {args.layer} does not apply to {args.vector}: a .gguf control vector carries its layers")
    if args.vector is not None and args.layer is None and not gguf:
        parser.error("--vector needs --layer L")
    if args.contrastive is not None and args.layer is None:
        parser.error("--contrastive needs --layer L")
    if args.concept is not None and args.layer is None:  # where the embedded SAE reads, as the app does
        point = _embedded_sae_point(parser, args.model)
        args.layer, args.site = point.layer, args.site or point.site
    if (args.sae_release is None) != (args.sae_id is None):
        parser.error("--sae-release and --sae-id go together")
    if (args.sae_release or args.sae_path) and not args.feature:
        parser.error("an SAE source needs --feature N [N ...]")
    if args.feature and (args.vector or args.contrastive or args.concept or args.control_vector):
        parser.error(
            "--feature selects SAE features; it does not combine with --vector/--contrastive/--concept/--control-vector"
        )
    return _check_values(parser, args)


def _check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    bad = [s for s in args.strength if not math.isfinite(s)]
    if bad:
        parser.error(f"--strength must be finite numbers, got {bad}")
    return True


def _embedded_sae_point(parser: argparse.ArgumentParser, model: str) -> HookPoint:
    from steer_core.sae.feature import embedded_sae_for, load_sae_from_disk

    spec = embedded_sae_for(model)
    if spec is None:
        parser.error(f"--concept needs --layer L: {model} has no embedded SAE whose layer it would default to")
    return load_sae_from_disk(spec.path).source.point


def strength_note(lm: Any, vector: Any) -> str:
    from steer_core.vectors.recipe import strength_note

    return strength_note(lm, vector)


def recipe_from_args(args: argparse.Namespace) -> VectorRecipe:
    from steer_core.vectors.recipe import VectorRecipe

    strengths = tuple(args.strength)
    site: Site = args.site or "resid_post"  # None on the command line means "not given", so it can be refused elsewhere
    unit = args.strength_unit or ("resid" if args.concept is not None else "abs")
    if args.control_vector is not None:
        return VectorRecipe("control_vector", strengths, unit, path=args.control_vector)
    if args.concept is not None:
        from steer_core.sae.concept import concept_recipe
        from steer_core.sites import HookPoint

        recipe = concept_recipe(args.concept, HookPoint(args.layer, site), strengths[0])
        return dataclasses.replace(recipe, strengths=strengths, strength_unit=unit)
    if args.contrastive is not None:
        from steer_core.vectors.contrastive import read_pairs

        positive, negative = read_pairs(args.contrastive)
        return VectorRecipe(
            "contrastive", strengths, unit, layer=args.layer, site=site,
            positive=tuple(positive), negative=tuple(negative),
            method=args.contrastive_method, position=args.contrastive_position,
        )  # fmt: skip
    if args.vector is not None:  # as the app's upload: a .gguf is a control vector
        from steer_core.vectors.recipe import file_recipe

        return file_recipe(args.vector, strengths, unit, layer=args.layer, site=site)
    return VectorRecipe(
        "sae",
        tuple(args.strength),
        unit,
        path=args.sae_path,
        sae_release=args.sae_release,
        sae_id=args.sae_id,
        features=tuple(args.feature),
    )


def _cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from steer_core.export import export
    from steer_core.fit.refine import default_steps

    _check_steering_args(parser, args, required=True)
    push_token = None
    if args.push:  # before the export, which takes minutes: the token, and a repo that exists unless asked to update
        from steer_core.adapter.publish import check_push_target
        from steer_core.hub import Access

        push_token = Access().write_token()
        check_push_target(args.push, token=push_token, update_existing=args.update_existing)
    recipe = recipe_from_args(args)  # bad files and values fail here, before the model loads
    lm = _load(args)
    vector = recipe.build(lm)
    print(strength_note(lm, vector), file=sys.stderr)
    result = export(
        lm,
        vector,
        args.out,
        mode=args.mode,
        calibration_tokens=args.calibration_tokens,
        verify_tokens=args.verify_tokens,
        skip_bos=args.skip_bos,
        refine_steps=default_steps(lm.model) if args.refine_steps is None else args.refine_steps,
        writer=args.writer,
        overwrite=args.overwrite,
        progress=lambda f, m: log.info("%3.0f%% %s", 100 * f, m),
        target=args.target,
        engine_scales=_floats(args.engine_scales, "--engine-scales", parser),
    )
    if args.json:
        print(json.dumps(result.report.to_dict()))
    else:
        print(f"wrote {result.folder}" + "".join(f", {f}" for f in result.record.target_files))
        print(result.report.summary())
        print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
        print(f"serve it ({args.target}): {result.record.serve}")
    if args.push:
        from steer_core.adapter.publish import push

        pushed = push(
            result.folder, args.push, token=push_token, private=args.private, update_existing=args.update_existing
        )
        print(f"pushed to {pushed.url} ({pushed.describe(args.private)})")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from steer_core.adapter.record import read_record
    from steer_core.check.verify import read_adapter_files, verify

    folder = Path(args.adapter)
    read_record(folder)  # fail before loading the model
    read_adapter_files(folder)
    lm = _load(args)
    report = verify(lm.model, lm.tokenizer, folder, tokens=args.tokens, base_model=lm.base_model_id)
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    return 0


def _cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from steer_core.generate import GenerationConfig, complete, stream_sides
    from steer_core.model import LoadedModel

    has_vector = _check_steering_args(parser, args, required=False)
    if not has_vector and not args.adapter:
        parser.error("give --adapter DIR, a steering vector source, or both (then the three side by side)")
    config = GenerationConfig(args.max_new_tokens, args.temperature, args.seed)
    recipe = recipe_from_args(args) if has_vector else None
    lm = _load(args)
    if recipe is not None:
        vector = recipe.build(lm)
        print(strength_note(lm, vector), file=sys.stderr)
        sides: list = [None, vector]
        names = ["unsteered", f"steered ({', '.join(p.tl_name for p in vector.points)})"]
        if args.adapter:  # what an endpoint serves, beside the hook: one batched generation, as in the app
            from steer_core.adapter.served import read_adapter

            sides.append(read_adapter(args.adapter))
            names.append(f"served adapter {args.adapter}")
        texts: tuple[str, ...] = ()
        for texts in stream_sides(lm, args.prompt, sides, config=config, skip_bos=args.skip_bos):  # noqa: B007
            pass
        for i, (name, text) in enumerate(zip(names, texts, strict=True)):
            if i or not args.no_baseline:
                print(f"--- {name} ---")
                print(text)
        return 0
    from steer_core.check.verify import load_peft

    # loaded (and so checked) before anything is printed: a damaged folder gets one message and no half output
    peft = load_peft(lm.model, Path(args.adapter), base_model=lm.base_model_id)
    adapted = LoadedModel(peft, lm.tokenizer, lm.name, lm.base_model_id)  # type: ignore[arg-type]
    if not args.no_baseline:
        print("--- unsteered ---")
        print(complete(lm, args.prompt, config=config))
    print(f"--- with adapter {args.adapter} (loaded with PEFT) ---")
    print(complete(adapted, args.prompt, config=config))
    return 0


def _cmd_map(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from steer_core.check.servability import servability_map

    _check_steering_args(parser, args, required=True)
    recipe = recipe_from_args(args)
    if (args.layers or args.sites) and recipe.layer is None:
        parser.error(
            "--layers and --sites apply to --vector and --contrastive; an SAE feature or control vector maps strengths"
        )
    lm = _load(args)
    result = servability_map(
        lm,
        recipe,
        layers=args.layers,
        sites=args.sites,
        calibration_tokens=args.calibration_tokens,
        eval_tokens=args.eval_tokens,
        skip_bos=args.skip_bos,
        progress=lambda _f, what: print(f"  {what}", file=sys.stderr, flush=True),
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(f"{'layer':>5} {'site':>10} {'strength':>9} {'top-1':>7} {'KL ratio':>9}  servable")
    for c in result.cells:
        mark = " (chosen)" if (c.layer, c.strength, c.site) == (*result.chosen, result.site) else ""
        servable = "yes" if c.servable else "no"
        print(f"{c.layer:>5} {c.site:>10} {c.strength:>9.4g} {c.top1:>7.1%} {c.kl_ratio:>9.3g}  {servable}{mark}")
    print(result.recommendation())
    print(f"({result.seconds:.0f} s; predicted from {result.calibration_tokens} calibration and {result.eval_tokens} "
          "held-out tokens per cell)")  # fmt: skip
    return 0


def _cmd_control_vector(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from steer_core.vectors.controlvector import layer_of, save_control_vector

    _check_steering_args(parser, args, required=True)
    if args.skip_bos:
        parser.error("llama.cpp control vectors steer every position; --skip-bos cannot be written into one")
    recipe = recipe_from_args(args)
    lm = _load(args)
    vector = recipe.build(lm)
    hint = str(getattr(lm.model.config, "model_type", "llama"))
    path = save_control_vector(vector, args.out, model_hint=hint)
    layers = ", ".join(f"direction.{layer_of(p)}" for p in vector.points)
    print(f"wrote {path} ({layers}); use: llama-cli -m MODEL.gguf --control-vector {path}")
    return 0


def _cmd_search(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from steer_core.sae.feature import load_sae
    from steer_core.sae.labels import active_features, labels_for, strongest_on
    from steer_core.sae.search import search

    if (args.query is None) == (args.active is None):
        parser.error("give either search words or --active PROMPT")
    if (args.sae_release is None) != (args.sae_id is None):
        parser.error("--sae-release and --sae-id go together")
    lm = _load(args)
    sae = load_sae(path=args.sae_path, release=args.sae_release, sae_id=args.sae_id, model=lm.name)
    labels = labels_for(sae, lm.model, lm.tokenizer)
    if args.active is not None:
        active = active_features(sae, lm.model, lm.tokenizer, args.active)
        on = strongest_on(active, args.top, labels)
        hits = [(labels[h.feature], h.relative) for h in on]
        print(
            f"features most active on the prompt ({sae.source.describe()}), with their activation over their own "
            "maximum (dense features left out); fired on: " + ", ".join(f"#{h.feature} {h.token!r}" for h in on)
        )
    else:
        hits = search(labels, sae, lm.model, lm.tokenizer, args.query, args.top)
        print(f"features matching {args.query!r} or words near it ({sae.source.describe()}), with their score:")
    if not hits:
        print("  none")
    for label, value in hits:
        url = sae.source.neuronpedia_url(label.feature)
        print(f"  {value:8.3f}  {label.summary()}" + (f"  {url}" if url else ""))
    if args.query is not None:
        from steer_core.sae.concept import expected_rates, match

        found = match(sae, lm.model, lm.tokenizer, args.query, hits)
        if not found.carries:
            print(f"{found.message()} That is: --concept {args.query!r}.")
        if expected := expected_rates(lm.name):  # measured for the embedded SAEs only
            print(expected)
    return 0


def _cmd_features(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from steer_core.activations import median_norm
    from steer_core.sae.feature import load_sae_from_disk, top_features_by_cosine

    _check_steering_args(parser, args, required=True)
    recipe = recipe_from_args(args)
    sae = load_sae_from_disk(args.compare_sae)
    lm = _load(args)
    vector = recipe.build(lm)
    for point, v in sorted(vector.directions.items()):
        norm = float(v.norm())
        ref = median_norm(lm.model, lm.tokenizer, point, "resid")
        print(f"{point.tl_name}: norm {norm:.4g} = {norm / ref:.3g} × the median residual norm ({ref:.4g})")
        if point != sae.source.point:
            print(f"  (the SAE reads {sae.source.hook_name}; cosines compare directions across sites)")
        for index, cos in top_features_by_cosine(sae, v, args.top):
            url = sae.source.neuronpedia_url(index)
            print(f"  feature {index:>6}  cos {cos:+.3f}" + (f"  {url}" if url else ""))
    return 0


def _floats(text: str, flag: str, parser: argparse.ArgumentParser) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{flag} {text!r}: give comma-separated numbers, e.g. 0.5,1,2")


def _cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from steer_core.serve import plan, run

    scales = _floats(args.scales, "--scales", parser)
    built = plan(args.engine, args.folders, base=args.base, host=args.host, port=args.port, scales=scales,
                 variants_dir=args.variants_dir)  # fmt: skip
    return run(built, print_only=args.print_only)


def main(argv: Sequence[str] | None = None, *, process_wide: bool = False) -> int:
    """`process_wide`: this process is the command (python -m steer_core), so it may tune the allocator for itself
    (model.keep_freed_memory); after parsing, so --help loads no model code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if process_wide:
        from steer_core.model import keep_freed_memory

        keep_freed_memory()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "export":
            return _cmd_export(args, parser)
        if args.command == "verify":
            return _cmd_verify(args)
        if args.command == "control-vector":
            return _cmd_control_vector(args, parser)
        if args.command == "search":
            return _cmd_search(args, parser)
        if args.command == "features":
            return _cmd_features(args, parser)
        if args.command == "serve":
            return _cmd_serve(args, parser)
        if args.command == "map":
            return _cmd_map(args, parser)
        return _cmd_generate(args, parser)
    except (ValueError, LookupError, ImportError, OSError) as err:  # OSError: missing files, a full disk, ...
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
