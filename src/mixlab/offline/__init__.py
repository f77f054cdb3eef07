"""Offline mixture search and data selection: what is decided before the real training run.

- ``mixlaw``: the data mixing law (static log-linear law) fitted to a sweep, and its optimum.
- ``regmix``: a regressor from mixture to loss (RegMix-style) and its predicted best mixture.
- ``sweep``: the mixtures of a sweep (simplex grid or Dirichlet around a prior).
- ``dsir``: data selection with importance resampling over hashed n-grams.

Every function here is pure (arrays in, arrays out); the commands ``mixlab sweep`` and
``mixlab select`` do the I/O.
"""
