"""Pre-training distillation losses against hand computations on a three-token vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from openafm.train.distill import IGNORE, distillation_loss


def _log_softmax(row):
    z = math.log(sum(math.exp(x) for x in row))
    return [x - z for x in row]


STUDENT = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0], [0.0, 0.0, 0.0]]
TEACHER = [[0.0, 0.0, 5.0], [2.0, 1.0, 0.0], [9.0, 9.5, 1.0]]


def test_top1_target_is_nine_tenths_teacher_one_tenth_label():
    labels = torch.tensor([0, 0, IGNORE])  # row 0: teacher says 2, label 0; row 1: both say 0
    got = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), labels)
    row0 = _log_softmax(STUDENT[0])
    row1 = _log_softmax(STUDENT[1])
    by_hand = -((0.9 * row0[2] + 0.1 * row0[0]) + (0.9 * row1[0] + 0.1 * row1[0])) / 2
    assert got.item() == pytest.approx(by_hand, rel=1e-6)


def test_kl_mode_is_the_kl_from_the_teacher():
    labels = torch.tensor([1, IGNORE, 2])
    got = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), labels, mode="kl")
    by_hand = 0.0
    for s, t in ((STUDENT[0], TEACHER[0]), (STUDENT[2], TEACHER[2])):
        ls, lt = _log_softmax(s), _log_softmax(t)
        by_hand += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls, strict=True))
    assert got.item() == pytest.approx(by_hand / 2, rel=1e-6)


def test_mismatched_vocabularies_fail_clearly():
    with pytest.raises(ValueError, match="share a tokenizer"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
