"""Forward-only programs compile without YNNPACK fusions on CPU, give the same outputs, and respect XLA_FLAGS."""
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import compile_options, models


def _attention(q, k, v):
  p = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / 8.0, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', p, v)


def _qkv():
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.standard_normal((2, 17, 2, 8)), jnp.float32) for _ in range(3)]


def test_inference_options_turn_ynnpack_off_on_cpu_only(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')
  assert compile_options.inference('cpu') == {compile_options.YNN_FUSION_FLAG: ''}
  assert compile_options.inference() == {compile_options.YNN_FUSION_FLAG: ''}  # The tests run on CPU.
  assert compile_options.inference('gpu') is None
  assert compile_options.inference('tpu') is None


def test_a_users_own_ynnpack_flag_wins(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=individual_dot')
  assert compile_options.inference('cpu') is None


def test_jit_inference_compiles_attention_without_ynnpack_fusions():
  q, k, v = _qkv()
  text = compile_options.jit_inference(_attention).lower(q, k, v).compile().as_text()
  assert 'ynn_fusion' not in text
  assert 'ynn_fusion' in jax.jit(_attention).lower(q, k, v).compile().as_text(), (
      'XLA no longer makes YNNPACK fusions by default: revisit vit_jax/compile_options.py')


def test_jit_inference_gives_the_same_outputs():
  q, k, v = _qkv()
  np.testing.assert_allclose(compile_options.jit_inference(_attention)(q, k, v), jax.jit(_attention)(q, k, v),
                             rtol=1e-5, atol=1e-6)
  model = models.create_model('vit_ti16', num_classes=5, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
  forward = lambda v, x: model.apply(v, x, train=False)
  np.testing.assert_allclose(compile_options.jit_inference(forward)(variables, x), jax.jit(forward)(variables, x),
                             rtol=1e-5, atol=1e-5)
