#!/usr/bin/env python
"""JSONL -> Megatron indexed dataset (PREFIX.bin + PREFIX.idx) with a sentencepiece tokenizer
(--kind text, the default), or image-text JSONL -> WebDataset shards prepared for Energon
(--kind image-text; megamoe.data.energon_write says which records it reads).

Each non-empty input line is a JSON object whose --json-key field (default "text") is one
document. Without --tokenizer, a BPE sentencepiece model of at most --vocab-size pieces is trained
on the input first and saved as PREFIX.model. Each document ends with the tokenizer's EOS unless
--no-append-eos is given. The whole input is checked before anything is written: a bad line is
reported with its file and line number, the exit code is 2, and no output file is left behind.

examples:
  python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus --vocab-size 8000
  python tools/preprocess_data.py --input more.jsonl --output-prefix data/more \\
      --tokenizer data/corpus.model
  megamoe train --set data.kind=indexed --set data.path=data/corpus \\
      --set data.tokenizer=data/corpus.model
  python tools/preprocess_data.py --kind image-text --input pairs.jsonl --output-dir data/shards \\
      --samples-per-shard 1000 --split-ratio 0.95,0.05,0
  megamoe train --config quickstart --set data.kind=energon --set data.path=data/shards
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CHUNK = 1024          # documents encoded per sentencepiece call


class InputError(ValueError):
    """Bad input data; the message names the file and line."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="preprocess_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("text", "image-text"), default="text",
                   help="text: documents -> .bin/.idx (default); image-text: image + caption or "
                        "question/answer records -> Energon shards")
    p.add_argument("--input", required=True, metavar="FILE.jsonl",
                   help="input file, one JSON object per line")
    p.add_argument("--json-key", default="text", metavar="KEY",
                   help="field of each object that holds the document text (default: text)")
    p.add_argument("--output-prefix", metavar="PREFIX",
                   help="write PREFIX.bin and PREFIX.idx (and PREFIX.model when a tokenizer is "
                        "trained); missing directories are created")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="MODEL",
                     help="existing sentencepiece .model file to encode with")
    tok.add_argument("--vocab-size", type=int, default=8000, metavar="N",
                     help="without --tokenizer: train a BPE tokenizer of at most N pieces on the "
                          "input, saved as PREFIX.model (default: 8000)")
    p.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="end every document with the tokenizer's EOS id (default: on)")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    img = p.add_argument_group("image-text")
    img.add_argument("--output-dir", metavar="DIR", help="image-text: write the shards and "
                     "Energon's DIR/.nv-meta here")
    img.add_argument("--samples-per-shard", type=int, default=1000, metavar="N",
                     help="image-text: samples per tar shard (default: 1000)")
    img.add_argument("--split-ratio", default="0.9,0.1,0", metavar="TRAIN,VAL,TEST",
                     help="image-text: shards per split, as energon prepare takes it "
                          "(default: 0.9,0.1,0)")
    img.add_argument("--image-format", choices=("png", "jpg"), default="png",
                     help="image-text: format of the images in the shards (default: png)")
    args = p.parse_args(argv)
    need = "--output-dir" if args.kind == "image-text" else "--output-prefix"
    if getattr(args, need[2:].replace("-", "_")) is None:
        p.error(f"{need} is required with --kind {args.kind}")
    return args


def iter_documents(path: str, key: str):
    """Yield (line number, text) for each non-empty line; InputError at the first bad one."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column "
                                 f"{exc.colno})") from None
            if not isinstance(obj, dict) or key not in obj:
                raise InputError(f"{path}:{lineno}: no '{key}' field (see --json-key)")
            if not isinstance(obj[key], str):
                raise InputError(f"{path}:{lineno}: '{key}' must be a string, not "
                                 f"{type(obj[key]).__name__}")
            yield lineno, obj[key]


def check_input(path: str, key: str) -> int:
    """Read the whole input once; returns the number of documents."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        n = sum(1 for _ in iter_documents(path, key))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start} of a "
                         "line)") from None
    if n == 0:
        raise InputError(f"{path}: no documents")
    return n


