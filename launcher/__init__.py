"""bifocal.launcher: training (train.py, launch.py), export, and the `bifocal` CLI (cli.py), the
one module that names every command. Imports `run`, `model`, `data_pipeline`, `core`; never `eval`."""
