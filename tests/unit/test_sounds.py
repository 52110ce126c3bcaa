"""The sounds audio+text set (megamoe.data.sounds): each clip a pure function of (seed, global
index), classes balanced in every block of K, a sound-blind baseline at 1/K, each class's
spectrogram showing what its name says (pitch band, direction of a chirp, pulses, broadband
noise), loudness varying within a class, a loss mask on exactly the answer and <eos>, and config
errors naming the field."""

import pathlib

import numpy as np
import pytest

from megamoe.config import ConfigError, load_config
from megamoe.data.batches import build_datasets
from megamoe.data.mel import hz_to_mel
from megamoe.data.sounds import (CLASSES, HIGH, LOW, MID, PROMPTS, VALID_BASE, SoundsDataset, blind_baselines,
                                 describe_sound, max_sample_length, sound_class,
                                 sounds_tokenizer)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _band(f_hz: float, n_mels: int = 32, sample_rate: int = 8000) -> int:
    """The HTK mel band whose centre is nearest `f_hz` (centres at k + 1 steps of
    mel(sr / 2) / (n_mels + 1))."""
    return round(hz_to_mel(f_hz) / (hz_to_mel(sample_rate / 2) / (n_mels + 1))) - 1


def _valid(n=64, seed=3, **kw):
    return SoundsDataset(seed, split="valid", num_samples=n, image_tokens=4, **kw)


def test_same_seed_and_index_same_clip_in_any_order():
    data = _valid()
    b = data.get_batch(np.arange(16))
    assert b["images"].shape == (16, 1, 32, 32) and b["images"].dtype == np.float32
    assert b["index"].tolist() == list(range(VALID_BASE, VALID_BASE + 16))
    rev = _valid().get_batch(np.arange(16)[::-1])
    for key in ("images", "tokens", "loss_mask", "template"):
        assert np.array_equal(rev[key][::-1], b[key]), key
    other = _valid(seed=4).get_batch(np.arange(16))
    assert (np.abs(other["images"] - b["images"]).max(axis=(1, 2, 3)) > 0.1).all()
    # per-utterance normalisation: every spectrogram has mean 0 and variance 1
    assert np.allclose(b["images"].mean(axis=(1, 2, 3)), 0, atol=1e-5)
    assert np.allclose(b["images"].std(axis=(1, 2, 3)), 1, atol=1e-3)


@pytest.mark.parametrize("K", [6, 8])
def test_classes_are_balanced_in_every_block_and_blind_guessing_is_chance(K):
    for base in (0, VALID_BASE):
        classes = [sound_class(0, base + i, K) for i in range(10 * K)]
        for block in range(10):
            assert sorted(classes[block * K:(block + 1) * K]) == list(range(K))
        assert classes[:K] != classes[K:2 * K]               # the order differs per block
    # balanced per block of K: any one fixed guess is right on exactly 1/K of the questions
    answers = [describe_sound(0, VALID_BASE + i, K)["answer"] for i in range(20 * K)]
    assert all(answers.count(name) == 20 for name in CLASSES[:K])
    # the majority answer per template (or question text) learned from training questions:
    # each template asks a random half of every block, so about 1/K (σ ≈ 0.01 on 1000)
    base = blind_baselines(0, K, n_train=2000, n_valid=1000)
    assert base["num_questions"] == 1000
    for key in ("template", "question"):
        assert abs(base[key] - 1 / K) < 0.035, (key, base[key])


def test_each_class_looks_like_its_name():
    data = _valid(n=160)
    described = [data.describe(i) for i in range(160)]
    mel_BMT = data.get_images(np.arange(160))[:, 0]
    by_class = {k: [i for i, d in enumerate(described) if d["class"] == k] for k in range(8)}
    for k, rows in by_class.items():
        for i in rows[:10]:
            m_MT = mel_BMT[i]
            active = m_MT.max(axis=0) > m_MT.max() - 2.0      # frames where the sound is on
            peak_T = m_MT.argmax(axis=0)[active]              # strongest band per active frame
            name = CLASSES[k]
            if name in ("low tone", "middle tone", "high tone"):
                low, high = {"low tone": LOW, "middle tone": MID, "high tone": HIGH}[name]
                assert _band(low) - 1 <= np.median(peak_T) <= _band(high) + 1, (name, peak_T)
            if name == "rising chirp":
                assert peak_T[-1] - peak_T[0] >= 8, (name, peak_T)
            if name == "falling chirp":
                assert peak_T[0] - peak_T[-1] >= 8, (name, peak_T)
            if name == "two tones":     # two separate bands lit: a low and a high one
                bands = m_MT[:, active].mean(axis=1)
                low_bands = bands[:_band(LOW[1]) + 2]
                high_bands = bands[_band(HIGH[0]) - 1:]
                assert low_bands.max() > 1.0 and high_bands.max() > 1.0, (name, bands)
            if name == "noise burst":   # broadband: most bands lit in its loudest frame
                assert (m_MT[:, m_MT.mean(axis=0).argmax()] > 0).mean() > 0.8
            if name == "pulsing tone":  # the tone's band switches off and on again
                band = int(np.median(peak_T))
                on = m_MT[band] > m_MT[band].max() - 3.0
                first, last = on.argmax(), len(on) - 1 - on[::-1].argmax()
                assert not on[first:last + 1].all(), (name, m_MT[band])
    # negative control for the pulses: a middle tone's band stays on while it sounds
    i = by_class[CLASSES.index("middle tone")][0]
    band = int(np.median(mel_BMT[i].argmax(axis=0)))
    on = mel_BMT[i][band] > mel_BMT[i][band].max() - 3.0
    first, last = on.argmax(), len(on) - 1 - on[::-1].argmax()
    assert on[first:last + 1].all()


