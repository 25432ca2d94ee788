"""The CUDA kernel on a real GPU. Every test here is skipped, with the reason,
when no GPU is present (CI has none: there the kernels' own code runs on the host,
tests/gpu_kernels/test_cuda_emulation.py). benchmarks/gpu_check.sh runs these on a lent GPU.

Tolerances: against our CPU op the kernel must agree bit for bit (same math
header, IEEE division and sqrt, no contraction: --fmad=false), but for float64
parameters, whose update uses coefficients from CUDA's double pow() (see
test_kernel_matches_cpu_op_bit_for_bit). Against torch.optim.AdamW(fused=True /
foreach=True) float32 and float64 agree to a few ulp (torch's CUDA kernels contract
multiply-adds and write the decay as p - lr*wd*p), so rtol=atol=1e-5 (float32) and
1e-12 (float64) after 300 steps; bfloat16/float16 are judged against a float64 run,
as on the CPU."""

from __future__ import annotations

import copy
import gc
import io
import threading
import time

import pytest
import torch

from noam_ext import (FusedAdamW, Noam, TransformerLRScheduler, WarmupConstant, WarmupCosine, WarmupInverseSqrt,
                      WarmupLinear, WarmupStableDecay)

import noam_ext._C
import op_args
import schedule_cases as schedules
from lr_probe import op_lrs
import sibling_tests

emulation = sibling_tests.load("gpu_kernels/test_cuda_emulation.py")   # the host run's layouts
parity = sibling_tests.load("optimizer/test_parity.py")                # the CPU parity run's model and bounds

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
TORCH_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def at_offset_on_device(t, elements):
    """A copy of t on the GPU that starts `elements` elements into a fresh allocation
    (the caching allocator's blocks are 512-byte aligned), as a view into a larger
    parameter would."""
    buffer = torch.empty(t.numel() + elements, dtype=t.dtype, device=DEVICE)
    view = buffer[elements:].view(t.shape)
    view.copy_(t)
    return view


def _same_alignment_on_device(t):
    """A copy of t on the GPU that keeps a misaligned view misaligned (a plain .to()
    would make it a fresh, aligned tensor)."""
    if t.data_ptr() % 16 == 0:
        return t.to(DEVICE)
    return at_offset_on_device(t, 1)


def to_device(args):
    out = {}
    for key, value in args.items():
        if key in op_args.LIST_KEYS:
            out[key] = [_same_alignment_on_device(t) for t in value]
        elif isinstance(value, torch.Tensor) and key != "hyper":   # the hyper table stays on the CPU
            out[key] = value.to(DEVICE)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("layout", list(emulation.LAYOUTS), ids=list(emulation.LAYOUTS))
def test_kernel_matches_cpu_op_bit_for_bit(layout, dtype):
    numels = emulation.LAYOUTS[layout]
    cpu = op_args.make_args(numels, dtype, amsgrad=True, seed=3, misaligned_every=3 if len(numels) > 1 else 0)
    gpu = to_device(op_args.clone(cpu))
    # float64 parameters: CUDA's double pow() is accurate to 2 ulp, glibc's to under 1,
    # so the coefficients (Noam lr, bias corrections) may differ in their last bits. The
    # error that makes in a parameter is a few ulp of its update, plus an ulp of the
    # parameter where the sum rounds the other way, per step: the bound scales with the
    # update, so an update that nearly cancels its parameter cannot fail it. Moments and
    # steps do not use those coefficients: they stay bit for bit.
    bounds = [torch.zeros(t.shape, dtype=torch.float64) for t in cpu["params"]]
    for step in range(3):
        scale = {"grad_scale": torch.tensor([2.0]), "found_inf": torch.tensor([0.0]),
                 "grad_clip": torch.tensor([0.3], dtype=torch.float64)} if step == 1 else {}
        before = [p.double() for p in cpu["params"]]
        torch.ops.noam_ext.fused_adamw_(*op_args.positional(cpu), **scale)
        torch.ops.noam_ext.fused_adamw_(*op_args.positional(gpu), **{k: v.cuda() for k, v in scale.items()})
        for bound, b, p in zip(bounds, before, cpu["params"]):
            bound += 4 * 2.0**-52 * ((p.double() - b).abs() + p.double().abs())
    for (name, expected), (_, actual) in zip(op_args.tensors_of(cpu), op_args.tensors_of(gpu)):
        actual = actual.cpu()
        if dtype == torch.float64 and name.startswith("params"):
            bound = bounds[int(name[len("params["):-1])]
            assert ((actual - expected).abs() <= bound).all(), name
        else:
            assert torch.equal(actual, expected), name


