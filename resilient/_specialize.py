"""A driver recompiled for the stages it was built over: absent stages cost nothing.

A driver (:func:`resilient._driver.build`) is written once, as a closure over its
stages, where an absent stage is ``None`` and a feature is a flag. Read as written,
every call pays for every ``if stage is not None`` and flag test, present or not:
about a nanosecond per test, which is much of a healthy call's cost. The template
stays the one source, and :func:`specialize` recompiles its text with those names
replaced by the constants they hold (``None``, ``True``, ``False``) and the tests
that become constant folded, so each call runs only the lines its stages need.

The result is the same function, line for line: line numbers are kept, so
tracebacks, debuggers and coverage see the template's own lines (the compiler keeps
a folded ``if`` as a line event). The code is cached per shape, that is, per
template and which of its names hold ``None``, ``True``, ``False`` or anything
else; building another driver of a known shape makes only a function object over
the original closure's cells. A name some closure rebinds (``nonlocal``) is never
folded, nor one whose cell is still empty; the enclosing function must not rebind
the others once it has called :func:`specialize` (``build`` calls it as it returns).
When the template's source cannot be read, or does not compile to the code that is
running (the file changed since it was imported), the template is returned as it is:
the same behaviour, only slower. So it is when folding would change what a name
refers to or what kind of function it is (see :func:`_same_scopes`).
"""

from __future__ import annotations
import __future__

import ast
import linecache
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeGuard, TypeVar

__all__ = ["specialize"]

F = TypeVar("F", bound=Callable[..., Any])

# What a closure variable is known to hold, for the cache key.
_OTHER: Final = 3
_UNBOUND: Final = 4  # nothing known: the cell may yet be bound to anything, None too
_KIND: Final = {id(None): 0, id(True): 1, id(False): 2}
_FLAGS: Final = __future__.annotations.compiler_flag


@dataclass(frozen=True, slots=True)
class _Template:
    """Where a template is in its file, and what compiling it again needs."""

    imports: Sequence[ast.stmt]  # the file's imports: the compiler reads them (see _inner_code)
    lines: str  # the definition's own lines, from its file
    offset: int  # how many lines of the file come before them
    rebound: frozenset[str]  # names some closure of the enclosing function rebinds


# A template's code -> how to compile it again, or None: it cannot be (see the module).
# Both caches are filled without a lock: two threads may compile one shape at once, to
# equal code, and the first stored is kept. A lock held across a compile would stay held
# in a child forked meanwhile, by a thread the child does not have.
_templates: dict[types.CodeType, _Template | None] = {}
# (template code, the kinds of its free variables) -> the specialised code, or None.
# Bounded by the templates (the two drivers) times the shapes of their stages.
_compiled: dict[tuple[types.CodeType, tuple[int, ...]], types.CodeType | None] = {}


def specialize(fn: F) -> F:
    """``fn``, a closure, recompiled with its ``None``/``True``/``False`` free names folded."""
    code = fn.__code__
    cells = fn.__closure__ or ()
    values: dict[str, object] = {}
    kinds = []
    for name, cell in zip(code.co_freevars, cells, strict=True):
        try:
            value = cell.cell_contents
        except ValueError:  # not bound yet: nothing known, and a shape of its own
            kinds.append(_UNBOUND)
            continue
        values[name] = value
        kinds.append(_KIND.get(id(value), _OTHER))
    key = (code, tuple(kinds))
    try:
        specialised = _compiled[key]
    except KeyError:
        specialised = _compiled.setdefault(key, _compile(code, values))
    if specialised is None:
        return fn
    by_name = dict(zip(code.co_freevars, cells, strict=True))
    result = types.FunctionType(
        specialised,
        fn.__globals__,
        fn.__name__,
        fn.__defaults__,
        tuple(by_name[name] for name in specialised.co_freevars),
    )
    result.__kwdefaults__ = fn.__kwdefaults__
    result.__qualname__ = fn.__qualname__
    result.__doc__ = fn.__doc__
    # Made by the `def` statement, not held by the code: copied, or the result has none.
    result.__annotations__ = dict(fn.__annotations__)
    result.__dict__.update(fn.__dict__)
    return result  # type: ignore[return-value]


