"""Every config builds its model and optimizer, validates, and every schema field is read by the package."""
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from ml_collections import config_flags  # noqa: F401  (the loader the CLI uses)
from ml_collections.config_flags import config_flags as cf_impl

from vit_jax import config_schema, optim, sharding, train
from vit_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / 'configs').glob('*.py'))


def load_config(path: pathlib.Path, arg: str = '') -> ml_collections.ConfigDict:
  spec = f'{path}:{arg}' if arg else str(path)
  return cf_impl._ConfigFileParser(name='config').parse(spec)  # pylint: disable=protected-access


def _leaf_paths(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaf_paths(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'


def test_configs_exist():
  names = {p.name for p in CONFIG_FILES}
  assert {'default.py', 'vit_b16.py', 'vit_l16.py'} <= names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.name)
def test_config_validates_and_builds(path):
  config = load_config(path)
  config_schema.validate_config(config)
  model = train.build_model(config, num_classes=10)
  size = config.dataset.image_size
  example = registry.example_input(model, size)  # Images, or the model's own input (video clips, spectrograms).
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(example.shape), train=False))
  tx, schedule = optim.create_optimizer(config.optimizer, config.total_steps)
  jax.eval_shape(tx.init, variables['params'])
  assert float(schedule(config.total_steps)) >= 0.0


def test_config_variant_argument():
  config = load_config(ROOT / 'configs' / 'vit_b16.py', '90')
  assert config.total_steps == 90 * 1_281_167 // 4096


def test_every_schema_field_is_read_by_the_package():
  source = '\n'.join(p.read_text() for p in (ROOT / 'vit_jax').rglob('*.py') if p.name != 'config_schema.py')
  unread = []
  for path in _leaf_paths(config_schema.base_config()):
    section, _, leaf = path.rpartition('.')
    if section == 'mesh':  # sharding.create_mesh reads mesh.<axis> and mesh.dcn_<axis> for every axis it knows.
      if leaf.removeprefix('dcn_') not in sharding.MESH_AXES:
        unread.append(path)
      continue
    # A field counts as read where the package accesses it by attribute or key on its section.
    owner = section.split('.')[-1] if section else 'config'
    patterns = [rf'\b{owner}\.{leaf}\b', rf'\b{owner}_config\.{leaf}\b', rf"\[['\"]{leaf}['\"]\]",
                rf'config\.{leaf}\b']
    if not any(re.search(p, source) for p in patterns):
      unread.append(path)
  assert not unread, f'Config fields nothing reads: {unread}'


def test_unknown_key_is_named():
  config = config_schema.base_config()
  config.optimzer = ml_collections.ConfigDict({'lr': 1.0})
  config.dataset.nmae = 'x'
  with pytest.raises(ValueError, match='optimzer.*dataset.nmae|dataset.nmae.*optimzer'):
    config_schema.validate_config(config)


@pytest.mark.parametrize('key,value,match', [('total_steps', 0, 'total_steps'), ('batch_size', -1, 'batch_size'),
                                             ('eval_every', -5, 'eval_every')])
def test_bad_values_are_named(key, value, match):
  config = config_schema.base_config()
  config[key] = value
  with pytest.raises(ValueError, match=match):
    config_schema.validate_config(config)


def test_warmup_longer_than_training():
  config = config_schema.base_config()
  config.optimizer.warmup_steps = config.total_steps + 1
  with pytest.raises(ValueError, match='warmup_steps'):
    config_schema.validate_config(config)


# Validation against devices and the model: each error names the key and the fix, before anything compiles.


