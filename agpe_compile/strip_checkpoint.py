"""``python -m agpe_compile.strip_checkpoint IN OUT [--key model] [--trusted]``: :func:`agpe_compile.strip_state_dict`
on a checkpoint file, for a run whose model is no longer at hand.

Reads ``IN`` with ``torch.load(weights_only=True)`` on the CPU, folds every agpe layer's
block mask into its weight, drops the agpe entries and writes the plain state dict to
``OUT`` (``--key``: the entry of a whole checkpoint dict that holds the model's state dict;
``--trusted``: ``weights_only=False``, for a file of your own that holds other objects too).
It refuses to write over its input (the checkpoint holds the masks, and often the optimizer
and Sparsifier state, that resuming the run needs), and writes ``OUT`` through a temporary
file in the same folder, so a failed write leaves an existing ``OUT`` as it was.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
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
    if _same_file(args.checkpoint, args.output):
        parser.error(f"the output {args.output} is the input checkpoint {args.checkpoint}, which holds the block "
                     f"masks (and, in a whole checkpoint, the optimizer and Sparsifier state) needed to resume the "
                     f"run; the plain weights written over it would lose them: give another output path")
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
    folder = os.path.dirname(os.path.realpath(args.output))
    if not os.path.isdir(folder):  # before the temporary file's name could stand in the error (re-audit CT)
        parser.error(f"cannot write {args.output}: {folder} is not a folder" if os.path.exists(folder) else
                     f"cannot write {args.output}: the folder {folder} does not exist")
    try:
        _save_atomically(plain, args.output)
    except (OSError, RuntimeError) as error:
        parser.error(f"cannot write {args.output}: {error}")
    mean = sum(densities.values()) / len(densities)
    print(f"agpe.strip: folded {len(densities)} layer mask(s) (mean density {mean:.3f}) and dropped "
          f"{len(state_dict) - len(plain)} agpe entries; wrote {args.output}")
    return 0


def _same_file(checkpoint: str, output: str) -> bool:
    """Whether ``output`` names the file ``checkpoint`` (also through a symlink, a relative
    path or a hard link)."""
    if os.path.realpath(checkpoint) == os.path.realpath(output):
        return True
    try:
        return os.path.samefile(checkpoint, output)
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def _save_atomically(obj, output: str) -> None:
    """``torch.save`` to a temporary file beside ``output``, then rename it over ``output``:
    a failure (a full disk, an interrupt) never leaves a half-written file in its place."""
    target = os.path.realpath(output)  # a symlink as OUT: replace the file it points to, keep the link
    if os.path.exists(target) and not os.path.isfile(target):  # /dev/null, a pipe (a folder: torch says why)
        torch.save(obj, output)
        return
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                                         dir=os.path.dirname(target))
    try:
        os.close(handle)
        torch.save(obj, temporary)
        if os.path.exists(target):  # mkstemp makes it 0600: give it the mode the file it replaces had,
            mode = os.stat(target).st_mode & 0o7777
        else:  # or the one a plain open() would have given it
            umask = os.umask(0o022)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


if __name__ == "__main__":
    sys.exit(main())
