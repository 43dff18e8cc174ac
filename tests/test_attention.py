"""Every attention implementation matches the einsum path wherever it runs (cuDNN needs an NVIDIA GPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import attention


def _qkv(dtype=jnp.float32, b=2, lq=5, lk=7, h=3, d=8):
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (b, n, h, d), dtype) for key, n in zip(keys, (lq, lk, lk)))
  bias = jax.random.normal(keys[3], (1, h, lq, lk))
  mask = jnp.arange(lk)[None, None, None, :] < jnp.array([7, 4])[:, None, None, None]  # Per-example lengths.
  return q, k, v, bias, mask


def _supported(implementation):
  if implementation == 'cudnn' and jax.default_backend() != 'gpu':
    pytest.skip('cudnn attention needs an NVIDIA GPU (jax.nn.dot_product_attention implementation="cudnn").')


@pytest.mark.parametrize('implementation', ['xla', 'cudnn'])
def test_fused_matches_einsum(implementation):
  _supported(implementation)
  dtype = jnp.bfloat16 if implementation == 'cudnn' else jnp.float32
  q, k, v, bias, mask = _qkv(dtype)
  for kwargs in ({}, {'bias': bias, 'mask': mask, 'scale': 0.3}):
    want = attention.dot_product_attention(q, k, v, implementation='einsum', **kwargs)
    got = attention.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2 if dtype == jnp.bfloat16 else 1e-5)


def test_einsum_matches_a_numpy_reference():
  q, k, v, bias, mask = _qkv()
  got = attention.dot_product_attention(q, k, v, bias=bias, mask=mask)
  q, k, v, bias, mask = map(np.asarray, (q, k, v, bias, mask))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1]) + bias
  logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(got), np.einsum('bhqk,bkhd->bqhd', weights, v), atol=1e-5)


@pytest.mark.parametrize('name, kwargs, size', [
    ('vit_pico', {'classifier': 'map', 'num_layers': 1}, 8),  # Encoder and MAP-head attention.
    ('swin_t', dict(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=2), 16),
    ('swinv2_t', dict(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=2), 16),
    ('pvt_v2_b0', dict(embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 2), sr_ratios=(2, 1), mlp_ratios=2.0), 32),
    ('mvitv2_t', dict(embed_dim=8, depths=(1, 1), num_heads=1, img_size=32), 32),  # Rel-pos terms as the bias.
    ('maxvit_t', dict(embed_dim=(16,), depths=(1,), stem_width=8, dim_head=8, window_size=2), 8),  # Likewise.
])
def test_models_agree_across_implementations(name, kwargs, size):
  images = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  outs = {}
  for implementation in ('einsum', 'xla'):
    model = models.create_model(name, num_classes=5, attention_impl=implementation, **kwargs)
    if implementation == 'einsum':
      variables = model.init(jax.random.key(0), images)  # params, and batch_stats where the model has BatchNorm.
    outs[implementation] = model.apply(variables, images)
  np.testing.assert_allclose(outs['xla'], outs['einsum'], atol=1e-5)


def test_bad_choices_are_refused():
  q, k, v, _, _ = _qkv()
  with pytest.raises(ValueError, match='Unknown attention implementation'):
    attention.dot_product_attention(q, k, v, implementation='flash')
  with pytest.raises(ValueError, match='cannot drop out attention weights'):
    attention.dot_product_attention(q, k, v, implementation='xla', dropout=lambda w: w)
