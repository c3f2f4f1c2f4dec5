"""python -m rlfuse.annotate: serve the annotation page, or export / import labels.

    python -m rlfuse.annotate <dataset> [--task best|pair|goodbad] [--host 127.0.0.1] [--port 8000]
    python -m rlfuse.annotate export <dataset> --format d3po|pairs -o labels.json [--annotator NAME]
    python -m rlfuse.annotate import <dataset> feedback.json [--format d3po] [--annotator NAME]
    python -m rlfuse.annotate winrate <dataset> [--json]     (a dataset from rlfuse.evaluate --human-pairs)

Every mistake (a broken dataset, a malformed file, a busy port) is one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

from rlfuse.annotate import exchange
from rlfuse.annotate.dataset import load_dataset
from rlfuse.annotate.store import SERVED_TASKS, check_annotator, open_store
from rlfuse.errors import UserError, fail

PROG = "python -m rlfuse.annotate"


def serve_main(argv: list[str]) -> None:
    from rlfuse.annotate.server import serve

    parser = argparse.ArgumentParser(prog=PROG, description="Serve the annotation page for a dataset folder "
                                     "written by `python -m rlfuse.sample` (export / import: see --help of each).")
    parser.add_argument("dataset", type=Path, help="the dataset folder (holds manifest.json)")
    parser.add_argument("--task", choices=SERVED_TASKS, default="best",
                        help="best: pick the best of K; pair: left or right; goodbad: mark each image (default best)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                        "0.0.0.0 lets other machines in: there is no login)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    args = parser.parse_args(argv)
    dataset = load_dataset(args.dataset)
    store = open_store(dataset)
    try:
        server = serve(dataset, store, args.task, args.host, args.port)
    except OSError as error:
        raise UserError(f"--port {args.port}: cannot listen on {args.host}:{args.port} ({error.strerror}); "
                        f"pick another port") from None
    host, port = server.server_address[:2]
    print(f"annotating {dataset.root} ({args.task}: {len(dataset.groups)} prompts x {dataset.images_per_prompt} "
          f"images; labels in {store.path}): open http://{host}:{port}/", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
        store.close()


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"{PROG} export", description="Write the stored labels to a file.")
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--format", choices=("d3po", "pairs"), required=True,
                        help="d3po: per prompt a list of K scores (the D3PO reference's file); pairs: winner/loser ids")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--annotator", help="only this annotator's labels (default: everyone's)")
    args = parser.parse_args(argv)
    dataset = load_dataset(args.dataset, check_images=False)
    store = open_store(dataset, create=False)
    annotators = sorted({stored.label.annotator for stored in store.labels()})
    if args.annotator is not None:
        try:
            args.annotator = check_annotator(args.annotator)  # stored names are NFC: compare like with like
        except ValueError as error:
            raise UserError(f"--annotator: {error}") from None
    if args.annotator is not None and args.annotator not in annotators:
        raise UserError(f"--annotator {args.annotator}: no labels from them; "
                        f"annotators: {', '.join(annotators) or 'none yet'}")
    if args.format == "d3po":
        data = exchange.export_d3po(dataset, store, args.annotator)
    else:
        data = exchange.export_pairs(dataset, store, args.annotator)
    store.close()
    target = args.output
    if not target.parent.is_dir():
        raise UserError(f"-o {target}: folder {target.parent} does not exist; create it first")
    # Temporary file then rename: a reader never sees half a file.
    with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".tmp", delete=False) as handle:
        json.dump(data, handle, indent=None if args.format == "d3po" else 1)
        handle.write("\n")
    os.replace(handle.name, target)
    count = len(data) if args.format == "d3po" else len(data["pairs"])
    print(f"wrote {target} ({count} {'prompts' if args.format == 'd3po' else 'pairs'})")


def import_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"{PROG} import", description="Store labels from a D3PO feedback file "
                                     "(per prompt a list of K scores; higher is better) as one annotator's labels.")
    parser.add_argument("dataset", type=Path)
    parser.add_argument("file", type=Path, help="the D3PO JSON file")
    parser.add_argument("--format", choices=("d3po",), default="d3po")
    parser.add_argument("--annotator", help="whose labels these are (default: the file's name without .json)")
    args = parser.parse_args(argv)
    dataset = load_dataset(args.dataset, check_images=False)
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise UserError(f"{args.file}: cannot read ({reason}); check the path") from None
    labels = exchange.parse_d3po(text, dataset, args.annotator or args.file.stem, str(args.file))
    store = open_store(dataset)  # only once the file is known good: a bad one leaves no trace
    added, present = exchange.store_imported(store, labels, str(args.file))
    store.close()
    print(f"imported {added} labels from {args.file} ({present} already present)")


def winrate_main(argv: list[str]) -> None:
    from rlfuse.annotate.winrate import render, win_rate

    parser = argparse.ArgumentParser(prog=f"{PROG} winrate", description="The fine-tuned model's win rate over its "
                                     "base model, from the labels of a dataset written by rlfuse.evaluate --human-pairs.")
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    result = win_rate(args.dataset)
    print(json.dumps(result, indent=1) if args.json else render(result))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    commands = {"export": export_main, "import": import_main, "winrate": winrate_main}
    try:
        if argv and argv[0] in commands:
            commands[argv[0]](argv[1:])
        else:
            serve_main(argv)
    except UserError as error:
        fail(str(error))


if __name__ == "__main__":
    main()