def transformer_pair(dtype, torch_kind, amsgrad=False, maximize=False, eps=parity.EPS):
    reference = parity.small_transformer(dtype).to(DEVICE)
    ours = copy.deepcopy(reference)
    torch_groups, our_groups = parity.grouped(reference, "two_groups"), parity.grouped(ours, "two_groups")
    kwargs = dict(lr=1.0, betas=parity.BETAS, eps=eps, amsgrad=amsgrad, maximize=maximize)
    flag = {"fused": dict(fused=True), "foreach": dict(foreach=True)}[torch_kind]
    torch_opt = torch.optim.AdamW(torch_groups, **flag, **kwargs)
    sched = TransformerLRScheduler(torch_opt, d_model=parity.D_MODEL, warmup_steps=parity.WARMUP)
    ours_opt = FusedAdamW(our_groups, schedule=Noam(parity.D_MODEL, parity.WARMUP), **kwargs)
    flatten = lambda groups: [p for g in groups for p in g["params"]]  # noqa: E731
    return parity.Pair(flatten(torch_groups), flatten(our_groups), torch_opt, sched, ours_opt)


@pytest.mark.parametrize("torch_kind", ["fused", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("amsgrad, maximize", [(False, False), (True, False), (False, True)],
                         ids=["adamw", "amsgrad", "maximize"])
def test_parity_with_torch_cuda_adamw(torch_kind, dtype, amsgrad, maximize):
    pair = transformer_pair(dtype, torch_kind, amsgrad, maximize)
    generator = torch.Generator().manual_seed(11)
    for step in range(1, parity.STEPS + 1):
        grads = [g.to(DEVICE) for g in parity.random_grads(pair.torch_params, generator, dtype)]
        pair.set_grads(grads)
        pair.step()
        if step % 25 == 0 or step == parity.STEPS:
            for a, b in zip(pair.torch_params, pair.ours_params):
                torch.testing.assert_close(b, a, rtol=TORCH_TOL[dtype], atol=TORCH_TOL[dtype])
            for a, b in zip(pair.torch_params, pair.ours_params):
                for key, value in pair.torch_opt.state[a].items():
                    ours = pair.ours_opt.state[b][key]
                    torch.testing.assert_close(ours.to(value.device, value.dtype), value,
                                               rtol=TORCH_TOL[dtype], atol=TORCH_TOL[dtype])


@pytest.mark.parametrize("dtype, eps", [(torch.bfloat16, 1e-9), (torch.float16, 1e-4)], ids=["bfloat16", "float16"])
def test_low_precision_deviates_from_float64_no_more_than_torch_fused(dtype, eps):
    pair = transformer_pair(dtype, "fused", eps=eps)
    reference = transformer_pair(torch.float64, "fused", eps=eps)
    generator = torch.Generator().manual_seed(12)
    for step in range(1, parity.STEPS + 1):
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype).to(DEVICE)
                 for p in pair.torch_params]
        pair.set_grads(grads)
        reference.set_grads([g.double() for g in grads])
        pair.step()
        reference.torch_opt.step()
        reference.torch_sched.step()
    torch_max, torch_mean = parity.deviation(pair.torch_params, reference.torch_params)
    ours_max, ours_mean = parity.deviation(pair.ours_params, reference.torch_params)
    assert ours_max <= 1.25 * torch_max + 1e-6 and ours_mean <= 1.25 * torch_mean + 1e-7


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                               torch.nn.Linear(64, 8)).to(DEVICE)


def _train(model, opt, x, steps: int, tensor_lr: bool):
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        if tensor_lr:
            opt.param_groups[0]["lr"].mul_(0.5)   # on the device, as a scheduler would
        opt.step()


