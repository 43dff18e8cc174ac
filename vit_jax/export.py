"""Command line: export a trained model for serving outside this codebase.

  python -m vit_jax.export --workdir DIR --format stablehlo|savedmodel|onnx --out PATH [--uint8]
  python -m vit_jax.export --model NAME --weights FILE --num_classes N --format ... --out PATH

Input contract of every exported function (the eval pipeline after its resize and central crop):
- default: float32 NHWC images in [0, 1] of the model's eval size (batch size free);
- `--uint8`: uint8 NHWC images in [0, 255];
the normalisation to [-1, 1] (`input_pipeline.eval_preprocess`'s last step) is inside the export, and the output is
the (batch, classes) float32 logits. Resize and crop to `image_size` before calling it (e.g. with PIL or
tf.image); `export_info.json` beside the export records the size, dtype and class names.

Formats:
- stablehlo: `jax.export` with a symbolic batch dimension, serialised (`PATH`, bytes); load it back with
  `jax.export.deserialize(open(PATH, 'rb').read()).call(images)`.
- savedmodel: a TF SavedModel through `jax2tf` (weights as tf.Variables), signature `serving_default(images)`.
- onnx: through `jax2onnx` (optional: `pip install jax2onnx onnxruntime`); checked with onnxruntime.
A format whose library is missing or cannot convert this model raises `ExportError` naming the format and the cause.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

FORMATS = ('stablehlo', 'savedmodel', 'onnx')
INFO_FILENAME = 'export_info.json'
FLAGS = flags.FLAGS


class ExportError(RuntimeError):
  """A format cannot be produced here (missing library, unsupported model); the message says which and why."""


def input_spec(image_size: int, *, uint8: bool = False, batch: Any = None) -> jax.ShapeDtypeStruct:
  """The exported input: (batch, image_size, image_size, 3), float32 in [0, 1] or uint8 in [0, 255]."""
  if batch is None:
    (batch,) = jax.export.symbolic_shape('batch')
  return jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8 if uint8 else jnp.float32)


def normalize(images: jax.Array, *, uint8: bool = False) -> jax.Array:
  """The contract's images -> the model's [-1, 1] input (the eval pipeline's x / 127.5 - 1 on [0, 255])."""
  x = images.astype(jnp.float32)
  return x / 127.5 - 1.0 if uint8 else x * 2.0 - 1.0


def serving_fn(model: Any, *, uint8: bool = False) -> Callable[[Any, jax.Array], jax.Array]:
  """(variables, images) -> float32 logits, normalisation included."""
  def serve(variables: Any, images: jax.Array) -> jax.Array:
    return model.apply(variables, normalize(images, uint8=uint8), train=False).astype(jnp.float32)
  return serve


def export_stablehlo(model: Any, variables: Any, image_size: int, path: str, *, uint8: bool = False) -> str:
  """Serialises the model (weights as constants) with a symbolic batch dimension to `path`."""
  serve = serving_fn(model, uint8=uint8)
  try:
    exported = jax.export.export(jax.jit(lambda x: serve(variables, x)))(input_spec(image_size, uint8=uint8))
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f'stablehlo: jax.export cannot export {type(model).__name__} with a symbolic batch '
                      f'dimension ({type(e).__name__}: {e}).') from e
  with open(path, 'wb') as f:
    f.write(exported.serialize())
  return path


def load_stablehlo(path: str) -> Callable[[Any], jax.Array]:
  """The exported function of `export_stablehlo`'s file (images -> logits)."""
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return exported.call


def export_savedmodel(model: Any, variables: Any, image_size: int, path: str, *, uint8: bool = False) -> str:
  """A TF SavedModel in the directory `path` with `serving_default(images) -> {'logits'}` (jax2tf)."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(f'savedmodel: needs tensorflow and jax.experimental.jax2tf ({e}).') from e
  serve = serving_fn(model, uint8=uint8)
  tf_fn = jax2tf.convert(serve, polymorphic_shapes=[None, f'(b, {image_size}, {image_size}, 3)'],
                         with_gradient=False)
  module = tf.Module()
  module.variables_ = tf.nest.map_structure(lambda a: tf.Variable(np.asarray(a), trainable=False),
                                            jax.tree.map(np.asarray, dict(variables)))
  spec = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8 if uint8 else tf.float32, name='images')

  @tf.function(input_signature=[spec], autograph=False)
  def serving_default(images):
    return {'logits': tf_fn(module.variables_, images)}

  module.serving_default = serving_default
  try:
    with layers.gelu_via_erfc():  # TensorFlow's StableHLO cannot load erf's serialised form; tracing happens here.
      tf.saved_model.save(module, path, signatures={'serving_default': serving_default})
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f'savedmodel: jax2tf could not convert {type(model).__name__} ({type(e).__name__}: {e}).') from e
  return path


def load_savedmodel(path: str) -> Callable[[Any], np.ndarray]:
  """images -> logits through TensorFlow's loaded SavedModel."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  loaded = tf.saved_model.load(path)
  fn = loaded.signatures['serving_default']
  return lambda images: fn(images=tf.constant(images))['logits'].numpy()


