"""Run the model and read data without leaving a trace that the training loop could see.

Every forward pass a callback makes goes through :func:`evaluation_mode`, and every read of a dataset through
:func:`preserved_rng` with the dataset as an owner. Together they restore, on exit and also after an error:

* the ``training`` flag of every submodule (set directly, so ``train()``/``eval()`` overrides with side effects,
  such as loralib's weight merging, never run);
* every buffer's values and identity (BatchNorm statistics, but also quantization observers that update in
  eval mode) and every plain tensor attribute of a module (what pruning and old-style weight norm recompute
  in forward pre-hooks);
* Python's, NumPy's and torch's global RNG streams, and the random generators a dataset holds itself;
* the module's ``self.log`` (calls from ``forward`` are dropped, so a probe pass never becomes a logged value);
* compiled code: ``torch.compile``'d modules run eagerly inside, so the callbacks' hooks see every layer and
  their passes never trigger recompilation.
"""

from __future__ import annotations

import contextlib
import random
import types
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["evaluation_mode", "preserved_rng", "preserved_module_state", "muted_logging", "owned_generators"]

_GENERATORS = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)
_LEAVES = (str, bytes, int, float, complex, bool, type(None), type, types.ModuleType, types.FunctionType,
           torch.Tensor, np.ndarray, nn.Module)


def owned_generators(owner: object, depth: int = 4, max_items: int = 64) -> list[object]:
    """The random generators ``owner`` holds: in its attributes, its attributes' attributes (a wrapped dataset,
    a transform pipeline) and small containers, up to ``depth`` levels down (``Subset`` → dataset → list of
    transforms → transform → generator is four).

    Containers of more than ``max_items`` elements (a list of file paths) are not searched, nor are tensors,
    arrays, modules or functions.
    """
    found, seen, level = [], set(), [owner]
    for _ in range(depth + 1):
        below = []
        for obj in level:
            if id(obj) in seen or isinstance(obj, _LEAVES):
                continue
            seen.add(id(obj))
            if isinstance(obj, _GENERATORS):
                found.append(obj)
            elif isinstance(obj, dict):
                below.extend(obj.values() if len(obj) <= max_items else ())
            elif isinstance(obj, (list, tuple, set, frozenset)):
                below.extend(obj if len(obj) <= max_items else ())
            else:
                try:  # objects with __slots__ or a raising __getattr__ have no usable vars()
                    below.extend(vars(obj).values())
                except Exception:
                    pass
        level = below
    return found


def _generator_state(generator: object) -> object:
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    if isinstance(generator, np.random.RandomState):
        return generator.get_state()
    return generator.getstate()


def _set_generator_state(generator: object, state: object) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = state
    elif isinstance(generator, np.random.RandomState):
        generator.set_state(state)
    else:
        generator.setstate(state)


@contextlib.contextmanager
def preserved_rng(*owners: object) -> Iterator[None]:
    """Restore Python's, NumPy's, torch's CPU and (if initialised) CUDA global RNG streams on exit, and the
    generators each of ``owners`` holds (:func:`owned_generators`; a dataset with its own augmentation RNG)."""
    py_state, np_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    owned = [(g, _generator_state(g)) for owner in owners for g in owned_generators(owner)]
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        for generator, state in owned:
            _set_generator_state(generator, state)


@contextlib.contextmanager
def preserved_module_state(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (values and identity) and every plain tensor attribute of ``model``'s modules."""
    buffers = [(module, name, buf, buf.clone())
               for module in model.modules() for name, buf in module._buffers.items()
               if buf is not None and not isinstance(buf, nn.parameter.UninitializedBuffer)]  # lazy modules
    attributes = [(module, {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)})
                  for module in model.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buf, saved in buffers:
                module._buffers[name] = buf
                if buf.shape != saved.shape:  # a quantization observer resizes its scale
                    buf.resize_(saved.shape)
                if not torch.equal(buf, saved):  # only what changed (a write bumps autograd's version counter)
                    buf.copy_(saved)
        for module, saved in attributes:
            for key in [k for k, v in vars(module).items() if isinstance(v, torch.Tensor) and k not in saved]:
                del module.__dict__[key]
            module.__dict__.update(saved)


def _discard_log(*args: object, **kwargs: object) -> None:
    return None


@contextlib.contextmanager
def muted_logging(model: nn.Module) -> Iterator[None]:
    """``self.log``/``self.log_dict`` of every LightningModule in ``model`` do nothing inside."""
    muted = [module for module in model.modules()  # not already muted by an enclosing block, nor user-shadowed
             if callable(getattr(type(module), "log", None)) and hasattr(module, "_current_fx_name")
             and "log" not in module.__dict__ and "log_dict" not in module.__dict__]
    for module in muted:
        module.__dict__["log"] = module.__dict__["log_dict"] = _discard_log
    try:
        yield
    finally:
        for module in muted:
            module.__dict__.pop("log", None)
            module.__dict__.pop("log_dict", None)


def _eager() -> contextlib.AbstractContextManager:
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or torch.compiler.is_compiling():  # inside a compiled region: leave dynamo alone
        return contextlib.nullcontext()
    return set_stance("force_eager")


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, grad: bool | None = False) -> Iterator[nn.Module]:
    """Evaluate ``model`` without leaving a trace on training (see the module docstring for what is restored).

    Inside: every submodule in eval mode (BatchNorm reads, never updates, its running statistics; dropout
    off), compiled code run eagerly, ``self.log`` muted, and autograd off (``grad=False``), on (``True``) or as
    it was (``None``).
    """
    modes = [(module, module.training) for module in model.modules()]
    grad_mode = contextlib.nullcontext() if grad is None else torch.set_grad_enabled(grad)
    try:
        with preserved_rng(), preserved_module_state(model), muted_logging(model), _eager(), grad_mode:
            for module, _ in modes:
                module.training = False
            yield model
    finally:
        for module, was_training in modes:
            module.training = was_training
