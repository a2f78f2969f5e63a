"""What a %%gpunet cell reads and writes, found with ``ast`` before anything is sent.

A cell's *inputs* are the names it reads before it has surely assigned them, so
their values must travel with the cell; its *outputs* are the names it binds at top
level, which come back into the notebook. The analysis follows Python's scoping:

- top-level statements are read in order; a name assigned in only one branch of an
  ``if``, or inside a loop or ``try`` body, is not *surely* assigned, so a later read
  of it still counts as an input (the notebook's value travels, as a fallback);
- functions, lambdas, classes and comprehensions have scopes of their own: their
  parameters and locals are not inputs; the free names of a function, lambda or
  class are inputs unless the cell surely assigns them by its end (they are read
  when it is called, which may be later: recursion, helpers defined below); and
  ``global x`` inside a function makes ``x`` an output;
- ``x += 1`` reads ``x`` first; ``a[i] = v`` and ``a.b = v`` read ``a`` and change it,
  so ``a`` comes back too; ``del x`` reads ``x`` and takes it off the outputs;
- names bound by ``import`` are not outputs: a module is not data, and the notebook
  may not have it installed; nor are ``with ... as`` targets (open files, locks).

A syntax error is reported here, with its line within the cell, and nothing is sent.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from dataclasses import dataclass, field

from gpunet.errors import CellSyntaxError

def cell_filename(code: str) -> str:
    """The file name a cell is parsed and compiled under, here and on the worker, so
    that its syntax errors and its tracebacks name it the same way."""
    return f"<gpunet cell {hashlib.sha256(code.encode()).hexdigest()[:8]}>"


@dataclass(frozen=True)
class CellAnalysis:
    """The result of :func:`analyze`: a cell's code and its data flow."""

    code: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    #: True when the last statement is an expression whose value is displayed,
    #: as IPython displays ``Out[n]`` (a trailing ``;`` silences it).
    displays_last_expression: bool
    digest: str = field(default="")


@functools.lru_cache(maxsize=256)
def analyze(code: str) -> CellAnalysis:
    """Parse ``code`` and return its inputs, outputs and digest.

    Raises :class:`CellSyntaxError` with the line (1-based, within the cell) when
    the cell does not parse.
    """
    try:
        tree = ast.parse(code, filename=cell_filename(code), mode="exec")
    except SyntaxError as exc:
        line = (exc.text or "").rstrip("\n")
        hint = "Nothing was sent; fix the cell and run it again."
        if line.lstrip().startswith(("%", "!")):
            hint = ("IPython magics and shell escapes (% and !) cannot run on a worker: "
                    "run them in a cell of their own, or use Python (subprocess) in the cell. Nothing was sent.")
        pointer = ""
        if line and exc.offset:
            pointer = "\n    " + " " * (exc.offset - 1) + "^"
        raise CellSyntaxError(
            f"the cell has a syntax error at line {exc.lineno}: {exc.msg}\n"
            f"    {line.strip() if not pointer else line}{pointer}\n{hint}",
            lineno=exc.lineno,
        ) from None
    flow = _TopLevelFlow()
    defined_at_end = flow.statements(tree.body, set())
    for name in flow.deferred:
        if name not in defined_at_end and name not in flow.inputs:
            flow.inputs.append(name)
    outputs = [name for name in flow.bound if name not in flow.deleted_last and name not in flow.not_data]
    for name in flow.mutated:
        if name not in outputs:
            outputs.append(name)
    displays_last = bool(tree.body) and isinstance(tree.body[-1], ast.Expr) and not code.rstrip().endswith(";")
    return CellAnalysis(
        code=code,
        inputs=tuple(flow.inputs),
        outputs=tuple(outputs),
        displays_last_expression=displays_last,
        digest=hashlib.sha256(code.encode()).hexdigest(),
    )