def test_loudness_varies_within_a_class():
    data = _valid(n=200)
    waves = data.waves(np.arange(200))
    for k in range(8):
        rows = [i for i in range(200) if data.describe(i)["class"] == k]
        peaks = np.abs(waves[rows]).max(axis=1)
        assert peaks.max() > 3 * peaks.min(), (CLASSES[k], peaks)


def test_tokens_and_loss_mask_hold_exactly_the_answer():
    data = _valid(n=32)
    tok = sounds_tokenizer()
    b = data.get_batch(np.arange(32))
    assert b["tokens"].shape == (32, data.seq_length + 1)
    assert data.seq_length == max_sample_length(4) - 1
    for j in range(32):
        d = data.describe(j)
        assert d["prompt"] in PROMPTS and d["answer"] == CLASSES[d["class"]]
        labels = b["tokens"][j, 1:]
        assert labels[b["loss_mask"][j] > 0].tolist() == [*tok.encode(d["answer"]), tok.eos_id]
        assert (b["tokens"][j, 1:5] == tok.image_id).all() and b["tokens"][j, 5] != tok.image_id
        assert tok.decode(b["caption_tokens"][j][:b["caption_end"][j] + 1]) == \
            f"<bos> {d['answer']} <eos>"
        assert b["template"][j] in (0, 1)     # never the scenes' caption template (4)
    assert describe_sound(3, VALID_BASE + 5)["answer"] == b["answer_text"][5]


def test_build_datasets_and_recipe_fragment():
    cfg = load_config(None, ["model.family=vlm", "data.kind=sounds", "data.audio.num_classes=6"])
    train, valid, vocab = build_datasets(cfg.data, 24, 0, image_tokens=16)
    assert vocab == sounds_tokenizer().vocab_size and len(valid) == 4096
    assert {train.describe(i)["class"] for i in range(60)} == set(range(6))
    assert train.length == 128 * 31


@pytest.mark.parametrize("overrides,field", [
    (["data.audio.sample_rate=4000"], "data.audio.sample_rate"),
    (["data.audio.f_max=5000"], "data.audio.f_max"),
    (["data.audio.hop_length=512"], "data.audio.hop_length"),
    (["data.audio.num_classes=9"], "data.audio.num_classes"),
    (["model.seq_length=20"], "model.seq_length"),
    (["data.image_size=64", "data.audio.n_fft=64", "data.audio.hop_length=64",
      "model.seq_length=80"], "data.image_size"),
    (["data.audio.n_fft=8192"], "data.audio.n_fft"),
])
def test_bad_sounds_config_is_one_error_naming_the_field(overrides, field):
    from megamoe.models.checks import check_config

    with pytest.raises(ConfigError, match=f"^{field.replace('.', '[.]')}: "):
        cfg = load_config(str(ROOT / "configs" / "vlm_audio.yaml"), overrides)
        check_config(cfg)


def test_eval_chance_and_export_refusal_of_an_audio_run():
    from megamoe.checkpoint.hf import family_for
    from megamoe.commands.eval_vlm import blind_figures

    cfg = load_config(str(ROOT / "configs" / "vlm_audio.yaml"), [])
    figures = blind_figures(cfg, 256)
    assert abs(figures["chance"] - 1 / 8) < 0.05 and figures["chance_uniform"] == 1 / 8
    assert figures["caption_chance"] == 0.0
    with pytest.raises(ValueError, match="^data.kind 'sounds': no Hugging Face mapping"):
        family_for(cfg)
