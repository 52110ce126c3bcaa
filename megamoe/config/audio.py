"""Options of the generated sounds (`data.audio`, read when `data.kind: sounds`): how a clip is
made and turned into the log-mel "image" the vlm family's encoder reads.

The spectrogram is square so that the vit family's patch embedding reads it unchanged:
`data.image_size` mel bands × `data.image_size` frames, one channel. A clip is therefore
hop_length · (image_size − 1) samples long (a centred STFT gives 1 + L / hop frames): 3968
samples ≈ 0.5 s at the defaults (8 kHz, hop 128, 32 × 32). The classes' pitches are fixed in Hz
(megamoe.data.sounds) and reach 3.2 kHz, so the sample rate must be at least 8 kHz.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megamoe.config.errors import at_least, fail, in_range

SOUND_CLASSES = 8          # the generator's classes (megamoe.data.sounds.CLASSES)
MIN_SAMPLE_RATE = 8000     # Nyquist above the highest class pitch (3.2 kHz) and its chirps


@dataclass
class AudioOptions:
    SECTION: ClassVar[str] = "data.audio"

    sample_rate: int = 8000          # Hz
    n_fft: int = 256                 # STFT window (Hann) and FFT length, samples
    hop_length: int = 128            # samples between frames; the clip is hop·(image_size−1)
    f_min: float = 0.0               # mel filterbank range, Hz
    f_max: float | None = None       # None: sample_rate / 2
    num_classes: int = SOUND_CLASSES  # the first K of the generator's classes (chance 1/K)
    noise: float = 0.005             # background white noise σ (full scale 1; tones 0.05…0.5)

    def validate(self) -> None:
        at_least(self, "sample_rate", MIN_SAMPLE_RATE)
        at_least(self, "n_fft", 8)
        in_range(self, "hop_length", 1, self.n_fft)
        at_least(self, "f_min", 0.0)
        f_max = self.sample_rate / 2 if self.f_max is None else self.f_max
        if not self.f_min < f_max <= self.sample_rate / 2:
            fail("data.audio.f_max", f"must be in (data.audio.f_min = {self.f_min}, "
                 f"sample_rate / 2 = {self.sample_rate / 2}], got {self.f_max!r}")
        in_range(self, "num_classes", 2, SOUND_CLASSES)
        in_range(self, "noise", 0.0, 0.1)


def clip_samples(image_size: int, audio: AudioOptions) -> int:
    """Samples per clip: the centred STFT of hop·(image_size − 1) samples has image_size
    frames."""
    return audio.hop_length * (image_size - 1)


def encoder_channels(cfg) -> int:
    """Channels of what the vlm family's encoder patches: 1 for a log-mel spectrogram, 3 for
    RGB images."""
    return 1 if cfg.data.kind == "sounds" else 3


def describe_sounds(data) -> str:
    """'0.50 s clips at 8000 Hz, 8 classes': what the run's sounds are (its start-up lines)."""
    a = data.audio
    return (f"{clip_samples(data.image_size, a) / a.sample_rate:.2f} s clips at "
            f"{a.sample_rate} Hz, {a.num_classes} classes")
