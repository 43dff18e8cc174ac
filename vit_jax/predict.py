"""Command line: a trained model's top-k classes for your own images.

  python -m vit_jax.predict --workdir DIR IMAGE_OR_FOLDER [...] [--top_k 5] [--json OUT.jsonl]
      a training workdir: its config.json, its latest checkpoint (the EMA's weights when the run kept one) and the
      class names it recorded (`class_names.json`);
  python -m vit_jax.predict --model NAME --weights FILE --num_classes N [--labels FILE] [--image_size S] IMAGE ...
      an official .npz, a converted checkpoint (`python -m vit_jax.convert`) or another workdir's weights.

Images are decoded by TensorFlow and preprocessed by the eval pipeline's own function
(`input_pipeline.eval_preprocess`), so a prediction sees exactly what the eval accuracy saw. Folders are searched
recursively (hidden files skipped) and run in fixed-size batches. A file that cannot be decoded is reported with
its name, counted and skipped; the rest still run. Prints one line per image; `--json` also writes one JSON object
per image: {"file", "top_k": [{"label", "name", "prob"}]}.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

from absl import app, flags, logging
import ml_collections
import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

FLAGS = flags.FLAGS


@dataclasses.dataclass
class LoadedModel:
  """A model ready to run: the flax module, its variables, the eval preprocessing config and class names."""
  model: Any
  variables: Any
  dataset_config: ml_collections.ConfigDict  # image_size and eval_crop_fraction: what eval_preprocess reads.
  class_names: Optional[list[str]]
  source: str


def load_workdir(workdir: str) -> LoadedModel:
  """The model of a training workdir with its latest checkpoint's evaluation weights (EMA when kept)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, evaluate, finetune, input_pipeline, labels, train  # pylint: disable=g-import-not-at-top
  config = evaluate.workdir_config(workdir)
  ckpt_dir = epath.Path(workdir) / checkpoint.CHECKPOINT_DIRNAME
  if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise FileNotFoundError(f'{workdir} has no checkpoint (looked in {ckpt_dir}); train it first, or give '
                            '--model and --weights instead.')
  names = labels.read_class_names(workdir)
  num_classes = len(names) if names else input_pipeline.get_dataset_info(config.dataset).num_classes
  model = train.build_model(config, num_classes)
  variables = finetune.read_workdir_variables(workdir)
  return LoadedModel(model=model, variables=variables, dataset_config=config.dataset, class_names=names,
                     source=workdir)


def load_weights(model_name: str, weights: str, *, num_classes: int, image_size: Optional[int] = None,
                 crop_fraction: float = 1.0, model_overrides: Optional[dict[str, Any]] = None) -> LoadedModel:
  """Registry model `model_name` with every weight (head included) from `weights`; a file whose shapes do not fit
  the model raises an error naming it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax import config_schema, finetune, models  # pylint: disable=g-import-not-at-top
  spec = models.get_model_spec(model_name)
  size = image_size or spec.image_size
  model = models.create_model(model_name, num_classes=num_classes, **(model_overrides or {}))
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, size, size, 3)), train=False))(jax.random.key(0))
  init = jax.tree.map(np.asarray, dict(init))
  try:
    variables = finetune.load_variables(weights, init, require_head=True, model=model)
  except (ValueError, KeyError) as e:
    raise ValueError(f'--weights {weights} does not fit model {model_name!r} with {num_classes} classes at '
                     f'{size} px: {e}') from e
  dataset_config = config_schema.base_config().dataset
  dataset_config.image_size, dataset_config.eval_crop_fraction = size, crop_fraction
  return LoadedModel(model=model, variables=variables, dataset_config=dataset_config, class_names=None,
                     source=weights)


def list_images(paths: Sequence[str]) -> list[str]:
  """Files given directly, and the visible files under given folders (sorted); a missing path is an error."""
  out = []
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        out.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith('.'))
    elif os.path.isfile(path):
      out.append(path)
    else:
      raise FileNotFoundError(f'{path} is neither an image file nor a folder.')
  return out


def load_image(path: str, dataset_config: ml_collections.ConfigDict) -> np.ndarray:
  """One image file through the eval pipeline's preprocessing: float32 (size, size, 3) in [-1, 1]. Raises
  ValueError naming the file if TensorFlow cannot decode it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    raise ValueError(f'{path}: not a decodable image ({e.message.splitlines()[0]}).') from None
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f'{path}: the image is empty.')
  return input_pipeline.eval_preprocess(image, dataset_config).numpy()


def _batches(files: Sequence[str], dataset_config: ml_collections.ConfigDict, batch_size: int,
             skipped: list[tuple[str, str]]) -> Iterator[tuple[list[str], np.ndarray]]:
  """(files, images) batches of decodable files; undecodable ones go to `skipped` as (file, reason)."""
  names, images = [], []
  for path in files:
    try:
      images.append(load_image(path, dataset_config))
      names.append(path)
    except ValueError as e:
      skipped.append((path, str(e)))
      logging.warning('Skipped %s', e)
    if len(names) == batch_size:
      yield names, np.stack(images)
      names, images = [], []
  if names:
    yield names, np.stack(images)