@pytest.mark.parametrize("lr", ["float", "tensor on the GPU"])
def test_step_makes_no_host_synchronisation(lr):
    model = small_model()
    tensor_lr = lr != "float"
    opt = FusedAdamW(model.parameters(), lr=torch.tensor(1e-3, device=DEVICE) if tensor_lr else 1.0,
                     schedule=None if tensor_lr else Noam(64, 10))
    x = torch.randn(16, 32, device=DEVICE)
    _train(model, opt, x, 2, tensor_lr)   # the first steps allocate state and tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _train(model, opt, x, 3, tensor_lr)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def capture_step(opt) -> torch.cuda.CUDAGraph:
    """opt.step() captured in a CUDA graph on a side stream, as torch's docs do it
    (capture records without running; replays run the step)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    return graph


def warmed_up_pair(amsgrad: bool = False, schedule=Noam(64, 10), lr: float = 1.0):
    """Two identical models with FusedAdamW (the schedule in the op) and the same static
    gradients (as graph capture needs), each stepped once outside any graph (which
    creates the state): (eager model, its optimizer, graph model, its optimizer)."""
    eager_model, graph_model = small_model(), small_model()
    eager = FusedAdamW(eager_model.parameters(), lr=lr, schedule=schedule, amsgrad=amsgrad)
    graphed = FusedAdamW(graph_model.parameters(), lr=lr, schedule=schedule, amsgrad=amsgrad)
    grads = [torch.randn(p.shape, device=DEVICE) for p in eager_model.parameters()]
    for opt, model in ((eager, eager_model), (graphed, graph_model)):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step()
    return eager_model, eager, graph_model, graphed


@pytest.mark.parametrize("earlier_captures", [0, 1], ids=["first capture", "after a capture never replayed"])
def test_cuda_graph_replays_equal_eager_steps(earlier_captures):
    # Captures run on torch's shared capture stream: a later one finds the tables an
    # earlier one uploaded inside its capture (not yet filled: that copy only runs
    # when the earlier graph replays, which it never does here).
    eager_model, eager, graph_model, graphed = warmed_up_pair(amsgrad=True)
    for _ in range(earlier_captures):
        capture_step(graphed)
    graph = capture_step(graphed)
    for _ in range(20):
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for a, b in zip(eager_model.parameters(), graph_model.parameters()):
        assert torch.equal(a, b)
        for key in eager.state[a]:
            assert torch.equal(eager.state[a][key], graphed.state[b][key]), key


def test_grad_scaler_with_injected_infs_matches_torch_fused():
    ours_model, ref_model = small_model(), small_model()
    ours = FusedAdamW(ours_model.parameters(), lr=1e-3)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, fused=True)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0 ** 14) for _ in range(2)]
    x = torch.randn(64, 32, device=DEVICE)
    for step in range(30):
        for model, opt, scaler in ((ours_model, ours, scalers[0]), (ref_model, ref, scalers[1])):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).float().square().mean()
            scaler.scale(loss).backward()
            if step % 7 == 3:
                next(model.parameters()).grad.view(-1)[0] = float("nan")
            scaler.step(opt)
            scaler.update()
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert scalers[0].get_scale() == scalers[1].get_scale()


def test_state_dict_moves_between_cpu_and_cuda():
    cuda_model = small_model()
    cpu_model = copy.deepcopy(cuda_model).cpu()
    cuda_opt = FusedAdamW(cuda_model.parameters(), lr=1.0, schedule=Noam(64, 10))
    x = torch.randn(8, 32, device=DEVICE)
    for _ in range(5):
        cuda_opt.zero_grad()
        cuda_model(x).square().mean().backward()
        cuda_opt.step()
    buffer = io.BytesIO()
    torch.save({"model": cuda_model.state_dict(), "opt": cuda_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu", weights_only=True)
    cpu_model.load_state_dict(checkpoint["model"])
    cpu_opt = FusedAdamW(cpu_model.parameters(), lr=1.0, schedule=Noam(64, 10))
    cpu_opt.load_state_dict(checkpoint["opt"])
    for _ in range(5):
        for model, opt, inp in ((cuda_model, cuda_opt, x), (cpu_model, cpu_opt, x.cpu())):
            opt.zero_grad()
            model(inp).square().mean().backward()
            opt.step()
    for a, b in zip(cuda_model.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)


def test_mixed_devices_are_a_clear_error():
    args = to_device(op_args.make_args([5, 7]))
    args["grads"][1] = args["grads"][1].cpu()
    with pytest.raises(RuntimeError, match=r"gradient of params\[1\] is on cpu"):
        torch.ops.noam_ext.fused_adamw_(*op_args.positional(args))


def test_parameters_on_cpu_and_gpu_in_one_optimizer():
    cpu_param = torch.nn.Parameter(torch.randn(5))
    gpu_param = torch.nn.Parameter(torch.randn(7, device=DEVICE))
    opt = FusedAdamW([cpu_param, gpu_param], lr=1.0, schedule=Noam(16, 4))
    for _ in range(3):
        cpu_param.grad = torch.ones(5)
        gpu_param.grad = torch.ones(7, device=DEVICE)
        opt.step()
    assert {c.device.type: c.tolist() for c in opt._schedule_counters.values()} == {"cpu": [3], "cuda": [3]}
    assert float(opt.state[gpu_param]["step"]) == 3.0 and opt.state[gpu_param]["step"].is_cuda


def test_a_thousand_tensors_are_one_prepare_and_one_update_launch():
    params = [torch.nn.Parameter(torch.randn(3, device=DEVICE)) for _ in range(1000)]
    opt = FusedAdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()   # creates the state
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert sum("prepare_kernel" in n for n in names) == 1
    assert sum("update_kernel" in n for n in names) == 1


def test_more_param_groups_than_the_old_limit_of_32():
    # The kernels read the hyperparameters from a table in device memory: any number
    # of groups, each with its own lr; float32 matches the CPU op bit for bit.
    torch.manual_seed(0)
    cpu_params = [torch.randn(5 + g) for g in range(40)]
    results = []
    for device in ("cpu", DEVICE):
        params = [torch.nn.Parameter(p.to(device)) for p in cpu_params]
        opt = FusedAdamW([{"params": [p], "lr": 1e-3 * (g + 1)} for g, p in enumerate(params)])
        for step in range(5):
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (step + 1))
            opt.step()
        results.append([p.detach().cpu() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _tensor_lr_run(model, graphed: bool, steps: int = 12):
    """FusedAdamW with a Tensor lr on the GPU driven by torch's ExponentialLR, which
    updates the tensor in place between steps; graphed: the step is captured once
    and replayed."""
    opt = FusedAdamW(model.parameters(), lr=torch.tensor(0.01, device=DEVICE), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)
    grads = [torch.randn(p.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(i))
             for i, p in enumerate(model.parameters())]
    for p, g in zip(model.parameters(), grads):
        p.grad = g   # static gradients, as graph capture needs
    opt.step()   # warm-up outside the graph: creates the state and the device tables
    scheduler.step()
    step = capture_step(opt).replay if graphed else opt.step
    for _ in range(steps):
        step()
        scheduler.step()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in model.parameters()], opt


def test_graph_replays_read_a_tensor_lr_that_a_torch_scheduler_changes():
    eager, _ = _tensor_lr_run(small_model(), graphed=False)
    replayed, _ = _tensor_lr_run(small_model(), graphed=True)
    for a, b in zip(eager, replayed):
        assert torch.equal(a, b)
    # The lr did change under replay: a run at the first lr throughout ends elsewhere.
    model = small_model()
    frozen = FusedAdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(i))
    for _ in range(13):
        frozen.step()
    assert not all(torch.equal(a, b.detach()) for a, b in zip(replayed, model.parameters()))


def test_replays_use_the_float_lr_of_the_latest_eager_step():
    # A float lr changed after capture reaches replays through an eager step (which
    # uploads it to the eager table the graph copies from), and replays never
    # overwrite what eager steps use.
    lrs = [1e-2, 1e-2, 3e-3, 3e-3, 1e-3]   # step 0 eager (warm-up), then replay, eager, replay, eager
    reference_model, graph_model = small_model(), small_model()
    reference = FusedAdamW(reference_model.parameters(), lr=lrs[0])
    graphed = FusedAdamW(graph_model.parameters(), lr=lrs[0])
    for model in (reference_model, graph_model):
        for i, p in enumerate(model.parameters()):
            p.grad = torch.randn(p.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(i))
    graphed.step()
    graph = capture_step(graphed)
    for k, lr in enumerate(lrs):
        reference.param_groups[0]["lr"] = lr
        reference.step()
        if k == 0:
            continue   # the warm-up step above
        graphed.param_groups[0]["lr"] = lr
        if k % 2 == 1:
            graph.replay()   # the lr of the latest eager step: lrs[k - 1] == lr here
        else:
            graphed.step()
    torch.cuda.synchronize()
    for a, b in zip(reference_model.parameters(), graph_model.parameters()):
        assert torch.equal(a, b)


def _exact_on_the_gpu(schedule) -> bool:
    """Schedules made of IEEE operations only (+ - * /, sqrt), which CUDA rounds as the
    host does; cos and pow are CUDA's own (2 ulp in double, CUDA's documented bounds)."""
    if isinstance(schedule, (WarmupConstant, WarmupLinear, WarmupInverseSqrt)):
        return True
    return isinstance(schedule, WarmupStableDecay) and schedule.decay in ("linear", "1-sqrt")


def test_in_op_schedules_on_the_gpu_match_the_host_within_cudas_libm():
    # docs/adamw.md, "How exact, and where": bit for bit where only IEEE operations are
    # used. Where cos or pow are (CUDA: 2 ulp, glibc: under 1), the factor, in [0, 1],
    # within 4 ulp of 1 (cos or pow, then 0.5 * (1 + c) or 2 * p - 1 and the floor's
    # blend, each rounding once on either side), and one more for the product with the
    # base lr; Noam's (three pow() and three products) within 10 ulp of itself.
    rows = [(base, s) for table in (schedules.SHORT, schedules.LONG) for s in table.values() for base in (1.0, 3e-4)]
    steps = sorted({k for table, pick in ((schedules.SHORT, schedules.short_steps),
                                          (schedules.LONG, lambda s: schedules.sampled_steps(s, count=60)))
                    for s in table.values() for k in pick(s)})
    gpu = op_lrs(rows, steps, device=DEVICE)
    ulp = 2.0**-52
    worst = 0.0
    for k, lrs in zip(steps, gpu):
        for (base, schedule), lr in zip(rows, lrs):
            want = base * schedule.factor(k)
            if _exact_on_the_gpu(schedule):
                assert lr == want, (schedule, k)
            elif isinstance(schedule, Noam):
                assert abs(lr - want) <= 10 * ulp * want, (schedule, k)
            else:
                assert abs(lr - want) <= 5 * ulp * base, (schedule, k)
                worst = max(worst, abs(lr - want) / base)
    print(f"largest difference of a cos/pow factor from the host's: {worst / ulp:.2f} ulp of 1")


@pytest.mark.parametrize("schedule", [WarmupCosine(3, 15, min_lr_ratio=0.1),
                                      WarmupStableDecay(2, 5, 10, decay="exponential", min_lr_ratio=0.1)],
                         ids=["cosine", "wsd-exponential"])
def test_one_captured_step_replays_a_whole_schedule(schedule):
    # Captured once, replayed through the warmup, the decay and past its end: the lr
    # comes from the device counter, so the replays follow the eager steps bit for bit.
    eager_model, eager, graph_model, graphed = warmed_up_pair(schedule=schedule, lr=1e-2)
    graph = capture_step(graphed)
    for _ in range(25):
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for a, b in zip(eager_model.parameters(), graph_model.parameters()):
        assert torch.equal(a, b)
    assert graphed.state_dict()["noam_schedule_step"] == eager.state_dict()["noam_schedule_step"] == 26


# ---- alignment, huge tensors, whole-iteration graph capture and its tables, streams, threads, two GPUs ----

@pytest.mark.parametrize("misaligned", ["grads", "params", "exp_avg_sqs", "all at one offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_tensor_at_another_offset_matches_the_cpu_op(misaligned, dtype):
    # Only the gradient (or another one tensor) one element in: the element path for
    # that row; all of a row's tensors one element in: a scalar head, then vectors.
    numels = [4097, 5, 3 * 16384 + 7, 33]
    cpu = op_args.make_args(numels, dtype, amsgrad=True, seed=9)
    gpu = to_device(op_args.clone(cpu))
    keys = op_args.LIST_KEYS[:5] if misaligned == "all at one offset" else [misaligned]
    for key in keys:
        gpu[key] = [at_offset_on_device(t, 1) if i % 2 == 0 else t for i, t in enumerate(gpu[key])]
    for _ in range(2):
        torch.ops.noam_ext.fused_adamw_(*op_args.positional(cpu))
        torch.ops.noam_ext.fused_adamw_(*op_args.positional(gpu))
    for (name, expected), (_, actual) in zip(op_args.tensors_of(cpu), op_args.tensors_of(gpu)):
        assert torch.equal(actual.cpu(), expected), name


def test_a_bfloat16_tensor_past_two_to_the_31_elements():
    # About 4.3 GB per tensor, 17 GB for the four: local indices and virtual offsets
    # past 2**31, checked against the CPU op at sampled indices (the element math does
    # not depend on where an element is, so the CPU op on the sampled values gives
    # their bits).
    n = 2**31 + 1000
    if torch.cuda.get_device_properties(DEVICE).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB or more")
    generator = torch.Generator(DEVICE).manual_seed(0)
    small = [torch.randn(100, device=DEVICE, dtype=torch.bfloat16, generator=generator) for _ in range(4)]
    small[3] = small[3].abs()
    big = [torch.randn(n, device=DEVICE, dtype=torch.bfloat16, generator=generator) for _ in range(3)]
    big.append(torch.rand(n, device=DEVICE, dtype=torch.bfloat16, generator=generator))   # exp_avg_sq >= 0
    index = torch.cat([torch.arange(0, 64), torch.arange(2**31 - 64, 2**31 + 64), torch.arange(n - 64, n),
                       torch.randint(0, n, (4096,), generator=torch.Generator().manual_seed(1))]).to(DEVICE)
    expected = [t[index].cpu() for t in big]
    gradient = expected[1].clone()
    hyper = op_args.hyper_table(1)
    schedule = torch.tensor([5], dtype=torch.int64)
    torch.ops.noam_ext.fused_adamw_([small[0], big[0]], [small[1], big[1]], [small[2], big[2]], [small[3], big[3]],
                                    [], [torch.tensor(3.0, device=DEVICE) for _ in range(2)], schedule.to(DEVICE),
                                    hyper, [0, 0])
    torch.ops.noam_ext.fused_adamw_([expected[0]], [expected[1]], [expected[2]], [expected[3]], [],
                                    [torch.tensor(3.0)], schedule, hyper, [0])
    for name, k in (("param", 0), ("exp_avg", 2), ("exp_avg_sq", 3)):
        assert torch.equal(big[k][index].cpu(), expected[k]), name
    assert torch.equal(big[1][index].cpu(), gradient)   # the gradient is only read


def capture_iteration(model, opt, x):
    """torch's whole-network capture: zero_grad(set_to_none=True), forward, backward
    and step in one graph, after three warm-up iterations on a side stream. The
    gradients, and so the kernels' tensor table, are allocated inside the capture.
    Returns the graph and the pinned-memory requests made during the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    before = pinned_requests()
    with torch.cuda.graph(graph):
        model(x).square().mean().backward()
        opt.step()
    after = pinned_requests()
    return graph, None if before is None or after is None else after - before


