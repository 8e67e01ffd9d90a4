"""Compressed pseudo-gradients through ``rangerdl train`` under torchrun: the error-feedback
residuals are in the trainer's checkpoint, a stopped and resumed run matches a straight one bit
for bit, and ``comm/bytes`` in the summary is the hand count of the encoded payloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_distributed_train import TINY, cache, final, torchrun, train_losses

pytestmark = pytest.mark.distributed

__all__ = ["cache"]  # the fixture, shared with test_distributed_train


def test_resume_with_error_feedback_is_bitwise_identical(cache: Path, tmp_path: Path) -> None:
    # overlap 2 with sync_every 6: at the stop (step 18) an exchange is in flight and the
    # residual of this rank's payload is non-zero; at 2 ranks the payloads are all-gathered
    # and the mean is never encoded again, so its residual stays zero (the all-to-all's, at 3
    # ranks, resumes bit for bit in test_compression)
    common = [*TINY, "--train.steps=30", "--train.checkpoint_every=0"]
    common += ["--distributed.sync_every=6", "--distributed.compression=int2"]
    common += ["--distributed.overlap=true", "--distributed.overlap_steps=2"]
    torchrun(cache, [f"--run.dir={tmp_path / 'a'}", *common])
    torchrun(cache, [f"--run.dir={tmp_path / 'b'}", *common, "--train.stop_at=18"])
    stopped = tmp_path / "b" / "t" / "checkpoints" / "step-18" / "state-rank1.pt"
    outer = torch.load(stopped, weights_only=True)["optimizer"]["outer"]
    assert outer["compression"] == "int2"
    assert outer["error_feedback"].abs().max() > 0
    assert outer["error_feedback_mean"].abs().max() == 0
    torchrun(cache, ["--resume", str(tmp_path / "b" / "t")])
    assert train_losses(tmp_path / "a" / "t") == train_losses(tmp_path / "b" / "t")
    for a, b in zip(final(tmp_path / "a" / "t", 30), final(tmp_path / "b" / "t", 30), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "a" / "t" / "summary.json").read_text())
    numel = int(summary["model/params"])
    chunk = -(-numel // 2)
    per_chunk = -(-chunk // 4) + 4 * -(-chunk // 256)  # 2-bit codes + fp32 scale per 256
    assert summary["comm/syncs"] == 5
    assert summary["comm/bytes"] == 5 * 2 * per_chunk  # the MLP has no buffers to average
