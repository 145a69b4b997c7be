"""The welcome email, rendered from templates at registration time and stored as it is.

Three Jinja2 templates make the mail: ``welcome.subject.txt`` (the subject),
``welcome.txt`` (the plain-text part) and ``welcome.html`` (the HTML part, where every
variable is HTML-escaped). The shipped ones are package data next to this module, read
with :mod:`importlib.resources`; a file of the same name in ``TEMPLATES_DIR`` replaces
one (and may ``{% include %}`` or ``{% extends %}`` other files of that folder). They get
``name`` and ``email`` as registered, ``product_name`` (``PRODUCT_NAME``) and ``app_url``
(``APP_URL``, or None).

:func:`load_templates` compiles them once, at start-up, and proves them: a syntax error,
a variable they are not given (``StrictUndefined``), a missing include or an unusable
subject is a :class:`TemplateProblem` naming the file and line, so ``outbox api`` exits
at start-up instead of failing the first registration.

What a template produces goes through the same checks as any mail. The subject is made
one line (a line break or tab the template's own text puts there becomes a space; the
variables cannot hold one: names, PRODUCT_NAME and addresses are refused at the edge
when they do) and is then checked by :class:`outbox.dispatcher.outbox.Mail` with
``unsafe_text``; the header writer of ``dispatcher/message.py`` keeps any text, an
encoded-word look-alike included, literal. Templates are the operator's code: users'
text only ever reaches them as values, never as template source.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from email.headerregistry import Address
from importlib.resources import files
from pathlib import Path
from types import TracebackType

import jinja2
from jinja2 import meta, nodes

from outbox.dispatcher.outbox import Mail
from outbox.dispatcher.settings import Settings

__all__ = ["TEMPLATES", "VARIABLES", "TemplateProblem", "WelcomeTemplates", "load_templates"]

#: The welcome mail's templates: subject, plain-text part, HTML part.
TEMPLATES = ("welcome.subject.txt", "welcome.txt", "welcome.html")
#: What the templates are given.
VARIABLES = frozenset({"name", "email", "product_name", "app_url"})
#: Names Jinja2 provides inside templates besides its globals.
_BUILTIN_NAMES = frozenset({"loop", "self", "super", "caller", "varargs", "kwargs"})
#: The values of the start-up trial render.
_SAMPLE = {"name": "Ada Lovelace", "email": "ada@example.com"}
#: This package (``outbox.api``): the shipped templates' home, wherever it is installed.
_PACKAGE = __name__.rpartition(".")[0]
#: A run of white space holding a line break or a tab: one space in a subject.
_FOLD = re.compile(
    r" *[\t\n\v\f\r\x1c-\x1f\x85\u2028\u2029][\t\n\v\f\r\x1c-\x1f\x85\u2028\u2029 ]*"
)


class TemplateProblem(Exception):
    """A template that cannot be used; the message is one line naming its file and line."""


class _ShippedLoader(jinja2.BaseLoader):
    """The templates shipped in this package (``templates/``), via importlib.resources."""

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        pieces = jinja2.loaders.split_template_path(template)  # refuses ".." and the like
        resource = files(_PACKAGE).joinpath("templates", *pieces)
        if not resource.is_file():
            raise jinja2.TemplateNotFound(template)
        return resource.read_text(encoding="utf-8"), str(resource), lambda: True


class _Loader(jinja2.ChoiceLoader):
    """TEMPLATES_DIR first, then the shipped templates; remembers every file it read, so
    an error can be traced to the template file and line it came from."""

    def __init__(self, loaders: list[jinja2.BaseLoader]) -> None:
        super().__init__(loaders)
        self.filenames: set[str] = set()

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        source, filename, uptodate = super().get_source(environment, template)
        if filename is not None:
            self.filenames.add(filename)
        return source, filename, uptodate


@dataclass(frozen=True, slots=True)
class WelcomeTemplates:
    """The compiled welcome templates and the values every mail shares."""

    subject: jinja2.Template
    text: jinja2.Template
    html: jinja2.Template
    #: product_name and app_url, the same for every mail.
    shared: Mapping[str, object]
    #: Template name -> the file it was read from (shipped or from TEMPLATES_DIR).
    files: Mapping[str, str]
    #: Every template file read (includes and parents too).
    filenames: frozenset[str]

    def render(self, email: str, name: str) -> Mail:
        """The welcome mail for a new user (``email`` and ``name`` already validated).

        Raises :class:`TemplateProblem`, naming the file and line, if a template fails for
        these values or the subject it renders cannot be a header.
        """
        subject = one_line(self._render(self.subject, email, name))
        text = self._render(self.text, email, name)
        html = self._render(self.html, email, name)
        local, _, domain = email.rpartition("@")
        try:
            return Mail(
                recipient=Address(display_name=name, username=local, domain=domain),
                subject=subject,
                body_text=text,
                body_html=html,
            )
        except ValueError as exc:
            # The values are checked at the edge, so only a template's own text can make
            # a mail that cannot be sent (a control character in the subject, say).
            raise TemplateProblem(
                f"template {self.files[TEMPLATES[0]]}: renders a mail that cannot be sent: {exc}"
            ) from None

    def _render(self, template: jinja2.Template, email: str, name: str) -> str:
        try:
            # product_name and app_url are in the template's globals (load_templates).
            return template.render(name=name, email=email)
        except Exception as exc:
            raise TemplateProblem(_describe(exc, template, self.filenames)) from exc


def one_line(subject: str) -> str:
    """The rendered subject as one line: runs of white space holding a line break or a
    tab become one space, and the ends are stripped (a file's last newline included)."""
    return _FOLD.sub(" ", subject).strip()


def load_templates(settings: Settings) -> WelcomeTemplates:
    """Compile the welcome templates and prove them with a trial render.

    Raises :class:`TemplateProblem` with one line naming the file and line (or the
    setting) when they cannot be used.
    """
    loaders: list[jinja2.BaseLoader] = []
    folder = settings.templates_dir
    if folder is not None:
        if not folder.is_dir():
            raise TemplateProblem(
                f"invalid setting TEMPLATES_DIR: {folder} is not a folder (it holds files "
                f"named {', '.join(TEMPLATES)} that replace the shipped ones)"
            )
        loaders.append(jinja2.FileSystemLoader(folder, encoding="utf-8"))
    loaders.append(_ShippedLoader())
    loader = _Loader(loaders)
    environment = jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        # HTML-escape every value in .html templates, none in the text ones.
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html", "htm"), default_for_string=False, default=False
        ),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,  # compiled once: a changed file takes a restart
    )
    shared = {"product_name": settings.product_name, "app_url": settings.app_url}
    compiled: dict[str, jinja2.Template] = {}
    sources: dict[str, str] = {}
    for name in TEMPLATES:
        compiled[name], sources[name] = _compile(environment, name, folder)
        # The values every mail shares are given once, as globals, so a registration
        # passes only what varies. A plain dict: Jinja2 keeps a ChainMap here, which every
        # render copies item by item (more than half of these templates' rendering time).
        compiled[name].globals = {**compiled[name].globals, **shared}
    templates = WelcomeTemplates(
        subject=compiled[TEMPLATES[0]],
        text=compiled[TEMPLATES[1]],
        html=compiled[TEMPLATES[2]],
        shared=shared,
        files=sources,
        filenames=frozenset(loader.filenames),
    )
    _prove(templates)
    # Includes and parents read by the trial render, for messages about later failures.
    return replace(templates, filenames=frozenset(loader.filenames))


