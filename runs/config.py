"""Frozen dataclass configs: one help line per field, CLI flags named after the fields.

    @dataclass(frozen=True)
    class TrainConfig:
        lr: float = arg(0.1, "peak learning rate")

    add_config_args(parser, TrainConfig)          # --lr (float, help "peak learning rate")
    cfg = config_from_args(TrainConfig, namespace)  # only at the CLI boundary
    config_hash(cfg)                              # short hash of the non-default fields
"""

import argparse
import dataclasses
import hashlib
import json
import operator
import re
import types
import typing

from runs.errors import UserError

# Fields that name a member of a family of runs rather than the family itself:
# seeds of one config share `<kind>_<hash>/` and differ in `seed_<s>/`.
IDENTITY_EXCLUDE = ("seed",)
# Seeds reach torch.manual_seed and numpy's SeedSequence, which take a signed 64-bit value:
# a larger one fails deep inside ("Overflow when unpacking long long").
SEED_MAX = 2 ** 63 - 1
# A LABEL of LABEL:=REF names a row of tables, a legend entry and an HDF5 string.
LABEL_MAX = 200


def arg(default, help: str, **metadata):  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and its help line (shown by --help)."""
    if isinstance(default, list | dict | set):
        raise TypeError("use tuples for sequence defaults (configs are frozen)")
    return dataclasses.field(default=default, metadata=dict(help=help, **metadata))


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def non_default(cfg, exclude=IDENTITY_EXCLUDE) -> dict:
    """The fields that differ from the dataclass defaults (what names the run)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in exclude and value != f.default:
            out[f.name] = value
    return json.loads(json.dumps(out))


def config_hash(cfg, exclude=IDENTITY_EXCLUDE, length: int = 8) -> str:
    """Short stable hash of the non-default fields: the same config gives the same run dir."""
    text = json.dumps(non_default(cfg, exclude), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def check_fields(cfg, rules: dict) -> None:
    """A UserError naming the flag and value of the first field that breaks its rule.

    rules: field name -> (test, what the value must be), e.g.
        {"lr": (lambda v: 0 < v < math.inf, "must be a positive number")}
    Comparisons are False for NaN, so a range test refuses `--lr nan` too.
    """
    seeds = seed_rules(type(cfg)) if dataclasses.is_dataclass(cfg) else {}
    _check(lambda name: getattr(cfg, name), {**seeds, **rules})


def _check(value_of, rules: dict) -> None:
    for name, (test, must) in rules.items():
        value = value_of(name)
        if not test(value):
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
            raise UserError(f"--{name.replace('_', '-')} {shown}: {must}")


def is_seed(name: str) -> bool:
    """Whether a config field is a seed (`seed`, `data_seed`, `teacher_seed`, ...)."""
    return name == "seed" or name.endswith("_seed")


def seed_rules(cls) -> dict:
    """check_fields rules for every seed field of a config class: a whole number in
    [0, SEED_MAX], or [-1, SEED_MAX] where the default is the sentinel -1 (teacher_seed)."""
    rules = {}
    for f in dataclasses.fields(cls):
        if is_seed(f.name) and isinstance(f.default, int):
            lowest = min(0, f.default)
            rules[f.name] = (lambda v, lo=lowest: _whole(v) and lo <= v <= SEED_MAX,
                             f"seeds must be whole numbers in [{lowest}, {SEED_MAX}] (2**63 - 1)")
    return rules


def _whole(value) -> bool:
    """An int (numpy's too), not a bool or a float."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_seed(value, flag: str = "--seed") -> int:
    """`value` if it is a seed torch and numpy take (a whole number in [0, SEED_MAX]), else a
    UserError naming `flag`: for seeds outside a config (`--seeds 0 1 2`)."""
    if not (_whole(value) and 0 <= value <= SEED_MAX):
        raise UserError(f"{flag} {value}: seeds must be whole numbers in [0, {SEED_MAX}] "
                        f"(2**63 - 1)")
    return value


def seed_arg(text: str) -> int:
    """argparse `type=` of seed flags outside a config (`--seeds 0 1 2`): argparse's one-line
    `argument --seeds: ...` error, exit 2, for a seed torch and numpy cannot take."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be whole numbers in "
                                         f"[0, {SEED_MAX}] (2**63 - 1)")
    return value


def check_at_most(value, limit, flag: str, what: str) -> None:
    """A UserError `--knn-k 100000: must be at most 600 (the train images measured)` when
    `value` exceeds `limit`: a size checked against the data before any result exists."""
    if value > limit:
        raise UserError(f"{flag} {value}: must be at most {limit} ({what})")


