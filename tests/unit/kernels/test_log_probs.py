"""vocab_parallel_log_probs (+ entropy, + KL) against a float64 reference, for both backends.

Tolerances: fp32 math on exact inputs stays within ~1e-6 of float64 (values O(10),
gradients O(1)), so 1e-5 leaves 10x headroom. bf16 *inputs* are exact in float64, and the
kernels compute in fp32, so values keep the fp32 tolerance; the logits' gradient is
returned in bf16 (8 mantissa bits: one rounding ≤ 2^-8 relative), checked at 1e-2.
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.algorithms import UnknownNameError, kl_estimate
from megatron_rpp.kernels import (
    BACKEND_ENV,
    resolve_backend,
    vocab_parallel_log_probs,
    vocab_parallel_log_probs_and_kl,
)
from megatron_rpp.kernels.backends import TorchBackend
from megatron_rpp.kernels.reference import naive_log_probs

V = 1000
IGNORE = -100


def _inputs(dtype, seed=0, lead=(3, 13)):
    """logits [*lead, V] (N = 39: no block size divides it), labels covering the edge cases."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, lead, generator=g)
    flat = labels.view(-1)
    flat[:6] = torch.tensor([0, V - 1, V // 2 - 1, V // 2, IGNORE, 1023])  # ends, middle, padding, ≥ V
    return logits, labels


def _reference(logits, labels, temperature, with_entropy=True):
    x64 = logits.detach().double().requires_grad_()
    return x64, naive_log_probs(x64, labels, temperature, with_entropy, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_entropy_and_grads_match_float64(backend, dtype, rel_err):
    logits, labels = _inputs(dtype)
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    x = logits.clone().requires_grad_()
    log_probs, entropy = vocab_parallel_log_probs(x, labels, temperature=0.7, with_entropy=True)
    assert log_probs.dtype == entropy.dtype == torch.float32 and log_probs.shape == labels.shape
    (w_lp * log_probs + w_ent * entropy).sum().backward()

    x64, (ref_lp, ref_ent) = _reference(logits, labels, 0.7)
    (w_lp * ref_lp + w_ent * ref_ent).sum().backward()
    torch.testing.assert_close(log_probs.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_ent, atol=1e-5, rtol=1e-5)
    assert (log_probs.view(-1)[4:6] == 0).all()  # labels −100 and ≥ V: log-prob 0
    assert x.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=0)
    else:
        assert rel_err(x.grad, x64.grad) < 1e-2


PADDED = 1024  # V = 1000 real columns + 24 padding columns (a padded Megatron vocabulary)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_vocabulary_equals_the_unpadded_math(backend, dtype):
    """vocab_size=V: the 24 padding columns (filled with large logits that would dominate the
    softmax if counted) get no probability mass and zero gradient; labels in [V, V') are not
    tokens. Values and the real columns' gradient equal float64 math on the real vocabulary."""
    logits, labels = _inputs(dtype)
    g = torch.Generator().manual_seed(5)
    padding = (torch.rand(*logits.shape[:-1], PADDED - V, generator=g) * 20 + 30).to(dtype)
    padded = torch.cat([logits, padding], dim=-1)  # [3, 13, 1024]
    labels.view(-1)[6:8] = torch.tensor([V, PADDED - 1])  # padding ids
    # Near the real log-probs (as a reference model's are): k3's gradient stays O(1).
    ref_log_probs = naive_log_probs(logits, labels, 0.7) + 0.3 * torch.randn(labels.shape, generator=g)
    w = torch.randn(3, *labels.shape, generator=g)
    x = padded.clone().requires_grad_()
    out = vocab_parallel_log_probs_and_kl(x, labels, ref_log_probs, kl_estimator="k3", temperature=0.7,
                                          with_entropy=True, vocab_size=V)
    (w[0] * out.log_probs + w[1] * out.entropy + w[2] * out.kl).sum().backward()

    x64, (ref_lp, ref_ent) = _reference(logits, labels, 0.7)  # the real vocabulary only
    valid = (labels >= 0) & (labels < V)
    ref_kl = torch.where(valid, kl_estimate(ref_lp, ref_log_probs.double(), "k3"), torch.zeros_like(ref_lp))
    (w[0] * ref_lp + w[1] * ref_ent + w[2] * ref_kl).sum().backward()
    torch.testing.assert_close(out.log_probs.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.kl.double(), ref_kl, atol=1e-5, rtol=1e-5)
    assert (out.log_probs.view(-1)[4:8] == 0).all()  # −100, 1023, V, V' − 1: not tokens
    assert (x.grad[..., V:] == 0).all()
    if dtype == torch.float32:
        torch.testing.assert_close(x.grad[..., :V].double(), x64.grad, atol=1e-5, rtol=0)
    else:
        assert ((x.grad[..., :V].double() - x64.grad).abs().max() / x64.grad.abs().max()) < 1e-2
    # Without vocab_size the padding columns would take almost all the mass: the test can fail.
    unmasked = vocab_parallel_log_probs(padded, labels, temperature=0.7)
    assert (unmasked[valid] - out.log_probs[valid]).abs().min() > 10


def test_vocab_size_is_checked():
    logits, labels = _inputs(torch.float32, lead=(6,))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="vocab_size"):
            vocab_parallel_log_probs(logits, labels, vocab_size=bad)
    with pytest.raises(ValueError, match="vocab_size=1001 exceeds"):
        vocab_parallel_log_probs(logits, labels, vocab_size=V + 1)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_in_the_same_pass_matches_autograd(backend, kind):
    logits, labels = _inputs(torch.float32, seed=2, lead=(37,))
    ref_base = naive_log_probs(logits, labels)
    g = torch.Generator().manual_seed(3)
    ref_log_probs = ref_base + 0.5 * torch.randn(ref_base.shape, generator=g)
    ref_log_probs[6:9] += torch.tensor([-20.0, 20.0, 0.0])  # k3's clamp is active on one side
    w_lp, w_kl = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)

    x, ref = logits.clone().requires_grad_(), ref_log_probs.clone().requires_grad_()
    out = vocab_parallel_log_probs_and_kl(x, labels, ref, kl_estimator=kind)
    assert out.entropy is None
    (w_lp * out.log_probs + w_kl * out.kl).sum().backward()

    x64, ref64 = logits.double().requires_grad_(), ref_log_probs.double().requires_grad_()
    lp64 = naive_log_probs(x64, labels, dtype=torch.float64)
    valid = (labels >= 0) & (labels < V)
    kl64 = torch.where(valid, kl_estimate(lp64, ref64, kind), torch.zeros_like(lp64))
    (w_lp * lp64 + w_kl * kl64).sum().backward()
    torch.testing.assert_close(out.kl.double(), kl64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref.grad.double(), ref64.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [lambda: TorchBackend(chunk_elements=700),  # 2 rows per chunk
                                  lambda: _triton(block_n=4, block_v=64)], ids=["torch", "triton"])
