"""Integrations of mixlab with training loops it does not own.

- ``mixlab.integrations.hf``: any mixlab mixer inside the Hugging Face ``transformers.Trainer``
  (a ``TrainerCallback``, a loss function and a dataset; no Trainer subclass). Needs
  ``pip install 'mixlab[hf]'``; importing this package alone does not import ``transformers``.
- ``mixlab.integrations.lightning``: a PyTorch Lightning ``Callback`` and data module driving
  the same session from a ``LightningModule`` (``pip install 'mixlab[lightning]'``).
- ``mixlab.integrations.torch_data``: the session as an ``IterableDataset`` whose state
  torchdata's ``StatefulDataLoader`` checkpoints (``pip install 'mixlab[torchdata]'``).
See docs/hf_trainer.md, docs/lightning.md and docs/torchtitan.md (why no torchtitan adapter).
"""
