"""Mixup / CutMix statistics, label smoothing, soft-target and distillation losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from vit_jax import losses, mixup

B, H, W, K = 8, 16, 12, 5


def _batch():
  images = jnp.broadcast_to(jnp.arange(B, dtype=jnp.float32)[:, None, None, None], (B, H, W, 3))
  targets = losses.one_hot(jnp.arange(B) % K, K)
  return images, targets


def _draw(n, **kw):
  images, targets = _batch()
  keys = jax.random.split(jax.random.key(0), n)
  return jax.jit(jax.vmap(lambda k: mixup.mix_batch(k, images, targets, **kw)))(keys)


def test_mixup_lambda_is_beta_distributed():
  images, targets = _batch()
  mixed, mixed_t, info = _draw(2000, mixup_alpha=0.8, cutmix_alpha=0.0)
  lam = np.asarray(info['lam'])
  assert not np.asarray(info['cutmix']).any()
  assert scipy.stats.kstest(lam, scipy.stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
  assert scipy.stats.kstest(lam, scipy.stats.beta(2.0, 2.0).cdf).pvalue < 1e-6  # The test can tell alphas apart.
  # Each image is lam * x + (1 - lam) * x[::-1]; targets alike.
  want = lam[:, None] * np.arange(B) + (1 - lam[:, None]) * np.arange(B)[::-1]
  np.testing.assert_allclose(np.asarray(mixed)[:, :, 0, 0, 0], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mixed_t, lam[:, None, None] * targets + (1 - lam[:, None, None]) * targets[::-1],
                             rtol=1e-5, atol=1e-6)


def test_cutmix_box_area_matches_lambda():
  images, _ = _batch()
  mixed, mixed_t, info = _draw(1000, mixup_alpha=0.0, cutmix_alpha=1.0)
  lam = np.asarray(info['lam'])
  assert np.asarray(info['cutmix']).all()
  partner, mixed = np.asarray(images)[::-1], np.asarray(mixed)
  for i in range(len(lam)):
    pasted = (mixed[i] == partner)[..., 0] & (partner != np.asarray(images))[..., 0]
    frac = pasted[0].mean()  # Example 0 (value 0) gets its box from example B - 1.
    assert frac == pytest.approx(1 - lam[i], abs=1e-6)
    if pasted[0].any():  # The pasted region is one axis-aligned box, the same for every example.
      rows, cols = np.nonzero(pasted[0])
      assert pasted[0].sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
      np.testing.assert_array_equal(pasted[0], pasted[1])
  # Distribution: as timm's rand_bbox + correct_lam with lam ~ Beta(1, 1), simulated here in numpy.
  rng = np.random.RandomState(0)
  ratio = np.sqrt(1 - rng.beta(1.0, 1.0, 20000))
  cut_h, cut_w = (H * ratio).astype(int), (W * ratio).astype(int)
  cy, cx = rng.randint(0, H, 20000), rng.randint(0, W, 20000)
  area = ((np.clip(cy + cut_h // 2, 0, H) - np.clip(cy - cut_h // 2, 0, H)) *
          (np.clip(cx + cut_w // 2, 0, W) - np.clip(cx - cut_w // 2, 0, W)))
  assert scipy.stats.ks_2samp(lam, 1 - area / (H * W)).pvalue > 1e-3
  np.testing.assert_allclose(np.asarray(mixed_t).sum(-1), 1.0, rtol=1e-5)


def test_switch_prob_and_prob():
  _, _, info = _draw(2000, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.4)
  lam, cut = np.asarray(info['lam']), np.asarray(info['cutmix'])
  mixed = (lam < 1.0) | cut  # (A CutMix box can be empty, leaving lam at 1.)
  assert 0.35 < mixed.mean() < 0.45  # prob: the share of batches mixed at all.
  assert 0.43 < cut[mixed].mean() < 0.57  # switch_prob: CutMix's share of those.
  images, targets = _batch()
  same = mixup.mix_batch(jax.random.key(0), images, targets, mixup_alpha=0.0, cutmix_alpha=0.0)
  assert same[0] is images and same[1] is targets


def test_label_smoothing_and_soft_cross_entropy():
  t = losses.one_hot(jnp.array([2, 0]), 4, smoothing=0.1)
  np.testing.assert_allclose(t[0], [0.025, 0.025, 0.925, 0.025], rtol=1e-6)
  logits = jax.random.normal(jax.random.key(1), (2, 4))
  hard = -jax.nn.log_softmax(logits)[jnp.arange(2), jnp.array([2, 0])]
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, losses.one_hot(jnp.array([2, 0]), 4)), hard,
                             rtol=1e-6)
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, jnp.array([2, 0])), hard, rtol=1e-6)


def _reference_soft_kd(s, t, tau):
  """DeiT: F.kl_div(log_softmax(s/T), log_softmax(t/T), reduction='sum', log_target=True) * T^2 / s.numel()."""
  ls = scipy.special.log_softmax(s / tau, -1)
  lt = scipy.special.log_softmax(t / tau, -1)
  return float(np.sum(np.exp(lt) * (lt - ls)) * tau * tau / s.size)


def test_distillation_losses_match_deit():
  rng = np.random.RandomState(0)
  cls, dist, teacher = (rng.randn(6, 7).astype(np.float32) * 3 for _ in range(3))
  labels = rng.randint(0, 7, 6)
  targets = losses.one_hot(jnp.asarray(labels), 7)
  ce = -scipy.special.log_softmax(cls, -1)[np.arange(6), labels].mean()
  for tau in (1.0, 3.0):
    loss, logits = losses.classification_loss((cls, dist), targets, teacher_logits=teacher, distill_type='soft',
                                              alpha=0.5, temperature=tau)
    np.testing.assert_allclose(float(loss.mean()), 0.5 * ce + 0.5 * _reference_soft_kd(dist, teacher, tau),
                               rtol=1e-5)
    np.testing.assert_allclose(logits, (cls + dist) / 2, rtol=1e-6)
  hard_ce = -scipy.special.log_softmax(dist, -1)[np.arange(6), teacher.argmax(-1)].mean()
  loss, _ = losses.classification_loss((cls, dist), targets, teacher_logits=teacher, distill_type='hard',
                                       alpha=0.5)
  np.testing.assert_allclose(float(loss.mean()), 0.5 * ce + 0.5 * hard_ce, rtol=1e-5)
  # Without a teacher, both heads learn the labels.
  dist_ce = -scipy.special.log_softmax(dist, -1)[np.arange(6), labels].mean()
  loss, _ = losses.classification_loss((cls, dist), targets)
  np.testing.assert_allclose(float(loss.mean()), (ce + dist_ce) / 2, rtol=1e-5)
  with pytest.raises(ValueError, match='teacher'):
    losses.classification_loss((cls, dist), targets, distill_type='hard')
  # The teacher gets no gradient.
  g = jax.grad(lambda t: losses.soft_distillation(jnp.asarray(dist), t, temperature=2.0).sum())(jnp.asarray(teacher))
  assert float(jnp.abs(g).max()) == 0.0
