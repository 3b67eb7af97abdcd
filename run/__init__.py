"""bifocal.run: what a run directory holds and how it is read and written: the run config
(`config.py`), DeepSpeed checkpoints (`checkpoint.py`), metrics (`metrics.py`) and the process
group (`distributed.py`). Training (`bifocal.launcher`) writes runs and evaluation
(`bifocal.eval`) reads them; both build on this layer and never import each other."""
