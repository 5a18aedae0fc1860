"""The cost model and the policy search, with hand-set rates (deterministic; no timing)."""

import json

import pytest

from flexgraph.calibrate import TIMED_CONTEXT, Calibration, _interp
from flexgraph.graph.builder import Workload, part_of
from flexgraph.models.builtin import builtin_config
from flexgraph.models.spec import ModelSpec
from flexgraph.plan.checker import check_path
from flexgraph.plan.cost import CostModel, layer_work, roofline, simulate
from flexgraph.plan.planner import Knobs, plan_for_policy
from flexgraph.plan.policy import Policy, Split
from flexgraph.plan.search import search_policy
from test_checker import BIG, C0, C1, LW0, LW1, hand_graph

GB = 1e9


def calibration(**bw) -> Calibration:
    bandwidth = {"cpu->gpu": 4 * GB, "gpu->cpu": 4 * GB, "disk->cpu": 2 * GB, "cpu->disk": 1 * GB,
                 "disk->gpu": 2 * GB, "gpu->disk": 1 * GB, **bw}
    return Calibration("cpu", "bfloat16", bandwidth=bandwidth, mem_bandwidth=5 * GB,
                       attention=[[64, 2e11], [2048, 4e11]], node_overhead=0.0)


def with_matmul(cal: Calibration, spec: ModelSpec) -> CostModel:
    model = CostModel(spec, cal, 2)
    for k, n in model.matmul_shapes():
        cal.matmul[f"{min(k, 4096)}x{min(n, 4096)}"] = [[1, 2e10], [256, 1e11], [4096, 5e11], [16384, 6e11]]
    return model


def test_interpolation_is_log_linear_and_flat_outside():
    table = [[1, 10.0], [100, 30.0]]
    assert _interp(table, 0.5) == 10.0 and _interp(table, 1000) == 30.0
    assert _interp(table, 10) == pytest.approx(20.0)


def test_replay_on_a_hand_drawn_graph():
    """Loads take bytes / 4 GB/s; computes a fixed 0.1 s each (stubbed); lanes overlap."""
    g = hand_graph()
    g.graph.update(policy={"gpu_batch_size": 1}, workload={"prompt_len": 1})
    model = CostModel(ModelSpec.from_hf_config(builtin_config("opt-125m")), calibration(), 2)
    model.compute_time = lambda j, b, n, c: 0.1
    r = check_path(g, [LW0, LW1, C0, C1], BIG)
    est = simulate(g, r, model)
    # lw0 25 ns, lw1 50 ns on the weight lane; c0 after lw0, c1 after c0 and lw1
    assert est.block_seconds == pytest.approx(100 / 4e9 + 0.2)
    assert est.lane_busy["load_weight"] == pytest.approx(300 / 4e9)
    serial = simulate(g, r, model, overlap=False)
    assert serial.block_seconds == pytest.approx(300 / 4e9 + 0.2)


def test_decode_is_bound_by_memory_prefill_by_flops():
    spec = ModelSpec.from_hf_config(builtin_config("opt-1.3b"))
    model = with_matmul(calibration(), spec)
    weights = sum(w.numel for w in spec.layer_weights(2)) * 2
    decode = model.compute_time(2, 1, 1, 100)              # one token: read the MLP's weights
    assert decode == pytest.approx(weights / 5e9, rel=0.05)
    prefill = model.compute_time(2, 32, 512, 512)          # 16K tokens: the matmul rate
    flops = sum(mm.flops for mm in layer_work(spec, 2, 32, 512, 512, 2).matmuls)
    assert flops / 6e11 <= prefill <= 1.2 * flops / 6e11       # plus a little element-wise work


def slow_disk_plan(disk_bw: float, cache: Split):
    """OPT-1.3B, 8 sequences, 80% of the weights on a disk of ``disk_bw`` bytes/s:
    ``(graph, checked path, cost model)``."""
    spec = ModelSpec.from_hf_config(builtin_config("opt-1.3b"))
    model = with_matmul(calibration(**{"disk->cpu": disk_bw, "cpu->disk": disk_bw}), spec)
    graph, checked = plan_for_policy(spec, Workload(8, 64, 4), Policy(8, 1, Split(0, 20), cache, Split(0, 100)),
                                     False, {"gpu": None, "cpu": 1 << 40, "disk": 1 << 40})
    return graph, checked, model


def test_roofline_names_the_busiest_resource():
    graph, checked, slow_disk = slow_disk_plan(1e6, Split(0, 100))
    roof = roofline(graph, checked, slow_disk)
    assert roof.bound == "disk" and roof.seconds == max(roof.resources.values())
    est = simulate(graph, checked, slow_disk)
    assert est.block_seconds >= roof.seconds


