"""Config loading in-process: schema defaults < YAML < `key=value` overrides, and one-line errors naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import REPO

from dist_train.config import (
    Config,
    ConfigError,
    UserError,
    all_keys,
    dump_yaml,
    load_config,
    to_dict,
    validate,
)

pytestmark = pytest.mark.unit

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
DIGITS = REPO / "configs" / "digits.yaml"


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path, overrides=()) -> str:
    """The ConfigError message for a config that must be rejected; asserts it is one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert message.strip(), "empty error message"
    assert len(message.splitlines()) == 1, f"error is not one line: {message!r}"
    return message


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("kwargs", "lr_multipliers"):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# --------------------------------------------------------------------------- loading and precedence


def test_configs_directory_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"digits.yaml", "synthetic.yaml", "cifar10_resnet18.yaml", "image_folder.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    validate(cfg)  # idempotent on a loaded config
    assert cfg.run.name == path.stem  # each example names its run after the file


def test_yaml_values_and_schema_defaults(tmp_path):
    path = _write(tmp_path, "train:\n  max_steps: 5\noptim:\n  lr: 0.3\n")
    cfg = load_config(path)
    defaults = Config()
    assert cfg.train.max_steps == 5 and cfg.optim.lr == 0.3
    # Everything the YAML is silent about is the schema default.
    assert cfg.optim.momentum == defaults.optim.momentum == 0.9
    assert cfg.data == defaults.data
    assert cfg.run == defaults.run
    assert cfg.logging.wandb.mode == "disabled"
    assert cfg.run_dir == Path("runs") / "default"


def test_digits_yaml_values_are_read():
    cfg = load_config(DIGITS)
    assert cfg.run.name == "digits"
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.nesterov is True
    assert cfg.train.max_epochs == 30 and cfg.train.max_steps is None
    assert cfg.checkpoint.keep_last == 2
    assert cfg.logging.wandb.mode == "offline"
    assert cfg.data.eval_batch_size == Config().data.eval_batch_size  # not in the YAML: default


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = _write(tmp_path, "train:\n  max_steps: 5\n  log_every: 3\noptim:\n  lr: 0.3\n  weight_decay: 0.01\n")
    cfg = load_config(path, ["optim.lr=0.7", "train.eval_every=11"])
    assert cfg.optim.lr == 0.7  # CLI beats YAML
    assert cfg.optim.weight_decay == 0.01  # YAML sibling of an overridden key is kept
    assert cfg.train.max_steps == 5 and cfg.train.log_every == 3  # YAML beats defaults
    assert cfg.train.eval_every == 11  # CLI beats default
    assert cfg.optim.momentum == 0.9  # default


def test_later_override_wins():
    cfg = load_config(DIGITS, ["optim.lr=0.1", "optim.lr=0.2"])
    assert cfg.optim.lr == 0.2


def test_no_file_means_defaults_plus_overrides():
    cfg = load_config(None, ["train.max_steps=3"])
    assert cfg.train.max_steps == 3
    assert dataclasses.replace(cfg, train=Config().train) == Config()


def test_empty_yaml_file_is_all_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "# nothing here\n"), ["train.max_steps=2"])
    assert cfg.optim == Config().optim


def test_nested_section_override(tmp_path):
    cfg = load_config(DIGITS, ["logging.wandb.mode=disabled", "logging.wandb.tags=[a, b]", "model.kwargs.depth=3"])
    assert cfg.logging.wandb.mode == "disabled"
    assert cfg.logging.wandb.tags == ["a", "b"]
    assert cfg.logging.wandb.project == "dist_train"  # from the YAML
    assert cfg.model.kwargs == {"depth": 3}


def test_section_override_merges_with_yaml(tmp_path):
    path = _write(tmp_path, "train: {max_steps: 3}\noptim: {lr: 0.5, weight_decay: 0.1, nesterov: true}\n")
    cfg = load_config(path, ["optim={lr: 0.2}"])
    assert cfg.optim.lr == 0.2
    assert cfg.optim.weight_decay == 0.1 and cfg.optim.nesterov is True


# --------------------------------------------------------------------------- override value parsing