def _compile(code: types.CodeType, values: dict[str, object]) -> types.CodeType | None:
    """``code`` specialised for ``values``, or ``None``: run the template as written.

    Dead branches are dropped if that changes no name's scope, else kept under their
    constant tests (the compiler drops their code, not their names' bindings).
    """
    try:
        try:
            template = _templates[code]
        except KeyError:
            template = _templates.setdefault(code, _template(code))
        if template is None:
            return None
        known = {name: value for name, value in values.items() if name not in template.rebound}
        for drop in (True, False):
            definition = _Folder(known, drop=drop).visit(_parse(template))
            specialised = _inner_code(definition, template.imports, code)
            if _same_scopes(specialised, code, definition):
                return specialised
        return None
    # Whatever the compiler makes of the file now (a line changed to one that no longer
    # parses, a warning the filters make an error), building a driver must not fail.
    except (SyntaxError, ValueError, RecursionError, Warning):
        return None


def _same_scopes(
    specialised: types.CodeType,
    code: types.CodeType,
    definition: ast.FunctionDef | ast.AsyncFunctionDef,
) -> bool:
    """Whether every name the folded ``definition`` reads is in the scope it had in ``code``.

    A dropped branch takes its statements with it: an assignment that made a name local
    (its other reads would look up a global), a ``global`` or ``nonlocal`` declaration
    (its assignments would bind a local), a ``yield`` (a generator would be a function).
    """
    if specialised.co_flags != code.co_flags:
        return False
    # Each kind of name may lose members (a name only dead code read), never gain any.
    for kind in ("co_varnames", "co_cellvars", "co_freevars"):
        if not set(getattr(specialised, kind)) <= set(getattr(code, kind)):
            return False
    # A local that lost its bindings but is still read would be read as a global.
    lost = set(code.co_varnames) - set(specialised.co_varnames)
    return not any(isinstance(node, ast.Name) and node.id in lost for node in ast.walk(definition))


def _template(code: types.CodeType) -> _Template | None:
    """How to compile ``code`` again, if its file holds its source, unchanged."""
    source = linecache.getlines(code.co_filename)
    try:
        tree = ast.parse("".join(source), code.co_filename)
    except SyntaxError:
        return None
    imports = [
        node
        for node in tree.body
        if isinstance(node, ast.Import)
        or (isinstance(node, ast.ImportFrom) and node.module != "__future__")
    ]
    line = code.co_firstlineno
    for outer in tree.body:
        if not isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if not outer.lineno < line <= (outer.end_lineno or 0):
            continue
        for node in ast.walk(outer):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.lineno == line
                and node.name == code.co_name
                and not _nested_scopes(node)
            ):
                rebound = frozenset(
                    name
                    for child in ast.walk(outer)
                    if isinstance(child, ast.Nonlocal)
                    for name in child.names
                )
                lines = "".join(source[line - 1 : node.end_lineno])
                template = _Template(imports, lines, line - 2, rebound)
                # The file may have changed since the module was imported: then the
                # text does not compile to the code that is running.
                if _same(_inner_code(_parse(template), imports, code), code):
                    return template
        return None
    return None


def _parse(template: _Template) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The template's definition, parsed afresh, with the file's lines and columns."""
    # Under an `if` the indented lines parse as they stand: their columns stay the file's.
    block = ast.parse("if True:\n" + template.lines).body[0]
    assert isinstance(block, ast.If)
    definition = block.body[0]
    assert isinstance(definition, ast.FunctionDef | ast.AsyncFunctionDef)
    return ast.increment_lineno(definition, template.offset)


_SCOPES: Final = (
    *(ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef),
    *(ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp),
)


def _nested_scopes(definition: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether a scope inside ``definition`` could bind one of its free names locally."""
    return any(isinstance(node, _SCOPES) for node in ast.walk(definition) if node is not definition)


def _same(compiled: types.CodeType, code: types.CodeType) -> bool:
    # Code compares by its instructions, constants, names and line table.
    return compiled == code


def _inner_code(
    definition: ast.FunctionDef | ast.AsyncFunctionDef,
    imports: Sequence[ast.stmt],
    code: types.CodeType,
) -> types.CodeType:
    """Compile ``definition`` as a closure over ``code``'s free names; its code object."""
    free: list[ast.expr] = [ast.Name(name, ast.Store()) for name in code.co_freevars]
    outer = ast.FunctionDef(
        name="<specialised>",
        args=ast.arguments(
            posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[], defaults=[]
        ),
        body=[ast.Assign(free, ast.Constant(None)), definition] if free else [definition],
        decorator_list=[],
        returns=None,
        type_comment=None,
    )
    # The file's imports, never run: the compiler calls a function of an imported module
    # differently (LOAD_ATTR, not LOAD_METHOD), and the code must match the template's.
    module = ast.Module(body=[*imports, outer], type_ignores=[])
    ast.fix_missing_locations(module)
    flags = code.co_flags & _FLAGS  # the template's file's own `from __future__ import`
    compiled = compile(module, code.co_filename, "exec", flags=flags, dont_inherit=True)
    # By name: a Python that makes annotations lazily keeps their functions beside it.
    (enclosing,) = (c for c in compiled.co_consts if _named(c, outer.name))
    (inner,) = (c for c in enclosing.co_consts if _named(c, definition.name))
    return inner.replace(co_qualname=code.co_qualname)


