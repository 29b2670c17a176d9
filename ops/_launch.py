"""Eager Triton launches without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` costs the host about 26 µs per launch on the H200's
host, of which about 8 µs is Triton's C launcher (docs/benchmarks.md, models run 5); the rest
is Python: binding and specializing every argument, the cache key, knob lookups. Eager
BiFormer-S issues 146 Triton launches per inference step and 400 per training step, and eager
BiFormer is bound by the host.

``fast_launcher(kernel)[grid](*args, **constexprs)`` launches the same compiled kernel with the
same arguments. Its cache key holds at least what Triton specializes a kernel on (per tensor:
dtype and 16-byte alignment; ints by value; the type of any other argument; the constexpr and
option values; the device), so two calls with one key share Triton's compiled kernel. A miss
launches through ``kernel[grid]`` and remembers the compiled kernel it returns; a hit calls
that kernel's C launcher with the arguments in signature order. Measured on an H200
(docs/benchmarks.md, models run 13): eager BiFormer-S +50% inference, +18% training on average.

Triton's own path is taken, per call, when any of these holds: the kernel is not a compiled
``JITFunction`` (``TRITON_INTERPRET=1``), launch hooks or pre-run hooks are set (profilers),
an argument is not a tensor, int, float, bool or None, the grid is not a tuple, Triton is older
than 3.4 (no ``triton.knobs``), or ``DSA_OPS_FAST_LAUNCH=0`` is set in the environment (read
at import; ``ENABLED`` at run time).
What it skips: Triton's check that a kernel's global variables kept their values (ops' kernels
read no mutable globals) and its re-reading of debug knobs per launch (set them before the
first launch).
"""
import functools
import inspect
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import JITFunction

try:
    from triton import knobs
except ImportError:  # Triton < 3.4
    knobs = None
try:
    from triton.runtime.errors import PTXASError
except ImportError:  # Triton < 3.2
    PTXASError = OutOfResources

ENABLED = os.environ.get('DSA_OPS_FAST_LAUNCH', '1') != '0' and knobs is not None

_MAX_ENTRIES = 4096  # per kernel; dropped all at once when full (shapes of a dynamic workload)


def _arg_key(arg):
    """What Triton's specialization depends on for one non-int, non-constexpr argument (ints
    go into the key by value); raises TypeError for kinds this module does not key (the
    caller then takes Triton's path)."""
    if isinstance(arg, Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    kind = type(arg)
    if kind is float or kind is bool or arg is None:
        return kind
    raise TypeError(kind)


def _hooks_active(hook) -> bool:
    """A launch hook that does something: set (Triton 3.6) or a non-empty ``HookChain``."""
    return hook is not None and bool(getattr(hook, 'calls', True))


class _FastLauncher:
    """``launcher[grid](*args, **constexprs)``: see the module docstring."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.params = kernel.params if isinstance(kernel, JITFunction) else None
        # key -> (compiled kernel, constexpr values in signature order after the positionals)
        self.compiled: Dict[tuple, Tuple[object, tuple]] = {}

    def __getitem__(self, grid) -> Callable:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _triton_path(self) -> bool:
        return (not ENABLED or self.params is None
                or _hooks_active(knobs.runtime.launch_enter_hook)
                or _hooks_active(knobs.runtime.launch_exit_hook)
                or bool(getattr(self.kernel, 'pre_run_hooks', ())))

    def launch(self, grid, args: tuple, kwargs: dict):
        if type(grid) is not tuple or self._triton_path():
            return self.kernel[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        try:
            key = (device, tuple([a if type(a) is int else _arg_key(a) for a in args]),
                   tuple(kwargs.items()))
            entry = self.compiled.get(key)
        except TypeError:  # an argument of another kind, or an unhashable constexpr
            return self.kernel[grid](*args, **kwargs)
        if entry is None:
            return self._launch_and_remember(key, grid, args, kwargs)
        compiled, tail = entry
        stream = torch._C._cuda_getCurrentRawStream(device)
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *tail)
        return compiled

    def _launch_and_remember(self, key, grid, args, kwargs):
        compiled = self.kernel[grid](*args, **kwargs)
        given, rest = self.params[:len(args)], self.params[len(args):]
        if (compiled is not None and hasattr(compiled, 'packed_metadata')
                and getattr(compiled, 'function', None) is not None
                and not any(p.is_constexpr for p in given)
                and all(p.is_constexpr for p in rest)
                and all(p.name in kwargs or p.default is not inspect.Parameter.empty
                        for p in rest)):
            if len(self.compiled) >= _MAX_ENTRIES:
                self.compiled.clear()
            self.compiled[key] = (compiled, tuple(kwargs.get(p.name, p.default) for p in rest))
        return compiled


@functools.lru_cache(maxsize=None)
def fast_launcher(kernel) -> _FastLauncher:
    """The launcher of a ``@triton.jit`` kernel (one per kernel object):
    ``fast_launcher(k)[grid](...)`` launches as ``k[grid](...)``."""
    return _FastLauncher(kernel)


def launch_fitting(launch: Callable, fitted: dict, key, table_row: Callable[[], tuple],
                   smaller: Callable[[tuple], Optional[tuple]], what: str,
                   device: torch.device, tune_command: str):
    """``launch(row)`` for a kernel whose tile table was tuned on an H200: with the row remembered
    for ``key`` in ``fitted``, else ``launch(None)`` (the table's row). Where the device cannot
    hold the row (Triton raises ``OutOfResources`` before the kernel runs), ``smaller(row)``
    rows, starting from ``table_row()``, are tried until one launches (a ValueError, not a
    valid tiling, is skipped too); that one is remembered under ``key``, with one warning naming
    ``what`` and ``tune_command``. So is a row that ptxas cannot compile within its register
    cap (``PTXASError``). Returns what ``launch`` returns."""
    remembered = fitted.get(key)
    try:
        return launch(remembered)
    except (OutOfResources, PTXASError) as err:
        failure = err
    first = remembered or table_row()
    tried = first
    while (tried := smaller(tried)) is not None:
        try:
            result = launch(tried)
        except (OutOfResources, PTXASError, ValueError):  # too large still, or not a tiling
            continue
        fitted[key] = tried
        name = torch.cuda.get_device_name(device) if device.type == 'cuda' else str(device)
        warnings.warn(f'{what}: tile config {first} does not fit {name} ({failure}); using '
                      f'{tried}, which is slower than a config tuned for this GPU '
                      f'({tune_command})', stacklevel=4)
        return result
    raise failure