def pinned_requests() -> int | None:
    """Pinned-memory requests so far (torch's host allocator), where torch counts them."""
    return torch.cuda.host_memory_stats().get("active_requests.allocated")


def test_whole_iteration_capture_matches_eager_iterations():
    inputs = torch.randn(12, 16, 32, device=DEVICE)
    eager_model, graph_model = small_model(), small_model()
    eager = FusedAdamW(eager_model.parameters(), lr=1.0, schedule=Noam(64, 10))
    graphed = FusedAdamW(graph_model.parameters(), lr=1.0, schedule=Noam(64, 10))
    for k in range(12):
        eager.zero_grad(set_to_none=True)
        eager_model(inputs[0 if k < 3 else k]).square().mean().backward()
        eager.step()
    x = inputs[0].clone()
    graph, pinned_in_capture = capture_iteration(graph_model, graphed, x)
    # Pinned allocations during a capture work only with recent torch host allocators:
    # the step makes none (its tables reach the device in kernel parameters).
    assert pinned_in_capture in (0, None)
    for k in range(3, 12):
        x.copy_(inputs[k])
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager_model.parameters(), graph_model.parameters()):
        # The same kernels, but cuBLAS may choose others inside a capture: a few ulp.
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert graphed._current_schedule_position() == 12