class _TopLevelFlow:
    """Walks module-level statements in order, tracking surely-assigned names."""

    def __init__(self) -> None:
        self.inputs: list[str] = []
        self.bound: list[str] = []  # every name bound at top level, in first-bound order
        self.not_data: set[str] = set()  # names whose last binding was an import or a with-as
        self.deferred: list[str] = []  # free names of functions/classes, read when called
        self.depth = 0  # > 0 inside a branch, loop or try
        self.mutated: list[str] = []  # a in `a[i] = v` / `a.b = v`
        self.deleted_last: set[str] = set()

    # -- bookkeeping ---------------------------------------------------------------
    def _read(self, name: str, defined: set[str]) -> None:
        if name not in defined and name not in self.inputs:
            self.inputs.append(name)

    def _defer(self, name: str, defined: set[str]) -> None:
        if name not in defined and name not in self.deferred:
            self.deferred.append(name)

    def _bind(self, name: str, defined: set[str], *, surely: bool, not_data: bool = False) -> None:
        if surely:
            defined.add(name)
        if name not in self.bound:
            self.bound.append(name)
        self.deleted_last.discard(name)
        if not_data:
            self.not_data.add(name)
        else:
            self.not_data.discard(name)

    def _reads(self, node: ast.AST | None, defined: set[str]) -> None:
        """Reads of an expression evaluated at top level, in evaluation order."""
        if node is None:
            return
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                self._read(node.id, defined)
            return
        if isinstance(node, ast.NamedExpr):
            self._reads(node.value, defined)
            self._bind(node.target.id, defined, surely=True)
            return
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            scope = _Scope(node)
            if isinstance(node, ast.Lambda):
                for expression in _evaluated_at_definition(node):
                    self._reads(expression, defined)
                for name in scope.free_in_order():
                    self._defer(name, defined)
            else:  # a comprehension runs now; its first iterable in this scope
                self._reads(node.generators[0].iter, defined)
                for name in scope.free_in_order():
                    self._read(name, defined)
            for name in scope.walrus_targets:
                self._bind(name, defined, surely=False)
            return
        for child in ast.iter_child_nodes(node):
            self._reads(child, defined)

    def _targets(self, target: ast.AST, defined: set[str], *, surely: bool, not_data: bool = False) -> None:
        if isinstance(target, ast.Name):
            self._bind(target.id, defined, surely=surely, not_data=not_data)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self._targets(element, defined, surely=surely, not_data=not_data)
        elif isinstance(target, ast.Starred):
            self._targets(target.value, defined, surely=surely, not_data=not_data)
        elif isinstance(target, (ast.Attribute, ast.Subscript)):
            self._reads(target, defined)
            base = target
            while isinstance(base, (ast.Attribute, ast.Subscript)):
                base = base.value
            if isinstance(base, ast.Name) and base.id not in self.mutated:
                self.mutated.append(base.id)

    # -- statements ----------------------------------------------------------------
    def statements(self, body: list[ast.stmt], defined: set[str]) -> set[str]:
        """Process ``body`` in order; returns the names surely defined after it."""
        for statement in body:
            self.statement(statement, defined)
        return defined

    def _branch(self, body: list[ast.stmt], defined: set[str]) -> set[str]:
        """Process a body that may not run (or not to its end) on a copy of ``defined``."""
        self.depth += 1
        try:
            return self.statements(body, set(defined))
        finally:
            self.depth -= 1

    def statement(self, node: ast.stmt, defined: set[str]) -> None:  # noqa: C901 - one case per statement kind
        if isinstance(node, ast.Assign):
            self._reads(node.value, defined)
            for target in node.targets:
                self._targets(target, defined, surely=True)
        elif isinstance(node, ast.AugAssign):
            if isinstance(node.target, ast.Name):
                self._read(node.target.id, defined)
            self._reads(node.value, defined)
            self._targets(node.target, defined, surely=True)
        elif isinstance(node, ast.AnnAssign):
            self._reads(node.annotation, defined)
            if node.value is not None:
                self._reads(node.value, defined)
                self._targets(node.target, defined, surely=True)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = _Scope(node)
            for expression in _evaluated_at_definition(node):
                self._reads(expression, defined)
            for name in scope.free_in_order():
                self._defer(name, defined)
            for name in scope.global_writes:
                self._bind(name, defined, surely=False)
            self._bind(node.name, defined, surely=True)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    continue
                name = alias.asname or alias.name.split(".")[0]
                self._bind(name, defined, surely=True, not_data=True)
        elif isinstance(node, ast.If):
            self._reads(node.test, defined)
            after_body = self._branch(node.body, defined)
            after_else = self._branch(node.orelse, defined)
            defined |= after_body & after_else
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            self._reads(node.iter, defined)
            self.depth += 1
            inner = set(defined)
            self._targets(node.target, inner, surely=True)
            self.statements(node.body, inner)
            self.depth -= 1
            self._branch(node.orelse, defined)
        elif isinstance(node, ast.While):
            self._reads(node.test, defined)
            self._branch(node.body, defined)
            self._branch(node.orelse, defined)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                self._reads(item.context_expr, defined)
                if item.optional_vars is not None:
                    self._targets(item.optional_vars, defined, surely=True, not_data=True)
            self.statements(node.body, defined)
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            self.depth += 1
            after_body = self.statements(node.body, set(defined))
            surely = self.statements(node.orelse, after_body)
            for handler in node.handlers:
                self._reads(handler.type, defined)
                inner = set(defined)
                if handler.name:  # unbound again when the handler ends, so never an output
                    inner.add(handler.name)
                surely = surely & (self.statements(handler.body, inner) - {handler.name})
            self.depth -= 1
            defined |= surely
            self.statements(node.finalbody, defined)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self._read(target.id, defined)
                    defined.discard(target.id)
                    if self.depth == 0:  # a del in a branch may not run: the name may come back
                        self.deleted_last.add(target.id)
                else:
                    self._targets(target, defined, surely=True)
        elif isinstance(node, ast.Match):
            self._reads(node.subject, defined)
            self.depth += 1
            for case in node.cases:
                inner = set(defined)
                for name in _pattern_names(case.pattern):
                    self._bind(name, inner, surely=True)
                for child in ast.walk(case.pattern):
                    if isinstance(child, (ast.MatchValue, ast.MatchClass)):
                        self._reads(getattr(child, "value", None) or getattr(child, "cls", None), inner)
                self._reads(case.guard, inner)
                self.statements(case.body, inner)
            self.depth -= 1
        elif isinstance(node, (ast.Global, ast.Nonlocal, ast.Pass, ast.Break, ast.Continue)):
            pass
        else:  # Expr, Return, Raise, Assert and anything newer: read what it holds
            for child in ast.iter_child_nodes(node):
                self._reads(child, defined)


