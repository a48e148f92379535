"""The typer application and its command groups. Each stage's module adds its commands here.

Commands stay thin: parse options, then call one library function. Heavy imports (torch) happen
inside the commands so `sorakit --help` answers at once.
"""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

console = Console(stderr=True)

app = typer.Typer(
    name="sorakit",
    help="From a folder of raw videos to a trained Sora-style text-to-video model, one command per stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
train_app = typer.Typer(help="Train a model from a recipe: vae, captioner, dit, refiner.", no_args_is_help=True)
vae_app = typer.Typer(help="Use a trained VAE: reconstruct a video, evaluate on shards.", no_args_is_help=True)
captioner_app = typer.Typer(help="Evaluate a trained captioner.", no_args_is_help=True)
eval_app = typer.Typer(help="Score models and videos (toy-world prompt following, seams).", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(vae_app, name="vae")
app.add_typer(captioner_app, name="captioner")
app.add_typer(eval_app, name="eval")



def _version(value: bool):
    if value:
        from sorakit import __version__

        print(f"sorakit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """From a folder of raw videos to a trained Sora-style text-to-video model, one command per stage."""


CONFIG_HELP = "Recipe YAML; its values override the defaults."
SET_HELP = "Override one config value, e.g. --set optim.lr=1e-4 (repeatable)."


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 1."""


def fail(message: str, code: int = 1):
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def report_trained(message: str) -> None:
    """Print a training command's last line once: with DDP on processes, every rank returns to the CLI."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        console.print(message)


def handle_errors(fn):
    """Turn expected failures into a one-line error naming the file and the reason."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sorakit.config import ConfigError

        try:
            return fn(*args, **kwargs)
        except (UserError, ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status instead of exiting, so tests can call it."""
    from sorakit.cli import load_commands

    load_commands()
    command = typer.main.get_command(app)
    try:
        # Without standalone mode click returns the code of a `typer.Exit` instead of exiting.
        rv = command.main(args=argv if argv is not None else sys.argv[1:], prog_name="sorakit", standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0)
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:
        # Usage errors and aborts come from the click that typer vendors; match them by shape.
        if type(e).__name__ == "Abort":
            return 130
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            return e.exit_code
        raise
    return rv if isinstance(rv, int) else 0
