"""The Classifier wrapper, the registry (built-in and user models) and seeded construction.

A user's model is a factory `fn(num_classes, width, in_channels, **kw) -> nn.Module` that
returns a module with the Classifier protocol: `encoder` (images (B, C, H, W) -> (B, D)),
`fc` (an nn.Linear D -> num_classes) and `embed_dim` (D). Wrap any network as
`Classifier(encoder, embed_dim, num_classes)`. Two ways to name it:

    @runs.models.register              # under the function's name, in this process
    def my_net(num_classes=10, width=1.0, in_channels=3): ...

    --model my_package.my_module:my_net   # any CLI; the module is imported, the factory
                                          # registered under exactly that name

Checkpoints record the name; a `module:factory` name imports its module only when the user
allowed it (runs.usercode), so a checkpoint never runs code on its own.

Options: a factory's other keyword parameters (`pool: Literal["max", "avg"] = "max"`) are its
options. create_model checks them (a Literal annotation declares the choices) and records
every one, default included, in model.spec; `parse_options` reads `--model-option key=value`;
`@legacy(pool="avg")` names the value an option had before it existed, which `build` fills
into older specs so their checkpoints rebuild the network they were trained with.
"""

import inspect
import math
import typing
from collections.abc import Callable, Sequence

import torch
from torch import nn

from runs import usercode
from runs.errors import UserError
from runs.registry import Registry

PROTOCOL = ("encoder", "fc", "embed_dim")  # what every model of the store's CLIs has
# Above this a model is refused before any weight exists: 2e9 fp32 parameters are 8 GB of
# weights, about 32 GB with gradients and optimiser state (the paper's largest is 11e6).
MAX_PARAMETERS = 2_000_000_000


class LiveNames(Sequence):
    """The registered names, sorted, as they are when read (not when made): the `--model`
    choices of a config class made at import still accept a model registered later."""

    def __init__(self, registry: Registry):
        self._registry = registry

    def __getitem__(self, index):
        return self._registry.names_now()[index]

    def __iter__(self):
        return iter(self._registry.names_now())

    def __len__(self) -> int:
        return len(self._registry.names_now())

    def __contains__(self, name) -> bool:
        return name in self._registry

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(self._registry.names_now())


class ModelRegistry(Registry):
    """The model registry: live `names()`, and `pkg.mod:factory` names resolved on demand
    from modules the user allowed (else refused, saying which flag allows it)."""

    def names(self) -> LiveNames:
        return LiveNames(self)

    def names_now(self) -> list[str]:
        return super().names()

    def get(self, name: str, source: str = None) -> Callable:
        if name in self or not usercode.is_qualified(name):
            return super().get(name)
        module, _ = usercode.split_qualified(name)
        if not usercode.is_allowed(module):
            where = f"{source}: " if source else ""
            raise UserError(f"{where}model {name!r} comes from module {module}; pass "
                            f"--import {module} to allow it (from Python: "
                            f"runs.models.allow({module!r}))")
        return use(name)

    def put(self, name: str, fn: Callable) -> None:
        """Add or replace an entry (the checks are `register`'s)."""
        self._entries[name] = fn


MODELS = ModelRegistry("model")
_user_names: set[str] = set()  # names registered by the user (may be registered again)


def register(fn: Callable = None, *, name: str = None):
    """Register a user's model factory `fn(num_classes, width, in_channels, **kw)`.

    Its name is `name` or the function's own. Registering a user name again replaces the
    entry (re-running a notebook cell); a built-in name is refused. The defining module is
    allowed, so checkpoints naming `module:factory` of it load in this process.
    """
    def add(fn):
        key = name or fn.__name__
        _check_factory(fn, key)
        if key in MODELS and key not in _user_names:
            raise UserError(f"model name {key!r} is built in; register yours under another "
                            f"name (register(name=...))")
        MODELS.put(key, fn)
        _user_names.add(key)
        if getattr(fn, "__module__", "__main__") not in ("__main__", None):
            usercode.allow(fn.__module__)
        return fn

    return add(fn) if fn is not None else add


def allow(module: str) -> None:
    """Let checkpoints whose model comes from `module` (`module:factory`) import it: the
    Python form of `--import module`."""
    usercode.allow(module)


def use(name: str, flag: str = None) -> Callable:
    """The factory a `pkg.mod:factory` name gives: pkg.mod imported (and allowed: the
    user named it), the factory registered under exactly that name."""
    if name in MODELS:
        return MODELS.get(name)
    what = f"{flag} {name}" if flag else f"model {name!r}"
    module_name, attr = usercode.split_qualified(name)
    fn = usercode.import_module(module_name, what=what)
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"{what}: module {module_name} has no {attr!r}")
    if not callable(fn):
        raise UserError(f"{what}: {module_name}.{attr} is not callable")
    return register(fn, name=name)


