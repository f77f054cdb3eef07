"""Integrations of mixlab with training loops it does not own.

- ``mixlab.integrations.hf``: any mixlab mixer inside the Hugging Face ``transformers.Trainer``
  (a ``TrainerCallback``, a loss function and a dataset; no Trainer subclass). Needs
  ``pip install 'mixlab[hf]'``; importing this package alone does not import ``transformers``.
"""
