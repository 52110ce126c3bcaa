"""Log-mel spectrograms: `torch.stft` and a mel filterbank made here, because no torchaudio
wheel matches torch 2.13 (and librosa would pull numba in for one matrix).

Mel scale: HTK's, m(f) = 2595 · log10(1 + f / 700) (Young et al., the HTK Book; librosa's
`htk=True`). Filterbank: n_mels triangles whose n_mels + 2 edge frequencies are equally spaced
in mel between f_min and f_max; filter k rises linearly in Hz from edge k to 1 at edge k + 1
and falls to 0 at edge k + 2, evaluated at the FFT bin frequencies i · sr / n_fft — peak 1, no
area normalisation (librosa.filters.mel(htk=True, norm=None) builds the same matrix).

Features: power spectrogram |STFT|² (Hann window, centred frames with reflect padding), mel
energies = filterbank · power, log(· + eps); `normalise` then gives each utterance zero mean and
unit variance over all its bins, so loudness alone does not tell sounds apart.

Legend: L samples, F = n_fft / 2 + 1 frequency bins, T frames = 1 + L // hop, M mel bands,
B clips.
"""

from __future__ import annotations

import math

import torch

LOG_EPS = 1e-10          # log(power + eps): silence stays finite
NORM_EPS = 1e-5          # (x − mean) / (std + eps): a constant spectrogram stays finite


def hz_to_mel(f_hz):
    """HTK mel of `f_hz` (float or tensor)."""
    if isinstance(f_hz, torch.Tensor):
        return 2595.0 * torch.log10(1.0 + f_hz / 700.0)
    return 2595.0 * math.log10(1.0 + f_hz / 700.0)


def mel_to_hz(m):
    """Inverse of `hz_to_mel`."""
    if isinstance(m, torch.Tensor):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: float, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """[M, F] float32 triangular filters (module docstring), computed in float64."""
    f_max = sample_rate / 2 if f_max is None else f_max
    assert 0 <= f_min < f_max <= sample_rate / 2, (f_min, f_max, sample_rate)
    freqs_F = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * (sample_rate / n_fft)
    edges_K = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2,
                                       dtype=torch.float64))           # K = M + 2 edges
    rise_MF = (freqs_F - edges_K[:-2, None]) / (edges_K[1:-1] - edges_K[:-2])[:, None]
    fall_MF = (edges_K[2:, None] - freqs_F) / (edges_K[2:] - edges_K[1:-1])[:, None]
    return torch.clamp(torch.minimum(rise_MF, fall_MF), min=0.0).float()


def empty_filters(filterbank_MF: torch.Tensor) -> list[int]:
    """Indices of filters that cover no FFT bin (too many mel bands for the FFT's resolution)."""
    return (filterbank_MF.sum(dim=1) == 0).nonzero().flatten().tolist()


def power_spectrogram(wave_BL: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """[B, F, T] |STFT|² with a periodic Hann window, centred frames (reflect padding)."""
    window = torch.hann_window(n_fft, periodic=True, dtype=wave_BL.dtype)
    spec_BFT = torch.stft(wave_BL, n_fft, hop_length=hop_length, window=window, center=True,
                          pad_mode="reflect", return_complex=True)
    return spec_BFT.real ** 2 + spec_BFT.imag ** 2


def log_mel(wave_BL: torch.Tensor, filterbank_MF: torch.Tensor, n_fft: int,
            hop_length: int) -> torch.Tensor:
    """[B, M, T] log(filterbank · |STFT|² + eps) of float waveforms [B, L]."""
    power_BFT = power_spectrogram(wave_BL, n_fft, hop_length)
    mel_BMT = torch.einsum("mf,bft->bmt", filterbank_MF.to(power_BFT.dtype), power_BFT)
    return torch.log(mel_BMT + LOG_EPS)


def normalise(features_BMT: torch.Tensor) -> torch.Tensor:
    """Per utterance: zero mean, unit variance over all its mel bins and frames."""
    mean_B11 = features_BMT.mean(dim=(1, 2), keepdim=True)
    std_B11 = features_BMT.std(dim=(1, 2), keepdim=True, unbiased=False)
    return (features_BMT - mean_B11) / (std_B11 + NORM_EPS)
