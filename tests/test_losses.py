"""Golden values of the training losses and of the teacher distribution rebuilt from stored top-K.

Worked example (C = 4 classes, K = 2 stored, T = 2): teacher logits z = [4, 2, 0, 0], so z / T = [2, 1, 0, 0],
S = e^2 + e + 2 = 12.107338, lse = log S = 2.493812. Stored: classes [0, 1], logits [4, 2].
p = [e^2, e, 1, 1] / S = [0.610296, 0.224515, 0.082595, 0.082595]: the residual 2 / S is spread evenly
over classes 2 and 3 ("exact"); "renorm" keeps the top-2 only: [e / (e + 1), 1 / (e + 1)] = [0.731059, 0.268941].
A student with logits [0, 0, 0, 0] predicts q = 1/4 at any T:
KL(p || q) = sum p log p + log 4 = (2 e^2 + e) / S - log S + log 4 = 0.337589, soft = T^2 KL = 1.350357;
hard (label 0) = log 4 = 1.386294; mix with alpha 0.25 = 0.25 * 1.350357 + 0.75 * 1.386294 = 1.377310.
"""

import numpy as np
import pytest
import torch

from stages.artifacts.logits_format import dense_targets
from stages.train.losses import distillation_loss, hard_loss, soft_loss, teacher_distribution

INDEX = torch.tensor([[0, 1]])
LOGIT = torch.tensor([[4.0, 2.0]])
LSE = torch.tensor([2.4938117])
T = 2.0


def test_rebuilt_teacher_distribution_golden_values():
    exact = teacher_distribution(INDEX, LOGIT, LSE, T, 4, "exact")
    renorm = teacher_distribution(INDEX, LOGIT, LSE, T, 4, "renorm")
    assert exact[0].tolist() == pytest.approx([0.610296, 0.224515, 0.082595, 0.082595], abs=1e-6)
    assert renorm[0].tolist() == pytest.approx([0.731059, 0.268941, 0.0, 0.0], abs=1e-6)
    assert float(exact.sum()) == pytest.approx(1.0, abs=1e-6)


def test_rebuilt_distribution_equals_the_numpy_reference_of_the_logits_contract():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 9)) * 3
    order = np.argsort(-z, axis=1)[:, :3]
    top = np.take_along_axis(z, order, axis=1)
    lse = np.log(np.exp(z / 1.5).sum(axis=1))
    for policy in ("exact", "renorm"):
        ref = dense_targets(order, top, lse, 1.5, 9, policy)
        ours = teacher_distribution(torch.from_numpy(order), torch.from_numpy(top), torch.from_numpy(lse), 1.5, 9,
                                    policy)
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)


def test_soft_hard_and_mix_golden_values():
    student = torch.zeros(1, 4)
    probs = teacher_distribution(INDEX, LOGIT, LSE, T, 4)
    label = torch.tensor([0])
    assert float(soft_loss(student, probs, T)) == pytest.approx(1.350357, abs=1e-5)
    assert float(hard_loss(student, label)) == pytest.approx(1.386294, abs=1e-6)
    mix = distillation_loss("mix", student, label, probs, T, alpha=0.25)
    assert float(mix) == pytest.approx(1.377310, abs=1e-5)
    assert float(distillation_loss("soft", student, label, probs, T)) == pytest.approx(1.350357, abs=1e-5)


def test_soft_loss_is_zero_with_zero_gradient_when_the_student_equals_the_full_teacher():
    z = torch.tensor([[4.0, 2.0, 0.0, 0.0]], requires_grad=True)
    probs = teacher_distribution(INDEX, LOGIT, LSE, T, 4)  # exact policy = the full softmax here
    loss = soft_loss(z, probs, T)
    loss.backward()
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert z.grad.abs().max() < 1e-6


def test_per_sample_temperature_matches_one_sample_at_a_time():
    rng = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, generator=rng)
    probs = torch.softmax(torch.randn(3, 5, generator=rng), dim=1)
    temps = torch.tensor([1.0, 2.0, 4.0])
    together = soft_loss(student, probs, temps)
    alone = torch.stack([soft_loss(student[i:i + 1], probs[i:i + 1], float(temps[i])) for i in range(3)]).mean()
    assert float(together) == pytest.approx(float(alone), rel=1e-6)


def test_unknown_loss_and_residual_policy_are_refused():
    with pytest.raises(ValueError, match="loss 'kl'"):
        distillation_loss("kl", torch.zeros(1, 2), torch.tensor([0]), None, None)
    with pytest.raises(ValueError, match="residual policy"):
        teacher_distribution(INDEX, LOGIT, LSE, T, 4, "spread")