def test_a_float_lr_set_before_capture_reaches_replays_until_an_eager_step():
    # A scheduler's float lr set after the latest eager step and before the capture:
    # replays use it, and after an eager step at a new lr, that one.
    lrs = [1e-2, 3e-3, 3e-3, 1e-3, 1e-3, 1e-3]   # eager, replay, replay, eager, replay, replay
    reference_model, graph_model = small_model(), small_model()
    reference = FusedAdamW(reference_model.parameters(), lr=lrs[0])
    graphed = FusedAdamW(graph_model.parameters(), lr=lrs[0])
    for model in (reference_model, graph_model):
        for i, p in enumerate(model.parameters()):
            p.grad = torch.randn(p.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(i))
    for lr in lrs:
        reference.param_groups[0]["lr"] = lr
        reference.step()
    graphed.step()
    graphed.param_groups[0]["lr"] = lrs[1]
    graph = capture_step(graphed)
    graph.replay()
    graph.replay()
    graphed.param_groups[0]["lr"] = lrs[3]
    graphed.step()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(reference_model.parameters(), graph_model.parameters()):
        assert torch.equal(a, b)


def test_a_first_capture_uploads_its_tables_in_kernel_parameters():
    # An op call whose tensors no eager call has seen, captured directly: its tensor
    # table (120 rows, more than one launch's worth) and the hyperparameters it passes
    # on the host reach the device in the parameters of launches the graph replays.
    cpu = op_args.make_args([5, 4097, 300] * 40, torch.float32, seed=4)
    gpu = to_device(op_args.clone(cpu))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.noam_ext.fused_adamw_(*op_args.positional(gpu))
    for _ in range(3):
        torch.ops.noam_ext.fused_adamw_(*op_args.positional(cpu))
        graph.replay()
    torch.cuda.synchronize()
    for (name, expected), (_, actual) in zip(op_args.tensors_of(cpu), op_args.tensors_of(gpu)):
        assert torch.equal(actual.cpu(), expected), name