def test_backend_blocks_smaller_than_the_row(make):
    """Column blocks (64) and row blocks (4 / 2) that split the data unevenly: 10 rows, 300 columns."""
    be = make()
    g = torch.Generator().manual_seed(4)
    z = torch.randn(10, 300, generator=g) * 4
    labels = torch.tensor([63, 64, 0, 299, -1, 127, 128, 191, 192, 255])  # around every block edge
    lse, ent = be.row_stats(z, 1.3, True)
    z64 = z.double() / 1.3
    ref_lse = torch.logsumexp(z64, -1)
    ref_ent = -(torch.softmax(z64, -1) * torch.log_softmax(z64, -1)).sum(-1)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)
    a, b = torch.randn(10, generator=g), torch.randn(10, generator=g)
    a[4] = 0.0  # label −1 (not in this shard) never gets the one-hot term
    out = be.grad(z, labels, lse, ent, a, b, 1.3, out=torch.empty_like(z))
    x64 = z.double().requires_grad_()
    lsm = torch.log_softmax(x64 / 1.3, -1)
    picked = lsm.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    (a.double() * picked - b.double() * (lsm.exp() * lsm).sum(-1)).sum().backward()
    torch.testing.assert_close(out.double(), x64.grad, atol=1e-6, rtol=0)


def _triton(**kw):
    from megatron_rpp.kernels.triton_kernels import TritonBackend

    return TritonBackend(**kw)


def test_without_entropy_returns_one_tensor_and_works_without_grad():
    logits, labels = _inputs(torch.float32, lead=(7,))
    with torch.no_grad():
        out = vocab_parallel_log_probs(logits, labels, temperature=1.0)
    assert isinstance(out, torch.Tensor) and out.shape == (7,)
    torch.testing.assert_close(out, naive_log_probs(logits, labels), atol=1e-5, rtol=0)


def test_entropy_only_loss_gives_entropy_gradient():
    logits, labels = _inputs(torch.float32, lead=(6,))
    x = logits.clone().requires_grad_()
    _, entropy = vocab_parallel_log_probs(x, labels, with_entropy=True)
    entropy.sum().backward()
    x64, (_, ent64) = _reference(logits, labels, 1.0)
    ent64.sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=0)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(torch.device("cpu")).name == "torch"
    monkeypatch.setenv(BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="torch, triton"):
        resolve_backend(torch.device("cpu"))


def test_bad_inputs_are_rejected():
    logits, labels = _inputs(torch.float32, lead=(6,))
    with pytest.raises(ValueError, match="labels must have shape"):
        vocab_parallel_log_probs(logits, labels[:3])
    with pytest.raises(TypeError, match="integer token ids"):
        vocab_parallel_log_probs(logits, labels.float())
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_log_probs(logits, labels, temperature=0.0)
    with pytest.raises(UnknownNameError, match="k2"):
        vocab_parallel_log_probs_and_kl(logits, labels, torch.zeros(6), kl_estimator="k9")
    with pytest.raises(ValueError, match="ref_log_probs must have shape"):
        vocab_parallel_log_probs_and_kl(logits, labels, torch.zeros(5))