def check_label(label: str, text: str) -> str:
    """The LABEL of LABEL:=REF if it is one line of at most LABEL_MAX characters, else a
    UserError quoting the reference's start (a label of megabytes is not echoed whole)."""
    if len(label) > LABEL_MAX or not label.isprintable():
        start = text[:40] + ("..." if len(text) > 40 else "")
        why = (f"is {len(label)} characters long; at most {LABEL_MAX}"
               if len(label) > LABEL_MAX else "holds a line break or control character")
        raise UserError(f"checkpoint reference {start!r}: its LABEL before ':=' {why}")
    return label


def from_dict(cls, data: dict):
    """Rebuild a config; unknown keys are an error naming them and the valid fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k]) for k, v in data.items()}
    # Seeds first: a class's own checks (or torch) would fail on them less clearly.
    _check(values.get, {k: rule for k, rule in seed_rules(cls).items() if k in values})
    return cls(**values)


def _coerce(value, hint):
    """JSON gives lists where configs hold tuples."""
    if isinstance(value, list) and _is_tuple_hint(hint):
        return tuple(value)
    return value


def _is_tuple_hint(hint) -> bool:
    return typing.get_origin(hint) is tuple or any(
        typing.get_origin(a) is tuple for a in typing.get_args(hint))


def _scalar_type(hint):
    """The element type argparse should call for a field annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _scalar_type(args[0])
    if typing.get_origin(hint) is tuple:
        return args[0] if args else str
    return hint


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The --help of every command: description and `examples:` epilog kept as written, and
    each option's default shown exactly once, as it would be typed on the command line.

    A help text that already speaks of its default (in words, "(default: ...)", or argparse's
    own "%(default)s", which BooleanOptionalAction appends by itself) is left alone; defaults
    that say nothing (None, switches that are off) are not shown.
    """

    _SHOWN = re.compile(r"%\(default\)|\bdefault\b", re.IGNORECASE)

    def _get_help_string(self, action):
        text = action.help or ""
        if self._SHOWN.search(text) or not _default_worth_showing(action):
            return text
        shown = show_default(action.default).replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def _default_worth_showing(action) -> bool:
    if action.default is None or action.default is argparse.SUPPRESS:
        return False
    if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
        return False  # --help, store_true/store_const switches: the default is "off"
    if not action.option_strings:  # a positional: only an optional one has a default
        return action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
    return True


def show_default(value) -> str:
    """A default as it would be typed: '' for an empty string, space-separated sequences."""
    if isinstance(value, str):
        return value if value and not any(c.isspace() for c in value) else repr(value)
    if isinstance(value, list | tuple):
        return " ".join(show_default(v) for v in value) if value else "none"
    return str(value)


def add_config_args(parser: argparse.ArgumentParser, cls, exclude=(), group: str = None):
    """Add one flag per dataclass field: `--field-name`, typed, with the field's help line."""
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help texts: a literal "20 %" would crash --help. The default is
        # shown by HelpFormatter (once), not here.
        text = f.metadata.get("help", "").replace("%", "%%")
        hint = hints[f.name]
        if _scalar_type(hint) is bool and not _is_tuple_hint(hint):  # bool or bool | None
            target.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=f.default, help=text)
        elif _is_tuple_hint(hint):
            target.add_argument(flag, nargs="*", type=_scalar_type(hint),
                                default=f.default, help=text)
        else:
            choices = f.metadata.get("choices")
            target.add_argument(flag, type=_scalar_type(hint), default=f.default,
                                choices=choices, help=text)
    return parser


def config_from_args(cls, namespace: argparse.Namespace, **overrides):
    """The config from parsed flags (fields not on the parser keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(namespace).items() if k in names}
    values.update(overrides)
    return from_dict(cls, values)


_STEP = re.compile(r"^(\d+(?:\.\d+)?)(ep)?$")


def parse_steps(spec, steps_per_epoch: int, flag: str = "--save-at") -> int:
    """'1000' -> 1000 iterations; '2ep' -> 2 * steps_per_epoch; '0.5ep' rounds down."""
    match = _STEP.match(str(spec).strip())
    if not match:
        raise UserError(f"{flag}: cannot parse {spec!r}; use iterations (e.g. 1000) "
                        f"or epochs (e.g. 2ep)")
    number, epochs = match.groups()
    if epochs and steps_per_epoch < 1:
        raise UserError(f"{flag}: {spec!r} is in epochs but steps_per_epoch is unknown; "
                        f"give iterations (e.g. 1000)")
    if epochs:
        return int(float(number) * steps_per_epoch)
    if "." in number:
        raise UserError(f"{flag}: {spec!r} is not a whole number of iterations")
    return int(number)
