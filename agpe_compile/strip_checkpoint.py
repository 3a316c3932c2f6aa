"""``python -m agpe_compile.strip_checkpoint IN OUT [--key model] [--trusted]``: :func:`agpe_compile.strip_state_dict`
on a checkpoint file, for a run whose model is no longer at hand.

Reads ``IN`` with ``torch.load(weights_only=True)`` on the CPU, folds every agpe layer's
block mask into its weight, drops the agpe entries and writes the plain state dict to
``OUT`` (``--key``: the entry of a whole checkpoint dict that holds the model's state dict;
``--trusted``: ``weights_only=False``, for a file of your own that holds other objects too).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from typing import List, Mapping, Optional

import torch

from .strip import strip_state_dict


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m agpe_compile.strip_checkpoint",
        description="Fold the block masks of a saved agpe model state dict into its weights and drop the agpe "
                    "entries, so it loads with strict=True into the model built without agpe.")
    parser.add_argument("checkpoint", help="torch.save file: a model.state_dict(), or a dict holding one (--key)")
    parser.add_argument("output", help="where to torch.save the plain state dict")
    parser.add_argument("--key", default=None,
                        help="the entry of the checkpoint that holds the model's state dict (e.g. model)")
    parser.add_argument("--trusted", action="store_true",
                        help="the file is yours: load it with torch.load(weights_only=False), which runs any code "
                             "pickled in it (for checkpoints that also hold other Python objects)")
    args = parser.parse_args(argv)
    try:
        checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=not args.trusted)
    except pickle.UnpicklingError as error:  # weights_only refused an object, or not a pickle at all
        hint = "" if args.trusted else (" If it is a checkpoint you made that also holds other Python objects "
                                        "(an argparse.Namespace, numpy state), pass --trusted.")
        parser.error(f"cannot read {args.checkpoint} as a torch checkpoint: {str(error).splitlines()[0].rstrip('.')}.{hint}")
    except Exception as error:  # a missing file, a folder, a file torch.save did not write
        parser.error(f"cannot read {args.checkpoint} as a torch checkpoint: {type(error).__name__}: {error}")
    state_dict = checkpoint
    if args.key is not None:
        if not isinstance(checkpoint, Mapping) or args.key not in checkpoint:
            keys = list(checkpoint)[:10] if isinstance(checkpoint, Mapping) else []
            parser.error(f"{args.checkpoint} has no entry {args.key!r} (its entries: {keys})")
        state_dict = checkpoint[args.key]
    try:
        plain, densities = strip_state_dict(state_dict)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    try:
        torch.save(plain, args.output)
    except (OSError, RuntimeError) as error:
        parser.error(f"cannot write {args.output}: {error}")
    mean = sum(densities.values()) / len(densities)
    print(f"agpe.strip: folded {len(densities)} layer mask(s) (mean density {mean:.3f}) and dropped "
          f"{len(state_dict) - len(plain)} agpe entries; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
