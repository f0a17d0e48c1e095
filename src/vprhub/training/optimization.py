"""Optimizer over the trainable parameters only, and the learning-rate schedules of the recipes."""

from __future__ import annotations

import torch

from .args import TrainArguments


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters with ``requires_grad`` (``mark_trainable`` froze the rest); error if none."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError(f"{type(model).__name__} has no trainable parameter")
    return parameters


def build_optimizer(parameters: list[torch.nn.Parameter], args: TrainArguments) -> torch.optim.Optimizer:
    """AdamW (SALAD), Adam (SelaVPR, CricaVPR) or SGD with momentum; fused unless ``--fused_optimizer false``."""
    options = dict(lr=args.learning_rate, weight_decay=args.weight_decay, fused=args.fused_optimizer)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(parameters, **options)
    if args.optimizer == "adam":
        return torch.optim.Adam(parameters, **options)
    return torch.optim.SGD(parameters, momentum=args.momentum, **options)


def build_scheduler(
    optimizer: torch.optim.Optimizer, args: TrainArguments, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """``linear``: factor 1 down to ``lr_end_factor`` over ``lr_decay_steps`` steps, then flat (SALAD);
    ``step``: times ``lr_gamma`` every ``lr_step_epochs`` epochs (CricaVPR); ``constant`` (SelaVPR).
    """
    schedulers = torch.optim.lr_scheduler
    if args.lr_scheduler == "linear":
        return schedulers.LinearLR(optimizer, 1.0, args.lr_end_factor, total_iters=args.lr_decay_steps)
    if args.lr_scheduler == "step":
        return schedulers.StepLR(
            optimizer, step_size=max(1, args.lr_step_epochs * steps_per_epoch), gamma=args.lr_gamma
        )
    return schedulers.ConstantLR(optimizer, factor=1.0, total_iters=0)