def _evaluated_at_definition(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda) -> list[ast.AST]:
    """Expressions of a def/class/lambda that run in the enclosing scope."""
    found: list[ast.AST] = list(getattr(node, "decorator_list", []))
    if isinstance(node, ast.ClassDef):
        found += node.bases + [keyword.value for keyword in node.keywords]
        return found
    arguments = node.args
    found += [d for d in arguments.defaults if d is not None] + [d for d in arguments.kw_defaults if d is not None]
    if not isinstance(node, ast.Lambda):
        found += [a.annotation for a in _argument_names(arguments) if a.annotation is not None]
        if node.returns is not None:
            found.append(node.returns)
    return found


def _argument_names(arguments: ast.arguments) -> list[ast.arg]:
    every_arg = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
    return every_arg + [a for a in (arguments.vararg, arguments.kwarg) if a is not None]


def _pattern_names(pattern: ast.AST) -> list[str]:
    names = []
    for child in ast.walk(pattern):
        if isinstance(child, (ast.MatchAs, ast.MatchStar)) and child.name:
            names.append(child.name)
        elif isinstance(child, ast.MatchMapping) and child.rest:
            names.append(child.rest)
    return names


_SCOPE_NODES = (
    ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
    ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
)


class _Scope:
    """Names bound and read in one function, class, lambda or comprehension scope.

    Inside a function the order of reads does not matter: a name is local if it is
    bound anywhere in the function, so its free names are simply reads minus locals.
    """

    def __init__(self, node: ast.AST) -> None:
        self.node = node
        self.bound: set[str] = set()
        self.reads: list[str] = []
        self.declared_global: set[str] = set()
        self.declared_nonlocal: set[str] = set()
        self.walrus_targets: list[str] = []  # comprehension := binds in the enclosing scope
        self.children: list[_Scope] = []
        self._collect()

    def _collect(self) -> None:
        node = self.node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            self.bound.update(a.arg for a in _argument_names(node.args))
            body = node.body if isinstance(node.body, list) else [node.body]
            for statement in body:
                self._visit(statement)
        elif isinstance(node, ast.ClassDef):
            for statement in node.body:
                self._visit(statement)
        else:  # a comprehension: the first iterable runs in the enclosing scope
            for index, generator in enumerate(node.generators):
                if index > 0:
                    self._visit(generator.iter)
                self._visit(generator.target)
                for condition in generator.ifs:
                    self._visit(condition)
            if isinstance(node, ast.DictComp):
                self._visit(node.key)
                self._visit(node.value)
            else:
                self._visit(node.elt)

    def _visit(self, node: ast.AST) -> None:
        if isinstance(node, _SCOPE_NODES):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.bound.add(node.name)
            for expression in _evaluated_at_definition(node) if not isinstance(
                node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
            ) else [node.generators[0].iter]:
                self._visit(expression)
            child = _Scope(node)
            self.children.append(child)
            for name in child.walrus_targets:
                self._bind(name)
            return
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                self.reads.append(node.id)
            else:
                self._bind(node.id)
            return
        if isinstance(node, ast.NamedExpr) and isinstance(
            self.node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
        ):
            self.walrus_targets.append(node.target.id)
            self._visit(node.value)
            return
        if isinstance(node, ast.Global):
            self.declared_global.update(node.names)
        elif isinstance(node, ast.Nonlocal):
            self.declared_nonlocal.update(node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name != "*":
                    self._bind(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            self._bind(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            self._bind(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            self._bind(node.rest)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            self.reads.append(node.target.id)
        for child in ast.iter_child_nodes(node):
            self._visit(child)

    def _bind(self, name: str) -> None:
        self.bound.add(name)

    @property
    def locals(self) -> set[str]:
        return self.bound - self.declared_global - self.declared_nonlocal

    @property
    def global_writes(self) -> list[str]:
        """Names this scope (or a nested one) assigns through ``global``."""
        writes = sorted(self.bound & self.declared_global)
        for child in self.children:
            writes += [name for name in child.global_writes if name not in writes]
        return writes

    def free_in_order(self) -> list[str]:
        """Names read here or in nested scopes that this scope does not bind."""
        is_class = isinstance(self.node, ast.ClassDef)
        free: list[str] = []
        for name in self.reads:
            if (name not in self.locals or name in self.declared_global) and name not in free:
                free.append(name)
        for child in self.children:
            for name in child.free_in_order():
                # Methods don't see the class body's names; functions' closures do.
                hidden = (not is_class) and name in self.locals and name not in self.declared_global
                if not hidden and name not in free:
                    free.append(name)
        return free
