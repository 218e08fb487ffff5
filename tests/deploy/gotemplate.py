"""A small Go text/template + Sprig subset: enough to render deploy/helm/rvr-serve without helm.

It is a test aid, not Helm. It covers the actions and functions the chart uses (if/else if/else,
range over lists and maps, with, define/include, variables, pipelines, whitespace trimming, and
the Sprig functions listed in `_FUNCS`) and raises on anything else, so a template that starts
using something new fails loudly here instead of rendering wrongly. `helm template` remains the
reference; tests/deploy runs it too where helm is installed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class TemplateError(Exception):
    pass


class TemplateFail(TemplateError):
    """`fail` or `required` fired: the chart refused the values."""


# ---- lexing ----
_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<num>-?\d+(?:\.\d+)?)
    | (?P<decl>:=)
    | (?P<punct>[()|])
    | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
    | (?P<field>(?:\.[A-Za-z0-9_]+)+|\.)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.X,
)


def _tokens(src: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    src = src.strip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"cannot parse {src[pos:]!r}")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _lex(text: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with {{- and -}} trimming applied."""
    items: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(text):
        chunk = text[pos : m.start()]
        if trim_next:
            chunk = chunk.lstrip()
        if m.group(1):
            chunk = chunk.rstrip()
        items.append(("text", chunk))
        body = m.group(2).strip()
        if not body.startswith("/*"):
            items.append(("action", body))
        elif not body.endswith("*/"):
            raise TemplateError(f"unterminated comment {body[:30]!r}")
        trim_next = bool(m.group(3))
        pos = m.end()
    chunk = text[pos:]
    items.append(("text", chunk.lstrip() if trim_next else chunk))
    return items


# ---- parsing into a tree ----
def _parse(items: list[tuple[str, str]], defines: dict[str, list]) -> list:
    """Nodes: ("text", s) | ("expr", body) | ("if", [(cond, nodes)...], else_nodes)
    | ("range", decl, nodes, else_nodes) | ("with", body, nodes, else_nodes)."""
    pos = 0

    def block(stop: tuple[str, ...]) -> tuple[list, str]:
        nonlocal pos
        nodes: list = []
        while pos < len(items):
            kind, body = items[pos]
            pos += 1
            if kind == "text":
                if body:
                    nodes.append(("text", body))
                continue
            word = body.split(None, 1)[0]
            rest = body[len(word) :].strip()
            if word in stop or (word == "else" and "else" in stop):
                return nodes, body
            if word == "if":
                branches = [(rest, None)]
                cur, end = block(("else", "end"))
                branches[-1] = (rest, cur)
                else_nodes: list = []
                while end.startswith("else"):
                    tail = end[4:].strip()
                    if tail.startswith("if "):
                        cond = tail[3:].strip()
                        cur, end = block(("else", "end"))
                        branches.append((cond, cur))
                    else:
                        else_nodes, end = block(("end",))
                nodes.append(("if", branches, else_nodes))
            elif word in ("range", "with"):
                inner, end = block(("else", "end"))
                else_nodes = []
                if end.startswith("else"):
                    else_nodes, end = block(("end",))
                nodes.append((word, rest, inner, else_nodes))
            elif word == "define":
                name = yaml.safe_load(rest)
                inner, _ = block(("end",))
                defines[name] = inner
            elif word in ("end", "else"):
                raise TemplateError(f"unexpected {{{{{body}}}}}")
            elif word in ("block", "template", "break", "continue"):
                raise TemplateError(f"unsupported action {word}")
            else:
                nodes.append(("expr", body))
        if stop:
            raise TemplateError(f"missing {{{{end}}}} (wanted one of {stop})")
        return nodes, ""

    nodes, _ = block(())
    return nodes


# ---- values ----
def _truthy(v: Any) -> bool:
    return not (v is None or v is False or v == 0 or v == "" or v == [] or v == {})


def _gostr(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (dict, list)):
        raise TemplateError(f"cannot print {type(v).__name__} without toYaml: {v!r}")
    return str(v)


def _to_yaml(v: Any) -> str:
    if v is None:
        return "null"
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n")


def _indent(n: int, s: str) -> str:
    pad = " " * int(n)
    return "\n".join(pad + line for line in s.split("\n"))


def _printf(fmt: str, *args: Any) -> str:
    i = 0
    parts = re.split(r"(%[sdvq%])", fmt)
    res = []
    for p in parts:
        if p == "%%":
            res.append("%")
        elif p in ("%s", "%v"):
            res.append(_gostr(args[i]))
            i += 1
        elif p == "%d":
            res.append(str(int(args[i])))
            i += 1
        elif p == "%q":
            res.append(_quote(args[i]))
            i += 1
        else:
            res.append(p)
    return "".join(res)