def _check_factory(fn: Callable, name: str) -> None:
    try:
        inspect.signature(fn).bind(num_classes=10, width=1.0, in_channels=3)
    except TypeError:
        raise UserError(f"model {name!r}: its factory must take num_classes, width and "
                        f"in_channels as keywords, e.g. def {getattr(fn, '__name__', 'net')}"
                        f"(num_classes=10, width=1.0, in_channels=3)") from None
    except ValueError:  # no signature to read (a builtin): nothing to check
        pass


def check_protocol(model, name: str) -> None:
    """A UserError naming what a factory's module lacks of `encoder`, `fc`, `embed_dim`."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model {name!r}: its factory returned a {type(model).__name__}, "
                        f"not an nn.Module")
    missing = [attr for attr in PROTOCOL if not hasattr(model, attr)]
    if not missing and not isinstance(model.fc, nn.Linear):
        missing = ["fc (an nn.Linear)"]
    if missing:
        raise UserError(f"model {name!r}: its factory returned a {type(model).__name__} "
                        f"without {', '.join(missing)}; the store's commands need encoder "
                        f"(images -> (B, D)), fc (nn.Linear D -> classes) and embed_dim D: "
                        f"return runs.models.Classifier(encoder, embed_dim, num_classes)")


class Classifier(nn.Module):
    """encoder (B, C, H, W) -> (B, embed_dim); fc (B, embed_dim) -> (B, num_classes)."""

    def __init__(self, encoder: nn.Module, embed_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.embed_dim = embed_dim
        self.fc = nn.Linear(embed_dim, num_classes)
        self.spec: dict = {}  # registry name + constructor kwargs, filled by create_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))


def create_model(name: str, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                 seed: int = 0, **kwargs) -> Classifier:
    """Build a registered model with weights drawn from `seed` (CPU RNG, global RNG untouched).

    `kwargs` are the factory's keyword options (e.g. pool="avg" for a VGG): checked against
    its signature and declared choices, and recorded in `model.spec` with every option left
    at its default, so a checkpoint rebuilds the same network after a default changes.
    The model lives on the CPU; move it with `.to(device)` (constructors never pick devices).
    """
    builder = MODELS.get(name)
    if num_classes < 1 or width <= 0 or in_channels < 1:
        raise UserError(f"model {name}: num_classes, width and in_channels must be positive "
                        f"(got {num_classes}, {width}, {in_channels})")
    options = {**option_defaults(builder), **check_options(name, builder, kwargs)}
    if width > 2 or num_classes > 10_000:  # at most ~1e8 parameters below: skip the count
        check_parameter_count(
            lambda: builder(num_classes=num_classes, width=width, in_channels=in_channels,
                            **options),
            f"model {name} at --width {width} ({num_classes} classes)",
            "--width (width= in Python)" + (" or the number of classes"
                                            if num_classes > 10_000 else ""))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(num_classes=num_classes, width=width, in_channels=in_channels, **options)
    check_protocol(model, name)
    model.spec = dict(name=name, num_classes=num_classes, width=width,
                      in_channels=in_channels, seed=seed, **options)
    return model


def check_parameter_count(make: Callable[[], nn.Module], what: str, lower: str) -> None:
    """Refuse, before any weight is allocated, a module `make()` would build with more than
    MAX_PARAMETERS parameters: counted on the meta device (shapes only, no memory, the RNG
    untouched). A builder that cannot run there is not counted (it fails or not for real)."""
    count = meta_parameter_count(make)
    if count is not None and count > MAX_PARAMETERS:
        size = ("more parameters than 64-bit sizes can count" if count == math.inf else
                f"{count:.3g} parameters ({count * 4 / 2 ** 30:.3g} GiB in fp32)")
        raise UserError(f"{what} would have {size}, above the limit of {MAX_PARAMETERS:.0e}; "
                        f"lower {lower}")


def meta_parameter_count(make: Callable[[], nn.Module]) -> float | None:
    """The parameter count of `make()` built on the meta device; inf where a tensor's size
    overflows 64 bits; None if it cannot be built there."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            module = make()
    except Exception as err:  # noqa: BLE001 - a user's factory may do anything
        return math.inf if "overflow" in str(err).lower() else None
    if not isinstance(module, nn.Module):
        return None
    return sum(p.numel() for p in module.parameters())


CORE = ("num_classes", "width", "in_channels")  # every factory's arguments, set by own flags


