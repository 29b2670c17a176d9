"""Backbone throughput and peak memory, side by side: our BiFormer (``ops.gather_attention``),
the same models on the official gather formulation, and timm peers.

    python tools/benchmark.py models                  # the full table on CUDA (bf16 autocast)
    python tools/benchmark.py models --models biformer_small swin_tiny_patch4_window7_224 \\
        --settings cls --iters 20
    python tools/benchmark.py models --profile biformer_small   # + top CUDA ops of training
    python tools/benchmark.py models --cuda-graph      # replayed CUDA graphs: no host overhead
    python tools/benchmark.py models --census biformer_small swin_tiny_patch4_window7_224
                                 # + ops, kernels, host and GPU time of one training step

A model is a timm name; ``NAME:gather`` runs a BiFormer on the official formulation
(``attn_impl='gather'``), ``NAME:module`` with ``fused_block=False`` (one autograd node per
op instead of per block), ``NAME:graphs`` with ``graph_blocks=True`` (the eager loop, each
block replayed from CUDA graphs). Two settings: ``cls`` (classifier, 224 px, batch 128) and ``dense``
(``features_only=True`` at 1024 px, batch 8; BiFormer with ``n_win=16`` as the official
detection configs). Each cell times inference (``inference_mode``) and a training step
(forward, backward, AdamW step, ``fused=True`` on CUDA) under autocast, after warm-up, with
CUDA events; peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps, and for
training also ``max_memory_reserved`` (which counts what CUDA graphs' pools hold).

Eager timings include the host's kernel-launch overhead, which bounds a model of many small
kernels (BiFormer: 30 blocks) on a slow host CPU; ``--cuda-graph`` replays the captured
inference call and training step instead, which measures what the GPU itself sustains.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from typing import Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timm  # noqa: E402

import backbones  # noqa: E402,F401  (registers the BiFormer timm models)

DEFAULT_MODELS = (
    'biformer_tiny', 'biformer_small', 'biformer_base',
    'biformer_tiny:gather', 'biformer_small:gather', 'biformer_base:gather',
    'swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224', 'convnext_tiny',
)
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog='benchmark.py models', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS),
                        help='timm names; for a BiFormer NAME:gather (official formulation), '
                             'NAME:module (fused_block=False), NAME:graphs (graph_blocks=True)')
    parser.add_argument('--settings', nargs='+', choices=('cls', 'dense'),
                        default=['cls', 'dense'])
    parser.add_argument('--batch', type=int, default=128, help='cls batch size')
    parser.add_argument('--img', type=int, default=224, help='cls image size')
    parser.add_argument('--dense-batch', type=int, default=8)
    parser.add_argument('--dense-img', type=int, default=1024)
    parser.add_argument('--dense-n-win', type=int, default=16, help='BiFormer n_win (dense)')
    parser.add_argument('--dtype', choices=tuple(DTYPES), default='bf16',
                        help='autocast dtype (fp32: no autocast)')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--no-train', action='store_true', help='inference only')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--compile', nargs='?', const='default', default=None, metavar='MODE',
                        choices=('default', 'reduce-overhead', 'max-autotune',
                                 'max-autotune-no-cudagraphs'),
                        help="torch.compile every model, in MODE (default: 'default'; "
                             "reduce-overhead replays Inductor's CUDA graphs)")
    parser.add_argument('--cuda-graph', action='store_true',
                        help='time CUDA-graph replays of the inference call and of the whole '
                             'training step (no host launch overhead: what the GPU sustains)')
    parser.add_argument('--profile', default=None, metavar='MODEL',
                        help='also profile training steps of MODEL in each of --settings, '
                             'top ops')
    parser.add_argument('--census', nargs='+', default=(), metavar='MODEL',
                        help='also count, per eager training step of each MODEL in each of '
                             '--settings, the aten ops and kernels, and time the host and '
                             'the GPU')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', default=None, help='write results as JSON here')
    return parser.parse_args(argv)


MODEL_VARIANTS = {'gather': dict(attn_impl='gather'), 'module': dict(fused_block=False),
                  'graphs': dict(graph_blocks=True)}


def build_model(spec: str, setting: str, args) -> torch.nn.Module:
    """timm model for ``spec`` in ``setting``: ``NAME``, or for a BiFormer ``NAME:gather`` (the
    official formulation), ``NAME:module`` (``fused_block=False``) or ``NAME:graphs``
    (``graph_blocks=True``: eager loop, blocks replayed from CUDA graphs)."""
    name, _, impl = spec.partition(':')
    kwargs = {}
    if impl:
        if impl not in MODEL_VARIANTS or not name.startswith('biformer'):
            raise ValueError(f'model spec {spec!r}: only biformer_*:' + ', biformer_*:'.join(
                MODEL_VARIANTS) + ' are understood')
        kwargs.update(MODEL_VARIANTS[impl])
    if setting == 'dense':
        kwargs['features_only'] = True
        if name.startswith('biformer'):
            kwargs['n_win'] = args.dense_n_win
        elif name.startswith('swin'):
            kwargs['img_size'] = args.dense_img
    elif name.startswith('swin') and args is not None and args.img != 224:
        kwargs['img_size'] = args.img  # timm's Swin checks the input size
    return timm.create_model(name, **kwargs)


class Timer:
    """Wall time of device work between start() and stop() (CUDA events, or a host clock)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'

    def start(self):
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> float:
        """Seconds since start()."""
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            return self.begin.elapsed_time(self.end) / 1e3
        return time.perf_counter() - self.begin


