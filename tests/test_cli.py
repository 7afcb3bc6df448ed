"""The real CLI in a subprocess: user mistakes end in one `error: ...` line on stderr, exit 2, nothing on disk."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, file_hashes, metrics_records, run_cli, tiny_overrides

import dist_train
from dist_train.config import load_config

DIGITS = str(REPO / "configs" / "digits.yaml")
# `launch` with its flags first, so the positional overrides still reach load_config.
# For mistakes found when training starts, where the data does not matter: no scikit-learn import (~2 s less).
QUICK_DATA = {"data.dataset": "synthetic", "data.synthetic_shape": "[1,8,8]", "data.synthetic_size": 64}
COMMANDS = {"train": ["train"], "launch": ["launch", "--nproc-per-node", "1"]}


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    output = f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 2, output
    assert "Traceback" not in proc.stderr + proc.stdout, output
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, output
    line = lines[0]
    assert line.startswith("error"), output
    assert line.removeprefix("error:").strip(), output
    for needle in needles:
        assert needle in line, output
    return line


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """argparse's own shape: `usage: ...` (one line for the top-level parser) then `dist-train: error: ...`."""
    output = f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 2, output
    assert "Traceback" not in proc.stderr + proc.stdout, output
    assert proc.stdout == "", output
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("usage: dist-train"), output
    assert lines[-1].startswith("dist-train") and ": error: " in lines[-1], output
    for needle in needles:
        assert needle in lines[-1], output
    return lines[-1]


