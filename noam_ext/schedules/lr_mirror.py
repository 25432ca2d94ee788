"""With an in-op schedule, group["lr"] is a mirror: the op computes the lr from
group["initial_lr"] and its own step counter, and the optimizer writes the result
into group["lr"] for logging. A torch LR scheduler attached as well (HF Trainer
always builds one) writes group["lr"] too, and that write would be ignored without
a word while the logs show it. LrMirror remembers what the optimizer itself last
wrote into each group, so that step() can refuse to run when something else wrote
there since.

The check costs one identity test and one float comparison per group. A Tensor lr
is compared by identity and version counter instead of by value: reading a GPU
tensor's value would synchronise, and torch's schedulers change a Tensor lr in
place (fill_), which bumps its version."""

from __future__ import annotations

import torch

# The two ways out, named in the error (and in the docs: README.md, docs/integrations.md).
WAYS_OUT = (
    "Either\n"
    "  1. drop schedule= and let the LR scheduler drive group[\"lr\"] (the same Noam schedule: "
    "FusedAdamW(params, lr=base_lr) with noam_ext.TransformerLRScheduler(optimizer, d_model, warmup_steps), "
    "or the trainer's own scheduler), or\n"
    "  2. keep the in-op schedule and give the trainer noam_ext.InOpScheduleLR(optimizer), a scheduler "
    "that writes nothing and reports the lr the op uses (HF Trainer: "
    "optimizers=(optimizer, noam_ext.InOpScheduleLR(optimizer))).\n"
    "To change the base lr of the in-op schedule, set group[\"initial_lr\"]. This step changed nothing.")


def _entry(group: dict) -> tuple:
    lr = group["lr"]
    return group, lr, lr._version if isinstance(lr, torch.Tensor) else None


class LrMirror:
    """What the optimizer last wrote into each param group's "lr"."""

    __slots__ = ("_written",)

    def __init__(self):
        self._written: list[tuple] = []   # per group: (the group, the lr written, its version if a Tensor)

    def record(self, param_groups: list[dict], first: int = 0) -> None:
        """Remembers the lr of param_groups[first:] as written by the optimizer."""
        self._written[first:] = [_entry(group) for group in param_groups[first:]]

    def written_values(self) -> list:
        """The lrs written (for pickling; restore() takes them back)."""
        return [lr for _, lr, _ in self._written]

    def restore(self, param_groups: list[dict], values: list) -> None:
        """After unpickling or deepcopy: the values are the copies of those written
        (a copied Tensor lr is the same object as the group's copy, with a fresh version)."""
        self._written = [(group, lr, lr._version if isinstance(lr, torch.Tensor) else None)
                         for group, lr in zip(param_groups, values)]

    def check(self, param_groups: list[dict], schedule, steps_done: int) -> None:
        """Raises, naming the group, when some group's lr is not what was written.
        Groups that are not the ones recorded (param_groups edited behind the
        optimizer's back) are not checked."""
        for index, (group, (owner, written, version)) in enumerate(zip(param_groups, self._written)):
            lr = group["lr"]
            if lr is written and (version is None or lr._version == version):
                continue
            if owner is not group:
                continue
            if version is None and not isinstance(lr, torch.Tensor) and lr == written:
                continue   # an equal float written again (a scheduler that agrees) changes nothing
            raise RuntimeError(_message(index, group, written, version, schedule, steps_done))


def _message(index: int, group: dict, written, version, schedule, steps_done: int) -> str:
    found = group["lr"]
    found = f"{float(found)!r} (a Tensor)" if isinstance(found, torch.Tensor) else repr(found)
    if version is None:
        expected = repr(written)
    else:   # the Tensor written was changed in place: say what the op uses
        expected = f"{float(group['initial_lr']) * schedule.factor(steps_done)!r}"
    return (f"FusedAdamW: param group {index}'s lr is {found}, but the in-op schedule "
            f"(schedule={schedule!r}) computes the lr itself and set it to {expected}: something else wrote "
            "group[\"lr\"] (a torch LR scheduler, such as the one HF Trainer builds when given "
            "optimizers=(optimizer, None), or a hand edit), and this step would ignore it while the logs "
            f"show it.\n{WAYS_OUT}")
