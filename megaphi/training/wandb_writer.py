"""Weights & Biases as a metrics sink (--wandb-project): an optional extra, imported only when asked.

The scalars are the ones TensorBoard gets, under the same (Megatron) names, at step = iteration.
WANDB_MODE=offline keeps everything in --wandb-save-dir for a later `wandb sync`: no network needed.
A run's W&B id is kept in RUN_ID_NAME inside --save (else the W&B folder), so a resumed run logs to
the same W&B run (resume="allow") instead of starting a new one.
"""

import os

RUN_ID_NAME = "wandb_run_id"


def _read_run_id(path):
    try:
        with open(path) as f:
            run_id = f.read().strip()
    except FileNotFoundError:
        return None
    return run_id or None


def _write_run_id(path, run_id):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(run_id + "\n")
    os.replace(tmp, path)  # whole or absent: a crash never leaves half an id


class WandbWriter:
    def __init__(self, project, name=None, save_dir=None, config=None, id_dir=None):
        """id_dir: where the run id is kept (the run's --save folder); a later run with the same id_dir
        continues the same W&B run."""
        try:
            import wandb
        except ImportError as e:
            raise RuntimeError(f"--wandb-project needs the wandb package: pip install wandb ({e})") from None
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        id_path = os.path.join(id_dir, RUN_ID_NAME) if id_dir else None
        run_id = _read_run_id(id_path) if id_path else None
        self.resumed = run_id is not None
        if run_id is None:
            run_id = wandb.util.generate_id()
        self.run = wandb.init(project=project, name=name, dir=save_dir, config=config or {}, id=run_id, resume="allow")
        if id_path and not self.resumed:
            _write_run_id(id_path, self.run.id)

    def add_scalars(self, scalars, step):
        self.run.log(dict(scalars), step=step)

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


def wandb_config(args):
    """The run's flags as W&B's config: plain values only (paths, numbers, flags)."""
    return {
        k: v
        for k, v in vars(args).items()
        if isinstance(v, (str, int, float, bool, type(None)))
        or (isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v))
    }
