"""The command-line edge: check Hydra overrides before a run starts, and turn every mistake a user
can make into one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from rlfuse.errors import EXIT_USAGE, UserError, fail  # noqa: F401 (fail and EXIT_USAGE: part of the edge)

CONF_DIR = Path(__file__).resolve().parent / "conf"
# Options of Hydra's own command line that print something and exit, or change no config value.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--package", "-p",
               "--shell-completion", "-sc", "--version"}
# Options of Hydra's command line that take the next argument as their value.
_VALUE_FLAGS = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--experimental-rerun"}


def _register_resolvers() -> None:
    """${rlfuse_package:relative/path}: a path inside the installed rlfuse package (shipped models)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("rlfuse_package"):
        OmegaConf.register_new_resolver("rlfuse_package", lambda relative: str(Path(__file__).resolve().parent / relative))


_register_resolvers()


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def config_groups() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _type_mismatch(default: object, value: object) -> str | None:
    """Why value cannot replace default, or None when it can (ints may stand for floats)."""
    if default is None or value is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "a bool (true/false)"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an int"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a float"
    if isinstance(default, str):
        return None if isinstance(value, (str, int, float)) and not isinstance(value, bool) else "a string"
    return None


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=False)


def _explain_composition_error(override_text: str, error: Exception) -> str:
    """Rewrite Hydra's multi-line composition errors as one actionable line."""
    from hydra.errors import MissingConfigException

    key = override_text.split("=", 1)[0].lstrip("+~")
    if isinstance(error, MissingConfigException) or "Could not find" in str(error):
        group = key.split("@", 1)[0]
        if group in config_groups():
            return f"{override_text}: no such choice for '{group}'; valid choices: {', '.join(group_choices(group))}"
    if "Could not override" in str(error) or "Key" in str(error) and "not in struct" in str(error):
        hint = "" if "." in key else f", or pick a group: {', '.join(config_groups())}"
        return f"unknown config key '{key}'; check the spelling (`--cfg job` prints every key){hint}"
    return f"{override_text}: {_first_line(error)}"


def check_overrides(config_name: str, overrides: list[str]) -> object:
    """Compose the config as Hydra will, and check each override's key, choice and type.

    Sweep overrides (a=1,2) are checked value by value. Returns the config composed with the
    first value of each sweep. Raises UserError naming the override and what would be valid.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise UserError(f"cannot parse the command line: {_first_line(error)}") from None
    # Hydra's own settings are Hydra's to check; interval sweeps have no values to list and are
    # the business of a sweeper that samples them (Optuna).
    parsed = [p for p in parsed if not p.key_or_group.startswith("hydra")]
    intervals = [p for p in parsed if p.is_sweep_override() and _sweep_values(p) is None]
    if intervals and not any(p.key_or_group == "hydra/sweeper" for p in OverridesParser.create().parse_overrides(overrides)):
        raise UserError(f"{intervals[0].input_line}: an interval needs a sweeper that samples it; add -m and "
                        f"hydra/sweeper=optuna (pip install hydra-optuna-sweeper), or list values: a=1,2,3")
    parsed = [p for p in parsed if p not in intervals]
    first_values = [f"{p.get_key_element()}={_sweep_values(p)[0]}" if p.is_sweep_override() else p.input_line
                    for p in parsed]
    # Check every value of every sweep on top of the others' first values.
    candidates = [list(first_values)]
    for i, p in enumerate(parsed):
        if p.is_sweep_override():
            for value in _sweep_values(p)[1:]:
                candidates.append(first_values[:i] + [f"{p.get_key_element()}={value}"] + first_values[i + 1:])
    composed = None
    for candidate in candidates:
        try:
            cfg = _compose(config_name, candidate)
        except (HydraException, OmegaConfBaseException) as error:
            culprit, culprit_error = _find_culprit(config_name, candidate)
            if culprit is None:
                raise UserError(f"{' '.join(candidate)}: {_first_line(error)}") from None
            raise UserError(_explain_composition_error(culprit, culprit_error)) from None
        # Types: compare each value override against the default it replaces.
        groups = set(config_groups())
        group_overrides = [t for t, p in zip(candidate, parsed) if p.key_or_group.split("@")[0] in groups]
        defaults = _compose(config_name, group_overrides)
        for text, p in zip(candidate, parsed):
            key = p.key_or_group
            if key.split("@")[0] in groups or p.is_delete() or p.is_add():
                continue
            try:
                default = OmegaConf.select(defaults, key, default=None)
                value = OmegaConf.select(cfg, key, default=None)
            except OmegaConfBaseException:
                continue  # a missing (???) or broken interpolated value: the run's preflight names it
            if OmegaConf.is_config(default) and not OmegaConf.is_config(value):
                raise UserError(f"{text}: '{key}' is a section, not a value; set one of its keys, e.g. {key}.<name>=...")
            expected = _type_mismatch(default, value)
            if expected:
                raise UserError(f"{text}: '{key}' must be {expected}, got {type(value).__name__} {value!r}")
        composed = composed if composed is not None else cfg
    return composed


def _sweep_values(override) -> list[str] | None:
    """The values of a choice or range sweep as strings; None for an interval sweep."""
    try:
        return list(override.sweep_string_iterator())
    except Exception:  # Hydra raises its own error types for sweeps that cannot be enumerated
        return None


def _find_culprit(config_name: str, overrides: list[str]) -> tuple[str | None, Exception | None]:
    """The first override that alone fails to compose, and its error (so the message names it)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    for text in overrides:
        try:
            _compose(config_name, [text])
        except (HydraException, OmegaConfBaseException) as error:
            return text, error
    return None, None


def process_rank() -> int:
    """This process's global rank as set by accelerate / torchrun, before any of them is imported."""
    return int(os.environ.get("RANK", "0"))


def run_hydra_app(
    task: Callable[[object], object],
    config_name: str,
    extra_overrides: Callable[[object], list[str]] | None = None,
) -> None:
    """Check the command line, then hand it to Hydra (multirun, launchers, sweepers, --help).

    extra_overrides(cfg) may add Hydra overrides derived from the composed config (e.g. the run
    folder to resume in). Ranks other than 0 write no Hydra folder: rank 0 owns the run folder.
    """
    import hydra

    args = sys.argv[1:]
    if not any(a.split("=", 1)[0] in _INFO_FLAGS for a in args):
        overrides, skip_next = [], False
        for i, arg in enumerate(args):
            flag, _, inline_value = arg.partition("=")
            if skip_next:
                skip_next = False
            elif flag in _VALUE_FLAGS:
                value = inline_value or (args[i + 1] if i + 1 < len(args) else "")
                skip_next = not inline_value
                if flag in ("--config-name", "-cn"):
                    config_name = value
            elif not arg.startswith("-"):
                overrides.append(arg)
        try:
            cfg = check_overrides(config_name, overrides)
            extra = extra_overrides(cfg) if extra_overrides is not None else []
            # Only rank 0 chooses the run folder; the others get a throwaway one below.
            args += [o for o in extra if process_rank() == 0 or not o.startswith("hydra.run.dir=")]
        except UserError as error:
            fail(str(error))
        if process_rank() != 0:
            args += [f"hydra.run.dir={tempfile.mkdtemp(prefix='rlfuse-rank')}", "hydra.output_subdir=null",
                     "hydra/job_logging=stdout", "hydra/hydra_logging=none"]

    def guarded(cfg):
        try:
            return task(cfg)
        except UserError as error:
            fail(str(error))

    sys.argv = [sys.argv[0]] + args
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(guarded)()