def _named(const: object, name: str) -> TypeGuard[types.CodeType]:
    return isinstance(const, types.CodeType) and const.co_name == name


class _Folder(ast.NodeTransformer):
    """Replaces the known names by their constants and folds what becomes constant."""

    def __init__(self, known: dict[str, object], *, drop: bool) -> None:
        self.known = known
        self.drop = drop  # whether a dead branch goes, or stays under its constant test

    def constant(self, node: ast.expr) -> ast.expr:
        """``node`` as a constant, if it names one: only where it is tested or compared.

        A known name elsewhere (called, say) stays a name: folded into dead code, a
        constant there would make the compiler warn (``None()``).
        """
        if isinstance(node, ast.Name) and node.id in self.known:
            value = self.known[node.id]
            if value is None or value is True or value is False:
                return ast.copy_location(ast.Constant(value), node)
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.expr:
        self.generic_visit(node)
        if len(node.ops) != 1 or not isinstance(node.ops[0], ast.Is | ast.IsNot):
            return node
        left, right = self.constant(node.left), self.constant(node.comparators[0])
        same = self._identical(left, right)
        if same is None:
            return node
        return ast.copy_location(ast.Constant(same == isinstance(node.ops[0], ast.Is)), node)

    def _identical(self, left: ast.expr, right: ast.expr) -> bool | None:
        """Whether ``left is right``, when that is known."""
        if isinstance(left, ast.Constant) and isinstance(right, ast.Constant):
            return left.value is right.value
        # A name holding an object that is not None, against None.
        for name, other in ((left, right), (right, left)):
            if (
                isinstance(name, ast.Name)
                and name.id in self.known
                and isinstance(other, ast.Constant)
                and other.value is None
            ):
                return False  # the known value is not None, or it would be a constant
        return None

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.expr:
        self.generic_visit(node)
        operand = self.constant(node.operand)
        if isinstance(node.op, ast.Not) and isinstance(operand, ast.Constant):
            return ast.copy_location(ast.Constant(not operand.value), node)
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.expr:
        """Leading constants: exact in any context (``True and x`` is ``x``)."""
        self.generic_visit(node)
        stops = isinstance(node.op, ast.Or)  # the truth value that ends the expression
        values = [self.constant(value) for value in node.values]
        while values and isinstance(values[0], ast.Constant):
            if bool(values[0].value) is stops or len(values) == 1:
                return values[0]
            values.pop(0)
        if len(values) == 1:
            return values[0]
        node.values = values
        return node

    def visit_If(self, node: ast.If) -> ast.stmt | list[ast.stmt]:
        self.generic_visit(node)
        node.test = test = _as_test(self.constant(node.test))
        if not isinstance(test, ast.Constant) or not self.drop:
            return node
        # The dead branch goes, and with it its names: they are no longer free variables,
        # and the frame is smaller. A `pass` on the test's line keeps its line event, as
        # the compiler itself does for a constant test.
        return [ast.copy_location(ast.Pass(), node), *(node.body if test.value else node.orelse)]

    def visit_IfExp(self, node: ast.IfExp) -> ast.expr:
        self.generic_visit(node)
        test = _as_test(self.constant(node.test))
        if isinstance(test, ast.Constant):
            return node.body if test.value else node.orelse
        node.test = test
        return node


def _as_test(node: ast.expr) -> ast.expr:
    """``node`` read only for its truth: constants that cannot decide it are dropped."""
    if not isinstance(node, ast.BoolOp):
        return node
    useless = isinstance(node.op, ast.And)  # `x and True` tests as `x`
    values = [
        value
        for value in node.values
        if not (isinstance(value, ast.Constant) and bool(value.value) is useless)
    ]
    if not values:
        return ast.copy_location(ast.Constant(useless), node)
    if len(values) == 1:
        return values[0]
    node.values = values
    return node
