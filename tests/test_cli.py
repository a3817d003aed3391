"""The LightningCLI example config builds every callback from YAML and trains with them."""

import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, read_scalars

pytest.importorskip("jsonargparse")
sys.path.insert(0, str(REPO / "examples"))
from cli import main  # noqa: E402

CONFIG = REPO / "examples" / "cli_config.yaml"


def test_cli_config_builds_and_trains_every_callback(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    cli = main(
        args=["fit", "--config", str(CONFIG), "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"],
    )
    built = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    for entry in config["trainer"]["callbacks"]:
        name = entry["class_path"].rsplit(".", 1)[1]
        assert name in built, f"{name} missing from the trainer"
        for arg, value in entry.get("init_args", {}).items():
            assert getattr(built[name], arg) == value, f"{name}.{arg}"
        defaults = type(built[name])()  # what the class gives in Python; the CLI must not fall back to the base's
        for arg in ("every_n_epochs", "probe", "probe_fidelity", "probe_size", "probe_selector", "probe_balance"):
            if arg not in entry.get("init_args", {}) and hasattr(defaults, arg):
                assert getattr(built[name], arg) == getattr(defaults, arg), f"{name}.{arg} from the CLI"
    tags = set(read_scalars(Path(tmp_path) / "cli"))
    assert any(t.startswith("arm/") for t in tags), sorted(tags)
