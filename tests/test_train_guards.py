"""Guards of the training loop that need no engine: divergence, labels outside the model's classes."""
import pytest
import torch

from data_pipeline import DataError
from hpdm.config import load_config
from hpdm.divergence import DivergenceGuard
from hpdm.errors import DivergenceError
from hpdm.trainer import _cond


def test_nonfinite_loss_is_reported_at_the_next_check_with_the_last_finite_loss():
    guard = DivergenceGuard(max_skipped=5, device=torch.device("cpu"))
    guard.step(torch.tensor([0.5, 0.4]), skipped_steps=0, step=1)
    guard.check(1, 0.45)
    guard.step(torch.tensor([float("nan"), 0.4]), skipped_steps=0, step=2)
    guard.step(torch.tensor([0.5, 0.4]), skipped_steps=0, step=3)  # counted on the device, not lost
    with pytest.raises(DivergenceError, match=r"by step 3: the loss is not finite; the last finite loss was 0.45 at step 1"):
        guard.check(3)


def test_a_streak_of_skipped_steps_stops_but_isolated_skips_do_not():
    guard = DivergenceGuard(max_skipped=2, device=torch.device("cpu"), skipped_before=7)
    finite = torch.tensor([0.5])
    for step, skipped in enumerate([8, 8, 9, 10, 10], start=1):  # skips at steps 1, 3, 4: at most 2 in a row
        guard.step(finite, skipped, step)
    assert guard.skipped_total == 3
    guard.step(finite, 11, 6)
    guard.step(finite, 12, 7)
    with pytest.raises(DivergenceError, match="skipped the last 3 optimizer steps"):
        guard.step(finite, 13, 8)


def test_labels_beyond_num_classes_name_both_numbers():
    cfg = load_config("configs/tiny.yaml", ["model.num_classes=5"])
    assert _cond(cfg, {"label": torch.tensor([0, 4, -1])}, "cpu").labels.tolist() == [0, 4, -1]  # -1: unlabelled
    with pytest.raises(DataError, match=r"label 7 but model.num_classes is 5"):
        _cond(cfg, {"label": torch.tensor([1, 7])}, "cpu")