def test_the_prefill_ceiling_is_the_prompts_products_alone():
    # the same plan on a slow and a fast disk: the prefill's compute does not change, is
    # below the block's compute (the decode's products come on top) and below the
    # estimate on either disk (no plan is faster than its prompts' products)
    graph, checked, slow = slow_disk_plan(1e7, Split(0, 0))
    _, _, fast = slow_disk_plan(1e12, Split(0, 0))
    roofs = [roofline(graph, checked, m) for m in (slow, fast)]
    prefill = sum(slow.compute_time(a["j"], 8, 64, 64) for a in (graph.nodes[n] for n in checked.path)
                  if a["kind"] == "compute" and a["i"] == 0)
    assert prefill > 0
    for m, roof in zip((slow, fast), roofs):
        assert roof.prefill_compute == pytest.approx(prefill)
        assert roof.prefill_compute < roof.resources["compute"] <= roof.seconds
        assert simulate(graph, checked, m).block_seconds >= roof.prefill_compute
    # the plan's estimate records it as throughput: 8 sequences x 4 tokens in that time
    from flexgraph.plan.planner import plan_estimate
    est = plan_estimate(graph, checked, slow, Workload(8, 64, 4), Policy.from_json(graph.graph["policy"]))
    assert est["prefill_ceiling"]["throughput"] == pytest.approx(8 * 4 / prefill)
    assert est["prefill_ceiling"]["throughput"] > est["roofline"]["throughput"] > est["throughput"]["total"]


def test_loads_of_weights_and_cache_share_the_disk():
    # weights and cache both on a slow disk: their lanes may overlap, the disk may not,
    # so a block takes at least every disk byte at the disk's rate
    graph, checked, slow_disk = slow_disk_plan(1e7, Split(0, 0))
    roof = roofline(graph, checked, slow_disk)
    est = simulate(graph, checked, slow_disk)
    assert est.lane_busy["load_weight"] > 0 and est.lane_busy["load_cache"] > 0
    assert est.block_seconds >= roof.resources["disk"]


def test_disk_reads_take_cpu_from_the_compute():
    # 0.5 s of compute lost per GB read: the compute lane and the roofline's compute
    # grow by exactly that for every disk byte; with no such cost, nothing changes
    graph, checked, model = slow_disk_plan(1e9, Split(0, 0))
    before_est, before_roof = simulate(graph, checked, model), roofline(graph, checked, model)
    disk_bytes = sum(n for node in checked.path for src, dst, n in graph.nodes[node]["moves"]
                     if "disk" in (src, dst))
    assert disk_bytes > 0
    model.cal.io_cpu = 0.5 / GB
    est, roof = simulate(graph, checked, model), roofline(graph, checked, model)
    assert roof.resources["compute"] == pytest.approx(before_roof.resources["compute"] + disk_bytes * 0.5 / GB)
    charged = est.lane_busy["compute"] - before_est.lane_busy["compute"]
    tail = sum(model.io_cpu_time(graph.nodes[n]) for n in checked.path[checked.path.index(
        [n for n in checked.path if graph.nodes[n]["kind"] == "compute"][-1]):])   # stores after the last compute
    assert charged == pytest.approx(disk_bytes * 0.5 / GB - tail)
    assert est.block_seconds > before_est.block_seconds
    model.cal.device = "cuda"                      # a GPU's compute does not pay for host reads
    assert model.io_cpu_time(graph.nodes[checked.path[0]]) == 0.0


def test_the_estimate_reads_the_disk_at_its_rate_under_compute():
    """A disk calibrated at half its idle rate while a product runs: a disk-bound plan's
    estimate slows down by about 2x; the roofline keeps the idle rate."""
    graph, checked, model = slow_disk_plan(1e8, Split(0, 100))
    before_est, before_roof = simulate(graph, checked, model), roofline(graph, checked, model)
    model.cal.disk_read_busy = 0.5e8
    assert model.busy_bw("disk", "cpu") == 0.5e8 and model.busy_bw("cpu", "disk") == 0.5e8
    est, roof = simulate(graph, checked, model), roofline(graph, checked, model)
    assert roof.resources == before_roof.resources
    assert 1.8 * before_est.block_seconds < est.block_seconds <= 2.0 * before_est.block_seconds
    model.cal.disk_read_busy = 5e8                 # never faster than idle
    assert model.busy_bw("disk", "cpu") == 1e8


