"""The docs of configuration fields, read from their attribute docstrings.

A field of a configuration dataclass is documented by a string literal right after it::

    @dataclass
    class TrainerConfig:
        discriminator_warmup: int = 10
        \"\"\"Warm-up stage: the actor's SFT update runs only once step >= discriminator_warmup.\"\"\"

Python keeps no trace of such strings at run time, so they are read from the source of the module
that defines the class (``ast``, parsed once per module and cached). ``--help`` shows them beside
each flag's default (:func:`gadchat.config.build_parser`).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sys


@functools.lru_cache(maxsize=None)
def module_field_docs(module_name: str) -> dict:
    """``{"Class.field": doc}`` for every class of the module (nested classes as ``Outer.Inner``)
    whose body has a string literal right after an assignment to ``field``; docs are dedented
    (:func:`inspect.cleandoc`). Empty when the module's source cannot be read."""
    module = sys.modules.get(module_name)
    if module is None:
        return {}
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs: dict = {}

    def visit(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                qualname = f"{prefix}{node.name}"
                for statement, following in zip(node.body, node.body[1:]):
                    name = _assigned_name(statement)
                    if name and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) \
                            and isinstance(following.value.value, str):
                        docs[f"{qualname}.{name}"] = inspect.cleandoc(following.value.value)
                visit(node.body, f"{qualname}.")

    visit(tree.body, "")
    return docs


def _assigned_name(statement) -> str | None:
    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
        return statement.target.id
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
        return statement.targets[0].id
    return None


def field_doc(cls: type, name: str) -> str:
    """The attribute docstring of field ``name`` of dataclass ``cls`` (looked up along its MRO), or
    ``""`` when it has none."""
    for klass in inspect.getmro(cls):
        doc = module_field_docs(klass.__module__).get(f"{klass.__qualname__}.{name}")
        if doc is not None:
            return doc
    return ""


def help_text(cls: type, name: str) -> str:
    """:func:`field_doc` as one line for an argparse help string: whitespace collapsed, double
    backquotes shown as single ones, ``%`` escaped (argparse formats help strings with ``%``)."""
    doc = " ".join(field_doc(cls, name).split())
    doc = re.sub(r"``(.+?)``", r"`\1`", doc)
    return doc.replace("%", "%%")