def held_tables() -> int:
    return noam_ext._C.cuda_table_cache_stats()[1]


def test_captured_tables_are_freed_with_their_graphs():
    model = small_model()
    opt = FusedAdamW(model.parameters(), lr=1e-3)
    x = torch.randn(16, 32, device=DEVICE)
    graphs = [capture_iteration(model, opt, x)[0] for _ in range(3)]   # new gradients: a new table each
    held = held_tables()
    assert held >= 3
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    del graphs, graph
    gc.collect()
    deadline = time.monotonic() + 5.0
    while held_tables() > held - 3 and time.monotonic() < deadline:
        time.sleep(0.01)   # CUDA releases a destroyed graph's objects from a thread of its own
    assert held_tables() <= held - 3
    tables = noam_ext._C.cuda_table_cache_stats()[0]
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()   # a call on a stream forgets the tables no graph holds beyond the 8 most recent
    assert noam_ext._C.cuda_table_cache_stats()[0] <= tables + 1


def test_two_captures_of_the_same_step_get_tables_of_their_own():
    # The same rows captured twice: each graph's prepare launch writes coefficients at every
    # replay, so two graphs replayed on two streams must not share them.
    model = small_model()
    opt = FusedAdamW(model.parameters(), lr=1e-3)
    model(torch.randn(16, 32, device=DEVICE)).square().mean().backward()   # gradients kept: identical rows
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    held = held_tables()
    graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
    for graph in graphs:
        with torch.cuda.graph(graph):
            opt.step()
    assert held_tables() == held + 2
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def trained(model, opt, steps, x, stream=None, alternate=None):
    """`steps` training steps; the optimizer steps on `stream`, or on the two streams of
    `alternate` in turn."""
    for k in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        s = alternate[k % 2] if alternate else stream
        if s is None:
            opt.step()
            continue
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            opt.step()
        torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    return [p.detach().clone() for p in model.parameters()]


def test_steps_on_two_streams_match_steps_on_one():
    x = torch.randn(16, 32, device=DEVICE)
    model = small_model()
    reference = trained(model, FusedAdamW(model.parameters(), lr=1.0, schedule=Noam(64, 10)), 8, x)
    model = small_model()
    streams = (torch.cuda.Stream(), torch.cuda.Stream())
    alternating = trained(model, FusedAdamW(model.parameters(), lr=1.0, schedule=Noam(64, 10)), 8, x,
                          alternate=streams)
    for a, b in zip(reference, alternating):
        assert torch.equal(a, b)