@pytest.mark.parametrize('overrides,num_devices,match', [
    ({'batch_size': 12}, 8, r'config.batch_size=12 cannot be split evenly over 8 batch devices.*multiple of 8'),
    ({'batch_size': 16, 'accum_steps': 4}, 8, r'batch_size=16 .* accum_steps=4.*multiple of 32'),
    ({'mesh.data': 3}, 8, r'config.mesh: Mesh .*3 devices but 8 are available'),
    ({'dataset.image_size': 30}, None, r'config.dataset.image_size=30: Image size 30x30 is not divisible by '
                                       r'patch_size=16.*Fix: change config.dataset.image_size'),
    ({'model.name': 'swin_t', 'dataset.image_size': 200}, None,
     r"config.model.name='swin_t' cannot take config.dataset.image_size=200: .*window"),
    ({'on_nonfinite': 'ignore'}, None, r"config.on_nonfinite='ignore'; set it to 'stop' or 'skip'"),
    ({'dataset.name': 'image_folder'}, None, r'needs config.dataset.folder'),
])
def test_config_errors_name_key_and_fix(overrides, num_devices, match):
  config = config_schema.base_config()
  config.model.name = 'vit_ti16'
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    section = config
    for p in parents:
      section = section[p]
    if leaf not in section:  # accum_steps may not exist in this schema yet (issue 4 adds it).
      if leaf == 'accum_steps' and leaf not in config_schema.base_config():
        pytest.skip('config.accum_steps is not in the schema yet')
    section[leaf] = value
  with pytest.raises(ValueError, match=match):
    config_schema.validate_config(config, num_devices=num_devices)


def test_valid_config_passes_device_checks():
  config = config_schema.base_config()
  config.model.name = 'vit_ti16'
  config_schema.validate_config(config, num_devices=8)
  config_schema.check_devices(config, 8, process_count=2)
  config.batch_size = 100
  with pytest.raises(ValueError, match='multiple of 8'):
    config_schema.check_devices(config, 8, process_count=2)
  config.batch_size, config.mesh.dcn_data, config.mesh.dcn_tensor = 64, 1, -1
  config_schema.check_devices(config, 8, process_count=1)  # One host: dcn_* do not apply.
  with pytest.raises(ValueError, match='dcn_tensor=-1: tensor parallelism across hosts'):
    config_schema.check_devices(config, 8, process_count=2)


# Ranges: every numeric field has one (config_schema.RANGES), checked before anything is built; the error names the
# key and the allowed range.


@pytest.mark.parametrize('key,value,allowed', [
    ('optimizer.lr', -1.0, r'> 0'), ('optimizer.lr', 0.0, r'> 0'), ('optimizer.weight_decay', -0.1, r'>= 0'),
    ('optimizer.grad_clip_norm', -1.0, r'>= 0'), ('optimizer.end_lr_factor', -0.5, r'in \[0, 1\]'),
    ('optimizer.b1', 1.5, r'in \[0, 1\)'), ('optimizer.b2', 2.0, r'in \[0, 1\)'),
    ('dataset.eval_crop_fraction', 0.0, r'in \(0, 1\]'), ('dataset.shuffle_buffer', 0, r'>= 1'),
    ('optimizer.lr', float('nan'), r'> 0'),
])
def test_out_of_range_values_name_key_and_range(key, value, allowed):
  config = config_schema.base_config()
  section, leaf = key.split('.')
  config[section][leaf] = value
  with pytest.raises(ValueError, match=rf'config\.{key}=.* must be {allowed}'):
    config_schema.validate_config(config)


def test_every_numeric_field_has_a_range():
  """A numeric field added to the schema without a range would let any value through unchecked."""
  def numeric_leaves(section, prefix=''):
    for key, value in section.items():
      path = f'{prefix}{key}'
      if isinstance(value, ml_collections.ConfigDict):
        if path != 'task':  # Task sections are range-checked by their Task.check_config.
          yield from numeric_leaves(value, f'{path}.')
      elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path
  config = config_schema.base_config()
  config.optimizer.weight_decay_end = 0.4  # Optional numeric fields are None by default.
  missing = sorted(set(numeric_leaves(config)) - set(config_schema.RANGES))
  assert not missing, f'numeric fields without a range in config_schema.RANGES: {missing}'
  config_schema.check_ranges(config_schema.base_config())  # The defaults are in range.


def test_model_override_of_the_wrong_type_names_the_key():
  config = config_schema.base_config()
  config.model.hidden_size = 'abc'
  with pytest.raises(ValueError, match=r"config\.model\.hidden_size='abc' must be int"):
    config_schema.validate_config(config)