@pytest.mark.parametrize(
    "override, key, expected, kind",
    [
        ("optim.lr=0.05", "optim.lr", 0.05, float),
        ("optim.lr=1", "optim.lr", 1.0, float),  # an int for a float field becomes a float
        ("optim.lr=1e-3", "optim.lr", 1e-3, float),  # YAML 1.1 reads 1e-3 as a string; still a number
        ("optim.lr=5e-4", "optim.lr", 5e-4, float),
        ("train.max_steps=7", "train.max_steps", 7, int),
        ("data.augment=false", "data.augment", False, bool),
        ("data.augment=true", "data.augment", True, bool),
        ("train.clip_grad_norm=null", "train.clip_grad_norm", None, type(None)),
        ("train.clip_grad_norm=2", "train.clip_grad_norm", 2.0, float),
        ("data.synthetic_shape=[1,4,4]", "data.synthetic_shape", [1, 4, 4], list),
        ("optim.betas=[0.8, 0.99]", "optim.betas", [0.8, 0.99], list),
        ("optim.betas=[0, 0]", "optim.betas", [0.0, 0.0], list),
        ("train.precision=bf16", "train.precision", "bf16", str),
        ("optim.name=adamw", "optim.name", "adamw", str),
        ("run.name=123", "run.name", "123", str),  # a number given to a str field is its text
        ("run.name=true", "run.name", "true", str),  # so is a YAML bool
        ("run.name=my run", "run.name", "my run", str),
        ("logging.wandb.entity=null", "logging.wandb.entity", None, type(None)),
        ("logging.wandb.tags=[1, 2]", "logging.wandb.tags", ["1", "2"], list),
        (" optim.lr = 0.5", "optim.lr", 0.5, float),  # spaces around the key are ignored
    ],
)
def test_override_values_are_parsed_as_yaml_scalars(override, key, expected, kind):
    cfg = load_config(DIGITS, [override])
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected
    assert type(value) is kind
    if isinstance(value, list) and expected:
        assert all(type(v) is type(e) for v, e in zip(value, expected, strict=True))


def test_max_epochs_null_with_max_steps():
    cfg = load_config(DIGITS, ["train.max_epochs=null", "train.max_steps=9"])
    assert cfg.train.max_epochs is None and cfg.train.max_steps == 9


def test_python_tag_in_override_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    # safe_load refuses the tag; the raw text then fails the str checks of run.name (it holds '/').
    message = _error(DIGITS, [f"run.name=!!python/object/apply:os.system ['touch {marker}']"])
    assert "run.name" in message
    assert not marker.exists()


@pytest.mark.parametrize("text", ["0123", "1.10", "12:30", "1_000", "0x1F", "true", "off", "2024-01-01"])
def test_str_field_keeps_the_text_typed_on_the_cli(text):
    # YAML 1.1 would read these as 83, 1.1, 750, 1000, 31, True, False, a date: a run dir must be named as typed.
    assert load_config(DIGITS, [f"run.name={text}"]).run.name == text
    assert load_config(DIGITS, [f"logging.wandb.project={text}"]).logging.wandb.project == text


@pytest.mark.parametrize("text, expected", [(" padded ", "padded"), ("'0123'", "0123"), ('"my run"', "my run")])
def test_str_field_text_is_stripped_and_unquoted(text, expected):
    assert load_config(DIGITS, [f"run.name={text}"]).run.name == expected


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("optim.lrr=0.1", "optim.lrr", "optim.lr"),
        ("data.batchsize=3", "data.batchsize", "data.batch_size"),
        ("logging.wandb.mod=offline", "logging.wandb.mod", "logging.wandb.mode"),
        ("run.nme=x", "run.nme", "run.name"),
        ("max_steps=3", "max_steps", "train.max_steps"),
    ],
)
def test_unknown_cli_key_is_named_with_a_suggestion(override, key, suggestion):
    message = _error(DIGITS, [override])
    assert key in message
    assert f"did you mean {suggestion}" in message


def test_unknown_cli_section_names_the_full_dotted_key():
    message = _error(DIGITS, ["trian.max_steps=3"])
    assert "trian.max_steps" in message
    assert "train.max_steps" in message


def test_unknown_section_suggests_the_section():
    message = _error(DIGITS, ["chekpoint.keep_last=1"])
    assert "chekpoint" in message and "checkpoint" in message.replace("chekpoint", "")


def test_unknown_key_in_yaml_is_named_with_a_suggestion(tmp_path):
    path = _write(tmp_path, "train:\n  max_steps: 3\noptim:\n  lrr: 0.1\n")
    message = _error(path)
    assert "optim.lrr" in message and "did you mean optim.lr" in message


def test_unknown_top_level_key_in_yaml(tmp_path):
    path = _write(tmp_path, "train:\n  max_steps: 3\ntrian:\n  max_steps: 3\n")
    message = _error(path)
    assert "trian" in message and "did you mean train" in message


