"""The sounds audio+text set: generated clips of one of eight sound classes, each with the
question "what sound is this?" (or "what do you hear?") answered by the class name, for the
multimodal (`vlm`) family; the encoder reads the clip's log-mel spectrogram as a one-channel
image (megamoe.data.mel; options: megamoe.config.audio).

Classes (pitches drawn log-uniformly in the class's range, Hz):
    0 low tone       a steady tone in LOW = [200, 450]
    1 high tone      a steady tone in HIGH = [1600, 3200]
    2 rising chirp   an exponential sweep from LOW to HIGH
    3 falling chirp  an exponential sweep from HIGH to LOW
    4 two tones      a LOW and a HIGH tone at once (each alone is class 0 or 1)
    5 pulsing tone   a MID = [700, 1300] tone switched on and off 5–8 times a second
    6 noise burst    white noise for 0.15–0.4 of the clip
    7 middle tone    a steady MID tone (class 5 without its pulses)
`data.audio.num_classes` K keeps the first K. Every sound starts at a random onset (0–0.25 of
the clip), lasts 0.5–0.75 of it (cut at its end), fades in and out over 10 ms, has a
log-uniform amplitude in [0.05, 0.5] and sits on white noise of σ = `data.audio.noise`. Loudness
tells nothing: the spectrogram is normalised per utterance (and amplitudes do not depend on the
class). Classes are balanced exactly: each block of K consecutive samples of a split holds
every class once, in a random order, so the best sound-blind accuracy is 1/K
(`blind_baselines` measures it).

Determinism. Sample g is a pure function of (seed, g): its class draws from
`default_rng([seed, split, g_local // K, 1])` (the block's permutation), its sound and its text
from `default_rng([seed, g, 2 | 3])`. Train sample i is global index i, validation sample i is
global index VALID_BASE + i (as in megamoe.data.scenes).

Sequence: as the scenes set's, tokens = [<bos>, <image> × image_tokens, prompt, answer, <eos>,
<pad> …] (the spectrogram's embeddings go where the <image> placeholders are), loss on the
answer words and <eos>; `images` are float32 [B, 1, M, T] normalised log-mel spectrograms
(M = T = data.image_size). A batch has the keys of ScenesDataset.get_batch (its "caption" is the
class name, for the contrastive loss).

    python -m megamoe.data.sounds --grid out.png    # spectrograms of the first clips, named
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from megamoe.config.audio import SOUND_CLASSES, AudioOptions, clip_samples
from megamoe.config.errors import fail
from megamoe.data.mel import empty_filters, log_mel, mel_filterbank, normalise
from megamoe.data.scenes import blind_accuracy
from megamoe.data.shapes import VALID_BASE, GeneratedSplit
from megamoe.data.word_tokenizer import WordTokenizer

CLASSES = ("low tone", "high tone", "rising chirp", "falling chirp", "two tones",
           "pulsing tone", "noise burst", "middle tone")
assert len(CLASSES) == SOUND_CLASSES
PROMPTS = ("what sound is this?", "what do you hear?")      # templates 0, 1
WORDS = tuple(dict.fromkeys(w for text in (*PROMPTS, *CLASSES)
                            for w in text.replace("?", " ?").split()))
LOW, MID, HIGH = (200.0, 450.0), (700.0, 1300.0), (1600.0, 3200.0)
_AMPLITUDE = (0.05, 0.5)
_ONSET, _LENGTH, _BURST = (0.0, 0.25), (0.5, 0.75), (0.15, 0.4)   # fractions of the clip
_FADE_S = 0.010
_CLASS, _SOUND, _TEXT = 1, 2, 3            # generator streams
_SPLITS = ("train", "valid")


def sounds_tokenizer() -> WordTokenizer:
    """The closed vocabulary of the sounds set: its two questions and the class names."""
    return WordTokenizer(WORDS)


def sound_class(seed: int, index: int, num_classes: int) -> int:
    """The class of global sample `index`: block-balanced (module docstring)."""
    split = int(index >= VALID_BASE)
    local = index - split * VALID_BASE
    perm = np.random.default_rng([seed, split, local // num_classes, _CLASS]).permutation(
        num_classes)
    return int(perm[local % num_classes])


def describe_sound(seed: int, index: int, num_classes: int = SOUND_CLASSES) -> dict:
    """Class, template, prompt and answer of global sample `index`, without synthesising it."""
    k = sound_class(seed, index, num_classes)
    template = int(np.random.default_rng([seed, index, _TEXT]).integers(len(PROMPTS)))
    return {"index": index, "class": k, "template": template, "prompt": PROMPTS[template],
            "answer": CLASSES[k], "caption": CLASSES[k]}


def _log_uniform(rng, low_high) -> float:
    return float(np.exp(rng.uniform(np.log(low_high[0]), np.log(low_high[1]))))


def synthesize(seed: int, index: int, num_classes: int, sample_rate: int, length: int,
               noise: float) -> np.ndarray:
    """float64 [length] waveform of global sample `index` (module docstring)."""
    k = sound_class(seed, index, num_classes)
    rng = np.random.default_rng([seed, index, _SOUND])
    t_L = np.arange(length) / sample_rate
    clip_s = length / sample_rate
    onset = rng.uniform(*_ONSET) * clip_s
    dur = rng.uniform(*(_BURST if CLASSES[k] == "noise burst" else _LENGTH)) * clip_s
    dur = min(dur, clip_s - onset)
    tau_L = t_L - onset                                       # time since onset
    if CLASSES[k] in ("low tone", "high tone", "middle tone", "pulsing tone", "two tones"):
        bands = {"low tone": [LOW], "high tone": [HIGH], "middle tone": [MID],
                 "pulsing tone": [MID], "two tones": [LOW, HIGH]}[CLASSES[k]]
        x_L = sum(np.sin(2 * np.pi * _log_uniform(rng, b) * tau_L + rng.uniform(0, 2 * np.pi))
                  for b in bands) / len(bands)
        if CLASSES[k] == "pulsing tone":     # raised-cosine on/off at 5–8 Hz
            x_L = x_L * 0.5 * (1 - np.cos(2 * np.pi * rng.uniform(5.0, 8.0) * tau_L))
    elif CLASSES[k] in ("rising chirp", "falling chirp"):
        f0, f1 = _log_uniform(rng, LOW), _log_uniform(rng, HIGH)
        if CLASSES[k] == "falling chirp":
            f0, f1 = f1, f0
        r = np.log(f1 / f0) / dur        # f(τ) = f0 · e^{rτ}: phase 2π f0 (e^{rτ} − 1) / r
        x_L = np.sin(2 * np.pi * f0 * np.expm1(r * tau_L) / r)
    else:
        x_L = rng.normal(0.0, 0.5, size=length)
    ramp = _FADE_S * sample_rate
    fade_L = np.clip(np.minimum(tau_L, dur - tau_L) * sample_rate / ramp, 0.0, 1.0)
    envelope_L = 0.5 * (1 - np.cos(np.pi * fade_L))          # 0 outside [onset, onset + dur]
    wave_L = _log_uniform(rng, _AMPLITUDE) * envelope_L * x_L
    return wave_L + rng.normal(0.0, noise, size=length)


def max_sample_length(image_tokens: int) -> int:
    """The longest sample (tokens incl. <bos>, image tokens and <eos>)."""
    tok = sounds_tokenizer()
    return 1 + image_tokens + max(len(tok.encode(p)) for p in PROMPTS) \
        + max(len(tok.encode(c)) for c in CLASSES) + 1


def check_sounds(cfg, image_tokens: int) -> None:
    """One error naming the field when the sounds data cannot be made for this model."""
    d, a = cfg.data, cfg.data.audio
    need = max_sample_length(image_tokens) - 1
    if cfg.model.seq_length < need:
        fail("model.seq_length", f"{cfg.model.seq_length} is too short for the sounds data: its "
             f"longest sample is {need + 1} tokens, so it must be >= {need} ({image_tokens} "
             "spectrogram tokens)")
    if a.n_fft // 2 >= clip_samples(d.image_size, a):
        fail("data.audio.n_fft", f"{a.n_fft}: half of it must be shorter than the clip "
             f"(data.audio.hop_length x (data.image_size - 1) = "
             f"{clip_samples(d.image_size, a)} samples)")
    empty = empty_filters(mel_filterbank(d.image_size, a.n_fft, a.sample_rate, a.f_min, a.f_max))
    if empty:
        fail("data.image_size", f"{d.image_size} mel bands: band {empty[0]} covers no FFT bin of "
             f"data.audio.n_fft {a.n_fft} (lower data.image_size or raise data.audio.n_fft)")


class SoundsDataset(GeneratedSplit):
    """One split of the sounds set: `num_samples` clips, random access (module docstring)."""

    kind = "sounds"

    def __init__(self, seed: int = 0, image_size: int = 32, split: str = "train",
                 num_samples: int = 1_000_000, image_tokens: int = 16,
                 seq_length: int | None = None, audio: AudioOptions | None = None):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        if not 1 <= num_samples <= VALID_BASE:
            raise ValueError(f"num_samples must be in [1, 2**40], got {num_samples}")
        self.audio = AudioOptions() if audio is None else audio
        self.audio.validate()
        self.seed, self.image_size, self.split = seed, image_size, split
        self.num_samples, self.image_tokens = num_samples, image_tokens
        self.tokenizer = sounds_tokenizer()
        self.seq_length = (max_sample_length(image_tokens) - 1 if seq_length is None
                           else seq_length)
        self._base = 0 if split == "train" else VALID_BASE
        a = self.audio
        self.length = clip_samples(image_size, a)
        self._filterbank_MF = mel_filterbank(image_size, a.n_fft, a.sample_rate, a.f_min,
                                             a.f_max).double()
        self.caption_length = 2 + max(len(self.tokenizer.encode(c)) for c in CLASSES)

    def describe(self, i: int) -> dict:
        return describe_sound(self.seed, self.global_index(i), self.audio.num_classes)

    def waves(self, indices) -> np.ndarray:
        """float64 [B, L] waveforms of split samples `indices`."""
        a = self.audio
        rows = [synthesize(self.seed, self.global_index(int(i)), a.num_classes, a.sample_rate,
                           self.length, a.noise) for i in np.asarray(indices).reshape(-1)]
        return np.stack(rows) if rows else np.zeros((0, self.length))

    def get_images(self, indices) -> np.ndarray:
        """float32 [B, 1, M, T]: the normalised log-mel spectrograms of split samples `indices`."""
        a, waves_BL = self.audio, torch.from_numpy(self.waves(indices))
        if len(waves_BL) == 0:
            return np.zeros((0, 1, self.image_size, self.image_size), np.float32)
        mel_BMT = normalise(log_mel(waves_BL, self._filterbank_MF, a.n_fft, a.hop_length))
        assert mel_BMT.shape[1:] == (self.image_size, self.image_size), mel_BMT.shape
        return mel_BMT.float().unsqueeze(1).numpy()

    def _text(self, d: dict) -> dict:
        """tokens [S + 1], loss_mask [S] (answer words and <eos>), caption tokens and end."""
        tok = self.tokenizer
        answer = tok.encode(d["answer"])
        tokens_S1, loss_mask_S = tok.question_sequence(
            d["prompt"], d["answer"], self.image_tokens, self.seq_length,
            f"sounds {self.split} sample {d['index'] - self._base}")
        caption = [tok.bos_id, *answer, tok.eos_id]
        caption_L = np.full(self.caption_length, tok.pad_id, np.int64)
        caption_L[:len(caption)] = caption
        return {"tokens": tokens_S1, "loss_mask": loss_mask_S, "caption_tokens": caption_L,
                "caption_end": len(caption) - 1}

    def get_batch(self, indices) -> dict:
        """The batch of split samples `indices` (the keys of ScenesDataset.get_batch)."""
        indices = np.asarray(indices).reshape(-1)
        described = [self.describe(int(i)) for i in indices]
        texts = [self._text(d) for d in described]

        def stack(key, shape, dtype):
            return (np.stack([t[key] for t in texts]) if texts
                    else np.zeros((0, *shape), dtype))

        return {"images": self.get_images(indices),
                "tokens": stack("tokens", (self.seq_length + 1,), np.int64),
                "loss_mask": stack("loss_mask", (self.seq_length,), np.float32),
                "template": np.array([d["template"] for d in described], np.int64),
                "index": np.array([d["index"] for d in described], np.int64),
                "prompt_text": [d["prompt"] for d in described],
                "answer_text": [d["answer"] for d in described],
                "caption_tokens": stack("caption_tokens", (self.caption_length,), np.int64),
                "caption_end": np.array([t["caption_end"] for t in texts], np.int64)}


def build_sounds_datasets(data_cfg, image_tokens: int, seq_length: int,
                          num_train: int = 1_000_000, num_valid: int = 4096):
    """(train, valid, vocab_size): the two splits of the sounds set for `data_cfg` (the
    DataConfig fields shapes_seed, image_size, audio)."""
    common = dict(seed=data_cfg.shapes_seed, image_size=data_cfg.image_size,
                  image_tokens=image_tokens, seq_length=seq_length, audio=data_cfg.audio)
    train = SoundsDataset(split="train", num_samples=num_train, **common)
    valid = SoundsDataset(split="valid", num_samples=num_valid, **common)
    return train, valid, train.tokenizer.vocab_size


def blind_baselines(seed: int = 0, num_classes: int = SOUND_CLASSES, n_train: int = 20_000,
                    n_valid: int = 2_000) -> dict:
    """The best sound-blind accuracy on the first `n_valid` validation questions, learned
    from the first `n_train` training ones: the majority answer per template (`template`) or
    per question text (`question`); 1/K up to the split's block balance."""
    def items(base: int, n: int) -> list[tuple]:
        return [(d["template"], d["prompt"], d["answer"])
                for d in (describe_sound(seed, g, num_classes) for g in range(base, base + n))]

    train, valid = items(0, n_train), items(VALID_BASE, n_valid)
    return {"template": blind_accuracy(train, valid, 0),
            "question": blind_accuracy(train, valid, 1), "num_questions": len(valid)}


