"""Instruction counts of the gather-attention kernels' loops, from their SASS, without a GPU.

    python tools/kernel_sass.py --shapes b1024_s2                  # every kernel a fwd+bwd launches
    python tools/kernel_sass.py --shapes t512_s1 --windows --sass-dir sass/   # + the listings

Runs ``ops.gather_attention``'s launchers for a ``tools/bench_ops.py`` shape on meta tensors,
records each kernel launch instead of running it, and compiles that launch with Triton for an
sm_90 (Hopper) target as Triton would specialize it on a GPU (16-byte-aligned tensors; ints
equal to 1 as constants, ints divisible by 16 marked so). Then it prints, per kernel, the
instructions of each loop of the SASS (a backward branch and its target) and the loop's most
frequent opcodes, and its registers, shared memory and the programs an SM holds at once. A
kernel bound by instruction issue runs about as fast as its main loop is short; one bound by
latency, about as fast as many programs stay resident; docs/ops.md uses these counts
("Kernels").

Needs Triton's bundled ptxas and nvdisasm (Linux); not the Triton interpreter.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if os.environ.get('TRITON_INTERPRET') == '1':
    sys.exit('kernel_sass.py compiles kernels: unset TRITON_INTERPRET')

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.tools import disasm  # noqa: E402

# Triton before 3.7 matches 4-hex-digit instruction offsets only when it extracts SASS, so its
# listings stop at 4096 instructions (offset 0x10000): widen the pattern as later Triton does.
disasm.FLINE_RE = re.compile(disasm.FLINE_RE.pattern.replace(r'\*\w{4}\*', r'\*\w{4,}\*'))

from ops import _triton_gather_attention as kernels  # noqa: E402
from ops import _triton_map_attention as whole_map  # noqa: E402
from ops import _triton_single_block as single_block  # noqa: E402
from bench_ops import SHAPES_BY_NAME, map_windows  # noqa: E402
from bench_timing import DTYPES  # noqa: E402

TRITON_TYPES = {torch.bfloat16: 'bf16', torch.float16: 'fp16', torch.float32: 'fp32',
                torch.int64: 'i64', torch.int32: 'i32', torch.uint8: 'u8', torch.bool: 'u8'}
OPTIONS = ('num_warps', 'num_stages', 'maxnreg')


class RecordedLaunch:
    """Stands in for ``fast_launcher(kernel)``: ``[grid](*args, **kwargs)`` appends (kernel,
    args, kwargs) to ``log`` and runs nothing."""

    def __init__(self, kernel, log: list):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.kernel, args, kwargs))


def record_launches(shape, dtype=torch.bfloat16, windows=False) -> list:
    """(kernel, args, kwargs) of every launch of one forward and backward of ``shape`` (a
    ``bench_ops.Shape``), on meta tensors."""
    num_q, num_k = shape.groups * shape.block_q, shape.blocks * shape.block_k

    def empty(n):
        return torch.empty(shape.batch, shape.heads, n, shape.head_dim, dtype=dtype,
                           device='meta')
    q, k, v, grad_out = empty(num_q), empty(num_k), empty(num_k), empty(num_q)
    index = torch.empty(shape.batch, shape.groups, shape.topk, dtype=torch.int64, device='meta')
    mask = (torch.empty(shape.batch, num_k, dtype=torch.bool, device='meta')
            if shape.padded_fraction else None)
    block_q, block_k, layout = shape.block_q, shape.block_k, None
    if windows:
        found = map_windows(shape)
        if found is None:
            raise ValueError(f'shape {shape.name} has no window layout')
        (_, width), map_width = found
        layout = (width, width, map_width)
    scale = shape.head_dim ** -0.5
    log = []
    modules = (kernels, whole_map, single_block)
    saved = [module.fast_launcher for module in modules]
    for module in modules:
        module.fast_launcher = lambda kernel: RecordedLaunch(kernel, log)
    try:
        out, lse = kernels.forward(q, k, v, index, mask, block_q, block_k, scale, layout=layout)
        kernels.backward(grad_out, q, k, v, out, lse, index, mask, block_q, block_k, scale,
                         layout=layout)
    finally:
        for module, launcher in zip(modules, saved):
            module.fast_launcher = launcher
    return log


def _signature(kernel, args, kwargs):
    """(signature, constexprs, attrs) of ``triton.compile`` for one recorded launch, as
    Triton's launcher would specialize it."""
    positional = [name for name in kernel.arg_names if name not in kwargs]
    signature, constexprs, attrs = {}, {}, {}
    for name, value in zip(positional, args):
        i = kernel.arg_names.index(name)
        if isinstance(value, torch.Tensor):
            signature[name] = '*' + TRITON_TYPES[value.dtype]
            attrs[(i,)] = [['tt.divisibility', 16]]
        elif isinstance(value, bool):
            signature[name] = 'i1'
        elif isinstance(value, int):
            if value == 1:
                signature[name] = 'constexpr'
                constexprs[(i,)] = 1
                continue
            signature[name] = 'i32' if -2 ** 31 <= value < 2 ** 31 else 'i64'
            if value % 16 == 0:
                attrs[(i,)] = [['tt.divisibility', 16]]
        elif isinstance(value, float):
            signature[name] = 'fp32'
        else:
            raise TypeError(f'{name}: {type(value).__name__}')
    for name, value in kwargs.items():
        if name not in OPTIONS:
            signature[name] = 'constexpr'
            constexprs[(kernel.arg_names.index(name),)] = value
    return {name: signature[name] for name in kernel.arg_names}, constexprs, attrs


