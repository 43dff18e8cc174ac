"""Evaluators on data whose answer is known: DINO's weighted k-NN vote against a hand-computed example, k-NN and the
linear probe on separable data, the few-shot evaluator, config checks, and the periodic entry on digits pixels."""
import ml_collections
import numpy as np
import pytest

from vit_jax import config_schema, evaluate, evaluators, sharding, train
from vit_jax.evaluators import base, fewshot, knn, linear_probe


def _clusters(n_per_class=40, classes=4, dim=16, spread=5.0, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, dim)) * spread
  labels = np.repeat(np.arange(classes), n_per_class)
  x = (centers[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32)
  return base.Features(x[::2], labels[::2]), base.Features(x[1::2], labels[1::2])


def test_knn_votes_match_a_hand_computed_example():
  # Bank directions at 0, 30, 90 and 180 degrees (labels 0, 0, 1, 2), with arbitrary norms (cosine ignores them).
  angles = np.deg2rad([0.0, 30.0, 90.0, 180.0])
  bank = np.stack([np.cos(angles), np.sin(angles)], 1) * np.array([[2.0], [0.5], [3.0], [1.0]])
  labels = np.array([0, 0, 1, 2])
  query = np.array([[np.cos(np.deg2rad(60.0)), np.sin(np.deg2rad(60.0))]]) * 7.0
  # Cosines to the query: cos 60 = 0.5, cos 30, cos 30, cos 120 = -0.5; k = 3 keeps the first three.
  t = 0.07
  expected = np.array([[np.exp(0.5 / t) + np.exp(np.cos(np.pi / 6) / t), np.exp(np.cos(np.pi / 6) / t), 0.0]])
  votes = np.asarray(knn.knn_votes(query.astype(np.float32), bank.astype(np.float32), labels, k=3, temperature=t,
                                   num_classes=3))
  np.testing.assert_allclose(votes, expected, rtol=1e-5)
  # Two close neighbours of class 0 outvote one equally close neighbour of class 1; with k = 2 the tie of one
  # cos-30 neighbour each remains, and with T large every vote counts ~1 (a plain majority among the k).
  flat = np.asarray(knn.knn_votes(query.astype(np.float32), bank.astype(np.float32), labels, k=3, temperature=1e6,
                                  num_classes=3))
  np.testing.assert_allclose(flat, [[2.0, 1.0, 0.0]], rtol=1e-5)


def test_knn_is_perfect_on_separable_clusters_whatever_the_chunking():
  train, test = _clusters()
  for chunk in (1, 7, 1000):
    assert knn.knn_accuracy(train, test, num_classes=4, k=20, chunk_size=chunk) == {'top1': 1.0}
  with pytest.raises(ValueError, match='k=81'):
    knn.knn_accuracy(train, test, num_classes=4, k=81)


def test_knn_top5_and_random_labels():
  train, test = _clusters(classes=10, n_per_class=20)
  result = knn.knn_accuracy(train, test, num_classes=10, k=5)
  assert result == {'top1': 1.0, 'top5': 1.0}
  shuffled = base.Features(train.features, np.random.default_rng(1).permutation(train.labels))
  assert knn.knn_accuracy(shuffled, test, num_classes=10, k=5)['top1'] < 0.35  # Chance is 0.1.


def test_linear_probe_separates_linearly_separable_data():
  # Labels are the argmax of a random linear map: linearly separable, but not clusters (k-NN is not perfect here).
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1200, 8)).astype(np.float32)
  scores = x @ rng.normal(size=(8, 3))
  ranked = np.sort(scores, 1)
  keep = ranked[:, -1] - ranked[:, -2] > 0.5  # A margin, so a few hundred steps of AdamW find a separator.
  x, y = x[keep] * 10.0 + 3.0, np.argmax(scores[keep], 1)  # Scaled and shifted: the probe standardises.
  train, test = base.Features(x[::2], y[::2]), base.Features(x[1::2], y[1::2])
  result = linear_probe.linear_probe_accuracy(train, test, num_classes=3, batch_size=64)
  assert result == {'top1': 1.0, 'train_top1': 1.0}
  # The same data with its features replaced by noise: the probe cannot beat chance on the eval split.
  noise = base.Features(rng.normal(size=test.features.shape).astype(np.float32), test.labels)
  assert linear_probe.linear_probe_accuracy(noise, test, num_classes=3, epochs=20)['top1'] < 0.5


def test_fewshot_evaluator_reports_one_minus_the_probe_error():
  train, test = _clusters()
  evaluator = evaluators.build_evaluator('fs', {'type': 'fewshot', 'shots': (2, 5), 'seeds': 2, 'l2_reg': 1.0})
  errors = fewshot.fewshot_errors(train.features, train.labels, test.features, test.labels, num_classes=4,
                                  shots=(2, 5), l2_reg=1.0, seeds=2)
  assert evaluator.evaluate(train, test, num_classes=4) == {'2shot_top1': 1 - errors[2], '5shot_top1': 1 - errors[5]}


