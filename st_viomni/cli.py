"""The ``st-viomni`` command line.

Every command has ``--help``; bad arguments (missing model, unknown task, unreadable image), bad recipes and
unreadable data files end with a one-line ``st-viomni: error: ...`` message and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

from .recipe import TINY_BASE, is_local_model_path
from .tasks import TASK_NAMES


def _build(args: argparse.Namespace) -> None:
    from .model import build_model

    with tempfile.TemporaryDirectory(prefix="tiny-qwen2-vl-") as scratch:
        base = args.base
        if base == TINY_BASE:
            from .testing import make_tiny_base_model

            base = str(make_tiny_base_model(scratch, seed=args.seed))
        model = build_model(
            base,
            embedding_dim=args.embedding_dim,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            max_seq_length=args.max_seq_length,
        )
        model.save(args.output_dir)
    print(f"saved a {model.get_embedding_dimension()}-d viOmni model on {args.base} to {args.output_dir}")


def _encode(args: argparse.Namespace) -> None:
    import numpy as np

    from .formatting import format_input

    sample = format_input(args.task, args.text, args.image)  # validates task, text and images before loading
    embedding = load_model(args.model).encode([sample], convert_to_numpy=True)
    if args.output:
        # np.save appends ".npy" to a name without it.
        path = args.output if args.output.endswith(".npy") else f"{args.output}.npy"
        np.save(path, embedding)
        print(f"saved embedding of shape {embedding.shape} to {path}")
    else:
        np.set_printoptions(precision=5, suppress=True, threshold=sys.maxsize)
        print(embedding)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.output_dir)


def _train(args: argparse.Namespace) -> None:
    from .recipe import load_recipe
    from .train import run_recipe

    recipe = load_recipe(args.recipe)  # checks every key before anything is built
    run = run_recipe(recipe)
    print(f"trained model: {run.model_dir}")


def _evaluate(args: argparse.Namespace) -> None:
    from .data.sources import load_samples_by_task
    from .evaluation import build_evaluator, summarize
    from .recipe import SourceRecipe, load_recipe

    seed = 0
    if args.recipe:
        data = load_recipe(args.recipe).data
        if not data.eval:
            raise ValueError(f"{args.recipe}: the recipe has no data.eval sources")
        # The seed draws the mini samples: the same as training's, so that this is the set the run evaluated on.
        sources, seed = data.eval, data.seed
    else:
        sources = [SourceRecipe(mini=args.mini, split="test")]
    samples = load_samples_by_task(sources, on_error="raise", seed=seed)
    model = load_model(args.model)
    metrics = summarize(build_evaluator(sample for part in samples.values() for sample in part)(model))
    print(f"{'metric':32s} value")
    for name, value in metrics.items():
        print(f"{name:32s} {value:.4f}")


def _push(args: argparse.Namespace) -> None:
    if not os.path.isfile(os.path.join(args.model_dir, "modules.json")):
        raise FileNotFoundError(f"not a saved sentence-transformers model (no modules.json): {args.model_dir!r}")
    if args.repo_id.count("/") != 1 or args.repo_id.startswith("/") or args.repo_id.endswith("/"):
        raise ValueError(f"--repo-id must look like ORG/NAME, got {args.repo_id!r}")
    _check_adapter_base(args.model_dir)
    model = load_model(args.model_dir)
    # replace_model_card=True re-renders the saved card with the repo id filled in, instead of probing the Hub
    # for an existing README (which skips the card when the probe fails).
    url = model.push_to_hub(
        args.repo_id,
        private=args.private,
        replace_model_card=True,
        commit_message=args.commit_message,
        exist_ok=True,
    )
    print(f"pushed {args.model_dir} to {args.repo_id}: {url}")


def _check_adapter_base(model_dir: str) -> None:
    """Refuse LoRA adapters whose base is a path on this machine: the pushed model would load nowhere else."""
    import json

    path = os.path.join(model_dir, "adapter_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as file:
        base = json.load(file).get("base_model_name_or_path") or ""
    if is_local_model_path(base):
        raise ValueError(
            f"{path}: base_model_name_or_path {base!r} is a local path, and the adapters load their base by that "
            "name: the pushed model would not load on any other machine; set it to the base's Hub id "
            "(e.g. Qwen/Qwen2-VL-2B) and push again"
        )


def load_model(name_or_path: str):
    """Load a saved viOmni model from a directory or a hub id (``ORG/NAME``), naming a missing directory."""
    from .model import ViOmniQwen

    if not os.path.isdir(name_or_path) and (is_local_model_path(name_or_path) or name_or_path.count("/") != 1):
        raise FileNotFoundError(f"model directory not found: {name_or_path!r}")
    try:
        return ViOmniQwen(name_or_path)
    except OSError as error:
        if os.path.isdir(name_or_path):
            raise
        # ORG/NAME is also how a mistyped relative directory looks: say both.
        raise OSError(
            f"model not found: {name_or_path!r} is no local directory, and loading it from the Hub failed: "
            f"{_one_line(error)}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="st-viomni", description="viOmniQwen unified multimodal embeddings on sentence-transformers."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser("build", help="build a viOmni model on a Qwen2-VL base and save it")
    build.add_argument("output_dir", help="where to save the model")
    build.add_argument("--base", default=TINY_BASE, help="Qwen2-VL checkpoint (hub id or path), or "
                       f"{TINY_BASE!r} (default) for the offline tiny Qwen2-VL")
    build.add_argument("--embedding-dim", type=int, default=1024)
    build.add_argument("--min-pixels", type=int, default=None)
    build.add_argument("--max-pixels", type=int, default=None)
    build.add_argument("--max-seq-length", type=int, default=None)
    build.add_argument("--seed", type=int, default=0, help="seed of the tiny base's weights")
    build.set_defaults(handler=_build)

    encode = commands.add_parser("encode", help="embed one input (text, images or both) with a task prefix")
    encode.add_argument("model", help="saved model directory or hub id")
    encode.add_argument("--task", required=True, choices=TASK_NAMES)
    encode.add_argument("--text", default=None)
    encode.add_argument("--image", action="append", default=[], metavar="PATH", help="image file; repeat for more")
    encode.add_argument("--output", default=None, metavar="FILE.npy", help="save the embedding instead of printing")
    encode.set_defaults(handler=_encode)

    demo = commands.add_parser(
        "demo", help="build, train and evaluate a viOmni model on the built-in tiny Qwen2-VL and mini data (CPU)"
    )
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.set_defaults(handler=_demo)

    train = commands.add_parser(
        "train", help="run a training recipe (YAML); works under torchrun and accelerate launch; resumes"
    )
    train.add_argument("recipe", help="recipe file, e.g. recipes/tiny-cpu.yaml")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="retrieval accuracy@1 per task and cross-modal, text_pair Spearman")
    evaluate.add_argument("model", help="saved model directory or hub id")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--mini", type=_positive_int, default=60, metavar="N",
                        help="samples per task of the mini mixture's test split (default 60)")
    source.add_argument("--recipe", default=None, help="use the data.eval sources of this recipe")
    evaluate.set_defaults(handler=_evaluate)

    push = commands.add_parser("push", help="upload a saved model (weights, configs, processor, card) to the Hub")
    push.add_argument("model_dir", help="saved model directory")
    push.add_argument("--repo-id", required=True, metavar="ORG/NAME")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--commit-message", default="Add viOmniQwen model")
    push.set_defaults(handler=_push)
    return parser


def _positive_int(text: str) -> int:
    # argparse names the option in front of the message: "argument --mini: expected a positive integer, got -2".
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except _user_errors() as error:
        parser.exit(2, f"st-viomni: error: {_one_line(error)}\n")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """What bad arguments, recipes and data raise; anything else is a bug and keeps its traceback."""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError)
    # datasets' errors on the user's data files (a malformed JSON line: DatasetGenerationError). Looked up only
    # once raised, so that commands that never load data do not import datasets.
    exceptions = sys.modules.get("datasets.exceptions")
    if exceptions is not None:
        errors += (exceptions.DatasetsError,)
    return errors


def _one_line(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause).strip() and not isinstance(error, (ValueError, OSError)):
        # datasets' generic "An error occurred while generating the dataset": the cause says what was wrong.
        message = f"{message}: {str(cause).strip().splitlines()[0]}"
    return message


if __name__ == "__main__":
    raise SystemExit(main())