def top_k(probs: np.ndarray, k: int, class_names: Optional[Sequence[str]]) -> list[dict[str, Any]]:
  """The k most probable classes of one probability vector, as [{'label', 'name', 'prob'}] (name None when
  unknown)."""
  order = np.argsort(-probs, kind='stable')[:k]
  return [{'label': int(i), 'name': class_names[i] if class_names and i < len(class_names) else None,
           'prob': float(probs[i])} for i in order]


def predict_files(loaded: LoadedModel, files: Sequence[str], *, k: int = 5, batch_size: int = 32,
                  progress: bool = False) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
  """([{'file', 'top_k'}] for every decodable file, [(file, reason)] of the skipped ones). Batches are padded to
  `batch_size`, so the model compiles once."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import compile_options  # pylint: disable=g-import-not-at-top
  apply = compile_options.jit_inference(
      lambda v, x: jax.nn.softmax(loaded.model.apply(v, x, train=False).astype(np.float32), axis=-1))
  skipped: list[tuple[str, str]] = []
  results = []
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=len(files), unit='img', file=sys.stderr)
  for names, images in _batches(files, loaded.dataset_config, batch_size, skipped):
    padded = np.zeros((batch_size,) + images.shape[1:], np.float32)
    padded[:len(images)] = images
    probs = np.asarray(apply(loaded.variables, padded))[:len(images)]
    results.extend({'file': f, 'top_k': top_k(p, k, loaded.class_names)} for f, p in zip(names, probs))
    if bar is not None:
      bar.n = len(results) + len(skipped)
      bar.refresh()
  if bar is not None:
    bar.close()
  return results, skipped


def format_result(result: dict[str, Any]) -> str:
  """'FILE: name 0.931, name 0.041, ...' (the label id when there is no name)."""
  entries = ', '.join(f'{e["name"] if e["name"] is not None else e["label"]} {e["prob"]:.3f}'
                      for e in result['top_k'])
  return f'{result["file"]}: {entries}'


def write_json_lines(results: Sequence[dict[str, Any]], path: str) -> None:
  """One JSON object per predicted image: {"file", "top_k": [{"label", "name", "prob"}]}."""
  with open(path, 'w') as f:
    for result in results:
      f.write(json.dumps(result) + '\n')


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string('workdir', None, 'A training workdir: predict with its latest checkpoint.')
  flags.DEFINE_string('model', None, 'With --weights: the registered model name.')
  flags.DEFINE_string('weights', None, 'With --model: an official .npz, a converted params.npz or its directory.')
  flags.DEFINE_integer('num_classes', None, 'With --model: classes of the weights\' head (default: --labels count).')
  flags.DEFINE_integer('image_size', None, 'With --model: input size (default: the model\'s registered size).')
  flags.DEFINE_float('crop_fraction', 1.0, 'With --model: eval central-crop fraction (0.875: resize 256, crop 224).')
  flags.DEFINE_string('labels', None, 'Class names: a JSON list or one name per line (overrides recorded ones).')
  flags.DEFINE_integer('top_k', 5, 'How many classes to print per image.')
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
  flags.DEFINE_string('json', None, 'Also write one JSON object per image to this file (JSON lines).')


def load_from_flags() -> LoadedModel:
  """The model named by --workdir or --model/--weights, with --labels applied."""
  from vit_jax import labels  # pylint: disable=g-import-not-at-top
  if bool(FLAGS.workdir) == bool(FLAGS.model or FLAGS.weights):
    raise app.UsageError('Give either --workdir DIR, or --model NAME and --weights FILE.')
  names = labels.read_labels_file(FLAGS.labels) if FLAGS.labels else None
  if FLAGS.workdir:
    loaded = load_workdir(FLAGS.workdir)
  else:
    if not (FLAGS.model and FLAGS.weights):
      raise app.UsageError('--model and --weights go together.')
    num_classes = FLAGS.num_classes or (len(names) if names else None)
    if not num_classes:
      raise app.UsageError('--model needs --num_classes (or --labels, one name per class).')
    loaded = load_weights(FLAGS.model, FLAGS.weights, num_classes=num_classes, image_size=FLAGS.image_size,
                          crop_fraction=FLAGS.crop_fraction)
  if names is not None:
    loaded.class_names = names
  return loaded


def main(argv: Sequence[str]) -> None:
  from vit_jax import console  # pylint: disable=g-import-not-at-top
  console.configure_logging(FLAGS.verbosity)
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give one or more image files or folders.')
  loaded = load_from_flags()
  files = list_images(paths)
  results, skipped = predict_files(loaded, files, k=FLAGS.top_k, batch_size=FLAGS.batch_size,
                                   progress=len(files) > FLAGS.batch_size)
  for result in results:
    print(format_result(result))
  if FLAGS.json:
    write_json_lines(results, FLAGS.json)
  print(f'{len(results)} image(s) predicted, {len(skipped)} skipped (not decodable).', flush=True)
  if not results:
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
