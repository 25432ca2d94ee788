"""docs/integrations.md, run: every snippet on the page is read from the page and
executed here (after the page's setup snippet, in a temporary directory), and what
it did is checked against torch.optim.AdamW under the same framework. Also the
page's other claims: HF Trainer's default scheduler is refused next to an in-op
schedule, a Trainer checkpoint resumes exactly, Lightning's own clipping refuses
FusedAdamW under "16-mixed", LearningRateMonitor logs the in-op lr, and accelerate's
GradScaler path. Optional frameworks: each test skips, saying why, where its
framework is not installed.

Tolerance for parameters against torch (float32, 6-8 steps): each step may differ
by the square root's last bits (tests/optimizer/test_parity.py: 2e-6 over 300 steps) and the
clipping factor by the norm's rounding (tests/optimizer/test_clip.py: 1e-6 relative), so
rtol=atol=1e-5; measured at most 1.2e-7 here, while a wrong lr or clip would be off
by more than 1e-3."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import noam_ext
from noam_ext import FusedAdamW, InOpScheduleLR, Noam, TransformerLRScheduler, noam_lr

PAGE = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
SNIPPET = re.compile(r"<!-- snippet: (\w+)(?: \((\w+)\))? -->\n```python\n(.*?)```", re.S)
FRAMEWORKS = {
    "transformers": "HF transformers is not installed (optional: pip install transformers accelerate)",
    "lightning": "PyTorch Lightning is not installed (optional: pip install lightning)",
    "accelerate": "HF accelerate is not installed (optional: pip install accelerate)",
}
TOL = 1e-5   # see the module docstring


def page_snippets() -> dict[str, tuple[str | None, str]]:
    return {name: (framework, code) for name, framework, code in SNIPPET.findall(PAGE.read_text())}


def needs(framework: str):
    # HF Trainer refuses to start without accelerate, so its snippets need both.
    for module in ("transformers", "accelerate") if framework == "transformers" else (framework,):
        pytest.importorskip(module, reason=FRAMEWORKS[framework])


def run(code: str, label: str, namespace: dict | None = None) -> dict:
    namespace = {"__name__": f"integrations_{label}"} if namespace is None else namespace
    exec(compile(code, f"{PAGE}:{label}", "exec"), namespace)
    return namespace


def setup_namespace() -> dict:
    """A fresh run of the page's setup snippet (seeds the RNG, makes the data)."""
    return run(page_snippets()["setup"][1], "setup")


@pytest.fixture
def snippet(tmp_path, monkeypatch):
    """Runs a snippet of the page after its setup, in tmp_path; returns its namespace."""
    def run_snippet(name: str) -> dict:
        framework, code = page_snippets()[name]
        needs(framework)
        monkeypatch.chdir(tmp_path)
        return run(code, name, setup_namespace())
    return run_snippet


def assert_params_close(ours, theirs):
    ours, theirs = list(ours), list(theirs)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=TOL, atol=TOL)


def logged_lrs(trainer) -> list[float]:
    return [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]


NOAM_LRS = [noam_lr(k, 32, 4) for k in range(6)]   # the page's D_MODEL, WARMUP and base lr 1.0


def test_the_page_holds_the_snippets_this_file_runs():
    snippets = page_snippets()
    assert set(snippets) == {"setup", "hf_optimizers", "hf_optimizer_cls", "hf_trainer_scheduler",
                             "lightning", "accelerate"}
    assert all(framework in FRAMEWORKS for name, (framework, _) in snippets.items() if name != "setup")
    # every python block on the page is one of them
    assert PAGE.read_text().count("```python") == len(snippets)
    namespace = setup_namespace()
    assert namespace["D_MODEL"] == 32 and namespace["WARMUP"] == 4 and len(namespace["dataset"]) == 64


# ---- HF Trainer ----------------------------------------------------------------------------

def hf_reference(optimizer_factory, **args):
    """The page's Trainer setup with another optimizer (and scheduler), from the same weights."""
    from transformers import Trainer, TrainingArguments
    namespace = setup_namespace()
    model = namespace["TinyRegressor"]()
    optimizers = optimizer_factory(model)
    settings = dict(output_dir="ref", max_steps=6, per_device_train_batch_size=8, logging_steps=1,
                    report_to="none")
    trainer = Trainer(model=model, args=TrainingArguments(**{**settings, **args}),
                      train_dataset=namespace["dataset"], optimizers=optimizers)
    trainer.train()
    return model, trainer


def test_hf_trainer_optimizers_logs_and_uses_the_in_op_lr(snippet):
    ns = snippet("hf_optimizers")
    assert logged_lrs(ns["trainer"]) == NOAM_LRS

    def torch_adamw(model):
        opt = torch.optim.AdamW(noam_ext.param_groups(model, weight_decay=0.01), lr=1.0, betas=(0.9, 0.98),
                                eps=1e-9, foreach=False)
        return opt, TransformerLRScheduler(opt, 32, 4)
    ref_model, ref_trainer = hf_reference(torch_adamw, max_grad_norm=1.0)
    assert logged_lrs(ref_trainer) == NOAM_LRS
    assert_params_close(ns["model"].parameters(), ref_model.parameters())


