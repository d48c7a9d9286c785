"""The `nfed` command line: a click group whose subcommands live in nfed/commands/ and load lazily.

Lazy loading keeps `nfed --help` fast and lets each area own its command module. Errors the user can act
on (nfed.common.errors.NfedError, missing files, bad options) print as one line and exit non-zero; set
NFED_DEBUG=1 to see the traceback of unexpected errors.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import sys

import click

from nfed import __version__
from nfed.common.errors import NfedError
from nfed.common.names import printable

# command name -> (module, attribute). A command whose module is absent is simply not listed.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("nfed.commands.data", "synth"),
    "pack": ("nfed.commands.data", "pack"),
    "info": ("nfed.commands.data", "info"),
    "model-info": ("nfed.commands.model", "model_info"),
    "train-local": ("nfed.commands.model", "train_local"),
    "train-central": ("nfed.commands.study", "train_central"),
    "personalise": ("nfed.commands.study", "personalise"),
    "evaluate": ("nfed.commands.model", "evaluate"),
    "adapt": ("nfed.commands.adapt", "adapt"),
    "predict": ("nfed.commands.model", "predict"),
    "export": ("nfed.commands.export", "export"),
    "federate": ("nfed.commands.federation", "federate"),
    "report": ("nfed.commands.federation", "report"),
    "matrix": ("nfed.commands.matrix", "matrix"),
    "demo": ("nfed.commands.demo", "demo"),
    "bench": ("nfed.commands.bench", "bench"),
    "flower-app": ("nfed.commands.flower", "flower_app"),
    "flower-gateway": ("nfed.commands.flower", "flower_gateway"),
    "status": ("nfed.commands.status", "status"),
}


class LazyGroup(click.Group):
    """Group that imports a subcommand's module only when that subcommand is used or listed.

    `lazy_commands` maps name -> (module, attribute); names whose module is absent are not listed.
    """

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands if lazy_commands is not None else COMMANDS

    def list_commands(self, ctx):
        return sorted(name for name, (module, _) in self.lazy_commands.items()
                      if importlib.util.find_spec(module) is not None)

    def get_command(self, ctx, name):
        entry = self.lazy_commands.get(name)
        if entry is None or importlib.util.find_spec(entry[0]) is None:
            return None
        module = importlib.import_module(entry[0])
        return getattr(module, entry[1])

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except NfedError as exc:   # its message may quote a file's contents: shown escaped, on one line
            raise click.ClickException(printable(str(exc))) from None
        except FileNotFoundError as exc:
            raise click.ClickException(f"file not found: {exc.filename or exc}") from None
        except Terminated:
            raise click.ClickException("terminated (SIGTERM); finished rounds and written files are kept") from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None
        except OSError as exc:  # a disk or permission failure outside nfed's own writers: still one line
            if os.environ.get("NFED_DEBUG"):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            reason = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise click.ClickException(f"{where}{reason}") from None
        except Exception as exc:  # unexpected: one line by default, traceback on request
            if os.environ.get("NFED_DEBUG"):
                raise
            raise click.ClickException(
                f"{type(exc).__name__}: {exc} (set NFED_DEBUG=1 for the traceback)") from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nfed")
def cli():
    """nfed: federated building-change detection (W-Net-CD, FedAvg) on NumPy/CuPy.

    Typical flow: nfed synth -> nfed pack -> nfed train-local / nfed federate -> nfed report.
    `nfed demo` runs the whole synthetic study on CPU.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs (workers killed, temporary files removed,
    the run folder's lock released) before the process exits."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None):
    signal.signal(signal.SIGTERM, _terminate)
    cli.main(args=argv, prog_name="nfed")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
