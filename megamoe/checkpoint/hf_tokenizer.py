"""The sentencepiece tokenizer as Hugging Face tokenizer files.

transformers 5.x loads a Mixtral folder's tokenizer as `TokenizersBackend` whatever
`tokenizer_config.json` names, and converting `tokenizer.model` on the fly drops sentencepiece's
normaliser (NFKC, whitespace collapsing, the dummy "▁" prefix). So the export writes a
`tokenizer.json` that rebuilds them from the model's own `normalizer_spec`, next to a copy of
`tokenizer.model`; nothing is added around a text, as in megamoe's data pipeline. One difference
remains, as in every HF tokenizer: the text of a control piece ("</s>") encodes to its id, where
sentencepiece spells it out.
"""

from __future__ import annotations

import json
import os
import shutil

SPIECE_UNDERLINE = "▁"
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4      # sentencepiece piece types


def _fast_tokenizer(model_path: str):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extractor = SentencePieceExtractor(model_path)
    proto, spec = extractor.proto, extractor.proto.normalizer_spec
    trainer = proto.trainer_spec
    pieces = extractor.extract(None)
    if trainer.model_type == 2:
        model = BPE(pieces["vocab"], pieces["merges"], unk_token=trainer.unk_piece, fuse_unk=True,
                    byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == 1:
        model = Unigram(pieces["vocab"], unk_id=trainer.unk_id,
                        byte_fallback=trainer.byte_fallback)
    else:
        raise ValueError(f"{model_path}: sentencepiece model type {trainer.model_type} (only BPE "
                         "and unigram models are exported)")
    tok = Tokenizer(model)
    steps = []
    if spec.precompiled_charsmap:           # NFKC and friends, as the model was trained with
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPIECE_UNDERLINE))
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPIECE_UNDERLINE)])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE,
                                                 prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []))
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                    for p in proto.pieces if p.type == USER_DEFINED])   # never split, as in spm
    return tok


def write_tokenizer(model_path: str, out_dir: str, vocab_size: int) -> dict:
    """Write `tokenizer.model`, `tokenizer.json` and `tokenizer_config.json` into `out_dir`;
    return the special-token ids (`bos_token_id`, …) for config.json and
    generation_config.json."""
    from megamoe.data.tokenizer import SentencePieceTokenizer

    sp = SentencePieceTokenizer(model_path).sp
    if sp.GetPieceSize() > vocab_size:
        raise ValueError(f"{model_path}: {sp.GetPieceSize()} pieces, but the model's embedding "
                         f"has {vocab_size} rows")
    shutil.copyfile(model_path, os.path.join(out_dir, "tokenizer.model"))
    _fast_tokenizer(model_path).save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "TokenizersBackend", "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False}
    ids = {}
    for name, idx in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()),
                      ("pad", sp.pad_id())):
        if idx >= 0:
            config[f"{name}_token"] = sp.IdToPiece(idx)
            if name != "unk":
                ids[f"{name}_token_id"] = idx
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return ids
