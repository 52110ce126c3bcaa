"""GPU checks (skipped without CUDA): one NCCL rank trains the tiny MoE in bf16 and fp32 and
matches the CPU reference's first loss."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train_on_gpu(precision: str, steps: int = 10):
    import torch.distributed as dist

    from megamoe.launch.env import RankInfo, init_distributed
    from megamoe.launch.spawn import free_port
    from megamoe.testing.parity import TINY_VOCAB, rank_microbatches, tiny_config
    from megamoe.engines.megatron import build_engine, train_step
    from megamoe.training.metrics import global_loss

    if not dist.is_initialized():
        init_distributed(RankInfo(0, 1, 0, "gpu-test"), "127.0.0.1", free_port())
    cfg = tiny_config([f"train.precision={precision}", "train.optimizer=adamw", "train.lr=3e-3",
                       "train.min_lr=3e-3"])
    engine = build_engine(cfg, TINY_VOCAB, torch.device("cuda"))
    losses = []
    for step in range(steps):
        mbs = rank_microbatches(0, 0, 1, 2, 8, cfg.model.seq_length, TINY_VOCAB)
        losses.append(global_loss(train_step(engine, mbs), engine.pg))
    return losses


@pytest.mark.timeout(600)
def test_bf16_training_on_one_gpu_fits_a_fixed_batch():
    losses = _train_on_gpu("bf16")
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.timeout(600)
def test_fp32_first_loss_matches_cpu_reference():
    from megamoe.testing.parity import parity_task
    from megamoe.testing.pool import run_distributed

    gpu = _train_on_gpu("fp32", steps=1)
    cpu = run_distributed(parity_task, 1, ["train.optimizer=adamw", "train.lr=3e-3",
                                           "train.min_lr=3e-3"], steps=1, reference_dp=1)[0]
    # fixed batch 0 both ways: same model, same tokens
    assert abs(gpu[0] - cpu.losses[0]) < 1e-3 * abs(cpu.losses[0])