def test_hf_trainer_default_scheduler_is_refused_at_the_first_step(tmp_path, monkeypatch):
    needs("transformers")
    monkeypatch.chdir(tmp_path)

    def fused_without_scheduler(model):
        return FusedAdamW(model.parameters(), lr=1.0, schedule=Noam(32, 4)), None
    with pytest.raises(RuntimeError, match=r"optimizers=\(optimizer, noam_ext.InOpScheduleLR\(optimizer\)\)"):
        hf_reference(fused_without_scheduler)


def test_hf_trainer_optimizer_cls_and_kwargs_keeps_the_in_op_schedule(snippet):
    ns = snippet("hf_optimizer_cls")
    trainer = ns["trainer"]
    assert isinstance(trainer.lr_scheduler, InOpScheduleLR)
    assert logged_lrs(trainer) == NOAM_LRS
    inner = trainer.optimizer.optimizer   # accelerate's wrapper around the FusedAdamW
    assert isinstance(inner, FusedAdamW) and inner.schedule == Noam(32, 4)
    assert sorted(g["weight_decay"] for g in inner.param_groups) == [0.0, 0.01]


def test_hf_trainer_scheduler_drives_fused_adamw_as_torch_adamw(snippet):
    ns = snippet("hf_trainer_scheduler")
    ref_model, ref_trainer = hf_reference(lambda model: (None, None), lr_scheduler_type="cosine",
                                          warmup_steps=2, learning_rate=5e-4)
    assert isinstance(ref_trainer.optimizer.optimizer, torch.optim.AdamW)   # the Trainer's default
    assert logged_lrs(ns["trainer"]) == logged_lrs(ref_trainer)
    assert len(set(logged_lrs(ref_trainer))) > 3   # the schedule did move
    assert_params_close(ns["trainer"].model.parameters(), ref_model.parameters())


def test_hf_trainer_resumes_a_checkpoint_exactly(tmp_path, monkeypatch):
    needs("transformers")
    from transformers import Trainer, TrainingArguments
    monkeypatch.chdir(tmp_path)

    def train(output_dir, resume=None):
        namespace = setup_namespace()
        model = namespace["TinyRegressor"]()
        optimizer = FusedAdamW(model.parameters(), lr=1.0, schedule=Noam(32, 4))
        args = TrainingArguments(output_dir=output_dir, max_steps=6, per_device_train_batch_size=8,
                                 logging_steps=1, save_strategy="steps", save_steps=3, report_to="none")
        trainer = Trainer(model=model, args=args, train_dataset=namespace["dataset"],
                          optimizers=(optimizer, InOpScheduleLR(optimizer)))
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    whole, whole_trainer = train("whole")
    resumed, resumed_trainer = train("resumed", resume="whole/checkpoint-3")
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert logged_lrs(resumed_trainer) == logged_lrs(whole_trainer) == NOAM_LRS


# ---- Lightning -----------------------------------------------------------------------------

def lightning_fit(module, **trainer_args):
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision
    loader = torch.utils.data.DataLoader(setup_namespace()["dataset"], batch_size=8)
    settings = dict(accelerator="cpu", max_steps=6, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    plugins=[MixedPrecision("16-mixed", "cpu")])
    trainer = L.Trainer(**{**settings, **trainer_args})
    trainer.fit(module, loader)
    return trainer


def torch_lightning_module(lit_regressor_class):
    """The page's module with torch.optim.AdamW + TransformerLRScheduler and
    Lightning's own clipping (unscale_, then torch.nn.utils.clip_grad_norm_)."""
    class TorchReference(lit_regressor_class):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(noam_ext.param_groups(self.model, weight_decay=0.01), lr=1.0,
                                    betas=(0.9, 0.98), eps=1e-9, foreach=False)
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": TransformerLRScheduler(opt, 32, 4), "interval": "step"}}

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                gradient_clip_algorithm=gradient_clip_algorithm)
    return TorchReference


def test_lightning_fused_clip_reads_the_grad_scaler_and_matches_torch(snippet):
    ns = snippet("lightning")
    scaler = ns["trainer"].precision_plugin.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() < 2.0 ** 16   # it skipped overflows
    assert isinstance(ns["trainer"].lr_scheduler_configs[0].scheduler, InOpScheduleLR)
    setup_namespace()   # the same initial weights as the snippet's module
    reference = torch_lightning_module(ns["LitRegressor"])()
    ref_trainer = lightning_fit(reference)
    assert ref_trainer.precision_plugin.scaler.get_scale() == scaler.get_scale()
    assert_params_close(ns["module"].parameters(), reference.parameters())
    optimizer = ns["trainer"].optimizers[0]
    assert optimizer.get_last_lr() == [noam_lr(6, 32, 4)] * 2


