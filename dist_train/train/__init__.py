"""The training core, read top-down:

trainer.py       `train`: one invocation of a run, from the plan to the last save
loop.py          the loop: steps, scheduled evaluation and checkpoints, component hooks
interval.py      what the loop logs every train.log_every steps; the non-finite checks
evaluation.py    validation metrics, the same on every rank (training and `dist-train eval`)
plan.py          what a run derives from its config, once: resume, batch, steps
batch_search.py  data.batch_size=auto: the largest micro-batch that fits
assembly.py      Run and assemble(): a run's parts, for training and every tool
checkpointer.py  what a run saves (declared once), when, and how (sync or async)
step.py          one optimizer step: forward_backward and optimizer_step
"""
