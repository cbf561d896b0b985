"""The settings a verb's function reads, found in the package's source (ast): what
tests/test_cli.py holds each verb's declared settings (cli.VERB_SETTINGS) to.

A config is made by load_config (`BuildConfig(...)`). From a verb's function this follows
every config through the package's functions it is passed to (by position or keyword),
returned from (whole, or in a tuple unpacked `a, b = f()`), bound to a name, or copied into
with dataclasses.replace, whose changed settings are then no longer the user's (sync's
target_config sets each bundle's release and output). A read is `config.KEY`, a property of
BuildConfig (the settings its body reads), `getattr(config, KEY)` (a constant, or a key a
comprehension takes from a tuple the package declares, as render does; else every setting)
or `dataclasses.fields(config)` (every setting); reading agent_units reads agents too
(load_config folds the agents' units into it). The configs a verb's callees make count too
(every package function or class it names is followed). Recursion is analysed in rounds
until no summary grows.

Any other use of a config (passed to a function outside the package, to an object's method
or a class, stored, formatted, in a conditional expression) is reported, not guessed at:
that is what makes a read that goes unseen a failing test rather than a missing flag.
"""

from __future__ import annotations

import ast
import builtins
import importlib
from dataclasses import dataclass, field, fields
from pathlib import Path

import coreos_gpu
from coreos_gpu.config import BuildConfig

PACKAGE = Path(coreos_gpu.__file__).parent
FIELDS = frozenset(f.name for f in fields(BuildConfig)) - {"sources"}
# load_config folds the agents' units into agent_units: reading it reads agents too.
IMPLIED = {"agent_units": frozenset({"agents"})}
# Where a config comes from: ("", mask) one the verb made (load_config), (param, mask) the
# function's param; mask: the settings dataclasses.replace set, which are no longer the user's.
Source = tuple[str, frozenset[str]]
Function = tuple[str, str]  # (module, "f" or "Class.method" or "Class")


@dataclass
class _Module:
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)  # "f", "Class.method"
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)
    imports: dict[str, str] = field(default_factory=dict)  # local name → "module.name"


