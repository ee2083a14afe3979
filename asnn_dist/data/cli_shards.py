"""``asnn-dist shards ...``: build WebDataset shards + manifests from a folder tree, digits or synthetic.

Why a module of its own: the top-level CLI stays thin; it registers this command with
``add_parser(subparsers)`` and the parsed namespace runs ``cmd_shards``. ``shards digits --out
DIR`` (the original command) is kept as a short form of ``shards build digits --out DIR``.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Sequence

from asnn_dist.data.build import BuildResult
from asnn_dist.data.manifest import manifest_url

SOURCES = ("imagenet", "folder", "digits", "synthetic")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'256MB', '1GiB', '500k', '1000000' -> bytes."""
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    power = " kmgt".find(unit[0]) if unit and unit[0] in "kmgt" else 0
    return int(number * base**power)


BUILD_DESCRIPTION = (
    "Write WebDataset tar shards and <split>.manifest.json to a folder or s3://bucket/prefix. Original "
    "image bytes are stored (no re-encoding); unreadable or non-image files are reported and skipped. "
    "An interrupted build resumes: shards that match the build journal are kept."
)


def _add_output_args(p: argparse.ArgumentParser, default_per_shard: int) -> None:
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=None,
                      help=f"samples per shard (default: {default_per_shard})")
    size.add_argument("--shard-size", type=parse_size, help="target bytes per shard instead, e.g. 256MB")
    p.add_argument("--workers", type=int, default=0, help="writer processes (default: %(default)s = in-process)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sample order (digits: of the train/test split) (default: 0)")
    p.add_argument("--endpoint-url",
                   help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(default_per_shard=default_per_shard, func=cmd_shards)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", choices=SOURCES, help="imagenet: ROOT/train/<class>/* and ROOT/val; folder: one "
                   "folder-per-class split (or flat + --val-labels); digits: scikit-learn's digits; synthetic: "
                   "random photo-like JPEGs")
    p.add_argument("--root", help="imagenet/folder: the dataset folder")
    p.add_argument("--split", default=None, help="folder/synthetic: split name (default: train)")
    p.add_argument("--splits", nargs="+", default=["train", "val"],
                   help="imagenet: splits to build (default: train val)")
    p.add_argument("--val-labels",
                   help="labels file of a flat validation folder: lines '<file name> <class name or index>'")
    p.add_argument("--classes-from", help="folder: take the class list (label order) from this manifest")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order instead of a seeded shuffle")
    p.add_argument("--num-samples", type=int, default=1000, help="synthetic: samples (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic: classes (default: %(default)s)")
    p.add_argument("--image-size", default="500x375", help="synthetic: WIDTHxHEIGHT (default: %(default)s)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shards build ...`` and ``shards digits ...`` on the top-level CLI's subparsers."""
    shards = subparsers.add_parser(
        "shards", help="build WebDataset shards + manifests (imagenet, folder, digits, synthetic)",
        description="Build WebDataset shards with a manifest, locally or on s3://.")
    actions = shards.add_subparsers(dest="shards_action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="build shards from a source", description=BUILD_DESCRIPTION)
    _add_source_args(build)
    _add_output_args(build, 1000)
    digits = actions.add_parser("digits", help="short for 'shards build digits'",
                                description="Write train/test shards of scikit-learn's bundled digits.")
    _add_output_args(digits, 64)
    digits.set_defaults(source="digits", no_shuffle=True, root=None, split=None, val_labels=None,
                        classes_from=None)
    return shards


def _options(args: argparse.Namespace) -> dict[str, Any]:
    per_shard = None if args.shard_size else (args.samples_per_shard or args.default_per_shard)
    return {"samples_per_shard": per_shard, "shard_bytes": args.shard_size, "workers": args.workers,
            "shuffle": not args.no_shuffle, "seed": args.seed, "progress": not args.no_progress}


def run_build(args: argparse.Namespace) -> dict[str, BuildResult]:
    """Build the shards ``args`` ask for; returns each split's result."""
    from asnn_dist.data import builders, s3, sources
    from asnn_dist.data.errors import DataError

    if args.endpoint_url:
        s3.configure(endpoint_url=args.endpoint_url)
    if args.source in ("imagenet", "folder") and not args.root:
        raise DataError(f"shards build {args.source}: --root is required (the dataset folder)")
    if args.source == "imagenet":
        return builders.build_imagenet_shards(args.root, args.out, args.val_labels, tuple(args.splits),
                                              **_options(args))
    if args.source == "folder":
        classes = None
        if args.classes_from:
            from asnn_dist.data.manifest import load_manifest

            classes = load_manifest(args.classes_from).classes
        split = args.split or "train"
        return {split: builders.build_folder_shards(args.root, args.out, split, classes, args.val_labels,
                                                    **_options(args))}
    if args.source == "digits":
        opts = _options(args)
        return sources.build_digits(args.out, opts["samples_per_shard"], args.seed, opts["progress"],
                                    args.workers, opts["shard_bytes"])
    match = re.match(r"^(\d+)x(\d+)$", args.image_size)
    if not match:
        raise DataError(f"--image-size {args.image_size!r}: use WIDTHxHEIGHT, e.g. 500x375")
    split = args.split or "train"
    return {split: builders.build_synthetic_shards(
        args.out, args.num_samples, args.num_classes, int(match.group(1)), int(match.group(2)), split,
        **_options(args))}


def cmd_shards(args: argparse.Namespace) -> int:
    """Run a parsed ``shards`` command; prints one line per split (plus skipped files)."""
    for split, result in run_build(args).items():
        m = result.manifest
        print(f"{split}: {m.num_samples} samples in {len(m.shards)} shards ({len(result.written)} written, "
              f"{len(result.reused)} kept, {len(result.skipped)} files skipped) -> {manifest_url(m.base_url, split)}")
        for line in result.skipped[:10]:
            print(f"  skipped {line}")
        if len(result.skipped) > 10:
            print(f"  ... {len(result.skipped) - 10} more listed in the manifest's 'skipped'")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``argv`` is what follows ``asnn-dist shards`` (``build ...`` or ``digits ...``)."""
    parser = argparse.ArgumentParser(prog="asnn-dist")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["shards", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    from asnn_dist.errors import UserError

    try:
        sys.exit(main())
    except UserError as exn:
        print(f"asnn-dist: error: {exn}", file=sys.stderr)
        sys.exit(exn.exit_code)
