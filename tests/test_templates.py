"""The welcome mail's templates: shipped defaults, TEMPLATES_DIR, PRODUCT_NAME and APP_URL.

What the templates render goes into the outbox row and from there through the strict
header writer, so every check ends at the message a reader parses. A broken template
stops `outbox api` and `outbox dev` (real processes) at start-up with one line naming
the file and line. Real PostgreSQL, no mocks.
"""

from __future__ import annotations

import html
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import markupsafe
import pytest
from asgi_lifespan import LifespanManager
from pydantic import ValidationError

from outbox.api import welcome
from outbox.api.app import create_app
from outbox.api.welcome import TEMPLATES, TemplateProblem, load_templates, one_line
from outbox.cli.embedded_pg import free_port
from outbox.dispatcher.message import build_message
from outbox.dispatcher.settings import Settings
from tests.hostile import check_message, parse

OUTBOX = str(Path(sys.executable).with_name("outbox"))
MAIL_FROM = "Outbox <hello@example.org>"
#: The welcome mail as it was written in code before it came from templates.
BEFORE_TEMPLATES = {
    "subject": "Welcome to Outbox, Ada Lovelace!",
    "body_text": "Hello Ada Lovelace,\n\n"
    "thank you for registering with Outbox. Your account (ada@example.com) is ready.\n\n"
    "-- The Outbox team\n",
    "body_html": "<!doctype html>\n<html><body>\n"
    "<p>Hello Ada Lovelace,</p>\n"
    "<p>thank you for registering with Outbox. "
    "Your account (<b>ada@example.com</b>) is ready.</p>\n"
    "<p>&mdash; The Outbox team</p>\n"
    "</body></html>\n",
}


def _settings(database_url: str = "postgresql://localhost/none", **more: Any) -> Settings:
    return Settings(database_url=database_url, mail_from=MAIL_FROM, **more)


def _folder(tmp_path: Path, **templates: str) -> Path:
    folder = tmp_path / "templates"
    folder.mkdir(exist_ok=True)
    for name, source in templates.items():
        (folder / name.replace("_", ".")).write_text(source, encoding="utf-8")
    return folder


async def _registered(
    database_url: str, db: asyncpg.Pool, name: str, email: str = "ada@example.com", **more: Any
) -> asyncpg.Record:
    """Register through the real app with these settings; the outbox row it stored."""
    app = create_app(_settings(database_url, **more))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            response = await http.post("/register", json={"email": email, "name": name})
    assert response.status_code == 201, response.text
    row = await db.fetchrow("SELECT * FROM outbox WHERE id = $1", response.json()["outbox_id"])
    assert row is not None
    return row


# --- the shipped templates ----------------------------------------------------------------


def test_the_shipped_templates_are_package_data() -> None:
    shipped = files(welcome.__name__.rpartition(".")[0]).joinpath("templates")
    for name in TEMPLATES:
        assert shipped.joinpath(name).is_file(), name
    templates = load_templates(_settings())
    assert all(Path(path).name in TEMPLATES for path in templates.files.values())


def test_the_defaults_render_the_welcome_mail_as_before() -> None:
    mail = load_templates(_settings()).render("ada@example.com", "Ada Lovelace")
    assert mail.subject == BEFORE_TEMPLATES["subject"]
    assert mail.body_text == BEFORE_TEMPLATES["body_text"]
    assert mail.body_html == BEFORE_TEMPLATES["body_html"]
    assert str(mail.recipient) == "Ada Lovelace <ada@example.com>"


def test_product_name_and_app_url_reach_every_part() -> None:
    templates = load_templates(
        _settings(product_name="Acme Cloud", app_url="https://app.acme.example/start?a=1&b=2")
    )
    mail = templates.render("ada@example.com", "Ada")
    assert mail.subject == "Welcome to Acme Cloud, Ada!"
    assert "registering with Acme Cloud." in mail.body_text
    assert "Sign in at https://app.acme.example/start?a=1&b=2\n" in mail.body_text
    assert mail.body_text.endswith("\n\n-- The Acme Cloud team\n")
    assert '<a href="https://app.acme.example/start?a=1&amp;b=2">' in mail.body_html
    assert "The Acme Cloud team" in mail.body_html
    # Without APP_URL there is no link at all.
    plain = load_templates(_settings(product_name="Acme Cloud")).render("a@example.com", "A")
    assert "Sign in" not in plain.body_text and "<a " not in plain.body_html


