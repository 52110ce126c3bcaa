"""Training data: the built-in Markov corpus, the shapes image set, the scenes image+text set,
the clips video+text set, the sounds audio+text set (log-mel spectrograms), Megatron indexed
datasets, Energon WebDataset shards (image+text, streamed per DP rank), sentencepiece and
closed word tokenizers, and batches as a function of consumed samples.

    train, valid, vocab = build_datasets(cfg.data, cfg.model.seq_length, cfg.run.seed)
    micro_batches = rank_microbatches(train, consumed, G, mbs, dp_rank, dp_size)

Names are imported lazily so that numpy-only users (tools/preprocess_data.py) do not load torch.
"""

from importlib import import_module

_EXPORTS = {
    "MarkovCorpus": "markov",
    "ShapesDataset": "shapes",
    "build_shapes_datasets": "shapes",
    "ScenesDataset": "scenes",
    "build_scenes_datasets": "scenes",
    "scenes_tokenizer": "scenes",
    "ClipsDataset": "clips",
    "build_clips_datasets": "clips",
    "SoundsDataset": "sounds",
    "build_sounds_datasets": "sounds",
    "sounds_tokenizer": "sounds",
    "WordTokenizer": "word_tokenizer",
    "IndexedDatasetReader": "indexed",
    "IndexedDatasetWriter": "indexed",
    "SentencePieceTokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
    "GPTSequenceDataset": "gpt_dataset",
    "build_datasets": "batches",
    "global_batch_indices": "batches",
    "rank_microbatches": "batches",
    "pack_samples": "pack",
    "plan_packs": "pack",
    "EnergonSource": "energon_source",
    "write_shards": "energon_write",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megamoe.data' has no attribute {name!r}")
    return getattr(import_module(f"megamoe.data.{_EXPORTS[name]}"), name)
