"""Record classes without the `dataclasses` module.

Scripts start qimg thousands of times, and `import dataclasses` alone costs several
milliseconds of each start (it imports `inspect`, and with it `ast`, `dis` and
`tokenize`). `record` and `frozen_record` give the part of `@dataclass` this package
uses, the same way: the annotated class attributes are the fields, in order, and a field
with a value (or `field(default_factory=...)`) has a default; the class gets `__init__`
(positional or keyword), `__repr__` and `__eq__` over its fields, and is unhashable;
a frozen record refuses assignment and hashes by its fields instead; `replace` copies one
with some fields changed. Not supported (and
refused where it would silently differ): inheriting fields, `ClassVar` fields,
`__post_init__`.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    _T = TypeVar("_T")
else:

    def dataclass_transform(**_options):
        """typing's marker telling type checkers that `record` works like `@dataclass`
        (importing typing for it would cost what this module saves)."""
        return lambda decorator: decorator


_NO_DEFAULT = object()  # a field without a default (a required argument)
# Instances a record class makes by interpreting its fields before it compiles __init__:
# most classes make a few per qimg run (the image header one), and the compile costs more.
_COMPILE_AFTER = 8
_NOT_GIVEN = object()  # a defaulted argument left out: the field's factory makes its value


class FrozenInstanceError(AttributeError):
    """An assignment to a field of a frozen record (as dataclasses' error of that name)."""


class _Factory:
    """field(default_factory=...): each instance gets a new default (a list or dict)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]):
        self.make = make


def field(*, default_factory: Callable[[], _T]) -> _T:
    """A field whose default is made anew for every instance (a list, dict or set)."""
    factory: Any = _Factory(default_factory)  # stands in the class body for a _T
    return factory


def _fields_of(cls: type) -> dict[str, object]:
    """The fields of `cls` in declaration order, each with its default or _NO_DEFAULT."""
    for base in cls.__mro__[1:]:
        if "__record_fields__" in base.__dict__:
            raise TypeError(f"{cls.__name__}: a record cannot inherit fields from {base.__name__}")
    if "__post_init__" in cls.__dict__:
        raise TypeError(f"{cls.__name__}: records have no __post_init__")
    fields: dict[str, object] = {}
    seen_default = False
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        if "ClassVar" in str(annotation):
            raise TypeError(f"{cls.__name__}.{name}: records have no ClassVar fields")
        default = cls.__dict__.get(name, _NO_DEFAULT)
        if default is _NO_DEFAULT and seen_default:
            raise TypeError(f"{cls.__name__}.{name}: a field without a default follows one with")
        seen_default = default is not _NO_DEFAULT
        fields[name] = default
    return fields


def _build(cls: type[_T], frozen: bool) -> type[_T]:
    fields = _fields_of(cls)
    for name, default in fields.items():
        if isinstance(default, _Factory):
            delattr(cls, name)  # as dataclasses: the class keeps no shared default

    # The methods are replaced on a class whose declared type mypy already knows.
    record_class: Any = cls

    made = 0

    def first_init(self, *args, **kwargs) -> None:
        """The first instances are made by _init_fields; then the real __init__ is
        compiled: the compile is most of a record's cost, and most record classes make
        none or a few instances in a qimg run."""
        nonlocal made
        made += 1
        if made <= _COMPILE_AFTER:
            _init_fields(self, fields, frozen, args, kwargs)
            return
        init = _compile_init(cls, fields, frozen)
        record_class.__init__ = init
        init(self, *args, **kwargs)

    record_class.__init__ = first_init
    record_class.__record_fields__ = tuple(fields)
    record_class.__repr__ = _repr
    record_class.__eq__ = _eq
    if frozen:
        record_class.__setattr__ = _refuse_setattr
        record_class.__delattr__ = _refuse_delattr
        record_class.__hash__ = _hash
    else:
        record_class.__hash__ = None
    return cls


def _init_fields(
    self: Any, fields: dict[str, object], frozen: bool, args: tuple, kwargs: dict
) -> None:
    """What the compiled __init__ does (_compile_init), by walking the fields."""
    if len(args) > len(fields):
        raise TypeError(f"__init__() takes {len(fields) + 1} positional arguments")
    values = dict(zip(fields, args))
    for name, value in kwargs.items():
        if name not in fields:
            raise TypeError(f"__init__() got an unexpected keyword argument {name!r}")
        if name in values:
            raise TypeError(f"__init__() got multiple values for argument {name!r}")
        values[name] = value
    assign = object.__setattr__ if frozen else setattr
    for name, default in fields.items():
        value = values.get(name, default)
        if value is _NO_DEFAULT:
            raise TypeError(f"__init__() missing required argument: {name!r}")
        if isinstance(value, _Factory) and name not in values:
            value = value.make()
        assign(self, name, value)


def _compile_init(cls: type, fields: dict[str, object], frozen: bool) -> Callable[..., None]:
    """The record's __init__, compiled: as fast as a hand-written one."""
    params, body = [], []
    namespace: dict[str, Any] = {"_NOT_GIVEN": _NOT_GIVEN, "_setattr": object.__setattr__}
    for name, default in fields.items():
        if default is _NO_DEFAULT:
            params.append(name)
            value = name
        elif isinstance(default, _Factory):
            namespace[f"_make_{name}"] = default.make
            params.append(f"{name}=_NOT_GIVEN")
            value = f"_make_{name}() if {name} is _NOT_GIVEN else {name}"
        else:
            namespace[f"_default_{name}"] = default
            params.append(f"{name}=_default_{name}")
            value = name
        body.append(f"_setattr(self, {name!r}, {value})" if frozen else f"self.{name} = {value}")
    source = f"def __init__(self, {', '.join(params)}):\n    " + "\n    ".join(body or ["pass"])
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


def _values(self: Any) -> tuple:
    return tuple(getattr(self, name) for name in self.__record_fields__)


def _repr(self: Any) -> str:
    items = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__record_fields__)
    return f"{type(self).__qualname__}({items})"


def _eq(self: Any, other: object) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def _refuse_setattr(self: Any, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _refuse_delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def replace(obj: _T, **changes: Any) -> _T:
    """A copy of the record `obj` with the fields named in `changes` set to new values."""
    record: Any = obj
    values = {name: getattr(record, name) for name in record.__record_fields__}
    unknown = changes.keys() - values.keys()
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field {sorted(unknown)[0]!r}")
    return type(obj)(**(values | changes))


@dataclass_transform(field_specifiers=(field,))
def record(cls: type[_T]) -> type[_T]:
    """`@dataclass` for a mutable record: __init__, __repr__ and __eq__ over its fields."""
    return _build(cls, frozen=False)


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def frozen_record(cls: type[_T]) -> type[_T]:
    """`@dataclass(frozen=True)`: a record whose fields cannot change, hashed by them."""
    return _build(cls, frozen=True)
