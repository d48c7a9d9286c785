"""Options shared by several commands, defined once: --device, --precision, checked numbers, the training set-up,
--resume/--overwrite, and the options of the config dataclasses, generated from their fields' declarations."""
from __future__ import annotations

import functools

import click

from nfed.common.errors import ConfigError
from nfed.training.trainer import PROFILES, TrainConfig, profile_config

DEVICE_HELP = "cpu, cuda or cuda:N (default: $NFED_DEVICE, else cpu)"

device_option = click.option("--device", default=None, help=DEVICE_HELP)


def _parse_precision(ctx, param, value):
    """The precision mode of --precision (not given: $NFED_PRECISION, else fp32); it travels in the command's
    RunEnvironment (run_environment), never as a process-wide setting."""
    from nfed.gpu.precision import parse_precision

    return parse_precision(value)


def run_environment(device, precision):
    """The RunEnvironment of --device / --precision (the device checked usable here)."""
    from nfed.training.environment import RunEnvironment

    return RunEnvironment.from_options(device, precision)


def training_setup(device, precision, **options):
    """(TrainConfig, RunEnvironment) of the training options, --device and --precision; a model that cannot fit
    in this machine's memory is refused here, before any folder is made."""
    from nfed.training.trainer import require_memory

    config = training_config(**options)
    env = run_environment(device, precision)
    require_memory(config, env.device)
    return config, env


precision_option = click.option(
    "--precision", type=click.Choice(["fp32", "tf32", "bf16"]), default=None, callback=_parse_precision,
    help="GPU GEMM precision: fp32 (default, matches the CPU), tf32 (tensor cores) or bf16 (bf16 inputs, "
         "fp32 master weights and accumulation); default $NFED_PRECISION, else fp32. No effect on CPU.")


class LimitedNumber(click.ParamType):
    """A number option checked against nfed.common.validate.LIMITS: finite and in range, else one line and exit 1
    (`--lr inf: must be a finite number > 0 and <= 1`)."""

    def __init__(self, limit):
        self.limit = limit
        self.name = "integer" if limit.integer else "number"

    def convert(self, value, param, ctx):
        label = param.opts[0] if param is not None and param.opts else "value"
        if isinstance(value, str):
            return self.limit.parse(label, value)
        return self.limit.check(label, value)


def limited(key: str) -> LimitedNumber:
    """The click type of a numeric option whose accepted range is LIMITS[key]; the config modules are imported
    first, since their declared fields add their ranges to LIMITS (a command may be loaded before any of them)."""
    import nfed.federation.config  # noqa: F401
    import nfed.training.trainer  # noqa: F401
    from nfed.common.validate import LIMITS

    return LimitedNumber(LIMITS[key])


def apply_options(options):
    """Decorator applying a list of click options in the order they are listed (first = first in --help)."""
    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function
    return decorate


def _declared(cls, name: str):
    """(field, declaration) of `cls`'s field `name`."""
    from nfed.common.fields import declared_fields

    return next((field, found) for field, found in declared_fields(cls) if field.name == name)


def option_fields(cls, only=None, exclude=()) -> list[str]:
    """The names of `cls`'s fields that declare a command-line option (`only` those, less `exclude`)."""
    from nfed.common.fields import declared_fields

    names = [field.name for field, found in declared_fields(cls) if found.cli]
    unknown = set(only or ()).union(exclude) - set(names)
    if unknown:
        raise TypeError(f"{cls.__name__} declares no option for {', '.join(sorted(unknown))}")
    return [name for name in names if (only is None or name in only) and name not in exclude]


def field_option(cls, name: str, *, override: bool = False, help: str | None = None):
    """The click option of a declared config field (nfed.common.fields.option): its name, type, range, choices,
    default and help come from the declaration. `override`: the default is None, the value being left to
    something else (a profile, the demo's settings); `help` replaces the declared one where the option means
    more than the field (the demo's). The command receives the raw value: `field_value` turns it into the field's."""
    from nfed.common.fields import value_type

    field, found = _declared(cls, name)
    attrs = {"help": found.help if help is None else help, "default": None}
    if value_type(cls, name) is bool:   # a flag that sets the opposite of the default
        return click.option(found.cli, name, is_flag=True, default=False, help=attrs["help"])
    if found.choices:
        attrs["type"] = click.Choice([str(choice) for choice in found.choices])
    elif found.limit is not None:
        attrs["type"] = LimitedNumber(found.limit)
    if found.multiple:   # repeatable; not given: ()
        return click.option(found.cli, name, multiple=True, **{**attrs, "default": field.default})
    if not override and found.parse is None and field.default is not None:
        attrs.update(default=field.default, show_default=True)
    return click.option(found.cli, name, **attrs)