def _loss(output) -> torch.Tensor:
    if isinstance(output, (list, tuple)):  # feature pyramid
        return sum(o.float().square().mean() for o in output)
    return output.float().square().mean()


def _peak_bytes(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else 0


def _peak_reserved_bytes(device) -> int:
    """The caching allocator's peak reserve: unlike the allocated peak, it counts the memory
    CUDA graphs' pools keep for their temporaries."""
    return torch.cuda.max_memory_reserved(device) if device.type == 'cuda' else 0


def _reset_peak(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _graph_replay(fn, warmup_fn, warmup: int, before_capture=None):
    """Run ``warmup_fn`` ``warmup`` times on a side stream, then ``before_capture``, then
    capture one call of ``fn`` in a CUDA graph; return its replay (the documented
    whole-network capture: inputs and parameters are static)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            warmup_fn()
    torch.cuda.current_stream().wait_stream(stream)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(model: torch.nn.Module, batch: int, img: int, args) -> Dict:
    """img/s and peak memory (GB) of inference and of a training step."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    graphed = args.cuda_graph
    if graphed and (device.type != 'cuda' or args.compile):
        raise ValueError('--cuda-graph needs a CUDA device and excludes --compile')
    # Graph capture needs autocast's weight-cast cache off (the casts are then captured).
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32,
                    cache_enabled=not graphed)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    runner = model
    if args.compile:
        runner = torch.compile(model, mode=None if args.compile == 'default' else args.compile)
    x = torch.randn(batch, 3, img, img, device=device).to(memory_format=memory_format)
    timer, result = Timer(device), {}

    def throughput(fn):
        """(img/s, peak GB, peak reserved GB) of ``fn`` after warm-up. Graphed, the peak was
        reset before the capture, so it covers warm-up and capture (replays allocate nothing
        more)."""
        for _ in range(args.warmup):
            fn()
        if not graphed:
            _reset_peak(device)
        timer.start()
        for _ in range(args.iters):
            fn()
        return (batch * args.iters / timer.stop(), _peak_bytes(device) / 1e9,
                _peak_reserved_bytes(device) / 1e9)

    def infer():
        with torch.inference_mode(), torch.autocast(**autocast):
            runner(x)

    model.eval()
    if graphed:
        _reset_peak(device)
        infer = _graph_replay(infer, infer, args.warmup)
    result['infer_img_s'], result['infer_peak_gb'], _ = throughput(infer)
    if args.no_train:
        return result

    model.train()
    fused_adamw = device.type == 'cuda'  # one kernel per step on CUDA, for every model alike
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=graphed,
                                  fused=fused_adamw)

    def step():
        with torch.autocast(**autocast):
            loss = _loss(runner(x))
        loss.backward()
        optimizer.step()

    def eager_step():
        optimizer.zero_grad(set_to_none=True)
        step()

    train_step = eager_step
    if graphed:  # gradients are None at capture, so each replay writes them afresh
        _reset_peak(device)
        train_step = _graph_replay(step, eager_step, args.warmup,
                                   before_capture=lambda: optimizer.zero_grad(set_to_none=True))
    result['train_img_s'], result['train_peak_gb'], result['train_reserved_gb'] = throughput(
        train_step)
    return result


def setting_shape(setting: str, args):
    """(batch, image size) of ``setting`` ('cls' or 'dense')."""
    return {'cls': (args.batch, args.img), 'dense': (args.dense_batch, args.dense_img)}[setting]


