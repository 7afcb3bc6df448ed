"""The offline tools, each behind a `dist-train` verb:

  find_lr.py          find-lr: the LR range test on the run's real global batch
  find_batch.py       find-batch: the largest micro-batch that fits (train/batch_search.py)
  evaluate.py         eval: a checkpoint's metrics on any number of processes
  prune.py            prune's report: the pruned run (a training run whose masks are
                      components/sparsity.py's) against the checkpoint it started from
  quantize.py         quantize: post-training int8 with torchao, for CPU inference
  compress_report.py  what pruning and quantization cost in accuracy and bought in size
  report.py           report: a run's metrics as plots and one HTML page

Each builds what it trains or evaluates with the training core's assemble()
(train/assembly.py), so a tool measures the model training would train.
"""