def main(argv=None) -> None:
    from PIL import Image, ImageDraw

    ap = argparse.ArgumentParser(prog="python -m megamoe.data.sounds",
                                 description="Write a sheet of spectrograms with class names.")
    ap.add_argument("--grid", required=True, help="output PNG path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--columns", type=int, default=8)
    ap.add_argument("--scale", type=int, default=4)
    args = ap.parse_args(argv)
    data = SoundsDataset(args.seed, split="train", num_samples=max(args.count, 1))
    mel_BMT = data.get_images(range(min(args.count, len(data))))[:, 0]
    side, pad, text_h = data.image_size * args.scale, 4, 14
    rows = -(-len(mel_BMT) // args.columns)
    sheet = Image.new("L", (args.columns * (side + pad) + pad, rows * (side + text_h + pad) + pad),
                      255)
    draw = ImageDraw.Draw(sheet)
    for k, m_MT in enumerate(mel_BMT):
        x = pad + (k % args.columns) * (side + pad)
        y = pad + (k // args.columns) * (side + text_h + pad)
        pixels = np.clip((m_MT[::-1] + 3) / 6 * 255, 0, 255).astype(np.uint8)   # low at bottom
        sheet.paste(Image.fromarray(pixels).resize((side, side), Image.NEAREST), (x, y))
        draw.text((x, y + side + 1), data.describe(k)["answer"], fill=0)
    sheet.save(args.grid, format="PNG")
    print(f"wrote {args.grid}: {len(mel_BMT)} spectrograms (mel bands upwards, time rightwards)")


if __name__ == "__main__":
    main()
