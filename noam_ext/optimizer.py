"""FusedAdamW: a drop-in replacement for torch.optim.AdamW whose step() is one
fused op call per (device, dtype), with an optional lr schedule (noam_ext.schedules)
computed inside the op."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from . import _extension
from ._extension import _C
from ._hyper import (DeviceHyperTables, HyperTable, check_hyperparameters,
                     check_tensor_hyperparameters, table_row)
from ._step_wrapper import profile_hook_step
from ._checkpoint import (check_loadable, convert_masters, from_bitsandbytes, set_aside_own_dtypes, settle_master,
                          settle_moments)
from ._storage import (MASTER_KEYS, MOMENT_KEYS, OPTION_KEYS, QUANTIZED_KEYS, check_options, check_param,
                       check_param_dtype, draw_seed, local, master_from_param, options_of, rounding_stream,
                       shard_rounding, state_for, step_on_device)
from .schedules import Noam, Schedule
from .schedules.lr_mirror import LrMirror

__all__ = ["FusedAdamW", "Noam"]   # Noam lives in noam_ext.schedules; this name is kept for old imports

# Key under which state_dict() records the schedule's position (torch ignores unknown
# keys). It keeps the name it had when Noam was the only schedule, for every schedule.
SCHEDULE_STEP_KEY = "noam_schedule_step"


class FusedAdamW(Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) in one fused pass.

    Arguments, defaults, param groups, state_dict format and numerics follow
    torch.optim.AdamW. Additionally:

      schedule: a schedule of noam_ext.schedules (Noam, WarmupCosine, WarmupLinear,
        WarmupStableDecay, WarmupInverseSqrt, WarmupConstant) makes the op compute
        each step's lr itself from a step counter on the parameters' device (no host
        sync). Each group's ``initial_lr`` is then its base lr and ``group["lr"]`` shows
        the lr the next step will use, exactly as with torch.optim.AdamW + the
        schedule's LambdaLR (noam_ext.ScheduleLR, TransformerLRScheduler for Noam).
        Without a schedule the op uses ``group["lr"]``, so any torch LR scheduler drives it.
        With one, an lr written into ``group["lr"]`` by anything else (a torch LR scheduler)
        makes the next step() raise before it changes anything; hand trainers
        noam_ext.InOpScheduleLR(optimizer) instead (docs/integrations.md).

    Fewer bytes per parameter (docs/adamw.md, "Fewer bytes per parameter"; each also a
    param-group key):

      master_weights: "float32" keeps a float32 master of each bfloat16/float16 parameter
        in ``state["master_param"]`` and writes the parameter as the master rounded;
        "remainder" keeps only an int16 remainder per bfloat16 parameter
        (``state["master_remainder"]``), which rebuilds the same master exactly. Both give
        the bits of this optimizer run on float32 copies of the parameters.
      moment_dtype: torch.bfloat16 (or torch.float32) for exp_avg/exp_avg_sq; the default
        is the parameter's dtype, as torch (float32 with master weights). "8bit" keeps each
        moment as uint8 codes of the dynamic map with a float32 scale per 256 elements
        (``state["exp_avg_codes"]``, ``state["exp_avg_absmax"]``, ...; docs/eight_bit_state.md).
        A DTensor parameter whose shards would cut a 256-element block keeps float moments
        instead, with a warning.
      stochastic_rounding: round what the step stores in bfloat16 (parameters without a
        master, bfloat16 moments) stochastically, with bits from a counter-based generator
        keyed on ``seed``, the parameter and its step, and the element's index.
      seed: the generator's seed, kept in param_groups (so in state_dict()); drawn from
        torch's default generator when None.
    Gradients may be bfloat16 for float32 parameters (read and converted in the op).

    Like torch's own optimizers it owns nothing that users touch: every step()
    reads ``param_groups``, each ``p.grad`` and ``optimizer.state`` as they are at
    that moment, and updates every parameter that has a gradient in one fused op
    call per (device, dtype). See docs/adamw.md for the rules.
    """

    # torch.amp.GradScaler.step() then hands us its scale and found-inf tensors
    # (self.grad_scale, self.found_inf) instead of unscaling the gradients itself;
    # the op reads both on the device: no sync, and an inf/NaN step changes nothing.
    _step_supports_amp_scaling = True

    # torch.optim.Optimizer wraps step() in this (once per class): torch's wrapper,
    # skipped when no profiler, step hook or compiler is there to see it (_step_wrapper.py).
    profile_hook_step = staticmethod(profile_hook_step)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, schedule: Schedule | None = None, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 master_weights: str | None = None, moment_dtype: torch.dtype | str | None = None,
                 stochastic_rounding: bool = False, seed: int | None = None):
        check_tensor_hyperparameters(lr, betas, foreach, capturable)
        check_hyperparameters(lr, betas, eps, weight_decay)
        check_options(master_weights, moment_dtype, stochastic_rounding, seed)
        if stochastic_rounding and seed is None:
            seed = draw_seed()
        if differentiable:
            raise ValueError("FusedAdamW does not support differentiable=True")
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ValueError("schedule must be a noam_ext schedule (Noam, WarmupCosine, WarmupLinear, "
                             f"WarmupStableDecay, WarmupInverseSqrt, WarmupConstant) or None, got {schedule!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=True)
        # The options become group keys only when set: without them, param_groups and
        # state_dict() have exactly torch.optim.AdamW's keys.
        options = dict(master_weights=master_weights, moment_dtype=moment_dtype,
                       stochastic_rounding=stochastic_rounding, seed=seed)
        defaults.update({key: value for key, value in options.items() if value not in (None, False)})
        self.schedule = schedule
        self._schedule_steps_done = 0   # host mirror of the device counters, for logging
        self._schedule_counters: dict[torch.device, torch.Tensor] = {}
        # Where each stochastically rounded DTensor shard lies in its whole parameter,
        # worked out in Python when the step first meets it (_prepare) and passed to C++.
        self._shards: dict[torch.Tensor, tuple[int, int]] = {}
        self._hyper = HyperTable()
        self._device_hyper = DeviceHyperTables()
        self._pending_clip: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._lr_mirror = LrMirror()   # what a schedule wrote into group["lr"] (checked by step())
        super().__init__(params, defaults)
        if schedule is not None:
            for group in self.param_groups:
                group.setdefault("initial_lr", group["lr"])
            self._refresh_scheduled_lrs()

    # ---- torch.optim.Optimizer interface -------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f" in param group {len(self.param_groups) - 1}"
        try:
            check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], where)
        except ValueError:
            self.param_groups.pop()   # leave the optimizer as it was
            raise
        for index, p in enumerate(group["params"]):
            name = f"parameter {index} of param group {len(self.param_groups) - 1} (shape {tuple(p.shape)})"
            try:
                check_param_dtype(p, name)
            except ValueError:
                self.param_groups.pop()
                raise
            if p.is_sparse or p.layout != torch.strided:
                self.param_groups.pop()
                raise ValueError(f"FusedAdamW: {name} is not a dense strided tensor")
        try:
            check_options(group.get("master_weights"), group.get("moment_dtype"),
                          group.get("stochastic_rounding", False), group.get("seed"), where)
            if group.get("stochastic_rounding") and group.get("seed") is None:
                group["seed"] = draw_seed()
            options = options_of(group)
            for index, p in enumerate(group["params"]):
                check_param(p, options, f"parameter {index} of param group {len(self.param_groups) - 1} "
                                        f"(shape {tuple(p.shape)})")
        except ValueError:
            self.param_groups.pop()
            raise
        if getattr(self, "schedule", None) is not None:
            group.setdefault("initial_lr", group["lr"])
            # The mirror of the lr the op will use for this group from the next step on.
            group["lr"] = group["initial_lr"] * self.schedule.factor(self._schedule_steps_done)
            self._lr_mirror.record(self.param_groups, first=len(self.param_groups) - 1)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["schedule"] = self.schedule
        state["_schedule_steps_done"] = self._current_schedule_position()
        state["_lrs_written"] = self._lr_mirror.written_values()
        return state

    def __setstate__(self, state: dict) -> None:
        # Also the path of copy.deepcopy and pickle. The device counters are not
        # part of the state: they are re-created from the position on first use.
        state = dict(state)
        schedule = state.pop("schedule", None)
        done = state.pop("_schedule_steps_done", 0)
        lrs_written = state.pop("_lrs_written", None)
        super().__setstate__(state)
        self.schedule = getattr(self, "schedule", schedule)
        self._schedule_steps_done = getattr(self, "_schedule_steps_done", done)
        self._schedule_counters = {}
        self._shards = {}   # worked out again on first use
        self._hyper = HyperTable()
        self._device_hyper = DeviceHyperTables()
        self._pending_clip = None
        if not hasattr(self, "_lr_mirror"):   # unpickled or copied (load_state_dict records itself)
            self._lr_mirror = LrMirror()
            if lrs_written is not None:
                self._lr_mirror.restore(self.param_groups, lrs_written)
            else:
                self._lr_mirror.record(self.param_groups)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            # Always decoupled, as torch.optim.AdamW forces it: a torch.optim.Adam state
            # dict (decoupled_weight_decay=False) loads as AdamW.
            group["decoupled_weight_decay"] = True

    def step(self, closure: Callable[[], float] | None = None):
        # No torch.no_grad() here: the step runs in C++ below autograd (and bumps the
        # parameters' versions itself), and the decorator would cost microseconds.
        if self.schedule is not None and not torch.compiler.is_compiling():
            # Before anything (the closure included): an lr written by an LR scheduler
            # next to the in-op schedule is an error, not silently ignored.
            self._lr_mirror.check(self.param_groups, self.schedule, self._schedule_steps_done)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            _traceable_step(self)
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        grad_clip, found_inf = self._pending_clip_for_step(found_inf)
        # One C++ call reads the parameters, gradients and state where torch keeps
        # them, checks them all, and makes the step. It changes nothing and says what
        # must be prepared, for every parameter at once, when a parameter takes its
        # first step (its state is created here, as torch creates it lazily), has its
        # step on another device (a loaded checkpoint) or lacks its master, or a device
        # has no schedule counter yet; the call after the preparation makes the step.
        hyper, device_hypers = self._hyper_tables()   # checks every group first
        missing = _C.fused_step(self.param_groups, self.state, hyper, self._schedule_counters,
                                grad_scale, found_inf, grad_clip, device_hypers, self._shards)
        if missing is not None:
            self._prepare(*missing)
            hyper, device_hypers = self._hyper_tables()   # new devices' tables
            unprepared = _C.fused_step(self.param_groups, self.state, hyper, self._schedule_counters,
                                       grad_scale, found_inf, grad_clip, device_hypers, self._shards)
            if unprepared is not None:
                raise AssertionError(f"FusedAdamW: the step is still unprepared after preparing {missing}: "
                                     f"{unprepared} (a bug in noam_ext)")
        self._pending_clip = None   # used by this step (a step that raised keeps it for the next)
        self._schedule_steps_done += 1
        if self.schedule is not None:
            self._refresh_scheduled_lrs()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.schedule is not None:
            state[SCHEDULE_STEP_KEY] = self._current_schedule_position()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A bitsandbytes 8-bit checkpoint (AdamW8bit) is read in this library's 8-bit format.
        state_dict = from_bitsandbytes(state_dict)
        check_loadable(self.param_groups, state_dict)   # everything first: a bad dict changes nothing
        # torch casts every floating state entry to its parameter's dtype: entries the
        # options keep in another dtype (float32 moments or masters of 16-bit parameters,
        # int16 remainders) are set aside and loaded here in their own.
        # The storage options stay as this optimizer was built with them (a checkpoint is
        # converted to them, whatever stored it); the seed is the checkpoint's where it has
        # one, so that a resumed run draws the same rounding bits.
        options = [{**{k: g[k] for k in OPTION_KEYS if k in g},
                    **({"seed": s["seed"]} if "seed" in s and "seed" in g else {})}
                   for g, s in zip(self.param_groups, state_dict["param_groups"])]
        state_dict, kept = set_aside_own_dtypes(self.param_groups, options, state_dict)
        super().load_state_dict(state_dict)
        for group, own in zip(self.param_groups, options):
            # torch put the saved groups in place: drop the options this optimizer was not
            # built with (a checkpoint's master_weights or stochastic_rounding must not turn
            # them on here), then restore its own.
            for key in OPTION_KEYS:
                group.pop(key, None)
            group.update(own)
        for p, key, value, dtype in kept:
            self.state[p][key] = value.to(device=p.device, dtype=dtype)
        convert_masters(self.param_groups, self.state)
        settle_moments(self.param_groups, self.state)
        if self.schedule is not None:
            steps = [float(s["step"]) for s in self.state.values() if isinstance(s, dict) and "step" in s]
            done = state_dict.get(SCHEDULE_STEP_KEY, int(max(steps)) if steps else 0)
            self._set_schedule_position(int(done))
            for group in self.param_groups:
                group.setdefault("initial_lr", group["lr"])
            self._refresh_scheduled_lrs()

    # ---- gradient clipping ------------------------------------------------------------------

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, *,
                        scaler: torch.amp.GradScaler | None = None,
                        skip_if_nonfinite: bool = False) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over every gradient of every group, fused into
        the next step(): returns the total norm (a tensor on the gradients' device, no
        host sync), and the next step() multiplies each gradient by
        min(1, max_norm / (norm + 1e-6)) as it reads it. The gradients themselves are
        left as they are (torch's function scales them in place).

        scaler: the torch.amp.GradScaler whose scaler.step(optimizer) follows: the norm is
          then that of the unscaled gradients, as after scaler.unscale_(optimizer).
        skip_if_nonfinite: the next step() changes nothing (as on GradScaler's found-inf
          path) when the norm is inf or NaN.
        """
        max_norm, norm_type = float(max_norm), float(norm_type)
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            self._pending_clip = None
            return torch.tensor(0.0)
        total_norm = _total_norm(grads, norm_type)
        if scaler is not None and scaler.is_enabled():
            # The norm of the unscaled gradients: GradScaler unscales by multiplying with
            # this reciprocal (exact for its power-of-two scales).
            inv_scale = scaler._get_scale_async().double().reciprocal().float()
            total_norm = total_norm * inv_scale.to(total_norm.device)
        if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot "
                "be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
                "`error_if_nonfinite=False`")
        clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        skip = (~torch.isfinite(total_norm)).float() if skip_if_nonfinite else None
        self._pending_clip = (clip_coef.double(), skip)
        return total_norm

    def _pending_clip_for_step(self, found_inf: torch.Tensor | None):
        """The clipping factor for this step (step() clears it once it has run), and
        found_inf with the non-finite-norm skip folded in."""
        pending = self._pending_clip
        if pending is None:
            return None, found_inf
        coef, skip = pending
        if skip is not None:
            found_inf = skip if found_inf is None else found_inf.float() + skip.to(found_inf.device)
        return coef, found_inf

    # ---- state -----------------------------------------------------------------------------

    @torch.no_grad()
    def _prepare(self, stateless, misplaced_steps, devices, masterless=(), unplaced_shards=()) -> None:
        """Creates the state of parameters taking their first step (as torch does,
        lazily), moves steps loaded onto the CPU to their parameter's device, creates
        the schedule counters of new devices, the masters of parameters whose state
        has none (a torch.optim.AdamW checkpoint loaded into a master-weight optimizer),
        and works out where stochastically rounded shards lie in their whole parameters."""
        for g, j in unplaced_shards:
            p = self.param_groups[g]["params"][j]
            self._shards[p] = shard_rounding(p)
        for device in devices:
            _check_device_supported(device)
            self._schedule_counter(device)
        for g, j in stateless:   # checked first: an unsupported device creates no state
            _check_device_supported(local(self.param_groups[g]["params"][j]).device)
        for g, j in stateless:
            p = self.param_groups[g]["params"][j]
            if not self.state.get(p):   # the same parameter twice in a group: one state
                group = self.param_groups[g]
                self.state[p] = state_for(p, bool(group["amsgrad"]), options_of(group))
        for g, j in misplaced_steps:
            p = self.param_groups[g]["params"][j]
            self.state[p]["step"] = step_on_device(self.state[p]["step"], local(p).device)
        for g, j in masterless:
            p = self.param_groups[g]["params"][j]
            kind = self.param_groups[g]["master_weights"]
            settle_master(p, self.state[p], kind)   # from the other form, where the state has it
            if MASTER_KEYS[kind] not in self.state[p]:
                self.state[p][MASTER_KEYS[kind]] = master_from_param(p, kind)

    # ---- schedule ----------------------------------------------------------------------------

    def get_last_lr(self) -> list[float]:
        """The lr each group's next step() will use (computed on the host: no sync)."""
        return [group["lr"] for group in self.param_groups]

    def _refresh_scheduled_lrs(self) -> None:
        factor = self.schedule._factor(float(self._schedule_steps_done))   # a valid count: no checks
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self._lr_mirror.record(self.param_groups)

    def _hyper_tables(self) -> tuple[torch.Tensor, dict | None]:
        """The hyperparameter table on the CPU, and on each GPU taking part (the GPU
        kernels read it in device memory, where graph replays see it change). A
        Tensor hyperparameter on a GPU is read on the host only where a CPU call
        needs it, or before the devices of the step are known (the first step)."""
        gpus = [d for d in self._schedule_counters if d.type != "cpu"]
        only_gpus = bool(gpus) and len(gpus) == len(self._schedule_counters)
        hyper = self._hyper.get(self.param_groups, self.schedule, read_gpu_tensors=not only_gpus)
        if not gpus:
            return hyper, None
        entries = self._hyper.device_entries
        return hyper, {d: self._device_hyper.get(d, hyper, entries) for d in gpus}

    def _schedule_counter(self, device: torch.device) -> torch.Tensor:
        """The op's schedule counter on `device` (an int64 [1] of completed steps),
        created at the current position."""
        counter = self._schedule_counters.get(device)
        if counter is None:
            position = self._current_schedule_position()
            counter = torch.tensor([position], dtype=torch.int64, device=device)
            self._schedule_counters[device] = counter
        return counter

    def _current_schedule_position(self) -> int:
        """Completed steps of the schedule, read from a device counter (a sync, fine
        at checkpoint time): the host mirror misses CUDA-graph replays."""
        for counter in self._schedule_counters.values():
            self._schedule_steps_done = int(counter[0].item())
            break
        return self._schedule_steps_done

    def _set_schedule_position(self, done: int) -> None:
        self._schedule_steps_done = done
        for counter in self._schedule_counters.values():
            counter[0] = done


def _traceable_calls(opt: "FusedAdamW") -> tuple[torch.Tensor, dict[tuple, dict[str, list]]]:
    """The compiled step's hyperparameter table and op calls, one per (device, storages,
    master, amsgrad, stochastic rounding), with each parameter's (group, index) in
    "where": creating state and masters as the eager step's preparation does.
    tests/optimizer/test_bucketing.py requires the eager step's plan (_C.planned_calls) to be the same."""
    rows = []
    for group in opt.param_groups:
        base_lr = group["initial_lr"] if opt.schedule is not None else group["lr"]
        beta1, beta2 = group["betas"]
        values = [float(base_lr), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"])]
        rows.append(table_row(values, group["maximize"], opt.schedule))
    hyper = torch.tensor(rows, dtype=torch.float64)
    calls: dict[tuple, dict[str, list]] = {}
    for index, group in enumerate(opt.param_groups):
        amsgrad = bool(group["amsgrad"])
        options = options_of(group)
        master_key = MASTER_KEYS.get(options.master_weights)
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("FusedAdamW does not support sparse gradients")
            state = opt.state[p]
            if len(state) == 0:
                state.update(state_for(p, amsgrad, options))
            if master_key is not None and master_key not in state:
                state[master_key] = master_from_param(p, options.master_weights)
            moments = MOMENT_KEYS[:3 if amsgrad else 2]
            # 8-bit moments unless a DTensor's state keeps float ones (as the eager step: collect.h, read_state)
            eight_bit = options.eight_bit and not (local(p) is not p and QUANTIZED_KEYS["exp_avg"][0] not in state
                                                   and "exp_avg" in state)
            if eight_bit:   # the codes where the moments go; their scales in moment_absmax
                tensors = [p, p.grad] + [state[QUANTIZED_KEYS[key][0]] for key in moments]
            else:
                tensors = [p, p.grad] + [state[key] for key in moments]
            if p.is_complex():
                tensors = [torch.view_as_real(t) for t in tensors]
            master = state[master_key] if master_key is not None else None
            key = (p.device, tensors[0].dtype, tensors[1].dtype, tensors[2].dtype, options.master_weights, amsgrad,
                   options.stochastic_rounding)
            call = calls.setdefault(key, {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [],
                                          "max_exp_avg_sqs": [], "masters": [], "steps": [], "groups": [],
                                          "rng_streams": [], "element_offsets": [], "where": [],
                                          "moment_absmax": []})
            call["params"].append(tensors[0])
            call["grads"].append(tensors[1])
            call["exp_avgs"].append(tensors[2])
            call["exp_avg_sqs"].append(tensors[3])
            if amsgrad:
                call["max_exp_avg_sqs"].append(tensors[4])
            if master is not None:
                call["masters"].append(master)
            if eight_bit:
                call["moment_absmax"] += [state[QUANTIZED_KEYS[key][1]] for key in moments]
            call["steps"].append(state["step"])
            call["groups"].append(index)
            call["where"].append((index, j))
            if options.stochastic_rounding:
                offset, salt = (0, 0) if local(p) is p else shard_rounding(p)
                call["rng_streams"].append(rounding_stream(options.seed, index, j, salt))
                call["element_offsets"].append(offset)
    return hyper, calls


def _traceable_step(opt: FusedAdamW) -> None:
    """step() as torch.compile traces it: the same reads of param_groups, p.grad and
    optimizer.state, the same op, but in Python that Dynamo follows (the C++ fast
    path is opaque to it), so that torch.compile(optimizer.step, fullgraph=True) is
    one graph. What it leaves out, and the docs say: the host-side lr mirror
    (group["lr"], get_last_lr()) does not advance inside a compiled step (the device
    counters do; state_dict() and get_last_lr() re-read them), and parameters that
    share memory (tied through .data) are not detected."""
    hyper, calls = _traceable_calls(opt)
    grad_scale = getattr(opt, "grad_scale", None)
    found_inf = getattr(opt, "found_inf", None)
    grad_clip, found_inf = opt._pending_clip_for_step(found_inf)
    devices = [key[0] for key in calls]
    for k, (key, call) in enumerate(calls.items()):
        device, stochastic_rounding = key[0], key[-1]
        counter = opt._schedule_counter(device)
        torch.ops.noam_ext.fused_adamw_(
            call["params"], call["grads"], call["exp_avgs"], call["exp_avg_sqs"], call["max_exp_avg_sqs"],
            call["steps"], counter, hyper, call["groups"],
            masters=call["masters"], rng_streams=call["rng_streams"], element_offsets=call["element_offsets"],
            stochastic_rounding=stochastic_rounding, moment_absmax=call["moment_absmax"],
            advance_schedule=device not in devices[k + 1:],
            grad_scale=None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32).reshape(1),
            found_inf=None if found_inf is None else found_inf.to(device=device, dtype=torch.float32).reshape(1),
            grad_clip=None if grad_clip is None else grad_clip.to(device=device, dtype=torch.float64).reshape(1))
    for device, counter in opt._schedule_counters.items():
        if device not in devices:
            counter.add_(1)
    opt._pending_clip = None


def _total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The global norm of the gradients, as torch.nn.utils.clip_grad_norm_ defines it,
    in the dtype torch's get_total_norm returns (the gradients' dtypes promoted).
    On the CPU it comes from noam_ext::grad_norm (csrc/cpu/grad_norm_cpu.cpp), one
    multi-threaded pass over all the gradients at memory speed, where torch's per-tensor
    norms of 0.1-1M elements reach a fraction of it (the clip's one pass would then cost
    about as much as torch's norm and scaling together): for the inf-norm (exact, as
    torch's) and for the 2-norm of float32/float64 gradients, whose squares it sums in
    float64 in an order of its own (the same for any number of threads), so that norm
    agrees with torch's to rounding, not bit for bit. The 2-norm of bfloat16/float16
    gradients stays torch's, which rounds each tensor's norm to that dtype before
    combining them: a norm rounded once would differ from it by an ulp of that dtype.
    Elsewhere (CUDA, DTensor and complex gradients, other norm types) it is torch's own
    get_total_norm, the computation clip_grad_norm_ makes."""
    dtypes = _GRAD_NORM_DTYPES if norm_type == float("inf") else (torch.float32, torch.float64)
    if norm_type in (2.0, float("inf")) and all(
            g.device.type == "cpu" and g.dtype in dtypes and g.layout == torch.strided and local(g) is g
            for g in grads):
        dtype = grads[0].dtype
        for g in grads[1:]:
            dtype = torch.promote_types(dtype, g.dtype)
        return torch.ops.noam_ext.grad_norm(grads, norm_type).to(dtype)
    return torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite=False)


_GRAD_NORM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


_DEVICE_TYPES_WITH_KERNEL: dict[str, bool] = {}


def _check_device_supported(device: torch.device) -> None:
    supported = _DEVICE_TYPES_WITH_KERNEL.get(device.type)
    if supported is None:
        try:
            supported = torch._C._dispatch_has_kernel_for_dispatch_key("noam_ext::fused_adamw_",
                                                                       device.type.upper())
        except RuntimeError:   # not a dispatch key name (e.g. "meta" is "Meta")
            supported = False
        _DEVICE_TYPES_WITH_KERNEL[device.type] = supported
    if not supported:
        raise RuntimeError(f"FusedAdamW: this build of noam_ext has no {device.type} implementation "
                           f"(build info: {_extension.build_info()}); parameters on {device} cannot be optimised")
