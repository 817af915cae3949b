"""edge-chat's answer options, made from `AnswerOptions` (sllm.sentences.sampling): one command-line
option per field with help text (its name, type, default and help are the field's; `flags` in its
metadata, when the option is spelled otherwise), handed to the command as one checked AnswerOptions."""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import fields
from typing import Callable, NoReturn

import typer

from sllm.sentences.sampling import AnswerOptions


def answer_options(fail: Callable[[str], NoReturn]):
    """Decorator for a typer command with a parameter `options: AnswerOptions`: in its place (and in the
    help), one option per field; `fail(message)` for a value AnswerOptions refuses."""
    hints = typing.get_type_hints(AnswerOptions)
    cli = [f for f in fields(AnswerOptions) if "help" in f.metadata]

    def decorate(command):
        signature = inspect.signature(command)
        params = []
        for p in signature.parameters.values():
            if p.name != "options":
                params.append(p)
                continue
            params += [inspect.Parameter(f.name, p.kind, annotation=hints[f.name],
                                         default=typer.Option(f.default, *f.metadata.get("flags", ()),
                                                              help=f.metadata["help"]))
                       for f in cli]

        @functools.wraps(command)
        def wrapper(**values):
            try:
                options = AnswerOptions(**{f.name: values.pop(f.name) for f in cli})
            except ValueError as e:
                fail(str(e))
            return command(**values, options=options)

        wrapper.__signature__ = signature.replace(parameters=params)
        wrapper.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != "options"},
                                   **{f.name: hints[f.name] for f in cli}}
        return wrapper

    return decorate
