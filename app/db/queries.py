"""The few SQL queries that the batch job and the service both need."""

from __future__ import annotations

import decimal
import math
import re
import struct
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
from sqlalchemy import (
    REAL,
    BigInteger,
    Boolean,
    ColumnElement,
    Numeric,
    and_,
    case,
    cast,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session

from app.db.models import Image

# Ids per IN (...) clause: stays under SQLite's bound-parameter limit.
SQL_IN_CHUNK = 900


def live_image_ids(session: Session) -> np.ndarray:
    """Ids of every image not deleted, ascending."""
    rows = session.scalars(select(Image.id).where(Image.deleted_at.is_(None)).order_by(Image.id))
    return np.fromiter(rows, dtype=np.int64)


def image_uris(session: Session, ids: np.ndarray) -> dict[int, str]:
    """id -> uri for the given ids (deleted or not), queried in chunks."""
    found: dict[int, str] = {}
    for start in range(0, len(ids), SQL_IN_CHUNK):
        part = [int(i) for i in ids[start : start + SQL_IN_CHUNK]]
        found.update(session.execute(select(Image.id, Image.uri).where(Image.id.in_(part))).tuples().all())
    return found


# A filter value that reads as a number (JSON's grammar, plus a leading '+' or '.5'), and the integers among them.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Exact decimal arithmetic on doubles needs ~1,100 significant digits (2^1024 down to 2^-1074).
_EXACT = decimal.Context(prec=3000)


@dataclass(frozen=True)
class MetaValue:
    """How a `meta=key=value` filter's value may match a stored JSON value: always a string equal to it; a
    boolean when it is `true`/`false`; null when it is `null`; a number when it reads as a finite number (as a
    64-bit float, and exactly as an integer when both sides are integers that fit in 64 bits)."""

    text: str
    boolean: bool = False
    null: bool = False
    number: float | None = None
    integer: int | None = None

    @classmethod
    def parse(cls, text: str) -> MetaValue:
        number = integer = None
        if _NUMBER.fullmatch(text):
            as_float = float(text)
            number = as_float if math.isfinite(as_float) else None
            # A length check first: int() of thousands of digits is slow (and refused past 4,300).
            if _INTEGER.fullmatch(text) and len(text.lstrip("+-").lstrip("0")) <= 19:
                as_int = int(text)
                integer = as_int if INT64_MIN <= as_int <= INT64_MAX else None
        return cls(text, boolean=text in ("true", "false"), null=text == "null", number=number, integer=integer)

    def rounding_interval(self) -> tuple[Decimal, Decimal, bool]:
        """The decimals that round to `number` as a double (lo, hi, bounds included): PostgreSQL tests a
        stored number against them in exact `numeric`, so no float cast can overflow or underflow there."""
        assert self.number is not None
        value = self.number
        below = math.nextafter(value, -math.inf)
        above = math.nextafter(value, math.inf)
        # Past the largest double the next step would be 2^1024 (overflow), the bound rounding stops at.
        edge = _EXACT.power(Decimal(2), 1024)
        low_neighbour = -edge if math.isinf(below) else Decimal(below)
        high_neighbour = edge if math.isinf(above) else Decimal(above)
        lo = _EXACT.divide(_EXACT.add(Decimal(value), low_neighbour), 2)
        hi = _EXACT.divide(_EXACT.add(Decimal(value), high_neighbour), 2)
        # A tie rounds to the even significand: the bounds belong to `value` only when its last bit is 0.
        even = struct.unpack("<q", struct.pack("<d", value))[0] & 1 == 0
        return lo, hi, even


class _ByDialect(ColumnElement[bool]):
    """One boolean condition written once per dialect; compiled as the one the connection speaks."""

    type = Boolean()
    inherit_cache = False  # built per request from the filter's values: nothing to gain from the cache

    def __init__(self, sqlite: ColumnElement[bool], postgresql: ColumnElement[bool]) -> None:
        self.sqlite, self.postgresql = sqlite, postgresql


@compiles(_ByDialect, "sqlite")
def _compile_sqlite(element: _ByDialect, compiler: Any, **kw: Any) -> str:
    return compiler.process(element.sqlite, **kw)


@compiles(_ByDialect, "postgresql")
def _compile_postgresql(element: _ByDialect, compiler: Any, **kw: Any) -> str:
    return compiler.process(element.postgresql, **kw)


def meta_matches(key: str, text: str) -> ColumnElement[bool]:
    """Images whose metadata value under `key` (any key: it is never parsed as a path) matches the filter value
    `text` (MetaValue's rule), in SQL on both databases. A missing key, an object or an array matches nothing."""
    value = MetaValue.parse(text)
    return _ByDialect(_sqlite_match(key, value), _postgresql_match(key, value))


def _sqlite_match(key: str, value: MetaValue) -> ColumnElement[bool]:
    # json_each gives each top-level key verbatim, its JSON type and its SQL value: no JSON path to quote.
    each = func.json_each(Image.meta).table_valued("key", "type", "atom").alias()
    atom = each.c.atom
    branches = [and_(each.c.type == "text", atom == value.text)]
    if value.boolean:
        branches.append(each.c.type == value.text)  # json_each names a boolean's type 'true' or 'false'
    if value.null:
        branches.append(each.c.type == "null")
    if value.number is not None:
        if value.integer is not None:
            # An integer past 64 bits is 'integer' to json_each but its value is a REAL: compared as a double.
            exact = and_(each.c.type == "integer", func.typeof(atom) == "integer")
            branches.append(and_(exact, atom == literal(value.integer, BigInteger())))
            as_double = and_(each.c.type.in_(("integer", "real")), not_(exact))
        else:
            as_double = each.c.type.in_(("integer", "real"))
        branches.append(and_(as_double, cast(atom, REAL) == literal(value.number, REAL())))
    return exists(select(literal(1)).select_from(each).where(each.c.key == key, or_(*branches)))


def _postgresql_match(key: str, value: MetaValue) -> ColumnElement[bool]:
    # `->` / `->>` with a text operand look the key up verbatim. CASE, unlike AND, fixes the order: the numeric
    # cast only ever sees a JSON number.
    kind = func.json_typeof(Image.meta[key])
    text = Image.meta[key].as_string()
    whens: list[tuple[ColumnElement[bool], ColumnElement[bool]]] = [(kind == "string", text == value.text)]
    if value.boolean:
        whens.append((kind == "boolean", text == value.text))
    if value.null:
        whens.append((kind == "null", true()))
    if value.number is not None:
        number = cast(text, Numeric())
        lo, hi, closed = value.rounding_interval()
        # Plain digits: psycopg2 would send a Decimal's exponent form, and numeric refuses exponents past 1000.
        lo_sql, hi_sql = (cast(literal(format(bound, "f")), Numeric()) for bound in (lo, hi))
        as_double = and_(number >= lo_sql, number <= hi_sql) if closed else and_(number > lo_sql, number < hi_sql)
        if value.integer is not None:
            exact = and_(text.regexp_match("^-?[0-9]+$"), number.between(INT64_MIN, INT64_MAX))
            as_number = case((exact, number == literal(value.integer, BigInteger())), else_=as_double)
        else:
            as_number = as_double
        whens.append((kind == "number", as_number))
    return case(*whens, else_=false())