def compile_launch(kernel, args, kwargs, arch: int = 90):
    """One recorded launch compiled for ``sm_{arch}`` (a Triton CompiledKernel)."""
    signature, constexprs, attrs = _signature(kernel, args, kwargs)
    options = {name: kwargs[name] for name in OPTIONS if kwargs.get(name) is not None}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                       attrs=attrs)
    return triton.compile(source, target=GPUTarget('cuda', arch, 32), options=options)


def compile_sass(kernel, args, kwargs, arch: int = 90) -> str:
    """The SASS of one recorded launch compiled for ``sm_{arch}``."""
    return compile_launch(kernel, args, kwargs, arch).asm['sass']


# Hopper (sm_90) per SM: registers, shared memory (bytes; each program also takes 1 KiB that
# the driver reserves), resident warps and programs.
SM_REGISTERS, SM_SHARED, SM_WARPS, SM_PROGRAMS = 65536, 228 * 1024, 64, 32


def registers_per_thread(cubin: bytes) -> int:
    """The kernel's registers per thread, read from its cubin with Triton's bundled
    cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'kernel.cubin')
        with open(path, 'wb') as f:
            f.write(cubin)
        usage = subprocess.run([os.path.join(os.path.dirname(triton.__file__), 'backends',
                                             'nvidia', 'bin', 'cuobjdump'), '-res-usage', path],
                               capture_output=True, text=True, check=True).stdout
    return int(re.search(r'REG:(\d+)', usage).group(1))


def resident_programs(registers: int, shared: int, num_warps: int) -> int:
    """Programs of one kernel an sm_90 SM holds at once: the least of what its registers
    (allocated per warp in units of 256, i.e. per-thread counts rounded up to 8), shared
    memory, warp slots and program slots allow. A latency-bound kernel hides latency with
    these; a grid of more programs than SMs times this runs in waves."""
    per_warp = -(-registers // 8) * 8 * 32
    return min(SM_REGISTERS // (per_warp * num_warps), SM_SHARED // (shared + 1024),
               SM_WARPS // num_warps, SM_PROGRAMS)


def _opcode(line: str) -> str:
    """The opcode of one SASS instruction line: predicate and modifiers dropped, except that
    an I2F rounding up (``I2F.RP``, ``I2F.U32.RP``, ``I2F.U64.RP``: the reciprocal step of an
    integer division by a value unknown at compile time) reads ``I2F.RP``; other I2F forms are
    conversions."""
    words = line.split('\t', 1)[1].split()
    word = words[1] if words[0].startswith('@') else words[0]
    parts = word.rstrip(';').split('.')
    return 'I2F.RP' if parts[0] == 'I2F' and 'RP' in parts[1:] else parts[0]


def loops(sass: str) -> List[Tuple[int, collections.Counter]]:
    """Each loop of a SASS listing (a branch back to a label above it): its instruction count
    and opcode histogram, in listing order (see :func:`_opcode`)."""
    lines = sass.splitlines()
    labels: Dict[str, int] = {}
    found = []
    for number, line in enumerate(lines):
        label = re.match(r'^\s*(\.?L\w+):', line)
        if label:
            labels[label.group(1)] = number
            continue
        branch = re.search(r'\t(?:@!?U?P\w+\s+)?BRA\s+(\.?L\w+)', line)
        if branch and branch.group(1) in labels and labels[branch.group(1)] < number:
            body = [body_line for body_line in lines[labels[branch.group(1)] + 1:number + 1]
                    if '\t' in body_line]
            if len(body) > 1:  # not the kernel's closing branch to itself
                found.append((len(body), collections.Counter(_opcode(b) for b in body)))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--shapes', nargs='+', default=['b1024_s2'], choices=list(SHAPES_BY_NAME))
    parser.add_argument('--dtype', default='bf16', choices=('bf16', 'fp16', 'fp32'))
    parser.add_argument('--windows', action='store_true',
                        help="the window layout BiFormer calls (bench_ops' ours_map)")
    parser.add_argument('--arch', type=int, default=90, help='compute capability, e.g. 90')
    parser.add_argument('--sass-dir', help='also write each listing here')
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    for name in args.shapes:
        print(f'### {name}{" (window layout)" if args.windows else ""}, {args.dtype}, '
              f'sm_{args.arch}')
        for kernel, launch_args, kwargs in record_launches(SHAPES_BY_NAME[name], dtype,
                                                           args.windows):
            compiled = compile_launch(kernel, launch_args, kwargs, args.arch)
            sass = compiled.asm['sass']
            total = sum('\t' in line for line in sass.splitlines())
            meta = ', '.join(f'{key}={value}' for key, value in kwargs.items()
                             if key not in ('DOT_PRECISION',))
            spills = sum(_opcode(line) in ('STL', 'LDL') for line in sass.splitlines()
                         if '\t' in line)
            registers = registers_per_thread(compiled.asm['cubin'])
            shared = compiled.metadata.shared
            resident = (f', {resident_programs(registers, shared, kwargs["num_warps"])} '
                        f'programs resident an SM' if args.arch == 90 else '')
            print(f'{kernel.__name__}: {total} instructions, {spills} local-memory (spill) '
                  f'loads and stores; {registers} registers a thread, {shared} bytes of shared '
                  f'memory{resident}; {meta}')
            for size, opcodes in loops(sass):
                common = ', '.join(f'{op} {count}' for op, count in opcodes.most_common(6))
                print(f'  loop: {size} instructions ({common})')
            if args.sass_dir:
                os.makedirs(args.sass_dir, exist_ok=True)
                with open(os.path.join(args.sass_dir, f'{name}_{kernel.__name__}.sass'),
                          'w') as f:
                    f.write(sass)


if __name__ == '__main__':
    main()