def _load_modules(package: Path) -> dict[str, _Module]:
    modules = {}
    for path in sorted(package.glob("*.py")):
        module = _Module()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef):
                module.functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                module.classes[node.name] = node
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        module.functions[f"{node.name}.{item.name}"] = item
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    module.imports[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    module.imports[alias.asname or alias.name] = alias.name
        modules["coreos_gpu" if path.stem == "__init__" else f"coreos_gpu.{path.stem}"] = module
    return modules


@dataclass
class _Summary:
    """What a function reads of each param, were it given a config there, and of the configs
    it makes or gets back; what it returns; the uses the analysis cannot follow."""

    reads: dict[str, set[str]] = field(default_factory=dict)  # by origin ("": made here)
    unknown: dict[str, list[str]] = field(default_factory=dict)  # by origin
    returns: list[Source] = field(default_factory=list)
    returns_by_position: dict[int, list[Source]] = field(default_factory=dict)


class SettingReads:
    """The settings each function reads, followed through every package function a config
    is passed to or returned from."""

    def __init__(self, package: Path = PACKAGE) -> None:
        self.modules = _load_modules(package)
        config_class = self.modules["coreos_gpu.config"].classes["BuildConfig"]
        self.properties = {
            item.name: frozenset(n.attr for n in ast.walk(item) if isinstance(n, ast.Attribute)
                                 and isinstance(n.value, ast.Name) and n.value.id == "self")
            for item in config_class.body if isinstance(item, ast.FunctionDef)}
        self._summaries: dict[Function, _Summary] = {}
        self._previous: dict[Function, _Summary] = {}
        self._settled = False

    def qualified(self, module: str, expr: ast.expr) -> str | None:
        """What a name or dotted name in module refers to, as "module.name"; None: a local."""
        if isinstance(expr, ast.Name):
            where = self.modules[module]
            if expr.id in where.functions or expr.id in where.classes:
                return f"{module}.{expr.id}"
            if expr.id in where.imports:
                return where.imports[expr.id]
            return f"builtins.{expr.id}" if hasattr(builtins, expr.id) else None
        if isinstance(expr, ast.Attribute):
            base = self.qualified(module, expr.value)
            return f"{base}.{expr.attr}" if base else None
        return None

    def function(self, name: str) -> Function | None:
        """The package function or class a qualified name refers to."""
        for module in sorted(self.modules, key=len, reverse=True):
            if name.startswith(module + "."):
                rest = name[len(module) + 1:]
                where = self.modules[module]
                if rest in where.functions or rest in where.classes:
                    return module, rest
                head, _, tail = rest.partition(".")
                if head in where.imports:  # a re-export
                    return self.function(where.imports[head] + (f".{tail}" if tail else ""))
                return None
        return None

    def summary(self, function: Function) -> _Summary:
        if function not in self._summaries:
            # Recursion meets the function again before its analysis ends: it then takes
            # the summary the round before made (settle repeats the rounds until none grows).
            self._summaries[function] = self._previous.get(function, _Summary())
            self._summaries[function] = _Analysis(self, *function).run()
        return self._summaries[function]

    def _settle(self) -> None:
        """Summaries of every function, analysed in rounds until a round changes none."""
        while not self._settled:
            self._summaries = {}
            for module, where in self.modules.items():
                for name in (*where.functions, *where.classes):
                    self.summary((module, name))
            self._settled = self._summaries == self._previous
            self._previous = self._summaries

    def verb_reads(self, module: str, name: str) -> frozenset[str]:
        """The settings a verb's function reads, of the configs it makes (load_config) or
        the functions it calls make. Raises AssertionError where a config goes where the
        analysis cannot follow it."""
        self._settle()
        summary = self.summary((f"coreos_gpu.{module}", name))
        assert not summary.unknown.get(""), summary.unknown[""]
        return frozenset(summary.reads.get("", ()))


class _Analysis:
    def __init__(self, reads: SettingReads, module: str, name: str) -> None:
        self.reads, self.module, self.name = reads, module, name
        self.node = reads.modules[module].functions.get(name)
        self.summary = _Summary()
        self.bindings: dict[str, list[Source]] = {}
        self.parents: dict[ast.AST, ast.AST] = {}
        self.annotations: set[ast.AST] = set()

    def run(self) -> _Summary:
        if self.node is None:  # a class: its methods are what runs
            for method in self.reads.modules[self.module].functions:
                if method.startswith(self.name + "."):
                    self._include_made(self.reads.summary((self.module, method)))
            return self.summary
        args = self.node.args
        for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs):
            self.bindings[arg.arg] = [(arg.arg, frozenset())]
        for parent in ast.walk(self.node):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent
        # Annotations name types; they run nothing (from __future__ import annotations).
        annotations = [a.annotation for a in ast.walk(self.node)
                       if isinstance(a, ast.arg | ast.AnnAssign) and a.annotation is not None]
        annotations += [f.returns for f in ast.walk(self.node)
                        if isinstance(f, ast.FunctionDef) and f.returns is not None]
        self.annotations = {n for a in annotations for n in ast.walk(a)}
        before = None
        while before != self.bindings:  # a name may be bound from one bound further down
            before = {name: list(sources) for name, sources in self.bindings.items()}
            for node in ast.walk(self.node):
                if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for target in targets:
                        self._bind(target, node.value)
        for node in ast.walk(self.node):
            if node is self.node or not isinstance(node, ast.expr) or node in self.annotations:
                continue
            referenced = self._referenced(node)
            if referenced is not None:
                self._include_made(self.reads.summary(referenced))
            sources = self.sources(node)
            if sources:
                self._use(node, sources)
            if isinstance(node, ast.Call) and self._returned(node, by_position=True):
                self._check_unpacked(node)
        return self.summary

    def _check_unpacked(self, call: ast.Call) -> None:
        """A call that returns configs in a tuple: only `a, b = f()` is followed."""
        parent = self.parents[call]
        if not (isinstance(parent, ast.Assign) and parent.value is call
                and all(isinstance(t, ast.Tuple) and all(isinstance(e, ast.Name) for e in t.elts)
                        for t in parent.targets)):
            returned = self._returned(call, by_position=True)
            self._unknown([s for sources in returned.values() for s in sources],
                          f"{self.module}.{self.name}:{call.lineno}: a tuple not unpacked")

    def _include_made(self, called: _Summary) -> None:
        """What a function this one calls (or names) reads of the configs it makes."""
        self._read([("", frozenset())], called.reads.get("", set()))
        self.summary.unknown.setdefault("", []).extend(called.unknown.get("", []))

    def _referenced(self, node: ast.expr) -> Function | None:
        if not isinstance(node, ast.Name | ast.Attribute):
            return None
        if isinstance(self.parents.get(node), ast.Attribute):
            return None  # part of a dotted name, looked up whole
        name = self.reads.qualified(self.module, node)
        return self.reads.function(name) if name else None

    def _bind(self, target: ast.expr, value: ast.expr) -> None:
        pairs: list[tuple[ast.expr, list[Source]]] = [(target, self.sources(value) or [])]
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Call):
            returned = self._returned(value, by_position=True)
            pairs = [(e, returned.get(i, [])) for i, e in enumerate(target.elts)]
        for name, sources in pairs:
            if isinstance(name, ast.Name):
                known = self.bindings.setdefault(name.id, [])
                known += [s for s in sources if s not in known]

    # --- where a config comes from -------------------------------------------------------

    def sources(self, expr: ast.expr) -> list[Source] | None:
        """Where the config expr evaluates to comes from; None: no config."""
        if isinstance(expr, ast.Name):
            return self.bindings.get(expr.id) if isinstance(expr.ctx, ast.Load) else None
        if not isinstance(expr, ast.Call):
            return None
        callee = self.reads.qualified(self.module, expr.func)
        if callee == "dataclasses.replace" and expr.args:
            # The settings replace sets are no longer what the config it copies says.
            changed = frozenset(k.arg for k in expr.keywords if k.arg)
            return [(o, m | changed) for o, m in self.sources(expr.args[0]) or ()] or None
        if callee == "coreos_gpu.config.BuildConfig":
            return [("", frozenset())]
        return self._returned(expr, by_position=False).get(-1)

    def _returned(self, call: ast.Call, *, by_position: bool) -> dict[int, list[Source]]:
        """The configs a call to a package function returns (-1: the whole value)."""
        callee = self.reads.qualified(self.module, call.func)
        function = self.reads.function(callee) if callee else None
        if function is None:
            return {}
        summary = self.reads.summary(function)
        shapes = summary.returns_by_position if by_position else {-1: summary.returns}
        mapped: dict[int, list[Source]] = {}
        for position, sources in shapes.items():
            for origin, mask in sources:
                if not origin:
                    mapped.setdefault(position, []).append(("", mask))
                    continue
                argument = self._argument(call, function, origin)
                given = self.sources(argument) if argument is not None else None
                mapped.setdefault(position, []).extend((o, m | mask) for o, m in given or ())
        return {p: s for p, s in mapped.items() if s}

    def _params(self, function: Function) -> tuple[list[str], set[str]] | None:
        """A function's positional params as a call passes them (a classmethod's cls left
        out), and every param's name; None: a class, whose constructor stores what it gets."""
        node = self.reads.modules[function[0]].functions.get(function[1])
        if node is None:
            return None
        positional = [a.arg for a in (*node.args.posonlyargs, *node.args.args)]
        if any(isinstance(d, ast.Name) and d.id == "classmethod" for d in node.decorator_list):
            positional = positional[1:]
        return positional, {*positional, *(a.arg for a in node.args.kwonlyargs)}

    def _argument(self, call: ast.Call, function: Function, param: str) -> ast.expr | None:
        """The expression a call passes for a param of function."""
        for keyword in call.keywords:
            if keyword.arg == param:
                return keyword.value
        params = self._params(function)
        if params is None or param not in params[0]:
            return None
        index = params[0].index(param)
        argument = call.args[index] if index < len(call.args) else None
        return None if isinstance(argument, ast.Starred) else argument

    # --- what is done with it ------------------------------------------------------------

    def _use(self, node: ast.expr, sources: list[Source]) -> None:
        parent = self.parents[node]
        where = f"{self.module}.{self.name}:{node.lineno}"
        if isinstance(parent, ast.Attribute) and parent.value is node:
            if parent.attr in FIELDS:
                self._read(sources, {parent.attr})
            elif parent.attr in self.reads.properties:
                self._read(sources, self.reads.properties[parent.attr])
            elif parent.attr != "sources":  # where each value came from: no value
                self._unknown(sources, f"{where}: .{parent.attr}")
            return
        if isinstance(parent, ast.Return):
            self.summary.returns.extend(sources)
            return
        if isinstance(parent, ast.Tuple) and isinstance(self.parents.get(parent), ast.Return):
            self.summary.returns_by_position.setdefault(
                parent.elts.index(node), []).extend(sources)
            return
        if isinstance(parent, ast.Assign | ast.AnnAssign) and parent.value is node:
            targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
            if not all(isinstance(t, ast.Name) for t in targets):
                self._unknown(sources, f"{where}: stored")
            return  # bound: its uses are followed
        call = self.parents[parent] if isinstance(parent, ast.keyword) else parent
        if isinstance(call, ast.Call) and call.func is not node:
            self._passed(call, node, sources, where)
            return
        self._unknown(sources, f"{where}: {type(parent).__name__}")

    def _passed(self, call: ast.Call, node: ast.expr, sources: list[Source], where: str
                ) -> None:
        callee = self.reads.qualified(self.module, call.func) or ""
        first = bool(call.args) and call.args[0] is node
        if callee == "dataclasses.replace" and first:
            return  # a copy: what is read of it is followed where it goes
        if callee == "dataclasses.fields" or (callee == "builtins.getattr" and first):
            self._read(sources, self._getattr_keys(call) if callee.endswith("getattr")
                       else FIELDS)
            return
        function = self.reads.function(callee)
        param = self._param_of(call, node, function) if function else None
        if function is None or param is None:
            self._unknown(sources, f"{where}: passed to {callee or ast.unparse(call.func)}")
            return
        called = self.reads.summary(function)
        self._read(sources, called.reads.get(param, set()))
        self._unknown(sources, *called.unknown.get(param, []))

    def _param_of(self, call: ast.Call, node: ast.expr, function: Function) -> str | None:
        """The param of function that a call passes node to; None: one this cannot name
        (a class's, **kwargs, *args)."""
        params = self._params(function)
        if params is None:
            return None
        positional, named = params
        for keyword in call.keywords:
            if keyword.value is node:
                return keyword.arg if keyword.arg in named else None
        index = next(i for i, a in enumerate(call.args) if a is node)
        return positional[index] if index < len(positional) else None

    def _getattr_keys(self, call: ast.Call) -> frozenset[str]:
        """getattr(config, KEY): a constant, or a name a comprehension takes from a tuple of
        keys the package declares (render's SETTINGS); else, every setting."""
        key = call.args[1] if len(call.args) > 1 else None
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            return frozenset({key.value})
        assert self.node is not None  # a call is in a function, not a class
        for node in ast.walk(self.node):
            for generator in getattr(node, "generators", ()):
                if (isinstance(key, ast.Name) and isinstance(generator.target, ast.Name)
                        and generator.target.id == key.id):
                    name = self.reads.qualified(self.module, generator.iter) or ""
                    module, _, attr = name.rpartition(".")
                    keys = getattr(importlib.import_module(module), attr, None) if module else None
                    if isinstance(keys, tuple) and set(keys) <= FIELDS:
                        return frozenset(keys)
        return FIELDS

    def _read(self, sources: list[Source], keys: set[str] | frozenset[str]) -> None:
        implied = set(keys).union(*(IMPLIED.get(k, ()) for k in keys))
        for origin, mask in sources:
            self.summary.reads.setdefault(origin, set()).update(implied - mask)

    def _unknown(self, sources: list[Source], *uses: str) -> None:
        for origin, _ in sources:
            self.summary.unknown.setdefault(origin, []).extend(uses)
