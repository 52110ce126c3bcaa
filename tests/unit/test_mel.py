"""Log-mel features (megamoe.data.mel): the HTK mel scale, the triangular filterbank against
hand-computed values, a pure tone's energy in the band that holds its frequency, frame count of
the centred STFT, per-utterance normalisation that makes loudness invisible, and (when librosa
happens to be installed; it is no dependency) librosa's own HTK filterbank."""

import math

import pytest
import torch

from megamoe.data.mel import (empty_filters, hz_to_mel, log_mel, mel_filterbank, mel_to_hz,
                              normalise)

SR, N_FFT, HOP = 8000, 256, 128


def _tone(f_hz: float, seconds: float = 0.5, amplitude: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(SR * seconds), dtype=torch.float64) / SR
    return amplitude * torch.sin(2 * math.pi * f_hz * t)


def test_htk_mel_scale_hand_values():
    assert hz_to_mel(0.0) == 0.0
    assert hz_to_mel(700.0) == pytest.approx(2595 * math.log10(2))      # 781.17
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.05)          # the scale's anchor
    f = torch.tensor([0.0, 440.0, 3999.0], dtype=torch.float64)
    assert torch.allclose(mel_to_hz(hz_to_mel(f)), f)
    assert mel_to_hz(hz_to_mel(1234.5)) == pytest.approx(1234.5)


def test_filterbank_matches_hand_computed_triangles():
    # sr 1600, n_fft 8: bins at 0, 200, 400, 600, 800 Hz. Two filters over [0, 800] Hz: four
    # edges equally spaced in mel, 0, M/3, 2M/3, M with M = 2595·log10(1 + 800/700) = 858.927,
    # i.e. 0, 202.462, 463.483, 800 Hz. Filter 0 rises on [0, 202.462], falls on
    # [202.462, 463.483]; filter 1 rises on [202.462, 463.483], falls on [463.483, 800].
    e1, e2 = 202.46239257, 463.48338573
    expect = torch.tensor([
        [0.0, 200 / e1, (e2 - 400) / (e2 - e1), 0.0, 0.0],          # 0.98784, 0.24321
        [0.0, 0.0, (400 - e1) / (e2 - e1), (800 - 600) / (800 - e2), 0.0],  # 0.75679, 0.59432
    ])
    fb = mel_filterbank(2, 8, 1600, 0.0, 800.0)
    assert fb.shape == (2, 5) and fb.dtype == torch.float32
    assert torch.allclose(fb, expect, atol=1e-6), fb
    assert torch.allclose(fb[:, 1:4], torch.tensor([[0.98784, 0.24321, 0.0],
                                                    [0.0, 0.75679, 0.59432]]), atol=1e-5)
    # negative control: edges spaced linearly in Hz (no mel warping: 0, 266.7, 533.3, 800)
    # would give filter 0 the weight 200 / 266.7 = 0.75 at 200 Hz, which the check tells apart
    assert not torch.allclose(fb[0, 1], torch.tensor(0.75), atol=1e-5)


def test_every_band_covers_a_bin_at_the_recipe_sizes_and_too_many_bands_are_found():
    assert empty_filters(mel_filterbank(32, N_FFT, SR)) == []
    assert empty_filters(mel_filterbank(128, 64, SR))     # 33 bins cannot hold 128 bands


@pytest.mark.parametrize("f_hz", [312.5, 1000.0, 2500.0])
def test_a_pure_tone_peaks_in_the_band_that_holds_its_frequency(f_hz):
    fb = mel_filterbank(32, N_FFT, SR)
    energy_M = log_mel(_tone(f_hz).unsqueeze(0), fb, N_FFT, HOP)[0].mean(dim=1)
    bin_ = round(f_hz * N_FFT / SR)
    assert bin_ * SR / N_FFT == f_hz                      # the tone sits on an FFT bin
    band = int(fb[:, bin_].argmax())                      # the band whose triangle peaks there
    assert fb[band, bin_] > 0.5
    assert int(energy_M.argmax()) == band, (energy_M.argmax(), band)
    # negative control: a tone 1.5 times higher peaks in another band
    other = log_mel(_tone(f_hz * 1.5).unsqueeze(0), fb, N_FFT, HOP)[0].mean(dim=1)
    assert int(other.argmax()) != band


def test_frames_of_the_centred_stft_and_loudness_is_normalised_away():
    fb = mel_filterbank(32, N_FFT, SR)
    g = torch.Generator().manual_seed(0)
    wave_L = _tone(700.0)[: HOP * 31]            # with light noise: every band far above eps
    wave_L = wave_L + 1e-3 * torch.randn(wave_L.shape, generator=g, dtype=wave_L.dtype)
    quiet = log_mel(wave_L.unsqueeze(0), fb, N_FFT, HOP)
    assert quiet.shape == (1, 32, 32)                     # 1 + L // hop frames
    loud = log_mel(10 * wave_L.unsqueeze(0), fb, N_FFT, HOP)
    assert (loud - quiet).mean().item() == pytest.approx(2 * math.log(10), abs=1e-3)
    a, b = normalise(quiet), normalise(loud)
    assert torch.allclose(a, b, atol=1e-4)
    assert a.mean().abs() < 1e-6 and (a.std(unbiased=False) - 1).abs() < 1e-4
    assert torch.isfinite(normalise(torch.zeros(1, 4, 4))).all()


def test_equals_librosa_htk_filterbank_when_installed():
    librosa = pytest.importorskip("librosa")
    for n_mels, n_fft, sr, f_min, f_max in [(32, 256, 8000, 0.0, None), (16, 512, 16000, 50.0,
                                                                       7000.0)]:
        ours = mel_filterbank(n_mels, n_fft, sr, f_min, f_max).double()
        ref = torch.from_numpy(librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels,
                                                   fmin=f_min, fmax=f_max, htk=True,
                                                   norm=None)).double()
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
