"""Weights-only loading of mmengine runner checkpoints on torch >= 2.6.

mmengine 0.10.7 calls ``torch.load(filename)`` without ``weights_only``; since torch 2.6 that
means ``weights_only=True``, and a full runner checkpoint (optimizer, schedulers, the message
hub's ``HistoryBuffer`` logs with numpy arrays) fails to load, so ``--resume`` breaks. This
module allowlists exactly the types such checkpoints hold and replaces mmengine's local-file
loader with one that always loads weights-only and explains a refusal. Nothing here ever
unpickles arbitrary code: a checkpoint that names any other callable is refused.
"""
import os.path as osp
import pickle

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = ['UnsafeCheckpointError', 'load_weights_only', 'register_safe_globals']


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asks to build an object that weights-only loading does not allow."""


def _history_buffer_attribute(owner, name):
    """Stand-in for ``builtins.getattr`` while unpickling.

    Pickle stores ``HistoryBuffer``'s statistics methods (``HistoryBuffer.min`` ...) as
    ``getattr(HistoryBuffer, 'min')``; only that exact form is allowed, not ``getattr`` at large.
    """
    HistoryBuffer()  # __init__ registers min/max/current/mean; a fresh process has none yet
    if owner is HistoryBuffer and callable(HistoryBuffer._statistics_methods.get(name)):
        return HistoryBuffer._statistics_methods[name]
    raise UnsafeCheckpointError(
        f'checkpoint asks for getattr({owner!r}, {name!r}); only HistoryBuffer statistics '
        f'methods ({sorted(HistoryBuffer._statistics_methods)}) are allowed')


def _numpy_safe_globals():
    """numpy's array/scalar reconstructors under both the numpy 1.x and 2.x module paths."""
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    found = [np.ndarray, np.dtype]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        found += [(multiarray._reconstruct, f'{module}._reconstruct'),
                  (multiarray.scalar, f'{module}.scalar')]
    # numpy 2 pickles dtypes of arrays as instances of these classes
    found += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith('DType')]
    return found


def register_safe_globals():
    """Allowlist the types mmengine runner checkpoints hold (idempotent)."""
    torch.serialization.add_safe_globals(
        [HistoryBuffer, (_history_buffer_attribute, 'builtins.getattr')] + _numpy_safe_globals())


def load_weights_only(filename, map_location=None):
    """``torch.load(filename, weights_only=True)`` with an explicit refusal message.

    Returns the checkpoint object; raises ``UnsafeCheckpointError`` when the file asks to build
    anything outside tensors, containers, numpy arrays and mmengine's ``HistoryBuffer``.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint file {filename!r} does not exist')
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f'refusing to load {filename!r}: it is not a weights-only checkpoint '
            f'({_unpickling_reason(err)}). dsa-backbones never unpickles arbitrary code. If you '
            'trust this file, convert it once yourself: '
            'torch.save(torch.load(path, weights_only=False)["state_dict"], new_path).') from err


def _unpickling_reason(err):
    """The line of torch's error that names the refused global, without its advice to retry."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if not line.startswith('Check the doc')),
                  str(err))
    return reason.replace('WeightsUnpickler error: ', '').split(' Please use')[0]


register_safe_globals()
CheckpointLoader.register_scheme(prefixes='', loader=load_weights_only, force=True)