def test_io_cpu_is_measured_and_leaves_no_file(tmp_path, monkeypatch):
    import torch

    import flexgraph.calibrate as C
    monkeypatch.setattr(C, "IO_PROBE_SECONDS", 0.2)
    monkeypatch.setattr(C, "IO_PROBE_ROUNDS", 1)
    cost, read = C.measure_io_cpu(tmp_path, torch.float32, nbytes=8 << 20)
    assert 0.0 <= cost < 1e-6                  # seconds per byte: under 1000 s per GB
    assert 10e6 < read < 100e9                 # bytes/s read meanwhile: a disk's, not zero
    assert not list(tmp_path.iterdir())        # its probe file is removed


def test_disk_read_rate_is_bytes_over_time_not_a_typical_read(tmp_path, monkeypatch):
    """Reads alternating fast and slow (as this VM's disk serves them): the rate is all
    bytes over all the time the reads took — what a run's reads will take — not the
    median read's rate, which the fast reads would set."""
    import itertools
    import time

    import flexgraph.calibrate as C
    from flexgraph.exec import diskio
    delays = itertools.cycle([0.01, 0.01, 0.07])       # seconds per read: two fast, one slow
    real_read = diskio.DiskIO.read_into

    def uneven_read(self, path, offset, dst):
        real_read(self, path, offset, dst)
        time.sleep(next(delays))

    monkeypatch.setattr(diskio.DiskIO, "read_into", uneven_read)
    nbytes = 1 << 20
    read, write = C.measure_disk(tmp_path, nbytes=nbytes, seconds=0.6)
    # each 3 reads take >= 0.09 s: ~3 MiB / 0.09 s in all (a cut cycle at the end adds a
    # little); the median read alone would give 1 MiB / 0.01 s, three times that
    assert read < 1.15 * 3 * nbytes / 0.09
    assert read < 0.5 * nbytes / 0.01
    assert write > 0
    assert not list(tmp_path.iterdir())                 # its probe file is removed


def test_disk_rates_are_measured_again_when_stale_and_saved(tmp_path, monkeypatch):
    """A plan made more than DISK_MAX_AGE_SECONDS after the disk was timed times it again
    (all its rates: idle, under compute, what reads cost the compute) and saves them; a
    fresh timing is kept; a calibration from before the rates were dated counts as stale."""
    import torch

    import flexgraph.calibrate as C
    monkeypatch.setenv("FLEXGRAPH_CACHE", str(tmp_path / "cache"))
    # each timing of the disk: (idle read, write) then (compute lost per byte, read under compute)
    timings = iter([((1.2e9, 0.5e9), (3e-11, 1.1e9)), ((0.9e9, 0.4e9), (4e-11, 0.8e9))])
    calls, under_compute = [], []

    def measure_disk(folder, nbytes=0):
        calls.append(folder)
        idle, busy = next(timings)
        under_compute.append(busy)
        return idle

    monkeypatch.setattr(C, "measure_disk", measure_disk)
    monkeypatch.setattr(C, "measure_io_cpu", lambda folder, dtype: under_compute[-1])
    cal = Calibration(device="cpu", dtype="float32", bandwidth={"disk->cpu": 2.9e9, "cpu->disk": 2.6e9},
                      io_cpu=1e-11, disk_read_busy=2.7e9)         # undated: from before the field
    assert C.refresh_disk(cal, torch.float32, str(tmp_path), False, now=1000.0)
    assert (cal.bandwidth, cal.io_cpu, cal.disk_read_busy) == ({"disk->cpu": 1.2e9, "cpu->disk": 0.5e9}, 3e-11, 1.1e9)
    stamp = cal.disk_measured_at
    assert stamp > 0
    saved = C.Calibration.from_json(json.loads(C.calibration_path("cpu", "float32", False).read_text()))
    assert saved.bandwidth == cal.bandwidth and saved.disk_measured_at == stamp
    # within the age: kept, not measured
    assert not C.refresh_disk(cal, torch.float32, str(tmp_path), False, now=stamp + C.DISK_MAX_AGE_SECONDS)
    assert len(calls) == 1
    # past it: measured again
    assert C.refresh_disk(cal, torch.float32, str(tmp_path), False, now=stamp + C.DISK_MAX_AGE_SECONDS + 1)
    assert cal.bandwidth["disk->cpu"] == 0.9e9 and cal.disk_read_busy == 0.8e9 and len(calls) == 2


def test_search_keeps_everything_in_ram_when_it_fits():
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    model = with_matmul(calibration(), spec)
    wl = Workload(32, 64, 8)
    hw = {"device": "cpu", "gpu_mem": None, "cpu_mem": 8 << 30, "disk_mem": 1 << 40}
    best = search_policy(spec, wl, hw, Knobs(), model)[0]
    assert best.policy.percent_args() == [0, 100, 0, 100, 0, 100]
    assert best.estimate.block_seconds > 0