def _cli_in(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI from tmp_path (so stray relative outputs would land there) and check it wrote nothing."""
    before = file_hashes(tmp_path)
    proc = run_cli(*args, cwd=tmp_path, timeout=120)
    assert file_hashes(tmp_path) == before, f"a failing run changed {tmp_path}:\n{proc.stderr}"
    return proc


# --------------------------------------------------------------------------- config mistakes, train and launch

BAD_OVERRIDES = [
    pytest.param(["optim.lrr=0.1"], ("optim.lrr", "did you mean optim.lr"), id="unknown-key"),
    pytest.param(["logging.wandb.mod=offline"], ("logging.wandb.mod", "logging.wandb.mode"), id="unknown-nested"),
    pytest.param(["data.batch_size=abc"], ("data.batch_size",), id="str-for-int"),
    pytest.param(["train.max_steps=2.5"], ("train.max_steps",), id="float-for-int"),
    pytest.param(["data.augment=3"], ("data.augment",), id="int-for-bool"),
    pytest.param(["optim.betas=0.9"], ("optim.betas",), id="scalar-for-list"),
    pytest.param(["optim=3"], ("optim",), id="scalar-for-section"),
    pytest.param(["train.precision=fp8"], ("train.precision", "fp8"), id="literal"),
    pytest.param(["optim.name=rmsprop"], ("optim.name", "rmsprop"), id="literal-optim"),
    pytest.param(["optim.lr=0"], ("optim.lr",), id="lr-zero"),
    pytest.param(["train.grad_accum_steps=0"], ("train.grad_accum_steps",), id="accum-zero"),
    pytest.param(["checkpoint.keep_last=0"], ("checkpoint.keep_last",), id="keep-last-zero"),
    pytest.param(["train.max_epochs=null"], ("train.max_steps", "train.max_epochs"), id="no-end"),
    pytest.param(["optim.lr"], ("optim.lr", "key=value"), id="no-equals"),
]


@pytest.mark.system
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("overrides, needles", BAD_OVERRIDES)
def test_bad_override_is_one_line(tmp_path, command, overrides, needles):
    out = tmp_path / "out"
    proc = _cli_in(tmp_path, *COMMANDS[command], DIGITS, f"run.output_dir={out}", *overrides)
    assert_one_line_error(proc, *needles)
    assert proc.stdout == ""  # nothing trained, and `launch` printed no torchrun command: no worker started
    assert not out.exists()


@pytest.mark.system
@pytest.mark.parametrize("command", COMMANDS)
def test_malformed_yaml_is_one_line(tmp_path, command):
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  max_steps: 3\noptim: {lr: [0.1}\n")
    proc = _cli_in(tmp_path, *COMMANDS[command], str(config), f"run.output_dir={tmp_path / 'out'}")
    assert_one_line_error(proc, str(config), "line 3")


@pytest.mark.system
@pytest.mark.parametrize("command", COMMANDS)
def test_yaml_python_tag_is_refused(tmp_path, command):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"train: {{max_steps: 3}}\nrun: !!python/object/apply:os.system ['touch {marker}']\n")
    proc = _cli_in(tmp_path, *COMMANDS[command], str(config))
    assert_one_line_error(proc, str(config))
    assert not marker.exists()


@pytest.mark.system
@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_key_in_yaml_is_one_line(tmp_path, command):
    config = tmp_path / "typo.yaml"
    config.write_text("train:\n  max_steps: 3\ncheckpoint:\n  keep_lst: 2\n")
    proc = _cli_in(tmp_path, *COMMANDS[command], str(config), f"run.output_dir={tmp_path / 'out'}")
    assert_one_line_error(proc, "checkpoint.keep_lst", "checkpoint.keep_last")


@pytest.mark.system
@pytest.mark.parametrize("command", COMMANDS)
def test_missing_config_file_is_one_line(tmp_path, command):
    missing = tmp_path / "nope.yaml"
    proc = _cli_in(tmp_path, *COMMANDS[command], str(missing), f"run.output_dir={tmp_path / 'out'}")
    assert_one_line_error(proc, "config file not found", str(missing))


@pytest.mark.system
@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_flag_is_an_argparse_error(tmp_path, command):
    proc = _cli_in(tmp_path, command, DIGITS, "--bogus", f"run.output_dir={tmp_path / 'out'}")
    line = assert_usage_error(proc, "--bogus")
    assert len(proc.stderr.strip().splitlines()) == 2, proc.stderr  # usage + error, from the top-level parser
    assert "key=value" in line


@pytest.mark.system
def test_override_without_equals_after_a_launch_flag(tmp_path):
    # After a flag argparse no longer collects positionals, so cli.main reports it through parser.error.
    proc = _cli_in(tmp_path, "launch", DIGITS, "--nproc-per-node", "1", "optim.lr")
    assert_usage_error(proc, "optim.lr")
    assert len(proc.stderr.strip().splitlines()) == 2, proc.stderr


@pytest.mark.system
@pytest.mark.parametrize("args", [[], ["bogus"], ["train"]], ids=["no-command", "bad-command", "no-config"])
def test_usage_mistakes(tmp_path, args):
    assert_usage_error(_cli_in(tmp_path, *args))


@pytest.mark.system
def test_bad_launch_flag_is_one_line(tmp_path):
    # The launcher's own checks are covered in-process in test_launcher.py; this one checks the CLI's shape.
    out = tmp_path / "out"
    proc = _cli_in(tmp_path, "launch", DIGITS, "--nproc-per-node", "0", f"run.output_dir={out}")
    assert_one_line_error(proc, "--nproc-per-node")
    assert proc.stdout == ""


# --------------------------------------------------------------------------- mistakes found when training starts


@pytest.mark.system
@pytest.mark.parametrize("command", COMMANDS)
def test_fp16_without_gpu_is_one_line(tmp_path, command):
    out = tmp_path / "runs"
    proc = _cli_in(tmp_path, *COMMANDS[command], DIGITS, *tiny_overrides(tmp_path, **{"train.precision": "fp16"}))
    assert_one_line_error(proc, "train.precision")
    assert "+ " not in proc.stdout  # launch refuses before starting torchrun
    assert not out.exists()


@pytest.mark.system
def test_dataset_smaller_than_one_global_batch(tmp_path):
    out = tmp_path / "runs"
    overrides = tiny_overrides(tmp_path, **{"data.batch_size": 1000, "train.grad_accum_steps": 2})
    proc = _cli_in(tmp_path, "train", DIGITS, *overrides)
    line = assert_one_line_error(proc, "global batch", "2000", "1438")
    assert "data.batch_size" in line
    assert not out.exists()


@pytest.mark.system
def test_resume_from_missing_path(tmp_path):
    out = tmp_path / "runs"
    overrides = tiny_overrides(tmp_path, **QUICK_DATA, **{"checkpoint.resume": "/does/not/exist"})
    proc = _cli_in(tmp_path, "train", DIGITS, *overrides)
    assert_one_line_error(proc, "checkpoint.resume", "/does/not/exist")
    assert not out.exists()


@pytest.mark.system
def test_output_dir_that_is_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    proc = _cli_in(tmp_path, "train", DIGITS, *tiny_overrides(tmp_path, **QUICK_DATA, **{"run.output_dir": blocker}))
    assert_one_line_error(proc, "run.output_dir")


# --------------------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    proc = run_cli("train", "configs/digits.yaml", *tiny_overrides(root), cwd=REPO)
    return root, proc


@pytest.mark.system
def test_tiny_run_succeeds(tiny_run):
    root, proc = tiny_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    run_dir = root / "runs" / "digits"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "metrics.jsonl").is_file()
    assert (run_dir / "checkpoints" / "step_00000006" / "manifest.json").is_file()
    assert (run_dir / "checkpoints" / "step_00000003" / "manifest.json").is_file()  # keep_last=2 in digits.yaml
    assert "training 6 steps of global batch 16" in proc.stdout


@pytest.mark.system
def test_tiny_run_outputs_are_consistent(tiny_run):
    root, proc = tiny_run
    assert proc.returncode == 0, proc.stderr
    run_dir = root / "runs" / "digits"
    # The resolved config written to the run directory is exactly the config the CLI built.
    expected = load_config(REPO / "configs" / "digits.yaml", tiny_overrides(root))
    assert load_config(run_dir / "config.yaml") == expected
    records = metrics_records(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "val_acc" in r] == [6]
    manifest = json.loads((run_dir / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    assert manifest["step"] == 6
    assert {"train_state.pt", "rng_rank0.pt"} <= set(manifest["files"])
    assert not list(root.rglob("*.partial"))


@pytest.mark.system
def test_resume_never_refuses_an_existing_run(tiny_run):
    root, first = tiny_run
    assert first.returncode == 0, first.stderr
    run_dir = root / "runs" / "digits"
    before = file_hashes(run_dir)
    assert any(name.endswith("manifest.json") for name in before)
    # Same run directory (run.name=digits); the dataset does not matter to the refusal.
    overrides = tiny_overrides(root, **QUICK_DATA, **{"checkpoint.resume": "never"})
    proc = run_cli("train", "configs/digits.yaml", *overrides, cwd=REPO)
    assert_one_line_error(proc, "checkpoint.resume=never", "step_00000006")
    assert file_hashes(run_dir) == before  # checkpoints, config.yaml and metrics.jsonl byte-identical


# --------------------------------------------------------------------------- the rest of the bad-input battery


@pytest.mark.system
@pytest.mark.parametrize(
    "data, needles",
    [
        ({"data.dataset": "image_folder", "data.root": "/does/not/exist"}, ("data.root=/does/not/exist",)),
        ({"data.dataset": "image_folder", "data.root": "{empty}"}, ("holds no usable images",)),
        ({"data.dataset": "text", "data.paths": "['{empty}/*.txt']"}, ("matched no files",)),
    ],
    ids=["path-missing", "folder-empty", "text-glob-empty"],
)
def test_missing_or_empty_dataset_is_one_line(tmp_path, data, needles):
    empty = tmp_path / "empty"
    empty.mkdir()
    values = {k: v.replace("{empty}", str(empty)) for k, v in data.items()}
    proc = _cli_in(tmp_path, "train", DIGITS, *tiny_overrides(tmp_path, **values))
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "runs").exists()


def _copy_checkpoint(tiny_run, tmp_path) -> Path:
    import shutil

    root, proc = tiny_run
    assert proc.returncode == 0, proc.stderr
    return Path(shutil.copytree(root / "runs" / "digits" / "checkpoints" / "step_00000006", tmp_path / "ckpt"))


@pytest.mark.system
def test_a_checkpoint_from_a_newer_format_is_one_line(tiny_run, tmp_path):
    ckpt = _copy_checkpoint(tiny_run, tmp_path)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["format_version"] += 1
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    proc = _cli_in(tmp_path, "train", DIGITS, *tiny_overrides(tmp_path, **{"checkpoint.resume": str(ckpt)}))
    assert_one_line_error(proc, "format version", "upgrade dist_train")


@pytest.mark.system
def test_a_corrupted_checkpoint_named_by_path_is_one_line(tiny_run, tmp_path):
    ckpt = _copy_checkpoint(tiny_run, tmp_path)
    shard = next((ckpt / "model_optim").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated, as by a crash mid-copy
    proc = _cli_in(tmp_path, "train", DIGITS, *tiny_overrides(tmp_path, **{"checkpoint.resume": str(ckpt)}))
    assert_one_line_error(proc, "corrupted", "model_optim/")


@pytest.mark.system
def test_a_checkpoint_of_another_model_names_the_parameter_and_shapes(tmp_path):
    mlp = {"model.name": "mlp", "model.mlp_hidden": "[32]", "train.max_steps": 2, "checkpoint.every_steps": 0}
    dist_train.fit(DIGITS, tiny_overrides(tmp_path, **mlp))  # in this process: only the second run is the CLI's
    ckpt = tmp_path / "runs" / "digits" / "checkpoints" / "step_00000002"
    wider = {**mlp, "model.mlp_hidden": "[48]", "run.name": "wider", "checkpoint.resume": str(ckpt)}
    proc = _cli_in(tmp_path, "train", DIGITS, *tiny_overrides(tmp_path, **wider))
    assert_one_line_error(proc, "does not fit this model", "(32, 64) in the checkpoint, (48, 64) in the model")
    assert not (tmp_path / "runs" / "wider").exists()


@pytest.mark.unit
def test_more_processes_than_gpus_is_one_line(tmp_path, monkeypatch, capsys):
    import torch

    from dist_train import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code = cli.main(["launch", DIGITS, "--nproc-per-node", "4", *tiny_overrides(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "error: --nproc-per-node 4 is more than the 2 GPUs visible on this node "
        "(parallel.backend=gloo lets ranks share a GPU)"
    ]
    assert not (tmp_path / "runs").exists()