def _quote(*args: Any) -> str:
    return " ".join('"' + _gostr(a).replace("\\", "\\\\").replace('"', '\\"') + '"' for a in args)


def _fail(msg: str) -> None:
    raise TemplateFail(msg)


def _required(msg: str, v: Any) -> Any:
    if not _truthy(v) and v is not False:
        raise TemplateFail(msg)
    return v


def _default(d: Any, v: Any = None) -> Any:
    return v if _truthy(v) else d


def _dict(*kv: Any) -> dict:
    return {kv[i]: kv[i + 1] for i in range(0, len(kv), 2)}


def _cmp(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    return lambda a, b: op(a, b)


def _and(*args: Any) -> Any:
    for a in args:
        if not _truthy(a):
            return a
    return args[-1]


def _or(*args: Any) -> Any:
    for a in args:
        if _truthy(a):
            return a
    return args[-1]


_FUNCS: dict[str, Callable[..., Any]] = {
    "quote": _quote,
    "toString": _gostr,
    "toYaml": _to_yaml,
    "nindent": lambda n, s: "\n" + _indent(n, s),
    "indent": _indent,
    "default": _default,
    "required": _required,
    "fail": _fail,
    "printf": _printf,
    "print": lambda *a: "".join(_gostr(x) for x in a),
    "int": lambda v: int(float(v)) if v not in (None, "") else 0,
    "add": lambda *a: sum(int(x) for x in a),
    "lt": _cmp(lambda a, b: a < b),
    "le": _cmp(lambda a, b: a <= b),
    "gt": _cmp(lambda a, b: a > b),
    "ge": _cmp(lambda a, b: a >= b),
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda v: not _truthy(v),
    "and": _and,
    "or": _or,
    "hasPrefix": lambda prefix, s: str(s).startswith(prefix),
    "contains": lambda sub, s: sub in str(s),
    "replace": lambda old, new, s: str(s).replace(old, new),
    "trunc": lambda n, s: str(s)[: int(n)],
    "trimSuffix": lambda suf, s: str(s)[: -len(suf)] if suf and str(s).endswith(suf) else str(s),
    "join": lambda sep, items: sep.join(_gostr(x) for x in items),
    "list": lambda *a: list(a),
    "dict": _dict,
    "index": lambda coll, *keys: _index(coll, keys),
    "sha256sum": lambda s: hashlib.sha256(str(s).encode()).hexdigest(),
}


def _index(coll: Any, keys: tuple) -> Any:
    for k in keys:
        coll = coll.get(k) if isinstance(coll, dict) else coll[int(k)]
    return coll


class _Files:
    def __init__(self, root: Path) -> None:
        self.root = root

    def Get(self, name: str) -> str:  # Helm's method name
        return (self.root / name).read_text()


# ---- evaluation ----
class Chart:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta = yaml.safe_load((root / "Chart.yaml").read_text())
        self.defaults = yaml.safe_load((root / "values.yaml").read_text())
        self.defines: dict[str, list] = {}
        self.files: dict[str, list] = {}
        base = f"{self.meta['name']}/templates"
        for path in sorted((root / "templates").iterdir()):
            if path.suffix not in (".yaml", ".tpl", ".txt"):
                continue
            tree = _parse(_lex(path.read_text()), self.defines)
            self.defines[f"{base}/{path.name}"] = tree
            if not path.name.startswith("_") and path.suffix == ".yaml":
                self.files[path.name] = tree

    def render(self, release: str = "rvr-serve", values: dict | None = None) -> dict[str, str]:
        """{template file name: rendered text} for values merged over the chart's defaults."""
        merged = _merge(self.defaults, values or {})
        root = {
            "Values": merged,
            "Release": {"Name": release, "Namespace": "default", "Service": "Helm"},
            "Chart": {
                "Name": self.meta["name"],
                "Version": self.meta["version"],
                "AppVersion": self.meta.get("appVersion", ""),
            },
            "Template": {"BasePath": f"{self.meta['name']}/templates"},
            "Files": _Files(self.root),
        }
        return {name: self._exec(tree, root, {"$": root}) for name, tree in self.files.items()}

    def _exec(self, nodes: list, dot: Any, scope: dict) -> str:
        out: list[str] = []
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "expr":
                body = node[1]
                m = re.match(r"(\$[A-Za-z0-9_]+)\s*:?=\s*(.*)", body, re.S)
                if m:
                    scope[m.group(1)] = self._pipeline(m.group(2), dot, scope)
                else:
                    out.append(_gostr(self._pipeline(body, dot, scope)))
            elif kind == "if":
                for cond, branch in node[1]:
                    if _truthy(self._pipeline(cond, dot, scope)):
                        out.append(self._exec(branch, dot, scope))
                        break
                else:
                    out.append(self._exec(node[2], dot, scope))
            elif kind == "with":
                v = self._pipeline(node[1], dot, scope)
                if _truthy(v):
                    out.append(self._exec(node[2], v, dict(scope)))
                else:
                    out.append(self._exec(node[3], dot, scope))
            elif kind == "range":
                m = re.match(r"(?:(\$\w+)\s*(?:,\s*(\$\w+))?\s*:=)?\s*(.*)", node[1], re.S)
                assert m
                coll = self._pipeline(m.group(3), dot, scope)
                pairs = sorted(coll.items()) if isinstance(coll, dict) else list(enumerate(coll or []))
                if not pairs:
                    out.append(self._exec(node[3], dot, scope))
                for k, v in pairs:
                    inner = dict(scope)
                    if m.group(1) and m.group(2):
                        inner[m.group(1)], inner[m.group(2)] = k, v
                    elif m.group(1):
                        inner[m.group(1)] = v
                    out.append(self._exec(node[2], v, inner))
        return "".join(out)

    def _pipeline(self, src: str, dot: Any, scope: dict) -> Any:
        toks = _tokens(src)
        value, pos = self._pipe(toks, 0, dot, scope)
        if pos != len(toks):
            raise TemplateError(f"trailing tokens in {src!r}")
        return value

    def _pipe(self, toks: list, pos: int, dot: Any, scope: dict) -> tuple[Any, int]:
        value: Any = _NOTHING
        while True:
            value, pos = self._command(toks, pos, dot, scope, value)
            if pos < len(toks) and toks[pos] == ("punct", "|"):
                pos += 1
                continue
            return value, pos

    def _command(self, toks: list, pos: int, dot: Any, scope: dict, piped: Any) -> tuple[Any, int]:
        kind, text = toks[pos]
        if kind == "ident" and text not in ("true", "false", "nil"):
            args: list[Any] = []
            pos += 1
            while pos < len(toks) and toks[pos] not in (("punct", "|"), ("punct", ")")):
                arg, pos = self._operand(toks, pos, dot, scope)
                args.append(arg)
            if piped is not _NOTHING:
                args.append(piped)
            return self._call(text, args, dot), pos
        if kind == "field" and pos + 1 < len(toks) and toks[pos + 1] not in (("punct", "|"), ("punct", ")")):
            # A method call with arguments: .Files.Get "path".
            *owner, method = [f for f in text.split(".") if f]
            fn = getattr(_fields(dot, owner), method)
            margs: list[Any] = []
            pos += 1
            while pos < len(toks) and toks[pos] not in (("punct", "|"), ("punct", ")")):
                arg, pos = self._operand(toks, pos, dot, scope)
                margs.append(arg)
            if piped is not _NOTHING:
                margs.append(piped)
            return fn(*margs), pos
        if piped is not _NOTHING:
            raise TemplateError(f"cannot pipe into {text!r}")
        return self._operand(toks, pos, dot, scope)

    def _call(self, name: str, args: list, dot: Any) -> Any:
        if name == "include":
            tpl, ctx = args
            if tpl not in self.defines:
                raise TemplateError(f"include of undefined template {tpl!r}")
            return self._exec(self.defines[tpl], ctx, {"$": ctx})
        if name not in _FUNCS:
            raise TemplateError(f"function {name!r} is not in this subset")
        return _FUNCS[name](*args)

    def _operand(self, toks: list, pos: int, dot: Any, scope: dict) -> tuple[Any, int]:
        kind, text = toks[pos]
        if kind == "punct" and text == "(":
            value, pos = self._pipe(toks, pos + 1, dot, scope)
            if toks[pos] != ("punct", ")"):
                raise TemplateError("missing )")
            return value, pos + 1
        if kind == "str":
            return yaml.safe_load(text), pos + 1
        if kind == "raw":
            return text[1:-1], pos + 1
        if kind == "num":
            return (float(text) if "." in text else int(text)), pos + 1
        if kind == "ident":
            return {"true": True, "false": False, "nil": None}[text], pos + 1
        if kind == "var":
            name, *fields = text.split(".")
            if name not in scope:
                raise TemplateError(f"undefined variable {name}")
            return _fields(scope[name], fields), pos + 1
        if kind == "field":
            return _fields(dot, [f for f in text.split(".") if f]), pos + 1
        raise TemplateError(f"unexpected {text!r}")


_NOTHING = object()


def _fields(obj: Any, names: list[str]) -> Any:
    for name in names:
        if isinstance(obj, dict):
            obj = obj.get(name)
        elif obj is None:
            raise TemplateError(f"nil pointer evaluating .{name}")
        else:
            obj = getattr(obj, name)
    return obj


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v)
        return out
    return over
