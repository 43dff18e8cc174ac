"""vit_jax: Vision Transformers and hierarchical variants in JAX/Flax."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent
_REQUIREMENTS = [line.strip() for line in (_HERE / 'requirements.txt').read_text().splitlines()
                 if line.strip() and not line.startswith('#')]

setuptools.setup(
    name='vit_jax',
    version='0.1.0',
    description='Vision Transformers and their hierarchical variants in JAX/Flax.',
    long_description=(_HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['vit_jax', 'vit_jax.*']),
    python_requires='>=3.10',
    install_requires=_REQUIREMENTS,
)