def test_two_optimizers_on_one_device_and_from_two_threads():
    # Interleaved on one stream, then concurrently from two threads on streams of their
    # own (the table cache is shared): each matches a run of its own.
    x = torch.randn(16, 32, device=DEVICE)

    def make(seed, tensor_lr):
        model = small_model(seed)
        lr = torch.tensor(3e-3, device=DEVICE) if tensor_lr else 1.0
        return model, FusedAdamW(model.parameters(), lr=lr, schedule=None if tensor_lr else Noam(64, 10))

    alone = [trained(*make(seed, seed == 1), 10, x) for seed in (0, 1)]
    pairs = [make(seed, seed == 1) for seed in (0, 1)]
    for _ in range(10):
        for model, opt in pairs:
            trained(model, opt, 1, x)
    for expected, (model, _) in zip(alone, pairs):
        assert all(torch.equal(a, b) for a, b in zip(expected, model.parameters()))

    pairs = [make(seed, seed == 1) for seed in (0, 1)]
    results, errors = [None, None], []

    def run(k):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                results[k] = trained(*pairs[k], 10, x, stream=stream)
        except Exception as error:   # reported below, on the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for expected, got in zip(alone, results):
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_parameters_on_two_gpus_in_one_optimizer():
    values = [torch.randn(300, generator=torch.Generator().manual_seed(0)), torch.randn(5, 7)]
    cpu_params = [torch.nn.Parameter(v.clone()) for v in values]
    gpu_params = [torch.nn.Parameter(v.to(f"cuda:{k}")) for k, v in enumerate(values)]
    cpu_opt = FusedAdamW(cpu_params, lr=1.0, schedule=Noam(16, 4))
    gpu_opt = FusedAdamW(gpu_params, lr=1.0, schedule=Noam(16, 4))
    for step in range(4):
        for p in cpu_params + gpu_params:
            p.grad = torch.full_like(p, 0.1 * (step + 1))
        cpu_opt.step()
        gpu_opt.step()
    for a, b in zip(cpu_params, gpu_params):
        assert torch.equal(a, b.cpu())
    assert sorted(str(d) for d in gpu_opt._schedule_counters) == ["cuda:0", "cuda:1"]


# ---- storages beyond torch's own, stochastic rounding, strided rows ----------

import storage_cases


def _to_device(args):
    return storage_cases.on_device(args, DEVICE)


@pytest.mark.parametrize("storage,amsgrad,stochastic", storage_cases.CASES,
                         ids=[f"{storage_cases.storage_id(s)}-{'amsgrad' if a else 'adamw'}{'-rounded' if r else ''}"
                              for s, a, r in storage_cases.CASES])
def test_every_storage_on_the_gpu_matches_the_cpu_op_bit_for_bit(storage, amsgrad, stochastic):
    # The same call on the CPU op and the GPU: masters, moments, parameters and stochastic
    # rounding's bits equal (float64 is not in play here: its storage is torch's own).
    offsets = ([0, 2**32 - 256, 512, 0, 2**32 - 1024, 256, 0, 0, 256] if storage[2] == "8bit"   # whole blocks
               else [0, 2**32 - 3, 5, 0, 2**32 - 100, 7, 0, 0, 1])
    cpu = storage_cases.make_call(storage, storage_cases.NUMELS, amsgrad, seed=3, stochastic=stochastic,
                                  offsets=offsets if stochastic else None)
    gpu = _to_device(cpu)
    for _ in range(2):
        torch.ops.noam_ext.fused_adamw_(*storage_cases.positional(cpu), **cpu["options"])
        torch.ops.noam_ext.fused_adamw_(*storage_cases.positional(gpu), **gpu["options"])
    torch.cuda.synchronize()
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "masters", "moment_absmax"):
        for i, (c, g) in enumerate(zip(cpu[key], gpu[key])):
            if storage[0] == "float64" and key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
                torch.testing.assert_close(g.cpu(), c, rtol=1e-13, atol=1e-13)
            else:
                assert torch.equal(g.cpu(), c), f"{key}[{i}]"


STORAGE_IDS = [storage_cases.storage_id(s) for s in storage_cases.STORAGES]


def _gpu_and_cpu_agree(cpu, gpu, steps=2):
    for _ in range(steps):
        torch.ops.noam_ext.fused_adamw_(*storage_cases.positional(cpu), **cpu["options"])
        torch.ops.noam_ext.fused_adamw_(*storage_cases.positional(gpu), **gpu["options"])
    torch.cuda.synchronize()
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "masters", "moment_absmax"):
        for i, (c, g) in enumerate(zip(cpu[key], gpu[key])):
            if cpu["params"][0].dtype == torch.float64 and key != "state_steps":
                torch.testing.assert_close(g.cpu(), c, rtol=1e-13, atol=1e-13)   # double: libm's pow may differ
            else:
                assert torch.equal(g.cpu(), c), f"{key}[{i}]"
    assert torch.equal(gpu["schedule_step"].cpu(), cpu["schedule_step"])