@pytest.mark.parametrize('entry, message', [
    ({'type': 'knnn'}, r"evals.bad.type='knnn'"),
    ({'type': 'knn', 'kk': 3}, r"evals.bad: unknown key\(s\) \['kk'\]"),
    ({'type': 'knn', 'k': 0}, r'evals.bad.k=0'),
    ({'type': 'knn', 'temperature': 0.0}, r'evals.bad.temperature=0.0'),
    ({'type': 'linear_probe', 'every': -1}, r'evals.bad.every=-1'),
    ({'type': 'linear_probe', 'epochs': 0}, r'evals.bad.epochs=0'),
    ({'type': 'fewshot', 'shots': ()}, r'evals.bad.shots=\(\)'),
])
def test_bad_eval_configs_are_named_before_compiling(entry, message):
  config = config_schema.base_config()
  config.model.hidden_size = 16
  config.dataset.image_size = 32
  config.evals.bad = entry
  with pytest.raises(ValueError, match=message):
    config_schema.validate_config(config)


def test_due_steps():
  evals = ml_collections.ConfigDict({'a': {'type': 'knn', 'every': 10}, 'b': {'type': 'linear_probe'}})
  built = evaluators.build_evaluators(evals)
  assert [s for s in range(1, 26) if built['a'].is_due(s, 25)] == [10, 20, 25]
  assert [s for s in range(1, 26) if built['b'].is_due(s, 25)] == [25]


def _pixels(variables, images):
  """A feature function with nothing to learn: the raw pixels (scaled by a 'variable', to check it is passed)."""
  return images.reshape(images.shape[0], -1) * variables['scale']


def test_run_periodic_on_digits_pixels(digits_data_dir):
  config = config_schema.base_config()
  config.dataset.data_dir = digits_data_dir
  config.dataset.image_size = 8
  config.dataset.eval_crop_fraction = 1.0
  config.evals.knn = {'type': 'knn', 'every': 5}
  config.evals.few = {'type': 'fewshot', 'shots': (5,), 'seeds': 1, 'every': 0, 'train_split': 'train[:500]'}
  mesh = sharding.create_mesh(config.mesh)
  kw = dict(feature_fn=_pixels, variables={'scale': np.float32(2.0)}, dataset_config=config.dataset, batch_size=64,
            mesh=mesh, num_classes=10, total_steps=12)
  assert evaluators.run_periodic(config.evals, step=3, **kw) == {}
  at_5 = evaluators.run_periodic(config.evals, step=5, **kw)
  assert set(at_5) == {'knn/top1', 'knn/top5'}
  # Raw-pixel k-NN on plain digits is ~98% (the features and labels stay aligned through padding and batching).
  assert at_5['knn/top1'] > 0.95 and at_5['knn/top5'] > 0.99
  last = evaluators.run_periodic(config.evals, step=12, **kw)
  assert set(last) == {'knn/top1', 'knn/top5', 'few/5shot_top1'} and last['knn/top1'] == at_5['knn/top1']
  features = evaluators.extract_features(_pixels, {'scale': np.float32(1.0)}, config.dataset, 'test', batch_size=64,
                                         mesh=mesh)
  assert features.features.shape == (360, 8 * 8 * 3) and np.bincount(features.labels).sum() == 360
  with pytest.raises(ValueError, match='batch_size=60 cannot be split evenly'):
    evaluators.extract_features(_pixels, {'scale': np.float32(1.0)}, config.dataset, 'test', batch_size=60, mesh=mesh)


# --- The command line.


def _trained_workdir(data_dir, workdir):
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir, total_steps=10, eval_every=0, checkpoint_every=10)
  config.evals.lin = {'type': 'linear_probe', 'epochs': 3, 'train_split': 'train[:300]'}
  train.train_and_evaluate(config, str(workdir))
  return config


@pytest.mark.slow
def test_evaluate_a_workdir_and_the_same_weights_through_init_from(digits_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  trained = _trained_workdir(digits_data_dir, workdir)
  config = evaluate.workdir_config(str(workdir))
  assert config.evals.lin.train_split == 'train[:300]' and config.optimizer.lr_multipliers == ()
  result = evaluate.evaluate(config, workdir=str(workdir), names=['lin', 'knn'])
  assert result['step'] == 10 and set(result) == {'source', 'step', 'lin/top1', 'lin/top5', 'lin/train_top1',
                                                   'knn/top1', 'knn/top5'}
  # The same checkpoint's params, loaded as init_from weights into a fresh run of the same model, give the same
  # features, hence the same k-NN numbers (the linear probe too: it is deterministic).
  trained.init_from = str(workdir)
  again = evaluate.evaluate(trained, names=['lin', 'knn'])
  assert {k: v for k, v in again.items() if '/' in k} == {k: v for k, v in result.items() if '/' in k}
  assert 0.3 < result['knn/top1'] <= 1.0  # Ten steps of a 1-layer ViT: far above chance (0.1) already.
  with pytest.raises(ValueError, match="'nope' is neither"):
    evaluate.evaluate(config, workdir=str(workdir), names=['nope'])