def _option_params(fn: Callable) -> dict[str, inspect.Parameter]:
    """A factory's keyword options: its named parameters other than CORE (none if unreadable)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p for p in params if p.kind in kinds and p.name not in CORE}


def _takes_any_keyword(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def option_defaults(fn: Callable) -> dict:
    """option -> default of a factory's keyword options whose default is a plain value
    (str, number, bool, None: what a spec can store in JSON; others stay unrecorded)."""
    plain = (str, int, float, bool, type(None))
    return {key: p.default for key, p in _option_params(fn).items()
            if p.default is not inspect.Parameter.empty and isinstance(p.default, plain)}


def option_choices(fn: Callable) -> dict[str, tuple]:
    """option -> its valid values, for options annotated `typing.Literal[...]`."""
    return {key: typing.get_args(p.annotation) for key, p in _option_params(fn).items()
            if typing.get_origin(p.annotation) is typing.Literal}


def check_options(name: str, fn: Callable, options: dict, flag: str = None) -> dict:
    """`options` if the factory takes every key and each value is one of its choices, else a
    UserError naming the key (and `flag`) with the valid keys or values."""
    where = f"{flag} " if flag else ""
    valid, choices = _option_params(fn), option_choices(fn)
    for key, value in options.items():
        if key not in valid and not _takes_any_keyword(fn):
            raise UserError(f"{where}{key}: model {name} has no option {key!r}; valid: "
                            f"{', '.join(valid) or 'none'}")
        if key in choices and value not in choices[key]:
            raise UserError(f"{where}{key}={value!r}: model {name} takes {key} in "
                            f"{', '.join(map(str, choices[key]))}")
    return dict(options)


def legacy(**values):
    """Declare the values a factory's options had before they existed (`@legacy(pool="avg")`).

    `build` fills them into specs that lack the option (checkpoints written before it), so
    an old checkpoint rebuilds the network it was trained with, not the new default.
    """
    def mark(fn):
        fn.LEGACY = dict(values)
        return fn
    return mark


def parse_options(model_name: str, items, flag: str = "--model-option") -> dict:
    """("key=value", ...) -> typed keyword options of the model's factory.

    Each value is read as its default's type (bool: true/false/1/0/yes/no; int; float; str)
    and checked against the factory's keys and declared choices; a UserError names `flag`,
    the key and what is valid.
    """
    fn = MODELS.get(model_name)
    defaults = option_defaults(fn)
    options = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected key=value; options of {model_name}: "
                            f"{', '.join(_option_params(fn)) or 'none'}")
        if key in CORE:
            raise UserError(f"{flag} {key}: set {key} with --{key.replace('_', '-')}")
        if key in options:
            raise UserError(f"{flag} {key}: given twice")
        value = _typed(text.strip(), defaults.get(key), f"{flag} {item}")
        options.update(check_options(model_name, fn, {key: value}, flag))
    return options


def _typed(text: str, default, what: str):
    """`text` as a value of `default`'s type (str when there is no default)."""
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{what}: expected true or false")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                raise UserError(f"{what}: expected {'an integer' if kind is int else 'a number'}"
                                ) from None
    return text


# Builders by spec["registry"]: checkpoints rebuild any stored module from its spec alone.
BUILDERS = {"model": create_model}


def build(spec: dict, source: str = None) -> nn.Module:
    """Rebuild a module from the spec that `create_model` (or another builder) recorded.

    Options the spec lacks take the factory's LEGACY values (see `legacy`): a checkpoint
    written before an option existed rebuilds the network it was trained with. `source`
    (the file the spec came from) is named when the spec's model comes from a module the
    user did not allow (`pkg.mod:factory` without --import pkg.mod).
    """
    kwargs = dict(spec)
    registry = kwargs.pop("registry", "model")
    builder = BUILDERS[registry]
    factory = builder
    if registry == "model":
        factory = MODELS.get(kwargs.get("name"), source)  # refuses, naming the file, first
    kwargs = {**getattr(factory, "LEGACY", {}), **kwargs}
    return builder(kwargs.pop("name"), **kwargs)


def model_spec(model: nn.Module) -> dict:
    """The registry name and kwargs that rebuild `model` (empty for foreign modules)."""
    return dict(getattr(model, "spec", {}))


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C) mean over space. A plain mean rather than adaptive pooling:
    it has a vmap batching rule (landscape points run under torch.func.vmap)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GlobalMaxPool(nn.Module):
    """(B, C, H, W) -> (B, C) max over space: at a 2x2 map, the paper's VGG's last 2x2
    max-pool and flatten. amax rather than adaptive pooling: it has a vmap batching rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


def scaled(channels: int, width: float) -> int:
    """Channel count scaled by the width multiplier, at least 1."""
    return max(1, int(round(channels * width)))


def check_input_size(model: Classifier, channels: int, image_size: tuple[int, int]) -> None:
    """Fail before any training if the encoder cannot take (channels, H, W) images."""
    was_training = model.training
    probe = torch.zeros(2, channels, *image_size)
    try:
        model.eval()
        with torch.no_grad():
            out = model.encoder(probe.to(next(model.parameters()).device))
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise UserError(f"model {model.spec.get('name', '?')} cannot take images of shape "
                        f"{(channels, *image_size)}: {first}") from None
    finally:
        model.train(was_training)
    if out.shape != (2, model.embed_dim):
        raise UserError(f"model {model.spec.get('name', '?')} gives embeddings of shape "
                        f"{tuple(out.shape[1:])} for images {(channels, *image_size)}, "
                        f"expected ({model.embed_dim},)")
