"""Weights & Biases as a metrics sink (--wandb-project): an optional extra, imported only when asked.

The scalars are the ones TensorBoard gets, under the same (Megatron) names, at step = iteration.
WANDB_MODE=offline keeps everything in --wandb-save-dir for a later `wandb sync`: no network needed.
"""
import os


class WandbWriter:
    def __init__(self, project, name=None, save_dir=None, config=None):
        try:
            import wandb
        except ImportError as e:
            raise RuntimeError(f"--wandb-project needs the wandb package: pip install wandb ({e})") from None
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=save_dir, config=config or {})

    def add_scalars(self, scalars, step):
        self.run.log(dict(scalars), step=step)

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


def wandb_config(args):
    """The run's flags as W&B's config: plain values only (paths, numbers, flags)."""
    return {k: v for k, v in vars(args).items()
            if isinstance(v, (str, int, float, bool, type(None))) or
            (isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v))}
