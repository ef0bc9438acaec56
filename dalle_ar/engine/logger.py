"""Run logging on rank 0: `<out>/metrics.jsonl` always (the loss curve without wandb), and wandb when on.
wandb is imported only here, and only when a run turns it on."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


class RunLogger:
    def __init__(self, out: Path, *, enabled: bool):
        self.out, self.enabled, self.wandb_run = out, enabled, None

    def start_wandb(self, mode: str, project: str, name: str, config: dict, entity: str = "") -> None:
        """One wandb run per output directory: its id is kept in `<out>/wandb_run_id`, so a resumed training run
        continues the same wandb run (online too) instead of opening a new one."""
        if not self.enabled or mode == "disabled":
            return
        import wandb

        # A parent process that used wandb leaves WANDB_SERVICE to its children, and wandb would route this run
        # through the parent's service: it still holds the id of a run of ours killed mid-step, and refuses the resume
        # ("run ID ... is in use"). A trainer talks to a service of its own (the token names the pid that started it).
        service = os.environ.get("WANDB_SERVICE", "").split("-")
        if len(service) > 1 and service[1] != str(os.getpid()):
            del os.environ["WANDB_SERVICE"]
        id_file = self.out / "wandb_run_id"
        if not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:8])  # wandb's own ids are 8 lowercase characters too
        self.wandb_run = wandb.init(mode=mode, project=project, entity=entity or None, dir=str(self.out), name=name,
                                    id=id_file.read_text().strip(), resume="allow", config=config,
                                    settings=wandb.Settings(console="off", silent=True))

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}) + "\n")

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        """A PNG already written to disk (sample or reconstruction grid); wandb only."""
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self, summary: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary)
            self.wandb_run.finish()