def _compile(
    environment: jinja2.Environment, name: str, folder: Path | None
) -> tuple[jinja2.Template, str]:
    filename = name if folder is None else str(folder / name)
    try:
        source, filename_or_none, _ = environment.loader.get_source(  # type: ignore[union-attr]
            environment, name
        )
        filename = filename_or_none or name
        tree = environment.parse(source, name, filename)
        template = environment.get_template(name)
    except jinja2.TemplateSyntaxError as exc:
        where = f", line {exc.lineno}" if exc.lineno else ""
        raise TemplateProblem(
            f"template {exc.filename or filename}{where}: {_one_line_message(exc.message)}"
        ) from None
    except UnicodeDecodeError:
        raise TemplateProblem(f"template {filename}: not UTF-8 text") from None
    except OSError as exc:
        raise TemplateProblem(f"template {filename}: cannot be read ({exc.strerror})") from None
    # Every variable the template reads must be one it is given, in branches a trial
    # render does not take too.
    unknown = (
        meta.find_undeclared_variables(tree) - VARIABLES - _BUILTIN_NAMES - set(environment.globals)
    )
    if unknown:
        first = min(
            (node.lineno, node.name)
            for node in tree.find_all(nodes.Name)
            if node.name in unknown and node.ctx == "load"
        )
        raise TemplateProblem(
            f"template {filename}, line {first[0]}: unknown variable {first[1]!r} "
            f"(the welcome templates get {', '.join(sorted(VARIABLES))})"
        )
    return template, filename


def _prove(templates: WelcomeTemplates) -> None:
    """Render a sample mail: what fails only when rendering (a missing include, an
    undefined attribute, a filter's error) fails at start-up, not at the first user."""
    mail = templates.render(_SAMPLE["email"], _SAMPLE["name"])
    if not mail.subject:
        raise TemplateProblem(f"template {templates.files[TEMPLATES[0]]}: renders an empty subject")


def _describe(exc: BaseException, template: jinja2.Template, filenames: frozenset[str]) -> str:
    """One line: the template file and line where ``exc`` was raised, and what it says."""
    filename, line = template.filename or template.name or "(template)", None
    traceback: TracebackType | None = exc.__traceback__
    while traceback is not None:
        # Jinja2 compiles a template into code that carries the template's file name and
        # line numbers; the innermost such frame is where it went wrong (an include's too).
        code_file = traceback.tb_frame.f_code.co_filename
        if code_file in filenames or code_file == template.filename:
            filename, line = code_file, traceback.tb_lineno
        traceback = traceback.tb_next
    if isinstance(exc, jinja2.TemplateNotFound):
        message = f"template {exc.name!r} not found"
    elif isinstance(exc, jinja2.TemplateError):
        message = exc.message or type(exc).__name__
    else:
        message = f"{type(exc).__name__}: {exc}"
    where = f", line {line}" if line is not None else ""
    return f"template {filename}{where}: {_one_line_message(message)}"


def _one_line_message(message: str | None) -> str:
    return " ".join((message or "").split())