def test_html_is_autoescaped_and_text_is_not() -> None:
    name = "<script>alert('x')</script> & \"Bob\""
    mail = load_templates(_settings()).render("bob@example.com", name)
    assert f"<p>Hello {markupsafe.escape(name)},</p>" in mail.body_html
    assert "<script>" not in mail.body_html
    assert f"Hello {name}," in mail.body_text  # plain text stays as typed
    assert mail.subject == f"Welcome to Outbox, {name}!"


# --- hostile names through every template, to the parsed message --------------------------

HOSTILE_NAMES = [
    "=?utf-8?q?x=0D=0ABcc:_a@b?=",
    "=?utf-8?b?eEBldmlsLmV4YW1wbGUsIA==?=",  # "x@evil.example, "
    '"Eve" <x@evil.example>, y@evil.example',
    "<script>alert(1)</script> & 'quotes' \"too\"",
    "{{ product_name }} {% if true %}x{% endif %} {# c #}",  # template syntax is just text
    "Ada\u00a0\u3000Lovelace  two  spaces",  # white space that is not a line break
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian with its ZWNJ
    "👩\u200d👩\u200d👧",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_a_hostile_name_goes_through_every_template_literally(
    database_url: str, db: asyncpg.Pool, name: str
) -> None:
    row = await _registered(database_url, db, name, app_url="https://app.example.com/")
    assert row["recipient_name"] == name
    assert row["subject"] == f"Welcome to Outbox, {name}!"
    assert f"Hello {name}," in row["body_text"]
    assert f"<p>Hello {markupsafe.escape(name)},</p>" in row["body_html"]
    assert html.unescape(str(markupsafe.escape(name))) == name
    data = build_message(row).as_bytes()
    parsed = check_message(data, row, smtputf8=False)  # exactly the row, nothing more
    assert parsed["Bcc"] is None and parsed["Cc"] is None and parsed["Reply-To"] is None
    assert str(parsed["Subject"]) == f"Welcome to Outbox, {name}!"
    [to] = parsed["To"].addresses
    assert to.addr_spec == "ada@example.com"


async def test_an_encoded_word_name_as_the_whole_subject_stays_literal(
    database_url: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    # The subject is nothing but the name: the header writer must still keep it literal.
    name = "=?utf-8?q?x=0D=0ABcc:_a@b?="
    folder = _folder(tmp_path, welcome_subject_txt="{{ name }}\n")
    row = await _registered(database_url, db, name, templates_dir=folder)
    assert row["subject"] == name
    parsed = parse(build_message(row).as_bytes(), smtputf8=False)
    assert str(parsed["Subject"]) == name
    assert parsed["Bcc"] is None
    assert list(parsed.keys()) == [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
    ]


async def test_a_subject_template_that_breaks_the_line_gives_one_line(
    database_url: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    """Decision: a line break (or tab) that the template's own text puts into the subject,
    for some input only, becomes a space: the mail is queued (201) with a one-line subject,
    and nothing after the break can become a header."""
    folder = _folder(
        tmp_path,
        welcome_subject_txt="Welcome {{ name }}{% if name|length > 10 %},\r\n"
        "Bcc: evil@example.com\n\tand more{% endif %}\n",
    )
    long = await _registered(database_url, db, "Ada Lovelace", templates_dir=folder)
    assert long["subject"] == "Welcome Ada Lovelace, Bcc: evil@example.com and more"
    parsed = check_message(build_message(long).as_bytes(), long, smtputf8=False)
    assert parsed["Bcc"] is None
    short = await _registered(database_url, db, "Ada", "ada2@example.com", templates_dir=folder)
    assert short["subject"] == "Welcome Ada"


def test_one_line_folds_only_line_breaks_and_tabs() -> None:
    assert one_line("A\r\n  B\n\n\tC \u2028 D\u2029E\x85F\x0bG\x0cH\n") == "A B C D E F G H"
    # Other white space is the user's text and stays as it is.
    assert one_line("Ada\u00a0\u3000Lovelace  two") == "Ada\u00a0\u3000Lovelace  two"


async def test_a_subject_the_template_makes_unsendable_is_refused_with_nothing_stored(
    database_url: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    # A control character from the template's own text, in a branch the start-up trial
    # does not take: a server-side error (500), logged with the file, and nothing stored.
    folder = _folder(
        tmp_path, welcome_subject_txt='Hi {{ name }}{% if name == "Bob" %}\x07{% endif %}\n'
    )
    templates = load_templates(_settings(templates_dir=folder))
    with pytest.raises(TemplateProblem, match=r"welcome\.subject\.txt: renders a mail"):
        templates.render("bob@example.com", "Bob")
    app = create_app(_settings(database_url, templates_dir=folder))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            response = await http.post("/register", json={"email": "b@example.com", "name": "Bob"})
            assert response.status_code == 500, response.text
            assert response.json() == {"detail": "internal error; nothing was stored"}
            ok = await http.post("/register", json={"email": "a@example.com", "name": "Ada"})
            assert ok.status_code == 201, ok.text
    assert await db.fetchval("SELECT count(*) FROM users") == 1


# --- TEMPLATES_DIR --------------------------------------------------------------------------


async def test_a_file_in_templates_dir_replaces_the_shipped_one_by_name(
    database_url: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    folder = _folder(
        tmp_path,
        welcome_html='{% extends "layout.html" %}{% block body %}'
        "<h1>Hi {{ name }}</h1>{% include 'footer.html' %}{% endblock %}",
        layout_html="<!doctype html>\n<html><body>{% block body %}{% endblock %}</body></html>\n",
        footer_html="<footer>{{ product_name }}</footer>",
        notes_txt="not a template of the welcome mail: ignored",
    )
    templates = load_templates(_settings(templates_dir=folder, product_name="Acme"))
    assert templates.files["welcome.html"] == str(folder / "welcome.html")
    assert Path(templates.files["welcome.txt"]).parent != folder  # still the shipped one
    row = await _registered(database_url, db, "<Ada>", templates_dir=folder, product_name="Acme")
    assert row["body_html"] == (
        "<!doctype html>\n<html><body><h1>Hi &lt;Ada&gt;</h1><footer>Acme</footer></body></html>\n"
    )
    assert row["subject"] == "Welcome to Acme, <Ada>!"  # shipped subject and text
    assert row["body_text"].startswith("Hello <Ada>,\n")


async def test_templates_are_compiled_once_at_start_up(
    database_url: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    folder = _folder(tmp_path, welcome_txt="First version for {{ name }}\n")
    app = create_app(_settings(database_url, templates_dir=folder))
    # Changed (even broken) after start-up: the running app keeps what it compiled.
    (folder / "welcome.txt").write_text("Second {{ broken\n", encoding="utf-8")
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            for i in range(3):
                body = {"email": f"u{i}@example.com", "name": f"U{i}"}
                assert (await http.post("/register", json=body)).status_code == 201
    texts = [r["body_text"] for r in await db.fetch("SELECT body_text FROM outbox ORDER BY id")]
    assert texts == [f"First version for U{i}\n" for i in range(3)]


BROKEN = [
    # (file, source, what the one line must say)
    ("welcome.html", "<p>\n{% if name %}\n{{ name }\n", "welcome.html, line 3: unexpected '}'"),
    ("welcome.txt", "Hello\n\n{{ nmae }}\n", "welcome.txt, line 3: unknown variable 'nmae'"),
    (
        "welcome.subject.txt",
        "{% if app_url %}{{ surname }}{% endif %}Hi\n",  # a branch not taken: found anyway
        "welcome.subject.txt, line 1: unknown variable 'surname'",
    ),
    (
        "welcome.txt",
        "Hi {{ name }}\n{{ name.first_name }}\n",
        "welcome.txt, line 2: 'str object' has no attribute 'first_name'",
    ),
    (
        "welcome.html",
        "<p>x</p>\n{% include 'missing.html' %}\n",
        "welcome.html, line 2: template 'missing.html' not found",
    ),
    ("welcome.txt", "{{ name | shout }}\n", "welcome.txt, line 1: No filter named 'shout'"),
    ("welcome.subject.txt", "  \n", "welcome.subject.txt: renders an empty subject"),
]


@pytest.mark.parametrize(("file", "source", "expected"), BROKEN, ids=[e for _, _, e in BROKEN])
def test_a_broken_template_is_one_line_naming_file_and_line(
    tmp_path: Path, file: str, source: str, expected: str
) -> None:
    folder = _folder(tmp_path)
    (folder / file).write_text(source, encoding="utf-8")
    with pytest.raises(TemplateProblem) as raised:
        load_templates(_settings(templates_dir=folder))
    message = str(raised.value)
    assert message.startswith(f"template {folder}/{expected}"), message
    assert "\n" not in message
    # The app is not built either: no first registration to fail.
    with pytest.raises(TemplateProblem):
        create_app(_settings(templates_dir=folder))


def test_templates_that_are_not_utf8_or_a_missing_folder_are_named(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "welcome.txt").write_bytes(b"Hallo \xe4\n")
    with pytest.raises(TemplateProblem, match=f"^template {folder}/welcome.txt: not UTF-8 text$"):
        load_templates(_settings(templates_dir=folder))
    missing = tmp_path / "nowhere"
    with pytest.raises(
        TemplateProblem, match=f"^invalid setting TEMPLATES_DIR: {missing} is not a folder"
    ):
        load_templates(_settings(templates_dir=missing))


def _env(**settings: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LOG_", "SMTP_", "DATABASE_", "TEMPLATES_", "APP_", "PRODUCT_"))
    }
    env.update(settings)
    return env


def _run(command: list[str], cwd: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        env=_env(**settings),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


#: A URL of the right form whose port is closed: nothing may get as far as connecting.
CLOSED = "postgresql://postgres@127.0.0.1:9/outbox"


@pytest.mark.parametrize(
    "command",
    [
        ["api", "--port", "{port}"],
        ["dev", "--port", "{port}", "--data-dir", "{data}"],
    ],
    ids=["outbox api", "outbox dev"],
)
def test_a_broken_template_stops_a_real_process_at_start_up(
    tmp_path: Path, command: list[str]
) -> None:
    folder = _folder(tmp_path, welcome_html="<p>Hello</p>\n\n{% for x in %}\n")
    data = tmp_path / "data"
    argv = [OUTBOX, *(a.format(port=free_port(), data=data) for a in command)]
    settings = {"TEMPLATES_DIR": str(folder)}
    if command[0] == "api":
        settings["DATABASE_URL"] = CLOSED
    done = _run(argv, tmp_path, **settings)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr == (
        f"outbox {command[0]}: template {folder}/welcome.html, line 3: "
        "Expected an expression, got 'end of statement block'\n"
    )
    if command[0] == "dev":  # stopped before anything was started
        assert not (data / "postgres").exists() and not (data / "mail").exists()


def test_a_bad_templates_dir_stops_outbox_api(tmp_path: Path) -> None:
    done = _run(
        [OUTBOX, "api", "--port", str(free_port())],
        tmp_path,
        DATABASE_URL=CLOSED,
        TEMPLATES_DIR=str(tmp_path / "no-such-folder"),
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        f"outbox api: invalid setting TEMPLATES_DIR: {tmp_path / 'no-such-folder'} is not a folder"
    )
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_the_uvicorn_factory_stops_on_a_broken_template_too(tmp_path: Path) -> None:
    # `uvicorn --factory outbox.api.app:create_app`, the documented way to embed the app.
    folder = _folder(tmp_path, welcome_txt="{{ name }\n")
    done = _run(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            f"{create_app.__module__}:create_app",
            "--port",
            str(free_port()),
        ],
        tmp_path,
        DATABASE_URL=CLOSED,
        TEMPLATES_DIR=str(folder),
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )
    assert done.returncode == 2, done.stderr
    assert f"outbox api: template {folder}/welcome.txt, line 1: unexpected '}}'" in done.stderr
    assert "Traceback" not in done.stderr


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ftp://files.example.com", "must start with http:// or https://"),
        ("javascript:alert(1)", "must start with http:// or https://"),
        ("app.example.com", "must start with http:// or https://"),
        ("https://", "must name a host"),
        ("https://user:secret@app.example.com", "must not hold a user name or password"),
        ("https://app.example.com:99999", "invalid port"),
        ("https://app.example.com/a b", "printable ASCII without spaces"),
        ("https://bücher.de", "printable ASCII without spaces"),
        ("https://app.example.com/\r\nBcc:x", "printable ASCII without spaces"),
        ("https://app.example.com/" + "x" * 2000, "at most 2000 characters"),
    ],
)
def test_app_url_must_be_an_http_url(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(app_url=value)


def test_good_template_settings() -> None:
    assert Settings(app_url="https://app.example.com/welcome?x=1").app_url == (
        "https://app.example.com/welcome?x=1"
    )
    assert Settings(app_url=" http://localhost:8000 ").app_url == "http://localhost:8000"
    assert Settings(app_url="").app_url is None
    assert Settings().app_url is None
    assert Settings().product_name == "Outbox"
    assert Settings(product_name="  Acme  ").product_name == "Acme"
    assert Settings(product_name="Ünïcødé 山田 ✉").product_name == "Ünïcødé 山田 ✉"
    assert Settings(templates_dir="").templates_dir is None
    assert Settings(templates_dir="/srv/mail").templates_dir == Path("/srv/mail")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "at least 1 character"),
        ("   ", "at least 1 character"),
        ("A" * 101, "at most 100 characters"),
        ("Acme\r\nBcc: x@evil.example", "control characters"),
        ("Acme\u2028Inc", "line separators"),
        ("Acme \u202eInc", "bidirectional control characters"),
    ],
)
def test_product_name_must_be_plain_text(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(product_name=value)