def eager_training_step(spec: str, setting: str, args):
    """An eager training step of ``spec`` in ``setting`` (AdamW, autocast), warmed up."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build_model(spec, setting, args).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == 'cuda')
    batch, img = setting_shape(setting, args)
    x = torch.randn(batch, 3, img, img, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=dtype,
                            enabled=dtype != torch.float32):
            loss = _loss(model(x))
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    return step


def _activities(device: torch.device):
    from torch.profiler import ProfilerActivity
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])


def profile_training(spec: str, setting: str, args, steps: int = 3, rows: int = 45) -> str:
    """Table of the CUDA (or CPU) ops of ``steps`` training steps in ``setting``, by self
    device time."""
    from torch.profiler import profile

    device = torch.device(args.device)
    step = eager_training_step(spec, setting, args)
    with profile(activities=_activities(device)) as prof:
        for _ in range(steps):
            step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
    sort_by = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (those inside a custom op not included)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def step_census(spec: str, setting: str, args, steps: int = 5) -> Dict:
    """What one eager training step of ``spec`` in ``setting`` costs: aten ops dispatched;
    on CUDA, kernels launched and their summed GPU time (profiler); the host's time to issue
    one step from an idle device (``host_ms``); the wall time per step in a loop
    (``wall_ms``). A step whose ``host_ms`` exceeds its ``gpu_ms`` is bound by the host."""
    from torch.profiler import DeviceType, profile

    device = torch.device(args.device)
    step = eager_training_step(spec, setting, args)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    wall_ms = 1e3 * (time.perf_counter() - start) / steps
    start = time.perf_counter()
    step()
    host_ms = 1e3 * (time.perf_counter() - start)
    _sync(device)
    counter = _OpCounter()
    with counter:
        step()
    batch, img = setting_shape(setting, args)
    row = dict(setting=f'{setting} {img}px b{batch}', model=spec, aten_ops=counter.count, host_ms=host_ms, wall_ms=wall_ms,
               kernels=None, gpu_ms=None)
    if device.type == 'cuda':
        with profile(activities=_activities(device)) as prof:
            step()
            _sync(device)
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        row.update(kernels=len(kernels),
                   gpu_ms=sum(e.device_time for e in kernels if 'Memcpy' not in e.name) / 1e3)
    return row


def format_census(rows: List[Dict]) -> str:
    lines = ['| setting | model | aten ops / step | kernels / step | host issue ms | wall ms / step | '
             'GPU kernel ms / step |', '|---|---|---:|---:|---:|---:|---:|']
    for row in rows:
        def cell(key, fmt):
            return '-' if row[key] is None else fmt.format(row[key])
        lines.append(f"| {row['setting']} | {row['model']} | {row['aten_ops']} | {cell('kernels', '{}')} | "
                     f"{row['host_ms']:.1f} | {row['wall_ms']:.1f} | {cell('gpu_ms', '{:.1f}')} |")
    return '\n'.join(lines)


def environment(args) -> Dict:
    import triton
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
               torch=torch.__version__, triton=triton.__version__, timm=timm.__version__,
               python=platform.python_version(), device=args.device, dtype=args.dtype,
               command='python tools/benchmark.py models ' + ' '.join(sys.argv[2:]))
    if args.device.startswith('cuda'):
        env['gpu'] = torch.cuda.get_device_name()
    return env


def format_table(rows: List[Dict]) -> str:
    header = ('| setting | model | infer img/s | infer peak GB | train img/s | train peak GB '
              '| train reserved GB |\n|---|---|---:|---:|---:|---:|---:|')
    lines = [header]
    for row in rows:
        def cell(key, fmt):
            return fmt.format(row[key]) if isinstance(row.get(key), float) else row.get(
                key, row.get('error', '-'))
        lines.append(f"| {row['setting']} | {row['model']} | {cell('infer_img_s', '{:.0f}')} | "
                     f"{cell('infer_peak_gb', '{:.2f}')} | {cell('train_img_s', '{:.0f}')} | "
                     f"{cell('train_peak_gb', '{:.2f}')} | {cell('train_reserved_gb', '{:.2f}')} |")
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    env = environment(args)
    print(json.dumps(env), flush=True)
    rows = []
    for setting in args.settings:
        batch, img = setting_shape(setting, args)
        for spec in args.models:
            row = dict(setting=f'{setting} {img}px b{batch}', model=spec)
            try:
                row.update(measure(build_model(spec, setting, args), batch, img, args))
            except torch.cuda.OutOfMemoryError:
                row['error'] = 'OOM'
            except Exception as err:  # keep the other rows of a long run; the row says why
                row['error'] = f'{type(err).__name__}: {err}'.replace('|', '/')[:160]
            if args.device.startswith('cuda'):  # the next row's reserve starts from nothing
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
    table = format_table(rows)
    report = dict(environment=env, results=rows)
    if args.profile:
        report['profile'] = {}
        for setting in args.settings:
            batch, img = setting_shape(setting, args)
            report['profile'][setting] = profile_training(args.profile, setting, args)
            print(f'\nTraining-step profile of {args.profile} ({setting}, {batch}x{img}px):')
            print(report['profile'][setting])
    if args.census:
        report['census'] = [step_census(spec, setting, args)
                            for setting in args.settings for spec in args.census]
        print(f'\nOne eager training step per row ({args.dtype}):')
        print(format_census(report['census']))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=1)
    print(table)
    return rows