def export_onnx(model: Any, variables: Any, image_size: int, path: str, *, uint8: bool = False) -> str:
  """An ONNX model (weights as initializers) with a free batch dimension, through jax2onnx."""
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError('onnx: needs the optional package jax2onnx (pip install jax2onnx onnxruntime); '
                      f'it is not installed ({e}).') from e
  serve = serving_fn(model, uint8=uint8)
  try:
    proto = jax2onnx.to_onnx(lambda x: serve(variables, x),
                             [jax.ShapeDtypeStruct(('B', image_size, image_size, 3),
                                                   jnp.uint8 if uint8 else jnp.float32)],
                             return_mode='proto')
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f'onnx: jax2onnx could not convert {type(model).__name__} ({type(e).__name__}: '
                      f'{str(e)[:500]}).') from e
  with open(path, 'wb') as f:
    f.write(proto.SerializeToString())
  return path


def load_onnx(path: str) -> Callable[[Any], np.ndarray]:
  """images -> logits through onnxruntime."""
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(f'onnx: checking an export needs onnxruntime (pip install onnxruntime) ({e}).') from e
  session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
  name = session.get_inputs()[0].name
  return lambda images: session.run(None, {name: np.asarray(images)})[0]


EXPORTERS = {'stablehlo': export_stablehlo, 'savedmodel': export_savedmodel, 'onnx': export_onnx}
LOADERS = {'stablehlo': load_stablehlo, 'savedmodel': load_savedmodel, 'onnx': load_onnx}


def export(model: Any, variables: Any, image_size: int, path: str, fmt: str, *, uint8: bool = False,
           class_names: Optional[Sequence[str]] = None) -> str:
  """Exports in format `fmt` (FORMATS) to `path` and writes `export_info.json` beside it (its input contract)."""
  if fmt not in EXPORTERS:
    raise ValueError(f'Unknown export format {fmt!r}; expected one of {FORMATS}.')
  out = EXPORTERS[fmt](model, variables, image_size, path, uint8=uint8)
  info_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  info = {'format': fmt, 'file': os.path.basename(os.path.normpath(path)), 'image_size': image_size,
          'input': 'uint8 NHWC in [0, 255]' if uint8 else 'float32 NHWC in [0, 1]',
          'output': 'float32 logits (batch, classes)', 'class_names': list(class_names) if class_names else None}
  with open(os.path.join(info_dir, INFO_FILENAME), 'w') as f:
    json.dump(info, f, indent=2)
  return out


def define_flags() -> None:
  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  predict.define_flags()
  flags.DEFINE_enum('format', None, list(FORMATS), 'Export format.')
  flags.DEFINE_string('out', None, 'Output file (stablehlo, onnx) or directory (savedmodel).')
  flags.DEFINE_bool('uint8', False, 'Take uint8 images in [0, 255] instead of float32 in [0, 1].')


def main(argv: Sequence[str]) -> None:
  from vit_jax import console, predict  # pylint: disable=g-import-not-at-top
  console.configure_logging(FLAGS.verbosity)
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.format or not FLAGS.out:
    raise app.UsageError('Give --format (stablehlo, savedmodel or onnx) and --out PATH.')
  loaded = predict.load_from_flags()
  size = loaded.dataset_config.image_size
  try:
    path = export(loaded.model, loaded.variables, size, FLAGS.out, FLAGS.format, uint8=FLAGS.uint8,
                  class_names=loaded.class_names)
  except ExportError as e:
    raise app.UsageError(str(e)) from None
  print(f'Exported {loaded.source} as {FLAGS.format} to {path} (input: {size}x{size}x3 '
        f'{"uint8 [0, 255]" if FLAGS.uint8 else "float32 [0, 1]"}).', flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
