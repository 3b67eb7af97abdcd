"""bifocal: pretraining GPT-style models with bifocal attention on DeepSpeed.

The subpackages live in the repository's top-level folders (launcher/, model/, data_pipeline/,
eval/, configs/, data/), mapped here by pyproject.toml.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bifocal")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
