"""The lightning_interp demo: a small CNN on scikit-learn's digits with noisy labels and leaked test images.

    python examples/demo.py --epochs 20 --logdir demo_logs

Same as ``python -m lightning_interp.demo``.
"""

from lightning_interp.demo.__main__ import main

if __name__ == "__main__":
    main()
