"""Remedies beyond clipping inside the training step (README, "Remedies beyond clipping").

:class:`Remedies` is what :class:`~pipeline.training.module.RNNTrainingModule` carries for the ``remedy``
config section: the penalty added to the loss (Pascanu's Omega every step, gradient flossing at its
cadence; the mathematics is :mod:`pipeline.bptt.remedies`), and the decision, per step, whether the
update is applied, skipped or stops the run (:class:`SpikeSkip`, the divergence guard beside it). Its
state lives on the module (the skip window, the counters, the latest values), so it is checkpointed with
the module and a trainer that stacks several modules can see which remedies each one carries.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.bptt import remedies as penalties
from pipeline.config import Config, SkipConfig
from pipeline.training.tasks import Task

APPLY, SKIP, STOP = 0, 1, 2  # what becomes of a step's update (Remedies.gate)
SKIPPED_STEPS = "train/skipped_steps"  # metric: steps skipped so far (README, "The MLflow record")
REMEDY_TAG = "remedy"  # tag: the active remedies, comma-separated, or "none"
SKIPPED_TAG = "skipped_steps"  # tag: the run's final count of skipped steps (runs with remedy.skip only)
FLOSS_SEED_OFFSET = 3  # the flossing tangents' generator: seed + 3 (data: seed, seed + 1, seed + 2)


class SpikeSkip:
    """Rolling z-score of the pre-clip gradient norm and the loss (OLMo-core's SkipStepOptimizer).

    A step is skipped when its value exceeds the mean of the window's finite steps by more than
    ``zscore`` standard deviations (one-sided: only upward spikes; unbiased standard deviation over the
    steps before it, as OLMo-core), once the window holds ``warmup`` finite steps. Every finite step
    enters the window, skipped or not, as in OLMo-core: a lasting change of level is learned, not
    skipped forever. A non-finite step is skipped too (the alternative to stopping at divergence) and
    does not enter the window. ``max_consecutive`` skipped steps in a row stop the run as diverged.
    The window lives on the device; :meth:`decide` reads one integer from it per step, the read the
    divergence guard needs anyway.
    """

    def __init__(self, cfg: SkipConfig):
        self.cfg = cfg
        self.buf: torch.Tensor | None = (
            None  # [window, 2] float64: (grad norm, loss) of the latest finite steps
        )
        self.filled = 0  # finite steps pushed so far (counted on the host: no read needed)
        self.streak = 0  # skipped steps in a row
        self.count = 0  # skipped steps so far (not the step that stopped the run)
        cols = {"both": [0, 1], "grad_norm": [0], "loss": [1]}[cfg.signal]
        self._cols = cols

    def decide(self, pre: torch.Tensor, loss: torch.Tensor) -> int:
        """APPLY, SKIP or STOP for this step's pre-clip norm and loss (0-d float64 tensors on the device)."""
        c = self.cfg
        x = torch.stack([pre.reshape(()), loss.reshape(())])
        if self.buf is None:
            self.buf = x.new_zeros(c.window, 2)
        n = min(self.filled, c.window)
        code = torch.where(torch.isfinite(x).all(), 0, 2)
        if n >= c.warmup:
            std, mean = torch.std_mean(self.buf[:n], dim=0)
            spike = ((x - mean) > c.zscore * std)[self._cols].any()
            code = torch.where((code == 0) & spike, 1, code)
        decision = int(code)  # the one host read per step
        if decision != 2:
            self.buf[self.filled % c.window] = x
            self.filled += 1
        if decision == 0:
            self.streak = 0
            return APPLY
        self.streak += 1
        if self.streak >= c.max_consecutive:
            return STOP
        self.count += 1
        return SKIP

    def state_dict(self) -> dict[str, Any]:
        buf = None if self.buf is None else self.buf.detach().cpu()
        return {"buf": buf, "filled": self.filled, "streak": self.streak, "count": self.count}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.buf = None if state["buf"] is None else state["buf"].to(device)
        self.filled, self.streak, self.count = int(state["filled"]), int(state["streak"]), int(state["count"])


class Remedies:
    """The ``remedy`` section of one run, applied by the training module.

    ``penalty`` (in ``training_step``): ``remedy.omega * Omega`` every step and ``remedy.floss.weight *
    sum_i lambda_i^2`` on flossing steps, on the model's live twin params (``RNNModel.live_params``);
    the latest values stay on the device for the step's record (:attr:`last_omega`, :attr:`last_floss`,
    :attr:`last_lyapunov`). ``gate`` (in ``configure_gradient_clipping``): the divergence guard, or with
    ``remedy.skip`` the spike skip, which also handles non-finite steps.
    """

    def __init__(self, cfg: Config, task: Task):
        self.cfg, self.task = cfg.remedy, task
        self.seed = cfg.seed + FLOSS_SEED_OFFSET
        self.skip = SpikeSkip(cfg.remedy.skip) if cfg.remedy.skip.zscore > 0 else None
        self.last_omega: torch.Tensor | None = None
        self.last_floss: torch.Tensor | None = None
        self.last_lyapunov: torch.Tensor | None = None

    @property
    def active(self) -> tuple[str, ...]:
        return self.cfg.active

    def flosses_at(self, step: int) -> bool:
        f = self.cfg.floss
        return f.weight > 0 and step % f.every == 0 and (f.until is None or step < f.until)

    def penalty(self, model, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor | None:
        """The remedies' terms to add to this step's loss (None when none acts at ``step``)."""
        self.last_omega = self.last_floss = self.last_lyapunov = None
        omega_on, floss_on = self.cfg.omega > 0, self.flosses_at(step)
        if not (omega_on or floss_on):
            return None
        params = model.live_params()
        total = x.new_zeros(())
        if omega_on:
            om = penalties.omega(params, x, y, self.task.loss, self.task.readout)
            self.last_omega = om.detach()
            total = total + self.cfg.omega * om
        if floss_on:
            f = self.cfg.floss
            lam = penalties.lyapunov_spectrum(params, x[: f.batch], f.exponents, seed=self.seed)
            fl = (lam * lam).sum()  # Engelken 2023: push the k largest exponents toward 0
            self.last_lyapunov, self.last_floss = lam.detach(), fl.detach()
            total = total + f.weight * fl
        return total

    def record(self, like: torch.Tensor) -> list[torch.Tensor]:
        """This step's ``omega`` and ``floss`` fields of the record (NaN where not computed)."""
        nan = like.new_tensor(float("nan"))
        return [
            nan if v is None else v.to(like.dtype).reshape(()) for v in (self.last_omega, self.last_floss)
        ]

    def gate(self, pre: torch.Tensor, loss: torch.Tensor) -> int:
        """APPLY, SKIP or STOP: one host read. Without ``remedy.skip``, the divergence guard: a non-finite
        loss or gradient stops (README, "Regime verdict")."""
        if self.skip is not None:
            return self.skip.decide(pre, loss)
        return APPLY if bool(torch.isfinite(pre) & torch.isfinite(loss)) else STOP

    @property
    def skipped(self) -> int:
        return self.skip.count if self.skip is not None else 0


def remedy_summary(cfg: Config, remedies: Remedies | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's final remedy metrics and tags: ``remedy`` always; with ``remedy.skip`` the skipped count
    as the metric ``train/skipped_steps`` and the tag ``skipped_steps``."""
    tags: dict[str, Any] = {REMEDY_TAG: ",".join(cfg.remedy.active) or "none"}
    metrics: dict[str, Any] = {}
    if remedies is not None and remedies.skip is not None:
        metrics[SKIPPED_STEPS] = remedies.skipped
        tags[SKIPPED_TAG] = remedies.skipped
    return metrics, tags
