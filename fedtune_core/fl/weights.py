"""Getting weights into a backbone: checkpoint files loaded strictly, the hub failing fast.

A checkpoint file must be a state dict of tensors (``torch.save(model.state_dict())`` or
safetensors), read with ``torch.load(weights_only=True)``. Its keys and shapes must match
the architecture's, apart from a classifier that the run replaces; anything else stops the
run with one line naming how many keys matched and an example of each mismatch, instead
of a model that silently keeps its random initialisation.

The Hugging Face hub is probed once per process (one request, a few seconds at most).
When it cannot be reached, the hub library is put in offline mode, so weights come from
its local cache or fail at once, without minutes of retries.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

from fedtune_core.errors import ConfigError
from fedtune_core.specs import is_torchscript

HUB_PROBE_SECONDS = 5.0
WRAPPERS = ("state_dict", "model", "module")  # keys that some trainers nest a state dict under
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")  # in OpenAI's archives
NOT_A_CHECKPOINT = ("expected a state dict of tensors saved with torch.save(model.state_dict()) "
                    "or safetensors")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (on the CPU), unwrapped from common containers.

    A TorchScript archive (how OpenAI released CLIP) is read with ``torch.jit.load``, the
    only reader of that format, and its metadata entries are dropped.

    Raises:
        ConfigError: the file cannot be read as a state dict of tensors ("not a checkpoint").
    """
    path = str(path)
    if is_torchscript(path):
        return _read_torchscript(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for foreign files
        raise ConfigError(f"checkpoint file {path!r} is not a checkpoint: it cannot be read "
                          f"with torch.load(weights_only=True) ({type(err).__name__}); "
                          f"{NOT_A_CHECKPOINT}") from None
    state = _unwrap(obj)
    if state is None:
        raise ConfigError(f"checkpoint file {path!r} is not a checkpoint: it holds "
                          f"{_describe(obj)}; {NOT_A_CHECKPOINT}")
    return state


def _read_torchscript(path: str) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # deprecated, but the only reader of these archives
            warnings.filterwarnings("ignore", category=FutureWarning)
            state = dict(torch.jit.load(path, map_location="cpu").state_dict())
    except Exception as err:  # a damaged archive
        raise ConfigError(f"checkpoint file {path!r} is not a checkpoint: a TorchScript archive "
                          f"that torch.jit.load cannot read ({type(err).__name__})") from None
    for key in OPENAI_METADATA:
        state.pop(key, None)
    return state


def _unwrap(obj: object) -> dict[str, torch.Tensor] | None:
    """A non-empty ``{str: tensor}`` found in ``obj`` (directly or under a wrapper key)."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            return None
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                          for k, v in obj.items()):
        return None
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        return {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _describe(obj: object) -> str:
    if isinstance(obj, Mapping):
        return "an empty dict" if not obj else "a dict that is not a state dict of tensors"
    return f"a {type(obj).__name__}"


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                model: str, replaced: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``; every key and shape must match.

    Args:
        module: the network, built with the architecture of the checkpoint.
        state: the checkpoint's tensors (already converted by the library's own filter).
        source: the checkpoint file, for the message.
        model: the backbone name, for the message.
        replaced: key prefixes the run replaces (a classifier for other classes): they are
            neither loaded nor required.

    Raises:
        ConfigError: one line: how many keys matched, and an example of each mismatch.
    """
    def kept(key: str) -> bool:
        return not key.startswith(replaced) if replaced else True

    own = {k: v for k, v in module.state_dict().items() if kept(k)}
    # buffers the module recomputes itself (not in its state dict, e.g. open_clip's attention
    # mask) may come with a TorchScript archive: they are not weights
    transient = {n for n, _ in module.named_buffers()} - set(module.state_dict())
    given = {k: v for k, v in state.items() if kept(k) and k not in transient}
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [k for k in own if k in given and tuple(given[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        matched = len(own) - len(missing) - len(shapes)
        parts = [f"{matched} of {len(own)} keys of the model match"]
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k!r}: {tuple(given[k].shape)} "
                         f"in the file, {tuple(own[k].shape)} in the model)")
        raise ConfigError(f"checkpoint file {source!r} does not fit {model}: "
                          f"{'; '.join(parts)}; pass a checkpoint of this architecture")
    module.load_state_dict(given, strict=False)  # every kept key matched: only `replaced` stay


def load_file(module: nn.Module, path: str, *, model: str, replaced: tuple[str, ...] = (),
              convert: Callable[[dict], dict] | None = None) -> None:
    """Read checkpoint ``path`` and load it strictly into ``module`` (see :func:`load_strict`).

    ``convert`` is the library's own conversion of foreign formats (timm's filter), applied
    first; where it fails on the file, the file's keys are compared as they are.
    """
    state = read_checkpoint(path)
    if convert is not None:
        try:
            converted = convert(dict(state))
        except Exception:  # shapes the filter cannot convert: the comparison below names them
            converted = state
        state = converted
    load_strict(module, state, source=path, model=model, replaced=replaced)


def library_filter(net: nn.Module) -> Callable[[dict], dict] | None:
    """timm's checkpoint filter of ``net``'s model family (e.g. ViT), if it has one."""
    import sys

    fn = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    return functools.partial(fn, model=net) if callable(fn) else None


@functools.cache
def prepare_hub() -> bool:
    """Probe the Hugging Face hub once; offline mode for the rest of the process if unreachable.

    Returns:
        True if the hub can be reached (or HF_HUB_OFFLINE was set by the user: then the hub
        library handles it), False if it was put in offline mode.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return True
    if _reachable(constants.ENDPOINT):
        return True
    constants.HF_HUB_OFFLINE = True  # no retries: the local cache or an immediate error
    return False


def _reachable(url: str) -> bool:
    """One HEAD request to ``url`` with a short timeout; any HTTP answer counts."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                               timeout=HUB_PROBE_SECONDS).close()
    except urllib.error.HTTPError:  # the server answered
        return True
    except (OSError, ValueError):  # no route, no name, refused, timed out, bad URL
        return False
    return True


def hub_error(model: str, tag: str | None, err: Exception) -> ConfigError:
    """The one line for pre-trained weights that the hub could not give."""
    return ConfigError(
        f"could not get pre-trained weights {tag!r} for {model} ({type(err).__name__}: the "
        f"Hugging Face hub is unreachable or lacks them, and they are not in its local cache); "
        f"pass --weights /path/to/checkpoint (fedtune run) or put the file at "
        f"$FEDTUNE_WEIGHTS_DIR/{model}.pt (any command); HF_HUB_OFFLINE=1 skips the network "
        f"and uses the local cache only")