@pytest.mark.parametrize("storage", storage_cases.STORAGES, ids=STORAGE_IDS)
def test_every_storage_on_the_element_path_matches_the_cpu_op(storage):
    # Gradients one element into their buffers, everything else aligned: no head aligns
    # every pointer, so the rows take the element path.
    cpu = storage_cases.make_call(storage, storage_cases.NUMELS, amsgrad=True, seed=12,
                                  stochastic=storage_cases.can_round(storage))
    gpu = _to_device(cpu)
    gpu["grads"] = [torch.empty(g.numel() + 1, dtype=g.dtype, device=DEVICE)[1:].copy_(g) for g in gpu["grads"]]
    _gpu_and_cpu_agree(cpu, gpu)


@pytest.mark.parametrize("storage", storage_cases.STORAGES, ids=STORAGE_IDS)
@pytest.mark.parametrize("found_inf", [0.0, 1.0], ids=["finite", "inf found"])
def test_every_storage_with_grad_scale_found_inf_and_clip_matches_the_cpu_op(storage, found_inf):
    cpu = storage_cases.make_call(storage, storage_cases.NUMELS, amsgrad=False, seed=13,
                                  stochastic=storage_cases.can_round(storage))
    gpu = _to_device(cpu)
    for args, device in ((cpu, "cpu"), (gpu, DEVICE)):
        args["options"].update(grad_scale=torch.tensor([1024.0], device=device),
                               found_inf=torch.tensor([found_inf], device=device),
                               grad_clip=torch.tensor([0.25], dtype=torch.float64, device=device))
    _gpu_and_cpu_agree(cpu, gpu)


@pytest.mark.parametrize("storage", storage_cases.STORAGES, ids=STORAGE_IDS)
def test_every_storage_on_strided_rows_matches_the_cpu_op(storage):
    # Every other parameter a view with gaps, one gradient and one state tensor gappy: the
    # strided launch (kernels.cuh, strided_kernel), as the host run checks for four storages.
    def gappy(t):
        out = torch.empty(*t.shape, 3, dtype=t.dtype, device=t.device)[..., 1]
        return out.copy_(t)

    cpu = storage_cases.make_call(storage, storage_cases.NUMELS, amsgrad=True, seed=14,
                                  stochastic=storage_cases.can_round(storage))
    gpu = _to_device(cpu)
    for args in (cpu, gpu):
        for i in range(0, len(args["params"]), 2):
            args["params"][i] = gappy(args["params"][i])
        args["grads"][1] = gappy(args["grads"][1])
        args["exp_avg_sqs"][2] = gappy(args["exp_avg_sqs"][2])
        if storage[3] != "none":
            args["masters"][4] = gappy(args["masters"][4])
            args["options"]["masters"] = args["masters"]
    _gpu_and_cpu_agree(cpu, gpu)


def test_strided_parameters_on_the_gpu_train_like_torch():
    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(10, 5, 2, device=DEVICE)[..., 0]),
                torch.nn.Parameter(torch.randn(10, 2, device=DEVICE)[..., 0])]

    ours, theirs = make(), make()
    opt = FusedAdamW(ours, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    x = torch.randn(5, device=DEVICE)
    for _ in range(10):
        for params, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            (params[0].mv(x) + params[1]).pow(2).sum().backward()
            o.step()
    for p, q in zip(ours, theirs):
        assert p.stride() == q.stride()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [dict(master_weights="remainder", moment_dtype=torch.bfloat16),
                                     dict(stochastic_rounding=True, seed=3, moment_dtype=torch.bfloat16),
                                     dict(stochastic_rounding=True, seed=3, moment_dtype="8bit"),
                                     dict(master_weights="remainder", moment_dtype="8bit", amsgrad=True)],
                         ids=["remainder-bf16-moments", "stochastic-rounding", "stochastic-rounding-8bit",
                              "remainder-8bit-amsgrad"])
def test_low_byte_steps_replay_in_a_cuda_graph_with_the_eager_bits(options):
    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(n, device=DEVICE, dtype=torch.bfloat16)) for n in (3, 4097, 70000)]

    eager, captured = make(), make()
    grads = [[torch.randn(p.shape, device=DEVICE, dtype=torch.bfloat16) for p in eager] for _ in range(6)]
    opt_eager = FusedAdamW(eager, lr=1e-3, schedule=WarmupCosine(warmup_steps=2, total_steps=10), **options)
    opt_graph = FusedAdamW(captured, lr=1e-3, schedule=WarmupCosine(warmup_steps=2, total_steps=10), **options)
    static = [torch.zeros_like(p) for p in captured]
    for p, g in zip(captured, static):
        p.grad = g
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):   # warm-up: state, counters and tables made eagerly
        for g, s in zip(grads[0], static):
            s.copy_(g)
        opt_graph.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_graph.step()
    for p, g in zip(eager, grads[0]):
        p.grad = g.clone()
    opt_eager.step()
    for step in range(1, 6):
        for p, g in zip(eager, grads[step]):
            p.grad = g.clone()
        opt_eager.step()
        for s, g in zip(static, grads[step]):
            s.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(eager, captured):
        assert torch.equal(p.detach(), q.detach())
        for key, value in opt_eager.state[p].items():
            assert torch.equal(value, opt_graph.state[q][key]), key
