"""CPU smoke runs of benchmark entry points (the figures themselves come from GPU runs)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'tools'))
import benchmark  # noqa: E402


def test_overhead_benchmark_times_every_op_pair(capsys):
    rows = benchmark.main(['overhead', '--device', 'cpu', '--calls', '2'])
    names = [row['op'] for row in rows]
    assert any(name.startswith('layer_norm: ops') for name in names)
    assert all(row['fwd_us'] > 0 for row in rows)
    assert all(row['fwd_bwd_us'] > 0 for row in rows if not row['op'].startswith('region'))
    assert '| op | fwd µs/call | fwd+bwd µs/call |' in capsys.readouterr().out


def test_models_benchmark_rejects_cuda_graph_on_cpu(capsys):
    rows = benchmark.main(['models', '--device', 'cpu', '--settings', 'cls', '--models',
                           'biformer_tiny', '--batch', '1', '--img', '32', '--iters', '1',
                           '--warmup', '0', '--no-train', '--cuda-graph'])
    assert '--cuda-graph needs a CUDA device' in rows[0]['error']



def test_models_benchmark_compile_flag_takes_an_optional_mode():
    import bench_models
    assert bench_models.parse_args([]).compile is None
    assert bench_models.parse_args(['--compile']).compile == 'default'
    assert bench_models.parse_args(['--compile', 'reduce-overhead', '--models', 'x']).compile \
        == 'reduce-overhead'


def test_column_sum_benchmark_times_both_forms(capsys):
    rows = benchmark.main(['colsum', '--device', 'cpu', '--shapes', '64x8', '33x5'])
    assert [(r['rows'], r['chans']) for r in rows] == [(64, 8), (33, 5)]
    assert all(r['sum'] > 0 and r['mv'] > 0 and r['column_sum'] > 0 for r in rows)
    assert '| rows x C | MB | sum(0) µs | mv µs |' in capsys.readouterr().out


def test_models_benchmark_builds_the_biformer_variants():
    import bench_models
    from backbones.biformer import BiFormerBlock
    model = bench_models.build_model('biformer_tiny:module', 'cls', None)
    assert not any(m.fused_block for m in model.modules() if isinstance(m, BiFormerBlock))
    model = bench_models.build_model('biformer_tiny', 'cls', None)
    assert all(m.fused_block for m in model.modules() if isinstance(m, BiFormerBlock))
    assert bench_models.build_model('biformer_tiny:gather', 'cls', None).stages[0].blocks[0].official


def test_models_benchmark_census_counts_a_training_step_per_setting(capsys):
    import bench_models
    args = bench_models.parse_args(['--device', 'cpu', '--batch', '2', '--img', '32',
                                    '--dense-batch', '1', '--dense-img', '64', '--dense-n-win',
                                    '2', '--dtype', 'fp32', '--warmup', '1'])
    rows = [bench_models.step_census('biformer_tiny', setting, args, steps=1)
            for setting in ('cls', 'dense')]
    for row in rows:
        # a forward, a backward and an AdamW step of 30-odd parameterised layers: hundreds of ops
        assert row['aten_ops'] > 300 and row['host_ms'] > 0 and row['wall_ms'] > 0
        assert row['kernels'] is None and row['gpu_ms'] is None  # CPU: no device kernels
    table = bench_models.format_census(rows)
    assert '| cls 32px b2 | biformer_tiny | %d | - |' % rows[0]['aten_ops'] in table
    assert '| dense 64px b1 | biformer_tiny | %d | - |' % rows[1]['aten_ops'] in table
    # the dense model is the feature extractor: no head, so fewer ops than the classifier
    assert rows[1]['aten_ops'] != rows[0]['aten_ops']


def test_dwconv_tuning_chooses_a_row_per_tile_class():
    import bench_dwconv
    fast3, fast5 = bench_dwconv.TUNE_ROWS['fwd'][:2]
    others = bench_dwconv.TUNE_ROWS['fwd'][2:]

    def timings(best):
        return {row: 1.0 if row == best else 2.0 for row in (fast3, fast5, *others)}
    swept = {'fwd': {'s56_c64_k3': timings(fast3), 's28_c128_k3': timings(fast3),
                     's56_c64_k5': timings(fast5)}}
    assert bench_dwconv.choose_rows(swept, torch.bfloat16) == {'fwd': {'3/16': fast3,
                                                                       '5/16': fast5}}
    assert bench_dwconv.choose_rows(swept, torch.float32) == {'fwd': {'3/32': fast3,
                                                                      '5/32': fast5}}


def test_models_benchmark_profiles_the_dense_setting():
    import bench_models
    args = bench_models.parse_args(['--device', 'cpu', '--dense-batch', '1', '--dense-img',
                                    '64', '--dense-n-win', '2', '--dtype', 'fp32',
                                    '--warmup', '1'])
    table = bench_models.profile_training('biformer_tiny', 'dense', args, steps=1, rows=5)
    assert 'Self CPU' in table and len(table.splitlines()) > 5


def test_mlp_benchmark_smoke_run(tmp_path, capsys):
    out = tmp_path / 'mlp.json'
    benchmark.main(['mlp', '--smoke', '--peers', 'ours', 'unfused', '--shapes',
                    'smoke_2x25x32', '--json', str(out)])
    import json
    result = json.loads(out.read_text())['results']['smoke_2x25x32']
    assert set(result['rows']) == {'ours', 'unfused'}
    assert all(row['fwd'] > 0 for row in result['rows'].values())
    # fp16 products on both sides: errors of the same order against fp32
    assert 0 < result['errors']['ours'] < 2 * result['errors']['unfused'] + 1e-4
    assert '| peer | fwd ms | TFLOP/s | GB/s |' in capsys.readouterr().out


def test_mlp_tuning_chooses_per_block_c():
    import bench_mlp
    fast, slow = bench_mlp.tune_rows(64)[:2]
    timings = {64: {'a': {fast: 1.0, slow: 2.0}, 'b': {fast: 1.1, slow: 1.0}},
               256: {'c': {fast: 3.0, slow: 1.0}}}
    assert bench_mlp.choose_per_class(timings) == {64: fast, 256: slow}


def test_ops_benchmark_times_ours_gathered_where_the_whole_map_backward_runs(monkeypatch):
    """The ``ours_gathered`` peer differs from ``ours`` only where the whole-map backward takes
    the call (BiFormer's stage 3 at 224 px); elsewhere it is not timed again."""
    import bench_ops
    from ops import _triton_map_attention as whole_map
    monkeypatch.setattr(bench_ops, 'make_problem', lambda shape, dtype: (None,) * 5)
    shapes = bench_ops.SHAPES_BY_NAME
    row = bench_ops.run_peer('ours_gathered', shapes['t224_s2'], torch.bfloat16, 1)
    assert row['error'].startswith('n/a')
    taken = [name for name, s in shapes.items() if whole_map.takes_map_backward(
        s.blocks * s.block_k, s.head_dim, s.block_q, s.block_k, s.topk, s.batch * s.heads)]
    assert taken == ['t224_s3']


def _record_task(path, value):
    with open(path, 'a') as f:
        f.write(f'{value}\n')


def test_tuning_sweeps_compile_their_candidates_in_worker_processes(tmp_path, capsys):
    """Every task runs once in the pool; a pool that cannot start leaves the work to the
    timing pass, with a message instead of an error."""
    from bench_timing import compile_in_workers
    path = str(tmp_path / 'tasks.txt')
    compile_in_workers(_record_task, [(path, n) for n in range(5)], workers=2)
    assert sorted(open(path).read().split()) == ['0', '1', '2', '3', '4']
    assert 'compiled the candidates' in capsys.readouterr().out
    compile_in_workers(lambda *task: None, [(1,)], workers=1)  # a lambda cannot be pickled
    assert 'compiling serially' in capsys.readouterr().out


def test_ops_tuning_caps_registers_on_the_fastest_tiles_of_each_class(monkeypatch):
    """The second pass caps the CAPPED_TILES fastest tiles of every shape of a class, for all
    of that class's shapes; each backward kernel's rows come from the shapes where the default
    backward runs it; a capped row wins where it is fastest."""
    import bench_ops
    monkeypatch.setattr(bench_ops, 'CAPPED_TILES', 2)
    tiles = [(64, 64, 4, 2, 0), (64, 32, 4, 3, 0), (32, 64, 4, 2, 0), (16, 64, 2, 2, 0)]

    def ranked(*order):  # ms by rank: the first tile is the fastest
        return {tiles[i]: 1.0 + rank for rank, i in enumerate(order)}
    measured = {'t224_s1': ranked(0, 1, 2, 3), 'b1024_s2': ranked(3, 0, 1, 2),
                't224_s2': ranked(2, 3, 0, 1)}
    capped = bench_ops._capped_candidates('fwd', measured)
    def with_caps(*chosen):
        return sorted(tiles[i][:4] + (cap,) for i in chosen for cap in bench_ops.REGISTER_CAPS)
    # t224_s1 and b1024_s2 (64-token blocks): the 2 fastest of each; t224_s2 (16) its own
    assert sorted(capped['t224_s1']) == sorted(capped['b1024_s2']) == with_caps(0, 1, 3)
    assert sorted(capped['t224_s2']) == with_caps(2, 3)
    # t224_s1 (one 64-token slot) takes the one-kernel backward, the others dQ and dK/dV
    assert list(bench_ops._capped_candidates('bwd', measured)) == ['t224_s1']
    assert list(bench_ops._capped_candidates('dq', measured)) == ['b1024_s2', 't224_s2']

    timings = {name: dict(times) for name, times in measured.items()}
    for name in ('t224_s1', 'b1024_s2'):
        timings[name].update({config: 5.0 for config in capped[name]})
        timings[name][(64, 32, 4, 3, 96)] = 0.5
    rows = dict(bench_ops.choose_configs({'fwd': timings})['fwd'][32])
    assert rows[64] == (64, 32, 4, 3, 96)  # t224_s1 and b1024_s2: 64-token blocks
    assert rows[16] == tiles[2]  # t224_s2: uncapped, its fastest


def test_single_block_tuning_caps_the_fastest_distinct_kernels(monkeypatch):
    """The single-block sweep's second pass caps the SINGLE_CAPPED_KERNELS fastest kernels
    (rows that differ only in programs per SM are one kernel), with every programs-per-SM
    count."""
    import bench_ops
    monkeypatch.setattr(bench_ops, 'SINGLE_CAPPED_KERNELS', 2)
    measured = {(4, 1, 16, 0, 0): 1.0, (4, 1, 8, 0, 0): 1.1, (8, 1, 2, 64, 0): 1.2,
                (2, 2, 4, 0, 0): 1.3}
    rows = bench_ops._capped_single_block_rows(measured)
    assert sorted({(w, s, q) for w, s, _, q, _ in rows}) == [(4, 1, 0), (8, 1, 64)]
    assert len(rows) == 2 * len(bench_ops.REGISTER_CAPS) * len(bench_ops.SINGLE_PROGRAMS_PER_SM)
    assert all(cap in bench_ops.REGISTER_CAPS for *_, cap in rows)
    assert {p for _, _, p, _, _ in rows} == set(bench_ops.SINGLE_PROGRAMS_PER_SM)


def test_ops_tuning_times_the_window_layout_too(monkeypatch):
    """Shapes with a window form are swept once more in the window layout (as BiFormer calls
    the op): the member's inputs come from the kernels in that layout, and every kernel kind
    launches on them."""
    import functools

    import bench_ops
    import ops
    from ops import _triton_gather_attention as kernels
    tiny = bench_ops.Shape('tiny_map', 1, 2, 4, 4, 4, 4, 2, 16)  # 2x2 windows of a 4x4 map
    monkeypatch.setitem(bench_ops.SHAPES_BY_NAME, 'tiny_map', tiny)
    monkeypatch.setattr(bench_ops, 'make_problem',
                        functools.partial(bench_ops.make_problem, device='cpu'))
    sets = bench_ops.SHAPES_BY_NAME['dsvt48_d32']  # no window form
    assert bench_ops.sweep_members([tiny, sets]) == ['tiny_map', 'dsvt48_d32', 'tiny_map:windows']
    assert bench_ops.sweep_members([tiny, sets], windows=False) == ['tiny_map', 'dsvt48_d32']
    plain = bench_ops.KernelInputs('tiny_map', torch.float32)
    windowed = bench_ops.KernelInputs('tiny_map:windows', torch.float32)
    assert plain.layout is None and windowed.layout == (2, 2, 4)
    expected = ops.gather_attention(windowed.q, windowed.k, windowed.v, windowed.index,
                                    block_q=(2, 2), block_k=(2, 2), map_width=4,
                                    backend='torch')
    torch.testing.assert_close(windowed.out, expected, atol=1e-5, rtol=1e-5)
    for kind in ('fwd', 'dq', 'dkdv', 'bwd'):
        windowed.launcher(kind, kernels.tile_config(kind, 4, 16))()
    # both layouts of a shape are members of its class: they share the second pass's tiles
    fast, slow = (16, 16, 2, 1, 0), (16, 32, 2, 1, 0)
    capped = bench_ops._capped_candidates('fwd', {'tiny_map': {fast: 1.0, slow: 2.0},
                                                  'tiny_map:windows': {slow: 1.0}})
    assert capped['tiny_map'] == capped['tiny_map:windows'] != []


def test_kernel_sass_loops_divide_by_constants_only():
    """tools/kernel_sass.py compiles the kernels of one fwd+bwd for sm_90 on the CPU (in a
    subprocess: the tests run the Triton interpreter). The score loops (those with tensor-core
    products) of the ALIGNED forward, dQ and dK/dV kernels at b1024_s2, and of the whole-map
    backward at t224_s3, hold no runtime integer division (``I2F.RP``, the reciprocal step of
    one), which the compile-time step divisors and geometry removed (docs/ops.md). Also its
    registers-a-thread and programs-an-SM figures."""
    import json
    import subprocess
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools')
    script = ("import json, kernel_sass as ks\n"
              "from bench_ops import SHAPES_BY_NAME\n"
              "loops = {shape + ' ' + kernel.__name__:\n"
              "    [dict(ops) for _, ops in ks.loops(ks.compile_sass(kernel, args, kwargs))]\n"
              "    for shape in ('b1024_s2', 't224_s3')\n"
              "    for kernel, args, kwargs in ks.record_launches(SHAPES_BY_NAME[shape])}\n"
              "loops['opcodes'] = [ks._opcode('/*0010*/\\t' + i) for i in ('I2F.RP R0, R1 ;',\n"
              "    '@P0 I2F.U32.RP R0, R1 ;', 'I2F.U64.RP R0, R2 ;', 'I2F.F64.S32 R0, R1 ;')]\n"
              "kernel, args, kwargs = ks.record_launches(SHAPES_BY_NAME['b1024_s2'])[0]\n"
              "loops['fwd'] = [kwargs['maxnreg'], ks.registers_per_thread(\n"
              "    ks.compile_launch(kernel, args, kwargs).asm['cubin'])]\n"
              "loops['resident'] = [ks.resident_programs(*case) for case in ((161, 16384, 4),\n"
              "    (80, 20488, 4), (32, 0, 1), (64, 100000, 4), (24, 0, 8))]\n"
              "print(json.dumps(loops))")
    env = {key: value for key, value in os.environ.items() if key != 'TRITON_INTERPRET'}
    out = subprocess.run([sys.executable, '-c', script], cwd=tools, env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    loops = json.loads(out.strip().splitlines()[-1])
    # every rounding-up I2F (signed, 32- and 64-bit unsigned division) counts; conversions not
    assert loops['opcodes'] == ['I2F.RP', 'I2F.RP', 'I2F.RP', 'I2F']
    # registers read from the cubin: the forward's row caps them (maxnreg), and it uses some
    cap, registers = loops['fwd']
    assert cap and 32 <= registers <= cap
    # programs an SM holds: by registers (3, 6), by program slots (32), shared memory (2),
    # warp slots (8)
    assert loops['resident'] == [3, 6, 32, 2, 8]
    for name in ('b1024_s2 _fwd_kernel', 'b1024_s2 _bwd_dq_kernel', 'b1024_s2 _bwd_dkdv_kernel',
                 't224_s3 _map_bwd_kernel'):
        score_loops = [ops for ops in loops[name] if ops.get('HGMMA') or ops.get('HMMA')]
        assert score_loops, name
        assert not any(ops.get('I2F.RP') for ops in score_loops), name
