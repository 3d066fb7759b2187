"""``qtbuild demo [hello|bank-card]``."""

from __future__ import annotations

import subprocess

import click

from qtbuild.cli.app import EXIT_CHECK_FAILED


@click.command("demo")
@click.argument("name", type=click.Choice(["hello", "bank-card"]), default="bank-card")
@click.option("--keep", is_flag=True, help="Keep the demo's working directory (logs, images, keys).")
@click.option("--cloud", type=click.Choice(["qingtian", "nitro"]), default="qingtian", show_default=True,
              help="The cloud profile the enclaves rehearse (security module, document shape, chain).")
def command(name: str, keep: bool, cloud: str) -> None:
    """Run a sample end to end with step-by-step output; everything started is stopped again.

    hello: build, convert, run in debug mode, read the console, stop.  bank-card: the seed
    workflow — KMS, object store, signed image, PCR policy, proxy, attested decryption — and
    the refusals (changed image, debug mode, no proxy route).
    """
    from qtbuild.demo import DEMOS, DemoError

    try:
        DEMOS[name](keep=keep, cloud=cloud)
    except DemoError as exc:
        click.echo(f"qtbuild: demo {name} failed: {exc}", err=True)
        raise SystemExit(EXIT_CHECK_FAILED) from None
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        click.echo(f"qtbuild: demo {name} failed: {type(exc).__name__}: {exc}", err=True)
        raise SystemExit(EXIT_CHECK_FAILED) from None
    except KeyboardInterrupt:
        click.echo(f"qtbuild: demo {name} interrupted; everything it started was stopped", err=True)
        raise SystemExit(130) from None
    click.echo(f"demo {name}: all steps passed")