def test_unknown_key_without_any_close_match():
    message = _error(DIGITS, ["zzzzzz.qqqq=1"])
    assert "zzzzzz" in message and "unknown" in message


def test_unknown_key_below_a_leaf_is_rejected():
    message = _error(DIGITS, ["optim.lr.value=3"])
    assert "optim.lr" in message


@pytest.mark.parametrize("override", ["optim.Lr=0.5", "train.max_step=5", "data.batch_size_=5", "optim..lr=1"])
def test_typo_never_becomes_a_default(override):
    # A typo in a key must never silently fall back to the default of the intended key.
    message = _error(DIGITS, [override])
    assert "unknown config key" in message


# --------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=abc", "data.batch_size"),  # string for an int
        ("data.batch_size=1.5", "data.batch_size"),  # float for an int
        ("data.batch_size=true", "data.batch_size"),  # bool for an int
        ("data.batch_size=[1]", "data.batch_size"),  # list for a scalar
        ("data.batch_size=null", "data.batch_size"),  # null for a non-optional int
        ("data.batch_size=1e3", "data.batch_size"),
        ("train.max_steps=2.0", "train.max_steps"),
        ("run.seed=1.0", "run.seed"),
        ("optim.lr=abc", "optim.lr"),  # string for a float
        ("optim.lr=true", "optim.lr"),  # bool for a float
        ("optim.lr=[0.1]", "optim.lr"),
        ("optim.lr={a: 1}", "optim.lr"),
        ("optim.lr=null", "optim.lr"),
        ("data.augment=1", "data.augment"),  # int for a bool
        ("data.augment=maybe", "data.augment"),
        ("run.name=[a]", "run.name"),  # list for a str
        ("run.name={a: 1}", "run.name"),  # mapping for a str
        ("run.name=null", "run.name"),
        ("checkpoint.resume=null", "checkpoint.resume"),
        ("optim.betas=0.9", "optim.betas"),  # scalar for a list
        ("data.synthetic_shape=[3, 32, 1.5]", "data.synthetic_shape"),  # wrong list item type
        ("logging.wandb.tags=a", "logging.wandb.tags"),
        ("model.kwargs=3", "model.kwargs"),  # scalar for a mapping
        ("optim=3", "optim"),  # scalar for a section
        ("logging.wandb=offline", "logging.wandb"),
        ("train.precision=fp8", "train.precision"),  # outside a Literal
        ("train.precision=FP32", "train.precision"),
        ("optim.name=rmsprop", "optim.name"),
        ("schedule.name=linear", "schedule.name"),
        ("parallel.strategy=zero3", "parallel.strategy"),
        ("logging.wandb.mode=offlin", "logging.wandb.mode"),
    ],
)
def test_wrong_type_on_cli_names_the_key(override, key):
    message = _error(DIGITS, [override])
    assert key in message


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("optim: 3\n", "optim"),
        ("optim: [lr, 0.1]\n", "optim"),
        ("optim:\n  lr: fast\n", "optim.lr"),
        ("data:\n  batch_size: 32.5\n", "data.batch_size"),
        ("data:\n  augment: 'yes please'\n", "data.augment"),
        ("train:\n  precision: fp8\n", "train.precision"),
        ("optim:\n  name: rmsprop\n", "optim.name"),
        ("data:\n  synthetic_shape: 3\n", "data.synthetic_shape"),
        ("run:\n  name: [a, b]\n", "run.name"),
        ("logging:\n  wandb: disabled\n", "logging.wandb"),
    ],
)
def test_wrong_type_in_yaml_names_the_key(tmp_path, yaml_text, key):
    path = _write(tmp_path, "train:\n  max_steps: 3\n" + yaml_text)
    message = _error(path)
    assert key in message


def test_quoted_number_in_yaml_for_a_float_field_is_accepted(tmp_path):
    cfg = load_config(_write(tmp_path, "train: {max_steps: 3}\noptim: {lr: '1e-3'}\n"))
    assert cfg.optim.lr == 1e-3


