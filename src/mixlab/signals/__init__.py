"""What mixers observe beyond losses: the alignment engine (``mixlab.signals.alignment``).

The lazily computed per-step signals object the trainer hands to mixers lives in
``mixlab.train.signals``; this package holds the model-side math it uses.
"""

from mixlab.signals.alignment import (
    METHODS,
    Direction,
    SampleAlignments,
    adam_denominator,
    alignments_backward,
    alignments_fd,
    alignments_jvp,
    dot,
    fd_step,
    flat_grad,
    flatten,
    gaussian_direction,
    group_alignments_backward,
    group_mean,
    group_sums,
    loss_gradient,
    norm,
    per_sample_alignments,
    precondition,
    stratified_counts,
    trainable_parameters,
    unwrap,
)

__all__ = [
    "METHODS",
    "Direction",
    "SampleAlignments",
    "adam_denominator",
    "alignments_backward",
    "alignments_fd",
    "alignments_jvp",
    "dot",
    "fd_step",
    "flat_grad",
    "flatten",
    "gaussian_direction",
    "group_alignments_backward",
    "group_mean",
    "group_sums",
    "loss_gradient",
    "norm",
    "per_sample_alignments",
    "precondition",
    "stratified_counts",
    "trainable_parameters",
    "unwrap",
]
