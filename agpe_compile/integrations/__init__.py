"""Integrations with training frameworks; each imports its framework only when used.

``import agpe_compile`` never imports them. Hugging Face ``Trainer`` (hf.py)::

    >>> from agpe_compile.integrations import AGPETrainer      # imports transformers here
    >>> trainer = AGPETrainer(model=model, args=args, train_dataset=ds,
    ...                       agpe_config=agpe_compile.AGPEConfig(target_sparsity=0.9, end_step=750))
"""

_HF_NAMES = ("AGPETrainer", "SPARSIFIER_NAME")


def __getattr__(name):
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_HF_NAMES)