def test_search_under_a_cap_offloads_and_fits():
    spec = ModelSpec.from_hf_config(builtin_config("opt-1.3b"))
    model = with_matmul(calibration(), spec)
    wl = Workload(32, 256, 8)
    cap = 2 << 30
    hw = {"device": "cpu", "gpu_mem": None, "cpu_mem": cap, "disk_mem": 1 << 40}
    candidates = search_policy(spec, wl, hw, Knobs(), model)
    assert len(candidates) > 1
    rates = [c.throughput(wl) for c in candidates]
    assert rates == sorted(rates, reverse=True)
    best = candidates[0].policy
    assert best.weights.disk > 0
    _g, checked = plan_for_policy(spec, wl, best, False, {"gpu": None, "cpu": cap, "disk": 1 << 40})
    assert checked.peak["cpu"] <= cap


def test_search_prefers_ram_for_weights_when_disk_is_slow():
    """With the cache small, what goes to disk should be the part costing least time."""
    spec = ModelSpec.from_hf_config(builtin_config("opt-1.3b"))
    wl = Workload(16, 128, 8)
    hw = {"device": "cpu", "gpu_mem": None, "cpu_mem": 2 << 30, "disk_mem": 1 << 40}
    fast = search_policy(spec, wl, hw, Knobs(), with_matmul(calibration(), spec))[0]
    slow = search_policy(spec, wl, hw, Knobs(), with_matmul(
        calibration(**{"disk->cpu": 2e8, "cpu->disk": 1e8}), spec))[0]
    assert slow.estimate.block_seconds > fast.estimate.block_seconds


def test_search_fits_where_whole_layer_placement_overshoots_the_lp():
    """OPT-6.7B's tied 0.4 GB embedding has a home in two layers and weights are placed a
    whole layer at a time: the LP's fractions, taken as they are, overshoot a 6 GiB cpu
    tier (this failed with "no policy fits").  The search moves weights down until each
    finalist fits, and every one it returns passes the full check."""
    spec = ModelSpec.from_hf_config(builtin_config("opt-6.7b"))
    model = with_matmul(calibration(), spec)
    wl = Workload(16, 128, 16)
    cap = {"gpu": None, "cpu": 6 << 30, "disk": 1 << 40}
    hw = {"device": "cpu", "gpu_mem": None, "cpu_mem": cap["cpu"], "disk_mem": cap["disk"]}
    candidates = search_policy(spec, wl, hw, Knobs(), model)
    assert candidates
    for cand in candidates:
        assert 0 < cand.policy.weights.cpu < 100 and cand.policy.weights.disk > 0
        _g, checked = plan_for_policy(spec, wl, cand.policy, False, cap)
        assert checked.peak["cpu"] <= cap["cpu"]


def test_beyond_the_largest_timed_layer_the_time_per_sequence_is_the_measured_one():
    # corrections timed up to 8192 tokens (16 x 512); a 256 x 512 prefill costs 16x the
    # 16-sequence one, whatever faster rate the matmul table has at larger M
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    model = with_matmul(calibration(), spec)
    model.corrections = {"prefill mlp": [[512, 2.0], [8192, 1.5]], "prefill attn": [[512, 2.0], [8192, 1.1]]}
    for j in (1, 2):
        ref = model.compute_time(j, 16, 512, 512)
        assert model.compute_time(j, 256, 512, 512) == pytest.approx(16 * ref)
        # the analytic time alone would have made it cheaper per sequence (M 131k reads 6e11 FLOP/s)
        assert model.analytic_time(j, 256, 512, 512) < 16 * model.analytic_time(j, 16, 512, 512)
    # within the timed range, the interpolated correction as before
    assert model.compute_time(2, 8, 512, 512) == pytest.approx(
        model.analytic_time(2, 8, 512, 512) * _interp(model.corrections["prefill mlp"], 4096))


