"""LightningCLI entry point: every callback configured from YAML.

    python examples/cli.py fit --config examples/cli_config.yaml
"""

from pytorch_lightning.cli import LightningCLI

from lightning_interp.demo import DigitsCNN, DigitsDataModule


def main(args=None, run: bool = True):
    return LightningCLI(DigitsCNN, DigitsDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