def field_value(cls, name: str, value, *, override: bool = False):
    """The field's value of its option's raw `value` (None, or a flag not given: the field's default, or None
    when `override`)."""
    from nfed.common.fields import value_type

    field, found = _declared(cls, name)
    kind = value_type(cls, name)
    if kind is bool:
        return (not field.default) if value else (None if override else field.default)
    if found.multiple:
        one = found.parse or (lambda item: item)
        return tuple(one(item) for item in value) if value else (None if override else field.default)
    if value is None:
        return None if override else field.default
    if found.parse is not None:
        return found.parse(value)
    return kind(value) if found.choices else value


def config_options(cls, *, into: str, only=None, exclude=()):
    """Decorator adding the options of `cls`'s declared fields (`only`/`exclude`: field names) to a click
    command, which receives them as one `cls` value named `into` (fields without an option keep their
    defaults: the command may `dataclasses.replace` them)."""
    names = option_fields(cls, only, exclude)

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {name: field_value(cls, name, kwargs.pop(name)) for name in names}
            return command(*args, **{into: cls(**values)}, **kwargs)

        return apply_options([field_option(cls, name) for name in names])(wrapper)
    return decorate


def run_folder_options(folder: str):
    """Decorator adding --resume and --overwrite (of the run in the option `folder`), refusing both at once."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, resume, overwrite, **kwargs):
            if resume and overwrite:
                raise ConfigError(f"--resume continues the run in {folder}, --overwrite replaces it: give one of "
                                  "them")
            return command(*args, resume=resume, overwrite=overwrite, **kwargs)

        return apply_options([
            click.option("--resume", is_flag=True, help=f"continue the run in {folder} from its last finished round"),
            click.option("--overwrite", is_flag=True,
                         help=f"replace the run already in {folder} (its results are deleted)"),
        ])(wrapper)
    return decorate


profile_option = click.option(
    "--profile", type=click.Choice(sorted(PROFILES)), default="demo", show_default=True,
    help="demo: small and fast on CPU; paper: the study's set-up (w 64, lr 1e-4, 50 epochs)")

# The training set-up of every command that trains W-Net-CD (train-local, train-central, personalise): a profile
# and overrides of its values (every TrainConfig field with an option); `training_config` makes the TrainConfig.
TRAINING_OPTIONS = [profile_option, *(field_option(TrainConfig, name, override=True)
                                      for name in option_fields(TrainConfig))]


def training_config(profile, **options):
    """The TrainConfig of a profile and the TrainConfig options among `options` (None keeps the profile's value)."""
    return profile_config(profile, **{name: field_value(TrainConfig, name, options.get(name), override=True)
                                      for name in option_fields(TrainConfig)})


def training_options(*, into: str, only=None):
    """Decorator adding --profile and the TrainConfig options `only` (profile overrides) to a click command, which
    receives the TrainConfig as `into`."""
    names = option_fields(TrainConfig, only)

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, profile, **kwargs):
            options = {name: kwargs.pop(name) for name in names}
            return command(*args, **{into: training_config(profile, **options)}, **kwargs)

        return apply_options([profile_option, *(field_option(TrainConfig, name, override=True)
                                                for name in names)])(wrapper)
    return decorate


# --track [URI]: alone, the local store beside the run (RUN/mlruns.db, no server); with a URI, that store.
track_option = click.option(
    "--track", default=None, is_flag=False, flag_value="", metavar="[URI]",
    help="log parameters, metrics per round and per district and the results to MLflow (nfed[track]): alone, a "
         "store beside the run (RUN/mlruns.db); with a URI, that tracking store")


def tracked_run(track, run_dir, command: str, env=None, **configs):
    """The MLflow run of a command under --track (a context manager yielding its Tracker, or None without
    --track); its warnings go to stderr."""
    from nfed.runs.tracking import run_params, tracked

    return tracked(track, run_dir, command, run_params(command, env, **configs) if track is not None else {},
                   warn=lambda line: click.echo(line, err=True))
