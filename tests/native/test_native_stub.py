"""pccl_py/_native.pyi against the built pccl_py._native module.

The stub is parsed with `ast`; the module is introspected, its signatures read from the
first line of each pybind11 docstring ("name(self: T, a: T = default, /) -> R").
- the public names match both ways: module constants, functions and classes; per class
  its own methods, read-only properties and enum members (in declaration order), and its bases;
- every function, method and property of the stub has the real parameter names (pybind11's
  unnamed `argN` must be positional-only in the stub), positional-only markers, defaults,
  parameter types and return type (pybind11's spellings normalized: SupportsInt -> int ...);
- the stub and the py.typed marker sit in the package directory, which the wheel ships.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pccl_py import _native

PACKAGE = Path(__file__).resolve().parents[2] / "pccl_py"
STUB = PACKAGE / "_native.pyi"
CUDA_ONLY = {"cuda_quantize", "cuda_dequantize"}  # bound only under PCCL_WITH_CUDA
BUFFER_ALIAS = "_Buffer"  # the stub's name for "any object exporting a buffer"


# ---- the stub, as ast ----------------------------------------------------------------------


@dataclass
class StubClass:
    bases: list[str]
    members: list[str] = field(default_factory=list)  # `NAME: ClassVar[Cls]` (enum values)
    attrs: dict[str, ast.AnnAssign] = field(default_factory=dict)  # other annotated names
    methods: dict[str, ast.FunctionDef] = field(default_factory=dict)
    properties: dict[str, ast.FunctionDef] = field(default_factory=dict)


@dataclass
class Stub:
    constants: dict[str, ast.AnnAssign] = field(default_factory=dict)
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)
    classes: dict[str, StubClass] = field(default_factory=dict)
    private: set[str] = field(default_factory=set)  # stub-only helpers such as _Buffer


def _decorators(fn: ast.FunctionDef) -> list[str]:
    return [ast.unparse(d) for d in fn.decorator_list]


def _add(table: dict[str, Any], name: str, value: Any, where: str) -> None:
    assert name not in table, f"{where}: {name} is defined twice in the stub"
    table[name] = value


def parse_stub() -> Stub:
    stub = Stub()
    for node in ast.parse(STUB.read_text(), filename=str(STUB)).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            if name.startswith("_"):
                stub.private.add(name)
            else:
                _add(stub.constants, name, node, "module")
        elif isinstance(node, ast.FunctionDef):
            assert not _decorators(node), f"{node.name}: unexpected decorators (overloads?)"
            _add(stub.functions, node.name, node, "module")
        elif isinstance(node, ast.ClassDef):
            cls = StubClass([ast.unparse(b) for b in node.bases])
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    if ast.unparse(item.annotation) == f"ClassVar[{node.name}]":
                        cls.members.append(item.target.id)
                    else:
                        _add(cls.attrs, item.target.id, item, node.name)
                elif isinstance(item, ast.FunctionDef):
                    decorators = _decorators(item)
                    assert decorators in ([], ["property"]), f"{node.name}.{item.name}: {decorators}"
                    table = cls.properties if decorators else cls.methods
                    _add(table, item.name, item, node.name)
                else:
                    assert isinstance(item, ast.Expr), f"{node.name}: unexpected {ast.dump(item)[:60]}"
            _add(stub.classes, node.name, cls, "module")
        else:
            assert isinstance(node, ast.Import | ast.ImportFrom | ast.Expr), f"unexpected {ast.unparse(node)}"
    return stub


STUB_AST = parse_stub()


# ---- the module, introspected --------------------------------------------------------------


def public(names: Any) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def assert_same(stub: set[str], module: set[str], what: str) -> None:
    diff = {"only in the stub": sorted(stub - module), "only in the module": sorted(module - stub)}
    assert stub == module, f"{what}: {diff}"


def kind_of(value: Any, owner: type | None = None) -> str:
    if isinstance(value, type):
        return "class"
    if owner is not None and isinstance(value, owner):
        return "member"
    if isinstance(value, property):
        return "property"
    if callable(value):
        return "function"
    return "constant"


@dataclass
class Param:
    name: str
    type: str | None
    default: str | None
    positional_only: bool = False


@dataclass
class Signature:
    params: list[Param]
    returns: str


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


SIGNATURE_LINE = re.compile(r"^\w*\((?P<params>.*)\) -> (?P<returns>.+)$")


def parse_signature(line: str) -> Signature:
    """One pybind11 signature line; the first parameter (self / arg0 of a getter) is dropped
    for methods and properties by the caller."""
    m = SIGNATURE_LINE.match(line.strip())
    assert m, f"not a pybind11 signature: {line!r}"
    params: list[Param] = []
    for part in _split_top_level(m["params"]):
        if part == "/":
            for p in params:
                p.positional_only = True
            continue
        head, _, default = part.partition(" = ")  # pybind11 types never contain " = "
        name, _, type_ = head.partition(": ")
        params.append(Param(name, type_ or None, default or None))
    return Signature(params, m["returns"].strip())


def runtime_signatures(obj: Any) -> list[Signature]:
    """All signatures of a pybind11 callable (several when it is overloaded)."""
    doc = obj.__doc__ or ""
    lines = doc.splitlines()
    assert lines, f"{obj!r} has no docstring signature"
    if len(lines) > 1 and lines[1].strip() == "Overloaded function.":
        overloads = [re.sub(r"^\d+\. ", "", ln) for ln in lines[2:] if re.match(r"^\d+\. \w*\(", ln)]
        assert overloads, f"{obj!r}: overloads not found in {doc!r}"
        return [parse_signature(ln) for ln in overloads]
    return [parse_signature(lines[0])]


def stub_params(fn: ast.FunctionDef, is_method: bool) -> list[tuple[Param, ast.expr | None]]:
    """The stub's parameters as (Param, default node); `self` dropped for methods."""
    a = fn.args
    positional = [(arg, True) for arg in a.posonlyargs] + [(arg, False) for arg in a.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    out = []
    for (arg, posonly), default in zip(positional, defaults, strict=True):
        out.append((Param(arg.arg, _annotation(arg.annotation), None, posonly), default))
    if a.vararg:
        out.append((Param("*" + a.vararg.arg, _annotation(a.vararg.annotation), None), None))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        out.append((Param(arg.arg, _annotation(arg.annotation), None), default))
    if a.kwarg:
        out.append((Param("**" + a.kwarg.arg, _annotation(a.kwarg.annotation), None), None))
    if is_method:
        assert out and out[0][0].name == "self", f"{fn.name}: first parameter is not self"
        out = out[1:]
    return out


def _annotation(node: ast.expr | None) -> str | None:
    return None if node is None else ast.unparse(node)


# pybind11 spells the types it accepts; the stub spells what callers should pass.
_NORMALIZE = [
    ("pccl_py._native.", ""),
    ("pccl::", ""),
    ("typing.SupportsInt | typing.SupportsIndex", "int"),
    ("typing.SupportsFloat | typing.SupportsIndex", "float"),
    ("collections.abc.", ""),
    ("typing.", ""),
]


def normalize(runtime_type: str) -> str:
    for old, new in _NORMALIZE:
        runtime_type = runtime_type.replace(old, new)
    return runtime_type


def type_problem(where: str, runtime: str | None, stub: str | None, is_return: bool) -> str | None:
    if runtime is None:  # property getters' arg0 and the like carry no usable type
        return None
    if stub is None:
        return f"{where}: the stub has no annotation (module: {runtime})"
    want = normalize(runtime)
    if want == "object":  # a py::object: returns may be narrowed, params must be buffers or object
        if is_return or stub in (BUFFER_ALIAS, "object"):
            return None
    elif want == "list":  # a py::list: any element type
        if stub == "list" or stub.startswith("list["):
            return None
    elif want == stub:
        return None
    return f"{where}: the stub says {stub}, the module {runtime}"


def default_problem(where: str, runtime: str | None, stub: ast.expr | None) -> str | None:
    if runtime is None and stub is None:
        return None
    if runtime is None or stub is None:
        shown = "no default" if stub is None else ast.unparse(stub)
        return f"{where}: default {runtime or 'none'} in the module, {shown} in the stub"
    enum = re.fullmatch(r"<(\w+)\.(\w+): -?\d+>", runtime)
    if enum:
        ok = ast.unparse(stub) == f"{enum[1]}.{enum[2]}"
    else:
        try:
            want, got = ast.literal_eval(runtime), ast.literal_eval(stub)
        except ValueError:
            return f"{where}: cannot compare defaults {runtime!r} and {ast.unparse(stub)!r}"
        ok = type(want) is type(got) and want == got
    return None if ok else f"{where}: default {runtime} in the module, {ast.unparse(stub)} in the stub"


def signature_problems(qualname: str, fn: ast.FunctionDef, sig: Signature, is_method: bool) -> list[str]:
    problems = []
    runtime = sig.params[1:] if is_method else sig.params
    stub = stub_params(fn, is_method)
    runtime_names = [p.name for p in runtime]
    stub_names = [p.name for p, _ in stub]
    unnamed = [bool(re.fullmatch(r"arg\d+", n)) for n in runtime_names]  # no py::arg given
    if len(runtime_names) != len(stub_names) or any(
        r != s and not u for r, s, u in zip(runtime_names, stub_names, unnamed, strict=True)
    ):
        return [f"{qualname}: parameters {stub_names} in the stub, {runtime_names} in the module"]
    for rp, u, (sp, sdefault) in zip(runtime, unnamed, stub, strict=True):
        where = f"{qualname}({rp.name})"
        if sp.positional_only != (rp.positional_only or u):
            problems.append(f"{where}: positional-only in one of stub/module, not the other")
        problems += filter(None, [type_problem(where, rp.type, sp.type, is_return=False)])
        problems += filter(None, [default_problem(where, rp.default, sdefault)])
    ret = type_problem(f"{qualname} return", sig.returns, _annotation(fn.returns), is_return=True)
    return problems + ([ret] if ret else [])


# ---- what to compare ----------------------------------------------------------------------


def stub_callables() -> list[tuple[str, ast.FunctionDef, Any, bool]]:
    """(qualified name, stub def, runtime callable, is a method) for everything the stub defines
    that exists in the module; names missing from the module are reported by the name tests."""
    out = []
    for name, fn in STUB_AST.functions.items():
        if hasattr(_native, name):
            out.append((name, fn, getattr(_native, name), False))
    for cname, cls in STUB_AST.classes.items():
        real = getattr(_native, cname, None)
        if real is None:
            continue
        for name, fn in cls.methods.items():
            if hasattr(real, name):
                out.append((f"{cname}.{name}", fn, getattr(real, name), True))
        for name, fn in cls.properties.items():
            prop = real.__dict__.get(name)
            if isinstance(prop, property):
                out.append((f"{cname}.{name}", fn, prop.fget, True))
    return out


CALLABLES = stub_callables()


# ---- tests --------------------------------------------------------------------------------


def test_module_names_match():
    runtime = public(vars(_native))
    stub = set(STUB_AST.constants) | set(STUB_AST.functions) | set(STUB_AST.classes)
    if not _native.CUDA_BUILT:  # a CPU build lacks the CUDA-only functions
        stub -= CUDA_ONLY
    assert_same(stub, runtime, "module names")

    kinds = {n: "constant" for n in STUB_AST.constants}
    kinds |= {n: "function" for n in STUB_AST.functions}
    kinds |= {n: "class" for n in STUB_AST.classes}
    wrong = {n: (kinds[n], kind_of(getattr(_native, n))) for n in runtime}
    assert {n: k for n, k in wrong.items() if k[0] != k[1]} == {}, "(stub kind, module kind)"


def test_constant_types_match():
    wrong = {}
    for name, node in STUB_AST.constants.items():
        want = f"Final[{type(getattr(_native, name)).__name__}]"
        if ast.unparse(node.annotation) != want or node.value is not None:
            wrong[name] = (ast.unparse(node), want)
    assert wrong == {}, "constants are declared `NAME: Final[type]` without a value"


@pytest.mark.parametrize("cname", sorted(n for n, v in vars(_native).items() if isinstance(v, type)))
def test_class_members_match(cname: str):
    real = getattr(_native, cname)
    assert cname in STUB_AST.classes, "class missing from the stub"
    cls = STUB_AST.classes[cname]
    own = {n: v for n, v in vars(real).items() if not n.startswith("_")}

    bases = [b.__name__ for b in real.__bases__ if b.__module__ == _native.__name__]
    assert cls.bases == bases, "base classes"

    members = [n for n, v in own.items() if kind_of(v, real) == "member"]
    assert cls.members == members, "enum members (in declaration order)"
    if hasattr(real, "__members__"):
        assert list(real.__members__) == cls.members

    properties = {n for n, v in own.items() if kind_of(v, real) == "property"}
    assert_same(public(cls.properties), properties, "properties")
    read_only = {n for n in properties if own[n].fset is None}
    assert read_only == properties, "the stub declares every property read-only"

    methods = {n for n, v in own.items() if kind_of(v, real) == "function"}
    assert_same(public(cls.methods), methods, "methods")

    others = set(own) - set(members) - properties - methods
    assert_same(public(cls.attrs), others, "other class attributes")

    # Dunders are optional in the stub, but those it declares must exist.
    dunders = {n for n in [*cls.methods, *cls.properties, *cls.attrs] if n.startswith("_")}
    assert {n for n in dunders if not hasattr(real, n)} == set(), "stub dunders missing at runtime"


@pytest.mark.parametrize(("qualname", "fn", "obj", "is_method"), CALLABLES, ids=[c[0] for c in CALLABLES])
def test_signature_matches(qualname: str, fn: ast.FunctionDef, obj: Any, is_method: bool):
    candidates = [signature_problems(qualname, fn, sig, is_method) for sig in runtime_signatures(obj)]
    best = min(candidates, key=len)  # an overloaded function must match one overload
    assert best == [], "\n".join(best)


def test_every_callable_is_checked():
    # Every def of the stub found its runtime counterpart above, so none went unchecked.
    names = {c[0] for c in CALLABLES}
    assert {"Engine.__init__", "Engine.all_reduce", "OpHandle.wait", "AllReduceHandle.key"} <= names
    assert len(names) == len(STUB_AST.functions) - (0 if _native.CUDA_BUILT else len(CUDA_ONLY)) + sum(
        len(c.methods) + len(c.properties) for c in STUB_AST.classes.values()
    )


def test_stub_ships_with_the_package():
    assert STUB.is_file()
    assert (PACKAGE / "py.typed").is_file(), "PEP 561 marker: without it type checkers ignore the stub"
    stub_helpers = STUB_AST.private
    assert stub_helpers <= {BUFFER_ALIAS}, f"unexpected private stub names {stub_helpers}"