def test_prefill_and_decode_are_corrected_by_their_own_tables():
    # A 4 x 512 prefill (2,048 tokens) lies between a 256-sequence decode and a 16 x 512
    # prefill by token count; it is scaled by the prefill table alone.  A decode step and
    # the head (one position a sequence, also in a prefill) take the times measured at the
    # decode batches, linear in the batch between them.
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    model = with_matmul(calibration(), spec)
    attn, head = 1, spec.num_layers - 1
    model.corrections = {"decode attn": [[1, 5.0], [256, 3.0]], "prefill attn": [[512, 1.5], [8192, 1.2]],
                         "decode head": [[1, 4.0], [256, 2.0]]}
    assert model.compute_time(attn, 4, 512, 512) == pytest.approx(
        model.analytic_time(attn, 4, 512, 512) * _interp([[512, 1.5], [8192, 1.2]], 2048))

    def measured(j, table):     # the decode table's times at its batches, at the timed context
        return [r * model.analytic_time(j, b, 1, TIMED_CONTEXT) for b, r in table]

    t1, t256 = measured(attn, model.corrections["decode attn"])
    assert model.compute_time(attn, 1, 1, TIMED_CONTEXT) == pytest.approx(t1)
    assert model.compute_time(attn, 4, 1, TIMED_CONTEXT) == pytest.approx(t1 + 3 / 255 * (t256 - t1))
    # another context: scaled by the analytic time's change at that batch
    assert model.compute_time(attn, 4, 1, 2 * TIMED_CONTEXT) == pytest.approx(
        (t1 + 3 / 255 * (t256 - t1)) * model.analytic_time(attn, 4, 1, 2 * TIMED_CONTEXT)
        / model.analytic_time(attn, 4, 1, TIMED_CONTEXT))
    h1, h256 = measured(head, model.corrections["decode head"])
    for new in (1, 512):
        assert model.compute_time(head, 4, new, 512) == pytest.approx(h1 + 3 / 255 * (h256 - h1))
    # beyond the largest timed batch, the time per sequence is the measured one
    assert model.compute_time(head, 1024, 512, 512) == pytest.approx(4 * h256)


def test_decode_attention_is_affine_in_the_context_through_both_timed_contexts():
    # Timed at 512 and at 128 cached tokens: in between and beyond, the time is the line
    # through the two measured times (at this batch); below 128, the short time scaled by
    # the analytic time.  OPT-6.7B's decode attention at 136 tokens came out 1.7x its
    # measured time when the 512-token time was scaled by the analytic time alone.
    from flexgraph.calibrate import SHORT_CONTEXT
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    model = with_matmul(calibration(), spec)
    attn, mlp = 1, 2
    model.corrections = {"decode attn": [[1, 5.0], [256, 4.0]], "decode attn @128": [[1, 2.0], [256, 1.5]],
                         "decode mlp": [[1, 3.0], [256, 1.5]]}
    b = 64

    def at(table, context):          # the table's time at batch b, linear between its batches
        (b0, r0), (b1, r1) = table
        t0, t1 = r0 * model.analytic_time(attn, b0, 1, context), r1 * model.analytic_time(attn, b1, 1, context)
        return t0 + (b - b0) / (b1 - b0) * (t1 - t0)

    short, long = at(model.corrections["decode attn @128"], SHORT_CONTEXT), at(model.corrections["decode attn"], 512)
    assert model.compute_time(attn, b, 1, SHORT_CONTEXT) == pytest.approx(short)
    assert model.compute_time(attn, b, 1, 512) == pytest.approx(long)
    assert model.compute_time(attn, b, 1, 320) == pytest.approx((short + long) / 2)
    assert model.compute_time(attn, b, 1, 896) == pytest.approx(long + (long - short))
    assert model.compute_time(attn, b, 1, 64) == pytest.approx(
        short * model.analytic_time(attn, b, 1, 64) / model.analytic_time(attn, b, 1, SHORT_CONTEXT))
    # the old way, kept for a calibration without the short points: 512's time scaled
    scaled = long * model.analytic_time(attn, b, 1, 136) / model.analytic_time(attn, b, 1, 512)
    assert model.compute_time(attn, b, 1, 136) != pytest.approx(scaled)
    del model.corrections["decode attn @128"]
    model._compute_cache.clear()
    assert model.compute_time(attn, b, 1, 136) == pytest.approx(scaled)
    # a kind that does not read the cache has no second table and is not affected
    assert "decode mlp @128" not in model.corrections


def test_a_decode_step_between_timed_batches_is_not_thrown_by_a_noisy_matmul_rate():
    # The matmul table read a product of 4 rows at a fifth of its neighbours' rate (noise
    # at a few rows): the analytic time of a 4-sequence step is then more than a
    # 16-sequence one's.  The estimate still rises with the batch, and at the timed
    # batches it is the measured time.
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    model = with_matmul(calibration(), spec)
    for table in model.cal.matmul.values():
        table[1:1] = [[4, 2e9], [16, 5e10]]
    mlp = 2
    assert model.analytic_time(mlp, 4, 1, 512) > model.analytic_time(mlp, 16, 1, 512)
    model.corrections = {"decode mlp": [[1, 3.0], [16, 2.0], [256, 1.5]]}
    times = [model.compute_time(mlp, b, 1, TIMED_CONTEXT) for b in range(1, 300)]
    assert all(a < b for a, b in zip(times, times[1:]))
    for b, r in model.corrections["decode mlp"]:
        assert times[b - 1] == pytest.approx(r * model.analytic_time(mlp, b, 1, TIMED_CONTEXT))


