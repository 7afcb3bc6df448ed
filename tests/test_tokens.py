"""Pre-tokenized data: dist-train tokenize / verify-tokens, the shard format, data.dataset=tokens
(memory-mapped, trained on, resumed across world sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO, cli_env, run_cli, tiny_overrides, write_text_corpus

import dist_train
from dist_train import checkpoint
from dist_train.cli import main
from dist_train.config import DataConfig, ModelConfig, load_config
from dist_train.data import build_datasets
from dist_train.data.tokens import (
    HEADER,
    TokenWindows,
    iter_documents,
    load_tokenizer,
    open_shard,
    read_header,
    split_documents,
    write_shard,
)
from dist_train.models import build_model


def _documents(folder, count=6):
    """Text files with non-ASCII characters, so byte and BPE round trips cover multi-byte UTF-8."""
    write_text_corpus(folder, count)
    for i, path in enumerate(sorted(folder.glob("*.py"))):
        path.write_text(path.read_text() + f"# größe {i} → ünïcødé ✓\n")
    return sorted(folder.glob("*.py"))


@pytest.mark.unit
@pytest.mark.parametrize(("tokenizer", "extra", "vocab"), [("byte", [], 256), ("gpt2", ["--vocab-size", "300"], 300)])
def test_round_trip_decodes_to_the_documents(tmp_path, tokenizer, extra, vocab):
    files = _documents(tmp_path / "corpus")
    out = tmp_path / "out"
    assert main(["tokenize", "--tokenizer", tokenizer, *extra, "--out", str(out), str(tmp_path / "corpus/*.py")]) == 0
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["vocab_size"] == vocab and manifest["dtype"] == "uint16"
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json",
        "tokenizer.json",
        "train_000000.bin",
        "val_000000.bin",
    ]
    decoder = load_tokenizer(out)
    decoded = {path: decoder.decode(ids.tolist()) for path, ids in iter_documents(out)}
    assert decoded == {str(p): p.read_text() for p in files}
    # Shards hold exactly the documents' tokens (plus gpt2's separator after each), in order.
    total = sum(read_header(out / s["file"]).count for split in ("train", "val") for s in manifest["shards"][split])
    separators = len(files) if tokenizer == "gpt2" else 0
    assert total == sum(len(ids) for _, ids in iter_documents(out)) + separators
    if tokenizer == "byte":
        assert total == sum(p.stat().st_size for p in files)  # one token per byte
        assert decoder.encode(files[0].read_text()).ids == list(files[0].read_bytes())  # the saved tokenizer agrees
    else:
        assert total < 0.7 * sum(p.stat().st_size for p in files)  # merges compress the text


@pytest.mark.unit
def test_dtype_follows_the_vocabulary(tmp_path):
    rng = np.random.default_rng(0)
    for vocab, width in ((256, 2), (65535, 2), (65536, 4), (70000, 4)):
        tokens = rng.integers(0, vocab, 1000)
        tokens[0] = vocab - 1  # the largest id must survive
        path = tmp_path / f"v{vocab}.bin"
        write_shard(path, tokens, vocab)
        assert path.stat().st_size == HEADER.size + 1000 * width
        header = read_header(path)
        assert (header.count, header.vocab_size, header.dtype.itemsize) == (1000, vocab, width)
        assert np.array_equal(open_shard(path), tokens)


@pytest.mark.unit
def test_a_tokenizer_json_with_a_large_vocabulary_writes_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70000)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(tmp_path / "words.json"))
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"w{69999 - i} w1 w{i}")
    out = tmp_path / "out"
    assert (
        main(["tokenize", "--tokenizer", str(tmp_path / "words.json"), "--out", str(out), str(tmp_path / "*.txt")]) == 0
    )
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 70000
    docs = {path: ids.tolist() for path, ids in iter_documents(out)}
    assert docs[str(tmp_path / "doc0.txt")] == [69999, 1, 0]
    assert main(["verify-tokens", str(out)]) == 0


@pytest.mark.unit
def test_split_is_by_document_and_deterministic(tmp_path):
    files = _documents(tmp_path / "corpus", count=10)
    for name in ("a", "b"):
        args = ["tokenize", "--val-fraction", "0.3", "--out", str(tmp_path / name), str(tmp_path / "corpus/*.py")]
        assert main(args) == 0
    manifest = json.loads((tmp_path / "a" / "index.json").read_text())
    by_split = {s: {d["path"] for d in manifest["documents"] if d["split"] == s} for s in ("train", "val")}
    assert len(by_split["val"]) == 3 and len(by_split["train"]) == 7 and not by_split["train"] & by_split["val"]
    train, val = split_documents(files, 0.3)
    assert by_split == {"train": set(map(str, train)), "val": set(map(str, val))}
    # Training windows never contain a validation document's text.
    val_text = {p.read_text() for p in val}
    train_text = load_tokenizer(tmp_path / "a").decode(open_shard(tmp_path / "a" / "train_000000.bin").tolist())
    assert not any(text in train_text for text in val_text)
    for name in ("index.json", "train_000000.bin", "val_000000.bin"):  # the same input, the same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.unit
def test_shards_split_at_document_boundaries(tmp_path):
    _documents(tmp_path / "corpus", count=8)
    out = tmp_path / "out"
    assert main(["tokenize", "--shard-tokens", "5000", "--out", str(out), str(tmp_path / "corpus/*.py")]) == 0
    manifest = json.loads((out / "index.json").read_text())
    assert len(manifest["shards"]["train"]) >= 3  # ~2,200-byte documents, two per shard
    assert all(s["tokens"] <= 5000 for s in manifest["shards"]["train"])
    assert main(["verify-tokens", str(out)]) == 0
    train = build_datasets(DataConfig(dataset="tokens", paths=[str(out)], seq_len=64)).train
    expected = sum((s["tokens"] - 1) // 64 for s in manifest["shards"]["train"])
    assert len(train) == expected  # windows are counted per shard: none straddles two
    last = torch.cat([torch.cat([x, y[-1:]]) for x, y in (train[i] for i in range(len(train)))])
    assert last.max() < 256 and len(last) == expected * 65


@pytest.mark.unit
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    corpus = str(tmp_path / "corpus/*.py")
    _documents(tmp_path / "corpus")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "corpus" / "latin1.py").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: BPE refuses
    cases = [
        (["--out", str(tmp_path / "o"), str(tmp_path / "none/*.txt")], "no files matched"),
        (["--out", str(tmp_path / "full"), corpus], "exists and is not an empty directory"),
        (["--tokenizer", "gpt2", "--vocab-size", "100", "--out", str(tmp_path / "o"), corpus], "at least 257"),
        (["--vocab-size", "300", "--out", str(tmp_path / "o"), corpus], "applies to --tokenizer gpt2"),
        (["--tokenizer", "nope.json", "--out", str(tmp_path / "o"), corpus], "--tokenizer must be"),
        (["--tokenizer", "gpt2", "--vocab-size", "300", "--out", str(tmp_path / "o"), corpus], "is not UTF-8"),
    ]
    for args, message in cases:
        assert main(["tokenize", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "full"]  # no output, no temp dir


def _good_shards(tmp_path):
    _documents(tmp_path / "corpus")
    out = tmp_path / "out"
    assert main(["tokenize", "--out", str(out), str(tmp_path / "corpus/*.py")]) == 0
    return out


@pytest.mark.unit
def test_verify_tokens_passes_good_shards_and_names_the_first_problem(tmp_path, capsys):
    out = _good_shards(tmp_path)
    capsys.readouterr()
    assert main(["verify-tokens", str(out)]) == 0
    assert "OK: 1 train shard(s)" in capsys.readouterr().out
    shard = out / "train_000000.bin"
    good = shard.read_bytes()

    def fails(data: bytes, message: str) -> None:
        shard.write_bytes(data)
        assert main(["verify-tokens", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    fails(good[:-3], "but the header's")  # truncated
    fails(b"XXTOKENS" + good[8:], "not a token shard")  # corrupted magic
    fails(good[:8] + (7).to_bytes(4, "little") + good[12:], "format version 7")
    fails(good[:12] + (3).to_bytes(4, "little") + good[16:], "3 bytes per token")
    fails(good[: HEADER.size] + (300).to_bytes(2, "little") + good[HEADER.size + 2 :], "token id 300 is outside")
    manifest = json.loads((out / "index.json").read_text())
    manifest["shards"]["train"][0]["tokens"] += 1
    shard.write_bytes(good)
    (out / "index.json").write_text(json.dumps(manifest))
    assert main(["verify-tokens", str(out)]) == 2
    assert "the manifest says" in capsys.readouterr().err
    assert main(["verify-tokens", str(tmp_path / "corpus")]) == 2
    assert "has no index.json" in capsys.readouterr().err


@pytest.mark.unit
def test_tokens_dataset_serves_shifted_windows_with_the_shards_vocabulary(tmp_path):
    _documents(tmp_path / "corpus")
    out = tmp_path / "out"
    assert (
        main(
            ["tokenize", "--tokenizer", "gpt2", "--vocab-size", "300", "--out", str(out), str(tmp_path / "corpus/*.py")]
        )
        == 0
    )
    data = build_datasets(DataConfig(dataset="tokens", paths=[str(out)], seq_len=16))
    assert data.spec.input_shape == (16,) and data.spec.num_classes == 300
    x, y = data.train[5]
    assert x.dtype == torch.long and torch.equal(x[1:], y[:-1])
    shard = open_shard(out / "train_000000.bin")
    assert torch.equal(x, torch.from_numpy(shard[80:96].astype(np.int64)))
    assert 0 < data.baseline_val_loss < np.log(300)
    model = build_model(ModelConfig(name="gpt", n_layer=1, n_head=2, width=16), data.spec)
    assert model.token_embedding.weight.shape == (300, 16)
    with pytest.raises(Exception, match="one directory"):
        build_datasets(DataConfig(dataset="tokens", paths=[]))
    with pytest.raises(Exception, match="no window"):
        build_datasets(DataConfig(dataset="tokens", paths=[str(out)], seq_len=100000))


@pytest.mark.unit
def test_windows_pickle_without_their_mappings(tmp_path):
    # A spawned loader worker gets the dataset pickled: it must map the shards itself, not
    # receive a copy of every token read so far.
    import pickle

    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(200_000) % 1000, 1000)
    windows = TokenWindows([path], 64)
    first = windows[10]
    assert len(pickle.dumps(windows)) < 10_000
    again = pickle.loads(pickle.dumps(windows))
    assert all(torch.equal(a, b) for a, b in zip(again[10], first, strict=True))
    assert len(again) == (200_000 - 1) // 64


MEMORY_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from pathlib import Path
    from dist_train.data.tokens import TokenWindows

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    paths, seq_len = [Path(p) for p in sys.argv[1:]], 128
    windows = TokenWindows(paths, seq_len)
    # RLIMIT_AS would count the file mappings themselves; RLIMIT_DATA counts what a process
    # holds privately (heap, anonymous maps): the memory a read-into-RAM loader would need.
    limit = status("VmData") + 48 * 2**20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        np.fromfile(paths[0], dtype=np.uint16)
        whole_read_fits = True
    except MemoryError:
        whole_read_fits = False
    rss, anon = status("VmRSS"), status("RssAnon")
    per_shard = [windows.ends[s] - (windows.ends[s - 1] if s else 0) for s in range(len(paths))]
    wrong = 0
    for index in np.linspace(0, len(windows) - 1, 3000).astype(int).tolist():
        shard = int(np.searchsorted(windows.ends, index, side="right"))
        local = index - (windows.ends[shard - 1] if shard else 0)
        x, y = windows[index]
        start = local * seq_len
        expected = (np.arange(start, start + seq_len + 1) + shard) % 50000
        wrong += not (np.array_equal(x.numpy(), expected[:-1]) and np.array_equal(y.numpy(), expected[1:]))
    print(json.dumps({"rss_growth": status("VmRSS") - rss, "anon_growth": status("RssAnon") - anon,
                      "wrong": wrong, "windows": len(windows), "whole_read_fits": whole_read_fits,
                      "per_shard": per_shard}))
    """
)


