"""bifocal.core: what every layer shares and nothing project-specific. Torch-free; imports no
other part of the project (see tests/test_architecture.py for the import direction)."""
