"""Screenshots of TensorBoard serving the demo's logs, for docs/tour.md.

    python examples/demo.py --logdir demo_logs --no-progress
    python docs/make_tour.py --logdir demo_logs --out docs/img

Starts a real ``tensorboard`` on 127.0.0.1 and points headless Chromium (Debian's ``chromium``) at each
page. Nothing leaves the machine: Chromium runs with its background networking off.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PAGES = {
    "custom_scalars": "#custom_scalars",
    "time_series": "#timeseries",
    "images": "#images",
    "text_alerts": "#text",
    "histograms": "#histograms",
    "projector": "#projector",
}

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"tensorboard did not come up at {url}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logdir", default="demo_logs")
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--wait-ms", type=int, default=15000, help="virtual time for each page to render")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_until_up(base + "data/runs")
        time.sleep(5)  # let the server read the event files
        for name, fragment in PAGES.items():
            target = out / f"{name}.png"
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run(
                    [args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1000",
                     f"--virtual-time-budget={args.wait_ms}", f"--screenshot={target.resolve()}", base + fragment],
                    check=True, capture_output=True, timeout=120,
                )
            print(f"{target}  <-  {base}{fragment}")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