def test_lightning_own_clipping_refuses_fused_adamw_under_16_mixed(tmp_path, monkeypatch):
    needs("lightning")
    import lightning as L
    monkeypatch.chdir(tmp_path)
    namespace = run(page_snippets()["lightning"][1].split("device = ")[0], "lightning-classes", setup_namespace())

    class OwnClipping(namespace["LitRegressor"]):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            L.LightningModule.configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        lightning_fit(OwnClipping())


@pytest.mark.parametrize("with_scheduler", [True, False], ids=["InOpScheduleLR", "no scheduler"])
def test_lightning_lr_monitor_logs_the_in_op_lr(tmp_path, monkeypatch, with_scheduler):
    needs("lightning")
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import Logger
    monkeypatch.chdir(tmp_path)
    namespace = run(page_snippets()["lightning"][1].split("device = ")[0], "lightning-classes", setup_namespace())

    class Recorder(Logger):
        name, version = "recorder", 0

        def __init__(self):
            super().__init__()
            self.metrics: list[dict] = []

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.metrics.append(dict(metrics))

    class Module(namespace["LitRegressor"]):
        def configure_optimizers(self):
            config = super().configure_optimizers()
            return config if with_scheduler else config["optimizer"]

    recorder = Recorder()
    lightning_fit(Module(), logger=recorder, log_every_n_steps=1, callbacks=[LearningRateMonitor("step")])
    lrs = [value for m in recorder.metrics for key, value in m.items() if key.startswith("lr-FusedAdamW")]
    assert lrs[:12] == [lr for lr in NOAM_LRS for _ in range(2)]   # two param groups, each step's lr


# ---- accelerate ----------------------------------------------------------------------------

def test_accelerate_reaches_the_fused_clip_through_the_wrapper(snippet):
    ns = snippet("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer
    optimizer = ns["optimizer"]
    assert isinstance(optimizer, AcceleratedOptimizer) and not hasattr(optimizer, "clip_grad_norm_")
    assert ns["accelerator"].scaler is None   # on the CPU (see the page)
    assert ns["scheduler"].get_last_lr() == [noam_lr(8, 32, 4)] * 2

    # The same loop, plain torch: AdamW + TransformerLRScheduler + clip_grad_norm_.
    namespace = setup_namespace()
    model = namespace["TinyRegressor"]()
    opt = torch.optim.AdamW(noam_ext.param_groups(model, weight_decay=0.01), lr=1.0, betas=(0.9, 0.98),
                            eps=1e-9, foreach=False)
    sched = TransformerLRScheduler(opt, 32, 4)
    for batch in torch.utils.data.DataLoader(namespace["dataset"], batch_size=8):
        model(**batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
    assert_params_close(ns["model"].parameters(), model.parameters())


def test_accelerate_grad_scaler_path_matches_torch_and_never_reports_a_skipped_step():
    needs("accelerate")
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    Accelerator()   # the state AcceleratedOptimizer reads
    runs = {}
    for kind in ("ours", "torch"):
        namespace = setup_namespace()
        model = namespace["TinyRegressor"]()
        groups = noam_ext.param_groups(model, weight_decay=0.01)
        kw = dict(lr=1.0, betas=(0.9, 0.98), eps=1e-9)
        if kind == "ours":
            inner, sched = FusedAdamW(groups, **kw, schedule=Noam(32, 4)), None
        else:
            inner = torch.optim.AdamW(groups, **kw, foreach=False)
            sched = TransformerLRScheduler(inner, 32, 4)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        optimizer = AcceleratedOptimizer(inner, scaler=scaler)   # what accelerate builds for fp16 on a GPU
        skipped = []
        for k, batch in enumerate(torch.utils.data.DataLoader(namespace["dataset"], batch_size=8)):
            scaler.scale(model(**batch)["loss"]).backward()
            if k == 2:
                next(model.parameters()).grad.view(-1)[0] = float("inf")   # an overflowed step
            if kind == "ours":
                inner.clip_grad_norm_(1.0, scaler=scaler)
            else:   # accelerator.clip_grad_norm_: unscale through the scaler, then torch's clip
                scaler.unscale_(inner)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            skipped.append(optimizer.step_was_skipped)
            if sched is not None:
                sched.step()   # every iteration, as the in-op schedule advances (see the page)
            optimizer.zero_grad()
        runs[kind] = model, scaler, skipped
    assert runs["ours"][1].get_scale() == runs["torch"][1].get_scale() == 2.0 ** 9
    assert runs["torch"][2] == [k == 2 for k in range(8)]   # accelerate would skip the scheduler's step
    assert runs["ours"][2] == [False] * 8                   # ours skipped inside the op
    assert_params_close(runs["ours"][0].parameters(), runs["torch"][0].parameters())