def test_decoding_4bit_weights_and_cache_is_charged_to_each_compute():
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    cal = calibration()
    cal.dequant = 1 * GB
    plain = with_matmul(cal, spec)
    both = CostModel(spec, cal, 2, compress_weight=True, compress_cache=True)
    both.corrections = plain.corrections
    attn, mlp = 1, 2
    matrices = lambda j: sum(w.numel for w in spec.layer_weights(j) if len(w.shape) == 2)  # noqa: E731
    assert plain.decode_time(mlp, 8, 1, 100) == 0.0
    assert both.decode_time(mlp, 8, 1, 100) == pytest.approx(matrices(mlp) * 2 / GB)
    prefix = 2 * 8 * spec.num_kv_heads * 99 * spec.head_dim * 2 / GB
    assert both.decode_time(attn, 8, 1, 100) == pytest.approx(matrices(attn) * 2 / GB + prefix)
    assert both.decode_time(0, 8, 1, 100) == 0.0                      # the embedding decodes rows only
    assert both.compute_time(mlp, 8, 1, 100) == pytest.approx(plain.compute_time(mlp, 8, 1, 100)
                                                              + matrices(mlp) * 2 / GB)


def test_the_cache_is_decoded_and_encoded_at_its_own_rates():
    # the cache's layout decodes at its own (slower) rate, and a step's new entries are
    # encoded at the encoding rate: 99 cached tokens at 0.5 GB/s, 1 new at 0.25 GB/s
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    cal = calibration()
    cal.dequant, cal.dequant_cache, cal.quant_cache = 2 * GB, 0.5 * GB, 0.25 * GB
    cache_only = CostModel(spec, cal, 2, compress_cache=True)
    per_token = 2 * 8 * spec.num_kv_heads * spec.head_dim * 2
    assert cache_only.decode_time(1, 8, 1, 100) == pytest.approx(per_token * 99 / (0.5 * GB)
                                                                 + per_token / (0.25 * GB))
    assert cache_only.decode_time(2, 8, 1, 100) == 0.0                # an MLP has no cache


def _quick_layer_timing(monkeypatch):
    """The calibration module set to time layers in one short round, and a cost model of a
    tiny Llama to time."""
    import flexgraph.calibrate as C
    from hf_tiny import _COMMON, TINY_CONFIGS
    cls, kwargs = TINY_CONFIGS["llama2-mha"]
    spec = ModelSpec.from_hf_config(cls(**_COMMON, **kwargs).to_dict(), name="tiny")
    monkeypatch.setattr(C, "LAYER_ROUNDS", 1)
    monkeypatch.setattr(C, "LAYER_MIN_SPAN_SECONDS", 0.0)
    monkeypatch.setattr(C, "STREAM_BYTES", 1 << 20)
    return C, with_matmul(calibration(), spec)


def test_layer_corrections_cover_each_point_and_skip_a_slow_large_prefill(monkeypatch):
    # the real measurement on a tiny Llama: a ratio per kind at each point's token
    # count; the 32k-token prefill point is left out when its analytic time is too long
    import torch

    C, model = _quick_layer_timing(monkeypatch)
    got = C.measure_layers(model, torch.float32, False, torch.device("cpu"))
    assert {k: [t for t, _ in v] for k, v in got.items()} == _tables_of_points(C)
    assert all(r > 0 for table in got.values() for _, r in table)
    monkeypatch.setattr(C, "LARGE_POINT_SECONDS", 0.0)
    got = C.measure_layers(model, torch.float32, False, torch.device("cpu"))
    assert [t for t, _ in got["prefill mlp"]] == sorted(_tables_of_points(C)["prefill mlp"]
                                                        [:-1])     # all but the 64 x 512 point


def _tables_of_points(C) -> dict[str, list[int]]:
    """The tables ``LAYER_POINTS`` make, each with its points' token counts: prefill and
    decode apart; the head only decodes; the embedding's are the MLP's."""
    tables: dict[str, set[int]] = {}
    for batch, new, context in C.LAYER_POINTS.values():
        kinds = ("attn", "mlp", "embed") + (("head",) if new == 1 else ())
        for kind in kinds if context == C.TIMED_CONTEXT else ("attn",):    # only attention reads the cache
            tables.setdefault(C.correction_key(kind, new, context), set()).add(batch * new)
    return {key: sorted(tokens) for key, tokens in tables.items()}