# --------------------------------------------------------------------------- out of range


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=-1"], "optim.lr"),
        (["optim.lr=.nan"], "optim.lr"),
        (["optim.weight_decay=-0.1"], "optim.weight_decay"),
        (["optim.momentum=1.0"], "optim.momentum"),
        (["optim.momentum=-0.1"], "optim.momentum"),
        (["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov"),
        (["optim.betas=[0.9]"], "optim.betas"),
        (["optim.betas=[0.9, 1.0]"], "optim.betas"),
        (["optim.eps=0"], "optim.eps"),
        (["data.batch_size=0"], "data.batch_size"),
        (["data.batch_size=-4"], "data.batch_size"),
        (["data.eval_batch_size=0"], "data.eval_batch_size"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["data.val_fraction=0"], "data.val_fraction"),
        (["data.val_fraction=1"], "data.val_fraction"),
        (["data.image_size=4"], "data.image_size"),
        (["data.dataset=imagenet"], "data.dataset"),
        (["data.synthetic_shape=[1,4]"], "data.synthetic_shape"),
        (["data.synthetic_shape=[3,0,32]"], "data.synthetic_shape"),
        (["data.synthetic_size=0"], "data.synthetic_size"),
        (["data.synthetic_classes=1"], "data.synthetic_classes"),
        (["model.mlp_hidden=[128, 0]"], "model.mlp_hidden"),
        (["schedule.warmup_steps=-1"], "schedule.warmup_steps"),
        (["schedule.min_lr_ratio=1.5"], "schedule.min_lr_ratio"),
        (["schedule.step_size=0"], "schedule.step_size"),
        (["schedule.gamma=0"], "schedule.gamma"),
        (["schedule.gamma=2"], "schedule.gamma"),
        (["schedule.name=onecycle", "train.max_steps=10", "schedule.warmup_steps=10"], "schedule.warmup_steps"),
        (["train.max_steps=0"], "train.max_steps"),
        (["train.max_steps=-5"], "train.max_steps"),
        (["train.max_epochs=0"], "train.max_epochs"),
        (["train.max_epochs=null", "train.max_steps=null"], "train.max_steps"),  # neither set: no end
        (["train.max_epochs=null"], "train.max_steps"),  # digits.yaml sets only max_epochs
        (["train.stop_at_step=0"], "train.stop_at_step"),
        (["train.grad_accum_steps=0"], "train.grad_accum_steps"),
        (["train.clip_grad_norm=0"], "train.clip_grad_norm"),
        (["train.clip_grad_norm=-1"], "train.clip_grad_norm"),
        (["checkpoint.preempt_signal=SIGKILL"], "checkpoint.preempt_signal"),
        (["train.peak_tflops=0"], "train.peak_tflops"),
        (["train.log_every=0"], "train.log_every"),
        (["train.eval_every=-1"], "train.eval_every"),
        (["parallel.bucket_cap_mb=0"], "parallel.bucket_cap_mb"),
        (["checkpoint.every_steps=-1"], "checkpoint.every_steps"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        (["checkpoint.resume="], "checkpoint.resume"),
        (["run.name="], "run.name"),
        (["run.name=a/b"], "run.name"),
    ],
)
def test_out_of_range_names_the_key(overrides, key):
    message = _error(DIGITS, overrides)
    assert key in message


# inf, or 1e400 (a string to YAML 1.1 that float() turns into inf), would pass `> 0` checks and end in NaN losses.
@pytest.mark.parametrize(
    "override, key",
    [("optim.lr=.inf", "optim.lr"), ("optim.lr=1e400", "optim.lr"), ("optim.weight_decay=.inf", "optim.weight_decay")],
)
def test_infinite_values_are_rejected(override, key):
    assert key in _error(DIGITS, [override])


# torch.manual_seed(10**20) would raise a RuntimeError (a traceback from the CLI) when training starts.
@pytest.mark.parametrize("seed", [10**20, 2**64, -1])
def test_seed_out_of_range_is_a_config_error(seed):
    assert "run.seed" in _error(DIGITS, [f"run.seed={seed}"])


def test_large_valid_seed_is_accepted():
    assert load_config(DIGITS, ["run.seed=2000000"]).run.seed == 2_000_000


def test_validate_on_a_hand_built_config():
    cfg = Config()
    with pytest.raises(ConfigError, match="train.max_steps"):
        validate(cfg)  # the schema default has no end
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=10))
    validate(cfg)
    with pytest.raises(ConfigError, match="optim.lr"):
        validate(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.0)))


def test_the_config_is_frozen():
    """What the user wrote is never rewritten at run time: derived values live in the plan."""
    cfg = load_config(DIGITS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.batch_size = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = None


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


# --------------------------------------------------------------------------- malformed files


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "train:\n  max_steps: 3\noptim: {lr: [0.1}\n")
    message = _error(path)
    assert str(path) in message
    assert "line 3" in message
    assert "malformed" in message.lower() or "yaml" in message.lower()