@pytest.mark.multiprocess
def test_windows_stream_from_disk_under_a_memory_limit(tmp_path):
    # Three 64 MiB shards, 192 MiB in all; the reading process may hold 48 MiB more than it
    # does after import. Token p of shard s is (p + s) % 50000, so any window can be checked.
    shard_tokens, chunk = 32 * 2**20, 8 * 2**20
    paths = []
    for s in range(3):
        path = tmp_path / f"train_{s:06d}.bin"
        with open(path, "wb") as f:
            f.write(HEADER.pack(b"DTTOKENS", 1, 2, shard_tokens, 50000))
            for start in range(0, shard_tokens, chunk):
                f.write(((np.arange(start, start + chunk) + s) % 50000).astype("<u2").tobytes())
        paths.append(str(path))
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, *paths], env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert not found["whole_read_fits"]  # the limit bites: one shard read into memory fails
    assert found["wrong"] == 0 and found["windows"] == 3 * ((shard_tokens - 1) // 128)
    assert min(found["per_shard"]) > 0
    # What the process holds of its own stays flat. VmRSS also counts the page-cache pages the
    # mapping shows (fault-around maps 64 KiB per touched page), which the kernel reclaims at
    # will, so it is reported, not bounded.
    assert found["anon_growth"] < 16 * 2**20, found


GPT = {
    "data.dataset": "tokens",
    "data.seq_len": 32,
    "model.name": "gpt",
    "model.n_layer": 2,
    "model.width": 32,
    "model.n_head": 2,
    "optim.name": "adamw",
    "optim.lr": 0.01,
    "schedule.warmup_steps": 2,
    "checkpoint.every_steps": 0,
}


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    _documents(root / "corpus", count=8)
    out = root / "out"
    assert (
        main(["tokenize", "--tokenizer", "gpt2", "--vocab-size", "300", "--out", str(out), str(root / "corpus/*.py")])
        == 0
    )
    return out


@pytest.mark.system
def test_a_tiny_gpt_trains_on_tokens_and_its_loss_falls(tmp_path, bpe_dir, monkeypatch):
    from dist_train.train.trainer import train

    monkeypatch.chdir(REPO)
    values = {**GPT, "data.paths": json.dumps([str(bpe_dir)]), "train.max_steps": 30, "train.log_every": 5}
    cfg = load_config("configs/gpt_cpu.yaml", tiny_overrides(tmp_path, **values))
    train(cfg)
    losses = [
        r["loss"] for r in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    # ln(300) = 5.7 at the start; the first logged loss (step 5) has already fallen: over run.seed
    # 0-29 (AMD EPYC, 2 cores, 2026-12-03) 5.09-5.23, too close to a bar at 5.0; last / first
    # 0.35-0.48.
    assert losses[0] > 4.5 and losses[-1] < 0.6 * losses[0], losses


@pytest.mark.system
def test_resume_from_2_ranks_on_1_matches_an_uninterrupted_run(tmp_path, bpe_dir):
    # Global batch 16 throughout: 1 x 8 x 2 accumulation, or 2 ranks x 8 until step 3 and then
    # 1 x 8 x 2 (accumulation adapts on resume). The data order is the sampler's global one.
    common = {**GPT, "data.paths": json.dumps([str(bpe_dir)]), "data.batch_size": 8, "train.max_steps": 6}

    def cli(*args: str) -> subprocess.CompletedProcess:
        proc = run_cli(*args, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    # The uninterrupted reference in this process; the 2-rank run and its 1-rank resume from the CLI.
    one = tiny_overrides(tmp_path, **common, **{"run.name": "one", "train.grad_accum_steps": 2})
    dist_train.fit(str(REPO / "configs" / "gpt_cpu.yaml"), one)
    split = {**common, "run.name": "split"}
    cli(
        "launch",
        "configs/gpt_cpu.yaml",
        "--nproc-per-node",
        "2",
        *tiny_overrides(tmp_path, **split, **{"train.stop_at_step": 3}),
    )
    resumed = cli("train", "configs/gpt_cpu.yaml", *tiny_overrides(tmp_path, **split))
    assert "written by 2 processes, resumed on 1" in resumed.stdout
    runs = tmp_path / "runs"
    one, two_then_one, at_stop = (
        checkpoint.read_full_state(checkpoint.step_dir(runs / name / "checkpoints", step), "model")
        for name, step in (("one", 6), ("split", 6), ("split", 3))
    )
    assert one["token_embedding.weight"].shape[0] == 300
    # Measured: 1.5e-5 at most between 1 process and 2 ranks even without a stop (the gradient
    # sums round differently, and AdamW's normalization magnifies that on tiny gradients);
    # 2 ranks straight vs stopped and resumed on 1: 1.9e-6. The last 3 steps moved far more.
    assert max((one[k] - at_stop[k]).abs().max().item() for k in one) > 1e-2
    for key in one:
        torch.testing.assert_close(two_then_one[key], one[key], rtol=1e-4, atol=5e-5)

    def last_loss(name: str) -> float:
        lines = (runs / name / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r and r["step"] == 6][0]

    assert last_loss("split") == pytest.approx(last_loss("one"), abs=1e-5)


@pytest.mark.unit
def test_gpt2_small_on_a_50257_token_vocabulary_has_124m_parameters():
    from dist_train.data.datasets import DataSpec

    cfg = load_config(REPO / "configs/gpt2_small.yaml", ["data.dataset=tokens", "data.paths=[unused]"])
    with torch.device("meta"):  # the parameter count without 500 MB of weights
        model = build_model(cfg.model, DataSpec((cfg.data.seq_len,), 50257))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