def _chunks(path: str, key: str):
    chunk = []
    for _, text in iter_documents(path, key):
        chunk.append(text)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run(args: argparse.Namespace) -> dict:
    from megamoe.data.indexed import IndexedDatasetWriter, best_dtype
    from megamoe.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    num_docs = check_input(args.input, args.json_key)
    if args.tokenizer:
        tok = SentencePieceTokenizer(args.tokenizer)       # before any output is created
    elif args.vocab_size < 8:
        raise InputError(f"--vocab-size must be ≥ 8, got {args.vocab_size}")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_tok = f"{args.output_prefix}.tokenizer-tmp"
    writer = None
    try:
        if not args.tokenizer:
            texts = (text for _, text in iter_documents(args.input, args.json_key))
            tok = train_sentencepiece(texts, tmp_tok, args.vocab_size)
        eos = [tok.eos_id] if args.append_eos else []
        if args.append_eos and tok.eos_id < 0:
            raise ValueError(f"{tok.path}: the tokenizer has no EOS piece; use --no-append-eos")
        writer = IndexedDatasetWriter(args.output_prefix, best_dtype(tok.vocab_size))
        tokens, t0 = 0, time.perf_counter()
        from tqdm import tqdm

        with tqdm(total=num_docs, unit="doc", disable=args.no_progress, file=sys.stderr,
                  desc="encoding") as bar:
            for chunk in _chunks(args.input, args.json_key):
                for ids in tok.encode(chunk):
                    writer.add_document(ids + eos)
                    tokens += len(ids) + len(eos)
                bar.update(len(chunk))
                bar.set_postfix(tokens=tokens)
        writer.finalize()
        writer = None
        if not args.tokenizer:
            os.replace(tmp_tok + ".model", args.output_prefix + ".model")
    finally:
        if writer is not None:
            writer.abort()
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_tok + ext):
                os.remove(tmp_tok + ext)
    seconds = time.perf_counter() - t0
    return {"documents": num_docs, "tokens": tokens, "vocab_size": tok.vocab_size,
            "prefix": args.output_prefix, "seconds": seconds,
            "tokenizer": args.tokenizer or args.output_prefix + ".model"}


def run_image_text(args: argparse.Namespace) -> int:
    """Shards + `energon prepare`; a summary of what was written and refused (each refused
    record has had its own line). Exit code 2 when nothing could be written."""
    from megamoe.data.energon_write import RecordError, prepare, write_shards

    try:
        r = write_shards(args.input, args.output_dir, samples_per_shard=args.samples_per_shard,
                         image_format=args.image_format, progress=not args.no_progress,
                         log=lambda msg: print(f"preprocess_data.py: {msg}", file=sys.stderr))
        prepare(args.output_dir, r.sample_type, split_ratio=args.split_ratio,
                image_format=args.image_format)
    except RecordError as exc:
        print(f"preprocess_data.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}: {r.written:,} {r.sample_type} samples in {len(r.shards)} "
          f"shards ({args.samples_per_shard} per shard), split {args.split_ratio}; refused "
          f"{len(r.refused)} records" + (" (listed above)" if r.refused else ""))
    return 0


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:               # --help, or a usage error argparse has printed
        return int(exc.code or 0)
    if args.kind == "image-text":
        return run_image_text(args)
    try:
        s = run(args)
    except ValueError as exc:               # InputError, bad tokenizer, token id overflow
        print(f"preprocess_data.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {s['prefix']}.bin and {s['prefix']}.idx: {s['documents']:,} documents, "
          f"{s['tokens']:,} tokens ({s['tokens'] / s['documents']:.1f} per document), "
          f"{s['documents'] / max(s['seconds'], 1e-9):,.0f} documents/s; tokenizer "
          f"{s['tokenizer']} ({s['vocab_size']:,} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