def test_layer_rounds_are_interleaved_and_each_point_keeps_its_median(monkeypatch):
    # two hand-made points: every round times each once, in turn; rounds go on past
    # LAYER_ROUNDS until they span LAYER_MIN_SPAN_SECONDS; each keeps its median
    import types

    import flexgraph.calibrate as C
    clock, calls = [0.0], []
    times = iter([1.0, 10.0, 5.0, 50.0, 2.0, 20.0, 9.0, 90.0, 3.0, 30.0])

    def one_round(run, min_seconds):
        run()
        clock[0] += 4.0                 # each round of a point takes 4 s of the fake clock
        return next(times)

    steps = [C.TimedStep("decode mlp", 16, 2.0, lambda: calls.append("mlp")),
             C.TimedStep("decode attn", 16, 10.0, lambda: calls.append("attn"))]
    monkeypatch.setattr(C, "layer_steps", lambda *a: steps)
    monkeypatch.setattr(C, "time_round", one_round)
    monkeypatch.setattr(C, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(C, "LAYER_ROUNDS", 3)
    monkeypatch.setattr(C, "LAYER_MIN_SPAN_SECONDS", 33.0)     # 3 rounds span 24 s: two more
    got = C.measure_layers(None, None, False, None)
    assert calls == ["mlp", "attn"] + ["mlp", "attn"] * 5      # warm-ups, then 5 interleaved rounds
    assert got["decode mlp"] == [[16, 3.0 / 2.0]]               # median of 1, 5, 2, 9, 3
    assert got["decode attn"] == [[16, 30.0 / 10.0]]            # median of 10, 50, 20, 90, 30
    assert got["decode embed"] == got["decode mlp"] and "prefill embed" not in got
    monkeypatch.setattr(C, "LAYER_MAX_ROUNDS", 4)               # the span is cut short by the cap
    calls.clear()
    times = iter([1.0] * 8)
    C.measure_layers(None, None, False, None)
    assert calls == ["mlp", "attn"] * 5                         # warm-ups and 4 rounds


def test_attention_points_share_one_pool_of_cache_rows(monkeypatch):
    # each point cycles through disjoint row ranges of one pool, as big as the largest
    # point needs (not the sum of all points)
    import torch

    import flexgraph.calibrate as C
    monkeypatch.setattr(C, "STREAM_BYTES", 8 << 20)
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    points = [(2, 1, 64), (8, 64, 64)]
    pool = C._CachePool(spec, points, torch.float32, torch.device("cpu"))
    per_sequence = 2 * spec.num_kv_heads * 65 * spec.head_dim * 4
    assert pool.k.shape == (max(b * C._copies(b * per_sequence) for b, _, _ in points) * spec.num_kv_heads,
                            65, spec.head_dim)
    for batch, _, _ in points:
        copies = pool.caches(batch)
        assert len(copies) == C._copies(batch * per_sequence) > 1
        starts = set()
        for [(rows, k, v)] in copies:
            assert rows == slice(None) and k.shape == v.shape == (batch * spec.num_kv_heads, 65, spec.head_dim)
            offset = (k.data_ptr() - pool.k.data_ptr()) // (k.stride(0) * 4)
            assert v.data_ptr() - pool.v.data_ptr() == k.data_ptr() - pool.k.data_ptr()
            assert offset % k.shape[0] == 0 and offset + k.shape[0] <= pool.k.shape[0]
            starts.add(offset)
        assert len(starts) == len(copies)                       # disjoint copies


def test_a_tight_run_is_timed_with_the_tight_corrections():
    # a run under a tight cap computes without huge pages and with a fixed mmap threshold:
    # its layers are slower, and the model times them with what was measured so
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    model = with_matmul(calibration(), spec)
    model.corrections = {"prefill mlp": [[16, 1.0], [8192, 1.0]]}
    policy = Policy(8, 1, Split(0, 100), Split(0, 100), Split(0, 100))
    assert model.for_policy(policy, tight=True).compute_time(2, 8, 512, 512) == \
        model.compute_time(2, 8, 512, 512)                        # no tight measurement: the plain ones
    asked = []

    def tight():
        asked.append(1)
        return {"prefill mlp": [[16, 3.0], [8192, 3.0]]}

    model.tight_corrections = tight
    roomy = model.for_policy(policy).compute_time(2, 8, 512, 512)
    slow = model.for_policy(policy, tight=True)
    assert slow.compute_time(2, 8, 512, 512) == pytest.approx(3 * roomy)
    assert model.for_policy(policy, tight=True) is slow and slow.for_policy(policy, tight=True) is slow
    assert slow.for_policy(policy).compute_time(2, 8, 512, 512) == pytest.approx(roomy)
    assert asked == [1]                                             # measured once, when first needed


def test_a_plan_is_tight_when_its_working_set_leaves_no_room_for_huge_pages():
    from flexgraph.hugepages import EXTRA
    from flexgraph.plan.planner import runs_tight
    cap = {"gpu": None, "cpu": 1000, "disk": None}
    home, work = 600, int(400 / (1 + EXTRA))                      # the peak plus EXTRA x the working set: 1000
    assert not runs_tight(home + work, home, cap)
    assert runs_tight(home + work + 1, home, cap)
    assert runs_tight(1, 0, {**cap, "cpu": None})                 # execute cannot know: no huge pages


def test_the_search_times_tight_candidates_with_the_tight_corrections(monkeypatch):
    from flexgraph import hugepages
    monkeypatch.setattr(hugepages, "EXTRA", 1e6)                 # no room for huge pages: every candidate runs tight
    spec = ModelSpec.from_hf_config(builtin_config("opt-1.3b"))
    wl = Workload(16, 128, 8)
    hw = {"device": "cpu", "gpu_mem": None, "cpu_mem": 3 << 30, "disk_mem": 1 << 40}
    estimates = []
    for factor in (1.0, 3.0):
        model = with_matmul(calibration(), spec)
        tables = [f"{phase} {kind}" for phase in ("prefill", "decode") for kind in ("attn", "mlp", "head", "embed")]
        model.corrections = {k: [[16, 1.0], [8192, 1.0]] for k in tables}
        model.tight_corrections = lambda f=factor: {k: [[16, f], [8192, f]] for k in tables}
        best = search_policy(spec, wl, hw, Knobs(gpu_batch_size=8, num_gpu_batches=2), model)[0]
        estimates.append(best.estimate.block_seconds)
    assert estimates[1] > 1.5 * estimates[0]


def test_the_search_times_roomy_candidates_with_the_roomy_corrections():
    """OPT-125M in RAM, 64 x 512 under 6 GiB: its peak (3.6 GB) is over half the cap, most
    of it KV cache, but its working set (0.4 GB) leaves room for huge pages: the search
    times it with the roomy corrections, as `flexgraph execute` will run it."""
    spec = ModelSpec.from_hf_config(builtin_config("opt-125m"))
    wl = Workload(64, 512, 32)
    hw = {"device": "cpu", "gpu_mem": None, "cpu_mem": 6 << 30, "disk_mem": 1 << 40}
    model = with_matmul(calibration(), spec)
    tables = [f"{phase} {kind}" for phase in ("prefill", "decode") for kind in ("attn", "mlp", "head", "embed")]
    model.corrections = {k: [[16, 1.0], [8192, 1.0]] for k in tables}
    asked = []
    model.tight_corrections = lambda: asked.append(1) or {k: [[16, 3.0], [8192, 3.0]] for k in tables}
    best = search_policy(spec, wl, hw, Knobs(gpu_batch_size=64, num_gpu_batches=1, percent=(0, 100, 0, 100, 0, 100)),
                         model)[0]
    homes = (best.policy.weights, best.policy.cache)
    assert homes == (Split(0, 100), Split(0, 100)) and asked == []


def test_tight_layer_corrections_are_measured_in_a_child_under_the_tight_allocator(monkeypatch):
    import torch

    C, model = _quick_layer_timing(monkeypatch)
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")             # as `flexgraph plan` sets it for itself
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    got = C.measure_layers_tight(model, torch.float32, False)
    assert got["huge_pages"] == "0" and got["threshold_fixed"] is True
    assert {k: [t for t, _ in v] for k, v in got["corrections"].items()} == _tables_of_points(C)
    assert all(r > 0 for table in got["corrections"].values() for _, r in table)


def test_the_search_extrapolation_matches_the_full_graph_and_costs_the_head_as_a_head():
    """The search times 2- and 3-block copies of the model and extrapolates in depth; on a
    graph that is linear in depth that must give the full graph's estimate.  The copies'
    last layer is the head: costed by the full model's layer kinds, index 5 or 7 is an
    attention layer, and the head (OPT's 50k-word product) went uncounted."""
    from flexgraph.plan.search import _estimate
    spec = ModelSpec.from_hf_config(builtin_config("opt-1.3b"))      # 24 blocks
    model = with_matmul(calibration(), spec)
    wl, cap = Workload(8, 64, 4), {"gpu": None, "cpu": 1 << 40, "disk": 1 << 40}
    policy = Policy(8, 1, Split(0, 100), Split(0, 100), Split(0, 100))
    graph, checked = plan_for_policy(spec, wl, policy, False, cap)
    full = simulate(graph, checked, model)
    extrapolated = _estimate(spec, wl, policy, False, cap, model, True, True)
    assert extrapolated.block_seconds == pytest.approx(full.block_seconds, rel=1e-6)
    assert extrapolated.parts == pytest.approx(full.parts, rel=1e-6)
    assert set(full.parts) == {part_of(spec, *node[:3]) for node in checked.path}
    assert "compute prefill head" in full.parts and "compute decode head" in full.parts
    assert sum(full.parts.values()) == pytest.approx(sum(full.lane_busy.values()))
