"""Where training stands (TrainState) and what it started from (WarmStart): the one record the
start decision fills, the loop advances and every checkpoint saves (its state.json and best.npz)."""

import dataclasses
from typing import List, Optional

import numpy as np
from absl import logging

from trainer.errors import UserError


@dataclasses.dataclass(frozen=True)
class WarmStart:
  """What a job's weights started from, as the report and the retraining history say it:
  {"used", "from", "version"} of an export version offered, and "reason" when not used."""
  used: bool = False
  reason: Optional[str] = None
  source: Optional[str] = None  # the version folder offered ("from"); None: none was
  version: Optional[int] = None

  def to_json(self):
    said = {"used": self.used}
    if self.source is not None:
      said.update({"from": self.source, "version": self.version})
    return {**said, **({"reason": self.reason} if self.reason is not None else {})}

  @classmethod
  def from_json(cls, said):
    return cls(used=said["used"], reason=said.get("reason"), source=said.get("from"), version=said.get("version"))


# A job that is not a retrain (trainer.task) is offered no version: random weights.
NOT_A_RETRAIN = WarmStart(reason="not a retrain")


@dataclasses.dataclass
class TrainState:
  """Where training stands. The fields up to warm_start are saved in every checkpoint's state.json:
  with the variables and best_weights (best.npz), all a resumed job needs to go on exactly where
  the last one stopped."""
  epoch: int = 0  # epochs completed
  step: int = 0  # training steps completed in the current epoch
  global_step: int = 0
  loss: List[float] = dataclasses.field(default_factory=list)  # per completed epoch
  val_loss: List[float] = dataclasses.field(default_factory=list)
  best_epoch: int = 0
  # Loss sum and example count of the current epoch's completed steps: a resumed epoch's loss is exact.
  partial: List[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])
  num_replicas: int = 1
  # What the first attempt started from (trainer.start decides it); a resumed job reports the same.
  warm_start: Optional[WarmStart] = None
  # Not in state.json:
  best_weights: Optional[List[np.ndarray]] = None  # of best_epoch (best.npz): early stopping restores them
  checkpoint: Optional[str] = None  # the last good checkpoint: the one resumed from until the next save
  resumed_from: Optional[dict] = None  # the report's: checkpoint, epoch, step, global_step; None: a new job

  _SAVED = ("epoch", "step", "global_step", "loss", "val_loss", "best_epoch", "partial", "num_replicas")

  def to_json(self):
    """What state.json holds."""
    saved = {name: getattr(self, name) for name in self._SAVED}
    return {**saved, "warm_start": self.warm_start and self.warm_start.to_json()}

  @classmethod
  def from_saved(cls, saved, best_weights, folder):
    """The state a checkpoint's state.json and best.npz hold. One of an older layout lacks later
    fields: they take their defaults (partial: that epoch's loss counts the steps after the resume only)."""
    essential = [name for name in ("epoch", "step", "global_step") if name not in saved]
    if essential:
      raise UserError(f"{folder}/state.json has no {', '.join(essential)}: a checkpoint layout this version cannot "
                      "resume; use --restart to train from scratch, or another --job_dir")
    missing = [name for name in cls._SAVED if name not in saved]
    if missing:
      logging.warning("checkpoint %s is of an older layout without %s: taking their defaults", folder,
                      ", ".join(missing))
    state = cls(**{name: saved[name] for name in cls._SAVED if name in saved}, best_weights=best_weights,
                checkpoint=folder)
    if saved.get("warm_start"):  # null in checkpoints of earlier versions' jobs offered no version
      state.warm_start = WarmStart.from_json(saved["warm_start"])
    state.resumed_from = {"checkpoint": folder, "epoch": state.epoch, "step": state.step,
                          "global_step": state.global_step}
    return state

  def done(self, epochs, patience):
    return self.epoch >= epochs or (self.best_epoch > 0 and self.epoch - self.best_epoch >= patience)

  def end_epoch(self, loss, val_loss):
    """Records a completed epoch; returns whether its validation loss is the best so far (the
    caller keeps that epoch's weights)."""
    self.epoch, self.step, self.partial = self.epoch + 1, 0, [0.0, 0.0]
    self.loss.append(float(loss))
    self.val_loss.append(float(val_loss))
    improved = self.best_epoch == 0 or val_loss < self.val_loss[self.best_epoch - 1]
    if improved:
      self.best_epoch = self.epoch
    return improved

  def history(self):
    """What fit returns."""
    return {"loss": self.loss, "val_loss": self.val_loss, "best_epoch": self.best_epoch,
            "global_step": self.global_step}
