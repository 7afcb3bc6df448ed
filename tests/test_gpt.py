"""The GPT language model and the byte-level text pipeline it trains on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, metrics_records, tiny_overrides, write_text_corpus

from dist_train.config import ConfigError, DataConfig, ModelConfig, load_config
from dist_train.data import DataError, build_datasets, stdlib_sources
from dist_train.gpt import GPT
from dist_train.models import build_model
from dist_train.train.trainer import train


@pytest.mark.unit
def test_gpt_shapes_tied_embeddings_and_init():
    torch.manual_seed(0)
    model = GPT(vocab_size=256, context=16, n_layer=3, n_head=2, width=32)
    assert model(torch.randint(0, 256, (2, 16))).shape == (2, 16, 256)
    assert model.head.weight is model.token_embedding.weight
    residual_std = model.blocks[0].attn.proj.weight.std().item()
    assert residual_std == pytest.approx(0.02 / math.sqrt(6), rel=0.2)
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.unit
def test_gpt_is_causal():
    torch.manual_seed(0)
    model = GPT(vocab_size=256, context=12, n_layer=2, n_head=2, width=16).eval()
    tokens = torch.randint(0, 256, (1, 12))
    changed = tokens.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 256
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])  # the past never sees the future
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.unit
def test_flops_per_token_is_six_n_plus_attention():
    model = GPT(vocab_size=256, context=64, n_layer=2, n_head=4, width=64)
    n = sum(p.numel() for p in model.parameters()) - 64 * 64  # position embeddings do no matmuls
    assert model.flops_per_token() == 6 * n + 12 * 2 * 64 * 64


@pytest.mark.unit
def test_text_splits_by_file_and_shifts_targets(tmp_path):
    paths = write_text_corpus(tmp_path)
    data = build_datasets(DataConfig(dataset="text", paths=paths, seq_len=16, val_fraction=0.34))
    assert data.spec.input_shape == (16,) and data.spec.num_classes == 256
    x, y = data.train[3]
    assert x.shape == y.shape == (16,) and x.dtype == torch.long
    assert torch.equal(x[1:], y[:-1])  # targets are the next byte
    total_bytes = sum(p.stat().st_size for p in tmp_path.glob("*.py")) + 4  # 4 NUL separators
    assert len(data.val) * 16 < total_bytes * 0.5 and len(data.train) > len(data.val)
    train_bytes = bytes(data.train.tokens.tolist())
    val_bytes = bytes(data.val.tokens.tolist())
    assert b"def f" in train_bytes and not set(train_bytes.split(b"\0")) & set(val_bytes.split(b"\0"))


@pytest.mark.unit
def test_text_errors(tmp_path):
    with pytest.raises(DataError, match="matched no files"):
        build_datasets(DataConfig(dataset="text", paths=[str(tmp_path / "none*.txt")]))
    (tmp_path / "one.txt").write_text("x" * 1000)
    with pytest.raises(DataError, match="at least 2 files"):
        build_datasets(DataConfig(dataset="text", paths=[str(tmp_path / "*.txt")]))
    with pytest.raises(ConfigError, match="needs token sequences"):
        build_model(ModelConfig(name="gpt"), build_datasets(DataConfig(dataset="digits")).spec)


@pytest.mark.unit
def test_default_corpus_is_the_standard_library():
    files = stdlib_sources()
    assert len(files) > 100 and any(f.name == "os.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


@pytest.mark.system
def test_gpt_learns_below_the_unigram_baseline(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    paths = write_text_corpus(tmp_path / "corpus")
    overrides = tiny_overrides(
        tmp_path,
        **{
            "data.dataset": "text",
            "data.paths": json.dumps(paths),
            "data.seq_len": 32,
            "model.name": "gpt",
            "model.n_layer": 2,
            "model.width": 32,
            "model.n_head": 2,
            "optim.name": "adamw",
            "optim.lr": 0.01,
            "schedule.warmup_steps": 5,
            "train.max_steps": 60,
            "train.log_every": 20,
            "checkpoint.every_steps": 0,
            "train.peak_tflops": 0.05,  # a made-up peak, so that MFU is reported on CPU
        },
    )
    cfg = load_config("configs/gpt_cpu.yaml", overrides)
    result = train(cfg)
    data = build_datasets(cfg.data)
    counts = torch.bincount(data.train.tokens.long(), minlength=256).double() + 1
    log_p = (counts / counts.sum()).log()
    unigram_loss = -log_p[data.val.tokens.long()].mean().item()
    assert data.baseline_val_loss == pytest.approx(unigram_loss)
    # val_loss / unigram_loss over run.seed 0-99 (AMD EPYC, 2 cores, 2026-12-03): 0.33-0.74,
    # median 0.43; 2 of the 100 end above 0.7, so the bar is 0.9: still well below the baseline.
    assert result.eval_metrics["val_loss"] < 0.9 * unigram_loss
    logged = metrics_records(cfg.run_dir)
    flops = GPT(vocab_size=256, context=32, n_layer=2, n_head=2, width=32).flops_per_token()
    for record in (r for r in logged if "loss" in r):
        assert record["tokens_per_s"] == pytest.approx(record["samples_per_s"] * 32)
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * flops / 0.05e12)
