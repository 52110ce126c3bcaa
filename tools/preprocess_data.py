#!/usr/bin/env python
"""JSONL → Megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`) with a sentencepiece tokenizer.

Each input line is a JSON object whose `--json-key` field (default `text`) is a document. Without
`--tokenizer`, a BPE sentencepiece model of `--vocab-size` pieces is trained on the input first
and saved as `PREFIX.model`. Every document ends with the tokenizer's EOS. A bad line is reported
with its file and line number and nothing is written.

  python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus --vocab-size 8000
  megamoe train --set data.kind=indexed --set data.path=data/corpus --set data.tokenizer=data/corpus.model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class InputError(ValueError):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, metavar="FILE.jsonl", help="one JSON object per line")
    p.add_argument("--json-key", default="text", help="field holding the document (default text)")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin and PREFIX.idx (and PREFIX.model when training)")
    p.add_argument("--tokenizer", metavar="MODEL", help="existing sentencepiece .model file")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="pieces of the tokenizer trained when --tokenizer is not given (8000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def read_documents(path: str, key: str):
    """Yield (line number, text); InputError names the file and line of the first bad one."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})")
            if not isinstance(obj, dict) or key not in obj:
                raise InputError(f"{path}:{lineno}: no '{key}' field (use --json-key)")
            if not isinstance(obj[key], str):
                raise InputError(f"{path}:{lineno}: '{key}' is {type(obj[key]).__name__}, "
                                 "expected a string")
            yield lineno, obj[key]


def run(args) -> dict:
    from megamoe.data.indexed import IndexedDatasetWriter, best_dtype
    from megamoe.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    docs = [text for _, text in read_documents(args.input, args.json_key)]  # validates first
    if not docs:
        raise InputError(f"{args.input}: no documents")
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    if args.tokenizer:
        tok = SentencePieceTokenizer(args.tokenizer)
    else:
        tok = train_sentencepiece(docs, args.output_prefix, args.vocab_size)
    writer = IndexedDatasetWriter(args.output_prefix, best_dtype(tok.vocab_size))
    tokens, t0 = 0, time.perf_counter()
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(docs), unit="doc", file=sys.stderr)
    try:
        for text in docs:
            ids = tok.encode(text) + [tok.eos_id]
            writer.add_document(ids)
            tokens += len(ids)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return {"documents": len(docs), "tokens": tokens, "vocab_size": tok.vocab_size,
            "prefix": args.output_prefix, "tokenizer": tok.path}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (InputError, ValueError) as exc:
        print(f"preprocess_data: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary['prefix']}.bin/.idx: {summary['documents']} documents, "
          f"{summary['tokens']} tokens, vocab {summary['vocab_size']} ({summary['tokenizer']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
