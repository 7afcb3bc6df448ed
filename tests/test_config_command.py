"""`dist-train config`: the resolved config with the batch it implies, and every key with its help,
which is also the README's configuration table. In-process through the real CLI: nothing trains."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, cli_env

from dist_train.cli import main
from dist_train.config import Config, all_keys, key_docs, keys_table, load_config, to_dict

DIGITS = str(REPO / "configs" / "digits.yaml")
README = REPO / "README.md"
START, END = "<!-- config-keys:start -->\n", "<!-- config-keys:end -->"


def leaf_keys() -> list[str]:
    keys = all_keys()
    return [key for key in keys if not any(other.startswith(key + ".") for other in keys)]


def lookup(values: dict, key: str):
    for part in key.split("."):
        values = values[part]
    return values


def config_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["config", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.unit
def test_prints_the_resolved_config_that_parses_back_with_the_overrides(capsys):
    overrides = ["optim.lr=0.02", "run.name=0123", "data.synthetic_shape=[1,8,8]"]
    code, out, err = config_cli(capsys, DIGITS, *overrides)
    assert code == 0, err
    printed = yaml.safe_load(out)  # the plan is in comment lines: the whole output is the YAML
    assert printed == to_dict(load_config(DIGITS, overrides))
    assert (printed["optim"]["lr"], printed["run"]["name"], printed["data"]["synthetic_shape"]) == (
        0.02,
        "0123",
        [1, 8, 8],
    )
    assert load_config(printed) == load_config(DIGITS, overrides)


@pytest.mark.unit
def test_the_plan_splits_the_global_batch_over_the_processes(capsys):
    # The flag between the overrides: cli.py collects the ones argparse leaves over.
    code, out, err = config_cli(capsys, DIGITS, "train.global_batch=64", "--nproc-per-node", "2", "data.batch_size=16")
    assert code == 0, err
    assert "# plan on 2 processes: global batch 64 (2 x 16 x 2 accumulation)" in out
    assert "# run directory runs/digits" in out

    code, out, err = config_cli(capsys, DIGITS, "train.global_batch=64", "data.batch_size=16", "--nnodes", "2")
    assert code == 0, err
    assert "global batch 64 (2 x 16 x 2 accumulation)" in out  # 2 nodes of 1 process

    code, out, err = config_cli(capsys, DIGITS, "data.batch_size=8", "train.grad_accum_steps=3")
    assert code == 0, err
    assert "# plan on 1 process: global batch 24 (1 x 8 x 3 accumulation)" in out


@pytest.mark.unit
def test_auto_batch_size_says_it_is_searched_at_start_up(capsys):
    code, out, err = config_cli(
        capsys, DIGITS, "data.batch_size=auto", "train.global_batch=64", "--nproc-per-node", "4"
    )
    assert code == 0, err
    plan = [line for line in out.splitlines() if line.startswith("# plan")]
    assert len(plan) == 1 and "global batch 64 (4 x auto x" in plan[0], out
    assert "searched at start-up" in plan[0] and "dist-train find-batch" in plan[0]


@pytest.mark.unit
def test_mistakes_are_one_line_and_exit_2(capsys):
    for argv, expected in [
        ([DIGITS, "optim.lrr=0.1"], "error: unknown config key optim.lrr; did you mean optim.lr?"),
        (
            [DIGITS, "train.global_batch=60", "data.batch_size=16", "--nproc-per-node", "2"],
            "error: train.global_batch=60 is not a multiple of 2 processes x data.batch_size 16",
        ),
        (
            [DIGITS, "data.batch_size=auto", "train.global_batch=63", "--nproc-per-node", "2"],
            "error: train.global_batch=63 is not a multiple of the 2 processes",
        ),
        ([str(REPO / "configs" / "missing.yaml")], "error: config file not found"),
        ([], "error: config needs a CONFIG file"),
        (["--keys", "trian."], "error: no config key starts with 'trian.'"),
    ]:
        code, out, err = config_cli(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert out == "" and len(err.splitlines()) == 1 and err.startswith(expected), (argv, err)


@pytest.mark.unit
def test_keys_lists_every_key_with_its_type_and_default(capsys):
    code, out, err = config_cli(capsys, "--keys")
    assert code == 0, err
    # "key = default  (type)", then the help indented: each default read back is the schema's.
    listed = re.findall(r"^(\S+) = (.*)  \((.+)\)$", out, flags=re.M)
    assert [key for key, _, _ in listed] == leaf_keys()
    defaults = to_dict(Config())
    for key, default, _ in listed:
        assert yaml.safe_load(default) == lookup(defaults, key), key
    assert "data.batch_size = 64  (int | auto)" in out
    assert "train.max_steps = null  (int | null)" in out

    code, out, err = config_cli(capsys, "--keys", "train.")
    assert code == 0, err
    shown = re.findall(r"^(\S+) = ", out, flags=re.M)
    assert shown == [key for key in leaf_keys() if key.startswith("train.")]


@pytest.mark.unit
def test_every_key_has_one_line_of_help():
    docs = key_docs()
    assert [doc.key for doc in docs] == leaf_keys()
    missing = [doc.key for doc in docs if not doc.help.strip() or "\n" in doc.help]
    assert not missing, f"config keys without one line of help (setting(default, help) in config.py): {missing}"


@pytest.mark.unit
def test_the_readme_table_is_the_generated_one():
    text = README.read_text()
    assert START in text and END in text, f"README.md lacks the {START.strip()} ... {END} markers"
    in_readme = text[text.index(START) + len(START) : text.index(END)]
    assert in_readme == keys_table(), (
        "README.md's configuration table differs from the schema's help: run `dist-train config --keys --markdown` "
        f"and put its output between {START.strip()} and {END}"
    )
    rows = in_readme.splitlines()[2:]
    assert len(rows) == len(leaf_keys())
    for row in rows:  # a help text's "|" is escaped, or it would split the row into more cells
        assert len(re.findall(r"(?<!\\)\|", row)) == 4, row


@pytest.mark.system
def test_the_cli_parses_and_lists_keys_without_importing_torch():
    # Every verb's parser is built at each start: none may import torch (seconds per process),
    # and `dist-train config` needs none at all.
    probe = (
        "import sys\n"
        "from dist_train import cli\n"
        "parser = cli._parser()\n"
        f"parser.parse_args(['config', {DIGITS!r}, 'train.global_batch=64', '--nproc-per-node', '2'])\n"
        "args = parser.parse_args(['config', '--keys', 'train.'])\n"
        "cli.VERBS['config'].run(args)\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], env=cli_env(), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stderr.strip() == "False", proc.stderr
    assert "train.global_batch = null" in proc.stdout