def test_bad_indentation_names_the_line(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 0.1\n   momentum: 0.5\n")
    message = _error(path)
    assert str(path) in message and "line 3" in message


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("hello\n", "str"), ("42\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = _write(tmp_path, text)
    message = _error(path)
    assert str(path) in message and kind in message


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = _error(missing)
    assert "config file not found" in message and str(missing) in message


def test_directory_instead_of_file(tmp_path):
    assert "config file not found" in _error(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        '!!python/object/apply:os.system ["touch {marker}"]\n',
        'run: !!python/object/apply:os.system ["touch {marker}"]\n',
        "train:\n  max_steps: !!python/object/apply:os.system ['touch {marker}']\n",
    ],
)
def test_python_tags_are_refused_and_not_executed(tmp_path, text):
    marker = tmp_path / "pwned"
    path = _write(tmp_path, text.format(marker=marker))
    message = _error(path)
    assert str(path) in message
    assert not marker.exists()


def test_binary_file_is_a_config_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x80garbage")
    assert str(path) in _error(path)


# --------------------------------------------------------------------------- all_keys and dump_yaml


def test_all_keys_lists_every_section_and_leaf():
    keys = all_keys()
    assert len(keys) == len(set(keys))
    leaves = _leaves(to_dict(Config()))
    assert set(leaves) <= set(keys)
    sections = {f.name for f in dataclasses.fields(Config)} | {
        "logging.wandb",
        "train.early_stop",
        "checkpoint.keep_best",
        "train.ema",
        "logging.profile",
        "logging.mlflow",
    }
    assert sections <= set(keys)
    assert set(keys) == set(leaves) | sections
    for key in ("optim.lr", "train.max_steps", "logging.wandb.mode", "checkpoint.resume", "model.kwargs"):
        assert key in keys


def test_all_keys_of_a_section():
    assert all_keys(type(Config().optim), "optim.") == [f"optim.{f.name}" for f in dataclasses.fields(Config().optim)]


def test_every_leaf_key_can_be_set_on_the_cli():
    # Each leaf, set on the CLI to its own value from digits.yaml, gives back the same config.
    cfg = load_config(DIGITS)
    overrides = []
    for key, value in _leaves(to_dict(cfg)).items():
        if key in ("model.kwargs", "data.kwargs", "optim.lr_multipliers"):
            continue
        text = dump_yaml_scalar(value)
        overrides.append(f"{key}={text}")
    assert load_config(DIGITS, overrides) == cfg
    assert load_config(None, overrides) == cfg


def dump_yaml_scalar(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dump_yaml_round_trips(tmp_path, path):
    cfg = load_config(path, ["run.name=123", "model.kwargs={depth: 2, widths: [4, 8]}", "logging.wandb.tags=[x, y]"])
    text = dump_yaml(cfg)
    assert "!!" not in text  # plain YAML, no python tags
    dumped = _write(tmp_path, text, "resolved.yaml")
    again = load_config(dumped)
    assert again == cfg
    assert dump_yaml(again) == text
    assert again.run.name == "123" and isinstance(again.run.name, str)


def test_dump_yaml_keeps_section_order():
    text = dump_yaml(load_config(DIGITS))
    order = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert order == [f.name for f in dataclasses.fields(Config)]


@pytest.mark.parametrize("key", ["train.channels_last", "train.retain_host_memory", "optim.fused"])
def test_a_true_false_auto_key(key):
    section, name = key.split(".")
    assert getattr(getattr(load_config(DIGITS), section), name) == "auto"  # the default
    for text, value in (("true", True), ("false", False), ("auto", "auto")):
        assert getattr(getattr(load_config(DIGITS, [f"{key}={text}"]), section), name) == value
    with pytest.raises(ConfigError, match=rf"^{key} must be true, false or auto; got 'sometimes'$"):
        load_config(DIGITS, [f"{key}=sometimes"])
    with pytest.raises(ConfigError, match=rf"^{key} must be true, false or auto; got 1$"):
        load_config(DIGITS, [f"{key}=1"])


def test_channels_last_is_refused_with_fsdp():
    # FSDP2 raises NotImplementedError on a channels_last parameter; say so before any worker starts.
    with pytest.raises(ConfigError, match="^train.channels_last cannot be true with parallel.strategy=fsdp"):
        load_config(DIGITS, ["train.channels_last=true", "parallel.strategy=fsdp"])
    assert load_config(DIGITS, ["parallel.strategy=fsdp"]).train.channels_last == "auto"  # auto stays off there
