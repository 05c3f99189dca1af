"""qcow2lib.records stands in for @dataclass on qimg's start-up path: each record must
behave as the same class made by the dataclasses module (the oracle here) does, for what
the package uses, and refuse what it does not support."""

from __future__ import annotations

import dataclasses

import pytest

from qcow2lib import records
from qcow2lib.records import FrozenInstanceError, field, frozen_record, record, replace


def _pair(frozen: bool = False):
    """The same class made twice: by records and by dataclasses."""

    def body():
        class Entry:
            name: str
            flags: int
            extra: bytes = b""
            size: int | None = None
            tags: list = field(default_factory=list)

            def describe(self) -> str:
                return f"{self.name}:{self.flags}"

        return Entry

    ours = (frozen_record if frozen else record)(body())

    class Theirs:
        name: str
        flags: int
        extra: bytes = b""
        size: int | None = None
        tags: list = dataclasses.field(default_factory=list)

    Theirs.__qualname__ = ours.__qualname__
    return ours, dataclasses.dataclass(frozen=frozen)(Theirs)


def _made(frozen: bool, compiled: bool):
    """A fresh _pair, its record class before its first instance (whose __init__ walks
    the fields) or once it has compiled its __init__ (after _COMPILE_AFTER instances)."""
    ours, theirs = _pair(frozen)
    if compiled:
        for _ in range(records._COMPILE_AFTER + 1):
            ours("warm-up", 0)
    assert ours.__init__.__name__ == ("__init__" if compiled else "first_init")
    return ours, theirs


@pytest.mark.parametrize("compiled", [False, True], ids=["walked", "compiled"])
@pytest.mark.parametrize("frozen", [False, True])
def test_a_record_is_built_and_shown_as_a_dataclass_is(frozen: bool, compiled: bool) -> None:
    calls = [
        (("a", 1), {}),
        (("a", 1, b"x"), {"tags": [1]}),
        ((), {"name": "b", "flags": 2, "size": 7}),
        (("a", 1, b"x", 4, [2]), {}),
    ]
    for args, kwargs in calls:
        ours, theirs = _made(frozen, compiled)
        mine, oracle = ours(*args, **kwargs), theirs(*args, **kwargs)
        assert repr(mine) == repr(oracle)
        assert [getattr(mine, f.name) for f in dataclasses.fields(oracle)] == [
            getattr(oracle, f.name) for f in dataclasses.fields(oracle)
        ]
    ours, _ = _made(frozen, compiled)
    assert ours("a", 1).describe() == "a:1"  # the class's own methods stay
    for bad_args, bad_kwargs in [
        (("a",), {}),
        ((), {"flags": 1}),
        (("a", 1), {"colour": 3}),
        (("a", 1), {"flags": 2}),
        (("a", 1, b"", 2, [], 9), {}),
    ]:
        ours, theirs = _made(frozen, compiled)
        with pytest.raises(TypeError):
            ours(*bad_args, **bad_kwargs)
        with pytest.raises(TypeError):
            theirs(*bad_args, **bad_kwargs)


def test_default_factories_give_each_instance_its_own_value() -> None:
    ours, _ = _pair()
    made = [ours("a", index) for index in range(records._COMPILE_AFTER + 2)]  # both __init__s
    for index, entry in enumerate(made):
        entry.tags.append(index)
    assert [entry.tags for entry in made] == [[index] for index in range(len(made))]
    assert "tags" not in vars(ours)  # (no shared default left on the class)


@pytest.mark.parametrize("frozen", [False, True])
def test_equality_and_hashing_follow_dataclasses(frozen: bool) -> None:
    ours, theirs = _pair(frozen)
    assert ours("a", 1) == ours("a", 1)
    assert ours("a", 1) != ours("a", 2)
    assert ours("a", 1) != theirs("a", 1)  # another class, even with the same fields
    assert (ours("a", 1) == ("a", 1, b"", None, [])) is False
    if frozen:
        assert hash(ours("a", 1, tags=())) == hash(theirs("a", 1, tags=()))
        assert len({ours("a", 1, tags=()), ours("a", 1, tags=()), ours("b", 1, tags=())}) == 2
        with pytest.raises(TypeError):  # a list field: neither hashes
            hash(ours("a", 1))
        with pytest.raises(TypeError):
            hash(theirs("a", 1))
    else:
        with pytest.raises(TypeError):
            hash(ours("a", 1))
        with pytest.raises(TypeError):
            hash(theirs("a", 1))


def test_a_frozen_record_refuses_changes() -> None:
    ours, theirs = _pair(frozen=True)
    for obj, error in ((ours("a", 1), FrozenInstanceError), (theirs("a", 1), AttributeError)):
        with pytest.raises(error):
            obj.flags = 2
        with pytest.raises(error):
            del obj.name
    assert issubclass(FrozenInstanceError, AttributeError)


def test_replace_copies_with_changes() -> None:
    ours, _ = _pair(frozen=True)
    original = ours("a", 1, size=3)
    changed = replace(original, flags=5)
    assert changed == ours("a", 5, size=3) and original == ours("a", 1, size=3)
    with pytest.raises(TypeError, match="colour"):
        replace(original, colour=1)


def test_what_records_do_not_support_is_refused() -> None:
    @record
    class Base:
        a: int

    with pytest.raises(TypeError, match="inherit"):

        @record
        class Derived(Base):
            b: int

    with pytest.raises(TypeError, match="follows"):

        @record
        class Order:
            a: int = 0
            b: int

    with pytest.raises(TypeError, match="ClassVar"):

        @record
        class WithClassVar:
            a: ClassVar[int] = 0  # noqa: F821 (an annotation, never evaluated)

    with pytest.raises(TypeError, match="__post_init__"):

        @record
        class WithPostInit:
            a: int

            def __post_init__(self) -> None:
                pass
